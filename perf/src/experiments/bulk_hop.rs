//! `mimiq-perf bench bulk-hop`: a bulk download's goodput through a hopping agent's tunnel
//! against the same tunnel unhopped, in the same run, at added round trips of the switch's
//! impair stage.
//!
//! The single box with the proxy outside (`perf/src/demo.rs`); the impair stage delays every
//! frame by RTT/2 on the way to the clients and on the way out, so the tunnel's round trip is the
//! asked one plus the stack's own. For each RTT and hop setting an agent on `c1` is started (a
//! hop every N QUIC datagrams it sends; 0: never), a TCP download from the server behind the
//! proxy runs for the asked seconds, checked byte for byte, and the agent is stopped.
//!
//! Why it matters: the proxy is the sender of a download, and RFC 9000 §9.4 makes it reset its
//! congestion controller and RTT estimate on every new client address it validates, so every
//! hop restarts slow start on the new path. Each RTT is run twice: with the proxy's default
//! (reset) and with `quic.keep_congestion_on_migration` (kept), each on a testbed of its own.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use mimiq_agent::strategy::HopStrategyConfig;
use serde::Serialize;

use crate::demo::{self, SERVER_V4};
use crate::masque::stop_client;
use crate::singlebox::{self, SingleBox, LONG};
use crate::traffic::pattern_download;

/// One cell: an RTT and a hop setting.
#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    /// Added round trip, ms.
    pub rtt_ms: u64,
    /// The proxy's congestion state on a hop: `reset` (RFC 9000 §9.4) or `kept`.
    pub congestion: &'static str,
    /// QUIC datagrams the agent sends per address (0: it never hops).
    pub hop_every: u32,
    /// Bytes downloaded, all of them as sent.
    pub bytes: u64,
    /// Goodput, Mbit/s.
    pub goodput_mbps: f64,
    /// Over the unhopped cell of the same RTT.
    pub ratio_to_unhopped: Option<f64>,
    /// Hops the agent completed, and that failed.
    pub hops_done: u64,
    /// See `hops_done`.
    pub hops_failed: u64,
    /// TCP segments the server retransmitted during the download (its namespace's
    /// `RetransSegs`): the tunnel carries datagrams unreliably, so what a hop loses shows here.
    pub inner_retransmits: u64,
}

