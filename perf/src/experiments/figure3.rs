//! Seed 000 Figure 3, reproduced: the throughput of one QUIC connection that hops
//! between two client addresses at 0, 1, 2, 4, 10, 25 and 50 migrations per 100 packets, at
//! round-trip times of 10, 20, 30, 40 and 50 ms, and the latency each hop adds.
//!
//! # The setup (the seed's §4.2, on our stack)
//!
//! - Topology [`topology::line`]: `h1 — sw — h2`. `sw` runs `mimiq-switch --role l2fwd` whose
//!   impair stage delays every frame by RTT/2 on each output port (`--impair p0:delay_us=..`,
//!   `--impair p1:delay_us=..`), so the RTT between h1 and h2 is the asked one plus the stack's
//!   own (~0.2 ms). One switch per RTT.
//! - h2 runs [`H3Server`] (a stock quiche HTTP/3 server, it knows nothing of MIMIQ); h1 holds two
//!   client addresses, and a [`DirectConnection`] moves the connection between them (the seed:
//!   "hops between two fixed IP addresses"). Every hop is make-before-break: a probe from the
//!   other address, and the switch once it is answered (see `mimiq_agent::migrate`).
//! - The workload is the seed's: GET requests one after the other over one connection, each for
//!   a small page (1,256 bytes, the size of www.example.com's index.html), for a fixed time per
//!   cell (the seed ran 1,000 requests; a fixed time keeps the 35 cells within a few minutes).
//!   Throughput = requests completed per second, from the first request to the last response.
//!
//! # "Packets" and migrations per 100 packets
//!
//! As in the seed: "we convert requests to the corresponding number of packets (each client
//! request takes two packets)" — the request and its response. So after `i` requests the
//! connection has carried `2 i` packets, and at `m` migrations per 100 packets the hop number
//! `k` is due once `2 i m / 100 ≥ k` (4 per 100: one hop every 12.5 requests; 50 per 100: one
//! before every request). A due hop is requested just before the next request is sent (at a
//! request boundary, like the seed's); if the previous hop is still validating, it waits for the
//! next boundary (counted as `deferred`). The table also shows the datagrams actually on the
//! wire per request in both directions (they include ACK-only packets, the probes and the
//! PATH_RESPONSEs), and the achieved rate `hops completed × 100 / (2 × requests)`.
//!
//! # Throughput loss and added latency per hop
//!
//! - Baseline: 0 migrations per 100 packets at the same RTT, measured twice (first and last in
//!   the RTT's row, so drift shows); the loss of a cell is `1 − (its requests/s ÷ the mean of
//!   the two baselines)`.
//! - Added latency per hop, mean (the seed's "average latency introduced by each migration"):
//!   `(mean request time of the cell − mean request time of the baseline) × requests ÷ hops`,
//!   i.e. the extra time the cell took over the same number of requests without hops, per hop.
//! - Added latency per hop, distribution (HdrHistogram, one per RTT over all its hopping cells):
//!   for each completed hop, the sum over the requests it could touch — from the request sent
//!   right after the hop was asked for, to the second request sent after the switch, stopping
//!   at the next hop — of `request time − the baseline's median request time`. A sum at or below
//!   zero (the hop cost nothing measurable) is recorded as 0 and counted. Next to it, the
//!   noise floor: the same sum over 3 consecutive requests of the baseline runs, where no hop
//!   happened (windows back to back), so a tail that is the machine's (the two cores are shared,
//!   and a late wake-up of any of the switch, client or server threads delays a request) is not
//!   mistaken for the hop's.
//! - For reference, the hop's own time from request to switch (the probe's round trip, during
//!   which traffic stays on the old address) is reported too; it is not added to any request.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use mimiq_agent::direct::{DirectConfig, DirectConnection};
use mimiq_agent::migrate::MigrationConfig;
use mimiq_agent::strategy::HopStrategyConfig;
use mimiq_h3test::{
    client_config, run_timed_gets, H3Server, H3ServerConfig, H3ServerStats, TestCert,
};
use serde::Serialize;

use crate::switch::Switch;
use crate::testbed::{topology, Testbed};

/// The seed's round-trip times, in milliseconds.
pub const RTTS_MS: &[u32] = &[10, 20, 30, 40, 50];
/// The seed's migration frequencies, in migrations per 100 packets.
pub const RATES: &[u32] = &[0, 1, 2, 4, 10, 25, 50];
/// Body of each GET: the size of www.example.com's index.html.
pub const BODY_BYTES: u64 = 1_256;
/// The rate the target is set at (migrations per 100 packets).
pub const TARGET_RATE: u32 = 4;
/// Largest throughput loss at [`TARGET_RATE`] that meets the target, in percent.
pub const TARGET_LOSS_PCT: f64 = 5.0;
/// Largest mean added latency per hop that meets the target, in microseconds.
pub const TARGET_ADDED_US: f64 = 1_000.0;
/// Packets per request, the seed's conversion (request and response).
pub const PACKETS_PER_REQUEST: u64 = 2;

const SERVER_PORT: u16 = 4433;
/// The client's two addresses on h1 (besides its primary one).
const CLIENT_IPS: [&str; 2] = ["198.18.0.10", "198.18.0.11"];
/// Frames each port's delay line holds: the workload has a few frames in flight, and two lines
/// of 1,024 stay well inside the worker's UMEM (2 × ring size frames per port).
const MAX_HELD: usize = 1_024;
/// Unmeasured GETs on a fresh switch before the RTT's cells.
const WARMUP_REQUESTS: usize = 20;
/// Requests in a noise-floor window (what a hop's window usually spans: the request during the
/// probe and the two after the switch).
const PLACEBO_WINDOW: usize = 3;
/// A noise-floor window starts at every this many requests of a baseline run (back to back).
const PLACEBO_EVERY: usize = 3;

/// What to run.
#[derive(Debug, Clone, PartialEq)]
pub struct Params {
    /// Round-trip times, in milliseconds (1..=1000).
    pub rtts_ms: Vec<u32>,
    /// Migrations per 100 packets (0..=50); 0, the baseline, is always run.
    pub rates: Vec<u32>,
    /// Time per cell.
    pub per_cell: Duration,
    /// Body bytes per GET.
    pub body_bytes: u64,
}

