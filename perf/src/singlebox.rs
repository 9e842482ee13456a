//! The MIMIQ single box in a testbed: the allocator and `mimiq-switch --role single_box` on
//! host `sw` of [`topology::single_box`], and clients that get their addresses through the
//! switch. Shared by the demo and the namespace tests.

use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::time::{Duration, Instant};

use mimiq_allocator::client::{AllocClient, ClientError};
use mimiq_allocator::Family;

use crate::switch::Switch;
use crate::testbed::topology::{self, single_box_addr as addr};
use crate::testbed::{bin_path, eventually, Proc, Testbed};

/// The access switch's key (test material, not a secret).
pub const KEY: &str = "6d696d69712d73696e676c652d626f782d746573742d6b65792d3332627974657321";
/// The edge switch's key (test material).
pub const EDGE_KEY: &str = "6d696d69712d656467652d3130302d746573742d6b65792d33322d62797465732121";

/// Lifetimes, in ms: t_ip range, t_remove, t_sid; k = 3; and the IPv4 pool.
pub struct Times(pub u64, pub u64, pub u64, pub u64, pub &'static str);

/// Minutes-long leases on the /24 pool.
pub const LONG: Times = Times(60_000, 90_000, 5_000, 60_000, addr::POOL_V4);

/// Most addresses the clients behind one client port of the single box hold together.
pub const PORT_CAP: u32 = 100;

/// Writes the allocator's config into `dir` (its leases in `dir/leases.redb`), with leases of
/// silent clients never reclaimed early.
pub fn allocator_config(dir: &std::path::Path, t: &Times) -> std::path::PathBuf {
    allocator_config_with(dir, t, 0)
}

/// [`allocator_config`] with `reclaim_silent_after_ms` (0: never).
pub fn allocator_config_with(
    dir: &std::path::Path,
    t: &Times,
    reclaim_silent_ms: u64,
) -> std::path::PathBuf {
    let path = dir.join("allocator.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[server]
relay_listen = "127.0.0.1:6364"
publish_listen = "0.0.0.0:6365"
metrics_listen = "127.0.0.1:9364"
store = "{store}"
hlog_file = "{hlog}"

[lease]
t_ip_min_ms = {tmin}
t_ip_max_ms = {tmax}
t_remove_ms = {tremove}
# Port security: the clients behind one port of the switch hold at most this many of the /24's
# addresses together.
max_live_per_port = {PORT_CAP}
reclaim_silent_after_ms = {reclaim_silent_ms}

[ipv4]
prefixes = ["{pool}"]
reserved = ["{gw}"]
gateway = "{gw}"

[ipv6]
prefix = "{pool6}"
alias_bits = 16
aliases_per_sid = 4
k = 3
t_sid_ms = {tsid}
gateway = "fe80::1"

[[switch]]
id = 1
role = "access"
key_hex = "{KEY}"

[[switch]]
id = 100
role = "edge"
key_hex = "{EDGE_KEY}"
"#,
            store = dir.join("leases.redb").display(),
            hlog = dir.join("allocator.hlog").display(),
            pool = t.4,
            gw = addr::GATEWAY_V4,
            pool6 = addr::POOL_V6,
            tmin = t.0,
            tmax = t.1,
            tremove = t.2,
            tsid = t.3,
        ),
    )
    .unwrap();
    path
}

/// Starts `mimiq-allocator run --config <config>` on `host`.
pub fn start_allocator(tb: &Testbed, host: &str, config: &std::path::Path) -> Proc {
    let bin = bin_path("mimiq-allocator").unwrap();
    let (bin, config) = (bin.to_str().unwrap(), config.to_str().unwrap());
    tb.spawn(host, &[bin, "run", "--config", config], false)
        .unwrap()
}

/// A switch config's `workers` value: one worker per queue `0..queues`.
pub fn workers_toml(queues: u32) -> String {
    let workers: Vec<String> = (0..queues).map(|q| format!("{{ queue = {q} }}")).collect();
    format!("[{}]", workers.join(", "))
}

/// Writes the single box switch's config into `dir`: one worker per queue of `queues`.
pub fn switch_config(dir: &std::path::Path, queues: u32) -> std::path::PathBuf {
    switch_config_with(dir, queues, 0)
}

