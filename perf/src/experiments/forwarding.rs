//! Forwarding rate of 64-byte frames, one generator, in the same run: the generator's own
//! ceiling, mimiq-switch `l2fwd`, a bare AF_XDP reflector (the ceiling of AF_XDP forwarding
//! here) and the kernel's own IP forwarding on an identical three-namespace topology. Every
//! path: `gen send` on h1 as fast as it can for the same time, the forwarder on the middle
//! host, and on h2 one of two sinks: the kernel dropping the frames at once (addressed to a MAC
//! nobody has: the rate the forwarder sustains), or `gen recv` (end to end, with loss and
//! latency; on two cores the receiver competes with the sender and the forwarder).

use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;

use crate::switch::Switch;
use crate::testbed::{bin_path, topology, LinkOpts, Proc, Testbed};

/// What sits between the generator and the receiver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Path {
    /// Nothing: one veth into a namespace whose kernel drops the frames (wrong MAC).
    GeneratorCeiling,
    /// `mimiq-perf gen reflect` on the middle host: AF_XDP with no per-packet work.
    AfXdpReflector,
    /// `mimiq-switch --role l2fwd` on the middle host (idle strategy adaptive).
    MimiqSwitch,
    /// `mimiq-switch --role l2fwd --idle busy`.
    MimiqSwitchBusy,
    /// `mimiq-switch --role l2fwd --xdp-mode skb` (generic XDP).
    MimiqSwitchSkb,
    /// The middle host's kernel routing between two subnets (ip_forward=1).
    KernelForwarding,
}

/// What takes the frames at the end of the path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Sink {
    /// h2's kernel, dropping frames for a foreign MAC as soon as the veth sees them.
    KernelDrop,
    /// `mimiq-perf gen recv` on h2 (AF_XDP): counts, loss, latency.
    Receiver,
}

/// A MAC address no interface has: frames to it die at the first kernel that sees them.
const NOBODY_MAC: &str = "02:00:00:00:00:99";

/// What one path measured.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    /// The path.
    pub path: Path,
    /// The sink.
    pub sink: Sink,
    /// The rate compared across paths: received pps with the receiver, forwarded pps (sent
    /// pps for the ceiling) with the kernel sink.
    pub delivered_pps: f64,
    /// Probes the generator sent, and its rate.
    pub sent_packets: u64,
    /// Sender packets per second.
    pub sent_pps: f64,
    /// Frames the forwarder transmitted towards h2 (its egress veth's tx_packets).
    pub forwarded_packets: Option<u64>,
    /// Forwarded frames per second of the sender's run time.
    pub forwarded_pps: Option<f64>,
    /// Probes the receiver counted.
    pub received_packets: Option<u64>,
    /// Received probes per second of the sender's run time.
    pub received_pps: Option<f64>,
    /// One-way latency median and 99th percentile (µs) at this load: mostly queueing.
    pub latency_p50_us: Option<f64>,
    /// 99th percentile.
    pub latency_p99_us: Option<f64>,
    /// CPU time (user + system) of the forwarding process per forwarded frame, ns. The kernel's
    /// forwarding runs in softirq context, charged to whichever process is on the CPU: none.
    pub forwarder_cpu_ns_per_packet: Option<f64>,
    /// CPU time of the sender per sent frame, ns.
    pub sender_cpu_ns_per_packet: f64,
    /// The commands run, in order (host: command).
    pub commands: Vec<String>,
}

/// Runs every path for `seconds` each, `repeat` times over (interleaved, so drift on a shared
/// machine hits every path alike), and returns the runs and a Markdown table of the medians.
pub fn compare(
    seconds: u32,
    repeat: u32,
    progress: &mut dyn FnMut(&str),
) -> Result<(Vec<Run>, String), String> {
    let mut runs = Vec::new();
    for round in 1..=repeat {
        for (sink, path) in [Sink::KernelDrop, Sink::Receiver]
            .into_iter()
            .flat_map(|sink| PATHS.map(|p| (sink, p)))
        {
            progress(&format!("round {round}/{repeat}: {path:?} into {sink:?}:"));
            let r = run(path, sink, seconds)?;
            progress(&format!(
                "  sent {:.0} pps, forwarded {}, received {}",
                r.sent_pps,
                r.forwarded_pps
                    .map_or("–".into(), |v| format!("{v:.0} pps")),
                r.received_pps.map_or("–".into(), |v| format!("{v:.0} pps"))
            ));
            runs.push(r);
        }
    }
    let md = markdown(&runs);
    Ok((runs, md))
}

