//! The MASQUE proxy and client between real kernel hosts: client — proxy — server in three
//! network namespaces (`mimiq_perf::masque`), real QUIC (quiche), real TUN devices, the kernel's
//! own ping and iperf3.

use std::time::Duration;

use mimiq_perf::masque::{
    self, addr, echo_server, start_client, start_ip_client, stop_client, udp_client, udp_exchange,
    ProxyProc,
};
use mimiq_perf::testbed::{require_root, Testbed};
use mimiq_perf::traffic::{iperf3, iperf3_with, ping};
use mimiq_testkit::eventually;

fn proxy_url() -> String {
    format!("{}:4433", addr::PROXY_V4)
}

#[test]
fn connect_ip_carries_ping_and_iperf3_tcp_and_udp_over_ipv4_and_ipv6() {
    require_root();
    let (tb, _dir, proxy) = masque::with_proxy("").unwrap();

    // Without the tunnel the server is unreachable.
    assert!(ping(&tb, "c", addr::SERVER_V4, 1).is_err());

    let (mut client, ready) = start_ip_client(&tb).unwrap();
    // One IPv4 and one IPv6 address from the pools (the first hosts after the ICMP source).
    assert!(ready.contains("198.18.200.2/32"), "{ready}");
    assert!(ready.contains("fd00:200::2/128"), "{ready}");

    ping(&tb, "c", addr::SERVER_V4, 20).unwrap_or_else(|e| panic!("{e}; {}", client.describe()));
    ping(&tb, "c", addr::SERVER_V6, 20).unwrap_or_else(|e| panic!("{e}; {}", client.describe()));

    let tcp = iperf3(&tb, "c", "s", addr::SERVER_V4, 3).unwrap();
    // How fast is `mimiq-perf bench masque`'s to say; here, that bytes crossed.
    assert!(tcp.received_bytes > 0, "TCP over CONNECT-IP: {tcp:?}");
    let tcp6 = iperf3(&tb, "c", "s", addr::SERVER_V6, 2).unwrap();
    assert!(
        tcp6.received_bytes > 0,
        "TCP/IPv6 over CONNECT-IP: {tcp6:?}"
    );
    let udp = iperf3_with(
        &tb,
        "c",
        "s",
        addr::SERVER_V4,
        2,
        &["-u", "-b", "20M", "-l", "1200"],
    )
    .unwrap();
    assert!(udp.received_bytes > 0, "UDP over CONNECT-IP: {udp:?}");

    let s = proxy.fresh_stats().unwrap();
    assert_eq!(s["sessions_ip"], 1, "{s}");
    assert!(s["tun_tx"].as_u64().unwrap() > 1000, "{s}");
    assert!(s["tun_rx"].as_u64().unwrap() > 1000, "{s}");
    assert_eq!(s["dgram_unknown_stream"], 0, "{s}");
    let c = stop_client(&mut client).unwrap();
    assert!(c["bytes_tx"].as_u64().unwrap() >= tcp.received_bytes, "{c}");
}

#[test]
fn connect_udp_exchanges_datagrams_with_a_target() {
    require_root();
    let (tb, _dir, proxy) = masque::with_proxy("").unwrap();
    echo_server(&tb, "s", "198.18.20.2:7007".parse().unwrap()).unwrap();
    let url = proxy_url();
    let (mut client, _) = start_client(
        &tb,
        "c",
        &[
            "udp",
            "--proxy",
            &url,
            "--target",
            "198.18.20.2:7007",
            "--listen",
            "127.0.0.1:6000",
        ],
    )
    .unwrap();
    // Small and large payloads (1200 bytes fits one datagram).
    assert_eq!(udp_exchange(&tb, "c", "127.0.0.1:6000", 200, 64), 200);
    assert_eq!(udp_exchange(&tb, "c", "127.0.0.1:6000", 50, 1200), 50);
    let s = proxy.fresh_stats().unwrap();
    assert_eq!(s["sessions_udp"], 1, "{s}");
    assert_eq!(s["udp_to_target"], 250, "{s}");
    assert_eq!(s["udp_to_client"], 250, "{s}");
    stop_client(&mut client).unwrap();
}

