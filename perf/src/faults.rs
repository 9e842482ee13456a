//! Faults under load (`mimiq-perf faults`, perf/tests/faults.rs): a process killed with SIGKILL
//! in the middle of a transfer through it, started again, and what the transfer, the leases and
//! the clients made of it, with the time it took to come back.
//!
//! - the switch (single box, both roles): a TCP download from the outside to a client;
//! - the allocator (single box, its redb store): the same download, and a new allocation;
//! - the proxy (`mimiq_perf::masque`'s testbed): a TCP download through `mimiq-proxy client ip`;
//! - an agent: its addresses are withdrawn at their expiry, and nobody else's are.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use mimiq_allocator::Family;
use serde::Serialize;

use crate::masque::{self, addr as masque_addr, start_client, stop_client, ProxyProc};
use crate::singlebox::{self, allocate, try_allocate, use_address, SingleBox, LONG};
use crate::switch::Switch;
use crate::testbed::topology::single_box_addr as addr;
use crate::testbed::{bin_path, eventually, Testbed};
use crate::traffic::pattern_download;

/// What one fault did.
#[derive(Debug, Clone, Serialize)]
pub struct Fault {
    /// The process killed, and how.
    pub fault: String,
    /// What ran through it meanwhile.
    pub load: String,
    /// Whether everything the scenario checks held.
    pub survived: bool,
    /// Bytes of the transfer that did not arrive, or arrived wrong (0 when it survived).
    pub lost_bytes: u64,
    /// From the kill to the first sign of service again (named in `recovered_when`), ms.
    pub recovery_ms: u64,
    /// What `recovery_ms` waits for.
    pub recovered_when: String,
    /// What was checked, and what was found.
    pub detail: String,
}

/// Bytes `host` has received on `ifname` so far.
pub fn rx_bytes(tb: &Testbed, host: &str, ifname: &str) -> Result<u64, String> {
    let path = format!("/sys/class/net/{ifname}/statistics/rx_bytes");
    let out = tb.exec(host, &["cat", &path]).map_err(|e| e.to_string())?;
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .map_err(|e| format!("{path}: {e}"))
}

/// Waits until `host` has received `bytes` more on `ifname` than when called (20 s at most).
fn received_more(tb: &Testbed, host: &str, ifname: &str, bytes: u64) -> Result<(), String> {
    let at = rx_bytes(tb, host, ifname)?;
    eventually(Duration::from_secs(20), || {
        match rx_bytes(tb, host, ifname)? - at {
            n if n >= bytes => Ok(()),
            n => Err(format!("{n} bytes on {host} {ifname}")),
        }
    })
    .map_err(|e| e.to_string())
}

/// Downloads `len` bytes from the outside host to `client` (byte-checked) while `fault` runs
/// once a few megabytes have arrived; returns what arrived, whether it was exact, and what
/// `fault` returned.
fn download_across<T>(
    tb: &Testbed,
    (server, listen, client, ifname): (&str, SocketAddr, &str, &str),
    len: u64,
    fault: impl FnOnce() -> Result<T, String>,
) -> Result<(u64, bool, T), String> {
    std::thread::scope(|scope| {
        let download = scope.spawn(|| pattern_download(tb, server, listen, client, len, None));
        received_more(tb, client, ifname, 5_000_000)
            .map_err(|e| format!("the download did not start: {e}"))?;
        if download.is_finished() {
            return Err("the download ended before the fault".into());
        }
        let t = fault()?;
        let (got, exact) = download
            .join()
            .map_err(|_| "the download thread panicked".to_string())??;
        Ok((got, exact, t))
    })
}

