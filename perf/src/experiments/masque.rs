//! The MASQUE proxy's cost (issue 6), on the testbed of [`crate::masque`]
//! (c — p — s, `mimiq-proxy run` on p, `mimiq-proxy client` on c), with the kernel's own IP
//! forwarding between the same three namespaces as the baseline of the same run.
//!
//! - **RQ1, overhead per packet**, read from real packets: an AF_PACKET capture on the
//!   client–proxy link (c0) and on the proxy–server link (s0) at the same time, while pings of a
//!   known size (CONNECT-IP) or UDP payloads of a known size echoed by the target (CONNECT-UDP)
//!   cross the tunnel one at a time. Overhead is the outer packet on c0 minus the inner packet on
//!   s0, for both directions. Next to it: the largest inner packet, the client's TUN MTU (`ping
//!   -M do` at the MTU and one byte over it; for CONNECT-UDP an echo at the MTU and one byte
//!   over), and the proxy's formula (`mimiq_masque::quic::tunnel_mtu`).
//! - **RQ2, goodput, packets per second and CPU**: iperf3 TCP (bulk) and iperf3 UDP with 64-byte
//!   payloads through CONNECT-IP, IPv4 and IPv6; a UDP blaster on c into the CONNECT-UDP client's
//!   local port with a sink behind the proxy, 64-byte and 1200-byte payloads. The proxy's CPU
//!   time is its own (utime + stime from `/proc/<pid>/stat`, all threads) before and after each
//!   run, divided by the inner payload the receiver got, so the figure holds whatever else shares
//!   the machine. The proxy's throughput is given as a ratio to the kernel's.
//! - **Whose CPU a receive is**: veth by default runs the receiving host's stack in the sender's
//!   context, so a TUN write on p is charged for s's TCP receive. TCP bulk is measured that way
//!   ([`PeerRx::InSenderContext`]) and with threaded NAPI on every veth end
//!   ([`PeerRx::ThreadedNapi`]), where each host receives in its own kthread, and once more with
//!   a NIC's segmentation and checksum offloads on top ([`PeerRx::NicOffloads`]); the other runs
//!   use threaded NAPI only. There p's kthreads (its receive, and for the baseline its whole
//!   forwarding) are counted beside the proxy process, and the target is judged on the sum.
//!
//! Threading: blocking; the captures, the blaster and the sinks are threads that joined a host's
//! namespace. Panics: none; every failure is an error string naming what failed.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::capture::{record_frames, Frame};
use crate::masque::{self, addr, start_client, start_ip_client, stop_client, ProxyProc};
use crate::testbed::{LinkOpts, Proc, Testbed};
use crate::traffic::iperf3_with;

/// The client's largest UDP payload (`mimiq-proxy client --max-udp-payload`, default 1452).
pub const MAX_UDP_PAYLOAD_BYTES: usize = 1452;

/// The proxy's port on p.
const PROXY_PORT: u16 = 4433;
/// The CONNECT-UDP target that echoes (RQ1) and the one that sinks (RQ2), on s.
const ECHO_PORT: u16 = 7007;
const SINK_PORT: u16 = 7009;

/// `mimiq_masque::quic::tunnel_mtu`, written out here (mimiq-perf does not link the proxy): the
/// UDP payload minus the QUIC short header at its largest (1 + 20-byte CID + 4-byte packet
/// number), the AEAD tag (16), the DATAGRAM frame header (1 + 2-byte length) and the HTTP
/// datagram header at its largest (8 + 1).
pub fn tunnel_mtu_formula(max_udp_payload: usize) -> usize {
    max_udp_payload.saturating_sub(FORMULA_OVERHEAD_BYTES)
}

/// What [`tunnel_mtu_formula`] subtracts: the worst case of the QUIC + HTTP/3 datagram framing.
pub const FORMULA_OVERHEAD_BYTES: usize = (1 + 20 + 4) + 16 + 3 + 9;

/// Which tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Proto {
    /// RFC 9484: inner IP packets.
    ConnectIp,
    /// RFC 9298: inner UDP payloads.
    ConnectUdp,
}

/// Which way through the tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Client → proxy → server.
    Up,
    /// Server → proxy → client.
    Down,
}

/// The inner (tunnelled) address family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

/// RQ1: one inner size, one direction, from the two captures.
#[derive(Debug, Clone, Serialize)]
pub struct Overhead {
    /// The tunnel.
    pub proto: Proto,
    /// Inner family (the outer packets are IPv4 + UDP: the proxy listens on IPv4).
    pub family: Family,
    /// Direction.
    pub direction: Direction,
    /// The inner packet: IP total length (CONNECT-IP) or UDP payload (CONNECT-UDP), bytes.
    pub inner_len_bytes: usize,
    /// Inner packets of that size seen on s0.
    pub inner_packets: usize,
    /// Outer QUIC packets large enough to carry one seen on c0.
    pub outer_packets: usize,
    /// Median of outer IP total length − inner length, bytes (what the link carries more).
    pub outer_ip_minus_inner_bytes: usize,
    /// Outer UDP payload − inner length: the QUIC + HTTP/3 framing; median, min, max.
    pub framing_median_bytes: usize,
    /// Smallest framing seen.
    pub framing_min_bytes: usize,
    /// Largest framing seen (an ACK frame riding along makes it larger).
    pub framing_max_bytes: usize,
}

/// RQ1: the largest inner packet that fits.
#[derive(Debug, Clone, Serialize)]
pub struct MtuCheck {
    /// The tunnel.
    pub proto: Proto,
    /// Inner family.
    pub family: Family,
    /// The MTU the client reported (`ready ... mtu=`), bytes: the TUN MTU for CONNECT-IP, the
    /// largest UDP payload for CONNECT-UDP.
    pub client_mtu_bytes: usize,
    /// [`tunnel_mtu_formula`] of [`MAX_UDP_PAYLOAD_BYTES`].
    pub formula_mtu_bytes: usize,
    /// An inner packet of exactly the MTU went through and came back.
    pub at_mtu_ok: bool,
    /// One byte more did not (refused locally or dropped).
    pub above_mtu_refused: bool,
    /// CONNECT-UDP: the largest payload that was echoed, found by bisection up to the UDP
    /// payload limit (the client does not stop at its MTU). CONNECT-IP: the TUN refuses
    /// anything larger than its MTU locally, so there is nothing to search.
    pub largest_passing_bytes: Option<usize>,
    /// The commands run.
    pub commands: Vec<String>,
}

/// Which path the traffic took.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Path {
    /// p's kernel routing c0 ↔ p1 (ip_forward=1), no tunnel.
    KernelForwarding,
    /// Through `mimiq-proxy client ip` and the proxy's TUN device.
    ConnectIp,
    /// Through `mimiq-proxy client udp` and the proxy's target socket.
    ConnectUdp,
}

/// How the receiving end of each veth processes a packet, which decides whose CPU time the
/// receive is charged to. Both testbeds (tunnel and kernel baseline) are set the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PeerRx {
    /// veth's default: no NAPI on the receiving peer. `veth_xmit` queues the packet on the
    /// peer's backlog and the softirq runs when the sender re-enables bottom halves, in the
    /// sender's context: a TUN write on p carries p's forwarding *and* s's whole TCP receive,
    /// charged to the proxy; the client's `sendmmsg` carries p's UDP receive, charged to the
    /// client.
    InSenderContext,
    /// NAPI on every veth end (c0, p0, p1, s0: `ethtool -K <dev> gro on`), threaded
    /// (`echo 1 > /sys/class/net/<dev>/threaded`): each host's receive runs in its own
    /// `napi/<dev>-<id>` kthread, so a sender is charged for its own transmit only. p's
    /// kthreads (p0, p1) are p's receive and forwarding, counted beside the proxy process.
    ThreadedNapi,
    /// [`PeerRx::ThreadedNapi`] plus a NIC's segmentation and checksum offloads on every veth
    /// end (`ethtool -K <dev> tso on gso on tx on`): a GSO packet (the proxy's TUN write, the
    /// client's UDP GSO send, the kernel baseline's GRO) leaves p1 or c0 whole, as it would
    /// through a NIC with TSO, instead of being segmented in software on the way out.
    NicOffloads,
}

impl PeerRx {
    /// Whether the receive runs in NAPI kthreads (counted beside the process).
    fn threaded(self) -> bool {
        self != PeerRx::InSenderContext
    }
}

