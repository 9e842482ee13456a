//! The server over real loopback sockets (127.0.0.1): protocol behaviour, publisher, metrics,
//! and the client library through a relay.

mod common;

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use mimiq_allocator::client::{AllocClient, ClientError};
use mimiq_allocator::config::Config;
use mimiq_allocator::proto::{self, ClientMsg, RelayReply, Release, Status};
use mimiq_allocator::server::{BoundAddrs, DropReason, Metrics, Server, Settings};
use mimiq_allocator::store::MemStore;
use mimiq_allocator::Family;

struct Running {
    addrs: BoundAddrs,
    metrics: std::sync::Arc<Metrics>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    join: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}

fn config(extra_lease: &str, v4_prefix: &str) -> Config {
    let text = format!(
        r#"
[server]
relay_listen = "127.0.0.1:0"
publish_listen = "127.0.0.1:0"
metrics_listen = "127.0.0.1:0"
store = "memory"
[lease]
t_ip_min_ms = 60000
t_ip_max_ms = 120000
t_remove_ms = 1000
max_per_request = 16
{extra_lease}
[ipv4]
prefixes = ["{v4_prefix}"]
gateway = "10.0.0.1"
[ipv6]
prefix = "2001:db8:1:2::/64"
t_sid_ms = 100000
k = 4
gateway = "fe80::1"
[[switch]]
id = 1
role = "access"
key_hex = "{ACCESS_KEY}"
[[switch]]
id = 100
role = "edge"
key_hex = "{EDGE_KEY}"
"#
    );
    Config::parse(&text).unwrap()
}

fn start(cfg: Config) -> Running {
    let server = Server::start(
        Settings::from_config(&cfg).unwrap(),
        cfg.core().unwrap(),
        Box::new(MemStore::new()),
    )
    .unwrap();
    let addrs = server.local_addrs().unwrap();
    let metrics = server.metrics();
    let stop = server.stop_flag();
    let join = std::thread::spawn(move || server.run().unwrap());
    Running {
        addrs,
        metrics,
        stop,
        join: Some(join),
    }
}

fn default_server() -> Running {
    start(config(
        "rate_per_s = 1000\nrate_burst = 1000",
        "10.0.0.0/16",
    ))
}

const QUIET: Duration = Duration::from_millis(300);

#[test]
fn allocation_over_udp_grants_addresses_and_publishes_bindings() {
    let s = default_server();
    let mut sub = Subscriber::connect(s.addrs.publish, 100, EDGE_KEY);
    sub.read_snapshot();
    assert!(sub.bindings.is_empty());
    assert_eq!(
        sub.epochs.len(),
        1,
        "the snapshot carries the current alias epoch"
    );
    let sw = Switch::new(s.addrs.relay);
    let r = sw.request(1, mac(1), Family::V4, 3);
    assert_eq!(r.status, Status::Ok);
    assert_eq!(r.nonce, [7; 16]);
    assert_eq!(r.gateway, "10.0.0.1".parse::<IpAddr>().unwrap());
    assert_eq!(r.addrs.len(), 3);
    for (a, life) in &r.addrs {
        assert!(matches!(a, IpAddr::V4(v) if v.octets()[0] == 10 && v.octets()[1] == 0));
        assert!((59_000..=120_000).contains(life), "lifetime {life}");
    }
    let r6 = sw.request(2, mac(1), Family::V6, 2);
    assert_eq!(r6.status, Status::Ok);
    let alias_set: BTreeSet<u32> = sub
        .epochs
        .values()
        .next()
        .unwrap()
        .iter()
        .flat_map(|(_, l)| l.clone())
        .collect();
    for (a, _) in &r6.addrs {
        let IpAddr::V6(v) = a else {
            panic!("v4 for a v6 request")
        };
        assert_eq!(&v.segments()[..4], &[0x2001, 0xdb8, 1, 2]);
        assert!(
            alias_set.contains(&u32::from(v.segments()[4])),
            "alias of the current epoch"
        );
    }
    sub.drain(QUIET);
    let want: BTreeSet<_> = r
        .addrs
        .iter()
        .chain(&r6.addrs)
        .map(|(a, _)| (*a, mac(1)))
        .collect();
    assert_eq!(sub.binding_set(), want);
    assert_eq!(leases(s.addrs.metrics), want);
}

