//! `mimiq-perf bench privacy`: what an on-path observer of the outside link learns about hopping
//! clients (the MIMIQ paper §5), measured through the real single box: agents that get their
//! addresses from the allocator through the switch, the proxy, a web server behind it.
//!
//! ```text
//!  c1, c2, c3 (mimiq-agent, visits) ── [access ⇄ edge] ── out0 ═ capture ═ out (mimiq-proxy) ── srv (websites)
//! ```
//!
//! For each hop setting, the clients visit the synthetic websites of [`crate::privacy::sites`]
//! (every site `visits` times, the visits shuffled and dealt to the clients, a random pause of
//! 200–600 ms before each) through their tunnels while the outside link is recorded. The
//! settings of [`Options::direct_hops`] are run again in direct mode (ARCHITECTURE.md §1): each
//! page load is a QUIC connection of its own from the addresses the client holds straight to an
//! HTTP/3 server on the outside host, hopping among them as the setting says. The attacker
//! then works from that capture alone, as the paper's observer does:
//!
//! - **website fingerprinting**: the capture split into sub-flows by client address and page
//!   load (the attacker is told where page loads begin and end, the closed-world setting's usual
//!   gift, which only helps it), the Tik-Tok and k-FP features of each sub-flow, a random forest,
//!   closed-world accuracy by stratified cross-validation;
//! - **linkage**: the capture split by address alone (an address's packets, split where it is
//!   quiet for a second), consecutive ones linked by timing and volume continuity, scored against
//!   the agents' address logs;
//! - **connection IDs**: how many were seen from two addresses ([`crate::hopwatch`]);
//! - **address uniformity**: a chi-square test of the addresses the allocator handed out, and a
//!   next-address predictor.
//!
//! Labels come from the bench's own records (which client visited which site when) and the
//! agents' address logs (which client held which address when); the attacker never sees them.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use etherparse::{NetSlice, SlicedPacket, TransportSlice};
use mimiq_agent::rng::HopRng;
use mimiq_agent::strategy::HopStrategyConfig;
use serde::Serialize;

use mimiq_agent::direct::{DirectConfig, DirectConnection};
use mimiq_agent::migrate::MigrationConfig;
use mimiq_h3test::{client_config, run_gets, H3ServerConfig};
use mimiq_masque::policy::own_addresses;

use crate::capture::{self, Frame};
use crate::demo::{self, PROXY};
use crate::direct::QuicheServer;
use crate::hopwatch::{leases_from_log, HopWatch, Lease};
use crate::masque::stop_client;
use crate::privacy::features::{self, Dir, Packet};
use crate::privacy::{classify, linkage, sites, stats, web};
use crate::singlebox::{self, SingleBox, Times};
use crate::testbed::topology::single_box_addr as addr;
use crate::testbed::Testbed;

/// Leases of 20–30 s (an unhopped client keeps its address through many visits), t_remove 2 s,
/// t_sid 20 s (k = 3 covers t_ip + t_remove), the usual /24 pool.
pub const TIMES: Times = Times(20_000, 30_000, 2_000, 20_000, addr::POOL_V4);
/// The web server behind the proxy.
const WEB: &str = "198.18.220.2:80";
/// Direct mode's HTTP/3 server: on the outside host beside the proxy, so the same link and
/// capture see it.
const DIRECT_SERVER: &str = "198.18.200.2:8443";
/// The clients that visit, in the order they are used.
pub const CLIENTS: [&str; 3] = ["c1", "c2", "c3"];
/// A client address quiet this long ends a linkage sub-flow.
const LINK_IDLE_S: f64 = 1.0;
/// The linkage attacker's window: a new address must appear within this of the last one going
/// quiet (hops overlap by as much: packets in flight still reach the old address).
const LINK_GAP_S: f64 = 0.5;

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Sites (closed world).
    pub sites: usize,
    /// Visits per site and hop setting.
    pub visits: usize,
    /// Clients visiting in parallel (1..=3).
    pub clients: usize,
    /// The hop settings, in the short form of [`HopStrategyConfig`] (`never`, `every:25`,
    /// `random:10:100`, `once:50`).
    pub hops: Vec<HopStrategyConfig>,
    /// The hop settings run again in direct mode.
    pub direct_hops: Vec<HopStrategyConfig>,
    /// Fixes the sites, the visit order, the pauses, the agents' hops and the folds.
    pub seed: u64,
    /// Cross-validation folds.
    pub folds: usize,
    /// Trees of the random forest.
    pub trees: u16,
    /// Where the captures (pcap), key logs and agents' logs are kept, if anywhere.
    pub out: Option<PathBuf>,
    /// The padding defence: agents and proxy pad every QUIC packet to a multiple of this many
    /// bytes (`pad_to_bytes`); 0: none.
    pub pad: usize,
    /// The proxy keeps a client's congestion state across its hops
    /// (`quic.keep_congestion_on_migration`).
    pub keep_congestion: bool,
    /// The idle defence: the agents stay quiet for a random 0..=this many milliseconds before
    /// each hop (`tunnel.hop_idle_max_ms`); 0: none.
    pub hop_idle_max_ms: u64,
}