#[test]
fn a_client_that_migrates_every_200_ms_keeps_its_tunnel_through_a_tcp_transfer() {
    require_root();
    let (tb, _dir, proxy) = masque::with_proxy("").unwrap();
    let url = proxy_url();
    let binds = addr::CLIENT_V4.join(",");
    let (mut client, _) = start_client(
        &tb,
        "c",
        &[
            "ip",
            "--proxy",
            &url,
            "--bind",
            &binds,
            "--tun",
            "mq0",
            "--hop-every-ms",
            "200",
        ],
    )
    .unwrap();
    let run = iperf3(&tb, "c", "s", addr::SERVER_V4, 5).unwrap_or_else(|e| {
        panic!(
            "{e}; client {}; proxy {}",
            client.describe(),
            proxy.proc.describe()
        )
    });
    // The client first, so that the proxy's counters hold every hop it made.
    let c = stop_client(&mut client).unwrap();
    let s = proxy.fresh_stats().unwrap();
    assert!(run.received_bytes > 0, "{run:?}; {c}");
    let hops = c["hops_done"].as_u64().unwrap();
    // 25 hops are due in 5 s of transfer; a few may still be validating at the end, and on a
    // loaded machine some time out (how many is a rate, for the benches).
    assert!(
        hops >= 10,
        "only {hops} hops: {c}; proxy {s}; {}",
        client.describe()
    );
    // The proxy saw the address changes on one connection and one session: the tunnel stayed.
    assert!(s["peer_migrations"].as_u64().unwrap() >= hops - 1, "{s}");
    assert_eq!(s["connections_accepted"], 1, "{s}");
    assert_eq!(s["sessions_ip"], 1, "{s}");
    assert!(s["cids_issued"].as_u64().unwrap() >= hops, "{s}");
}

#[test]
fn nested_proxies_carry_connect_udp_and_connect_ip() {
    require_root();
    // client (c) → proxy A (p) → proxy B (on s) → target (p's address on B's side: a proxy
    // never lets its clients reach its own addresses, `[policy]`). The inner client's QUIC
    // connection to B runs through an outer CONNECT-UDP session to A.
    let mut tb = Testbed::new().unwrap();
    masque::build(&mut tb).unwrap();
    let dir_a = tempfile::tempdir().unwrap();
    let dir_b = tempfile::tempdir().unwrap();
    let a = ProxyProc::start(&tb, "p", dir_a.path(), "0.0.0.0:4433", "").unwrap();
    let b_ip =
        "[ip]\ntun = \"mqb0\"\npool_v4 = \"198.18.201.0/24\"\nicmp_source_v4 = \"198.18.201.1\"\n";
    let b = ProxyProc::start(&tb, "s", dir_b.path(), "198.18.20.2:4434", b_ip).unwrap();
    // B forwards between its TUN device and p, and p routes B's pool back to it.
    tb.sysctl("s", "net.ipv4.ip_forward", "1").unwrap();
    tb.add_route("p", "198.18.201.0/24", "198.18.20.2").unwrap();
    echo_server(&tb, "p", "198.18.20.1:7007".parse().unwrap()).unwrap();
    let url = proxy_url();
    let (mut outer, _) = start_client(
        &tb,
        "c",
        &[
            "udp",
            "--proxy",
            &url,
            "--target",
            "198.18.20.2:4434",
            "--listen",
            "127.0.0.1:5000",
        ],
    )
    .unwrap();
    // CONNECT-UDP inside CONNECT-UDP.
    let (mut inner_udp, _) = start_client(
        &tb,
        "c",
        &[
            "udp",
            "--proxy",
            "127.0.0.1:5000",
            "--target",
            "198.18.20.1:7007",
            "--listen",
            "127.0.0.1:6001",
        ],
    )
    .unwrap();
    assert_eq!(udp_exchange(&tb, "c", "127.0.0.1:6001", 100, 200), 100);
    // CONNECT-IP inside CONNECT-UDP: only the target goes into the inner tunnel (the outer
    // client's own QUIC packets to A must not).
    let (mut inner_ip, ready) = start_client(
        &tb,
        "c",
        &[
            "ip",
            "--proxy",
            "127.0.0.1:5000",
            "--tun",
            "mqin0",
            "--route",
            "198.18.20.1/32",
        ],
    )
    .unwrap();
    assert!(ready.contains("198.18.201."), "{ready}");
    ping(&tb, "c", "198.18.20.1", 10).unwrap_or_else(|e| panic!("{e}; {}", inner_ip.describe()));
    let sa = a.fresh_stats().unwrap();
    let sb = b.fresh_stats().unwrap();
    // A saw one CONNECT-UDP session carrying both inner connections; B saw both inner sessions.
    assert_eq!(sa["sessions_udp"], 1, "{sa}");
    assert_eq!(sa["sessions_ip"], 0, "{sa}");
    assert_eq!(sb["sessions_udp"], 1, "{sb}");
    assert_eq!(sb["sessions_ip"], 1, "{sb}");
    assert!(sb["tun_tx"].as_u64().unwrap() >= 10, "{sb}");
    for c in [&mut inner_ip, &mut inner_udp, &mut outer] {
        stop_client(c).unwrap();
    }
}

