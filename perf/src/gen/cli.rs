//! The `mimiq-perf gen` command line: flags, their validation (one clear line per mistake) and
//! the reports printed at the end.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use mimiq_dataplane::config::{CopyMode, HugePages, XdpMode};
use mimiq_dataplane::port::xdp_prog::KernelPass;
use mimiq_dataplane::port::xsk::XskConfig;

use super::probe::{self, FlowAddrs};
use super::rate::{Rate, SizeMix};
use super::recv::{self, RecvConfig};
use super::reflect;
use super::replay;
use super::send::{self, SendConfig, Vary};
use super::seq::Fault;

/// `mimiq-perf gen ...`
#[derive(Subcommand, Debug)]
pub enum GenCommand {
    /// Send numbered, timestamped UDP probes on an AF_XDP socket.
    Send(SendArgs),
    /// Receive probes: count, loss, reordering, one-way latency (JSON, .hlog).
    Recv(RecvArgs),
    /// Bare AF_XDP reflector: frames in on one port leave on the other, untouched.
    Reflect(ReflectArgs),
}

/// Socket options shared by the commands.
#[derive(Args, Debug, Clone)]
pub struct SocketArgs {
    /// Native XDP, or the SKB-mode fallback.
    #[arg(long, value_enum, default_value = "native")]
    xdp_mode: XdpMode,
    /// Copy, zero-copy, or whatever the driver offers.
    #[arg(long, value_enum, default_value = "auto")]
    copy_mode: CopyMode,
    /// Entries per AF_XDP ring (a power of two, 64..=16384).
    #[arg(long, default_value_t = 2048, value_parser = parse_ring_size)]
    ring_size: u32,
}

impl SocketArgs {
    fn xsk(&self) -> XskConfig {
        socket_config(self.xdp_mode, self.copy_mode, self.ring_size)
    }
}

/// The generator's sockets: 2048-byte frames on normal pages, no busy polling, and every
/// frame to the socket (nothing passed to the kernel: the receiver counts all it sees).
pub fn socket_config(xdp_mode: XdpMode, copy_mode: CopyMode, ring_size: u32) -> XskConfig {
    XskConfig {
        xdp_mode,
        copy_mode,
        ring_size,
        frame_size: 2048,
        huge_pages: HugePages::Off,
        busy_poll_budget: None,
        kernel_pass: KernelPass::default(),
    }
}

