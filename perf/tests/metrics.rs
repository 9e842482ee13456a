//! Every binary's metrics endpoint, scraped while it carries traffic between real kernel hosts:
//! what it serves parses as Prometheus text (prometheus-parse), holds exactly the families
//! docs/OPERATIONS.md lists for that binary (and every one the Grafana dashboard in
//! configs/grafana/ queries), moves when traffic moves, and `/healthz` says ready. Their `.hlog`
//! files read back with the hdrhistogram crate, and a storm of SIGUSR1 is absorbed (the dumps
//! it asks for coalesce).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use mimiq_allocator::Family;
use mimiq_metrics::hlog;
use mimiq_perf::masque::{self, stop_client, ProxyProc};
use mimiq_perf::singlebox::{allocate, start, use_address, SingleBox, LONG};
use mimiq_perf::testbed::{bin_path, eventually, require_root, Proc, Testbed};
use mimiq_perf::traffic;

/// A scrape: family names (from `# TYPE`) and each sample's value summed over its labels.
struct Scrape {
    families: BTreeSet<String>,
    sums: BTreeMap<String, f64>,
}

impl Scrape {
    fn parse(text: &str) -> Scrape {
        let lines = text.lines().map(|l| Ok(l.to_string()));
        let parsed = prometheus_parse::Scrape::parse(lines)
            .unwrap_or_else(|e| panic!("not Prometheus text: {e}\n{text}"));
        let mut sums = BTreeMap::new();
        for s in parsed.samples {
            let v = match s.value {
                prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Gauge(v) => v,
                other => panic!("{}: neither counter nor gauge: {other:?}", s.metric),
            };
            *sums.entry(s.metric).or_insert(0.0) += v;
        }
        let families = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_string)
            .collect();
        Scrape { families, sums }
    }

    fn get(&self, name: &str) -> f64 {
        self.sums.get(name).copied().unwrap_or(0.0)
    }
}

/// Scrapes `/metrics` at `at` inside `host`.
fn scrape(tb: &Testbed, host: &str, at: &str) -> Scrape {
    let text = tb
        .http_get(host, at, "/metrics")
        .unwrap_or_else(|e| panic!("scrape {host} {at}: {e}"));
    Scrape::parse(&text)
}

/// Waits until `/healthz` at `at` inside `host` answers 200 `ready: ...`.
fn wait_ready(tb: &Testbed, host: &str, at: &str) {
    eventually(Duration::from_secs(10), || {
        tb.http_get(host, at, "/healthz")
            .and_then(|b| b.starts_with("ready: ").then_some(()).ok_or(b))
    })
    .unwrap_or_else(|e| panic!("{host} {at} never ready: {e}"));
}

/// A file of the repository.
fn read(file: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(file);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{file}: {e}"))
}

