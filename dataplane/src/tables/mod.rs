//! Forwarding tables of the MIMIQ switch roles, changed only by applying the allocator's
//! numbered rule updates (`mimiq_allocator::lease::Sequenced`) between bursts.
//!
//! Sans-IO: time is an argument (`now_ms`, the allocator's clock in ms), no locks, no clocks.
//! Each worker owns its copy, so lookups need no synchronisation.
//!
//! - Bindings (address → client MAC, SID, valid-until): what the access switch uses for
//!   anti-spoofing upstream and delivery downstream (passive ARP/ND learning: the switch never
//!   resolves clients), and what the edge switch uses for IPv4 (exact match address → SID).
//! - Aliases (a bits of an IPv6 address → SID): a direct-indexed table of 2^a slots, each with
//!   the epoch that owns it and until when it routes.
//!
//! Timing semantics of seed 000: an address routes until its lease end plus t_remove (the
//! `valid_until_ms` the allocator sends), then not, even if the remove was missed; an alias routes
//! while its epoch is valid and stops when the epoch expires or when epoch `e + k` arrives.
//!
//! Sequence numbers: updates are consecutive; a `Snapshot{seq, count}` replaces everything with
//! the `count` updates that follow (they carry `seq` too). A gap, or an update out of order,
//! yields [`ApplyOutcome::NeedSnapshot`] and the tables ignore further updates until a snapshot
//! starts.

mod map;

use std::net::IpAddr;

use mimiq_allocator::lease::{RuleUpdate, Sequenced};
use mimiq_allocator::Sid;

use map::BindingMap;

/// A client's address binding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Binding {
    /// The client's MAC.
    pub mac: [u8; 6],
    /// The access switch that serves it.
    pub sid: Sid,
    /// The access switch's client-facing port behind which it sits.
    pub port: u16,
    /// It routes until then (lease end + t_remove), in ms.
    pub valid_until_ms: u64,
    /// The access switch has forwarded a packet from it (and reported so to the allocator)
    /// since the binding was added.
    pub seen: bool,
}

/// One slot of the alias table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct AliasSlot {
    sid: Sid,
    epoch: u64,
    valid_until_ms: u64,
}

/// What applying one update did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyOutcome {
    /// Applied.
    Applied,
    /// Part of a snapshot in progress; applied.
    SnapshotEntry,
    /// A gap or an out-of-order update: ask the allocator for a snapshot. Nothing changed.
    NeedSnapshot {
        /// The sequence number the tables expected.
        expected: u64,
        /// The one that came.
        got: u64,
    },
}

/// The tables of one worker.
pub struct Tables {
    v4: BindingMap<u32>,
    v6: BindingMap<u128>,
    aliases: Vec<Option<AliasSlot>>,
    alias_bits: u32,
    alias_shift: u32,
    epochs_valid: u64,
    /// The last sequence number applied (0: none yet).
    seq: u64,
    /// Updates still to come in the snapshot being applied.
    snapshot_left: u32,
    /// Waiting for a snapshot after a gap.
    stale: bool,
}

impl Tables {
    /// Empty tables for IPv6 addresses whose alias is `alias_bits` wide and starts right after a
    /// /`prefix_len` prefix; alias epochs stay valid for `k` rotations.
    pub fn new(prefix_len: u32, alias_bits: u32, k: u64) -> Self {
        let alias_bits = alias_bits.min(24);
        Tables {
            v4: BindingMap::default(),
            v6: BindingMap::default(),
            aliases: vec![None; 1 << alias_bits],
            alias_bits,
            alias_shift: 128u32.saturating_sub(prefix_len + alias_bits),
            epochs_valid: k.max(1),
            seq: 0,
            snapshot_left: 0,
            stale: true,
        }
    }

    /// Applies one numbered update.
    pub fn apply(&mut self, s: &Sequenced) -> ApplyOutcome {
        if let RuleUpdate::Snapshot { seq, count } = s.update {
            self.clear();
            self.seq = seq;
            self.snapshot_left = count;
            self.stale = false;
            return ApplyOutcome::SnapshotEntry;
        }
        if self.snapshot_left > 0 {
            if s.seq != self.seq {
                return self.lost(self.seq, s.seq);
            }
            self.snapshot_left -= 1;
            self.apply_update(&s.update);
            return ApplyOutcome::SnapshotEntry;
        }
        if self.stale || s.seq != self.seq + 1 {
            return self.lost(self.seq + 1, s.seq);
        }
        self.seq = s.seq;
        self.apply_update(&s.update);
        ApplyOutcome::Applied
    }

