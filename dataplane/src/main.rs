//! `mimiq-switch`: runs a switch role on AF_XDP ports.
//!
//! ```text
//! mimiq-switch run --config configs/switch-l2fwd.toml
//! mimiq-switch run --role l2fwd --port p0 --port p1 --queues 2 --cores 0,1 --stats-path /tmp/s.json
//! mimiq-switch stats [--stats-path /run/mimiq/switch-stats.json]
//! mimiq-switch check-config configs/switch-l2fwd.toml
//! ```
//!
//! Errors are one line on stderr (`mimiq-switch: error: ...`) and a non-zero exit. SIGINT and
//! SIGTERM stop the worker cleanly: frames are returned, sockets closed, XDP programs detached,
//! and the final counters are written to the stats file and printed on stdout as JSON. SIGUSR1
//! appends the burst-time histograms of the interval so far to the `.hlog` at once.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use mimalloc::MiMalloc;

use mimiq_dataplane::config::{
    default_stats_path, parse_hex, parse_mac, parse_prefix, CopyMode, HugePages, IdleStrategy,
    KernelConfig, Role, SwitchConfig, WorkerConfig, XdpMode,
};
use mimiq_dataplane::control::{self, RuleSource};
use mimiq_dataplane::engine::{Rings, SlowPathFrame, SlowPathReturn, SlowPathRings, Worker};
use mimiq_dataplane::pipeline::gateway::Gateway;
use mimiq_dataplane::pipeline::impair::ImpairConfig;
use mimiq_dataplane::pipeline::l2fwd::L2Fwd;
use mimiq_dataplane::pipeline::mimiq::{
    Access, AccessConfig, AccessSwitch, Edge, EdgeConfig, SwitchUpdate, V4Prefix,
};
use mimiq_dataplane::pipeline::single_box::SingleBox;
use mimiq_dataplane::port::xdp_prog::KernelPass;
use mimiq_dataplane::port::xsk::{self, XskConfig, XskMemory};
use mimiq_dataplane::port::PortId;
use mimiq_dataplane::slowpath::{self, EdgeNeighbors, RelayConfig};
use mimiq_dataplane::telemetry::{self, HlogWriter, Telemetry};
use mimiq_dataplane::wire::EthernetAddress;
use xsk_rs::FrameDesc;

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
    Run(Box<RunArgs>),
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
    #[arg(long, conflicts_with_all = ["role", "interfaces"])]
    config: Option<PathBuf>,
    /// The pipeline.
    #[arg(long, value_enum, required_unless_present = "config")]
    role: Option<Role>,
    /// An interface; repeat for each, in pipeline order.
    #[arg(long = "port", value_name = "IFACE")]
    interfaces: Vec<String>,
    /// Workers: worker i serves queue i of every interface.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
    queues: u32,
    /// Pin worker i to the i-th core of this comma-separated list.
    #[arg(long, value_delimiter = ',')]
    cores: Vec<usize>,
    /// Native XDP or the SKB-mode fallback.
    #[arg(long, value_enum, default_value = "native")]
    xdp_mode: XdpMode,
    /// Copy, zero-copy, or what the driver offers.
    #[arg(long, value_enum, default_value = "auto")]
    copy_mode: CopyMode,
    /// Idle strategy of the workers.
    #[arg(long, value_enum, default_value = "adaptive")]
    idle: IdleStrategy,
    /// Entries per AF_XDP ring.
    #[arg(long, default_value_t = 1024)]
    ring_size: u32,
    /// Huge pages for the UMEM.
    #[arg(long, value_enum, default_value = "auto")]
    huge_pages: HugePages,
    /// Preferred busy polling with this budget; off when absent.
    #[arg(long)]
    busy_poll_budget: Option<u16>,
    /// Where the counters are written.
    #[arg(long, default_value_os_t = default_stats_path())]
    stats_path: PathBuf,
    /// How often the counters are written, in milliseconds.
    #[arg(long, default_value_t = 500)]
    stats_interval_ms: u64,
    /// HdrHistogram interval log of burst processing times.
    #[arg(long)]
    hlog_path: Option<PathBuf>,
    /// Serve Prometheus text metrics at http://ADDR/metrics.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// Leave ARP to the host's kernel.
    #[arg(long)]
    kernel_arp: bool,
    /// Leave IPv6 neighbour discovery to the host's kernel.
    #[arg(long)]
    kernel_nd: bool,
    /// Leave frames for this address to the host's kernel; repeat for more.
    #[arg(long = "kernel-address", value_name = "IP")]
    kernel_addresses: Vec<std::net::IpAddr>,
    /// Impair an interface's egress, e.g. `p1:delay_us=10000,jitter_us=500,loss=0.01,rate_bps=100000000`.
    #[arg(long = "impair", value_name = "IFACE:KEY=VALUE,..", value_parser = parse_impair)]
    impair: Vec<(String, ImpairConfig)>,
}

