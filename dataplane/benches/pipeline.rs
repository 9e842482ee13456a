//! Pipeline cost per packet, over bursts of 64 frames (issue 3; figures in
//! docs/PERFORMANCE.md, "Wire and pipeline cost").
//!
//! Groups (every iteration is one burst of 64 frames; ns/packet = time / 64):
//!
//! - `l2fwd`: `worker_memport` is a full `engine::Worker::poll_once` over two `MemPort`s with
//!   the `L2Fwd` pipeline, including injecting the burst and taking it back from the output
//!   port (the in-memory port's own cost: a VecDeque push per frame and a fresh `Vec` per
//!   `take_sent`); `stage_only` is `L2Fwd::process` alone over the burst.
//! - `rewrite`: parse Ethernet + IPv4, MAC rewrite, TTL decrement with the checksum updated.
//!   `fast` is the wire views with the RFC 1624 incremental update; the naive baselines in the
//!   same run are `full_checksum` (same views, header checksum recomputed) and `etherparse`
//!   (classification with etherparse's `SlicedPacket`, checksum recomputed by etherparse).
//!   `worker_memport` runs `fast` as a pipeline inside the worker, as `l2fwd/worker_memport`;
//!   `fast_stride_2048` / `fast_stride_2112` run `fast` over frames laid out as in a UMEM
//!   (2048 bytes apart) and 64 bytes off that, to show what the frame layout costs.
//!
//! - `ipip`: `headroom_encap_v6_then_decap/{64,1514}` writes an outer IPv6 header into the
//!   headroom of each frame (moving only its Ethernet header) and takes it off again, per
//!   packet, over UMEM-like 2048-byte frames with 256 bytes of headroom; the baseline
//!   `move_packet_encap_v6_then_decap/{64,1514}` moves the whole inner packet 40 bytes right
//!   and back instead (what a pipeline does while it cannot move a frame's start).
//!
//! The rewrite decrements the TTL of the same frames burst after burst, so the TTL is reset
//! every `BURSTS_PER_TTL_RESET` bursts, outside the timed region (`iter_custom`).
//!
//! Run: `cargo bench -p mimiq-dataplane --bench pipeline` (add `-- --quick` for a fast look).

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mimiq_dataplane::engine::Worker;
use mimiq_dataplane::pipeline::l2fwd::L2Fwd;
use mimiq_dataplane::pipeline::{Pipeline, Verdict};
use mimiq_dataplane::port::mem::{MemFrame, MemMemory, MemPort};
use mimiq_dataplane::port::FrameMemory;

#[path = "support/rewrite.rs"]
mod rewrite;

use rewrite::{RewritePipeline, Variant, BURST, BURSTS_PER_TTL_RESET, NEXT_HOP};

/// A TX ring larger than anything a bench leaves in it.
const TX_RING: usize = 1 << 16;

fn mem_frames() -> Vec<MemFrame> {
    rewrite::frames()
        .iter()
        .map(|f| MemFrame::from_bytes(f))
        .collect()
}

fn l2fwd(c: &mut Criterion) {
    let mut group = c.benchmark_group("l2fwd");
    group.throughput(Throughput::Elements(BURST as u64));

    group.bench_function("worker_memport", |b| {
        let ports = vec![MemPort::new("a", TX_RING), MemPort::new("b", TX_RING)];
        let mut worker = Worker::new(ports, MemMemory, Vec::new(), L2Fwd);
        let mut burst = mem_frames();
        b.iter(|| {
            for frame in burst.drain(..) {
                worker.ports_mut()[0].inject(frame);
            }
            black_box(worker.poll_once());
            burst = worker.ports_mut()[1].take_sent();
        });
        assert_eq!(burst.len(), BURST, "every frame forwarded");
    });

    group.bench_function("stage_only", |b| {
        let mut frames = mem_frames();
        let mut memory = MemMemory;
        let mut verdicts = Vec::with_capacity(BURST);
        let mut stage = L2Fwd;
        b.iter(|| {
            verdicts.clear();
            stage.process(0, &mut memory, black_box(&mut frames[..]), &mut verdicts);
            black_box(&verdicts);
        });
        assert!(verdicts.iter().all(|v| *v == Verdict::Forward(1)));
    });
    group.finish();
}

/// Runs `burst` `iters` times, timing only the bursts, resetting TTLs with `reset` between
/// groups of `BURSTS_PER_TTL_RESET`.
fn timed_bursts(iters: u64, mut burst: impl FnMut(), mut reset: impl FnMut()) -> Duration {
    let mut total = Duration::ZERO;
    let mut left = iters;
    while left > 0 {
        let n = left.min(BURSTS_PER_TTL_RESET as u64);
        let start = Instant::now();
        for _ in 0..n {
            burst();
        }
        total += start.elapsed();
        reset();
        left -= n;
    }
    total
}

