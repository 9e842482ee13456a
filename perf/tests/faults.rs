//! Faults under load on the single box (`mimiq_perf::singlebox`): a process killed with SIGKILL
//! in the middle of a transfer through it, started again, and what the transfer and the leases
//! made of it. (The proxy's and the agent's tunnel across a proxy's kill -9 are in
//! perf/tests/masque.rs and perf/tests/agent_tunnel.rs; the allocator's leases across kill -9
//! at random moments in allocator/tests/crash.rs.)

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mimiq_allocator::Family;
use mimiq_perf::singlebox::{allocate, start, use_address, SingleBox, LONG};
use mimiq_perf::switch::Switch;
use mimiq_perf::testbed::topology::single_box_addr as addr;
use mimiq_perf::testbed::{eventually, require_root, Testbed};
use mimiq_perf::traffic::pattern_download;

/// Bytes `host` has received on `ifname` so far.
fn rx_bytes(tb: &Testbed, host: &str, ifname: &str) -> Result<u64, String> {
    let path = format!("/sys/class/net/{ifname}/statistics/rx_bytes");
    let out = tb.exec(host, &["cat", &path]).map_err(|e| e.to_string())?;
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .map_err(|e| format!("{path}: {e}"))
}

#[test]
fn a_switch_killed_under_a_tcp_download_comes_back_from_the_rule_snapshot_and_the_download_completes_byte_exact(
) {
    require_root();
    let SingleBox {
        tb,
        mut allocator,
        switch,
        dir,
    } = start(&LONG);
    let granted = allocate(&tb, "c1", Family::V4);
    use_address(&tb, "c1", granted.addr);
    // The outside serves, c1 downloads: requests leave through access and edge, the data comes
    // back through edge, IP-in-IP and access, to the binding the allocator published.
    let server: SocketAddr = format!("{}:9000", addr::OUT_V4).parse().unwrap();
    let len = 60_000_000u64;
    let stats_path = dir.path().join("stats.json");
    let config = dir.path().join("switch.toml");
    let (result, restarted, down) = std::thread::scope(|sc| {
        let download = sc.spawn(|| pattern_download(&tb, "out", server, "c1", len, None));
        let before = rx_bytes(&tb, "c1", "eth0").unwrap();
        eventually(Duration::from_secs(20), || {
            match rx_bytes(&tb, "c1", "eth0")? - before {
                n if n > 5_000_000 => Ok(()),
                n => Err(format!("{n} bytes so far")),
            }
        })
        .unwrap_or_else(|e| panic!("the download started: {e}"));
        assert!(
            !download.is_finished(),
            "the download ended before the kill"
        );
        // kill -9: its XDP programs and sockets go with it, and with them every binding it
        // had learned from the allocator. The new process attaches again and asks the
        // allocator's rule stream for a snapshot.
        let killed = Instant::now();
        switch.proc.signal(libc::SIGKILL);
        std::fs::remove_file(&stats_path).unwrap();
        let restarted = Switch::start(
            &tb,
            "sw",
            &["--config", config.to_str().unwrap()],
            &stats_path,
        )
        .unwrap_or_else(|e| panic!("restart: {e}"));
        // Traffic flows again once the snapshot is applied: c1 receives again.
        let at = rx_bytes(&tb, "c1", "eth0").unwrap();
        eventually(Duration::from_secs(20), || {
            match rx_bytes(&tb, "c1", "eth0")? - at {
                n if n > 1_000_000 => Ok(()),
                n => Err(format!("{n} bytes since the restart")),
            }
        })
        .unwrap_or_else(|e| panic!("traffic after the restart: {e}"));
        let down = killed.elapsed();
        (download.join().unwrap(), restarted, down)
    });
    let (got, exact) = result.unwrap_or_else(|e| panic!("{e}; {}", restarted.proc.describe()));
    assert_eq!(got, len);
    assert!(exact, "a byte differs");
    // The new process learned c1's binding from the snapshot (no new allocation happened).
    let stats = restarted.stats().unwrap();
    let applied: u64 = stats.0["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["updates_applied"].as_u64().unwrap_or(0))
        .sum();
    assert!(applied >= 1, "{:?}", stats.0);
    eprintln!(
        "from the kill to 1 MB received again: {} ms",
        down.as_millis()
    );
    drop(restarted);
    allocator.stop(Duration::from_secs(5));
}