    /// The binding of an IPv4 address, if it routes at `now_ms`.
    #[inline]
    pub fn binding_v4(&self, addr: u32, now_ms: u64) -> Option<&Binding> {
        self.v4.get(addr).filter(|b| now_ms < b.valid_until_ms)
    }

    /// The binding of an IPv6 address, if it routes at `now_ms`.
    #[inline]
    pub fn binding_v6(&self, addr: u128, now_ms: u64) -> Option<&Binding> {
        self.v6.get(addr).filter(|b| now_ms < b.valid_until_ms)
    }

    /// Marks the binding of `ip` seen; false if there is none or it was seen already.
    pub fn mark_seen(&mut self, ip: IpAddr) -> bool {
        let b = match ip {
            IpAddr::V4(a) => self.v4.get_mut(u32::from(a)),
            IpAddr::V6(a) => self.v6.get_mut(u128::from(a)),
        };
        match b {
            Some(b) if !b.seen => {
                b.seen = true;
                true
            }
            _ => false,
        }
    }

    /// Starts loading what [`Tables::binding_v4`] of `addr` will read (a hint; see `map.rs`).
    #[inline(always)]
    pub fn prefetch_v4(&self, addr: u32) {
        self.v4.prefetch(addr);
    }

    /// Starts loading what [`Tables::binding_v6`] of `addr` will read.
    #[inline(always)]
    pub fn prefetch_v6(&self, addr: u128) {
        self.v6.prefetch(addr);
    }

    #[inline(always)]
    fn alias_of(&self, addr: u128) -> usize {
        ((addr >> self.alias_shift) & ((1u128 << self.alias_bits) - 1)) as usize
    }

    /// The SID whose alias is in `addr`, if its epoch routes at `now_ms`.
    #[inline]
    pub fn alias_sid(&self, addr: u128, now_ms: u64) -> Option<Sid> {
        let alias = self.alias_of(addr);
        // `alias` < 2^alias_bits = aliases.len() by the mask above.
        match self.aliases[alias] {
            Some(slot) if now_ms < slot.valid_until_ms => Some(slot.sid),
            _ => None,
        }
    }

    /// The last sequence number applied.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Whether the tables wait for a snapshot (at start, and after a gap).
    pub fn needs_snapshot(&self) -> bool {
        self.stale
    }

