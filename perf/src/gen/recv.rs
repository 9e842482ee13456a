//! The receiver: counts probes, tracks loss and reordering per flow, and records one-way latency
//! (receive time of the burst minus the probe's send time, both CLOCK_MONOTONIC: sender and
//! receiver share the machine) into an HdrHistogram, logged per interval to an `.hlog`.
//!
//! Per burst: one clock read, then per frame a parse, a tracker update and a histogram record;
//! no allocation except when a new flow id first appears. Latency resolution is therefore the
//! burst's processing time (a few µs at most).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use hdrhistogram::serialization::interval_log::{IntervalLogWriterBuilder, Tag};
use hdrhistogram::serialization::V2DeflateSerializer;
use hdrhistogram::Histogram;
use mimiq_dataplane::port::xsk::{self, XskConfig};
use mimiq_dataplane::port::{FrameMemory, Port, XdpStats};
use serde::Serialize;

use super::probe::{self, FCS_LEN};
use super::send::QueueFigures;
use super::seq::{SeqCounters, SeqTracker};
use super::{cpu_time_ms, monotonic_ns};

/// Where and how long to receive.
#[derive(Debug, Clone)]
pub struct RecvConfig {
    /// Interface.
    pub iface: String,
    /// Queue index.
    pub queue: u32,
    /// Stop after this long (from the start).
    pub duration: Option<Duration>,
    /// Stop once this many probes arrived.
    pub count: Option<u64>,
    /// Stop when no probe arrived for this long, once probes have started arriving.
    pub idle_exit: Option<Duration>,
    /// Socket options.
    pub xsk: XskConfig,
    /// Interval of the `.hlog` histograms.
    pub hlog_interval: Duration,
    /// Where the interval log goes.
    pub hlog: Option<PathBuf>,
    /// Where the JSON report goes.
    pub json: Option<PathBuf>,
    /// Spin instead of sleeping in poll() when idle.
    pub busy: bool,
}

/// Latency percentiles, nanoseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Latency {
    /// Samples.
    pub samples: u64,
    /// Minimum.
    pub min_ns: u64,
    /// Median.
    pub p50_ns: u64,
    /// 99th percentile.
    pub p99_ns: u64,
    /// 99.9th percentile.
    pub p999_ns: u64,
    /// Maximum.
    pub max_ns: u64,
    /// Mean.
    pub mean_ns: f64,
}

/// What the receiver saw.
#[derive(Debug, Clone, Serialize)]
pub struct RecvReport {
    /// Interface.
    pub iface: String,
    /// Probes, losses, reorderings, duplicates.
    #[serde(flatten)]
    pub seq: SeqCounters,
    /// Bytes of the probes counted, frames with FCS.
    pub received_bytes: u64,
    /// Frames that were not probes.
    pub other_frames: u64,
    /// Flows seen.
    pub flows: usize,
    /// First to last probe, seconds.
    pub elapsed_s: f64,
    /// Probes per second over `elapsed_s`.
    pub pps: f64,
    /// Megabits per second over `elapsed_s` (frames with FCS).
    pub mbps: f64,
    /// Lost / (received + lost).
    pub loss_ratio: f64,
    /// One-way latency.
    pub latency: Latency,
    /// Kernel socket statistics (`rx_dropped`, `rx_ring_full`: frames lost before the socket).
    pub xdp: Option<XdpStats>,
    /// CPU time of the receiver process, user, ms.
    pub cpu_user_ms: u64,
    /// CPU time of the receiver process, system, ms.
    pub cpu_sys_ms: u64,
    /// Per queue, when several received (`--queues`); the figures above are their sums.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub queues: Vec<QueueFigures>,
}

