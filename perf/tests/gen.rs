//! `mimiq-perf gen` on real AF_XDP sockets in network namespaces: the receiver counts what the
//! sender sent, the switch accounts for every probe, injected loss and reordering are reported
//! exactly, and bad flags are one-line errors.

use std::path::Path;
use std::time::Duration;

use mimiq_perf::switch::{Switch, SwitchStats};
use mimiq_perf::testbed::{bin_path, eventually, require_root, topology, LinkOpts, Proc, Testbed};
use serde_json::Value;

/// How long a count that must add up may take to show in the switch's counters: only a
/// failing test waits this long.
const PUBLISHED: Duration = Duration::from_secs(10);

/// `tx:eth0 — eth0:rx`, nothing else on the link.
fn direct() -> Testbed {
    direct_with(1)
}

/// [`direct`] with `queues` queues on each end.
fn direct_with(queues: u32) -> Testbed {
    let mut tb = Testbed::new().unwrap();
    tb.add_host("tx").unwrap();
    tb.add_host("rx").unwrap();
    let opts = LinkOpts {
        queues,
        ..LinkOpts::default()
    };
    tb.add_link(("tx", "eth0"), ("rx", "eth0"), opts).unwrap();
    for host in ["tx", "rx"] {
        tb.sysctl(host, "net.ipv6.conf.all.disable_ipv6", "1")
            .unwrap();
    }
    tb
}

fn perf() -> String {
    bin_path("mimiq-perf")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string()
}

/// Starts `gen recv` on `host`'s eth0 and waits until its socket is bound.
fn start_recv(tb: &mut Testbed, host: &str, dir: &Path, name: &str) -> Proc {
    let bin = perf();
    let json = dir.join(format!("{name}.json"));
    let hlog = dir.join(format!("{name}.hlog"));
    let cmd = [
        bin.as_str(),
        "gen",
        "recv",
        "--iface",
        "eth0",
        "--json",
        json.to_str().unwrap(),
        "--hlog",
        hlog.to_str().unwrap(),
        "--hlog-interval",
        "200ms",
        // 16384 RX descriptors: the receiver may be descheduled for a few hundred ms on a
        // loaded 2-core machine without the kernel dropping anything.
        "--ring-size",
        "16384",
        // A line a second with the count so far: `stop_recv` reads it.
        "--progress",
    ];
    let mut proc = tb.spawn(host, &cmd, true).unwrap();
    wait_for_line(&mut proc, "bound eth0");
    proc
}

/// Waits until `proc` prints `line` (20 s at most), and fails the test if it exits first.
fn wait_for_line(proc: &mut Proc, line: &str) {
    eventually(Duration::from_secs(20), || {
        if proc.stdout().contains(line) {
            return Ok(());
        }
        assert!(
            proc.try_status().is_none(),
            "exited before printing {line:?}: {}",
            proc.describe()
        );
        Err(format!("not printed {line:?} yet"))
    })
    .unwrap_or_else(|e| panic!("{e}: {}", proc.describe()));
}

/// Stops the receiver (SIGTERM) once it has counted the `sent` probes, or once a whole second
/// of its own passed without one after the sender had finished (then some were dropped on the
/// way, and the caller's accounting says where); returns its JSON report. A caller whose path
/// holds frames (a switch) first waits until that path has passed on or dropped them all.
fn stop_recv(mut proc: Proc, dir: &Path, name: &str, sent: u64) -> Value {
    let lines_before = progress(&proc).0;
    // Drained: every probe counted, or three seconds in a row without one (probes lost on the
    // way). One quiet second is not enough on a loaded host: a switch worker kept off the CPU
    // for a second holds what it has queued to send.
    let drained = eventually(Duration::from_secs(20), || {
        let (lines, total, quiet) = progress(&proc);
        if total >= sent || quiet.min(lines.saturating_sub(lines_before)) >= 3 {
            Ok(())
        } else {
            Err(format!(
                "{total} of {sent} probes counted, {quiet} seconds in a row without one"
            ))
        }
    });
    if let Err(e) = drained {
        eprintln!("{name}: stopping the receiver anyway: {e}");
    }
    let status = proc.stop(Duration::from_secs(10)).unwrap();
    assert!(status.success(), "receiver: {status}; {}", proc.describe());
    read_json(&dir.join(format!("{name}.json")))
}

