//! The sender: numbered, timestamped UDP probes on one AF_XDP queue.
//!
//! Per burst: reclaim completed frames, refill the token bucket, fill up to `batch` free frames
//! from the flow templates (a copy of the headers, zeroed padding, the sequence number and time
//! written, the UDP checksum finished), hand them to the TX ring. The clock is read once per
//! burst, so all probes of a burst carry the same send time. Flows take turns (packet `i` is
//! flow `i % flows`); sizes follow the mix's pattern, shifted per flow so every flow sees every
//! size.
//!
//! Measured cost (`mimiq-perf bench forwarding`, docs/PERFORMANCE.md): 560–680 ns of CPU per
//! 64-byte frame at ~1.45 Mpps on veth, nearly all of it system time in `sendto` (copy mode
//! builds an skb per frame); the per-packet user-space work is a 58-byte copy and a checksum.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use mimiq_dataplane::port::xsk::{self, XskConfig};
use mimiq_dataplane::port::{FrameMemory, Port, XdpStats};
use serde::Serialize;

use super::probe::{FlowAddrs, Template, TemplateError};
use super::rate::{Rate, SizeMix, TokenBucket};
use super::replay::Capture;
use super::seq::{Fault, FaultCounters, FlowNumbering};
use super::{cpu_time_ms, monotonic_ns};

/// Which header field differs between flows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Vary {
    /// UDP source port (the default).
    SrcPort,
    /// UDP destination port.
    DstPort,
    /// IP source address.
    SrcIp,
    /// IP destination address.
    DstIp,
}

/// Hostile frames instead of probes: each frame is built as a probe and then spoilt, so that
/// every parser on the way sees what a broken or hostile host sends at the generator's rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Garble {
    /// Random bytes after the Ethernet header (the IP ethertype kept).
    Random,
    /// Cut short at a random length, from one byte to the whole frame (runts included).
    Truncated,
    /// A random ethertype that is neither IP nor ARP.
    Ethertype,
    /// The three in turn.
    Mixed,
}

impl Garble {
    /// Spoils `frame` (a whole probe) in place; returns the length to send.
    pub fn apply(self, frame: &mut [u8], n: u64, rng: &mut u64) -> usize {
        let mut next = || {
            // xorshift64: cheap, and every frame different.
            *rng ^= *rng << 13;
            *rng ^= *rng >> 7;
            *rng ^= *rng << 17;
            *rng
        };
        let how = match self {
            Garble::Mixed => {
                [Garble::Random, Garble::Truncated, Garble::Ethertype][(n % 3) as usize]
            }
            g => g,
        };
        match how {
            Garble::Truncated => 1 + (next() % frame.len().max(1) as u64) as usize,
            Garble::Ethertype => {
                let t = loop {
                    let t = (next() as u16).to_be_bytes();
                    if !matches!(t, [0x08, 0x00] | [0x86, 0xdd] | [0x08, 0x06]) {
                        break t;
                    }
                };
                frame[12..14].copy_from_slice(&t);
                frame.len()
            }
            _ => {
                for chunk in frame[14..].chunks_mut(8) {
                    let r = next().to_le_bytes();
                    chunk.copy_from_slice(&r[..chunk.len()]);
                }
                frame.len()
            }
        }
    }
}

/// What to send.
#[derive(Debug, Clone)]
pub struct SendConfig {
    /// Interface and queue.
    pub iface: String,
    /// Queue index.
    pub queue: u32,
    /// Addresses of flow 0.
    pub base: FlowAddrs,
    /// Number of flows (1..=65536).
    pub flows: u32,
    /// Which of them this sender sends.
    pub share: Share,
    /// Fields that differ between flows: flow `i` adds `i` to each.
    pub vary: Vec<Vary>,
    /// Frame sizes.
    pub sizes: SizeMix,
    /// Rate.
    pub rate: Rate,
    /// Stop after this many packets.
    pub count: Option<u64>,
    /// Stop after this long.
    pub duration: Option<Duration>,
    /// Frames per TX burst (1..=64).
    pub batch: usize,
    /// Socket options.
    pub xsk: XskConfig,
    /// Test-only numbering faults.
    pub fault: Fault,
    /// Hostile frames instead of probes.
    pub garble: Option<Garble>,
    /// A capture's frames instead of probes.
    pub replay: Option<Replay>,
    /// Where the JSON report goes.
    pub json: Option<PathBuf>,
}

