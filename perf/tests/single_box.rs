//! The MIMIQ single box, for real: clients get addresses from the allocator through the access
//! switch's relay, the allocator pushes the bindings to both roles over its rule stream, and an
//! outside host reaches each client at its current address through edge (alias/exact lookup,
//! IP-in-IP) and access (decapsulation, binding lookup); spoofed sources are dropped.

use std::time::{Duration, Instant};

use mimiq_allocator::client::ClientError;
use mimiq_allocator::proto::Status;
use mimiq_allocator::Family;
use mimiq_perf::capture::inject_frames;
use mimiq_perf::singlebox::{
    allocate, allocator_config, mac, release, start, start_allocator, start_with, try_allocate,
    use_address, workers_toml, Granted, Options, SingleBox, Times, EDGE_KEY, KEY, LONG,
};
use mimiq_perf::switch::Switch;
use mimiq_perf::testbed::topology::{self, single_box_addr as addr};
use mimiq_perf::testbed::{bin_path, eventually, require_root, LinkOpts, Proc, Testbed};
use mimiq_perf::traffic::{iperf3_with, ping};

#[test]
fn clients_allocate_through_the_switch_and_the_outside_reaches_each_at_its_address_and_spoofing_is_dropped(
) {
    require_root();
    let SingleBox {
        tb,
        mut allocator,
        switch,
        dir: _dir,
    } = start(&LONG);

    let mut addrs = Vec::new();
    for client in ["c1", "c2"] {
        let a = allocate(&tb, client, Family::V4).addr;
        assert!(a.to_string().starts_with("198.18.1."), "{a}");
        use_address(&tb, client, a);
        addrs.push(a);
    }
    assert_ne!(addrs[0], addrs[1]);

    // Passive learning: while the outside reaches the clients, the switch never asks who has a
    // client address (no ARP request, no neighbour solicitation sent by the gateway MAC).
    let gateway = mimiq_dataplane::config::parse_mac(&mac(&tb, "sw", "cl0")).unwrap();
    let asked = move |f: &[u8]| {
        let from_switch = f.len() > 54 && f[6..12] == gateway;
        let arp_request = f[12..14] == [0x08, 0x06] && f[20..22] == [0, 1];
        let solicitation = f[12..14] == [0x86, 0xdd] && f[20] == 58 && f[54] == 135;
        from_switch && (arp_request || solicitation)
    };
    let answered = move |f: &[u8]| {
        f.len() > 22 && f[6..12] == gateway && f[12..14] == [0x08, 0x06] && f[20..22] == [0, 2]
    };
    let asked =
        mimiq_perf::capture::count_frames(&tb, "lan", "sw", Duration::from_secs(3), asked).unwrap();
    let answers =
        mimiq_perf::capture::count_frames(&tb, "lan", "sw", Duration::from_secs(3), answered)
            .unwrap();
    // The clients ask for the gateway afresh, so there are answers to see.
    for c in ["c1", "c2"] {
        tb.exec_ok(c, &["ip", "neigh", "flush", "all"]).unwrap();
    }
    // The outside reaches each client at its address: edge → IP-in-IP → access → the right
    // client (the other one does not have the address and would not answer).
    // (The bindings reach the switch on the allocator's rule stream a moment after the
    // allocator answered: until then a request finds no route.)
    for a in &addrs {
        ping_until_answered(&tb, &a.to_string(), 5, Duration::from_secs(5)).unwrap_or_else(|e| {
            panic!(
                "{e}; switch: {}; stats: {:?}",
                switch.proc.describe(),
                switch.stats().map(|s| s.0)
            )
        });
    }

    assert_eq!(
        asked.join().unwrap().unwrap().unwrap(),
        0,
        "the switch resolved a client address"
    );
    assert!(
        answers.join().unwrap().unwrap().unwrap() >= 1,
        "the gateway answered ARP"
    );

    // A source the allocator did not bind to c1 is dropped at the access switch.
    let before = switch.stats().unwrap().drops("spoofed_source");
    // An address of the pool that is neither client's.
    let spoof = (250..255)
        .map(|i| format!("198.18.1.{i}"))
        .find(|a| addrs.iter().all(|x| x.to_string() != *a))
        .unwrap();
    tb.exec_ok(
        "c1",
        &["ip", "addr", "add", &format!("{spoof}/32"), "dev", "eth0"],
    )
    .unwrap();
    // Watch the outside link: nothing from the spoofed source may leave the edge.
    let spoof_ip: std::net::Ipv4Addr = spoof.parse().unwrap();
    let leaked =
        mimiq_perf::capture::count_frames(&tb, "out", "eth0", Duration::from_secs(4), move |f| {
            f.len() >= 34 && f[12..14] == [0x08, 0x00] && f[26..30] == spoof_ip.octets()
        })
        .unwrap();
    let spoofed = tb
        .exec(
            "c1",
            &["ping", "-c", "3", "-W", "1", "-I", &spoof, addr::OUT_V4],
        )
        .unwrap();
    assert!(
        !spoofed.status.success(),
        "a spoofed source must not get through"
    );
    assert_eq!(
        leaked.join().unwrap().unwrap().unwrap(),
        0,
        "a spoofed packet left the outside port"
    );
    // Three echo requests from the spoofed source: three drops, once the switch publishes them.
    switch
        .stats_until(Duration::from_secs(10), |s| {
            let after = s.drops("spoofed_source");
            if after >= before + 3 {
                Ok(())
            } else {
                Err(format!("spoofed_source {before} -> {after}"))
            }
        })
        .unwrap_or_else(|e| panic!("each spoofed request is a counted drop: {e}"));

    drop(switch);
    allocator.stop(Duration::from_secs(5));
}