impl Options {
    /// The default grid: 50 sites × 10 visits, three clients, no hopping, a hop every 100, 50,
    /// 25 and 10 packets, every 10–100 at random, once after 50; in direct mode no hopping and a
    /// hop every 25 packets.
    pub fn full() -> Options {
        let hops = [
            "never",
            "every:100",
            "every:50",
            "every:25",
            "every:10",
            "random:10:100",
            "once:50",
        ];
        Options {
            sites: 50,
            visits: 10,
            clients: 3,
            hops: hops.iter().filter_map(|h| h.parse().ok()).collect(),
            direct_hops: ["never", "every:25"]
                .iter()
                .filter_map(|h| h.parse().ok())
                .collect(),
            seed: 1,
            folds: 5,
            trees: 100,
            out: None,
            pad: 0,
            keep_congestion: false,
            hop_idle_max_ms: 0,
        }
    }

    /// The suite's grid: 5 sites × 5 visits, no hopping and a hop every 25 packets; in direct
    /// mode a hop every 25 packets.
    pub fn quick() -> Options {
        Options {
            sites: 5,
            visits: 5,
            clients: 2,
            hops: ["never", "every:25"]
                .iter()
                .filter_map(|h| h.parse().ok())
                .collect(),
            direct_hops: vec![HopStrategyConfig::EveryPackets { packets: 25 }],
            folds: 5,
            trees: 50,
            ..Options::full()
        }
    }
}

/// How the clients reach the websites.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Through their agents' tunnels: one hopping QUIC connection per client to the proxy, the
    /// page loads over HTTP/1.1 inside it.
    Tunnel,
    /// Each page load its own hopping QUIC connection to [`DIRECT_SERVER`], over HTTP/3.
    Direct,
}

impl Mode {
    /// The QUIC server the clients' datagrams go to, and come from.
    fn server(self) -> SocketAddr {
        let s = match self {
            Mode::Tunnel => PROXY,
            Mode::Direct => DIRECT_SERVER,
        };
        s.parse().expect("a constant socket address")
    }

    /// The files of a setting: `<hop>` in tunnel mode, `direct-<hop>` in direct mode.
    fn file_label(self, hop: &HopStrategyConfig) -> String {
        let hop = hop.to_string().replace(':', "-");
        match self {
            Mode::Tunnel => hop,
            Mode::Direct => format!("direct-{hop}"),
        }
    }
}

/// One page load, as the bench recorded it.
#[derive(Debug, Clone)]
pub struct Visit {
    /// Index into [`CLIENTS`].
    pub client: usize,
    /// The site.
    pub site: u32,
    /// When it began and ended, seconds since the Unix epoch.
    pub start: f64,
    /// See `start`.
    pub end: f64,
    /// Hops its connection completed (direct mode; a tunnel's hops are the agent's).
    pub hops: u64,
}

/// What one hop setting measured.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Tunnel or direct mode.
    pub mode: Mode,
    /// The hop setting (short form).
    pub hop: String,
    /// Packets a client sends per address by the setting (the mean for random intervals; none
    /// for `never` and `once`).
    pub interval: Option<f64>,
    /// Page loads that completed, and that failed.
    pub visits: usize,
    /// See `visits`.
    pub visit_errors: usize,
    /// Why the first failed page load failed.
    pub first_error: Option<String>,
    /// Hops the agents (tunnel mode) or the page loads' connections (direct mode) completed.
    pub hops_done: u64,
    /// The capture.
    pub analysis: Analysis,
}

/// What the attacker got out of one capture.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Analysis {
    /// Tunnel packets in the capture.
    pub packets: u64,
    /// Frames skipped: not IPv4/IPv6 + UDP to or from the proxy, or cut short.
    pub skipped_frames: u64,
    /// UDP datagrams of the proxy's port that are not QUIC (the fixed bit clear).
    pub not_quic: u64,
    /// Tunnel packets of an address no client held at the time (by the address logs).
    pub unowned: u64,
    /// Tunnel packets between page loads (keep-alives, allocation refills, hops).
    pub between_visits: u64,
    /// Sub-flows the classifier saw (address × page load).
    pub subflows: usize,
    /// Their mean packets.
    pub packets_per_subflow: f64,
    /// Closed-world accuracy (cross-validated), and chance.
    pub accuracy: f64,
    /// See `accuracy`.
    pub chance: f64,
    /// Per fold.
    pub folds: Vec<f64>,
    /// The linkage attacker.
    pub linkage: LinkageFigures,
    /// Connection IDs seen from two client addresses.
    pub cid_linked: usize,
}

/// The linkage attacker's result.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LinkageFigures {
    /// Address sub-flows.
    pub flows: usize,
    /// Links it made, right ones, and true consecutive pairs.
    pub predicted: usize,
    /// See `predicted`.
    pub correct: usize,
    /// See `predicted`.
    pub true_links: usize,
    /// correct / predicted.
    pub precision: f64,
    /// correct / true links.
    pub recall: f64,
}

/// The allocator's addresses, tested.
#[derive(Debug, Clone, Serialize)]
pub struct Uniformity {
    /// Allocations seen in the agents' logs.
    pub allocations: usize,
    /// Chi-square over the pool's 253 usable addresses in 11 equal bins.
    pub chi_square: f64,
    /// Its degrees of freedom and p-value.
    pub dof: u32,
    /// See `dof`.
    pub p_value: f64,
    /// The best "previous + d" predictor's hit rate, what the best of 256 lags reaches on a
    /// uniform sequence of the same length, and chance (1/256).
    pub next_hit_rate: f64,
    /// See `next_hit_rate`.
    pub next_expected_best: f64,
    /// The lag d of the best predictor.
    pub next_best_lag: u64,
    /// See `next_hit_rate`.
    pub next_chance: f64,
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Sites, visits per site, clients.
    pub sites: usize,
    /// See `sites`.
    pub visits: usize,
    /// See `sites`.
    pub clients: usize,
    /// Padding bucket of every QUIC packet, bytes (0: none).
    pub pad: usize,
    /// Whether the proxy kept a client's congestion state across its hops.
    pub keep_congestion: bool,
    /// The agents' longest idle before a hop, ms (0: none).
    pub hop_idle_max_ms: u64,
    /// One per hop setting.
    pub rows: Vec<Row>,
    /// Over every setting's allocations.
    pub uniformity: Option<Uniformity>,
    /// Why the addresses were not tested, when they were not (too few allocations).
    pub uniformity_skipped: Option<String>,
}

