//! The lease journal: where leases and alias epochs survive restarts.
//!
//! A [`Store`] receives the core's [`JournalOp`]s in batches ([`Store::commit`]) and must make a
//! batch durable, all or nothing, before `commit` returns: the server answers clients and publishes
//! rules only after that, so a lease that a client saw is never lost, and a lease that was lost
//! (crash before commit) was never seen by anyone, so its address may be handed out again.
//! Batching many requests into one commit is the group commit that makes durability cheap.
//!
//! Backends: [`MemStore`] (in memory; tests and benchmarks), [`RedbStore`] (the embedded
//! default, a redb database file) and, with the `etcd` feature, `EtcdStore` (an etcd cluster:
//! the state outlives the allocator's host; one allocator serves a prefix at a time, see
//! `store/etcd.rs`).

#[cfg(feature = "server")]
mod embedded;
#[cfg(feature = "etcd")]
mod etcd;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

#[cfg(feature = "server")]
pub use embedded::{RedbStore, DEFAULT_FOLD_OPS};
#[cfg(feature = "etcd")]
pub use etcd::{EtcdSettings, EtcdStore, MAX_TXN_OPS, OWNER_TTL_S};

use crate::alias::AliasEpoch;
use crate::lease::{JournalOp, Lease, Loaded};
use crate::{Mac, Sid};

/// Why the store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// Another process (a running allocator) holds the database.
    #[error("the lease database {0} is in use by another process (is mimiq-allocator running?)")]
    InUse(String),
    /// The database could not be opened or created.
    #[error("cannot open the lease database {path}: {reason}")]
    Database {
        /// Path.
        path: String,
        /// What the database said.
        reason: String,
    },
}

/// Why the stored state could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The database failed.
    #[error("reading the lease database failed: {0}")]
    Database(String),
    /// A record does not decode.
    #[error("the lease database holds a corrupt {table} record (key {key}); refusing to guess")]
    Corrupt {
        /// Table name.
        table: &'static str,
        /// The key, hex.
        key: String,
    },
}

/// Why a batch could not be committed. Nothing of the batch is durable then.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    /// The database failed.
    #[error("committing to the lease database failed: {0}")]
    Database(String),
}

/// A durable home for leases and alias epochs.
pub trait Store: Send {
    /// Reads everything stored.
    fn load(&mut self) -> Result<Loaded, LoadError>;
    /// Applies `ops` atomically and durably (group commit: one call per batch).
    fn commit(&mut self, ops: &[JournalOp]) -> Result<(), CommitError>;
}

/// An in-memory store: first-class for tests and benchmarks (not durable across processes).
#[derive(Debug, Default, Clone)]
pub struct MemStore {
    leases: BTreeMap<Vec<u8>, Lease>,
    epochs: BTreeMap<u64, AliasEpoch>,
    /// Number of commits (for tests of group commit).
    pub commits: u64,
}

impl MemStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Store for MemStore {
    fn load(&mut self) -> Result<Loaded, LoadError> {
        Ok(Loaded {
            leases: self.leases.values().copied().collect(),
            epochs: self.epochs.values().cloned().collect(),
        })
    }

