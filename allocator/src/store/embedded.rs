//! The embedded lease store on redb: an ACID, crash-safe (copy-on-write B-tree with checksummed
//! commits) key-value file, used as a log-structured lease journal.
//!
//! # Layout and why
//!
//! * `journal` (u64 sequence → op): every lease change is *appended*. Sequential keys land in the
//!   rightmost leaf pages, so a commit of a few hundred changes writes a handful of pages — the
//!   cheap commit that makes group commit fast. (Writing each change straight into an
//!   address-keyed table touches one random leaf page per change: about 5× slower measured with
//!   200,000 leases, and worse as the table grows.)
//! * `leases` (address → lease): the folded state. When the journal holds `fold_ops` changes,
//!   the commit that crosses the threshold also applies the whole journal to `leases` and
//!   empties it, in the same transaction: big folds touch each leaf page once for many changes.
//! * `alias_epochs` (epoch → aliases): rare writes, stored directly.
//!
//! Every [`commit`](Store::commit) is one write transaction with `Durability::Immediate`
//! (redb's default: fsync before `commit` returns). [`load`](Store::load) reads `leases` and
//! replays `journal` in order.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use super::{
    decode_epoch, decode_lease, encode_epoch, encode_lease, hex, ip_key, CommitError, LoadError,
    OpenError, Store,
};
use crate::lease::{JournalOp, Lease, Loaded};

const LEASES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("leases");
const JOURNAL: TableDefinition<u64, &[u8]> = TableDefinition::new("journal");
const EPOCHS: TableDefinition<u64, &[u8]> = TableDefinition::new("alias_epochs");

/// Default journal length that triggers a fold.
pub const DEFAULT_FOLD_OPS: u64 = 65_536;

const OP_PUT: u8 = 1;
const OP_DELETE: u8 = 2;

/// The embedded default store (see the module docs).
pub struct RedbStore {
    db: Database,
    next_seq: u64,
    journal_len: u64,
    fold_ops: u64,
    folds: u64,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore")
            .field("journal_len", &self.journal_len)
            .field("folds", &self.folds)
            .finish()
    }
}

impl RedbStore {
    /// Opens the database at `path`, creating it (and its tables) if absent, folding every
    /// [`DEFAULT_FOLD_OPS`] changes.
    pub fn open(path: &Path) -> Result<Self, OpenError> {
        Self::open_with(path, DEFAULT_FOLD_OPS)
    }

    /// Opens with a fold threshold (at least 1).
    pub fn open_with(path: &Path, fold_ops: u64) -> Result<Self, OpenError> {
        let shown = path.display().to_string();
        let db = Database::create(path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => OpenError::InUse(shown.clone()),
            e => OpenError::Database {
                path: shown.clone(),
                reason: e.to_string(),
            },
        })?;
        let fail = |e: redb::Error| OpenError::Database {
            path: shown.clone(),
            reason: e.to_string(),
        };
        let tx = db.begin_write().map_err(|e| fail(e.into()))?;
        let (next_seq, journal_len) = {
            tx.open_table(LEASES).map_err(|e| fail(e.into()))?;
            tx.open_table(EPOCHS).map_err(|e| fail(e.into()))?;
            let j = tx.open_table(JOURNAL).map_err(|e| fail(e.into()))?;
            let last = j
                .last()
                .map_err(|e| fail(e.into()))?
                .map(|(k, _)| k.value());
            (
                last.map_or(0, |l| l + 1),
                j.len().map_err(|e| fail(e.into()))?,
            )
        };
        tx.commit().map_err(|e| fail(e.into()))?;
        Ok(RedbStore {
            db,
            next_seq,
            journal_len,
            fold_ops: fold_ops.max(1),
            folds: 0,
        })
    }

    /// Folds performed since open.
    pub fn folds(&self) -> u64 {
        self.folds
    }

    /// Changes in the journal not yet folded.
    pub fn journal_len(&self) -> u64 {
        self.journal_len
    }
}

fn db_err(e: impl Into<redb::Error>) -> String {
    e.into().to_string()
}

