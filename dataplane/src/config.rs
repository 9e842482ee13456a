//! The switch's configuration file (TOML). Every field is documented in
//! `docs/CONFIGURATION.md`; unknown fields are refused.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::pipeline::impair::ImpairConfig;

/// What the switch does with frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Forward every frame between two ports, unchanged.
    L2fwd,
    /// The MIMIQ access switch (`[access]`).
    Access,
    /// The MIMIQ edge switch (`[edge]`).
    Edge,
    /// The MIMIQ single box: the access and edge roles in one worker per queue, the edge stage
    /// after the access stage in the same burst (`[access]` and `[edge]`;
    /// pipeline/single_box.rs).
    SingleBox,
}

/// Where the XDP program that feeds the sockets runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum XdpMode {
    /// In the driver (veth, and every NIC with XDP support).
    #[default]
    Native,
    /// Generic XDP on the skb path: the fallback for drivers without XDP.
    Skb,
}

/// Whether frames are copied between the NIC and the UMEM.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum CopyMode {
    /// Zero-copy where the driver offers it, copy otherwise.
    #[default]
    Auto,
    /// Always copy.
    Copy,
    /// Zero-copy or fail.
    #[serde(rename = "zerocopy")]
    #[value(name = "zerocopy")]
    ZeroCopy,
}

/// What a worker does when its ports are idle.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum IdleStrategy {
    /// Spin: lowest latency, one core at 100 %. For dedicated cores.
    Busy,
    /// Spin a little, then sleep in poll() on the sockets.
    #[default]
    Adaptive,
}

/// Whether the UMEM is backed by huge pages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum HugePages {
    /// Huge pages when the system has them free, normal pages otherwise (logged).
    #[default]
    Auto,
    /// Huge pages or fail.
    On,
    /// Normal pages.
    Off,
}

/// One worker: a thread that owns queue `queue` of every interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerConfig {
    /// The NIC queue this worker serves on every interface.
    pub queue: u32,
    /// CPU core the worker is pinned to; unpinned when absent.
    #[serde(default)]
    pub core: Option<usize>,
}

/// What the switch's XDP program leaves to the host's kernel instead of the switch.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelConfig {
    /// ARP frames go to the kernel (default false).
    #[serde(default)]
    pub arp: bool,
    /// IPv6 neighbour discovery (ICMPv6 133–137) goes to the kernel (default false).
    #[serde(default)]
    pub nd: bool,
    /// Frames for these destination addresses go to the kernel (the host's own addresses, for
    /// management and control traffic); default none.
    #[serde(default)]
    pub addresses: Vec<IpAddr>,
}

/// The access role (`role = "access"` or `"single_box"`): `[access]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessSection {
    /// This access switch's SID (also its switch ID and key at the allocator).
    pub sid: u16,
    /// The client-facing interfaces, one name or a list: each is a port of the switch (numbered
    /// from 0 in this order, the number the allocator records with a client's leases), and a
    /// client's traffic is accepted from, and delivered to, the port it was granted through.
    #[serde(deserialize_with = "one_or_more")]
    pub clients: Vec<String>,
    /// The interface towards the edge.
    pub uplink: String,
    /// The edge's MAC on that link (`role = "access"`; the single box reads it locally).
    #[serde(default)]
    pub edge_mac: Option<String>,
    /// The gateway IPv4 address clients use.
    #[serde(default)]
    pub gateway_v4: Option<std::net::Ipv4Addr>,
    /// The gateway IPv6 addresses (link-local first; default `["fe80::1"]`).
    #[serde(default = "default_gateway_v6")]
    pub gateway_v6: Vec<std::net::Ipv6Addr>,
    /// Our internal address (outer destination of the return path): IPv6, or IPv4 for an
    /// IPv4-only internal network (the outer header follows the family).
    pub internal: IpAddr,
    /// The edge's internal address (the only accepted outer source), of the same family.
    pub edge_internal: IpAddr,
    /// The allocator's relay address (`relay_listen`).
    pub allocator_relay: SocketAddr,
    /// The allocator's rule-stream address (`publish_listen`).
    pub allocator_rules: SocketAddr,
    /// The key shared with the allocator for this SID, hex (≥ 32 bytes).
    pub key_hex: String,
}