/// The `mimiq_<binary>_*` names written in `file` (the repository's docs and configs).
fn names_in(file: &str, binary: &str) -> BTreeSet<String> {
    let text = read(file);
    let prefix = format!("mimiq_{binary}_");
    let mut names = BTreeSet::new();
    let mut rest = text.as_str();
    while let Some(i) = rest.find(&prefix) {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

/// The scrape holds exactly the families docs/OPERATIONS.md lists for `binary`, and every
/// name the Grafana dashboard queries.
fn assert_documented(s: &Scrape, binary: &str) {
    let documented = names_in("docs/OPERATIONS.md", binary);
    assert_eq!(
        s.families, documented,
        "{binary}: families served (left) and listed in docs/OPERATIONS.md (right) differ"
    );
    let queried = names_in("configs/grafana/mimiq.json", binary);
    let missing: Vec<_> = queried.difference(&s.families).collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries {missing:?}, which {binary} does not serve"
    );
}

/// Signals sent in one storm.
const STORM: usize = 2_000;

/// Sends `proc` [`STORM`] SIGUSR1 back to back; it must live on, and the dumps they ask for
/// coalesce (each binary checks the flag once a pass, so far fewer intervals than signals).
fn sigusr1_storm(proc: &mut Proc, hlog: &Path) {
    let before = hlog::read(hlog).unwrap().len();
    for _ in 0..STORM {
        proc.signal(libc::SIGUSR1);
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        proc.try_status().is_none(),
        "died of SIGUSR1: {}",
        proc.describe()
    );
    let added = hlog::read(hlog).unwrap().len() - before;
    assert!(
        added < STORM / 4,
        "{added} hlog entries for {STORM} signals"
    );
}

/// Each tag's samples over the whole log at `path`.
fn samples_by_tag(path: &Path) -> BTreeMap<String, u64> {
    let mut by = BTreeMap::new();
    for i in hlog::read(path).unwrap() {
        *by.entry(i.tag.unwrap_or_default()).or_insert(0) += i.histogram.len();
    }
    by
}

#[test]
fn the_proxy_and_the_agent_serve_documented_metrics_that_move_with_a_download() {
    require_root();
    let mut tb = Testbed::new().unwrap();
    masque::build(&mut tb).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let proxy = ProxyProc::start(
        &tb,
        "p",
        dir.path(),
        "0.0.0.0:4433",
        &format!(
            "metrics_listen = \"127.0.0.1:9465\"\nhlog_file = \"{}\"\n",
            dir.path().join("proxy.hlog").display()
        ),
    )
    .unwrap();
    let agent_cfg = masque::write_agent_config(
        dir.path(),
        None,
        5,
        &format!(
            "metrics_listen = \"127.0.0.1:9466\"\nstats_interval_ms = 100\nhlog_file = \"{}\"\n",
            dir.path().join("agent.hlog").display()
        ),
    )
    .unwrap();
    let (mut agent, _) = masque::start_agent(&mut tb, "c", &agent_cfg).unwrap();
    wait_ready(&tb, "p", "127.0.0.1:9465");
    wait_ready(&tb, "c", "127.0.0.1:9466");
    let proxy_before = scrape(&tb, "p", "127.0.0.1:9465");
    let agent_before = scrape(&tb, "c", "127.0.0.1:9466");
    assert_documented(&proxy_before, "proxy");
    assert_documented(&agent_before, "agent");

    const LEN: u64 = 4 * 1024 * 1024;
    let (got, exact) = traffic::pattern_download(
        &tb,
        "s",
        "198.18.20.2:9000".parse().unwrap(),
        "c",
        LEN,
        None,
    )
    .unwrap();
    assert!(got == LEN && exact, "{got} bytes, exact: {exact}");

    // The agent publishes every 100 ms and the proxy once a second: wait for both to.
    eventually(Duration::from_secs(10), || {
        let p = scrape(&tb, "p", "127.0.0.1:9465");
        let a = scrape(&tb, "c", "127.0.0.1:9466");
        let moved = [
            (
                "proxy tun_tx",
                p.get("mimiq_proxy_tun_tx_total") - proxy_before.get("mimiq_proxy_tun_tx_total"),
            ),
            (
                "proxy tun_rx",
                p.get("mimiq_proxy_tun_rx_total") - proxy_before.get("mimiq_proxy_tun_rx_total"),
            ),
            (
                "proxy udp_rx",
                p.get("mimiq_proxy_udp_rx_total") - proxy_before.get("mimiq_proxy_udp_rx_total"),
            ),
            (
                "agent hops_done",
                a.get("mimiq_agent_hops_done_total")
                    - agent_before.get("mimiq_agent_hops_done_total"),
            ),
        ];
        let inner = a.get("mimiq_agent_bytes_rx_total");
        if moved.iter().all(|(_, d)| *d > 0.0) && inner >= LEN as f64 {
            Ok(())
        } else {
            Err(format!("moved {moved:?}, agent inner bytes in {inner}"))
        }
    })
    .unwrap_or_else(|e| panic!("the counters did not follow the download: {e}"));

    // `mimiq-agent stats` reads the same endpoint.
    let bin = bin_path("mimiq-agent").unwrap();
    let out = tb
        .exec_ok(
            "c",
            &[
                bin.to_str().unwrap(),
                "stats",
                "--config",
                agent_cfg.to_str().unwrap(),
            ],
        )
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("mimiq_agent_bytes_rx_total "), "{table}");

    let (proxy_hlog, agent_hlog) = (dir.path().join("proxy.hlog"), dir.path().join("agent.hlog"));
    let mut proxy = proxy;
    sigusr1_storm(&mut proxy.proc, &proxy_hlog);
    sigusr1_storm(&mut agent, &agent_hlog);
    wait_ready(&tb, "p", "127.0.0.1:9465");
    stop_client(&mut agent).unwrap();
    proxy.proc.stop(Duration::from_secs(10));
    // Both directions of every worker, bursts in both directions during the download.
    let p = samples_by_tag(&proxy_hlog);
    assert!(p.keys().any(|t| t.starts_with("up.worker")), "{p:?}");
    let total = |dir: &str| -> u64 {
        p.iter()
            .filter(|(t, _)| t.starts_with(dir))
            .map(|(_, n)| n)
            .sum()
    };
    assert!(total("up.") > 0 && total("down.") > 0, "{p:?}");
    // `mimiq-perf hlog` summarises it.
    let plot = dir.path().join("proxy.svg");
    let out = std::process::Command::new(bin_path("mimiq-perf").unwrap())
        .arg("hlog")
        .arg(&proxy_hlog)
        .arg("--svg")
        .arg(&plot)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        table.contains("| up.worker") && table.contains("| down.worker"),
        "{table}"
    );
    assert!(std::fs::read_to_string(&plot).unwrap().starts_with("<svg"));
    let a = samples_by_tag(&agent_hlog);
    assert!(a["hop"] > 0, "{a:?}");
    assert_eq!(
        a["allocation"], 0,
        "a static source allocates nothing: {a:?}"
    );
}