#[test]
fn bad_hmac_is_dropped_counted_and_unanswered() {
    let s = default_server();
    let sw = Switch::new(s.addrs.relay);
    let mut bytes = sw.alloc_bytes(1, mac(1), Family::V4, 1);
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    sw.send(&bytes);
    // A relay signed with another key.
    let mut forged = Switch::new(s.addrs.relay);
    forged.key = proto::key(&unhex(EDGE_KEY));
    forged.send(&forged.alloc_bytes(2, mac(1), Family::V4, 1));
    assert!(sw.recv(QUIET).is_none());
    assert!(forged.recv(QUIET).is_none());
    assert_eq!(s.metrics.drops(DropReason::BadHmac), 2);
    assert!(leases(s.addrs.metrics).is_empty(), "no state changed");
    // An edge switch may subscribe but not relay.
    let mut edge = Switch::new(s.addrs.relay);
    edge.key = proto::key(&unhex(EDGE_KEY));
    edge.sid = 100;
    edge.send(&edge.alloc_bytes(3, mac(1), Family::V4, 1));
    assert!(edge.recv(QUIET).is_none());
    assert_eq!(s.metrics.drops(DropReason::UnknownSwitch), 1);
}

#[test]
fn truncation_at_every_length_is_dropped_and_the_server_keeps_serving() {
    let s = default_server();
    let sw = Switch::new(s.addrs.relay);
    let bytes = sw.alloc_bytes(1, mac(1), Family::V4, 1);
    for n in 0..bytes.len() {
        sw.send(&bytes[..n]);
    }
    assert!(sw.recv(QUIET).is_none(), "no truncated message is answered");
    let dropped: u64 = [
        DropReason::Truncated,
        DropReason::BadHmac,
        DropReason::BadMagic,
    ]
    .iter()
    .map(|r| s.metrics.drops(*r))
    .sum();
    assert_eq!(dropped, bytes.len() as u64, "every truncation counted");
    assert!(leases(s.addrs.metrics).is_empty());
    assert_eq!(sw.request(2, mac(1), Family::V4, 1).status, Status::Ok);
}

#[test]
fn wrong_version_and_stale_timestamps_are_dropped() {
    let s = default_server();
    let sw = Switch::new(s.addrs.relay);
    let mut bytes = sw.alloc_bytes(1, mac(1), Family::V4, 1);
    bytes[2] = 2;
    sw.send(&bytes);
    let mut inner = Vec::new();
    ClientMsg::AllocRequest(proto::AllocRequest {
        family: Family::V4,
        count: 1,
        nonce: [0; 16],
    })
    .emit(2, &mut inner)
    .unwrap();
    sw.send(&sw.wrap(
        2,
        mac(1),
        &inner,
        mimiq_allocator::server::wall_ms() - 60_000,
    ));
    sw.send(&sw.wrap(
        3,
        mac(1),
        &inner,
        mimiq_allocator::server::wall_ms() + 60_000,
    ));
    assert!(sw.recv(QUIET).is_none());
    assert_eq!(s.metrics.drops(DropReason::BadVersion), 1);
    assert_eq!(s.metrics.drops(DropReason::Stale), 2);
    assert!(leases(s.addrs.metrics).is_empty());
}

#[test]
fn replayed_transaction_is_dropped_and_changes_nothing() {
    let s = default_server();
    let sw = Switch::new(s.addrs.relay);
    let bytes = sw.alloc_bytes(9, mac(1), Family::V4, 2);
    sw.send(&bytes);
    let Some((9, ClientMsg::AllocReply(r))) = sw.recv(Duration::from_secs(5)) else {
        panic!("first copy must be answered")
    };
    assert_eq!(r.status, Status::Ok);
    let before = leases(s.addrs.metrics);
    sw.send(&bytes);
    sw.send(&bytes);
    assert!(sw.recv(QUIET).is_none(), "replays are not answered");
    assert_eq!(s.metrics.drops(DropReason::Replay), 2);
    assert_eq!(leases(s.addrs.metrics), before);
}