/// `gen send`
#[derive(Args, Debug)]
pub struct SendArgs {
    /// Interface to send on.
    #[arg(long)]
    iface: String,
    /// Queue of the interface (the first, with --queues).
    #[arg(long, default_value_t = 0)]
    queue: u32,
    /// Send on this many queues from --queue on, a thread and socket each; queue i sends the
    /// flows whose number modulo N is i, and each has an even share of the rate and the count.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    queues: u32,
    /// Pin the i-th queue's thread to the i-th core of this comma-separated list.
    #[arg(long, value_delimiter = ',')]
    cores: Vec<usize>,
    /// Ethernet destination (default: broadcast; give the next hop's MAC for routed paths).
    #[arg(long, value_parser = parse_mac)]
    dst_mac: Option<[u8; 6]>,
    /// Ethernet source (default: the interface's address).
    #[arg(long, value_parser = parse_mac)]
    src_mac: Option<[u8; 6]>,
    /// IP source of flow 0 (default 198.18.0.1, or fd00::1 with --ipv6).
    #[arg(long)]
    src: Option<IpAddr>,
    /// IP destination of flow 0 (default 198.18.0.2, or fd00::2 with --ipv6).
    #[arg(long)]
    dst: Option<IpAddr>,
    /// IPv6 probes (with the default addresses).
    #[arg(long, short = '6')]
    ipv6: bool,
    /// UDP source port of flow 0.
    #[arg(long, default_value_t = 10000)]
    src_port: u16,
    /// UDP destination port of flow 0.
    #[arg(long, default_value_t = 20000)]
    dst_port: u16,
    /// Number of flows (1..=65536); flow i adds i to every --vary field.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=65536))]
    flows: u32,
    /// Fields that differ between flows (repeat or comma-separate; default src-port).
    #[arg(long, value_enum, value_delimiter = ',')]
    vary: Vec<Vary>,
    /// Send the Ethernet frames of this pcap file instead of probes, in order, at the rate
    /// given; --src-mac, --dst-mac, --src and --dst rewrite their addresses when given
    /// (checksums follow). The receiver counts them as `other_frames`.
    #[arg(long, conflicts_with_all = ["size", "imix", "ipv6", "garble", "vary"])]
    pcap: Option<PathBuf>,
    /// With --pcap: passes over the capture (0: until --count, --duration or a signal).
    #[arg(long, default_value_t = 1, requires = "pcap")]
    loops: u64,
    /// Frame size in bytes including the 4-byte FCS (RFC 2544: 64..=1518).
    #[arg(long, conflicts_with = "imix")]
    size: Option<usize>,
    /// Frame size mix: `imix` (7:4:1 of 64/576/1500) or SIZE:WEIGHT,... e.g. 64:7,576:4,1500:1.
    #[arg(long)]
    imix: Option<String>,
    /// Rate in packets per second (k, M, G suffixes); default: as fast as possible.
    #[arg(long, value_parser = parse_si, conflicts_with = "bps")]
    pps: Option<f64>,
    /// Rate in bits per second, frames counted with FCS (k, M, G suffixes).
    #[arg(long, value_parser = parse_si)]
    bps: Option<f64>,
    /// Stop after this many packets.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    count: Option<u64>,
    /// Stop after this long (e.g. 10, 2.5s, 500ms).
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Frames per TX burst (1..=64).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..=64))]
    batch: u16,
    #[command(flatten)]
    socket: SocketArgs,
    /// Write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Print a line of figures every second.
    #[arg(long)]
    progress: bool,
    /// Send hostile frames instead of probes: random bytes after the Ethernet header, frames cut
    /// short, junk ethertypes, or the three in turn; at the same rates, to see what a switch
    /// or host counts and drops under a storm.
    #[arg(long, value_enum)]
    garble: Option<super::send::Garble>,
    /// Test only: every N-th packet of a flow skips a sequence number (N ≥ 2).
    #[arg(long, hide = true, value_parser = clap::value_parser!(u64).range(2..), conflicts_with = "fault_swap_every")]
    fault_skip_every: Option<u64>,
    /// Test only: packets 1, N+1, 2N+1... of a flow swap places with the next one (N ≥ 2).
    #[arg(long, hide = true, value_parser = clap::value_parser!(u64).range(2..))]
    fault_swap_every: Option<u64>,
}

/// `gen recv`
#[derive(Args, Debug)]
pub struct RecvArgs {
    /// Interface to receive on.
    #[arg(long)]
    iface: String,
    /// Queue of the interface (the first, with --queues).
    #[arg(long, default_value_t = 0)]
    queue: u32,
    /// Receive on this many queues from --queue on, a thread and socket each (the sender's
    /// flows stay on one queue each, as RSS keeps a flow on one queue).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    queues: u32,
    /// Pin the i-th queue's thread to the i-th core of this comma-separated list.
    #[arg(long, value_delimiter = ',')]
    cores: Vec<usize>,
    /// Stop after this long (e.g. 10, 2.5s, 500ms).
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Stop once this many probes arrived (over all queues).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    count: Option<u64>,
    /// Stop when no probe arrived for this long, once probes started arriving (e.g. 500ms).
    #[arg(long, value_parser = parse_duration)]
    idle_exit: Option<Duration>,
    /// Spin instead of sleeping in poll() when idle.
    #[arg(long)]
    busy: bool,
    #[command(flatten)]
    socket: SocketArgs,
    /// Write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the latency HdrHistogram interval log here.
    #[arg(long)]
    hlog: Option<PathBuf>,
    /// Interval of the histograms in the log (e.g. 1s).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    hlog_interval: Duration,
    /// Print a line of figures every second.
    #[arg(long)]
    progress: bool,
}

