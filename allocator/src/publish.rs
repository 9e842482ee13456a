//! Rule-update fan-out: how the switches' queues are fed.
//!
//! [`Fanout`] keeps one bounded queue (crossbeam channel, the in-process "ring") per subscriber.
//! A new subscriber's queue starts with a snapshot batch — `Snapshot{seq, count}` then `count`
//! entries — consistent with every batch published after it, so applying the queue in order
//! always yields the allocator's rules. A subscriber whose queue is full is dropped rather than
//! allowed to slow the allocator: it sees its queue disconnect once drained, and resubscribes
//! for a fresh snapshot (the TCP publisher does exactly that by closing the connection; a switch
//! hosting the allocator in-process does it on its slow-path thread).
//!
//! Used by the TCP publisher in [`server`](crate::server), and directly by a switch that runs
//! the allocator on its slow-path thread: after each batch, commit the journal, then
//! `fanout.publish(core.take_updates())`.

use std::sync::Arc;

use crossbeam::channel::{self, Receiver, Sender, TrySendError};

use crate::lease::{Allocator, Sequenced};

/// One published batch, shared by all subscribers.
pub type Batch = Arc<Vec<Sequenced>>;

/// Subscribers and their queues.
#[derive(Debug)]
pub struct Fanout {
    subs: Vec<Sender<Batch>>,
    queue_batches: usize,
    dropped: u64,
}

impl Fanout {
    /// A fan-out whose queues hold `queue_batches` batches (at least 1).
    pub fn new(queue_batches: usize) -> Self {
        Fanout {
            subs: Vec::new(),
            queue_batches: queue_batches.max(1),
            dropped: 0,
        }
    }

    /// A new subscriber; its queue starts with a snapshot of `core`.
    pub fn subscribe(&mut self, core: &Allocator) -> Receiver<Batch> {
        let (tx, rx) = channel::bounded(self.queue_batches);
        self.attach(core, tx);
        rx
    }

    /// Adds a subscriber whose queue the caller made (the server's connection threads do).
    /// Returns false if the queue could not take the snapshot (full or disconnected).
    pub fn attach(&mut self, core: &Allocator, tx: Sender<Batch>) -> bool {
        if tx.try_send(Arc::new(snapshot_batch(core))).is_err() {
            return false;
        }
        self.subs.push(tx);
        true
    }

    /// Sends `updates` (one batch, in order) to every subscriber; drops subscribers whose queue
    /// is full or gone. Returns how many received it.
    pub fn publish(&mut self, updates: Vec<Sequenced>) -> usize {
        if updates.is_empty() {
            return self.subs.len();
        }
        let batch = Arc::new(updates);
        let mut dropped = 0;
        self.subs.retain(|s| match s.try_send(batch.clone()) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                dropped += 1;
                false
            }
            Err(TrySendError::Disconnected(_)) => false,
        });
        self.dropped += dropped;
        self.subs.len()
    }

    /// Current subscribers.
    pub fn len(&self) -> usize {
        self.subs.len()
    }

    /// Whether there is no subscriber.
    pub fn is_empty(&self) -> bool {
        self.subs.is_empty()
    }

    /// Subscribers dropped for a full queue so far.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

/// `Snapshot{seq, count}` followed by the `count` updates of `core.snapshot()`, all numbered
/// `seq`.
pub fn snapshot_batch(core: &Allocator) -> Vec<Sequenced> {
    let (seq, snap) = core.snapshot();
    Sequenced::snapshot(seq, snap)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::{AllocParams, Config, RuleUpdate, V4Config};
    use crate::{Family, Mac};
    use std::collections::BTreeMap;
    use std::net::IpAddr;

    fn core() -> Allocator {
        Allocator::new(Config {
            t_ip_min_ms: 1000,
            t_ip_max_ms: 2000,
            t_remove_ms: 100,
            max_per_request: 8,
            max_live_per_client: 1000,
            rate_per_s: 1000,
            rate_burst: 1000,
            max_live_per_port: u32::MAX,
            new_macs_per_port_per_s: u32::MAX / 1000,
            new_macs_per_port_burst: u32::MAX / 1000,
            reclaim_silent_after_ms: 0,
            sids: vec![1],
            ipv4: Some(V4Config {
                prefixes: vec!["10.0.0.0/24".parse().unwrap()],
                reserved: vec![],
            }),
            ipv6: None,
        })
        .unwrap()
    }

    /// A switch's binding table fed from a queue.
    #[derive(Default)]
    struct Table {
        bindings: BTreeMap<IpAddr, Mac>,
        seq: u64,
    }

    impl Table {
        fn drain(&mut self, rx: &Receiver<Batch>) -> bool {
            loop {
                match rx.try_recv() {
                    Ok(batch) => {
                        for u in batch.iter() {
                            match &u.update {
                                RuleUpdate::Snapshot { seq, .. } => {
                                    self.bindings.clear();
                                    self.seq = *seq;
                                    continue;
                                }
                                RuleUpdate::BindingAdd { ip, mac, .. } => {
                                    self.bindings.insert(*ip, *mac);
                                }
                                RuleUpdate::BindingRemove { ip } => {
                                    self.bindings.remove(ip);
                                }
                                RuleUpdate::AliasEpoch { .. } => {}
                            }
                            assert!(u.seq == self.seq || u.seq == self.seq + 1, "gap");
                            self.seq = u.seq;
                        }
                    }
                    Err(channel::TryRecvError::Empty) => return true,
                    Err(channel::TryRecvError::Disconnected) => return false,
                }
            }
        }
    }

    fn truth(core: &Allocator) -> BTreeMap<IpAddr, Mac> {
        core.leases().map(|(l, _)| (l.ip, l.mac)).collect()
    }

    #[test]
    fn in_process_subscriber_tracks_the_allocator_and_resyncs_after_overflow() {
        let mut core = core();
        let mut fan = Fanout::new(4);
        let mut now = 0;
        core.allocate(
            now,
            AllocParams {
                mac: Mac([2, 0, 0, 0, 0, 1]),
                sid: 1,
                port: 1,
                family: Family::V4,
                count: 3,
            },
        )
        .unwrap();
        fan.publish(core.take_updates());
        let rx = fan.subscribe(&core);
        let mut table = Table::default();
        for i in 0..20u8 {
            now += 150;
            let _ = core.allocate(
                now,
                AllocParams {
                    mac: Mac([2, 0, 0, 0, 0, i]),
                    sid: 1,
                    port: 1,
                    family: Family::V4,
                    count: 2,
                },
            );
            assert_eq!(fan.publish(core.take_updates()), 1);
            assert!(table.drain(&rx));
            assert_eq!(table.bindings, truth(&core));
        }
        // The switch stalls: its queue overflows and it is dropped.
        for i in 0..10u8 {
            now += 150;
            let _ = core.allocate(
                now,
                AllocParams {
                    mac: Mac([2, 0, 0, 0, 1, i]),
                    sid: 1,
                    port: 1,
                    family: Family::V4,
                    count: 1,
                },
            );
            fan.publish(core.take_updates());
        }
        assert_eq!(fan.len(), 0);
        assert_eq!(fan.dropped(), 1);
        assert!(
            !table.drain(&rx),
            "a dropped subscriber sees its queue disconnect"
        );
        assert_ne!(table.bindings, truth(&core));
        let rx = fan.subscribe(&core);
        assert!(table.drain(&rx));
        assert_eq!(
            table.bindings,
            truth(&core),
            "resubscribing resyncs from a snapshot"
        );
    }
}