impl Default for Params {
    fn default() -> Self {
        Self {
            rtts_ms: RTTS_MS.to_vec(),
            rates: RATES.to_vec(),
            per_cell: Duration::from_secs(5),
            body_bytes: BODY_BYTES,
        }
    }
}

impl Params {
    /// Checks the values; sorts and de-duplicates the lists and adds the baseline rate 0.
    pub fn normalized(&self) -> Result<Params, String> {
        let mut p = self.clone();
        if p.rtts_ms.is_empty() {
            return Err("at least one RTT is needed".into());
        }
        if let Some(bad) = p.rtts_ms.iter().find(|&&r| !(1..=1000).contains(&r)) {
            return Err(format!("RTT {bad} ms: must be 1..=1000"));
        }
        // Two packets per request: at most one hop per request, 50 per 100 packets.
        if let Some(bad) = p.rates.iter().find(|&&r| r > 50) {
            return Err(format!(
                "{bad} migrations per 100 packets: must be 0..=50 (one per request)"
            ));
        }
        if p.per_cell < Duration::from_millis(200) || p.per_cell > Duration::from_secs(600) {
            return Err(format!(
                "{:?} per cell: must be 0.2 s ..= 600 s",
                p.per_cell
            ));
        }
        if p.body_bytes == 0 || p.body_bytes > 1_000_000 {
            return Err(format!(
                "body of {} bytes: must be 1..=1000000",
                p.body_bytes
            ));
        }
        p.rates.push(0);
        p.rates.sort_unstable();
        p.rates.dedup();
        p.rtts_ms.sort_unstable();
        p.rtts_ms.dedup();
        Ok(p)
    }
}

/// One cell: one RTT, one migration rate, one connection.
#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    /// The RTT the switch was set to, ms.
    pub rtt_ms: u32,
    /// Migrations per 100 packets asked for.
    pub rate: u32,
    /// `first` or `last` for the two baseline runs, `""` otherwise.
    pub baseline_run: &'static str,
    /// GETs completed (all byte-exact).
    pub requests: u64,
    /// From the first request to the last response, s.
    pub seconds: f64,
    /// Requests per second.
    pub requests_per_s: f64,
    /// Body goodput, Mbit/s.
    pub goodput_mbps: f64,
    /// Throughput loss against the mean of the RTT's two baselines, percent (negative: faster).
    pub loss_pct: f64,
    /// Packets by the seed's count (2 per request).
    pub packets: u64,
    /// Hops due by the schedule.
    pub hops_due: u64,
    /// Hops asked for (`DirectConnection::hop_to` accepted).
    pub hops_requested: u64,
    /// Hops that switched the connection.
    pub hops_completed: u64,
    /// Hops started and abandoned.
    pub hops_failed: u64,
    /// Times a due hop waited for the next request because the previous one was validating.
    pub hops_deferred: u64,
    /// Hops completed × 100 / packets.
    pub achieved_rate: f64,
    /// Hops completed × 100 / datagrams on the wire (both directions, all kinds).
    pub achieved_rate_wire: f64,
    /// Datagrams the client sent.
    pub tx_datagrams: u64,
    /// Datagrams the client received.
    pub rx_datagrams: u64,
    /// (tx + rx) / requests.
    pub wire_datagrams_per_request: f64,
    /// Request time (request sent → response complete), median, µs.
    pub request_p50_us: u64,
    /// Request time, 99th percentile, µs.
    pub request_p99_us: u64,
    /// Request time, mean, µs.
    pub request_mean_us: f64,
    /// Added latency per hop, the seed's mean definition (module docs), µs; none without hops.
    pub added_per_hop_mean_us: Option<f64>,
    /// Its standard error (request-time noise of the cell and of the baseline), µs: large for
    /// cells with few hops, where the extra time of a run is divided by a small number.
    pub added_per_hop_mean_se_us: Option<f64>,
    /// Per-hop added latency (module docs), median, µs.
    pub added_per_hop_p50_us: Option<u64>,
    /// Per-hop added latency, 99th percentile, µs.
    pub added_per_hop_p99_us: Option<u64>,
    /// Hop request → switch (the probe's round trip), median, µs.
    pub switch_p50_us: Option<u64>,
}

/// The per-hop added latency at one RTT, over all its hopping cells.
#[derive(Debug, Clone, Serialize)]
pub struct HopLatency {
    /// RTT, ms.
    pub rtt_ms: u32,
    /// Baseline median request time, µs (what each request's time is compared with).
    pub baseline_request_p50_us: u64,
    /// Hops measured.
    pub hops: u64,
    /// Hops whose sum was at or below zero (recorded as 0).
    pub hops_at_or_below_zero: u64,
    /// Median, µs.
    pub p50_us: u64,
    /// 90th percentile, µs.
    pub p90_us: u64,
    /// 99th percentile, µs.
    pub p99_us: u64,
    /// Largest, µs.
    pub max_us: u64,
    /// Mean, µs.
    pub mean_us: f64,
    /// Hop request → switch (probe round trip), median over all cells, µs.
    pub switch_p50_us: u64,
    /// The seed's mean definition pooled over the RTT's hopping cells: their total extra time
    /// over the baseline ÷ their total hops, µs (weighted towards the cells with many hops,
    /// where it is precise).
    pub added_pooled_mean_us: f64,
    /// Its standard error, µs.
    pub added_pooled_se_us: f64,
    /// The noise floor: the same sum over 3 consecutive requests of the baseline runs (no hop),
    /// windows back to back; samples.
    pub placebo_samples: u64,
    /// Noise floor, median, µs (sums ≤ 0 recorded as 0).
    pub placebo_p50_us: u64,
    /// Noise floor, 99th percentile, µs.
    pub placebo_p99_us: u64,
    /// Noise floor, largest, µs.
    pub placebo_max_us: u64,
    /// The percentile distribution file in the output directory.
    pub hgrm_file: String,
    /// The distribution in HdrHistogram's percentile text format (values in ms).
    #[serde(skip)]
    pub hgrm: String,
}