/// `gen reflect`
#[derive(Args, Debug)]
pub struct ReflectArgs {
    /// Interfaces (queue 0): two forward to each other, one reflects onto itself.
    #[arg(long = "port", required = true, num_args = 1)]
    ports: Vec<String>,
    /// Spin instead of sleeping in poll() when idle.
    #[arg(long)]
    busy: bool,
    #[command(flatten)]
    socket: SocketArgs,
    /// Write the report as JSON here on exit.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Runs a `gen` command; progress and the summary go to stdout.
pub fn run(command: GenCommand) -> anyhow::Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(&stop)).context("signal handler")?;
    }
    match command {
        GenCommand::Send(args) => {
            let show = args.progress;
            let (queues, cores) = (args.queues, args.cores.clone());
            if !cores.is_empty() && cores.len() != queues as usize {
                bail!("--cores lists {} cores for {queues} queues", cores.len());
            }
            let config = send_config(args)?;
            let report = if queues > 1 {
                let print = |l: &str| progress(show, l);
                let bound = &mut || ready(&config.iface);
                send::run_queues(&config, queues, &cores, &stop, bound, &print)?
            } else {
                pin(&cores)?;
                send::run(&config, &stop, &mut || ready(&config.iface), &mut |l| {
                    progress(show, l)
                })?
            };
            println!(
                "sent {} packets, {} bytes in {:.3} s: {:.0} pps, {:.1} Mbit/s ({} flows, mean frame {:.0} B)",
                report.sent_packets,
                report.sent_bytes,
                report.elapsed_s,
                report.pps,
                report.mbps,
                report.flows,
                report.mean_frame_bytes
            );
            crate::write_json(config.json.as_deref(), &report)?;
        }
        GenCommand::Recv(args) => {
            let show = args.progress;
            let (queues, cores) = (args.queues, args.cores.clone());
            if !cores.is_empty() && cores.len() != queues as usize {
                bail!("--cores lists {} cores for {queues} queues", cores.len());
            }
            let config = recv_config(args)?;
            let report = if queues > 1 {
                let print = |l: &str| progress(show, l);
                let bound = &mut || ready(&config.iface);
                recv::run_queues(&config, queues, &cores, &stop, bound, &print)?
            } else {
                pin(&cores)?;
                recv::run(&config, &stop, &mut || ready(&config.iface), &mut |l| {
                    progress(show, l)
                })?
            };
            let l = report.latency;
            println!(
                "received {} packets, {} bytes in {:.3} s: {:.0} pps, {:.1} Mbit/s; lost {} ({:.4} %), reordered {}, duplicates {}, other frames {}",
                report.seq.received,
                report.received_bytes,
                report.elapsed_s,
                report.pps,
                report.mbps,
                report.seq.lost,
                report.loss_ratio * 100.0,
                report.seq.reordered,
                report.seq.duplicates,
                report.other_frames
            );
            println!(
                "one-way latency µs: p50 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}  ({} samples)",
                l.p50_ns as f64 / 1e3,
                l.p99_ns as f64 / 1e3,
                l.p999_ns as f64 / 1e3,
                l.max_ns as f64 / 1e3,
                l.samples
            );
            crate::write_json(config.json.as_deref(), &report)?;
        }
        GenCommand::Reflect(args) => {
            if args.ports.len() > 2 {
                bail!(
                    "--port given {} times; the reflector takes one or two",
                    args.ports.len()
                );
            }
            let ports = args.ports.clone();
            let report = reflect::run(
                &args.ports,
                &args.socket.xsk(),
                args.busy,
                &stop,
                &mut || ready(&ports.join(",")),
            )?;
            println!(
                "reflected {} packets, dropped {}; cpu {} ms user, {} ms sys",
                report.forwarded_packets,
                report.dropped_packets,
                report.cpu_user_ms,
                report.cpu_sys_ms
            );
            crate::write_json(args.json.as_deref(), &report)?;
        }
    }
    Ok(())
}

/// Pins the calling thread to the first of `cores`, if any.
fn pin(cores: &[usize]) -> anyhow::Result<()> {
    match cores.first() {
        Some(&id) if !core_affinity::set_for_current(core_affinity::CoreId { id }) => {
            bail!("cannot pin to core {id}")
        }
        _ => Ok(()),
    }
}

/// A progress line, when asked for.
fn progress(show: bool, line: &str) {
    if show {
        use std::io::Write;
        println!("{line}");
        let _ = std::io::stdout().flush();
    }
}

