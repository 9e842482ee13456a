//! One connection's hopping, put together: its [`HopStrategy`] says when, the shared
//! [`AddressSet`] says to which address, and the address's expiry can force a hop the strategy
//! did not ask for. This is what the migration driver calls before sending each packet.
//!
//! Sans-IO like its parts: the driver passes `now_ms` and the set, and acts on the returned
//! [`PacketAction`] (validate the new path and migrate, or send). Every connection is assigned
//! through [`AddressSet::assign_connection`], so simultaneous connections prefer addresses no
//! other connection uses, and a hop never lands on the address it leaves while another is
//! usable.

use std::net::IpAddr;

use crate::addrset::{AddressSet, ConnectionId};
use crate::strategy::{Decision, HopStrategy};

/// What to do with the packet about to be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PacketAction {
    /// Send it from `from`, the connection's address.
    Send {
        /// The connection's current address.
        from: IpAddr,
    },
    /// Move the connection to `to` (the first address when `from` is `None`), then send it
    /// from `to`.
    Migrate {
        /// The address left, `None` for the connection's first address.
        from: Option<IpAddr>,
        /// The new address.
        to: IpAddr,
        /// The hop was forced: the old address reached the expiry margin.
        forced: bool,
    },
    /// No unexpired address is held: hold the packet and ask the allocator (the set's
    /// `poll_refill` already says so).
    NoAddress,
}

/// Counters for one connection (the agent sums them into its metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HopStats {
    /// Packets sent (every `Send` and `Migrate`).
    pub packets: u64,
    /// Hops the strategy asked for and that happened.
    pub hops: u64,
    /// Hops forced by the expiry margin.
    pub forced_hops: u64,
    /// Hops that could not happen for want of another usable address (the connection stayed).
    pub failed_hops: u64,
    /// Packets held because no unexpired address was left.
    pub no_address: u64,
}

/// One connection's hop state.
#[derive(Debug, Clone)]
pub struct ConnectionHopper {
    conn: ConnectionId,
    strategy: HopStrategy,
    started: bool,
    stats: HopStats,
}

impl ConnectionHopper {
    /// Hopping for connection `conn` (the caller's id, unique among live connections).
    pub fn new(conn: ConnectionId, strategy: HopStrategy) -> Self {
        Self {
            conn,
            strategy,
            started: false,
            stats: HopStats::default(),
        }
    }

    /// The connection's address `current` left the host (nothing can be sent from it, nor
    /// arrive there, so no packet will count toward a hop): moves the connection to another
    /// address of the set now, as a forced hop; `None` if the set has no other.
    pub fn leave(&mut self, set: &mut AddressSet, current: IpAddr, now_ms: u64) -> Option<IpAddr> {
        match set.assign_connection(self.conn, now_ms) {
            Ok(to) if to != current => {
                self.stats.forced_hops += 1;
                self.strategy.on_forced_hop(now_ms);
                Some(to)
            }
            _ => None,
        }
    }

    /// Called before each packet the connection sends at `now_ms`.
    pub fn on_packet(&mut self, set: &mut AddressSet, now_ms: u64) -> PacketAction {
        let current = set.connection_address(self.conn, now_ms);
        if !self.started {
            let Ok(to) = set.assign_connection(self.conn, now_ms) else {
                self.stats.no_address += 1;
                return PacketAction::NoAddress;
            };
            self.started = true;
            // The first packet never hops; it only starts the schedule.
            let _ = self.strategy.on_packet(now_ms);
            self.stats.packets += 1;
            return PacketAction::Migrate {
                from: None,
                to,
                forced: false,
            };
        }
        let must_move = current.is_none_or(|a| !set.is_usable(a, now_ms));
        if must_move {
            return match set.assign_connection(self.conn, now_ms) {
                Ok(to) => {
                    self.stats.forced_hops += 1;
                    self.stats.packets += 1;
                    self.strategy.on_forced_hop(now_ms);
                    // Counts this packet on the new address; a fresh schedule never hops on it.
                    let _ = self.strategy.on_packet(now_ms);
                    PacketAction::Migrate {
                        from: current,
                        to,
                        forced: true,
                    }
                }
                // Within the margin but not expired: better late than never.
                Err(_) => match current {
                    Some(from) => {
                        self.stats.failed_hops += 1;
                        self.stats.packets += 1;
                        let _ = self.strategy.on_packet(now_ms);
                        PacketAction::Send { from }
                    }
                    None => {
                        self.stats.no_address += 1;
                        PacketAction::NoAddress
                    }
                },
            };
        }
        // `must_move` is false, so `current` is a usable address.
        let Some(from) = current else {
            return PacketAction::NoAddress;
        };
        self.stats.packets += 1;
        if self.strategy.on_packet(now_ms) == Decision::Stay {
            return PacketAction::Send { from };
        }
        match set.assign_connection(self.conn, now_ms) {
            Ok(to) if to != from => {
                self.stats.hops += 1;
                PacketAction::Migrate {
                    from: Some(from),
                    to,
                    forced: false,
                }
            }
            _ => {
                self.stats.failed_hops += 1;
                PacketAction::Send { from }
            }
        }
    }

    /// The connection closed: frees its address for other connections.
    pub fn close(self, set: &mut AddressSet) -> HopStats {
        set.remove_connection(self.conn);
        self.stats
    }

