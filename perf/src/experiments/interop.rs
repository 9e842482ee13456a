//! `mimiq-perf bench interop`: direct mode (seed 000 §4) against HTTP/3 servers the project did
//! not write the QUIC stack of, and against peers that retire connection IDs at once.
//!
//! Each cell is a server, an address family and a hop strategy; each run in it is one QUIC
//! connection from a client with four addresses (`crate::direct`) that GETs `requests` bodies
//! of 1 B to 20 KB one after the other while it hops, every body checked byte for byte. The
//! servers:
//! - `quiche`: the project's quiche test server as a stock quiche server runs (it keeps a path
//!   per client address), the baseline for hop counts;
//! - `quiche-retiring`: the same, forgetting each path a client left, and retiring the client's
//!   ID used there, at once (RFC 9000 §5.1.2 allows it);
//! - `aioquic`: aioquic (PyPI), an independent QUIC stack, which retires the client's IDs as it
//!   follows each hop (`perf/interop/aioquic_h3_server.py`).
//!
//! A run counts as completed when every request was answered byte-exact and the client closed
//! the connection itself without error. Reported per cell: runs completed, the median, least
//! and most hops per run, and the median against the baseline's for the same family and
//! strategy. Hop counts depend on the machine's load (a hop waits a round trip for its probe),
//! so compare them within one run of the bench.

use std::fmt::Write as _;
use std::net::SocketAddr;

use mimiq_agent::strategy::HopStrategyConfig;
use mimiq_h3test::H3ServerConfig;
use serde::Serialize;

use crate::direct::{
    self, body_bytes, run_gets_in, sizes, sockets, AioquicServer, Gets, QuicheServer, PORT,
};

/// The servers, in the order they run.
pub const SERVERS: [&str; 3] = ["quiche", "quiche-retiring", "aioquic"];
/// The strategies, in the short form `HopStrategyConfig` parses.
pub const STRATEGIES: [&str; 4] = ["every:100", "every:25", "every:5", "time:50:100"];

/// What to run.
#[derive(Debug, Clone)]
pub struct Params {
    /// Runs per cell.
    pub runs: u32,
    /// GETs per run.
    pub requests: usize,
    /// Server names from [`SERVERS`].
    pub servers: Vec<String>,
    /// Strategies in their short form.
    pub strategies: Vec<String>,
    /// IPv4, IPv6 or both.
    pub families: Vec<Family>,
}

/// An address family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Family {
    /// 198.18.0.0/24.
    V4,
    /// fd00::/64.
    V6,
}

/// One connection's run.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// The server.
    pub server: String,
    /// The address family.
    pub family: Family,
    /// The strategy, short form.
    pub strategy: String,
    /// 0-based index in its cell.
    pub run: u32,
    /// Every request answered byte-exact and the connection closed by the client without
    /// error.
    pub completed: bool,
    /// Why not, when not.
    pub error: Option<String>,
    /// Responses received complete and byte-exact.
    pub responses: u64,
    /// Hops completed.
    pub hops: u64,
    /// Hops started and abandoned.
    pub hops_failed: u64,
    /// QUIC datagrams the client sent (what packet-count strategies count).
    pub tx_datagrams: u64,
    /// PATH_CHALLENGEs sent again for a late answer.
    pub probes_resent: u64,
    /// Packets dropped for a retired or unknown destination connection ID.
    pub unknown_dcid_dropped: u64,
    /// Packets read although their destination connection ID had just been retired.
    pub retired_dcid_read: u64,
    /// From the first request to the last response, in milliseconds.
    pub elapsed_ms: f64,
}

/// One cell's figures.
#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    /// The server.
    pub server: String,
    /// The address family.
    pub family: Family,
    /// The strategy, short form.
    pub strategy: String,
    /// Runs made.
    pub runs: u32,
    /// Runs completed.
    pub completed: u32,
    /// Median hops per run.
    pub hops_median: u64,
    /// Fewest hops in a run.
    pub hops_min: u64,
    /// Most hops in a run.
    pub hops_max: u64,
    /// `hops_median` over the `quiche` server's for the same family and strategy (when run).
    pub hops_vs_baseline: Option<f64>,
    /// Hops per 100 datagrams the client sent, over all runs of the cell (a packet-count
    /// strategy asks for 100/N; fewer complete when hops are asked for while one validates).
    pub hops_per_100_datagrams: f64,
    /// Hops per second of the runs' time (first request to last response), over all runs of
    /// the cell (a time strategy asks for one per 50–100 ms, say).
    pub hops_per_second: f64,
    /// The cell's hop rate over the `quiche` server's for the same family and strategy, in
    /// what the strategy counts: hops per 100 datagrams for a packet-count strategy (`every:N`),
    /// hops per second for the others. How many datagrams and how much time a run of the same
    /// GETs takes differs by server (retransmissions, acknowledgements, a server in Python), so
    /// this compares the hop engine where the median per run compares run lengths too.
    pub rate_vs_baseline: Option<f64>,
}

