//! The allocator client against a real `mimiq_allocator` server started in-process on
//! 127.0.0.1, through a minimal access-switch relay (what the gateway on UDP port 6363 does:
//! wrap the agent's datagram with the switch's SID and the client's MAC, sign it, forward; and
//! deliver the allocator's answer back to the client's port).

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mimiq_agent::addr::{HostAddresses, MemInterface};
use mimiq_agent::alloc_client::{AllocClientConfig, AllocDriver, AllocError, AllocEvent};
use mimiq_agent::{AddressSet, AddressSetConfig};
use mimiq_allocator::config::Config;
use mimiq_allocator::proto::{self, Relay, RelayInfo, RelayReply};
use mimiq_allocator::server::{wall_ms, Metrics, Server, Settings};
use mimiq_allocator::store::MemStore;
use mimiq_allocator::{Family, Mac};
use mimiq_testkit::eventually;

const ACCESS_KEY: &str = "11111111111111111111111111111111111111111111111111111111111111aa";

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// An allocator server running on its own thread until dropped.
struct Allocator {
    relay: SocketAddr,
    metrics: Arc<Metrics>,
    stop: Arc<AtomicBool>,
    join: Option<std::thread::JoinHandle<()>>,
}

impl Allocator {
    /// `lease` and `v4_prefix` go into the config's `[lease]` table and `[ipv4] prefixes`.
    fn start(lease: &str, v4_prefix: &str) -> Self {
        let text = format!(
            r#"
[server]
relay_listen = "127.0.0.1:0"
publish_listen = "127.0.0.1:0"
metrics_listen = "127.0.0.1:0"
store = "memory"
[lease]
rate_per_s = 1000
rate_burst = 1000
max_per_request = 16
max_live_per_port = 100000000
new_macs_per_port_per_s = 1000000
new_macs_per_port_burst = 1000000
{lease}
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
"#
        );
        let cfg = Config::parse(&text).unwrap();
        let server = Server::start(
            Settings::from_config(&cfg).unwrap(),
            cfg.core().unwrap(),
            Box::new(MemStore::new()),
        )
        .unwrap();
        let relay = server.local_addrs().unwrap().relay;
        let metrics = server.metrics();
        let stop = server.stop_flag();
        let join = std::thread::spawn(move || server.run().unwrap());
        Allocator {
            relay,
            metrics,
            stop,
            join: Some(join),
        }
    }

    /// A counter from the server's Prometheus text.
    fn metric(&self, name: &str) -> u64 {
        let text = mimiq_metrics::render(self.metrics.clone());
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("metric {name} missing"))
    }
}

impl Drop for Allocator {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}

