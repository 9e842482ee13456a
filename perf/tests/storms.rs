//! Hostile input at rate on the single box: `mimiq-perf gen send --garble` storms the access
//! port from one client at the generator's full rate (random bytes after an IP ethertype,
//! frames cut short, junk ethertypes) while another client downloads through the switch. The
//! download must arrive byte-exact, every storm frame the switch took in must be a drop counted
//! under a reason, and the switch's memory must stay where it was.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use mimiq_allocator::Family;
use mimiq_perf::faults::rx_bytes;
use mimiq_perf::singlebox::{allocate, mac, start, use_address, SingleBox, LONG};
use mimiq_perf::testbed::topology::single_box_addr as addr;
use mimiq_perf::testbed::{bin_path, require_root, Testbed};
use mimiq_perf::traffic::pattern_download;

/// A counter of the interface `ifname` of `host`.
fn counter(tb: &Testbed, host: &str, ifname: &str, name: &str) -> u64 {
    let path = format!("/sys/class/net/{ifname}/statistics/{name}");
    let out = tb.exec_ok(host, &["cat", &path]).unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

#[test]
fn a_storm_of_garbled_frames_into_the_access_port_is_dropped_and_counted_and_a_download_goes_on_byte_exact(
) {
    require_root();
    let SingleBox {
        tb,
        mut allocator,
        switch,
        dir,
    } = start(&LONG);
    let granted = allocate(&tb, "c1", Family::V4);
    use_address(&tb, "c1", granted.addr);
    let gateway_mac = mac(&tb, "sw", "cl0");
    let listen: SocketAddr = format!("{}:9000", addr::OUT_V4).parse().unwrap();
    let perf = bin_path("mimiq-perf").unwrap();
    let report = dir.path().join("storm.json");
    let rss_before = rss_kb(switch.proc.pid());
    let before = switch.stats_settled(Duration::from_secs(5)).unwrap();
    let c1_tx_before = counter(&tb, "c1", "eth0", "tx_packets");
    let ((got, exact), storm_status) = std::thread::scope(|scope| {
        let until = Instant::now() + Duration::from_secs(8);
        let tb = &tb;
        let download =
            scope.spawn(move || pattern_download(tb, "out", listen, "c1", u64::MAX, Some(until)));
        let at = rx_bytes(tb, "c1", "eth0").unwrap();
        mimiq_testkit::eventually(Duration::from_secs(10), || {
            match rx_bytes(tb, "c1", "eth0")? - at {
                n if n > 1_000_000 => Ok(()),
                n => Err(format!("{n} bytes so far")),
            }
        })
        .unwrap_or_else(|e| panic!("the download started: {e}"));
        // Five seconds of every kind of garbage, as fast as the generator goes, to the
        // gateway's MAC.
        let mut storm = tb
            .spawn(
                "c2",
                &[
                    perf.to_str().unwrap(),
                    "gen",
                    "send",
                    "--iface",
                    "eth0",
                    "--dst-mac",
                    &gateway_mac,
                    "--garble",
                    "mixed",
                    "--duration",
                    "5s",
                    "--json",
                    report.to_str().unwrap(),
                ],
                true,
            )
            .unwrap();
        let status = storm.wait_timeout(Duration::from_secs(30));
        let status = status.map(|s| (s.success(), storm.describe()));
        (download.join().unwrap().unwrap(), status)
    });
    let (ok, log) = storm_status.expect("the storm ends");
    assert!(ok, "{log}");
    assert!(exact, "a byte of the download differs");
    assert!(got > 0);
    let sent =
        serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(&report).unwrap())
            .unwrap()["sent_packets"]
            .as_u64()
            .unwrap();
    assert!(sent > 100_000, "the storm sent {sent} frames");
    let c1_tx = counter(&tb, "c1", "eth0", "tx_packets") - c1_tx_before;
    // What the switch took in on the clients' port was c1's (its download's ACKs, forwarded) or
    // the storm's: every frame of the storm is a drop under a reason (a few of the kernels'
    // own frames, neighbour discovery, may be among those counted as taken). The switch
    // publishes its counters every 50 ms: wait for the storm's.
    let mut seen = (0, 0);
    let after = switch
        .stats_until(Duration::from_secs(10), |s| {
            let taken = s.port_named("cl0", "rx_packets") - before.port_named("cl0", "rx_packets");
            let dropped = s.total_drops() - before.total_drops();
            seen = (taken, dropped);
            if taken > 100_000 && dropped + c1_tx + 100 >= taken {
                Ok(())
            } else {
                Err(format!("taken {taken}, dropped {dropped}, c1 sent {c1_tx}"))
            }
        })
        .unwrap_or_else(|e| panic!("every storm frame taken is a counted drop: {e}"));
    let (taken, dropped) = seen;
    let reason = |r: &str| after.drops(r) - before.drops(r);
    assert!(reason("not_ip") > 0, "{}", after.drops_summary());
    assert!(
        reason("malformed") + reason("spoofed_source") > 0,
        "{}",
        after.drops_summary()
    );
    // The switch's memory is its UMEM and tables, allocated at start.
    let rss_after = rss_kb(switch.proc.pid());
    assert!(
        rss_after < rss_before + 8 * 1024,
        "switch RSS {rss_before} KB -> {rss_after} KB"
    );
    eprintln!(
        "storm: {sent} frames sent, {taken} taken by the switch, {dropped} dropped ({}); download {got} bytes, exact",
        after.drops_summary()
    );
    drop(switch);
    allocator.stop(Duration::from_secs(5));
}

