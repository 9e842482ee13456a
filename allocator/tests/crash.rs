//! Crash safety for real: the `mimiq-allocator` binary serves a stream of requests on loopback
//! and is killed with SIGKILL at random moments, many times, against the same redb store. After
//! every restart: no address was ever acknowledged to two clients, every acknowledged lease is
//! live with its client, and a fresh rule-stream snapshot equals the lease table.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use mimiq_allocator::proto::{ClientMsg, Status};
use mimiq_allocator::rng::Csprng;
use mimiq_allocator::{Family, Mac};
use mimiq_testkit::eventually;

struct Child_ {
    child: Child,
    relay: SocketAddr,
    publish: SocketAddr,
    metrics: SocketAddr,
}

impl Drop for Child_ {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(config: &std::path::Path) -> Child_ {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mimiq-allocator"))
        .args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn mimiq-allocator");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = |key: &str| -> SocketAddr {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} in {line:?}"))
            .parse()
            .unwrap()
    };
    Child_ {
        relay: addr("relay="),
        publish: addr("publish="),
        metrics: addr("metrics="),
        child,
    }
}

#[test]
fn sigkill_at_random_moments_never_loses_or_double_assigns_a_lease() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("leases.redb");
    let config = dir.path().join("allocator.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[server]
relay_listen = "127.0.0.1:0"
publish_listen = "127.0.0.1:0"
metrics_listen = "127.0.0.1:0"
store = "{}"
# Small, so that folds happen (and get killed) many times during the test.
store_fold_ops = 300
[lease]
t_ip_min_ms = 3600000
t_ip_max_ms = 7200000
t_remove_ms = 1000
max_per_request = 4
max_live_per_client = 1000
rate_per_s = 100000
rate_burst = 100000
# Many MACs through one port: port security out of the way.
max_live_per_port = 100000000
new_macs_per_port_per_s = 1000000
new_macs_per_port_burst = 1000000
[ipv4]
# A /8, not a /16: a fast machine gets over 100,000 addresses acknowledged in the 12 rounds
# (three quarters IPv4), more than a /16 holds, and a refusal fails the loader.
prefixes = ["10.0.0.0/8"]
gateway = "10.0.0.1"
[ipv6]
prefix = "2001:db8::/64"
t_sid_ms = 8000000
k = 2
gateway = "fe80::1"
[[switch]]
id = 1
role = "access"
key_hex = "{ACCESS_KEY}"
"#,
            store.display()
        ),
    )
    .unwrap();

    let mut rng = Csprng::new().unwrap();
    // Every address ever acknowledged, with the client it went to.
    let acked: Arc<Mutex<HashMap<IpAddr, Mac>>> = Arc::new(Mutex::new(HashMap::new()));
    let mut txid = 0u32;
    let rounds = 12;
    // Addresses each round gets acknowledged before its kill: 12 rounds make well over the
    // 100 the end checks for, whatever the machine's speed.
    let progress = 10;
    for round in 0..rounds {
        let c = spawn(&config);
        // Verify the state the previous incarnations left.
        check_state(&c, &acked.lock().unwrap());
        // Load: a pipelined client, 16 requests in flight, until killed.
        let stop = Arc::new(AtomicBool::new(false));
        let loader = {
            let (acked, stop, relay) = (acked.clone(), stop.clone(), c.relay);
            let base = txid;
            std::thread::spawn(move || {
                let sw = Switch::new(relay);
                let mut t = base;
                let mut pending: HashMap<u32, Mac> = HashMap::new();
                while !stop.load(Ordering::Relaxed) {
                    while pending.len() < 16 {
                        t += 1;
                        let m = mac(t);
                        let fam = if t.is_multiple_of(4) {
                            Family::V6
                        } else {
                            Family::V4
                        };
                        sw.send(&sw.alloc_bytes(t, m, fam, (t % 4 + 1) as u8));
                        pending.insert(t, m);
                    }
                    match sw.recv(Duration::from_millis(200)) {
                        Some((id, ClientMsg::AllocReply(r))) => {
                            let Some(m) = pending.remove(&id) else {
                                continue;
                            };
                            assert_eq!(r.status, Status::Ok, "unexpected refusal {r:?}");
                            let mut a = acked.lock().unwrap();
                            for (ip, _) in r.addrs {
                                if let Some(prev) = a.insert(ip, m) {
                                    panic!("{ip} acknowledged to {prev} and again to {m}");
                                }
                            }
                        }
                        Some(other) => panic!("unexpected reply {other:?}"),
                        // Lost in the crash or slow: forget the in-flight ones (never acked).
                        None => pending.clear(),
                    }
                }
                t
            })
        };
        // Kill at a random moment once the round has made progress (or its loader stopped:
        // joining it below says why).
        let before = acked.lock().unwrap().len();
        eventually(Duration::from_secs(10), || {
            let n = acked.lock().unwrap().len() - before;
            if n >= progress || loader.is_finished() {
                Ok(())
            } else {
                Err(format!("{n} addresses acknowledged this round"))
            }
        })
        .unwrap_or_else(|e| panic!("round {round} made no progress: {e}"));
        let run_ms = rng.below(400);
        std::thread::sleep(Duration::from_millis(run_ms));
        // SIGKILL (std's Child::kill sends SIGKILL on Unix).
        let mut c = c;
        c.child.kill().unwrap();
        c.child.wait().unwrap();
        stop.store(true, Ordering::Relaxed);
        txid = loader
            .join()
            .expect("loader saw a double assignment or a refusal")
            + 1000;
        let n = acked.lock().unwrap().len();
        eprintln!(
            "round {round}: killed {run_ms} ms after at least {progress} acknowledgements; \
             {n} addresses acknowledged so far"
        );
    }
    let c = spawn(&config);
    check_state(&c, &acked.lock().unwrap());
    assert!(
        acked.lock().unwrap().len() > 100,
        "the test must actually exercise the allocator"
    );
}

fn check_state(c: &Child_, acked: &HashMap<IpAddr, Mac>) {
    let live = leases(c.metrics);
    let live_ips: HashMap<IpAddr, Mac> = live.iter().copied().collect();
    assert_eq!(live_ips.len(), live.len(), "an address is live twice");
    for (ip, m) in acked {
        assert_eq!(
            live_ips.get(ip),
            Some(m),
            "acknowledged lease {ip} → {m} missing after restart"
        );
    }
    let mut sub = Subscriber::connect(c.publish, 1, ACCESS_KEY);
    sub.read_snapshot();
    assert_eq!(
        sub.binding_set(),
        live,
        "rule snapshot differs from the leases"
    );
    // Every IPv6 lease carries an alias that a valid epoch maps to its SID.
    let aliases: BTreeSet<u32> = sub
        .epochs
        .values()
        .flat_map(|l| l.iter().flat_map(|(_, a)| a.clone()))
        .collect();
    for (ip, _) in &live {
        if let IpAddr::V6(v) = ip {
            assert!(
                aliases.contains(&u32::from(v.segments()[4])),
                "{v} has no valid alias"
            );
        }
    }
}