/// A capture to send instead of probes (`--pcap`): its frames in order, `loops` times over
/// (0: until the count, the duration or a stop); with several senders, sender `i` of `n`
/// sends frames `i`, `i + n`, ...
#[derive(Debug, Clone)]
pub struct Replay {
    /// The frames, addresses already rewritten.
    pub capture: std::sync::Arc<Capture>,
    /// Passes over the capture.
    pub loops: u64,
}

/// What a replay sent, in the report.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ReplayFigures {
    /// Frames of the capture this sender sends per pass.
    pub frames_per_pass: u64,
    /// Frames of the file left out (not Ethernet, cut short by the capture, too long).
    pub skipped: u64,
    /// Passes sent (a fraction when stopped midway).
    pub passes: f64,
}

/// Which flows one of several senders sends: those with `flow % of == index`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Share {
    /// This sender's index.
    pub index: u32,
    /// Senders.
    pub of: u32,
}

impl Share {
    /// Every flow: the only sender.
    pub const ALL: Share = Share { index: 0, of: 1 };

    /// The flows of `0..flows` that are this sender's.
    pub fn flows(self, flows: u32) -> impl Iterator<Item = u32> {
        (self.index..flows).step_by(self.of.max(1) as usize)
    }
}

/// One queue's figures in a report of several.
#[derive(Debug, Clone, Serialize)]
pub struct QueueFigures {
    /// The queue.
    pub queue: u32,
    /// Packets it sent (or received).
    pub packets: u64,
    /// Per second of its own run.
    pub pps: f64,
    /// Kernel socket statistics.
    pub xdp: Option<XdpStats>,
}

/// What the sender did.
#[derive(Debug, Clone, Serialize)]
pub struct SendReport {
    /// Interface.
    pub iface: String,
    /// Probes handed to the TX ring (and completed by the kernel).
    pub sent_packets: u64,
    /// Their bytes, frames counted with FCS.
    pub sent_bytes: u64,
    /// First to last burst, seconds.
    pub elapsed_s: f64,
    /// Packets per second.
    pub pps: f64,
    /// Megabits per second (frames with FCS).
    pub mbps: f64,
    /// Flows.
    pub flows: u32,
    /// Mean frame size, bytes with FCS.
    pub mean_frame_bytes: f64,
    /// Times the TX ring had no room for a whole burst.
    pub tx_ring_full: u64,
    /// Packets the rate asked for that the sender could not send, because it was not scheduled
    /// (or had no free frame) for longer than its 10 ms token bucket covers. 0 when unlimited.
    pub rate_deficit_packets: u64,
    /// Frames that arrived on the sender's queue (returned unread).
    pub rx_ignored: u64,
    /// Frames the kernel had not completed when the sender gave up waiting (should be 0).
    pub tx_unfinished: u64,
    /// Numbering faults injected (tests only).
    pub faults: FaultCounters,
    /// Kernel socket statistics.
    pub xdp: Option<XdpStats>,
    /// CPU time of the sender process, user, ms.
    pub cpu_user_ms: u64,
    /// CPU time of the sender process, system, ms.
    pub cpu_sys_ms: u64,
    /// The capture replayed, with `--pcap`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replay: Option<ReplayFigures>,
    /// Per queue, when several sent (`--queues`); the figures above are their sums.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub queues: Vec<QueueFigures>,
}

/// Why the sender could not run.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// A flow's frame could not be built.
    #[error(transparent)]
    Template(#[from] TemplateError),
    /// The AF_XDP socket could not be opened.
    #[error(transparent)]
    Open(#[from] xsk::OpenError),
    /// More senders than flows: one would have none to send.
    #[error("a sender has no flow: give at least as many --flows as --queues")]
    NoFlows,
    /// A sender's thread could not start or be pinned.
    #[error("{0}")]
    Thread(String),
}

/// Builds the templates of this sender's flows: index `flow * sizes + size`, `flow` counting
/// its own flows.
pub fn templates(config: &SendConfig) -> Result<Vec<Template>, TemplateError> {
    let mut out = Vec::with_capacity(config.flows as usize * config.sizes.sizes.len());
    for flow in config.share.flows(config.flows) {
        let addrs = flow_addrs(&config.base, &config.vary, flow);
        // flows ≤ 65536 (checked by the CLI), so the id fits 16 bits.
        let id = flow as u16;
        for &size in &config.sizes.sizes {
            out.push(Template::build(&addrs, id, size)?);
        }
    }
    Ok(out)
}

/// The addresses of flow `i`.
pub fn flow_addrs(base: &FlowAddrs, vary: &[Vary], i: u32) -> FlowAddrs {
    let mut a = *base;
    for v in vary {
        match v {
            Vary::SrcPort => a.src_port = base.src_port.wrapping_add(i as u16),
            Vary::DstPort => a.dst_port = base.dst_port.wrapping_add(i as u16),
            Vary::SrcIp => a.src_ip = add_to_ip(base.src_ip, i),
            Vary::DstIp => a.dst_ip = add_to_ip(base.dst_ip, i),
        }
    }
    a
}

fn add_to_ip(ip: IpAddr, i: u32) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(u32::from(v4).wrapping_add(i).into()),
        IpAddr::V6(v6) => IpAddr::V6(u128::from(v6).wrapping_add(u128::from(i)).into()),
    }
}

