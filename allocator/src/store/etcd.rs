//! The etcd store (`store = "etcd"`, cargo feature `etcd`): leases and alias epochs as keys under
//! a prefix on an etcd cluster (etcd v3 API), so that the allocation state outlives the
//! allocator's host: another allocator, started on another host with the same `[etcd]` section,
//! loads it and serves on.
//!
//! **One allocator serves a prefix at a time.** It holds `<prefix>owner`, a key bound to an etcd
//! lease of [`OWNER_TTL_S`] that it keeps alive, and every commit is a transaction whose compare
//! asks that the owner key still carry that lease. An allocator that lost the key (cut off from
//! etcd for longer than the TTL, while another took the prefix over) can no longer write: its
//! commit fails, the server stops on it (`server.rs`: a failed commit ends the process, which
//! restarts from the store), and it never hands out an address that the other one may hold. A
//! standby started while the owner lives waits up to `[etcd] connect_timeout_ms` for the key,
//! which frees itself [`OWNER_TTL_S`] after its owner died (at once when it stopped cleanly: the
//! lease is revoked). Several allocators serving one prefix at once (active-active, with
//! compare-and-swap allocations and watches) is not built yet.
//!
//! Layout: `<prefix>lease/<family><address bytes>` (hex) holds the record of
//! [`super::encode_lease`]; `<prefix>epoch/<epoch, 20 digits>` that of [`super::encode_epoch`].
//! A batch is one transaction of up to [`MAX_TXN_OPS`] operations (etcd refuses more than 128 by
//! default); a larger batch is several, in order. The server answers no request of a batch before
//! all of it committed, so a batch cut short by a failure leaves only records no client has seen
//! (a lease nobody was told of, which expires; a lease deleted that the core had dropped).
//!
//! A record under the prefix that does not decode is skipped, counted ([`EtcdStore::skipped`])
//! and logged once: it is not the embedded store's own file, and an operator's stray key must not
//! stop every allocator.

use std::time::{Duration, Instant};

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, Txn, TxnOp};
use tokio::runtime::Runtime;

use super::{
    decode_epoch, decode_hex, decode_lease, encode_epoch, encode_lease, ip_key, CommitError,
    LoadError, OpenError, Store,
};
use crate::lease::{JournalOp, Loaded};

/// The owner key's lease, seconds: how long after an allocator dies a standby may take over.
pub const OWNER_TTL_S: i64 = 10;
/// Operations per transaction (etcd's `--max-txn-ops` defaults to 128; the owner compare is
/// not one).
pub const MAX_TXN_OPS: usize = 64;
/// Wait between two attempts to reach etcd or to take the owner key, doubled up to a second.
const RETRY_FIRST: Duration = Duration::from_millis(100);

/// `[etcd]`: where the cluster is and how to reach it.
#[derive(Debug, Clone)]
pub struct EtcdSettings {
    /// Client URLs of the members (`http://198.19.1.1:2379`).
    pub endpoints: Vec<String>,
    /// Every key of this allocator's state starts with it (`/mimiq/site-a/`).
    pub prefix: String,
    /// User and password, when the cluster has authentication on.
    pub user: Option<(String, String)>,
    /// How long to keep trying to reach the cluster and to take the owner key at start.
    pub connect_timeout: Duration,
    /// How long one request may take.
    pub request_timeout: Duration,
    /// Written into the owner key: who holds the prefix (host name and process).
    pub owner: String,
}

/// Leases and epochs on etcd, with the prefix held.
pub struct EtcdStore {
    runtime: Runtime,
    client: Client,
    prefix: String,
    owner_key: String,
    owner_lease: i64,
    skipped: u64,
}

