//! MASQUE testbeds: a client host, a proxy host (`mimiq-proxy`) and a server host, each a real
//! kernel in its own namespace, and helpers to start the proxy and its clients.
//!
//! ```text
//!  c (client) ── c0 ─── p0 ── p (proxy) ── p1 ─── s0 ── s (server)
//!   198.18.10.2..5/24     198.18.10.1/24   198.18.20.1/24     198.18.20.2/24
//!   fd00:10::2..5/64      fd00:10::1/64    fd00:20::1/64      fd00:20::2/64
//! ```
//!
//! The client has no route to the server: only the tunnel reaches it. The server routes the
//! proxy's client pools (198.18.200.0/24, fd00:200::/64) back through the proxy, which forwards
//! between its TUN device and `p1`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::testbed::{bin_path, eventually, LinkOpts, Proc, Testbed, TestbedError};

/// Addresses of [`build`]'s hosts.
pub mod addr {
    /// The proxy on the client side.
    pub const PROXY_V4: &str = "198.18.10.1";
    /// The proxy on the client side, IPv6.
    pub const PROXY_V6: &str = "fd00:10::1";
    /// The client's addresses (it may hop between them).
    pub const CLIENT_V4: [&str; 4] = ["198.18.10.2", "198.18.10.3", "198.18.10.4", "198.18.10.5"];
    /// The server.
    pub const SERVER_V4: &str = "198.18.20.2";
    /// The server, IPv6.
    pub const SERVER_V6: &str = "fd00:20::2";
    /// The proxy's client pools.
    pub const POOL_V4: &str = "198.18.200.0/24";
    /// IPv6 pool.
    pub const POOL_V6: &str = "fd00:200::/64";
}

/// Builds the three hosts and their links; the proxy forwards IPv4 and IPv6.
pub fn build(tb: &mut Testbed) -> Result<(), TestbedError> {
    build_with(tb, LinkOpts::default())
}

/// [`build`] with `client_link` for the client–proxy link (queues for the proxy's AF_XDP
/// workers).
pub fn build_with(tb: &mut Testbed, client_link: LinkOpts) -> Result<(), TestbedError> {
    for h in ["c", "p", "s"] {
        tb.add_host(h)?;
    }
    tb.add_link(("c", "c0"), ("p", "p0"), client_link)?;
    tb.add_link(("p", "p1"), ("s", "s0"), LinkOpts::default())?;
    for a in addr::CLIENT_V4 {
        tb.add_addr("c", "c0", &format!("{a}/24"))?;
    }
    for i in 2..=5 {
        tb.add_addr("c", "c0", &format!("fd00:10::{i}/64"))?;
    }
    tb.add_addr("p", "p0", "198.18.10.1/24")?;
    tb.add_addr("p", "p0", "fd00:10::1/64")?;
    tb.add_addr("p", "p1", "198.18.20.1/24")?;
    tb.add_addr("p", "p1", "fd00:20::1/64")?;
    tb.add_addr("s", "s0", "198.18.20.2/24")?;
    tb.add_addr("s", "s0", "fd00:20::2/64")?;
    tb.add_route("s", addr::POOL_V4, "198.18.20.1")?;
    tb.add_route("s", addr::POOL_V6, "fd00:20::1")?;
    tb.sysctl("p", "net.ipv4.ip_forward", "1")?;
    tb.sysctl("p", "net.ipv6.conf.all.forwarding", "1")?;
    Ok(())
}