/// Datagrams the kernel of `host` dropped for a full UDP receive buffer.
fn udp_rcvbuf_errors(tb: &Testbed, host: &str) -> u64 {
    let out = tb.exec_ok(host, &["cat", "/proc/net/snmp"]).unwrap();
    mimiq_testkit::udp_rcvbuf_errors(&String::from_utf8_lossy(&out.stdout)).unwrap()
}

/// Packets the kernel dropped from a full input backlog, all CPUs (the second column of
/// /proc/net/softnet_stat; machine-wide: a veth hands every packet to its peer through it).
fn backlog_drops() -> u64 {
    std::fs::read_to_string("/proc/net/softnet_stat")
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .map(|v| u64::from_str_radix(v, 16).unwrap())
        .sum()
}

/// Waits until the proxy's counter `key` has grown since `before` by the `sent` datagrams of a
/// flood, less those the kernel of host `p` dropped since it stood at `dropped_before`; returns
/// the proxy's stats then.
fn accounted(
    tb: &Testbed,
    proxy: &mimiq_perf::masque::ProxyProc,
    key: &str,
    before: &serde_json::Value,
    dropped_before: u64,
    sent: u64,
) -> serde_json::Value {
    mimiq_testkit::eventually(Duration::from_secs(10), || {
        let s = proxy.stats()?;
        let counted = s[key].as_u64().unwrap_or(0) - before[key].as_u64().unwrap_or(0);
        let kernel = udp_rcvbuf_errors(tb, "p") + backlog_drops() - dropped_before;
        if counted + kernel >= sent {
            Ok(s)
        } else {
            Err(format!(
                "{sent} sent, {counted} counted as {key}, {kernel} dropped by the kernel"
            ))
        }
    })
    .unwrap_or_else(|e| panic!("every datagram of the flood accounted for: {e}"))
}

/// Three seconds of QUIC short headers (RFC 9000 §17.3.1: first bit 0, fixed bit 1) to
/// `target`, as fast as one socket sends, from host `c`: each with the connection ID `dcid`
/// (random where it is empty) and a random body, 40 to 1,300 bytes in all. Returns how many
/// were sent.
fn short_header_flood(tb: &Testbed, target: SocketAddr, dcid: &[u8]) -> u64 {
    let dcid = dcid.to_vec();
    tb.run_in("c", move || {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        s.connect(target).unwrap();
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut buf = [0u8; 1300];
        let (mut sent, end) = (0u64, Instant::now() + Duration::from_secs(3));
        while Instant::now() < end {
            for _ in 0..64 {
                for chunk in buf.chunks_mut(8) {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    chunk.copy_from_slice(&rng.to_le_bytes()[..chunk.len()]);
                }
                buf[0] = (buf[0] & 0x3f) | 0x40;
                buf[1..1 + dcid.len()].copy_from_slice(&dcid);
                let len = 40 + (rng % 1261) as usize;
                if s.send(&buf[..len]).is_ok() {
                    sent += 1;
                }
            }
        }
        sent
    })
    .unwrap()
}

