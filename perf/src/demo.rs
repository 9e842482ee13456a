//! The main job, as far as the project has come: the MIMIQ single box in network namespaces.
//! Two clients get random addresses from the allocator through the access switch's gateway, the
//! allocator pushes the bindings to the switch, the outside reaches each client at its current
//! address through the edge (alias or exact lookup, IP-in-IP) and the access switch
//! (decapsulation, binding lookup), a TCP transfer runs with live counters, and a spoofed
//! source is dropped. Then everything is torn down. It grows into the full MIMIQ demo (clients
//! that hop addresses mid-connection through a MASQUE proxy) with the agent.

use std::time::{Duration, Instant};

use mimiq_allocator::Family;
use serde_json::Value;

use crate::singlebox::{self, SingleBox};
use crate::testbed::topology::single_box_addr as addr;
use crate::traffic::ping;

/// Runs the demo with `seconds` of TCP traffic; prints as it goes.
pub fn run(seconds: u32) -> Result<(), String> {
    println!("mimiq demo: the MIMIQ single box, in network namespaces with the kernel's own stacks");
    println!("  c1, c2 ── lan ── cl0 [access ⇄ int0/int1 ⇄ edge] out0 ── out ({})", addr::OUT_V4);
    println!("  host sw runs mimiq-allocator and mimiq-switch (role single_box, AF_XDP on every port)");
    let SingleBox { mut tb, mut allocator, switch, dir: _dir } = singlebox::start(&singlebox::LONG);

    println!("1. the clients ask for addresses through the switch's gateway (relayed to the allocator):");
    let mut clients = Vec::new();
    for client in ["c1", "c2"] {
        let (v4, life4) = singlebox::allocate(&tb, client, Family::V4);
        let (v6, _) = singlebox::allocate(&tb, client, Family::V6);
        singlebox::use_address(&tb, client, v4);
        singlebox::use_address(&tb, client, v6);
        println!("   {client}: {v4} and {v6}, for {} s", life4.as_secs());
        clients.push((client, v4, v6));
    }

    println!("2. the outside reaches each client at its current address (edge → IP-in-IP → access):");
    for (client, v4, v6) in &clients {
        for a in [v4.to_string(), v6.to_string()] {
            let rtts = ping(&tb, "out", &a, 5)?;
            let mean = rtts.iter().sum::<f64>() / rtts.len() as f64;
            println!("   out → {client} at {a}: 5 of 5 answered, mean RTT {mean:.2} ms");
        }
    }

    let (_, c1_v4, _) = clients[0];
    println!("3. TCP from the outside to c1 ({c1_v4}) for {seconds} s; switch counters per second:");
    let mut server = tb.spawn("c1", &["iperf3", "-s", "-1", "-p", "5201"], false).map_err(|e| e.to_string())?;
    std::thread::sleep(Duration::from_millis(300));
    let secs = seconds.to_string();
    let c1 = c1_v4.to_string();
    let mut client = tb
        .spawn("out", &["iperf3", "-c", &c1, "-p", "5201", "-t", &secs, "-J"], false)
        .map_err(|e| e.to_string())?;
    let started = Instant::now();
    while client.try_status().is_none() {
        std::thread::sleep(Duration::from_secs(1));
        let s = switch.stats()?;
        let worker = |i: usize| &s.0["workers"][i];
        let n = |v: &Value| v.as_u64().unwrap_or(0);
        println!(
            "   t={:>2}s  edge: {:>8} in from outside, {:>8} encapsulated to access   access: {:>8} delivered to clients, {:>6} up   drops {}",
            started.elapsed().as_secs(),
            n(&worker(1)["ports"][1]["rx_packets"]),
            n(&worker(1)["ports"][0]["tx_packets"]),
            n(&worker(0)["ports"][0]["tx_packets"]),
            n(&worker(0)["ports"][1]["tx_packets"]),
            s.total_drops(),
        );
        if started.elapsed() > Duration::from_secs(u64::from(seconds) + 30) {
            return Err("iperf3 did not finish".into());
        }
    }
    server.stop(Duration::from_secs(3));
    let report: Value = serde_json::from_str(&client.stdout()).map_err(|e| format!("iperf3: {e}; {}", client.describe()))?;
    let gbps = report["end"]["sum_received"]["bits_per_second"].as_f64().unwrap_or(0.0) / 1e9;
    println!("   {gbps:.2} Gbit/s received by c1 through edge and access");

    println!("4. c1 sends from an address the allocator did not give it:");
    let taken: Vec<String> = clients.iter().map(|(_, v4, _)| v4.to_string()).collect();
    let spoof = (250..255).map(|i| format!("198.18.1.{i}")).find(|a| !taken.contains(a)).unwrap_or_default();
    let before = switch.stats()?.drops("spoofed_source");
    tb.exec_ok("c1", &["ip", "addr", "add", &format!("{spoof}/32"), "dev", "eth0"]).map_err(|e| e.to_string())?;
    let out = tb.exec("c1", &["ping", "-c", "3", "-W", "1", "-I", &spoof, addr::OUT_V4]).map_err(|e| e.to_string())?;
    let after = switch.stats_after(Duration::from_millis(300))?.drops("spoofed_source");
    println!(
        "   from {spoof}: {} — the access switch dropped {} frames as spoofed_source",
        if out.status.success() { "got through (unexpected)" } else { "no answer" },
        after - before
    );

    let s = switch.stats()?;
    println!("summary");
    println!("   clients served: 2, addresses in use: 4 (IPv4 and IPv6 each), TCP {gbps:.2} Gbit/s");
    println!("   switch CPU: {} ms over its lifetime; drops by reason: {}", s.cpu_ms(), drops(&s.0));
    drop(switch);
    allocator.stop(Duration::from_secs(5));
    println!("   testbed torn down");
    if out.status.success() || after == before {
        return Err("the spoofed source was not dropped".into());
    }
    Ok(())
}

fn drops(stats: &Value) -> String {
    let mut total = std::collections::BTreeMap::new();
    for w in stats["workers"].as_array().into_iter().flatten() {
        for (k, v) in w["drops"].as_object().into_iter().flatten() {
            *total.entry(k.clone()).or_insert(0) += v.as_u64().unwrap_or(0);
        }
    }
    let nonzero: Vec<String> = total.iter().filter(|(_, v)| **v > 0).map(|(k, v)| format!("{k}={v}")).collect();
    if nonzero.is_empty() { "none".into() } else { nonzero.join(" ") }
}
