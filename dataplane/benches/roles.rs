//! Cost per packet of the MIMIQ switch roles on in-memory frames, bursts of 64 (switch roles
//! issue; figures in docs/PERFORMANCE.md, "Switch roles").
//!
//! - `edge_down_v6_alias`: IPv6 destination → alias (64k aliases valid) → SID, encapsulation.
//! - `edge_down_v4_exact_1m`: IPv4 destination → exact table of 1,000,000 bindings → SID,
//!   encapsulation.
//! - `access_down`: decapsulation, binding lookup (1M bindings), L2 rewrite.
//! - `access_up`: anti-spoofing (source MAC and IP against 1M bindings), MAC rewrite, TTL.
//! - `l2fwd`: the trivial stage over the same frames, the baseline in the same run.
//! - `apply_update`: one `BindingAdd` applied to the 1M-binding tables (what 100,000 updates per
//!   second cost a worker: 100,000 × this).
//!
//! Frames are rebuilt (and freed) outside the timed region (`iter_batched_ref`): encapsulation
//! changes them. Each iteration takes the next of 1,024 bursts whose destinations are drawn
//! uniformly over the whole table, so the lookups are the cache misses a real mix makes; its
//! frames are written just before it is timed (`BatchSize::PerIteration`), as the kernel's
//! copy into the UMEM leaves received frames in the cache (a batch of many bursts set up at
//! once would time misses on the frames themselves instead).
//! Run: `cargo bench -p mimiq-dataplane --bench roles`

use std::net::IpAddr;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use mimiq_allocator::lease::{RuleUpdate, Sequenced};
use mimiq_allocator::Mac;
use mimiq_dataplane::pipeline::l2fwd::L2Fwd;
use mimiq_dataplane::pipeline::Pipeline;

#[path = "support/roles.rs"]
mod roles_support;

use roles_support::*;

fn roles(c: &mut Criterion) {
    let rules = rules();
    let mut e = edge(&rules);
    let mut a = access(&rules);
    let work = workloads(&mut e);
    let baseline = work[1].2.clone();
    // Each iteration takes the next of the workload's bursts (destinations uniform over the
    // table), so lookups meet the caches as a real mix of clients would.
    let next = |input: &[Vec<Vec<u8>>], n: &mut usize| {
        *n += 1;
        frames(&input[*n % input.len()])
    };

    let mut g = c.benchmark_group("roles");
    g.throughput(Throughput::Elements(BURST as u64));
    let mut n = 0;
    g.bench_function("l2fwd", |b| {
        b.iter_batched_ref(
            || next(&baseline, &mut n),
            |f| run(&mut L2Fwd, 0, f),
            BatchSize::PerIteration,
        )
    });
    for (name, port, input) in &work {
        if name.starts_with("edge") {
            g.bench_function(*name, |b| {
                b.iter_batched_ref(
                    || next(input, &mut n),
                    |f| run(&mut e, *port, f),
                    BatchSize::PerIteration,
                )
            });
        } else {
            g.bench_function(*name, |b| {
                b.iter_batched_ref(
                    || next(input, &mut n),
                    |f| run(&mut a, *port, f),
                    BatchSize::PerIteration,
                )
            });
        }
    }
    g.finish();

    let mut g = c.benchmark_group("updates");
    g.throughput(Throughput::Elements(1));
    let mut seq = 1u64;
    let mut i = 0u32;
    g.bench_function("apply_update_1m_table", |b| {
        b.iter(|| {
            seq += 1;
            i = (i + 7919) % BINDINGS;
            a.apply(
                Sequenced {
                    seq,
                    update: RuleUpdate::BindingAdd {
                        ip: IpAddr::V4(v4(i)),
                        mac: Mac(CLIENT),
                        sid: SID,
                        port: 0,
                        valid_until_ms: u64::MAX,
                    },
                }
                .into(),
            );
        })
    });
    g.finish();
}

criterion_group!(benches, roles);
criterion_main!(benches);
