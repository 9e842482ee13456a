//! The MIMIQ single box, for real: clients get addresses from the allocator through the access
//! switch's relay, the allocator pushes the bindings to both roles over its rule stream, and an
//! outside host reaches each client at its current address through edge (alias/exact lookup,
//! IP-in-IP) and access (decapsulation, binding lookup); spoofed sources are dropped.

use std::time::{Duration, Instant};

use mimiq_allocator::Family;
use mimiq_perf::singlebox::{
    allocate, allocator_config, mac, release, start, use_address, SingleBox, Times, EDGE_KEY, KEY,
    LONG,
};
use mimiq_perf::switch::Switch;
use mimiq_perf::testbed::topology::{self, single_box_addr as addr};
use mimiq_perf::testbed::{bin_path, require_root, Testbed};
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
        let (a, _) = allocate(&tb, client, Family::V4);
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
    for a in &addrs {
        ping(&tb, "out", &a.to_string(), 5).unwrap_or_else(|e| {
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
    let after = switch
        .stats_after(Duration::from_millis(200))
        .unwrap()
        .drops("spoofed_source");
    assert!(after >= before + 3, "spoofed_source {before} -> {after}");

    drop(switch);
    allocator.stop(Duration::from_secs(5));
}

#[test]
fn ipv6_routes_by_alias_across_epochs_and_addresses_stop_routing_after_lifetime_plus_t_remove() {
    require_root();
    // t_ip 3–3.5 s, t_remove 1 s, t_sid 2.5 s, k = 3: an epoch routes 7.5 s ≥ t_ip + t_remove.
    let SingleBox {
        tb,
        mut allocator,
        switch,
        dir: _dir,
    } = start(&Times(3_000, 3_500, 1_000, 2_500, addr::POOL_V4));
    let (v6, life6) = allocate(&tb, "c1", Family::V6);
    let (v4, life4) = allocate(&tb, "c2", Family::V4);
    assert!(v6.to_string().starts_with("fd00:1:"), "{v6}");
    let started = Instant::now();
    use_address(&tb, "c1", v6);
    use_address(&tb, "c2", v4);
    // Return traffic keeps arriving while the alias epochs rotate (every 2.5 s).
    while started.elapsed() < life6.min(life4) - Duration::from_millis(300) {
        ping(&tb, "out", &v6.to_string(), 1)
            .unwrap_or_else(|e| panic!("{e}; {:?}", switch.stats().map(|s| s.0)));
        ping(&tb, "out", &v4.to_string(), 1).unwrap();
        std::thread::sleep(Duration::from_millis(200));
    }
    // Between the end of the lifetime and t_remove later, packets in flight are still delivered.
    let grace = life6.max(life4) + Duration::from_millis(200);
    if let Some(left) = grace.checked_sub(started.elapsed()) {
        std::thread::sleep(left);
    }
    ping(&tb, "out", &v4.to_string(), 1)
        .unwrap_or_else(|e| panic!("within t_remove after the lifetime: {e}"));
    ping(&tb, "out", &v6.to_string(), 1)
        .unwrap_or_else(|e| panic!("within t_remove after the lifetime: {e}"));
    // After lifetime + t_remove, neither routes: the edge drops with no_route.
    let end = life6.max(life4) + Duration::from_millis(1_000 + 300);
    if let Some(left) = end.checked_sub(started.elapsed()) {
        std::thread::sleep(left);
    }
    let before = switch.stats().unwrap().drops("no_route");
    assert!(
        ping(&tb, "out", &v6.to_string(), 2).is_err(),
        "{v6} still routes after its lifetime + t_remove"
    );
    assert!(
        ping(&tb, "out", &v4.to_string(), 2).is_err(),
        "{v4} still routes after its lifetime + t_remove"
    );
    let after = switch
        .stats_after(Duration::from_millis(200))
        .unwrap()
        .drops("no_route");
    assert!(after >= before + 4, "no_route {before} -> {after}");
    drop(switch);
    allocator.stop(Duration::from_secs(5));
}

#[test]
fn when_an_address_moves_to_another_client_return_traffic_follows_it() {
    require_root();
    // A pool with one usable address (198.18.1.2: .0 and .3 are network and broadcast, .1 the
    // gateway): the second client can only get the address the first one gave back.
    let SingleBox {
        tb,
        mut allocator,
        switch,
        dir: _dir,
    } = start(&Times(60_000, 60_000, 1_000, 60_000, "198.18.1.0/30"));
    let (a, _) = allocate(&tb, "c1", Family::V4);
    assert_eq!(a.to_string(), "198.18.1.2");
    use_address(&tb, "c1", a);
    // The binding reaches the switch on the allocator's rule stream a moment after the
    // allocator answered c1: the first request can find no route yet.
    ping_until_answered(
        &tb,
        "198.18.1.2",
        3,
        Instant::now() + Duration::from_secs(5),
    )
    .unwrap_or_else(|e| panic!("c1 never answered: {e}"));
    release(&tb, "c1", a);
    tb.exec_ok("c1", &["ip", "addr", "del", "198.18.1.2/32", "dev", "eth0"])
        .unwrap();
    // Not reissued before t_remove has passed; then it is c2's.
    std::thread::sleep(Duration::from_millis(1_300));
    let (b, _) = allocate(&tb, "c2", Family::V4);
    assert_eq!(b, a, "the only address, now free again");
    use_address(&tb, "c2", b);
    // c1 no longer has the address, so an answer can only come from c2. (c2 resolves its
    // gateway on its first reply; give that a moment on a loaded machine.)
    ping_until_answered(
        &tb,
        "198.18.1.2",
        3,
        Instant::now() + Duration::from_secs(5),
    )
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
        &mut tb,
        "swa",
        &["--config", access_cfg.to_str().unwrap()],
        &dir.path().join("a.json"),
    )
    .unwrap_or_else(|e| panic!("{e}; allocator: {}", allocator.describe()));
    let edge = Switch::start(
        &mut tb,
        "swe",
        &["--config", edge_cfg.to_str().unwrap()],
        &dir.path().join("e.json"),
    )
    .unwrap();
    let (a, _) = allocate(&tb, "c1", Family::V4);
    use_address(&tb, "c1", a);
    // The edge is another process on another host with a rule stream of its own, started just
    // now: it may get the new binding (and resolve its next hop) a moment after the access
    // switch does. Once it has, every ping crosses.
    let updates = |s: &Switch| {
        s.stats().map_or(0, |s| {
            s.0["workers"][0]["updates_applied"].as_u64().unwrap_or(0)
        })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while updates(&edge) < updates(&access) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    ping_until_answered(&tb, &a.to_string(), 5, deadline).unwrap_or_else(|e| {
        panic!(
            "{e}; access {:?}; edge {:?}",
            access.stats().map(|s| s.0),
            edge.stats().map(|s| s.0)
        )
    });
    drop((access, edge));
    allocator.stop(Duration::from_secs(5));
}

/// Pings `addr` from `out`, `count` requests a round, until a round is answered in full or
/// `deadline` passes; the last round's error then.
fn ping_until_answered(
    tb: &Testbed,
    addr: &str,
    count: u32,
    deadline: Instant,
) -> Result<(), String> {
    loop {
        match ping(tb, "out", addr, count) {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}