fn rewrite_group(c: &mut Criterion) {
    rewrite::assert_variants_agree();
    let mut group = c.benchmark_group("rewrite");
    group.throughput(Throughput::Elements(BURST as u64));

    for (name, variant) in [
        ("fast", Variant::Fast),
        ("full_checksum", Variant::FullChecksum),
        ("etherparse", Variant::Etherparse),
    ] {
        group.bench_function(name, |b| {
            let frames = std::cell::RefCell::new(rewrite::frames());
            b.iter_custom(|iters| {
                timed_bursts(
                    iters,
                    || {
                        let n = rewrite::rewrite_burst(
                            black_box(&mut frames.borrow_mut()[..]),
                            variant,
                        );
                        debug_assert_eq!(n, BURST);
                        black_box(n);
                    },
                    || {
                        frames
                            .borrow_mut()
                            .iter_mut()
                            .for_each(|f| rewrite::reset_ttl(f))
                    },
                )
            });
        });
    }

    // The same fast rewrite with the frames 2048 bytes apart (a UMEM's, and MemPort's, frame
    // size), and 2048 + 64 apart: the first maps every frame's header onto the same few L1
    // cache sets.
    for (name, stride) in [
        ("fast_stride_2048", rewrite::UMEM_FRAME_BYTES),
        ("fast_stride_2112", rewrite::UMEM_FRAME_BYTES + 64),
    ] {
        group.bench_function(name, |b| {
            let umem = std::cell::RefCell::new(rewrite::strided_frames(stride));
            b.iter_custom(|iters| {
                timed_bursts(
                    iters,
                    || {
                        let n = rewrite::rewrite_burst_strided(
                            black_box(&mut umem.borrow_mut()[..]),
                            stride,
                        );
                        debug_assert_eq!(n, BURST);
                        black_box(n);
                    },
                    || {
                        umem.borrow_mut()
                            .chunks_mut(stride)
                            .for_each(|f| rewrite::reset_ttl(&mut f[..rewrite::FRAME_LEN]))
                    },
                )
            });
        });
    }

    group.bench_function("worker_memport", |b| {
        let ports = vec![MemPort::new("a", TX_RING), MemPort::new("b", TX_RING)];
        let worker = Worker::new(
            ports,
            MemMemory,
            Vec::new(),
            RewritePipeline { next_hop: NEXT_HOP },
        );
        let state = std::cell::RefCell::new((worker, mem_frames()));
        b.iter_custom(|iters| {
            timed_bursts(
                iters,
                || {
                    let (worker, burst) = &mut *state.borrow_mut();
                    for frame in burst.drain(..) {
                        worker.ports_mut()[0].inject(frame);
                    }
                    black_box(worker.poll_once());
                    *burst = worker.ports_mut()[1].take_sent();
                },
                || {
                    let (_, burst) = &mut *state.borrow_mut();
                    for frame in burst.iter_mut() {
                        rewrite::reset_ttl(MemMemory.data_mut(frame));
                    }
                },
            )
        });
        assert_eq!(
            state.borrow().1.len(),
            BURST,
            "every frame forwarded, none to the slow path"
        );
    });
    group.finish();
}

/// Headroom in front of each frame, as an AF_XDP UMEM frame leaves for encapsulation.
const HEADROOM: usize = 256;

fn ipip_group(c: &mut Criterion) {
    use mimiq_dataplane::wire::ipip::{decap_frame, encap_frame, Outer, Span};
    let mut group = c.benchmark_group("ipip");
    group.throughput(Throughput::Elements(BURST as u64));
    let outer = Outer::V6 {
        src: "fd00::e".parse().expect("address"),
        dst: "fd00::a".parse().expect("address"),
        hop_limit: 64,
    };
    let stride = rewrite::UMEM_FRAME_BYTES;
    for len in [64usize, 1514] {
        // Frames `stride` apart, each behind `HEADROOM` bytes, as in a UMEM.
        let mut umem = vec![0u8; BURST * stride];
        let frames = rewrite::frames_of_len(len);
        for (i, f) in frames.iter().enumerate() {
            let at = i * stride + HEADROOM;
            umem[at..at + len].copy_from_slice(f);
        }
        let check = |umem: &[u8]| {
            for (i, f) in frames.iter().enumerate() {
                let at = i * stride + HEADROOM;
                assert_eq!(&umem[at..at + len], &f[..], "frame {i} restored");
            }
        };

        group.bench_function(format!("headroom_encap_v6_then_decap/{len}"), |b| {
            b.iter(|| {
                for i in 0..BURST {
                    let start = i * stride + HEADROOM;
                    let span = Span {
                        start,
                        end: start + len,
                    };
                    let encapped = encap_frame(black_box(&mut umem[..]), span, &outer);
                    let back = encapped.and_then(|out| decap_frame(&mut umem[..], out));
                    debug_assert_eq!(back, Ok(span));
                    let _ = black_box(back);
                }
            });
            check(&umem);
        });

        group.bench_function(format!("move_packet_encap_v6_then_decap/{len}"), |b| {
            b.iter(|| {
                for i in 0..BURST {
                    let start = i * stride + HEADROOM;
                    let end = rewrite::encap_by_moving_packet(
                        black_box(&mut umem[..]),
                        start,
                        start + len,
                        &outer,
                    );
                    let back = end
                        .and_then(|end| rewrite::decap_by_moving_packet(&mut umem[..], start, end));
                    debug_assert_eq!(back, Ok(start + len));
                    let _ = black_box(back);
                }
            });
            check(&umem);
        });
    }
    group.finish();
}

fn config() -> Criterion {
    // Short runs: the machine has 2 cores shared with other builds.
    Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
}

criterion_group! {
    name = benches;
    config = config();
    targets = l2fwd, rewrite_group, ipip_group
}
criterion_main!(benches);
