//! `mimiq-perf hlog`: what an HdrHistogram interval log holds (any binary's `.hlog`, the
//! generator's, or another tool's), as a percentile table per tag and an SVG percentile plot.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use hdrhistogram::Histogram;
use mimiq_metrics::hlog::{duration_histogram, read};

use crate::plot::{Panel, Series};

/// The percentiles of the table.
const QUANTILES: [(f64, &str); 6] = [
    (0.5, "p50"),
    (0.9, "p90"),
    (0.99, "p99"),
    (0.999, "p99.9"),
    (0.9999, "p99.99"),
    (1.0, "max"),
];

/// Every interval of each tag added up (untagged intervals under `""`), keeping only the tags
/// that start with `only` when it is given.
pub fn by_tag(path: &Path, only: Option<&str>) -> Result<BTreeMap<String, Histogram<u64>>, String> {
    let mut tags: BTreeMap<String, Histogram<u64>> = BTreeMap::new();
    for i in read(path)? {
        let tag = i.tag.unwrap_or_default();
        if only.is_some_and(|o| !tag.starts_with(o)) {
            continue;
        }
        tags.entry(tag)
            .or_insert_with(duration_histogram)
            .add(&i.histogram)
            .map_err(|e| format!("{}: {e:?}", path.display()))?;
    }
    Ok(tags)
}

/// A Markdown table: a row per tag, its sample count and its percentiles in µs.
pub fn table(tags: &BTreeMap<String, Histogram<u64>>) -> String {
    let mut s = String::from("| tag | samples |");
    for (_, name) in QUANTILES {
        let _ = write!(s, " {name} (µs) |");
    }
    s.push_str("\n|---|---|");
    s.push_str(&"---|".repeat(QUANTILES.len()));
    s.push('\n');
    for (tag, h) in tags {
        let _ = write!(
            s,
            "| {} | {} |",
            if tag.is_empty() { "-" } else { tag },
            h.len()
        );
        for (q, _) in QUANTILES {
            let _ = write!(s, " {:.1} |", h.value_at_quantile(q) as f64 / 1000.0);
        }
        s.push('\n');
    }
    s
}

/// A percentile plot: latency in µs against the percentile, on the usual log scale (x =
/// -log10(1 - q): 1 is the 90th percentile, 2 the 99th, ...), a line per tag.
pub fn svg(tags: &BTreeMap<String, Histogram<u64>>, title: &str) -> Result<String, String> {
    let series = tags
        .iter()
        .filter(|(_, h)| !h.is_empty())
        .map(|(tag, h)| Series {
            name: if tag.is_empty() {
                "all".into()
            } else {
                tag.clone()
            },
            points: (0..=50)
                .map(|i| {
                    let x = f64::from(i) / 10.0;
                    let q = 1.0 - 10f64.powf(-x);
                    (x, h.value_at_quantile(q) as f64 / 1000.0)
                })
                .collect(),
        })
        .collect();
    let panel = Panel {
        x_label: Box::new(|x| {
            let nines = 100.0 * (1.0 - 10f64.powf(-x));
            format!("{nines:.*}%", (x.round() as usize).saturating_sub(2))
        }),
        x_ticks: 6,
        ..Panel::new(title, "percentile", "latency (µs)", series)
    };
    crate::plot::svg(800, 480, vec![panel])
}

#[cfg(test)]
mod tests {
    use super::*;
    use mimiq_metrics::hlog::IntervalLog;

    #[test]
    fn tags_add_up_over_intervals_into_a_table_and_a_plot() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.hlog");
        let mut log = IntervalLog::create(&path, "test").unwrap();
        let (mut up, mut down) = (duration_histogram(), duration_histogram());
        for v in 1..=1000u64 {
            up.record(v * 1_000).unwrap();
        }
        down.record(5_000_000).unwrap();
        log.write(&[("up.worker0", &up), ("down.worker0", &down)])
            .unwrap();
        log.write(&[("up.worker0", &up)]).unwrap();
        let tags = by_tag(&path, None).unwrap();
        assert_eq!(tags["up.worker0"].len(), 2000);
        assert_eq!(tags["down.worker0"].len(), 1);
        let t = table(&tags);
        assert!(
            t.contains("| up.worker0 | 2000 | 500.2 | 900.1 | 990.2 |"),
            "{t}"
        );
        assert!(t.contains("| down.worker0 | 1 | 5001.2 |"), "{t}");
        assert_eq!(by_tag(&path, Some("down")).unwrap().len(), 1);
        let plot = svg(&tags, "t").unwrap();
        assert_eq!(
            crate::plot::polylines(&plot)
                .iter()
                .filter(|l| l.len() == 51)
                .count(),
            2
        );
        assert!(by_tag(&dir.path().join("none.hlog"), None).is_err());
    }
}
