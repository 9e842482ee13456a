//! A small deterministic driver for counting instructions per packet with callgrind.
//!
//! Rewrites `N` packets (bursts of 64 Ethernet/IPv4/UDP frames of 64 bytes: parse, MAC
//! rewrite, TTL decrement with checksum update) with one of the variants of
//! `benches/support/rewrite.rs`, and prints how many were rewritten. All the per-packet work
//! happens inside `rewrite_burst` (`#[inline(never)]`), so callgrind can count exactly it:
//!
//! ```text
//! cargo build --profile bench -p mimiq-dataplane --example rewrite_callgrind
//! valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.fast \
//!     --toggle-collect='*rewrite_burst*' \
//!     target/release/examples/rewrite_callgrind fast 1000000
//! callgrind_annotate /tmp/cg.fast | head   # "PROGRAM TOTALS" Ir / N = instructions per packet
//! ```
//!
//! Variants: `fast` (wire views, RFC 1624 incremental checksum), `full` (same views, full
//! header checksum recompute), `etherparse` (etherparse slicing + recompute); and through the
//! whole `engine::Worker` over two `MemPort`s: `worker-l2fwd` and `worker-rewrite` (the `fast`
//! rewrite as a pipeline), counted with `--toggle-collect='*worker_burst*'`; and `ipip`, an
//! outer IPv6 header written into each frame's headroom and taken off again, counted with
//! `--toggle-collect='*ipip_burst*'`.

use std::process::ExitCode;

use mimiq_dataplane::engine::Worker;
use mimiq_dataplane::pipeline::l2fwd::L2Fwd;
use mimiq_dataplane::pipeline::Pipeline;
use mimiq_dataplane::port::mem::{MemFrame, MemMemory, MemPort};
use mimiq_dataplane::port::FrameMemory;

#[path = "../benches/support/rewrite.rs"]
mod rewrite;

use rewrite::{RewritePipeline, Variant, BURST, BURSTS_PER_TTL_RESET, NEXT_HOP};

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let variant = match args.next().as_deref() {
        Some("fast") | None => Variant::Fast,
        Some("full") => Variant::FullChecksum,
        Some("etherparse") => Variant::Etherparse,
        Some("worker-l2fwd") => return through_worker(L2Fwd, packets(args.next())),
        Some("worker-rewrite") => {
            return through_worker(RewritePipeline { next_hop: NEXT_HOP }, packets(args.next()))
        }
        Some("ipip") => return ipip(packets(args.next())),
        Some(other) => {
            eprintln!("unknown variant {other:?}: use fast, full, etherparse, worker-l2fwd, worker-rewrite or ipip");
            return ExitCode::FAILURE;
        }
    };
    let packets = packets(args.next());
    let bursts = packets.div_ceil(BURST);
    let mut frames = rewrite::frames();
    let mut rewritten = 0usize;
    for i in 0..bursts {
        if i > 0 && i % BURSTS_PER_TTL_RESET == 0 {
            frames.iter_mut().for_each(|f| rewrite::reset_ttl(f));
        }
        rewritten += rewrite::rewrite_burst(std::hint::black_box(&mut frames[..]), variant);
    }
    println!("{variant:?}: rewrote {rewritten} packets in {bursts} bursts of {BURST}");
    if rewritten == bursts * BURST {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// The packet count argument (default 1,000,000); exits on a bad one.
fn packets(arg: Option<String>) -> usize {
    match arg.map(|n| n.parse()) {
        None => 1_000_000,
        Some(Ok(n)) => n,
        Some(Err(e)) => {
            eprintln!("packet count: {e}");
            std::process::exit(2);
        }
    }
}

/// Runs `packets` packets through `engine::Worker` over two `MemPort`s with `pipeline`.
fn through_worker<L: Pipeline>(pipeline: L, packets: usize) -> ExitCode {
    let ports = vec![MemPort::new("a", 1 << 16), MemPort::new("b", 1 << 16)];
    let mut worker = Worker::new(ports, MemMemory, Vec::new(), pipeline);
    let mut burst: Vec<MemFrame> = rewrite::frames()
        .iter()
        .map(|f| MemFrame::from_bytes(f))
        .collect();
    let bursts = packets.div_ceil(BURST);
    let mut forwarded = 0;
    for i in 0..bursts {
        if i > 0 && i % BURSTS_PER_TTL_RESET == 0 {
            for frame in burst.iter_mut() {
                rewrite::reset_ttl(MemMemory.data_mut(frame));
            }
        }
        burst = worker_burst(&mut worker, burst);
        forwarded += burst.len();
    }
    println!("worker: forwarded {forwarded} packets in {bursts} bursts of {BURST}");
    if forwarded == bursts * BURST {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// One burst through the worker: inject on port 0, `poll_once`, take what port 1 sent. What
/// callgrind counts with `--toggle-collect='*worker_burst*'`.
#[inline(never)]
fn worker_burst<L: Pipeline>(
    worker: &mut Worker<MemPort, L>,
    burst: Vec<MemFrame>,
) -> Vec<MemFrame> {
    for frame in burst {
        worker.ports_mut()[0].inject(frame);
    }
    std::hint::black_box(worker.poll_once());
    worker.ports_mut()[1].take_sent()
}

/// Headroom in front of each frame (as in a UMEM frame).
const HEADROOM: usize = 256;

/// Encapsulates every packet in an outer IPv6 header and decapsulates it again.
fn ipip(packets: usize) -> ExitCode {
    let stride = rewrite::UMEM_FRAME_BYTES;
    let mut umem = vec![0u8; BURST * stride];
    for (i, f) in rewrite::frames().iter().enumerate() {
        let at = i * stride + HEADROOM;
        umem[at..at + f.len()].copy_from_slice(f);
    }
    let bursts = packets.div_ceil(BURST);
    let mut done = 0;
    for _ in 0..bursts {
        done += ipip_burst(std::hint::black_box(&mut umem[..]));
    }
    println!("ipip: encapsulated and decapsulated {done} packets in {bursts} bursts of {BURST}");
    if done == bursts * BURST {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// One burst of encap + decap; returns how many round-tripped.
#[inline(never)]
fn ipip_burst(umem: &mut [u8]) -> usize {
    use mimiq_dataplane::wire::ipip::{decap_frame, encap_frame, Outer, Span};
    let outer = Outer::V6 {
        src: std::net::Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0xe),
        dst: std::net::Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0xa),
        hop_limit: 64,
    };
    let mut ok = 0;
    for i in 0..BURST {
        let start = i * rewrite::UMEM_FRAME_BYTES + HEADROOM;
        let span = Span {
            start,
            end: start + rewrite::FRAME_LEN,
        };
        let back = encap_frame(umem, span, &outer).and_then(|out| decap_frame(umem, out));
        ok += usize::from(back == Ok(span));
    }
    ok
}
