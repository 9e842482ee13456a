//! Property tests of the address set and the hop strategies, through the public API on a
//! virtual clock: no address handed out is ever expired or within the expiry margin, a hop
//! never stays on the same address when another is usable, refills are requested before the set
//! runs short, and strategies stay within their configured bounds for any seed.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use mimiq_agent::addrset::{AddressSet, AddressSetConfig, ChooseError};
use mimiq_agent::hopper::{ConnectionHopper, PacketAction};
use mimiq_agent::strategy::{Decision, HopStrategy, HopStrategyConfig};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Advance(u64),
    Allocate { count: u8, lifetime_ms: u64 },
    Hop,
    Assign(u64),
    Remove(u64),
    Release,
    Drain,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (1u64..2_000).prop_map(Op::Advance),
        2 => (0u8..5, 0u64..5_000).prop_map(|(count, lifetime_ms)| Op::Allocate { count, lifetime_ms }),
        4 => Just(Op::Hop),
        2 => (0u64..4).prop_map(Op::Assign),
        1 => (0u64..4).prop_map(Op::Remove),
        1 => Just(Op::Release),
        1 => Just(Op::Drain),
    ]
}

fn set_config() -> impl Strategy<Value = AddressSetConfig> {
    (0u64..500, 0u64..3_000, 1u64..1_000, 1u16..8, 2usize..4).prop_map(
        |(expiry_margin_ms, refill_lead_ms, refill_retry_ms, set_size, min_usable)| {
            AddressSetConfig {
                expiry_margin_ms,
                refill_lead_ms,
                refill_retry_ms,
                set_size,
                min_usable,
            }
        },
    )
}

/// The expiry of `addr` as the set reports it.
fn expiry(set: &AddressSet, addr: IpAddr) -> Option<u64> {
    set.addresses().find(|&(a, _)| a == addr).map(|(_, e)| e)
}