fn parse_impair(s: &str) -> Result<(String, ImpairConfig), String> {
    let (interface, settings) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?}: expected IFACE:key=value,..."))?;
    // `key=value,key=value` is TOML once the commas become newlines.
    let config: ImpairConfig = toml::from_str(&settings.replace(',', "\n"))
        .map_err(|e| format!("{s:?}: {}", e.message().trim()))?;
    Ok((interface.to_string(), config))
}

impl RunArgs {
    fn into_config(self) -> anyhow::Result<SwitchConfig> {
        if let Some(path) = &self.config {
            return Ok(SwitchConfig::load(path)?);
        }
        if !self.cores.is_empty() && self.cores.len() != self.queues as usize {
            bail!(
                "--cores lists {} cores for {} queues",
                self.cores.len(),
                self.queues
            );
        }
        let config = SwitchConfig {
            // clap enforces `--role` when there is no `--config`.
            role: self.role.context("--role is required without --config")?,
            interfaces: self.interfaces,
            workers: (0..self.queues)
                .map(|queue| WorkerConfig {
                    queue,
                    core: self.cores.get(queue as usize).copied(),
                })
                .collect(),
            xdp_mode: self.xdp_mode,
            copy_mode: self.copy_mode,
            idle: self.idle,
            ring_size: self.ring_size,
            frame_size_bytes: 4096,
            huge_pages: self.huge_pages,
            busy_poll_budget: self.busy_poll_budget,
            stats_path: self.stats_path,
            stats_interval_ms: self.stats_interval_ms,
            hlog_path: self.hlog_path,
            metrics_listen: self.metrics_listen,
            kernel: KernelConfig {
                arp: self.kernel_arp,
                nd: self.kernel_nd,
                addresses: self.kernel_addresses,
            },
            impair: self.impair.into_iter().collect(),
            access: None,
            edge: None,
        };
        config
            .validate()
            .map_err(|message| anyhow::anyhow!("{message}"))?;
        Ok(config)
    }
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
        Command::Run(args) => run(*args),
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
    let config = args.into_config()?;
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    for w in &config.workers {
        if let Some(core) = w.core {
            if !cores.iter().any(|c| c.id == core) {
                bail!(
                    "core {core} does not exist (this machine has {} cores)",
                    cores.len()
                );
            }
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
    let interval = Duration::from_millis(config.stats_interval_ms);
    // The .hlog: on the interval, and at once on SIGUSR1.
    let mut dump = mimiq_metrics::hlog::DumpTimer::new(interval).context("signal handler")?;

    let (plans, updates) = plans(&config)?;
    let queues: Vec<u32> = plans.iter().map(|p| p.queue).collect();
    let telemetry = Telemetry::new(config.role, &queues);
    let mut hlog = match &config.hlog_path {
        Some(path) => Some(
            HlogWriter::create(path, &telemetry)
                .with_context(|| format!("cannot create {}", path.display()))?,
        ),
        None => None,
    };

    // Each worker opens its own sockets and reports whether they opened; on any failure the
    // ones that did start are stopped again.
    let (ready_tx, ready_rx) = mpsc::channel();
    let mut workers = Vec::new();
    for (index, plan) in plans.into_iter().enumerate() {
        let (config, stop, telemetry, ready) = (
            config.clone(),
            Arc::clone(&stop),
            Arc::clone(&telemetry),
            ready_tx.clone(),
        );
        let handle = std::thread::Builder::new()
            .name(format!("mimiq-worker-{index}"))
            .spawn(move || worker_main(&config, index, plan, &stop, &telemetry, &ready))
            .context("cannot start worker thread")?;
        workers.push(handle);
    }
    drop(ready_tx);
    for _ in 0..workers.len() {
        let outcome = ready_rx
            .recv()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("a worker exited before opening its ports")));
        if let Err(err) = outcome {
            stop.store(true, Ordering::Relaxed);
            for w in workers {
                let _ = w.join();
            }
            return Err(err);
        }
    }
    let subscriber = match updates {
        Some((source, producers)) => {
            let stop = Arc::clone(&stop);
            let stats = Arc::new(control::RuleStats::default());
            Some(
                std::thread::Builder::new()
                    .name("mimiq-rules".into())
                    .spawn(move || control::run_subscriber(source, producers, stop, stats))
                    .context("cannot start the rule subscriber")?,
            )
        }
        None => None,
    };
    let _metrics = match config.metrics_listen {
        Some(addr) => {
            let source = telemetry::MetricsSource::new(
                Arc::clone(&telemetry),
                cpu_time_ms,
                Duration::from_millis(config.stats_interval_ms),
            );
            let endpoint =
                mimiq_metrics::serve(addr, Arc::new(source)).map_err(|e| anyhow::anyhow!("{e}"))?;
            tracing::info!("metrics at http://{}/metrics", endpoint.local_addr());
            Some(endpoint)
        }
        None => None,
    };
    tracing::info!(
        "forwarding ({:?}) on {} with {} worker(s)",
        config.role,
        config.all_interfaces().join(", "),
        workers.len()
    );

