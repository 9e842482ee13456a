//! Forwarding between two kernel hosts: mimiq-switch (`l2fwd` on AF_XDP) against the kernel's
//! own bridge, on the same topology, in the same run.

use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;

use crate::switch::Switch;
use crate::testbed::{topology, Testbed};
use crate::traffic::ping;

/// Which forwarder sits between h1 and h2.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Forwarder {
    /// A Linux bridge in the middle namespace.
    KernelBridge,
    /// `mimiq-switch --role l2fwd` on AF_XDP sockets.
    MimiqSwitch,
}

/// What one run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    /// The forwarder.
    pub forwarder: Forwarder,
    /// iperf3 TCP receiver throughput, in Gbit/s.
    pub tcp_gbps: f64,
    /// TCP retransmissions during the run.
    pub retransmits: u64,
    /// Mean ping RTT h1 → h2 over 50 pings, in microseconds.
    pub rtt_mean_us: f64,
    /// Frames the switch forwarded (both directions), when the forwarder is the switch.
    pub switch_packets: Option<u64>,
    /// CPU time of the switch process per forwarded frame, in nanoseconds.
    pub switch_cpu_ns_per_packet: Option<f64>,
    /// CPU time of the switch process per forwarded GB, in milliseconds.
    pub switch_cpu_ms_per_gb: Option<f64>,
}

/// Runs one forwarder for `seconds` of iperf3; `progress` gets a line per second.
pub fn run(
    forwarder: Forwarder,
    seconds: u32,
    progress: &mut dyn FnMut(&str),
) -> Result<Run, String> {
    let mut tb = Testbed::new().map_err(|e| e.to_string())?;
    let switch = match forwarder {
        Forwarder::KernelBridge => {
            topology::bridge(&mut tb).map_err(|e| e.to_string())?;
            None
        }
        Forwarder::MimiqSwitch => {
            topology::line(&mut tb).map_err(|e| e.to_string())?;
            let stats = std::env::temp_dir().join(format!("mimiq-l2fwd-{}.json", tb.id()));
            let args = [
                "--role",
                "l2fwd",
                "--port",
                "p0",
                "--port",
                "p1",
                "--stats-interval-ms",
                "100",
            ];
            Some(Switch::start(&tb, "sw", &args, &stats)?)
        }
    };

    let rtts = ping(&tb, "h1", topology::addr::H2_V4, 50)?;
    let rtt_mean_us = rtts.iter().sum::<f64>() / rtts.len() as f64 * 1000.0;
    ping(&tb, "h1", topology::addr::H2_V6, 5)?;

    let before = switch.as_ref().map(Switch::stats).transpose()?;
    let mut server = tb
        .spawn("h2", &["iperf3", "-s", "-1", "-p", "5201"], false)
        .map_err(|e| e.to_string())?;
    std::thread::sleep(Duration::from_millis(300));
    let secs = seconds.to_string();
    let mut client = tb
        .spawn(
            "h1",
            &[
                "iperf3",
                "-c",
                topology::addr::H2_V4,
                "-p",
                "5201",
                "-t",
                &secs,
                "-J",
            ],
            false,
        )
        .map_err(|e| e.to_string())?;
    let started = Instant::now();
    let mut last_bytes = before.as_ref().map_or(0, |s| s.port(1, "tx_bytes"));
    while client.try_status().is_none() {
        std::thread::sleep(Duration::from_secs(1));
        let t = started.elapsed().as_secs();
        match &switch {
            Some(sw) => {
                let s = sw.stats()?;
                let bytes = s.port(1, "tx_bytes");
                let gbps = (bytes - last_bytes) as f64 * 8.0 / 1e9;
                last_bytes = bytes;
                progress(&format!(
                    "  t={t:>2}s  switch p0→p1 {:>10} frames {:>6.2} Gbit/s   p1→p0 {:>9} frames   drops {}   cpu {} ms",
                    s.port(1, "tx_packets"),
                    gbps,
                    s.port(0, "tx_packets"),
                    s.total_drops(),
                    s.cpu_ms(),
                ));
            }
            None => progress(&format!("  t={t:>2}s  kernel bridge forwarding")),
        }
        if started.elapsed() > Duration::from_secs(u64::from(seconds) + 30) {
            return Err("iperf3 did not finish".into());
        }
    }
    server.stop(Duration::from_secs(3));
    let report: Value = serde_json::from_str(&client.stdout())
        .map_err(|e| format!("iperf3 output: {e}; {}", client.describe()))?;
    if let Some(error) = report["error"].as_str() {
        return Err(format!("iperf3: {error}"));
    }
    let end = &report["end"];
    let tcp_gbps = end["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0)
        / 1e9;
    let retransmits = end["sum_sent"]["retransmits"].as_u64().unwrap_or(0);

    let (switch_packets, cpu_ns, cpu_gb) = match (&switch, &before) {
        (Some(sw), Some(b)) => {
            let a = sw.stats_settled(Duration::from_secs(10))?;
            let packets = a.port(0, "tx_packets") + a.port(1, "tx_packets")
                - b.port(0, "tx_packets")
                - b.port(1, "tx_packets");
            let bytes = a.port(0, "tx_bytes") + a.port(1, "tx_bytes")
                - b.port(0, "tx_bytes")
                - b.port(1, "tx_bytes");
            let cpu_ms = (a.cpu_ms() - b.cpu_ms()) as f64;
            (
                Some(packets),
                Some(cpu_ms * 1e6 / packets.max(1) as f64),
                Some(cpu_ms / (bytes.max(1) as f64 / 1e9)),
            )
        }
        _ => (None, None, None),
    };
    Ok(Run {
        forwarder,
        tcp_gbps,
        retransmits,
        rtt_mean_us,
        switch_packets,
        switch_cpu_ns_per_packet: cpu_ns,
        switch_cpu_ms_per_gb: cpu_gb,
    })
}

/// Both forwarders, kernel first, and the Markdown table of the comparison.
pub fn compare(seconds: u32, progress: &mut dyn FnMut(&str)) -> Result<(Vec<Run>, String), String> {
    progress("kernel bridge:");
    let kernel = run(Forwarder::KernelBridge, seconds, progress)?;
    progress("mimiq-switch l2fwd:");
    let switch = run(Forwarder::MimiqSwitch, seconds, progress)?;
    let mut md = String::from(
        "| forwarder | TCP Gbit/s | ratio to kernel | retransmits | ping RTT µs | switch CPU ns/frame | switch CPU ms/GB |\n|---|---|---|---|---|---|---|\n",
    );
    for r in [&kernel, &switch] {
        md.push_str(&format!(
            "| {:?} | {:.2} | {:.2} | {} | {:.0} | {} | {} |\n",
            r.forwarder,
            r.tcp_gbps,
            r.tcp_gbps / kernel.tcp_gbps.max(f64::MIN_POSITIVE),
            r.retransmits,
            r.rtt_mean_us,
            r.switch_cpu_ns_per_packet
                .map_or("–".into(), |v| format!("{v:.0}")),
            r.switch_cpu_ms_per_gb
                .map_or("–".into(), |v| format!("{v:.0}")),
        ));
    }
    Ok((vec![kernel, switch], md))
}
