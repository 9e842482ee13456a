//! `mimiq-agent`: the client agent. `run` starts tunnel mode (the agent is the CONNECT-IP client
//! and its connection hops between the agent's addresses; see `mimiq_agent::tunnel`), `check`
//! validates a config file, `stats` prints a running agent's counters. Errors are one line on
//! stderr: exit 1 for a failed run, 2 for a bad command line or config.
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::{Parser, Subcommand};
use mimalloc::MiMalloc;
use mimiq_agent::rng::Seed;
use mimiq_agent::AgentConfig;

#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

#[derive(Parser)]
#[command(
    name = "mimiq-agent",
    version,
    about = "mimiq client agent: hops a client's address mid-connection"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run tunnel mode until SIGINT/SIGTERM; prints a `ready` line, then the counters as JSON.
    Run {
        /// The agent config (TOML; see agent/agent.example.toml).
        #[arg(long)]
        config: PathBuf,
    },
    /// Validate a config file and exit.
    Check {
        /// The agent config.
        #[arg(long)]
        config: PathBuf,
    },
    /// Print the running agent's counters: from its metrics endpoint (`[tunnel]
    /// metrics_listen`), else its stats file.
    Stats {
        /// The agent config.
        #[arg(long)]
        config: PathBuf,
        /// Also the counters that are still 0 (metrics endpoint).
        #[arg(long)]
        all: bool,
    },
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) if !e.use_stderr() => {
            // --help, --version.
            print!("{e}");
            return;
        }
        Err(e) => {
            let msg = e.to_string();
            let first = msg.lines().next().unwrap_or("bad arguments");
            eprintln!("mimiq-agent: {}", first.trim_start_matches("error: "));
            std::process::exit(2);
        }
    };
    let code = match cli.cmd {
        Cmd::Check { config } => match load(&config) {
            Ok(_) => {
                println!("{}: ok", config.display());
                0
            }
            Err(e) => {
                eprintln!("mimiq-agent: error: {e}");
                2
            }
        },
        Cmd::Stats { config, all } => match load(&config).and_then(|cfg| stats(&cfg, all)) {
            Ok(text) => {
                print!("{text}");
                0
            }
            Err(e) => {
                eprintln!("mimiq-agent: error: {e}");
                1
            }
        },
        Cmd::Run { config } => match load(&config) {
            Err(e) => {
                eprintln!("mimiq-agent: error: {e}");
                2
            }
            Ok(cfg) => match run(&cfg) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("mimiq-agent: error: {e}");
                    1
                }
            },
        },
    };
    std::process::exit(code);
}

fn load(path: &PathBuf) -> Result<AgentConfig, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let cfg = AgentConfig::from_toml_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    mimiq_agent::tunnel::check(&cfg).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(cfg)
}

/// The running agent's counters, as text.
fn stats(cfg: &AgentConfig, all: bool) -> Result<String, String> {
    let tunnel = cfg.tunnel.as_ref().ok_or("no [tunnel] table")?;
    if let Some(at) = tunnel.metrics_listen {
        let text = mimiq_metrics::get(at, "/metrics")
            .map_err(|e| format!("the agent does not answer: {e}"))?;
        return Ok(mimiq_metrics::samples_table(&text, all));
    }
    let path = tunnel
        .stats_file
        .as_ref()
        .ok_or("[tunnel] has neither metrics_listen nor stats_file")?;
    std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))
}

fn run(cfg: &AgentConfig) -> Result<(), String> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&stop)).map_err(|e| format!("signal: {e}"))?;
    }
    let seed = match cfg.seed {
        Some(s) => {
            tracing::warn!(
                "seed = {s}: every hop time and address choice of this agent follows from that \
                 number, so anyone who knows or guesses it predicts the hops; for experiments \
                 only, remove it in deployment"
            );
            Seed::experiment(s)
        }
        None => Seed::from_os().map_err(|_| "seed: no OS randomness".to_string())?,
    };
    let report = mimiq_agent::tunnel::run(cfg, seed, &stop, |s| {
        println!("ready addresses={} mtu={}", s.addresses.join(","), s.mtu);
    })
    .map_err(|e| e.to_string())?;
    stop.store(true, Ordering::Relaxed);
    println!("{}", serde_json::to_string(&report).unwrap_or_default());
    Ok(())
}