/// The bench's summary (`results.json`, `"summary"`).
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Runs made.
    pub runs: u32,
    /// Runs that completed every request byte-exact.
    pub runs_completed: u32,
    /// Runs that stopped short (the connection closed or timed out) or got a wrong body.
    pub runs_failed: u32,
    /// Cells whose median hop count is within ±10% of the baseline's.
    pub cells_within_10pct_of_baseline: u32,
    /// Cells whose hop rate ([`Cell::rate_vs_baseline`]) is within ±10% of the baseline's.
    pub cells_rate_within_10pct_of_baseline: u32,
    /// Cells compared with a baseline.
    pub cells_compared: u32,
}

/// Everything the bench measured.
#[derive(Debug, Clone, Serialize)]
pub struct Results {
    /// Every run.
    pub rows: Vec<Row>,
    /// Per cell.
    pub cells: Vec<Cell>,
    /// The figures.
    pub summary: Summary,
}

/// Runs every cell; `log` gets a line per run.
pub fn run(params: &Params, log: &mut dyn FnMut(&str)) -> Result<Results, String> {
    let strategies: Vec<(String, HopStrategyConfig)> = params
        .strategies
        .iter()
        .map(|s| s.parse().map(|c| (s.clone(), c)))
        .collect::<Result<_, _>>()?;
    for s in &params.servers {
        if !SERVERS.contains(&s.as_str()) {
            return Err(format!(
                "unknown server {s:?}; known: {}",
                SERVERS.join(", ")
            ));
        }
    }
    let mut rows = Vec::new();
    for server in &params.servers {
        for &family in &params.families {
            for (label, strategy) in &strategies {
                for run in 0..params.runs {
                    let row = one_run(server, family, label, strategy, run, params.requests)?;
                    log(&format!(
                        "{server} {family:?} {label} run {run}: {} responses, {} hops ({} failed), {:.0} ms{}",
                        row.responses,
                        row.hops,
                        row.hops_failed,
                        row.elapsed_ms,
                        row.error.as_deref().map(|e| format!(": {e}")).unwrap_or_default()
                    ));
                    rows.push(row);
                }
            }
        }
    }
    let cells = cells(&rows);
    let compared: Vec<&Cell> = cells
        .iter()
        .filter(|c| c.server != "quiche" && c.hops_vs_baseline.is_some())
        .collect();
    let summary = Summary {
        runs: rows.len() as u32,
        runs_completed: rows.iter().filter(|r| r.completed).count() as u32,
        runs_failed: rows.iter().filter(|r| !r.completed).count() as u32,
        cells_within_10pct_of_baseline: compared
            .iter()
            .filter(|c| c.hops_vs_baseline.is_some_and(|r| (0.9..=1.1).contains(&r)))
            .count() as u32,
        cells_rate_within_10pct_of_baseline: compared
            .iter()
            .filter(|c| c.rate_vs_baseline.is_some_and(|r| (0.9..=1.1).contains(&r)))
            .count() as u32,
        cells_compared: compared.len() as u32,
    };
    Ok(Results {
        rows,
        cells,
        summary,
    })
}

/// One connection in a fresh topology. Errors are the testbed's (the run itself failing is a
/// row).
fn one_run(
    server: &str,
    family: Family,
    label: &str,
    strategy: &HopStrategyConfig,
    run: u32,
    requests: usize,
) -> Result<Row, String> {
    let (server_ip, clients, prefix) = match family {
        Family::V4 => ("198.18.0.1", direct::v4_clients(4), 24),
        Family::V6 => ("fd00::1", direct::v6_clients(4), 64),
    };
    let mut tb = direct::topology(server_ip, &clients, prefix)?;
    let addr = SocketAddr::new(server_ip.parse().map_err(|e| format!("{e}"))?, PORT);
    let sizes = sizes(requests);
    let gets = Gets {
        locals: sockets(&clients)?,
        server: addr,
        strategy: strategy.clone(),
        seed: u64::from(run) + 1,
        sizes: sizes.clone(),
        min_hops: 0,
    };
    let result = match server {
        "aioquic" => {
            let srv = AioquicServer::start(&mut tb, addr)?;
            let result = run_gets_in(&tb, gets, None, None);
            srv.finish()?;
            result
        }
        _ => {
            let config = H3ServerConfig {
                retire_left_paths: server == "quiche-retiring",
                ..H3ServerConfig::default()
            };
            let srv = QuicheServer::start(&tb, "srv", addr, config)?;
            let result = run_gets_in(&tb, gets, None, None);
            srv.finish()?;
            result
        }
    };
    let mut row = Row {
        server: server.to_string(),
        family,
        strategy: label.to_string(),
        run,
        completed: false,
        error: None,
        responses: 0,
        hops: 0,
        hops_failed: 0,
        tx_datagrams: 0,
        probes_resent: 0,
        unknown_dcid_dropped: 0,
        retired_dcid_read: 0,
        elapsed_ms: 0.0,
    };
    match result {
        Ok(c) => {
            let exact = c.report.responses == requests as u64
                && c.report.body_bytes == body_bytes(&sizes, c.report.responses);
            row.completed = exact;
            if !exact {
                row.error = Some(format!("{:?}", c.report));
            }
            row.responses = c.report.responses;
            row.hops = c.hops.hops_completed;
            row.hops_failed = c.hops.hops_failed;
            row.tx_datagrams = c.shell.tx_datagrams;
            row.probes_resent = c.hops.probes_resent;
            row.unknown_dcid_dropped = c.unknown_dcid_dropped;
            row.retired_dcid_read = c.retired_dcid_read;
            row.elapsed_ms = c.report.elapsed.as_secs_f64() * 1e3;
        }
        Err(e) => row.error = Some(e),
    }
    Ok(row)
}