/// The veth ends [`PeerRx`] switches, host and device.
const VETH_ENDS: [(&str, &str); 4] = [("c", "c0"), ("p", "p0"), ("p", "p1"), ("s", "s0")];

/// The NAPI kthreads of one testbed under [`PeerRx::ThreadedNapi`]: p's and the others'.
#[derive(Debug, Default, Clone)]
struct NapiThreads {
    /// p0's and p1's: the proxy host's receive (kernel baseline: its forwarding).
    proxy_host: Vec<u32>,
    /// c0's and s0's: the client's and the server's receive.
    peers: Vec<u32>,
}

/// What kind of traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Traffic {
    /// iperf3 TCP, one stream, c → s (uploads: client → QUIC → proxy → TUN).
    TcpBulk,
    /// iperf3 TCP, one stream, s → c (`-R`; downloads: TUN → proxy → QUIC → client).
    TcpBulkDown,
    /// iperf3 UDP, 64-byte payloads, unlimited rate (`-u -b 0 -l 64`).
    Iperf3Udp64,
    /// The experiment's blaster: 64-byte UDP payloads as fast as one thread sends.
    Blast64,
    /// The blaster with 1200-byte payloads.
    Blast1200,
}

/// RQ2: one run.
#[derive(Debug, Clone, Serialize)]
pub struct Throughput {
    /// Path.
    pub path: Path,
    /// How the veth ends received (whose CPU a receive is charged to).
    pub peer_rx: PeerRx,
    /// Traffic.
    pub traffic: Traffic,
    /// Inner family.
    pub family: Family,
    /// Seconds of traffic.
    pub seconds: f64,
    /// Inner payload the receiver got (TCP or UDP payload), bytes.
    pub payload_bytes: u64,
    /// Goodput, Mbit/s of inner payload.
    pub goodput_mbps: f64,
    /// Inner packets the receiver got per second (TCP: the proxy's TUN writes).
    pub delivered_pps: f64,
    /// Packets sent that never arrived, percent (UDP only).
    pub loss_percent: Option<f64>,
    /// Inner packets the proxy forwarded, both directions (from its counters).
    pub proxy_packets: Option<u64>,
    /// The proxy's CPU time over the run (user + system, all threads), seconds.
    pub proxy_cpu_s: Option<f64>,
    /// Proxy CPU seconds per GB (10⁹ bytes) of inner payload delivered.
    pub proxy_cpu_s_per_gb: Option<f64>,
    /// The user-space part of it (utime alone): the proxy's own code, quiche and the crypto.
    /// The rest is system time: its syscalls, p's forwarding of what it writes to the TUN
    /// device and, under [`PeerRx::InSenderContext`], the server's and the client's receive of
    /// what it sends.
    pub proxy_user_cpu_s_per_gb: Option<f64>,
    /// [`PeerRx::ThreadedNapi`]: CPU seconds per GB of p's NAPI kthreads (p0, p1): through the
    /// tunnel the proxy host's receive of QUIC packets and TCP ACKs; for the kernel baseline its
    /// whole forwarding.
    pub proxy_host_napi_cpu_s_per_gb: Option<f64>,
    /// [`PeerRx::ThreadedNapi`]: the client's and server's NAPI kthreads (c0, s0), the receive
    /// work that [`PeerRx::InSenderContext`] charges to their senders.
    pub peers_napi_cpu_s_per_gb: Option<f64>,
    /// Proxy CPU per inner packet forwarded, µs.
    pub proxy_cpu_us_per_packet: Option<f64>,
    /// The client's CPU seconds per GB, for comparison (it encrypts what the proxy decrypts).
    pub client_cpu_s_per_gb: Option<f64>,
    /// QUIC datagrams the proxy received per pass of its loop (per wake-up): how much work each
    /// wake-up found.
    pub proxy_quic_rx_per_pass: Option<f64>,
    /// QUIC datagrams the proxy sent per pass.
    pub proxy_quic_tx_per_pass: Option<f64>,
    /// TCP runs: the sender's congestion control (iperf3's `sender_tcp_congestion`).
    pub tcp_congestion: Option<String>,
    /// Goodput over the kernel forwarding's for the same traffic and family.
    pub ratio_to_kernel: Option<f64>,
    /// [`PeerRx::ThreadedNapi`] tunnel runs: the proxy host's CPU per GB (the process and p's
    /// napi kthreads) over the kernel forwarding's (p's napi kthreads) in the run just before:
    /// what the tunnel costs the host against the kernel on the same machine, a figure that
    /// carries over between machines where CPU-s/GB does not.
    pub host_cpu_ratio_to_kernel: Option<f64>,
    /// The command that made the traffic (host: command).
    pub command: String,
    /// Tunnel runs: the proxy's workers (`workers` in its config).
    pub proxy_workers: Option<usize>,
    /// Tunnel runs: the proxy's datapath (`socket` or `xdp`).
    pub proxy_datapath: Option<String>,
}

/// Everything one `bench masque` measured.
#[derive(Debug, Clone, Serialize)]
pub struct Results {
    /// The client's `--max-udp-payload`.
    pub max_udp_payload_bytes: usize,
    /// What `tunnel_mtu` subtracts from it.
    pub formula_overhead_bytes: usize,
    /// RQ1.
    pub overhead: Vec<Overhead>,
    /// RQ1, the MTU.
    pub mtu: Vec<MtuCheck>,
    /// RQ2.
    pub throughput: Vec<Throughput>,
    /// Per CONNECT-IP proxy run (one per `Params::workers` value): how its datagrams reached
    /// its workers.
    pub steering: Vec<Steering>,
    /// The target for CONNECT-IP bulk, CPU-seconds per GB.
    pub target_cpu_s_per_gb: f64,
}

/// The target: at most 1.6 proxy CPU-seconds per GB of inner payload, CONNECT-IP bulk.
pub const TARGET_CPU_S_PER_GB: f64 = 1.6;

/// How one proxy's datagrams reached its workers over its CONNECT-IP runs (its counters at
/// the end).
#[derive(Debug, Clone, Serialize)]
pub struct Steering {
    /// The datapath.
    pub datapath: String,
    /// Workers.
    pub workers: usize,
    /// Short-header datagrams that reached a worker not owning their connection ID.
    pub misrouted: u64,
    /// Packets passed between workers (misrouted datagrams and TUN packets).
    pub handoffs: u64,
    /// Datagrams the SO_REUSEPORT program steered by connection ID.
    pub steered: u64,
}

/// What [`compare`] runs.
#[derive(Debug, Clone)]
pub struct Params {
    /// Seconds of traffic per throughput run.
    pub seconds: u32,
    /// Only CONNECT-IP TCP bulk under [`PeerRx::NicOffloads`] and [`PeerRx::ThreadedNapi`] (the
    /// runs the CPU target is judged on): no RQ1 captures, no CONNECT-UDP.
    pub bulk_only: bool,
    /// Times each TCP bulk run is repeated (each next to its own kernel run), to show the spread.
    pub repeat: u32,
    /// The end hosts' TCP congestion controls for the bulk runs (iperf3 `-C`), each run with
    /// every one of them; empty: the hosts' default alone. The proxy's cost per GB depends on
    /// it: a paced sender (BBR) spreads its packets, so fewer arrive per wake-up.
    pub congestion: Vec<String>,
    /// The proxy's worker counts: the CONNECT-IP runs are made with each (a proxy each); empty:
    /// the proxy's default (one per core).
    pub workers: Vec<usize>,
    /// The proxy's datapaths (`socket`, `xdp`), each with every worker count; the xdp one runs
    /// one worker per queue of the proxy's client-side veth, which gets as many queues as the
    /// largest worker count (the kernel's testbed too), so it runs with that count only.
    pub datapaths: Vec<String>,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            seconds: 10,
            bulk_only: false,
            repeat: 1,
            workers: Vec::new(),
            datapaths: vec!["socket".into()],
            congestion: DEFAULT_CONGESTION.iter().map(|&c| c.to_owned()).collect(),
        }
    }
}

/// [`Params::congestion`] by default: Linux's default and the paced one.
pub const DEFAULT_CONGESTION: [&str; 2] = ["cubic", "bbr"];

/// Checks that every congestion control in `names` is available to TCP on this machine.
fn check_congestion(names: &[String]) -> Result<(), String> {
    let path = "/proc/sys/net/ipv4/tcp_available_congestion_control";
    let have = std::fs::read_to_string(path).map_err(|e| format!("read {path}: {e}"))?;
    for n in names {
        if !have.split_whitespace().any(|h| h == n) {
            return Err(format!(
                "TCP congestion control {n:?} is not available here (have: {}); load its module or pick another",
                have.trim()
            ));
        }
    }
    Ok(())
}