/// [`switch_config`] with the impair stage delaying every frame by `delay_us` on the way out of
/// the client port `cl0` and the outside port `out0`, so that the clients' round trip to the
/// outside grows by twice that.
pub fn switch_config_with(dir: &std::path::Path, queues: u32, delay_us: u64) -> std::path::PathBuf {
    let path = dir.join("switch.toml");
    let impair = if delay_us > 0 {
        format!("\n[impair.cl0]\ndelay_us = {delay_us}\n[impair.out0]\ndelay_us = {delay_us}\n")
    } else {
        String::new()
    };
    std::fs::write(
        &path,
        format!(
            r#"
role = "single_box"
stats_path = "{stats}"
stats_interval_ms = 50
metrics_listen = "127.0.0.1:9464"
workers = {workers}

[access]
sid = 1
clients = ["cl0", "cl1"]
uplink = "int0"
gateway_v4 = "{gw}"
gateway_v6 = ["fe80::1"]
internal = "fd00:ffff::a"
edge_internal = "fd00:ffff::e"
allocator_relay = "127.0.0.1:6364"
allocator_rules = "127.0.0.1:6365"
key_hex = "{KEY}"

[edge]
inside = "int1"
outside = "out0"
internal = "fd00:ffff::e"
outside_next_hop = "{out_v4}"
outside_v4 = "{edge_v4}"
outside_v6 = ["{edge_v6}"]
v6_prefix = "{pool6}"
alias_k = 3
v4_pools = ["{pool}"]
{impair}"#,
            stats = dir.join("stats.json").display(),
            workers = workers_toml(queues),
            out_v4 = addr::OUT_V4,
            edge_v4 = addr::EDGE_OUT_V4,
            edge_v6 = addr::EDGE_OUT_V6,
            gw = addr::GATEWAY_V4,
            pool = addr::POOL_V4,
            pool6 = addr::POOL_V6,
        ),
    )
    .unwrap();
    path
}

/// An address the allocator granted, and when, on this machine's monotonic clock.
///
/// The allocator counts the lifetime from the moment it granted the address, somewhere between
/// [`Granted::asked_at`] and [`Granted::granted_at`]: a test that checks what happens before or
/// after the lease ends uses the bound that is safe for its check.
#[derive(Debug, Clone, Copy)]
pub struct Granted {
    /// The address.
    pub addr: IpAddr,
    /// How long it may be used, from when the allocator granted it.
    pub lifetime: Duration,
    /// Just before the request (and its retries) that got it.
    pub asked_at: Instant,
    /// Just after the grant arrived.
    pub granted_at: Instant,
}

impl Granted {
    /// The lease does not end before this.
    pub fn ends_no_earlier_than(&self) -> Instant {
        self.asked_at + self.lifetime
    }

    /// The lease has ended by this.
    pub fn ends_no_later_than(&self) -> Instant {
        self.granted_at + self.lifetime
    }
}

/// Asks the allocator for one address of `family` from inside `host`, through the gateway's
/// link-local address on its LAN, until it grants one (20 s at most: the switch's relay may
/// not be up yet).
pub fn allocate(tb: &Testbed, host: &str, family: Family) -> Granted {
    eventually(Duration::from_secs(20), || try_allocate(tb, host, family))
        .unwrap_or_else(|e| panic!("allocation from {host}: {e}"))
}

/// One request for an address of `family` from inside `host` (the client's own retries when
/// no answer comes back included); the allocator's refusal as it is.
pub fn try_allocate(tb: &Testbed, host: &str, family: Family) -> Result<Granted, ClientError> {
    tb.run_in(host, move || {
        let mut client = AllocClient::new(gateway_of_eth0())?;
        let asked_at = Instant::now();
        let allocation = client.allocate(family, 1)?;
        let granted_at = Instant::now();
        let &(addr, lifetime) = allocation
            .addrs
            .first()
            .ok_or(ClientError::BadArgument("a grant without an address"))?;
        Ok(Granted {
            addr,
            lifetime,
            asked_at,
            granted_at,
        })
    })
    .map_err(|e| ClientError::Io(std::io::Error::other(e)))?
}