#[test]
fn the_switch_and_the_allocator_serve_documented_metrics_that_move_with_an_allocation() {
    require_root();
    let SingleBox {
        tb,
        mut allocator,
        switch: _switch,
        dir,
    } = start(&LONG);
    // The single box's switch serves at 127.0.0.1:9464 and the allocator at :9364, both on the
    // switch host.
    wait_ready(&tb, "sw", "127.0.0.1:9464");
    wait_ready(&tb, "sw", "127.0.0.1:9364");
    let switch_before = scrape(&tb, "sw", "127.0.0.1:9464");
    let alloc_before = scrape(&tb, "sw", "127.0.0.1:9364");
    assert_documented(&switch_before, "switch");
    assert_documented(&alloc_before, "allocator");

    let a = allocate(&tb, "c1", Family::V4).addr;
    use_address(&tb, "c1", a);
    eventually(Duration::from_secs(5), || {
        traffic::ping(&tb, "out", &a.to_string(), 1).map(drop)
    })
    .unwrap_or_else(|e| panic!("{a} never answered: {e}"));

    eventually(Duration::from_secs(5), || {
        let s = scrape(&tb, "sw", "127.0.0.1:9464");
        let al = scrape(&tb, "sw", "127.0.0.1:9364");
        let moved = [
            (
                "switch rx_packets",
                s.get("mimiq_switch_rx_packets_total")
                    - switch_before.get("mimiq_switch_rx_packets_total"),
            ),
            (
                "switch tx_packets",
                s.get("mimiq_switch_tx_packets_total")
                    - switch_before.get("mimiq_switch_tx_packets_total"),
            ),
            (
                "allocations",
                al.get("mimiq_allocator_allocations_total")
                    - alloc_before.get("mimiq_allocator_allocations_total"),
            ),
            (
                "leases",
                al.get("mimiq_allocator_leases") - alloc_before.get("mimiq_allocator_leases"),
            ),
        ];
        if moved.iter().all(|(_, d)| *d > 0.0) {
            Ok(())
        } else {
            Err(format!("moved {moved:?}"))
        }
    })
    .unwrap_or_else(|e| panic!("the counters did not follow the traffic: {e}"));

    // `mimiq-allocator stats` reads the same endpoint.
    let bin = bin_path("mimiq-allocator").unwrap();
    let cfg = dir.path().join("allocator.toml");
    let out = tb
        .exec_ok(
            "sw",
            &[
                bin.to_str().unwrap(),
                "stats",
                "--config",
                cfg.to_str().unwrap(),
            ],
        )
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("mimiq_allocator_allocations_total{family=\"4\"} 1\n"),
        "{table}"
    );

    let alloc_hlog = dir.path().join("allocator.hlog");
    sigusr1_storm(&mut allocator, &alloc_hlog);
    wait_ready(&tb, "sw", "127.0.0.1:9364");
    let by = samples_by_tag(&alloc_hlog);
    assert!(by["request"] >= 1 && by["commit"] >= 1, "{by:?}");
}

#[test]
fn the_dashboard_is_grafana_json_with_mimiq_queries_on_every_panel() {
    let d: serde_json::Value = serde_json::from_str(&read("configs/grafana/mimiq.json")).unwrap();
    assert_eq!(d["uid"], "mimiq");
    let panels = d["panels"].as_array().unwrap();
    let graphs: Vec<_> = panels.iter().filter(|p| p["type"] != "row").collect();
    assert!(graphs.len() >= 20, "{} panels", graphs.len());
    for p in graphs {
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{} has no query", p["title"]);
        for t in targets {
            let expr = t["expr"].as_str().unwrap();
            assert!(expr.contains("mimiq_"), "{}: {expr}", p["title"]);
        }
    }
    for binary in ["switch", "proxy", "allocator", "agent"] {
        assert!(
            !names_in("configs/grafana/mimiq.json", binary).is_empty(),
            "{binary}"
        );
    }
}
