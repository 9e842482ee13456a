//! Running `mimiq-switch` inside a testbed host and reading its counters.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::testbed::{bin_path, eventually, Proc, Testbed};

/// A `mimiq-switch` process in a testbed host, with its stats file.
pub struct Switch {
    /// The process (stopped when dropped).
    pub proc: Proc,
    stats_path: PathBuf,
}

impl Switch {
    /// Starts `mimiq-switch run <args> --stats-path <stats_path>` on `host` (with bpffs) and
    /// waits until it has bound its ports, i.e. written its first stats.
    pub fn start(
        tb: &Testbed,
        host: &str,
        args: &[&str],
        stats_path: &Path,
    ) -> Result<Switch, String> {
        let bin = bin_path("mimiq-switch")?;
        let bin = bin.to_str().ok_or("binary path is not UTF-8")?;
        let stats = stats_path.to_str().ok_or("stats path is not UTF-8")?;
        let mut cmd = vec![bin, "run"];
        cmd.extend_from_slice(args);
        cmd.extend_from_slice(&["--stats-path", stats]);
        let mut proc = tb.spawn(host, &cmd, true).map_err(|e| e.to_string())?;
        // `Ok` ends the wait: the switch is up, or it exited (then waiting longer is pointless).
        let up = eventually(Duration::from_secs(20), || {
            if stats_path.exists() {
                return Ok(Ok(()));
            }
            match proc.try_status() {
                Some(status) => Ok(Err(format!(
                    "switch exited ({status}) before binding: {}",
                    proc.describe()
                ))),
                None => Err("no stats file yet"),
            }
        });
        match up {
            Ok(outcome) => outcome?,
            Err(e) => return Err(format!("switch not up: {e}: {}", proc.describe())),
        }
        Ok(Switch {
            proc,
            stats_path: stats_path.to_path_buf(),
        })
    }

    /// The counters the switch last published.
    pub fn stats(&self) -> Result<SwitchStats, String> {
        let text = std::fs::read_to_string(&self.stats_path)
            .map_err(|e| format!("{}: {e}", self.stats_path.display()))?;
        serde_json::from_str(&text)
            .map(SwitchStats)
            .map_err(|e| format!("{}: {e}", self.stats_path.display()))
    }

    /// The counters, once `ready` accepts them: reads each publication until `ready` returns
    /// `Ok`, for up to `within`; then the error says what `ready` last said of them.
    ///
    /// The switch publishes on an interval, from workers that a loaded machine may not run for
    /// a while: wait for the counts that must add up (`|s| if s.port(1, "tx_packets") >= 40 {
    /// Ok(()) } else { Err(format!(..)) }`), never for a fixed time.
    pub fn stats_until(
        &self,
        within: Duration,
        mut ready: impl FnMut(&SwitchStats) -> Result<(), String>,
    ) -> Result<SwitchStats, String> {
        eventually(within, || {
            let stats = self.stats()?;
            ready(&stats)?;
            Ok::<_, String>(stats)
        })
        .map_err(|e| e.to_string())
    }

    /// The counters once the traffic has ended and every worker has published it: two
    /// publications at least [`SETTLED`] apart with the same port and drop counters (the CPU
    /// time and the uptime move on regardless). For experiments, which report what the switch
    /// did; a test waits with [`Switch::stats_until`] for the counts it knows must add up.
    pub fn stats_settled(&self, within: Duration) -> Result<SwitchStats, String> {
        let mut first_of_run: Option<SwitchStats> = None;
        self.stats_until(within, |s| {
            let run = first_of_run.get_or_insert_with(|| s.clone());
            if run.counters() != s.counters() {
                *run = s.clone();
                return Err("the counters still move".into());
            }
            let quiet_ms = s.uptime_ms().saturating_sub(run.uptime_ms());
            if quiet_ms < SETTLED.as_millis() as u64 {
                return Err(format!("the counters held still for {quiet_ms} ms"));
            }
            Ok(())
        })
    }
}

/// How long the counters must hold still for [`Switch::stats_settled`].
pub const SETTLED: Duration = Duration::from_millis(200);

/// The switch's stats file, parsed.
#[derive(Debug, Clone)]
pub struct SwitchStats(pub Value);

