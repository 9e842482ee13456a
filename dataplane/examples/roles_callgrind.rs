//! Instructions per packet of the MIMIQ switch roles, with callgrind (exact and repeatable on a
//! shared machine, where nanoseconds are not). Same tables and frames as `benches/roles.rs`
//! (1M IPv4 bindings, 65,535 aliases, 64-byte frames, bursts of 64 rotating through 1,024
//! bursts whose destinations are drawn uniformly over the table). Only `roles_burst` is
//! counted: building the tables and refilling the frames are not.
//!
//! ```text
//! cargo build --profile bench -p mimiq-dataplane --example roles_callgrind
//! valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.roles --toggle-collect='*roles_burst*' \
//!     target/release/examples/roles_callgrind access_down 2000
//! # "PROGRAM TOTALS" Ir / (2000 × 64) = instructions per packet
//! ```
//! Workloads: `edge_down_v6_alias`, `edge_down_v4_exact_1m`, `access_down`, `access_up`, and
//! `l2fwd` (the trivial stage over the same frames, the baseline).

use std::process::ExitCode;

use mimiq_dataplane::pipeline::l2fwd::L2Fwd;
use mimiq_dataplane::pipeline::{Pipeline, Verdict};
use mimiq_dataplane::port::mem::{MemFrame, MemMemory};

#[path = "../benches/support/roles.rs"]
mod roles_support;

use roles_support::*;

#[inline(never)]
fn roles_burst<P: Pipeline>(
    p: &mut P,
    port: u16,
    frames: &mut [MemFrame],
    verdicts: &mut Vec<Verdict>,
) -> usize {
    verdicts.clear();
    p.process(port, &mut MemMemory, frames, verdicts);
    verdicts.len()
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let name = args.next().unwrap_or_else(|| "access_down".into());
    let Ok(bursts) = args
        .next()
        .unwrap_or_else(|| "2000".into())
        .parse::<usize>()
    else {
        eprintln!("roles_callgrind: error: bursts must be a number");
        return ExitCode::from(2);
    };
    let rules = rules();
    let mut e = edge(&rules);
    let mut a = access(&rules);
    let work = workloads(&mut e);
    let (port, input, role) = match name.as_str() {
        "l2fwd" => (0, work[1].2.clone(), 'l'),
        other => match work.iter().find(|(n, _, _)| *n == other) {
            Some((n, port, input)) => (
                *port,
                input.clone(),
                if n.starts_with("edge") { 'e' } else { 'a' },
            ),
            None => {
                eprintln!("roles_callgrind: error: unknown workload {other:?}");
                return ExitCode::from(2);
            }
        },
    };
    let mut verdicts = Vec::with_capacity(BURST);
    let mut frames = frames(&input[0]);
    let mut handled = 0;
    for n in 0..bursts {
        // The next burst's packets (not counted), over the whole table.
        for (f, bytes) in frames.iter_mut().zip(&input[n % input.len()]) {
            *f = MemFrame::from_bytes(bytes);
        }
        handled += match role {
            'e' => roles_burst(&mut e, port, &mut frames, &mut verdicts),
            'a' => roles_burst(&mut a, port, &mut frames, &mut verdicts),
            _ => roles_burst(&mut L2Fwd, port, &mut frames, &mut verdicts),
        };
    }
    println!("{name}: {handled} packets in {bursts} bursts");
    ExitCode::SUCCESS
}
