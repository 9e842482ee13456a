//! `mimiq-perf bench masque` end to end with one second per throughput run: the captures find
//! the tunnel's framing, the MTU checks hold, and every path moves traffic. About 85 s (24
//! captured exchanges, 20 one-second runs, each bracketed by the proxy's 1-second stats file).

use mimiq_perf::experiments::masque::{compare, Params, Path, PeerRx, Traffic};
use mimiq_perf::testbed::require_root;

#[test]
fn masque_bench_measures_framing_mtu_and_throughput_for_both_tunnels() {
    require_root();
    // One congestion control keeps it short; the bench's default runs each bulk run twice.
    let params = Params {
        seconds: 1,
        congestion: vec!["cubic".into()],
        ..Params::default()
    };
    let (r, md) = compare(&params, &mut |_| {}).unwrap();
    // Every size in both directions was seen once inside and once outside per exchange, and the
    // smallest framing (no ACK riding along) fits the formula's worst case.
    assert_eq!(r.overhead.len(), 24, "{md}");
    for o in &r.overhead {
        assert_eq!(o.inner_packets, o.outer_packets, "{o:?}\n{md}");
        assert!(o.inner_packets >= 20, "{o:?}");
        assert!(
            o.framing_min_bytes > 0 && o.framing_min_bytes <= r.formula_overhead_bytes,
            "{o:?}"
        );
    }
    for m in &r.mtu {
        // Both clients report the largest packet they carry: one byte more is refused.
        assert!(m.at_mtu_ok && m.above_mtu_refused, "{m:?}");
    }
    for t in &r.throughput {
        assert!(t.payload_bytes > 0, "{t:?}");
        // iperf3 ran TCP with the congestion control asked for, and reported it.
        if t.traffic == Traffic::TcpBulk {
            assert_eq!(t.tcp_congestion.as_deref(), Some("cubic"), "{t:?}");
        }
        if t.path != Path::KernelForwarding {
            assert!(t.proxy_cpu_s_per_gb.is_some_and(|c| c > 0.0), "{t:?}");
            // Every run moved QUIC datagrams through the proxy's loop.
            assert!(t.proxy_quic_rx_per_pass.is_some_and(|x| x > 0.0), "{t:?}");
            assert!(t.proxy_quic_tx_per_pass.is_some_and(|x| x > 0.0), "{t:?}");
            // Under threaded NAPI the host's CPU is set against the kernel's in the paired run.
            let threaded = t.peer_rx == PeerRx::ThreadedNapi;
            assert_eq!(t.host_cpu_ratio_to_kernel.is_some(), threaded, "{t:?}");
        }
    }
}
