//! `mimiq-switch`: runs a switch role on AF_XDP ports.
//!
//! ```text
//! mimiq-switch run --config configs/switch-l2fwd.toml
//! mimiq-switch run --role l2fwd --port p0 --port p1 --stats-path /tmp/s.json
//! mimiq-switch stats [--stats-path /run/mimiq/switch-stats.json]
//! mimiq-switch check-config configs/switch-l2fwd.toml
//! ```
//!
//! Errors are one line on stderr (`mimiq-switch: error: ...`) and a non-zero exit. SIGINT and
//! SIGTERM stop the worker cleanly: frames are returned, sockets closed, XDP programs detached,
//! and the final counters are written to the stats file and printed on stdout as JSON.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use mimalloc::MiMalloc;
use serde::Serialize;

use mimiq_dataplane::config::{
    default_stats_path, CopyMode, IdleStrategy, PortConfig, Role, SwitchConfig, XdpMode,
};
use mimiq_dataplane::engine::{Worker, WorkerCounters};
use mimiq_dataplane::pipeline::l2fwd::L2Fwd;
use mimiq_dataplane::port::xsk::{self, XskConfig};

#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

#[derive(Parser)]
#[command(name = "mimiq-switch", version, about = "mimiq's AF_XDP switch")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a switch until SIGINT or SIGTERM.
    Run(RunArgs),
    /// Print the counters a running (or stopped) switch last wrote.
    Stats {
        /// The switch's stats file.
        #[arg(long, default_value_os_t = default_stats_path())]
        stats_path: PathBuf,
    },
    /// Check a config file and exit.
    CheckConfig {
        /// The config file.
        path: PathBuf,
    },
}

#[derive(Args)]
struct RunArgs {
    /// Config file; the other flags describe the same switch without one.
    #[arg(long, conflicts_with_all = ["role", "ports"])]
    config: Option<PathBuf>,
    /// The pipeline.
    #[arg(long, value_enum, required_unless_present = "config")]
    role: Option<Role>,
    /// A port as INTERFACE or INTERFACE:QUEUE; repeat for each port, in pipeline order.
    #[arg(long = "port", value_name = "IFACE[:QUEUE]", value_parser = parse_port)]
    ports: Vec<PortConfig>,
    /// Native XDP or the SKB-mode fallback.
    #[arg(long, value_enum, default_value = "native")]
    xdp_mode: XdpMode,
    /// Copy, zero-copy, or what the driver offers.
    #[arg(long, value_enum, default_value = "auto")]
    copy_mode: CopyMode,
    /// Idle strategy of the worker.
    #[arg(long, value_enum, default_value = "adaptive")]
    idle: IdleStrategy,
    /// Pin the worker to this core.
    #[arg(long)]
    core: Option<usize>,
    /// Entries per AF_XDP ring.
    #[arg(long, default_value_t = 1024)]
    ring_size: u32,
    /// Where the counters are written.
    #[arg(long, default_value_os_t = default_stats_path())]
    stats_path: PathBuf,
    /// How often the counters are written, in milliseconds.
    #[arg(long, default_value_t = 500)]
    stats_interval_ms: u64,
}

fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Stats { stats_path } => print_stats(&stats_path),
        Command::CheckConfig { path } => SwitchConfig::load(&path)
            .map(|_| println!("{}: ok", path.display()))
            .map_err(Into::into),
    };
    if let Err(err) = result {
        // `{:#}` puts the whole chain of causes on one line.
        eprintln!("mimiq-switch: error: {err:#}");
        std::process::exit(1);
    }
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let config = match &args.config {
        Some(path) => SwitchConfig::load(path)?,
        None => {
            let config = SwitchConfig {
                // clap enforces `--role` when there is no `--config`.
                role: args.role.context("--role is required without --config")?,
                ports: args.ports,
                xdp_mode: args.xdp_mode,
                copy_mode: args.copy_mode,
                idle: args.idle,
                core: args.core,
                ring_size: args.ring_size,
                frame_size_bytes: 4096,
                huge_pages: false,
                stats_path: args.stats_path,
                stats_interval_ms: args.stats_interval_ms,
            };
            config
                .validate()
                .map_err(|message| anyhow::anyhow!("{message}"))?;
            config
        }
    };
    if let Some(core) = config.core {
        let cores = core_affinity::get_core_ids().unwrap_or_default();
        if !cores.iter().any(|c| c.id == core) {
            bail!("core {core} does not exist (this machine has {} cores)", cores.len());
        }
    }
    if let Some(dir) = config.stats_path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create stats directory {}", dir.display()))?;
    }

    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(&stop)).context("signal handler")?;
    }

    let published: Arc<Mutex<WorkerCounters>> = Arc::default();
    let (ready_tx, ready_rx) = mpsc::channel();
    let worker = {
        let (config, stop, published) = (config.clone(), Arc::clone(&stop), Arc::clone(&published));
        std::thread::Builder::new()
            .name("mimiq-worker-0".into())
            .spawn(move || worker_main(&config, &stop, &published, &ready_tx))
            .context("cannot start worker thread")?
    };
    // The worker reports whether its ports opened; on failure it has already exited.
    match ready_rx.recv() {
        Ok(Ok(())) => {}
        Ok(Err(err)) => {
            let _ = worker.join();
            return Err(err);
        }
        Err(_) => bail!("worker thread exited before opening its ports"),
    }
    let names: Vec<String> = config.ports.iter().map(|p| format!("{}:{}", p.interface, p.queue)).collect();
    tracing::info!("forwarding ({:?}) {}", config.role, names.join(" <-> "));

    let started = Instant::now();
    let interval = Duration::from_millis(config.stats_interval_ms);
    while !worker.is_finished() {
        write_stats(&config, &published, started)?;
        std::thread::sleep(interval.min(Duration::from_millis(100)));
    }
    worker.join().map_err(|_| anyhow::anyhow!("worker thread panicked"))?;
    let last = write_stats(&config, &published, started)?;
    println!("{}", serde_json::to_string(&last)?);
    tracing::info!("stopped");
    Ok(())
}