/// Usable addresses other than `except`.
fn usable_others(set: &AddressSet, now_ms: u64, except: Option<IpAddr>) -> usize {
    let margin = set.config().expiry_margin_ms;
    set.addresses()
        .filter(|&(a, e)| now_ms + margin < e && Some(a) != except)
        .count()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Whatever the sequence of allocations, hops, assignments and time steps, every address the
    /// set hands out is usable (expires after now + margin), a hop changes the address whenever
    /// another is usable, and nothing returns an address at or past its expiry.
    #[test]
    fn no_chosen_address_is_expired_or_repeated_when_another_is_usable(
        config in set_config(),
        seed in any::<u64>(),
        ops in prop::collection::vec(op(), 1..200),
    ) {
        let margin = config.expiry_margin_ms;
        let mut set = AddressSet::new(config, seed).unwrap();
        let mut now = 0u64;
        let mut next_ip = 1u32;
        let mut released = BTreeSet::new();
        for op in ops {
            match op {
                Op::Advance(ms) => now += ms,
                Op::Allocate { count, lifetime_ms } => {
                    let addrs: Vec<_> = (0..count)
                        .map(|_| {
                            next_ip += 1;
                            (IpAddr::V4(Ipv4Addr::from(next_ip)), Duration::from_millis(lifetime_ms))
                        })
                        .collect();
                    set.add_allocation(now, &addrs);
                }
                Op::Hop => {
                    let before = set.current(now);
                    match set.hop(now) {
                        Ok(hop) => {
                            prop_assert_eq!(hop.from, before);
                            prop_assert_ne!(Some(hop.to), before);
                            let e = expiry(&set, hop.to).unwrap();
                            prop_assert!(now + margin < e, "chose {} expiring at {} at {}", hop.to, e, now);
                        }
                        Err(ChooseError::NoSpareAddress { .. }) => {
                            prop_assert_eq!(usable_others(&set, now, before), 0);
                            prop_assert_eq!(set.current(now), before);
                        }
                    }
                }
                Op::Assign(conn) => {
                    let before = set.connection_address(conn, now);
                    match set.assign_connection(conn, now) {
                        Ok(addr) => {
                            let e = expiry(&set, addr).unwrap();
                            prop_assert!(now + margin < e);
                            if usable_others(&set, now, before) > 0 {
                                prop_assert_ne!(Some(addr), before);
                            }
                        }
                        Err(_) => prop_assert_eq!(usable_others(&set, now, None), 0),
                    }
                }
                Op::Remove(conn) => set.remove_connection(conn),
                Op::Release => {
                    for addr in set.poll_release(now) {
                        prop_assert_ne!(set.current(now), Some(addr));
                        prop_assert!((0..4).all(|c| set.connection_address(c, now) != Some(addr)));
                        prop_assert!(released.insert(addr), "{} released twice", addr);
                    }
                }
                Op::Drain => {
                    for addr in set.drain_expired(now) {
                        prop_assert!(expiry(&set, addr).is_none());
                    }
                }
            }
            // Nothing handed out is ever past its expiry, drained or not.
            if let Some(cur) = set.current(now) {
                prop_assert!(now < expiry(&set, cur).unwrap());
            }
            for conn in 0..4 {
                if let Some(addr) = set.connection_address(conn, now) {
                    prop_assert!(now < expiry(&set, addr).unwrap());
                }
            }
        }
    }

    /// An agent that polls every `tick_ms` and whose allocator answers within
    /// `refill_lead_ms - tick_ms` never runs short: after the first set it always holds at least
    /// the usable addresses it needs, every hop succeeds, and each request goes out before the
    /// set would run short.
    #[test]
    fn refills_are_requested_before_the_set_runs_out(
        margin in 0u64..1_000,
        lead in 50u64..5_000,
        tick_pct in 1u64..50,
        latency_pct in 0u64..50,
        set_size in 2u16..6,
        min_usable in 2usize..4,
        connections in 0u64..4,
        lifetime_spread in 0u64..20_000,
        seed in any::<u64>(),
    ) {
        let tick = (lead * tick_pct / 100).max(1);
        let latency = lead * latency_pct / 100;
        prop_assume!(tick + latency < lead);
        let set_size = set_size.max(u16::try_from(min_usable).unwrap()).max(connections as u16 + 1);
        let config = AddressSetConfig {
            expiry_margin_ms: margin,
            refill_lead_ms: lead,
            refill_retry_ms: lead,
            set_size,
            min_usable,
        };
        let mut set = AddressSet::new(config, seed).unwrap();
        // Lifetimes long enough that a fresh set is not already due for refill.
        let lifetime_min = margin + lead + tick + 1;
        let mut rng = seed;
        let mut next_ip = 1u32;
        let mut pending: Option<u64> = None;
        let mut served = false;
        let mut now = 0;
        while now < 200_000 {
            if pending.is_some_and(|at| at <= now) {
                pending = None;
                let addrs: Vec<_> = (0..set_size)
                    .map(|_| {
                        next_ip += 1;
                        rng = rng.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                        let spread = if lifetime_spread == 0 { 0 } else { (rng >> 33) % lifetime_spread };
                        (IpAddr::V4(Ipv4Addr::from(next_ip)), Duration::from_millis(lifetime_min + spread))
                    })
                    .collect();
                set.add_allocation(now, &addrs);
                if !served {
                    served = true;
                    for conn in 0..connections {
                        set.assign_connection(conn, now).unwrap();
                    }
                }
            }
            set.drain_expired(now);
            if served {
                let need = min_usable.max(connections as usize + 1);
                prop_assert!(set.usable_count(now) >= need,
                    "at {} only {} usable, need {}", now, set.usable_count(now), need);
                prop_assert!(set.hop(now).is_ok());
                for conn in set.connections_to_move(now) {
                    prop_assert!(set.assign_connection(conn, now).is_ok());
                }
            }
            if set.poll_refill(now).is_some() {
                if served {
                    prop_assert!(now < set.runs_out_ms(),
                        "asked at {} but the set runs short at {}", now, set.runs_out_ms());
                }
                prop_assert!(pending.is_none(), "second request while one is outstanding");
                pending = Some(now + latency);
            }
            now += tick;
        }
    }

    /// Connections hopping under any strategy, with allocations of any lifetime arriving at
    /// random times, never send a packet from an address that has expired or that the set does
    /// not hold, and a migration never lands on the address it leaves.
    #[test]
    fn hopping_connections_never_send_from_an_expired_address(
        kind in 0u8..6,
        a in 1u64..20,
        width in 0u64..20,
        margin in 0u64..200,
        connections in 1u64..4,
        steps in prop::collection::vec((1u64..50, 0u8..4, 1u64..3_000), 1..300),
        seed in any::<u64>(),
    ) {
        let config = match kind {
            0 => HopStrategyConfig::Never {},
            1 => HopStrategyConfig::EveryPackets { packets: a },
            2 => HopStrategyConfig::RandomPackets { min_packets: a, max_packets: a + width },
            3 => HopStrategyConfig::RandomTime { min_ms: a, max_ms: a + width },
            4 => HopStrategyConfig::OnceAfter { packets: a },
            _ => HopStrategyConfig::PerConnection {},
        };
        let set_config = AddressSetConfig { expiry_margin_ms: margin, ..AddressSetConfig::default() };
        let mut set = AddressSet::new(set_config, seed).unwrap();
        let mut hoppers: Vec<_> = (0..connections)
            .map(|c| ConnectionHopper::new(c, HopStrategy::for_connection(&config, seed, c).unwrap()))
            .collect();
        let mut now = 0;
        let mut next_ip = 1u32;
        let mut on: Vec<Option<IpAddr>> = vec![None; connections as usize];
        for (advance, new_addresses, lifetime_ms) in steps {
            now += advance;
            let addrs: Vec<_> = (0..new_addresses)
                .map(|_| {
                    next_ip += 1;
                    (IpAddr::V4(Ipv4Addr::from(next_ip)), Duration::from_millis(lifetime_ms))
                })
                .collect();
            set.add_allocation(now, &addrs);
            set.drain_expired(now);
            for (i, h) in hoppers.iter_mut().enumerate() {
                let sent_from = match h.on_packet(&mut set, now) {
                    PacketAction::Send { from } => {
                        prop_assert_eq!(Some(from), on[i]);
                        Some(from)
                    }
                    PacketAction::Migrate { from, to, .. } => {
                        prop_assert_ne!(Some(to), from);
                        let e = expiry(&set, to).unwrap();
                        prop_assert!(now + margin < e, "migrated onto {} expiring at {} at {}", to, e, now);
                        on[i] = Some(to);
                        Some(to)
                    }
                    PacketAction::NoAddress => None,
                };
                if let Some(addr) = sent_from {
                    let e = expiry(&set, addr);
                    prop_assert!(e.is_some_and(|e| now < e), "sent from {} (expiry {:?}) at {}", addr, e, now);
                }
            }
        }
    }

    /// Random strategies never leave their bounds, for any seed and any valid range.
    #[test]
    fn random_packets_stays_within_bounds_for_any_seed(
        lo in 1u64..50, width in 0u64..50, seed in any::<u64>(),
    ) {
        let hi = lo + width;
        let config = HopStrategyConfig::RandomPackets { min_packets: lo, max_packets: hi };
        let mut s = HopStrategy::new(&config, seed).unwrap();
        let mut last = 1u64;
        for i in 1..5_000u64 {
            if s.on_packet(i) == Decision::Hop {
                prop_assert!((lo..=hi).contains(&(i - last)));
                last = i;
            }
        }
        prop_assert!(5_000 - last <= hi);
    }

    #[test]
    fn random_time_stays_within_bounds_for_any_seed(
        lo in 1u64..50, width in 0u64..50, step in 1u64..5, seed in any::<u64>(),
    ) {
        let hi = lo + width;
        let config = HopStrategyConfig::RandomTime { min_ms: lo, max_ms: hi };
        let mut s = HopStrategy::new(&config, seed).unwrap();
        let mut last = 0u64;
        let mut t = 0;
        while t < 5_000 {
            if s.on_packet(t) == Decision::Hop {
                // The hop comes at the first packet at or after the deadline.
                prop_assert!(t - last >= lo && t - last < hi + step, "{} ms", t - last);
                last = t;
            }
            t += step;
        }
    }

    /// A config that validates builds a strategy, and one that does not is refused the same way
    /// by both.
    #[test]
    fn validation_and_construction_agree(a in 0u64..5, b in 0u64..5, seed in any::<u64>()) {
        let config = HopStrategyConfig::RandomPackets { min_packets: a, max_packets: b };
        let valid = a >= 1 && b >= 1 && a <= b;
        prop_assert_eq!(config.validate().is_ok(), valid);
        prop_assert_eq!(HopStrategy::new(&config, seed).is_ok(), valid);
        if let Err(e) = config.validate() {
            prop_assert!(!e.to_string().contains('\n'));
        }
    }
}
