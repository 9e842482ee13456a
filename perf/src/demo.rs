//! The main job: MIMIQ end to end in network namespaces. Two clients run
//! `mimiq-agent`: each gets address sets from the allocator through the single box's access
//! switch (the relay on the gateway's link-local address), puts them on its interface, and
//! tunnels its traffic (CONNECT-IP) through one QUIC connection to `mimiq-proxy` on the outside
//! host, hopping addresses every few dozen packets; the switch (access + edge roles on AF_XDP)
//! carries the hops out and routes the answers back to whichever address the client holds now.
//! Each client downloads from a server behind the proxy, checked byte for byte, with live
//! progress; a capture point on the outside link checks that no connection ID is seen from two
//! client addresses and that no address is used outside its lease (+ t_remove); a spoofed
//! source is dropped. Then everything is torn down; any failed check is an error (exit 1).
//!
//! ```text
//!  c1, c2 (mimiq-agent) ── lan ── cl0 [access ⇄ edge] out0 ── out (mimiq-proxy) ── srv
//!  198.18.1.0/24, from the allocator       198.18.200.2:4433   TUN  198.18.220.2
//! ```

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::capture;
use crate::hopwatch::{leases_from_log, HopWatch, Lease};
use crate::masque::{self, stop_client, ProxyProc};
use crate::singlebox::{self, SingleBox, Times};
use crate::testbed::topology::single_box_addr as addr;
use crate::testbed::{LinkOpts, Proc, Testbed};
use crate::traffic::pattern_download;

/// Short leases, so that addresses expire and are replaced while the demo runs: t_ip 6–9 s,
/// t_remove 2 s, t_sid 6 s (k = 3: (k-1)·t_sid covers t_ip + t_remove), the usual pool.
pub const TIMES: Times = Times(6_000, 9_000, 2_000, 6_000, addr::POOL_V4);
/// The proxy's address on the outside host.
pub const PROXY: &str = "198.18.200.2:4433";
/// The server behind the proxy.
pub const SERVER_V4: &str = "198.18.220.2";
/// The clients.
const CLIENTS: [&str; 2] = ["c1", "c2"];
/// The agents' TUN device.
pub const AGENT_TUN: &str = "mqa0";
/// The source c1 spoofs: in no pool of the allocator's (`addr::POOL_V4` is 198.18.1.0/24).
const SPOOFED_SOURCE: &str = "198.18.9.250";

/// Runs the demo with `seconds` of downloads; prints as it goes. The configs, counters, hop
/// logs and address logs of every process are copied into `out` at the end (if given), also
/// when a check failed, with the outside link's capture of what the clients sent to the proxy
/// (`outside.pcap`, each frame's first 128 bytes: the QUIC headers with their connection IDs)
/// and the proxy's and agents' TLS key logs (`*-keys.log`), so that the capture checks can be
/// repeated with Wireshark or tshark.
pub fn run(seconds: u32, out: Option<&Path>) -> Result<(), String> {
    println!("mimiq demo: clients that hop addresses mid-connection, in network namespaces with the kernel's own stacks");
    println!("  c1, c2 (mimiq-agent) ── lan ── cl0 [access ⇄ edge] out0 ── out (mimiq-proxy {PROXY}) ── srv ({SERVER_V4})");
    println!(
        "  host sw runs mimiq-allocator and mimiq-switch (role single_box, AF_XDP on every port)"
    );
    let SingleBox {
        mut tb,
        mut allocator,
        switch,
        dir,
    } = singlebox::start(&TIMES);
    let result = demo(&mut tb, dir.path(), &switch, seconds, out.is_some());
    drop(switch);
    allocator.stop(Duration::from_secs(5));
    drop(tb);
    println!("   testbed torn down");
    if let Some(out) = out {
        keep_files(dir.path(), out)?;
        println!("   configs, counters and logs kept in {}", out.display());
    }
    result
}

/// Copies the files of `dir` (not its directories) into `out`, created if needed.
pub fn keep_files(dir: &Path, out: &Path) -> Result<(), String> {
    std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    for entry in std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .flatten()
    {
        let path = entry.path();
        if path.is_file() {
            let to = out.join(entry.file_name());
            std::fs::copy(&path, &to)
                .map_err(|e| format!("{} → {}: {e}", path.display(), to.display()))?;
        }
    }
    Ok(())
}