/// Whether the target is met.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    /// Loss at [`TARGET_RATE`] per RTT (percent), when that rate was run.
    pub loss_at_target_rate: Vec<(u32, f64)>,
    /// ≤ [`TARGET_LOSS_PCT`] at every RTT.
    pub loss_met: bool,
    /// Largest pooled mean added latency per hop over the RTTs, µs.
    pub worst_added_pooled_mean_us: f64,
    /// Largest per-hop median over the RTTs, µs.
    pub worst_added_per_hop_p50_us: u64,
    /// Largest per-hop 99th percentile over the RTTs, µs.
    pub worst_added_per_hop_p99_us: u64,
    /// Largest no-hop noise-floor 99th percentile over the RTTs, µs.
    pub worst_noise_floor_p99_us: u64,
    /// At every RTT, the pooled mean and the median added latency per hop < [`TARGET_ADDED_US`].
    pub added_met: bool,
    /// At every RTT, the 99th percentile per hop < [`TARGET_ADDED_US`] too.
    pub added_p99_met: bool,
}

/// Everything one run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Figure3 {
    /// RTTs run, ms.
    pub rtts_ms: Vec<u32>,
    /// Rates run.
    pub rates: Vec<u32>,
    /// Seconds per cell.
    pub seconds_per_cell: f64,
    /// Body bytes per GET.
    pub body_bytes: u64,
    /// Every cell, by RTT, then rate (the second baseline last).
    pub cells: Vec<Cell>,
    /// Per-hop added latency, per RTT.
    pub hop_latency: Vec<HopLatency>,
    /// Frames the switch's delay lines dropped (full); 0 expected.
    pub switch_impair_full_drops: u64,
    /// Other frames the switch dropped, by the counters.
    pub switch_other_drops: u64,
    /// What the server saw over the whole run.
    pub server: ServerSummary,
    /// The target.
    pub verdict: Verdict,
}

/// The server's counters (for the JSON).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ServerSummary {
    /// Connections.
    pub connections: u64,
    /// Responses completed.
    pub responses_completed: u64,
    /// Client migrations it followed.
    pub peer_migrations: u64,
    /// CIDs reused from a second address (must be 0).
    pub reused_cids: u64,
}

/// What a client connection measured (raw, before the baseline is known).
struct RawCell {
    requests: u64,
    seconds: f64,
    latencies_us: Vec<u64>,
    /// Per hop: index of the first request sent after it was asked for, and the index of the
    /// first request sent after its switch (None: it never switched).
    hops: Vec<(usize, Option<usize>)>,
    hops_due: u64,
    hops_requested: u64,
    hops_completed: u64,
    hops_failed: u64,
    hops_deferred: u64,
    tx: u64,
    rx: u64,
    switch_us: Vec<u32>,
}

/// Runs the grid; `progress` gets a line per cell. Needs root (namespaces, AF_XDP).
pub fn run(params: &Params, progress: &mut dyn FnMut(&str)) -> Result<Figure3, String> {
    let p = params.normalized()?;
    let mut tb = Testbed::new().map_err(|e| e.to_string())?;
    topology::line(&mut tb).map_err(|e| e.to_string())?;
    for host in ["h1", "h2"] {
        tb.sysctl(host, "net.ipv6.conf.all.disable_ipv6", "1")
            .map_err(|e| e.to_string())?;
    }
    for ip in CLIENT_IPS {
        tb.add_addr("h1", "eth0", &format!("{ip}/24"))
            .map_err(|e| e.to_string())?;
    }
    // Static neighbours: no ARP exchange (delayed by the switch) inside a measured hop.
    let (mac1, mac2) = (mac_of(&tb, "h1")?, mac_of(&tb, "h2")?);
    let server_ip = topology::addr::H2_V4;
    tb.exec_ok(
        "h1",
        &[
            "ip", "neigh", "replace", server_ip, "lladdr", &mac2, "dev", "eth0",
        ],
    )
    .map_err(|e| e.to_string())?;
    for ip in CLIENT_IPS.iter().copied().chain([topology::addr::H1_V4]) {
        tb.exec_ok(
            "h2",
            &["ip", "neigh", "replace", ip, "lladdr", &mac1, "dev", "eth0"],
        )
        .map_err(|e| e.to_string())?;
    }
    let server_addr = SocketAddr::new(
        server_ip.parse::<IpAddr>().map_err(|e| e.to_string())?,
        SERVER_PORT,
    );
    let server = Server::start(&tb, server_addr)?;
    let result = run_grid(&mut tb, &p, server_addr, progress);
    let srv = server.finish()?;
    let (cells, hop_latency, full, other) = result?;
    let verdict = verdict(&cells, &hop_latency);
    Ok(Figure3 {
        rtts_ms: p.rtts_ms.clone(),
        rates: p.rates.clone(),
        seconds_per_cell: p.per_cell.as_secs_f64(),
        body_bytes: p.body_bytes,
        cells,
        hop_latency,
        switch_impair_full_drops: full,
        switch_other_drops: other,
        server: ServerSummary {
            connections: srv.connections,
            responses_completed: srv.responses_completed,
            peer_migrations: srv.peer_migrations,
            reused_cids: srv.reused_cids,
        },
        verdict,
    })
}

type Grid = (Vec<Cell>, Vec<HopLatency>, u64, u64);

