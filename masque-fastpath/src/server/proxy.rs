//! The proxy as a whole: it binds one QUIC socket per worker in a SO_REUSEPORT group and
//! attaches the connection-ID steering program to it, creates the multi-queue TUN device (one
//! queue per worker, steered by destination address) and its routes, starts the workers
//! (`server/mod.rs`) on their threads and cores, and writes the stats file: every counter
//! summed over the workers at the top, each worker's own under `workers`.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use hdrhistogram::Histogram;
use ring::rand::SystemRandom;
use serde_json::{json, Value};
use socket2::{Domain, Protocol, Socket, Type};

use mimiq_dataplane::config::HugePages;
use mimiq_dataplane::port::xdp_prog::KernelPass;
use mimiq_dataplane::port::xsk::XskConfig;

use super::admission::ResetKey;
use super::config::Datapath;
use super::endpoints::Datagrams;
use super::generation::Generation;
use super::handoff::Rings;
use super::metrics::ProxyMetrics;
use super::peer;
use super::route::Routes;
use super::xdp::XdpDatagrams;
use super::{Percentiles, ProxyConfig, Stats, Worker};
use crate::capsule::IpPrefix;
use crate::netcfg::{NetConfig, Route};
use crate::quic;
use crate::session::connect_ip::{AddressPool, HostPool};
use crate::steer::{ReuseportSteering, TunSteering};
use crate::tundev::TunDevice;
use crate::udp::UdpIo;
use mimiq_metrics::hlog::{duration_histogram, DumpTimer, IntervalLog};

/// What the workers share. Nothing here is touched per packet but the route table (read only):
/// the pool is locked when a session starts, asks for addresses or ends.
pub(super) struct Shared {
    /// Route value → worker.
    pub routes: Routes,
    /// Stateless reset tokens, the same on every worker and across restarts.
    pub reset_key: ResetKey,
    /// This process's generation, and whether the other one lives.
    pub generation: Generation,
    /// The inner MTU.
    pub tunnel_mtu: usize,
    /// CONNECT-IP addresses.
    pool: Mutex<HostPool>,
    /// Address → TUN queue, for the device's steering program (with more than one worker).
    pub tun_steering: Option<TunSteering>,
    /// Datagrams are steered to their worker (the socket datapath): one that reaches another
    /// worker is counted `misrouted`. On the AF_XDP datapath the NIC picks queues by address,
    /// and handing over is expected.
    pub steered: bool,
    /// Each worker's latest counters and burst latencies, and how many times it published.
    published: Mutex<Vec<(u64, Option<Published>)>>,
    /// The index of worker 0's TUN queue on the device (queues another process attached
    /// first come before ours).
    pub tun_queue_offset: u32,
    /// The other generation's process (with a reset key file): where to pass what is its, and
    /// the socket it passes to us (taken by worker 0).
    pub peer: Option<PeerShared>,
    /// Draining for a newer process: new connections are passed to it.
    draining: AtomicBool,
    /// Where this process writes the addresses it has handed out, and where the other
    /// generation's process writes its own (with a reset key file).
    addresses: Option<(PathBuf, PathBuf)>,
}

/// The other generation's process, as the workers see it.
pub(super) struct PeerShared {
    /// Its socket.
    pub other: PathBuf,
    /// Ours (removed when the proxy ends).
    pub ours: PathBuf,
    /// Ours, until worker 0 takes it.
    pub rx: Mutex<Option<std::os::unix::net::UnixDatagram>>,
}

/// A worker's counters and its burst latencies since start, as it last published them.
#[derive(Clone)]
pub(super) struct Published {
    pub stats: Stats,
    /// QUIC datagrams in → inner packets on the TUN device, per burst, ns.
    pub up: Histogram<u64>,
    /// TUN packets in → datagrams out, per burst, ns.
    pub down: Histogram<u64>,
}

