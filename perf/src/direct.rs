//! Direct mode between namespaces (seed 000 §4): a client host holding several addresses on its
//! veth, a server host, an HTTP/3 server there (the project's quiche test server in-process on a
//! thread in the host, or aioquic's, an independent QUIC stack, as a process), and runs of GETs
//! over one QUIC connection that hops between the client's addresses, every body checked byte
//! for byte. Used by `perf/tests/direct_hop.rs` and `mimiq-perf bench interop`.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mimiq_agent::direct::{DirectConfig, DirectConnection, DirectControl, DirectStats};
use mimiq_agent::migrate::{LatencySummary, MigrationConfig, MigrationStats};
use mimiq_agent::strategy::HopStrategyConfig;
use mimiq_h3test::{
    client_config, run_gets_until_hops, GetReport, H3Server, H3ServerConfig, H3ServerStats,
    TestCert,
};
use serde_json::Value;

use crate::testbed::{Proc, Testbed};

/// The servers' UDP port.
pub const PORT: u16 = 4433;

/// Where `scripts/setup` installs the Python that has aioquic; `MIMIQ_INTEROP_PYTHON` overrides.
pub const INTEROP_PYTHON: &str = "/opt/mimiq-interop/bin/python";

/// `cli:eth0 — eth0:srv`, one subnet; the client holds `client_ips` on its veth, the server
/// `server_ip`. `prefix` is the subnet length.
pub fn topology(server_ip: &str, client_ips: &[String], prefix: u8) -> Result<Testbed, String> {
    let build = || {
        let mut tb = Testbed::new()?;
        tb.add_host("cli")?;
        tb.add_host("srv")?;
        tb.add_link(("cli", "eth0"), ("srv", "eth0"), Default::default())?;
        tb.add_addr("srv", "eth0", &format!("{server_ip}/{prefix}"))?;
        for ip in client_ips {
            // `add_addr` adds `nodad` for IPv6, so every address is usable at once.
            tb.add_addr("cli", "eth0", &format!("{ip}/{prefix}"))?;
        }
        Ok::<_, crate::testbed::TestbedError>(tb)
    };
    build().map_err(|e| format!("direct-mode topology: {e}"))
}

/// `n` IPv4 client addresses, 198.18.0.10 up, in 198.18.0.0/24 (the server is 198.18.0.1).
pub fn v4_clients(n: u8) -> Vec<String> {
    (0..n).map(|i| format!("198.18.0.{}", 10 + i)).collect()
}

/// `n` IPv6 client addresses, fd00::10 up, in fd00::/64 (the server is fd00::1).
pub fn v6_clients(n: u8) -> Vec<String> {
    (0..n).map(|i| format!("fd00::{:x}", 0x10 + i)).collect()
}

/// Sockets on each of `ips`, any port.
pub fn sockets(ips: &[String]) -> Result<Vec<SocketAddr>, String> {
    ips.iter()
        .map(|ip| {
            ip.parse::<IpAddr>()
                .map(|ip| SocketAddr::new(ip, 0))
                .map_err(|e| format!("{ip}: {e}"))
        })
        .collect()
}

/// Body sizes from 1 byte to ~20 KB (up to ~15 packets), so that hops land both between
/// responses and inside them.
pub fn sizes(n: usize) -> Vec<u64> {
    (0..n as u64).map(|i| 1 + (i * 7_919) % 20_000).collect()
}

/// The body bytes of the first `responses` GETs of a run through `sizes` (again from the start
/// when the run went on for hops).
pub fn body_bytes(sizes: &[u64], responses: u64) -> u64 {
    sizes.iter().cycle().take(responses as usize).sum()
}

/// The project's quiche HTTP/3 test server on a thread inside a host (`srv` in these topologies).
pub struct QuicheServer {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<std::io::Result<Result<H3ServerStats, String>>>,
}

impl QuicheServer {
    /// Starts it on `addr` in `host` and returns once it listens.
    pub fn start(
        tb: &Testbed,
        host: &str,
        addr: SocketAddr,
        config: H3ServerConfig,
    ) -> Result<Self, String> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = {
            let stop = Arc::clone(&stop);
            tb.spawn_in(host, move || {
                let cert = TestCert::new().map_err(|e| format!("test certificate: {e}"))?;
                let bound = H3Server::bind(addr, &cert, config).map_err(|e| e.to_string());
                // Loaded into quiche: the files can go now.
                drop(cert);
                let ready = bound.as_ref().map(|_| ()).map_err(Clone::clone);
                let _ = ready_tx.send(ready);
                let mut server = bound?;
                server.run(&stop).map_err(|e| format!("server loop: {e}"))?;
                eprintln!("server: connections closed: {:?}", server.closes());
                Ok(server.stats())
            })
            .map_err(|e| e.to_string())?
        };
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .map_err(|e| format!("the quiche server did not start: {e}"))??;
        Ok(Self { stop, thread })
    }

    /// Stops it; its counters.
    pub fn finish(self) -> Result<H3ServerStats, String> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| "the quiche server panicked".to_string())?
            .map_err(|e| format!("the quiche server's thread: {e}"))?
    }
}

/// aioquic's HTTP/3 server (`perf/interop/aioquic_h3_server.py`), an independent QUIC stack
/// serving the same bodies as the quiche test server, as a process in `srv`.
pub struct AioquicServer {
    proc: Proc,
    stats: PathBuf,
    _dir: tempfile::TempDir,
}

