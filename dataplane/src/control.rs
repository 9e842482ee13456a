//! The control thread's rule subscriber: a TCP client of the allocator's rule stream
//! (ARCHITECTURE §5). It sends an authenticated `Hello`, receives a snapshot and then numbered
//! updates, and hands every update to every worker over the worker's SPSC update ring. On a
//! broken connection or a gap in the numbering it reconnects, and the fresh snapshot replaces
//! the workers' tables.
//!
//! The thread may wait on a full worker ring (it is not the packet path); the workers never
//! wait for it.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mimiq_allocator::lease::{RuleUpdate, Sequenced};
use mimiq_allocator::proto::{self, StreamMsg};

/// Where the rule stream comes from.
#[derive(Debug, Clone)]
pub struct RuleSource {
    /// The allocator's rule-stream address (`publish_listen`).
    pub allocator: SocketAddr,
    /// This switch's ID in the allocator's config (an access switch's ID is its SID).
    pub switch_id: u16,
    /// The HMAC key shared with the allocator.
    pub key: Vec<u8>,
}

/// Counters of the subscriber.
#[derive(Debug, Default)]
pub struct RuleStats {
    /// Updates handed to the workers.
    pub updates: AtomicU64,
    /// Connections made.
    pub connects: AtomicU64,
    /// Connections dropped for a gap, a bad message or an I/O error.
    pub resyncs: AtomicU64,
    /// The last sequence number received.
    pub seq: AtomicU64,
}

