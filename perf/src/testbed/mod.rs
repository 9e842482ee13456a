//! Network-namespace testbed: real kernel hosts on one machine (the Mininet of seed 000).
//!
//! A [`Testbed`] owns a set of network namespaces ("hosts"), the veth pairs and bridges between
//! them, and the processes started inside them. Everything is torn down in `Drop`, also when the
//! test that built it panics. Names are unique per testbed (`mq-<pid>.<n>-<host>`), so tests run
//! in parallel; `scripts/clean-netns` removes what a killed run left behind.
//!
//! Addresses are restricted to the benchmarking ranges 198.18.0.0/15 and fd00::/8: a testbed
//! never configures a routed address. Veths have TSO/GSO/GRO and TX checksum offload switched off
//! so that AF_XDP sees complete frames with valid checksums.
//!
//! It shells out to iproute2 (`ip`), `ethtool` and `sysctl`, the tools an operator would use by
//! hand, so that every step can be replayed from a shell. Nothing here may panic on bad input:
//! every failure is a [`TestbedError`] that names the command and what it printed.

pub mod topology;

/// Tests wait with this instead of sleeping, here and in every crate's tests.
pub use mimiq_testkit::{eventually, TimedOut};

use std::fs::File;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Every namespace a testbed creates starts with this.
pub const NETNS_PREFIX: &str = "mq-";

/// Why a testbed operation failed.
#[derive(Debug, thiserror::Error)]
pub enum TestbedError {
    /// Namespaces and veths need root.
    #[error("the testbed needs root (network namespaces, veth pairs); run as root")]
    NotRoot,
    /// A host name that cannot be part of a namespace name.
    #[error("invalid host name {0:?}: use 1 to 12 characters of [a-z0-9]")]
    BadHostName(String),
    /// The host was never added to this testbed.
    #[error("unknown host {0:?}")]
    UnknownHost(String),
    /// An address outside 198.18.0.0/15 and fd00::/8, or not in `addr/len` form.
    #[error("address {0:?} is not inside 198.18.0.0/15 or fd00::/8 (CIDR form required)")]
    BadAddress(String),
    /// A command could not be started at all (not installed?).
    #[error("cannot run {cmd}: {error}")]
    Spawn { cmd: String, error: std::io::Error },
    /// A command ran and failed.
    #[error("`{cmd}` failed ({status}): {stderr}")]
    Command {
        cmd: String,
        status: ExitStatus,
        stderr: String,
    },
    /// Log files could not be created.
    #[error("testbed log directory: {0}")]
    Io(#[from] std::io::Error),
}

/// Options of a veth link.
#[derive(Debug, Clone, Copy)]
pub struct LinkOpts {
    /// MTU of both ends, in bytes.
    pub mtu_bytes: u32,
    /// RX and TX queues of each end (one AF_XDP socket and worker per queue).
    pub queues: u32,
}

impl Default for LinkOpts {
    fn default() -> Self {
        LinkOpts {
            mtu_bytes: 1500,
            queues: 1,
        }
    }
}

/// A set of hosts (network namespaces) and the links between them.
pub struct Testbed {
    id: String,
    hosts: Vec<String>,
    logs: tempfile::TempDir,
    spawned: std::sync::atomic::AtomicU32,
    keep: bool,
    /// Hosts whose spawned processes run as an unprivileged user ([`Testbed::run_as`]).
    users: std::sync::Mutex<std::collections::HashMap<String, Unprivileged>>,
}

/// An unprivileged user that a host's processes run as, with only some capabilities (those of
/// the binary's systemd unit in configs/systemd/), as systemd would start them.
#[derive(Debug, Clone)]
pub struct Unprivileged {
    /// User and group id.
    pub uid: u32,
    /// Capability names as in a unit's `AmbientCapabilities=` (`CAP_NET_ADMIN`, ...).
    pub caps: Vec<String>,
    /// The directory given as `$RUNTIME_DIRECTORY` (made and handed to the user first).
    pub runtime_dir: PathBuf,
}

/// Run by `sh -c` in front of a command: what systemd does for a unit with `User=`,
/// `AmbientCapabilities=`, `RuntimeDirectory=` and the `ExecStartPre=+` line of
/// configs/systemd/ that gives libxdp a bpffs directory, then the command under setpriv.
const AS_USER: &str = r#"uid=$1 caps=$2 run=$3; shift 3
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
mkdir -p /sys/fs/bpf/mimiq "$run" && chown "$uid:$uid" /sys/fs/bpf/mimiq "$run" || exit 1
# A host's udev makes /dev/net/tun 0666, which the units count on; a container's may be 0600:
# then this process's mount namespace gets a 0666 node of the same device over it.
if [ "$(stat -c %a /dev/net/tun)" != 666 ]; then
  { [ -c "$run/tun" ] || mknod -m 666 "$run/tun" c 10 200; } &&
    mount --bind "$run/tun" /dev/net/tun || exit 1
fi
export RUNTIME_DIRECTORY="$run" LIBXDP_BPFFS=/sys/fs/bpf/mimiq
exec setpriv --reuid="$uid" --regid="$uid" --clear-groups --inh-caps="-all$caps" \
  --ambient-caps="-all$caps" --bounding-set="-all$caps" -- "$@""#;

impl Testbed {
    /// A new, empty testbed with a name no other testbed on this machine uses.
    pub fn new() -> Result<Self, TestbedError> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let id = format!(
            "{}.{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        Self::with_id(id)
    }