fn demo(
    tb: &mut Testbed,
    dir: &Path,
    switch: &crate::switch::Switch,
    seconds: u32,
    pcap: bool,
) -> Result<(), String> {
    let keylog = |who: &str| {
        if pcap {
            format!(
                "keylog_file = \"{}\"\n",
                dir.join(format!("{who}-keys.log")).display()
            )
        } else {
            String::new()
        }
    };
    let mut proxy = start_outside_with(tb, dir, &format!("[quic]\n{}", keylog("proxy")))?;
    println!("1. mimiq-proxy serves CONNECT-IP on {PROXY}; each agent asks the allocator for addresses and connects:");
    let mut agents = Vec::new();
    for (i, client) in CLIENTS.iter().enumerate() {
        let (agent, ready) = start_agent(tb, dir, client, i as u64 + 1, &keylog(client))?;
        println!("   {client}: {ready}");
        agents.push(agent);
    }

    let stop = Arc::new(AtomicBool::new(false));
    let proxy_addr: SocketAddr = PROXY.parse().map_err(|e| format!("{e}"))?;
    // The outside link, and each client's port of the LAN bridge (where a packet's sender is
    // known whatever its source address).
    let mut points = vec![("out", "eth0")];
    points.extend(CLIENTS.iter().map(|c| ("lan", *c)));
    let captures = (points.iter())
        .map(|(host, ifname)| {
            capture::watch_incoming(
                tb,
                host,
                ifname,
                Arc::clone(&stop),
                HopWatch::new(proxy_addr),
                HopWatch::frame,
            )
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    let recording = if pcap {
        let proxy = proxy_addr;
        let to_proxy = move |f: &[u8]| {
            let Ok(p) = etherparse::SlicedPacket::from_ethernet(f) else {
                return false;
            };
            let Some(etherparse::TransportSlice::Udp(u)) = p.transport else {
                return false;
            };
            u.destination_port() == proxy.port()
        };
        let path = dir.join("outside.pcap");
        Some(
            capture::record_pcap(
                tb,
                "out",
                "eth0",
                Arc::clone(&stop),
                &path,
                Some(128),
                to_proxy,
            )
            .map_err(|e| e.to_string())?,
        )
    } else {
        None
    };

    println!("2. each client downloads from {SERVER_V4} through its tunnel for {seconds} s while it hops; per second:");
    let until = Instant::now() + Duration::from_secs(u64::from(seconds));
    let started = Instant::now();
    let downloads: Vec<Result<(u64, bool), String>> = std::thread::scope(|scope| {
        let tb = &*tb;
        let handles: Vec<_> = CLIENTS
            .iter()
            .enumerate()
            .map(|(i, client)| {
                let listen: SocketAddr = format!("{SERVER_V4}:{}", 9000 + i)
                    .parse()
                    .expect("a socket address");
                scope.spawn(move || {
                    pattern_download(tb, "srv", listen, client, u64::MAX, Some(until))
                })
            })
            .collect();
        let mut last = vec![0u64; CLIENTS.len()];
        loop {
            std::thread::sleep(Duration::from_secs(1));
            if handles.iter().all(|h| h.is_finished()) {
                break;
            }
            let mut line = format!("   t={:>2}s", started.elapsed().as_secs());
            for (i, client) in CLIENTS.iter().enumerate() {
                let r = agent_stats(dir, client);
                let rx = r["client"]["bytes_rx"].as_u64().unwrap_or(0);
                line += &format!(
                    "  {client}: {:>4} hops, {:>2} addresses, {:>7.1} MB, {:>6.1} Mbit/s",
                    r["client"]["hops_done"].as_u64().unwrap_or(0),
                    r["addresses_in_use"].as_u64().unwrap_or(0),
                    rx as f64 / 1e6,
                    rx.saturating_sub(last[i]) as f64 * 8.0 / 1e6,
                );
                last[i] = rx;
            }
            let drops = switch.stats().map(|s| s.total_drops()).unwrap_or(0);
            println!("{line}  switch drops {drops}");
        }
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("download thread panicked".into()))
            })
            .collect()
    });
    // The downloads stop at `until`.
    let elapsed = until.saturating_duration_since(started).as_secs_f64();

    println!("3. while the agents run, c1 sends from an address the allocator did not give it:");
    // An address outside the allocator's pool: the agents keep allocating while the pings
    // run, and an address of the pool that no agent held a moment ago could be granted to c1
    // meanwhile (it then got through, as it should). No binding can ever cover this one.
    let spoof = SPOOFED_SOURCE;
    let before = switch.stats()?.drops("spoofed_source");
    tb.exec_ok(
        "c1",
        &["ip", "addr", "add", &format!("{spoof}/32"), "dev", "eth0"],
    )
    .map_err(|e| e.to_string())?;
    let out = tb
        .exec(
            "c1",
            &["ping", "-c", "3", "-W", "1", "-I", spoof, addr::OUT_V4],
        )
        .map_err(|e| e.to_string())?;
    // Three echo requests from the spoofed source: three drops, once the switch has published
    // them (if not within a few seconds, the line below says how many it did count).
    let after = switch
        .stats_until(Duration::from_secs(5), |s| {
            let n = s.drops("spoofed_source");
            if n >= before + 3 {
                Ok(())
            } else {
                Err(format!("spoofed_source {before} -> {n}"))
            }
        })
        .or_else(|_| switch.stats())?
        .drops("spoofed_source");
    println!(
        "   from {spoof}: {} — the access switch dropped {} frames as spoofed_source",
        if out.status.success() {
            "got through (unexpected)"
        } else {
            "no answer"
        },
        after - before
    );
    let spoof_dropped = !out.status.success() && after > before;

    let mut reports = Vec::new();
    for (client, agent) in CLIENTS.iter().zip(agents.iter_mut()) {
        let report = stop_client(agent).map_err(|e| format!("{client}: {e}"))?;
        reports.push(report);
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut watchers = Vec::new();
    for c in captures {
        let w = c
            .join()
            .map_err(|_| "capture thread panicked".to_string())?
            .map_err(|e| e.to_string())?;
        watchers.push(w.map_err(|e| format!("capture: {e}"))?);
    }
    if let Some(r) = recording {
        let frames = r
            .join()
            .map_err(|_| "capture thread panicked".to_string())?
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("outside.pcap: {e}"))?;
        println!("   outside.pcap: {frames} datagrams to the proxy (first 128 bytes of each)");
    }
    let proxy_stats = proxy.fresh_stats()?;
    proxy.proc.stop(Duration::from_secs(3));

    let mut failures = Vec::new();
    if !spoof_dropped {
        failures.push("the spoofed source was not dropped".into());
    }
    println!("4. what each client did:");
    let mut leases: Vec<Lease> = Vec::new();
    for ((client, report), download) in CLIENTS.iter().zip(&reports).zip(&downloads) {
        let c = &report["client"];
        let n = |v: &Value| v.as_u64().unwrap_or(0);
        match download {
            Ok((bytes, exact)) => {
                println!(
                    "   {client}: {:.1} MB in {elapsed:.1} s ({:.1} Mbit/s){}; {} hops done, {} failed; {} addresses allocated, {} used, {} released",
                    *bytes as f64 / 1e6,
                    *bytes as f64 * 8.0 / elapsed / 1e6,
                    if *exact { ", every byte as sent" } else { ", CORRUPTED" },
                    n(&c["hops_done"]),
                    n(&c["hops_failed"]),
                    n(&report["addresses_allocated"]),
                    n(&report["addresses_used"]),
                    n(&report["addresses_released"]),
                );
                if !exact {
                    failures.push(format!("{client}: the download was corrupted"));
                }
                if *bytes == 0 {
                    failures.push(format!("{client}: nothing downloaded"));
                }
            }
            Err(e) => failures.push(format!("{client}: download failed: {e}")),
        }
        if n(&c["hops_done"]) == 0 {
            failures.push(format!("{client}: never hopped"));
        }
        // Released on exit: what the agent still held went back to the allocator.
        if n(&report["addresses_released"]) == 0 {
            failures.push(format!("{client}: released no address on exit"));
        }
        let log = std::fs::read_to_string(dir.join(format!("{client}-addresses.csv")))
            .map_err(|e| e.to_string())?;
        leases.extend(leases_from_log(client, &log)?);
    }

    let outside = &watchers[0];
    println!(
        "5. the capture on the outside link ({} client packets to the proxy):",
        outside.sources.values().map(|s| s.2).sum::<u64>()
    );
    let check = outside.check(&leases, TIMES.2, 200);
    println!(
        "   {} client addresses, {} connection IDs; {} connection IDs seen from two addresses; {} packets outside their address's lease + t_remove",
        check.addresses, check.cids, check.cids_from_two_addresses, check.outside_lease
    );
    failures.extend(check.violations.iter().cloned());
    if check.packets == 0 {
        failures.push("the capture saw no client packets".into());
    }
    println!("6. the captures at each client's port of the LAN: every packet to the proxy left from an address of that client's, within its lease + t_remove:");
    for (client, watcher) in CLIENTS.iter().zip(&watchers[1..]) {
        let own: Vec<Lease> = leases
            .iter()
            .filter(|l| l.client == *client)
            .cloned()
            .collect();
        let check = watcher.check(&own, TIMES.2, 200);
        println!(
            "   {client}: {} packets from {} addresses; {} outside this client's leases",
            check.packets, check.addresses, check.outside_lease
        );
        failures.extend(check.violations.iter().map(|v| format!("{client}: {v}")));
        if check.packets == 0 {
            failures.push(format!("the capture at {client}'s port saw no packets"));
        }
    }

    let s = switch.stats()?;
    println!("summary");
    println!(
        "   proxy: {} connections, {} CONNECT-IP sessions, {} paths forgotten after hops",
        proxy_stats["connections_accepted"],
        proxy_stats["sessions_ip"],
        proxy_stats["paths_abandoned"]
    );
    println!(
        "   switch CPU: {} ms over its lifetime; drops by reason: {}",
        s.cpu_ms(),
        s.drops_summary()
    );
    if failures.is_empty() {
        println!("   every check passed");
        Ok(())
    } else {
        Err(format!(
            "{} checks failed: {}",
            failures.len(),
            failures.join("; ")
        ))
    }
}