/// The receiver's progress lines so far (`t=3s received 1200 pps, 3600 total, ...`): how many,
/// the total in the last one, and how many of the last ones counted no probe.
fn progress(proc: &Proc) -> (usize, u64, usize) {
    let stdout = proc.stdout();
    let figures = |line: &str| -> Option<(u64, u64)> {
        let mut parts = line.split(", ");
        let per_second = parts.next()?.strip_suffix(" pps")?.rsplit(' ').next()?;
        let total = parts.next()?.strip_suffix(" total")?;
        Some((total.parse().ok()?, per_second.parse().ok()?))
    };
    // A line cut short by the read counts as no line yet.
    let lines: Vec<(u64, u64)> = stdout
        .lines()
        .filter(|l| l.starts_with("t="))
        .map_while(figures)
        .collect();
    let quiet = lines.iter().rev().take_while(|&&(_, pps)| pps == 0).count();
    (
        lines.len(),
        lines.last().map_or(0, |&(total, _)| total),
        quiet,
    )
}

/// Runs `gen send` on `host` to completion and returns its JSON report.
fn send(tb: &mut Testbed, host: &str, dir: &Path, name: &str, args: &[&str]) -> Value {
    let bin = perf();
    let json = dir.join(format!("{name}.json"));
    let mut cmd = vec![
        bin.as_str(),
        "gen",
        "send",
        "--iface",
        "eth0",
        "--json",
        json.to_str().unwrap(),
    ];
    cmd.extend_from_slice(args);
    let mut proc = tb.spawn(host, &cmd, true).unwrap();
    let status = proc
        .wait_timeout(Duration::from_secs(60))
        .expect("sender finishes");
    assert!(status.success(), "sender: {status}; {}", proc.describe());
    read_json(&json)
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn n(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("no {key} in {v}"))
}

/// Frames the veths of topology `line` dropped (TX to a full peer queue, RX drops).
fn line_veth_drops(tb: &Testbed) -> u64 {
    [
        ("h1", "eth0", "tx_dropped"),
        ("sw", "p0", "rx_dropped"),
        ("sw", "p1", "tx_dropped"),
        ("h2", "eth0", "rx_dropped"),
    ]
    .iter()
    .map(|(host, iface, counter)| link_counter(tb, host, iface, counter))
    .sum()
}

/// Frames the kernel dropped in front of the receiver's socket (no free frame, RX ring full):
/// counted by the kernel, never seen by the receiver. 0 unless the machine stalled it.
fn socket_drops(recv: &Value) -> u64 {
    n(&recv["xdp"], "rx_dropped") + n(&recv["xdp"], "rx_ring_full")
}

/// `{"xdp": stats}`, for [`socket_drops`] on a port's statistics alone.
fn json_obj(xdp: &Value) -> Value {
    serde_json::json!({ "xdp": xdp })
}

#[test]
fn the_receiver_counts_exactly_what_the_sender_sent_over_a_direct_link() {
    require_root();
    let mut tb = direct();
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, &[&str], u64, u64); 2] = [
        (
            "v4-imix",
            &[
                "--imix", "imix", "--flows", "4", "--count", "20000", "--pps", "100k",
            ],
            20_000,
            4,
        ),
        (
            "v6-128",
            &[
                "-6",
                "--size",
                "128",
                "--flows",
                "3",
                "--vary",
                "src-ip,dst-port",
                "--count",
                "6000",
                "--bps",
                "200M",
            ],
            6_000,
            3,
        ),
    ];
    for (name, args, count, flows) in cases {
        let recv = start_recv(&mut tb, "rx", dir.path(), &format!("{name}-recv"));
        let sent = send(&mut tb, "tx", dir.path(), &format!("{name}-send"), args);
        let got = stop_recv(
            recv,
            dir.path(),
            &format!("{name}-recv"),
            n(&sent, "sent_packets"),
        );
        assert_eq!(n(&sent, "sent_packets"), count, "{name}: {sent}");
        assert_eq!(n(&sent, "tx_unfinished"), 0, "{name}");
        // Every probe is counted by the receiver, or by the kernel as dropped before its socket.
        let drops = socket_drops(&got);
        assert!(
            drops * 10 < count,
            "{name}: the kernel dropped {drops} of {count}: {got}"
        );
        assert_eq!(n(&got, "received") + drops, count, "{name}: receiver {got}");
        if drops == 0 {
            assert_eq!(n(&got, "received_bytes"), n(&sent, "sent_bytes"), "{name}");
        }
        assert!(n(&got, "lost") <= drops, "{name}: {got}");
        assert_eq!(
            (n(&got, "reordered"), n(&got, "duplicates")),
            (0, 0),
            "{name}"
        );
        assert_eq!(n(&got, "flows"), flows, "{name}");
        let latency = &got["latency"];
        assert_eq!(n(latency, "samples"), n(&got, "received"), "{name}");
        assert!(
            n(latency, "p50_ns") > 0 && n(latency, "p50_ns") < 1_000_000_000,
            "{name}: {latency}"
        );
        assert!(n(latency, "max_ns") >= n(latency, "p999_ns"));

        // The interval log is readable by an HdrHistogram log reader and holds every sample.
        let hlog = std::fs::read(dir.path().join(format!("{name}-recv.hlog"))).unwrap();
        let mut samples = 0;
        for item in hdrhistogram::serialization::interval_log::IntervalLogIterator::new(&hlog) {
            if let hdrhistogram::serialization::interval_log::LogEntry::Interval(h) = item.unwrap()
            {
                let bytes = base64_decode(h.encoded_histogram());
                let hist: hdrhistogram::Histogram<u64> =
                    hdrhistogram::serialization::Deserializer::new()
                        .deserialize(&mut bytes.as_slice())
                        .unwrap();
                samples += hist.len();
            }
        }
        assert_eq!(samples, n(&got, "received"), "{name}: .hlog samples");
    }
}