/// Runs RQ1 and RQ2 as `params` say; returns the results and the Markdown report.
pub fn compare(
    params: &Params,
    progress: &mut dyn FnMut(&str),
) -> Result<(Results, String), String> {
    let seconds = params.seconds;
    check_congestion(&params.congestion)?;
    let ccs: Vec<Option<&str>> = if params.congestion.is_empty() {
        vec![None]
    } else {
        params.congestion.iter().map(|c| Some(c.as_str())).collect()
    };
    let mut throughput = Vec::new();
    // Both testbeds stay up side by side, and each tunnel run comes right after the kernel run
    // it is compared with, so the ratio holds while the machine's load drifts.
    let queues = params.workers.iter().copied().max().unwrap_or(1) as u32;
    let link = LinkOpts {
        queues,
        ..LinkOpts::default()
    };
    let mut ktb = kernel_testbed(link)?;
    let mut tb = Testbed::new().map_err(|e| e.to_string())?;
    masque::build_with(&mut tb, link).map_err(|e| e.to_string())?;
    let url = format!("{}:{PROXY_PORT}", addr::PROXY_V4);
    let (mut overhead, mut mtu) = (Vec::new(), Vec::new());
    let mut mode = PeerRx::InSenderContext;
    let (mut knapi, mut napi) = (NapiThreads::default(), NapiThreads::default());
    let worker_counts: Vec<Option<usize>> = if params.workers.is_empty() {
        vec![None]
    } else {
        params.workers.iter().map(|&w| Some(w)).collect()
    };
    let mut setups: Vec<(&str, Option<usize>)> = Vec::new();
    for d in &params.datapaths {
        match d.as_str() {
            "socket" => setups.extend(worker_counts.iter().map(|&w| ("socket", w))),
            "xdp" => setups.push(("xdp", Some(queues as usize))),
            other => return Err(format!("--datapath {other:?}: expected socket or xdp")),
        }
    }
    let mut steering = Vec::new();

    for (i, &(datapath, workers)) in setups.iter().enumerate() {
        // One proxy per setup, in its own directory (its TUN device goes with it).
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let extra = match (datapath, workers) {
            ("xdp", _) => "datapath = \"xdp\"\n[xdp]\ninterface = \"p0\"\n".to_string(),
            (_, Some(w)) => format!("workers = {w}\n"),
            (_, None) => String::new(),
        };
        let proxy = ProxyProc::start(
            &tb,
            "p",
            dir.path(),
            &format!("0.0.0.0:{PROXY_PORT}"),
            &extra,
        )?;
        progress(&format!(
            "CONNECT-IP ({datapath}, {} workers):",
            workers.map_or("default".into(), |w| w.to_string())
        ));
        let rq1 = i == 0 && !params.bulk_only;
        let (mut client, ready) = start_ip_client(&tb)?;
        let tun_mtu = ready_mtu(&ready)?;
        if rq1 {
            for family in [Family::V4, Family::V6] {
                mtu.push(ip_mtu_check(&tb, family, tun_mtu)?);
                for len in [100, 1000, tun_mtu] {
                    overhead.extend(ip_overhead(&tb, family, len)?);
                }
            }
            progress(&format!("  RQ1 done (TUN MTU {tun_mtu})"));
        }
        // RQ1 ran with veth's default receive (the captures see packets as sent). TCP bulk is
        // measured in every mode, the rest with threaded NAPI only.
        // The CONNECT-UDP runs below keep the last mode, threaded NAPI.
        let bulk = |rx, runs: &mut Vec<_>| {
            for &cc in &ccs {
                for family in [Family::V4, Family::V6] {
                    for _ in 0..params.repeat.max(1) {
                        for traffic in [Traffic::TcpBulk, Traffic::TcpBulkDown] {
                            runs.push((rx, family, traffic, cc));
                        }
                    }
                }
            }
        };
        let mut runs = Vec::new();
        if rq1 {
            bulk(PeerRx::InSenderContext, &mut runs);
        }
        bulk(PeerRx::NicOffloads, &mut runs);
        bulk(PeerRx::ThreadedNapi, &mut runs);
        if rq1 {
            for family in [Family::V4, Family::V6] {
                runs.push((PeerRx::ThreadedNapi, family, Traffic::Iperf3Udp64, None));
            }
        }
        for (rx, family, traffic, cc) in runs {
            if rx != mode {
                (knapi, napi) = (set_peer_rx(&ktb, rx, &knapi)?, set_peer_rx(&tb, rx, &napi)?);
                mode = rx;
                progress(&format!("  receive: {rx:?}"));
            }
            let base = iperf_run(
                &mut ktb,
                Path::KernelForwarding,
                traffic,
                cc,
                family,
                seconds,
                None,
                (rx, &knapi),
            )?;
            progress(&line(&base));
            let mut run = iperf_run(
                &mut tb,
                Path::ConnectIp,
                traffic,
                cc,
                family,
                seconds,
                Some((&proxy, &client)),
                (rx, &napi),
            )?;
            run.proxy_workers = Some(proxy_workers(&proxy)?);
            run.proxy_datapath = Some(datapath.to_string());
            push_pair(&mut throughput, base, run, progress);
        }
        stop_client(&mut client)?;
        let s = proxy.fresh_stats()?;
        let n = |k: &str| s[k].as_u64().unwrap_or(0);
        steering.push(Steering {
            datapath: datapath.to_string(),
            workers: s["workers"].as_array().map_or(0, Vec::len),
            misrouted: n("misrouted"),
            handoffs: n("handoffs"),
            steered: n("steered"),
        });
    }

    // CONNECT-UDP through a proxy with its default workers.
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let proxy = ProxyProc::start(&tb, "p", dir.path(), &format!("0.0.0.0:{PROXY_PORT}"), "")?;

    let stop = Arc::new(AtomicBool::new(false));
    let udp_families: &[Family] = if params.bulk_only {
        &[]
    } else {
        &[Family::V4, Family::V6]
    };
    if !udp_families.is_empty() {
        progress("CONNECT-UDP:");
    }
    for &family in udp_families {
        let server_ip = server_ip(family);
        let echo = SocketAddr::new(server_ip, ECHO_PORT);
        let sink = SocketAddr::new(server_ip, SINK_PORT);
        let echo_peer = UdpPeer::start(&tb, "s", echo, true, stop.clone())?;
        let sink_peer = UdpPeer::start(&tb, "s", sink, false, stop.clone())?;
        let local: SocketAddr = "127.0.0.1:6000".parse().map_err(|e| format!("{e}"))?;
        let (mut client, ready) = start_client(
            &tb,
            "c",
            &[
                "udp",
                "--proxy",
                &url,
                "--bind",
                addr::CLIENT_V4[0],
                "--target",
                &echo.to_string(),
                "--listen",
                &local.to_string(),
            ],
        )?;
        let max_payload = ready_mtu(&ready)?;
        mtu.push(udp_mtu_check(&tb, family, local, max_payload)?);
        for len in [64, 1000, max_payload] {
            overhead.extend(udp_overhead(&tb, family, local, len)?);
        }
        stop_client(&mut client)?;
        drop(echo_peer);

        let (mut client, _) = start_client(
            &tb,
            "c",
            &[
                "udp",
                "--proxy",
                &url,
                "--bind",
                addr::CLIENT_V4[0],
                "--target",
                &sink.to_string(),
                "--listen",
                &local.to_string(),
            ],
        )?;
        let kernel_sink = UdpPeer::start(&ktb, "s", sink, false, stop.clone())?;
        for traffic in [Traffic::Blast64, Traffic::Blast1200] {
            let base = blast_run(
                &ktb,
                Path::KernelForwarding,
                traffic,
                family,
                sink,
                &kernel_sink,
                seconds,
                None,
                (mode, &knapi),
            )?;
            progress(&line(&base));
            let run = blast_run(
                &tb,
                Path::ConnectUdp,
                traffic,
                family,
                local,
                &sink_peer,
                seconds,
                Some((&proxy, &client)),
                (mode, &napi),
            )?;
            push_pair(&mut throughput, base, run, progress);
        }
        stop_client(&mut client)?;
    }
    stop.store(true, Ordering::Relaxed);

    let results = Results {
        max_udp_payload_bytes: MAX_UDP_PAYLOAD_BYTES,
        formula_overhead_bytes: FORMULA_OVERHEAD_BYTES,
        overhead,
        mtu,
        throughput,
        steering,
        target_cpu_s_per_gb: TARGET_CPU_S_PER_GB,
    };
    let md = markdown(&results);
    Ok((results, md))
}