impl SwitchStats {
    /// A counter of port `port` (`rx_packets`, `tx_bytes`, ...), summed over the workers.
    pub fn port(&self, port: usize, field: &str) -> u64 {
        self.workers()
            .map(|w| w["ports"][port][field].as_u64().unwrap_or(0))
            .sum()
    }

    /// A counter of the port named `name`, summed over the workers.
    pub fn port_named(&self, name: &str, field: &str) -> u64 {
        self.port_named_per_worker(name, field).iter().sum()
    }

    /// The same counter of the port named `name` of each worker, in worker order.
    pub fn port_named_per_worker(&self, name: &str, field: &str) -> Vec<u64> {
        self.workers()
            .map(|w| {
                let ports = w["ports"].as_array().into_iter().flatten();
                ports
                    .filter(|p| p["name"] == name)
                    .map(|p| p[field].as_u64().unwrap_or(0))
                    .sum()
            })
            .collect()
    }

    /// A counter of each worker (`updates_applied`, `bursts`, ...), in worker order.
    pub fn per_worker(&self, field: &str) -> Vec<u64> {
        self.workers()
            .map(|w| w[field].as_u64().unwrap_or(0))
            .collect()
    }

    /// The same counter of port `port` of each worker, in worker order.
    pub fn port_per_worker(&self, port: usize, field: &str) -> Vec<u64> {
        self.workers()
            .map(|w| w["ports"][port][field].as_u64().unwrap_or(0))
            .collect()
    }

    /// Drops by `reason`, summed over the workers.
    pub fn drops(&self, reason: &str) -> u64 {
        self.workers()
            .map(|w| w["drops"][reason].as_u64().unwrap_or(0))
            .sum()
    }

    /// Drops of all reasons and workers.
    pub fn total_drops(&self) -> u64 {
        self.workers()
            .filter_map(|w| w["drops"].as_object())
            .map(|d| d.values().filter_map(Value::as_u64).sum::<u64>())
            .sum()
    }

    /// The reasons with drops, summed over the workers: `reason=n …`, or `none`.
    pub fn drops_summary(&self) -> String {
        let mut total = std::collections::BTreeMap::new();
        for d in self.workers().filter_map(|w| w["drops"].as_object()) {
            for (k, v) in d {
                *total.entry(k.as_str()).or_insert(0) += v.as_u64().unwrap_or(0);
            }
        }
        let nonzero: Vec<String> = total
            .iter()
            .filter(|(_, v)| **v > 0)
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        if nonzero.is_empty() {
            "none".into()
        } else {
            nonzero.join(" ")
        }
    }

    fn workers(&self) -> impl Iterator<Item = &Value> {
        self.0["workers"].as_array().into_iter().flatten()
    }

    /// The kernel's drops in front of port `port`'s sockets (no free frame, RX ring full),
    /// summed over the workers: frames that never reached the switch's counters.
    pub fn socket_drops(&self, port: usize) -> u64 {
        self.workers()
            .map(|w| {
                let xdp = &w["ports"][port]["xdp"];
                xdp["rx_dropped"].as_u64().unwrap_or(0) + xdp["rx_ring_full"].as_u64().unwrap_or(0)
            })
            .sum()
    }

    /// Time since the switch started when it wrote these, in milliseconds.
    pub fn uptime_ms(&self) -> u64 {
        self.0["uptime_ms"].as_u64().unwrap_or(0)
    }

    /// Every worker's packet, byte and drop counters: what traffic moves, and nothing else
    /// (the kernel's socket statistics count idle wake-ups too).
    fn counters(&self) -> Vec<&Value> {
        const FIELDS: [&str; 4] = ["rx_packets", "rx_bytes", "tx_packets", "tx_bytes"];
        self.workers()
            .flat_map(|w| {
                let ports = w["ports"].as_array().into_iter().flatten();
                ports
                    .flat_map(|p| FIELDS.iter().map(move |f| &p[*f]))
                    .chain([&w["drops"]])
            })
            .collect()
    }

    /// CPU time of the switch process (user + system), in milliseconds.
    pub fn cpu_ms(&self) -> u64 {
        self.0["cpu_user_ms"].as_u64().unwrap_or(0) + self.0["cpu_sys_ms"].as_u64().unwrap_or(0)
    }
}
