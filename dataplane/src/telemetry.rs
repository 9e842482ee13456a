//! Telemetry of a running switch: what workers publish, the stats file, the Prometheus text
//! endpoint and the HdrHistogram interval log.
//!
//! Workers publish into their own [`WorkerSlot`] once per interval (one uncontended lock per
//! worker per interval, never per packet). The switch's main thread turns the slots into the
//! stats file and the `.hlog`; the metrics endpoint (`mimiq_metrics::serve`) reads them through
//! [`MetricsSource`] for `GET /metrics` and `GET /healthz`.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

use mimiq_metrics::hlog::IntervalLog;
use mimiq_metrics::{Families, Health, Kind, Source};

use crate::config::Role;
use crate::engine::{duration_histogram, WorkerCounters};
use crate::slowpath::{SlowPathCounters, SlowPathStats};

/// What one worker last published.
pub struct WorkerSlot {
    /// Its counters.
    pub counters: WorkerCounters,
    /// Burst processing times since the hlog last took them, in ns.
    pub burst_ns_interval: Histogram<u64>,
    /// Burst processing times since start, in ns.
    pub burst_ns_total: Histogram<u64>,
    /// When it last published.
    pub published: Option<Instant>,
}

/// Shared between the workers, the main thread and the metrics thread.
pub struct Telemetry {
    role: Role,
    started: Instant,
    queues: Vec<u32>,
    slots: Vec<Mutex<WorkerSlot>>,
    slow_path: Arc<SlowPathStats>,
}

/// Percentiles of a histogram, in ns.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct Percentiles {
    /// Recorded values.
    pub count: u64,
    /// Median.
    pub p50: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Maximum.
    pub max: u64,
}

impl Percentiles {
    /// The percentiles of `h`.
    pub fn of(h: &Histogram<u64>) -> Self {
        Percentiles {
            count: h.len(),
            p50: h.value_at_quantile(0.5),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }
}

/// One worker in the stats file.
#[derive(Debug, Clone, Serialize)]
pub struct WorkerStats {
    /// The worker's index (its thread is `mimiq-worker-<index>`, its hlog tag `worker<index>`).
    pub index: usize,
    /// The NIC queue it serves.
    pub queue: u32,
    /// Its counters.
    #[serde(flatten)]
    pub counters: WorkerCounters,
    /// Burst processing time since start.
    pub burst_ns: Percentiles,
}

/// The stats file (`stats_path`) and `mimiq-switch stats`.
#[derive(Debug, Clone, Serialize)]
pub struct StatsFile {
    /// The pipeline.
    pub role: Role,
    /// The switch's process id.
    pub pid: u32,
    /// Time since the switch started, in ms.
    pub uptime_ms: u64,
    /// User CPU time of the whole process, from getrusage(2), in ms.
    pub cpu_user_ms: u64,
    /// System CPU time of the whole process, in ms.
    pub cpu_sys_ms: u64,
    /// Per worker.
    pub workers: Vec<WorkerStats>,
    /// The slow-path thread's counters (all 0 for a role without one).
    pub slow_path: SlowPathCounters,
}

impl Telemetry {
    /// Slots for one worker per entry of `queues`.
    pub fn new(role: Role, queues: &[u32]) -> Arc<Self> {
        Arc::new(Telemetry {
            role,
            started: Instant::now(),
            queues: queues.to_vec(),
            slots: queues
                .iter()
                .map(|_| {
                    Mutex::new(WorkerSlot {
                        counters: WorkerCounters::default(),
                        burst_ns_interval: duration_histogram(),
                        burst_ns_total: duration_histogram(),
                        published: None,
                    })
                })
                .collect(),
            slow_path: Arc::default(),
        })
    }

    /// The counters the slow-path thread keeps.
    pub fn slow_path(&self) -> Arc<SlowPathStats> {
        Arc::clone(&self.slow_path)
    }

