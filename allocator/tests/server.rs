//! The server over real loopback sockets (127.0.0.1): protocol behaviour, publisher, metrics,
//! and the client library through a relay.

mod common;

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use mimiq_allocator::client::{AllocClient, ClientError};
use mimiq_allocator::config::Config;
use mimiq_allocator::proto::{self, ClientMsg, RelayReply, Release, Status};
use mimiq_allocator::server::{wall_ms, BoundAddrs, DropReason, Metrics, Server, Settings};
use mimiq_allocator::store::MemStore;
use mimiq_allocator::Family;
use mimiq_testkit::eventually;

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
    config_with_t_remove(extra_lease, v4_prefix, 1000)
}

fn config_with_t_remove(extra_lease: &str, v4_prefix: &str, t_remove_ms: u64) -> Config {
    // Many MACs through one port: port security out of the way unless the test sets it.
    let port_security = if extra_lease.contains("_per_port") {
        ""
    } else {
        "max_live_per_port = 100000000\nnew_macs_per_port_per_s = 1000000\nnew_macs_per_port_burst = 1000000"
    };
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
t_remove_ms = {t_remove_ms}
max_per_request = 16
{extra_lease}
{port_security}
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

/// How long a check that something does not arrive (a reply to a dropped datagram) listens.
/// The server would send it in the same pass that counted the drop, so the checks wait for the
/// count first and then listen this long.
const QUIET: Duration = Duration::from_millis(300);
/// Deadline for what the server does on its own threads (counting, publishing) to show: it only
/// costs time when a test fails.
const SETTLE: Duration = Duration::from_secs(5);
/// How long the server waits for a rule-stream connection's Hello (`HELLO_TIMEOUT` there).
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// Waits until the server has counted `n` drops for `reason` (it counts on its own thread, after
/// the datagram arrives), then checks that it counted no more.
fn expect_drops(metrics: &Metrics, reason: DropReason, n: u64) {
    let seen = eventually(SETTLE, || match metrics.drops(reason) {
        c if c >= n => Ok(c),
        c => Err(format!("{c} {} drops", reason.label())),
    })
    .unwrap_or_else(|e| panic!("expected {n} {} drops: {e}", reason.label()));
    assert_eq!(seen, n, "{} drops", reason.label());
}

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
    sub.catch_up(rule_seq(s.addrs.metrics), SETTLE);
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
    expect_drops(&s.metrics, DropReason::BadHmac, 2);
    assert!(sw.recv(QUIET).is_none());
    assert!(forged.recv(QUIET).is_none());
    assert!(leases(s.addrs.metrics).is_empty(), "no state changed");
    // An edge switch may subscribe but not relay.
    let mut edge = Switch::new(s.addrs.relay);
    edge.key = proto::key(&unhex(EDGE_KEY));
    edge.sid = 100;
    edge.send(&edge.alloc_bytes(3, mac(1), Family::V4, 1));
    expect_drops(&s.metrics, DropReason::UnknownSwitch, 1);
    assert!(edge.recv(QUIET).is_none());
}