#[test]
fn two_queues_send_and_receive_every_probe_with_a_thread_each() {
    require_root();
    let mut tb = direct_with(2);
    let dir = tempfile::tempdir().unwrap();
    let (json, hlog) = (dir.path().join("recv.json"), dir.path().join("recv.hlog"));
    let bin = perf();
    const COUNT: u64 = 20_000;
    let count = COUNT.to_string();
    let recv_cmd = [
        bin.as_str(),
        "gen",
        "recv",
        "--iface",
        "eth0",
        "--queues",
        "2",
        "--count",
        &count,
        "--idle-exit",
        "3s",
        "--json",
        json.to_str().unwrap(),
        "--hlog",
        hlog.to_str().unwrap(),
        "--hlog-interval",
        "200ms",
        "--ring-size",
        "16384",
    ];
    let mut recv = tb.spawn("rx", &recv_cmd, true).unwrap();
    wait_for_line(&mut recv, "bound eth0");
    let args = [
        "--queues", "2", "--flows", "8", "--count", &count, "--pps", "100k",
    ];
    let sent = send(&mut tb, "tx", dir.path(), "send", &args);
    let status = recv
        .wait_timeout(Duration::from_secs(30))
        .expect("the receiver stops at its count, or 3 s after the last probe");
    assert!(status.success(), "receiver: {}", recv.describe());
    let got = read_json(&json);

    // The sender: its count over both queues, each with its share of the flows.
    assert_eq!(n(&sent, "sent_packets"), COUNT, "{sent}");
    let per_queue = |v: &Value| -> Vec<u64> {
        let queues = v["queues"].as_array().unwrap();
        queues.iter().map(|q| n(q, "packets")).collect()
    };
    assert_eq!(per_queue(&sent), [COUNT / 2, COUNT / 2], "{sent}");
    assert_eq!(n(&sent, "flows"), 8);
    // The receiver: every probe, on the queue its flow was sent on, or dropped by the kernel
    // in front of a socket (counted there).
    let drops: u64 = got["queues"]
        .as_array()
        .unwrap()
        .iter()
        .map(socket_drops)
        .sum();
    assert!(drops * 10 < COUNT, "{got}");
    assert_eq!(n(&got, "received") + drops, COUNT, "{got}");
    let received = per_queue(&got);
    assert!(received.iter().all(|&r| r > 0), "{got}");
    assert_eq!(n(&got, "flows"), 8, "{got}");
    assert!(n(&got, "lost") <= drops, "{got}");
    assert_eq!(n(&got["latency"], "samples"), n(&got, "received"));

    // The .hlog: each queue's intervals under its tag, every sample once.
    let text = std::fs::read(&hlog).unwrap();
    let mut by_tag = std::collections::BTreeMap::new();
    for item in hdrhistogram::serialization::interval_log::IntervalLogIterator::new(&text) {
        if let hdrhistogram::serialization::interval_log::LogEntry::Interval(h) = item.unwrap() {
            let bytes = base64_decode(h.encoded_histogram());
            let hist: hdrhistogram::Histogram<u64> =
                hdrhistogram::serialization::Deserializer::new()
                    .deserialize(&mut bytes.as_slice())
                    .unwrap();
            let tag = h.tag().map(|t| t.as_str().to_string()).unwrap_or_default();
            *by_tag.entry(tag).or_insert(0) += hist.len();
        }
    }
    let tags: Vec<&str> = by_tag.keys().map(String::as_str).collect();
    assert_eq!(tags, ["queue0", "queue1"]);
    assert_eq!(by_tag.values().sum::<u64>(), n(&got, "received"));
    assert_eq!(by_tag.values().copied().collect::<Vec<_>>(), received);
}

