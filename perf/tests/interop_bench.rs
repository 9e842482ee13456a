//! `mimiq-perf bench interop` end to end, small: one run per cell of two cells (the stock
//! quiche server and aioquic, IPv4, a hop every 5 packets, 50 GETs), through the command line,
//! and its refusals of bad flags. About 3 s.

use std::process::Command;

use mimiq_perf::testbed::{bin_path, require_root};
use serde_json::Value;

fn bench(args: &[&str]) -> std::process::Output {
    Command::new(bin_path("mimiq-perf").unwrap())
        .args(["bench", "interop"])
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn the_interop_bench_completes_every_run_against_quiche_and_aioquic_and_writes_its_summary() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("interop.json");
    let out = bench(&[
        "--runs",
        "1",
        "--requests",
        "50",
        "--servers",
        "quiche,aioquic",
        "--strategies",
        "every:5",
        "--families",
        "v4",
        "--json",
        json.to_str().unwrap(),
        "--out",
        dir.path().to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(r["summary"]["runs"], 2, "{r}");
    assert_eq!(r["summary"]["runs_completed"], 2, "{r}");
    assert_eq!(r["summary"]["runs_failed"], 0, "{r}");
    assert_eq!(r["summary"]["cells_compared"], 1, "aioquic's cell: {r}");
    // (How many hops 50 GETs make is a rate of the machine's load; perf/tests/direct_hop.rs
    // runs GETs until it has the hops it checks.)
    for row in r["rows"].as_array().unwrap() {
        assert_eq!(row["responses"], 50, "{row}");
        assert_eq!(row["hops_failed"], 0, "{row}");
    }
    // The same results in the output directory, and the table on stdout.
    assert!(dir.path().join("results.json").exists());
    assert!(
        stdout.contains("| aioquic | V4 | every:5 | 1/1 |"),
        "{stdout}"
    );
}

#[test]
fn bad_interop_flags_are_one_clear_error_and_no_run() {
    for (args, says) in [
        (&["--strategies", "every:0"][..], "every_packets"),
        (&["--servers", "nginx"][..], "unknown server \"nginx\""),
        (&["--families", "v5"][..], "expected v4 or v6"),
        (&["--runs", "0"][..], "--runs"),
    ] {
        let out = bench(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
        assert!(
            out.stdout.is_empty(),
            "{args:?} ran: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}