/// Why the receiver could not run.
#[derive(Debug, thiserror::Error)]
pub enum RecvError {
    /// The AF_XDP socket could not be opened.
    #[error(transparent)]
    Open(#[from] xsk::OpenError),
    /// The `.hlog` could not be written.
    #[error("writing {path}: {reason}")]
    Hlog { path: String, reason: String },
    /// A receiver's thread could not start or be pinned.
    #[error("{0}")]
    Thread(String),
}

/// Highest latency recorded (larger values are clamped): 60 s.
const MAX_LATENCY_NS: u64 = 60_000_000_000;

/// Runs the receiver until a stop condition or `stop`; `ready` is called once it is bound,
/// `progress` once a second with a line of figures.
pub fn run(
    config: &RecvConfig,
    stop: &AtomicBool,
    ready: &mut dyn FnMut(),
    progress: &mut dyn FnMut(&str),
) -> Result<RecvReport, RecvError> {
    with_hlog(config, |write| {
        let group = Group::default();
        let log = |h: &Histogram<u64>, start, len| write(h, start, len, None);
        receive(config, stop, &group, ready, progress, &log).map(|(report, _)| report)
    })
}

/// Runs one receiver per queue from `config.queue` on, `queues` of them, each on a thread of
/// its own (pinned to `cores[i]` when given); the count is over all of them, the `.hlog` gets
/// each one's intervals tagged `queue<n>`. `ready` is called once all are bound, `progress`
/// with each one's lines. Returns the sums (latency over every probe), with each queue's
/// figures.
pub fn run_queues(
    config: &RecvConfig,
    queues: u32,
    cores: &[usize],
    stop: &AtomicBool,
    ready: &mut dyn FnMut(),
    progress: &(dyn Fn(&str) + Sync),
) -> Result<RecvReport, RecvError> {
    let configs: Vec<RecvConfig> = (0..queues)
        .map(|i| RecvConfig {
            queue: config.queue + i,
            ..config.clone()
        })
        .collect();
    let group = Group::default();
    let results = with_hlog(config, |write| {
        super::on_queues(
            &configs,
            cores,
            stop,
            ready,
            RecvError::Thread,
            |c, group_stop, bound| {
                let (queue, tag) = (c.queue, format!("queue{}", c.queue));
                let log = |h: &Histogram<u64>, start, len| write(h, start, len, Some(&tag));
                let print = &mut |l: &str| progress(&format!("queue {queue}: {l}"));
                receive(c, group_stop, &group, bound, print, &log)
            },
        )
    })?;
    let mut latency = new_histogram();
    let mut total: Option<RecvReport> = None;
    let mut figures = Vec::new();
    for (c, (r, h)) in configs.iter().zip(results) {
        // Same bounds everywhere, so `add` cannot fail.
        let _ = latency.add(&h);
        figures.push(QueueFigures {
            queue: c.queue,
            packets: r.seq.received,
            pps: r.pps,
            xdp: r.xdp,
        });
        let Some(t) = &mut total else {
            total = Some(r);
            continue;
        };
        t.seq.received += r.seq.received;
        t.seq.lost += r.seq.lost;
        t.seq.reordered += r.seq.reordered;
        t.seq.duplicates += r.seq.duplicates;
        t.received_bytes += r.received_bytes;
        t.other_frames += r.other_frames;
        t.flows += r.flows;
        t.elapsed_s = t.elapsed_s.max(r.elapsed_s);
        // The process's CPU time over each receiver's run: the longest run saw all of it.
        t.cpu_user_ms = t.cpu_user_ms.max(r.cpu_user_ms);
        t.cpu_sys_ms = t.cpu_sys_ms.max(r.cpu_sys_ms);
    }
    let mut t = total.ok_or_else(|| RecvError::Thread("no queue".into()))?;
    t.xdp = None;
    t.pps = t.seq.received as f64 / t.elapsed_s;
    t.mbps = t.received_bytes as f64 * 8.0 / t.elapsed_s / 1e6;
    t.loss_ratio = t.seq.lost as f64 / (t.seq.received + t.seq.lost).max(1) as f64;
    t.latency = latency_of(&latency);
    t.queues = figures;
    Ok(t)
}

/// What the receivers of several queues share: the probes received so far (for `count`), and
/// whether one has stopped for being idle (then one that never received anything stops too).
#[derive(Default)]
struct Group {
    received: AtomicU64,
    idle_done: AtomicBool,
}

/// Writes one receiver's interval histogram to the `.hlog` (start and length in ns).
type LogInterval<'a> = dyn Fn(&Histogram<u64>, u64, u64) -> Result<(), String> + Sync + 'a;

/// Writes an interval's histogram to the `.hlog` (start and length in ns, a tag).
type WriteInterval<'a> =
    dyn Fn(&Histogram<u64>, u64, u64, Option<&str>) -> Result<(), String> + Sync + 'a;

/// Opens `config.hlog` (or nothing), runs `body` with a way to write intervals to it from any
/// thread, and flushes it.
fn with_hlog<R>(
    config: &RecvConfig,
    body: impl FnOnce(&WriteInterval<'_>) -> Result<R, RecvError>,
) -> Result<R, RecvError> {
    let hlog_err = |e: &dyn std::fmt::Display| RecvError::Hlog {
        path: config
            .hlog
            .as_ref()
            .map_or(String::new(), |p| p.display().to_string()),
        reason: e.to_string(),
    };
    let mut out: Box<dyn Write + Send> = match &config.hlog {
        Some(path) => Box::new(BufWriter::new(
            File::create(path).map_err(|e| hlog_err(&e))?,
        )),
        None => Box::new(std::io::sink()),
    };
    let mut serializer = V2DeflateSerializer::new();
    let start_wall = SystemTime::now();
    let log = IntervalLogWriterBuilder::new()
        .add_comment("mimiq-perf gen recv: one-way latency in nanoseconds")
        .with_start_time(start_wall)
        .with_base_time(start_wall)
        .with_max_value_divisor(1e6)
        .begin_log_with(&mut out, &mut serializer)
        .map_err(|e| hlog_err(&e))?;
    let log = std::sync::Mutex::new(log);
    let write = |h: &Histogram<u64>, start_ns: u64, len_ns: u64, tag: Option<&str>| {
        let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
        log.write_histogram(
            h,
            Duration::from_nanos(start_ns),
            Duration::from_nanos(len_ns),
            tag.and_then(Tag::new),
        )
        .map_err(|e| format!("{e:?}"))
    };
    let result = body(&write);
    drop(log);
    out.flush().map_err(|e| hlog_err(&e))?;
    result
}

fn new_histogram() -> Histogram<u64> {
    Histogram::<u64>::new_with_bounds(1, MAX_LATENCY_NS, 3).expect("valid histogram bounds")
}

/// One receiver on `config.queue` until a stop condition, `stop`, or (with others) the group's
/// count or idleness; `log` takes each interval's histogram. Returns the report and the
/// latency histogram of the whole run.
fn receive(
    config: &RecvConfig,
    stop: &AtomicBool,
    group: &Group,
    ready: &mut dyn FnMut(),
    progress: &mut dyn FnMut(&str),
    log: &LogInterval<'_>,
) -> Result<(RecvReport, Histogram<u64>), RecvError> {
    let (mut ports, mut memory, mut free) =
        xsk::open(&[(config.iface.clone(), config.queue)], &config.xsk)?;
    let hlog_err = |e: String| RecvError::Hlog {
        path: config
            .hlog
            .as_ref()
            .map_or(String::new(), |p| p.display().to_string()),
        reason: e,
    };
    let port = &mut ports[0];
    ready();
    let mut total = new_histogram();
    let mut interval = new_histogram();
    let mut tracker = SeqTracker::default();
    let (mut bytes, mut other) = (0u64, 0u64);
    let mut rx = Vec::with_capacity(64);
    let start_ns = monotonic_ns();
    let interval_ns = config.hlog_interval.as_nanos().max(1_000_000) as u64;
    let mut interval_start = start_ns;
    let (mut first_ns, mut last_ns) = (0u64, 0u64);
    let mut idle_polls = 0u32;
    let cpu0 = cpu_time_ms();
    let (mut progress_at_ns, mut progress_received) = (start_ns + 1_000_000_000, 0u64);

    loop {
        let n = port.rx_burst(&mut rx, 64);
        let now = monotonic_ns();
        if n > 0 {
            idle_polls = 0;
            let before = tracker.counters().received;
            for mut frame in rx.drain(..) {
                let data = memory.data_mut(&mut frame);
                match probe::parse(data.contents()) {
                    Some(p) => {
                        tracker.on_probe(p.flow, p.seq);
                        bytes += (data.contents().len() + FCS_LEN) as u64;
                        interval.saturating_record(now.saturating_sub(p.time_ns).max(1));
                    }
                    None => other += 1,
                }
                free.push(frame);
            }
            let probes = tracker.counters().received - before;
            group.received.fetch_add(probes, Ordering::Relaxed);
            if first_ns == 0 {
                first_ns = now;
            }
            last_ns = now;
        } else {
            idle_polls = idle_polls.saturating_add(1);
        }
        port.reclaim(&mut free);

        if now - interval_start >= interval_ns {
            flush_interval(
                log,
                &mut total,
                &mut interval,
                interval_start - start_ns,
                now - interval_start,
            )
            .map_err(hlog_err)?;
            interval_start = now;
        }
        let received = tracker.counters().received;
        if now >= progress_at_ns {
            let c = tracker.counters();
            let t = (now - start_ns) / 1_000_000_000;
            progress(&format!(
                "t={t}s received {} pps, {received} total, lost {}, reordered {}",
                received - progress_received,
                c.lost,
                c.reordered
            ));
            progress_at_ns += 1_000_000_000;
            progress_received = received;
        }
        let idle = first_ns > 0
            && config
                .idle_exit
                .is_some_and(|d| now - last_ns >= d.as_nanos() as u64);
        if idle {
            group.idle_done.store(true, Ordering::Relaxed);
        }
        let finished = stop.load(Ordering::Relaxed)
            || config
                .duration
                .is_some_and(|d| now - start_ns >= d.as_nanos() as u64)
            || config
                .count
                .is_some_and(|c| group.received.load(Ordering::Relaxed) >= c)
            || idle
            || (first_ns == 0 && group.idle_done.load(Ordering::Relaxed));
        if finished {
            break;
        }
        if n == 0 && !config.busy && idle_polls > 256 {
            <xsk::XskPort as Port>::wait_rx(std::slice::from_mut(port), Duration::from_millis(10));
        }
    }
    let now = monotonic_ns();
    flush_interval(
        log,
        &mut total,
        &mut interval,
        interval_start - start_ns,
        now - interval_start,
    )
    .map_err(hlog_err)?;
    let cpu1 = cpu_time_ms();
    let seq = tracker.counters();
    let elapsed_s = last_ns.saturating_sub(first_ns).max(1) as f64 / 1e9;
    let report = RecvReport {
        iface: config.iface.clone(),
        seq,
        received_bytes: bytes,
        other_frames: other,
        flows: tracker.flows_seen(),
        elapsed_s,
        pps: seq.received as f64 / elapsed_s,
        mbps: bytes as f64 * 8.0 / elapsed_s / 1e6,
        loss_ratio: seq.lost as f64 / (seq.received + seq.lost).max(1) as f64,
        latency: latency_of(&total),
        xdp: port.xdp_stats(),
        cpu_user_ms: cpu1.0 - cpu0.0,
        cpu_sys_ms: cpu1.1 - cpu0.1,
        queues: Vec::new(),
    };
    Ok((report, total))
}

/// Writes `interval` to the log (when it has samples), adds it to `total` and resets it.
fn flush_interval(
    log: &LogInterval<'_>,
    total: &mut Histogram<u64>,
    interval: &mut Histogram<u64>,
    start_offset_ns: u64,
    len_ns: u64,
) -> Result<(), String> {
    if interval.is_empty() {
        return Ok(());
    }
    log(interval, start_offset_ns, len_ns)?;
    total.add(&*interval).map_err(|e| format!("{e:?}"))?;
    interval.reset();
    Ok(())
}

/// Percentiles of `h`.
pub fn latency_of(h: &Histogram<u64>) -> Latency {
    if h.is_empty() {
        return Latency::default();
    }
    Latency {
        samples: h.len(),
        min_ns: h.min(),
        p50_ns: h.value_at_quantile(0.5),
        p99_ns: h.value_at_quantile(0.99),
        p999_ns: h.value_at_quantile(0.999),
        max_ns: h.max(),
        mean_ns: h.mean(),
    }
}