#[test]
fn a_pcap_is_replayed_in_order_looped_with_its_addresses_rewritten_and_checksums_valid() {
    use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
    use pcap_file::pcap::{PcapPacket, PcapWriter};
    require_root();
    let mut tb = direct();
    let dir = tempfile::tempdir().unwrap();
    // A capture from elsewhere: 50 UDP/IPv4 frames of 60 to 1514 bytes, an ARP frame and an
    // IPv6 one, each with its own payload.
    let mut frames = Vec::new();
    for i in 0..50usize {
        let mut f = Vec::new();
        let payload: Vec<u8> = (0..18 + i * 29).map(|b| (b + i) as u8).collect();
        PacketBuilder::ethernet2([0x0a; 6], [0x0b; 6])
            .ipv4([10, 1, 1, 1], [10, 2, 2, 2], 64)
            .udp(5000 + i as u16, 53)
            .write(&mut f, &payload)
            .unwrap();
        frames.push(f);
    }
    let mut arp = vec![0u8; 60];
    arp[..6].copy_from_slice(&[0xff; 6]);
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    frames.push(arp);
    let mut v6 = Vec::new();
    PacketBuilder::ethernet2([0x0a; 6], [0x0b; 6])
        .ipv6([0xfd; 16], [0xfe; 16], 64)
        .udp(1, 2)
        .write(&mut v6, b"six")
        .unwrap();
    frames.push(v6);
    let pcap = dir.path().join("in.pcap");
    let mut w = PcapWriter::new(std::fs::File::create(&pcap).unwrap()).unwrap();
    for f in &frames {
        let packet = PcapPacket::new(Duration::ZERO, f.len() as u32, f);
        w.write_packet(&packet).unwrap();
    }
    drop(w);

    let tx_mac = mimiq_dataplane::config::parse_mac(&link_mac(&tb, "tx", "eth0")).unwrap();
    let recorder = mimiq_perf::capture::record_frames(
        &tb,
        "rx",
        "eth0",
        Duration::from_secs(4),
        move |f: &[u8]| f.len() >= 12 && f[6..12] == tx_mac,
    )
    .unwrap();
    let tx_mac_text = link_mac(&tb, "tx", "eth0");
    let args = [
        "--pcap",
        pcap.to_str().unwrap(),
        "--loops",
        "3",
        "--src-mac",
        &tx_mac_text,
        "--dst-mac",
        "02:00:00:00:00:99",
        "--dst",
        "198.18.0.2",
        "--pps",
        "20k",
    ];
    let sent = send(&mut tb, "tx", dir.path(), "replay", &args);
    let got = recorder.join().unwrap().unwrap().unwrap();
    assert_eq!(n(&sent, "sent_packets"), 3 * 52, "{sent}");
    let replay = &sent["replay"];
    assert_eq!(
        (n(replay, "frames_per_pass"), n(replay, "skipped")),
        (52, 0)
    );
    assert_eq!(replay["passes"].as_f64(), Some(3.0));
    assert_eq!(got.len(), 3 * 52, "every frame arrived once");
    for (i, frame) in got.iter().enumerate() {
        let (original, f) = (&frames[i % 52], &frame.bytes);
        assert_eq!(f.len(), original.len(), "frame {i} in order");
        assert_eq!(f[0..6], [2, 0, 0, 0, 0, 0x99]);
        match SlicedPacket::from_ethernet(f).map(|p| (p.net, p.transport)) {
            Ok((Some(NetSlice::Ipv4(ip)), Some(TransportSlice::Udp(udp)))) => {
                let h = ip.header().to_header();
                assert_eq!(h.destination, [198, 18, 0, 2], "frame {i}");
                assert_eq!(h.source, [10, 1, 1, 1], "the source kept");
                assert_eq!(h.header_checksum, h.calc_header_checksum());
                let u = udp.to_header();
                assert_eq!(u.checksum, u.calc_checksum_ipv4(&h, udp.payload()).unwrap());
                assert_eq!(udp.payload(), &original[42..], "payload of frame {i}");
            }
            Ok((Some(NetSlice::Ipv6(ip)), _)) => {
                assert_eq!(
                    ip.header().destination(),
                    [0xfe; 16],
                    "another family: kept"
                );
                assert_eq!(f[14..], original[14..]);
            }
            _ => assert_eq!(f[12..], original[12..], "ARP unchanged past the MACs"),
        }
    }
}

