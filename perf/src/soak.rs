//! `mimiq-perf soak`: the demo's load (perf/src/demo.rs) for as long as asked. Two agents get
//! short-lived addresses from the allocator through the single box, hop every 20–60 datagrams
//! and download from the server behind `mimiq-proxy` one transfer after another, every byte
//! checked; now and then the proxy is killed with SIGKILL and started again (the agents notice
//! at their idle timeout and reconnect). Each minute the resident memory and open file
//! descriptors of every process (allocator, switch, proxy, agents) are sampled with the
//! minute's throughput and the counters that matter.
//!
//! Passes when no transfer broke, no byte was wrong, and memory and descriptors stayed flat
//! after the first minute ([`Summary`]).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::demo::{self, agent_stats, start_agent, start_outside, SERVER_V4};
use crate::masque::stop_client;
use crate::singlebox::{self, SingleBox};
use crate::testbed::Proc;
use crate::traffic::pattern_download;

/// What to run.
#[derive(Debug, Clone, Copy)]
pub struct Params {
    /// How long, in minutes.
    pub minutes: u32,
    /// A proxy kill -9 and restart every this many minutes (0: none).
    pub fault_every_min: u32,
}

/// One process at one sample.
#[derive(Debug, Clone, Serialize)]
pub struct ProcSample {
    /// Which one.
    pub name: String,
    /// Its process id (a restarted process gets another).
    pub pid: u32,
    /// Resident memory (`VmRSS`), KB.
    pub rss_kb: u64,
    /// Open file descriptors.
    pub fds: u64,
}

/// One minute.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// Minutes since the start.
    pub minute: u32,
    /// Every process.
    pub processes: Vec<ProcSample>,
    /// What the agents received through their tunnels during the minute, Mbit/s.
    pub mbit_s: f64,
    /// Transfers finished so far, and of those broken.
    pub transfers: u64,
    /// Broken transfers so far.
    pub broken: u64,
    /// Hops the agents completed so far (over their current connections).
    pub hops: u64,
    /// Frames the switch dropped so far, every reason.
    pub switch_drops: u64,
}

/// One download.
#[derive(Debug, Clone, Serialize)]
pub struct Transfer {
    /// The client.
    pub client: String,
    /// Seconds since the start when it ended.
    pub ended_s: f64,
    /// Bytes that arrived in order.
    pub bytes: u64,
    /// Every byte as sent.
    pub exact: bool,
    /// Why it stopped short, when it did.
    pub error: Option<String>,
}

/// The figures the soak is judged by (`results.json`, `"summary"`).
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Minutes run.
    pub minutes: u32,
    /// Downloads finished.
    pub transfers: u64,
    /// Downloads that failed (an error, or nothing received).
    pub broken_transfers: u64,
    /// Bytes received in downloads that were not byte-exact (all of each such download's).
    pub bytes_wrong: u64,
    /// Bytes received in all downloads.
    pub bytes: u64,
    /// Proxy kill -9s.
    pub faults: u64,
    /// The largest growth of one process's resident memory from its sample after the first
    /// minute it ran to its last, KB (a restarted process counts from its restart).
    pub rss_growth_kb: i64,
    /// The same for open file descriptors.
    pub fd_growth: i64,
}

/// Everything the soak measured.
#[derive(Debug, Clone, Serialize)]
pub struct Results {
    /// Each minute.
    pub samples: Vec<Sample>,
    /// Each download.
    pub transfers: Vec<Transfer>,
    /// The figures.
    pub summary: Summary,
}

/// Reads `VmRSS` (KB) and the number of open descriptors of `pid`.
fn sample_process(name: &str, pid: u32) -> ProcSample {
    let rss_kb = crate::testbed::rss_kb(pid).unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64);
    ProcSample {
        name: name.to_string(),
        pid,
        rss_kb,
        fds,
    }
}