#[test]
fn missing_or_wrong_tokens_get_407_and_403_and_no_tunnel() {
    require_root();
    let (tb, _dir, proxy) = masque::with_proxy("tokens = [\"s3cret\"]\n").unwrap();
    let url = proxy_url();
    let bin = mimiq_perf::testbed::bin_path("mimiq-proxy").unwrap();
    let bin = bin.to_str().unwrap();
    for (token, status) in [(None, "407"), (Some("wrong"), "403")] {
        let mut cmd = vec![bin, "client", "ip", "--proxy", &url, "--tun", "mq0"];
        if let Some(t) = token {
            cmd.extend(["--token", t]);
        }
        let out = tb.exec("c", &cmd).unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.contains(&format!("HTTP {status}")),
            "token {token:?}: {err}"
        );
        // No tunnel device was left behind.
        let links = tb.exec("c", &["ip", "link", "show", "mq0"]).unwrap();
        assert!(
            !links.status.success(),
            "mq0 exists after a refused request"
        );
    }
    let (mut ok, ready) = start_client(
        &tb,
        "c",
        &["ip", "--proxy", &url, "--tun", "mq0", "--token", "s3cret"],
    )
    .unwrap();
    assert!(ready.contains("198.18.200."), "{ready}");
    let s = proxy.fresh_stats().unwrap();
    assert_eq!(s["refused"]["407"], 1, "{s}");
    assert_eq!(s["refused"]["403"], 1, "{s}");
    assert_eq!(s["sessions_ip"], 1, "{s}");
    stop_client(&mut ok).unwrap();
}

