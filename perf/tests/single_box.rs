//! The MIMIQ single box, for real: clients get addresses from the allocator through the access
//! switch's relay, the allocator pushes the bindings to both roles over its rule stream, and an
//! outside host reaches each client at its current address through edge (alias/exact lookup,
//! IP-in-IP) and access (decapsulation, binding lookup); spoofed sources are dropped.

use std::time::{Duration, Instant};

use mimiq_allocator::client::ClientError;
use mimiq_allocator::proto::Status;
use mimiq_allocator::Family;
use mimiq_perf::singlebox::{
    allocate, allocator_config, mac, release, start, try_allocate, use_address, Granted, SingleBox,
    Times, EDGE_KEY, KEY, LONG,
};
use mimiq_perf::switch::Switch;
use mimiq_perf::testbed::topology::{self, single_box_addr as addr};
use mimiq_perf::testbed::{bin_path, eventually, require_root, Testbed};
use mimiq_perf::traffic::ping;

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
    let mut tb = Testbed::new().unwrap();
    topology::split(&mut tb).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let allocator_bin = bin_path("mimiq-allocator").unwrap();
    let cfg = allocator_config(dir.path(), &LONG);
    let mut allocator = tb
        .spawn(
            "swa",
            &[
                allocator_bin.to_str().unwrap(),
                "run",
                "--config",
                cfg.to_str().unwrap(),
            ],
            false,
        )
        .unwrap();
    let access_cfg = dir.path().join("access.toml");
    std::fs::write(
        &access_cfg,
        format!(
            r#"role = "access"
stats_path = "{stats}"
stats_interval_ms = 50
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
    let a = allocate(&tb, "c1", Family::V4).addr;
    use_address(&tb, "c1", a);
    // The edge is another process on another host with a rule stream of its own, started just
    // now: it may get the new binding (and resolve its next hop) a moment after the access
    // switch does. Once it has, every ping crosses.
    let updates = |s: &Switch| {
        s.stats().map_or(0, |s| {
            s.0["workers"][0]["updates_applied"].as_u64().unwrap_or(0)
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
    ping_until_answered(&tb, &a.to_string(), 5, Duration::from_secs(10)).unwrap_or_else(|e| {
        panic!(
            "{e}; access {:?}; edge {:?}",
            access.stats().map(|s| s.0),
            edge.stats().map(|s| s.0)
        )
    });
    drop((access, edge));
    allocator.stop(Duration::from_secs(5));
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