/// Runs the sender until its count or duration is reached or `stop` is set. `ready` is called
/// once the socket is bound, `progress` once a second with a line of figures.
pub fn run(
    config: &SendConfig,
    stop: &AtomicBool,
    ready: &mut dyn FnMut(),
    progress: &mut dyn FnMut(&str),
) -> Result<SendReport, SendError> {
    let templates = templates(config)?;
    let nsizes = config.sizes.sizes.len();
    let flows = templates.len() / nsizes;
    if flows == 0 {
        return Err(SendError::NoFlows);
    }
    // This sender's frames of a capture, and how many it sends in all.
    let replay: Option<Vec<&[u8]>> = config.replay.as_ref().map(|r| {
        let of = config.share.of.max(1) as usize;
        let frames = r.capture.frames.iter().skip(config.share.index as usize);
        frames.step_by(of).map(Vec::as_slice).collect()
    });
    let count = match (&replay, &config.replay) {
        (Some(frames), Some(r)) if frames.is_empty() => return Err(SendError::NoFlows),
        (Some(frames), Some(r)) if r.loops > 0 => {
            let all = r.loops * frames.len() as u64;
            Some(config.count.map_or(all, |c| c.min(all)))
        }
        _ => config.count,
    };
    let pattern = &config.sizes.pattern;
    let (mut ports, mut memory, mut free) =
        xsk::open(&[(config.iface.clone(), config.queue)], &config.xsk)?;
    let port = &mut ports[0];
    ready();

    let batch = config.batch.clamp(1, 64);
    let (mean_frame, max_frame) = match &replay {
        Some(frames) => {
            let bytes = |f: &&[u8]| (f.len() + super::probe::FCS_LEN) as f64;
            let sum: f64 = frames.iter().map(bytes).sum();
            let max = frames.iter().map(bytes).fold(0.0, f64::max);
            (sum / frames.len() as f64, max)
        }
        None => (
            config.sizes.mean(),
            *config.sizes.sizes.iter().max().unwrap_or(&64) as f64,
        ),
    };
    let cost_in_bytes = matches!(config.rate, Rate::Bps(_));
    // Tokens per packet, the rate in tokens per second, and how many packets to gather before
    // a burst: about 50 µs worth, so low rates send small bursts instead of stuttering.
    let (per_s, cost_of): (f64, fn(&Template) -> f64) = match config.rate {
        Rate::Unlimited => (0.0, |_| 0.0),
        Rate::Pps(pps) => (pps, |_| 1.0),
        Rate::Bps(bps) => (bps / 8.0, |t| t.frame_len() as f64),
    };
    let unit = match config.rate {
        Rate::Bps(_) => mean_frame,
        _ => 1.0,
    };
    let pps = per_s / unit;
    let target = ((pps * 50e-6) as usize).clamp(1, batch);
    // The bucket holds 10 ms of tokens: a sender descheduled for up to 10 ms (a loaded machine)
    // catches up and keeps the average rate; longer stalls are lost rather than sent as one
    // long burst.
    let capacity = (pps * 10e-3).max(2.0 * batch as f64) * unit + max_frame;

    let start_ns = monotonic_ns();
    let mut bucket = TokenBucket::new(per_s, capacity, start_ns);
    let deadline_ns = config
        .duration
        .map(|d| start_ns.saturating_add(d.as_nanos() as u64));
    let mut numbering = vec![FlowNumbering::default(); flows];
    let mut faults = FaultCounters::default();
    let mut tx: Vec<_> = Vec::with_capacity(batch);
    let mut rx: Vec<_> = Vec::with_capacity(64);
    let (mut generated, mut sent, mut sent_bytes, mut tx_ring_full, mut rx_ignored) =
        (0u64, 0u64, 0u64, 0u64, 0u64);
    let mut last_burst_ns = start_ns;
    let mut round = 0usize; // position in the size pattern, advanced once per round of flows
    let mut rng = start_ns | 1;
    let mut flow = 0usize;
    let cpu0 = cpu_time_ms();
    let (mut progress_at_ns, mut progress_sent) = (start_ns + 1_000_000_000, 0u64);

    loop {
        port.reclaim(&mut free);
        if port.rx_burst(&mut rx, 64) > 0 {
            rx_ignored += rx.len() as u64;
            free.append(&mut rx);
        }
        let now = monotonic_ns();
        if now >= progress_at_ns {
            let t = (now - start_ns) / 1_000_000_000;
            progress(&format!(
                "t={t}s sent {} pps, {} total",
                sent - progress_sent,
                sent
            ));
            progress_at_ns += 1_000_000_000;
            progress_sent = sent;
        }
        let hard_stop = stop.load(Ordering::Relaxed) || deadline_ns.is_some_and(|d| now >= d);
        let count_done = count.is_some_and(|c| generated >= c);
        if hard_stop || (count_done && tx.is_empty()) {
            break;
        }
        if tx.is_empty() {
            let mut want = batch.min(free.len());
            if let Some(c) = count {
                want = want.min(c.saturating_sub(generated) as usize);
            }
            if per_s > 0.0 {
                bucket.refill(now);
                let wait = bucket.wait_ns(target.min(want.max(1)) as f64 * unit);
                if wait > 0 {
                    pace(wait);
                    continue;
                }
            }
            for _ in 0..want {
                if let Some(frames) = &replay {
                    let f = frames[(generated % frames.len() as u64) as usize];
                    let bytes = (f.len() + super::probe::FCS_LEN) as f64;
                    let cost = if cost_in_bytes { bytes } else { 1.0 };
                    if per_s > 0.0 && !bucket.take(cost) {
                        break;
                    }
                    let Some(mut frame) = free.pop() else { break };
                    let mut data = memory.data_mut(&mut frame);
                    data.cursor().set_pos(f.len());
                    data.contents_mut().copy_from_slice(f);
                    tx.push(frame);
                    generated += 1;
                    sent_bytes += bytes as u64;
                    continue;
                }
                let t = &templates
                    [flow * nsizes + usize::from(pattern[(round + flow) % pattern.len()])];
                if per_s > 0.0 && !bucket.take(cost_of(t)) {
                    break;
                }
                let Some(mut frame) = free.pop() else { break };
                let seq = numbering[flow].next_seq(config.fault, &mut faults);
                {
                    let mut data = memory.data_mut(&mut frame);
                    data.cursor().set_pos(t.len());
                    t.write(data.contents_mut(), seq, now);
                    if let Some(g) = config.garble {
                        let len = g.apply(data.contents_mut(), generated, &mut rng);
                        data.cursor().set_pos(len);
                    }
                }
                tx.push(frame);
                generated += 1;
                sent_bytes += t.frame_len() as u64;
                flow += 1;
                if flow == flows {
                    flow = 0;
                    round += 1;
                }
            }
        }
        let before = tx.len();
        let took = port.tx_burst(&mut tx);
        if took < before {
            tx_ring_full += 1;
        }
        sent += took as u64;
        if took > 0 {
            last_burst_ns = now;
        }
        if took == 0 && free.is_empty() {
            // Every frame is in the kernel: let it work instead of spinning on the rings.
            std::thread::yield_now();
        }
    }
    // A swap fault whose second packet is still held sends it now, or the receiver would count
    // it lost.
    for (i, n) in numbering.iter_mut().enumerate() {
        if n.has_held() {
            if let Some(mut frame) = free.pop() {
                let t = &templates[i * nsizes];
                let seq = n.next_seq(config.fault, &mut faults);
                let mut data = memory.data_mut(&mut frame);
                data.cursor().set_pos(t.len());
                t.write(data.contents_mut(), seq, monotonic_ns());
                tx.push(frame);
                sent_bytes += t.frame_len() as u64;
            }
        }
    }
    let flush_deadline = monotonic_ns() + 100_000_000;
    while !tx.is_empty() && monotonic_ns() < flush_deadline {
        sent += port.tx_burst(&mut tx) as u64;
        port.reclaim(&mut free);
    }
    // Frames gathered and not taken by the ring were never sent: take them out of the count.
    for frame in tx.drain(..) {
        sent_bytes -= memory.len(&frame) as u64 + super::probe::FCS_LEN as u64;
        free.push(frame);
    }
    // Wait (at most 1 s) for the kernel to complete everything queued.
    let drain_deadline = monotonic_ns() + 1_000_000_000;
    while port.tx_in_flight() > 0 && monotonic_ns() < drain_deadline {
        port.reclaim(&mut free);
        std::thread::sleep(Duration::from_micros(50));
    }
    let cpu1 = cpu_time_ms();
    let elapsed_s = (last_burst_ns.saturating_sub(start_ns)).max(1) as f64 / 1e9;
    let report = SendReport {
        iface: config.iface.clone(),
        sent_packets: sent,
        sent_bytes,
        elapsed_s,
        pps: sent as f64 / elapsed_s,
        mbps: sent_bytes as f64 * 8.0 / elapsed_s / 1e6,
        flows: if replay.is_some() { 0 } else { flows as u32 },
        mean_frame_bytes: mean_frame,
        tx_ring_full,
        rate_deficit_packets: if per_s > 0.0 {
            (bucket.discarded() / unit).round() as u64
        } else {
            0
        },
        rx_ignored,
        tx_unfinished: port.tx_in_flight(),
        faults,
        xdp: port.xdp_stats(),
        cpu_user_ms: cpu1.0 - cpu0.0,
        cpu_sys_ms: cpu1.1 - cpu0.1,
        replay: replay
            .as_ref()
            .zip(config.replay.as_ref())
            .map(|(frames, r)| ReplayFigures {
                frames_per_pass: frames.len() as u64,
                skipped: r.capture.skipped,
                passes: sent as f64 / frames.len() as f64,
            }),
        queues: Vec::new(),
    };
    Ok(report)
}