/// The workers of a running proxy (its stats file lists them).
fn proxy_workers(proxy: &ProxyProc) -> Result<usize, String> {
    let s = proxy.stats()?;
    s["workers"]
        .as_array()
        .map(Vec::len)
        .ok_or_else(|| format!("proxy counters without workers: {s}"))
}

/// Records a tunnel run beside the kernel run just before it, with its ratio to that run.
fn push_pair(
    throughput: &mut Vec<Throughput>,
    base: Throughput,
    mut run: Throughput,
    progress: &mut dyn FnMut(&str),
) {
    run.ratio_to_kernel = Some(run.goodput_mbps / base.goodput_mbps.max(f64::MIN_POSITIVE));
    let host = run.proxy_cpu_s_per_gb.zip(run.proxy_host_napi_cpu_s_per_gb);
    run.host_cpu_ratio_to_kernel = match (host, base.proxy_host_napi_cpu_s_per_gb) {
        (Some((p, n)), Some(k)) if k > 0.0 => Some((p + n) / k),
        _ => None,
    };
    progress(&line(&run));
    throughput.push(base);
    throughput.push(run);
}

/// The baseline: the same three namespaces with routes c ↔ s through p's kernel, no proxy.
fn kernel_testbed(link: LinkOpts) -> Result<Testbed, String> {
    let mut tb = Testbed::new().map_err(|e| e.to_string())?;
    masque::build_with(&mut tb, link).map_err(|e| e.to_string())?;
    let e = |e: crate::testbed::TestbedError| e.to_string();
    tb.add_route("c", "198.18.20.0/24", addr::PROXY_V4)
        .map_err(e)?;
    tb.add_route("c", "fd00:20::/64", addr::PROXY_V6)
        .map_err(e)?;
    tb.add_route("s", "198.18.10.0/24", "198.18.20.1")
        .map_err(e)?;
    tb.add_route("s", "fd00:10::/64", "fd00:20::1").map_err(e)?;
    Ok(tb)
}

/// Switches every veth end of `tb` ([`VETH_ENDS`]) to `rx` and returns the NAPI kthreads it
/// started (none for [`PeerRx::InSenderContext`]). A device's kthreads are the `napi/*` threads
/// that appear when its `threaded` is set: the name alone (`napi/s0-<id>`) is the same in both
/// testbeds.
/// `current` is what the last switch returned: going from one threaded mode to the other only
/// changes the offloads and keeps the kthreads.
fn set_peer_rx(tb: &Testbed, rx: PeerRx, current: &NapiThreads) -> Result<NapiThreads, String> {
    let mut threads = NapiThreads::default();
    let keep_threads =
        rx.threaded() && !(current.proxy_host.is_empty() && current.peers.is_empty());
    for (host, dev) in VETH_ENDS {
        let sysfs = format!("/sys/class/net/{dev}/threaded");
        let exec = |cmd: &[&str]| tb.exec_ok(host, cmd).map_err(|e| format!("{host}: {e}"));
        let offloads = if rx == PeerRx::NicOffloads {
            "on"
        } else {
            "off"
        };
        exec(&[
            "ethtool", "-K", dev, "tso", offloads, "gso", offloads, "tx", offloads,
        ])?;
        match rx {
            PeerRx::InSenderContext => {
                exec(&["sh", "-c", &format!("echo 0 > {sysfs}")])?;
                exec(&["ethtool", "-K", dev, "gro", "off"])?;
            }
            PeerRx::ThreadedNapi | PeerRx::NicOffloads if keep_threads => {}
            PeerRx::ThreadedNapi | PeerRx::NicOffloads => {
                let before = napi_kthreads()?;
                // GRO on is what makes veth run NAPI on its receive side (veth_set_features).
                exec(&["ethtool", "-K", dev, "gro", "on"])?;
                exec(&["sh", "-c", &format!("echo 1 > {sysfs}")])?;
                let new: Vec<u32> = napi_kthreads()?
                    .into_iter()
                    .filter(|pid| !before.contains(pid))
                    .collect();
                if new.is_empty() {
                    return Err(format!("{host}: no napi kthread appeared for {dev}"));
                }
                if host == "p" {
                    threads.proxy_host.extend(new);
                } else {
                    threads.peers.extend(new);
                }
            }
        }
    }
    if keep_threads {
        return Ok(current.clone());
    }
    Ok(threads)
}

/// Pids of every `napi/*` kthread on the machine.
fn napi_kthreads() -> Result<Vec<u32>, String> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").map_err(|e| format!("/proc: {e}"))? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        // A thread that exits between read_dir and here has no comm: skipped.
        if let Ok(comm) = std::fs::read_to_string(format!("/proc/{pid}/comm")) {
            if comm.starts_with("napi/") {
                pids.push(pid);
            }
        }
    }
    Ok(pids)
}

fn server_ip(family: Family) -> IpAddr {
    let s = match family {
        Family::V4 => addr::SERVER_V4,
        Family::V6 => addr::SERVER_V6,
    };
    // The constants are literals.
    s.parse().unwrap_or(IpAddr::from([0, 0, 0, 0]))
}

/// `mtu=` of the client's `ready` line.
fn ready_mtu(ready: &str) -> Result<usize, String> {
    ready
        .split_whitespace()
        .find_map(|w| w.strip_prefix("mtu="))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("no mtu= in {ready:?}"))
}

/// `ping -M do` at the TUN MTU and one byte over it.
fn ip_mtu_check(tb: &Testbed, family: Family, tun_mtu: usize) -> Result<MtuCheck, String> {
    let (flag, headers, dst) = match family {
        Family::V4 => ("-4", 28, addr::SERVER_V4),
        Family::V6 => ("-6", 48, addr::SERVER_V6),
    };
    let mut commands = Vec::new();
    let mut ping = |inner: usize| -> Result<bool, String> {
        let size = (inner - headers).to_string();
        let cmd = [
            "ping", flag, "-M", "do", "-s", &size, "-c", "3", "-i", "0.2", "-W", "1", dst,
        ];
        commands.push(format!("c: {}", cmd.join(" ")));
        let out = tb.exec("c", &cmd).map_err(|e| e.to_string())?;
        Ok(out.status.success())
    };
    let at_mtu_ok = ping(tun_mtu)?;
    let above_mtu_refused = !ping(tun_mtu + 1)?;
    Ok(MtuCheck {
        proto: Proto::ConnectIp,
        family,
        client_mtu_bytes: tun_mtu,
        formula_mtu_bytes: tunnel_mtu_formula(MAX_UDP_PAYLOAD_BYTES),
        at_mtu_ok,
        above_mtu_refused,
        largest_passing_bytes: None,
        commands,
    })
}

/// Echoes at the CONNECT-UDP client's MTU and one byte over it.
fn udp_mtu_check(
    tb: &Testbed,
    family: Family,
    local: SocketAddr,
    max_payload: usize,
) -> Result<MtuCheck, String> {
    let at = udp_echo(tb, local, max_payload, 5)?;
    let over = udp_echo(tb, local, max_payload + 1, 5)?;
    // Bisection: `lo` was echoed, `hi` was not (nothing above the client's UDP payload limit
    // fits a QUIC packet).
    let (mut lo, mut hi) = (max_payload, MAX_UDP_PAYLOAD_BYTES + 1);
    if at == 5 {
        while hi - lo > 1 {
            let mid = (lo + hi) / 2;
            if udp_echo(tb, local, mid, 2)? == 2 {
                lo = mid;
            } else {
                hi = mid;
            }
        }
    }
    Ok(MtuCheck {
        proto: Proto::ConnectUdp,
        family,
        client_mtu_bytes: max_payload,
        formula_mtu_bytes: tunnel_mtu_formula(MAX_UDP_PAYLOAD_BYTES),
        at_mtu_ok: at == 5,
        above_mtu_refused: over == 0,
        largest_passing_bytes: (at == 5).then_some(lo),
        commands: vec![format!(
            "c: 5 UDP payloads of {max_payload} and of {} bytes to {local}, each waiting 500 ms for its echo; \
             then bisection up to {} bytes, 2 payloads per size",
            max_payload + 1,
            MAX_UDP_PAYLOAD_BYTES + 1
        )],
    })
}

