//! End-to-end durable allocation rate of the real server on loopback: relayed, HMAC-checked
//! requests in, group-committed to the redb store, signed replies out.
//!
//! ```text
//! cargo run --release -p mimiq-allocator --example server_bench [-- SECONDS [ADDRS_PER_REQUEST]]
//! ```
//!
//! One load thread keeps 512 requests in flight (a stand-in for many access switches); the
//! figure counts only acknowledged addresses, each durable before its reply left.
use std::collections::HashSet;
use std::net::UdpSocket;
use std::time::{Duration, Instant};

use mimalloc::MiMalloc;
use mimiq_allocator::config::Config;
use mimiq_allocator::proto::{self, AllocRequest, ClientMsg, Relay, RelayInfo, RelayReply, Status};
use mimiq_allocator::server::{wall_ms, Server, Settings};
use mimiq_allocator::store::RedbStore;
use mimiq_allocator::{Family, Mac};

#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

const KEY: &str = "11111111111111111111111111111111111111111111111111111111111111aa";

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let secs: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(5);
    let per_req: u8 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1);
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config::parse(&format!(
        r#"
[server]
relay_listen = "127.0.0.1:0"
publish_listen = "127.0.0.1:0"
metrics_listen = "127.0.0.1:0"
store = "{}"
batch_max = 1024
[lease]
t_ip_min_ms = 3600000
t_ip_max_ms = 7200000
t_remove_ms = 30000
max_per_request = 16
max_live_per_client = 100000
rate_per_s = 1000000
rate_burst = 1000000
max_live_per_port = 100000000
new_macs_per_port_per_s = 1000000
new_macs_per_port_burst = 1000000
[ipv4]
prefixes = ["10.0.0.0/8"]
gateway = "10.0.0.1"
[[switch]]
id = 1
role = "access"
key_hex = "{KEY}"
"#,
        dir.path().join("bench.redb").display()
    ))
    .unwrap();
    let store = RedbStore::open_with(&cfg.server.store, cfg.server.store_fold_ops).unwrap();
    let server = Server::start(
        Settings::from_config(&cfg).unwrap(),
        cfg.core().unwrap(),
        Box::new(store),
    )
    .unwrap();
    let addrs = server.local_addrs().unwrap();
    let stop = server.stop_flag();
    let metrics = server.metrics();
    let join = std::thread::spawn(move || server.run().unwrap());

    let secret: Vec<u8> = (0..KEY.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&KEY[i..i + 2], 16).unwrap())
        .collect();
    let key = proto::key(&secret);
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut in_flight = 0usize;
    let mut txid = 0u32;
    let mut granted = 0u64;
    let mut seen = HashSet::new();
    let mut buf = [0u8; 4096];
    let mut out = Vec::new();
    let mut inner = Vec::new();
    let start = Instant::now();
    let end = start + Duration::from_secs(secs);
    while Instant::now() < end {
        while in_flight < 512 {
            txid += 1;
            inner.clear();
            ClientMsg::AllocRequest(AllocRequest {
                family: Family::V4,
                count: per_req,
                nonce: [0; 16],
            })
            .emit(txid, &mut inner)
            .unwrap();
            let b = (txid / 16).to_be_bytes();
            out.clear();
            Relay {
                txid,
                info: RelayInfo {
                    sid: 1,
                    ingress_port: 1,
                    mac: Mac([2, 0, b[0], b[1], b[2], b[3]]),
                    client_port: 1,
                },
                timestamp_ms: wall_ms(),
                inner: &inner,
            }
            .emit(&key, &mut out)
            .unwrap();
            sock.send_to(&out, addrs.relay).unwrap();
            in_flight += 1;
        }
        match sock.recv_from(&mut buf) {
            Ok((n, _)) => {
                in_flight -= 1;
                let r = RelayReply::parse(&buf[..n], &key).expect("reply verifies");
                if let Ok((_, ClientMsg::AllocReply(a))) = ClientMsg::parse(r.inner) {
                    assert_eq!(a.status, Status::Ok);
                    for (ip, _) in a.addrs {
                        assert!(seen.insert(ip), "{ip} granted twice");
                        granted += 1;
                    }
                }
            }
            // Datagrams lost on the loopback queue: refill the window.
            Err(_) => in_flight = 0,
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    join.join().unwrap();
    let text = mimiq_metrics::render(metrics.clone());
    let commits = text
        .lines()
        .find_map(|l| l.strip_prefix("mimiq_allocator_store_commits_total "))
        .unwrap_or("?");
    println!(
        "server, loopback, redb group commit, {per_req} address(es)/request: {:.0} durable addresses/s ({granted} in {elapsed:.1} s, {commits} commits)",
        granted as f64 / elapsed
    );
}