impl Shared {
    /// What `routes.workers()` workers share.
    pub fn new(
        routes: Routes,
        generation: Generation,
        reset_key: ResetKey,
        tunnel_mtu: usize,
        pool: HostPool,
        tun_steering: Option<TunSteering>,
        steered: bool,
    ) -> Shared {
        let n = routes.workers();
        Shared {
            routes,
            generation,
            reset_key,
            tunnel_mtu,
            pool: Mutex::new(pool),
            tun_steering,
            steered,
            published: Mutex::new(vec![(0, None); n]),
            tun_queue_offset: 0,
            peer: None,
            draining: AtomicBool::new(false),
            addresses: None,
        }
    }

    /// Whether this process drains for a newer one.
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// The address pool, locked. While the other generation's process lives, the addresses it
    /// has handed out are not handed out here; what is handed out here is written down for it
    /// when the guard goes.
    pub fn pool(&self) -> PoolGuard<'_> {
        let mut pool = self.pool.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, theirs)) = &self.addresses {
            let taken = if self.generation.other_live() {
                std::fs::read_to_string(theirs)
                    .unwrap_or_default()
                    .lines()
                    .filter_map(|l| l.parse().ok())
                    .collect()
            } else {
                Default::default()
            };
            pool.reserve(taken);
        }
        let before = pool.handed_out();
        PoolGuard {
            pool,
            before,
            file: self.addresses.as_ref().map(|(ours, _)| ours.as_path()),
        }
    }

    /// Worker `index`'s counters now.
    pub fn publish(&self, index: usize, now: Published) {
        let mut p = self
            .published
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        p[index].0 += 1;
        p[index].1 = Some(now);
    }
}

/// The locked pool; writes the addresses handed out to the generation's file if they changed.
pub(super) struct PoolGuard<'a> {
    pool: MutexGuard<'a, HostPool>,
    before: Vec<std::net::IpAddr>,
    file: Option<&'a Path>,
}

impl std::ops::Deref for PoolGuard<'_> {
    type Target = HostPool;
    fn deref(&self) -> &HostPool {
        &self.pool
    }
}

impl std::ops::DerefMut for PoolGuard<'_> {
    fn deref_mut(&mut self) -> &mut HostPool {
        &mut self.pool
    }
}

impl Drop for PoolGuard<'_> {
    fn drop(&mut self) {
        let Some(file) = self.file else {
            return;
        };
        let now = self.pool.handed_out();
        if now != self.before {
            let text: String = now.iter().map(|a| format!("{a}\n")).collect();
            let tmp = file.with_extension("tmp");
            if std::fs::write(&tmp, text).is_ok() {
                let _ = std::fs::rename(&tmp, file);
            }
        }
    }
}

/// A running proxy: its workers' threads.
pub struct Proxy {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<Result<(), String>>>,
    /// Tells the workers to finish.
    stop: Arc<AtomicBool>,
    local: SocketAddr,
    gso: bool,
    stats_file: Option<PathBuf>,
    /// The latency log (`hlog_file`).
    hlog_file: Option<PathBuf>,
    /// How long a stopped proxy drains for a newer one (`quic.drain_timeout_ms`).
    drain_timeout: Duration,
    /// The counters the metrics endpoint serves.
    metrics: Arc<ProxyMetrics>,
    /// The metrics endpoint (`metrics_listen`).
    endpoint: Option<mimiq_metrics::Endpoint>,
    /// The connection-ID steering program (with more than one worker).
    steering: Option<ReuseportSteering>,
}