/// The outside of the single box's testbed: the server host behind the proxy (`out` eth1
/// 198.18.220.1/24 ── srv 198.18.220.2/24) and `mimiq-proxy` on `out` at [`PROXY`], its
/// tunnel clients in 198.18.210.0/24.
pub fn start_outside(tb: &mut Testbed, dir: &Path) -> Result<ProxyProc, String> {
    start_outside_with(tb, dir, "")
}

/// [`start_outside`] with `extra` appended to the proxy's config.
pub fn start_outside_with(tb: &mut Testbed, dir: &Path, extra: &str) -> Result<ProxyProc, String> {
    (|| {
        tb.add_host("srv")?;
        tb.add_link(("out", "eth1"), ("srv", "eth0"), LinkOpts::default())?;
        tb.add_addr("out", "eth1", "198.18.220.1/24")?;
        tb.add_addr("srv", "eth0", &format!("{SERVER_V4}/24"))?;
        tb.add_route("srv", "198.18.210.0/24", "198.18.220.1")?;
        tb.sysctl("out", "net.ipv4.ip_forward", "1")
    })()
    .map_err(|e| e.to_string())?;
    let extra = format!(
        "{extra}[ip]\ntun = \"mqp0\"\npool_v4 = \"198.18.210.0/24\"\npool_v6 = \"fd00:210::/64\"\n\
                 icmp_source_v4 = \"198.18.210.1\"\nicmp_source_v6 = \"fd00:210::1\"\n"
    );
    ProxyProc::start(tb, "out", dir, PROXY, &extra)
}

