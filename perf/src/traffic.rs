//! Traffic with the kernel's own tools between testbed hosts: iperf3 and ping.

use std::time::Duration;

use serde_json::Value;

use crate::testbed::Testbed;

/// What one iperf3 TCP run moved.
#[derive(Debug, Clone, Copy)]
pub struct IperfResult {
    /// Bytes the client sent.
    pub sent_bytes: u64,
    /// Bytes the server received.
    pub received_bytes: u64,
    /// Receiver throughput, in bits per second.
    pub received_bps: f64,
    /// TCP retransmissions.
    pub retransmits: u64,
}

/// Runs an iperf3 TCP test from `client` to `server_addr` on `server` for `seconds`.
pub fn iperf3(
    tb: &mut Testbed,
    client: &str,
    server: &str,
    server_addr: &str,
    seconds: u32,
) -> Result<IperfResult, String> {
    iperf3_with(tb, client, server, server_addr, seconds, &[])
}

/// [`iperf3`] with extra client arguments (e.g. `-u -b 50M -l 1200` for UDP, whose result
/// reports the bytes received in `received_bytes` and the datagrams lost in `retransmits`).
pub fn iperf3_with(
    tb: &mut Testbed,
    client: &str,
    server: &str,
    server_addr: &str,
    seconds: u32,
    extra: &[&str],
) -> Result<IperfResult, String> {
    let mut srv = tb
        .spawn(server, &["iperf3", "-s", "-1", "-p", "5201"], false)
        .map_err(|e| e.to_string())?;
    let secs = seconds.to_string();
    // A tunnel that dies under iperf3 leaves it spinning forever: bound it.
    let limit = (seconds + 30).to_string();
    let mut args = vec![
        "timeout", "-k", "5", &limit, "iperf3", "-c", server_addr, "-p", "5201", "-t", &secs, "-J",
    ];
    args.extend_from_slice(extra);
    let mut last_err = String::new();
    for _ in 0..50 {
        let out = tb.exec(client, &args).map_err(|e| e.to_string())?;
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        if out.status.success() && v["error"].is_null() {
            srv.stop(Duration::from_secs(3));
            let end = &v["end"];
            if extra.contains(&"-u") {
                let sum = &end["sum"];
                return Ok(IperfResult {
                    sent_bytes: sum["bytes"].as_u64().unwrap_or(0),
                    received_bytes: (sum["bytes"].as_f64().unwrap_or(0.0)
                        * (1.0 - sum["lost_percent"].as_f64().unwrap_or(100.0) / 100.0))
                        as u64,
                    received_bps: sum["bits_per_second"].as_f64().unwrap_or(0.0)
                        * (1.0 - sum["lost_percent"].as_f64().unwrap_or(100.0) / 100.0),
                    retransmits: sum["lost_packets"].as_u64().unwrap_or(0),
                });
            }
            return Ok(IperfResult {
                sent_bytes: end["sum_sent"]["bytes"].as_u64().unwrap_or(0),
                received_bytes: end["sum_received"]["bytes"].as_u64().unwrap_or(0),
                received_bps: end["sum_received"]["bits_per_second"].as_f64().unwrap_or(0.0),
                retransmits: end["sum_sent"]["retransmits"].as_u64().unwrap_or(0),
            });
        }
        last_err = String::from_utf8_lossy(&out.stdout).chars().take(300).collect();
        // The server may not listen yet.
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(format!("iperf3 client never succeeded: {last_err}; server: {}", srv.describe()))
}

/// Round-trip times of `count` pings from `host` to `addr`, in milliseconds; an error when
/// any was lost.
pub fn ping(tb: &Testbed, host: &str, addr: &str, count: u32) -> Result<Vec<f64>, String> {
    let count_s = count.to_string();
    let family = if addr.contains(':') { "-6" } else { "-4" };
    let out = tb
        .exec(host, &["ping", family, "-c", &count_s, "-i", "0.05", "-W", "2", addr])
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout);
    let rtts: Vec<f64> = text
        .lines()
        .filter_map(|l| l.split("time=").nth(1))
        .filter_map(|t| t.split_whitespace().next()?.parse().ok())
        .collect();
    if !out.status.success() || rtts.len() != count as usize {
        return Err(format!("ping {addr} from {host}: {} of {count} answered", rtts.len()));
    }
    Ok(rtts)
}
