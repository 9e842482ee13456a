//! Running `mimiq-switch` inside a testbed host and reading its counters.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::testbed::{bin_path, Proc, Testbed};

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
        tb: &mut Testbed,
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
        let deadline = Instant::now() + Duration::from_secs(20);
        while !stats_path.exists() {
            if let Some(status) = proc.try_status() {
                return Err(format!(
                    "switch exited ({status}) before binding: {}",
                    proc.describe()
                ));
            }
            if Instant::now() > deadline {
                return Err(format!("switch not up after 20 s: {}", proc.describe()));
            }
            std::thread::sleep(Duration::from_millis(20));
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

    /// The counters after the next publication (waits `settle` first).
    pub fn stats_after(&self, settle: Duration) -> Result<SwitchStats, String> {
        std::thread::sleep(settle);
        self.stats()
    }
}

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

    /// CPU time of the switch process (user + system), in milliseconds.
    pub fn cpu_ms(&self) -> u64 {
        self.0["cpu_user_ms"].as_u64().unwrap_or(0) + self.0["cpu_sys_ms"].as_u64().unwrap_or(0)
    }
}