/// Printed (and flushed) once the socket is bound; scripts and tests wait for it.
fn ready(iface: &str) {
    use std::io::Write;
    println!("bound {iface}");
    let _ = std::io::stdout().flush();
}

/// Checks the flags that clap cannot check alone and builds the sender's configuration.
pub fn send_config(a: SendArgs) -> anyhow::Result<SendConfig> {
    let replay = match &a.pcap {
        Some(path) => {
            let mut capture = replay::Capture::load(path, probe::MAX_FRAME_LEN - probe::FCS_LEN)?;
            let rewrite = replay::Rewrite {
                src_mac: a.src_mac,
                dst_mac: a.dst_mac,
                src_ip: a.src,
                dst_ip: a.dst,
            };
            capture.frames.iter_mut().for_each(|f| rewrite.apply(f));
            if (capture.frames.len() as u64) < u64::from(a.queues) {
                bail!(
                    "--queues {} needs at least {} frames in {}, which has {}",
                    a.queues,
                    a.queues,
                    path.display(),
                    capture.frames.len()
                );
            }
            Some(send::Replay {
                capture: Arc::new(capture),
                loops: a.loops,
            })
        }
        None => None,
    };
    let (default_src, default_dst): (IpAddr, IpAddr) = if a.ipv6 {
        ("fd00::1".parse()?, "fd00::2".parse()?)
    } else {
        ("198.18.0.1".parse()?, "198.18.0.2".parse()?)
    };
    if a.pcap.is_none() && a.queues > a.flows {
        bail!(
            "--queues {} needs at least {} --flows: each queue sends flows of its own",
            a.queues,
            a.queues
        );
    }
    let src_ip = a.src.unwrap_or(default_src);
    let dst_ip = a.dst.unwrap_or(default_dst);
    if replay.is_none() && src_ip.is_ipv6() != dst_ip.is_ipv6() {
        bail!("--src {src_ip} and --dst {dst_ip} are not of the same IP version");
    }
    if a.ipv6 && !dst_ip.is_ipv6() {
        bail!("--ipv6 with IPv4 addresses ({src_ip}, {dst_ip})");
    }
    let sizes = match (&a.size, &a.imix) {
        (Some(size), _) => SizeMix::fixed(*size),
        (None, Some(mix)) => SizeMix::parse(mix)?,
        (None, None) => SizeMix::fixed(64),
    };
    let v6 = dst_ip.is_ipv6();
    let min = probe::min_frame_len(v6);
    if let Some(bad) = sizes
        .sizes
        .iter()
        .find(|s| !(min..=probe::MAX_FRAME_LEN).contains(*s))
    {
        bail!(
            "frame size {bad} is outside {min}..={} bytes for {} (sizes include the 4-byte FCS)",
            probe::MAX_FRAME_LEN,
            if v6 { "IPv6" } else { "IPv4" }
        );
    }
    let rate = match (a.pps, a.bps) {
        (Some(pps), _) if pps > 0.0 => Rate::Pps(pps),
        (_, Some(bps)) if bps > 0.0 => Rate::Bps(bps),
        (None, None) => Rate::Unlimited,
        _ => bail!("--pps and --bps must be greater than 0"),
    };
    let src_mac = match a.src_mac {
        Some(mac) => mac,
        None => interface_mac(&a.iface)?,
    };
    let fault = match (a.fault_skip_every, a.fault_swap_every) {
        (Some(n), _) => Fault::SkipEvery(n),
        (_, Some(n)) => Fault::SwapEvery(n),
        _ => Fault::None,
    };
    Ok(SendConfig {
        garble: a.garble,
        replay,
        iface: a.iface,
        queue: a.queue,
        base: FlowAddrs {
            src_mac,
            dst_mac: a.dst_mac.unwrap_or([0xff; 6]),
            src_ip,
            dst_ip,
            src_port: a.src_port,
            dst_port: a.dst_port,
        },
        flows: a.flows,
        share: send::Share::ALL,
        vary: if a.vary.is_empty() {
            vec![Vary::SrcPort]
        } else {
            a.vary
        },
        sizes,
        rate,
        count: a.count,
        duration: a.duration,
        batch: usize::from(a.batch),
        xsk: a.socket.xsk(),
        fault,
        json: a.json,
    })
}