    /// Counters so far.
    pub fn stats(&self) -> HopStats {
        self.stats
    }

    /// The connection's id.
    pub fn connection(&self) -> ConnectionId {
        self.conn
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::time::Duration;

    use super::*;
    use crate::addrset::AddressSetConfig;
    use crate::strategy::HopStrategyConfig;

    fn ip(n: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n))
    }

    fn set(lifetime_ms: u64, count: u32) -> AddressSet {
        let config = AddressSetConfig {
            expiry_margin_ms: 100,
            refill_lead_ms: 1_000,
            refill_retry_ms: 100,
            set_size: 4,
            min_usable: 2,
        };
        let mut set = AddressSet::new(config, 9).unwrap();
        let addrs: Vec<_> = (1..=count)
            .map(|i| (ip(i), Duration::from_millis(lifetime_ms)))
            .collect();
        set.add_allocation(0, &addrs);
        set
    }

    fn hopper(config: HopStrategyConfig) -> ConnectionHopper {
        ConnectionHopper::new(1, HopStrategy::new(&config, 0).unwrap())
    }

    #[test]
    fn every_25_packets_migrates_before_packets_26_51_and_76() {
        let mut set = set(1_000_000, 4);
        let mut h = hopper(HopStrategyConfig::EveryPackets { packets: 25 });
        let mut from = None;
        let mut migrations = Vec::new();
        for i in 1..=100u64 {
            match h.on_packet(&mut set, i) {
                PacketAction::Send { from: f } => assert_eq!(Some(f), from),
                PacketAction::Migrate {
                    from: f,
                    to,
                    forced,
                } => {
                    assert!(!forced);
                    assert_eq!(f, from);
                    assert_ne!(Some(to), from);
                    migrations.push(i);
                    from = Some(to);
                }
                PacketAction::NoAddress => panic!("no address at packet {i}"),
            }
        }
        assert_eq!(migrations, vec![1, 26, 51, 76]);
        let stats = h.stats();
        assert_eq!(
            (
                stats.packets,
                stats.hops,
                stats.forced_hops,
                stats.failed_hops
            ),
            (100, 3, 0, 0)
        );
    }

    #[test]
    fn an_address_reaching_its_margin_forces_a_hop_even_when_the_strategy_never_hops() {
        let mut set = set(1_000, 1);
        set.add_allocation(0, &[(ip(9), Duration::from_millis(50_000))]);
        let mut h = hopper(HopStrategyConfig::Never {});
        // Whichever address it starts on, it is on ip(9) from the margin of the short one on.
        let _ = h.on_packet(&mut set, 0);
        for t in 900..1_000 {
            let action = h.on_packet(&mut set, t);
            assert!(
                matches!(action, PacketAction::Send { from } | PacketAction::Migrate { to: from, .. }
                    if from == ip(9)),
                "{action:?} at {t}"
            );
        }
        assert!(h.stats().forced_hops <= 1);
        assert_eq!(h.stats().hops, 0);
    }

    #[test]
    fn a_hop_without_a_spare_address_is_counted_and_the_connection_stays() {
        let mut set = set(1_000_000, 1);
        let mut h = hopper(HopStrategyConfig::EveryPackets { packets: 2 });
        assert!(matches!(
            h.on_packet(&mut set, 0),
            PacketAction::Migrate { from: None, .. }
        ));
        for t in 1..10 {
            assert_eq!(h.on_packet(&mut set, t), PacketAction::Send { from: ip(1) });
        }
        assert_eq!(h.stats().failed_hops, 4);
    }

    #[test]
    fn without_any_address_packets_are_held_and_counted() {
        let mut set = set(1_000, 1);
        let mut h = hopper(HopStrategyConfig::Never {});
        let _ = h.on_packet(&mut set, 0);
        // Within the margin, no other address: stays on the old one until it expires.
        assert_eq!(
            h.on_packet(&mut set, 950),
            PacketAction::Send { from: ip(1) }
        );
        assert_eq!(h.on_packet(&mut set, 1_000), PacketAction::NoAddress);
        set.drain_expired(1_000);
        assert_eq!(h.on_packet(&mut set, 1_001), PacketAction::NoAddress);
        assert_eq!(h.stats().no_address, 2);
        set.add_allocation(1_002, &[(ip(5), Duration::from_secs(10))]);
        assert_eq!(
            h.on_packet(&mut set, 1_003),
            PacketAction::Migrate {
                from: None,
                to: ip(5),
                forced: true
            }
        );
    }

    #[test]
    fn simultaneous_per_connection_hoppers_use_different_addresses() {
        let mut set = set(1_000_000, 4);
        let config = HopStrategyConfig::PerConnection {};
        let mut hoppers: Vec<_> = (0..4)
            .map(|c| ConnectionHopper::new(c, HopStrategy::for_connection(&config, 1, c).unwrap()))
            .collect();
        let mut used: Vec<IpAddr> = hoppers
            .iter_mut()
            .map(|h| match h.on_packet(&mut set, 0) {
                PacketAction::Migrate { to, .. } => to,
                other => panic!("{other:?}"),
            })
            .collect();
        used.sort();
        used.dedup();
        assert_eq!(used.len(), 4);
        let closed = hoppers.pop().unwrap();
        assert_eq!(closed.connection(), 3);
        assert_eq!(closed.close(&mut set).packets, 1);
        assert_eq!(set.connection_address(3, 0), None);
    }
}