fn cells(rows: &[Row]) -> Vec<Cell> {
    let mut keys: Vec<(String, Family, String)> = Vec::new();
    for r in rows {
        let key = (r.server.clone(), r.family, r.strategy.clone());
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    let median_of = |server: &str, family: Family, strategy: &str| {
        let mut hops: Vec<u64> = rows
            .iter()
            .filter(|r| r.server == server && r.family == family && r.strategy == strategy)
            .map(|r| r.hops)
            .collect();
        hops.sort_unstable();
        (!hops.is_empty()).then(|| {
            (
                hops[hops.len() / 2],
                hops[0],
                hops[hops.len() - 1],
                hops.len(),
            )
        })
    };
    let mut cells: Vec<Cell> = keys
        .into_iter()
        .filter_map(|(server, family, strategy)| {
            let (median, min, max, n) = median_of(&server, family, &strategy)?;
            let baseline = median_of("quiche", family, &strategy).map(|b| b.0);
            let completed = rows
                .iter()
                .filter(|r| {
                    r.server == server
                        && r.family == family
                        && r.strategy == strategy
                        && r.completed
                })
                .count();
            let (hops, tx, ms) = rows
                .iter()
                .filter(|r| r.server == server && r.family == family && r.strategy == strategy)
                .fold((0, 0, 0.0), |(h, t, ms), r| {
                    (h + r.hops, t + r.tx_datagrams, ms + r.elapsed_ms)
                });
            Some(Cell {
                hops_per_second: if ms > 0.0 {
                    hops as f64 * 1e3 / ms
                } else {
                    0.0
                },
                hops_per_100_datagrams: if tx == 0 {
                    0.0
                } else {
                    hops as f64 * 100.0 / tx as f64
                },
                hops_vs_baseline: baseline
                    .filter(|&b| b > 0)
                    .map(|b| median as f64 / b as f64),
                server,
                family,
                strategy,
                runs: n as u32,
                completed: completed as u32,
                hops_median: median,
                hops_min: min,
                hops_max: max,
                rate_vs_baseline: None,
            })
        })
        .collect();
    let rate = |c: &Cell| {
        if c.strategy.starts_with("every:") {
            c.hops_per_100_datagrams
        } else {
            c.hops_per_second
        }
    };
    let baseline_rates: Vec<(Family, String, f64)> = cells
        .iter()
        .filter(|c| c.server == "quiche")
        .map(|c| (c.family, c.strategy.clone(), rate(c)))
        .collect();
    for c in &mut cells {
        c.rate_vs_baseline = baseline_rates
            .iter()
            .find(|(f, s, _)| *f == c.family && *s == c.strategy)
            .filter(|&&(_, _, base)| base > 0.0)
            .map(|&(_, _, base)| rate(c) / base);
    }
    cells
}

/// The cells as a Markdown table, and the summary.
pub fn markdown(results: &Results) -> String {
    let mut md = String::from(
        "| server | family | strategy | completed | hops median | hops min–max | vs quiche | hops per 100 datagrams | hops per second | rate vs quiche |\n|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for c in &results.cells {
        let _ = writeln!(
            md,
            "| {} | {:?} | {} | {}/{} | {} | {}–{} | {} | {:.1} | {:.1} | {} |",
            c.server,
            c.family,
            c.strategy,
            c.completed,
            c.runs,
            c.hops_median,
            c.hops_min,
            c.hops_max,
            c.hops_vs_baseline
                .map_or("-".to_string(), |r| format!("{r:.2}")),
            c.hops_per_100_datagrams,
            c.hops_per_second,
            c.rate_vs_baseline
                .map_or("-".to_string(), |r| format!("{r:.2}")),
        );
    }
    let s = &results.summary;
    let _ = writeln!(
        md,
        "\n{} of {} runs completed every request byte-exact; {} failed; {} of {} cells within ±10% of the baseline's median hops; {} of {} within ±10% of its hop rate (per 100 datagrams for `every:N`, per second for the others); {} packets read to a just-retired connection ID, {} dropped to one retired longer ago or unknown.",
        s.runs_completed,
        s.runs,
        s.runs_failed,
        s.cells_within_10pct_of_baseline,
        s.cells_compared,
        s.cells_rate_within_10pct_of_baseline,
        s.cells_compared,
        results.rows.iter().map(|r| r.retired_dcid_read).sum::<u64>(),
        results.rows.iter().map(|r| r.unknown_dcid_dropped).sum::<u64>(),
    );
    md
}