    /// A testbed whose namespaces are `mq-<id>-<host>`; for `mimiq-perf testbed up`, which
    /// keeps it after the process exits ([`Testbed::keep`]).
    pub fn with_id(id: impl Into<String>) -> Result<Self, TestbedError> {
        if !is_root() {
            return Err(TestbedError::NotRoot);
        }
        Ok(Testbed {
            id: id.into(),
            hosts: Vec::new(),
            logs: tempfile::Builder::new()
                .prefix("mimiq-testbed-")
                .tempdir()?,
            spawned: Default::default(),
            keep: false,
            users: Default::default(),
        })
    }

    /// Leave everything in place when dropped (for building a topology by hand).
    pub fn keep(mut self) {
        self.keep = true;
    }

    /// This testbed's unique id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The names of the hosts, in the order they were added.
    pub fn hosts(&self) -> &[String] {
        &self.hosts
    }

    /// The network namespace name of `host`.
    pub fn netns(&self, host: &str) -> String {
        format!("{NETNS_PREFIX}{}-{host}", self.id)
    }

    /// Adds a host: a network namespace with `lo` up and IPv6 duplicate-address detection off.
    pub fn add_host(&mut self, name: &str) -> Result<(), TestbedError> {
        let valid = !name.is_empty()
            && name.len() <= 12
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        if !valid {
            return Err(TestbedError::BadHostName(name.to_string()));
        }
        let ns = self.netns(name);
        run("ip", &["netns", "add", &ns])?;
        // Registered before anything else can fail, so Drop removes it.
        self.hosts.push(name.to_string());
        run("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
        self.sysctl(name, "net.ipv6.conf.all.accept_dad", "0")?;
        self.sysctl(name, "net.ipv6.conf.default.accept_dad", "0")?;
        Ok(())
    }

    /// Connects `a_if` on host `a` and `b_if` on host `b` with a veth pair, sets the MTU,
    /// switches offloads off on both ends and brings them up.
    pub fn add_link(
        &mut self,
        (a, a_if): (&str, &str),
        (b, b_if): (&str, &str),
        opts: LinkOpts,
    ) -> Result<(), TestbedError> {
        let (ns_a, ns_b) = (self.known(a)?, self.known(b)?);
        let q = opts.queues.max(1).to_string();
        run(
            "ip",
            &[
                "link",
                "add",
                a_if,
                "netns",
                &ns_a,
                "numtxqueues",
                &q,
                "numrxqueues",
                &q,
                "type",
                "veth",
                "peer",
                "name",
                b_if,
                "netns",
                &ns_b,
                "numtxqueues",
                &q,
                "numrxqueues",
                &q,
            ],
        )?;
        for (ns, ifname) in [(&ns_a, a_if), (&ns_b, b_if)] {
            let mtu = opts.mtu_bytes.to_string();
            run("ip", &["-n", ns, "link", "set", ifname, "mtu", &mtu])?;
            run(
                "ip",
                &[
                    "netns", "exec", ns, "ethtool", "-K", ifname, "tso", "off", "gso", "off",
                    "gro", "off", "tx", "off",
                ],
            )?;
            run("ip", &["-n", ns, "link", "set", ifname, "up"])?;
        }
        Ok(())
    }

    /// Puts `cidr` (e.g. `198.18.0.1/24`, `fd00::1/64`) on `ifname` of `host`.
    pub fn add_addr(&mut self, host: &str, ifname: &str, cidr: &str) -> Result<(), TestbedError> {
        let ns = self.known(host)?;
        let ip = check_test_range(cidr)?;
        let mut args = vec!["-n", &ns, "addr", "add", cidr, "dev", ifname];
        if ip.is_ipv6() {
            args.push("nodad");
        }
        run("ip", &args)?;
        Ok(())
    }

    /// Adds a route to `dest` (CIDR or `default`) via `gateway` on `host`.
    pub fn add_route(&mut self, host: &str, dest: &str, gateway: &str) -> Result<(), TestbedError> {
        let ns = self.known(host)?;
        if dest != "default" {
            check_test_range(dest)?;
        }
        let family = if gateway.contains(':') { "-6" } else { "-4" };
        run(
            "ip",
            &[family, "-n", &ns, "route", "add", dest, "via", gateway],
        )?;
        Ok(())
    }

    /// Creates a kernel bridge `name` on `host` and enslaves `members` to it.
    pub fn add_bridge(
        &mut self,
        host: &str,
        name: &str,
        members: &[&str],
    ) -> Result<(), TestbedError> {
        let ns = self.known(host)?;
        // A plain L2 switch: bridged frames skip iptables. br_netfilter, when the host has it
        // loaded (container hosts do), validates the IP headers of bridged frames and drops
        // malformed ones, which a LAN switch does not, and which would hide them from what is
        // behind the bridge. It applies when either the bridge or the namespace asks for it.
        if Path::new("/proc/sys/net/bridge").exists() {
            for table in ["iptables", "ip6tables", "arptables"] {
                self.sysctl(host, &format!("net.bridge.bridge-nf-call-{table}"), "0")?;
            }
        }
        run(
            "ip",
            &[
                "-n",
                &ns,
                "link",
                "add",
                name,
                "type",
                "bridge",
                "nf_call_iptables",
                "0",
                "nf_call_ip6tables",
                "0",
                "nf_call_arptables",
                "0",
            ],
        )?;
        for member in members {
            run("ip", &["-n", &ns, "link", "set", member, "master", name])?;
        }
        run("ip", &["-n", &ns, "link", "set", name, "up"])?;
        Ok(())
    }

    /// Sets a sysctl inside `host`.
    pub fn sysctl(&self, host: &str, key: &str, value: &str) -> Result<(), TestbedError> {
        let ns = self.known(host)?;
        run(
            "ip",
            &[
                "netns",
                "exec",
                &ns,
                "sysctl",
                "-q",
                "-w",
                &format!("{key}={value}"),
            ],
        )?;
        Ok(())
    }

    /// Runs `cmd` inside `host` to completion and returns its output, whatever its exit status.
    pub fn exec(&self, host: &str, cmd: &[&str]) -> Result<Output, TestbedError> {
        let ns = self.known(host)?;
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &ns]).args(cmd);
        command.output().map_err(|error| TestbedError::Spawn {
            cmd: cmd.join(" "),
            error,
        })
    }