fn run_grid(
    tb: &mut Testbed,
    p: &Params,
    server: SocketAddr,
    progress: &mut dyn FnMut(&str),
) -> Result<Grid, String> {
    let mut cells = Vec::new();
    let mut hop_latency = Vec::new();
    let (mut full, mut other) = (0, 0);
    let stats_dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    for &rtt in &p.rtts_ms {
        let delay_us = u64::from(rtt) * 500;
        let impair: Vec<String> = ["p0", "p1"]
            .iter()
            .map(|port| format!("{port}:delay_us={delay_us},max_held={MAX_HELD}"))
            .collect();
        let args = [
            "--role",
            "l2fwd",
            "--port",
            "p0",
            "--port",
            "p1",
            "--stats-interval-ms",
            "100",
            "--impair",
            &impair[0],
            "--impair",
            &impair[1],
        ];
        let stats_path = stats_dir.path().join(format!("switch-{rtt}ms.json"));
        let switch = Switch::start(tb, "sw", &args, &stats_path)?;
        // Warm-up: unmeasured GETs (first packets through a fresh switch, server caches).
        client(tb, server, 0, Duration::ZERO, WARMUP_REQUESTS, p.body_bytes)
            .map_err(|e| format!("RTT {rtt} ms, warm-up: {e}"))?;

        let mut order: Vec<(u32, &'static str)> = vec![(0, "first")];
        order.extend(p.rates.iter().filter(|&&r| r > 0).map(|&r| (r, "")));
        order.push((0, "last"));
        let mut raws = Vec::new();
        for (rate, which) in order {
            let raw = client(tb, server, rate, p.per_cell, 0, p.body_bytes)
                .map_err(|e| format!("RTT {rtt} ms, {rate} per 100 packets: {e}"))?;
            progress(&format!(
                "  RTT {rtt:>2} ms  {rate:>2}/100 pkts{}  {:>5} requests  {:>7.1} req/s  hops {:>4}/{:<4} (failed {}, deferred {})  request p50 {:.2} ms",
                if which.is_empty() { String::new() } else { format!(" ({which} baseline)") },
                raw.requests,
                raw.requests as f64 / raw.seconds,
                raw.hops_completed,
                raw.hops_due,
                raw.hops_failed,
                raw.hops_deferred,
                percentile(&raw.latencies_us, 50.0) as f64 / 1000.0,
            ));
            raws.push((rate, which, raw));
        }
        let s = switch.stats_settled(Duration::from_secs(10))?;
        full += s.drops("impair_full");
        other += s.total_drops() - s.drops("impair_full");
        drop(switch);
        let (row, hops) = summarize(rtt, p.body_bytes, raws)?;
        cells.extend(row);
        hop_latency.push(hops);
    }
    Ok((cells, hop_latency, full, other))
}

/// Turns one RTT's raw cells into table rows and its per-hop distribution.
fn summarize(
    rtt: u32,
    body_bytes: u64,
    raws: Vec<(u32, &'static str, RawCell)>,
) -> Result<(Vec<Cell>, HopLatency), String> {
    let baselines: Vec<&RawCell> = raws
        .iter()
        .filter(|(r, _, _)| *r == 0)
        .map(|(_, _, c)| c)
        .collect();
    let base_rps = baselines
        .iter()
        .map(|c| c.requests as f64 / c.seconds)
        .sum::<f64>()
        / baselines.len() as f64;
    let base_lat: Vec<u64> = baselines
        .iter()
        .flat_map(|c| c.latencies_us.iter().copied())
        .collect();
    let base_mean = mean(&base_lat);
    let base_var = variance(&base_lat);
    let base_n = base_lat.len().max(1) as f64;
    // Pooled: Σ extra time, Σ hops, Σ n·var of the cells, Σ n.
    let (mut pooled_extra, mut pooled_hops, mut pooled_var, mut pooled_n) = (0.0, 0u64, 0.0, 0.0);
    let base_p50 = percentile(&base_lat, 50.0);
    let mut hist = Histogram::<u64>::new(3).map_err(|e| e.to_string())?;
    let mut placebo = Histogram::<u64>::new(3).map_err(|e| e.to_string())?;
    for c in &baselines {
        let excess = |i: usize| c.latencies_us[i] as i64 - base_p50 as i64;
        for first in
            (0..c.latencies_us.len().saturating_sub(PLACEBO_WINDOW - 1)).step_by(PLACEBO_EVERY)
        {
            let sum: i64 = (first..first + PLACEBO_WINDOW).map(excess).sum();
            placebo
                .record(sum.max(0) as u64)
                .map_err(|e| e.to_string())?;
        }
    }
    let mut at_or_below_zero = 0;
    let mut switch_all: Vec<u64> = Vec::new();
    let mut cells = Vec::new();
    for (rate, which, c) in raws {
        let rps = c.requests as f64 / c.seconds;
        let mut per_hop = Vec::new();
        for (k, &(first, switched)) in c.hops.iter().enumerate() {
            let Some(after_switch) = switched else {
                continue;
            };
            let next_hop = c.hops.get(k + 1).map_or(usize::MAX, |h| h.0);
            let end = (after_switch + 2).min(next_hop).min(c.latencies_us.len());
            let added: i64 = (first..end)
                .map(|i| c.latencies_us[i] as i64 - base_p50 as i64)
                .sum();
            if added <= 0 {
                at_or_below_zero += 1;
            }
            let added = added.max(0) as u64;
            per_hop.push(added);
            hist.record(added).map_err(|e| e.to_string())?;
        }
        let switch_us: Vec<u64> = c.switch_us.iter().map(|&v| u64::from(v)).collect();
        switch_all.extend(&switch_us);
        let mean_lat = mean(&c.latencies_us);
        let hopped = c.hops_completed > 0;
        let n = c.latencies_us.len() as f64;
        let var = variance(&c.latencies_us);
        if hopped {
            pooled_extra += (mean_lat - base_mean) * n;
            pooled_hops += c.hops_completed;
            pooled_var += n * var;
            pooled_n += n;
        }
        let se = (n * var + n * n * base_var / base_n).sqrt() / c.hops_completed.max(1) as f64;
        cells.push(Cell {
            rtt_ms: rtt,
            rate,
            baseline_run: which,
            requests: c.requests,
            seconds: c.seconds,
            requests_per_s: rps,
            goodput_mbps: c.requests as f64 * body_bytes as f64 * 8.0 / c.seconds / 1e6,
            loss_pct: (1.0 - rps / base_rps) * 100.0,
            packets: c.requests * PACKETS_PER_REQUEST,
            hops_due: c.hops_due,
            hops_requested: c.hops_requested,
            hops_completed: c.hops_completed,
            hops_failed: c.hops_failed,
            hops_deferred: c.hops_deferred,
            achieved_rate: c.hops_completed as f64 * 100.0
                / (c.requests * PACKETS_PER_REQUEST).max(1) as f64,
            achieved_rate_wire: c.hops_completed as f64 * 100.0 / (c.tx + c.rx).max(1) as f64,
            tx_datagrams: c.tx,
            rx_datagrams: c.rx,
            wire_datagrams_per_request: (c.tx + c.rx) as f64 / c.requests.max(1) as f64,
            request_p50_us: percentile(&c.latencies_us, 50.0),
            request_p99_us: percentile(&c.latencies_us, 99.0),
            request_mean_us: mean_lat,
            added_per_hop_mean_us: hopped
                .then(|| (mean_lat - base_mean) * n / c.hops_completed as f64),
            added_per_hop_mean_se_us: hopped.then_some(se),
            added_per_hop_p50_us: (!per_hop.is_empty()).then(|| percentile(&per_hop, 50.0)),
            added_per_hop_p99_us: (!per_hop.is_empty()).then(|| percentile(&per_hop, 99.0)),
            switch_p50_us: (!switch_us.is_empty()).then(|| percentile(&switch_us, 50.0)),
        });
    }
    let hgrm_file = format!("hop-latency-rtt{rtt}ms.hgrm");
    let hops = HopLatency {
        rtt_ms: rtt,
        baseline_request_p50_us: base_p50,
        hops: hist.len(),
        hops_at_or_below_zero: at_or_below_zero,
        p50_us: hist.value_at_quantile(0.5),
        p90_us: hist.value_at_quantile(0.9),
        p99_us: hist.value_at_quantile(0.99),
        max_us: hist.max(),
        mean_us: hist.mean(),
        switch_p50_us: percentile(&switch_all, 50.0),
        added_pooled_mean_us: pooled_extra / pooled_hops.max(1) as f64,
        added_pooled_se_us: (pooled_var + pooled_n * pooled_n * base_var / base_n).sqrt()
            / pooled_hops.max(1) as f64,
        placebo_samples: placebo.len(),
        placebo_p50_us: placebo.value_at_quantile(0.5),
        placebo_p99_us: placebo.value_at_quantile(0.99),
        placebo_max_us: placebo.max(),
        hgrm_file,
        hgrm: hgrm(&hist),
    };
    Ok((cells, hops))
}

fn verdict(cells: &[Cell], hops: &[HopLatency]) -> Verdict {
    let loss: Vec<(u32, f64)> = cells
        .iter()
        .filter(|c| c.rate == TARGET_RATE)
        .map(|c| (c.rtt_ms, c.loss_pct))
        .collect();
    let worst_pooled = hops
        .iter()
        .map(|h| h.added_pooled_mean_us)
        .fold(f64::NEG_INFINITY, f64::max);
    let worst_pooled = if worst_pooled.is_finite() {
        worst_pooled
    } else {
        0.0
    };
    let worst_p50 = hops.iter().map(|h| h.p50_us).max().unwrap_or(0);
    let worst_p99 = hops.iter().map(|h| h.p99_us).max().unwrap_or(0);
    Verdict {
        loss_met: !loss.is_empty() && loss.iter().all(|&(_, l)| l <= TARGET_LOSS_PCT),
        loss_at_target_rate: loss,
        worst_added_pooled_mean_us: worst_pooled,
        worst_added_per_hop_p50_us: worst_p50,
        worst_added_per_hop_p99_us: worst_p99,
        worst_noise_floor_p99_us: hops.iter().map(|h| h.placebo_p99_us).max().unwrap_or(0),
        added_met: worst_pooled < TARGET_ADDED_US && (worst_p50 as f64) < TARGET_ADDED_US,
        added_p99_met: (worst_p99 as f64) < TARGET_ADDED_US,
    }
}

/// One connection from h1: `warmup` GETs without hops when `run_for` is zero, else GETs for
/// `run_for` with `rate` migrations per 100 packets.
fn client(
    tb: &Testbed,
    server: SocketAddr,
    rate: u32,
    run_for: Duration,
    warmup: usize,
    body: u64,
) -> Result<RawCell, String> {
    tb.run_in("h1", move || -> Result<RawCell, String> {
        let locals: Vec<SocketAddr> = CLIENT_IPS
            .iter()
            .map(|ip| SocketAddr::new(ip.parse().expect("a literal address"), 0))
            .collect();
        let mut quic = client_config(locals.len()).map_err(|e| format!("client config: {e}"))?;
        let config = DirectConfig {
            // Hops are asked for at request boundaries below, by the seed's packet count.
            strategy: HopStrategyConfig::Never {},
            seed: 0xF163.into(),
            connection: u64::from(rate),
            migration: MigrationConfig::default(),
        };
        let mut direct =
            DirectConnection::connect(&locals, server, Some("quic.tech"), &mut quic, &config)
                .map_err(|e| e.to_string())?;
        let bound = direct.local_addrs();
        let mut sched = Schedule {
            rate,
            ..Schedule::default()
        };
        let (run_for, limit) = if run_for.is_zero() {
            (Duration::from_secs(3_600), Some(warmup))
        } else {
            (run_for, None)
        };
        let deadline = run_for.min(Duration::from_secs(600)) + Duration::from_secs(30);
        let timed = run_timed_gets(
            &mut direct,
            "quic.tech",
            body,
            run_for,
            deadline,
            &mut |d, i| {
                if limit.is_some_and(|n| i >= n) {
                    return false;
                }
                sched.before_request(d, &bound, i);
                true
            },
        )
        .map_err(|e| {
            format!(
                "{e}; hops {:?}; shell {:?}",
                direct.migration_stats(),
                direct.stats()
            )
        })?;
        let _ = direct.close();
        let hops = direct.migration_stats();
        let shell = direct.stats();
        let latencies_us: Vec<u64> = timed
            .gets
            .iter()
            .map(|g| g.finished.saturating_duration_since(g.sent).as_micros() as u64)
            .collect();
        // Match each switch to its hop: hops run one at a time, so the switch of hop k comes
        // after hop k was asked for and before hop k + 1 was.
        let mut switches = timed.switches.iter().peekable();
        let mut matched = Vec::new();
        for (k, &(first, asked)) in sched.asked.iter().enumerate() {
            let next = sched.asked.get(k + 1).map(|h| h.1);
            while switches.peek().is_some_and(|&&s| s < asked) {
                switches.next();
            }
            let switched = match switches.peek() {
                Some(&&s) if next.is_none_or(|n| s < n) => {
                    switches.next();
                    // The first request sent after the switch.
                    Some(
                        timed
                            .gets
                            .iter()
                            .position(|g| g.sent >= s)
                            .unwrap_or(timed.gets.len()),
                    )
                }
                _ => None,
            };
            matched.push((first, switched));
        }
        Ok(RawCell {
            requests: timed.report.responses,
            seconds: timed.report.elapsed.as_secs_f64(),
            latencies_us,
            hops: matched,
            hops_due: sched.due,
            hops_requested: sched.asked.len() as u64,
            hops_completed: hops.hops_completed,
            hops_failed: hops.hops_failed,
            hops_deferred: sched.deferred,
            tx: shell.tx_datagrams,
            rx: shell.rx_datagrams,
            switch_us: direct.migrator().latencies_us().to_vec(),
        })
    })
    .map_err(|e| e.to_string())?
}

/// The seed's fixed-interval schedule: hop `k` is due once `2 i rate / 100 ≥ k`.
#[derive(Default)]
struct Schedule {
    rate: u32,
    due: u64,
    deferred: u64,
    /// Per hop asked for: the index of the request sent right after, and when.
    asked: Vec<(usize, Instant)>,
}

impl Schedule {
    fn before_request(&mut self, d: &mut DirectConnection, bound: &[SocketAddr], i: usize) {
        self.due = (i as u64 * PACKETS_PER_REQUEST * u64::from(self.rate)) / 100;
        if (self.asked.len() as u64) >= self.due {
            return;
        }
        if d.migrator().hop_in_progress().is_some() {
            self.deferred += 1;
            return;
        }
        let current = d.migrator().local_addr();
        let Some(&to) = bound.iter().find(|&&a| a != current) else {
            return;
        };
        if d.hop_to(to).is_ok() {
            self.asked.push((i, Instant::now()));
        }
    }
}

/// The HTTP/3 server on a thread in h2.
struct Server {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<std::io::Result<Result<H3ServerStats, String>>>,
}

impl Server {
    fn start(tb: &Testbed, addr: SocketAddr) -> Result<Server, String> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = {
            let stop = Arc::clone(&stop);
            tb.spawn_in("h2", move || -> Result<H3ServerStats, String> {
                let started = (|| {
                    let cert = TestCert::new().map_err(|e| format!("test certificate: {e}"))?;
                    H3Server::bind(addr, &cert, H3ServerConfig::default())
                        .map_err(|e| e.to_string())
                })();
                let mut server = match started {
                    Ok(s) => {
                        let _ = ready_tx.send(Ok(()));
                        s
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.clone()));
                        return Err(e);
                    }
                };
                server.run(&stop).map_err(|e| format!("server loop: {e}"))?;
                Ok(server.stats())
            })
            .map_err(|e| e.to_string())?
        };
        match ready_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => Ok(Server { stop, thread }),
            Ok(Err(e)) => Err(format!("HTTP/3 server: {e}")),
            Err(_) => Err("HTTP/3 server did not start".into()),
        }
    }

    fn finish(self) -> Result<H3ServerStats, String> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.join() {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => Err(format!("server thread could not join h2: {e}")),
            Err(_) => Err("server thread panicked".into()),
        }
    }
}