const PATHS: [Path; 6] = [
    Path::GeneratorCeiling,
    Path::AfXdpReflector,
    Path::MimiqSwitch,
    Path::MimiqSwitchBusy,
    Path::MimiqSwitchSkb,
    Path::KernelForwarding,
];

/// The median of the finite values of `xs`.
fn median(mut xs: Vec<f64>) -> Option<f64> {
    xs.retain(|x| x.is_finite());
    xs.sort_by(f64::total_cmp);
    (!xs.is_empty()).then(|| xs[xs.len() / 2])
}

/// The figures of `bench forwarding --json`: the median delivered rate of `mimiq-switch`
/// (l2fwd, adaptive idle) into the kernel sink over the bare reflector's and over the kernel's
/// forwarding, and the same into the AF_XDP receiver.
pub fn summary(runs: &[Run]) -> serde_json::Value {
    let delivered = |path: Path, sink: Sink| {
        median(
            runs.iter()
                .filter(|r| r.path == path && r.sink == sink)
                .map(|r| r.delivered_pps)
                .collect(),
        )
    };
    let over = |base: Path, sink: Sink| {
        delivered(Path::MimiqSwitch, sink)
            .zip(delivered(base, sink))
            .map(|(switch, base)| switch / base)
    };
    serde_json::json!({
        "switch_over_reflector": over(Path::AfXdpReflector, Sink::KernelDrop),
        "switch_over_kernel": over(Path::KernelForwarding, Sink::KernelDrop),
        "switch_over_reflector_receiver": over(Path::AfXdpReflector, Sink::Receiver),
        "switch_over_kernel_receiver": over(Path::KernelForwarding, Sink::Receiver),
    })
}

/// The Markdown table: per path and sink, medians over the rounds of the rates, the ratios of
/// the delivered rate to the reflector's and to the kernel's, latency and CPU per frame.
pub fn markdown(runs: &[Run]) -> String {
    let of = |p: Path, s: Sink| runs.iter().filter(move |r| r.path == p && r.sink == s);
    let med = |p: Path, s: Sink, f: &dyn Fn(&Run) -> Option<f64>| {
        median(of(p, s).filter_map(f).collect())
    };
    let fmt = |v: Option<f64>, digits: usize| v.map_or("–".into(), |v| format!("{v:.digits$}"));
    let mut md = String::from(
        "| path | sink | runs | sent pps | forwarded pps | received pps | delivered pps (min–max) | ÷ reflector | ÷ kernel | p50 / p99 µs | forwarder CPU ns/frame | sender CPU ns/frame |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for sink in [Sink::KernelDrop, Sink::Receiver] {
        let reflector = med(Path::AfXdpReflector, sink, &|r| Some(r.delivered_pps));
        let kernel = med(Path::KernelForwarding, sink, &|r| Some(r.delivered_pps));
        for path in PATHS {
            let n = of(path, sink).count();
            if n == 0 {
                continue;
            }
            let delivered = med(path, sink, &|r| Some(r.delivered_pps));
            let lo = of(path, sink)
                .map(|r| r.delivered_pps)
                .fold(f64::INFINITY, f64::min);
            let hi = of(path, sink).map(|r| r.delivered_pps).fold(0.0, f64::max);
            let ratio = |base: Option<f64>| {
                (path != Path::GeneratorCeiling)
                    .then_some(())
                    .and(delivered.zip(base).map(|(d, b)| d / b))
            };
            md.push_str(&format!(
                "| {path:?} | {sink:?} | {n} | {} | {} | {} | {} ({lo:.0}–{hi:.0}) | {} | {} | {} / {} | {} | {} |\n",
                fmt(med(path, sink, &|r| Some(r.sent_pps)), 0),
                fmt(med(path, sink, &|r| r.forwarded_pps), 0),
                fmt(med(path, sink, &|r| r.received_pps), 0),
                fmt(delivered, 0),
                fmt(ratio(reflector), 2),
                fmt(ratio(kernel), 2),
                fmt(med(path, sink, &|r| r.latency_p50_us), 0),
                fmt(med(path, sink, &|r| r.latency_p99_us), 0),
                fmt(med(path, sink, &|r| r.forwarder_cpu_ns_per_packet), 0),
                fmt(med(path, sink, &|r| Some(r.sender_cpu_ns_per_packet)), 0),
            ));
        }
    }
    md
}