impl Proxy {
    /// Binds the sockets, creates the TUN device and its routes, starts the workers; fails with
    /// a message naming what could not be set up.
    pub fn start(cfg: ProxyConfig) -> Result<Proxy, String> {
        cfg.validate()?;
        let metrics = Arc::new(ProxyMetrics::new());
        let endpoint = match cfg.metrics_listen {
            Some(addr) => Some(mimiq_metrics::serve(addr, Arc::clone(&metrics) as _)?),
            None => None,
        };
        let n = match (&cfg.datapath, &cfg.xdp) {
            (Datapath::Xdp, Some(x)) => {
                let queues = x.queues()?;
                let cores = if cfg.cores.is_empty() {
                    super::config::usable_cores().len()
                } else {
                    cfg.cores.len()
                };
                if queues > cores.max(1) {
                    return Err(format!(
                        "xdp.interface = {:?}: {queues} receive queues, more than the {cores} cores this process may use (one worker per queue; ethtool -L sets fewer)",
                        x.interface
                    ));
                }
                match cfg.workers {
                    Some(w) if w != queues => {
                        return Err(format!(
                            "workers = {w}: the AF_XDP datapath runs one worker per receive queue, and {} has {queues}",
                            x.interface
                        ))
                    }
                    _ => queues,
                }
            }
            _ => cfg.worker_count()?,
        };
        let rng = SystemRandom::new();
        let reset_key = match &cfg.quic.reset_key_file {
            Some(path) => ResetKey::load_or_create(path, &rng)?,
            None => ResetKey::random(&rng),
        };
        let generation = Generation::claim(cfg.quic.reset_key_file.as_deref())?;
        let routes = Routes::new(&reset_key, n, generation.ours());

        let mut endpoints: Vec<Endpoint> = Vec::with_capacity(n);
        let mut listen = cfg.listen;
        let mut sockets: Vec<std::net::UdpSocket> = Vec::with_capacity(n);
        if let (Datapath::Xdp, Some(x)) = (&cfg.datapath, &cfg.xdp) {
            if listen.port() == 0 {
                return Err("datapath = \"xdp\": listen needs a port".into());
            }
            let config = XskConfig {
                xdp_mode: x.mode,
                copy_mode: x.copy_mode,
                ring_size: x.ring_size,
                frame_size: 2048,
                huge_pages: HugePages::Off,
                busy_poll_budget: None,
                kernel_pass: KernelPass {
                    udp_port: Some(listen.port()),
                    ..KernelPass::default()
                },
            };
            for queue in 0..n as u32 {
                endpoints.push(Endpoint::Xdp {
                    interface: x.interface.clone(),
                    queue,
                    config: config.clone(),
                });
            }
        } else {
            for _ in 0..n {
                let s = reuseport_socket(listen)?;
                // Port 0 asked for any port: the others join the first one's.
                listen = s.local_addr().map_err(|e| e.to_string())?;
                sockets.push(s);
            }
        }
        let steering = if n > 1 && !sockets.is_empty() {
            let st = ReuseportSteering::load(routes.table())?;
            for (i, s) in sockets.iter().enumerate() {
                st.register(i as u32, s.as_raw_fd())?;
            }
            st.attach(sockets[0].as_raw_fd())?;
            Some(st)
        } else {
            None
        };
        endpoints.extend(sockets.into_iter().map(Endpoint::Socket));

        let fits = quic::tunnel_mtu(cfg.quic.max_udp_payload_bytes);
        let (mut pool, mut tuns, mut tunnel_mtu, mut tun_steering) =
            (HostPool::default(), Vec::new(), fits, None);
        let mut tun_queue_offset = 0;
        if let Some(ip) = &cfg.ip {
            tunnel_mtu = ip.tunnel_mtu.unwrap_or(fits);
            if tunnel_mtu > fits {
                tracing::warn!(
                    tunnel_mtu,
                    fits,
                    "ip.tunnel_mtu is larger than one QUIC datagram carries; larger packets get Packet Too Big"
                );
            }
            let (v4, v6) = ip.pools()?;
            pool = HostPool::new(v4, v6);
            // The ICMP source addresses are the proxy's own: never hand them to a client.
            for a in [
                std::net::IpAddr::V4(ip.icmp_source_v4),
                std::net::IpAddr::V6(ip.icmp_source_v6),
            ] {
                pool.allocate(IpPrefix::host(a));
            }
            // Queues another process attached first (the other generation's) come first.
            tun_queue_offset = std::fs::read_dir(format!("/sys/class/net/{}/queues", ip.tun))
                .map(|d| {
                    d.filter_map(Result::ok)
                        .filter(|e| e.file_name().to_string_lossy().starts_with("rx-"))
                        .count() as u32
                })
                .unwrap_or(0);
            tuns = TunDevice::create_queues(&ip.tun, tunnel_mtu, n)
                .map_err(|e| format!("TUN device {}: {e}", ip.tun))?;
            for q in &tuns {
                q.enable_tcp_offload()
                    .map_err(|e| format!("TUNSETOFFLOAD on {}: {e}", ip.tun))?;
            }
            if n > 1 {
                let st = TunSteering::load()?;
                st.attach(tuns[0].as_raw_fd())?;
                tun_steering = Some(st);
            }
            let nc = NetConfig::new().map_err(|e| e.to_string())?;
            let link = nc.link(&ip.tun).map_err(|e| e.to_string())?;
            for p in [v4, v6].into_iter().flatten() {
                let route = Route {
                    destination: p.addr(),
                    prefix_len: p.prefix_len(),
                    gateway: None,
                };
                nc.add_route(&link, &route).map_err(|e| e.to_string())?;
            }
        }

        let mut shared = Shared::new(
            routes,
            generation,
            reset_key,
            tunnel_mtu,
            pool,
            tun_steering,
            cfg.datapath == Datapath::Socket,
        );
        shared.tun_queue_offset = tun_queue_offset;
        if let Some(key) = &cfg.quic.reset_key_file {
            let (ours, other) = (shared.generation.ours(), 1 - shared.generation.ours());
            let port = listen.port();
            let sock = peer::socket_path(key, ours, port);
            shared.peer = Some(PeerShared {
                other: peer::socket_path(key, other, port),
                rx: Mutex::new(Some(peer::bind(&sock)?)),
                ours: sock,
            });
            shared.addresses = Some((addresses_path(key, ours), addresses_path(key, other)));
            // Nothing handed out yet: what a dead process of this generation wrote is stale.
            let _ = std::fs::remove_file(addresses_path(key, ours));
        }
        let shared = Arc::new(shared);
        let stop = Arc::new(AtomicBool::new(false));
        let rings = Rings::mesh(n).map_err(|e| format!("eventfd: {e}"))?;
        let mut tuns = tuns.into_iter();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let mut threads = Vec::with_capacity(n);
        for (i, (endpoint, rings)) in endpoints.into_iter().zip(rings).enumerate() {
            let (cfg, shared, stop, ready) = (
                cfg.clone(),
                Arc::clone(&shared),
                Arc::clone(&stop),
                ready_tx.clone(),
            );
            let tun = tuns.next();
            let core = (!cfg.cores.is_empty()).then(|| cfg.cores[i % cfg.cores.len()]);
            let spawned = std::thread::Builder::new()
                .name(format!("mimiq-proxy-{i}"))
                .spawn(move || {
                    if let Some(id) = core {
                        core_affinity::set_for_current(core_affinity::CoreId { id });
                    }
                    let max_payload = cfg.quic.max_udp_payload_bytes;
                    match endpoint {
                        Endpoint::Socket(sock) => {
                            let io = UdpIo::from_socket(sock)
                                .map_err(|e| format!("QUIC socket: {e}"))
                                .map(|mut io| {
                                    io.set_max_payload(max_payload);
                                    io
                                });
                            let gso = io.as_ref().is_ok_and(UdpIo::gso);
                            serve(io, gso, cfg, i, shared, tun, rings, &ready, &stop)
                        }
                        Endpoint::Xdp {
                            interface,
                            queue,
                            config,
                        } => {
                            let io = XdpDatagrams::open(
                                &interface,
                                queue,
                                listen.port(),
                                listen,
                                &config,
                                max_payload,
                            );
                            serve(io, false, cfg, i, shared, tun, rings, &ready, &stop)
                        }
                    }
                })
                .map_err(|e| format!("cannot start worker {i}: {e}"))?;
            threads.push(spawned);
        }
        drop(ready_tx);
        let mut gso = true;
        let mut proxy = Proxy {
            shared,
            threads,
            stop,
            local: listen,
            gso: false,
            stats_file: cfg.stats_file.clone(),
            hlog_file: cfg.hlog_file.clone(),
            drain_timeout: Duration::from_millis(cfg.quic.drain_timeout_ms),
            metrics,
            endpoint,
            steering,
        };
        for _ in 0..n {
            match ready_rx.recv() {
                Ok(Ok(g)) => gso &= g,
                Ok(Err(e)) => return Err(proxy.shut_down_with(e)),
                Err(_) => return Err(proxy.shut_down_with("a worker ended at start".into())),
            }
        }
        proxy.gso = gso;
        Ok(proxy)
    }