fn mac_of(tb: &Testbed, host: &str) -> Result<String, String> {
    let out = tb
        .exec_ok(host, &["cat", "/sys/class/net/eth0/address"])
        .map_err(|e| e.to_string())?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Nearest-rank percentile; 0 for no samples.
fn percentile(samples: &[u64], p: f64) -> u64 {
    if samples.is_empty() {
        return 0;
    }
    let mut s = samples.to_vec();
    s.sort_unstable();
    let rank = ((p / 100.0 * s.len() as f64).ceil() as usize).clamp(1, s.len());
    s[rank - 1]
}

/// Sample variance; 0 for fewer than two samples.
fn variance(samples: &[u64]) -> f64 {
    if samples.len() < 2 {
        return 0.0;
    }
    let m = mean(samples);
    samples.iter().map(|&v| (v as f64 - m).powi(2)).sum::<f64>() / (samples.len() - 1) as f64
}

fn mean(samples: &[u64]) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    samples.iter().sum::<u64>() as f64 / samples.len() as f64
}

/// HdrHistogram's percentile distribution text (the `.hgrm` format of `outputPercentileDistribution`),
/// values recorded in µs and printed in ms.
pub fn hgrm(h: &Histogram<u64>) -> String {
    let mut s = String::from("       Value     Percentile TotalCount 1/(1-Percentile)\n\n");
    if h.is_empty() {
        s.push_str("#[Mean    =        0.000, StdDeviation   =        0.000]\n#[Max     =        0.000, Total count    =            0]\n");
        return s;
    }
    let mut total = 0;
    for v in h.iter_quantiles(5) {
        total += v.count_since_last_iteration();
        let q = v.quantile_iterated_to();
        let value = v.value_iterated_to() as f64 / 1000.0;
        if q < 1.0 {
            let _ = writeln!(
                s,
                "{value:12.3} {q:2.12} {total:10} {:14.2}",
                1.0 / (1.0 - q)
            );
        } else {
            let _ = writeln!(s, "{value:12.3} {q:2.12} {total:10}",);
        }
    }
    let _ = writeln!(
        s,
        "#[Mean    = {:12.3}, StdDeviation   = {:12.3}]",
        h.mean() / 1000.0,
        h.stdev() / 1000.0
    );
    let _ = writeln!(
        s,
        "#[Max     = {:12.3}, Total count    = {:12}]",
        h.max() as f64 / 1000.0,
        h.len()
    );
    s
}