#[test]
fn ipv6_routes_by_alias_across_epochs_and_addresses_stop_routing_after_lifetime_plus_t_remove() {
    require_root();
    // t_ip 4–4.5 s, t_remove 3 s, t_sid 3.75 s, k = 3: an epoch's aliases route for 11.25 s ≥
    // t_sid + t_ip + t_remove (the allocator's bound), and every lifetime is longer than an
    // epoch, so each address routes across a change of alias. t_remove is seconds long so that
    // both its ends are checked with seconds to spare.
    const T_REMOVE: Duration = Duration::from_secs(3);
    let SingleBox {
        tb,
        mut allocator,
        switch,
        dir: _dir,
    } = start(&Times(4_000, 4_500, 3_000, 3_750, addr::POOL_V4));
    let v6 = allocate(&tb, "c1", Family::V6);
    let v4 = allocate(&tb, "c2", Family::V4);
    assert!(v6.addr.to_string().starts_with("fd00:1:"), "{}", v6.addr);
    use_address(&tb, "c1", v6.addr);
    use_address(&tb, "c2", v4.addr);
    let stats = || switch.stats().map(|s| s.0);
    // The bindings reach the switch on the allocator's rule stream a moment after the
    // allocator answered.
    for g in [&v6, &v4] {
        ping_until_answered(&tb, &g.addr.to_string(), 1, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("{} never answered: {e}; {:?}", g.addr, stats()));
    }
    // Return traffic keeps arriving while the alias epochs rotate, until a lifetime ends.
    let first_end = v6.ends_no_earlier_than().min(v4.ends_no_earlier_than());
    while Instant::now() < first_end {
        for g in [&v6, &v4] {
            ping(&tb, "out", &g.addr.to_string(), 1)
                .unwrap_or_else(|e| panic!("{} within its lifetime: {e}; {:?}", g.addr, stats()));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // Each address on its own lease: once its lifetime has surely ended, and seconds before
    // its t_remove can have, packets in flight to it are still delivered.
    let mut by_end = [v6, v4];
    by_end.sort_by_key(Granted::ends_no_later_than);
    for g in &by_end {
        if let Some(left) = g
            .ends_no_later_than()
            .checked_duration_since(Instant::now())
        {
            std::thread::sleep(left);
        }
        let drain_left =
            (g.ends_no_earlier_than() + T_REMOVE).saturating_duration_since(Instant::now());
        ping(&tb, "out", &g.addr.to_string(), 1).unwrap_or_else(|e| {
            panic!(
                "{} within t_remove after its lifetime ({drain_left:?} of it left): {e}",
                g.addr
            )
        });
    }
    // After lifetime + t_remove, neither routes (give the switch's clock and a loaded machine
    // a few seconds), and the edge counts the request that found no route: one to each.
    let before = switch.stats().unwrap().drops("no_route");
    for g in &by_end {
        let removed_by = g.ends_no_later_than() + T_REMOVE;
        if let Some(left) = removed_by.checked_duration_since(Instant::now()) {
            std::thread::sleep(left);
        }
        eventually(Duration::from_secs(5), || {
            match ping(&tb, "out", &g.addr.to_string(), 1) {
                Err(_) => Ok(()),
                Ok(_) => Err(format!(
                    "answered {:?} after lifetime + t_remove",
                    Instant::now().saturating_duration_since(removed_by)
                )),
            }
        })
        .unwrap_or_else(|e| panic!("{} still routes: {e}", g.addr));
    }
    switch
        .stats_until(Duration::from_secs(10), |s| {
            let after = s.drops("no_route");
            if after >= before + 2 {
                Ok(())
            } else {
                Err(format!("no_route {before} -> {after}"))
            }
        })
        .unwrap_or_else(|e| panic!("each request to an ended address is a no_route drop: {e}"));
    drop(switch);
    allocator.stop(Duration::from_secs(5));
}

#[test]
fn when_an_address_moves_to_another_client_return_traffic_follows_it() {
    require_root();
    // A pool with one usable address (198.18.1.2: .0 and .3 are network and broadcast, .1 the
    // gateway): the second client can only get the address the first one gave back. t_remove
    // is seconds long, so that the address is asked for again well before it may be reissued.
    const T_REMOVE: Duration = Duration::from_secs(3);
    let SingleBox {
        tb,
        mut allocator,
        switch,
        dir: _dir,
    } = start(&Times(60_000, 60_000, 3_000, 60_000, "198.18.1.0/30"));
    let a = allocate(&tb, "c1", Family::V4).addr;
    assert_eq!(a.to_string(), "198.18.1.2");
    use_address(&tb, "c1", a);
    // The binding reaches the switch on the allocator's rule stream a moment after the
    // allocator answered c1: the first request can find no route yet.
    ping_until_answered(&tb, "198.18.1.2", 3, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("c1 never answered: {e}"));
    let released_at = Instant::now();
    release(&tb, "c1", a);
    tb.exec_ok("c1", &["ip", "addr", "del", "198.18.1.2/32", "dev", "eth0"])
        .unwrap();
    // The address drains for t_remove (its rules stay for packets in flight), and only then
    // is it free: until then the allocator has none to give. (Its clock counts whole
    // milliseconds, hence the millisecond of slack.)
    let not_before = released_at + T_REMOVE - Duration::from_millis(1);
    let granted_in_time = |g: Granted| {
        assert!(
            g.granted_at >= not_before,
            "{} reissued {:?} after its release, before t_remove",
            g.addr,
            g.granted_at - released_at
        );
        g
    };
    let b = match try_allocate(&tb, "c2", Family::V4) {
        Err(ClientError::Refused(Status::PoolExhausted)) => {
            eventually(T_REMOVE + Duration::from_secs(10), || {
                try_allocate(&tb, "c2", Family::V4)
            })
            .unwrap_or_else(|e| panic!("the address was not reissued: {e}"))
        }
        // Only a machine that stalled for t_remove gets here, and then only after t_remove.
        Ok(g) => g,
        Err(e) => panic!("right after the release, the pool should be exhausted: {e}"),
    };
    let b = granted_in_time(b);
    assert_eq!(b.addr, a, "the only address, now free again");
    use_address(&tb, "c2", b.addr);
    // c1 no longer has the address, so an answer can only come from c2. (c2 resolves its
    // gateway on its first reply; give that a moment on a loaded machine.)
    ping_until_answered(&tb, "198.18.1.2", 3, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("traffic did not follow the binding to c2: {e}"));
    drop(switch);
    allocator.stop(Duration::from_secs(5));
}

/// Also: this edge resolves its outside next hop by IPv6 neighbour discovery.
#[test]
fn access_and_edge_run_as_separate_processes_on_separate_hosts() {
    require_root();
    let mut split = Split::start(1);
    split.allocator.stop(Duration::from_secs(5));
}

#[test]
fn access_and_edge_serve_two_queues_each_with_a_worker_per_queue() {
    require_root();
    let mut split = Split::start(2);
    let a = split.client;
    let ports = [(&split.access, "cl0"), (&split.edge, "out0")];
    two_workers_carry_every_flow(&mut split.tb, &ports, "c1", a);
    let gateway = mac(&split.tb, "swa", "cl0");
    spoofed_sources_are_dropped_exactly(&split.tb, &split.access, "c1", &gateway);
    // Both edge workers forward: each learned the next hop, whichever queue its reply came on.
    let s = split.edge.stats().unwrap();
    let per_worker = s.port_named_per_worker("out0", "tx_packets");
    assert!(per_worker.iter().all(|&n| n > 100), "{per_worker:?}");
    // The access and edge configs, with a queue that the links do not have.
    let bad = split.dir.path().join("bad.toml");
    let text = std::fs::read_to_string(split.dir.path().join("access.toml")).unwrap();
    let text = text.replace(
        &format!("workers = {}", workers_toml(2)),
        "workers = [{ queue = 0 }, { queue = 5 }]",
    );
    std::fs::write(&bad, text).unwrap();
    let bin = bin_path("mimiq-switch").unwrap();
    let out = split
        .tb
        .exec(
            "swa",
            &[bin.to_str().unwrap(), "check-config", bad.to_str().unwrap()],
        )
        .unwrap();
    assert!(out.status.success(), "the config itself is valid");
    let Split {
        tb,
        mut allocator,
        access,
        ..
    } = split;
    drop(access);
    let out = tb
        .exec(
            "swa",
            &[
                bin.to_str().unwrap(),
                "run",
                "--config",
                bad.to_str().unwrap(),
            ],
        )
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("interface cl0 has no queue 5: it has 2 RX queue(s)"),
        "{stderr}"
    );
    allocator.stop(Duration::from_secs(5));
}

#[test]
fn the_single_box_serves_two_queues_with_a_worker_per_queue() {
    require_root();
    let SingleBox {
        mut tb,
        mut allocator,
        switch,
        dir,
    } = start_with(
        &LONG,
        &Options {
            queues: 2,
            ..Options::default()
        },
    );
    // c3, alone on cl1: between c1 and cl0, the bridge forwards on the queue a frame arrived
    // on (the kernel's recorded RX queue), not by flow.
    let a = allocate(&tb, "c3", Family::V4).addr;
    use_address(&tb, "c3", a);
    ping_until_answered(&tb, &a.to_string(), 3, Duration::from_secs(10)).unwrap();
    two_workers_carry_every_flow(&mut tb, &[(&switch, "cl1"), (&switch, "out0")], "c3", a);
    let gateway = mac(&tb, "sw", "cl0");
    spoofed_sources_are_dropped_exactly(&tb, &switch, "c3", &gateway);
    let s = switch.stats().unwrap();
    for port in ["int0", "int1"] {
        let sent = s.port_named(port, "tx_packets");
        assert_eq!(sent, 0, "the roles meet in memory, not on {port}");
    }

    // `mimiq-switch stats` sums the workers (the first table is the sum).
    let bin = bin_path("mimiq-switch").unwrap();
    let stats_path = dir.path().join("stats.json");
    let summed = eventually(Duration::from_secs(10), || {
        let out = tb
            .exec_ok(
                "sw",
                &[
                    bin.to_str().unwrap(),
                    "stats",
                    "--stats-path",
                    stats_path.to_str().unwrap(),
                ],
            )
            .map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let s = switch.stats()?;
        let total = |line: &str| line.split_whitespace().nth(1)?.parse::<u64>().ok();
        let out0 = text.lines().find(|l| l.trim_start().starts_with("out0 "));
        match out0.and_then(total) {
            Some(n) if n == s.port_named("out0", "rx_packets") => Ok(text),
            other => Err(format!("{other:?} in {text}")),
        }
    })
    .unwrap_or_else(|e| panic!("the summed table: {e}"));
    assert!(summed.contains("all 2 workers: "), "{summed}");
    allocator.stop(Duration::from_secs(5));
}

/// Sixteen TCP streams from `out` to `client` at `a` (and their acknowledgements back): the
/// senders' flow hash spreads them over both queues (all on one: a chance of 2 in 65536), and
/// every stream completes, so each worker forwards in both directions and has every rule. Each
/// `(switch, port)` must have received on both of its workers.
fn two_workers_carry_every_flow(
    tb: &mut Testbed,
    ports: &[(&Switch, &str)],
    client: &str,
    a: std::net::IpAddr,
) {
    let before: Vec<Vec<u64>> = ports
        .iter()
        .map(|(s, port)| s.stats().unwrap().port_named_per_worker(port, "rx_packets"))
        .collect();
    let run = iperf3_with(tb, "out", client, &a.to_string(), 2, &["-P", "16"])
        .unwrap_or_else(|e| panic!("iperf3 through two workers: {e}"));
    assert!(run.received_bytes > 0, "{run:?}");
    for ((switch, port), before) in ports.iter().zip(before) {
        switch
            .stats_until(Duration::from_secs(10), |s| {
                let now = s.port_named_per_worker(port, "rx_packets");
                let gained: Vec<u64> = now.iter().zip(&before).map(|(n, b)| n - b).collect();
                if gained.len() == 2 && gained.iter().all(|&n| n > 100) {
                    Ok(())
                } else {
                    Err(format!("{port} received per worker: {gained:?}"))
                }
            })
            .unwrap_or_else(|e| panic!("both queues carried traffic: {e}"));
        let s = switch.stats().unwrap();
        let applied = s.per_worker("updates_applied");
        assert!(
            applied.windows(2).all(|w| w[0] == w[1]) && applied[0] > 0,
            "every worker applied every update: {applied:?}"
        );
    }
}

/// 2,000 frames from `host`'s `eth0` to the gateway's MAC, from an address no one was given,
/// over 2,000 flows: every one is counted as a spoofed source, over both workers.
fn spoofed_sources_are_dropped_exactly(tb: &Testbed, switch: &Switch, host: &str, gateway: &str) {
    const FRAMES: u16 = 2000;
    let before = switch.stats().unwrap().drops("spoofed_source");
    let parse = mimiq_dataplane::config::parse_mac;
    let (src_mac, gateway) = (
        parse(&mac(tb, host, "eth0")).unwrap(),
        parse(gateway).unwrap(),
    );
    let mut port = 0u16;
    let injector = inject_frames(tb, host, "eth0", move || {
        port += 1;
        if port > FRAMES {
            return None;
        }
        let mut frame = Vec::new();
        etherparse::PacketBuilder::ethernet2(src_mac, gateway)
            .ipv4([10, 99, 0, 1], [198, 51, 100, 7], 64)
            .udp(port, 9)
            .write(&mut frame, b"spoofed")
            .ok()?;
        Some(frame)
    })
    .unwrap();
    let sent = injector.join().unwrap().unwrap().unwrap();
    assert_eq!(sent, u64::from(FRAMES));
    let s = switch
        .stats_until(Duration::from_secs(10), |s| {
            match s.drops("spoofed_source") - before {
                n if n == u64::from(FRAMES) => Ok(()),
                n => Err(format!("{n} of {FRAMES} spoofed frames counted")),
            }
        })
        .unwrap_or_else(|e| panic!("{e}"));
    let per_worker: Vec<u64> = s.0["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["drops"]["spoofed_source"].as_u64().unwrap_or(0))
        .collect();
    assert!(per_worker.iter().all(|&n| n > 0), "{per_worker:?}");
}

/// The access and edge roles as separate processes on separate hosts (topology::split), with
/// the allocator on the access host and a client with an address.
struct Split {
    tb: Testbed,
    allocator: Proc,
    access: Switch,
    edge: Switch,
    client: std::net::IpAddr,
    dir: tempfile::TempDir,
}

impl Split {
    /// Every link with `queues` queues, each switch with a worker per queue; returns once the
    /// outside reaches the client.
    fn start(queues: u32) -> Split {
        let mut tb = Testbed::new().unwrap();
        let links = LinkOpts {
            queues,
            ..LinkOpts::default()
        };
        topology::split_with(&mut tb, links).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let cfg = allocator_config(dir.path(), &LONG);
        let allocator = start_allocator(&tb, "swa", &cfg);
        let workers = workers_toml(queues);
        let access_cfg = dir.path().join("access.toml");
        std::fs::write(
            &access_cfg,
            format!(
                r#"role = "access"
stats_path = "{stats}"
stats_interval_ms = 50
workers = {workers}
[access]
sid = 1
clients = "cl0"
uplink = "up0"
edge_mac = "{edge_mac}"
gateway_v4 = "{gw}"
internal = "fd00:ffff::a"
edge_internal = "fd00:ffff::e"
allocator_relay = "127.0.0.1:6364"
allocator_rules = "127.0.0.1:6365"
key_hex = "{KEY}"
"#,
                stats = dir.path().join("a.json").display(),
                edge_mac = mac(&tb, "swe", "in0"),
                gw = addr::GATEWAY_V4,
            ),
        )
        .unwrap();
        let edge_cfg = dir.path().join("edge.toml");
        std::fs::write(
            &edge_cfg,
            format!(
                r#"role = "edge"
stats_path = "{stats}"
stats_interval_ms = 50
workers = {workers}
[edge]
inside = "in0"
outside = "out0"
internal = "fd00:ffff::e"
access = [{{ sid = 1, internal = "fd00:ffff::a", mac = "{access_mac}" }}]
outside_next_hop = "{out_v6}"
outside_v4 = "{edge_v4}"
outside_v6 = ["{edge_v6}"]
v6_prefix = "{pool6}"
alias_k = 3
v4_pools = ["{pool}"]
allocator_rules = "198.18.250.1:6365"
switch_id = 100
key_hex = "{EDGE_KEY}"
"#,
                stats = dir.path().join("e.json").display(),
                access_mac = mac(&tb, "swa", "up0"),
                out_v6 = addr::OUT_V6,
                edge_v4 = addr::EDGE_OUT_V4,
                edge_v6 = addr::EDGE_OUT_V6,
                pool6 = addr::POOL_V6,
                pool = addr::POOL_V4,
            ),
        )
        .unwrap();
        let access = Switch::start(
            &tb,
            "swa",
            &["--config", access_cfg.to_str().unwrap()],
            &dir.path().join("a.json"),
        )
        .unwrap_or_else(|e| panic!("{e}; allocator: {}", allocator.describe()));
        let edge = Switch::start(
            &tb,
            "swe",
            &["--config", edge_cfg.to_str().unwrap()],
            &dir.path().join("e.json"),
        )
        .unwrap();
        let client = allocate(&tb, "c1", Family::V4).addr;
        use_address(&tb, "c1", client);
        // The edge is another process on another host with a rule stream of its own, started
        // just now: it may get the new binding (and resolve its next hop) a moment after the
        // access switch does. Once it has, every ping crosses.
        let updates = |s: &Switch| {
            s.stats().map_or(0, |s| {
                s.per_worker("updates_applied")
                    .into_iter()
                    .min()
                    .unwrap_or(0)
            })
        };
        eventually(Duration::from_secs(10), || {
            let (e, a) = (updates(&edge), updates(&access));
            if e >= a {
                Ok(())
            } else {
                Err(format!(
                    "the edge applied {e} updates, the access switch {a}"
                ))
            }
        })
        .unwrap_or_else(|e| panic!("the edge got the rules the access switch has: {e}"));
        ping_until_answered(&tb, &client.to_string(), 5, Duration::from_secs(10)).unwrap_or_else(
            |e| {
                panic!(
                    "{e}; access {:?}; edge {:?}",
                    access.stats().map(|s| s.0),
                    edge.stats().map(|s| s.0)
                )
            },
        );
        Split {
            tb,
            allocator,
            access,
            edge,
            client,
            dir,
        }
    }
}

/// Pings `addr` from `out`, `count` requests a round, until a round is answered in full, for
/// up to `within`; the last round's error then.
fn ping_until_answered(
    tb: &Testbed,
    addr: &str,
    count: u32,
    within: Duration,
) -> Result<(), mimiq_perf::testbed::TimedOut<String>> {
    eventually(within, || ping(tb, "out", addr, count).map(drop))
}
