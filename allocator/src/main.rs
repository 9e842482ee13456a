//! `mimiq-allocator`: the address allocator daemon and its CLI.
//!
//! ```text
//! mimiq-allocator run    [--config FILE]   serve (UDP relay, TCP rule stream, HTTP metrics)
//! mimiq-allocator check  [--config FILE]   validate a configuration and print a summary
//! mimiq-allocator leases [--config FILE]   list live leases (asks the running server, or reads
//!                                           the store when the server is not running)
//! mimiq-allocator stats  [--config FILE]   the running server's counters
//! ```
//!
//! The default configuration path is `/etc/mimiq/allocator.toml`; `allocator.example.toml`
//! documents every field. On start, `run` prints one line to stdout,
//! `listening relay=ADDR publish=ADDR metrics=ADDR`, once the sockets are bound. SIGTERM and
//! SIGINT stop it cleanly (every answered request is already durable, so SIGKILL loses nothing
//! acknowledged either). Exit status: 0 success, 1 runtime failure, 2 bad configuration or usage.
#![forbid(unsafe_code)]

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use mimalloc::MiMalloc;
use mimiq_allocator::config::Config;
use mimiq_allocator::lease::LeaseState;
use mimiq_allocator::server::{self, Server, Settings};
use mimiq_allocator::store::{MemStore, OpenError, RedbStore, Store};

#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

const DEFAULT_CONFIG: &str = "/etc/mimiq/allocator.toml";

