//! `mimiq-perf bench figure3` on a reduced grid (two RTTs, two migration rates, 1 s per cell):
//! every cell moves data, the hops happen at the rates asked, and the table, CSV, SVG and
//! HdrHistogram files are written and parse.

use std::time::Duration;

use mimiq_perf::experiments::figure3::{self, Params};
use mimiq_perf::testbed::require_root;

#[test]
fn a_reduced_figure3_grid_measures_every_cell_and_writes_its_files() {
    require_root();
    let params = Params {
        rtts_ms: vec![10, 30],
        rates: vec![4, 25],
        per_cell: Duration::from_secs(1),
        ..Params::default()
    };
    let fig = figure3::run(&params, &mut |l| eprintln!("{l}")).expect("figure3 runs");
    let md = figure3::markdown(&fig);
    eprintln!("{md}");
    assert_eq!(fig.rates, vec![0, 4, 25], "the baseline is always run");
    // Per RTT: two baselines and the two rates.
    assert_eq!(fig.cells.len(), 2 * 4);
    for c in &fig.cells {
        assert!(c.requests > 0 && c.requests_per_s > 0.0, "{c:?}");
        // One GET per RTT at most: the switch's delay is in force. (How close to one per RTT
        // the client gets depends on the machine's load: `mimiq-perf bench figure3`
        // reports it.)
        let ceiling = 1000.0 / f64::from(c.rtt_ms);
        assert!(
            c.requests_per_s <= ceiling * 1.01,
            "faster than the RTT allows: {c:?}"
        );
        assert_eq!(c.hops_failed, 0, "{c:?}");
        if c.rate == 0 {
            assert_eq!(c.hops_completed, 0, "{c:?}");
        } else {
            // Hops are due at the seed's packet count (2 per request); each one completes.
            let expected = c.requests * 2 * u64::from(c.rate) / 100;
            assert!(
                c.hops_due + 1 >= expected && c.hops_due <= expected + 1,
                "{c:?}"
            );
            assert!(
                c.hops_completed + 1 >= c.hops_due,
                "hops at the rate asked: {c:?}"
            );
            let rate = f64::from(c.rate);
            assert!(
                (c.achieved_rate - rate).abs() <= rate * 0.25 + 2.0,
                "achieved {} per 100 packets, asked {rate}: {c:?}",
                c.achieved_rate
            );
            assert!(c.switch_p50_us.is_some(), "{c:?}");
            // A hop's probe takes a round trip, never less; more on a loaded machine, so the
            // upper bound only catches a probe that waited for a timer (100 ms or more).
            let switch_ms = c.switch_p50_us.unwrap() as f64 / 1000.0;
            let rtt_ms = f64::from(c.rtt_ms);
            assert!(
                switch_ms >= rtt_ms * 0.95 && switch_ms < rtt_ms * 2.0 + 100.0,
                "{c:?}"
            );
        }
    }
    assert_eq!(fig.hop_latency.len(), 2);
    for h in &fig.hop_latency {
        assert!(h.hops > 0, "{h:?}");
        assert!(
            h.baseline_request_p50_us >= u64::from(h.rtt_ms) * 1000,
            "{h:?}"
        );
    }
    assert_eq!(fig.switch_impair_full_drops, 0);
    assert_eq!(fig.server.reused_cids, 0);
    assert!(fig.server.peer_migrations > 0);

    let dir = tempfile::tempdir().unwrap();
    figure3::write_files(dir.path(), &fig).unwrap();
    // The CSV: a header and one line per cell, all with the header's number of fields.
    let csv = std::fs::read_to_string(dir.path().join("results.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 1 + fig.cells.len());
    let fields = lines[0].split(',').count();
    let rps_col = lines[0]
        .split(',')
        .position(|f| f == "requests_per_s")
        .unwrap();
    for line in &lines[1..] {
        let cols: Vec<&str> = line.split(',').collect();
        assert_eq!(cols.len(), fields, "{line}");
        assert!(cols[rps_col].parse::<f64>().unwrap() > 0.0, "{line}");
    }
    // The SVG (plotters): one closed document, a line per RTT with a point per rate, and a
    // legend entry for each.
    let svg = std::fs::read_to_string(dir.path().join("figure3.svg")).unwrap();
    assert!(svg.starts_with("<svg"));
    assert!(svg.trim_end().ends_with("</svg>"));
    assert_eq!(svg.matches("<svg").count(), 1);
    let lines: Vec<_> = mimiq_perf::plot::polylines(&svg)
        .into_iter()
        .filter(|l| l.len() == 3)
        .collect();
    assert_eq!(lines.len(), 2, "a line per RTT: {svg}");
    for rtt in [10, 30] {
        assert!(
            svg.contains(&format!(">\nRTT {rtt} ms\n<")),
            "legend for {rtt} ms"
        );
    }
    assert!(lines
        .iter()
        .flatten()
        .all(|&(x, y)| (0.0..=760.0).contains(&x) && (0.0..=460.0).contains(&y)));
    // The histograms: HdrHistogram's percentile text, counts rising to the number of hops.
    for h in &fig.hop_latency {
        let text = std::fs::read_to_string(dir.path().join(&h.hgrm_file)).unwrap();
        assert!(
            text.starts_with("       Value     Percentile TotalCount"),
            "{text}"
        );
        let last = text
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with('#') && !l.contains("Value"))
            .map(|l| {
                let cols: Vec<&str> = l.split_whitespace().collect();
                let _value: f64 = cols[0].parse().unwrap();
                let q: f64 = cols[1].parse().unwrap();
                assert!((0.0..=1.0).contains(&q), "{l}");
                cols[2].parse::<u64>().unwrap()
            })
            .max()
            .unwrap();
        assert_eq!(last, h.hops, "{text}");
    }
    // And the table names the target's verdict.
    assert!(md.contains("Target:"), "{md}");
}