/// Runs one sender per queue from `config.queue` on, `queues` of them, each on a thread of its
/// own (pinned to `cores[i]` when given) with every `queues`-th flow and an even share of the
/// rate and the count; `ready` is called once all are bound, `progress` with each one's lines.
/// One that fails to start stops the others. Returns the sums, with each queue's figures.
pub fn run_queues(
    config: &SendConfig,
    queues: u32,
    cores: &[usize],
    stop: &AtomicBool,
    ready: &mut dyn FnMut(),
    progress: &(dyn Fn(&str) + Sync),
) -> Result<SendReport, SendError> {
    let configs: Vec<SendConfig> = (0..queues)
        .map(|i| {
            let mut c = config.clone();
            c.queue = config.queue + i;
            c.share = Share {
                index: i,
                of: queues,
            };
            let n = f64::from(queues);
            c.rate = match config.rate {
                Rate::Unlimited => Rate::Unlimited,
                Rate::Pps(pps) => Rate::Pps(pps / n),
                Rate::Bps(bps) => Rate::Bps(bps / n),
            };
            c.count = config.count.map(|total| {
                total / u64::from(queues) + u64::from(u64::from(i) < total % u64::from(queues))
            });
            c
        })
        .collect();
    let reports = super::on_queues(
        &configs,
        cores,
        stop,
        ready,
        SendError::Thread,
        |c, group_stop, bound| {
            let queue = c.queue;
            run(c, group_stop, bound, &mut |l| {
                progress(&format!("queue {queue}: {l}"))
            })
        },
    )?;
    Ok(merged(
        configs.iter().map(|c| c.queue).zip(reports).collect(),
    ))
}