fn recv_config(a: RecvArgs) -> anyhow::Result<RecvConfig> {
    if a.hlog_interval < Duration::from_millis(1) {
        bail!("--hlog-interval must be at least 1ms");
    }
    Ok(RecvConfig {
        iface: a.iface,
        queue: a.queue,
        duration: a.duration,
        count: a.count,
        idle_exit: a.idle_exit,
        xsk: a.socket.xsk(),
        hlog_interval: a.hlog_interval,
        hlog: a.hlog,
        json: a.json,
        busy: a.busy,
    })
}

/// The MAC address of `iface` in this network namespace.
fn interface_mac(iface: &str) -> anyhow::Result<[u8; 6]> {
    let path = format!("/sys/class/net/{iface}/address");
    let text = std::fs::read_to_string(&path)
        .map_err(|_| anyhow::anyhow!("interface {iface} not found"))?;
    parse_mac(text.trim()).map_err(|e| anyhow::anyhow!("{path}: {e}"))
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(text: &str) -> Result<[u8; 6], String> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in mac.iter_mut() {
        // Two hex digits: `from_str_radix` alone would take a sign as well ("+f").
        let part = parts
            .next()
            .filter(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or_else(|| bad_mac(text))?;
        *byte = u8::from_str_radix(part, 16).map_err(|_| bad_mac(text))?;
    }
    if parts.next().is_some() {
        return Err(bad_mac(text));
    }
    Ok(mac)
}

fn bad_mac(text: &str) -> String {
    format!("{text:?} is not a MAC address (aa:bb:cc:dd:ee:ff)")
}

/// A positive number with an optional k, M or G suffix (powers of 1000).
pub fn parse_si(text: &str) -> Result<f64, String> {
    let (num, mult) = match text.char_indices().last() {
        Some((i, 'k' | 'K')) => (&text[..i], 1e3),
        Some((i, 'M')) => (&text[..i], 1e6),
        Some((i, 'G' | 'g')) => (&text[..i], 1e9),
        _ => (text, 1.0),
    };
    match num.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v * mult <= 1e12 => Ok(v * mult),
        _ => Err(format!(
            "{text:?} is not a positive rate (e.g. 100000, 1.5M, 10G)"
        )),
    }
}

/// `10` (seconds), `2.5s`, `500ms`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let (num, scale) = if let Some(n) = text.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1.0)
    } else {
        (text, 1.0)
    };
    match num.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v * scale <= 86_400.0 => {
            Ok(Duration::from_secs_f64(v * scale))
        }
        _ => Err(format!(
            "{text:?} is not a duration up to a day (e.g. 10, 2.5s, 500ms)"
        )),
    }
}

fn parse_ring_size(text: &str) -> Result<u32, String> {
    match text.parse::<u32>() {
        Ok(n) if n.is_power_of_two() && (64..=16384).contains(&n) => Ok(n),
        _ => Err(format!("{text:?} is not a power of two in 64..=16384")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_parse_or_are_refused() {
        assert_eq!(parse_mac("02:00:0a:FF:00:01"), Ok([2, 0, 10, 255, 0, 1]));
        for bad in [
            "",
            "02:00:0a:ff:00",
            "02:00:0a:ff:00:01:02",
            "0g:00:00:00:00:00",
            "2:0:0:0:0:1",
            "+2:00:00:00:00:01",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad:?}");
        }
        assert_eq!(parse_si("1.5M"), Ok(1.5e6));
        assert_eq!(parse_si("10G"), Ok(1e10));
        assert_eq!(parse_si("500k"), Ok(5e5));
        for bad in ["", "0", "-5", "M", "1e400", "inf", "nan", "5x"] {
            assert!(parse_si(bad).is_err(), "{bad:?}");
        }
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2.5s"), Ok(Duration::from_millis(2500)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        for bad in ["", "0", "-1", "s", "1h", "100000"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
        assert_eq!(parse_ring_size("2048"), Ok(2048));
        assert!(parse_ring_size("1000").is_err());
    }
}