    fn commit(&mut self, ops: &[JournalOp]) -> Result<(), CommitError> {
        for op in ops {
            match op {
                JournalOp::PutLease(l) => {
                    self.leases.insert(ip_key(l.ip), *l);
                }
                JournalOp::DeleteLease(ip) => {
                    self.leases.remove(&ip_key(*ip));
                }
                JournalOp::PutEpoch(e) => {
                    self.epochs.insert(e.epoch, e.clone());
                }
                JournalOp::DeleteEpoch(n) => {
                    self.epochs.remove(n);
                }
            }
        }
        self.commits += 1;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Record encoding shared by the backends (explicit bytes, big-endian; no serde format to drift).
// Only the redb backend uses it today (the `server` feature).

/// Lease key: family (4 | 6) then the address bytes.
/// Hex (either case) back to bytes: switch keys in the config, lease keys on etcd.
#[cfg_attr(not(feature = "server"), allow(dead_code))]
pub(crate) fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.is_ascii() {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

#[cfg_attr(not(feature = "server"), allow(dead_code))]
pub(crate) fn ip_key(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => [&[4u8][..], &a.octets()].concat(),
        IpAddr::V6(a) => [&[6u8][..], &a.octets()].concat(),
    }
}

#[cfg_attr(not(feature = "server"), allow(dead_code))]
pub(crate) fn ip_from_key(k: &[u8]) -> Option<IpAddr> {
    match (k.first(), k.len()) {
        (Some(4), 5) => Some(IpAddr::V4(Ipv4Addr::new(k[1], k[2], k[3], k[4]))),
        (Some(6), 17) => {
            let mut a = [0u8; 16];
            a.copy_from_slice(&k[1..]);
            Some(IpAddr::V6(Ipv6Addr::from(a)))
        }
        _ => None,
    }
}

/// Lease value: mac [6] | sid u16 | assigned_ms u64 | expires_ms u64 | port u16. A value
/// without the port (24 bytes, written before client ports were recorded) reads as port 0.
#[cfg_attr(not(feature = "server"), allow(dead_code))]
pub(crate) fn encode_lease(l: &Lease) -> [u8; 26] {
    let mut v = [0u8; 26];
    v[0..6].copy_from_slice(&l.mac.0);
    v[6..8].copy_from_slice(&l.sid.to_be_bytes());
    v[8..16].copy_from_slice(&l.assigned_ms.to_be_bytes());
    v[16..24].copy_from_slice(&l.expires_ms.to_be_bytes());
    v[24..26].copy_from_slice(&l.port.to_be_bytes());
    v
}

#[cfg_attr(not(feature = "server"), allow(dead_code))]
pub(crate) fn decode_lease(k: &[u8], v: &[u8]) -> Option<Lease> {
    let ip = ip_from_key(k)?;
    let port = match v.len() {
        24 => 0,
        26 => u16::from_be_bytes([v[24], v[25]]),
        _ => return None,
    };
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&v[0..6]);
    let sid = Sid::from_be_bytes([v[6], v[7]]);
    let assigned_ms = u64::from_be_bytes(v[8..16].try_into().ok()?);
    let expires_ms = u64::from_be_bytes(v[16..24].try_into().ok()?);
    Some(Lease {
        ip,
        mac: Mac(mac),
        sid,
        port,
        assigned_ms,
        expires_ms,
    })
}

/// Epoch value: start u64 | valid_until u64 | sids u16 | sids × (sid u16 | n u16 | n × u32).
#[cfg_attr(not(feature = "server"), allow(dead_code))]
pub(crate) fn encode_epoch(e: &AliasEpoch) -> Vec<u8> {
    let mut v = Vec::with_capacity(18 + e.aliases.len() * 8);
    v.extend_from_slice(&e.start_ms.to_be_bytes());
    v.extend_from_slice(&e.valid_until_ms.to_be_bytes());
    v.extend_from_slice(&(e.aliases.len() as u16).to_be_bytes());
    for (sid, list) in &e.aliases {
        v.extend_from_slice(&sid.to_be_bytes());
        v.extend_from_slice(&(list.len() as u16).to_be_bytes());
        for a in list {
            v.extend_from_slice(&a.to_be_bytes());
        }
    }
    v
}

#[cfg_attr(not(feature = "server"), allow(dead_code))]
pub(crate) fn decode_epoch(epoch: u64, v: &[u8]) -> Option<AliasEpoch> {
    let mut pos = 0usize;
    let mut take = |n: usize| -> Option<&[u8]> {
        let s = v.get(pos..pos.checked_add(n)?)?;
        pos += n;
        Some(s)
    };
    let start_ms = u64::from_be_bytes(take(8)?.try_into().ok()?);
    let valid_until_ms = u64::from_be_bytes(take(8)?.try_into().ok()?);
    let nsids = u16::from_be_bytes(take(2)?.try_into().ok()?);
    let mut aliases = Vec::with_capacity(usize::from(nsids).min(v.len()));
    for _ in 0..nsids {
        let sid = u16::from_be_bytes(take(2)?.try_into().ok()?);
        let n = u16::from_be_bytes(take(2)?.try_into().ok()?);
        let mut list = Vec::with_capacity(usize::from(n).min(v.len()));
        for _ in 0..n {
            list.push(u32::from_be_bytes(take(4)?.try_into().ok()?));
        }
        aliases.push((sid, list));
    }
    if pos != v.len() {
        return None;
    }
    Some(AliasEpoch {
        epoch,
        start_ms,
        valid_until_ms,
        aliases,
    })
}

#[cfg_attr(not(feature = "server"), allow(dead_code))]
fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample_ops() -> (Vec<JournalOp>, Lease, AliasEpoch) {
        let l1 = Lease {
            ip: "10.0.0.5".parse().unwrap(),
            mac: Mac([2, 0, 0, 0, 0, 1]),
            sid: 1,
            port: 0,
            assigned_ms: 10,
            expires_ms: 20,
        };
        let l2 = Lease {
            ip: "2001:db8::5".parse().unwrap(),
            mac: Mac([2, 0, 0, 0, 0, 2]),
            sid: 2,
            port: 7,
            assigned_ms: 11,
            expires_ms: 21,
        };
        let e = AliasEpoch {
            epoch: 4,
            start_ms: 1,
            valid_until_ms: 2,
            aliases: vec![(1, vec![9, 10]), (2, vec![])],
        };
        let ops = vec![
            JournalOp::PutLease(l1),
            JournalOp::PutLease(l2),
            JournalOp::PutEpoch(e.clone()),
            JournalOp::PutEpoch(AliasEpoch {
                epoch: 3,
                ..e.clone()
            }),
            JournalOp::DeleteEpoch(3),
            JournalOp::DeleteLease(l1.ip),
        ];
        (ops, l2, e)
    }

    #[test]
    fn mem_store_applies_ops_in_order() {
        let (ops, l2, e) = sample_ops();
        let mut s = MemStore::new();
        s.commit(&ops).unwrap();
        let got = s.load().unwrap();
        assert_eq!(got.leases, vec![l2]);
        assert_eq!(got.epochs, vec![e]);
    }

    #[test]
    fn records_round_trip_and_garbage_is_rejected() {
        let (_, l2, e) = sample_ops();
        assert_eq!(decode_lease(&ip_key(l2.ip), &encode_lease(&l2)), Some(l2));
        assert_eq!(decode_epoch(4, &encode_epoch(&e)), Some(e.clone()));
        assert_eq!(decode_lease(&[5, 1, 2, 3, 4], &encode_lease(&l2)), None);
        assert_eq!(decode_lease(&ip_key(l2.ip), &[0; 23]), None);
        assert_eq!(decode_lease(&ip_key(l2.ip), &[0; 25]), None);
        // A value written before ports were recorded reads as port 0.
        let old = &encode_lease(&l2)[..24];
        assert_eq!(
            decode_lease(&ip_key(l2.ip), old),
            Some(Lease { port: 0, ..l2 })
        );
        let enc = encode_epoch(&e);
        for n in 0..enc.len() {
            assert_eq!(decode_epoch(4, &enc[..n]), None);
        }
        let mut long = enc.clone();
        long.push(0);
        assert_eq!(decode_epoch(4, &long), None);
    }
}