impl EtcdStore {
    /// Connects (retrying with backoff until `connect_timeout`), takes the owner key of the
    /// prefix (waiting for a dead owner's lease to lapse) and keeps it alive.
    pub fn open(s: &EtcdSettings) -> Result<Self, OpenError> {
        let failed = |reason: String| OpenError::Database {
            path: format!("etcd {} (prefix {})", s.endpoints.join(","), s.prefix),
            reason,
        };
        if s.endpoints.is_empty() {
            return Err(failed("no endpoints".into()));
        }
        // Two threads: one keeps the owner lease alive between commits, whatever the server does.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("mimiq-etcd")
            .enable_all()
            .build()
            .map_err(|e| failed(format!("tokio runtime: {e}")))?;
        let deadline = Instant::now() + s.connect_timeout;
        let mut options = ConnectOptions::new()
            .with_connect_timeout(s.request_timeout)
            .with_timeout(s.request_timeout);
        if let Some((user, password)) = &s.user {
            options = options.with_user(user.clone(), password.clone());
        }
        let owner_key = format!("{}owner", s.prefix);
        let (client, owner_lease) = runtime
            .block_on(async {
                let mut client = retry(deadline, "reaching etcd", || async {
                    let mut c = Client::connect(&s.endpoints, Some(options.clone())).await?;
                    // connect() may succeed before any member answered: ask one.
                    c.get(owner_key.as_bytes(), None).await?;
                    Ok(c)
                })
                .await?;
                // A lease per attempt: one granted before a long wait for a dead owner's key
                // would lapse before it is used.
                let lease = retry(deadline, "taking the owner key", || {
                    let mut client = client.clone();
                    let (key, owner) = (owner_key.clone(), s.owner.clone());
                    async move {
                        let lease = client.lease_grant(OWNER_TTL_S, None).await?.id();
                        let put = PutOptions::new().with_lease(lease);
                        let txn = Txn::new()
                            .when([Compare::create_revision(
                                key.as_bytes(),
                                CompareOp::Equal,
                                0,
                            )])
                            .and_then([TxnOp::put(key.as_bytes(), owner, Some(put))])
                            .or_else([TxnOp::get(key.as_bytes(), None)]);
                        let resp = client.txn(txn).await?;
                        if resp.succeeded() {
                            Ok(lease)
                        } else {
                            let _ = client.lease_revoke(lease).await;
                            Err(HeldBy(held_by(&resp)).into())
                        }
                    }
                })
                .await?;
                let (mut keeper, mut stream) = client
                    .lease_keep_alive(lease)
                    .await
                    .map_err(|e| format!("keeping the owner lease alive: {e}"))?;
                tokio::spawn(async move {
                    let every = Duration::from_secs((OWNER_TTL_S / 3).max(1) as u64);
                    loop {
                        if keeper.keep_alive().await.is_err() || stream.message().await.is_err() {
                            // The next commit's compare tells whether the key was lost meanwhile.
                            tokio::time::sleep(RETRY_FIRST).await;
                            continue;
                        }
                        tokio::time::sleep(every).await;
                    }
                });
                Ok::<_, String>((client, lease))
            })
            .map_err(failed)?;
        tracing::info!(
            "etcd: serving prefix {} (owner key lease {owner_lease:x})",
            s.prefix
        );
        Ok(EtcdStore {
            runtime,
            client,
            prefix: s.prefix.clone(),
            owner_key,
            owner_lease,
            skipped: 0,
        })
    }

    /// Records under the prefix that did not decode, over every load.
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// The etcd lease the owner key is bound to (to see it with `etcdctl lease list`).
    pub fn owner_lease(&self) -> i64 {
        self.owner_lease
    }

    fn lease_key(&self, ip: std::net::IpAddr) -> Vec<u8> {
        let hex: String = ip_key(ip).iter().map(|b| format!("{b:02x}")).collect();
        format!("{}lease/{hex}", self.prefix).into_bytes()
    }

    fn epoch_key(&self, epoch: u64) -> Vec<u8> {
        format!("{}epoch/{epoch:020}", self.prefix).into_bytes()
    }
}

impl Store for EtcdStore {
    fn load(&mut self) -> Result<Loaded, LoadError> {
        let (lease_prefix, epoch_prefix) = (
            format!("{}lease/", self.prefix),
            format!("{}epoch/", self.prefix),
        );
        let mut client = self.client.clone();
        let prefix = self.prefix.clone();
        let resp = self
            .runtime
            .block_on(async move {
                client
                    .get(prefix.as_bytes(), Some(GetOptions::new().with_prefix()))
                    .await
            })
            .map_err(|e| LoadError::Database(format!("etcd: {e}")))?;
        let mut loaded = Loaded::default();
        let mut skipped = 0u64;
        for kv in resp.kvs() {
            let key = String::from_utf8_lossy(kv.key());
            let record = if let Some(hex) = key.strip_prefix(&lease_prefix) {
                decode_hex(hex)
                    .and_then(|k| decode_lease(&k, kv.value()))
                    .map(|l| loaded.leases.push(l))
            } else if let Some(n) = key.strip_prefix(&epoch_prefix) {
                n.parse()
                    .ok()
                    .and_then(|n| decode_epoch(n, kv.value()))
                    .map(|e| loaded.epochs.push(e))
            } else {
                // The owner key, and whatever else shares the prefix: not ours to read.
                Some(())
            };
            if record.is_none() {
                if skipped == 0 && self.skipped == 0 {
                    tracing::warn!("etcd: skipping {key}: not a lease or epoch record");
                }
                skipped += 1;
            }
        }
        self.skipped += skipped;
        loaded.epochs.sort_by_key(|e| e.epoch);
        Ok(loaded)
    }