/// How long a capture runs around one RQ1 exchange, and how long it is given to bind first.
const CAPTURE_BIND: Duration = Duration::from_millis(300);

/// Pings of inner IP length `len` through CONNECT-IP, captured on c0 and s0.
fn ip_overhead(tb: &Testbed, family: Family, len: usize) -> Result<Vec<Overhead>, String> {
    let (flag, headers, dst) = match family {
        Family::V4 => ("-4", 28, addr::SERVER_V4),
        Family::V6 => ("-6", 48, addr::SERVER_V6),
    };
    let count = 20;
    let window = CAPTURE_BIND + Duration::from_millis(count as u64 * 50 + 700);
    let outer = record_frames(tb, "c", "c0", window, |_| true).map_err(|e| e.to_string())?;
    let inner = record_frames(tb, "s", "s0", window, |_| true).map_err(|e| e.to_string())?;
    std::thread::sleep(CAPTURE_BIND);
    let size = (len - headers).to_string();
    let count_s = count.to_string();
    tb.exec_ok(
        "c",
        &[
            "ping", flag, "-s", &size, "-c", &count_s, "-i", "0.05", "-W", "1", dst,
        ],
    )
    .map_err(|e| format!("ping of {len} bytes through CONNECT-IP: {e}"))?;
    let (outer, inner) = (joined(outer)?, joined(inner)?);
    let (echo_request, echo_reply) = match family {
        Family::V4 => (8, 0),
        Family::V6 => (128, 129),
    };
    let mut rows = Vec::new();
    for (direction, icmp_type) in [(Direction::Up, echo_request), (Direction::Down, echo_reply)] {
        let inner_packets = inner
            .iter()
            .filter_map(|f| Packet::parse(&f.bytes))
            .filter(|p| p.icmp_type == Some(icmp_type) && p.ip_len == len)
            .count();
        rows.push(overhead_row(
            Proto::ConnectIp,
            family,
            direction,
            len,
            inner_packets,
            &outer,
        ));
    }
    Ok(rows)
}

/// UDP payloads of `len` bytes echoed by the target through CONNECT-UDP, captured on c0 and s0.
fn udp_overhead(
    tb: &Testbed,
    family: Family,
    local: SocketAddr,
    len: usize,
) -> Result<Vec<Overhead>, String> {
    let count = 20;
    let window = CAPTURE_BIND + Duration::from_millis(count as u64 * 20 + 700);
    let outer = record_frames(tb, "c", "c0", window, |_| true).map_err(|e| e.to_string())?;
    let inner = record_frames(tb, "s", "s0", window, |_| true).map_err(|e| e.to_string())?;
    std::thread::sleep(CAPTURE_BIND);
    let echoed = udp_echo(tb, local, len, count)?;
    if echoed != count {
        return Err(format!(
            "CONNECT-UDP: {echoed} of {count} payloads of {len} bytes came back"
        ));
    }
    let (outer, inner) = (joined(outer)?, joined(inner)?);
    let mut rows = Vec::new();
    for direction in [Direction::Up, Direction::Down] {
        let inner_packets = inner
            .iter()
            .filter_map(|f| Packet::parse(&f.bytes))
            .filter(|p| {
                let port = match direction {
                    Direction::Up => p.dst_port,
                    Direction::Down => p.src_port,
                };
                port == Some(ECHO_PORT) && p.udp_payload == Some(len)
            })
            .count();
        rows.push(overhead_row(
            Proto::ConnectUdp,
            family,
            direction,
            len,
            inner_packets,
            &outer,
        ));
    }
    Ok(rows)
}

/// Sizes the outer QUIC packets on c0 that can carry an inner packet of `len` bytes: to the
/// proxy's port going up, from it going down. ACK-only packets are far smaller and drop out.
fn overhead_row(
    proto: Proto,
    family: Family,
    direction: Direction,
    len: usize,
    inner_packets: usize,
    outer: &[Frame],
) -> Overhead {
    let mut framing: Vec<usize> = outer
        .iter()
        .filter_map(|f| Packet::parse(&f.bytes))
        .filter(|p| match direction {
            Direction::Up => p.dst_port == Some(PROXY_PORT),
            Direction::Down => p.src_port == Some(PROXY_PORT),
        })
        .filter_map(|p| p.udp_payload)
        .filter(|&payload| payload > len)
        .map(|payload| payload - len)
        .collect();
    framing.sort_unstable();
    let median = framing.get(framing.len() / 2).copied().unwrap_or(0);
    Overhead {
        proto,
        family,
        direction,
        inner_len_bytes: len,
        inner_packets,
        outer_packets: framing.len(),
        // The outer packets are IPv4 (20) + UDP (8).
        outer_ip_minus_inner_bytes: median + 28,
        framing_median_bytes: median,
        framing_min_bytes: framing.first().copied().unwrap_or(0),
        framing_max_bytes: framing.last().copied().unwrap_or(0),
    }
}

fn joined(
    h: std::thread::JoinHandle<std::io::Result<std::io::Result<Vec<Frame>>>>,
) -> Result<Vec<Frame>, String> {
    match h.join() {
        Ok(Ok(Ok(frames))) => Ok(frames),
        Ok(Ok(Err(e))) | Ok(Err(e)) => Err(format!("capture: {e}")),
        Err(_) => Err("capture thread panicked".into()),
    }
}

/// Sends `count` numbered payloads of `len` bytes to `to` from c, one at a time, and returns how
/// many came back intact within 500 ms each.
fn udp_echo(tb: &Testbed, to: SocketAddr, len: usize, count: usize) -> Result<usize, String> {
    tb.run_in("c", move || -> std::io::Result<usize> {
        let s = UdpSocket::bind("127.0.0.1:0")?;
        s.set_read_timeout(Some(Duration::from_millis(500)))?;
        let mut buf = vec![0u8; 65536];
        let mut ok = 0;
        for i in 0..count {
            let mut msg = vec![(i % 251) as u8; len];
            let n = len.min(4);
            msg[..n].copy_from_slice(&(i as u32).to_be_bytes()[..n]);
            s.send_to(&msg, to)?;
            // Late echoes of earlier payloads are skipped, not counted.
            let deadline = Instant::now() + Duration::from_millis(500);
            while Instant::now() < deadline {
                match s.recv_from(&mut buf) {
                    Ok((n, _)) if buf[..n] == msg[..] => {
                        ok += 1;
                        break;
                    }
                    Ok(_) => continue,
                    Err(_) => break,
                }
            }
        }
        Ok(ok)
    })
    .map_err(|e| e.to_string())?
    .map_err(|e| format!("UDP echo to {to}: {e}"))
}

/// An iperf3 run (TCP bulk or 64-byte UDP) c → s, with the proxy's and client's CPU around it.
fn iperf_run(
    tb: &mut Testbed,
    path: Path,
    traffic: Traffic,
    cc: Option<&str>,
    family: Family,
    seconds: u32,
    tunnel: Option<(&ProxyProc, &Proc)>,
    (rx, napi): (PeerRx, &NapiThreads),
) -> Result<Throughput, String> {
    let dst = server_ip(family).to_string();
    let mut extra: Vec<&str> = match traffic {
        Traffic::Iperf3Udp64 => vec!["-u", "-b", "0", "-l", "64"],
        Traffic::TcpBulkDown => vec!["-R"],
        _ => vec![],
    };
    if let Some(cc) = cc {
        extra.extend(["-C", cc]);
    }
    let command = format!(
        "c: iperf3 -c {dst} -p 5201 -t {seconds} -J {}",
        extra.join(" ")
    );
    let before = Sample::take(tunnel, napi)?;
    let r = iperf3_with(tb, "c", "s", &dst, seconds, &extra)?;
    let after = Sample::take(tunnel, napi)?;
    let secs = f64::from(seconds);
    let (loss, delivered_pps) = match traffic {
        Traffic::Iperf3Udp64 => {
            let sent = r.sent_bytes as f64 / 64.0;
            let got = r.received_bytes as f64 / 64.0;
            (Some(100.0 * (1.0 - got / sent.max(1.0))), got / secs)
        }
        // TCP: data segments, as the proxy's TUN writes (uploads) or reads (downloads); without
        // the tunnel an estimate, bytes / MSS (1500-byte links, timestamps on).
        _ => {
            let segs = if traffic == Traffic::TcpBulkDown {
                after.tun_rx.saturating_sub(before.tun_rx)
            } else {
                after.tun_tx.saturating_sub(before.tun_tx)
            } as f64;
            let mss = if family == Family::V4 { 1448.0 } else { 1428.0 };
            (
                None,
                if tunnel.is_some() {
                    segs
                } else {
                    r.received_bytes as f64 / mss
                } / secs,
            )
        }
    };
    let mut t = finish(
        path,
        rx,
        traffic,
        family,
        secs,
        r.received_bytes,
        delivered_pps,
        loss,
        &before,
        &after,
        tunnel,
        command,
    );
    t.tcp_congestion = r.congestion;
    Ok(t)
}