#[test]
fn pool_exhausted_is_reported_and_nothing_is_half_granted() {
    // /29: 6 usable addresses.
    let s = start(config(
        "rate_per_s = 1000\nrate_burst = 1000",
        "10.0.0.0/29",
    ));
    let sw = Switch::new(s.addrs.relay);
    assert_eq!(sw.request(1, mac(1), Family::V4, 4).status, Status::Ok);
    let r = sw.request(2, mac(2), Family::V4, 3);
    assert_eq!(r.status, Status::PoolExhausted);
    assert!(r.addrs.is_empty());
    assert_eq!(leases(s.addrs.metrics).len(), 4);
    assert_eq!(sw.request(3, mac(2), Family::V4, 2).status, Status::Ok);
    let text = http_get(s.addrs.metrics, "/metrics");
    assert_eq!(
        metric(
            &text,
            "mimiq_allocator_replies_total{code=\"pool_exhausted\"}"
        ),
        1
    );
    assert_eq!(
        metric(&text, "mimiq_allocator_pool_in_use{family=\"4\"}"),
        6
    );
    assert_eq!(metric(&text, "mimiq_allocator_pool_size{family=\"4\"}"), 6);
}

#[test]
fn rate_limit_is_reported_per_client() {
    let s = start(config("rate_per_s = 1\nrate_burst = 2", "10.0.0.0/16"));
    let sw = Switch::new(s.addrs.relay);
    assert_eq!(sw.request(1, mac(1), Family::V4, 1).status, Status::Ok);
    assert_eq!(sw.request(2, mac(1), Family::V4, 1).status, Status::Ok);
    assert_eq!(
        sw.request(3, mac(1), Family::V4, 1).status,
        Status::RateLimited
    );
    assert_eq!(
        sw.request(4, mac(2), Family::V4, 1).status,
        Status::Ok,
        "other clients are not limited"
    );
    assert_eq!(s.metrics.replies(Status::RateLimited), 1);
    assert_eq!(leases(s.addrs.metrics).len(), 3);
}

#[test]
fn bad_requests_get_bad_request_replies() {
    let s = default_server();
    let sw = Switch::new(s.addrs.relay);
    assert_eq!(
        sw.request(1, mac(1), Family::V4, 17).status,
        Status::BadRequest,
        "over max_per_request"
    );
    // An authentic relay carrying garbage.
    sw.send(&sw.wrap(
        2,
        mac(1),
        b"MQ\x01\x01\0\0\0\x02\x09",
        mimiq_allocator::server::wall_ms(),
    ));
    let Some((2, ClientMsg::ReleaseReply(r))) = sw.recv(Duration::from_secs(5)) else {
        panic!("expected an answer")
    };
    assert_eq!(r.status, Status::BadRequest);
}

#[test]
fn release_drains_then_publishes_the_removal() {
    let s = default_server();
    let mut sub = Subscriber::connect(s.addrs.publish, 1, ACCESS_KEY);
    sub.read_snapshot();
    let sw = Switch::new(s.addrs.relay);
    let r = sw.request(1, mac(1), Family::V4, 2);
    let ips: Vec<IpAddr> = r.addrs.iter().map(|(a, _)| *a).collect();
    let mut inner = Vec::new();
    ClientMsg::Release(Release {
        family: Family::V4,
        addrs: ips.clone(),
    })
    .emit(2, &mut inner)
    .unwrap();
    // Another client cannot release them.
    sw.send(&sw.wrap(3, mac(2), &inner, mimiq_allocator::server::wall_ms()));
    let Some((3, ClientMsg::ReleaseReply(r))) = sw.recv(Duration::from_secs(5)) else {
        panic!()
    };
    assert_eq!(r.released, 0);
    sw.send(&sw.wrap(2, mac(1), &inner, mimiq_allocator::server::wall_ms()));
    let Some((2, ClientMsg::ReleaseReply(r))) = sw.recv(Duration::from_secs(5)) else {
        panic!()
    };
    assert_eq!((r.status, r.released), (Status::Ok, 2));
    sub.drain(QUIET);
    assert_eq!(sub.bindings.len(), 2, "rules stay for t_remove (1 s)");
    std::thread::sleep(Duration::from_millis(1200));
    sub.drain(QUIET);
    assert!(sub.bindings.is_empty(), "removed after t_remove");
    assert!(leases(s.addrs.metrics).is_empty());
}