/// An access switch as the edge knows it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessPeer {
    /// Its SID.
    pub sid: u16,
    /// Its internal address (same family as the edge's).
    pub internal: IpAddr,
    /// Its MAC on the internal link.
    pub mac: String,
}

/// The edge role (`role = "edge"` or `"single_box"`): `[edge]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeSection {
    /// The interface towards the access switches.
    pub inside: String,
    /// The outside interface.
    pub outside: String,
    /// Our internal address (outer source): IPv6, or IPv4 for an IPv4-only internal network.
    pub internal: IpAddr,
    /// The access switches (`role = "edge"`; the single box knows its own).
    #[serde(default)]
    pub access: Vec<AccessPeer>,
    /// The outside next hop's address: IPv4, resolved by ARP from `outside_v4`, or IPv6,
    /// resolved by neighbour solicitation from the first of `outside_v6`.
    #[serde(default)]
    pub outside_next_hop: Option<IpAddr>,
    /// Or its MAC, e.g. `"02:00:00:00:00:99"`, when it is not to be resolved.
    #[serde(default)]
    pub outside_next_hop_mac: Option<String>,
    /// Our IPv4 address on the outside link (ARP for it answered; ARP requests sent from it).
    #[serde(default)]
    pub outside_v4: Option<std::net::Ipv4Addr>,
    /// Our IPv6 addresses on the outside link (neighbour solicitations answered).
    #[serde(default)]
    pub outside_v6: Vec<std::net::Ipv6Addr>,
    /// The IPv6 client pool, e.g. `"fd00:1::/64"`; the alias bits follow the prefix.
    pub v6_prefix: String,
    /// Alias bits (default 16).
    #[serde(default = "default_alias_bits")]
    pub alias_bits: u8,
    /// Alias epochs route for this many rotations (default 4; the allocator's `k`).
    #[serde(default = "default_alias_k")]
    pub alias_k: u64,
    /// The IPv4 client pools, e.g. `["198.18.1.0/24"]`.
    #[serde(default)]
    pub v4_pools: Vec<String>,
    /// The allocator's rule-stream address (`role = "edge"`).
    #[serde(default)]
    pub allocator_rules: Option<SocketAddr>,
    /// Our switch ID at the allocator (`role = "edge"`).
    #[serde(default)]
    pub switch_id: Option<u16>,
    /// The key shared with the allocator, hex (`role = "edge"`).
    #[serde(default)]
    pub key_hex: Option<String>,
}

fn default_gateway_v6() -> Vec<std::net::Ipv6Addr> {
    vec![std::net::Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1)]
}

fn default_alias_bits() -> u8 {
    16
}

fn default_alias_k() -> u64 {
    4
}

/// Parses `"addr/len"`.
pub fn parse_prefix<A: std::str::FromStr>(s: &str, max_len: u8) -> Result<(A, u8), String> {
    let (a, l) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?} is not addr/len"))?;
    let addr = a.parse().map_err(|_| format!("{s:?}: bad address"))?;
    let len: u8 = l.parse().map_err(|_| format!("{s:?}: bad prefix length"))?;
    if len > max_len {
        return Err(format!("{s:?}: prefix length over {max_len}"));
    }
    Ok((addr, len))
}

/// Parses `"02:00:00:00:00:01"`.
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.trim().split(':').collect();
    if parts.len() != 6 {
        return Err(format!("{s:?} is not a MAC address"));
    }
    let mut mac = [0u8; 6];
    for (b, p) in mac.iter_mut().zip(parts) {
        *b = u8::from_str_radix(p, 16).map_err(|_| format!("{s:?} is not a MAC address"))?;
    }
    Ok(mac)
}

/// Parses a hex string into bytes.
pub fn parse_hex(s: &str) -> Result<Vec<u8>, String> {
    if !s.len().is_multiple_of(2) {
        return Err("hex key has an odd number of digits".into());
    }
    (0..s.len())
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(s.get(i..i + 2).unwrap_or("x"), 16)
                .map_err(|_| "hex key has a non-hex digit".to_string())
        })
        .collect()
}