/// The sum of several senders' reports, with each one's figures.
fn merged(reports: Vec<(u32, SendReport)>) -> SendReport {
    let mut total = SendReport {
        iface: reports
            .first()
            .map_or(String::new(), |(_, r)| r.iface.clone()),
        sent_packets: 0,
        sent_bytes: 0,
        elapsed_s: 0.0,
        pps: 0.0,
        mbps: 0.0,
        flows: 0,
        mean_frame_bytes: reports.first().map_or(0.0, |(_, r)| r.mean_frame_bytes),
        tx_ring_full: 0,
        rate_deficit_packets: 0,
        rx_ignored: 0,
        tx_unfinished: 0,
        faults: FaultCounters::default(),
        xdp: None,
        cpu_user_ms: 0,
        cpu_sys_ms: 0,
        replay: None,
        queues: Vec::new(),
    };
    for (queue, r) in reports {
        if let Some(q) = r.replay {
            let t = total.replay.get_or_insert(ReplayFigures {
                frames_per_pass: 0,
                skipped: q.skipped,
                passes: 0.0,
            });
            t.frames_per_pass += q.frames_per_pass;
        }
        total.sent_packets += r.sent_packets;
        total.sent_bytes += r.sent_bytes;
        total.elapsed_s = total.elapsed_s.max(r.elapsed_s);
        total.flows += r.flows;
        total.tx_ring_full += r.tx_ring_full;
        total.rate_deficit_packets += r.rate_deficit_packets;
        total.rx_ignored += r.rx_ignored;
        total.tx_unfinished += r.tx_unfinished;
        total.faults.skipped += r.faults.skipped;
        total.faults.swapped += r.faults.swapped;
        // The process's CPU time over each sender's run: the longest run saw all of it.
        total.cpu_user_ms = total.cpu_user_ms.max(r.cpu_user_ms);
        total.cpu_sys_ms = total.cpu_sys_ms.max(r.cpu_sys_ms);
        total.queues.push(QueueFigures {
            queue,
            packets: r.sent_packets,
            pps: r.pps,
            xdp: r.xdp,
        });
    }
    if let Some(r) = &mut total.replay {
        r.passes = total.sent_packets as f64 / r.frames_per_pass.max(1) as f64;
    }
    let elapsed = total.elapsed_s.max(1e-9);
    total.pps = total.sent_packets as f64 / elapsed;
    total.mbps = total.sent_bytes as f64 * 8.0 / elapsed / 1e6;
    total
}

