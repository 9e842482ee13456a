//! An etcd cluster in the testbed: one member per host, each an `etcd` process (Debian's
//! `etcd-server`, which `scripts/setup` installs) in its host's namespace with a data directory
//! of its own, and `etcdctl` (`etcd-client`) to talk to it from any host. The shared store that
//! allocators and switches past one machine keep their state in (ARCHITECTURE.md §7): tests
//! kill its members with SIGKILL and restart them, as its failures come.
//!
//! Members listen on plain HTTP inside the testbed (client port 2379, peer port 2380 of their
//! address); the cluster is stopped (SIGTERM, then SIGKILL) when dropped, and its data lives
//! where the caller said (a temporary directory in the tests).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::testbed::{Proc, Testbed, TestbedError};

/// The port members serve clients on.
pub const CLIENT_PORT: u16 = 2379;
/// The port members talk to each other on.
pub const PEER_PORT: u16 = 2380;
/// How long a member (or the cluster) gets to elect a leader and answer.
const READY_WITHIN: Duration = Duration::from_secs(20);
/// How long one `etcdctl` command may wait for the cluster (its `--command-timeout`).
const COMMAND_TIMEOUT: &str = "3s";

/// One member: where it runs, and its process while it runs.
struct Member {
    host: String,
    ip: IpAddr,
    proc: Option<Proc>,
}

/// A running etcd cluster.
pub struct EtcdCluster {
    members: Vec<Member>,
    dir: PathBuf,
}

impl EtcdCluster {
    /// Starts a member on each of `members` (a host, and the address it serves on there), its
    /// data under `dir/<host>`, and returns once every member answers and a write is committed.
    pub fn start(tb: &Testbed, members: &[(String, IpAddr)], dir: &Path) -> Result<Self, String> {
        if members.is_empty() {
            return Err("an etcd cluster needs at least one member".into());
        }
        let mut cluster = EtcdCluster {
            members: (members.iter())
                .map(|(host, ip)| Member {
                    host: host.clone(),
                    ip: *ip,
                    proc: None,
                })
                .collect(),
            dir: dir.to_path_buf(),
        };
        for i in 0..cluster.members.len() {
            cluster.members[i].proc = Some(cluster.spawn(tb, i)?);
        }
        cluster.wait_ready(tb)?;
        Ok(cluster)
    }