/// A string or a list of strings.
fn one_or_more<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged, expecting = "an interface name or a list of interface names")]
    enum OneOrMore {
        One(String),
        More(Vec<String>),
    }
    Ok(match OneOrMore::deserialize(d)? {
        OneOrMore::One(name) => vec![name],
        OneOrMore::More(names) => names,
    })
}

/// Most client-facing ports of one access switch.
pub const MAX_CLIENT_PORTS: usize = 64;

impl AccessSection {
    fn validate(&self, standalone: bool) -> Result<(), String> {
        if self.clients.is_empty() || self.clients.len() > MAX_CLIENT_PORTS {
            return Err(format!(
                "access.clients: list 1 to {MAX_CLIENT_PORTS} client-facing interfaces, not {}",
                self.clients.len()
            ));
        }
        for (i, name) in self.clients.iter().enumerate() {
            if self.clients[..i].contains(name) || *name == self.uplink {
                return Err(format!("access.clients: interface {name} is used twice"));
            }
        }
        if self.internal.is_ipv4() != self.edge_internal.is_ipv4() {
            return Err(
                "access: internal and edge_internal must be of one family (the outer header's)"
                    .into(),
            );
        }
        check_key(&self.key_hex, "access.key_hex")?;
        if self.gateway_v4.is_none() && self.gateway_v6.is_empty() {
            return Err("access: a gateway address (gateway_v4 or gateway_v6) is needed".into());
        }
        match (&self.edge_mac, standalone) {
            (Some(mac), _) => {
                parse_mac(mac).map_err(|e| format!("access.edge_mac: {e}"))?;
            }
            (None, true) => {
                return Err("access.edge_mac is needed when the edge runs elsewhere".into())
            }
            (None, false) => {}
        }
        Ok(())
    }
}

impl EdgeSection {
    fn validate(&self, standalone: bool) -> Result<(), String> {
        match (&self.outside_next_hop_mac, self.outside_next_hop) {
            (Some(mac), _) => {
                parse_mac(mac).map_err(|e| format!("edge.outside_next_hop_mac: {e}"))?;
            }
            (None, Some(IpAddr::V4(_))) if self.outside_v4.is_none() => {
                return Err("edge: resolving an IPv4 outside_next_hop needs outside_v4 (the address ARP is sent from)".into())
            }
            (None, Some(IpAddr::V6(_))) if self.outside_v6.is_empty() => {
                return Err("edge: resolving an IPv6 outside_next_hop needs outside_v6 (the address solicitations are sent from)".into())
            }
            (None, Some(_)) => {}
            (None, None) => return Err("edge: set outside_next_hop (resolved) or outside_next_hop_mac".into()),
        }
        let (_, len): (std::net::Ipv6Addr, u8) =
            parse_prefix(&self.v6_prefix, 112).map_err(|e| format!("edge.v6_prefix: {e}"))?;
        if u32::from(len) + u32::from(self.alias_bits) > 112
            || self.alias_bits == 0
            || self.alias_bits > 24
        {
            return Err(
                "edge: v6_prefix length + alias_bits must be ≤ 112, alias_bits 1..=24".into(),
            );
        }
        for p in &self.v4_pools {
            parse_prefix::<std::net::Ipv4Addr>(p, 32).map_err(|e| format!("edge.v4_pools: {e}"))?;
        }
        for (i, peer) in self.access.iter().enumerate() {
            parse_mac(&peer.mac).map_err(|e| format!("edge.access[{i}].mac: {e}"))?;
            if peer.internal.is_ipv4() != self.internal.is_ipv4() {
                return Err(format!(
                    "edge.access[{i}].internal: not of the family of edge.internal"
                ));
            }
        }
        // The edge indexes its tunnels by SID with a u16 (pipeline/mimiq.rs); a single box adds
        // its own access switch to the list.
        if self.access.len() >= usize::from(u16::MAX) - 1 {
            return Err(format!(
                "edge.access: at most 65,533 access switches, not {}",
                self.access.len()
            ));
        }
        if standalone {
            if self.access.is_empty() {
                return Err("edge.access: list the access switches".into());
            }
            if self.allocator_rules.is_none() || self.switch_id.is_none() {
                return Err(
                    "edge: allocator_rules and switch_id are needed when the edge runs alone"
                        .into(),
                );
            }
            check_key(self.key_hex.as_deref().unwrap_or(""), "edge.key_hex")?;
        }
        Ok(())
    }
}

