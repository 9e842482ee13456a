//! `mimiq-perf soak` end to end, short: two minutes of the demo's load with the proxy killed
//! (SIGKILL) and started again after the first, through the command line. The hour's run and its
//! figures are in docs/RELIABILITY.md.

use std::process::Command;

use mimiq_perf::testbed::{bin_path, require_root};
use serde_json::Value;

#[test]
fn two_minutes_of_soak_with_a_proxy_kill_break_no_transfer_and_sample_every_process() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("soak.json");
    let out = Command::new(bin_path("mimiq-perf").unwrap())
        .args(["soak", "--minutes", "2", "--fault-every-min", "1", "--json"])
        .arg(&json)
        .arg("--out")
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let s = &r["summary"];
    assert_eq!(s["broken_transfers"], 0, "{s}");
    assert_eq!(s["bytes_wrong"], 0, "{s}");
    assert_eq!(s["faults"], 1, "{s}");
    // Each download lasts 20 s: at least four per client in two minutes.
    assert!(s["transfers"].as_u64().unwrap() >= 8, "{s}");
    let samples = r["samples"].as_array().unwrap();
    assert_eq!(samples.len(), 2);
    for sample in samples {
        let procs = sample["processes"].as_array().unwrap();
        let names: Vec<&str> = procs.iter().map(|p| p["name"].as_str().unwrap()).collect();
        assert_eq!(
            names,
            ["allocator", "switch", "proxy", "agent-c1", "agent-c2"],
            "{sample}"
        );
        assert!(
            procs.iter().all(|p| p["rss_kb"].as_u64().unwrap() > 0),
            "{sample}"
        );
        assert!(sample["mbit_s"].as_f64().unwrap() > 0.0, "{sample}");
    }
    // The proxy after the fault is another process.
    assert_ne!(
        samples[0]["processes"][2]["pid"],
        samples[1]["processes"][2]["pid"]
    );
    assert!(dir.path().join("soak.svg").exists());
    assert!(stdout.contains("0 broken, 0 bytes wrong"), "{stdout}");
}