    /// Where the metrics endpoint listens (`metrics_listen`, its port chosen when 0).
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.endpoint
            .as_ref()
            .map(mimiq_metrics::Endpoint::local_addr)
    }

    /// The address the proxy listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The inner MTU the proxy enforces.
    pub fn tunnel_mtu(&self) -> usize {
        self.shared.tunnel_mtu
    }

    /// Workers running.
    pub fn workers(&self) -> usize {
        self.threads.len()
    }

    /// Whether every worker's socket sends with UDP GSO.
    pub fn gso(&self) -> bool {
        self.gso
    }

    /// Serves until `stop` is set or a worker fails, writing the stats file each time every
    /// worker has published its counters again (once a second): what the file holds happened
    /// at most a second before it was written. Then stops the workers (each closes its
    /// connections) and returns the final counters.
    pub fn run(mut self, stop: &AtomicBool) -> Result<Value, String> {
        let mut written = vec![0u64; self.threads.len()];
        let mut hlog = match &self.hlog_file {
            Some(path) => Some(Hlog::create(path, self.threads.len())?),
            None => {
                // SIGUSR1 asks for a dump; without a log it must not end the proxy.
                DumpTimer::new(Duration::MAX).map_err(|e| format!("SIGUSR1: {e}"))?;
                None
            }
        };
        let mut drain_until = None;
        while !self.threads.iter().any(|t| t.is_finished()) {
            if stop.load(Ordering::Relaxed) && drain_until.is_none() {
                // Stopped while a newer process of the key runs: an upgrade. Serve what is
                // open until it closes, passing new connections to the newer process.
                self.shared.generation.refresh();
                if self.drain_timeout.is_zero()
                    || self.shared.peer.is_none()
                    || !self.shared.generation.other_live()
                {
                    break;
                }
                self.shared.draining.store(true, Ordering::Relaxed);
                tracing::info!(
                    "draining for the newer process: new connections go to it, open ones are served up to {:?}",
                    self.drain_timeout
                );
                drain_until = Some((
                    std::time::Instant::now() + self.drain_timeout,
                    self.publications(),
                ));
            }
            if let Some((until, published)) = &drain_until {
                // Counted only from what every worker published since the drain began.
                let fresh = self
                    .publications()
                    .iter()
                    .zip(published)
                    .all(|(n, w)| n > w);
                let open = self.counters()["connections_open"].as_u64().unwrap_or(0);
                if (fresh && open == 0) || std::time::Instant::now() >= *until {
                    tracing::info!("drained ({open} connections left open)");
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
            let now = self.publications();
            if now.iter().zip(&written).all(|(n, w)| n > w) {
                written = now;
                self.write_stats();
                self.shared.generation.refresh();
            }
            if let Some(Err(e)) = hlog.as_mut().map(|h| h.write_if_due(&self.shared)) {
                tracing::warn!("{e}");
            }
        }
        self.stop.store(true, Ordering::Relaxed);
        let mut failed = None;
        for t in std::mem::take(&mut self.threads) {
            match t.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failed = Some(e),
                Err(_) => failed = Some("a worker panicked".into()),
            }
        }
        let stats = self.write_stats();
        if let Some(Err(e)) = hlog.as_mut().map(|h| h.write(&self.shared)) {
            tracing::warn!("{e}");
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(stats),
        }
    }

    /// Stops the workers started so far and gives `e` back.
    fn shut_down_with(&mut self, e: String) -> String {
        self.stop.store(true, Ordering::Relaxed);
        for t in std::mem::take(&mut self.threads) {
            let _ = t.join();
        }
        e
    }

    /// How many times each worker has published.
    fn publications(&self) -> Vec<u64> {
        let p = self.shared.published.lock();
        p.unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(n, _)| *n)
            .collect()
    }

    /// The counters: every worker's summed, then `workers`, each worker's own; and the
    /// steering program's figures.
    fn counters(&self) -> Value {
        let published = self
            .shared
            .published
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let parts: Vec<Published> = published.into_iter().filter_map(|(_, p)| p).collect();
        let mut total = json!({});
        let (mut up, mut down) = (duration_histogram(), duration_histogram());
        let mut paths_peak = 0;
        for p in &parts {
            add_counters(
                &mut total,
                &serde_json::to_value(&p.stats).unwrap_or_default(),
            );
            let _ = up.add(&p.up);
            let _ = down.add(&p.down);
            paths_peak = paths_peak.max(p.stats.paths_peak);
        }
        total["paths_peak"] = json!(paths_peak);
        total["burst_ns"] = json!(Percentiles::of(&up));
        total["tun_burst_ns"] = json!(Percentiles::of(&down));
        let (steered, fallback) = self.steering.as_ref().map_or((0, 0), |s| s.counters());
        total["steered"] = json!(steered);
        total["steering_fallback"] = json!(fallback);
        total["workers"] = json!(parts.iter().map(|p| &p.stats).collect::<Vec<_>>());
        total
    }

    /// Writes the counters to `stats_file` (replaced atomically), and returns them.
    fn write_stats(&self) -> Value {
        let stats = self.counters();
        self.metrics.update(&stats);
        if let Some(path) = &self.stats_file {
            if let Ok(text) = serde_json::to_string_pretty(&stats) {
                let tmp = path.with_extension("tmp");
                if std::fs::write(&tmp, text).is_ok() {
                    let _ = std::fs::rename(&tmp, path);
                }
            }
        }
        stats
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in std::mem::take(&mut self.threads) {
            let _ = t.join();
        }
        // What this generation left for the other: gone with it.
        if let Some(p) = &self.shared.peer {
            let _ = std::fs::remove_file(&p.ours);
        }
        if let Some((ours, _)) = &self.shared.addresses {
            let _ = std::fs::remove_file(ours);
        }
    }
}

