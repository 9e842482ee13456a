//! The proxy's TOML configuration (`mimiq-proxy run --config proxy.toml`), checked as a whole
//! before anything starts: every error names the field.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::capsule::IpPrefix;
use crate::policy::{Policies, PolicyConfig};
use crate::quic::QuicSettings;
use crate::request::Templates;
use crate::template::{
    UriTemplate, DEFAULT_IP_TEMPLATE, DEFAULT_UDP_TEMPLATE, IP_VARIABLES, UDP_VARIABLES,
};

/// `proxy.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// UDP address the HTTP/3 server listens on.
    pub listen: SocketAddr,
    /// TLS certificate chain, PEM.
    pub cert: PathBuf,
    /// TLS private key, PEM.
    pub key: PathBuf,
    /// Accepted bearer tokens (`proxy-authorization: Bearer <token>`); empty: no authentication.
    #[serde(default)]
    pub tokens: Vec<String>,
    /// Connections served at once; more are refused at the handshake (counted).
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// CONNECT-IP and CONNECT-UDP sessions per connection; more get 429.
    #[serde(default = "default_max_sessions")]
    pub max_sessions_per_connection: usize,
    /// Write counters and latency percentiles as JSON here every second and at exit.
    #[serde(default)]
    pub stats_file: Option<PathBuf>,
    /// An HdrHistogram interval log of each worker's burst latencies, both directions (tags
    /// `up.worker<i>`, `down.worker<i>`, ns), an interval a second and one at once on SIGUSR1.
    #[serde(default)]
    pub hlog_file: Option<PathBuf>,
    /// Serve the counters (Prometheus text at `/metrics`) and `/healthz` over HTTP here.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// QUIC transport settings.
    #[serde(default)]
    pub quic: QuicSettings,
    /// CONNECT-IP; absent: CONNECT-IP requests get 501.
    #[serde(default)]
    pub ip: Option<IpConfig>,
    /// CONNECT-UDP settings.
    #[serde(default)]
    pub udp: UdpConfig,
    /// Which destinations clients may reach (`masque-fastpath/src/policy.rs`).
    #[serde(default)]
    pub policy: PolicyConfig,
    /// Worker threads, each with its own QUIC socket, connections, sessions and TUN queue
    /// (`server/mod.rs`); default: one per core the process may use.
    #[serde(default)]
    pub workers: Option<usize>,
    /// Cores to pin the workers to, in order (worker i on `cores[i % len]`); empty: not pinned.
    #[serde(default)]
    pub cores: Vec<usize>,
    /// How datagrams reach the workers.
    #[serde(default)]
    pub datapath: Datapath,
    /// The AF_XDP datapath's settings (`datapath = "xdp"`).
    #[serde(default)]
    pub xdp: Option<XdpConfig>,
}

/// `[xdp]`: AF_XDP sockets, one per receive queue of the NIC clients reach the proxy through.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct XdpConfig {
    /// The interface (one worker per receive queue of it).
    pub interface: String,
    /// Native (driver) XDP, or the generic SKB-mode fallback for drivers without XDP.
    #[serde(default)]
    pub mode: mimiq_dataplane::config::XdpMode,
    /// Copy, zero-copy, or what the driver offers.
    #[serde(default)]
    pub copy_mode: mimiq_dataplane::config::CopyMode,
    /// Entries in each ring (a power of two).
    #[serde(default = "default_ring_size")]
    pub ring_size: u32,
}

fn default_ring_size() -> u32 {
    2048
}

impl XdpConfig {
    /// The interface's receive queues (`/sys/class/net/<interface>/queues/rx-*`).
    pub fn queues(&self) -> Result<usize, String> {
        let dir = format!("/sys/class/net/{}/queues", self.interface);
        let n = std::fs::read_dir(&dir)
            .map_err(|e| {
                format!(
                    "xdp.interface = {:?}: no such interface ({e})",
                    self.interface
                )
            })?
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with("rx-"))
            .count();
        Ok(n.max(1))
    }
}