    /// Bindings held (live or not yet swept).
    pub fn bindings(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    /// Removes bindings and aliases whose time has passed. Lookups already ignore them; this
    /// only frees memory, and may be called rarely.
    pub fn sweep(&mut self, now_ms: u64) {
        self.v4.retain(|b| now_ms < b.valid_until_ms);
        self.v6.retain(|b| now_ms < b.valid_until_ms);
        for slot in &mut self.aliases {
            if matches!(slot, Some(s) if now_ms >= s.valid_until_ms) {
                *slot = None;
            }
        }
    }

    fn lost(&mut self, expected: u64, got: u64) -> ApplyOutcome {
        self.stale = true;
        self.snapshot_left = 0;
        ApplyOutcome::NeedSnapshot { expected, got }
    }

    fn clear(&mut self) {
        self.v4.clear();
        self.v6.clear();
        self.aliases.iter_mut().for_each(|a| *a = None);
    }

    fn apply_update(&mut self, update: &RuleUpdate) {
        match update {
            RuleUpdate::BindingAdd {
                ip,
                mac,
                sid,
                port,
                valid_until_ms,
            } => {
                let b = Binding {
                    mac: mac.0,
                    sid: *sid,
                    port: *port,
                    valid_until_ms: *valid_until_ms,
                    seen: false,
                };
                match ip {
                    IpAddr::V4(a) => self.v4.insert(u32::from(*a), b),
                    IpAddr::V6(a) => self.v6.insert(u128::from(*a), b),
                };
            }
            RuleUpdate::BindingRemove { ip } => {
                match ip {
                    IpAddr::V4(a) => self.v4.remove(u32::from(*a)),
                    IpAddr::V6(a) => self.v6.remove(u128::from(*a)),
                };
            }
            RuleUpdate::AliasEpoch {
                epoch,
                aliases,
                valid_until_ms,
            } => {
                // Epochs `epoch - k` and older stop routing now, whatever their valid-until.
                let oldest_valid = epoch.saturating_sub(self.epochs_valid - 1);
                for slot in &mut self.aliases {
                    if matches!(slot, Some(s) if s.epoch < oldest_valid) {
                        *slot = None;
                    }
                }
                for (sid, list) in aliases {
                    for &alias in list {
                        if let Some(slot) = self.aliases.get_mut(alias as usize) {
                            *slot = Some(AliasSlot {
                                sid: *sid,
                                epoch: *epoch,
                                valid_until_ms: *valid_until_ms,
                            });
                        }
                    }
                }
            }
            RuleUpdate::Snapshot { .. } => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mimiq_allocator::Mac;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn add(seq: u64, ip: &str, mac: u8, sid: Sid, until: u64) -> Sequenced {
        Sequenced {
            seq,
            update: RuleUpdate::BindingAdd {
                ip: ip.parse().unwrap(),
                mac: Mac([2, 0, 0, 0, 0, mac]),
                sid,
                port: 0,
                valid_until_ms: until,
            },
        }
    }

    fn v4(s: &str) -> u32 {
        u32::from(s.parse::<Ipv4Addr>().unwrap())
    }

    fn v6(s: &str) -> u128 {
        u128::from(s.parse::<Ipv6Addr>().unwrap())
    }

    fn snapshot(seq: u64, count: u32) -> Sequenced {
        Sequenced {
            seq,
            update: RuleUpdate::Snapshot { seq, count },
        }
    }

    #[test]
    fn an_address_routes_until_lifetime_plus_t_remove_and_then_drops() {
        let mut t = Tables::new(64, 16, 3);
        assert_eq!(t.apply(&snapshot(0, 0)), ApplyOutcome::SnapshotEntry);
        assert_eq!(
            t.apply(&add(1, "198.18.1.7", 7, 3, 10_500)),
            ApplyOutcome::Applied
        );
        assert_eq!(
            t.binding_v4(v4("198.18.1.7"), 10_499)
                .map(|b| (b.sid, b.mac[5])),
            Some((3, 7))
        );
        assert_eq!(
            t.binding_v4(v4("198.18.1.7"), 10_500),
            None,
            "not one ms after valid_until"
        );
        assert_eq!(t.binding_v4(v4("198.18.1.8"), 0), None);
        t.sweep(10_500);
        assert_eq!(t.bindings(), 0);
    }

    #[test]
    fn a_binding_that_moves_to_another_client_follows_at_once_and_removes_apply() {
        let mut t = Tables::new(64, 16, 3);
        t.apply(&snapshot(5, 1));
        t.apply(&add(5, "fd00::1:2", 1, 1, 100));
        t.apply(&add(6, "fd00::1:2", 2, 1, 100));
        assert_eq!(t.binding_v6(v6("fd00::1:2"), 50).unwrap().mac[5], 2);
        let remove = Sequenced {
            seq: 7,
            update: RuleUpdate::BindingRemove {
                ip: "fd00::1:2".parse().unwrap(),
            },
        };
        assert_eq!(t.apply(&remove), ApplyOutcome::Applied);
        assert_eq!(t.binding_v6(v6("fd00::1:2"), 50), None);
        assert_eq!(t.seq(), 7);
    }

    #[test]
    fn a_gap_asks_for_a_snapshot_and_nothing_applies_until_one_comes() {
        let mut t = Tables::new(64, 16, 3);
        assert!(t.needs_snapshot(), "a new switch starts from a snapshot");
        assert!(matches!(
            t.apply(&add(1, "198.18.0.1", 1, 1, 100)),
            ApplyOutcome::NeedSnapshot { .. }
        ));
        t.apply(&snapshot(10, 0));
        t.apply(&add(11, "198.18.0.1", 1, 1, 100));
        assert_eq!(
            t.apply(&add(13, "198.18.0.2", 1, 1, 100)),
            ApplyOutcome::NeedSnapshot {
                expected: 12,
                got: 13
            }
        );
        assert!(t.needs_snapshot());
        assert_eq!(
            t.apply(&add(14, "198.18.0.3", 1, 1, 100)),
            ApplyOutcome::NeedSnapshot {
                expected: 12,
                got: 14
            }
        );
        assert_eq!(
            t.binding_v4(v4("198.18.0.2"), 0),
            None,
            "the update after the gap was not applied"
        );
        // The snapshot replaces everything.
        t.apply(&snapshot(14, 1));
        t.apply(&add(14, "198.18.0.3", 1, 1, 100));
        assert_eq!(
            t.binding_v4(v4("198.18.0.1"), 0),
            None,
            "state from before the snapshot is gone"
        );
        assert!(t.binding_v4(v4("198.18.0.3"), 0).is_some());
        assert_eq!(
            t.apply(&add(15, "198.18.0.4", 1, 1, 100)),
            ApplyOutcome::Applied
        );
    }

    #[test]
    fn an_alias_routes_while_its_epoch_is_valid_and_not_after_k_rotations() {
        // fd00::/64, 16 alias bits right after the prefix.
        let mut t = Tables::new(64, 16, 2);
        t.apply(&snapshot(0, 0));
        let epoch = |seq, epoch, aliases: Vec<(Sid, Vec<u32>)>, until| Sequenced {
            seq,
            update: RuleUpdate::AliasEpoch {
                epoch,
                aliases,
                valid_until_ms: until,
            },
        };
        let addr = |alias: u16| v6("fd00::") | (u128::from(alias) << 48) | 0x1234;
        t.apply(&epoch(
            1,
            1,
            vec![(4, vec![0x0101, 0x0102]), (5, vec![0x0201])],
            2_000,
        ));
        assert_eq!(t.alias_sid(addr(0x0102), 1_999), Some(4));
        assert_eq!(t.alias_sid(addr(0x0201), 0), Some(5));
        assert_eq!(t.alias_sid(addr(0x0303), 0), None, "an alias of no epoch");
        assert_eq!(t.alias_sid(addr(0x0102), 2_000), None, "expired");
        // Epoch 2 arrives: epoch 1 still valid (k = 2); epoch 3 arrives: epoch 1 is gone.
        t.apply(&epoch(2, 2, vec![(4, vec![0x0301])], 3_000));
        assert_eq!(t.alias_sid(addr(0x0101), 1_500), Some(4));
        t.apply(&epoch(3, 3, vec![(4, vec![0x0401])], 4_000));
        assert_eq!(
            t.alias_sid(addr(0x0101), 1_500),
            None,
            "epoch e routes no more once e + k arrives"
        );
        assert_eq!(t.alias_sid(addr(0x0301), 1_500), Some(4));
    }

    proptest::proptest! {
        #[test]
        fn any_sequence_of_updates_never_panics_and_lookups_respect_valid_until(
            ops in proptest::collection::vec((0u64..40, 0u8..4, 0u32..8, 0u64..1000), 0..200),
            now in 0u64..1000,
        ) {
            let mut t = Tables::new(64, 8, 3);
            for (seq, kind, a, until) in ops {
                let ip: IpAddr = if a % 2 == 0 { Ipv4Addr::new(198, 18, 0, a as u8).into() } else { Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, a as u16).into() };
                let update = match kind {
                    0 => RuleUpdate::BindingAdd { ip, mac: Mac([2, 0, 0, 0, 0, a as u8]), sid: a as u16, port: a as u16, valid_until_ms: until },
                    1 => RuleUpdate::BindingRemove { ip },
                    2 => RuleUpdate::AliasEpoch { epoch: seq, aliases: vec![(1, vec![a * 37, 1 << 20])], valid_until_ms: until },
                    _ => RuleUpdate::Snapshot { seq, count: a },
                };
                t.apply(&Sequenced { seq, update });
                for x in 0..8u32 {
                    if let Some(b) = t.binding_v4(u32::from(Ipv4Addr::new(198, 18, 0, x as u8)), now) {
                        proptest::prop_assert!(now < b.valid_until_ms);
                    }
                    let _ = t.alias_sid(u128::from(x) << 48, now);
                }
            }
        }
    }
}