    /// The members' client URLs, comma-separated (etcdctl's `--endpoints`, a client's
    /// `[etcd] endpoints`).
    pub fn endpoints(&self) -> String {
        (self.members.iter())
            .map(|m| url(m.ip, CLIENT_PORT))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Kills member `i` with SIGKILL (no chance to leave the cluster cleanly).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut p) = self.members.get_mut(i).and_then(|m| m.proc.take()) {
            p.signal(libc::SIGKILL);
            let _ = p.wait_timeout(Duration::from_secs(5));
        }
    }

    /// Starts member `i` again on its data directory (it rejoins and catches up from the
    /// leader) and returns once it answers a read of its own.
    pub fn restart(&mut self, tb: &Testbed, i: usize) -> Result<(), String> {
        self.kill(i);
        let p = self.spawn(tb, i)?;
        self.members[i].proc = Some(p);
        mimiq_testkit::eventually(READY_WITHIN, || self.get_from(tb, i, "health-probe"))
            .map(|_| ())
            .map_err(|e| format!("member {} after a restart: {e}", self.members[i].host))
    }

    /// Writes `key` = `value` through the cluster (any member; committed by a quorum).
    pub fn put(&self, tb: &Testbed, key: &str, value: &str) -> Result<(), String> {
        self.etcdctl(tb, &self.endpoints(), &["put", key, value])
            .map(|_| ())
    }

    /// Reads `key` through the cluster (linearizable: a quorum's latest); `None` if absent.
    pub fn get(&self, tb: &Testbed, key: &str) -> Result<Option<String>, String> {
        let out = self.etcdctl(tb, &self.endpoints(), &["get", key, "--print-value-only"])?;
        Ok(value_of(&out))
    }

    /// Reads `key` from member `i` alone (serializable: what that member has applied, without
    /// asking the leader), to see whether a member caught up.
    pub fn get_from(&self, tb: &Testbed, i: usize, key: &str) -> Result<Option<String>, String> {
        let m = self.members.get(i).ok_or("no such member")?;
        let out = self.etcdctl(
            tb,
            &url(m.ip, CLIENT_PORT),
            &["get", key, "--print-value-only", "--consistency=s"],
        )?;
        Ok(value_of(&out))
    }

    /// Runs `etcdctl --endpoints <endpoints> <args>` on the first member's host; its stdout, or
    /// an error with its stderr.
    fn etcdctl(&self, tb: &Testbed, endpoints: &str, args: &[&str]) -> Result<String, String> {
        let mut cmd = vec![
            "etcdctl",
            "--endpoints",
            endpoints,
            "--command-timeout",
            COMMAND_TIMEOUT,
        ];
        cmd.extend_from_slice(args);
        let out = tb
            .exec_ok(&self.members[0].host, &cmd)
            .map_err(|e: TestbedError| e.to_string())?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The command line of member `i`, started inside its host.
    fn spawn(&self, tb: &Testbed, i: usize) -> Result<Proc, String> {
        let m = &self.members[i];
        let data = self.dir.join(&m.host);
        std::fs::create_dir_all(&data).map_err(|e| format!("{}: {e}", data.display()))?;
        let initial: Vec<String> = (self.members.iter())
            .map(|o| format!("{}={}", o.host, url(o.ip, PEER_PORT)))
            .collect();
        let (client, peer) = (url(m.ip, CLIENT_PORT), url(m.ip, PEER_PORT));
        let data = data.to_string_lossy().into_owned();
        let initial = initial.join(",");
        let argv = [
            "etcd",
            "--name",
            &m.host,
            "--data-dir",
            &data,
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &client,
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
            "--initial-cluster",
            &initial,
            "--initial-cluster-state",
            "new",
            "--initial-cluster-token",
            "mimiq-testbed",
        ];
        tb.spawn(&m.host, &argv, false)
            .map_err(|e| format!("etcd on {}: {e}", m.host))
    }

    /// Waits until every member answers its own read and the cluster commits a write.
    fn wait_ready(&self, tb: &Testbed) -> Result<(), String> {
        mimiq_testkit::eventually(READY_WITHIN, || self.put(tb, "health-probe", "ok"))
            .map_err(|e| format!("the etcd cluster took no write: {e}; {}", self.logs()))?;
        for i in 0..self.members.len() {
            mimiq_testkit::eventually(READY_WITHIN, || {
                match self.get_from(tb, i, "health-probe")? {
                    Some(_) => Ok(()),
                    None => Err("not applied yet".to_string()),
                }
            })
            .map_err(|e| format!("member {}: {e}; {}", self.members[i].host, self.logs()))?;
        }
        Ok(())
    }

    /// The members' last lines of output, for an error.
    fn logs(&self) -> String {
        (self.members.iter())
            .filter_map(|m| {
                m.proc
                    .as_ref()
                    .map(|p| format!("{}: {}", m.host, p.describe()))
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// Puts hosts `names` on one LAN: a kernel bridge on host `etcdlan` (added), each host (added
/// unless the testbed has it) linked to it by its interface `etcd0` with `198.19.1.<n>/24`
/// (n = 1, 2, …, in the order given); returns each host with its address. The first ones are
/// the cluster's members ([`EtcdCluster::start`]), the others its clients (an allocator's host).
pub fn lan(tb: &mut Testbed, names: &[&str]) -> Result<Vec<(String, IpAddr)>, String> {
    (|| {
        tb.add_host("etcdlan")?;
        let mut ports = Vec::new();
        let mut out = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let port = format!("p{}", i + 1);
            if !tb.hosts().iter().any(|h| h == name) {
                tb.add_host(name)?;
            }
            tb.add_link((name, "etcd0"), ("etcdlan", &port), Default::default())?;
            let ip = format!("198.19.1.{}", i + 1);
            tb.add_addr(name, "etcd0", &format!("{ip}/24"))?;
            out.push((name.to_string(), ip.parse().expect("an IPv4 address")));
            ports.push(port);
        }
        let ports: Vec<&str> = ports.iter().map(String::as_str).collect();
        tb.add_bridge("etcdlan", "br0", &ports)?;
        Ok::<_, TestbedError>(out)
    })()
    .map_err(|e| e.to_string())
}

/// `http://<ip>:<port>`, with brackets for IPv6.
fn url(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(a) => format!("http://{a}:{port}"),
        IpAddr::V6(a) => format!("http://[{a}]:{port}"),
    }
}

/// The value `etcdctl get --print-value-only` printed, if the key existed.
fn value_of(out: &str) -> Option<String> {
    out.lines().next().map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_bracket_ipv6_and_values_are_the_first_line() {
        assert_eq!(
            url("198.19.1.1".parse().unwrap(), 2379),
            "http://198.19.1.1:2379"
        );
        assert_eq!(
            url("fd00::1".parse().unwrap(), 2380),
            "http://[fd00::1]:2380"
        );
        assert_eq!(value_of("v\n"), Some("v".into()));
        assert_eq!(value_of(""), None);
    }
}