fn encode_op(op: &JournalOp) -> Option<Vec<u8>> {
    match op {
        JournalOp::PutLease(l) => {
            let k = ip_key(l.ip);
            let mut v = Vec::with_capacity(2 + k.len() + 24);
            v.push(OP_PUT);
            v.push(k.len() as u8);
            v.extend_from_slice(&k);
            v.extend_from_slice(&encode_lease(l));
            Some(v)
        }
        JournalOp::DeleteLease(ip) => {
            let k = ip_key(*ip);
            let mut v = Vec::with_capacity(2 + k.len());
            v.push(OP_DELETE);
            v.push(k.len() as u8);
            v.extend_from_slice(&k);
            Some(v)
        }
        JournalOp::PutEpoch(_) | JournalOp::DeleteEpoch(_) => None,
    }
}

/// A decoded journal entry: the lease key and the new lease (None: deleted).
fn decode_op(v: &[u8]) -> Option<(Vec<u8>, Option<Lease>)> {
    let (&tag, rest) = v.split_first()?;
    let (&klen, rest) = rest.split_first()?;
    let key = rest.get(..usize::from(klen))?;
    let val = &rest[usize::from(klen)..];
    match tag {
        OP_PUT => Some((key.to_vec(), Some(decode_lease(key, val)?))),
        OP_DELETE if val.is_empty() => {
            super::ip_from_key(key)?;
            Some((key.to_vec(), None))
        }
        _ => None,
    }
}