#[test]
fn a_flood_of_garbage_quic_short_headers_at_the_proxy_is_counted_and_a_tunnel_download_goes_on_byte_exact(
) {
    use mimiq_perf::masque::{self, addr as m, start_ip_client, stop_client, ProxyProc};
    require_root();
    let mut tb = Testbed::new().unwrap();
    masque::build(&mut tb).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let proxy = ProxyProc::start(&tb, "p", dir.path(), "0.0.0.0:4433", "").unwrap();
    let (mut client, _) = start_ip_client(&tb).unwrap();
    let before = proxy.fresh_stats().unwrap();
    let dropped_before = udp_rcvbuf_errors(&tb, "p") + backlog_drops();
    let target: SocketAddr = format!("{}:4433", m::PROXY_V4).parse().unwrap();
    let listen: SocketAddr = format!("{}:9000", m::SERVER_V4).parse().unwrap();
    let ((got, exact), sent) = std::thread::scope(|scope| {
        let tb = &tb;
        let until = Instant::now() + Duration::from_secs(6);
        let download =
            scope.spawn(move || pattern_download(tb, "s", listen, "c", u64::MAX, Some(until)));
        // Random connection IDs: none matches a connection.
        let sent = short_header_flood(tb, target, &[]);
        (download.join().unwrap().unwrap(), sent)
    });
    assert!(exact, "a byte of the download differs");
    assert!(got > 0);
    assert!(sent > 10_000, "the flood sent {sent} datagrams");
    // Every garbage datagram is either counted by the proxy (no connection has its ID) or was
    // dropped by the kernel (a full receive buffer or input backlog) before the proxy read it.
    let s = accounted(
        &tb,
        &proxy,
        "unknown_connection",
        &before,
        dropped_before,
        sent,
    );
    assert_eq!(s["connections_accepted"], 1, "{s}");
    let report = stop_client(&mut client).unwrap();
    assert_eq!(report["quic_send_errors"], 0, "{report}");
    eprintln!(
        "flood: {sent} datagrams, {} counted as unknown_connection; download {got} bytes, exact",
        s["unknown_connection"]
    );
}

/// `GET /metrics` of the allocator on the single box's switch host.
fn allocator_metrics(tb: &Testbed) -> String {
    tb.http_get("sw", "127.0.0.1:9364", "/metrics")
        .unwrap_or_else(|e| panic!("scrape: {e}"))
}