fn check_key(hex: &str, field: &str) -> Result<(), String> {
    let key = parse_hex(hex).map_err(|e| format!("{field}: {e}"))?;
    if key.len() < 32 {
        return Err(format!("{field}: the key must be at least 32 bytes"));
    }
    Ok(())
}

/// `mimiq-switch` configuration.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwitchConfig {
    /// The pipeline: `l2fwd`.
    pub role: Role,
    /// The interfaces, in pipeline order (`l2fwd`: exactly two; `single_box`: none here, they
    /// are named in `[single_box]`).
    #[serde(default)]
    pub interfaces: Vec<String>,
    /// The workers; queue `i` of every interface belongs to the worker with `queue = i`.
    /// Default: one unpinned worker on queue 0.
    #[serde(default = "default_workers")]
    pub workers: Vec<WorkerConfig>,
    /// `native` (default) or `skb`.
    #[serde(default)]
    pub xdp_mode: XdpMode,
    /// `auto` (default), `copy` or `zerocopy`.
    #[serde(default)]
    pub copy_mode: CopyMode,
    /// `adaptive` (default) or `busy`.
    #[serde(default)]
    pub idle: IdleStrategy,
    /// Entries per AF_XDP ring (RX, TX, fill, completion); a power of two (default 1024).
    #[serde(default = "default_ring_size")]
    pub ring_size: u32,
    /// UMEM frame size in bytes: 2048 or 4096 (default 4096).
    #[serde(default = "default_frame_size")]
    pub frame_size_bytes: u32,
    /// `auto` (default), `on` or `off`.
    #[serde(default)]
    pub huge_pages: HugePages,
    /// Preferred busy polling (SO_PREFER_BUSY_POLL) with this budget in packets; off when
    /// absent.
    #[serde(default)]
    pub busy_poll_budget: Option<u16>,
    /// Where the counters are written as JSON (default `/run/mimiq/switch-stats.json`).
    #[serde(default = "default_stats_path")]
    pub stats_path: PathBuf,
    /// How often the counters and histograms are published, in milliseconds (default 500).
    #[serde(default = "default_stats_interval_ms")]
    pub stats_interval_ms: u64,
    /// HdrHistogram interval log of per-worker burst processing time; none when absent.
    #[serde(default)]
    pub hlog_path: Option<PathBuf>,
    /// Address of the Prometheus text endpoint (`GET /metrics`); none when absent.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// What reaches the kernel instead of the switch; by default nothing does.
    #[serde(default)]
    pub kernel: KernelConfig,
    /// The access role's settings (`role = "access"` or `"single_box"`).
    #[serde(default)]
    pub access: Option<AccessSection>,
    /// The edge role's settings (`role = "edge"` or `"single_box"`).
    #[serde(default)]
    pub edge: Option<EdgeSection>,
    /// Impairments (delay, jitter, loss, rate) in front of an interface's TX ring, by
    /// interface name (`[impair.p1]`); none by default.
    #[serde(default)]
    pub impair: BTreeMap<String, ImpairConfig>,
}