/// A blaster run: one thread on c sends payloads to `to` for `seconds`; the sink on s counts.
#[allow(clippy::too_many_arguments)]
fn blast_run(
    tb: &Testbed,
    path: Path,
    traffic: Traffic,
    family: Family,
    to: SocketAddr,
    sink: &UdpPeer,
    seconds: u32,
    tunnel: Option<(&ProxyProc, &Proc)>,
    (rx, napi): (PeerRx, &NapiThreads),
) -> Result<Throughput, String> {
    let len = match traffic {
        Traffic::Blast1200 => 1200,
        _ => 64,
    };
    let command =
        format!("c: blaster, {len}-byte UDP payloads to {to} for {seconds} s, one thread");
    let duration = Duration::from_secs(u64::from(seconds));
    let (p0, b0) = sink.counts();
    let before = Sample::take(tunnel, napi)?;
    let sent = tb
        .run_in("c", move || -> std::io::Result<u64> {
            let bind = if to.is_ipv4() && !to.ip().is_loopback() {
                "0.0.0.0:0"
            } else if to.is_ipv4() {
                "127.0.0.1:0"
            } else {
                "[::]:0"
            };
            let s = UdpSocket::bind(bind)?;
            let msg = vec![0x5au8; len];
            let deadline = Instant::now() + duration;
            let mut sent = 0u64;
            while Instant::now() < deadline {
                for _ in 0..64 {
                    if s.send_to(&msg, to).is_ok() {
                        sent += 1;
                    }
                }
            }
            Ok(sent)
        })
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("blaster to {to}: {e}"))?;
    // What is still queued drains (a slow tunnel delivers after the sender stops).
    std::thread::sleep(Duration::from_millis(500));
    let after = Sample::take(tunnel, napi)?;
    let (p1, b1) = sink.counts();
    let got = p1 - p0;
    let secs = f64::from(seconds);
    let loss = Some(100.0 * (1.0 - got as f64 / (sent.max(1)) as f64));
    Ok(finish(
        path,
        rx,
        traffic,
        family,
        secs,
        b1 - b0,
        got as f64 / secs,
        loss,
        &before,
        &after,
        tunnel,
        command,
    ))
}

#[allow(clippy::too_many_arguments)]
fn finish(
    path: Path,
    peer_rx: PeerRx,
    traffic: Traffic,
    family: Family,
    secs: f64,
    payload_bytes: u64,
    delivered_pps: f64,
    loss_percent: Option<f64>,
    before: &Sample,
    after: &Sample,
    tunnel: Option<(&ProxyProc, &Proc)>,
    command: String,
) -> Throughput {
    let gb = payload_bytes.max(1) as f64 / 1e9;
    let tunnelled = tunnel.is_some();
    let proxy_cpu_s = after.proxy_cpu_s - before.proxy_cpu_s;
    let proxy_packets = after.packets.saturating_sub(before.packets);
    let napi = peer_rx.threaded();
    let per_pass = |n: u64| n as f64 / after.passes.saturating_sub(before.passes).max(1) as f64;
    Throughput {
        path,
        peer_rx,
        traffic,
        family,
        seconds: secs,
        payload_bytes,
        goodput_mbps: payload_bytes as f64 * 8.0 / secs / 1e6,
        delivered_pps,
        loss_percent,
        proxy_packets: tunnelled.then_some(proxy_packets),
        proxy_cpu_s: tunnelled.then_some(proxy_cpu_s),
        proxy_cpu_s_per_gb: tunnelled.then_some(proxy_cpu_s / gb),
        proxy_user_cpu_s_per_gb: tunnelled
            .then_some((after.proxy_user_s - before.proxy_user_s) / gb),
        proxy_host_napi_cpu_s_per_gb: napi
            .then_some((after.proxy_host_napi_s - before.proxy_host_napi_s) / gb),
        peers_napi_cpu_s_per_gb: napi.then_some((after.peers_napi_s - before.peers_napi_s) / gb),
        proxy_cpu_us_per_packet: tunnelled
            .then_some(proxy_cpu_s * 1e6 / proxy_packets.max(1) as f64),
        client_cpu_s_per_gb: tunnelled.then_some((after.client_cpu_s - before.client_cpu_s) / gb),
        proxy_quic_rx_per_pass: tunnelled
            .then_some(per_pass(after.udp_rx.saturating_sub(before.udp_rx))),
        proxy_quic_tx_per_pass: tunnelled
            .then_some(per_pass(after.udp_tx.saturating_sub(before.udp_tx))),
        tcp_congestion: None,
        ratio_to_kernel: None,
        host_cpu_ratio_to_kernel: None,
        command,
        proxy_workers: None,
        proxy_datapath: None,
    }
}

/// The proxy's and the client's CPU time and the proxy's inner-packet counters at one moment.
#[derive(Debug, Default)]
struct Sample {
    proxy_cpu_s: f64,
    proxy_user_s: f64,
    client_cpu_s: f64,
    /// CPU time of p's NAPI kthreads, and of c's and s's.
    proxy_host_napi_s: f64,
    peers_napi_s: f64,
    /// Inner packets forwarded, both directions: TUN writes + reads, CONNECT-UDP payloads.
    packets: u64,
    /// TUN writes alone (inner packets towards the server), and reads (towards the client).
    tun_tx: u64,
    tun_rx: u64,
    /// QUIC datagrams received and sent, and loop passes.
    udp_rx: u64,
    udp_tx: u64,
    passes: u64,
}

impl Sample {
    fn take(tunnel: Option<(&ProxyProc, &Proc)>, napi: &NapiThreads) -> Result<Sample, String> {
        let sum = |pids: &[u32]| -> Result<f64, String> {
            pids.iter()
                .map(|&pid| cpu_times(pid).map(|(u, s)| u + s))
                .sum()
        };
        let (proxy_host_napi_s, peers_napi_s) = (sum(&napi.proxy_host)?, sum(&napi.peers)?);
        let Some((proxy, client)) = tunnel else {
            return Ok(Sample {
                proxy_host_napi_s,
                peers_napi_s,
                ..Sample::default()
            });
        };
        // The stats file is rewritten every second; waiting for a fresh one brackets the run.
        let s = proxy.fresh_stats()?;
        let n = |k: &str| s[k].as_u64().unwrap_or(0);
        let (user, system) = cpu_times(proxy.proc.pid())?;
        let (cu, cs) = cpu_times(client.pid())?;
        Ok(Sample {
            proxy_cpu_s: user + system,
            proxy_user_s: user,
            client_cpu_s: cu + cs,
            proxy_host_napi_s,
            peers_napi_s,
            packets: n("tun_tx") + n("tun_rx") + n("udp_to_target") + n("udp_to_client"),
            tun_tx: n("tun_tx"),
            tun_rx: n("tun_rx"),
            udp_rx: n("udp_rx"),
            udp_tx: n("udp_tx"),
            passes: n("passes"),
        })
    }
}

