//! The main job (`scripts/demo`, `mimiq_perf::demo`) as a test: two clients hopping at once
//! through the single box and the MASQUE proxy. It returns an error when any of its checks
//! fails: a download not byte-exact (so neither client got the other's traffic), a client that
//! never hopped, a connection ID seen from two client addresses or a client address used
//! outside its lease + t_remove in the capture of the outside link, a spoofed source that got
//! through.

use std::time::{Duration, Instant};

use mimiq_perf::demo;
use mimiq_perf::masque::{stop_client, ProxyProc};
use mimiq_perf::singlebox::{self, SingleBox, Times};
use mimiq_perf::testbed::{require_root, Proc, Testbed};
use mimiq_perf::traffic;

#[test]
fn two_hopping_clients_end_to_end_pass_every_check_of_the_demo() {
    require_root();
    let out = tempfile::tempdir().unwrap();
    demo::run(8, Some(out.path())).unwrap();
    // What an operator finds afterwards: every process's counters and the agents' logs.
    for file in [
        "c1-stats.json",
        "c2-hops.csv",
        "c1-addresses.csv",
        "proxy-stats.json",
        "stats.json",
    ] {
        let text = std::fs::read_to_string(out.path().join(file)).unwrap_or_default();
        assert!(!text.is_empty(), "{file} kept and not empty");
    }
    // The outside link's capture, cut to the headers, with the TLS key logs beside it.
    let frames = mimiq_perf::capture::read_pcap(&out.path().join("outside.pcap")).unwrap();
    assert!(!frames.is_empty() && frames.iter().all(|f| f.bytes.len() <= 128));
    for file in ["proxy-keys.log", "c1-keys.log", "c2-keys.log"] {
        let text = std::fs::read_to_string(out.path().join(file)).unwrap_or_default();
        assert!(text.contains("CLIENT_TRAFFIC_SECRET_0"), "{file}: {text:?}");
    }
}

/// The single box with `times`, the proxy and its server outside, and an agent on `c1`.
fn one_agent(times: &Times) -> (SingleBox, ProxyProc, Proc) {
    let mut sb = singlebox::start(times);
    let proxy = demo::start_outside(&mut sb.tb, sb.dir.path()).unwrap();
    let (agent, _) = demo::start_agent(&mut sb.tb, sb.dir.path(), "c1", 1, "").unwrap();
    (sb, proxy, agent)
}

/// Downloads from the server on `c1` for `ms` milliseconds (byte-exact check).
fn download(tb: &Testbed, ms: u64) -> Result<(u64, bool), String> {
    let until = Instant::now() + Duration::from_millis(ms);
    let server = format!("{}:9000", demo::SERVER_V4).parse().unwrap();
    traffic::pattern_download(tb, "srv", server, "c1", u64::MAX, Some(until))
}

#[test]
fn the_allocator_going_away_mid_transfer_is_counted_and_the_transfer_goes_on() {
    require_root();
    let (mut sb, proxy, mut agent) = one_agent(&demo::TIMES);
    // The agent's first set is usable for t_ip (6-9 s) minus the expiry margin (1 s): the
    // connection goes on hopping between those addresses while the refill (asked 3 s before the
    // set runs short, at 2-5 s) fails.
    let (result, hops_at_stop) = std::thread::scope(|scope| {
        let tb = &sb.tb;
        let download = scope.spawn(move || download(tb, 5_500));
        std::thread::sleep(Duration::from_millis(800));
        sb.allocator.stop(Duration::from_secs(3));
        let at_stop = demo::agent_stats(sb.dir.path(), "c1")["client"]["hops_done"]
            .as_u64()
            .unwrap_or(0);
        (download.join().unwrap(), at_stop)
    });
    let report = stop_client(&mut agent).unwrap();
    let log = agent.describe();
    let (bytes, exact) = result.unwrap_or_else(|e| panic!("{e}; {report}; {log}"));
    assert!(exact && bytes > 1_000_000, "{bytes} bytes; {report}");
    assert!(
        report["allocation_failures"].as_u64().unwrap() >= 1,
        "{report}; {log}"
    );
    assert!(
        log.contains("allocation failed: allocator unreachable"),
        "{log}"
    );
    assert!(
        report["client"]["hops_done"].as_u64().unwrap() > hops_at_stop + 5,
        "hops went on: {report}"
    );
    drop(proxy);
}

#[test]
fn an_exhausted_pool_is_counted_and_the_transfer_goes_on_with_the_addresses_held() {
    require_root();
    // A /29 holds fewer than two sets of 4: the first request succeeds, the refill (asked
    // refill_lead_ms = 3 s before the set runs short, at 2-5 s) finds the pool exhausted. The
    // first set is usable for at least t_ip_min - expiry_margin = 5 s.
    let times = Times(
        demo::TIMES.0,
        demo::TIMES.1,
        demo::TIMES.2,
        demo::TIMES.3,
        "198.18.1.0/29",
    );
    let (sb, proxy, mut agent) = one_agent(&times);
    let result = download(&sb.tb, 5_500);
    let report = stop_client(&mut agent).unwrap();
    let log = agent.describe();
    let (bytes, exact) = result.unwrap_or_else(|e| panic!("{e}; {report}; {log}"));
    assert!(exact && bytes > 1_000_000, "{bytes} bytes; {report}");
    assert!(
        report["allocation_failures"].as_u64().unwrap() >= 1,
        "{report}; {log}"
    );
    assert!(log.contains("allocator out of addresses"), "{log}");
    assert_eq!(report["addresses_allocated"], 4, "{report}");
    assert!(
        report["client"]["hops_done"].as_u64().unwrap() >= 10,
        "{report}"
    );
    drop(proxy);
}