fn worker_main(
    config: &SwitchConfig,
    stop: &AtomicBool,
    published: &Mutex<WorkerCounters>,
    ready: &mpsc::Sender<anyhow::Result<()>>,
) {
    if let Some(core) = config.core {
        if !core_affinity::set_for_current(core_affinity::CoreId { id: core }) {
            let _ = ready.send(Err(anyhow::anyhow!("cannot pin the worker to core {core}")));
            return;
        }
    }
    let queues: Vec<(String, u32)> = config
        .ports
        .iter()
        .map(|p| (p.interface.clone(), p.queue))
        .collect();
    let xsk_config = XskConfig {
        xdp_mode: config.xdp_mode,
        copy_mode: config.copy_mode,
        ring_size: config.ring_size,
        frame_size: config.frame_size_bytes,
        huge_pages: config.huge_pages,
    };
    let (ports, memory, free) = match xsk::open(&queues, &xsk_config) {
        Ok(opened) => opened,
        Err(err) => {
            let _ = ready.send(Err(err.into()));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    let mut worker = match config.role {
        Role::L2fwd => Worker::new(ports, memory, free, L2Fwd),
    };
    let every = Duration::from_millis(config.stats_interval_ms);
    worker.run(stop, config.idle, every, &mut |counters| {
        // One lock per publication interval, never per packet.
        if let Ok(mut slot) = published.lock() {
            slot.clone_from(counters);
        }
    });
    // Dropping the worker closes the sockets; libxdp detaches the XDP program it attached.
}

/// What the stats file holds.
#[derive(Serialize)]
struct StatsFile {
    role: Role,
    pid: u32,
    uptime_ms: u64,
    /// CPU time of the whole process, from getrusage(2).
    cpu_user_ms: u64,
    cpu_sys_ms: u64,
    workers: Vec<WorkerCounters>,
}

fn write_stats(
    config: &SwitchConfig,
    published: &Mutex<WorkerCounters>,
    started: Instant,
) -> anyhow::Result<StatsFile> {
    let counters = published
        .lock()
        .map(|c| c.clone())
        .map_err(|_| anyhow::anyhow!("stats lock poisoned"))?;
    let (cpu_user_ms, cpu_sys_ms) = cpu_time_ms();
    let stats = StatsFile {
        role: config.role,
        pid: std::process::id(),
        uptime_ms: started.elapsed().as_millis() as u64,
        cpu_user_ms,
        cpu_sys_ms,
        workers: vec![counters],
    };
    // Write then rename, so a reader never sees half a file.
    let tmp = config.stats_path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&stats)?)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &config.stats_path)
        .with_context(|| format!("cannot write {}", config.stats_path.display()))?;
    Ok(stats)
}

fn cpu_time_ms() -> (u64, u64) {
    // SAFETY: getrusage writes one `rusage` into the zeroed struct we pass, which lives for the
    // whole call; RUSAGE_SELF is always valid.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let ms = |tv: libc::timeval| tv.tv_sec as u64 * 1000 + tv.tv_usec as u64 / 1000;
    (ms(usage.ru_utime), ms(usage.ru_stime))
}

fn print_stats(path: &Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!("cannot read {} (is a switch running with this --stats-path?)", path.display())
    })?;
    let stats: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not a stats file", path.display()))?;
    println!(
        "role {}  pid {}  uptime {} ms  cpu {} ms user + {} ms sys",
        stats["role"], stats["pid"], stats["uptime_ms"], stats["cpu_user_ms"], stats["cpu_sys_ms"]
    );
    let workers = stats["workers"].as_array().cloned().unwrap_or_default();
    for (i, worker) in workers.iter().enumerate() {
        println!("worker {i}: {} bursts", worker["bursts"].as_u64().unwrap_or(0));
        println!(
            "  {:<12} {:>12} {:>14} {:>12} {:>14}",
            "port", "rx_packets", "rx_bytes", "tx_packets", "tx_bytes"
        );
        for port in worker["ports"].as_array().cloned().unwrap_or_default() {
            let n = |k: &str| port[k].as_u64().unwrap_or(0);
            println!(
                "  {:<12} {:>12} {:>14} {:>12} {:>14}",
                port["name"].as_str().unwrap_or("?"),
                n("rx_packets"),
                n("rx_bytes"),
                n("tx_packets"),
                n("tx_bytes")
            );
        }
        if let Some(drops) = worker["drops"].as_object() {
            let list: Vec<String> = drops.iter().map(|(k, v)| format!("{k}={v}")).collect();
            println!("  drops: {}", list.join(" "));
        }
    }
    Ok(())
}

fn parse_port(s: &str) -> Result<PortConfig, String> {
    let (interface, queue) = match s.split_once(':') {
        Some((i, q)) => (i, q.parse().map_err(|_| format!("bad queue number in {s:?}"))?),
        None => (s, 0),
    };
    if interface.is_empty() {
        return Err(format!("empty interface name in {s:?}"));
    }
    Ok(PortConfig {
        interface: interface.to_string(),
        queue,
    })
}