/// The figures `bench masque --json` writes under `"summary"`: for CONNECT-IP TCP bulk under
/// threaded NAPI (where the proxy host's receive is counted in its kthreads), each direction's
/// median, minimum and maximum of the host's CPU per GB over the kernel's forwarding
/// (`ratio_to_kernel_up`, `ratio_to_kernel_down`) and of the proxy host's CPU-s/GB, per worker
/// setup (datapath and worker count, `socket/2`) under `by_setup`, and at the top those of the
/// setup with the lower medians; `misrouted`, `handoffs_socket` and `handoffs_xdp` summed over
/// the proxies.
pub fn summary(r: &Results) -> serde_json::Value {
    let direction = |traffic: Traffic, setup: &(Option<String>, Option<usize>)| {
        let runs: Vec<&Throughput> = r
            .throughput
            .iter()
            .filter(|t| {
                t.path == Path::ConnectIp
                    && t.traffic == traffic
                    && t.peer_rx == PeerRx::ThreadedNapi
                    && (&t.proxy_datapath, t.proxy_workers) == (&setup.0, setup.1)
            })
            .collect();
        let spread = |f: &dyn Fn(&Throughput) -> Option<f64>| {
            let mut v: Vec<f64> = runs.iter().filter_map(|t| f(t)).collect();
            v.sort_by(f64::total_cmp);
            let median = match v.len() {
                0 => None,
                n if n % 2 == 1 => Some(v[n / 2]),
                n => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
            };
            serde_json::json!({
                "median": median,
                "min": v.first(),
                "max": v.last(),
                "runs": v.len(),
            })
        };
        (
            spread(&|t| t.host_cpu_ratio_to_kernel),
            spread(&|t| {
                t.proxy_cpu_s_per_gb
                    .map(|c| c + t.proxy_host_napi_cpu_s_per_gb.unwrap_or(0.0))
            }),
        )
    };
    let mut setups: Vec<(Option<String>, Option<usize>)> = r
        .throughput
        .iter()
        .filter(|t| t.path == Path::ConnectIp)
        .map(|t| (t.proxy_datapath.clone(), t.proxy_workers))
        .collect();
    setups.sort_unstable();
    setups.dedup();
    let mut by_setup = serde_json::Map::new();
    let mut best: Option<(f64, serde_json::Value)> = None;
    for setup in setups {
        let (up, up_cpu) = direction(Traffic::TcpBulk, &setup);
        let (down, down_cpu) = direction(Traffic::TcpBulkDown, &setup);
        let score =
            up["median"].as_f64().unwrap_or(f64::MAX) + down["median"].as_f64().unwrap_or(f64::MAX);
        let figures = serde_json::json!({
            "ratio_to_kernel_up": up["median"],
            "ratio_to_kernel_down": down["median"],
            "ratio_to_kernel_up_spread": up,
            "ratio_to_kernel_down_spread": down,
            "host_cpu_s_per_gb_up": up_cpu,
            "host_cpu_s_per_gb_down": down_cpu,
        });
        let key = format!(
            "{}/{}",
            setup.0.as_deref().unwrap_or("socket"),
            setup.1.map_or("default".into(), |w| w.to_string())
        );
        by_setup.insert(key, figures.clone());
        if best.as_ref().is_none_or(|(s, _)| score < *s) {
            best = Some((score, figures));
        }
    }
    let mut out = best.map_or(serde_json::json!({}), |(_, f)| f);
    out["by_setup"] = serde_json::Value::Object(by_setup);
    out["misrouted"] = r.steering.iter().map(|s| s.misrouted).sum::<u64>().into();
    let handoffs = |d: &str| -> u64 {
        r.steering
            .iter()
            .filter(|s| s.datapath == d)
            .map(|s| s.handoffs)
            .sum()
    };
    out["handoffs_socket"] = handoffs("socket").into();
    out["handoffs_xdp"] = handoffs("xdp").into();
    out
}

/// Instructions per inner packet of the proxy's receive path in memory, counted by callgrind
/// over `masque-fastpath/examples/tunnel_callgrind.rs` (30,000 packets in bursts of 32, only
/// inside `proxy_burst`): exact and repeatable where CPU time is not. The example must be built
/// next to this binary (`cargo build --profile bench -p mimiq-masque --example
/// tunnel_callgrind`), and valgrind installed (`scripts/setup`).
pub fn instructions_per_packet() -> Result<f64, String> {
    const PACKETS: u32 = 30_000;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let example = exe
        .parent()
        .map(|d| d.join("examples/tunnel_callgrind"))
        .filter(|p| p.exists())
        .ok_or("tunnel_callgrind is not built next to this binary (cargo build --profile bench -p mimiq-masque --example tunnel_callgrind)")?;
    let out_file = tempfile::NamedTempFile::new().map_err(|e| e.to_string())?;
    let out = std::process::Command::new("valgrind")
        .arg("--tool=callgrind")
        .arg(format!(
            "--callgrind-out-file={}",
            out_file.path().display()
        ))
        .arg("--toggle-collect=*proxy_burst*")
        .arg(&example)
        .args([PACKETS.to_string(), "32".into()])
        .output()
        .map_err(|e| format!("valgrind: {e}"))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        return Err(format!("tunnel_callgrind under valgrind failed: {stderr}"));
    }
    let collected = stderr
        .lines()
        .find_map(|l| l.split("Collected :").nth(1))
        .and_then(|n| n.trim().parse::<u64>().ok())
        .ok_or_else(|| format!("no \"Collected\" line from callgrind: {stderr}"))?;
    Ok(collected as f64 / f64::from(PACKETS))
}

/// (utime, stime) of process `pid` (all its threads), seconds, from `/proc/<pid>/stat`.
pub fn cpu_times(pid: u32) -> Result<(f64, f64), String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("/proc/{pid}/stat: {e}"))?;
    // The command name (field 2) is in parentheses and may hold spaces: count after the last ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or("malformed /proc/<pid>/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of proc(5); `rest` starts at field 3.
    let tick = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or("malformed /proc/<pid>/stat")
    };
    let (user, system) = (tick(11)?, tick(12)?);
    // SAFETY: sysconf(3) takes an integer and touches no memory of ours.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as f64 } else { 100.0 };
    Ok((user as f64 / hz, system as f64 / hz))
}

/// A UDP socket on s that echoes or just counts, until `stop`.
struct UdpPeer {
    packets: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
}

impl UdpPeer {
    fn start(
        tb: &Testbed,
        host: &str,
        bind: SocketAddr,
        echo: bool,
        stop: Arc<AtomicBool>,
    ) -> Result<UdpPeer, String> {
        let packets = Arc::new(AtomicU64::new(0));
        let bytes = Arc::new(AtomicU64::new(0));
        let (p, b) = (packets.clone(), bytes.clone());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        tb.spawn_in(host, move || {
            let s = match UdpSocket::bind(bind) {
                Ok(s) => s,
                Err(e) => {
                    let _ = ready_tx.send(Err(format!("bind {bind}: {e}")));
                    return;
                }
            };
            let _ = s.set_read_timeout(Some(Duration::from_millis(100)));
            let _ = ready_tx.send(Ok(()));
            let mut buf = vec![0u8; 65536];
            // Counted locally and published with plain stores: one writer.
            let (mut np, mut nb) = (0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                if let Ok((n, from)) = s.recv_from(&mut buf) {
                    np += 1;
                    nb += n as u64;
                    if echo {
                        let _ = s.send_to(&buf[..n], from);
                    }
                    p.store(np, Ordering::Relaxed);
                    b.store(nb, Ordering::Relaxed);
                }
            }
        })
        .map_err(|e| e.to_string())?;
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .map_err(|_| format!("UDP peer on {host} at {bind} did not start"))??;
        Ok(UdpPeer { packets, bytes })
    }

    /// Packets and payload bytes received so far.
    fn counts(&self) -> (u64, u64) {
        (
            self.packets.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed),
        )
    }
}

/// What the RQ1 code needs of a captured frame.
#[derive(Debug, Clone, Copy)]
struct Packet {
    /// IP total length (IPv6: 40 + payload length).
    ip_len: usize,
    icmp_type: Option<u8>,
    src_port: Option<u16>,
    dst_port: Option<u16>,
    udp_payload: Option<usize>,
}

impl Packet {
    /// Ethernet + IPv4/IPv6 (no extension headers) + ICMP/UDP; `None` for anything else.
    fn parse(frame: &[u8]) -> Option<Packet> {
        let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
        let ip = frame.get(14..)?;
        let (ip_len, proto, l4) = match ethertype {
            0x0800 => {
                let ihl = usize::from(ip.first()? & 0x0f) * 4;
                let len = usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]));
                (len, *ip.get(9)?, ip.get(ihl..)?)
            }
            0x86dd => {
                let len = 40 + usize::from(u16::from_be_bytes([*ip.get(4)?, *ip.get(5)?]));
                (len, *ip.get(6)?, ip.get(40..)?)
            }
            _ => return None,
        };
        let mut p = Packet {
            ip_len,
            icmp_type: None,
            src_port: None,
            dst_port: None,
            udp_payload: None,
        };
        match proto {
            1 | 58 => p.icmp_type = Some(*l4.first()?),
            17 => {
                p.src_port = Some(u16::from_be_bytes([*l4.first()?, *l4.get(1)?]));
                p.dst_port = Some(u16::from_be_bytes([*l4.get(2)?, *l4.get(3)?]));
                let udp_len = usize::from(u16::from_be_bytes([*l4.get(4)?, *l4.get(5)?]));
                p.udp_payload = udp_len.checked_sub(8);
            }
            _ => {}
        }
        Some(p)
    }
}