    /// Runs `cmd` inside `host` and fails unless it exits 0.
    pub fn exec_ok(&self, host: &str, cmd: &[&str]) -> Result<Output, TestbedError> {
        let out = self.exec(host, cmd)?;
        if out.status.success() {
            Ok(out)
        } else {
            Err(TestbedError::Command {
                cmd: cmd.join(" "),
                status: out.status,
                stderr: one_line(&out.stderr),
            })
        }
    }

    /// Starts `cmd` inside `host` in the background, its stdout and stderr captured to files.
    /// With `bpffs`, a bpf filesystem is mounted at /sys/fs/bpf in the process's own mount
    /// namespace first (`ip netns exec` remounts /sys, which hides the host's bpffs; libxdp
    /// pins its dispatcher there).
    pub fn spawn(&self, host: &str, cmd: &[&str], bpffs: bool) -> Result<Proc, TestbedError> {
        let ns = self.known(host)?;
        let n = 1 + self
            .spawned
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let base = self.logs.path().join(format!("{host}-{n}"));
        let stdout_path = base.with_extension("out");
        let stderr_path = base.with_extension("err");
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &ns]);
        let user = self
            .users
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(host)
            .cloned();
        if let Some(u) = user {
            let caps: String = u
                .caps
                .iter()
                .map(|c| format!(",+{}", c.trim_start_matches("CAP_").to_lowercase()))
                .collect();
            command
                .args([
                    "sh",
                    "-c",
                    AS_USER,
                    "mimiq-as-user",
                    &u.uid.to_string(),
                    &caps,
                ])
                .arg(&u.runtime_dir);
        } else if bpffs {
            command.args([
                "sh",
                "-c",
                "mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf; exec \"$@\"",
                "mimiq-bpffs",
            ]);
        }
        command
            .args(cmd)
            .stdin(Stdio::null())
            .stdout(File::create(&stdout_path)?)
            .stderr(File::create(&stderr_path)?);
        let child = command.spawn().map_err(|error| TestbedError::Spawn {
            cmd: cmd.join(" "),
            error,
        })?;
        Ok(Proc {
            child,
            name: cmd.join(" "),
            stdout_path,
            stderr_path,
        })
    }

    /// From now on, the processes [`Testbed::spawn`] starts on `host` run as `user`.
    pub fn run_as(&self, host: &str, user: Unprivileged) {
        self.users
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(host.to_string(), user);
    }

    /// Runs `f` on a thread that has joined `host`'s network namespace (only that thread: the
    /// test's other threads stay where they are), and returns what it returns. For code that
    /// must run as a host, such as a client library talking to a switch.
    pub fn run_in<T: Send + 'static>(
        &self,
        host: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, TestbedError> {
        match self.spawn_in(host, f)?.join() {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(TestbedError::Io(e)),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// `GET path` from an HTTP endpoint (a metrics endpoint) at `at` inside `host`: the body of
    /// a 200 answer, or why there was none.
    pub fn http_get(&self, host: &str, at: &str, path: &str) -> Result<String, String> {
        let at: std::net::SocketAddr = at.parse().map_err(|e| format!("{at}: {e}"))?;
        let path = path.to_string();
        self.run_in(host, move || mimiq_metrics::get(at, &path))
            .map_err(|e| e.to_string())?
    }

    /// Starts `f` on a thread that joins `host`'s network namespace first (a server inside a
    /// host, say); the handle gives back what `f` returned, or why the thread could not join.
    pub fn spawn_in<T: Send + 'static>(
        &self,
        host: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<std::thread::JoinHandle<std::io::Result<T>>, TestbedError> {
        use std::os::fd::AsRawFd;
        let path = format!("/var/run/netns/{}", self.known(host)?);
        let file = File::open(&path)?;
        Ok(std::thread::spawn(move || {
            // SAFETY: setns(2) with an open namespace file descriptor and CLONE_NEWNET changes
            // only this thread's network namespace; the fd stays open for the call.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(f())
        }))
    }

    fn known(&self, host: &str) -> Result<String, TestbedError> {
        if self.hosts.iter().any(|h| h == host) {
            Ok(self.netns(host))
        } else {
            Err(TestbedError::UnknownHost(host.to_string()))
        }
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        for host in &self.hosts {
            let ns = format!("{NETNS_PREFIX}{}-{host}", self.id);
            if let Err(err) = remove_netns(&ns) {
                eprintln!("testbed: cleanup of {ns}: {err}");
            }
        }
    }
}

/// A process started inside a host. Killed (SIGTERM, then SIGKILL) when dropped.
pub struct Proc {
    child: Child,
    name: String,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
}

impl Proc {
    /// The process id (of the command itself: `ip netns exec` and `sh` exec into it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What it has written to stdout so far.
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout_path).unwrap_or_default()
    }

    /// What it has written to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Its exit status, if it has exited.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits up to `timeout` for it to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_status() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`).
    pub fn signal(&self, signal: i32) {
        let Ok(pid) = i32::try_from(self.child.id()) else {
            return;
        };
        // SAFETY: kill(2) takes plain integers and touches no memory of ours; the pid is our
        // own child, which has not been reaped while `self.child` is alive and unwaited.
        unsafe {
            libc::kill(pid, signal);
        }
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL; returns the exit status.
    pub fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        if let Some(status) = self.try_status() {
            return Some(status);
        }
        self.signal(libc::SIGTERM);
        if let Some(status) = self.wait_timeout(grace) {
            return Some(status);
        }
        let _ = self.child.kill();
        self.child.wait().ok()
    }

    /// Waits up to `timeout` for the process to print a line starting with `ready` and
    /// returns it; an error naming `what` when it exits first or the time runs out.
    pub fn wait_ready(&mut self, what: &str, timeout: Duration) -> Result<String, String> {
        let ready = |out: String| {
            out.lines()
                .find(|l| l.starts_with("ready"))
                .map(str::to_owned)
        };
        let waited = eventually(timeout, || {
            // The status first: a line printed before the exit is in the output read next.
            let status = self.try_status();
            if let Some(line) = ready(self.stdout()) {
                return Ok(Ok(line));
            }
            // Once it has exited it prints nothing more: no use waiting out the timeout.
            status.map(Err).ok_or("no ready line yet")
        });
        match waited {
            Ok(Ok(line)) => Ok(line),
            Ok(Err(status)) => Err(format!(
                "{what} not ready: exited ({status}) without a ready line; {}",
                self.describe()
            )),
            Err(e) => Err(format!("{what} not ready: {e}; {}", self.describe())),
        }
    }

    /// A one-line description for assertion messages: command, stderr tail.
    pub fn describe(&self) -> String {
        format!("`{}` stderr: {}", self.name, self.stderr().trim())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(3));
    }
}