    /// Worker `i` publishes its counters and the burst times of its last interval.
    pub fn publish(&self, i: usize, counters: &WorkerCounters, burst_ns: &Histogram<u64>) {
        let Some(slot) = self.slots.get(i) else {
            return;
        };
        let mut slot = slot.lock().unwrap_or_else(|p| p.into_inner());
        slot.counters.clone_from(counters);
        slot.published = Some(Instant::now());
        // Same bounds on both sides, so `add` cannot fail.
        let _ = slot.burst_ns_interval.add(burst_ns);
        let _ = slot.burst_ns_total.add(burst_ns);
    }

    /// The current stats, with the process's CPU time.
    pub fn snapshot(&self, cpu_ms: (u64, u64)) -> StatsFile {
        let workers = self
            .slots
            .iter()
            .zip(&self.queues)
            .enumerate()
            .map(|(index, (slot, &queue))| {
                let slot = slot.lock().unwrap_or_else(|p| p.into_inner());
                WorkerStats {
                    index,
                    queue,
                    counters: slot.counters.clone(),
                    burst_ns: Percentiles::of(&slot.burst_ns_total),
                }
            })
            .collect();
        StatsFile {
            role: self.role,
            pid: std::process::id(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            cpu_user_ms: cpu_ms.0,
            cpu_sys_ms: cpu_ms.1,
            workers,
            slow_path: self.slow_path.snapshot(),
        }
    }

    /// Takes every worker's interval histogram (leaving it empty).
    fn take_intervals(&self) -> Vec<Histogram<u64>> {
        self.slots
            .iter()
            .map(|slot| {
                let mut slot = slot.lock().unwrap_or_else(|p| p.into_inner());
                let taken = slot.burst_ns_interval.clone();
                slot.burst_ns_interval.reset();
                taken
            })
            .collect()
    }
}

/// Writes `stats` to `path` atomically (write a temporary file, then rename).
pub fn write_stats_file(path: &Path, stats: &StatsFile) -> std::io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    let json = serde_json::to_vec_pretty(stats).map_err(std::io::Error::other)?;
    std::fs::write(&tmp, json)?;
    std::fs::rename(&tmp, path)
}

/// The switch's metrics families, from its stats (`mimiq_switch_*`, docs/OPERATIONS.md).
pub fn collect(stats: &StatsFile, out: &mut Families) {
    type PortField = fn(&crate::engine::PortCounters) -> u64;
    let port_fields: [(&str, &str, PortField); 8] = [
        ("rx_packets", "Frames received", |p| p.rx_packets),
        ("rx_bytes", "Bytes received", |p| p.rx_bytes),
        ("tx_packets", "Frames queued for transmission", |p| {
            p.tx_packets
        }),
        ("tx_bytes", "Bytes queued for transmission", |p| p.tx_bytes),
        (
            "xdp_rx_dropped",
            "Kernel: frames dropped before the RX ring",
            |p| p.xdp.map_or(0, |x| x.rx_dropped),
        ),
        (
            "xdp_rx_ring_full",
            "Kernel: frames dropped on a full RX ring",
            |p| p.xdp.map_or(0, |x| x.rx_ring_full),
        ),
        (
            "xdp_fill_ring_empty",
            "Kernel: times the fill ring was empty",
            |p| p.xdp.map_or(0, |x| x.rx_fill_ring_empty_descs),
        ),
        (
            "xdp_invalid_descs",
            "Kernel and mimiq: invalid RX and TX descriptors",
            |p| p.xdp.map_or(0, |x| x.rx_invalid_descs + x.tx_invalid_descs),
        ),
    ];
    for (what, help, field) in port_fields {
        let family = out.counter(format!("mimiq_switch_{what}"), help);
        for w in &stats.workers {
            for p in &w.counters.ports {
                family.sample(
                    &[
                        ("worker", w.index.to_string()),
                        ("queue", w.queue.to_string()),
                        ("port", p.name.clone()),
                    ],
                    field(p),
                );
            }
        }
    }
    let drops = out.counter("mimiq_switch_drops", "Frames dropped, by reason");
    for w in &stats.workers {
        for r in crate::pipeline::DropReason::ALL {
            drops.sample(
                &[
                    ("worker", w.index.to_string()),
                    ("queue", w.queue.to_string()),
                    ("reason", r.name().to_string()),
                ],
                w.counters.drops.get(r),
            );
        }
    }
    type WorkerField = fn(&WorkerStats) -> u64;
    let worker_fields: [(Kind, &str, &str, WorkerField); 5] = [
        (Kind::Counter, "bursts", "Non-empty bursts processed", |w| {
            w.counters.bursts
        }),
        (
            Kind::Counter,
            "slow_path_frames",
            "Frames handed to the slow path",
            |w| w.counters.to_slow_path,
        ),
        (
            Kind::Counter,
            "updates_applied",
            "Table updates applied",
            |w| w.counters.updates_applied,
        ),
        (
            Kind::Gauge,
            "burst_ns_p99",
            "99th percentile of burst processing time since start, ns",
            |w| w.burst_ns.p99,
        ),
        (
            Kind::Gauge,
            "burst_ns_max",
            "Longest burst processing time since start, ns",
            |w| w.burst_ns.max,
        ),
    ];
    for (kind, what, help, field) in worker_fields {
        let family = out.family(kind, format!("mimiq_switch_{what}"), help);
        for w in &stats.workers {
            family.sample(
                &[
                    ("worker", w.index.to_string()),
                    ("queue", w.queue.to_string()),
                ],
                field(w),
            );
        }
    }
    let sp = &stats.slow_path;
    let slow = out.counter(
        "mimiq_switch_slow_path",
        "The slow path's frames and allocator replies, by what became of them",
    );
    for (what, n) in [
        ("gateway_answers", sp.gateway_answers),
        ("relayed", sp.relayed),
        ("replies", sp.replies),
        ("ignored_malformed", sp.ignored_malformed),
        ("ignored_not_for_us", sp.ignored_not_for_us),
        ("replies_dropped", sp.replies_dropped),
    ] {
        slow.sample(&[("what", what)], n);
    }
    out.counter("mimiq_switch_cpu_ms", "CPU time of the switch process, ms")
        .sample(&[("mode", "user")], stats.cpu_user_ms)
        .sample(&[("mode", "system")], stats.cpu_sys_ms);
}

/// The switch as a metrics source: its stats, and healthy while every worker publishes.
pub struct MetricsSource {
    telemetry: Arc<Telemetry>,
    cpu_ms: fn() -> (u64, u64),
    /// How long a worker may go without publishing before the switch is not ready.
    silence: Duration,
}

impl MetricsSource {
    /// Reads `telemetry`; a worker silent for three intervals makes the switch not ready.
    pub fn new(telemetry: Arc<Telemetry>, cpu_ms: fn() -> (u64, u64), interval: Duration) -> Self {
        MetricsSource {
            telemetry,
            cpu_ms,
            silence: interval.max(Duration::from_millis(100)).saturating_mul(3),
        }
    }
}

impl Source for MetricsSource {
    fn collect(&self, out: &mut Families) {
        collect(&self.telemetry.snapshot((self.cpu_ms)()), out);
    }

