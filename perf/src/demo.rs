//! The main job, as far as the project has come: two kernel hosts whose only link is
//! `mimiq-switch` on AF_XDP, real ping and TCP across it with live counters, a summary, and a
//! clean teardown. It grows into the full MIMIQ demo (clients hopping addresses through the
//! access and edge switches to a MASQUE proxy).

use crate::experiments::l2fwd::{self, Forwarder};
use crate::testbed::topology::addr;

/// Runs the demo with `seconds` of TCP traffic; prints as it goes.
pub fn run(seconds: u32) -> Result<(), String> {
    println!("mimiq demo");
    println!(
        "  h1 ({}, {}) ── p0 [mimiq-switch l2fwd, AF_XDP] p1 ── h2 ({}, {})",
        addr::H1_V4,
        addr::H1_V6,
        addr::H2_V4,
        addr::H2_V6
    );
    println!("  each host is a network namespace with the kernel's own stack; the switch is the only path");
    println!("  ping (IPv4 50, IPv6 5), then iperf3 TCP h1 → h2 for {seconds} s:");
    let r = l2fwd::run(Forwarder::MimiqSwitch, seconds, &mut |line| println!("{line}"))?;
    println!("summary");
    println!("  ping RTT mean            {:.0} µs", r.rtt_mean_us);
    println!("  TCP throughput           {:.2} Gbit/s ({} retransmits)", r.tcp_gbps, r.retransmits);
    if let (Some(p), Some(ns)) = (r.switch_packets, r.switch_cpu_ns_per_packet) {
        println!("  frames forwarded         {p}");
        println!("  switch CPU per frame     {ns:.0} ns (getrusage of the switch process)");
    }
    println!("  testbed torn down; `mimiq-perf bench l2fwd` compares with the kernel bridge");
    Ok(())
}