/// The switch killed under a 60 MB download from the outside to c1: it attaches its XDP
/// programs again, gets the allocator's rule snapshot, and c1 (whose lease lives on) receives
/// again.
pub fn switch(len: u64) -> Result<Fault, String> {
    let SingleBox {
        tb,
        mut allocator,
        mut switch,
        dir,
    } = singlebox::start(&LONG);
    let granted = allocate(&tb, "c1", Family::V4);
    use_address(&tb, "c1", granted.addr);
    let listen: SocketAddr = format!("{}:9000", addr::OUT_V4).parse().expect("address");
    let stats = dir.path().join("stats.json");
    let config = dir.path().join("switch.toml");
    let (got, exact, (restarted, recovery)) =
        download_across(&tb, ("out", listen, "c1", "eth0"), len, || {
            let killed = Instant::now();
            switch.proc.signal(libc::SIGKILL);
            // Its lock on the interfaces goes with the process.
            let _ = switch.proc.wait_timeout(Duration::from_secs(5));
            let _ = std::fs::remove_file(&stats);
            let config = config.to_str().ok_or("config path is not UTF-8")?;
            let restarted = Switch::start(&tb, "sw", &["--config", config], &stats)?;
            received_more(&tb, "c1", "eth0", 1_000_000)?;
            Ok((restarted, killed.elapsed()))
        })?;
    let applied: u64 = restarted.stats()?.0["workers"].as_array().map_or(0, |w| {
        w.iter().filter_map(|w| w["updates_applied"].as_u64()).sum()
    });
    drop(restarted);
    allocator.stop(Duration::from_secs(5));
    Ok(Fault {
        fault: "switch (single box) kill -9, restarted".into(),
        load: format!("{} MB TCP download, outside → c1", len / 1_000_000),
        survived: got == len && exact && applied >= 1,
        lost_bytes: if exact { len - got } else { len },
        recovery_ms: recovery.as_millis() as u64,
        recovered_when: "1 MB more reached c1".into(),
        detail: format!(
            "{got} of {len} bytes, {}; the new process applied {applied} rule updates (the snapshot)",
            if exact { "every byte as sent" } else { "CORRUPTED" }
        ),
    })
}

/// The allocator killed under the same download, with its leases in its redb store: the
/// download goes on (the switch keeps its tables and takes the new process's snapshot), c1's
/// lease is still there after the restart, and a new client gets another address.
pub fn allocator(len: u64) -> Result<Fault, String> {
    let SingleBox {
        tb,
        mut allocator,
        switch,
        dir,
    } = singlebox::start(&LONG);
    let granted = allocate(&tb, "c1", Family::V4);
    use_address(&tb, "c1", granted.addr);
    let listen: SocketAddr = format!("{}:9000", addr::OUT_V4).parse().expect("address");
    let bin = bin_path("mimiq-allocator")?;
    let config = dir.path().join("allocator.toml");
    let (got, exact, (mut restarted, recovery, other)) =
        download_across(&tb, ("out", listen, "c1", "eth0"), len, || {
            let killed = Instant::now();
            allocator.signal(libc::SIGKILL);
            let _ = allocator.wait_timeout(Duration::from_secs(5));
            let args = [
                bin.to_str().ok_or("binary path is not UTF-8")?,
                "run",
                "--config",
                config.to_str().ok_or("config path is not UTF-8")?,
            ];
            let restarted = tb.spawn("sw", &args, false).map_err(|e| e.to_string())?;
            // Serving again: c2 gets an address.
            let other = eventually(Duration::from_secs(20), || {
                try_allocate(&tb, "c2", Family::V4)
            })
            .map_err(|e| format!("no allocation after the restart: {e}"))?;
            Ok((restarted, killed.elapsed(), other.addr))
        })?;
    let leases = allocator_leases(&tb, &bin, &config)?;
    let kept = leases.contains(&granted.addr.to_string());
    restarted.stop(Duration::from_secs(5));
    drop(switch);
    Ok(Fault {
        fault: "allocator kill -9, restarted from its store".into(),
        load: format!("{} MB TCP download, outside → c1", len / 1_000_000),
        survived: got == len && exact && kept && other != granted.addr,
        lost_bytes: if exact { len - got } else { len },
        recovery_ms: recovery.as_millis() as u64,
        recovered_when: "c2 was granted an address".into(),
        detail: format!(
            "{got} of {len} bytes, {}; c1's lease of {} {} after the restart; c2 got {other}",
            if exact {
                "every byte as sent"
            } else {
                "CORRUPTED"
            },
            granted.addr,
            if kept { "still there" } else { "LOST" },
        ),
    })
}