/// Why a configuration was refused. Every message fits on one line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    /// The file is not valid TOML or does not match the schema.
    #[error("config {path}: line {line}, column {column}: {message}")]
    Parse {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    /// Parsed, but the values do not make sense together.
    #[error("config {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

impl SwitchConfig {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates config text; `path` is only for messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: SwitchConfig = toml::from_str(text).map_err(|e| {
            let (line, column) = e
                .span()
                .map(|span| line_column(text, span.start))
                .unwrap_or((0, 0));
            ConfigError::Parse {
                path: path.to_path_buf(),
                line,
                column,
                message: e.message().trim().replace('\n', " "),
            }
        })?;
        config.validate().map_err(|message| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        })?;
        Ok(config)
    }

    /// Checks the values against each other.
    pub fn validate(&self) -> Result<(), String> {
        let (access, edge) = (self.access.as_ref(), self.edge.as_ref());
        match self.role {
            Role::L2fwd if self.interfaces.len() != 2 => {
                return Err(format!(
                    "role l2fwd needs exactly 2 interfaces, {} given",
                    self.interfaces.len()
                ))
            }
            Role::L2fwd if access.is_some() || edge.is_some() => {
                return Err("[access] and [edge] are not for role l2fwd".into())
            }
            Role::L2fwd => {}
            mimiq => {
                if !self.interfaces.is_empty() {
                    return Err("the MIMIQ roles name their interfaces in [access] and [edge], not in `interfaces`".into());
                }
                match (mimiq, access, edge) {
                    (Role::Access, Some(a), None) => a.validate(true)?,
                    (Role::Edge, None, Some(e)) => e.validate(true)?,
                    (Role::SingleBox, Some(a), Some(e)) => {
                        a.validate(false)?;
                        e.validate(false)?;
                        if a.edge_internal != e.internal {
                            return Err(
                                "single_box: access.edge_internal must be edge.internal".into()
                            );
                        }
                    }
                    (Role::Access, _, _) => {
                        return Err("role access needs [access] (and no [edge])".into())
                    }
                    (Role::Edge, _, _) => {
                        return Err("role edge needs [edge] (and no [access])".into())
                    }
                    _ => return Err("role single_box needs both [access] and [edge]".into()),
                }
            }
        }
        for (i, name) in self.interfaces.iter().enumerate() {
            if name.is_empty() || name.len() > 15 || name.contains(['/', ' ', '\0']) {
                return Err(format!(
                    "interfaces[{i}] {name:?} is not a valid interface name (1 to 15 bytes)"
                ));
            }
            if self.interfaces[..i].contains(name) {
                return Err(format!("interface {name} is listed twice"));
            }
        }
        if self.workers.is_empty() {
            return Err("workers: at least one worker is needed".into());
        }
        for (i, w) in self.workers.iter().enumerate() {
            if self.workers[..i].iter().any(|o| o.queue == w.queue) {
                return Err(format!("workers[{i}]: queue {} has two workers", w.queue));
            }
        }
        if !self.ring_size.is_power_of_two() || !(64..=16384).contains(&self.ring_size) {
            return Err(format!(
                "ring_size {} must be a power of two between 64 and 16384",
                self.ring_size
            ));
        }
        if self.frame_size_bytes != 2048 && self.frame_size_bytes != 4096 {
            return Err(format!(
                "frame_size_bytes {} must be 2048 or 4096",
                self.frame_size_bytes
            ));
        }
        if self.busy_poll_budget == Some(0) {
            return Err(
                "busy_poll_budget must be at least 1 (leave it out to switch busy polling off)"
                    .into(),
            );
        }
        if self.kernel.addresses.len() > 64 {
            return Err(format!(
                "kernel.addresses lists {} addresses; the XDP program holds 64 per family",
                self.kernel.addresses.len()
            ));
        }
        let names = self.all_interfaces();
        for (interface, impair) in &self.impair {
            if !names.contains(interface) {
                return Err(format!(
                    "impair.{interface}: no such interface in `interfaces`"
                ));
            }
            impair
                .validate()
                .map_err(|e| format!("impair.{interface}: {e}"))?;
        }
        if self.stats_interval_ms == 0 {
            return Err("stats_interval_ms must be at least 1".into());
        }
        Ok(())
    }
}

impl SwitchConfig {
    /// Every interface the switch uses.
    pub fn all_interfaces(&self) -> Vec<String> {
        let mut names = self.interfaces.clone();
        if let Some(a) = &self.access {
            names.extend(a.clients.iter().cloned());
            names.push(a.uplink.clone());
        }
        if let Some(e) = &self.edge {
            names.extend([e.inside.clone(), e.outside.clone()]);
        }
        names
    }
}

/// One unpinned worker on queue 0.
pub fn default_workers() -> Vec<WorkerConfig> {
    vec![WorkerConfig {
        queue: 0,
        core: None,
    }]
}

fn default_ring_size() -> u32 {
    1024
}

fn default_frame_size() -> u32 {
    4096
}

/// The default place of the stats file.
pub fn default_stats_path() -> PathBuf {
    PathBuf::from("/run/mimiq/switch-stats.json")
}