    fn health(&self) -> Health {
        for (i, slot) in self.telemetry.slots.iter().enumerate() {
            let slot = slot.lock().unwrap_or_else(|p| p.into_inner());
            match slot.published {
                None => return Health::NotReady(format!("worker {i} has not started")),
                Some(at) if at.elapsed() > self.silence => {
                    return Health::NotReady(format!(
                        "worker {i} silent for {} ms",
                        at.elapsed().as_millis()
                    ))
                }
                Some(_) => {}
            }
        }
        Health::Ready(format!(
            "{} worker(s) forwarding ({:?})",
            self.telemetry.slots.len(),
            self.telemetry.role
        ))
    }
}

/// An HdrHistogram interval log of per-worker burst processing time, one tagged histogram per
/// worker per interval (`worker<index>`).
pub struct HlogWriter {
    log: IntervalLog,
    tags: Vec<String>,
}

impl HlogWriter {
    /// Creates (truncates) the log at `path` and writes its header.
    pub fn create(path: &Path, telemetry: &Telemetry) -> std::io::Result<Self> {
        Ok(HlogWriter {
            log: IntervalLog::create(path, "mimiq-switch burst processing time, ns, per worker")?,
            tags: (0..telemetry.queues.len())
                .map(|i| format!("worker{i}"))
                .collect(),
        })
    }