impl Store for RedbStore {
    fn load(&mut self) -> Result<Loaded, LoadError> {
        let dberr = |e: String| LoadError::Database(e);
        let tx = self.db.begin_read().map_err(|e| dberr(db_err(e)))?;
        let leases_t = tx.open_table(LEASES).map_err(|e| dberr(db_err(e)))?;
        let journal_t = tx.open_table(JOURNAL).map_err(|e| dberr(db_err(e)))?;
        let epochs_t = tx.open_table(EPOCHS).map_err(|e| dberr(db_err(e)))?;
        // The journal's last word on an address overrides the folded table. The journal is
        // short (< fold_ops), so index it and stream the big table straight into the output.
        let mut latest: HashMap<IpAddr, Option<Lease>> = HashMap::new();
        for row in journal_t.iter().map_err(|e| dberr(db_err(e)))? {
            let (k, v) = row.map_err(|e| dberr(db_err(e)))?;
            let corrupt = || LoadError::Corrupt {
                table: "journal",
                key: k.value().to_string(),
            };
            let (key, lease) = decode_op(v.value()).ok_or_else(corrupt)?;
            latest.insert(super::ip_from_key(&key).ok_or_else(corrupt)?, lease);
        }
        let mut leases: Vec<Lease> =
            Vec::with_capacity(leases_t.len().unwrap_or(0) as usize + latest.len());
        for row in leases_t.iter().map_err(|e| dberr(db_err(e)))? {
            let (k, v) = row.map_err(|e| dberr(db_err(e)))?;
            let lease = decode_lease(k.value(), v.value()).ok_or_else(|| LoadError::Corrupt {
                table: "leases",
                key: hex(k.value()),
            })?;
            if !latest.contains_key(&lease.ip) {
                leases.push(lease);
            }
        }
        leases.extend(latest.into_values().flatten());
        let mut out = Loaded {
            leases,
            epochs: Vec::new(),
        };
        for row in epochs_t.iter().map_err(|e| dberr(db_err(e)))? {
            let (k, v) = row.map_err(|e| dberr(db_err(e)))?;
            let e = decode_epoch(k.value(), v.value()).ok_or_else(|| LoadError::Corrupt {
                table: "alias_epochs",
                key: k.value().to_string(),
            })?;
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
        let mut seq = self.next_seq;
        let mut journal_len = self.journal_len;
        let mut folded = false;
        {
            let mut journal = tx.open_table(JOURNAL).map_err(|e| err(db_err(e)))?;
            let mut epochs = tx.open_table(EPOCHS).map_err(|e| err(db_err(e)))?;
            for op in ops {
                match op {
                    JournalOp::PutEpoch(e) => {
                        epochs
                            .insert(e.epoch, encode_epoch(e).as_slice())
                            .map_err(|e| err(db_err(e)))?;
                    }
                    JournalOp::DeleteEpoch(n) => {
                        epochs.remove(*n).map_err(|e| err(db_err(e)))?;
                    }
                    lease_op => {
                        if let Some(v) = encode_op(lease_op) {
                            journal
                                .insert(seq, v.as_slice())
                                .map_err(|e| err(db_err(e)))?;
                            seq += 1;
                            journal_len += 1;
                        }
                    }
                }
            }
            if journal_len >= self.fold_ops {
                // Fold: apply the journal to `leases` in order and empty it, atomically with
                // this batch.
                let mut leases = tx.open_table(LEASES).map_err(|e| err(db_err(e)))?;
                let mut bad = None;
                for row in journal.iter().map_err(|e| err(db_err(e)))? {
                    let (k, v) = row.map_err(|e| err(db_err(e)))?;
                    match decode_op(v.value()) {
                        Some((key, Some(l))) => {
                            leases
                                .insert(key.as_slice(), encode_lease(&l).as_slice())
                                .map_err(|e| err(db_err(e)))?;
                        }
                        Some((key, None)) => {
                            leases.remove(key.as_slice()).map_err(|e| err(db_err(e)))?;
                        }
                        None => bad = Some(k.value()),
                    }
                }
                if let Some(k) = bad {
                    return Err(err(format!("corrupt journal entry {k}; not folding")));
                }
                journal.retain(|_, _| false).map_err(|e| err(db_err(e)))?;
                journal_len = 0;
                folded = true;
            }
        }
        tx.commit().map_err(|e| err(db_err(e)))?;
        self.next_seq = seq;
        self.journal_len = journal_len;
        if folded {
            self.folds += 1;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::sample_ops;
    use crate::store::MemStore;
    use crate::Mac;

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
    fn folding_at_any_threshold_gives_the_same_state_as_memory() {
        // Many overlapping puts/deletes on few addresses, committed in uneven batches.
        let mut ops = Vec::new();
        for i in 0..500u64 {
            let ip = std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, (i % 37) as u8));
            if i % 5 == 3 {
                ops.push(JournalOp::DeleteLease(ip));
            } else {
                ops.push(JournalOp::PutLease(Lease {
                    ip,
                    mac: Mac([2, 0, 0, 0, 0, (i % 7) as u8]),
                    sid: 1,
                    port: (i % 3) as u16,
                    assigned_ms: i,
                    expires_ms: i + 10,
                }));
            }
        }
        let mut mem = MemStore::new();
        mem.commit(&ops).unwrap();
        let mut want = mem.load().unwrap().leases;
        want.sort_by_key(|l| l.ip);
        for fold in [1u64, 7, 64, 100_000] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("f.redb");
            {
                let mut s = RedbStore::open_with(&path, fold).unwrap();
                for chunk in ops.chunks(13) {
                    s.commit(chunk).unwrap();
                }
                if fold < 100 {
                    assert!(s.folds() > 0);
                }
                let mut got = s.load().unwrap().leases;
                got.sort_by_key(|l| l.ip);
                assert_eq!(got, want, "fold_ops = {fold}");
            }
            // And after reopening (next_seq recovered from the journal).
            let mut s = RedbStore::open_with(&path, fold).unwrap();
            s.commit(&ops[..3]).unwrap();
            let mut got = s.load().unwrap().leases;
            got.sort_by_key(|l| l.ip);
            let mut mem2 = mem.clone();
            mem2.commit(&ops[..3]).unwrap();
            let mut want2 = mem2.load().unwrap().leases;
            want2.sort_by_key(|l| l.ip);
            assert_eq!(got, want2, "after reopen, fold_ops = {fold}");
        }
    }

    #[test]
    fn garbage_file_is_an_open_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("junk.redb");
        std::fs::write(&path, b"this is not a redb file at all, just text").unwrap();
        let e = RedbStore::open(&path).unwrap_err();
        assert!(e.to_string().contains("junk.redb"), "{e}");
    }

    #[test]
    fn corrupt_journal_entries_are_load_errors() {
        assert_eq!(decode_op(&[]), None);
        assert_eq!(decode_op(&[OP_PUT, 5, 4, 10, 0, 0]), None);
        assert_eq!(decode_op(&[OP_DELETE, 5, 4, 10, 0, 0, 1, 9]), None);
        assert_eq!(decode_op(&[9, 0]), None);
        assert!(decode_op(&[OP_DELETE, 5, 4, 10, 0, 0, 1]).is_some());
    }
}