/// One path, on a fresh testbed.
pub fn run(path: Path, sink: Sink, seconds: u32) -> Result<Run, String> {
    let perf = bin_path("mimiq-perf")?;
    let perf = perf.to_str().ok_or("binary path is not UTF-8")?.to_string();
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let file = |name: &str| dir.path().join(name).to_string_lossy().into_owned();
    let mut tb = Testbed::new().map_err(|e| e.to_string())?;
    let mut commands = Vec::new();
    let secs = seconds.to_string();
    let mut send_args: Vec<String> = [
        "gen",
        "send",
        "--iface",
        "eth0",
        "--size",
        "64",
        "--flows",
        "16",
        "--duration",
        &secs,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    send_args.extend(["--json".into(), file("send.json")]);

    // The topology and the forwarder.
    let (egress, mut forwarder, switch): (Option<(&str, &str)>, Option<Proc>, Option<Switch>) =
        match path {
            Path::GeneratorCeiling => {
                tb.add_host("h1").map_err(|e| e.to_string())?;
                tb.add_host("h2").map_err(|e| e.to_string())?;
                tb.add_link(("h1", "eth0"), ("h2", "eth0"), LinkOpts::default())
                    .map_err(|e| e.to_string())?;
                (None, None, None)
            }
            Path::AfXdpReflector => {
                topology::line(&mut tb).map_err(|e| e.to_string())?;
                let cmd = [
                    perf.as_str(),
                    "gen",
                    "reflect",
                    "--port",
                    "p0",
                    "--port",
                    "p1",
                    "--json",
                    &file("reflect.json"),
                ];
                commands.push(format!("sw: {}", cmd[1..].join(" ")));
                let proc = tb.spawn("sw", &cmd, true).map_err(|e| e.to_string())?;
                wait_bound(&proc)?;
                (Some(("sw", "p1")), Some(proc), None)
            }
            Path::MimiqSwitch | Path::MimiqSwitchBusy | Path::MimiqSwitchSkb => {
                topology::line(&mut tb).map_err(|e| e.to_string())?;
                let mut args = vec![
                    "--role",
                    "l2fwd",
                    "--port",
                    "p0",
                    "--port",
                    "p1",
                    "--stats-interval-ms",
                    "100",
                ];
                match path {
                    Path::MimiqSwitchBusy => args.extend(["--idle", "busy"]),
                    Path::MimiqSwitchSkb => args.extend(["--xdp-mode", "skb"]),
                    _ => {}
                }
                commands.push(format!(
                    "sw: mimiq-switch run {} --stats-path S",
                    args.join(" ")
                ));
                let sw = Switch::start(&tb, "sw", &args, &dir.path().join("switch.json"))?;
                (Some(("sw", "p1")), None, Some(sw))
            }
            Path::KernelForwarding => {
                routed(&mut tb, sink).map_err(|e| e.to_string())?;
                let r_mac = read(&tb, "r", "/sys/class/net/p0/address")?;
                send_args.extend(["--dst".into(), ROUTED_H2.into(), "--dst-mac".into(), r_mac]);
                commands.push(
                    "r: sysctl net.ipv4.ip_forward=1 (routes 198.18.0.0/24 ↔ 198.18.1.0/24)".into(),
                );
                (Some(("r", "p1")), None, None)
            }
        };

    if sink == Sink::KernelDrop && path != Path::KernelForwarding {
        send_args.extend(["--dst-mac".into(), NOBODY_MAC.into()]);
    }
    let receiver = if sink == Sink::KernelDrop {
        None
    } else {
        let cmd = [
            perf.as_str(),
            "gen",
            "recv",
            "--iface",
            "eth0",
            "--json",
            &file("recv.json"),
        ];
        commands.push(format!("h2: {}", cmd[1..].join(" ")));
        let proc = tb.spawn("h2", &cmd, true).map_err(|e| e.to_string())?;
        wait_bound(&proc)?;
        Some(proc)
    };

    let egress_before = egress
        .map(|(h, i)| counter(&tb, h, i, "tx_packets"))
        .transpose()?;
    let switch_before = switch.as_ref().map(Switch::stats).transpose()?;
    let mut cmd = vec![perf.as_str()];
    cmd.extend(send_args.iter().map(String::as_str));
    commands.push(format!("h1: {}", send_args.join(" ")));
    let mut sender = tb.spawn("h1", &cmd, true).map_err(|e| e.to_string())?;
    let status = sender
        .wait_timeout(Duration::from_secs(u64::from(seconds) + 60))
        .ok_or_else(|| format!("sender did not finish: {}", sender.describe()))?;
    if !status.success() {
        return Err(format!("sender failed: {}", sender.describe()));
    }
    std::thread::sleep(Duration::from_millis(300));
    let sent = json(&file("send.json"))?;
    let sent_packets = sent["sent_packets"].as_u64().unwrap_or(0);
    let elapsed = sent["elapsed_s"].as_f64().unwrap_or(f64::NAN);
    let sender_cpu_ms = (sent["cpu_user_ms"].as_u64().unwrap_or(0)
        + sent["cpu_sys_ms"].as_u64().unwrap_or(0)) as f64;

    let forwarded = match (egress, egress_before) {
        (Some((h, i)), Some(before)) => Some(counter(&tb, h, i, "tx_packets")? - before),
        _ => None,
    };
    let forwarder_cpu_ms = match (&switch, &switch_before) {
        (Some(sw), Some(before)) => {
            Some((sw.stats_settled(Duration::from_secs(10))?.cpu_ms() - before.cpu_ms()) as f64)
        }
        _ => match forwarder.as_mut() {
            Some(proc) => {
                proc.stop(Duration::from_secs(5));
                let r = json(&file("reflect.json"))?;
                Some(
                    (r["cpu_user_ms"].as_u64().unwrap_or(0) + r["cpu_sys_ms"].as_u64().unwrap_or(0))
                        as f64,
                )
            }
            None => None,
        },
    };
    let received = match receiver {
        Some(mut proc) => {
            proc.stop(Duration::from_secs(5));
            Some(json(&file("recv.json"))?)
        }
        None => None,
    };
    let received_packets = received.as_ref().and_then(|r| r["received"].as_u64());
    let lat = |q: &str| {
        received
            .as_ref()
            .and_then(|r| r["latency"][q].as_u64())
            .map(|ns| ns as f64 / 1e3)
    };
    let delivered_pps = match (sink, path) {
        (Sink::Receiver, _) => received_packets.unwrap_or(0) as f64 / elapsed,
        (Sink::KernelDrop, Path::GeneratorCeiling) => sent_packets as f64 / elapsed,
        (Sink::KernelDrop, _) => forwarded.unwrap_or(0) as f64 / elapsed,
    };
    Ok(Run {
        path,
        sink,
        delivered_pps,
        sent_packets,
        sent_pps: sent_packets as f64 / elapsed,
        forwarded_packets: forwarded,
        forwarded_pps: forwarded.map(|f| f as f64 / elapsed),
        received_packets,
        received_pps: received_packets.map(|r| r as f64 / elapsed),
        latency_p50_us: lat("p50_ns"),
        latency_p99_us: lat("p99_ns"),
        forwarder_cpu_ns_per_packet: forwarder_cpu_ms
            .zip(forwarded)
            .map(|(ms, f)| ms * 1e6 / f.max(1) as f64),
        sender_cpu_ns_per_packet: sender_cpu_ms * 1e6 / sent_packets.max(1) as f64,
        commands,
    })
}

/// h2's address on the routed topology.
pub const ROUTED_H2: &str = "198.18.1.2";

/// `h1:eth0 (198.18.0.1/24) — p0:r:p1 — eth0:h2 (198.18.1.2/24)`, r forwarding IPv4 between
/// the two subnets. h2's receiver takes every frame off its interface (ARP too), so r knows
/// h2's MAC from a permanent neighbour entry, as a router with static ARP would; with the
/// kernel sink that entry names a MAC nobody has, so h2 drops the frames on arrival.
pub fn routed(tb: &mut Testbed, sink: Sink) -> Result<(), String> {
    let e = |e: crate::testbed::TestbedError| e.to_string();
    for host in ["h1", "r", "h2"] {
        tb.add_host(host).map_err(e)?;
    }
    tb.add_link(("h1", "eth0"), ("r", "p0"), LinkOpts::default())
        .map_err(e)?;
    tb.add_link(("r", "p1"), ("h2", "eth0"), LinkOpts::default())
        .map_err(e)?;
    tb.add_addr("h1", "eth0", "198.18.0.1/24").map_err(e)?;
    tb.add_addr("r", "p0", "198.18.0.254/24").map_err(e)?;
    tb.add_addr("r", "p1", "198.18.1.254/24").map_err(e)?;
    tb.add_addr("h2", "eth0", "198.18.1.2/24").map_err(e)?;
    tb.add_route("h1", "198.18.1.0/24", "198.18.0.254")
        .map_err(e)?;
    tb.add_route("h2", "198.18.0.0/24", "198.18.1.254")
        .map_err(e)?;
    tb.sysctl("r", "net.ipv4.ip_forward", "1").map_err(e)?;
    for key in [
        "net.ipv4.conf.all.rp_filter",
        "net.ipv4.conf.default.rp_filter",
    ] {
        tb.sysctl("r", key, "0").map_err(e)?;
    }
    let h2_mac = match sink {
        Sink::Receiver => read(tb, "h2", "/sys/class/net/eth0/address")?,
        Sink::KernelDrop => NOBODY_MAC.to_string(),
    };
    tb.exec_ok(
        "r",
        &[
            "ip",
            "neigh",
            "replace",
            ROUTED_H2,
            "lladdr",
            &h2_mac,
            "dev",
            "p1",
            "nud",
            "permanent",
        ],
    )
    .map_err(e)?;
    Ok(())
}

fn wait_bound(proc: &Proc) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !proc.stdout().contains("bound ") {
        if Instant::now() > deadline {
            return Err(format!("not bound after 20 s: {}", proc.describe()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn read(tb: &Testbed, host: &str, path: &str) -> Result<String, String> {
    let out = tb
        .exec_ok(host, &["cat", path])
        .map_err(|e| e.to_string())?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn counter(tb: &Testbed, host: &str, iface: &str, name: &str) -> Result<u64, String> {
    let text = read(
        tb,
        host,
        &format!("/sys/class/net/{iface}/statistics/{name}"),
    )?;
    text.parse()
        .map_err(|e| format!("{iface} {name} {text:?}: {e}"))
}

fn json(path: &str) -> Result<Value, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
    serde_json::from_str(&text).map_err(|e| format!("{path}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(path: Path, sink: Sink, delivered_pps: f64) -> Run {
        Run {
            path,
            sink,
            delivered_pps,
            sent_packets: 0,
            sent_pps: 1.0,
            forwarded_packets: None,
            forwarded_pps: None,
            received_packets: None,
            received_pps: None,
            latency_p50_us: None,
            latency_p99_us: None,
            forwarder_cpu_ns_per_packet: None,
            sender_cpu_ns_per_packet: 0.0,
            commands: Vec::new(),
        }
    }

    #[test]
    fn the_table_shows_medians_and_ratios_of_medians_within_a_sink() {
        let mut runs = Vec::new();
        for (reflector, switch, kernel) in [
            (100.0, 90.0, 200.0),
            (120.0, 60.0, 210.0),
            (80.0, 99.0, 190.0),
        ] {
            runs.push(run(Path::AfXdpReflector, Sink::KernelDrop, reflector));
            runs.push(run(Path::MimiqSwitch, Sink::KernelDrop, switch));
            runs.push(run(Path::KernelForwarding, Sink::KernelDrop, kernel));
        }
        let md = markdown(&runs);
        // Medians: reflector 100, switch 90, kernel 200.
        assert!(
            md.contains("| MimiqSwitch | KernelDrop | 3 | 1 | – | – | 90 (60–99) | 0.90 | 0.45 |"),
            "{md}"
        );
        assert!(
            md.contains(
                "| AfXdpReflector | KernelDrop | 3 | 1 | – | – | 100 (80–120) | 1.00 | 0.50 |"
            ),
            "{md}"
        );
        assert!(
            !md.contains("Receiver"),
            "no rows for a sink that was not run"
        );
    }
}