/// Runs every RTT × hop setting for `seconds` each; `progress` hears a line per cell. With
/// `qlog`, the proxy and each agent write a qlog per connection there (quiche's, readable with
/// qvis): what each end sent and received around a hop.
pub fn run(
    rtts_ms: &[u64],
    hops: &[u32],
    seconds: u32,
    qlog: Option<&Path>,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<Cell>, String> {
    let qlog_dir = qlog.map_or(String::new(), |d| {
        format!("qlog_dir = \"{}\"\n", d.display())
    });
    let mut cells = Vec::new();
    for (&rtt, keep) in rtts_ms.iter().flat_map(|r| [(r, false), (r, true)]) {
        let congestion = if keep { "kept" } else { "reset" };
        let SingleBox {
            mut tb,
            mut allocator,
            switch,
            dir,
        } = singlebox::start_with(
            &LONG,
            &singlebox::Options {
                delay_us: rtt * 500,
                ..singlebox::Options::default()
            },
        );
        let result = (|| {
            let extra = format!("[quic]\nkeep_congestion_on_migration = {keep}\n{qlog_dir}");
            let mut proxy = demo::start_outside_with(&mut tb, dir.path(), &extra)?;
            let mut row = Vec::new();
            for (i, &every) in hops.iter().enumerate() {
                let hop = if every == 0 {
                    HopStrategyConfig::Never {}
                } else {
                    HopStrategyConfig::EveryPackets {
                        packets: u64::from(every),
                    }
                };
                let hop = toml::to_string(&hop).map_err(|e| e.to_string())?;
                let (mut agent, _) =
                    demo::start_agent_hopping(&mut tb, dir.path(), "c1", 1, &hop, &qlog_dir)?;
                let listen: SocketAddr = format!("{SERVER_V4}:{}", 9100 + i)
                    .parse()
                    .map_err(|e| format!("{e}"))?;
                let retrans_before = tcp_retransmitted(&tb, "srv")?;
                let started = Instant::now();
                let until = started + Duration::from_secs(u64::from(seconds));
                let (bytes, exact) =
                    pattern_download(&tb, "srv", listen, "c1", u64::MAX, Some(until))?;
                let elapsed = started.elapsed().as_secs_f64();
                let report = stop_client(&mut agent)?;
                let inner_retransmits =
                    tcp_retransmitted(&tb, "srv")?.saturating_sub(retrans_before);
                if !exact {
                    return Err(format!(
                        "rtt {rtt} ms, {congestion}, hop every {every}: the download was corrupted"
                    ));
                }
                let n = |k: &str| report["client"][k].as_u64().unwrap_or(0);
                let cell = Cell {
                    rtt_ms: rtt,
                    congestion,
                    hop_every: every,
                    bytes,
                    goodput_mbps: bytes as f64 * 8.0 / elapsed / 1e6,
                    ratio_to_unhopped: None,
                    hops_done: n("hops_done"),
                    hops_failed: n("hops_failed"),
                    inner_retransmits,
                };
                progress(&format!(
                    "rtt {rtt} ms, {congestion}, hop every {every}: {:.1} Mbit/s, {} hops",
                    cell.goodput_mbps, cell.hops_done
                ));
                row.push(cell);
            }
            proxy.proc.stop(Duration::from_secs(3));
            Ok::<_, String>(row)
        })();
        drop(switch);
        allocator.stop(Duration::from_secs(5));
        let mut row = result?;
        let base = row
            .iter()
            .find(|c| c.hop_every == 0)
            .map(|c| c.goodput_mbps);
        for c in &mut row {
            c.ratio_to_unhopped = base.filter(|b| *b > 0.0).map(|b| c.goodput_mbps / b);
        }
        cells.extend(row);
    }
    Ok(cells)
}

/// The `--json` summary: the goodput ratio at a hop every 25 datagrams, per RTT and congestion
/// state (`rtt10ms_reset`, `rtt10ms_kept`, ...).
pub fn summary(cells: &[Cell]) -> serde_json::Value {
    let ratios: serde_json::Map<String, serde_json::Value> = (cells.iter())
        .filter(|c| c.hop_every == 25)
        .map(|c| {
            let key = format!("rtt{}ms_{}", c.rtt_ms, c.congestion);
            (key, serde_json::json!(c.ratio_to_unhopped))
        })
        .collect();
    serde_json::json!({ "goodput_ratio_hop25": ratios })
}

/// The table, as Markdown.
pub fn markdown(cells: &[Cell]) -> String {
    let mut md = String::from(
        "| added RTT | congestion state | hop every (datagrams) | goodput, Mbit/s | over unhopped | hops done (failed) | TCP retransmits |\n|---:|---|---:|---:|---:|---:|---:|\n",
    );
    for c in cells {
        let every = match c.hop_every {
            0 => "never".to_string(),
            n => n.to_string(),
        };
        md += &format!(
            "| {} ms | {} | {every} | {:.1} | {} | {} ({}) | {} |\n",
            c.rtt_ms,
            c.congestion,
            c.goodput_mbps,
            c.ratio_to_unhopped
                .map_or("—".into(), |r| format!("{r:.2}")),
            c.hops_done,
            c.hops_failed,
            c.inner_retransmits
        );
    }
    md
}

/// TCP segments retransmitted so far in `host`'s namespace (`Tcp: RetransSegs` of
/// `/proc/net/snmp`, read from a thread in that namespace: `thread-self`, since `self` names the
/// process's).
fn tcp_retransmitted(tb: &crate::testbed::Testbed, host: &str) -> Result<u64, String> {
    let text = tb
        .run_in(host, || {
            std::fs::read_to_string("/proc/thread-self/net/snmp")
        })
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("{host}: /proc/thread-self/net/snmp: {e}"))?;
    snmp_field(&text, "Tcp:", "RetransSegs")
        .ok_or_else(|| format!("{host}: no Tcp RetransSegs in /proc/net/snmp"))
}

/// A field of `/proc/net/snmp`: each protocol has a line of names, then a line of values.
fn snmp_field(text: &str, proto: &str, name: &str) -> Option<u64> {
    let mut lines = text.lines().filter(|l| l.starts_with(proto));
    let names = lines.next()?.split_whitespace();
    let values = lines.next()?.split_whitespace();
    names.zip(values).find(|(n, _)| *n == name)?.1.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snmp_fields_are_read_by_name() {
        let text = "Ip: Forwarding DefaultTTL\nIp: 1 64\nTcp: RtoAlgorithm ActiveOpens RetransSegs\nTcp: 1 12 345\n";
        assert_eq!(snmp_field(text, "Tcp:", "RetransSegs"), Some(345));
        assert_eq!(snmp_field(text, "Tcp:", "InErrs"), None);
        assert_eq!(
            snmp_field("Tcp: RetransSegs\n", "Tcp:", "RetransSegs"),
            None
        );
        assert_eq!(
            snmp_field("Tcp: RetransSegs\nTcp: x\n", "Tcp:", "RetransSegs"),
            None
        );
    }
}
