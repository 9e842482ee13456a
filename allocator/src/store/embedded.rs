//! The embedded lease store on redb: an ACID, crash-safe (copy-on-write B-tree with checksummed
//! commits) key-value file. One write transaction per batch, committed with
//! `Durability::Immediate` (fsync) — group commit.

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::{decode_epoch, decode_lease, encode_epoch, encode_lease, hex, ip_key, CommitError, LoadError, OpenError, Store};
use crate::lease::{JournalOp, Loaded};

const LEASES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("leases");
const EPOCHS: TableDefinition<u64, &[u8]> = TableDefinition::new("alias_epochs");

/// The embedded default store (see the module docs).
pub struct RedbStore {
    db: Database,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RedbStore")
    }
}

impl RedbStore {
    /// Opens the database at `path`, creating it (and its tables) if absent.
    pub fn open(path: &Path) -> Result<Self, OpenError> {
        let shown = path.display().to_string();
        let db = Database::create(path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => OpenError::InUse(shown.clone()),
            e => OpenError::Database { path: shown.clone(), reason: e.to_string() },
        })?;
        let fail = |e: redb::Error| OpenError::Database { path: shown.clone(), reason: e.to_string() };
        let tx = db.begin_write().map_err(|e| fail(e.into()))?;
        tx.open_table(LEASES).map_err(|e| fail(e.into()))?;
        tx.open_table(EPOCHS).map_err(|e| fail(e.into()))?;
        tx.commit().map_err(|e| fail(e.into()))?;
        Ok(RedbStore { db })
    }
}

fn db_err(e: impl Into<redb::Error>) -> String {
    e.into().to_string()
}

impl Store for RedbStore {
    fn load(&mut self) -> Result<Loaded, LoadError> {
        let tx = self.db.begin_read().map_err(|e| LoadError::Database(db_err(e)))?;
        let leases_t = tx.open_table(LEASES).map_err(|e| LoadError::Database(db_err(e)))?;
        let epochs_t = tx.open_table(EPOCHS).map_err(|e| LoadError::Database(db_err(e)))?;
        let mut out = Loaded::default();
        for row in leases_t.iter().map_err(|e| LoadError::Database(db_err(e)))? {
            let (k, v) = row.map_err(|e| LoadError::Database(db_err(e)))?;
            let lease = decode_lease(k.value(), v.value())
                .ok_or_else(|| LoadError::Corrupt { table: "leases", key: hex(k.value()) })?;
            out.leases.push(lease);
        }
        for row in epochs_t.iter().map_err(|e| LoadError::Database(db_err(e)))? {
            let (k, v) = row.map_err(|e| LoadError::Database(db_err(e)))?;
            let e = decode_epoch(k.value(), v.value())
                .ok_or_else(|| LoadError::Corrupt { table: "alias_epochs", key: k.value().to_string() })?;
            out.epochs.push(e);
        }
        Ok(out)
    }

    fn commit(&mut self, ops: &[JournalOp]) -> Result<(), CommitError> {
        if ops.is_empty() {
            return Ok(());
        }
        let err = |e: String| CommitError::Database(e);
        let tx = self.db.begin_write().map_err(|e| err(db_err(e)))?;
        {
            let mut leases = tx.open_table(LEASES).map_err(|e| err(db_err(e)))?;
            let mut epochs = tx.open_table(EPOCHS).map_err(|e| err(db_err(e)))?;
            for op in ops {
                match op {
                    JournalOp::PutLease(l) => {
                        leases.insert(ip_key(l.ip).as_slice(), encode_lease(l).as_slice()).map_err(|e| err(db_err(e)))?;
                    }
                    JournalOp::DeleteLease(ip) => {
                        leases.remove(ip_key(*ip).as_slice()).map_err(|e| err(db_err(e)))?;
                    }
                    JournalOp::PutEpoch(e) => {
                        epochs.insert(e.epoch, encode_epoch(e).as_slice()).map_err(|e| err(db_err(e)))?;
                    }
                    JournalOp::DeleteEpoch(n) => {
                        epochs.remove(*n).map_err(|e| err(db_err(e)))?;
                    }
                }
            }
        }
        // Durability::Immediate is redb's default: commit returns after the data is on disk.
        tx.commit().map_err(|e| err(db_err(e)))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::sample_ops;

    #[test]
    fn redb_store_persists_across_reopen_and_refuses_a_second_opener() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("leases.redb");
        let (ops, l2, e) = sample_ops();
        {
            let mut s = RedbStore::open(&path).unwrap();
            s.commit(&ops).unwrap();
            assert!(matches!(RedbStore::open(&path), Err(OpenError::InUse(_))));
        }
        let mut s = RedbStore::open(&path).unwrap();
        let got = s.load().unwrap();
        assert_eq!(got.leases, vec![l2]);
        assert_eq!(got.epochs, vec![e]);
    }

    #[test]
    fn garbage_file_is_an_open_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("junk.redb");
        std::fs::write(&path, b"this is not a redb file at all, just text").unwrap();
        let e = RedbStore::open(&path).unwrap_err();
        assert!(e.to_string().contains("junk.redb"), "{e}");
    }
}