/// The Figure 3 pivot (throughput and loss by rate and RTT) and the full table, Markdown.
pub fn markdown(f: &Figure3) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "Throughput in requests/s (change against the mean of the two 0-migration runs; negative = slower), {} s per cell, sequential GETs of {} bytes, packets = 2 per request (seed 000):\n",
        f.seconds_per_cell, f.body_bytes
    );
    md.push_str("| migrations / 100 packets |");
    for r in &f.rtts_ms {
        let _ = write!(md, " RTT {r} ms |");
    }
    md.push_str("\n|---|");
    md.push_str(&"---|".repeat(f.rtts_ms.len()));
    md.push('\n');
    for &rate in &f.rates {
        let _ = write!(md, "| {rate} |");
        for &rtt in &f.rtts_ms {
            if rate == 0 {
                let b: Vec<&Cell> = f
                    .cells
                    .iter()
                    .filter(|c| c.rtt_ms == rtt && c.rate == 0)
                    .collect();
                let rps = b.iter().map(|c| c.requests_per_s).sum::<f64>() / b.len().max(1) as f64;
                let spread = b.iter().map(|c| c.loss_pct.abs()).fold(0.0, f64::max);
                let _ = write!(md, " {rps:.1} (baseline ±{spread:.1} %) |");
            } else if let Some(c) = f.cells.iter().find(|c| c.rtt_ms == rtt && c.rate == rate) {
                let _ = write!(md, " {:.1} ({:+.1} %) |", c.requests_per_s, -c.loss_pct);
            } else {
                md.push_str(" – |");
            }
        }
        md.push('\n');
    }
    md.push_str("\nEvery cell:\n\n| RTT ms | mig/100 pkts | achieved | per 100 wire dgrams | requests | req/s | loss % | hops done/due | failed | deferred | wire dgrams/req | request p50 ms | request p99 ms | added/hop mean ms | added/hop p50 ms | added/hop p99 ms | request→switch p50 ms |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    let ms = |v: Option<u64>| v.map_or("–".to_string(), |v| format!("{:.3}", v as f64 / 1000.0));
    for c in &f.cells {
        let _ = writeln!(
            md,
            "| {} | {}{} | {:.2} | {:.2} | {} | {:.1} | {:.2} | {}/{} | {} | {} | {:.2} | {:.3} | {:.3} | {} | {} | {} | {} |",
            c.rtt_ms,
            c.rate,
            if c.baseline_run.is_empty() { String::new() } else { format!(" ({})", c.baseline_run) },
            c.achieved_rate,
            c.achieved_rate_wire,
            c.requests,
            c.requests_per_s,
            c.loss_pct,
            c.hops_completed,
            c.hops_due,
            c.hops_failed,
            c.hops_deferred,
            c.wire_datagrams_per_request,
            c.request_p50_us as f64 / 1000.0,
            c.request_p99_us as f64 / 1000.0,
            c.added_per_hop_mean_us.map_or("–".to_string(), |v| format!(
                "{:.3} ± {:.3}",
                v / 1000.0,
                c.added_per_hop_mean_se_us.unwrap_or(0.0) / 1000.0
            )),
            ms(c.added_per_hop_p50_us),
            ms(c.added_per_hop_p99_us),
            ms(c.switch_p50_us),
        );
    }
    md.push_str("\nAdded latency per hop, per RTT (HdrHistogram over all hopping cells; distributions in the .hgrm files):\n\n| RTT ms | baseline request p50 ms | hops | pooled mean ± se ms | ≤ 0 | p50 ms | p90 ms | p99 ms | max ms | mean ms | no-hop floor p50 / p99 / max ms (n) | request→switch p50 ms | file |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for h in &f.hop_latency {
        let _ = writeln!(
            md,
            "| {} | {:.3} | {} | {:.3} ± {:.3} | {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} / {:.3} / {:.3} ({}) | {:.3} | {} |",
            h.rtt_ms,
            h.baseline_request_p50_us as f64 / 1000.0,
            h.hops,
            h.added_pooled_mean_us / 1000.0,
            h.added_pooled_se_us / 1000.0,
            h.hops_at_or_below_zero,
            h.p50_us as f64 / 1000.0,
            h.p90_us as f64 / 1000.0,
            h.p99_us as f64 / 1000.0,
            h.max_us as f64 / 1000.0,
            h.mean_us / 1000.0,
            h.placebo_p50_us as f64 / 1000.0,
            h.placebo_p99_us as f64 / 1000.0,
            h.placebo_max_us as f64 / 1000.0,
            h.placebo_samples,
            h.switch_p50_us as f64 / 1000.0,
            h.hgrm_file,
        );
    }
    let v = &f.verdict;
    let losses: Vec<String> = v
        .loss_at_target_rate
        .iter()
        .map(|(r, l)| format!("{r} ms: {l:.2} %"))
        .collect();
    let _ = writeln!(
        md,
        "\nTarget: ≤ {TARGET_LOSS_PCT} % loss at {TARGET_RATE} per 100 packets at every RTT ({}) — {}. < 1 ms added per hop: pooled mean (worst RTT {:.3} ms) and median (worst {:.3} ms) — {}; 99th percentile (worst {:.3} ms, no-hop noise floor's worst p99 {:.3} ms) — {}.",
        losses.join(", "),
        if v.loss_met { "met" } else { "NOT met" },
        v.worst_added_pooled_mean_us / 1000.0,
        v.worst_added_per_hop_p50_us as f64 / 1000.0,
        if v.added_met { "met" } else { "NOT met" },
        v.worst_added_per_hop_p99_us as f64 / 1000.0,
        v.worst_noise_floor_p99_us as f64 / 1000.0,
        if v.added_p99_met { "met" } else { "not met" },
    );
    let _ = writeln!(
        md,
        "Switch delay-line drops (full): {}; other switch drops: {}. Server: {} connections, {} responses, {} client migrations followed, {} reused CIDs.",
        f.switch_impair_full_drops,
        f.switch_other_drops,
        f.server.connections,
        f.server.responses_completed,
        f.server.peer_migrations,
        f.server.reused_cids,
    );
    md
}