/// The namespaces whose name starts with [`NETNS_PREFIX`].
pub fn list_netns() -> Result<Vec<String>, TestbedError> {
    let out = run("ip", &["netns", "list"])?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(NETNS_PREFIX))
        .map(str::to_string)
        .collect())
}

/// Kills every process inside `ns` and deletes it (its veths go with it).
pub fn remove_netns(ns: &str) -> Result<(), TestbedError> {
    if let Ok(out) = run("ip", &["netns", "pids", ns]) {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<i32>() {
                // SAFETY: kill(2) takes plain integers and touches no memory of ours.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
    }
    run("ip", &["netns", "del", ns])?;
    Ok(())
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Tests that need root call this first: without root it panics, so such a test fails, never
/// passes unrun. Without root, run the rest with `cargo nextest run --profile unprivileged`
/// (`.config/nextest.toml` lists the root tests).
pub fn require_root() {
    assert!(
        is_root(),
        "this test needs root (network namespaces, veth pairs, AF_XDP); run it as root, or leave \
         it out with `cargo nextest run --profile unprivileged`"
    );
}

/// The resident memory (`VmRSS`, KB) of process `pid`; `None` once it is gone.
pub fn rss_kb(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Where the workspace's binaries were built, for tests that start them: the directory above
/// the running test executable (`target/<profile>/deps/..`).
pub fn bin_path(name: &str) -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let mut dir: &Path = exe.parent().ok_or("test executable has no directory")?;
    if dir.ends_with("deps") {
        dir = dir.parent().ok_or("deps has no parent")?;
    }
    let path = dir.join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "{} not built; `cargo nextest run --workspace` (scripts/test) builds it with the tests",
            path.display()
        ))
    }
}