/// Runs the grid; `progress` hears a line per step.
pub fn run(o: &Options, progress: &mut dyn FnMut(&str)) -> Result<Report, String> {
    if !(1..=CLIENTS.len()).contains(&o.clients) {
        return Err(format!(
            "clients: 1 to {}, not {}",
            CLIENTS.len(),
            o.clients
        ));
    }
    if o.sites < 2 || o.visits < 2 || o.hops.is_empty() {
        return Err("at least 2 sites, 2 visits and one hop setting".into());
    }
    let sites = sites::generate(o.seed, o.sites);
    let SingleBox {
        mut tb,
        mut allocator,
        switch,
        dir,
    } = singlebox::start(&TIMES);
    let result = (|| {
        let keys = dir.path().join("proxy-keys.log");
        let extra = format!(
            "[quic]\nkeylog_file = \"{}\"\npad_to_bytes = {}\nkeep_congestion_on_migration = {}\n",
            keys.display(),
            o.pad,
            o.keep_congestion
        );
        let mut proxy = demo::start_outside_with(&mut tb, dir.path(), &extra)?;
        web::serve(&tb, "srv", WEB.parse().map_err(|e| format!("{e}"))?)?;
        let mut rows = Vec::new();
        let mut leases = Vec::new();
        let settings = (o.hops.iter().map(|h| (Mode::Tunnel, h)))
            .chain(o.direct_hops.iter().map(|h| (Mode::Direct, h)));
        let mut server = None;
        for (mode, hop) in settings {
            if mode == Mode::Direct && server.is_none() {
                let s = QuicheServer::start(
                    &tb,
                    "out",
                    DIRECT_SERVER.parse().map_err(|e| format!("{e}"))?,
                    H3ServerConfig::default(),
                )?;
                server = Some(s);
            }
            progress(&format!("{mode:?} mode, hop {hop}: visiting"));
            let result = run_setting(&mut tb, dir.path(), &sites, mode, hop, o);
            let (row, l) = match result {
                Ok(v) => v,
                Err(e) => {
                    if let Some(s) = server.take() {
                        let _ = s.finish();
                    }
                    return Err(e);
                }
            };
            progress(&format!(
                "{mode:?} mode, hop {}: {} sub-flows, accuracy {:.3}",
                row.hop, row.analysis.subflows, row.analysis.accuracy
            ));
            rows.push(row);
            leases.extend(l);
        }
        if let Some(s) = server {
            s.finish()?;
        }
        proxy.proc.stop(Duration::from_secs(3));
        Ok::<_, String>((rows, leases))
    })();
    drop(switch);
    allocator.stop(Duration::from_secs(5));
    if let Some(out) = &o.out {
        demo::keep_files(dir.path(), out)?;
    }
    let (rows, leases) = result?;
    Ok(report(o, rows, &leases))
}

/// [`attack_kept`] for every hop setting of `o` on what a run kept in `dir`, with the address
/// tests: the report [`run`] made, from its files alone.
pub fn reanalyse(dir: &Path, o: &Options) -> Result<Report, String> {
    let mut rows = Vec::new();
    let mut leases = Vec::new();
    let settings = (o.hops.iter().map(|h| (Mode::Tunnel, h)))
        .chain(o.direct_hops.iter().map(|h| (Mode::Direct, h)));
    for (mode, hop) in settings {
        let (row, l) = attack_kept(dir, mode, hop, o)?;
        rows.push(row);
        leases.extend(l);
    }
    Ok(report(o, rows, &leases))
}

/// The report of `rows`, with the address tests over `leases`.
fn report(o: &Options, rows: Vec<Row>, leases: &[Lease]) -> Report {
    let tested = uniformity(leases);
    Report {
        sites: o.sites,
        pad: o.pad,
        keep_congestion: o.keep_congestion,
        hop_idle_max_ms: o.hop_idle_max_ms,
        visits: o.visits,
        clients: o.clients,
        rows,
        uniformity: tested.as_ref().ok().cloned(),
        uniformity_skipped: tested.err(),
    }
}

