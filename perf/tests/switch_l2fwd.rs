//! `mimiq-switch --role l2fwd` on real AF_XDP sockets between two kernel hosts.
//!
//! h1 and h2 sit in separate namespaces whose only link runs through the switch's namespace
//! (topology `line`): without the switch, nothing crosses.

use std::time::Duration;

use mimiq_perf::switch::{Switch, SwitchStats};
use mimiq_perf::testbed::{bin_path, eventually, require_root, topology, Testbed};
use mimiq_perf::traffic::{iperf3, ping};

const L2FWD: &[&str] = &[
    "--role",
    "l2fwd",
    "--port",
    "p0",
    "--port",
    "p1",
    "--stats-interval-ms",
    "50",
];
/// How long a count that must add up may take to show in the switch's counters (published
/// every 50 ms by workers that a loaded machine may not run for a while): only a failing test
/// waits this long.
const PUBLISHED: Duration = Duration::from_secs(10);

#[test]
fn switch_carries_ping_and_iperf3_between_kernel_hosts_and_stopping_it_stops_traffic() {
    require_root();
    let mut tb = Testbed::new().unwrap();
    topology::line(&mut tb).unwrap();
    let dir = tempfile::tempdir().unwrap();

    // Before the switch runs, h1 cannot reach h2: the switch is the only path.
    assert!(
        ping(&tb, "h1", topology::addr::H2_V4, 1).is_err(),
        "h2 reachable without the switch"
    );
    // Forget the failed ARP resolution, or h1 waits out its retry timer.
    tb.exec_ok("h1", &["ip", "neigh", "flush", "all"]).unwrap();

    let mut switch = Switch::start(&tb, "sw", L2FWD, &dir.path().join("s.json")).unwrap();
    let s0 = switch.stats().unwrap();

    // ICMP over IPv4 and IPv6 (ARP and neighbour discovery cross the switch too).
    ping(&tb, "h1", topology::addr::H2_V4, 20)
        .unwrap_or_else(|e| panic!("{e}; {}", switch.proc.describe()));
    ping(&tb, "h1", topology::addr::H2_V6, 20)
        .unwrap_or_else(|e| panic!("{e}; {}", switch.proc.describe()));
    let requests_in = |s: &SwitchStats| s.port(0, "rx_packets") - s0.port(0, "rx_packets");
    let requests_out = |s: &SwitchStats| s.port(1, "tx_packets") - s0.port(1, "tx_packets");
    let replies_in = |s: &SwitchStats| s.port(1, "rx_packets") - s0.port(1, "rx_packets");
    let s1 = switch
        .stats_until(PUBLISHED, |s| {
            let (i, o, r) = (requests_in(s), requests_out(s), replies_in(s));
            if i >= 40 && r >= 40 && i == o {
                Ok(())
            } else {
                Err(format!("p0 received {i}, p1 sent {o}, p1 received {r}"))
            }
        })
        .unwrap_or_else(|e| panic!("40 pings and 40 replies through the switch: {e}"));
    let (requests_in, requests_out, replies_in) =
        (requests_in(&s1), requests_out(&s1), replies_in(&s1));
    // 40 echo requests and 40 replies plus a few ARP/ND frames; nothing else runs on these hosts.
    assert!(
        (40..=60).contains(&requests_in),
        "p0 received {requests_in} frames for 40 pings"
    );
    assert!(
        (40..=60).contains(&replies_in),
        "p1 received {replies_in} frames for 40 replies"
    );
    assert_eq!(
        requests_in, requests_out,
        "every frame from h1 left towards h2"
    );

    // A few seconds of TCP with the kernel's own stacks at both ends. How much crosses depends
    // on the machine's load (the throughput figure is a bench's, docs/PERFORMANCE.md): here,
    // that it crossed and that the switch counted what iperf3 moved.
    let run = iperf3(&tb, "h1", "h2", topology::addr::H2_V4, 3).unwrap();
    assert!(
        run.received_bytes > 0 && run.received_bytes <= run.sent_bytes,
        "iperf3 received {} of {} bytes sent",
        run.received_bytes,
        run.sent_bytes
    );
    // The frames carry the TCP payload plus ~5 % of headers (66 of ~1514 bytes) and the
    // retransmissions (each at most a full frame).
    let forwarded = |s: &SwitchStats| s.port(1, "tx_bytes") - s1.port(1, "tx_bytes");
    let s2 = switch
        .stats_until(PUBLISHED, |s| {
            if forwarded(s) >= run.received_bytes {
                Ok(())
            } else {
                Err(format!(
                    "forwarded {} < {} received",
                    forwarded(s),
                    run.received_bytes
                ))
            }
        })
        .unwrap_or_else(|e| panic!("the switch counted the bytes iperf3 moved: {e}"));
    let forwarded = forwarded(&s2);
    assert!(
        forwarded <= run.sent_bytes + run.sent_bytes / 10 + run.retransmits * 1_514 + 1_000_000,
        "forwarded {forwarded}, far more than the {} bytes iperf3 sent ({} retransmissions)",
        run.sent_bytes,
        run.retransmits
    );
    assert_eq!(s2.drops("no_such_port"), 0);

    // Stopping the switch stops the traffic, and its XDP programs are gone.
    let status = switch.proc.stop(Duration::from_secs(10)).unwrap();
    assert!(
        status.success(),
        "clean exit on SIGTERM: {status}; {}",
        switch.proc.describe()
    );
    let stdout = switch.proc.stdout();
    let last: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert!(last["workers"][0]["ports"][1]["tx_bytes"].as_u64().unwrap() >= s2.port(1, "tx_bytes"));
    // Every UMEM frame came back: free, in the fill rings, or completed.
    assert_eq!(
        last["workers"][0]["frames_total"],
        2 * 2 * 1024,
        "2 ports × 2 × ring_size"
    );
    assert_eq!(last["workers"][0]["frames_unaccounted"], 0, "{last}");
    let links = tb.exec_ok("sw", &["ip", "link", "show"]).unwrap();
    assert!(
        !String::from_utf8_lossy(&links.stdout).contains("xdp"),
        "XDP detached on exit"
    );
    assert!(
        ping(&tb, "h1", topology::addr::H2_V4, 2).is_err(),
        "h2 reachable after the switch stopped"
    );
}