/// `datapath`: how QUIC datagrams reach the workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Datapath {
    /// One UDP socket per worker in a SO_REUSEPORT group, steered by connection ID
    /// (`masque-fastpath/bpf/reuseport_cid.c`).
    #[default]
    Socket,
    /// One AF_XDP socket and worker per receive queue of `[xdp] interface`
    /// (`server/xdp.rs`).
    Xdp,
}

/// `[ip]`: CONNECT-IP egress through a TUN device.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IpConfig {
    /// TUN device name (created; routes to the pools point at it).
    #[serde(default = "default_tun")]
    pub tun: String,
    /// IPv4 pool clients get one address from, e.g. "198.18.200.0/24".
    #[serde(default)]
    pub pool_v4: Option<String>,
    /// IPv6 pool, e.g. "fd00:200::/64".
    #[serde(default)]
    pub pool_v6: Option<String>,
    /// Largest inner packet, bytes (≥ 1280); also the TUN MTU. Default: what the QUIC payload
    /// size allows.
    #[serde(default)]
    pub tunnel_mtu: Option<usize>,
    /// Source address of ICMPv4 errors the proxy generates.
    #[serde(default = "default_icmp_v4")]
    pub icmp_source_v4: Ipv4Addr,
    /// Source address of ICMPv6 errors the proxy generates.
    #[serde(default = "default_icmp_v6")]
    pub icmp_source_v6: Ipv6Addr,
    /// The URI template served (RFC 9484 §3), with `{target}` and `{ipproto}`.
    #[serde(default = "default_ip_template")]
    pub template: String,
}

/// `[udp]`: CONNECT-UDP.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UdpConfig {
    /// Serve CONNECT-UDP.
    pub enabled: bool,
    /// The URI template served (RFC 9298 §3), with `{target_host}` and `{target_port}`.
    pub template: String,
}

impl Default for UdpConfig {
    fn default() -> Self {
        UdpConfig {
            enabled: true,
            template: DEFAULT_UDP_TEMPLATE.into(),
        }
    }
}

fn default_max_connections() -> usize {
    4096
}
fn default_max_sessions() -> usize {
    16
}
fn default_ip_template() -> String {
    DEFAULT_IP_TEMPLATE.into()
}
fn default_tun() -> String {
    "mqproxy0".into()
}
fn default_icmp_v4() -> Ipv4Addr {
    Ipv4Addr::new(192, 0, 2, 1)
}
fn default_icmp_v6() -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)
}

impl ProxyConfig {
    /// The URI templates served (`[udp] template`, `[ip] template`).
    pub fn templates(&self) -> Result<Templates, String> {
        let ip = match &self.ip {
            Some(ip) => UriTemplate::parse(&ip.template, IP_VARIABLES)
                .map_err(|e| format!("ip.template: {e}"))?,
            None => UriTemplate::ip_default(),
        };
        Ok(Templates {
            udp: UriTemplate::parse(&self.udp.template, UDP_VARIABLES)
                .map_err(|e| format!("udp.template: {e}"))?,
            ip,
        })
    }

    /// Reads and checks a config file.
    pub fn load(path: &Path) -> Result<ProxyConfig, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Parses and checks config text (TOML errors on one line, with their line and column).
    pub fn parse(text: &str) -> Result<ProxyConfig, String> {
        let c: ProxyConfig = toml::from_str(text).map_err(|e| one_line(&e))?;
        c.validate()?;
        Ok(c)
    }