/// Where a process of `generation` writes the CONNECT-IP addresses it has handed out.
fn addresses_path(key: &Path, generation: u8) -> PathBuf {
    let mut p = key.as_os_str().to_owned();
    p.push(format!(".gen{generation}.addresses"));
    PathBuf::from(p)
}

/// The proxy's `.hlog`: each worker's burst latencies in both directions (tags `up.worker<i>`,
/// `down.worker<i>`), one interval a second and one at once on SIGUSR1.
struct Hlog {
    log: IntervalLog,
    timer: DumpTimer,
    /// What each worker had published at the last interval (`up`, `down`).
    last: Vec<(Histogram<u64>, Histogram<u64>)>,
    tags: Vec<(String, String)>,
}

impl Hlog {
    fn create(path: &Path, workers: usize) -> Result<Hlog, String> {
        let log = IntervalLog::create(
            path,
            "mimiq-proxy burst latency, ns: up = QUIC datagrams in to inner packets on the TUN \
             device, down = TUN packets in to datagrams out, per worker",
        )
        .map_err(|e| format!("hlog_file {}: {e}", path.display()))?;
        let timer = DumpTimer::new(Duration::from_secs(1)).map_err(|e| format!("SIGUSR1: {e}"))?;
        Ok(Hlog {
            log,
            timer,
            last: vec![(duration_histogram(), duration_histogram()); workers],
            tags: (0..workers)
                .map(|i| (format!("up.worker{i}"), format!("down.worker{i}")))
                .collect(),
        })
    }