#[test]
fn a_queue_already_bound_and_a_missing_interface_are_one_clear_error_line() {
    require_root();
    let mut tb = Testbed::new().unwrap();
    topology::line(&mut tb).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let _first = Switch::start(&tb, "sw", L2FWD, &dir.path().join("a.json")).unwrap();
    let bin = bin_path("mimiq-switch").unwrap();
    let bin = bin.to_str().unwrap();
    let second_stats = dir.path().join("b.json");
    let second_stats = second_stats.to_str().unwrap();
    let cases: [(&[&str], &str); 2] = [
        (&["--port", "p0", "--port", "p1"], "already in use"),
        (
            &["--port", "nosuch0", "--port", "p1"],
            "interface nosuch0 not found",
        ),
    ];
    for (ports, want) in cases {
        let mut cmd = vec![bin, "run", "--role", "l2fwd", "--stats-path", second_stats];
        cmd.extend_from_slice(ports);
        let mut proc = tb.spawn("sw", &cmd, true).unwrap();
        let status = proc
            .wait_timeout(Duration::from_secs(20))
            .expect("exits by itself");
        assert!(!status.success());
        let stderr = proc.stderr();
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "exactly one line: {stderr:?}");
        assert!(lines[0].starts_with("mimiq-switch: error: "), "{stderr:?}");
        assert!(lines[0].contains(want), "{stderr:?} should say {want:?}");
    }
    // The first switch still forwards.
    ping(&tb, "h1", topology::addr::H2_V4, 2).unwrap();
}