fn default_stats_interval_ms() -> u64 {
    500
}

fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<SwitchConfig, String> {
        SwitchConfig::parse(text, Path::new("t.toml")).map_err(|e| e.to_string())
    }

    const ACCESS: &str = "[access]\nsid = 1\nclients = \"c\"\nuplink = \"u\"\ninternal = \"fd00::a\"\nedge_internal = \"fd00::e\"\nallocator_relay = \"127.0.0.1:1\"\nallocator_rules = \"127.0.0.1:2\"\nkey_hex = \"6d6d6d6d6d6d6d6d6d6d6d6d6d6d6d6d6d6d6d6d6d6d6d6d6d6d6d6d6d6d6d6d\"\n";
    const EDGE: &str = "[edge]\ninside = \"i\"\noutside = \"o\"\ninternal = \"fd00::e\"\noutside_next_hop = \"198.18.200.2\"\noutside_v4 = \"198.18.200.1\"\nv6_prefix = \"fd00:1::/64\"\n";

    #[test]
    fn a_complete_single_box_config_parses() {
        let c = parse(&format!("role = \"single_box\"\n{ACCESS}{EDGE}")).unwrap();
        assert_eq!(c.all_interfaces(), ["c", "u", "i", "o"]);
        assert_eq!(c.edge.unwrap().alias_bits, 16);
        let two = ACCESS.replace("clients = \"c\"", "clients = [\"c0\", \"c1\"]");
        let c = parse(&format!("role = \"single_box\"\n{two}{EDGE}")).unwrap();
        assert_eq!(c.all_interfaces(), ["c0", "c1", "u", "i", "o"]);
        // Every role runs a worker per queue.
        let workers = "workers = [{ queue = 0, core = 0 }, { queue = 1, core = 1 }]\n";
        for role in [
            format!("role = \"single_box\"\n{workers}{ACCESS}{EDGE}"),
            format!("role = \"access\"\n{workers}{ACCESS}edge_mac = \"02:00:00:00:00:01\"\n"),
        ] {
            let c = parse(&role).unwrap();
            assert_eq!(
                c.workers.iter().map(|w| w.queue).collect::<Vec<_>>(),
                [0, 1]
            );
        }
    }

    const MINIMAL: &str = "role = \"l2fwd\"\ninterfaces = [\"p0\", \"p1\"]\n";

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.interfaces, ["p0", "p1"]);
        assert_eq!(
            c.workers,
            [WorkerConfig {
                queue: 0,
                core: None
            }]
        );
        assert_eq!(c.huge_pages, HugePages::Auto);
        assert_eq!(
            (c.busy_poll_budget, c.hlog_path.as_ref(), c.metrics_listen),
            (None, None, None)
        );
        assert_eq!(c.xdp_mode, XdpMode::Native);
        assert_eq!(c.copy_mode, CopyMode::Auto);
        assert_eq!(c.idle, IdleStrategy::Adaptive);
        assert_eq!(
            (c.ring_size, c.frame_size_bytes, c.stats_interval_ms),
            (1024, 4096, 500)
        );
    }

    #[test]
    fn bad_configs_get_one_line_errors_that_say_where() {
        let cases = [
            (
                "role = \"l2fwd\"\ninterfaces = [\"p0\"]\n",
                "exactly 2 interfaces",
            ),
            (&format!("{MINIMAL}colour = 1\n"), "line 3"),
            (&format!("{MINIMAL}ring_size = 1000\n"), "power of two"),
            (
                &format!("{MINIMAL}frame_size_bytes = 1500\n"),
                "2048 or 4096",
            ),
            (&format!("{MINIMAL}busy_poll_budget = 0\n"), "at least 1"),
            (&format!("{MINIMAL}busy_poll_budget = 70000\n"), "line 3"),
            (
                &format!("{MINIMAL}metrics_listen = \"nonsense\"\n"),
                "line 3",
            ),
            (&format!("{MINIMAL}workers = []\n"), "at least one worker"),
            (
                &format!("{MINIMAL}[kernel]\naddresses = [\"198.18.0.300\"]\n"),
                "line 4",
            ),
            (
                &format!("{MINIMAL}[kernel]\nmdns = true\n"),
                "unknown field `mdns`",
            ),
            (
                &format!("{MINIMAL}[impair.p9]\ndelay_us = 5\n"),
                "impair.p9: no such interface",
            ),
            ("role = \"access\"\n", "role access needs [access]"),
            ("role = \"single_box\"\n", "needs both [access] and [edge]"),
            (
                &format!("role = \"access\"\n{ACCESS}"),
                "access.edge_mac is needed",
            ),
            (
                &format!("role = \"access\"\n{ACCESS}edge_mac = \"zz\"\n"),
                "access.edge_mac",
            ),
            (
                &format!("role = \"access\"\n{}", ACCESS.replace("6d6d", "6d")),
                "at least 32 bytes",
            ),
            (
                &format!("role = \"edge\"\n{EDGE}"),
                "edge.access: list the access switches",
            ),
            (
                &format!(
                    "role = \"single_box\"\n{ACCESS}{}",
                    EDGE.replace("outside_next_hop = \"198.18.200.2\"\n", "")
                ),
                "outside_next_hop",
            ),
            (
                &format!(
                    "role = \"single_box\"\n{ACCESS}{}",
                    EDGE.replace("fd00:1::/64", "fd00:1::/100")
                ),
                "alias_bits must be",
            ),
            (
                &format!(
                    "role = \"single_box\"\n{ACCESS}{}",
                    EDGE.replace("\"198.18.200.2\"", "\"fd00:200::2\"")
                ),
                "needs outside_v6",
            ),
            (
                &format!("role = \"single_box\"\ninterfaces = [\"x\"]\n{ACCESS}{EDGE}"),
                "not in `interfaces`",
            ),
            (
                &format!(
                    "role = \"single_box\"\n{}{EDGE}",
                    ACCESS.replace("internal = \"fd00::a\"", "internal = \"198.18.250.2\"")
                ),
                "one family",
            ),
            (
                &format!("{MINIMAL}[impair.p1]\nloss = 2.0\n"),
                "impair.p1: loss 2 must be between",
            ),
            (
                &format!("{MINIMAL}[impair.p1]\ndelay = 5\n"),
                "unknown field `delay`",
            ),
            (
                &format!("{MINIMAL}workers = [{{ queue = 1 }}, {{ queue = 1, core = 0 }}]\n"),
                "two workers",
            ),
            (
                &format!("{MINIMAL}workers = [{{ queue = 1, cpu = 0 }}]\n"),
                "unknown field `cpu`",
            ),
            (
                &format!(
                    "role = \"single_box\"\n{}{EDGE}",
                    ACCESS.replace("clients = \"c\"", "clients = [\"c\", \"u\"]")
                ),
                "interface u is used twice",
            ),
            (
                &format!(
                    "role = \"single_box\"\n{}{EDGE}",
                    ACCESS.replace("clients = \"c\"", "clients = []")
                ),
                "list 1 to 64 client-facing interfaces, not 0",
            ),
            (
                &format!(
                    "role = \"single_box\"\n{}{EDGE}",
                    ACCESS.replace("clients = \"c\"", "clients = 3")
                ),
                "an interface name or a list of interface names",
            ),
            ("role = \"router\"\ninterfaces = []\n", "line 1"),
            ("role = \n", "line 1"),
            (
                "role = \"l2fwd\"\ninterfaces = [\"p0\", \"p0\"]\n",
                "listed twice",
            ),
            (
                "role = \"l2fwd\"\ninterfaces = [\"p0\", \"waytoolonginterfacename\"]\n",
                "not a valid interface name",
            ),
        ];
        for (text, want) in cases {
            let err = parse(text).expect_err(text);
            assert!(
                err.contains(want),
                "{text:?}: {err:?} should mention {want:?}"
            );
            assert!(!err.contains('\n'), "one line: {err:?}");
        }
    }

    #[test]
    fn every_shipped_config_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            if name.starts_with("switch") && name.ends_with(".toml") {
                SwitchConfig::load(&path).unwrap_or_else(|e| panic!("{e}"));
                seen += 1;
            }
        }
        assert!(seen >= 1, "configs/ has at least one switch config");
    }
}