/// The MAC of `host`'s `iface`.
fn link_mac(tb: &Testbed, host: &str, iface: &str) -> String {
    let path = format!("/sys/class/net/{iface}/address");
    let out = tb.exec_ok(host, &["cat", &path]).unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn every_probe_through_mimiq_switch_l2fwd_is_counted_by_the_switch_and_the_receiver() {
    require_root();
    let mut tb = Testbed::new().unwrap();
    topology::line(&mut tb).unwrap();
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
    ];
    let switch = Switch::start(&tb, "sw", &args, &dir.path().join("switch.json")).unwrap();
    let recv = start_recv(&mut tb, "h2", dir.path(), "recv");
    let before = switch.stats().unwrap();
    let sent = send(
        &mut tb,
        "h1",
        dir.path(),
        "send",
        &["--flows", "8", "--count", "30000", "--pps", "50k"],
    );
    let sent_packets = n(&sent, "sent_packets");
    assert_eq!(sent_packets, 30_000);
    // Frames the kernel dropped in front of an AF_XDP socket (fill ring empty on a loaded
    // machine) are counted by the kernel: at the switch's p0 and at the receiver.
    let (_, (rx, tx, drops, switch_socket_drops)) =
        switch_accounts_for(&switch, &before, sent_packets);
    let got = stop_recv(recv, dir.path(), "recv", sent_packets);
    let receiver_socket_drops = socket_drops(&got);
    // The kernel on h1 may add a few frames of its own (IPv6 neighbour discovery).
    assert!(
        (sent_packets..=sent_packets + 50).contains(&(rx + switch_socket_drops)),
        "switch p0 received {rx} (+{switch_socket_drops} dropped by the kernel) of {sent_packets}"
    );
    assert_eq!(
        rx,
        tx + drops,
        "every frame forwarded or dropped with a reason"
    );
    assert!(
        tx + switch_socket_drops >= sent_packets,
        "switch forwarded {tx} of {sent_packets}"
    );
    // Every probe the switch forwarded reached the receiver, or the kernel counted its drop.
    let received = n(&got, "received");
    assert_eq!(received + n(&got, "lost"), sent_packets, "receiver: {got}");
    let veth_drops = line_veth_drops(&tb);
    let counted = switch_socket_drops + drops + receiver_socket_drops + veth_drops;
    assert!(
        n(&got, "lost") <= counted,
        "lost {} > drops counted by the switch ({drops}), its sockets ({switch_socket_drops}), the receiver's socket ({receiver_socket_drops}) and the veths ({veth_drops}): {got}",
        n(&got, "lost")
    );
}