    fn commit(&mut self, ops: &[JournalOp]) -> Result<(), CommitError> {
        let txn_ops: Vec<TxnOp> = ops
            .iter()
            .map(|op| match op {
                JournalOp::PutLease(l) => TxnOp::put(self.lease_key(l.ip), encode_lease(l), None),
                JournalOp::DeleteLease(ip) => TxnOp::delete(self.lease_key(*ip), None),
                JournalOp::PutEpoch(e) => {
                    TxnOp::put(self.epoch_key(e.epoch), encode_epoch(e), None)
                }
                JournalOp::DeleteEpoch(n) => TxnOp::delete(self.epoch_key(*n), None),
            })
            .collect();
        let mut client = self.client.clone();
        let (owner_key, lease) = (self.owner_key.clone(), self.owner_lease);
        self.runtime.block_on(async move {
            let mut rest = txn_ops;
            while !rest.is_empty() {
                let tail = rest.split_off(rest.len().min(MAX_TXN_OPS));
                let txn = Txn::new()
                    .when([Compare::lease(owner_key.as_bytes(), CompareOp::Equal, lease)])
                    .and_then(rest);
                let resp = client
                    .txn(txn)
                    .await
                    .map_err(|e| CommitError::Database(format!("etcd: {e}")))?;
                if !resp.succeeded() {
                    return Err(CommitError::Database(format!(
                        "etcd: this allocator no longer holds {owner_key} (another one took the prefix over)"
                    )));
                }
                rest = tail;
            }
            Ok(())
        })
    }
}

impl Drop for EtcdStore {
    /// Gives the prefix up at once (a standby need not wait for the lease to lapse).
    fn drop(&mut self) {
        let mut client = self.client.clone();
        let lease = self.owner_lease;
        let _ = self.runtime.block_on(async move {
            tokio::time::timeout(Duration::from_secs(2), client.lease_revoke(lease)).await
        });
    }
}

/// The owner key is held by another allocator (its value: who).
#[derive(Debug)]
struct HeldBy(String);

impl std::fmt::Display for HeldBy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the prefix is served by another allocator ({})", self.0)
    }
}

/// Who holds the owner key, from the failed branch of the taking transaction.
fn held_by(resp: &etcd_client::TxnResponse) -> String {
    resp.op_responses()
        .into_iter()
        .find_map(|r| match r {
            etcd_client::TxnOpResponse::Get(g) => g
                .kvs()
                .first()
                .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()),
            _ => None,
        })
        .unwrap_or_else(|| "unknown".into())
}

/// Runs `attempt` until it succeeds or `deadline` passes, waiting 100 ms, then twice as long
/// each time up to a second; the last error, named by `what`, when time is up.
async fn retry<T, F, Fut>(deadline: Instant, what: &str, mut attempt: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, RetryError>>,
{
    let mut wait = RETRY_FIRST;
    let mut tries = 0u32;
    loop {
        tries += 1;
        match attempt().await {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() + wait < deadline => {
                if tries == 1 {
                    tracing::warn!("etcd: {what}: {e}; trying again until the connect timeout");
                }
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(1));
            }
            Err(e) => return Err(format!("{what}: {e} (after {tries} attempts)")),
        }
    }
}

/// What one attempt of [`retry`] failed with.
#[derive(Debug)]
enum RetryError {
    Etcd(etcd_client::Error),
    Held(HeldBy),
}

impl std::fmt::Display for RetryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RetryError::Etcd(e) => write!(f, "{e}"),
            RetryError::Held(h) => write!(f, "{h}"),
        }
    }
}

impl From<etcd_client::Error> for RetryError {
    fn from(e: etcd_client::Error) -> Self {
        RetryError::Etcd(e)
    }
}

impl From<HeldBy> for RetryError {
    fn from(h: HeldBy) -> Self {
        RetryError::Held(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(endpoints: &[&str]) -> EtcdSettings {
        EtcdSettings {
            endpoints: endpoints.iter().map(|e| e.to_string()).collect(),
            prefix: "/mimiq/test/".into(),
            user: None,
            connect_timeout: Duration::from_millis(700),
            request_timeout: Duration::from_millis(200),
            owner: "test".into(),
        }
    }

    #[test]
    fn an_unreachable_or_garbled_cluster_is_a_clear_error_after_retries() {
        // Nothing listens on port 1 of loopback: refused at once, tried again with backoff
        // until the connect timeout, then one error naming the endpoints and the attempts.
        let started = Instant::now();
        let e = match EtcdStore::open(&settings(&["http://127.0.0.1:1"])) {
            Ok(_) => panic!("nothing listens there"),
            Err(e) => e.to_string(),
        };
        assert!(started.elapsed() >= Duration::from_millis(300), "{e}");
        assert!(
            e.contains("http://127.0.0.1:1") && e.contains("reaching etcd"),
            "{e}"
        );
        assert!(e.contains("attempts"), "{e}");
        for bad in [&[][..], &["not a url at all"][..]] {
            assert!(EtcdStore::open(&settings(bad)).is_err());
        }
    }
}