/// The value of the metric line that starts with `name` (labels included), 0 if absent.
fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn an_allocation_flood_with_rotating_macs_on_one_port_leaves_the_pool_to_the_other_port() {
    use mimiq_allocator::proto::{AllocRequest, ClientMsg};
    use mimiq_perf::capture::inject_frames;
    use mimiq_perf::singlebox::{start_with, Options, PORT_CAP};
    require_root();
    // Leases whose client sent nothing for 5 s end early (c1 sends well within that of its
    // grant, however loaded the machine).
    let SingleBox {
        tb,
        mut allocator,
        switch,
        dir,
    } = start_with(
        &LONG,
        &Options {
            reclaim_silent_ms: 5_000,
            ..Options::default()
        },
    );
    let gateway_mac = mimiq_dataplane::config::parse_mac(&mac(&tb, "sw", "cl0")).unwrap();
    let rss_before = rss_kb(switch.proc.pid());
    // c3, alone on the switch's second client port, asks for four IPv4 addresses at a time
    // from a new MAC (and link-local address) in every request, 1,000 requests a second for
    // 10 s: ten times the pool.
    let per_second = 1_000u64;
    let flood_for = Duration::from_secs(10);
    let flood = {
        let (mut i, start) = (0u64, Instant::now());
        inject_frames(&tb, "c3", "eth0", move || {
            if start.elapsed() >= flood_for {
                return None;
            }
            let due = start + Duration::from_micros(i * 1_000_000 / per_second);
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            i += 1;
            let n = i.to_be_bytes();
            let src_mac = [0x02, 0x66, n[4], n[5], n[6], n[7]];
            let mut src_ip = [0u8; 16];
            src_ip[..2].copy_from_slice(&[0xfe, 0x80]);
            src_ip[12..].copy_from_slice(&n[4..]);
            let mut request = Vec::new();
            ClientMsg::AllocRequest(AllocRequest {
                family: Family::V4,
                count: 4,
                nonce: [n[7]; 16],
            })
            .emit(i as u32, &mut request)
            .unwrap();
            let mut frame = Vec::new();
            etherparse::PacketBuilder::ethernet2(src_mac, gateway_mac)
                .ipv6(
                    src_ip,
                    "fe80::1".parse::<std::net::Ipv6Addr>().unwrap().octets(),
                    64,
                )
                .udp(40000, 6363)
                .write(&mut frame, &request)
                .unwrap();
            Some(frame)
        })
        .unwrap()
    };
    // Once the flood has had three seconds (the port's burst of new MACs and more), c1 on the
    // first port gets an address and downloads through the switch while it goes on.
    std::thread::sleep(Duration::from_secs(3));
    let granted = allocate(&tb, "c1", Family::V4);
    use_address(&tb, "c1", granted.addr);
    let listen: SocketAddr = format!("{}:9000", addr::OUT_V4).parse().unwrap();
    let until = Instant::now() + Duration::from_secs(4);
    let (got, exact) = pattern_download(&tb, "out", listen, "c1", u64::MAX, Some(until)).unwrap();
    let sent = flood.join().unwrap().unwrap().unwrap();
    assert!(exact, "a byte of the download differs");
    assert!(got > 0);
    assert!(sent > 5_000, "the flood sent {sent} requests");
    // What the allocator holds: the victim's address through port 0 (assigned: it sent, and
    // the switch said so), and at most the cap through port 1 (each grant is all four
    // addresses or none), whose silent MACs' leases end 5 s after their grant.
    let bin = bin_path("mimiq-allocator").unwrap();
    let config = dir.path().join("allocator.toml");
    let out = tb
        .exec_ok(
            "sw",
            &[
                bin.to_str().unwrap(),
                "leases",
                "--config",
                config.to_str().unwrap(),
            ],
        )
        .unwrap();
    let leases = String::from_utf8_lossy(&out.stdout).into_owned();
    let on_port = |p: &str| leases.lines().filter(|l| l.contains(p)).count() as u32;
    let victim = format!("{} ", granted.addr);
    assert!(
        leases
            .lines()
            .any(|l| l.starts_with(&victim) && l.contains(" port=0 assigned ")),
        "{leases}"
    );
    let attacker = on_port(" port=1 ");
    assert!(attacker <= PORT_CAP, "{attacker} leases through port 1");
    let metrics = allocator_metrics(&tb);
    let refused = metric(
        &metrics,
        "mimiq_allocator_port_refusals_total{reason=\"new_mac_rate\"}",
    ) + metric(
        &metrics,
        "mimiq_allocator_port_refusals_total{reason=\"port_cap\"}",
    );
    assert!(refused > 0, "{metrics}");
    let reclaimed = metric(&metrics, "mimiq_allocator_reclaimed_silent_total");
    // The port's first grants (up to its cap) were all silent.
    assert!(reclaimed > 0, "{metrics}");
    let rss_after = rss_kb(switch.proc.pid());
    assert!(
        rss_after < rss_before + 8 * 1024,
        "switch RSS {rss_before} KB -> {rss_after} KB"
    );
    eprintln!(
        "allocation flood: {sent} requests from as many MACs on port 1; {attacker} addresses held through it, {reclaimed} reclaimed from silent MACs, {refused} refused by port security; c1 on port 0 got {} and downloaded {got} bytes, exact",
        granted.addr
    );
    drop(switch);
    allocator.stop(Duration::from_secs(5));
}