/// One hop setting: agents started, visits made while the outside link is recorded, agents
/// stopped, the capture attacked. Returns the row and the setting's leases. In direct mode the
/// agents only hold the clients' addresses (their tunnels never hop and carry nothing).
fn run_setting(
    tb: &mut Testbed,
    dir: &Path,
    sites: &[sites::Site],
    mode: Mode,
    hop: &HopStrategyConfig,
    o: &Options,
) -> Result<(Row, Vec<Lease>), String> {
    let file_label = mode.file_label(hop);
    let clients = &CLIENTS[..o.clients];
    let agent_hop = match mode {
        Mode::Tunnel => hop.clone(),
        Mode::Direct => HopStrategyConfig::Never {},
    };
    let hop_table = toml::to_string(&agent_hop).map_err(|e| e.to_string())?;
    let mut agents = Vec::new();
    for (i, client) in clients.iter().enumerate() {
        let keys = dir.join(format!("{client}-keys-{file_label}.log"));
        let extra = format!(
            "keylog_file = \"{}\"\npad_to_bytes = {}\nhop_idle_max_ms = {}\n",
            keys.display(),
            o.pad,
            o.hop_idle_max_ms
        );
        let (agent, _) =
            demo::start_agent_hopping(tb, dir, client, o.seed + i as u64, &hop_table, &extra)?;
        agents.push(agent);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let server = mode.server();
    let pcap = dir.join(format!("outside-{file_label}.pcap"));
    let recording = capture::record_pcap(
        tb,
        "out",
        "eth0",
        Arc::clone(&stop),
        &pcap,
        None,
        move |f| tunnel_datagram(f, server).is_some(),
    )
    .map_err(|e| e.to_string())?;

    // Every (site, visit) once, shuffled, dealt round-robin to the clients.
    let mut rng = HopRng::new(o.seed ^ 0x7669_7369_7473);
    let mut plan: Vec<(u32, u64)> = (0..sites.len() as u32)
        .flat_map(|s| (0..o.visits as u64).map(move |v| (s, v)))
        .collect();
    for i in (1..plan.len()).rev() {
        plan.swap(i, rng.index(i + 1));
    }
    let mut handles = Vec::new();
    for (c, client) in clients.iter().enumerate() {
        let mine: Vec<(u32, Vec<u32>, u64, u64)> = (plan.iter().skip(c).step_by(clients.len()))
            .map(|&(s, v)| {
                let objects = sites[s as usize].visit(o.seed ^ (u64::from(s) << 32) ^ v);
                (s, objects, rng.range_inclusive(200, 600), v)
            })
            .collect();
        let web: SocketAddr = WEB.parse().map_err(|e| format!("{e}"))?;
        let (hop, seed) = (hop.clone(), o.seed);
        handles.push(
            tb.spawn_in(client, move || {
                let mut done = Vec::new();
                let mut errors = Vec::new();
                for (site, objects, pause_ms, v) in mine {
                    std::thread::sleep(Duration::from_millis(pause_ms));
                    let start = unix_now();
                    let loaded = match mode {
                        Mode::Tunnel => {
                            web::visit(web, &objects, Duration::from_secs(10)).map(|_| 0)
                        }
                        Mode::Direct => {
                            let connection = u64::from(site) << 32 | v;
                            direct_visit(server, &objects, &hop, seed, connection)
                        }
                    };
                    match loaded {
                        Ok(hops) => done.push(Visit {
                            client: c,
                            site,
                            start,
                            end: unix_now(),
                            hops,
                        }),
                        Err(e) => errors.push(format!("{}: site {site}: {e}", CLIENTS[c])),
                    }
                }
                (done, errors)
            })
            .map_err(|e| e.to_string())?,
        );
    }
    let mut visits = Vec::new();
    let mut visit_errors = Vec::new();
    for h in handles {
        let (done, errors) = h
            .join()
            .map_err(|_| "a visiting thread panicked".to_string())?
            .map_err(|e| e.to_string())?;
        visits.extend(done);
        visit_errors.extend(errors);
    }
    for (client, agent) in clients.iter().zip(agents.iter_mut()) {
        stop_client(agent).map_err(|e| format!("{client}: {e}"))?;
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    recording
        .join()
        .map_err(|_| "the capture thread panicked".to_string())?
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("capture: {e}"))?;
    // The next setting's agents start new logs: keep these beside the capture.
    for client in clients {
        for log in ["addresses", "hops"] {
            let from = dir.join(format!("{client}-{log}.csv"));
            let to = dir.join(format!("{client}-{log}-{file_label}.csv"));
            std::fs::rename(&from, &to).map_err(|e| format!("{}: {e}", from.display()))?;
        }
    }
    let lines: String = (visits.iter())
        .map(|v| {
            format!(
                "{},{},{:.6},{:.6},{}\n",
                CLIENTS[v.client], v.site, v.start, v.end, v.hops
            )
        })
        .collect();
    let path = dir.join(format!("visits-{file_label}.csv"));
    std::fs::write(&path, lines).map_err(|e| format!("{}: {e}", path.display()))?;
    if visits.is_empty() {
        return Err(format!(
            "every visit failed: {}",
            visit_errors.first().map_or("", String::as_str)
        ));
    }
    let (mut row, leases) = attack_kept(dir, mode, hop, o)?;
    row.visit_errors = visit_errors.len();
    row.first_error = visit_errors.first().cloned();
    Ok((row, leases))
}

/// Attacks again what a run kept in `dir` (with `--out`): for hop setting `hop`, the capture
/// `outside-<hop>.pcap`, the page loads `visits-<hop>.csv` and the agents'
/// `<client>-addresses-<hop>.csv` and `<client>-hops-<hop>.csv` (`<hop>` is `direct-<hop>` in
/// direct mode). For a change to the attacker without a new run of the testbed. Returns the row
/// and the setting's leases.
pub fn attack_kept(
    dir: &Path,
    mode: Mode,
    hop: &HopStrategyConfig,
    o: &Options,
) -> Result<(Row, Vec<Lease>), String> {
    let file_label = mode.file_label(hop);
    let clients = &CLIENTS[..o.clients];
    let read = |name: String| {
        let path = dir.join(name);
        std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))
    };
    let mut leases = Vec::new();
    let mut hops_done = 0;
    for client in clients {
        leases.extend(leases_from_log(
            client,
            &read(format!("{client}-addresses-{file_label}.csv"))?,
        )?);
        hops_done += (read(format!("{client}-hops-{file_label}.csv"))?.lines())
            .filter(|l| l.contains(",done,"))
            .count() as u64;
    }
    let mut visits = Vec::new();
    for (i, line) in read(format!("visits-{file_label}.csv"))?
        .lines()
        .enumerate()
    {
        let bad = || format!("visits-{file_label}.csv line {}: {line:?}", i + 1);
        let f: Vec<&str> = line.split(',').collect();
        // (Runs before direct mode wrote no hops column.)
        let (client, site, start, end, hops) = match f[..] {
            [client, site, start, end] => (client, site, start, end, "0"),
            [client, site, start, end, hops] => (client, site, start, end, hops),
            _ => return Err(bad()),
        };
        visits.push(Visit {
            client: clients.iter().position(|c| *c == client).ok_or_else(bad)?,
            site: site.parse().map_err(|_| bad())?,
            start: start.parse().map_err(|_| bad())?,
            end: end.parse().map_err(|_| bad())?,
            hops: hops.parse().map_err(|_| bad())?,
        });
    }
    if mode == Mode::Direct {
        hops_done = visits.iter().map(|v| v.hops).sum();
    }
    let frames = capture::read_pcap(&dir.join(format!("outside-{file_label}.pcap")))?;
    let analysis = analyse(&frames, mode.server(), &visits, &leases, clients, o)?;
    let row = Row {
        mode,
        interval: match *hop {
            HopStrategyConfig::EveryPackets { packets } => Some(packets as f64),
            HopStrategyConfig::RandomPackets {
                min_packets,
                max_packets,
            } => Some((min_packets + max_packets) as f64 / 2.0),
            _ => None,
        },
        hop: hop.to_string(),
        visits: visits.len(),
        visit_errors: 0,
        first_error: None,
        hops_done,
        analysis,
    };
    Ok((row, leases))
}