/// The gateway's allocation port, at its link-local address on `eth0` of the current
/// namespace.
fn gateway_of_eth0() -> SocketAddr {
    let ifindex = {
        let name = std::ffi::CString::new("eth0").unwrap();
        // SAFETY: a valid C string, for the duration of the call.
        unsafe { libc::if_nametoindex(name.as_ptr()) }
    };
    SocketAddr::V6(SocketAddrV6::new(
        "fe80::1".parse::<Ipv6Addr>().unwrap(),
        6363,
        0,
        ifindex,
    ))
}

/// The single box with an allocator and a switch running.
pub struct SingleBox {
    /// The testbed.
    pub tb: Testbed,
    /// The allocator process.
    pub allocator: Proc,
    /// The switch process.
    pub switch: Switch,
    /// Where the configs and stats live.
    pub dir: tempfile::TempDir,
}

/// Builds the topology and starts the allocator and the switch.
pub fn start(times: &Times) -> SingleBox {
    start_with(times, &Options::default())
}

/// What [`start_with`] may change.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// The allocator's `reclaim_silent_after_ms` (0: never).
    pub reclaim_silent_ms: u64,
    /// Queues of every link, and the switch's workers (one per queue).
    pub queues: u32,
    /// The switch's impair stage: one-way delay added toward the clients and toward the
    /// outside (µs; 0: none).
    pub delay_us: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            reclaim_silent_ms: 0,
            queues: 1,
            delay_us: 0,
        }
    }
}

/// [`start`] with `options`.
pub fn start_with(times: &Times, options: &Options) -> SingleBox {
    let mut tb = Testbed::new().unwrap();
    let links = crate::testbed::LinkOpts {
        queues: options.queues,
        ..Default::default()
    };
    topology::single_box_with(&mut tb, links).unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Neighbour resolution on the outside link is real both ways: the outside host resolves the
    // edge's addresses (ARP, NS answered by the edge's slow path), and the edge resolves the
    // outside host, its next hop, by ARP.

    let cfg = allocator_config_with(dir.path(), times, options.reclaim_silent_ms);
    let mut allocator = start_allocator(&tb, "sw", &cfg);
    let sw_cfg = switch_config_with(dir.path(), options.queues, options.delay_us);
    let switch = Switch::start(
        &tb,
        "sw",
        &["--config", sw_cfg.to_str().unwrap()],
        &dir.path().join("stats.json"),
    )
    .unwrap_or_else(|e| panic!("{e}; allocator: {}", allocator.describe()));
    if allocator.try_status().is_some() {
        panic!("the allocator exited: {}", allocator.describe());
    }
    SingleBox {
        tb,
        allocator,
        switch,
        dir,
    }
}

/// Puts `a` on the client's `eth0` with a route through the gateway.
pub fn use_address(tb: &Testbed, client: &str, a: IpAddr) {
    tb.exec_ok(
        client,
        &[
            "ip",
            "addr",
            "add",
            &format!("{a}/{}", if a.is_ipv4() { 32 } else { 128 }),
            "dev",
            "eth0",
        ],
    )
    .unwrap();
    match a {
        IpAddr::V4(_) => {
            let _ = tb.exec(
                client,
                &["ip", "route", "add", addr::GATEWAY_V4, "dev", "eth0"],
            );
            let _ = tb.exec(
                client,
                &["ip", "route", "add", "default", "via", addr::GATEWAY_V4],
            );
        }
        IpAddr::V6(_) => {
            let _ = tb.exec(
                client,
                &[
                    "ip", "-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0",
                ],
            );
        }
    }
}

/// Gives `addr` back to the allocator from inside `host`.
pub fn release(tb: &Testbed, host: &str, addr: IpAddr) {
    tb.run_in(host, move || {
        let gateway = gateway_of_eth0();
        let family = if addr.is_ipv4() {
            Family::V4
        } else {
            Family::V6
        };
        let released = AllocClient::new(gateway)
            .unwrap()
            .release(family, &[addr])
            .unwrap();
        assert_eq!(released, 1);
    })
    .unwrap();
}

/// The MAC of `ifname` on `host`.
pub fn mac(tb: &Testbed, host: &str, ifname: &str) -> String {
    let out = tb
        .exec_ok(host, &["cat", &format!("/sys/class/net/{ifname}/address")])
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}
