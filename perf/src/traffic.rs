//! Traffic with the kernel's own tools between testbed hosts: iperf3, ping, and a TCP download
//! checked byte for byte.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use mimiq_h3test::{body_byte, fill_body};
use serde_json::Value;

use crate::testbed::{eventually, Testbed};

/// What one iperf3 TCP run moved.
#[derive(Debug, Clone)]
pub struct IperfResult {
    /// Bytes the client sent.
    pub sent_bytes: u64,
    /// Bytes the server received.
    pub received_bytes: u64,
    /// Receiver throughput, in bits per second.
    pub received_bps: f64,
    /// TCP retransmissions.
    pub retransmits: u64,
    /// The sender's TCP congestion control, as iperf3 reports it (`None` for UDP).
    pub congestion: Option<String>,
}

/// Runs an iperf3 TCP test from `client` to `server_addr` on `server` for `seconds`.
pub fn iperf3(
    tb: &Testbed,
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
    tb: &Testbed,
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
        "timeout",
        "-k",
        "5",
        &limit,
        "iperf3",
        "-c",
        server_addr,
        "-p",
        "5201",
        "-t",
        &secs,
        "-J",
    ];
    args.extend_from_slice(extra);
    // The server may not listen yet: the client's first tries can be refused.
    let v = eventually(Duration::from_secs(10), || {
        let out = tb.exec(client, &args).map_err(|e| e.to_string())?;
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        if out.status.success() && v["error"].is_null() {
            Ok(v)
        } else {
            Err(String::from_utf8_lossy(&out.stdout)
                .chars()
                .take(300)
                .collect::<String>())
        }
    })
    .map_err(|e| {
        format!(
            "iperf3 client never succeeded: {e}; server: {}",
            srv.describe()
        )
    })?;
    srv.stop(Duration::from_secs(3));
    let end = &v["end"];
    if extra.contains(&"-u") {
        let sum = &end["sum"];
        let delivered = 1.0 - sum["lost_percent"].as_f64().unwrap_or(100.0) / 100.0;
        return Ok(IperfResult {
            sent_bytes: sum["bytes"].as_u64().unwrap_or(0),
            received_bytes: (sum["bytes"].as_f64().unwrap_or(0.0) * delivered) as u64,
            received_bps: sum["bits_per_second"].as_f64().unwrap_or(0.0) * delivered,
            retransmits: sum["lost_packets"].as_u64().unwrap_or(0),
            congestion: None,
        });
    }
    Ok(IperfResult {
        sent_bytes: end["sum_sent"]["bytes"].as_u64().unwrap_or(0),
        received_bytes: end["sum_received"]["bytes"].as_u64().unwrap_or(0),
        received_bps: end["sum_received"]["bits_per_second"]
            .as_f64()
            .unwrap_or(0.0),
        retransmits: end["sum_sent"]["retransmits"].as_u64().unwrap_or(0),
        congestion: end["sender_tcp_congestion"].as_str().map(str::to_owned),
    })
}

/// Round-trip times of `count` pings from `host` to `addr`, in milliseconds; an error when
/// any was lost.
pub fn ping(tb: &Testbed, host: &str, addr: &str, count: u32) -> Result<Vec<f64>, String> {
    let count_s = count.to_string();
    let family = if addr.contains(':') { "-6" } else { "-4" };
    let out = tb
        .exec(
            host,
            &[
                "ping", family, "-c", &count_s, "-i", "0.05", "-W", "2", addr,
            ],
        )
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout);
    let rtts: Vec<f64> = text
        .lines()
        .filter_map(|l| l.split("time=").nth(1))
        .filter_map(|t| t.split_whitespace().next()?.parse().ok())
        .collect();
    if !out.status.success() || rtts.len() != count as usize {
        return Err(format!(
            "ping {addr} from {host}: {} of {count} answered",
            rtts.len()
        ));
    }
    Ok(rtts)
}

/// Serves pattern bytes ([`body_byte`] of the offset) to one TCP client from `server` at
/// `listen`, and downloads them on `client`, checking every byte, until `len` bytes arrived or
/// `until` passed (then the client closes and the server's broken pipe is the normal end).
/// Returns the bytes that arrived in order and whether every one matched.
pub fn pattern_download(
    tb: &Testbed,
    server: &str,
    listen: SocketAddr,
    client: &str,
    len: u64,
    until: Option<Instant>,
) -> Result<(u64, bool), String> {
    let listener = tb
        .run_in(server, move || TcpListener::bind(listen))
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("listen on {listen}: {e}"))?;
    let served = std::thread::spawn(move || -> std::io::Result<()> {
        // Bounded, so a client that never connects does not leave this thread behind.
        listener.set_nonblocking(true)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut conn = loop {
            match listener.accept() {
                Ok((c, _)) => break c,
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(e),
            }
        };
        conn.set_nonblocking(false)?;
        let mut buf = vec![0u8; 64 * 1024];
        let mut off = 0u64;
        while off < len {
            let n = buf.len().min((len - off) as usize);
            fill_body(off, &mut buf[..n]);
            conn.write_all(&buf[..n])?;
            off += n as u64;
        }
        Ok(())
    });
    let got = tb
        .run_in(client, move || -> std::io::Result<(u64, bool)> {
            let mut conn = TcpStream::connect_timeout(&listen, Duration::from_secs(10))?;
            conn.set_read_timeout(Some(Duration::from_secs(20)))?;
            let mut buf = vec![0u8; 64 * 1024];
            let (mut off, mut exact) = (0u64, true);
            while until.is_none_or(|u| Instant::now() < u) {
                let n = conn.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                exact &= buf[..n]
                    .iter()
                    .enumerate()
                    .all(|(i, &b)| b == body_byte(off + i as u64));
                off += n as u64;
            }
            Ok((off, exact))
        })
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("download from {listen}: {e}"))?;
    let served = served
        .join()
        .map_err(|_| "server thread panicked".to_string())?;
    match served {
        Ok(()) => {}
        Err(_) if got.0 < len && until.is_some() => {} // the client stopped at `until`
        Err(e) => return Err(format!("serving on {listen}: {e}")),
    }
    Ok(got)
}