/// The attacker's work on one capture (`visits` and `leases` only label the sub-flows).
pub fn analyse(
    frames: &[Frame],
    proxy: SocketAddr,
    visits: &[Visit],
    leases: &[Lease],
    clients: &[&str],
    o: &Options,
) -> Result<Analysis, String> {
    let mut a = Analysis::default();
    let mut watch = HopWatch::new(proxy);
    // The tunnel packets: (time, client address, direction, IP bytes).
    let mut packets = Vec::new();
    for f in frames {
        match tunnel_datagram(&f.bytes, proxy) {
            None => a.skipped_frames += 1,
            Some(Err(())) => a.not_quic += 1,
            Some(Ok((client, dir, size))) => {
                watch.frame(&f.bytes);
                packets.push((f.at.as_secs_f64(), client, dir, size));
            }
        }
    }
    a.packets = packets.len() as u64;
    a.cid_linked = watch.check(leases, TIMES.2, 200).cids_from_two_addresses;

    // Who held each address when, and each client's visits in time order.
    let mut held: HashMap<IpAddr, Vec<(f64, f64, usize)>> = HashMap::new();
    for l in leases {
        if let Some(c) = clients.iter().position(|c| *c == l.client) {
            let until = (l.until_ms + TIMES.2) as f64 / 1e3;
            held.entry(l.addr)
                .or_default()
                .push((l.from_ms as f64 / 1e3 - 0.5, until, c));
        }
    }
    let owner = |addr: &IpAddr, t: f64| {
        held.get(addr)
            .and_then(|v| v.iter().find(|(from, to, _)| (*from..=*to).contains(&t)))
            .map(|&(_, _, c)| c)
    };
    let mut by_client: Vec<Vec<(usize, &Visit)>> = vec![Vec::new(); clients.len()];
    for (i, v) in visits.iter().enumerate() {
        if let Some(list) = by_client.get_mut(v.client) {
            list.push((i, v));
        }
    }
    for list in &mut by_client {
        list.sort_by(|x, y| x.1.start.total_cmp(&y.1.start));
    }

    // Fingerprinting: sub-flows by (address, page load).
    let mut subflows: HashMap<(IpAddr, usize), Vec<Packet>> = HashMap::new();
    // Linkage: sub-flows by address, split where it is quiet.
    // (In address order, so that the linkage attacker's input, and its ties, repeat exactly.)
    let mut by_addr: BTreeMap<IpAddr, Vec<(f64, u32, Option<usize>)>> = BTreeMap::new();
    for &(at, client_addr, dir, size) in &packets {
        let who = owner(&client_addr, at);
        by_addr
            .entry(client_addr)
            .or_default()
            .push((at, size, who));
        let Some(c) = who else {
            a.unowned += 1;
            continue;
        };
        let list = &by_client[c];
        // The last visit that began (with a little slack for the first SYN) before `at`.
        let i = list.partition_point(|(_, v)| v.start - 0.05 <= at);
        match i.checked_sub(1).map(|i| list[i]) {
            Some((vi, v)) if at <= v.end + 0.25 => subflows
                .entry((client_addr, vi))
                .or_default()
                .push(Packet { at, size, dir }),
            _ => a.between_visits += 1,
        }
    }
    let mut keys: Vec<_> = subflows.keys().copied().collect();
    keys.sort();
    let x: Vec<Vec<f64>> = keys
        .iter()
        .map(|k| features::features(&subflows[k]))
        .collect();
    let y: Vec<u32> = keys.iter().map(|k| visits[k.1].site).collect();
    a.subflows = keys.len();
    a.packets_per_subflow = if keys.is_empty() {
        0.0
    } else {
        subflows.values().map(Vec::len).sum::<usize>() as f64 / keys.len() as f64
    };
    let acc = classify::cross_validate(&x, &y, o.folds, o.trees, o.seed)?;
    a.accuracy = acc.accuracy;
    a.chance = acc.chance;
    a.folds = acc.folds;

    let mut flows = Vec::new();
    let mut owners = Vec::new();
    for list in by_addr.values() {
        for run in list.chunk_by(|p, q| q.0 - p.0 <= LINK_IDLE_S) {
            if let Some(c) = run[0].2 {
                flows.push(linkage::SubFlow {
                    first: run[0].0,
                    last: run[run.len() - 1].0,
                    packets: run.len() as u64,
                    bytes: run.iter().map(|p| u64::from(p.1)).sum(),
                });
                owners.push(c as u32);
            }
        }
    }
    let links = linkage::link(&flows, LINK_GAP_S);
    let s = linkage::score(&flows, &owners, &links);
    a.linkage = LinkageFigures {
        flows: flows.len(),
        predicted: s.predicted,
        correct: s.correct,
        true_links: s.true_links,
        precision: s.precision,
        recall: s.recall,
    };
    Ok(a)
}