#[test]
fn two_workers_serve_two_queues_and_publish_metrics_and_hlog_on_sigusr1() {
    require_root();
    let mut tb = Testbed::new().unwrap();
    let opts = mimiq_perf::testbed::LinkOpts {
        queues: 2,
        ..Default::default()
    };
    topology::line_with(&mut tb, opts).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let hlog = dir.path().join("s.hlog");
    // The metrics endpoint listens inside the switch's namespace, on its loopback.
    let args = [
        "--role",
        "l2fwd",
        "--port",
        "p0",
        "--port",
        "p1",
        "--queues",
        "2",
        "--cores",
        "0,1",
        "--stats-interval-ms",
        "50",
        "--hlog-path",
        hlog.to_str().unwrap(),
        "--metrics-listen",
        "127.0.0.1:9464",
    ];
    let mut switch = Switch::start(&tb, "sw", &args, &dir.path().join("s.json")).unwrap();

    // Sixteen TCP streams: the sender's queue selection (a flow hash) spreads them over both
    // queues (all on one: a chance of 2 in 65536).
    let mut server = tb
        .spawn("h2", &["iperf3", "-s", "-1", "-p", "5201"], false)
        .unwrap();
    // Until the server listens (it was just started): then one run of 2 s.
    eventually(Duration::from_secs(20), || {
        let out = tb
            .exec(
                "h1",
                &[
                    "iperf3",
                    "-c",
                    topology::addr::H2_V4,
                    "-p",
                    "5201",
                    "-t",
                    "2",
                    "-P",
                    "16",
                ],
            )
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "iperf3: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    })
    .unwrap_or_else(|e| {
        panic!(
            "iperf3 through two workers: {e}; {}",
            switch.proc.describe()
        )
    });
    server.stop(Duration::from_secs(3));
    let s = switch
        .stats_until(PUBLISHED, |s| {
            let per_worker = s.port_per_worker(0, "rx_packets");
            if per_worker.len() == 2 && per_worker.iter().all(|&n| n > 100) {
                Ok(())
            } else {
                Err(format!("p0 received per worker: {per_worker:?}"))
            }
        })
        .unwrap_or_else(|e| panic!("both queues carried traffic: {e}"));

    // Prometheus text, scraped from inside the namespace.
    let text = tb
        .http_get("sw", "127.0.0.1:9464", "/metrics")
        .unwrap_or_else(|e| panic!("scrape: {e}"));
    let sample = |name: &str| -> u64 {
        text.lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<u64>().ok())
            .sum()
    };
    let metric_rx = sample("mimiq_switch_rx_packets_total{worker=\"0\",queue=\"0\",port=\"p0\"}")
        + sample("mimiq_switch_rx_packets_total{worker=\"1\",queue=\"1\",port=\"p0\"}");
    assert!(
        metric_rx >= s.port(0, "rx_packets"),
        "metrics agree with the stats file"
    );
    assert!(text.contains(
        "mimiq_switch_drops_total{worker=\"1\",queue=\"1\",reason=\"slow_path_ring_full\"}"
    ));

    let status = switch.proc.stop(Duration::from_secs(10)).unwrap();
    assert!(status.success(), "{}", switch.proc.describe());

    // SIGUSR1 appends an interval to the hlog at once, one histogram per worker. This switch
    // writes its hlog every 10 minutes otherwise, so what appears within seconds of the signal
    // is the signal's doing (the one above writes every 50 ms, signal or not).
    let hlog = dir.path().join("usr1.hlog");
    let args = [
        "--role",
        "l2fwd",
        "--port",
        "p0",
        "--port",
        "p1",
        "--queues",
        "2",
        "--cores",
        "0,1",
        "--stats-interval-ms",
        "600000",
        "--hlog-path",
        hlog.to_str().unwrap(),
    ];
    let mut switch = Switch::start(&tb, "sw", &args, &dir.path().join("usr1.json")).unwrap();
    let count_tags = || {
        let text = std::fs::read_to_string(&hlog).unwrap_or_default();
        (
            text.matches("Tag=worker0,").count(),
            text.matches("Tag=worker1,").count(),
        )
    };
    assert_eq!(count_tags(), (0, 0), "no interval before the signal");
    switch.proc.signal(libc::SIGUSR1);
    eventually(Duration::from_secs(10), || match count_tags() {
        (0, _) | (_, 0) => Err(format!("{:?} intervals of workers 0 and 1", count_tags())),
        _ => Ok(()),
    })
    .unwrap_or_else(|e| panic!("an interval per worker on SIGUSR1: {e}"));
    let status = switch.proc.stop(Duration::from_secs(10)).unwrap();
    assert!(status.success(), "{}", switch.proc.describe());
}

/// h1 and h2 know each other's MAC without ARP.
fn static_neighbours(tb: &Testbed) {
    for (host, peer, peer_ip) in [
        ("h1", "h2", topology::addr::H2_V4),
        ("h2", "h1", topology::addr::H1_V4),
    ] {
        let mac = mac_of(tb, peer, "eth0");
        tb.exec_ok(
            host,
            &[
                "ip", "neigh", "replace", peer_ip, "lladdr", &mac, "dev", "eth0",
            ],
        )
        .unwrap();
    }
}

fn mac_of(tb: &Testbed, host: &str, ifname: &str) -> String {
    let out = tb
        .exec_ok(host, &["cat", &format!("/sys/class/net/{ifname}/address")])
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn the_xdp_program_leaves_arp_and_own_addresses_to_the_kernel_and_replaces_a_killed_switchs_leftover(
) {
    require_root();
    let mut tb = Testbed::new().unwrap();
    topology::line(&mut tb).unwrap();
    // The switch host has an address of its own on p0; ARP goes to its kernel, so h1 and h2
    // know each other statically.
    tb.add_addr("sw", "p0", "198.18.0.9/24").unwrap();
    static_neighbours(&tb);
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "--role",
        "l2fwd",
        "--port",
        "p0",
        "--port",
        "p1",
        "--stats-interval-ms",
        "50",
        "--kernel-arp",
        "--kernel-address",
        "198.18.0.9",
    ];
    let mut switch = Switch::start(&tb, "sw", &args, &dir.path().join("a.json")).unwrap();
    let s0 = switch.stats().unwrap();
    ping(&tb, "h1", "198.18.0.9", 10).unwrap_or_else(|e| panic!("the host's kernel answers: {e}"));
    // Then ten echo requests to h2, which cross the switch: once the switch has counted those,
    // its counters hold everything that reached it while h1 pinged the host's kernel too.
    ping(&tb, "h1", topology::addr::H2_V4, 10).unwrap();
    let seen = |s: &SwitchStats| s.port(0, "rx_packets") - s0.port(0, "rx_packets");
    let crossed = |s: &SwitchStats| s.port(1, "tx_packets") - s0.port(1, "tx_packets");
    let s1 = switch
        .stats_until(PUBLISHED, |s| {
            if seen(s) >= 10 && crossed(s) >= 10 {
                Ok(())
            } else {
                Err(format!("p0 received {}, p1 sent {}", seen(s), crossed(s)))
            }
        })
        .unwrap_or_else(|e| panic!("h1 → h2 crosses the switch: {e}"));
    // The ten requests to h2, and at most some IPv6 housekeeping of h1's: none of the ten to
    // the host's kernel.
    let seen = seen(&s1);
    assert!(
        seen < 10 + 5,
        "the switch saw {seen} frames for the 10 pings to h2 and 10 to the host"
    );

    // SIGKILL leaves the program attached; the next switch replaces it and forwards again.
    switch.proc.signal(libc::SIGKILL);
    switch
        .proc
        .wait_timeout(Duration::from_secs(5))
        .expect("killed");
    let links = tb.exec_ok("sw", &["ip", "link", "show", "p0"]).unwrap();
    assert!(
        String::from_utf8_lossy(&links.stdout).contains("xdp"),
        "leftover program"
    );
    assert!(
        ping(&tb, "h1", topology::addr::H2_V4, 2).is_err(),
        "nothing forwards while it is dead"
    );
    let mut again = Switch::start(&tb, "sw", &args, &dir.path().join("b.json")).unwrap();
    ping(&tb, "h1", topology::addr::H2_V4, 5)
        .unwrap_or_else(|e| panic!("{e}; {}", again.proc.describe()));
    let status = again.proc.stop(Duration::from_secs(10)).unwrap();
    assert!(status.success());
    let links = tb.exec_ok("sw", &["ip", "link", "show"]).unwrap();
    assert!(
        !String::from_utf8_lossy(&links.stdout).contains("xdp"),
        "detached on a clean stop"
    );
}

#[test]
fn the_impair_stage_delays_by_the_configured_time_and_drops_the_configured_fraction() {
    require_root();
    let mut tb = Testbed::new().unwrap();
    topology::line(&mut tb).unwrap();
    // Static neighbours and no IPv6 housekeeping: a lost ARP or router solicitation would blur
    // the loss count, which must add up exactly.
    for host in ["h1", "h2"] {
        tb.sysctl(host, "net.ipv6.conf.all.disable_ipv6", "1")
            .unwrap();
    }
    static_neighbours(&tb);
    let dir = tempfile::tempdir().unwrap();

    // 10 ms each way: RTT 20 ms.
    let delayed = [
        "--role",
        "l2fwd",
        "--port",
        "p0",
        "--port",
        "p1",
        "--stats-interval-ms",
        "50",
        "--impair",
        "p0:delay_us=10000",
        "--impair",
        "p1:delay_us=10000",
    ];
    let mut switch = Switch::start(&tb, "sw", &delayed, &dir.path().join("a.json")).unwrap();
    // No frame leaves before its delay, whatever the load: the stage stamps a frame with a
    // clock read after the burst that brought it. How soon after is the scheduler's business
    // (docs/PERFORMANCE.md has the figure from a quiet machine): a round whose median is under
    // three times the RTT shows the stage releases on its timer, not on some later event; on
    // two busy cores a woken worker can wait a time slice, so rounds until one is.
    let mut medians = Vec::new();
    eventually(Duration::from_secs(30), || {
        let mut rtts = ping(&tb, "h1", topology::addr::H2_V4, 30)?;
        rtts.sort_by(f64::total_cmp);
        assert!(rtts[0] >= 20.0, "no frame leaves early: {rtts:?}");
        medians.push(rtts[rtts.len() / 2]);
        if rtts[rtts.len() / 2] < 3.0 * 20.0 {
            Ok(())
        } else {
            Err(format!("RTT medians of the rounds so far: {medians:?} ms"))
        }
    })
    .unwrap_or_else(|e| panic!("the stage did not release within 3 × the RTT: {e}"));
    switch.proc.stop(Duration::from_secs(10));

    // 20 % loss towards h2: every echo request the switch received left towards h2 or was a
    // counted drop, and the fraction holds. With IPv6 off and static neighbours, nothing but
    // the requests goes from h1 to h2, so the stage (seed 42) draws for the same 500 frames in
    // every run: the loss count is the same each time.
    let lossy = [
        "--role",
        "l2fwd",
        "--port",
        "p0",
        "--port",
        "p1",
        "--stats-interval-ms",
        "50",
        "--impair",
        "p1:loss=0.2,seed=42",
    ];
    let switch = Switch::start(&tb, "sw", &lossy, &dir.path().join("b.json")).unwrap();
    let out = tb
        .exec(
            "h1",
            &[
                "ping",
                "-c",
                "500",
                "-i",
                "0.002",
                "-W",
                "1",
                "-q",
                topology::addr::H2_V4,
            ],
        )
        .unwrap();
    // Not ping's own count of replies: a reply later than -W is neither received nor lost.
    let text = String::from_utf8_lossy(&out.stdout);
    let transmitted: u64 = text
        .split(", ")
        .find_map(|part| {
            let (before, _) = part.split_once(" packets transmitted")?;
            before.split_whitespace().last()?.parse().ok()
        })
        .unwrap_or_else(|| panic!("{text}"));
    assert_eq!(transmitted, 500, "{text}");
    // Each request the switch received (or the kernel dropped in front of its socket) either
    // left on p1 or was an impair_loss drop.
    let s = switch
        .stats_until(PUBLISHED, |s| {
            let (rx, dropped) = (s.port(0, "rx_packets"), s.socket_drops(0));
            let (tx, lost) = (s.port(1, "tx_packets"), s.drops("impair_loss"));
            if rx + dropped >= transmitted && rx == tx + lost {
                Ok(())
            } else {
                Err(format!(
                    "p0 received {rx} (+{dropped} dropped by the kernel), p1 sent {tx}, \
                     impair_loss {lost}; drops {}",
                    s.drops_summary()
                ))
            }
        })
        .unwrap_or_else(|e| panic!("every request crossed or was a counted drop: {e}"));
    assert_eq!(
        s.port(0, "rx_packets") + s.socket_drops(0),
        transmitted,
        "only the requests went from h1 to h2: drops {}",
        s.drops_summary()
    );
    // Binomial(500, 0.2): 100 ± 9 (1σ); allow 4σ.
    let lost = s.drops("impair_loss");
    assert!((64..=136).contains(&lost), "{lost} of 500 lost at 20 %");
}