/// A stateless access-switch relay (SID 1) on 127.0.0.1; the allocator it forwards to can be
/// changed while it runs. Stops when dropped.
struct Gateway {
    addr: SocketAddr,
    allocator: Arc<Mutex<SocketAddr>>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Gateway {
    fn start(allocator: SocketAddr) -> Self {
        let client_side = UdpSocket::bind("127.0.0.1:0").unwrap();
        let switch_side = UdpSocket::bind("127.0.0.1:0").unwrap();
        for s in [&client_side, &switch_side] {
            s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        }
        let addr = client_side.local_addr().unwrap();
        let allocator = Arc::new(Mutex::new(allocator));
        let stop = Arc::new(AtomicBool::new(false));
        let key = proto::key(&unhex(ACCESS_KEY));
        let up = {
            let (client_side, switch_side) = (
                client_side.try_clone().unwrap(),
                switch_side.try_clone().unwrap(),
            );
            let (allocator, stop, key) = (allocator.clone(), stop.clone(), key.clone());
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, from)) = client_side.recv_from(&mut buf) else {
                        continue;
                    };
                    let txid = proto::check_len(&buf[..n]).map(|h| h.txid).unwrap_or(0);
                    let info = RelayInfo {
                        sid: 1,
                        ingress_port: 1,
                        mac: Mac([2, 0, 0, 0, 0, 1]),
                        client_port: from.port(),
                    };
                    let mut out = Vec::new();
                    Relay {
                        txid,
                        info,
                        timestamp_ms: wall_ms(),
                        inner: &buf[..n],
                    }
                    .emit(&key, &mut out)
                    .unwrap();
                    let to = *allocator.lock().unwrap();
                    let _ = switch_side.send_to(&out, to);
                }
            })
        };
        let down = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, _)) = switch_side.recv_from(&mut buf) else {
                        continue;
                    };
                    if let Ok(r) = RelayReply::parse(&buf[..n], &key) {
                        let _ = client_side.send_to(r.inner, ("127.0.0.1", r.info.client_port));
                    }
                }
            })
        };
        Gateway {
            addr,
            allocator,
            stop,
            threads: vec![up, down],
        }
    }

    fn forward_to(&self, allocator: SocketAddr) {
        *self.allocator.lock().unwrap() = allocator;
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn set(config: AddressSetConfig) -> AddressSet {
    AddressSet::new(config, 11).unwrap()
}

/// How long a test waits, in real time, for the allocator (through the gateway) to answer.
const ANSWER_WITHIN: Duration = Duration::from_secs(5);

/// Polls `driver` (at virtual time `now_ms`) until an event arrives.
fn next_events(driver: &mut AllocDriver, now_ms: u64, set: &mut AddressSet) -> Vec<AllocEvent> {
    eventually(ANSWER_WITHIN, || {
        let events = driver.poll(now_ms, set);
        if events.is_empty() {
            Err(format!(
                "no event at {now_ms} ms; request in flight: {}",
                driver.request_in_flight()
            ))
        } else {
            Ok(events)
        }
    })
    .unwrap_or_else(|e| panic!("no event from the allocator: {e}"))
}

/// Polls `driver` at virtual time `now_ms`, and again at that same time while it waits for the
/// allocator (a request or a release in flight): on the tests' virtual clock the network answers
/// at once. Returns every event; stops early at a failure, for the caller to report.
fn poll_settled(driver: &mut AllocDriver, now_ms: u64, set: &mut AddressSet) -> Vec<AllocEvent> {
    let mut events = Vec::new();
    eventually(ANSWER_WITHIN, || {
        events.extend(driver.poll(now_ms, set));
        let failed = events
            .iter()
            .any(|e| matches!(e, AllocEvent::Failed { .. }));
        match driver.next_timeout_ms() {
            Some(due) if !failed => Err(format!(
                "at {now_ms} ms, still waiting for the allocator (due at {due} ms)"
            )),
            _ => Ok(()),
        }
    })
    .unwrap_or_else(|e| panic!("{e}; events {events:?}"));
    events
}

/// A driver config for a real allocator on a loaded machine: the exit's blocking release waits
/// long, once (a retry after a slow reply would be a second release, answered "0 released").
fn patient(config: AllocClientConfig) -> AllocClientConfig {
    AllocClientConfig {
        release_timeout_ms: 10_000,
        release_attempts: 1,
        ..config
    }
}

#[test]
fn the_set_is_refilled_before_it_runs_short_and_released_on_exit() {
    // The driver and the set read no clock: they run on a virtual one here, stepped while
    // nothing is in flight and held while the allocator answers (so replies arrive at once on
    // it, and what is checked is the driver's timing, not the machine's). Lifetimes 15-20 s:
    // several generations of addresses in 50 s of virtual time, which take a fraction of a
    // second of real time, far less than the allocator's (real-time) leases last.
    const STEP_MS: u64 = 50;
    const RUN_MS: u64 = 50_000;
    let allocator = Allocator::start(
        "t_ip_min_ms = 15000\nt_ip_max_ms = 20000\nt_remove_ms = 2000",
        "10.0.0.0/16",
    );
    let gateway = Gateway::start(allocator.relay);
    let mut set = set(AddressSetConfig {
        expiry_margin_ms: 3_000,
        refill_lead_ms: 6_000,
        refill_retry_ms: 2_000,
        set_size: 3,
        min_usable: 2,
    });
    let mut driver = AllocDriver::new(
        gateway.addr,
        Family::V4,
        patient(AllocClientConfig::default()),
    )
    .unwrap();
    let mut host = HostAddresses::new(MemInterface::new());
    let mut first_at = None;
    let mut fewest_usable = usize::MAX;
    let mut t = 0;
    while t <= RUN_MS {
        for e in poll_settled(&mut driver, t, &mut set) {
            match e {
                AllocEvent::Allocated { addrs, gateway, .. } => {
                    assert_eq!(gateway, "10.0.0.1".parse::<IpAddr>().unwrap());
                    assert_eq!(addrs.len(), 3);
                    for (a, life) in addrs {
                        assert!(
                            matches!(a, IpAddr::V4(v) if v.octets()[..2] == [10, 0]),
                            "{a}"
                        );
                        assert!((15_000..=20_000).contains(&life.as_millis()), "{life:?}");
                    }
                    first_at.get_or_insert(t);
                }
                AllocEvent::Failed { error, .. } => panic!("allocation failed: {error}"),
                AllocEvent::Releasing { .. } | AllocEvent::Released { .. } => {}
            }
        }
        let report = host.sync(t, &mut set);
        assert!(report.errors.is_empty());
        // The interface holds exactly the set's addresses.
        let on_host: Vec<IpAddr> = host.backend().addresses().keys().copied().collect();
        let mut in_set: Vec<IpAddr> = set.addresses().map(|(a, _)| a).collect();
        in_set.sort();
        assert_eq!(on_host, in_set);
        if first_at.is_some() {
            fewest_usable = fewest_usable.min(set.usable_count(t));
        }
        t += STEP_MS;
    }
    let c = driver.counters();
    // The empty set asks at once.
    assert_eq!(first_at, Some(0), "first set at {first_at:?} ms");
    // Each set is usable for ≥ 12 s: over 50 s at least three more were fetched in time.
    assert!(c.allocations_total >= 4, "{c:?}");
    assert_eq!(
        c.unreachable_total + c.refused_total + c.out_of_addresses_total + c.io_errors_total,
        0
    );
    // Traffic never waited: from the first allocation on, the set always held the usable
    // addresses it keeps on hand.
    assert!(
        fewest_usable >= set.config().min_usable,
        "{fewest_usable} usable"
    );
    // Drained addresses went back to the allocator as they drained (every acknowledgement is
    // in: poll_settled waited for it).
    assert!(c.released_total >= 3, "{c:?}");

    // Exit: everything still held goes back; the allocator counted every release.
    let held = set.addresses().filter(|&(_, e)| e > t).count();
    let released = driver.release_all(t, &mut set).unwrap();
    assert!(released >= 1 && released <= held, "{released} of {held}");
    assert_eq!(
        allocator.metric("mimiq_allocator_releases_total"),
        driver.counters().released_total
    );
    let removed = host.remove_all();
    assert!(removed.errors.is_empty());
    assert!(host.backend().addresses().is_empty());
}

#[test]
fn an_exhausted_pool_is_a_clear_error_counted_and_retried_with_backoff() {
    // A /30: fewer free addresses than the 8 asked for.
    let allocator = Allocator::start(
        "t_ip_min_ms = 60000\nt_ip_max_ms = 60000\nt_remove_ms = 1000",
        "10.0.0.0/30",
    );
    let gateway = Gateway::start(allocator.relay);
    let mut set = set(AddressSetConfig {
        set_size: 8,
        refill_retry_ms: 100,
        ..AddressSetConfig::default()
    });
    let config = AllocClientConfig {
        backoff_initial_ms: 1_000,
        backoff_max_ms: 4_000,
        ..AllocClientConfig::default()
    };
    let mut driver = AllocDriver::new(gateway.addr, Family::V4, config).unwrap();
    let mut now = 0;
    let mut retry_gaps = Vec::new();
    for attempt in 1..=3u64 {
        let events = next_events(&mut driver, now, &mut set);
        let [AllocEvent::Failed { error, retry_at_ms }] = events.as_slice() else {
            panic!("{events:?}")
        };
        assert!(matches!(error, AllocError::OutOfAddresses), "{error:?}");
        assert_eq!(
            error.to_string(),
            "allocator out of addresses: the pool is exhausted"
        );
        assert_eq!(driver.counters().out_of_addresses_total, attempt);
        assert_eq!(driver.counters().requests_total, attempt);
        // Nothing is asked during the backoff.
        assert!(driver.poll(retry_at_ms - 1, &mut set).is_empty());
        assert!(!driver.request_in_flight());
        retry_gaps.push(retry_at_ms - now);
        now = *retry_at_ms;
    }
    // 1 s, 2 s, 4 s, each jittered into its upper half.
    for (gap, full) in retry_gaps.iter().zip([1_000, 2_000, 4_000]) {
        assert!((full / 2..=full).contains(gap), "{retry_gaps:?}");
    }
    assert_eq!(
        allocator.metric("mimiq_allocator_replies_total{code=\"pool_exhausted\"}"),
        3
    );
    assert_eq!(set.addresses().count(), 0);
}

#[test]
fn an_unreachable_allocator_is_an_error_and_the_driver_recovers_when_it_returns() {
    // The gateway relays into the void: nothing listens on the "allocator" port.
    let void = UdpSocket::bind("127.0.0.1:0").unwrap();
    let gateway = Gateway::start(void.local_addr().unwrap());
    let mut set = set(AddressSetConfig {
        refill_retry_ms: 100,
        ..AddressSetConfig::default()
    });
    let config = patient(AllocClientConfig {
        reply_timeout_ms: 150,
        backoff_initial_ms: 200,
        ..AllocClientConfig::default()
    });
    let mut driver = AllocDriver::new(gateway.addr, Family::V6, config).unwrap();
    assert!(driver.poll(0, &mut set).is_empty());
    // The gateway relays the request into the void: wait until it is there, so that the
    // allocator started below never sees it.
    void.set_read_timeout(Some(ANSWER_WITHIN)).unwrap();
    void.recv_from(&mut [0u8; 2048])
        .expect("the gateway relays the request");
    // The reply timeout runs on the driver's (virtual) clock: 150 ms later on it, whatever the
    // real time, the request has timed out.
    let events = driver.poll(150, &mut set);
    let [AllocEvent::Failed { error, retry_at_ms }] = events.as_slice() else {
        panic!("{events:?}")
    };
    assert!(
        matches!(
            error,
            AllocError::Unreachable {
                timeout_ms: 150,
                ..
            }
        ),
        "{error:?}"
    );
    assert!(error
        .to_string()
        .starts_with("allocator unreachable: no reply from the gateway"));
    assert_eq!(driver.counters().unreachable_total, 1);
    let retry = *retry_at_ms;

    // The allocator comes up; the next attempt, after the backoff, gets addresses.
    let allocator = Allocator::start(
        "t_ip_min_ms = 60000\nt_ip_max_ms = 60000\nt_remove_ms = 1000",
        "10.0.0.0/16",
    );
    gateway.forward_to(allocator.relay);
    let events = next_events(&mut driver, retry, &mut set);
    let [AllocEvent::Allocated {
        addrs, late: false, ..
    }] = events.as_slice()
    else {
        panic!("{events:?}")
    };
    assert_eq!(addrs.len(), 8);
    assert!(addrs
        .iter()
        .all(|(a, _)| matches!(a, IpAddr::V6(v) if v.segments()[..4] == [0x2001, 0xdb8, 1, 2])));
    assert_eq!(set.usable_count(retry), 8);
    assert_eq!(
        driver.next_timeout_ms(),
        None,
        "backoff reset by the success"
    );
    assert_eq!(driver.release_all(retry, &mut set).unwrap(), 8);
    assert_eq!(allocator.metric("mimiq_allocator_releases_total"), 8);
}
