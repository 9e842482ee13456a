//! Forwarding through the MIMIQ single box with full tables (1M IPv4 bindings, 64k aliases),
//! next to the engine's l2fwd on the same machine, in the same run, with the same generator.
//!
//! Both paths: `mimiq-perf gen send` of 64-byte frames over 64 flows for the given time from the
//! sending host; the forwarded rate is the switch's own TX counter on its last port (l2fwd:
//! `p1` towards h2; single box: the access switch's client port), and the sinks' kernels drop
//! what arrives (l2fwd: a destination MAC nobody has; single box: destinations c1 does not
//! own). The single box's tables come from a rule stream this experiment serves itself (a
//! snapshot of `bindings` IPv4 bindings and one alias epoch of 65,535 aliases), not from the
//! allocator: a million leases through the relay would measure the allocator, not the switch.
//! The 64 flows' destinations are bound to c1; the rest of the bindings (in 100.64.0.0/10,
//! table entries only, never configured on any host or sent to) make the table full size.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mimiq_allocator::lease::{RuleUpdate, Sequenced};
use mimiq_allocator::proto::{self, StreamMsg};
use mimiq_allocator::Mac;
use serde::Serialize;
use serde_json::Value;

use crate::singlebox::{mac, KEY};
use crate::switch::Switch;
use crate::testbed::topology::{self, single_box_addr as addr};
use crate::testbed::{bin_path, Testbed};

/// One path's figures.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// `l2fwd`, `single_box`, or `single_box + updates` (while the rule stream carries updates).
    pub path: &'static str,
    /// Workers of the switch (one per queue of every link; the generator sends on as many).
    pub workers: u32,
    /// Rule updates applied per second during the measurement.
    pub updates_per_s: f64,
    /// Bindings in the tables.
    pub bindings: u64,
    /// Packets the generator sent per second.
    pub sent_pps: f64,
    /// Packets the switch forwarded per second (last hop's TX counter).
    pub forwarded_pps: f64,
    /// CPU time of the switch process per forwarded packet, ns.
    pub switch_cpu_ns_per_packet: f64,
}

/// Rule updates per second streamed during the third measurement.
pub const UPDATES_PER_S: u64 = 100_000;

/// Both paths, l2fwd first, then the single box quiet and while the rule stream carries
/// [`UPDATES_PER_S`]; returns the rows and a Markdown table.
pub fn compare(
    seconds: u32,
    bindings: u32,
    queues: u32,
    progress: &mut dyn FnMut(&str),
) -> Result<(Vec<Row>, String), String> {
    progress("l2fwd:");
    let l2fwd = l2fwd(seconds, queues)?;
    progress(&format!("single box with {bindings} bindings and 65535 aliases, then with {UPDATES_PER_S} updates/s:"));
    let (single, streaming) = single_box(seconds, bindings, queues, progress)?;
    let mut md = String::from(
        "| path | workers | bindings | updates/s | sent pps | forwarded pps | ÷ l2fwd | switch CPU ns/packet |\n|---|---|---|---|---|---|---|---|\n",
    );
    for r in [&l2fwd, &single, &streaming] {
        md.push_str(&format!(
            "| {} | {} | {} | {:.0} | {:.0} | {:.0} | {:.2} | {:.0} |\n",
            r.path,
            r.workers,
            r.bindings,
            r.updates_per_s,
            r.sent_pps,
            r.forwarded_pps,
            r.forwarded_pps / l2fwd.forwarded_pps.max(1.0),
            r.switch_cpu_ns_per_packet
        ));
    }
    Ok((vec![l2fwd, single, streaming], md))
}

fn l2fwd(seconds: u32, queues: u32) -> Result<Row, String> {
    let mut tb = Testbed::new().map_err(|e| e.to_string())?;
    let links = crate::testbed::LinkOpts {
        queues,
        ..Default::default()
    };
    topology::line_with(&mut tb, links).map_err(|e| e.to_string())?;
    let workers = queues.to_string();
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let args = [
        "--role",
        "l2fwd",
        "--port",
        "p0",
        "--port",
        "p1",
        "--stats-interval-ms",
        "100",
        "--queues",
        &workers,
    ];
    let switch = Switch::start(&tb, "sw", &args, &dir.path().join("s.json"))?;
    // A destination MAC nobody has: h2's kernel drops the frames on arrival.
    let send = [
        "--dst-mac",
        "02:00:00:00:00:ee",
        "--src",
        "198.18.0.1",
        "--dst",
        "198.18.0.2",
        "--vary",
        "src-port",
    ];
    let (sent_pps, forwarded, cpu_ms, elapsed) = measure(
        &mut tb,
        "h1",
        &send,
        seconds,
        queues,
        &switch,
        |s| s.port(1, "tx_packets"),
        dir.path(),
    )?;
    Ok(Row {
        path: "l2fwd",
        workers: queues,
        updates_per_s: 0.0,
        bindings: 0,
        sent_pps,
        forwarded_pps: forwarded as f64 / elapsed,
        switch_cpu_ns_per_packet: cpu_ms * 1e6 / forwarded.max(1) as f64,
    })
}