/// `mimiq-allocator leases` on the allocator's host (it asks the running server, which holds
/// the store).
fn allocator_leases(
    tb: &Testbed,
    bin: &std::path::Path,
    config: &std::path::Path,
) -> Result<String, String> {
    let utf8 = |p: &std::path::Path| p.to_str().map(str::to_owned).ok_or("path is not UTF-8");
    let out = tb
        .exec("sw", &[&utf8(bin)?, "leases", "--config", &utf8(config)?])
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "mimiq-allocator leases: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The proxy killed under a 100 MB download through `mimiq-proxy client ip` (idle timeouts
/// 1.5 s), started again on the same port: the client notices, connects again from its next
/// address, keeps its TUN device and gets its addresses back.
pub fn proxy(len: u64) -> Result<Fault, String> {
    let mut tb = Testbed::new().map_err(|e| e.to_string())?;
    masque::build(&mut tb).map_err(|e| e.to_string())?;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let extra = "[quic]\nidle_timeout_ms = 1500\n";
    let proxy = ProxyProc::start(&tb, "p", dir.path(), "0.0.0.0:4433", extra)?;
    let url = format!("{}:4433", masque_addr::PROXY_V4);
    let bind = format!(
        "{},{}",
        masque_addr::CLIENT_V4[0],
        masque_addr::CLIENT_V4[1]
    );
    let args = ["ip", "--proxy", &url, "--bind", &bind, "--tun", "mq0"];
    let (mut client, ready) = start_client(&tb, "c", &args)?;
    let listen: SocketAddr = format!("{}:9000", masque_addr::SERVER_V4)
        .parse()
        .expect("address");
    let (got, exact, recovery) = download_across(&tb, ("s", listen, "c", "mq0"), len, || {
        let killed = Instant::now();
        proxy.kill_and_restart(&tb, "p")?;
        received_more(&tb, "c", "mq0", 1_000_000)?;
        Ok(killed.elapsed())
    })?;
    let stats = stop_client(&mut client)?;
    let requested = eventually(Duration::from_secs(10), || {
        let s = proxy.stats()?;
        match s["addresses_requested"].as_u64() {
            Some(n) if n > 0 => Ok(s),
            _ => Err(format!("{s}")),
        }
    })
    .map_err(|e| e.to_string())?;
    let kept = stats["addresses_changed"] == 0
        && stats["addresses"][0]
            .as_str()
            .is_some_and(|a| ready.contains(a));
    Ok(Fault {
        fault: "proxy kill -9, restarted on the same port".into(),
        load: format!(
            "{} MB TCP download through mimiq-proxy client ip",
            len / 1_000_000
        ),
        survived: got == len && exact && stats["reconnects"] == 1 && kept,
        lost_bytes: if exact { len - got } else { len },
        recovery_ms: recovery.as_millis() as u64,
        recovered_when: "1 MB more through the tunnel (the 1.5 s idle timeout included)".into(),
        detail: format!(
            "{got} of {len} bytes, {}; the client reconnected {} time(s), addresses {} ({} asked for, {} refused)",
            if exact { "every byte as sent" } else { "CORRUPTED" },
            stats["reconnects"],
            if kept { "kept" } else { "CHANGED" },
            requested["addresses_requested"],
            requested["addresses_refused"],
        ),
    })
}

/// An agent killed: the addresses it held stay leased (and routed) until their lifetime ends,
/// then drain for `t_remove` and are gone; another agent's are not touched.
pub fn agent() -> Result<Fault, String> {
    use crate::demo::{start_agent, start_outside, TIMES};
    let SingleBox {
        mut tb,
        mut allocator,
        switch,
        dir,
    } = singlebox::start(&TIMES);
    let _proxy = start_outside(&mut tb, dir.path())?;
    let (killed_agent, _) = start_agent(&mut tb, dir.path(), "c1", 1, "")?;
    let (mut other, _) = start_agent(&mut tb, dir.path(), "c2", 2, "")?;
    let bin = bin_path("mimiq-allocator")?;
    let config = dir.path().join("allocator.toml");
    // What c1 holds now: the addresses its log says were allocated and not yet removed.
    let held = |client: &str| -> Result<Vec<IpAddr>, String> {
        let log = std::fs::read_to_string(dir.path().join(format!("{client}-addresses.csv")))
            .map_err(|e| e.to_string())?;
        let mut live: Vec<IpAddr> = Vec::new();
        for line in log.lines() {
            let f: Vec<&str> = line.split(',').collect();
            let Some(a) = f.get(2).and_then(|a| a.parse().ok()) else {
                continue;
            };
            match f.get(1) {
                Some(&"allocated") => live.push(a),
                _ => live.retain(|x| *x != a),
            }
        }
        Ok(live)
    };
    let c1 = held("c1")?;
    let c1_mac = singlebox::mac(&tb, "c1", "eth0");
    // How many of them are leased to c1 (once back in the pool, c2 may be given one).
    let leased_to_c1 = |leases: &str| {
        c1.iter()
            .filter(|a| {
                let lease = format!("{a} {c1_mac} ");
                leases.lines().any(|l| l.starts_with(&lease))
            })
            .count()
    };
    if leased_to_c1(&allocator_leases(&tb, &bin, &config)?) == 0 {
        return Err(format!(
            "none of c1's addresses {c1:?} is leased to its MAC {c1_mac}"
        ));
    }
    let killed = Instant::now();
    killed_agent.signal(libc::SIGKILL);
    // At most t_ip (9 s) + t_remove (2 s) later, none of them is leased to c1 any more.
    let gone = eventually(Duration::from_millis(TIMES.1 + TIMES.2 + 5_000), || {
        let leases = allocator_leases(&tb, &bin, &config)?;
        match leased_to_c1(&leases) {
            0 => Ok(killed.elapsed()),
            n => Err(format!("{n} of c1's addresses still leased")),
        }
    });
    let c2_alive = other.try_status().is_none();
    let c2_stats = stop_client(&mut other)?;
    drop(switch);
    allocator.stop(Duration::from_secs(5));
    let (survived, recovery, detail) = match gone {
        Ok(after) => (
            !c1.is_empty() && c2_alive,
            after,
            format!(
                "c1's {} addresses withdrawn {:.1} s after the kill (t_ip ≤ 9 s + t_remove 2 s); c2 kept running, {} addresses allocated",
                c1.len(),
                after.as_secs_f64(),
                c2_stats["addresses_allocated"]
            ),
        ),
        Err(e) => (false, killed.elapsed(), format!("not withdrawn: {e}")),
    };
    Ok(Fault {
        fault: "agent kill -9".into(),
        load: "two agents hopping through the single box".into(),
        survived,
        lost_bytes: 0,
        recovery_ms: recovery.as_millis() as u64,
        recovered_when: "the last of its addresses left the allocator's leases".into(),
        detail,
    })
}

/// Every fault, one after the other.
pub fn run(log: &mut dyn FnMut(&str)) -> Result<Vec<Fault>, String> {
    let mut out = Vec::new();
    for (name, f) in [
        (
            "switch",
            (|| switch(60_000_000)) as fn() -> Result<Fault, String>,
        ),
        ("allocator", || allocator(60_000_000)),
        ("proxy", || proxy(100_000_000)),
        ("agent", agent),
    ] {
        log(&format!("{name}: kill -9 under load..."));
        let f = f()?;
        log(&format!(
            "{name}: {} in {} ms; {}",
            if f.survived { "recovered" } else { "FAILED" },
            f.recovery_ms,
            f.detail
        ));
        out.push(f);
    }
    Ok(out)
}

/// The faults as a Markdown table.
pub fn markdown(faults: &[Fault]) -> String {
    let mut md = String::from(
        "| fault | load held | survived | data lost | recovery | what was checked |\n|---|---|---|---|---|---|\n",
    );
    for f in faults {
        md += &format!(
            "| {} | {} | {} | {} bytes | {} ms ({}) | {} |\n",
            f.fault,
            f.load,
            if f.survived { "yes" } else { "NO" },
            f.lost_bytes,
            f.recovery_ms,
            f.recovered_when,
            f.detail
        );
    }
    md
}