    let mut next_stats = Instant::now();
    while !workers.iter().all(|w| w.is_finished()) {
        // Written on the interval only; the loop wakes more often to notice a stop or SIGUSR1.
        if Instant::now() >= next_stats {
            telemetry::write_stats_file(&config.stats_path, &telemetry.snapshot(cpu_time_ms()))
                .with_context(|| format!("cannot write {}", config.stats_path.display()))?;
            next_stats = Instant::now() + interval;
        }
        if let Some(log) = &mut hlog {
            if dump.due() {
                log.write_interval(&telemetry)
                    .context("cannot write the hlog")?;
            }
        }
        std::thread::sleep(interval.min(Duration::from_millis(50)));
    }
    for w in workers {
        w.join()
            .map_err(|_| anyhow::anyhow!("worker thread panicked"))?;
    }
    if let Some(s) = subscriber {
        let _ = s.join();
    }
    let last = telemetry.snapshot(cpu_time_ms());
    telemetry::write_stats_file(&config.stats_path, &last)
        .with_context(|| format!("cannot write {}", config.stats_path.display()))?;
    if let Some(log) = &mut hlog {
        log.write_interval(&telemetry)
            .context("cannot write the hlog")?;
    }
    println!("{}", serde_json::to_string(&last)?);
    tracing::info!("stopped");
    Ok(())
}

/// What one worker thread runs.
struct Plan {
    /// The NIC queue it serves.
    queue: u32,
    /// Pinned to this core.
    core: Option<usize>,
    /// Its interfaces, in pipeline port order.
    interfaces: Vec<String>,
    kind: Kind,
    /// Its ring of rule updates (none for l2fwd).
    updates: Option<rtrb::Consumer<SwitchUpdate>>,
}