/// Every cell as CSV (a header line, then one line per cell).
pub fn csv(f: &Figure3) -> String {
    let mut s = String::from("rtt_ms,rate,baseline_run,achieved_rate,achieved_rate_wire,requests,seconds,requests_per_s,goodput_mbps,loss_pct,packets,hops_due,hops_requested,hops_completed,hops_failed,hops_deferred,tx_datagrams,rx_datagrams,wire_datagrams_per_request,request_p50_us,request_p99_us,request_mean_us,added_per_hop_mean_us,added_per_hop_mean_se_us,added_per_hop_p50_us,added_per_hop_p99_us,switch_p50_us\n");
    let opt = |v: Option<u64>| v.map_or(String::new(), |v| v.to_string());
    for c in &f.cells {
        let _ = writeln!(
            s,
            "{},{},{},{:.3},{:.3},{},{:.4},{:.3},{:.4},{:.3},{},{},{},{},{},{},{},{},{:.3},{},{},{:.1},{},{},{},{},{}",
            c.rtt_ms,
            c.rate,
            c.baseline_run,
            c.achieved_rate,
            c.achieved_rate_wire,
            c.requests,
            c.seconds,
            c.requests_per_s,
            c.goodput_mbps,
            c.loss_pct,
            c.packets,
            c.hops_due,
            c.hops_requested,
            c.hops_completed,
            c.hops_failed,
            c.hops_deferred,
            c.tx_datagrams,
            c.rx_datagrams,
            c.wire_datagrams_per_request,
            c.request_p50_us,
            c.request_p99_us,
            c.request_mean_us,
            c.added_per_hop_mean_us.map_or(String::new(), |v| format!("{v:.1}")),
            c.added_per_hop_mean_se_us.map_or(String::new(), |v| format!("{v:.1}")),
            opt(c.added_per_hop_p50_us),
            opt(c.added_per_hop_p99_us),
            opt(c.switch_p50_us),
        );
    }
    s
}