/// Runs the subscriber until `stop` is set.
pub fn run_subscriber<U: From<Sequenced>>(
    source: RuleSource,
    mut workers: Vec<rtrb::Producer<U>>,
    stop: Arc<AtomicBool>,
    stats: Arc<RuleStats>,
) {
    let key = proto::key(&source.key);
    let mut backoff = Duration::from_millis(100);
    while !stop.load(Ordering::Relaxed) {
        match session(&source, &key, &mut workers, &stop, &stats) {
            Ok(()) => backoff = Duration::from_millis(100),
            Err(e) => {
                tracing::warn!("rule stream from {}: {e}; reconnecting", source.allocator);
                stats.resyncs.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

fn session<U: From<Sequenced>>(
    source: &RuleSource,
    key: &ring::hmac::Key,
    workers: &mut [rtrb::Producer<U>],
    stop: &AtomicBool,
    stats: &RuleStats,
) -> Result<(), String> {
    let mut stream = TcpStream::connect_timeout(&source.allocator, Duration::from_secs(1))
        .map_err(|e| format!("connect: {e}"))?;
    stream.set_nodelay(true).ok();
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .map_err(|e| e.to_string())?;
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let mut hello = Vec::new();
    StreamMsg::Hello {
        switch_id: source.switch_id,
        timestamp_ms: now_ms,
    }
    .emit_frame(key, &mut hello)
    .map_err(|e| format!("hello: {e:?}"))?;
    stream
        .write_all(&hello)
        .map_err(|e| format!("hello: {e}"))?;
    stats.connects.fetch_add(1, Ordering::Relaxed);
    tracing::info!("subscribed to the rule stream of {}", source.allocator);

    let mut tracker = SeqTracker::default();
    let mut buf = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        match proto::read_frame(&mut stream, &mut buf) {
            Ok(true) => {}
            Ok(false) => return Err("the allocator closed the stream".into()),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(e) => return Err(format!("read: {e}")),
        }
        let msg =
            StreamMsg::parse(&buf, |_| Some(key)).map_err(|e| format!("bad message: {e:?}"))?;
        let StreamMsg::Update(update) = msg else {
            return Err("unexpected Hello from the allocator".into());
        };
        tracker.check(&update)?;
        stats.seq.store(update.seq, Ordering::Relaxed);
        for ring in workers.iter_mut() {
            let mut pending = U::from(update.clone());
            loop {
                match ring.push(pending) {
                    Ok(()) => break,
                    Err(rtrb::PushError::Full(back)) => {
                        if stop.load(Ordering::Relaxed) {
                            return Ok(());
                        }
                        pending = back;
                        std::thread::sleep(Duration::from_micros(50));
                    }
                }
            }
        }
        stats.updates.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

/// Checks the numbering of the stream: a snapshot, its entries (which carry its number), then
/// consecutive numbers.
#[derive(Debug, Default)]
struct SeqTracker {
    started: bool,
    seq: u64,
    snapshot_left: u32,
}

impl SeqTracker {
    fn check(&mut self, s: &Sequenced) -> Result<(), String> {
        if let RuleUpdate::Snapshot { seq, count } = s.update {
            *self = SeqTracker {
                started: true,
                seq,
                snapshot_left: count,
            };
            return Ok(());
        }
        if !self.started {
            return Err(format!("update {} before a snapshot", s.seq));
        }
        if self.snapshot_left > 0 {
            self.snapshot_left -= 1;
            return if s.seq == self.seq {
                Ok(())
            } else {
                Err(format!(
                    "snapshot entry numbered {} in snapshot {}",
                    s.seq, self.seq
                ))
            };
        }
        if s.seq != self.seq + 1 {
            return Err(format!(
                "gap: expected update {}, got {}",
                self.seq + 1,
                s.seq
            ));
        }
        self.seq = s.seq;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up(seq: u64) -> Sequenced {
        Sequenced {
            seq,
            update: RuleUpdate::BindingRemove {
                ip: "198.18.0.1".parse().unwrap(),
            },
        }
    }

    #[test]
    fn the_tracker_accepts_a_snapshot_then_consecutive_updates_and_refuses_gaps() {
        let mut t = SeqTracker::default();
        assert!(t.check(&up(1)).is_err(), "nothing before a snapshot");
        t.check(&Sequenced {
            seq: 5,
            update: RuleUpdate::Snapshot { seq: 5, count: 2 },
        })
        .unwrap();
        t.check(&up(5)).unwrap();
        t.check(&up(5)).unwrap();
        t.check(&up(6)).unwrap();
        assert!(t.check(&up(8)).unwrap_err().contains("gap"));
    }

    #[test]
    fn updates_reach_every_worker_ring_from_a_real_tcp_stream() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let secret = b"0123456789abcdef0123456789abcdef".to_vec();
        let key = proto::key(&secret);
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = Vec::new();
            proto::read_frame(&mut s, &mut buf).unwrap();
            let hello = StreamMsg::parse(&buf, |_| Some(&key)).unwrap();
            assert!(matches!(hello, StreamMsg::Hello { switch_id: 7, .. }));
            let mut out = Vec::new();
            for m in [
                Sequenced {
                    seq: 1,
                    update: RuleUpdate::Snapshot { seq: 1, count: 0 },
                },
                up(2),
                up(3),
            ] {
                StreamMsg::Update(m).emit_frame(&key, &mut out).unwrap();
            }
            s.write_all(&out).unwrap();
            std::thread::sleep(Duration::from_millis(300));
        });
        let (p1, mut c1) = rtrb::RingBuffer::<Sequenced>::new(16);
        let (p2, mut c2) = rtrb::RingBuffer::<Sequenced>::new(16);
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(RuleStats::default());
        let sub = {
            let (stop, stats) = (Arc::clone(&stop), Arc::clone(&stats));
            std::thread::spawn(move || {
                run_subscriber(
                    RuleSource {
                        allocator: addr,
                        switch_id: 7,
                        key: secret,
                    },
                    vec![p1, p2],
                    stop,
                    stats,
                )
            })
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while stats.updates.load(Ordering::Relaxed) < 3 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        stop.store(true, Ordering::Relaxed);
        sub.join().unwrap();
        server.join().unwrap();
        for c in [&mut c1, &mut c2] {
            let seqs: Vec<u64> = std::iter::from_fn(|| c.pop().ok()).map(|s| s.seq).collect();
            assert_eq!(seqs, [1, 2, 3]);
        }
        assert_eq!(stats.seq.load(Ordering::Relaxed), 3);
    }
}
