//! The seed's experiment (seed 000 §4.2) in direct mode: many HTTP/3 GETs over one QUIC
//! connection that hops between local addresses, against an unmodified quiche HTTP/3 server
//! (`examples/h3_server.rs`). Every body is checked byte for byte.
//!
//! ```text
//! cargo run -p mimiq-h3test --example direct_h3 -- --server 198.18.0.1:4433 \
//!     --local 198.18.0.10:0 --local 198.18.0.11:0 [--local ...] \
//!     [--requests 1000] [--size 2700] [--strategy every:25] [--seed 1] \
//!     [--qlog-dir DIR] [--keylog FILE]
//! ```
//!
//! Strategies: `never`, `every:N` (packets), `random:A:B` (packets), `time:A:B` (ms),
//! `once:N` (packets). The local addresses must be on the host (`ip addr add ... nodad`).
//! Prints one line of results: responses, bytes, time, hops, failures, refusals and the hop
//! latency distribution. Failed hops are logged on stderr (`RUST_LOG=mimiq_agent=debug`: every
//! hop); `--qlog-dir` writes the connection's qlog there (`direct-<connection ID>.sqlog`) and
//! `--keylog` appends its TLS secrets to FILE (NSS key log format, for Wireshark), so a failed
//! run can be read afterwards.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use mimiq_agent::direct::{DirectConfig, DirectConnection};
use mimiq_agent::migrate::MigrationConfig;
use mimiq_agent::strategy::HopStrategyConfig;
use mimiq_h3test::{client_config, run_gets};
use mimiq_masque::quic::QuicSettings;

struct Args {
    server: SocketAddr,
    locals: Vec<SocketAddr>,
    requests: usize,
    size: u64,
    strategy: HopStrategyConfig,
    seed: u64,
    qlog_dir: Option<PathBuf>,
    keylog: Option<PathBuf>,
}

fn main() {
    let args = match parse(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(msg) => {
            eprintln!(
                "direct_h3: {msg}\nusage: direct_h3 --server ADDR:PORT --local ADDR:PORT... \
                 [--requests N] [--size BYTES] [--strategy never|every:N|random:A:B|time:A:B|once:N] [--seed N] \
                 [--qlog-dir DIR] [--keylog FILE]"
            );
            std::process::exit(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(msg) = run(&args) {
        eprintln!("direct_h3: {msg}");
        std::process::exit(1);
    }
}

fn run(args: &Args) -> Result<(), String> {
    let mut quic = client_config(args.locals.len()).map_err(|e| format!("quiche config: {e}"))?;
    if args.keylog.is_some() {
        // quiche hands secrets to a connection's key log only when its config asks for them.
        quic.log_keys();
    }
    let config = DirectConfig {
        strategy: args.strategy.clone(),
        seed: args.seed.into(),
        connection: 0,
        migration: MigrationConfig::default(),
    };
    let mut direct = DirectConnection::connect(
        &args.locals,
        args.server,
        Some("quic.tech"),
        &mut quic,
        &config,
    )
    .map_err(|e| e.to_string())?;
    let instruments = QuicSettings {
        qlog_dir: args.qlog_dir.clone(),
        keylog_file: args.keylog.clone(),
        ..QuicSettings::default()
    };
    instruments
        .instrument(direct.connection_mut(), "direct")
        .map_err(|e| format!("qlog/keylog: {e}"))?;
    let sizes = vec![args.size; args.requests];
    let report = run_gets(&mut direct, "quic.tech", &sizes, Duration::from_secs(600))
        .map_err(|e| format!("{e} ({:?})", direct.migration_stats()))?;
    let _ = direct.close();
    let hops = direct.migration_stats();
    let secs = report.elapsed.as_secs_f64();
    println!(
        "responses={} body_bytes={} elapsed_ms={:.1} goodput_mbps={:.2} hops={} failed={} (validation {} timeout {} quiche {}) refused={} busy={} paths_forgotten={} paths_returned={} \
         hop_latency: {}",
        report.responses,
        report.body_bytes,
        secs * 1e3,
        if secs > 0.0 { report.body_bytes as f64 * 8.0 / secs / 1e6 } else { 0.0 },
        hops.hops_completed,
        hops.hops_failed,
        hops.failed_validation,
        hops.failed_timeout,
        hops.failed_refused,
        hops.hops_refused,
        hops.hops_busy,
        hops.paths_forgotten,
        hops.paths_returned,
        direct.migrator().latency_summary(),
    );
    Ok(())
}

fn parse(mut it: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut server = None;
    let mut args = Args {
        server: SocketAddr::from(([127, 0, 0, 1], 4433)),
        locals: Vec::new(),
        requests: 1_000,
        size: 2_700,
        strategy: HopStrategyConfig::EveryPackets { packets: 25 },
        seed: 1,
        qlog_dir: None,
        keylog: None,
    };
    let value = |it: &mut dyn Iterator<Item = String>, flag: &str| {
        it.next().ok_or(format!("{flag} needs a value"))
    };
    while let Some(flag) = it.next() {
        let v = value(&mut it, &flag)?;
        let bad = || format!("{flag} {v}: invalid");
        match flag.as_str() {
            "--server" => server = Some(v.parse().map_err(|_| bad())?),
            "--local" => args.locals.push(v.parse().map_err(|_| bad())?),
            "--requests" => args.requests = v.parse().map_err(|_| bad())?,
            "--size" => args.size = v.parse().map_err(|_| bad())?,
            "--seed" => args.seed = v.parse().map_err(|_| bad())?,
            "--strategy" => args.strategy = v.parse()?,
            "--qlog-dir" => args.qlog_dir = Some(v.into()),
            "--keylog" => args.keylog = Some(v.into()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    args.server = server.ok_or("--server is required")?;
    if args.locals.is_empty() {
        return Err("at least one --local is required".into());
    }
    Ok(args)
}