/// A counter of `/sys/class/net/<iface>/statistics` inside `host`.
fn link_counter(tb: &Testbed, host: &str, iface: &str, counter: &str) -> u64 {
    let path = format!("/sys/class/net/{iface}/statistics/{counter}");
    let out = tb.exec_ok(host, &["cat", &path]).unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

#[test]
fn the_bare_reflector_carries_every_probe_between_its_two_ports() {
    require_root();
    let mut tb = Testbed::new().unwrap();
    topology::line(&mut tb).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let bin = perf();
    let json = dir.path().join("reflect.json");
    let cmd = [
        bin.as_str(),
        "gen",
        "reflect",
        "--port",
        "p0",
        "--port",
        "p1",
        "--json",
        json.to_str().unwrap(),
    ];
    let mut reflector = tb.spawn("sw", &cmd, true).unwrap();
    wait_for_line(&mut reflector, "bound p0,p1");
    let recv = start_recv(&mut tb, "h2", dir.path(), "recv");
    let sent = send(
        &mut tb,
        "h1",
        dir.path(),
        "send",
        &["--flows", "3", "--count", "20000", "--pps", "50k"],
    );
    let got = stop_recv(recv, dir.path(), "recv", n(&sent, "sent_packets"));
    let status = reflector.stop(Duration::from_secs(10)).unwrap();
    assert!(status.success(), "{}", reflector.describe());
    let reflected = read_json(&json);

    let sent_packets = n(&sent, "sent_packets");
    let socket_drops_p0 = socket_drops(&json_obj(&reflected["xdp"][0]));
    let lost_on_the_way = socket_drops(&got)
        + n(&reflected, "dropped_packets")
        + line_veth_drops(&tb)
        + socket_drops_p0;
    assert_eq!(
        n(&got, "received") + lost_on_the_way,
        sent_packets,
        "receiver {got}, reflector {reflected}"
    );
    // Everything h1 sent crossed, plus the few frames of h1's and h2's own kernels.
    let forwarded = n(&reflected, "forwarded_packets");
    assert!(
        (sent_packets..=sent_packets + 50).contains(&(forwarded + lost_on_the_way)),
        "{reflected}"
    );
    let links = tb.exec_ok("sw", &["ip", "link", "show"]).unwrap();
    assert!(
        !String::from_utf8_lossy(&links.stdout).contains("xdp"),
        "XDP detached on exit"
    );
}

#[test]
fn loss_and_reordering_made_by_the_sender_are_reported_exactly_by_the_receiver() {
    require_root();
    let mut tb = direct();
    let dir = tempfile::tempdir().unwrap();
    let base = ["--flows", "5", "--count", "10000", "--pps", "100k"];
    for (name, fault) in [
        ("skip", ["--fault-skip-every", "37"]),
        ("swap", ["--fault-swap-every", "41"]),
    ] {
        let recv = start_recv(&mut tb, "rx", dir.path(), &format!("{name}-recv"));
        let mut args = base.to_vec();
        args.extend_from_slice(&fault);
        let sent = send(&mut tb, "tx", dir.path(), &format!("{name}-send"), &args);
        let got = stop_recv(
            recv,
            dir.path(),
            &format!("{name}-recv"),
            n(&sent, "sent_packets"),
        );
        let skipped = n(&sent["faults"], "skipped");
        let swapped = n(&sent["faults"], "swapped");
        // Exact when the kernel dropped nothing in front of the receiver (the usual case); a
        // kernel drop adds one loss, and can undo one swap.
        let drops = socket_drops(&got);
        assert!(
            drops * 10 < n(&sent, "sent_packets"),
            "{name}: the kernel dropped {drops}: {got}"
        );
        assert_eq!(
            n(&got, "received") + drops,
            n(&sent, "sent_packets"),
            "{name}"
        );
        assert!(
            (skipped..=skipped + drops).contains(&n(&got, "lost")),
            "{name}: {got}"
        );
        assert!(
            (swapped.saturating_sub(drops)..=swapped).contains(&n(&got, "reordered")),
            "{name}: {got}"
        );
        assert_eq!(n(&got, "duplicates"), 0);
        match name {
            // 2000 packets per flow: numbers 37, 74, ... skipped (54 per flow).
            "skip" => assert_eq!((skipped, swapped), (5 * 54, 0)),
            // packets 1, 42, 83, ... of each flow swapped (49 per flow).
            _ => assert_eq!((skipped, swapped), (0, 5 * 49)),
        }
    }
}

#[test]
fn loss_and_delay_made_by_the_switch_impair_stage_show_exactly_in_the_receiver() {
    require_root();
    let mut tb = Testbed::new().unwrap();
    topology::line(&mut tb).unwrap();
    let dir = tempfile::tempdir().unwrap();
    // 5 % loss and 3 ms delay on the way to h2: a real path that drops, and a latency to find.
    let args = [
        "--role",
        "l2fwd",
        "--port",
        "p0",
        "--port",
        "p1",
        "--stats-interval-ms",
        "50",
        "--impair",
        "p1:loss=0.05,seed=7,delay_us=3000",
    ];
    let switch = Switch::start(&tb, "sw", &args, &dir.path().join("switch.json")).unwrap();
    let recv = start_recv(&mut tb, "h2", dir.path(), "recv");
    let before = switch.stats().unwrap();
    let flows = 4;
    let sent = send(
        &mut tb,
        "h1",
        dir.path(),
        "send",
        &["--flows", "4", "--count", "20000", "--pps", "20k"],
    );
    let sent_packets = n(&sent, "sent_packets");
    // Every probe reached the switch, and the stage has released or dropped all it held.
    let (after, _) = switch_accounts_for(&switch, &before, sent_packets);
    // The stage dropped some: the receiver stops after a second without probes.
    let got = stop_recv(recv, dir.path(), "recv", sent_packets);

    let impair_loss = after.drops("impair_loss") - before.drops("impair_loss");
    // Drops other than the stage's: the switch's other reasons, the kernel's in front of the
    // switch's and the receiver's sockets, the veths'. All 0 on a quiet machine.
    let socket_drops_p0 = after.socket_drops(0) - before.socket_drops(0);
    let other_drops = after.total_drops() - before.total_drops() - impair_loss
        + socket_drops_p0
        + socket_drops(&got)
        + line_veth_drops(&tb);
    // Binomial(20000, 0.05): 1000 ± 31 (1σ); allow 5σ.
    assert!(
        (845..=1155).contains(&impair_loss),
        "{impair_loss} of {sent_packets} lost at 5 %"
    );
    // Frames h1's kernel sent on its own (neighbour discovery) cross the switch too, and the
    // stage may drop them: they are the slack in the equalities below (a handful), with the
    // frames the stage still held when `before` was taken.
    let held_before = (before.port(0, "rx_packets") + before.port(1, "rx_packets")).saturating_sub(
        before.port(0, "tx_packets") + before.port(1, "tx_packets") + before.total_drops(),
    );
    let kernel_frames = (after.port(0, "rx_packets") - before.port(0, "rx_packets")
        + socket_drops_p0)
        .saturating_sub(sent_packets)
        + held_before;
    // Every probe is accounted for: received, or dropped by the stage, the switch or a kernel.
    let accounted = n(&got, "received") + impair_loss + other_drops;
    assert!(
        accounted >= sent_packets,
        "received + dropped = {accounted} for {sent_packets} sent: {got}"
    );
    // And none twice by mimiq's own counters. (The kernels' counters are left out of this
    // bound: on a loaded machine a frame refused by a full socket ring shows at the veth too.)
    let switch_drops = after.total_drops() - before.total_drops();
    let counted_by_mimiq = n(&got, "received") + switch_drops;
    assert!(
        counted_by_mimiq <= sent_packets + kernel_frames,
        "received + dropped by the switch = {counted_by_mimiq} for {sent_packets} sent (+{kernel_frames} kernel frames): {got}"
    );
    // The receiver sees every drop as a gap, except drops after a flow's last received probe.
    let lost = n(&got, "lost");
    assert!(
        lost <= impair_loss + other_drops,
        "lost {lost} > {impair_loss} dropped: {got}"
    );
    assert!(
        lost + flows + kernel_frames >= impair_loss,
        "lost {lost} misses drops ({impair_loss}): {got}"
    );
    assert_eq!(
        (n(&got, "reordered"), n(&got, "duplicates")),
        (0, 0),
        "the delay line is FIFO"
    );
    // One-way latency: the 3 ms the stage holds each frame, plus the path. No probe arrives in
    // less, whatever the load: the sender stamps a probe before it sends it, the stage holds a
    // frame from a clock read after the burst that brought it, and the receiver reads its clock
    // after the burst. How much more is the scheduler's business on a loaded machine (each
    // process may wait a time slice): the median stays within a few times the delay.
    let latency = &got["latency"];
    assert!(
        n(latency, "min_ns") >= 3_000_000,
        "a probe left the stage early: {latency}"
    );
    assert!(
        n(latency, "p50_ns") < 20_000_000,
        "median not ~3 ms: {latency}"
    );
}

#[test]
fn the_sender_holds_the_configured_packet_and_bit_rates() {
    require_root();
    let mut tb = direct();
    let dir = tempfile::tempdir().unwrap();
    // 20 kpps of 64-byte frames for 1.5 s; 80 Mbit/s of 1000-byte frames (10 kpps) for 1.5 s.
    let cases: [(&str, &[&str], f64, f64); 2] = [
        (
            "pps",
            &["--size", "64", "--pps", "20k", "--duration", "1.5s"],
            20_000.0,
            20_000.0 * 64.0 * 8.0,
        ),
        (
            "bps",
            &["--size", "1000", "--bps", "80M", "--duration", "1500ms"],
            10_000.0,
            80e6,
        ),
    ];
    for (name, args, pps, bps) in cases {
        let recv = start_recv(&mut tb, "rx", dir.path(), &format!("{name}-recv"));
        let sent = send(&mut tb, "tx", dir.path(), &format!("{name}-send"), args);
        let got = stop_recv(
            recv,
            dir.path(),
            &format!("{name}-recv"),
            n(&sent, "sent_packets"),
        );
        // It never stops early; how late it stops depends on when it is scheduled.
        let elapsed = sent["elapsed_s"].as_f64().unwrap();
        assert!((1.4..=2.5).contains(&elapsed), "{name}: ran {elapsed} s");
        // Within 3 % of the rate over the run, counting what the sender reports it could not
        // send: the bucket catches up after stalls of up to 10 ms, and a sender that was not
        // scheduled for longer counts what it missed as its deficit (0 on a quiet machine). How
        // large the deficit gets is the machine's load, not the sender's accounting.
        let deficit = n(&sent, "rate_deficit_packets");
        let packets = (n(&sent, "sent_packets") + deficit) as f64;
        assert!(
            (packets / (pps * 1.5) - 1.0).abs() < 0.03,
            "{name}: {packets} packets in 1.5 s: {sent}"
        );
        let frame_bits = n(&sent, "sent_bytes") as f64 * 8.0 / n(&sent, "sent_packets") as f64;
        let bits = packets * frame_bits;
        assert!(
            (bits / (bps * 1.5) - 1.0).abs() < 0.03,
            "{name}: {bits} bits in 1.5 s: {sent}"
        );
        assert_eq!(
            n(&got, "received") + socket_drops(&got),
            n(&sent, "sent_packets"),
            "{name}"
        );
    }
}

#[test]
fn bad_flags_and_missing_interfaces_are_one_line_errors() {
    require_root();
    let tb = direct();
    let bin = perf();
    let cases: &[(&[&str], &str)] = &[
        (
            &["gen", "send", "--iface", "eth0", "--pps", "0"],
            "positive rate",
        ),
        (
            &[
                "gen", "send", "--iface", "eth0", "--pps", "1M", "--bps", "1G",
            ],
            "cannot be used with",
        ),
        (
            &["gen", "send", "--iface", "eth0", "--size", "63"],
            "frame size 63",
        ),
        (
            &["gen", "send", "--iface", "eth0", "-6", "--size", "64"],
            "for IPv6",
        ),
        (
            &["gen", "send", "--iface", "eth0", "--imix", "64:0"],
            "bad size mix",
        ),
        (
            &["gen", "send", "--iface", "eth0", "--flows", "0"],
            "--flows",
        ),
        (
            &[
                "gen", "send", "--iface", "eth0", "--queues", "4", "--flows", "2",
            ],
            "--queues 4 needs at least 4 --flows",
        ),
        (
            &[
                "gen", "recv", "--iface", "eth0", "--queues", "2", "--cores", "0",
            ],
            "--cores lists 1 cores for 2 queues",
        ),
        (
            &["gen", "recv", "--iface", "eth0", "--queue", "3"],
            "interface eth0 has no queue 3",
        ),
        (
            &[
                "gen",
                "send",
                "--iface",
                "eth0",
                "--pcap",
                "/nonexistent.pcap",
            ],
            "cannot open /nonexistent.pcap",
        ),
        (
            &["gen", "send", "--iface", "eth0", "--pcap", "/etc/hostname"],
            "is not a readable pcap file",
        ),
        (
            &["gen", "send", "--iface", "eth0", "--loops", "2"],
            "--pcap",
        ),
        (
            &[
                "gen",
                "send",
                "--iface",
                "eth0",
                "--src",
                "198.18.0.1",
                "--dst",
                "fd00::2",
            ],
            "same IP version",
        ),
        (
            &["gen", "send", "--iface", "eth0", "--dst-mac", "zz"],
            "not a MAC address",
        ),
        (
            &["gen", "send", "--iface", "eth0", "--duration", "1h"],
            "not a duration",
        ),
        (
            &["gen", "send", "--iface", "eth0", "--ring-size", "1000"],
            "power of two",
        ),
        (
            &["gen", "send", "--iface", "nosuch0"],
            "interface nosuch0 not found",
        ),
        (
            &["gen", "recv", "--iface", "nosuch0"],
            "interface nosuch0 not found",
        ),
        (
            &[
                "gen", "reflect", "--port", "eth0", "--port", "a", "--port", "b",
            ],
            "one or two",
        ),
        (&["gen", "send"], "--iface"),
        (&["gen", "bogus"], "bogus"),
    ];
    for (args, want) in cases {
        let mut cmd = vec![bin.as_str()];
        cmd.extend_from_slice(args);
        let mut proc = tb.spawn("tx", &cmd, true).unwrap();
        let status = proc
            .wait_timeout(Duration::from_secs(20))
            .expect("exits by itself");
        assert!(!status.success(), "{args:?} succeeded");
        let stderr = proc.stderr();
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{args:?}: exactly one line: {stderr:?}");
        assert!(
            lines[0].starts_with("mimiq-perf: error: "),
            "{args:?}: {stderr:?}"
        );
        assert!(
            lines[0].contains(want),
            "{args:?}: {stderr:?} should say {want:?}"
        );
    }
}

/// Standard base64 (the interval log's histogram encoding), without a dependency for it.
fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {c}"),
        }
    };
    let bytes: Vec<u8> = text.bytes().filter(|&c| c != b'=').collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut acc = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            acc |= value(c) << (18 - 6 * i);
        }
        for i in 0..chunk.len().saturating_sub(1) {
            out.push((acc >> (16 - 8 * i)) as u8);
        }
    }
    out
}