    /// Checks values serde cannot.
    pub fn validate(&self) -> Result<(), String> {
        self.quic.validate()?;
        if self.quic.active_connection_id_limit < 4 {
            return Err(format!(
                "quic.active_connection_id_limit = {}: must be at least 4 so hopping clients find spare connection IDs",
                self.quic.active_connection_id_limit
            ));
        }
        // A day at most: a drain longer than that is a process nobody is waiting for.
        if self.quic.drain_timeout_ms > 86_400_000 {
            return Err(format!(
                "quic.drain_timeout_ms = {}: at most 86400000 (a day)",
                self.quic.drain_timeout_ms
            ));
        }
        if self.max_sessions_per_connection == 0 || self.max_connections == 0 {
            return Err(
                "max_connections and max_sessions_per_connection must be at least 1".into(),
            );
        }
        self.templates()?;
        Policies::from_config(&self.policy)?;
        self.worker_count()?;
        match (&self.datapath, &self.xdp) {
            (Datapath::Xdp, None) => {
                return Err("datapath = \"xdp\" needs an [xdp] table with the interface".into())
            }
            (Datapath::Xdp, Some(x)) => {
                if !crate::netcfg::is_interface_name(&x.interface) {
                    return Err(format!(
                        "xdp.interface = {:?}: not an interface name",
                        x.interface
                    ));
                }
                if !x.ring_size.is_power_of_two() || !(64..=16_384).contains(&x.ring_size) {
                    return Err(format!(
                        "xdp.ring_size = {}: a power of two in 64..=16384",
                        x.ring_size
                    ));
                }
            }
            (Datapath::Socket, _) => {}
        }
        let cores = usable_cores();
        if let Some(c) = self.cores.iter().find(|c| !cores.contains(c)) {
            return Err(format!(
                "cores: core {c} is not one this process may use ({cores:?})"
            ));
        }
        if let Some(t) = self
            .policy
            .tokens
            .iter()
            .find(|t| !self.tokens.contains(&t.token))
        {
            return Err(format!(
                "policy.tokens: token {:?} is not one of `tokens`",
                t.token
            ));
        }
        if let Some(ip) = &self.ip {
            ip.pools()?;
            if ip.pool_v4.is_none() && ip.pool_v6.is_none() {
                return Err("[ip] needs pool_v4 or pool_v6".into());
            }
            if !crate::netcfg::is_interface_name(&ip.tun) {
                return Err(format!(
                    "ip.tun = {:?}: not an interface name (1 to 15 bytes, no '/', ':' or whitespace)",
                    ip.tun
                ));
            }
            if let Some(m) = ip.tunnel_mtu {
                if !(1280..=65_535).contains(&m) {
                    return Err(format!("ip.tunnel_mtu = {m}: must be in 1280..=65535"));
                }
            }
        }
        Ok(())
    }
}

impl ProxyConfig {
    /// Workers to run: `workers`, or one per core the process may use; never more workers than
    /// those cores (two poll-mode workers on one core only take turns). The AF_XDP datapath
    /// runs one per receive queue of its interface (checked at start).
    pub fn worker_count(&self) -> Result<usize, String> {
        let cores = if self.cores.is_empty() {
            usable_cores().len()
        } else {
            self.cores.len()
        };
        match self.workers {
            None => Ok(cores.max(1)),
            Some(0) => Err("workers = 0: at least one worker is needed".into()),
            Some(n) if n > cores.max(1) => Err(format!(
                "workers = {n}: more workers than the {cores} cores this process may use"
            )),
            Some(n) if n > 256 => Err(format!("workers = {n}: at most 256")),
            Some(n) => Ok(n),
        }
    }
}

/// The cores this process may run on (its CPU affinity mask).
pub fn usable_cores() -> Vec<usize> {
    core_affinity::get_core_ids()
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.id)
        .collect()
}

impl IpConfig {
    /// The pools, parsed.
    pub fn pools(&self) -> Result<(Option<IpPrefix>, Option<IpPrefix>), String> {
        let v4 = self
            .pool_v4
            .as_deref()
            .map(|s| parse_prefix(s, true).map_err(|e| format!("ip.pool_v4: {e}")))
            .transpose()?;
        let v6 = self
            .pool_v6
            .as_deref()
            .map(|s| parse_prefix(s, false).map_err(|e| format!("ip.pool_v6: {e}")))
            .transpose()?;
        Ok((v4, v6))
    }
}

