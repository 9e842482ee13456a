//! `mimiq-switch --role l2fwd` on real AF_XDP sockets between two kernel hosts.
//!
//! h1 and h2 sit in separate namespaces whose only link runs through the switch's namespace
//! (topology `line`): without the switch, nothing crosses.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mimiq_perf::testbed::{bin_path, require_root, topology, Proc, Testbed};
use serde_json::Value;

fn switch_bin() -> PathBuf {
    bin_path("mimiq-switch").unwrap_or_else(|e| panic!("{e}"))
}

/// Starts the switch on `sw` and waits until it has bound its ports (its stats file appears).
fn start_switch(tb: &mut Testbed, stats: &Path) -> Proc {
    let bin = switch_bin();
    let mut proc = tb
        .spawn(
            "sw",
            &[
                bin.to_str().unwrap(),
                "run",
                "--role",
                "l2fwd",
                "--port",
                "p0",
                "--port",
                "p1",
                "--stats-path",
                stats.to_str().unwrap(),
                "--stats-interval-ms",
                "50",
            ],
            true,
        )
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !stats.exists() {
        if let Some(status) = proc.try_status() {
            panic!("switch exited ({status}) before binding: {}", proc.describe());
        }
        assert!(Instant::now() < deadline, "switch not up in 20 s: {}", proc.describe());
        std::thread::sleep(Duration::from_millis(50));
    }
    proc
}