#[test]
fn truncation_at_every_length_is_dropped_and_the_server_keeps_serving() {
    let s = default_server();
    let sw = Switch::new(s.addrs.relay);
    let bytes = sw.alloc_bytes(1, mac(1), Family::V4, 1);
    for n in 0..bytes.len() {
        sw.send(&bytes[..n]);
    }
    let dropped = || -> u64 {
        [
            DropReason::Truncated,
            DropReason::BadHmac,
            DropReason::BadMagic,
        ]
        .iter()
        .map(|r| s.metrics.drops(*r))
        .sum()
    };
    let counted = eventually(SETTLE, || match dropped() {
        n if n >= bytes.len() as u64 => Ok(n),
        n => Err(format!("{n} of {} truncations counted", bytes.len())),
    })
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(counted, bytes.len() as u64, "every truncation counted once");
    assert!(sw.recv(QUIET).is_none(), "no truncated message is answered");
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
    expect_drops(&s.metrics, DropReason::BadVersion, 1);
    expect_drops(&s.metrics, DropReason::Stale, 2);
    assert!(sw.recv(QUIET).is_none());
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
    expect_drops(&s.metrics, DropReason::Replay, 2);
    assert!(sw.recv(QUIET).is_none(), "replays are not answered");
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
    // Three requests back to back, before reading any reply: they reach the server together,
    // well within the second the bucket takes to refill one token, however slow the machine.
    for txid in 1..=3 {
        sw.send(&sw.alloc_bytes(txid, mac(1), Family::V4, 1));
    }
    let mut statuses = std::collections::BTreeMap::new();
    for _ in 1..=3 {
        match sw.recv(Duration::from_secs(5)) {
            Some((txid, ClientMsg::AllocReply(r))) => statuses.insert(txid, r.status),
            other => panic!("expected an AllocReply, got {other:?}"),
        };
    }
    assert_eq!(
        statuses.into_iter().collect::<Vec<_>>(),
        [(1, Status::Ok), (2, Status::Ok), (3, Status::RateLimited)]
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
fn one_port_rotating_macs_cannot_starve_another_port() {
    // Port security: the clients behind one port hold at most 16 addresses together, and the
    // port brings at most 20 new MACs at once (2 a second after that).
    let s = start(config(
        "rate_per_s = 1000\nrate_burst = 1000\nmax_live_per_port = 16\nnew_macs_per_port_per_s = 2\nnew_macs_per_port_burst = 20",
        "10.0.0.0/27",
    ));
    let attacker = Switch::new(s.addrs.relay);
    let mut victim = Switch::new(s.addrs.relay);
    victim.port = 2;
    // 100 MACs through port 1, two addresses each, as fast as the server answers: the /27's
    // 29 addresses would go to the first 15.
    let mut statuses = std::collections::BTreeMap::new();
    for m in 0..100u32 {
        let r = attacker.request(m, mac(1000 + m), Family::V4, 2);
        *statuses.entry(format!("{:?}", r.status)).or_insert(0) += 1;
    }
    // 8 MACs fill the port's 16; the next 12 new MACs are refused for the cap, and the other
    // 80 for the port's rate (the bucket of 20 is empty, and 100 requests take well under the
    // half second a token takes; a slow machine may let a few more through to the cap).
    assert_eq!(statuses.get("Ok"), Some(&8), "{statuses:?}");
    let refused_cap = statuses.get("PoolExhausted").copied().unwrap_or(0);
    let refused_rate = statuses.get("RateLimited").copied().unwrap_or(0);
    assert_eq!(refused_cap + refused_rate, 92, "{statuses:?}");
    assert!(refused_cap >= 12, "{statuses:?}");
    // The client behind port 2 gets its addresses from what is left of the pool.
    let r = victim.request(1, mac(1), Family::V4, 8);
    assert_eq!(r.status, Status::Ok, "{r:?}");
    assert_eq!(r.addrs.len(), 8);
    let text = http_get(s.addrs.metrics, "/metrics");
    assert_eq!(
        metric(
            &text,
            "mimiq_allocator_port_refusals_total{reason=\"port_cap\"}"
        ),
        refused_cap
    );
    assert_eq!(
        metric(
            &text,
            "mimiq_allocator_port_refusals_total{reason=\"new_mac_rate\"}"
        ),
        refused_rate
    );
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
    // Long enough that the rules are seen still there after the release with seconds to spare.
    const T_REMOVE_MS: u64 = 4_000;
    let s = start(config_with_t_remove(
        "rate_per_s = 1000\nrate_burst = 1000",
        "10.0.0.0/16",
        T_REMOVE_MS,
    ));
    let mut sub = Subscriber::connect(s.addrs.publish, 1, ACCESS_KEY);
    sub.read_snapshot();
    let sw = Switch::new(s.addrs.relay);
    let r = sw.request(1, mac(1), Family::V4, 2);
    assert_eq!(r.status, Status::Ok);
    let ips: Vec<IpAddr> = r.addrs.iter().map(|(a, _)| *a).collect();
    let mut inner = Vec::new();
    ClientMsg::Release(Release {
        family: Family::V4,
        addrs: ips.clone(),
    })
    .emit(2, &mut inner)
    .unwrap();
    // Another client cannot release them.
    sw.send(&sw.wrap(3, mac(2), &inner, wall_ms()));
    let Some((3, ClientMsg::ReleaseReply(r))) = sw.recv(Duration::from_secs(5)) else {
        panic!()
    };
    assert_eq!(r.released, 0);
    let released_from = wall_ms();
    sw.send(&sw.wrap(2, mac(1), &inner, wall_ms()));
    let Some((2, ClientMsg::ReleaseReply(r))) = sw.recv(Duration::from_secs(5)) else {
        panic!()
    };
    let released_by = wall_ms();
    assert_eq!((r.status, r.released), (Status::Ok, 2));
    // The rules stay for t_remove: the switch hears both bindings again, valid until the
    // release (on the server's clock, between the two readings of ours) plus t_remove.
    let drain_end = eventually(SETTLE, || {
        sub.drain(Duration::from_millis(20));
        let ends: Vec<u64> = ips
            .iter()
            .filter_map(|ip| sub.bindings.get(ip))
            .map(|&(_, _, valid_until_ms)| valid_until_ms)
            .filter(|end| (released_from + T_REMOVE_MS..=released_by + T_REMOVE_MS).contains(end))
            .collect();
        match ends.iter().max() {
            Some(&end) if ends.len() == 2 && sub.bindings.len() == 2 => Ok(end),
            _ => Err(format!(
                "bindings {:?}, want both of {ips:?} valid until {}..={} ms",
                sub.bindings,
                released_from + T_REMOVE_MS,
                released_by + T_REMOVE_MS
            )),
        }
    })
    .unwrap_or_else(|e| panic!("the release was not published: {e}"));
    // Then they are removed, and not before the drain's end.
    let removed_at = eventually(
        Duration::from_millis(drain_end.saturating_sub(wall_ms())) + SETTLE,
        || {
            sub.drain(Duration::from_millis(20));
            if sub.bindings.is_empty() {
                Ok(wall_ms())
            } else {
                Err(format!(
                    "at {} ms, still bound: {:?}",
                    wall_ms(),
                    sub.bindings
                ))
            }
        },
    )
    .unwrap_or_else(|e| panic!("not removed after t_remove (drain end {drain_end} ms): {e}"));
    assert!(
        removed_at >= drain_end,
        "removed by {removed_at} ms, before the drain ended at {drain_end} ms"
    );
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
    sub.catch_up(rule_seq(s.addrs.metrics), SETTLE);
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
    sub.catch_up(rule_seq(s.addrs.metrics), SETTLE);
    assert_eq!(sub.binding_set(), leases(s.addrs.metrics));
    assert_eq!(sub.binding_set().len(), 40 + 20 + 10);
}

#[test]
fn bad_hello_is_refused() {
    let s = default_server();
    // Signed with the wrong key.
    let mut sub = Subscriber::connect(s.addrs.publish, 1, EDGE_KEY);
    expect_drops(&s.metrics, DropReason::BadHello, 1);
    assert!(
        sub.next(Duration::from_secs(2)).is_none(),
        "no rules for an unauthenticated switch"
    );
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
    // One attempt with a long wait: a retry after a slow reply would be a second grant, and the
    // client cap below would count it.
    c.set_retry(Duration::from_secs(10), 1);
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
        .map(|_| TcpStream::connect(s.addrs.publish).unwrap())
        .collect();
    // The acceptor takes all 30 in turn and refuses the 6 over the cap. None of the first 24
    // ends meanwhile (each waits up to HELLO_TIMEOUT for its Hello), so it is exactly 6.
    let refused = eventually(HELLO_TIMEOUT, || {
        match s.metrics.drops(DropReason::TooManyConnections) {
            n if n >= 6 => Ok(n),
            n => Err(format!("{n} connections refused")),
        }
    })
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(refused, 6, "connections refused");
    drop(idle);
    // Freed slots serve a real switch. The idle ones end as the server reads their close (at the
    // latest when their Hello times out); until then the server may refuse this one too, so
    // try again.
    let sub = eventually(HELLO_TIMEOUT + SETTLE, || {
        let mut sub = Subscriber::try_connect(s.addrs.publish, 1, ACCESS_KEY)
            .map_err(|e| format!("connect: {e}"))?;
        sub.try_read_snapshot().map(|()| sub)
    })
    .unwrap_or_else(|e| panic!("no switch could subscribe: {e}"));
    assert_eq!(sub.snapshots, 1);
}

#[test]
fn epochs_rotate_and_leases_expire_through_the_server() {
    // t_ip 400-600 ms, t_remove 200 ms, t_sid 300 ms, k = 4: (k-1)·t_sid = 900 >= 600 + 200.
    const T_REMOVE_MS: u64 = 200;
    const T_SID_MS: u64 = 300;
    const K: u64 = 4;
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
t_remove_ms = {T_REMOVE_MS}
rate_per_s = 1000
rate_burst = 1000
[ipv6]
prefix = "2001:db8:1:2::/64"
alias_bits = 8
aliases_per_sid = 2
k = {K}
t_sid_ms = {T_SID_MS}
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
    // When the rules of every lease granted so far are gone at the latest (ms, wall clock).
    let mut last_drain_end = 0u64;
    let mut txid = 0;
    // A request per round (eventually's pauses pace them) until the switch has seen k + 1
    // epochs: the oldest one has then left its window while addresses were bound.
    eventually(Duration::from_millis((K + 1) * T_SID_MS) + SETTLE, || {
        txid += 1;
        let r = sw.request(txid, mac(1), Family::V6, 1);
        assert_eq!(r.status, Status::Ok);
        let (ip, lifetime_ms) = r.addrs[0];
        granted.push(ip);
        // The lifetime counts from the server's clock when it answered, before now.
        last_drain_end = last_drain_end.max(wall_ms() + u64::from(lifetime_ms) + T_REMOVE_MS);
        sub.drain(Duration::from_millis(50));
        // Valid aliases are unique across the epochs the switch holds, and every granted
        // address that is still bound carries an alias the switch can route.
        let mut valid = BTreeSet::new();
        for (e, aliases) in &sub.epochs {
            seen_epochs.insert(*e);
            for (_, l) in aliases {
                for a in l {
                    // A switch drops epochs older than newest - k + 1 (see
                    // RuleUpdate::AliasEpoch).
                    if *e + K > *sub.epochs.keys().last().unwrap() {
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
        if seen_epochs.len() as u64 > K {
            Ok(())
        } else {
            Err(format!("epochs seen: {seen_epochs:?}"))
        }
    })
    .unwrap_or_else(|e| panic!("epochs rotate every t_sid: {e}"));
    // Everything granted ends within its lifetime, and its rules t_remove after that.
    eventually(
        Duration::from_millis(last_drain_end.saturating_sub(wall_ms())) + SETTLE,
        || {
            let left = leases(s.addrs.metrics);
            if left.is_empty() {
                Ok(())
            } else {
                Err(format!(
                    "{} leases left at {} ms: {left:?}",
                    left.len(),
                    wall_ms()
                ))
            }
        },
    )
    .unwrap_or_else(|e| panic!("leases outlived their drain (ends by {last_drain_end} ms): {e}"));
    // The switch hears every removal.
    sub.catch_up(rule_seq(s.addrs.metrics), SETTLE);
    assert!(sub.bindings.is_empty(), "bindings left: {:?}", sub.bindings);
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

/// Datagrams this network namespace's kernel dropped for a full UDP receive buffer.
fn udp_rcvbuf_errors() -> u64 {
    let snmp = std::fs::read_to_string("/proc/net/snmp").unwrap();
    mimiq_testkit::udp_rcvbuf_errors(&snmp).unwrap()
}

#[test]
fn a_flood_of_forged_and_replayed_relays_is_dropped_and_counted_while_a_switch_is_served() {
    let s = default_server();
    let sw = Switch::new(s.addrs.relay);
    // A request the switch really relayed, answered: then replayed, byte for byte.
    let original = sw.alloc_bytes(1, mac(1), Family::V4, 1);
    sw.send(&original);
    assert!(matches!(
        sw.recv(Duration::from_secs(5)),
        Some((1, ClientMsg::AllocReply(r))) if r.status == Status::Ok
    ));
    let mut forger = Switch::new(s.addrs.relay);
    forger.key = proto::key(b"not-the-access-switch-key-000000");
    let kernel_before = udp_rcvbuf_errors();
    let (sent, served) = std::thread::scope(|scope| {
        let flood = scope.spawn(|| {
            // Two seconds of forged requests (a wrong key, fresh transaction IDs) and replays of
            // the one above, in turn, as fast as one socket sends.
            let (mut sent, end) = (0u64, std::time::Instant::now() + Duration::from_secs(2));
            let mut txid = 1_000u32;
            while std::time::Instant::now() < end {
                for _ in 0..64 {
                    txid += 1;
                    let forged = forger.alloc_bytes(txid, mac(txid), Family::V4, 1);
                    for bytes in [&forged, &original] {
                        if forger.sock.send_to(bytes, s.addrs.relay).is_ok() {
                            sent += 1;
                        }
                    }
                }
            }
            sent
        });
        // Meanwhile the real switch's clients are served (a request lost to a full socket
        // buffer is sent again, as a client does).
        let mut served = 0;
        for txid in 2..=21u32 {
            let bytes = sw.alloc_bytes(txid, mac(txid), Family::V4, 1);
            let ok = (0..10).any(|_| {
                sw.send(&bytes);
                matches!(
                    sw.recv(Duration::from_millis(500)),
                    Some((t, ClientMsg::AllocReply(r))) if t == txid && r.status == Status::Ok
                )
            });
            served += u32::from(ok);
        }
        (flood.join().unwrap(), served)
    });
    assert_eq!(
        served, 20,
        "the switch's clients were served through the flood"
    );
    assert!(sent > 10_000, "the flood sent {sent}");
    // Each flood datagram is a counted drop (a bad tag or a replay), or the kernel dropped it
    // before the allocator read it.
    let counted = eventually(SETTLE, || {
        let counted = s.metrics.drops(DropReason::BadHmac) + s.metrics.drops(DropReason::Replay);
        let kernel = udp_rcvbuf_errors() - kernel_before;
        if counted + kernel >= sent {
            Ok(counted)
        } else {
            Err(format!(
                "{sent} sent, {counted} counted, {kernel} dropped by the kernel"
            ))
        }
    })
    .unwrap_or_else(|e| panic!("every forged or replayed datagram accounted for: {e}"));
    assert!(s.metrics.drops(DropReason::BadHmac) > 0 && s.metrics.drops(DropReason::Replay) > 0);
    // Only the real requests got addresses.
    assert_eq!(leases(s.addrs.metrics).len(), 21);
    eprintln!("flood: {sent} sent, {counted} counted as bad_hmac or replay");
}