/// The access role of one worker.
#[derive(Clone)]
struct AccessPlan {
    config: AccessConfig,
    gateway: Gateway,
    relay: RelayConfig,
}

/// The edge role of one worker.
#[derive(Clone)]
struct EdgePlan {
    config: EdgeConfig,
    neighbors: EdgeNeighbors,
}

enum Kind {
    L2fwd,
    Access(Box<AccessPlan>),
    Edge(Box<EdgePlan>),
    /// Both roles in one pass (pipeline/single_box.rs).
    SingleBox(Box<(AccessPlan, EdgePlan)>),
}

type Updates = Option<(RuleSource, Vec<rtrb::Producer<SwitchUpdate>>)>;

/// Turns the config into worker plans (one per entry of `workers`, each serving its queue of
/// every interface), and the rule subscriber's source and rings (one per worker).
fn plans(config: &SwitchConfig) -> anyhow::Result<(Vec<Plan>, Updates)> {
    // validate() checked that the role's sections are there and that every value parses.
    let msg = anyhow::Error::msg;
    let mut source = None;
    let mut access_plan = None;
    let mut edge_plan = None;
    if let Some(a) = &config.access {
        let edge_mac = match (&a.edge_mac, &config.edge) {
            (Some(mac), _) => parse_mac(mac).map_err(msg)?,
            (None, Some(e)) => interface_mac(&e.inside)?,
            (None, None) => bail!("access.edge_mac is needed"),
        };
        let key = parse_hex(&a.key_hex).map_err(msg)?;
        // One gateway MAC on every client port, as a router's one interface on a LAN.
        let gateway_mac = interface_mac(&a.clients[0])?;
        let client_ports = a.clients.len() as PortId; // at most MAX_CLIENT_PORTS (validate())
        let access = AccessConfig {
            sid: a.sid,
            client_ports,
            uplink: client_ports,
            gateway_mac,
            gateway_v4: a.gateway_v4,
            gateway_v6: a.gateway_v6.clone(),
            uplink_mac: interface_mac(&a.uplink)?,
            edge_mac,
            internal: a.internal,
            edge_internal: a.edge_internal,
            // The access switch looks up whole addresses, never aliases.
            v6_prefix_len: 64,
            alias_bits: 1,
        };
        let gateway = Gateway {
            mac: EthernetAddress(gateway_mac),
            v4: a.gateway_v4,
            v6: a.gateway_v6.clone(),
        };
        let relay = RelayConfig {
            sid: a.sid,
            allocator: a.allocator_relay,
            key: key.clone(),
        };
        access_plan = Some((
            AccessPlan {
                config: access,
                gateway,
                relay,
            },
            a.clients
                .iter()
                .chain([&a.uplink])
                .cloned()
                .collect::<Vec<_>>(),
        ));
        source = Some(RuleSource {
            allocator: a.allocator_rules,
            switch_id: a.sid,
            key,
        });
    }
    if let Some(e) = &config.edge {
        let (v6_prefix, v6_prefix_len) = parse_prefix(&e.v6_prefix, 112).map_err(msg)?;
        let v4_pools = e
            .v4_pools
            .iter()
            .map(|p| parse_prefix(p, 32).map(|(addr, len)| V4Prefix { addr, len }))
            .collect::<Result<Vec<_>, _>>()
            .map_err(msg)?;
        let mut peers = e
            .access
            .iter()
            .map(|p| {
                Ok(AccessSwitch {
                    sid: p.sid,
                    internal: p.internal,
                    mac: parse_mac(&p.mac).map_err(msg)?,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        if let Some(a) = &config.access {
            peers.push(AccessSwitch {
                sid: a.sid,
                internal: a.internal,
                mac: interface_mac(&a.uplink)?,
            });
        }
        let outside_mac = interface_mac(&e.outside)?;
        let edge = EdgeConfig {
            inside: 0,
            outside: 1,
            inside_mac: interface_mac(&e.inside)?,
            outside_mac,
            outside_next_hop_mac: e
                .outside_next_hop_mac
                .as_deref()
                .map(parse_mac)
                .transpose()
                .map_err(msg)?,
            internal: e.internal,
            access: peers,
            v6_prefix,
            v6_prefix_len,
            alias_bits: e.alias_bits,
            alias_k: e.alias_k,
            v4_pools,
        };
        let neighbors = EdgeNeighbors {
            own: Gateway {
                mac: EthernetAddress(outside_mac),
                v4: e.outside_v4,
                v6: e.outside_v6.clone(),
            },
            outside: 1,
            next_hop: if e.outside_next_hop_mac.is_some() {
                None
            } else {
                e.outside_next_hop
            },
            shared: Arc::default(),
            probe: false,
        };
        edge_plan = Some((
            EdgePlan {
                config: edge,
                neighbors,
            },
            vec![e.inside.clone(), e.outside.clone()],
        ));
        if source.is_none() {
            // A standalone edge subscribes with its own ID and key (validate() checked them).
            let (Some(allocator), Some(switch_id), Some(key)) =
                (e.allocator_rules, e.switch_id, &e.key_hex)
            else {
                bail!("edge: allocator_rules, switch_id and key_hex are needed");
            };
            source = Some(RuleSource {
                allocator,
                switch_id,
                key: parse_hex(key).map_err(msg)?,
            });
        }
    }
    let mut plans = Vec::new();
    let mut producers = Vec::new();
    for (index, w) in config.workers.iter().enumerate() {
        let (kind, interfaces) = match (&access_plan, &edge_plan) {
            (None, None) => (Kind::L2fwd, config.interfaces.clone()),
            (Some((access, ports)), None) => {
                (Kind::Access(Box::new(access.clone())), ports.clone())
            }
            (None, Some((edge, ports))) => {
                let mut edge = edge.clone();
                edge.neighbors.probe = index == 0;
                (Kind::Edge(Box::new(edge)), ports.clone())
            }
            (Some((access, access_ports)), Some((edge, edge_ports))) => {
                let mut edge = edge.clone();
                edge.neighbors.probe = index == 0;
                // The edge's ports follow the access switch's (pipeline/single_box.rs).
                edge.neighbors.outside = access.config.uplink + 2;
                let ports = access_ports.iter().chain(edge_ports).cloned().collect();
                (Kind::SingleBox(Box::new((access.clone(), edge))), ports)
            }
        };
        let updates = if source.is_some() {
            let (tx, rx) = rtrb::RingBuffer::new(UPDATE_RING);
            producers.push(tx);
            Some(rx)
        } else {
            None
        };
        plans.push(Plan {
            queue: w.queue,
            core: w.core,
            interfaces,
            kind,
            updates,
        });
    }
    Ok((plans, source.map(|s| (s, producers))))
}

/// Creates the rings between a worker and a slow path for frames of its `ports` and starts the
/// slow-path thread on the far ends; returns the worker's ends and the thread.
fn start_slow_path(
    name: &str,
    ports: std::ops::RangeInclusive<PortId>,
    run: impl FnOnce(rtrb::Consumer<SlowPathFrame<FrameDesc>>, rtrb::Producer<SlowPathReturn<FrameDesc>>)
        + Send
        + 'static,
) -> anyhow::Result<(SlowPathRings<FrameDesc>, std::thread::JoinHandle<()>)> {
    let (to, from_worker) = rtrb::RingBuffer::new(SLOW_PATH_RING);
    // Room for every frame the slow path can hold, so giving one back never waits for long.
    let (to_worker, back) = rtrb::RingBuffer::new(SLOW_PATH_RING + 64);
    let thread = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || run(from_worker, to_worker))
        .map_err(|e| anyhow::anyhow!("cannot start the slow path: {e}"))?;
    Ok((SlowPathRings { to, back, ports }, thread))
}

/// Starts the access slow path of one worker (for frames of the access switch's ports), and
/// gives the worker's access stage its ring of first-seen sources.
fn start_access_slow_path(
    plan: AccessPlan,
    index: usize,
    memory: &XskMemory,
    stop: &Arc<AtomicBool>,
    telemetry: &Telemetry,
) -> anyhow::Result<(
    Access,
    SlowPathRings<FrameDesc>,
    std::thread::JoinHandle<()>,
)> {
    let AccessPlan {
        config,
        gateway,
        relay,
    } = plan;
    let (shared, stop, stats) = (memory.share(), Arc::clone(stop), telemetry.slow_path());
    let (seen_tx, seen_rx) = rtrb::RingBuffer::new(SEEN_RING);
    let ports = 0..=config.uplink;
    let (rings, thread) = start_slow_path(
        &format!("mimiq-slow-{index}"),
        ports,
        move |from_worker, to_worker| {
            let run = slowpath::run_access(
                shared,
                gateway,
                relay,
                from_worker,
                to_worker,
                seen_rx,
                stop,
                stats,
            );
            if let Err(e) = run {
                tracing::error!("access slow path: {e}");
            }
        },
    )?;
    Ok((Access::new(config).report_seen_to(seen_tx), rings, thread))
}

/// Starts the edge slow path of one worker (for frames of `ports`); the worker's edge stage
/// learns the next hop over the returned ring.
fn start_edge_slow_path(
    neighbors: EdgeNeighbors,
    index: usize,
    ports: std::ops::RangeInclusive<PortId>,
    memory: &XskMemory,
    stop: &Arc<AtomicBool>,
    telemetry: &Telemetry,
) -> anyhow::Result<(
    rtrb::Consumer<SwitchUpdate>,
    SlowPathRings<FrameDesc>,
    std::thread::JoinHandle<()>,
)> {
    let (learned_tx, learned_rx) = rtrb::RingBuffer::new(16);
    let (shared, stop, stats) = (memory.share(), Arc::clone(stop), telemetry.slow_path());
    let (rings, thread) = start_slow_path(
        &format!("mimiq-edge-slow-{index}"),
        ports,
        move |from_worker, to_worker| {
            slowpath::run_edge(
                shared,
                neighbors,
                from_worker,
                to_worker,
                learned_tx,
                stop,
                stats,
            )
        },
    )?;
    Ok((learned_rx, rings, thread))
}

/// Updates queued per worker before the subscriber waits.
const UPDATE_RING: usize = 1 << 16;
/// Frames queued towards the slow path (and back).
const SLOW_PATH_RING: usize = 1024;
/// First packets from bindings queued for the slow path's `Seen` reports.
const SEEN_RING: usize = 4096;

/// The MAC of one of our interfaces (sysfs of this network namespace).
fn interface_mac(iface: &str) -> anyhow::Result<[u8; 6]> {
    let path = format!("/sys/class/net/{iface}/address");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("interface {iface} not found ({path})"))?;
    parse_mac(&text).map_err(anyhow::Error::msg)
}

fn worker_main(
    config: &SwitchConfig,
    index: usize,
    plan: Plan,
    stop: &Arc<AtomicBool>,
    telemetry: &Telemetry,
    ready: &mpsc::Sender<anyhow::Result<()>>,
) {
    if let Some(core) = plan.core {
        if !core_affinity::set_for_current(core_affinity::CoreId { id: core }) {
            let _ = ready.send(Err(anyhow::anyhow!(
                "cannot pin worker {index} to core {core}"
            )));
            return;
        }
    }
    let queues: Vec<(String, u32)> = plan
        .interfaces
        .iter()
        .map(|iface| (iface.clone(), plan.queue))
        .collect();
    let xsk_config = XskConfig {
        xdp_mode: config.xdp_mode,
        copy_mode: config.copy_mode,
        ring_size: config.ring_size,
        frame_size: config.frame_size_bytes,
        huge_pages: config.huge_pages,
        busy_poll_budget: config.busy_poll_budget,
        kernel_pass: KernelPass {
            arp: config.kernel.arp,
            nd: config.kernel.nd,
            addresses: config.kernel.addresses.clone(),
            udp_port: None,
        },
    };
    let (ports, memory, free) = match xsk::open(&queues, &xsk_config) {
        Ok(opened) => opened,
        Err(err) => {
            let _ = ready.send(Err(err.into()));
            return;
        }
    };
    let every = Duration::from_millis(config.stats_interval_ms);
    let mut publish = |counters: &_, burst_ns: &_| telemetry.publish(index, counters, burst_ns);
    let impair: Vec<(usize, ImpairConfig)> = config
        .impair
        .iter()
        .filter_map(|(iface, c)| {
            plan.interfaces
                .iter()
                .position(|i| i == iface)
                .map(|p| (p, *c))
        })
        .collect();
    let mut rings = Rings::default();
    rings.updates.extend(plan.updates);
    let mut slow_threads = Vec::new();
    // Frames the edge slow path may use for the ARP requests it sends on its own.
    const EDGE_SPARES: usize = 4;
    let started = (|| -> anyhow::Result<()> {
        match plan.kind {
            Kind::L2fwd => {
                let mut worker = Worker::new(ports, memory, free, L2Fwd);
                impair.iter().for_each(|(p, c)| worker.set_impair(*p, *c));
                let _ = ready.send(Ok(()));
                worker.run(stop, config.idle, every, &mut publish);
            }
            Kind::Access(access) => {
                let (access, slow, thread) =
                    start_access_slow_path(*access, index, &memory, stop, telemetry)?;
                slow_threads.push(thread);
                rings.slow_paths.push(slow);
                let mut worker = Worker::new(ports, memory, free, access).with_rings(rings);
                impair.iter().for_each(|(p, c)| worker.set_impair(*p, *c));
                let _ = ready.send(Ok(()));
                worker.run(stop, config.idle, every, &mut publish);
            }
            Kind::Edge(edge) => {
                let EdgePlan {
                    config: edge,
                    neighbors,
                } = *edge;
                let (learned, slow, thread) = start_edge_slow_path(
                    neighbors,
                    index,
                    0..=PortId::MAX,
                    &memory,
                    stop,
                    telemetry,
                )?;
                slow_threads.push(thread);
                rings.updates.push(learned);
                rings.slow_paths.push(slow);
                let mut worker =
                    Worker::new(ports, memory, free, Edge::new(edge)).with_rings(rings);
                worker.lend_to_slow_path(0, EDGE_SPARES);
                impair.iter().for_each(|(p, c)| worker.set_impair(*p, *c));
                let _ = ready.send(Ok(()));
                worker.run(stop, config.idle, every, &mut publish);
            }
            Kind::SingleBox(both) => {
                let (
                    access,
                    EdgePlan {
                        config: edge,
                        neighbors,
                    },
                ) = *both;
                let uplink = access.config.uplink;
                let (access, slow, thread) =
                    start_access_slow_path(access, index, &memory, stop, telemetry)?;
                slow_threads.push(thread);
                rings.slow_paths.push(slow);
                let edge_ports = uplink + 1..=PortId::MAX;
                let (learned, slow, thread) =
                    start_edge_slow_path(neighbors, index, edge_ports, &memory, stop, telemetry)?;
                slow_threads.push(thread);
                rings.updates.push(learned);
                rings.slow_paths.push(slow);
                let pipeline = SingleBox::new(access, uplink, Edge::new(edge));
                let mut worker = Worker::new(ports, memory, free, pipeline).with_rings(rings);
                worker.lend_to_slow_path(1, EDGE_SPARES);
                impair.iter().for_each(|(p, c)| worker.set_impair(*p, *c));
                let _ = ready.send(Ok(()));
                worker.run(stop, config.idle, every, &mut publish);
            }
        }
        Ok(())
    })();
    if let Err(err) = started {
        stop.store(true, Ordering::Relaxed);
        let _ = ready.send(Err(err));
    }
    for thread in slow_threads {
        let _ = thread.join();
    }
    // Dropping the worker closes the sockets; the XDP program is detached with the last one.
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
        format!(
            "cannot read {} (is a switch running with this --stats-path?)",
            path.display()
        )
    })?;
    let stats: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a stats file", path.display()))?;
    println!(
        "role {}  pid {}  uptime {} ms  cpu {} ms user + {} ms sys",
        stats["role"], stats["pid"], stats["uptime_ms"], stats["cpu_user_ms"], stats["cpu_sys_ms"]
    );
    let workers = stats["workers"].as_array().cloned().unwrap_or_default();
    if workers.len() > 1 {
        print_totals(&workers);
    }
    for (i, worker) in workers.iter().enumerate() {
        let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
        println!(
            "worker {i} (queue {}): {} bursts, burst time p50 {} ns p99 {} ns max {} ns; slow path {} out / {} back; {} updates",
            n(&worker["queue"]),
            n(&worker["bursts"]),
            n(&worker["burst_ns"]["p50"]),
            n(&worker["burst_ns"]["p99"]),
            n(&worker["burst_ns"]["max"]),
            n(&worker["to_slow_path"]),
            n(&worker["from_slow_path"]),
            n(&worker["updates_applied"]),
        );
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

/// The counters of every worker, summed per port (by name) and per drop reason.
fn print_totals(workers: &[serde_json::Value]) {
    const FIELDS: [&str; 4] = ["rx_packets", "rx_bytes", "tx_packets", "tx_bytes"];
    let mut ports: Vec<(String, [u64; 4])> = Vec::new();
    let mut drops: std::collections::BTreeMap<String, u64> = Default::default();
    let mut totals = [0u64; 4]; // bursts, to slow path, from slow path, updates
    for worker in workers {
        for port in worker["ports"].as_array().into_iter().flatten() {
            let name = port["name"].as_str().unwrap_or("?").to_string();
            let at = match ports.iter().position(|(n, _)| *n == name) {
                Some(at) => at,
                None => {
                    ports.push((name, [0; 4]));
                    ports.len() - 1
                }
            };
            for (sum, field) in ports[at].1.iter_mut().zip(FIELDS) {
                *sum += port[field].as_u64().unwrap_or(0);
            }
        }
        for (reason, n) in worker["drops"].as_object().into_iter().flatten() {
            *drops.entry(reason.clone()).or_default() += n.as_u64().unwrap_or(0);
        }
        let fields = [
            "bursts",
            "to_slow_path",
            "from_slow_path",
            "updates_applied",
        ];
        for (sum, field) in totals.iter_mut().zip(fields) {
            *sum += worker[field].as_u64().unwrap_or(0);
        }
    }
    println!(
        "all {} workers: {} bursts; slow path {} out / {} back; {} updates",
        workers.len(),
        totals[0],
        totals[1],
        totals[2],
        totals[3]
    );
    println!(
        "  {:<12} {:>12} {:>14} {:>12} {:>14}",
        "port", "rx_packets", "rx_bytes", "tx_packets", "tx_bytes"
    );
    for (name, [rx, rx_bytes, tx, tx_bytes]) in &ports {
        println!("  {name:<12} {rx:>12} {rx_bytes:>14} {tx:>12} {tx_bytes:>14}");
    }
    let list: Vec<String> = drops.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!("  drops: {}", list.join(" "));
}