fn single_box(
    seconds: u32,
    bindings: u32,
    queues: u32,
    progress: &mut dyn FnMut(&str),
) -> Result<(Row, Row), String> {
    let mut tb = Testbed::new().map_err(|e| e.to_string())?;
    let links = crate::testbed::LinkOpts {
        queues,
        ..Default::default()
    };
    topology::single_box_with(&mut tb, links).map_err(|e| e.to_string())?;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let c1_mac = mimiq_dataplane::config::parse_mac(&mac(&tb, "c1", "eth0"))?;
    let stop = Arc::new(AtomicBool::new(false));
    let stream = Arc::new(AtomicBool::new(false));
    let publisher = {
        let (stop, stream) = (Arc::clone(&stop), Arc::clone(&stream));
        tb.spawn_in("sw", move || serve_rules(c1_mac, bindings, &stop, &stream))
            .map_err(|e| e.to_string())?
    };
    // The single box's usual config: relay and rule stream on the switch host's loopback.
    let config = crate::singlebox::switch_config(dir.path(), queues);
    let config = config.to_string_lossy().into_owned();
    let switch = Switch::start(
        &tb,
        "sw",
        &["--config", &config],
        &dir.path().join("stats.json"),
    )?;
    // Every worker applies the whole snapshot before traffic starts.
    let want = u64::from(bindings) + 2;
    let loaded = Instant::now();
    loop {
        let applied = switch.stats()?.per_worker("updates_applied");
        if !applied.is_empty() && applied.iter().all(|&n| n >= want) {
            progress(&format!(
                "  tables loaded in {:.1} s",
                loaded.elapsed().as_secs_f64()
            ));
            break;
        }
        if loaded.elapsed() > Duration::from_secs(120) {
            return Err(format!(
                "tables not loaded after 120 s: {applied:?} of {want}"
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let edge_mac = mac(&tb, "sw", "out0");
    let send = [
        "--dst-mac",
        edge_mac.as_str(),
        "--src",
        addr::OUT_V4,
        "--dst",
        "198.18.1.2",
        "--vary",
        "dst-ip",
    ];
    let delivered = |s: &crate::switch::SwitchStats| s.port_named("cl0", "tx_packets");
    // Every worker applies every update: the rate is one worker's.
    let applied = |s: &crate::switch::SwitchStats| {
        s.per_worker("updates_applied")
            .into_iter()
            .min()
            .unwrap_or(0)
    };
    let mut rows = Vec::new();
    for (path, streaming) in [("single_box", false), ("single_box + updates", true)] {
        stream.store(streaming, Ordering::Relaxed);
        let before = applied(&switch.stats()?);
        let (sent_pps, forwarded, cpu_ms, elapsed) = measure(
            &mut tb,
            "out",
            &send,
            seconds,
            queues,
            &switch,
            delivered,
            dir.path(),
        )?;
        let updates = applied(&switch.stats()?) - before;
        rows.push(Row {
            path,
            workers: queues,
            updates_per_s: updates as f64 / elapsed,
            bindings: u64::from(bindings),
            sent_pps,
            forwarded_pps: forwarded as f64 / elapsed,
            switch_cpu_ns_per_packet: cpu_ms * 1e6 / forwarded.max(1) as f64,
        });
    }
    stop.store(true, Ordering::Relaxed);
    drop(switch);
    let _ = publisher.join();
    let streaming = rows.pop().ok_or("no row")?;
    let quiet = rows.pop().ok_or("no row")?;
    Ok((quiet, streaming))
}

/// Runs the generator on `host` and returns (sent pps, forwarded packets, switch CPU ms, seconds).
fn measure(
    tb: &mut Testbed,
    host: &str,
    send: &[&str],
    seconds: u32,
    queues: u32,
    switch: &Switch,
    forwarded: impl Fn(&crate::switch::SwitchStats) -> u64,
    dir: &std::path::Path,
) -> Result<(f64, u64, f64, f64), String> {
    let perf = bin_path("mimiq-perf")?;
    let report = dir.join("send.json");
    let (secs, queues) = (seconds.to_string(), queues.to_string());
    let mut cmd = vec![
        perf.to_str().unwrap_or("mimiq-perf"),
        "gen",
        "send",
        "--iface",
        "eth0",
        "--size",
        "64",
        "--flows",
        "64",
        "--duration",
        &secs,
        "--queues",
        &queues,
    ];
    cmd.extend_from_slice(send);
    let report_s = report.to_string_lossy().into_owned();
    cmd.extend(["--json", report_s.as_str()]);
    let before = switch.stats()?;
    let mut sender = tb.spawn(host, &cmd, true).map_err(|e| e.to_string())?;
    let status = sender
        .wait_timeout(Duration::from_secs(u64::from(seconds) + 60))
        .ok_or("sender did not finish")?;
    if !status.success() {
        return Err(format!("sender failed: {}", sender.describe()));
    }
    let after = switch.stats_settled(Duration::from_secs(10))?;
    let sent: Value =
        serde_json::from_str(&std::fs::read_to_string(&report).map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    let elapsed = sent["elapsed_s"].as_f64().unwrap_or(f64::from(seconds));
    let sent_pps = sent["sent_packets"].as_u64().unwrap_or(0) as f64 / elapsed;
    Ok((
        sent_pps,
        forwarded(&after) - forwarded(&before),
        (after.cpu_ms() - before.cpu_ms()) as f64,
        elapsed,
    ))
}

/// Serves one rule-stream subscriber (the switch) on 127.0.0.1:6365 of the current namespace:
/// a snapshot with the 64 flow destinations bound to c1, filler bindings, and 65,535 aliases;
/// then, while `stream` is set, numbered `BindingAdd`s of filler addresses at
/// [`UPDATES_PER_S`] (in batches every 10 ms).
fn serve_rules(
    c1: [u8; 6],
    bindings: u32,
    stop: &AtomicBool,
    stream: &AtomicBool,
) -> Result<(), String> {
    let listener = TcpListener::bind("127.0.0.1:6365").map_err(|e| e.to_string())?;
    let (mut stream_socket, _) = listener.accept().map_err(|e| e.to_string())?;
    let secret = mimiq_dataplane::config::parse_hex(KEY)?;
    let key = proto::key(&secret);
    let mut buf = Vec::new();
    proto::read_frame(&mut stream_socket, &mut buf).map_err(|e| e.to_string())?;
    StreamMsg::parse(&buf, |_| Some(&key)).map_err(|e| format!("hello: {e:?}"))?;
    let mut updates = Vec::with_capacity(bindings as usize + 1);
    for i in 0..bindings {
        let ip = if i < 64 {
            Ipv4Addr::new(198, 18, 1, 2 + i as u8)
        } else {
            Ipv4Addr::from(0x6440_0000 | i) // 100.64.0.0/10, table filler
        };
        updates.push(RuleUpdate::BindingAdd {
            ip: IpAddr::V4(ip),
            mac: Mac(c1),
            sid: 1,
            port: 0,
            valid_until_ms: u64::MAX,
        });
    }
    updates.push(RuleUpdate::AliasEpoch {
        epoch: 1,
        aliases: vec![(1, (1..65536).collect())],
        valid_until_ms: u64::MAX,
    });
    let mut out = Vec::with_capacity(64 << 20);
    StreamMsg::Update(Sequenced {
        seq: 1,
        update: RuleUpdate::Snapshot {
            seq: 1,
            count: updates.len() as u32,
        },
    })
    .emit_frame(&key, &mut out)
    .map_err(|e| format!("{e:?}"))?;
    for update in updates {
        StreamMsg::Update(Sequenced { seq: 1, update })
            .emit_frame(&key, &mut out)
            .map_err(|e| format!("{e:?}"))?;
        if out.len() > 1 << 20 {
            stream_socket.write_all(&out).map_err(|e| e.to_string())?;
            out.clear();
        }
    }
    let mut tcp = stream_socket;
    tcp.write_all(&out).map_err(|e| e.to_string())?;
    let mut seq = 1u64;
    let mut filler = 64u32;
    let batch = (UPDATES_PER_S / 100) as u32;
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        if !stream.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(10));
            next = Instant::now();
            continue;
        }
        out.clear();
        for _ in 0..batch {
            seq += 1;
            filler = if filler + 1 >= bindings {
                64
            } else {
                filler + 1
            };
            let update = RuleUpdate::BindingAdd {
                ip: IpAddr::V4(Ipv4Addr::from(0x6440_0000 | filler)),
                mac: Mac(c1),
                sid: 1,
                port: 0,
                valid_until_ms: u64::MAX - u64::from(filler),
            };
            StreamMsg::Update(Sequenced { seq, update })
                .emit_frame(&key, &mut out)
                .map_err(|e| format!("{e:?}"))?;
        }
        tcp.write_all(&out).map_err(|e| e.to_string())?;
        next += Duration::from_millis(10);
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    Ok(())
}