fn check_test_range(cidr: &str) -> Result<IpAddr, TestbedError> {
    let bad = || TestbedError::BadAddress(cidr.to_string());
    let (ip, len) = cidr.split_once('/').ok_or_else(bad)?;
    let ip: IpAddr = ip.parse().map_err(|_| bad())?;
    let len: u8 = len.parse().map_err(|_| bad())?;
    let inside = match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            o[0] == 198 && (o[1] & 0xfe) == 18 && (15..=32).contains(&len)
        }
        IpAddr::V6(v6) => v6.octets()[0] == 0xfd && (8..=128).contains(&len),
    };
    if inside {
        Ok(ip)
    } else {
        Err(bad())
    }
}

fn run(cmd: &str, args: &[&str]) -> Result<Output, TestbedError> {
    let line = format!("{cmd} {}", args.join(" "));
    let out = Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|error| TestbedError::Spawn {
            cmd: line.clone(),
            error,
        })?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(TestbedError::Command {
            cmd: line,
            status: out.status,
            stderr: one_line(&out.stderr),
        })
    }
}

fn one_line(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_benchmarking_ranges_are_accepted() {
        assert!(check_test_range("198.18.0.1/24").is_ok());
        assert!(check_test_range("198.19.255.1/16").is_ok());
        assert!(check_test_range("fd00::1/64").is_ok());
        for bad in [
            "10.0.0.1/24",
            "198.20.0.1/24",
            "192.168.1.1/24",
            "2001:db8::1/64",
        ] {
            assert!(check_test_range(bad).is_err(), "{bad} must be refused");
        }
        assert!(
            check_test_range("198.18.0.0/8").is_err(),
            "a /8 reaches outside the range"
        );
        assert!(
            check_test_range("198.18.0.1").is_err(),
            "CIDR form is required"
        );
        assert!(check_test_range("garbage/x").is_err());
    }
}