    /// Appends every worker's histogram of the interval since the last call.
    pub fn write_interval(&mut self, telemetry: &Telemetry) -> std::io::Result<()> {
        let intervals = telemetry.take_intervals();
        let tagged: Vec<(&str, &Histogram<u64>)> = self
            .tags
            .iter()
            .map(String::as_str)
            .zip(&intervals)
            .collect();
        self.log.write(&tagged)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use hdrhistogram::serialization::interval_log::{IntervalLogIterator, LogEntry};
    use hdrhistogram::serialization::Deserializer;

    fn counters() -> WorkerCounters {
        WorkerCounters {
            ports: vec![
                crate::engine::PortCounters {
                    name: "p0".into(),
                    rx_packets: 10,
                    rx_bytes: 640,
                    ..Default::default()
                },
                crate::engine::PortCounters {
                    name: "p1".into(),
                    tx_packets: 9,
                    tx_bytes: 576,
                    ..Default::default()
                },
            ],
            bursts: 2,
            ..Default::default()
        }
    }

    #[test]
    fn metrics_have_every_port_counter_and_drop_reason_and_health_follows_the_workers() {
        let t = Telemetry::new(Role::L2fwd, &[0, 1]);
        let source = Arc::new(MetricsSource::new(
            Arc::clone(&t),
            || (12, 34),
            Duration::from_millis(100),
        ));
        assert_eq!(
            source.health(),
            Health::NotReady("worker 0 has not started".into())
        );
        let mut h = duration_histogram();
        h.record(1500).unwrap();
        t.publish(0, &WorkerCounters::default(), &h);
        t.publish(1, &counters(), &h);
        assert!(matches!(source.health(), Health::Ready(_)));
        let text = mimiq_metrics::render(source);
        assert!(
            text.contains(
                "mimiq_switch_rx_packets_total{worker=\"1\",queue=\"1\",port=\"p0\"} 10\n"
            ),
            "{text}"
        );
        assert!(text
            .contains("mimiq_switch_tx_bytes_total{worker=\"1\",queue=\"1\",port=\"p1\"} 576\n"));
        assert!(text.contains(
            "mimiq_switch_drops_total{worker=\"0\",queue=\"0\",reason=\"tx_ring_full\"} 0\n"
        ));
        assert!(text.contains("mimiq_switch_cpu_ms_total{mode=\"system\"} 34\n"));
        assert!(text.contains("# TYPE mimiq_switch_drops_total counter\n"));
        assert!(text.contains("# TYPE mimiq_switch_burst_ns_p99 gauge\n"));
    }

    #[test]
    fn hlog_holds_one_tagged_histogram_per_worker_per_interval_and_resets_between() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.hlog");
        let t = Telemetry::new(Role::L2fwd, &[0, 3]);
        let mut log = HlogWriter::create(&path, &t).unwrap();
        let mut h = duration_histogram();
        for v in [100, 200, 300] {
            h.record(v).unwrap();
        }
        t.publish(1, &counters(), &h);
        log.write_interval(&t).unwrap();
        log.write_interval(&t).unwrap();

        let bytes = std::fs::read(&path).unwrap();
        let mut deserializer = Deserializer::new();
        let mut seen = Vec::new();
        for entry in IntervalLogIterator::new(&bytes) {
            if let Ok(LogEntry::Interval(ilh)) = entry {
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(ilh.encoded_histogram())
                    .unwrap();
                let hist: Histogram<u64> =
                    deserializer.deserialize(&mut decoded.as_slice()).unwrap();
                seen.push((ilh.tag().map(|t| t.as_str().to_string()), hist.len()));
            }
        }
        assert_eq!(
            seen,
            [
                (Some("worker0".into()), 0),
                (Some("worker1".into()), 3),
                (Some("worker0".into()), 0),
                (Some("worker1".into()), 0),
            ]
        );
        assert_eq!(
            t.snapshot((0, 0)).workers[1].burst_ns.count,
            3,
            "totals keep counting"
        );
    }
}