#[test]
fn publisher_reconnect_ends_with_exactly_the_allocators_rules() {
    let s = default_server();
    let sw = Switch::new(s.addrs.relay);
    let mut sub = Subscriber::connect(s.addrs.publish, 1, ACCESS_KEY);
    sub.read_snapshot();
    for i in 0..20 {
        assert_eq!(sw.request(i, mac(i), Family::V4, 2).status, Status::Ok);
    }
    sub.drain(QUIET);
    assert_eq!(sub.binding_set(), leases(s.addrs.metrics));
    let seen_seq = sub.last_seq;
    drop(sub);
    // Changes while disconnected: more grants, releases.
    let mut released = Vec::new();
    for i in 20..40 {
        let r = sw.request(i, mac(i), Family::V6, 1);
        assert_eq!(r.status, Status::Ok);
        released.push(r.addrs[0].0);
    }
    let mut inner = Vec::new();
    ClientMsg::Release(Release {
        family: Family::V6,
        addrs: vec![released[0]],
    })
    .emit(99, &mut inner)
    .unwrap();
    sw.send(&sw.wrap(99, mac(20), &inner, mimiq_allocator::server::wall_ms()));
    assert!(sw.recv(Duration::from_secs(5)).is_some());
    let mut sub = Subscriber::connect(s.addrs.publish, 1, ACCESS_KEY);
    sub.read_snapshot();
    assert!(sub.last_seq > seen_seq);
    assert_eq!(sub.snapshots, 1);
    // Keep changing while connected, then compare.
    for i in 40..50 {
        assert_eq!(sw.request(i, mac(i), Family::V4, 1).status, Status::Ok);
    }
    sub.drain(QUIET);
    assert_eq!(sub.binding_set(), leases(s.addrs.metrics));
    assert_eq!(sub.binding_set().len(), 40 + 20 + 10);
}

#[test]
fn bad_hello_is_refused() {
    let s = default_server();
    // Signed with the wrong key.
    let mut sub = Subscriber::connect(s.addrs.publish, 1, EDGE_KEY);
    assert!(
        sub.next(Duration::from_secs(2)).is_none(),
        "no rules for an unauthenticated switch"
    );
    assert_eq!(s.metrics.drops(DropReason::BadHello), 1);
}

#[test]
fn metrics_endpoint_serves_prometheus_text() {
    let s = default_server();
    let sw = Switch::new(s.addrs.relay);
    sw.request(1, mac(1), Family::V4, 3);
    sw.request(2, mac(1), Family::V6, 2);
    let text = http_get(s.addrs.metrics, "/metrics");
    assert_eq!(
        metric(&text, "mimiq_allocator_allocations_total{family=\"4\"}"),
        3
    );
    assert_eq!(
        metric(&text, "mimiq_allocator_allocations_total{family=\"6\"}"),
        2
    );
    assert_eq!(metric(&text, "mimiq_allocator_leases"), 5);
    assert_eq!(
        metric(&text, "mimiq_allocator_replies_total{code=\"ok\"}"),
        2
    );
    assert!(metric(&text, "mimiq_allocator_store_commits_total") >= 1);
    assert!(text.contains("# TYPE mimiq_allocator_drops_total counter"));
}

/// A minimal access switch: receives agent datagrams, relays them, delivers the replies.
fn spawn_relay(allocator: SocketAddr) -> SocketAddr {
    let gw = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = gw.local_addr().unwrap();
    let sw = Switch::new(allocator);
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        gw.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        while let Ok((n, from)) = gw.recv_from(&mut buf) {
            let txid = proto::check_len(&buf[..n]).map(|h| h.txid).unwrap_or(0);
            sw.send(&sw.wrap(
                txid,
                mac(from.port().into()),
                &buf[..n],
                mimiq_allocator::server::wall_ms(),
            ));
            let mut rb = [0u8; 4096];
            sw.sock
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            if let Ok((m, _)) = sw.sock.recv_from(&mut rb) {
                if let Ok(r) = RelayReply::parse(&rb[..m], &sw.key) {
                    let _ = gw.send_to(r.inner, from);
                }
            }
        }
    });
    addr
}

#[test]
fn client_library_allocates_and_releases_through_a_relay() {
    let s = start(config(
        "rate_per_s = 1000\nrate_burst = 1000\nmax_live_per_client = 4",
        "10.0.0.0/16",
    ));
    let gw = spawn_relay(s.addrs.relay);
    let mut c = AllocClient::new(gw).unwrap();
    let a = c.allocate(Family::V4, 3).unwrap();
    assert_eq!(a.addrs.len(), 3);
    assert_eq!(a.gateway, "10.0.0.1".parse::<IpAddr>().unwrap());
    assert_eq!(a.prefix_len, 32);
    assert!(matches!(
        c.allocate(Family::V4, 2),
        Err(ClientError::Refused(Status::ClientCap))
    ));
    let ips: Vec<IpAddr> = a.addrs.iter().map(|(ip, _)| *ip).collect();
    assert_eq!(c.release(Family::V4, &ips).unwrap(), 3);
    assert_eq!(c.allocate(Family::V4, 4).unwrap().addrs.len(), 4);
    // Nobody answers: a timeout after the configured attempts.
    let dead = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut c = AllocClient::new(dead.local_addr().unwrap()).unwrap();
    c.set_retry(Duration::from_millis(50), 2);
    assert!(matches!(
        c.allocate(Family::V4, 1),
        Err(ClientError::Timeout(2))
    ));
}