#[test]
fn an_idle_tunnel_is_kept_alive_and_a_lost_one_ends_the_client_with_an_error() {
    require_root();
    // The proxy's idle timeout is the connection's (the lesser of both ends'): 1.5 s.
    let (tb, _dir, proxy) = masque::with_proxy("[quic]\nidle_timeout_ms = 1500\n").unwrap();
    let url = proxy_url();
    let args = [
        "ip",
        "--proxy",
        &url,
        "--bind",
        addr::CLIENT_V4[0],
        "--tun",
        "mq0",
        "--reconnect-attempts",
        "2",
        "--connect-timeout-s",
        "1",
    ];
    let (mut client, _) = start_client(&tb, "c", &args).unwrap();
    // Quiet for three idle timeouts: only the keep-alives (one per half second) cross.
    let quiet = std::time::Instant::now();
    while quiet.elapsed() < Duration::from_millis(4_500) {
        assert!(
            client.try_status().is_none(),
            "the client exited while idle: {}",
            client.describe()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    ping(&tb, "c", addr::SERVER_V4, 3).unwrap_or_else(|e| panic!("{e}; {}", client.describe()));
    // The proxy dies without a word and stays dead: the client's keep-alives go unanswered,
    // the idle timeout ends the connection, two new connections find no proxy, and the client
    // exits non-zero with one line saying so.
    proxy.proc.signal(libc::SIGKILL);
    let status = client
        .wait_timeout(Duration::from_secs(15))
        .unwrap_or_else(|| panic!("the client outlived its tunnel: {}", client.describe()));
    assert!(!status.success(), "{status}; {}", client.describe());
    let err = client.stderr();
    let last = err
        .lines()
        .filter(|l| l.contains("error"))
        .collect::<Vec<_>>();
    assert_eq!(last.len(), 1, "{err}");
    assert!(
        last[0].contains("tunnel lost")
            && last[0].contains("idle timeout")
            && last[0].contains("gave up after 2 attempts"),
        "{err}"
    );
}

#[test]
fn two_clients_resuming_at_once_after_each_of_two_proxy_restarts_get_their_own_addresses_back() {
    require_root();
    let (tb, _dir, proxy) = masque::with_proxy("[quic]\nidle_timeout_ms = 1500\n").unwrap();
    let url = proxy_url();
    // The second client notices a dead proxy first (its own idle timeout is the shorter).
    let mut clients = Vec::new();
    for (i, (tun, idle)) in [("mq0", "1500"), ("mq1", "800")].iter().enumerate() {
        let args = [
            "ip",
            "--proxy",
            &url,
            "--bind",
            addr::CLIENT_V4[i],
            "--tun",
            tun,
            "--route",
            "none",
            "--idle-timeout-ms",
            idle,
        ];
        let (client, ready) = start_client(&tb, "c", &args).unwrap();
        clients.push((client, ready));
    }
    assert!(clients[0].1.contains("198.18.200.2/32"), "{}", clients[0].1);
    assert!(clients[1].1.contains("198.18.200.3/32"), "{}", clients[1].1);
    // The new proxy hands out the lowest free address first: the client it hears from first
    // (the second) would start on the first one's and have to exchange it, and two clients
    // resuming at the same moment would each start on the other's and be refused their own,
    // were it not for the ADDRESS_REQUEST sent with the CONNECT request.
    // Twice: the second time, the proxy killed is the one started a moment before.
    for restart in 1..=2 {
        proxy.kill_and_restart(&tb, "p").unwrap();
        let s = eventually(Duration::from_secs(20), || {
            let s = proxy.stats()?;
            match (s["sessions_ip"].as_u64(), s["addresses_requested"].as_u64()) {
                (Some(2), Some(4)) => Ok(s),
                _ => Err(format!("{s}")),
            }
        })
        .unwrap_or_else(|e| panic!("both resumed after restart {restart}: {e}"));
        assert_eq!(s["addresses_refused"], 0, "{s}");
        assert_eq!(s["addresses_exchanged"], 0, "{s}");
    }
    for (i, (client, ready)) in clients.iter_mut().enumerate() {
        let stats = stop_client(client).unwrap();
        assert_eq!(stats["reconnects"], 2, "client {i}: {stats}");
        assert_eq!(stats["addresses_changed"], 0, "client {i}: {stats}");
        let now = stats["addresses"][0].as_str().unwrap().to_string();
        assert!(ready.contains(&now), "client {i}: had {ready}, now {now}");
    }
}

#[test]
fn the_policy_refuses_the_proxys_loopback_own_addresses_and_denied_prefixes_and_allows_the_rest() {
    require_root();
    // Private ranges refused (the default), but the server's /24 allowed, one host in it denied.
    let (tb, _dir, proxy) = masque::with_proxy(
        "[policy]\nallow = [\"198.18.20.0/24\"]\ndeny = [\"198.18.20.99/32\"]\n",
    )
    .unwrap();
    // Something listens on the proxy's loopback, as a resolver would.
    echo_server(&tb, "p", "127.0.0.1:53".parse().unwrap()).unwrap();
    echo_server(&tb, "s", "198.18.20.2:7007".parse().unwrap()).unwrap();
    for (target, why) in [
        ("127.0.0.1:53", "special_address"),
        ("[::1]:53", "special_address"),
        ("198.18.10.1:4433", "own_address"),
        ("198.18.20.1:22", "own_address"),
        ("198.18.20.99:7007", "denied"),
        ("198.18.30.1:7007", "private"),
    ] {
        let err = udp_client(&tb, target, "127.0.0.1:6000", &[])
            .err()
            .unwrap_or_else(|| panic!("CONNECT-UDP to {target} was accepted"));
        assert!(err.contains("HTTP 403"), "{target}: {err}");
        let s = proxy.fresh_stats().unwrap();
        assert!(
            s["policy_refused"][why].as_u64().unwrap_or(0) >= 1,
            "{target}: {s}"
        );
    }
    let s = proxy.fresh_stats().unwrap();
    assert_eq!(s["refused"]["403"], 6, "{s}");
    assert_eq!(s["sessions_udp"], 0, "{s}");
    let mut client = udp_client(&tb, "198.18.20.2:7007", "127.0.0.1:6000", &[]).unwrap();
    assert_eq!(udp_exchange(&tb, "c", "127.0.0.1:6000", 20, 100), 20);
    stop_client(&mut client).unwrap();

    // CONNECT-IP: every packet's destination is checked too. The proxy's own address on the
    // server side is refused (and answered: administratively prohibited), the server is not.
    let (mut ip, _) = start_ip_client(&tb).unwrap();
    ping(&tb, "c", addr::SERVER_V4, 3).unwrap();
    assert!(
        ping(&tb, "c", "198.18.20.1", 2).is_err(),
        "the proxy's own address"
    );
    let s = proxy.fresh_stats().unwrap();
    assert_eq!(s["ip_drops"]["policy"], 2, "{s}");
    stop_client(&mut ip).unwrap();
}

#[test]
fn a_proxy_with_its_own_uri_templates_serves_clients_configured_with_them() {
    require_root();
    let (tb, _dir, proxy) =
        masque::with_proxy("[udp]\ntemplate = \"/masque{?target_host,target_port}\"\n").unwrap();
    echo_server(&tb, "s", "198.18.20.2:7007".parse().unwrap()).unwrap();
    let template = ["--template", "/masque{?target_host,target_port}"];
    let mut client = udp_client(&tb, "198.18.20.2:7007", "127.0.0.1:6000", &template).unwrap();
    assert_eq!(udp_exchange(&tb, "c", "127.0.0.1:6000", 20, 100), 20);
    stop_client(&mut client).unwrap();
    // A client building the well-known path finds nothing there.
    let err = udp_client(&tb, "198.18.20.2:7007", "127.0.0.1:6001", &[])
        .err()
        .unwrap();
    assert!(err.contains("HTTP 404"), "{err}");
    let s = proxy.fresh_stats().unwrap();
    assert_eq!(s["sessions_udp"], 1, "{s}");
    assert_eq!(s["refused"]["404"], 1, "{s}");
}

#[test]
fn idle_connections_are_not_visited_while_one_client_is_busy() {
    require_root();
    let (tb, _dir, proxy) = masque::with_proxy("").unwrap();
    echo_server(&tb, "s", "198.18.20.2:7007".parse().unwrap()).unwrap();
    const IDLE: usize = 20;
    let mut idle = Vec::new();
    for i in 0..IDLE {
        let listen = format!("127.0.0.1:{}", 6100 + i);
        idle.push(udp_client(&tb, "198.18.20.2:7007", &listen, &[]).unwrap());
    }
    let busy = udp_client(&tb, "198.18.20.2:7007", "127.0.0.1:6000", &[]).unwrap();
    let before = proxy.fresh_stats().unwrap();
    assert_eq!(before["connections_open"], IDLE as u64 + 1, "{before}");
    assert_eq!(udp_exchange(&tb, "c", "127.0.0.1:6000", 500, 200), 500);
    let after = proxy.fresh_stats().unwrap();
    let n = |s: &serde_json::Value, k: &str| s[k].as_u64().unwrap();
    let passes = n(&after, "passes") - n(&before, "passes");
    let visits = n(&after, "connections_flushed") - n(&before, "connections_flushed");
    // Each pass visits the busy connection, and now and then an idle one whose timer fired or
    // whose keep-alive arrived; visiting every open connection would be 21 per pass.
    assert!(passes >= 500, "{passes} passes");
    assert!(
        visits < 2 * passes,
        "{visits} connection visits in {passes} passes with {} open",
        IDLE + 1
    );
    eprintln!(
        "{visits} connection visits in {passes} passes, {} connections open",
        IDLE + 1
    );
    for mut c in idle.into_iter().chain([busy]) {
        stop_client(&mut c).unwrap();
    }
}