/// Writes `results.csv`, `figure3.svg` and one `.hgrm` per RTT into `out` (main writes
/// `results.json` and `results.md`).
pub fn write_files(out: &Path, f: &Figure3) -> Result<(), String> {
    std::fs::create_dir_all(out).map_err(|e| format!("creating {}: {e}", out.display()))?;
    let write = |name: &str, text: &str| {
        std::fs::write(out.join(name), text)
            .map_err(|e| format!("writing {}: {e}", out.join(name).display()))
    };
    write("results.csv", &csv(f))?;
    write("figure3.svg", &svg(f)?)?;
    for h in &f.hop_latency {
        write(&h.hgrm_file, &h.hgrm)?;
    }
    Ok(())
}

/// The plot: throughput (requests/s) against migrations per 100 packets, one line per RTT, the
/// rates evenly spaced on the x axis as in the seed's figure.
pub fn svg(f: &Figure3) -> Result<String, String> {
    use crate::plot::{Panel, Series};
    let point = |rtt: u32, rate: u32| -> Option<f64> {
        let v: Vec<f64> = f
            .cells
            .iter()
            .filter(|c| c.rtt_ms == rtt && c.rate == rate)
            .map(|c| c.requests_per_s)
            .collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    };
    let series = f
        .rtts_ms
        .iter()
        .map(|&rtt| Series {
            name: format!("RTT {rtt} ms"),
            points: f
                .rates
                .iter()
                .enumerate()
                .filter_map(|(i, &r)| point(rtt, r).map(|v| (i as f64, v)))
                .collect(),
        })
        .collect();
    let rates = f.rates.clone();
    let panel = Panel {
        // The rates at 0, 1, 2, ...: a tick on each, labelled with its rate.
        x_label: Box::new(move |x| {
            let i = x.round();
            if (x - i).abs() < 1e-6 && i >= 0.0 {
                rates.get(i as usize).map_or(String::new(), u32::to_string)
            } else {
                String::new()
            }
        }),
        x_ticks: f.rates.len(),
        ..Panel::new(
            "Throughput of one connection under migration (seed 000 Figure 3, mimiq)",
            "migrations per 100 packets",
            "throughput (requests/s)",
            series,
        )
    };
    crate::plot::svg(760, 460, vec![panel])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_are_checked_and_the_baseline_is_always_run() {
        let p = Params {
            rates: vec![4, 4, 50],
            rtts_ms: vec![20, 10],
            ..Params::default()
        };
        let n = p.normalized().unwrap();
        assert_eq!(n.rates, vec![0, 4, 50]);
        assert_eq!(n.rtts_ms, vec![10, 20]);
        assert!(Params {
            rates: vec![51],
            ..Params::default()
        }
        .normalized()
        .is_err());
        assert!(Params {
            rtts_ms: vec![],
            ..Params::default()
        }
        .normalized()
        .is_err());
        assert!(Params {
            rtts_ms: vec![0],
            ..Params::default()
        }
        .normalized()
        .is_err());
        assert!(Params {
            per_cell: Duration::ZERO,
            ..Params::default()
        }
        .normalized()
        .is_err());
    }

    #[test]
    fn the_schedule_spaces_hops_by_the_seeds_packet_count() {
        // 4 per 100 packets, 2 packets per request: hop k due at request ceil(12.5 k).
        let due = |i: u64| i * PACKETS_PER_REQUEST * 4 / 100;
        assert_eq!(due(12), 0);
        assert_eq!(due(13), 1);
        assert_eq!(due(25), 2);
        assert_eq!(due(100), 8);
        let every = |i: u64| i * PACKETS_PER_REQUEST * 50 / 100;
        assert_eq!(every(7), 7, "50 per 100: one before every request");
    }

    #[test]
    fn hgrm_is_well_formed() {
        let mut h = Histogram::<u64>::new(3).unwrap();
        for v in [0, 100, 250, 900, 4_000] {
            h.record(v).unwrap();
        }
        let text = hgrm(&h);
        assert!(text.starts_with("       Value     Percentile TotalCount"));
        assert!(text.contains("Total count    =            5]"), "{text}");
    }
}