impl AioquicServer {
    /// Starts it on `addr` and returns once it listens.
    pub fn start(tb: &mut Testbed, addr: SocketAddr) -> Result<Self, String> {
        let python = std::env::var_os("MIMIQ_INTEROP_PYTHON")
            .map_or_else(|| PathBuf::from(INTEROP_PYTHON), PathBuf::from);
        if !python.exists() {
            return Err(format!(
                "{}: no Python with aioquic (scripts/setup installs it)",
                python.display()
            ));
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("interop/aioquic_h3_server.py");
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let stats = dir.path().join("stats.json");
        let (ip, port) = (addr.ip().to_string(), addr.port().to_string());
        let cmd = [
            &*python.to_string_lossy(),
            &*script.to_string_lossy(),
            "--listen",
            &ip,
            "--port",
            &port,
            "--stats",
            &*stats.to_string_lossy(),
        ];
        let mut proc = tb.spawn("srv", &cmd, false).map_err(|e| e.to_string())?;
        proc.wait_ready("aioquic server", Duration::from_secs(30))?;
        Ok(Self {
            proc,
            stats,
            _dir: dir,
        })
    }

    /// Stops it; its counters (`perf/interop/aioquic_h3_server.py` names them).
    pub fn finish(mut self) -> Result<Value, String> {
        self.proc.stop(Duration::from_secs(10));
        let text = std::fs::read_to_string(&self.stats)
            .map_err(|e| format!("aioquic server counters: {e}; {}", self.proc.describe()))?;
        serde_json::from_str(&text).map_err(|e| format!("aioquic server counters: {e}"))
    }
}

/// A run of GETs from `cli`.
#[derive(Debug, Clone)]
pub struct Gets {
    /// One socket on each (the connection starts on the first).
    pub locals: Vec<SocketAddr>,
    /// The server.
    pub server: SocketAddr,
    /// When and where to hop.
    pub strategy: HopStrategyConfig,
    /// The strategy's seed.
    pub seed: u64,
    /// GET `/N` for each N, then again from the start until `min_hops` hops were made.
    pub sizes: Vec<u64>,
    /// See `sizes`.
    pub min_hops: u64,
}

/// What a run of GETs left behind on the client.
#[derive(Debug, Clone)]
pub struct ClientRun {
    /// The GETs.
    pub report: GetReport,
    /// The migration driver's counters.
    pub hops: MigrationStats,
    /// The I/O shell's counters.
    pub shell: DirectStats,
    /// Hop latency (request to switch).
    pub latency: LatencySummary,
    /// Addresses withdrawn during the run.
    pub withdrawn: Vec<SocketAddr>,
    /// Paths left and not yet forgotten at the end.
    pub pending_forgets: u64,
    /// Packets quiche dropped for a destination connection ID the connection no longer has
    /// (vendor/quiche/MIMIQ-PATCH.md, the third fix).
    pub unknown_dcid_dropped: u64,
    /// Packets quiche read although their destination connection ID had just been retired by
    /// the server (the sixth fix).
    pub retired_dcid_read: u64,
}

/// Runs `gets` on `cli` over one connection bound to all of its `locals`, handing the
/// connection's control handle and bound addresses to `control` once it is established; with
/// `start`, the GETs
/// begin once it says so (or is dropped). An error says why the run stopped, with the
/// connection's state.
pub fn run_gets_in(
    tb: &Testbed,
    gets: Gets,
    control: Option<Sender<(DirectControl, Vec<SocketAddr>)>>,
    start: Option<Receiver<()>>,
) -> Result<ClientRun, String> {
    tb.run_in("cli", move || {
        let mut quic = client_config(gets.locals.len()).map_err(|e| e.to_string())?;
        let config = DirectConfig {
            strategy: gets.strategy,
            seed: gets.seed.into(),
            connection: 0,
            migration: MigrationConfig::default(),
        };
        let mut direct = DirectConnection::connect(
            &gets.locals,
            gets.server,
            Some("quic.tech"),
            &mut quic,
            &config,
        )
        .map_err(|e| format!("sockets on every client address: {e}"))?;
        if let Some(control) = control {
            // Handed over once the connection is up: a hop asked for before is refused.
            let up = Instant::now();
            while !direct.connection().is_established() {
                if direct.connection().is_closed() || up.elapsed() > Duration::from_secs(10) {
                    return Err(format!(
                        "no handshake: {:?}",
                        direct.connection().peer_error()
                    ));
                }
                direct
                    .poll(Duration::from_millis(20))
                    .map_err(|e| e.to_string())?;
            }
            let _ = control.send((direct.control(), direct.local_addrs()));
        }
        if let Some(start) = start {
            let _ = start.recv_timeout(Duration::from_secs(30));
        }
        let deadline = Duration::from_secs(120);
        let report = run_gets_until_hops(
            &mut direct,
            "quic.tech",
            &gets.sizes,
            gets.min_hops,
            deadline,
        )
        .map_err(|e| {
            let paths: Vec<String> = direct
                .connection()
                .path_stats()
                .map(|p| {
                    format!(
                        "{}: {:?} active={} sent={} recv={} lost={}",
                        p.local_addr, p.validation_state, p.active, p.sent, p.recv, p.lost
                    )
                })
                .collect();
            format!(
                "{e}; hops {:?}; shell {:?}; on {} withdrawn {:?}; paths {paths:?}",
                direct.migration_stats(),
                direct.stats(),
                direct.migrator().local_addr(),
                direct.withdrawn_addresses()
            )
        })?;
        let _ = direct.close();
        Ok(ClientRun {
            report,
            hops: direct.migration_stats(),
            shell: direct.stats(),
            latency: direct.migrator().latency_summary(),
            withdrawn: direct.withdrawn_addresses().to_vec(),
            pending_forgets: direct.migrator().pending_forgets() as u64,
            unknown_dcid_dropped: direct.connection().stats().unknown_dcid_dropped_count as u64,
            retired_dcid_read: direct.connection().stats().retired_dcid_read_count,
        })
    })
    .map_err(|e| e.to_string())?
}