#[derive(Parser)]
#[command(
    name = "mimiq-allocator",
    version,
    about = "mimiq address allocator: random address sets, SID aliases, rule publisher"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve requests until SIGTERM/SIGINT.
    Run {
        /// Configuration file.
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Validate a configuration file and print a summary.
    Check {
        /// Configuration file.
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// List live leases.
    Leases {
        /// Configuration file.
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Print the running allocator's counters (from its metrics endpoint, `metrics_listen`).
    Stats {
        /// Configuration file.
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Also the counters that are still 0.
        #[arg(long)]
        all: bool,
    },
}

/// An error that maps to exit status 2 (configuration).
#[derive(Debug)]
struct BadConfig(String);

impl std::fmt::Display for BadConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BadConfig {}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let result = match cli.cmd {
        Cmd::Run { config } => run(&config),
        Cmd::Check { config } => check(&config),
        Cmd::Leases { config } => leases(&config),
        Cmd::Stats { config, all } => load(&config).and_then(|cfg| {
            let text = mimiq_metrics::get(cfg.server.metrics_listen, "/metrics")
                .map_err(|e| anyhow::anyhow!("the allocator does not answer: {e}"))?;
            print!("{}", mimiq_metrics::samples_table(&text, all));
            Ok(())
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mimiq-allocator: error: {e:#}");
            if e.downcast_ref::<BadConfig>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}

fn load(path: &Path) -> anyhow::Result<Config> {
    Config::load(path).map_err(|e| BadConfig(e.to_string()).into())
}

fn run(path: &Path) -> anyhow::Result<()> {
    let cfg = load(path)?;
    let settings = Settings::from_config(&cfg).map_err(|e| BadConfig(e.to_string()))?;
    let core_cfg = cfg.core().map_err(|e| BadConfig(e.to_string()))?;
    let store: Box<dyn Store> = if cfg.store_is_memory() {
        tracing::warn!("store = \"memory\": leases do not survive a restart");
        Box::new(MemStore::new())
    } else if cfg.store_is_etcd() {
        etcd_store(&cfg)?
    } else {
        if let Some(dir) = cfg
            .server
            .store
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
        {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        Box::new(RedbStore::open_with(
            &cfg.server.store,
            cfg.server.store_fold_ops,
        )?)
    };
    let server = Server::start(settings, core_cfg, store)?;
    let addrs = server.local_addrs()?;
    let stop = server.stop_flag();
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone()).context("installing signal handlers")?;
    }
    println!(
        "listening relay={} publish={} metrics={}",
        addrs.relay, addrs.publish, addrs.metrics
    );
    std::io::stdout().flush()?;
    tracing::info!(relay = %addrs.relay, publish = %addrs.publish, metrics = %addrs.metrics, "allocator serving");
    server.run()?;
    tracing::info!("stopped");
    Ok(())
}

fn check(path: &Path) -> anyhow::Result<()> {
    let cfg = load(path)?;
    let core = cfg.core().map_err(|e| BadConfig(e.to_string()))?;
    println!("{}: ok", path.display());
    if let Some(v4) = &core.ipv4 {
        let pool = mimiq_allocator::pool::V4Pool::new(&v4.prefixes, &v4.reserved)
            .map_err(|e| BadConfig(e.to_string()))?;
        println!(
            "  ipv4: {} prefixes, {} usable addresses",
            v4.prefixes.len(),
            pool.capacity()
        );
    }
    if let Some(v6) = &core.ipv6 {
        println!(
            "  ipv6: {} alias_bits={} n={} k={} t_sid={} ms, {} random bits",
            v6.prefix,
            v6.alias_bits,
            v6.aliases_per_sid,
            v6.k,
            v6.t_sid_ms,
            128 - u32::from(v6.prefix.len) - u32::from(v6.alias_bits)
        );
    }
    println!(
        "  access switches (SIDs): {:?}; switches: {}",
        core.sids,
        cfg.switches.len()
    );
    println!(
        "  t_ip {}..={} ms, t_remove {} ms, store {}",
        core.t_ip_min_ms,
        core.t_ip_max_ms,
        core.t_remove_ms,
        cfg.server.store.display()
    );
    Ok(())
}

/// The store of `server.store = "etcd"`: connects, and takes the prefix (waiting for an
/// allocator that died to let it go).
#[cfg(feature = "etcd")]
fn etcd_store(cfg: &Config) -> anyhow::Result<Box<dyn Store>> {
    let e = cfg
        .etcd
        .as_ref()
        .context("server.store = \"etcd\" needs [etcd]")?;
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let settings = mimiq_allocator::store::EtcdSettings {
        endpoints: e.endpoints.clone(),
        prefix: e.prefix.clone(),
        user: e.user.clone().zip(e.password.clone()),
        connect_timeout: std::time::Duration::from_millis(e.connect_timeout_ms),
        request_timeout: std::time::Duration::from_millis(e.request_timeout_ms),
        owner: format!("{} pid {}", host.trim(), std::process::id()),
    };
    Ok(Box::new(mimiq_allocator::store::EtcdStore::open(
        &settings,
    )?))
}

#[cfg(not(feature = "etcd"))]
fn etcd_store(_: &Config) -> anyhow::Result<Box<dyn Store>> {
    Err(BadConfig(
        "server.store = \"etcd\": this mimiq-allocator was built without the etcd feature \
         (cargo build --features etcd)"
            .into(),
    )
    .into())
}

fn leases(path: &Path) -> anyhow::Result<()> {
    let cfg = load(path)?;
    let at: SocketAddr = cfg.server.metrics_listen;
    match mimiq_metrics::get(at, "/leases") {
        Ok(body) => {
            print!("{body}");
            return Ok(());
        }
        Err(e) => tracing::debug!("server not reachable at {at}: {e}; reading the store"),
    }
    if cfg.store_is_memory() {
        anyhow::bail!(
            "the server is not reachable at {at} and store = \"memory\" keeps nothing on disk"
        );
    }
    if let Some(e) = cfg.etcd.as_ref() {
        anyhow::bail!(
            "the server is not reachable at {at}; its leases are on etcd under {}lease/ \
             (etcdctl --endpoints {} get --prefix {}lease/)",
            e.prefix,
            e.endpoints.join(","),
            e.prefix
        );
    }
    if !cfg.server.store.exists() {
        anyhow::bail!(
            "the server is not reachable at {at} and {} does not exist",
            cfg.server.store.display()
        );
    }
    let mut store = match RedbStore::open(&cfg.server.store) {
        Ok(s) => s,
        Err(OpenError::InUse(p)) => {
            anyhow::bail!(
                "{p} is held by a running allocator whose metrics endpoint {at} does not answer"
            )
        }
        Err(e) => return Err(e.into()),
    };
    let loaded = store.load()?;
    let now = server::wall_ms();
    let t_remove = cfg.lease.t_remove_ms;
    let mut rows: Vec<_> = loaded
        .leases
        .into_iter()
        .filter(|l| l.expires_ms.saturating_add(t_remove) > now)
        .collect();
    rows.sort_by_key(|l| l.ip);
    for l in rows {
        let st = if l.expires_ms > now {
            LeaseState::Assigned
        } else {
            LeaseState::Draining
        };
        println!("{}", server::format_lease(&l, st));
    }
    Ok(())
}
