//! Property tests of the sans-IO core (proptest) and the uniformity tests (chi-square).

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};

use mimiq_allocator::lease::{
    AllocError, AllocParams, Allocator, Config, LeaseState, RuleUpdate, V4Config, V6Config,
};
use mimiq_allocator::pool::V4Pool;
use mimiq_allocator::rng::Csprng;
use mimiq_allocator::{Family, Mac};
use proptest::prelude::*;

const T_REMOVE_MS: u64 = 500;

fn config() -> Config {
    Config {
        t_ip_min_ms: 1_000,
        t_ip_max_ms: 2_000,
        t_remove_ms: T_REMOVE_MS,
        max_per_request: 4,
        max_live_per_client: 8,
        rate_per_s: 50,
        rate_burst: 20,
        max_live_per_port: u32::MAX,
        new_macs_per_port_per_s: u32::MAX / 1000,
        new_macs_per_port_burst: u32::MAX / 1000,
        reclaim_silent_after_ms: 0,
        sids: vec![1, 2],
        // 14 usable addresses: small enough that exhaustion and reuse happen constantly.
        ipv4: Some(V4Config {
            prefixes: vec!["10.0.0.0/28".parse().unwrap()],
            reserved: vec![],
        }),
        // 4 alias bits: 2 SIDs · n=1 · k=4 = 8 of 15 values valid at once, and a small random part
        // (/100 + 4 = 104: 24 random bits).
        ipv6: Some(V6Config {
            prefix: "2001:db8::/100".parse().unwrap(),
            alias_bits: 4,
            aliases_per_sid: 1,
            k: 4,
            t_sid_ms: 1_000,
        }),
    }
}

#[derive(Debug, Clone)]
enum Op {
    Alloc {
        mac: u8,
        sid: u16,
        v6: bool,
        count: u32,
    },
    Release {
        mac: u8,
        pick: usize,
    },
    Advance {
        dt_ms: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..4, 1u16..=2, any::<bool>(), 1u32..=4).prop_map(|(mac, sid, v6, count)| Op::Alloc { mac, sid, v6, count }),
        1 => (0u8..4, any::<usize>()).prop_map(|(mac, pick)| Op::Release { mac, pick }),
        3 => (0u64..1_500).prop_map(|dt_ms| Op::Advance { dt_ms }),
    ]
}

fn mac(m: u8) -> Mac {
    Mac([2, 0, 0, 0, 0, m])
}