/// Writes a self-signed certificate for the proxy into `dir` (no namespace needed).
pub fn make_cert(dir: &Path) -> Result<(PathBuf, PathBuf), String> {
    let bin = bin_path("mimiq-proxy")?;
    let out = std::process::Command::new(bin)
        .args(["cert", "--out"])
        .arg(dir)
        .args(["--name", "proxy"])
        .output()
        .map_err(|e| format!("mimiq-proxy cert: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "mimiq-proxy cert: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok((dir.join("proxy-cert.pem"), dir.join("proxy-key.pem")))
}

/// A running `mimiq-proxy run`.
pub struct ProxyProc {
    /// The process.
    pub proc: Proc,
    /// Its stats file.
    pub stats_file: PathBuf,
    /// The config it runs.
    config: PathBuf,
    /// The processes [`ProxyProc::kill_and_restart`] started (stopped when dropped).
    restarted: std::sync::Mutex<Vec<Proc>>,
}

impl ProxyProc {
    /// Writes a config into `dir` (listening on `listen`, `extra` TOML appended; without `[ip]`
    /// or `[policy]` in it, a CONNECT-IP pool and a policy that allows private ranges are added)
    /// and starts the proxy on `host`; returns once its stats file exists (it is serving).
    pub fn start(
        tb: &Testbed,
        host: &str,
        dir: &Path,
        listen: &str,
        extra: &str,
    ) -> Result<ProxyProc, String> {
        let (cert, key) = make_cert(dir)?;
        let stats_file = dir.join("proxy-stats.json");
        let cfg = format!(
            "listen = \"{listen}\"\ncert = \"{}\"\nkey = \"{}\"\nstats_file = \"{}\"\n{extra}",
            cert.display(),
            key.display(),
            stats_file.display()
        );
        let cfg = if cfg.contains("[ip]") {
            cfg
        } else {
            format!(
                "{cfg}\n[ip]\ntun = \"mqp0\"\npool_v4 = \"{}\"\npool_v6 = \"{}\"\nicmp_source_v4 = \"198.18.200.1\"\nicmp_source_v6 = \"fd00:200::1\"\n",
                addr::POOL_V4,
                addr::POOL_V6
            )
        };
        // The testbeds' networks are benchmarking (RFC 2544) and unique local (RFC 4193)
        // ranges, which the proxy's default policy refuses as private.
        let cfg = if cfg.contains("[policy]") {
            cfg
        } else {
            format!("{cfg}\n[policy]\nallow_private = true\n")
        };
        let path = dir.join("proxy.toml");
        std::fs::write(&path, cfg).map_err(|e| e.to_string())?;
        let bin = bin_path("mimiq-proxy")?;
        let bin = bin.to_string_lossy().into_owned();
        let path_s = path.to_string_lossy().into_owned();
        let proc = tb
            .spawn(host, &[&bin, "run", "--config", &path_s], false)
            .map_err(|e| e.to_string())?;
        eventually(Duration::from_secs(10), || {
            stats_file.exists().then_some(()).ok_or("no stats file yet")
        })
        .map_err(|e| format!("proxy did not start: {e}; {}", proc.describe()))?;
        Ok(ProxyProc {
            proc,
            stats_file,
            config: path,
            restarted: Default::default(),
        })
    }

    /// Kills the proxy with SIGKILL (its clients hear nothing) and starts it again on `host`
    /// from the same config: a process that knows no connection, on the same port, writing the
    /// same stats file (removed first, so [`ProxyProc::stats`] reads the new one's once it is
    /// written). Returns once the new process runs.
    pub fn kill_and_restart(&self, tb: &Testbed, host: &str) -> Result<(), String> {
        let mut restarted = self.restarted.lock().map_err(|e| e.to_string())?;
        // The one running now: the last started again, or the first.
        match restarted.last_mut() {
            Some(live) => {
                live.signal(libc::SIGKILL);
                let _ = live.wait_timeout(Duration::from_secs(5));
            }
            None => self.proc.signal(libc::SIGKILL),
        }
        let _ = std::fs::remove_file(&self.stats_file);
        let bin = bin_path("mimiq-proxy")?.to_string_lossy().into_owned();
        let config = self.config.to_string_lossy().into_owned();
        let proc = eventually(Duration::from_secs(10), || {
            let mut proc = tb
                .spawn(host, &[&bin, "run", "--config", &config], false)
                .map_err(|e| e.to_string())?;
            // Until the killed one is gone its port is taken, and the new one exits.
            std::thread::sleep(Duration::from_millis(200));
            match proc.try_status() {
                None => Ok(proc),
                Some(status) => Err(format!(
                    "the restarted proxy exited ({status}): {}",
                    proc.describe()
                )),
            }
        })
        .map_err(|e| format!("restart: {e}"))?;
        restarted.push(proc);
        Ok(())
    }

    /// The process id of the proxy running now (the last one [`ProxyProc::kill_and_restart`]
    /// started, if it did).
    pub fn pid(&self) -> u32 {
        self.restarted
            .lock()
            .ok()
            .and_then(|r| r.last().map(Proc::pid))
            .unwrap_or_else(|| self.proc.pid())
    }

    /// The config file it runs.
    pub fn config(&self) -> &Path {
        &self.config
    }

    /// The proxy's current counters.
    pub fn stats(&self) -> Result<Value, String> {
        let text = std::fs::read_to_string(&self.stats_file).map_err(|e| e.to_string())?;
        serde_json::from_str(&text).map_err(|e| e.to_string())
    }

    /// The first counters the proxy writes after this call (it rewrites its stats file once a
    /// second): everything that happened before the call is in them. Waits 10 s at most.
    pub fn fresh_stats(&self) -> Result<Value, String> {
        let asked = std::time::SystemTime::now();
        eventually(Duration::from_secs(10), || {
            let written = std::fs::metadata(&self.stats_file)
                .and_then(|m| m.modified())
                .map_err(|e| format!("{}: {e}", self.stats_file.display()))?;
            if written < asked {
                return Err(format!("{} not rewritten", self.stats_file.display()));
            }
            self.stats()
        })
        .map_err(|e| format!("proxy counters: {e}; {}", self.proc.describe()))
    }
}

/// Starts `mimiq-proxy client <args>` on `host` and waits for its `ready` line (the tunnel is up);
/// returns the process and that line.
pub fn start_client(tb: &Testbed, host: &str, args: &[&str]) -> Result<(Proc, String), String> {
    let bin = bin_path("mimiq-proxy")?;
    let bin = bin.to_string_lossy().into_owned();
    let mut cmd = vec![bin.as_str(), "client"];
    cmd.extend_from_slice(args);
    let mut proc = tb.spawn(host, &cmd, false).map_err(|e| e.to_string())?;
    let line = proc.wait_ready("client", Duration::from_secs(15))?;
    Ok((proc, line))
}

/// [`start_client`] for the common case: `client ip` on host `c`, bound to the client's first
/// IPv4 address, to the proxy at its IPv4 address, port 4433, with the TUN device `mq0`.
pub fn start_ip_client(tb: &Testbed) -> Result<(Proc, String), String> {
    start_ip_client_with(tb, &[])
}

/// [`start_ip_client`] with more flags.
pub fn start_ip_client_with(tb: &Testbed, extra: &[&str]) -> Result<(Proc, String), String> {
    let url = format!("{}:4433", addr::PROXY_V4);
    let mut args = vec![
        "ip",
        "--proxy",
        &url,
        "--bind",
        addr::CLIENT_V4[0],
        "--tun",
        "mq0",
    ];
    args.extend_from_slice(extra);
    start_client(tb, "c", &args)
}

/// The MASQUE testbed ([`build`]) with `mimiq-proxy` serving on p, port 4433, with `extra`
/// config ([`ProxyProc::start`]): the testbed, the proxy's directory and the proxy, in the
/// order they are to be dropped last to first.
pub fn with_proxy(extra: &str) -> Result<(Testbed, tempfile::TempDir, ProxyProc), String> {
    with_proxy_on(LinkOpts::default(), extra)
}

/// [`with_proxy`] with `client_link` for the client–proxy link.
///
/// `MIMIQ_TEST_PROXY=socket/N` or `xdp/N` runs the proxy with N workers on that datapath
/// (for `xdp`, `p0` gets N queues) where the test does not choose: the proxy tests that use
/// this function can so be run on every setup, e.g. `MIMIQ_TEST_PROXY=xdp/2 scripts/test -E
/// 'binary(masque)'`. Unset: the proxy's defaults (socket, one worker per core).
pub fn with_proxy_on(
    client_link: LinkOpts,
    extra: &str,
) -> Result<(Testbed, tempfile::TempDir, ProxyProc), String> {
    let (client_link, extra) = match std::env::var("MIMIQ_TEST_PROXY") {
        Ok(setup) if !extra.contains("workers") && !extra.contains("datapath") => {
            let (datapath, n) = setup
                .split_once('/')
                .and_then(|(d, n)| Some((d.to_owned(), n.parse::<u32>().ok()?)))
                .ok_or_else(|| format!("MIMIQ_TEST_PROXY={setup:?}: expected socket/N or xdp/N"))?;
            match datapath.as_str() {
                "socket" => (client_link, format!("workers = {n}\n{extra}")),
                "xdp" => (
                    LinkOpts {
                        queues: n,
                        ..client_link
                    },
                    format!("datapath = \"xdp\"\n{extra}\n[xdp]\ninterface = \"p0\"\n"),
                ),
                _ => return Err(format!("MIMIQ_TEST_PROXY={setup:?}: socket or xdp")),
            }
        }
        _ => (client_link, extra.to_owned()),
    };
    let extra = extra.as_str();
    let mut tb = Testbed::new().map_err(|e| e.to_string())?;
    build_with(&mut tb, client_link).map_err(|e| e.to_string())?;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let proxy = ProxyProc::start(&tb, "p", dir.path(), "0.0.0.0:4433", extra)?;
    Ok((tb, dir, proxy))
}

/// Starts `mimiq-agent run --config <config>` on `host` and waits for its `ready` line (the
/// tunnel is up); returns the process and that line.
/// Writes `dir/agent.toml`: tunnel mode to the proxy with a static source (the four client
/// addresses), a hop every `packets` QUIC datagrams, the server's subnet routed into the tunnel,
/// `tunnel_extra` appended to its `[tunnel]` table, the hop strategy seeded with `seed` if
/// given; returns its path.
pub fn write_agent_config(
    dir: &Path,
    seed: Option<u64>,
    packets: u32,
    tunnel_extra: &str,
) -> Result<PathBuf, String> {
    let addresses: Vec<String> = addr::CLIENT_V4.iter().map(|a| format!("\"{a}\"")).collect();
    let seed = seed.map_or(String::new(), |s| format!("seed = {s}\n"));
    let cfg = format!(
        "{seed}[hop]\nkind = \"every_packets\"\npackets = {packets}\n\
         [tunnel]\nproxy = \"{}:4433\"\ntun = \"mqa0\"\nroutes = [\"198.18.20.0/24\"]\n\
         {tunnel_extra}[source]\nkind = \"static\"\naddresses = [{}]\n",
        addr::PROXY_V4,
        addresses.join(", ")
    );
    let path = dir.join("agent.toml");
    std::fs::write(&path, cfg).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(path)
}

pub fn start_agent(tb: &mut Testbed, host: &str, config: &Path) -> Result<(Proc, String), String> {
    let bin = bin_path("mimiq-agent")?.to_string_lossy().into_owned();
    let config = config.to_string_lossy().into_owned();
    let mut proc = tb
        .spawn(host, &[&bin, "run", "--config", &config], false)
        .map_err(|e| e.to_string())?;
    let line = proc.wait_ready(&format!("{host}: agent"), Duration::from_secs(20))?;
    Ok((proc, line))
}

/// A UDP echo server on `host` at `bind`, answering until the testbed goes; returns once it is
/// bound.
pub fn echo_server(tb: &Testbed, host: &str, bind: SocketAddr) -> Result<(), String> {
    let (bound, is_bound) = std::sync::mpsc::channel();
    tb.spawn_in(host, move || {
        let s = match std::net::UdpSocket::bind(bind) {
            Ok(s) => s,
            Err(e) => {
                let _ = bound.send(Err(format!("echo server at {bind}: {e}")));
                return;
            }
        };
        let _ = bound.send(Ok(()));
        let mut buf = [0u8; 65536];
        while let Ok((n, from)) = s.recv_from(&mut buf) {
            let _ = s.send_to(&buf[..n], from);
        }
    })
    .map_err(|e| e.to_string())?;
    is_bound
        .recv()
        .map_err(|_| format!("echo server at {bind}: its thread ended"))?
}

/// `mimiq-proxy client udp` on host `c` to the proxy at its IPv4 address, port 4433, for
/// `target`, listening on `listen`, with `extra` flags; its error when it is refused.
pub fn udp_client(
    tb: &Testbed,
    target: &str,
    listen: &str,
    extra: &[&str],
) -> Result<Proc, String> {
    let url = format!("{}:4433", addr::PROXY_V4);
    let mut args = vec![
        "udp", "--proxy", &url, "--target", target, "--listen", listen,
    ];
    args.extend_from_slice(extra);
    start_client(tb, "c", &args).map(|(p, _)| p)
}

/// Sends `count` numbered datagrams of `size` bytes to `to` from `host` and returns how many came
/// back intact.
pub fn udp_exchange(tb: &Testbed, host: &str, to: &'static str, count: u32, size: usize) -> u32 {
    tb.run_in(host, move || {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut ok = 0;
        let mut buf = vec![0u8; 65536];
        for i in 0..count {
            let mut msg = vec![(i % 251) as u8; size];
            msg[..4].copy_from_slice(&i.to_be_bytes());
            s.send_to(&msg, to).unwrap();
            if let Ok((n, _)) = s.recv_from(&mut buf) {
                if buf[..n] == msg[..] {
                    ok += 1;
                }
            }
        }
        ok
    })
    .unwrap()
}

/// Stops a client with SIGTERM and returns the JSON counters it printed.
pub fn stop_client(proc: &mut Proc) -> Result<Value, String> {
    proc.stop(Duration::from_secs(5));
    let out = proc.stdout();
    let line = out
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .ok_or_else(|| format!("client printed no counters: {}", proc.describe()))?;
    serde_json::from_str(line).map_err(|e| e.to_string())
}