/// A frame's tunnel datagram: `None` if it is not UDP to or from `proxy` over IP (or is cut
/// short), `Some(Err)` if it is but is not QUIC (RFC 9000 §17: the fixed bit 0x40 of the first
/// byte is set in every QUIC v1 packet), else the client's address, the direction and the IP
/// packet's length.
fn tunnel_datagram(frame: &[u8], proxy: SocketAddr) -> Option<Result<(IpAddr, Dir, u32), ()>> {
    let p = SlicedPacket::from_ethernet(frame).ok()?;
    let (src, dst, ip_len): (IpAddr, IpAddr, usize) = match p.net? {
        NetSlice::Ipv4(ip) => {
            let h = ip.header();
            (
                h.source_addr().into(),
                h.destination_addr().into(),
                usize::from(h.total_len()),
            )
        }
        NetSlice::Ipv6(ip) => {
            let h = ip.header();
            (
                h.source_addr().into(),
                h.destination_addr().into(),
                40 + usize::from(h.payload_length()),
            )
        }
        _ => return None,
    };
    let TransportSlice::Udp(udp) = p.transport? else {
        return None;
    };
    let (client, dir) = if SocketAddr::new(dst, udp.destination_port()) == proxy {
        (src, Dir::Out)
    } else if SocketAddr::new(src, udp.source_port()) == proxy {
        (dst, Dir::In)
    } else {
        return None;
    };
    let quic = udp.payload().first().is_some_and(|b| b & 0x40 != 0);
    Some(if quic {
        Ok((client, dir, ip_len as u32))
    } else {
        Err(())
    })
}

/// Chi-square and next-address prediction over the allocations in `leases` (IPv4 in the /24
/// pool, usable hosts .2–.254: the gateway .1 is reserved).
fn uniformity(leases: &[Lease]) -> Result<Uniformity, String> {
    let mut allocations: Vec<(u64, u64)> = (leases.iter())
        .filter_map(|l| match l.addr {
            IpAddr::V4(a) if a.octets()[3] >= 2 && a.octets()[3] <= 254 => {
                Some((l.from_ms, u64::from(a.octets()[3])))
            }
            _ => None,
        })
        .collect();
    // In time order, and within one allocation (a set's addresses share its time) in the order
    // the allocator granted them, as the log has them: sorting those by address too made small
    // positive steps common, which the next-address test took for a pattern.
    allocations.sort_by_key(|&(at, _)| at);
    let mut bins = [0u64; 11];
    for &(_, host) in &allocations {
        bins[((host - 2) / 23) as usize] += 1;
    }
    let chi = stats::chi_square_uniform(&bins)?;
    let seq: Vec<u64> = allocations.iter().map(|&(_, h)| h).collect();
    let next = stats::next_address_prediction(&seq, 256)?;
    Ok(Uniformity {
        allocations: allocations.len(),
        chi_square: chi.statistic,
        dof: chi.dof,
        p_value: chi.p_value,
        next_hit_rate: next.hit_rate,
        next_expected_best: next.expected_best,
        next_best_lag: next.best_lag,
        next_chance: next.chance,
    })
}