#[test]
fn ip_in_ip_from_a_non_edge_address_at_rate_is_dropped_and_counted_and_never_reaches_the_client() {
    use mimiq_dataplane::wire::ipip::{encap_frame, Outer, Span};
    use mimiq_perf::capture::{count_frames, inject_frames};
    require_root();
    let SingleBox {
        tb,
        mut allocator,
        switch,
        dir: _dir,
    } = start(&LONG);
    let granted = allocate(&tb, "c1", Family::V4);
    use_address(&tb, "c1", granted.addr);
    let IpAddr::V4(c1) = granted.addr else {
        unreachable!()
    };
    let parse = mimiq_dataplane::config::parse_mac;
    let (edge_mac, access_mac) = (
        parse(&mac(&tb, "sw", "int1")).unwrap(),
        parse(&mac(&tb, "sw", "int0")).unwrap(),
    );
    // What the edge would send c1 (an IPv4 datagram to UDP port 9999, in an outer IPv6
    // header to the access switch's internal address), but from another internal address.
    let frame = {
        let mut inner = vec![0u8; 40];
        etherparse::PacketBuilder::ethernet2(edge_mac, access_mac)
            .ipv4([203, 0, 113, 5], c1.octets(), 64)
            .udp(40000, 9999)
            .write(&mut inner, &[0x5a; 64])
            .unwrap();
        let outer = Outer::V6 {
            src: "fd00:ffff::66".parse().unwrap(),
            dst: "fd00:ffff::a".parse().unwrap(),
            hop_limit: 64,
        };
        let end = inner.len();
        let span = encap_frame(&mut inner, Span { start: 40, end }, &outer).unwrap();
        inner[span.start..span.end].to_vec()
    };
    let to_9999 = |f: &[u8]| match etherparse::SlicedPacket::from_ethernet(f) {
        Ok(p) => {
            matches!(&p.transport, Some(etherparse::TransportSlice::Udp(u)) if u.destination_port() == 9999)
        }
        Err(_) => false,
    };
    let at_c1 = count_frames(&tb, "c1", "eth0", Duration::from_secs(10), to_9999).unwrap();
    let before = switch.stats_settled(Duration::from_secs(5)).unwrap();
    let rss_before = rss_kb(switch.proc.pid());
    let listen: SocketAddr = format!("{}:9000", addr::OUT_V4).parse().unwrap();
    let ((got, exact), sent) = std::thread::scope(|scope| {
        let tb = &tb;
        let until = Instant::now() + Duration::from_secs(6);
        let download =
            scope.spawn(move || pattern_download(tb, "out", listen, "c1", u64::MAX, Some(until)));
        // Five seconds of forged tunnel packets, as fast as a packet socket sends them, into
        // the access switch's uplink (from the edge's side of the internal link).
        let end = Instant::now() + Duration::from_secs(5);
        let storm = inject_frames(tb, "sw", "int1", move || {
            (Instant::now() < end).then(|| frame.clone())
        })
        .unwrap();
        let sent = storm.join().unwrap().unwrap().unwrap();
        (download.join().unwrap().unwrap(), sent)
    });
    assert!(sent > 10_000, "the storm sent {sent} frames");
    assert!(exact, "a byte of the download differs");
    assert!(got > 0);
    let after = switch
        .stats_until(Duration::from_secs(10), |s| {
            match s.drops("not_from_edge") - before.drops("not_from_edge") {
                n if n > 10_000 => Ok(()),
                n => Err(format!("{n} not_from_edge so far: {}", s.drops_summary())),
            }
        })
        .unwrap_or_else(|e| panic!("the forged tunnel packets are counted: {e}"));
    let seen_at_c1 = at_c1.join().unwrap().unwrap().unwrap();
    assert_eq!(seen_at_c1, 0, "forged tunnel packets reached c1");
    let rss_after = rss_kb(switch.proc.pid());
    assert!(
        rss_after < rss_before + 8 * 1024,
        "switch RSS {rss_before} KB -> {rss_after} KB"
    );
    eprintln!(
        "ip-in-ip storm: {sent} frames sent, {} not_from_edge drops, 0 at c1; download {got} bytes, exact",
        after.drops("not_from_edge") - before.drops("not_from_edge")
    );
    drop(switch);
    allocator.stop(Duration::from_secs(5));
}