/// A random hop every 20–60 QUIC datagrams: the demo's strategy (`[hop]` of an agent config).
pub const DEMO_HOP: &str = "kind = \"random_packets\"\nmin_packets = 20\nmax_packets = 60\n";

/// Starts `mimiq-agent run` on `client` with the allocator source (the relay on the gateway's
/// link-local address), the demo's hop strategy ([`DEMO_HOP`]), the server's subnet routed into
/// the tunnel, and its counters, hop log and address log in `dir` (`tunnel_extra` appended to
/// its `[tunnel]` table); returns once it printed its `ready` line, with that line.
pub fn start_agent(
    tb: &mut Testbed,
    dir: &Path,
    client: &str,
    seed: u64,
    tunnel_extra: &str,
) -> Result<(Proc, String), String> {
    start_agent_hopping(tb, dir, client, seed, DEMO_HOP, tunnel_extra)
}

/// [`start_agent`] with `hop` as the `[hop]` table's body.
pub fn start_agent_hopping(
    tb: &mut Testbed,
    dir: &Path,
    client: &str,
    seed: u64,
    hop: &str,
    tunnel_extra: &str,
) -> Result<(Proc, String), String> {
    let file = |what: &str| dir.join(format!("{client}-{what}")).display().to_string();
    let cfg = format!(
        r#"seed = {seed}
[hop]
{hop}
[addresses]
set_size = 4
refill_lead_ms = 3000
expiry_margin_ms = 1000

[tunnel]
proxy = "{PROXY}"
tun = "{AGENT_TUN}"
routes = ["198.18.220.0/24"]
stats_file = "{stats}"
stats_interval_ms = 500
hop_log = "{hops}"
address_log = "{addresses}"
{tunnel_extra}
[source]
kind = "allocator"
gateway = "[fe80::1]:6363"
interface = "eth0"
family = "v4"
"#,
        stats = file("stats.json"),
        hops = file("hops.csv"),
        addresses = file("addresses.csv"),
    );
    let path = dir.join(format!("{client}-agent.toml"));
    std::fs::write(&path, cfg).map_err(|e| e.to_string())?;
    masque::start_agent(tb, client, &path)
}

/// The agent's live counters (`Value::Null` until the first write).
pub fn agent_stats(dir: &Path, client: &str) -> Value {
    std::fs::read_to_string(dir.join(format!("{client}-stats.json")))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null)
}