fn read_stats(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn port(stats: &Value, i: usize, field: &str) -> u64 {
    stats["workers"][0]["ports"][i][field].as_u64().unwrap()
}

/// Waits for the next stats publication after now.
fn fresh_stats(path: &Path) -> Value {
    std::thread::sleep(Duration::from_millis(300));
    read_stats(path)
}

#[test]
fn switch_carries_ping_and_iperf3_between_kernel_hosts_and_stopping_it_stops_traffic() {
    if !require_root() {
        return;
    }
    let mut tb = Testbed::new().unwrap();
    topology::line(&mut tb).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let stats_path = dir.path().join("stats.json");

    // Before the switch runs, h1 cannot reach h2: the switch is the only path.
    let before = tb.exec("h1", &["ping", "-c", "1", "-W", "1", topology::addr::H2_V4]).unwrap();
    assert!(!before.status.success(), "h2 reachable without the switch");

    let mut switch = start_switch(&mut tb, &stats_path);
    let s0 = read_stats(&stats_path);

    // ICMP over IPv4 and IPv6 (ARP and neighbour discovery cross the switch too).
    tb.exec_ok("h1", &["ping", "-c", "20", "-i", "0.05", "-W", "2", topology::addr::H2_V4])
        .unwrap_or_else(|e| panic!("ping v4: {e}; {}", switch.describe()));
    tb.exec_ok("h1", &["ping", "-6", "-c", "20", "-i", "0.05", "-W", "2", topology::addr::H2_V6])
        .unwrap_or_else(|e| panic!("ping v6: {e}; {}", switch.describe()));
    let s1 = fresh_stats(&stats_path);
    let pings_in = port(&s1, 0, "rx_packets") - port(&s0, 0, "rx_packets");
    let pings_out = port(&s1, 1, "tx_packets") - port(&s0, 1, "tx_packets");
    // 40 echo requests plus a few ARP/ND frames; nothing else runs on these hosts.
    assert!((40..=60).contains(&pings_in), "p0 received {pings_in} frames for 40 pings");
    assert_eq!(pings_in, pings_out, "every frame from h1 left towards h2");
    let replies = port(&s1, 1, "rx_packets") - port(&s0, 1, "rx_packets");
    assert!((40..=60).contains(&replies), "p1 received {replies} frames for 40 replies");

    // A few seconds of TCP with the kernel's own stacks at both ends.
    let mut server = tb.spawn("h2", &["iperf3", "-s", "-1", "-p", "5201"], false).unwrap();
    let mut client_out = None;
    for _ in 0..50 {
        let out = tb
            .exec("h1", &["iperf3", "-c", topology::addr::H2_V4, "-p", "5201", "-t", "3", "-J"])
            .unwrap();
        if out.status.success() {
            client_out = Some(out);
            break;
        }
        std::thread::sleep(Duration::from_millis(100)); // server not listening yet
    }
    let out = client_out.unwrap_or_else(|| panic!("iperf3 never connected; {}", switch.describe()));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let sent_bytes = report["end"]["sum_sent"]["bytes"].as_u64().unwrap();
    let received_bytes = report["end"]["sum_received"]["bytes"].as_u64().unwrap();
    assert!(sent_bytes > 10_000_000, "only {sent_bytes} bytes in 3 s");
    assert!(received_bytes > 0);
    server.stop(Duration::from_secs(3));

    let s2 = fresh_stats(&stats_path);
    let forwarded = port(&s2, 1, "tx_bytes") - port(&s1, 1, "tx_bytes");
    // The frames carry the TCP payload plus at most ~5 % of headers (66 of ~1514 bytes) and the
    // retransmissions; the switch counted what iperf3 moved, not something else.
    assert!(forwarded >= received_bytes, "switch forwarded {forwarded} < {received_bytes} received");
    assert!(
        forwarded <= sent_bytes + sent_bytes / 10 + 1_000_000,
        "switch forwarded {forwarded}, far more than the {sent_bytes} iperf3 sent"
    );
    assert_eq!(s2["workers"][0]["drops"]["no_such_port"], 0);

    // Stopping the switch stops the traffic, and its XDP programs are gone.
    let status = switch.stop(Duration::from_secs(10)).unwrap();
    assert!(status.success(), "clean exit on SIGTERM: {status}; {}", switch.describe());
    let last: Value = serde_json::from_str(switch.stdout().lines().last().unwrap()).unwrap();
    assert!(port(&last, 1, "tx_bytes") >= port(&s2, 1, "tx_bytes"), "final counters printed");
    let links = tb.exec_ok("sw", &["ip", "link", "show"]).unwrap();
    assert!(
        !String::from_utf8_lossy(&links.stdout).contains("xdp"),
        "XDP program detached on exit"
    );
    let after = tb.exec("h1", &["ping", "-c", "2", "-W", "1", topology::addr::H2_V4]).unwrap();
    assert!(!after.status.success(), "h2 still reachable after the switch stopped");
}

#[test]
fn a_queue_already_bound_and_a_missing_interface_are_one_clear_error_line() {
    if !require_root() {
        return;
    }
    let mut tb = Testbed::new().unwrap();
    topology::line(&mut tb).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let _first = start_switch(&mut tb, &dir.path().join("a.json"));
    let bin = switch_bin();
    let bin = bin.to_str().unwrap();
    let second_stats = dir.path().join("b.json");
    let cases: [(&[&str], &str); 2] = [
        (&["--port", "p0", "--port", "p1"], "already in use"),
        (&["--port", "nosuch0", "--port", "p1"], "interface nosuch0 not found"),
    ];
    for (ports, want) in cases {
        let mut cmd = vec![bin, "run", "--role", "l2fwd", "--stats-path"];
        cmd.push(second_stats.to_str().unwrap());
        cmd.extend_from_slice(ports);
        let mut proc = tb.spawn("sw", &cmd, true).unwrap();
        let status = proc.wait_timeout(Duration::from_secs(20)).expect("exits by itself");
        assert!(!status.success());
        let stderr = proc.stderr();
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "exactly one line: {stderr:?}");
        assert!(lines[0].starts_with("mimiq-switch: error: "), "{stderr:?}");
        assert!(lines[0].contains(want), "{stderr:?} should say {want:?}");
    }
    // The first switch still forwards.
    tb.exec_ok("h1", &["ping", "-c", "2", "-W", "2", topology::addr::H2_V4]).unwrap();
}