#[test]
fn garbled_short_headers_to_a_live_connection_id_at_rate_are_counted_and_the_tunnel_goes_on() {
    use mimiq_perf::capture::record_frames;
    use mimiq_perf::masque::{self, addr as m, start_ip_client, stop_client, ProxyProc};
    require_root();
    let mut tb = Testbed::new().unwrap();
    masque::build(&mut tb).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let proxy = ProxyProc::start(&tb, "p", dir.path(), "0.0.0.0:4433", "").unwrap();
    let (mut client, _) = start_ip_client(&tb).unwrap();
    let target: SocketAddr = format!("{}:4433", m::PROXY_V4).parse().unwrap();
    let listen: SocketAddr = format!("{}:9000", m::SERVER_V4).parse().unwrap();
    // The client's connection ID at the proxy, from a short-header datagram on the wire (RFC
    // 9000 §17.3.1: first bit 0, then the destination ID, of the length the proxy issues).
    let cid_len = mimiq_masque::quic::CID_LEN;
    let short_header_to_proxy = move |f: &[u8]| match etherparse::SlicedPacket::from_ethernet(f) {
        Ok(p) => matches!(&p.transport, Some(etherparse::TransportSlice::Udp(u))
            if u.destination_port() == 4433 && u.payload().len() > 1 + cid_len && u.payload()[0] & 0x80 == 0),
        Err(_) => false,
    };
    let ((got, exact), sent, before, dropped_before) = std::thread::scope(|scope| {
        let tb = &tb;
        let until = Instant::now() + Duration::from_secs(7);
        let download =
            scope.spawn(move || pattern_download(tb, "s", listen, "c", u64::MAX, Some(until)));
        let frames = record_frames(tb, "p", "p0", Duration::from_secs(1), short_header_to_proxy)
            .unwrap()
            .join()
            .unwrap()
            .unwrap()
            .unwrap();
        let frame = frames
            .first()
            .expect("a short-header datagram of the tunnel");
        let p = etherparse::SlicedPacket::from_ethernet(&frame.bytes).unwrap();
        let Some(etherparse::TransportSlice::Udp(u)) = p.transport else {
            unreachable!()
        };
        let dcid = u.payload()[1..1 + cid_len].to_vec();
        let before = proxy.fresh_stats().unwrap();
        let dropped_before = udp_rcvbuf_errors(tb, "p") + backlog_drops();
        // That ID: none decrypts.
        let sent = short_header_flood(tb, target, &dcid);
        (
            download.join().unwrap().unwrap(),
            sent,
            before,
            dropped_before,
        )
    });
    assert!(exact, "a byte of the download differs");
    assert!(got > 0);
    assert!(sent > 10_000, "the flood sent {sent} datagrams");
    let counter = |s: &serde_json::Value, k: &str| s[k].as_u64().unwrap_or(0);
    // Every garbled datagram is counted by the proxy as one quiche read nothing of, or was
    // dropped by the kernel before the proxy read it.
    let s = accounted(
        &tb,
        &proxy,
        "quic_packets_dropped",
        &before,
        dropped_before,
        sent,
    );
    assert_eq!(s["connections_accepted"], 1, "{s}");
    assert_eq!(
        counter(&s, "peer_migrations"),
        counter(&before, "peer_migrations"),
        "a forged datagram from another port taken as a migration: {s}"
    );
    let report = stop_client(&mut client).unwrap();
    assert_eq!(report["quic_send_errors"], 0, "{report}");
    eprintln!(
        "garbled live-ID flood: {sent} datagrams, {} counted as quic_packets_dropped; download {got} bytes, exact",
        counter(&s, "quic_packets_dropped") - counter(&before, "quic_packets_dropped")
    );
}
