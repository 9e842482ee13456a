//! Allocator throughput figures for docs/PERFORMANCE.md (issue 5's benchmark list), each beside a
//! naive baseline measured in the same run.
//!
//! ```text
//! cargo run --release -p mimiq-allocator --example alloc_bench            # full run
//! cargo run --release -p mimiq-allocator --example alloc_bench -- quick   # smaller, for CI
//! cargo run --release -p mimiq-allocator --example alloc_bench -- mem     # section 1 only
//! ```
//!
//! 1. In-memory allocations per second, one thread, through `Allocator::allocate` (lease table,
//!    timers, journal ops and rule updates included), /8 IPv4 and /64 IPv6 pools at 50 % and 95 %
//!    utilisation. Baseline: the same pool picking by rejection sampling alone (no dense list).
//! 2. Durable allocations per second on the redb store with group commit (one fsync'd
//!    transaction per batch of 256 requests), and the same with one commit per request.
//! 3. Restart time with 1,000,000 live leases: open + load + rebuild.
use std::time::Instant;

use mimalloc::MiMalloc;

use mimiq_allocator::lease::{AllocParams, Allocator, Config, V4Config, V6Config};
use mimiq_allocator::pool::V4Pool;
use mimiq_allocator::rng::Csprng;
use mimiq_allocator::store::{RedbStore, Store};
use mimiq_allocator::{Family, Mac};

// As in the mimiq-allocator binary.
#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

fn config(v4: &str) -> Config {
    Config {
        t_ip_min_ms: 3_600_000,
        t_ip_max_ms: 7_200_000,
        t_remove_ms: 30_000,
        max_per_request: 16,
        max_live_per_client: u32::MAX,
        rate_per_s: u32::MAX,
        rate_burst: u32::MAX / 1000,
        max_live_per_port: u32::MAX,
        new_macs_per_port_per_s: u32::MAX / 1000,
        new_macs_per_port_burst: u32::MAX / 1000,
        reclaim_silent_after_ms: 0,
        sids: vec![1, 2, 3, 4],
        ipv4: Some(V4Config {
            prefixes: vec![v4.parse().unwrap()],
            reserved: vec![],
        }),
        ipv6: Some(V6Config {
            prefix: "2001:db8::/64".parse().unwrap(),
            alias_bits: 16,
            aliases_per_sid: 4,
            k: 4,
            t_sid_ms: 3_600_000,
        }),
    }
}

/// Client of request `i`: 16 consecutive requests per client.
fn mac(i: u64) -> Mac {
    let b = (i / 16).to_be_bytes();
    Mac([2, b[3], b[4], b[5], b[6], b[7]])
}

/// Allocates `n` single addresses; returns allocations per second.
fn churn(a: &mut Allocator, family: Family, n: u64, start: u64) -> f64 {
    let t = Instant::now();
    for i in 0..n {
        let p = AllocParams {
            mac: mac(start + i),
            sid: 1 + (i % 4) as u16,
            port: 1,
            family,
            count: 1,
        };
        a.allocate(1_000, p).expect("allocation");
        if i % 1024 == 0 {
            a.take_journal();
            a.take_updates();
        }
    }
    a.take_journal();
    a.take_updates();
    n as f64 / t.elapsed().as_secs_f64()
}

fn fill(a: &mut Allocator, family: Family, n: u64) {
    let mut i = 0;
    while i < n {
        let count = 16.min(n - i) as u32;
        a.allocate(
            1_000,
            AllocParams {
                mac: mac(i),
                sid: 1,
                port: 1,
                family,
                count,
            },
        )
        .expect("fill");
        i += u64::from(count);
        if i % (1 << 16) < 16 {
            a.take_journal();
            a.take_updates();
        }
    }
    a.take_journal();
    a.take_updates();
}

/// Naive baseline: rejection sampling only, on a plain bitmap.
fn rejection_only(size: u64, used_frac: f64, n: u64) -> f64 {
    let mut rng = Csprng::new().unwrap();
    let mut used = vec![0u64; size.div_ceil(64) as usize];
    let mut count = 0u64;
    let target = (size as f64 * used_frac) as u64;
    let take = |used: &mut Vec<u64>, rng: &mut Csprng| loop {
        let i = rng.below(size);
        if used[(i / 64) as usize] & (1 << (i % 64)) == 0 {
            used[(i / 64) as usize] |= 1 << (i % 64);
            break;
        }
    };
    while count < target {
        take(&mut used, &mut rng);
        count += 1;
    }
    let t = Instant::now();
    for _ in 0..n {
        take(&mut used, &mut rng);
    }
    n as f64 / t.elapsed().as_secs_f64()
}