/// Parses "address/length" of the given family.
pub fn parse_prefix(s: &str, v4: bool) -> Result<IpPrefix, String> {
    let (a, l) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?}: expected address/length"))?;
    let addr: IpAddr = a.parse().map_err(|_| format!("{s:?}: bad address"))?;
    if addr.is_ipv4() != v4 {
        return Err(format!("{s:?}: wrong address family"));
    }
    let len: u8 = l.parse().map_err(|_| format!("{s:?}: bad prefix length"))?;
    IpPrefix::new(addr, len).map_err(|e| format!("{s:?}: {e}"))
}

/// A TOML error on one line, as every message of `mimiq-proxy` is: where (`line L, column C`)
/// and what, without the snippet `toml` draws under it.
fn one_line(e: &toml::de::Error) -> String {
    let shown = e.to_string();
    let at = shown.lines().next().unwrap_or_default();
    let what = e.message().trim().replace('\n', " ");
    match at.strip_prefix("TOML parse error at ") {
        Some(at) => format!("{at}: {what}"),
        None => what,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<ProxyConfig, String> {
        ProxyConfig::parse(s)
    }

    const BASE: &str = "listen = \"0.0.0.0:4433\"\ncert = \"c.pem\"\nkey = \"k.pem\"\n";

    #[test]
    fn shipped_config_parses() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/proxy.toml");
        let text = std::fs::read_to_string(path).unwrap();
        let c: ProxyConfig = toml::from_str(&text).unwrap();
        c.validate().unwrap();
        assert!(c.ip.is_some());
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (
                "[quic]\nmax_udp_payload_bytes = 1200\n",
                "max_udp_payload_bytes",
            ),
            (
                "[quic]\nactive_connection_id_limit = 3\n",
                "active_connection_id_limit",
            ),
            (
                "[quic]\nactive_connection_id_limit = 1\n",
                "active_connection_id_limit",
            ),
            (
                "[quic]\ncongestion_control = \"vegas\"\n",
                "congestion_control",
            ),
            (
                "[quic]\ndrain_timeout_ms = 18446744073709551615\n",
                "drain_timeout_ms",
            ),
            ("[ip]\npool_v4 = \"198.18.0.0\"\n", "pool_v4"),
            ("[ip]\npool_v4 = \"fd00::/64\"\n", "pool_v4"),
            ("[ip]\npool_v6 = \"fd00::/129\"\n", "pool_v6"),
            ("[ip]\ntun = \"x\"\n", "pool_v4 or pool_v6"),
            (
                "[ip]\npool_v4 = \"198.18.0.0/24\"\ntunnel_mtu = 1000\n",
                "tunnel_mtu",
            ),
            ("bogus = 1\n", "bogus"),
            (
                "max_sessions_per_connection = 0\n",
                "max_sessions_per_connection",
            ),
            ("workers = 0\n", "workers = 0"),
            ("workers = 100000\n", "more workers than"),
            ("datapath = \"xdp\"\n", "needs an [xdp] table"),
            (
                "datapath = \"xdp\"\n[xdp]\ninterface = \"eth0\"\nring_size = 1000\n",
                "xdp.ring_size",
            ),
            ("[xdp]\nmode = \"driver\"\n", "unknown variant `driver`"),
            ("datapath = \"dpdk\"\n", "unknown variant `dpdk`"),
            ("cores = [100000]\n", "core 100000"),
        ];
        for (extra, want) in cases {
            let err = parse(&format!("{BASE}{extra}")).unwrap_err();
            assert!(err.contains(want), "{extra:?}: {err}");
        }
        assert!(parse(BASE).is_ok());
    }

    #[test]
    fn a_toml_error_is_one_line_with_its_line_and_column() {
        let e = parse("[quic]\nidle_timeout_ms = \"x\"\n").unwrap_err();
        assert_eq!(
            e, "line 2, column 19: invalid type: string \"x\", expected u64",
            "{e}"
        );
    }

    #[test]
    fn unreadable_file_is_one_clear_error() {
        let e = ProxyConfig::load(Path::new("/nonexistent/proxy.toml")).unwrap_err();
        assert!(e.contains("cannot read"), "{e}");
    }
}