fn line(r: &Throughput) -> String {
    format!(
        "  {:?} {:?} {:?}{} {:?}: {:.1} Mbit/s, {:.0} pps{}{}{}{}",
        r.path,
        r.peer_rx,
        r.traffic,
        r.tcp_congestion
            .as_ref()
            .map_or(String::new(), |c| format!(" ({c})")),
        r.family,
        r.goodput_mbps,
        r.delivered_pps,
        r.loss_percent
            .map_or(String::new(), |l| format!(", loss {l:.1} %")),
        r.proxy_cpu_s_per_gb
            .map_or(String::new(), |c| format!(", proxy {c:.2} CPU-s/GB")),
        r.proxy_host_napi_cpu_s_per_gb
            .map_or(String::new(), |c| format!(", p napi {c:.2} CPU-s/GB")),
        r.proxy_quic_rx_per_pass
            .zip(r.proxy_quic_tx_per_pass)
            .map_or(String::new(), |(i, o)| {
                format!(", QUIC {i:.1} in / {o:.1} out per pass")
            }),
    )
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("–".into(), |v| format!("{v:.digits$}"))
}

fn markdown(r: &Results) -> String {
    let mut md = format!(
        "RQ1 — overhead per packet, from captures on c0 (outer) and s0 (inner) at the same time. \
         Outer packets are IPv4 + UDP (28 bytes) + QUIC + HTTP/3 datagram framing; the formula \
         (`quic::tunnel_mtu`) allows {} bytes of framing in a {}-byte UDP payload.\n\n\
         | tunnel | inner | direction | inner bytes | inner pkts | outer pkts | outer IP − inner | framing median (min–max) | formula |\n\
         |---|---|---|---|---|---|---|---|---|\n",
        r.formula_overhead_bytes, r.max_udp_payload_bytes
    );
    for o in &r.overhead {
        md.push_str(&format!(
            "| {:?} | {:?} | {:?} | {} | {} | {} | {} | {} ({}–{}) | {} |\n",
            o.proto,
            o.family,
            o.direction,
            o.inner_len_bytes,
            o.inner_packets,
            o.outer_packets,
            o.outer_ip_minus_inner_bytes,
            o.framing_median_bytes,
            o.framing_min_bytes,
            o.framing_max_bytes,
            r.formula_overhead_bytes,
        ));
    }
    md.push_str(
        "\nRQ1 — the largest inner packet (CONNECT-IP: IP packet, `ping -M do`; CONNECT-UDP: UDP payload, echoed).\n\n\
         | tunnel | inner | client MTU | formula | at MTU | MTU + 1 | largest echoed |\n|---|---|---|---|---|---|---|\n",
    );
    for m in &r.mtu {
        md.push_str(&format!(
            "| {:?} | {:?} | {} | {} | {} | {} | {} |\n",
            m.proto,
            m.family,
            m.client_mtu_bytes,
            m.formula_mtu_bytes,
            if m.at_mtu_ok { "passes" } else { "**fails**" },
            if m.above_mtu_refused {
                "refused"
            } else {
                "**passes**"
            },
            m.largest_passing_bytes
                .map_or("– (TUN refuses)".into(), |v| v.to_string()),
        ));
    }
    md.push_str(
        "\nRQ2 — goodput, packets per second and CPU (proxy CPU = its utime + stime over the run; \
         napi = the CPU of the hosts' NAPI kthreads, threaded receive only).\n\n\
         | path | receive | traffic | TCP CC | inner | goodput Mbit/s | ratio to kernel | delivered kpps | loss % | proxy CPU-s/GB | of which user | p napi CPU-s/GB | c0+s0 napi CPU-s/GB | proxy CPU µs/pkt | client CPU-s/GB | QUIC in / out per pass |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for t in &r.throughput {
        md.push_str(&format!(
            "| {:?} | {:?} | {:?} | {} | {:?} | {:.1} | {} | {:.1} | {} | {} | {} | {} | {} | {} | {} | {} / {} |\n",
            t.path,
            t.peer_rx,
            t.traffic,
            t.tcp_congestion.as_deref().unwrap_or("–"),
            t.family,
            t.goodput_mbps,
            opt(t.ratio_to_kernel, 2),
            t.delivered_pps / 1e3,
            opt(t.loss_percent, 1),
            opt(t.proxy_cpu_s_per_gb, 2),
            opt(t.proxy_user_cpu_s_per_gb, 2),
            opt(t.proxy_host_napi_cpu_s_per_gb, 2),
            opt(t.peers_napi_cpu_s_per_gb, 2),
            opt(t.proxy_cpu_us_per_packet, 2),
            opt(t.client_cpu_s_per_gb, 2),
            opt(t.proxy_quic_rx_per_pass, 1),
            opt(t.proxy_quic_tx_per_pass, 1),
        ));
    }
    let bulk: Vec<&Throughput> = r
        .throughput
        .iter()
        .filter(|t| {
            t.path == Path::ConnectIp
                && matches!(t.traffic, Traffic::TcpBulk | Traffic::TcpBulkDown)
        })
        .collect();
    for t in bulk {
        let v = t.proxy_cpu_s_per_gb.unwrap_or(f64::INFINITY);
        // Under threaded NAPI the proxy host's receive is in p's kthreads, not in the process:
        // the target is judged on both together.
        let host = v + t.proxy_host_napi_cpu_s_per_gb.unwrap_or(0.0);
        md.push_str(&format!(
            "\nCONNECT-IP bulk {}, {:?}, {:?}, TCP {}: {:.2} proxy CPU-s/GB ({:.2} of it user time){}{} against the target of ≤ {:.1}: {}.",
            if t.traffic == Traffic::TcpBulkDown { "download" } else { "upload" },
            t.family,
            t.peer_rx,
            t.tcp_congestion.as_deref().unwrap_or("?"),
            v,
            t.proxy_user_cpu_s_per_gb.unwrap_or(f64::INFINITY),
            t.proxy_host_napi_cpu_s_per_gb
                .map_or(String::new(), |n| format!(", {host:.2} with p's napi kthreads ({n:.2})")),
            t.host_cpu_ratio_to_kernel
                .map_or(String::new(), |x| format!(", {x:.2}× the kernel's forwarding")),
            r.target_cpu_s_per_gb,
            if host <= r.target_cpu_s_per_gb { "met" } else { "**not met**" }
        ));
    }
    md.push('\n');
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_congestion_control_is_refused_by_name() {
        let e = check_congestion(&["no-such-cc".into()]).unwrap_err();
        assert!(e.contains("\"no-such-cc\" is not available"), "{e}");
        // Whatever the machine offers passes (reno is built into every kernel).
        check_congestion(&["reno".into()]).unwrap();
    }

    #[test]
    fn formula_matches_the_proxy_default_tunnel_mtu() {
        // 1452 − (1 + 20 + 4) − 16 − 3 − 9.
        assert_eq!(tunnel_mtu_formula(1452), 1399);
    }

    #[test]
    fn packet_parse_sizes_an_ipv4_udp_frame_and_refuses_truncation() {
        let mut f = vec![0u8; 14 + 20 + 8 + 100];
        f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        f[14] = 0x45;
        f[16..18].copy_from_slice(&128u16.to_be_bytes());
        f[23] = 17;
        f[34..36].copy_from_slice(&5000u16.to_be_bytes());
        f[36..38].copy_from_slice(&4433u16.to_be_bytes());
        f[38..40].copy_from_slice(&108u16.to_be_bytes());
        let p = Packet::parse(&f).unwrap();
        assert_eq!(
            (p.ip_len, p.src_port, p.dst_port, p.udp_payload),
            (128, Some(5000), Some(4433), Some(100))
        );
        for n in 0..40 {
            assert!(Packet::parse(&f[..n]).is_none(), "{n}");
        }
    }

    #[test]
    fn cpu_times_reads_this_process() {
        let (user, system) = cpu_times(std::process::id()).unwrap();
        assert!(user >= 0.0 && system >= 0.0);
    }
}
