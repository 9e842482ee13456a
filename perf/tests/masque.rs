//! The MASQUE proxy and client between real kernel hosts: client — proxy — server in three
//! network namespaces (`mimiq_perf::masque`), real QUIC (quiche), real TUN devices, the kernel's
//! own ping and iperf3.

use std::net::UdpSocket;
use std::time::Duration;

use mimiq_perf::masque::{self, addr, start_client, stop_client, ProxyProc};
use mimiq_perf::testbed::{require_root, Testbed};
use mimiq_perf::traffic::{iperf3, iperf3_with, ping};

fn proxy_url() -> String {
    format!("{}:4433", addr::PROXY_V4)
}

#[test]
fn connect_ip_carries_ping_and_iperf3_tcp_and_udp_over_ipv4_and_ipv6() {
    if !require_root() {
        return;
    }
    let mut tb = Testbed::new().unwrap();
    masque::build(&mut tb).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let proxy = ProxyProc::start(&mut tb, "p", dir.path(), "0.0.0.0:4433", "").unwrap();

    // Without the tunnel the server is unreachable.
    assert!(ping(&tb, "c", addr::SERVER_V4, 1).is_err());

    let url = proxy_url();
    let (mut client, ready) = start_client(
        &mut tb,
        "c",
        &["ip", "--proxy", &url, "--bind", addr::CLIENT_V4[0], "--tun", "mq0"],
    )
    .unwrap();
    // One IPv4 and one IPv6 address from the pools (the first hosts after the ICMP source).
    assert!(ready.contains("198.18.200.2/32"), "{ready}");
    assert!(ready.contains("fd00:200::2/128"), "{ready}");

    ping(&tb, "c", addr::SERVER_V4, 20).unwrap_or_else(|e| panic!("{e}; {}", client.describe()));
    ping(&tb, "c", addr::SERVER_V6, 20).unwrap_or_else(|e| panic!("{e}; {}", client.describe()));

    let tcp = iperf3(&mut tb, "c", "s", addr::SERVER_V4, 3).unwrap();
    assert!(tcp.received_bytes > 5_000_000, "TCP over CONNECT-IP moved only {} bytes", tcp.received_bytes);
    let tcp6 = iperf3(&mut tb, "c", "s", addr::SERVER_V6, 2).unwrap();
    assert!(tcp6.received_bytes > 2_000_000, "TCP/IPv6 moved only {} bytes", tcp6.received_bytes);
    let udp = iperf3_with(&mut tb, "c", "s", addr::SERVER_V4, 2, &["-u", "-b", "20M", "-l", "1200"]).unwrap();
    assert!(udp.received_bytes > 2_000_000, "UDP over CONNECT-IP: {udp:?}");

    let s = proxy.stats_after_interval().unwrap();
    assert_eq!(s["sessions_ip"], 1, "{s}");
    assert!(s["tun_tx"].as_u64().unwrap() > 1000, "{s}");
    assert!(s["tun_rx"].as_u64().unwrap() > 1000, "{s}");
    assert_eq!(s["dgram_unknown_stream"], 0, "{s}");
    let c = stop_client(&mut client).unwrap();
    assert!(c["bytes_tx"].as_u64().unwrap() >= tcp.received_bytes, "{c}");
}

/// A UDP echo server on `host` at `bind`, answering until the testbed goes.
fn echo_server(tb: &Testbed, host: &str, bind: &'static str) {
    let ready = std::sync::Arc::new(std::sync::Barrier::new(2));
    let r = ready.clone();
    tb.spawn_in(host, move || {
        let s = UdpSocket::bind(bind).unwrap();
        r.wait();
        let mut buf = [0u8; 65536];
        while let Ok((n, from)) = s.recv_from(&mut buf) {
            let _ = s.send_to(&buf[..n], from);
        }
    })
    .unwrap();
    ready.wait();
}

/// Sends `count` numbered datagrams of `size` bytes to `to` from `host` and returns how many came
/// back intact.
fn udp_exchange(tb: &Testbed, host: &str, to: &'static str, count: u32, size: usize) -> u32 {
    tb.run_in(host, move || {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        let mut ok = 0;
        let mut buf = vec![0u8; 65536];
        for i in 0..count {
            let mut msg = vec![(i % 251) as u8; size];
            msg[..4].copy_from_slice(&i.to_be_bytes());
            s.send_to(&msg, to).unwrap();
            if let Ok((n, _)) = s.recv_from(&mut buf) {
                if buf[..n] == msg[..] {
                    ok += 1;
                }
            }
        }
        ok
    })
    .unwrap()
}

#[test]
fn connect_udp_exchanges_datagrams_with_a_target() {
    if !require_root() {
        return;
    }
    let mut tb = Testbed::new().unwrap();
    masque::build(&mut tb).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let proxy = ProxyProc::start(&mut tb, "p", dir.path(), "0.0.0.0:4433", "").unwrap();
    echo_server(&tb, "s", "198.18.20.2:7007");
    let url = proxy_url();
    let (mut client, _) = start_client(
        &mut tb,
        "c",
        &["udp", "--proxy", &url, "--target", "198.18.20.2:7007", "--listen", "127.0.0.1:6000"],
    )
    .unwrap();
    // Small and large payloads (1200 bytes fits one datagram).
    assert_eq!(udp_exchange(&tb, "c", "127.0.0.1:6000", 200, 64), 200);
    assert_eq!(udp_exchange(&tb, "c", "127.0.0.1:6000", 50, 1200), 50);
    let s = proxy.stats_after_interval().unwrap();
    assert_eq!(s["sessions_udp"], 1, "{s}");
    assert_eq!(s["udp_to_target"], 250, "{s}");
    assert_eq!(s["udp_to_client"], 250, "{s}");
    stop_client(&mut client).unwrap();
}