    fn write_if_due(&mut self, shared: &Shared) -> Result<(), String> {
        if self.timer.due() {
            self.write(shared)?;
        }
        Ok(())
    }

    /// Appends what each worker recorded since the last interval (the workers publish their
    /// histograms since start; the interval is the difference).
    fn write(&mut self, shared: &Shared) -> Result<(), String> {
        let published = shared
            .published
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let mut intervals = Vec::new();
        for ((_, p), last) in published.iter().zip(&mut self.last) {
            let Some(p) = p else {
                intervals.push((duration_histogram(), duration_histogram()));
                continue;
            };
            let (mut up, mut down) = (p.up.clone(), p.down.clone());
            // Published histograms only grow, so the last one is contained in this one.
            let _ = up.subtract(&last.0);
            let _ = down.subtract(&last.1);
            *last = (p.up.clone(), p.down.clone());
            intervals.push((up, down));
        }
        let mut tagged = Vec::new();
        for ((up_tag, down_tag), (up, down)) in self.tags.iter().zip(&intervals) {
            tagged.push((up_tag.as_str(), up));
            tagged.push((down_tag.as_str(), down));
        }
        self.log
            .write(&tagged)
            .map_err(|e| format!("hlog_file: {e}"))
    }
}

/// Where a worker's QUIC datagrams come from.
enum Endpoint {
    /// Its socket of the SO_REUSEPORT group.
    Socket(std::net::UdpSocket),
    /// An AF_XDP socket on this queue of the interface.
    Xdp {
        interface: String,
        queue: u32,
        config: XskConfig,
    },
}