/// Waits until the switch has passed on or dropped every frame it received, and received all
/// `sent` probes on p0 since `before` (or the kernel dropped them in front of its socket);
/// returns the counters then, and p0's received, p1's sent, the switch's drops and p0's kernel
/// drops since `before`.
fn switch_accounts_for(
    switch: &Switch,
    before: &SwitchStats,
    sent: u64,
) -> (SwitchStats, (u64, u64, u64, u64)) {
    let counts = |s: &SwitchStats| {
        (
            s.port(0, "rx_packets") - before.port(0, "rx_packets"),
            s.port(1, "tx_packets") - before.port(1, "tx_packets"),
            s.total_drops() - before.total_drops(),
            s.socket_drops(0) - before.socket_drops(0),
        )
    };
    // Drained: every frame the switch ever received was sent on or dropped. Counted over its
    // whole life, both directions: a frame that was inside the impair stage's delay queue when
    // `before` was taken (the kernel's neighbour discovery) leaves after it, so since `before`
    // p1 can send one frame more than p0 received.
    let drained = |s: &SwitchStats| {
        s.port(0, "rx_packets") + s.port(1, "rx_packets")
            == s.port(0, "tx_packets") + s.port(1, "tx_packets") + s.total_drops()
    };
    let after = switch
        .stats_until(PUBLISHED, |s| {
            let (rx, tx, _, socket_drops) = counts(s);
            if rx + socket_drops >= sent && drained(s) {
                Ok(())
            } else {
                Err(format!(
                    "p0 received {rx} (+{socket_drops} dropped by the kernel), p1 sent {tx}, \
                     drops {}",
                    s.drops_summary()
                ))
            }
        })
        .unwrap_or_else(|e| panic!("the switch accounts for the {sent} probes: {e}"));
    let since = counts(&after);
    (after, since)
}