#[test]
fn idle_connections_beyond_the_cap_are_refused_and_switches_still_subscribe() {
    let s = default_server();
    // 2 switches configured: cap = 2·4 + 16 = 24 unauthenticated connections.
    let idle: Vec<_> = (0..30)
        .map(|_| std::net::TcpStream::connect(s.addrs.publish).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(s.metrics.drops(DropReason::TooManyConnections), 6);
    drop(idle);
    std::thread::sleep(Duration::from_millis(300));
    // Freed slots serve a real switch (the idle ones end when their Hello times out or closes).
    let mut sub = Subscriber::connect(s.addrs.publish, 1, ACCESS_KEY);
    sub.read_snapshot();
}

#[test]
fn epochs_rotate_and_leases_expire_through_the_server() {
    // t_ip 400-600 ms, t_remove 200 ms, t_sid 300 ms, k = 4: (k-1)·t_sid = 900 >= 600 + 200.
    let text = format!(
        r#"
[server]
relay_listen = "127.0.0.1:0"
publish_listen = "127.0.0.1:0"
metrics_listen = "127.0.0.1:0"
store = "memory"
[lease]
t_ip_min_ms = 400
t_ip_max_ms = 600
t_remove_ms = 200
rate_per_s = 1000
rate_burst = 1000
[ipv6]
prefix = "2001:db8:1:2::/64"
alias_bits = 8
aliases_per_sid = 2
k = 4
t_sid_ms = 300
gateway = "fe80::1"
[[switch]]
id = 1
role = "access"
key_hex = "{ACCESS_KEY}"
"#
    );
    let s = start(Config::parse(&text).unwrap());
    let mut sub = Subscriber::connect(s.addrs.publish, 1, ACCESS_KEY);
    sub.read_snapshot();
    let sw = Switch::new(s.addrs.relay);
    let mut granted = Vec::new();
    let mut seen_epochs = BTreeSet::new();
    let deadline = std::time::Instant::now() + Duration::from_millis(1500);
    let mut txid = 0;
    while std::time::Instant::now() < deadline {
        txid += 1;
        let r = sw.request(txid, mac(1), Family::V6, 1);
        assert_eq!(r.status, Status::Ok);
        granted.push(r.addrs[0].0);
        sub.drain(Duration::from_millis(50));
        // Valid aliases are unique across the epochs the switch holds, and every granted
        // address that is still bound carries an alias the switch can route.
        let mut valid = BTreeSet::new();
        for (e, aliases) in &sub.epochs {
            seen_epochs.insert(*e);
            for (_, l) in aliases {
                for a in l {
                    // A switch drops epochs older than newest - k + 1 (see RuleUpdate::AliasEpoch).
                    if *e + 4 > *sub.epochs.keys().last().unwrap() {
                        assert!(valid.insert(*a), "alias {a} valid twice");
                    }
                }
            }
        }
        for ip in sub.bindings.keys() {
            let IpAddr::V6(v) = ip else { panic!() };
            assert!(
                valid.contains(&u32::from(v.segments()[4] >> 8)),
                "{v} bound without a valid alias"
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        seen_epochs.len() >= 4,
        "epochs rotate every t_sid: saw {seen_epochs:?}"
    );
    // Everything granted ends within t_ip_max + t_remove; the switch hears every removal.
    std::thread::sleep(Duration::from_millis(900));
    sub.drain(Duration::from_millis(300));
    assert!(sub.bindings.is_empty(), "bindings left: {:?}", sub.bindings);
    assert!(leases(s.addrs.metrics).is_empty());
    let text = http_get(s.addrs.metrics, "/metrics");
    assert_eq!(
        metric(&text, "mimiq_allocator_expiries_total"),
        granted.len() as u64
    );
    assert_eq!(
        metric(&text, "mimiq_allocator_freed_total"),
        granted.len() as u64
    );
}