/// A worker's thread: builds the worker on `io`, tells `ready` (with whether it sends with
/// GSO), and serves until `stop`.
#[allow(clippy::too_many_arguments)]
fn serve<D: Datagrams>(
    io: Result<D, String>,
    gso: bool,
    cfg: ProxyConfig,
    index: usize,
    shared: Arc<Shared>,
    tun: Option<TunDevice>,
    rings: Rings,
    ready: &std::sync::mpsc::Sender<Result<bool, String>>,
    stop: &AtomicBool,
) -> Result<(), String> {
    let started = io.and_then(|io| Worker::new(cfg, index, shared, io, tun, rings));
    let mut worker = match started {
        Ok(w) => {
            let _ = ready.send(Ok(gso));
            w
        }
        Err(e) => {
            let _ = ready.send(Err(e.clone()));
            return Err(e);
        }
    };
    worker.run(stop).map_err(|e| format!("worker {index}: {e}"))
}

/// Adds every number of `part` to the same field of `total` (objects field by field).
fn add_counters(total: &mut Value, part: &Value) {
    match (total, part) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                add_counters(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (t @ Value::Null, v) => *t = v.clone(),
        (t @ Value::Number(_), Value::Number(v)) => {
            let sum = t.as_u64().unwrap_or(0) + v.as_u64().unwrap_or(0);
            *t = json!(sum);
        }
        _ => {}
    }
}

/// A UDP socket bound to `addr` in a SO_REUSEPORT group (every worker binds the same address;
/// the kernel, or the steering program, picks the socket of each datagram).
fn reuseport_socket(addr: SocketAddr) -> Result<std::net::UdpSocket, String> {
    let bind = |e: std::io::Error| format!("bind UDP {addr}: {e}");
    let s =
        Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP)).map_err(bind)?;
    s.set_reuse_port(true).map_err(bind)?;
    if addr.is_ipv6() {
        // An IPv6 wildcard also takes IPv4 (as it does for std's bind).
        let _ = s.set_only_v6(false);
    }
    s.bind(&addr.into()).map_err(bind)?;
    Ok(s.into())
}

