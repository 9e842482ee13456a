//! HdrHistogram interval logs (`.hlog`): one tagged histogram per stage and worker per
//! interval, readable by the standard HdrHistogram log tools and by `mimiq-perf hlog`. Every
//! binary writes its latencies this way (the switch's bursts, the proxy's two directions, the
//! agent's hops and allocations, the allocator's requests and commits), on its interval and at
//! once on SIGUSR1.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use hdrhistogram::serialization::interval_log::{IntervalLogWriterBuilder, Tag};
use hdrhistogram::serialization::V2DeflateSerializer;
use hdrhistogram::Histogram;

/// A histogram of durations in ns, 1 ns to 60 s at 3 significant figures: what every mimiq
/// latency is recorded in.
pub fn duration_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("constant bounds are valid")
}

/// An open interval log.
pub struct IntervalLog {
    out: BufWriter<File>,
    serializer: V2DeflateSerializer,
    base: Instant,
    last: Instant,
}

impl IntervalLog {
    /// Creates (truncates) the log at `path` and writes its header with `comment`.
    pub fn create(path: &Path, comment: &str) -> std::io::Result<Self> {
        let mut out = BufWriter::new(File::create(path)?);
        let mut serializer = V2DeflateSerializer::new();
        let now = SystemTime::now();
        IntervalLogWriterBuilder::new()
            .add_comment(comment)
            .with_start_time(now)
            .with_base_time(now)
            .begin_log_with(&mut out, &mut serializer)?;
        out.flush()?;
        let base = Instant::now();
        Ok(IntervalLog {
            out,
            serializer,
            base,
            last: base,
        })
    }

    /// Appends one interval (since the last call): a histogram per tag.
    pub fn write(&mut self, histograms: &[(&str, &Histogram<u64>)]) -> std::io::Result<()> {
        let now = Instant::now();
        let start = self.last.duration_since(self.base);
        let length = now.duration_since(self.last).max(Duration::from_millis(1));
        self.last = now;
        let mut log =
            IntervalLogWriterBuilder::new().begin_log_with(&mut self.out, &mut self.serializer)?;
        for (tag, h) in histograms {
            let tag = Tag::new(tag).ok_or_else(|| {
                std::io::Error::other(format!("{tag:?} is not an hlog tag (no ',' ' ' '\\n')"))
            })?;
            log.write_histogram(h, start, length, Some(tag))
                .map_err(|e| std::io::Error::other(format!("{e:?}")))?;
        }
        self.out.flush()
    }
}

/// When to write the next interval: on the interval, and at once after SIGUSR1. Signals that
/// arrive before the dump are coalesced into it.
pub struct DumpTimer {
    every: Duration,
    next: Instant,
    signalled: Arc<AtomicBool>,
}

impl DumpTimer {
    /// Every `every`, and on SIGUSR1 (the handler only sets a flag).
    pub fn new(every: Duration) -> std::io::Result<DumpTimer> {
        let signalled = Arc::new(AtomicBool::new(false));
        signal_hook::flag::register(signal_hook::consts::SIGUSR1, Arc::clone(&signalled))?;
        Ok(DumpTimer {
            every,
            next: later(Instant::now(), every),
            signalled,
        })
    }

    /// Whether an interval is due now (and, if so, the next one is set).
    pub fn due(&mut self) -> bool {
        let now = Instant::now();
        if self.signalled.swap(false, Ordering::Relaxed) || now >= self.next {
            self.next = later(now, self.every);
            true
        } else {
            false
        }
    }
}

/// One interval of a log: a tag's histogram.
pub struct Interval {
    /// Its tag (none in logs of untagged histograms).
    pub tag: Option<String>,
    /// Its start, from the log's start.
    pub start: Duration,
    /// Its length.
    pub length: Duration,
    /// What was recorded in it.
    pub histogram: Histogram<u64>,
}

/// Reads every interval of the log at `path` (any HdrHistogram interval log: mimiq's, the
/// generator's, or another tool's). A line that does not parse is an error naming it.
pub fn read(path: &Path) -> Result<Vec<Interval>, String> {
    use base64::Engine;
    use hdrhistogram::serialization::interval_log::{IntervalLogIterator, LogEntry};
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut out = Vec::new();
    let mut deserializer = hdrhistogram::serialization::Deserializer::new();
    for (n, entry) in IntervalLogIterator::new(&bytes).enumerate() {
        let entry = entry.map_err(|e| format!("{}: entry {n}: {e:?}", path.display()))?;
        let LogEntry::Interval(i) = entry else {
            continue;
        };
        let raw = base64::engine::general_purpose::STANDARD
            .decode(i.encoded_histogram())
            .map_err(|e| format!("{}: entry {n}: {e}", path.display()))?;
        let histogram: Histogram<u64> = deserializer
            .deserialize(&mut raw.as_slice())
            .map_err(|e| format!("{}: entry {n}: {e:?}", path.display()))?;
        out.push(Interval {
            tag: i.tag().map(|t| t.as_str().to_string()),
            start: i.start_timestamp(),
            length: i.duration(),
            histogram,
        });
    }
    Ok(out)
}

/// `every` after `now`; a century for an interval too long to add (`Duration::MAX`: never).
fn later(now: Instant, every: Duration) -> Instant {
    now.checked_add(every)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_interval_log_reads_back_tag_by_tag() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.hlog");
        let mut log = IntervalLog::create(&path, "test").unwrap();
        let (mut a, b) = (duration_histogram(), duration_histogram());
        a.record(1_500).unwrap();
        a.record(2_500).unwrap();
        log.write(&[("up.worker0", &a), ("down.worker0", &b)])
            .unwrap();
        assert!(log.write(&[("bad tag", &a)]).is_err());
        let seen: Vec<(Option<String>, u64)> = read(&path)
            .unwrap()
            .into_iter()
            .map(|i| (i.tag, i.histogram.len()))
            .collect();
        assert_eq!(
            seen,
            [
                (Some("up.worker0".into()), 2),
                (Some("down.worker0".into()), 0)
            ]
        );
        std::fs::write(&path, "#[StartTime: 1]\n0.1,0.2,3.0,not-base64!\n").unwrap();
        assert!(read(&path).is_err());
    }

    #[test]
    fn a_timer_that_never_runs_out_is_due_only_when_signalled() {
        let mut t = DumpTimer::new(Duration::MAX).unwrap();
        assert!(!t.due());
        t.signalled.store(true, Ordering::Relaxed);
        assert!(t.due());
        assert!(!t.due(), "signals before a dump are coalesced into it");
    }
}