/// Waits `ns`: sleeps when it is long enough for the timer to be worth it, yields otherwise.
fn pace(ns: u64) {
    if ns >= 20_000 {
        std::thread::sleep(Duration::from_nanos(ns));
    } else {
        std::thread::yield_now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gen::probe;
    use mimiq_dataplane::config::{CopyMode, XdpMode};

    #[test]
    fn every_flow_gets_its_own_addresses_ports_and_id_for_every_size() {
        let base = FlowAddrs {
            src_mac: [2, 0, 0, 0, 0, 1],
            dst_mac: [0xff; 6],
            src_ip: "198.18.0.1".parse().unwrap(),
            dst_ip: "198.18.0.2".parse().unwrap(),
            src_port: 10000,
            dst_port: 20000,
        };
        let a = flow_addrs(&base, &[Vary::SrcIp, Vary::DstPort], 300);
        assert_eq!(a.src_ip, "198.18.1.45".parse::<IpAddr>().unwrap());
        assert_eq!((a.src_port, a.dst_port), (10000, 20300));
        assert_eq!(a.dst_ip, base.dst_ip);
        let v6 = FlowAddrs {
            src_ip: "fd00::ffff".parse().unwrap(),
            dst_ip: "fd00::2".parse().unwrap(),
            ..base
        };
        assert_eq!(
            flow_addrs(&v6, &[Vary::SrcIp], 1).src_ip,
            "fd00::1:0".parse::<IpAddr>().unwrap()
        );

        let config = SendConfig {
            iface: "eth0".into(),
            queue: 0,
            base,
            flows: 3,
            share: Share::ALL,
            vary: vec![Vary::SrcPort],
            sizes: SizeMix::imix(),
            rate: Rate::Unlimited,
            count: None,
            duration: None,
            batch: 64,
            xsk: crate::gen::cli::socket_config(XdpMode::Native, CopyMode::Auto, 64),
            fault: Fault::None,
            garble: None,
            replay: None,
            json: None,
        };
        let t = templates(&config).unwrap();
        assert_eq!(t.len(), 9);
        for (i, t) in t.iter().enumerate() {
            assert_eq!(t.frame_len(), [64, 576, 1500][i % 3]);
            let mut buf = vec![0u8; t.len()];
            t.write(&mut buf, 1, 2);
            let p = probe::parse(&buf).unwrap();
            assert_eq!(usize::from(p.flow), i / 3);
            let src_port = u16::from_be_bytes([buf[34], buf[35]]);
            assert_eq!(src_port, 10000 + (i / 3) as u16);
        }
    }
}