/// Runs a proxy from a config file until SIGINT/SIGTERM; prints the final counters.
pub fn run_from_file(path: &Path) -> Result<(), String> {
    let cfg = ProxyConfig::load(path)?;
    let proxy = Proxy::start(cfg)?;
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&stop)).map_err(|e| e.to_string())?;
    }
    println!(
        "mimiq-proxy listening on {} (tunnel MTU {}, GSO {}, {} workers)",
        proxy.local_addr(),
        proxy.tunnel_mtu(),
        proxy.gso(),
        proxy.workers()
    );
    let stats = proxy.run(&stop)?;
    println!("{stats}");
    Ok(())
}

/// The counters of a stats file as a table: one row per counter that is not zero everywhere
/// (`all`: every counter), nested ones as `table.key`, with the total and each worker's value.
pub fn stats_table(stats: &Value, all: bool) -> String {
    fn flatten(prefix: &str, v: &Value, out: &mut Vec<(String, u64)>) {
        match v {
            Value::Number(n) => out.push((prefix.to_owned(), n.as_u64().unwrap_or(0))),
            Value::Object(m) => {
                for (k, v) in m {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    flatten(&key, v, out);
                }
            }
            _ => {}
        }
    }
    let mut total = Vec::new();
    let mut shown = stats.clone();
    if let Some(m) = shown.as_object_mut() {
        m.remove("workers");
    }
    flatten("", &shown, &mut total);
    let workers: Vec<Vec<(String, u64)>> = stats["workers"]
        .as_array()
        .map(|ws| {
            ws.iter()
                .map(|w| {
                    let mut v = Vec::new();
                    flatten("", w, &mut v);
                    v
                })
                .collect()
        })
        .unwrap_or_default();
    let width = total.iter().map(|(k, _)| k.len()).max().unwrap_or(7).max(7);
    let mut out = format!("{:width$} {:>14}", "counter", "total");
    for i in 0..workers.len() {
        out += &format!(" {:>14}", format!("worker {i}"));
    }
    out.push('\n');
    for (key, value) in &total {
        let per: Vec<u64> = workers
            .iter()
            .map(|w| w.iter().find(|(k, _)| k == key).map_or(0, |(_, v)| *v))
            .collect();
        if !all && *value == 0 && per.iter().all(|&v| v == 0) {
            continue;
        }
        out += &format!("{key:width$} {value:>14}");
        for v in per {
            out += &format!(" {v:>14}");
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_has_a_row_per_counter_and_a_column_per_worker() {
        let stats = json!({
            "udp_rx": 7, "idle": 0, "ip_drops": {"policy": 2},
            "workers": [{"udp_rx": 3, "idle": 0, "ip_drops": {"policy": 2}}, {"udp_rx": 4, "idle": 0}],
        });
        let t = stats_table(&stats, false);
        let rows: Vec<Vec<&str>> = t.lines().map(|l| l.split_whitespace().collect()).collect();
        assert_eq!(rows[0], ["counter", "total", "worker", "0", "worker", "1"]);
        assert!(rows.contains(&vec!["udp_rx", "7", "3", "4"]), "{t}");
        assert!(
            rows.contains(&vec!["ip_drops.policy", "2", "2", "0"]),
            "{t}"
        );
        assert!(!t.contains("idle"), "{t}");
        assert!(stats_table(&stats, true).contains("idle"));
    }

    #[test]
    fn counters_add_field_by_field() {
        let mut total = json!({});
        add_counters(&mut total, &json!({"a": 1, "m": {"x": 2}}));
        add_counters(&mut total, &json!({"a": 5, "m": {"x": 1, "y": 7}}));
        assert_eq!(total, json!({"a": 6, "m": {"x": 3, "y": 7}}));
    }
}