/// One page load in direct mode, from a thread in the client's namespace: a QUIC connection
/// from the pool addresses the host holds now (the agent's, shuffled: the first is where it
/// starts) to `server`, the objects fetched one after the other over HTTP/3 while it hops as
/// `hop` says (its stream `connection` of `seed`), then closed. Returns the hops it completed.
fn direct_visit(
    server: SocketAddr,
    objects: &[u32],
    hop: &HopStrategyConfig,
    seed: u64,
    connection: u64,
) -> Result<u64, String> {
    let pool: std::net::Ipv4Addr = (addr::POOL_V4.split('/').next())
        .and_then(|a| a.parse().ok())
        .ok_or("the client pool is not an IPv4 prefix")?;
    // The pool is a /24.
    let in_pool =
        |ip: &IpAddr| matches!(ip, IpAddr::V4(a) if a.octets()[..3] == pool.octets()[..3]);
    let mut locals: Vec<SocketAddr> = (own_addresses().into_iter())
        .filter(in_pool)
        .map(|ip| SocketAddr::new(ip, 0))
        .collect();
    if locals.is_empty() {
        return Err("no address of the pool on the host".into());
    }
    let mut rng = HopRng::new(seed ^ connection.rotate_left(17));
    for i in (1..locals.len()).rev() {
        locals.swap(i, rng.index(i + 1));
    }
    let mut quic = client_config(locals.len()).map_err(|e| e.to_string())?;
    let config = DirectConfig {
        strategy: hop.clone(),
        seed: seed.into(),
        connection,
        migration: MigrationConfig::default(),
    };
    let mut direct =
        DirectConnection::connect(&locals, server, Some("quic.tech"), &mut quic, &config)
            .map_err(|e| e.to_string())?;
    let sizes: Vec<u64> = objects.iter().map(|&o| u64::from(o)).collect();
    let loaded = run_gets(&mut direct, "quic.tech", &sizes, Duration::from_secs(10));
    let hops = direct.migration_stats().hops_completed;
    let _ = direct.connection_mut().close(true, 0, b"page loaded");
    let _ = direct.poll(Duration::ZERO);
    loaded.map(|_| hops).map_err(|e| e.to_string())
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// The `--json` summary: unhopped accuracy, accuracy at a hop every 25 packets, and that
/// setting's linkage figures (else the first hopping setting's), connection IDs linked.
pub fn summary(r: &Report) -> serde_json::Value {
    let find = |m: Mode, h: &str| r.rows.iter().find(|row| row.mode == m && row.hop == h);
    let accuracy = |m: Mode, h: &str| find(m, h).map(|row| row.analysis.accuracy);
    let hopped = find(Mode::Tunnel, "every:25")
        .or_else(|| (r.rows.iter()).find(|row| row.mode == Mode::Tunnel && row.hop != "never"));
    serde_json::json!({
        "wf_accuracy_unhopped": accuracy(Mode::Tunnel, "never"),
        "wf_accuracy_hop25": accuracy(Mode::Tunnel, "every:25"),
        "linkage_precision": hopped.map(|row| row.analysis.linkage.precision),
        "linkage_recall": hopped.map(|row| row.analysis.linkage.recall),
        "cid_linked": r.rows.iter().map(|row| row.analysis.cid_linked).sum::<usize>(),
        "address_chi_square_p": r.uniformity.as_ref().map(|u| u.p_value),
        "direct_wf_accuracy_unhopped": accuracy(Mode::Direct, "never"),
        "direct_wf_accuracy_hop25": accuracy(Mode::Direct, "every:25"),
    })
}

/// The table of a report, as Markdown.
pub fn markdown(r: &Report) -> String {
    let mut md = format!(
        "Website fingerprinting and linkage on the outside link: {} sites × {} visits, {} clients, padding {}, congestion state {} on a hop, idle before a hop {}.\n\n\
         | mode | hop | packets per address | visits (failed) | hops | sub-flows | packets per sub-flow | accuracy | chance | linkage precision | linkage recall | CIDs linked |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        r.sites,
        r.visits,
        r.clients,
        if r.pad == 0 {
            "none".to_string()
        } else {
            format!("to multiples of {} bytes", r.pad)
        },
        if r.keep_congestion { "kept" } else { "reset" },
        if r.hop_idle_max_ms == 0 {
            "none".to_string()
        } else {
            format!("0–{} ms", r.hop_idle_max_ms)
        }
    );
    for row in &r.rows {
        let a = &row.analysis;
        md += &format!(
            "| {:?} | {} | {} | {} ({}) | {} | {} | {:.1} | {:.3} | {:.3} | {:.3} | {:.3} | {} |\n",
            row.mode,
            row.hop,
            row.interval.map_or("—".into(), |i| format!("{i:.1}")),
            row.visits,
            row.visit_errors,
            row.hops_done,
            a.subflows,
            a.packets_per_subflow,
            a.accuracy,
            a.chance,
            a.linkage.precision,
            a.linkage.recall,
            a.cid_linked
        );
    }
    if let Some(why) = &r.uniformity_skipped {
        md += &format!("\nAddresses: not tested ({why}).\n");
    }
    if let Some(u) = &r.uniformity {
        md += &format!(
            "\nAddresses: {} allocations, chi-square {:.1} ({} dof), p = {:.3}; next address as previous + d: best hit rate {:.4} at d = {} (best-of-256 on a uniform sequence {:.4}, chance {:.4}).\n",
            u.allocations, u.chi_square, u.dof, u.p_value, u.next_hit_rate, u.next_best_lag, u.next_expected_best, u.next_chance
        );
    }
    md
}

/// Accuracy against packets per address, as an SVG (unhopped as a dashed reference line).
pub fn svg(r: &Report) -> Result<String, String> {
    use crate::plot::{Panel, Series};
    let points = |mode: Mode| {
        let mut p: Vec<(f64, f64)> = (r.rows.iter())
            .filter(|row| row.mode == mode)
            .filter_map(|row| row.interval.map(|i| (i, row.analysis.accuracy)))
            .collect();
        p.sort_by(|a, b| a.0.total_cmp(&b.0));
        p
    };
    let mut series = vec![Series {
        name: "hopping (tunnel)".into(),
        points: points(Mode::Tunnel),
    }];
    let direct = points(Mode::Direct);
    let base = (r.rows.iter()).find(|row| row.mode == Mode::Tunnel && row.hop == "never");
    if !direct.is_empty() {
        series.push(Series {
            name: "hopping (direct)".into(),
            points: direct,
        });
    }
    if let Some(base) = base {
        let xs: Vec<f64> = series[0].points.iter().map(|p| p.0).collect();
        let (lo, hi) = (
            xs.iter().copied().fold(f64::MAX, f64::min),
            xs.iter().copied().fold(0.0, f64::max),
        );
        if hi > 0.0 {
            series.push(Series {
                name: "no hopping".into(),
                points: vec![(lo, base.analysis.accuracy), (hi, base.analysis.accuracy)],
            });
        }
    }
    crate::plot::svg(
        800,
        500,
        vec![Panel::new(
            "Website fingerprinting per sub-flow (closed world)",
            "packets the client sends per address",
            "accuracy",
            series,
        )],
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::PacketBuilder;

    const PROXY_ADDR: &str = "198.18.200.2:4433";

    /// A UDP frame between `client` and the proxy with `payload`.
    fn udp(client: [u8; 4], to_proxy: bool, port: u16, payload: &[u8], at: f64) -> Frame {
        let proxy = [198, 18, 200, 2];
        let b = PacketBuilder::ethernet2([1; 6], [2; 6]);
        let b = if to_proxy {
            b.ipv4(client, proxy, 64).udp(50_000, port)
        } else {
            b.ipv4(proxy, client, 64).udp(port, 50_000)
        };
        let mut bytes = Vec::new();
        b.write(&mut bytes, payload).unwrap();
        Frame {
            at: Duration::from_secs_f64(at),
            bytes,
        }
    }

    #[test]
    fn a_capture_is_split_by_address_and_page_load_and_what_is_not_a_tunnel_packet_is_counted() {
        let client = [198, 18, 1, 7];
        let lease = Lease {
            client: "c1".into(),
            addr: IpAddr::from(client),
            from_ms: 0,
            until_ms: 1_000_000,
        };
        // Six page loads of two sites, one second apart, three QUIC packets each.
        let visits: Vec<Visit> = (0..6)
            .map(|i| Visit {
                client: 0,
                site: i % 2,
                start: 100.0 + f64::from(i),
                end: 100.5 + f64::from(i),
                hops: 0,
            })
            .collect();
        let mut frames = Vec::new();
        for v in &visits {
            let size = 100 + 900 * v.site as usize;
            frames.push(udp(client, true, 4433, &[0x40; 60], v.start + 0.1));
            frames.push(udp(client, false, 4433, &vec![0x41; size], v.start + 0.2));
            frames.push(udp(client, false, 4433, &vec![0x41; size], v.start + 0.3));
        }
        // Between two page loads; from an address no client held; not QUIC (fixed bit clear);
        // another port; cut short.
        frames.push(udp(client, true, 4433, &[0x40; 40], 100.8));
        let mut other_cid = [0x40; 40];
        other_cid[1..].fill(0x99);
        frames.push(udp([198, 18, 1, 99], true, 4433, &other_cid, 100.2));
        frames.push(udp(client, true, 4433, &[0x00; 40], 101.2));
        frames.push(udp(client, true, 53, &[0x40; 40], 101.2));
        let mut cut = udp(client, true, 4433, &[0x40; 40], 101.2);
        cut.bytes.truncate(20);
        frames.push(cut);
        let o = Options {
            folds: 2,
            trees: 5,
            ..Options::quick()
        };
        let a = analyse(
            &frames,
            PROXY_ADDR.parse().unwrap(),
            &visits,
            &[lease],
            &["c1"],
            &o,
        )
        .unwrap();
        assert_eq!(a.packets, 20, "18 in page loads, one between, one unowned");
        assert_eq!(a.skipped_frames, 2, "another port, and a frame cut short");
        assert_eq!(a.not_quic, 1);
        assert_eq!(a.unowned, 1);
        assert_eq!(a.between_visits, 1);
        assert_eq!(a.subflows, 6);
        assert_eq!(a.packets_per_subflow, 3.0);
        assert_eq!(a.cid_linked, 0);
        assert_eq!(a.chance, 0.5);
        // Two sites whose answers differ by 900 bytes a packet: no fold gets one wrong.
        assert_eq!(a.accuracy, 1.0, "{a:?}");
        // One address throughout, quiet for under a second between loads: one flow, no links.
        assert_eq!((a.linkage.flows, a.linkage.true_links), (1, 0));

        // Nothing to classify is an error, not a panic.
        let none = analyse(&[], PROXY_ADDR.parse().unwrap(), &visits, &[], &["c1"], &o);
        assert!(none.is_err());
    }

    #[test]
    fn the_addresses_of_one_allocation_are_tested_in_the_order_granted() {
        // Three addresses granted at once, in the order .200, .100, .50: two steps of −100
        // (156 modulo 256), the best lag. Sorted by address they would be steps of +50 and
        // +100: small positive steps, which sorting makes common.
        let lease = |host: u8| Lease {
            client: "c1".into(),
            addr: IpAddr::from([198, 18, 1, host]),
            from_ms: 1_000,
            until_ms: 30_000,
        };
        let u = uniformity(&[lease(200), lease(100), lease(50)]).unwrap();
        assert_eq!((u.allocations, u.next_best_lag), (3, 156), "{u:?}");
    }

    #[test]
    fn too_few_allocations_to_test_are_said_in_the_report() {
        let r = report(&Options::quick(), Vec::new(), &[]);
        assert!(r.uniformity.is_none());
        assert!(r.uniformity_skipped.is_some());
        let md = markdown(&r);
        assert!(md.contains("Addresses: not tested ("), "{md}");
    }
}