fn pool_only(size_prefix: &str, used_frac: f64, n: u64) -> f64 {
    let mut rng = Csprng::new().unwrap();
    let mut pool = V4Pool::new(&[size_prefix.parse().unwrap()], &[]).unwrap();
    let target = (pool.size() as f64 * used_frac) as u64;
    for _ in 0..target {
        pool.allocate(&mut rng).unwrap();
    }
    let t = Instant::now();
    for _ in 0..n {
        pool.allocate(&mut rng).unwrap();
    }
    n as f64 / t.elapsed().as_secs_f64()
}

fn main() {
    let quick = std::env::args().any(|a| a == "quick");
    // `mem`: only the in-memory table (for profiling).
    let mem_only = std::env::args().any(|a| a == "mem");
    let (v4_prefix, n) = if quick {
        ("10.0.0.0/16", 5_000u64)
    } else {
        ("10.0.0.0/8", 500_000u64)
    };
    println!(
        "# mimiq-allocator benchmarks ({})",
        if quick { "quick" } else { "full" }
    );
    println!();
    println!(
        "## 1. In-memory allocations/s, one thread (Allocator::allocate, 1 address per request)"
    );
    println!();
    println!("| pool | utilisation | allocator (allocs/s) | pool only (allocs/s) | naive rejection sampling (allocs/s) |");
    println!("|---|---|---|---|---|");
    for util in [0.50, 0.95, 0.99] {
        let mut a = Allocator::new(config(v4_prefix)).unwrap();
        let size = a.v4_pool().unwrap().capacity();
        let target = (size as f64 * util) as u64;
        fill(&mut a, Family::V4, target);
        let n = n.min(size - target - 1);
        let rate = churn(&mut a, Family::V4, n, 1 << 32);
        let pool = pool_only(v4_prefix, util, n);
        let naive = rejection_only(size, util, n / 2);
        println!(
            "| IPv4 {v4_prefix} | {:.0} % | {rate:.0} | {pool:.0} | {naive:.0} |",
            util * 100.0
        );
    }
    {
        let util_leases = if quick { 10_000u64 } else { 1_000_000 };
        let mut a = Allocator::new(config(v4_prefix)).unwrap();
        fill(&mut a, Family::V6, util_leases);
        let rate = churn(&mut a, Family::V6, n, 1 << 32);
        println!("| IPv6 /64 (48 random bits) | {util_leases} live leases | {rate:.0} | – | – |");
    }
    if mem_only {
        return;
    }
    println!();
    println!("## 2. Durable allocations/s (redb, fsync per commit)");
    println!();
    let dir = tempfile::tempdir().unwrap();
    for batch in [1024usize, 256, 1] {
        let path = dir.path().join(format!("bench-{batch}.redb"));
        let mut store = RedbStore::open(&path).unwrap();
        let mut a = Allocator::new(config(v4_prefix)).unwrap();
        a.take_journal();
        let total = if batch == 1 {
            n.min(2_000)
        } else {
            n.min(200_000)
        };
        let t = Instant::now();
        let mut i = 0u64;
        while i < total {
            for _ in 0..batch {
                a.allocate(
                    1_000,
                    AllocParams {
                        mac: mac(i),
                        sid: 1,
                        port: 1,
                        family: Family::V4,
                        count: 1,
                    },
                )
                .unwrap();
                i += 1;
            }
            store.commit(&a.take_journal()).unwrap();
            a.take_updates();
        }
        let rate = total as f64 / t.elapsed().as_secs_f64();
        println!("- batch of {batch} requests per commit: {rate:.0} durable allocations/s ({total} allocations)");
    }
    println!();
    println!("## 3. Restart with live leases (open + load + rebuild)");
    println!();
    let leases = if quick { 20_000u64 } else { 1_000_000 };
    let path = dir.path().join("restart.redb");
    {
        let mut store = RedbStore::open(&path).unwrap();
        let mut a = Allocator::new(config(v4_prefix)).unwrap();
        let mut i = 0;
        while i < leases {
            let count = 16.min(leases - i) as u32;
            a.allocate(
                1_000,
                AllocParams {
                    mac: mac(i),
                    sid: 1,
                    port: 1,
                    family: Family::V4,
                    count,
                },
            )
            .unwrap();
            i += u64::from(count);
            if i % 65_536 < 16 || i >= leases {
                store.commit(&a.take_journal()).unwrap();
                a.take_updates();
            }
        }
    }
    let t = Instant::now();
    let mut store = RedbStore::open(&path).unwrap();
    let loaded = store.load().unwrap();
    let t_load = t.elapsed();
    let a = Allocator::restore(config(v4_prefix), loaded, 2_000).unwrap();
    let total = t.elapsed();
    assert_eq!(a.lease_count() as u64, leases);
    println!(
        "- {leases} leases: {:.2} s total ({:.2} s open+load, {:.2} s rebuild)",
        total.as_secs_f64(),
        t_load.as_secs_f64(),
        (total - t_load).as_secs_f64()
    );
}