/// What the model knows of each address ever granted: owner and when its drain ends.
#[derive(Debug, Clone, Copy)]
struct Granted {
    mac: Mac,
    drain_end_ms: u64,
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// No two live leases share an address; every address comes back after expiry + t_remove and
    /// only then; aliases are unique across valid epochs; the switches' view built from the rule
    /// updates always equals the allocator's snapshot.
    #[test]
    fn core_invariants_hold_under_any_operation_sequence(ops in prop::collection::vec(op(), 1..200)) {
        let mut a = Allocator::new(config()).unwrap();
        let mut now = 0u64;
        let mut model: HashMap<IpAddr, Granted> = HashMap::new();
        let mut switch: HashMap<IpAddr, (Mac, u16, u16, u64)> = HashMap::new();
        let mut epochs: HashMap<u64, Vec<(u16, Vec<u32>)>> = HashMap::new();
        let mut last_seq = 0u64;
        for op in ops {
            match op {
                Op::Alloc { mac: m, sid, v6, count } => {
                    let family = if v6 { Family::V6 } else { Family::V4 };
                    match a.allocate(now, AllocParams { mac: mac(m), sid, port: 1, family, count }) {
                        Ok(grants) => {
                            prop_assert_eq!(grants.len() as u32, count);
                            for g in grants {
                                prop_assert!(g.lifetime_ms >= 1 && g.lifetime_ms <= 2_000);
                                if let Some(prev) = model.get(&g.ip) {
                                    prop_assert!(prev.drain_end_ms <= now, "{} reissued at {} before its drain ended at {}", g.ip, now, prev.drain_end_ms);
                                }
                                model.insert(g.ip, Granted { mac: mac(m), drain_end_ms: g.expires_ms + T_REMOVE_MS });
                            }
                        }
                        Err(AllocError::PoolExhausted) => {
                            if !v6 {
                                let live = model.values().filter(|g| g.drain_end_ms > now).count();
                                prop_assert!(live + count as usize > 14, "exhausted with {} of 14 in use", live);
                            }
                        }
                        Err(AllocError::ClientCap { .. }) | Err(AllocError::RateLimited) => {}
                        Err(e) => prop_assert!(false, "unexpected error {:?}", e),
                    }
                }
                Op::Release { mac: m, pick } => {
                    let mut owned: Vec<IpAddr> = a.leases().filter(|(l, s)| l.mac == mac(m) && *s == LeaseState::Assigned).map(|(l, _)| l.ip).collect();
                    owned.sort();
                    if !owned.is_empty() {
                        let ip = owned[pick % owned.len()];
                        prop_assert_eq!(a.release(now, mac(m), &[ip]), 1);
                        model.get_mut(&ip).unwrap().drain_end_ms = now + T_REMOVE_MS;
                    }
                }
                Op::Advance { dt_ms } => {
                    now += dt_ms;
                    a.advance(now);
                }
            }
            // Every address granted is held exactly until its drain ends.
            for (ip, g) in &model {
                let held = a.lease(*ip);
                if g.drain_end_ms > now {
                    prop_assert!(held.is_some(), "{} freed early", ip);
                    prop_assert_eq!(held.unwrap().0.mac, g.mac);
                    if let (IpAddr::V4(v4), Some(p)) = (ip, a.v4_pool()) {
                        prop_assert!(!p.is_free(*v4));
                    }
                } else {
                    prop_assert!(held.is_none() || held.unwrap().0.mac == g.mac && held.unwrap().0.expires_ms + T_REMOVE_MS > now,
                        "{} still held after its drain ended", ip);
                }
            }
            let live_v4 = model.iter().filter(|(ip, g)| ip.is_ipv4() && g.drain_end_ms > now).count() as u64;
            prop_assert_eq!(a.v4_pool().unwrap().in_use(), live_v4);
            // Aliases unique across valid epochs.
            let mut seen = HashSet::new();
            for e in a.aliases().unwrap().valid_epochs() {
                prop_assert!(e.valid_until_ms > now);
                for (_, l) in &e.aliases {
                    for &x in l {
                        prop_assert!(x != 0 && seen.insert(x), "alias {} valid twice", x);
                    }
                }
            }
            // The switch view from the update stream equals the allocator's snapshot.
            for u in a.take_updates() {
                prop_assert_eq!(u.seq, last_seq + 1);
                last_seq = u.seq;
                match u.update {
                    RuleUpdate::BindingAdd { ip, mac, sid, port, valid_until_ms } => { switch.insert(ip, (mac, sid, port, valid_until_ms)); }
                    RuleUpdate::BindingRemove { ip } => { prop_assert!(switch.remove(&ip).is_some()); }
                    RuleUpdate::AliasEpoch { epoch, aliases, .. } => { epochs.insert(epoch, aliases); }
                    RuleUpdate::Snapshot { .. } => prop_assert!(false, "snapshot marker in the incremental stream"),
                }
            }
            let (seq, snap) = a.snapshot();
            prop_assert_eq!(seq, last_seq);
            let mut from_snap = HashMap::new();
            for u in snap {
                if let RuleUpdate::BindingAdd { ip, mac, sid, port, valid_until_ms } = u {
                    from_snap.insert(ip, (mac, sid, port, valid_until_ms));
                } else if let RuleUpdate::AliasEpoch { epoch, aliases, .. } = u {
                    prop_assert_eq!(epochs.get(&epoch), Some(&aliases));
                }
            }
            prop_assert_eq!(&switch, &from_snap);
            // IPv6 leases carry an alias of their SID that still routes.
            for (l, _) in a.leases() {
                if let IpAddr::V6(v6) = l.ip {
                    let alias = a.v6_pool().unwrap().alias_of(v6);
                    prop_assert_eq!(a.aliases().unwrap().lookup(alias), Some(l.sid));
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Uniformity: chi-square tests over many draws. The same test must reject a sequential allocator.

/// Something that hands out indices in `[0, n)`.
trait Picker {
    fn alloc(&mut self) -> Option<u32>;
    fn free(&mut self, i: u32);
}

/// The real pool over 10.0.0.0/24 (254 hosts: index = last octet - 1).
struct RealPool(V4Pool, Csprng);

impl Picker for RealPool {
    fn alloc(&mut self) -> Option<u32> {
        self.0
            .allocate(&mut self.1)
            .map(|a| u32::from(a.octets()[3]) - 1)
    }
    fn free(&mut self, i: u32) {
        assert!(self.0.release(Ipv4Addr::new(10, 0, 0, i as u8 + 1)));
    }
}

/// A next-fit sequential allocator (what a naive DHCP server does).
struct NextFit {
    used: Vec<bool>,
    cursor: usize,
}

impl Picker for NextFit {
    fn alloc(&mut self) -> Option<u32> {
        for _ in 0..self.used.len() {
            let i = self.cursor;
            self.cursor = (self.cursor + 1) % self.used.len();
            if !self.used[i] {
                self.used[i] = true;
                return Some(i as u32);
            }
        }
        None
    }
    fn free(&mut self, i: u32) {
        self.used[i as usize] = false;
    }
}

const N: u32 = 254;

/// Upper critical value of chi-square with `df` degrees of freedom at p ≈ 1e-6 (Wilson–Hilferty),
/// so a correct allocator fails by chance about once in a million runs.
fn chi2_critical(df: f64) -> f64 {
    let z = 4.75;
    let h = 2.0 / (9.0 * df);
    df * (1.0 - h + z * h.sqrt()).powi(3)
}

fn chi2(counts: &[u64]) -> f64 {
    let total: u64 = counts.iter().sum();
    let expected = total as f64 / counts.len() as f64;
    counts
        .iter()
        .map(|&c| (c as f64 - expected).powi(2) / expected)
        .sum()
}

/// Holds `held` addresses, then repeatedly allocates one address and frees it again. Checks
/// (1) frequency: every free address is picked equally often, and (2) serial: the distance between
/// consecutive picks (mod N) is uniform, so the next address cannot be predicted from the last.
/// Returns (frequency passes, serial passes).
fn uniformity(p: &mut dyn Picker, held: usize, draws: usize) -> (bool, bool) {
    let mut holding = Vec::new();
    for _ in 0..held {
        holding.push(p.alloc().unwrap());
    }
    let held_set: HashSet<u32> = holding.iter().copied().collect();
    let mut freq = vec![0u64; N as usize];
    let mut serial = vec![0u64; N as usize];
    let mut last: Option<u32> = None;
    for _ in 0..draws {
        let i = p.alloc().unwrap();
        assert!(!held_set.contains(&i), "collision with a held address");
        freq[i as usize] += 1;
        if let Some(l) = last {
            serial[((i + N - l) % N) as usize] += 1;
        }
        last = Some(i);
        p.free(i);
    }
    let free_counts: Vec<u64> = (0..N)
        .filter(|i| !held_set.contains(i))
        .map(|i| freq[i as usize])
        .collect();
    let freq_ok = chi2(&free_counts) < chi2_critical(free_counts.len() as f64 - 1.0);
    // Serial: with no held addresses every distance 0..N is equally likely.
    let serial_ok = held > 0 || chi2(&serial) < chi2_critical(N as f64 - 1.0);
    (freq_ok, serial_ok)
}

fn real() -> RealPool {
    RealPool(
        V4Pool::new(&["10.0.0.0/24".parse().unwrap()], &[]).unwrap(),
        Csprng::new().unwrap(),
    )
}

#[test]
fn chi_square_accepts_the_pool_with_an_empty_pool() {
    assert_eq!(uniformity(&mut real(), 0, 200_000), (true, true));
}

#[test]
fn chi_square_accepts_the_pool_in_sparse_mode() {
    let mut p = real();
    let r = uniformity(&mut p, 150, 100_000);
    assert!(!p.0.is_dense());
    assert!(r.0, "frequency test failed in sparse mode");
}

#[test]
fn chi_square_accepts_the_pool_in_dense_mode() {
    let mut p = real();
    let r = uniformity(&mut p, 240, 100_000);
    assert!(
        p.0.is_dense(),
        "240/254 in use must use the dense free list"
    );
    assert!(r.0, "frequency test failed in dense mode");
}

#[test]
fn chi_square_rejects_a_sequential_allocator() {
    let mut seq = NextFit {
        used: vec![false; N as usize],
        cursor: 0,
    };
    let (freq_ok, serial_ok) = uniformity(&mut seq, 0, 200_000);
    assert!(
        !(freq_ok && serial_ok),
        "the test cannot tell a sequential allocator from a random one"
    );
    assert!(
        !serial_ok,
        "next-fit is perfectly predictable: consecutive picks are 1 apart"
    );
}

#[test]
fn churn_at_99_percent_of_a_slash_8_hands_out_only_free_addresses() {
    // Fill a /8 to 99 % (the pool switches to its dense list) and churn there: every address
    // allocated is one not held, and every release succeeds. How fast that is (O(1) per
    // address) is `cargo run --release -p mimiq-allocator --example alloc_bench`'s figure, at
    // 50, 95 and 99 % utilisation.
    let mut rng = Csprng::new().unwrap();
    let mut pool = V4Pool::new(&["10.0.0.0/8".parse().unwrap()], &[]).unwrap();
    let target = pool.size() * 99 / 100;
    let mut held = Vec::with_capacity(target as usize);
    while (held.len() as u64) < target {
        held.push(pool.allocate(&mut rng).unwrap());
    }
    assert!(pool.is_dense());
    let mut in_use: std::collections::HashSet<_> = held.iter().copied().collect();
    assert_eq!(in_use.len(), held.len(), "no address handed out twice");
    for i in 0..200_000usize {
        let a = pool.allocate(&mut rng).unwrap();
        assert!(in_use.insert(a), "{a:?} handed out while held");
        let j = i * 7919 % held.len();
        let old = std::mem::replace(&mut held[j], a);
        assert!(in_use.remove(&old));
        assert!(pool.release(old));
    }
}