/// The largest growth of `field` over each process's run of samples with one pid, from its
/// second sample (the first minute is warm-up) to its last.
fn growth(samples: &[Sample], field: fn(&ProcSample) -> u64) -> i64 {
    let mut runs: Vec<(&str, u32, Vec<u64>)> = Vec::new();
    for s in samples {
        for p in &s.processes {
            match runs
                .iter_mut()
                .find(|(n, pid, _)| *n == p.name && *pid == p.pid)
            {
                Some(run) => run.2.push(field(p)),
                None => runs.push((&p.name, p.pid, vec![field(p)])),
            }
        }
    }
    runs.iter()
        .filter(|(_, _, v)| v.len() >= 2)
        .map(|(_, _, v)| {
            let base = if v.len() >= 3 { v[1] } else { v[0] };
            v[v.len() - 1] as i64 - base as i64
        })
        .max()
        .unwrap_or(0)
}

/// Runs the soak; `log` gets a line per minute and per fault.
pub fn run(params: Params, dir: &Path, log: &mut dyn FnMut(&str)) -> Result<Results, String> {
    let SingleBox {
        mut tb,
        mut allocator,
        switch,
        dir: _keep,
    } = singlebox::start(&demo::TIMES);
    let proxy = start_outside(&mut tb, dir)?;
    // A proxy that is gone is noticed within 2 s (the default 30 s would outlast a download's
    // read timeout).
    let mut agents: Vec<(String, Proc)> = Vec::new();
    for (i, client) in ["c1", "c2"].iter().enumerate() {
        let (agent, _) = start_agent(
            &mut tb,
            dir,
            client,
            i as u64 + 1,
            "idle_timeout_ms = 2000\n",
        )?;
        agents.push((client.to_string(), agent));
    }
    let started = Instant::now();
    let until = started + Duration::from_secs(u64::from(params.minutes) * 60);
    let transfers: Mutex<Vec<Transfer>> = Mutex::default();
    let mut samples: Vec<Sample> = Vec::new();
    let mut faults = 0u64;
    let tb = &tb;
    std::thread::scope(|scope| {
        for (i, (client, _)) in agents.iter().enumerate() {
            let transfers = &transfers;
            scope.spawn(move || {
                let listen: SocketAddr = format!("{SERVER_V4}:{}", 9000 + i)
                    .parse()
                    .expect("a socket address");
                while Instant::now() + Duration::from_secs(5) < until {
                    // Transfers of 20 s (the last one shorter), back to back.
                    let end = (Instant::now() + Duration::from_secs(20)).min(until);
                    let r = pattern_download(tb, "srv", listen, client, u64::MAX, Some(end));
                    let (bytes, exact, error) = match r {
                        Ok((bytes, exact)) => (bytes, exact, None),
                        Err(e) => (0, true, Some(e)),
                    };
                    let t = Transfer {
                        client: client.clone(),
                        ended_s: started.elapsed().as_secs_f64(),
                        bytes,
                        exact,
                        error,
                    };
                    transfers.lock().unwrap_or_else(|p| p.into_inner()).push(t);
                }
            });
        }
        let mut rx_before = 0u64;
        for minute in 1..=params.minutes {
            let at = started + Duration::from_secs(u64::from(minute) * 60);
            while Instant::now() < at {
                std::thread::sleep(Duration::from_millis(200));
            }
            let mut processes = vec![
                sample_process("allocator", allocator.pid()),
                sample_process("switch", switch.proc.pid()),
                sample_process("proxy", proxy.pid()),
            ];
            let (mut rx, mut hops) = (0, 0);
            for (client, agent) in &agents {
                processes.push(sample_process(&format!("agent-{client}"), agent.pid()));
                hops += agent_stats(dir, client)["client"]["hops_done"]
                    .as_u64()
                    .unwrap_or(0);
                // The TUN device's count outlives the agent's connections (its own counters
                // start again with each).
                rx += tun_rx_bytes(tb, client);
            }
            let rx_minute = rx.saturating_sub(rx_before);
            rx_before = rx;
            let (done, broken) = {
                let t = transfers.lock().unwrap_or_else(|p| p.into_inner());
                (
                    t.len() as u64,
                    t.iter().filter(|t| broken(t)).count() as u64,
                )
            };
            let sample = Sample {
                minute,
                processes,
                mbit_s: rx_minute as f64 * 8.0 / 60.0 / 1e6,
                transfers: done,
                broken,
                hops,
                switch_drops: switch.stats().map(|s| s.total_drops()).unwrap_or(0),
            };
            log(&format!(
                "minute {minute}: {:.1} Mbit/s, {done} transfers ({broken} broken), {hops} hops; {}",
                sample.mbit_s,
                sample
                    .processes
                    .iter()
                    .map(|p| format!("{} {} KB {} fds", p.name, p.rss_kb, p.fds))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
            samples.push(sample);
            if params.fault_every_min > 0
                && minute % params.fault_every_min == 0
                && minute < params.minutes
            {
                match proxy.kill_and_restart(tb, "out") {
                    Ok(()) => {
                        faults += 1;
                        log(&format!(
                            "minute {minute}: the proxy killed (SIGKILL) and started again"
                        ));
                    }
                    Err(e) => log(&format!("minute {minute}: the proxy's restart failed: {e}")),
                }
            }
        }
    });
    for (client, agent) in &mut agents {
        if let Err(e) = stop_client(agent) {
            log(&format!("{client}: {e}"));
        }
    }
    drop(switch);
    allocator.stop(Duration::from_secs(5));
    let transfers = transfers.into_inner().unwrap_or_else(|p| p.into_inner());
    let summary = Summary {
        minutes: params.minutes,
        transfers: transfers.len() as u64,
        broken_transfers: transfers.iter().filter(|t| broken(t)).count() as u64,
        bytes_wrong: transfers.iter().filter(|t| !t.exact).map(|t| t.bytes).sum(),
        bytes: transfers.iter().map(|t| t.bytes).sum(),
        faults,
        rss_growth_kb: growth(&samples, |p| p.rss_kb),
        fd_growth: growth(&samples, |p| p.fds),
    };
    Ok(Results {
        samples,
        transfers,
        summary,
    })
}

/// Bytes the agent on `client` wrote into its TUN device so far (what came through the
/// tunnel; the kernel counts them as the device's received bytes).
fn tun_rx_bytes(tb: &crate::testbed::Testbed, client: &str) -> u64 {
    tb.exec(
        client,
        &[
            "cat",
            &format!("/sys/class/net/{}/statistics/rx_bytes", demo::AGENT_TUN),
        ],
    )
    .ok()
    .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
    .unwrap_or(0)
}

/// A download that failed or carried nothing.
fn broken(t: &Transfer) -> bool {
    t.error.is_some() || t.bytes == 0
}

/// The minutes as a Markdown table, and the summary.
pub fn markdown(r: &Results) -> String {
    let mut names: Vec<&str> = Vec::new();
    for s in &r.samples {
        for p in &s.processes {
            if !names.contains(&p.name.as_str()) {
                names.push(&p.name);
            }
        }
    }
    let mut md = format!(
        "| minute | Mbit/s | transfers | broken | hops | switch drops | {} |\n|---|---|---|---|---|---|{}\n",
        names
            .iter()
            .map(|n| format!("{n} RSS KB / fds"))
            .collect::<Vec<_>>()
            .join(" | "),
        "---|".repeat(names.len())
    );
    for s in &r.samples {
        let cells: Vec<String> = names
            .iter()
            .map(|n| {
                s.processes
                    .iter()
                    .find(|p| p.name == *n)
                    .map_or("-".into(), |p| format!("{} / {}", p.rss_kb, p.fds))
            })
            .collect();
        md += &format!(
            "| {} | {:.1} | {} | {} | {} | {} | {} |\n",
            s.minute,
            s.mbit_s,
            s.transfers,
            s.broken,
            s.hops,
            s.switch_drops,
            cells.join(" | ")
        );
    }
    let m = &r.summary;
    md += &format!(
        "\n{} minutes, {} transfers ({:.1} GB), {} broken, {} bytes wrong, {} proxy kill -9s; largest growth after the first minute: {} KB resident, {} file descriptors.\n",
        m.minutes,
        m.transfers,
        m.bytes as f64 / 1e9,
        m.broken_transfers,
        m.bytes_wrong,
        m.faults,
        m.rss_growth_kb,
        m.fd_growth
    );
    md
}

/// The minutes as a plot (SVG): resident memory and open descriptors of each process, and the
/// agents' throughput. A process started again (the proxy, after each fault) continues its line.
pub fn svg(r: &Results) -> Result<String, String> {
    use crate::plot::{Panel, Series};
    let mut names: Vec<String> = Vec::new();
    for p in r.samples.iter().flat_map(|s| &s.processes) {
        if !names.contains(&p.name) {
            names.push(p.name.clone());
        }
    }
    let series = |field: fn(&ProcSample) -> f64| -> Vec<Series> {
        names
            .iter()
            .map(|n| Series {
                name: n.clone(),
                points: r
                    .samples
                    .iter()
                    .filter_map(|s| {
                        let p = s.processes.iter().find(|p| p.name == *n)?;
                        Some((f64::from(s.minute), field(p)))
                    })
                    .collect(),
            })
            .collect()
    };
    let throughput = vec![Series {
        name: "agents, Mbit/s".to_string(),
        points: r
            .samples
            .iter()
            .map(|s| (f64::from(s.minute), s.mbit_s))
            .collect(),
    }];
    let minutes = |title: &str, y: &str, series| Panel {
        x_label: Box::new(|x| format!("{x:.0}")),
        ..Panel::new(title, "minute", y, series)
    };
    crate::plot::svg(
        900,
        960,
        vec![
            minutes(
                "resident memory, MB",
                "MB",
                series(|p| p.rss_kb as f64 / 1024.0),
            ),
            minutes(
                "open file descriptors",
                "descriptors",
                series(|p| p.fds as f64),
            ),
            minutes(
                "throughput through the tunnels, Mbit/s",
                "Mbit/s",
                throughput,
            ),
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(minute: u32, procs: &[(&str, u32, u64, u64)]) -> Sample {
        Sample {
            minute,
            processes: procs
                .iter()
                .map(|&(name, pid, rss_kb, fds)| ProcSample {
                    name: name.into(),
                    pid,
                    rss_kb,
                    fds,
                })
                .collect(),
            mbit_s: 0.0,
            transfers: 0,
            broken: 0,
            hops: 0,
            switch_drops: 0,
        }
    }

    #[test]
    fn the_plot_has_a_line_per_process_and_panel() {
        let r = Results {
            samples: vec![
                sample(1, &[("switch", 1, 2048, 10), ("proxy", 7, 4096, 5)]),
                sample(2, &[("switch", 1, 2100, 10), ("proxy", 8, 4000, 5)]),
            ],
            transfers: vec![],
            summary: Summary {
                minutes: 2,
                transfers: 0,
                broken_transfers: 0,
                bytes_wrong: 0,
                bytes: 0,
                faults: 1,
                rss_growth_kb: 0,
                fd_growth: 0,
            },
        };
        let svg = svg(&r).unwrap();
        assert!(svg.starts_with("<svg"), "{svg}");
        for text in [
            "resident memory, MB",
            "open file descriptors",
            "agents, Mbit/s",
            ">\nswitch\n<",
            ">\nproxy\n<",
        ] {
            assert!(svg.contains(text), "{text:?} in {svg}");
        }
    }

    #[test]
    fn growth_counts_from_the_minute_after_warm_up_and_a_restart_starts_afresh() {
        let s = [
            sample(1, &[("a", 1, 100, 10), ("p", 7, 50, 5)]),
            sample(2, &[("a", 1, 300, 12), ("p", 7, 60, 5)]),
            sample(3, &[("a", 1, 310, 12), ("p", 8, 40, 4)]),
            sample(4, &[("a", 1, 305, 13), ("p", 8, 45, 4)]),
        ];
        // a: 305 - 300 (minute 1 is warm-up); p (pid 7): 60 - 50; p (pid 8): 45 - 40.
        assert_eq!(growth(&s, |p| p.rss_kb), 10);
        assert_eq!(growth(&s, |p| p.fds), 1);
        assert_eq!(growth(&[], |p| p.rss_kb), 0);
    }
}
