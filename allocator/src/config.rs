//! The `mimiq-allocator` configuration file (TOML). Unknown fields are errors, every duration is
//! in milliseconds (`_ms`), and [`Config::validate`] refuses impossible settings with a message
//! naming the broken bound. `allocator/allocator.example.toml` documents every field.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::lease;
use crate::pool::{Ipv4Prefix, Ipv6Prefix};
use crate::store::decode_hex;

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Sockets, store and protocol limits.
    pub server: ServerSection,
    /// Lease policy.
    pub lease: LeaseSection,
    /// IPv4 pool (optional).
    pub ipv4: Option<Ipv4Section>,
    /// IPv6 pool (optional).
    pub ipv6: Option<Ipv6Section>,
    /// The switches that may talk to the allocator, with their keys.
    #[serde(rename = "switch", default)]
    pub switches: Vec<SwitchSection>,
    /// The etcd cluster of `server.store = "etcd"`.
    pub etcd: Option<EtcdSection>,
}

/// `[etcd]`: the cluster that holds the leases and epochs when `server.store = "etcd"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdSection {
    /// Client URLs of the members (`["http://198.19.1.1:2379", ...]`).
    pub endpoints: Vec<String>,
    /// Every key of this allocator's state starts with it; it ends with `/`. Default `/mimiq/`.
    #[serde(default = "default_etcd_prefix")]
    pub prefix: String,
    /// User, when the cluster has authentication on (with `password`).
    #[serde(default)]
    pub user: Option<String>,
    /// See `user`.
    #[serde(default)]
    pub password: Option<String>,
    /// How long to keep trying to reach the cluster, and to take the prefix over from an
    /// allocator that died, at start. Default 15000 ms.
    #[serde(default = "default_etcd_connect_timeout")]
    pub connect_timeout_ms: u64,
    /// How long one request may take. Default 2000 ms.
    #[serde(default = "default_etcd_request_timeout")]
    pub request_timeout_ms: u64,
}

/// `[server]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    /// UDP address for relayed requests from access switches. Default `0.0.0.0:6364`.
    #[serde(default = "default_relay")]
    pub relay_listen: SocketAddr,
    /// TCP address of the rule stream. Default `0.0.0.0:6365`.
    #[serde(default = "default_publish")]
    pub publish_listen: SocketAddr,
    /// HTTP address for `/metrics` (Prometheus text), `/healthz` and `/leases`. Default
    /// `127.0.0.1:9364`.
    #[serde(default = "default_metrics")]
    pub metrics_listen: SocketAddr,
    /// An HdrHistogram interval log (ns): tag `request` (a datagram received to its reply sent,
    /// durable in between) and tag `commit` (one group commit), an interval a second and one at
    /// once on SIGUSR1. None by default.
    #[serde(default)]
    pub hlog_file: Option<std::path::PathBuf>,
    /// Lease database path (redb file), `"etcd"` for the cluster of `[etcd]` (a build with the
    /// `etcd` feature), or `"memory"` for a non-durable store (tests only). Default
    /// `/var/lib/mimiq/allocator.redb`.
    #[serde(default = "default_store")]
    pub store: PathBuf,
    /// Lease changes the store's journal collects before folding them into its lease table in
    /// one commit (bigger: cheaper on average, longer single commits). Default 65536.
    #[serde(default = "default_fold_ops")]
    pub store_fold_ops: u64,
    /// Relayed messages whose timestamp is further than this from the allocator's clock are
    /// dropped, and replays are remembered this long. Default 30000 ms.
    #[serde(default = "default_replay_window")]
    pub replay_window_ms: u64,
    /// Most datagrams handled (and committed together) per batch. Default 1024.
    #[serde(default = "default_batch")]
    pub batch_max: usize,
    /// Update batches queued per rule-stream subscriber before it is disconnected as too slow
    /// (it reconnects and gets a snapshot). Default 4096.
    #[serde(default = "default_queue")]
    pub subscriber_queue: usize,
}

/// `[lease]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseSection {
    /// Shortest lifetime t_ip, ms.
    pub t_ip_min_ms: u64,
    /// Longest lifetime t_ip, ms.
    pub t_ip_max_ms: u64,
    /// Rules kept after a lease ends, t_remove, ms.
    pub t_remove_ms: u64,
    /// Most addresses per request (1..=255). Default 8.
    #[serde(default = "default_per_request")]
    pub max_per_request: u32,
    /// Most assigned addresses per client MAC. Default 64.
    #[serde(default = "default_live")]
    pub max_live_per_client: u32,
    /// Sustained requests per second per client. Default 10.
    #[serde(default = "default_rate")]
    pub rate_per_s: u32,
    /// Burst of requests per client above the rate. Default 20.
    #[serde(default = "default_burst")]
    pub rate_burst: u32,
    /// Most assigned addresses the clients behind one port of one access switch hold
    /// together (port security). Default 256.
    #[serde(default = "default_live_per_port")]
    pub max_live_per_port: u32,
    /// MACs new to a port that the port may bring per second, sustained. Default 20.
    #[serde(default = "default_new_macs_rate")]
    pub new_macs_per_port_per_s: u32,
    /// New MACs a port may bring at once above that rate. Default 64.
    #[serde(default = "default_new_macs_burst")]
    pub new_macs_per_port_burst: u32,
    /// A lease whose client has sent nothing through its access switch this long after the
    /// grant ends early; 0: never. Default 60,000.
    #[serde(default = "default_reclaim_silent")]
    pub reclaim_silent_after_ms: u64,
}

/// `[ipv4]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ipv4Section {
    /// Pool prefixes, e.g. `["10.0.0.0/8"]`.
    pub prefixes: Vec<String>,
    /// Addresses never handed out. Default none.
    #[serde(default)]
    pub reserved: Vec<Ipv4Addr>,
    /// The virtual gateway told to clients.
    pub gateway: Ipv4Addr,
    /// Prefix length clients configure with each address. Default 32.
    #[serde(default = "default_v4_len")]
    pub client_prefix_len: u8,
}

/// `[ipv6]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ipv6Section {
    /// Pool prefix P, e.g. `"2001:db8:1:2::/64"`.
    pub prefix: String,
    /// Alias bits a after the prefix. Default 16.
    #[serde(default = "default_alias_bits")]
    pub alias_bits: u8,
    /// Aliases per SID per epoch, n. Default 4.
    #[serde(default = "default_n")]
    pub aliases_per_sid: u32,
    /// Epochs an alias routes for, k. Default 4.
    #[serde(default = "default_k")]
    pub k: u32,
    /// Alias epoch period t_sid, ms.
    pub t_sid_ms: u64,
    /// The virtual gateway told to clients (typically link-local).
    pub gateway: std::net::Ipv6Addr,
    /// Prefix length clients configure with each address. Default 128.
    #[serde(default = "default_v6_len")]
    pub client_prefix_len: u8,
}

/// A switch role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Client-facing: relays requests; its ID is its SID.
    Access,
    /// Edge: only subscribes to the rule stream.
    Edge,
}

/// `[[switch]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwitchSection {
    /// Switch ID (an access switch's SID), 0..=65534.
    pub id: u16,
    /// `"access"` or `"edge"`.
    pub role: Role,
    /// Shared HMAC key, hex (at least 32 bytes = 64 hex digits). Exactly one of key_hex/key_file.
    pub key_hex: Option<String>,
    /// File holding the hex key (so the config can be world-readable).
    pub key_file: Option<PathBuf>,
}

/// Why the configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// Path.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// TOML or schema error (unknown field, wrong type, missing field).
    #[error("{path}: {message}")]
    Parse {
        /// Path.
        path: String,
        /// What toml/serde said (names the field and line).
        message: String,
    },
    /// A semantic error.
    #[error("{0}")]
    Invalid(String),
}

/// A gateway address and the prefix length clients configure with their addresses.
pub type Gateway = (IpAddr, u8);

/// A switch with its decoded key.
#[derive(Debug, Clone)]
pub struct SwitchKey {
    /// Switch ID.
    pub id: u16,
    /// Role.
    pub role: Role,
    /// Key bytes.
    pub secret: Vec<u8>,
}

impl Config {
    /// Reads and validates a file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: shown.clone(),
            source,
        })?;
        let cfg = Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: shown.clone(),
                message,
            },
            e => e,
        })?;
        Ok(cfg)
    }

    /// Parses and validates TOML text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: "<config>".into(),
            message: one_line(&e),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks everything that the types do not, including building the core (pool and alias
    /// bounds), so an impossible configuration is refused at start.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let inv = |s: String| Err(ConfigError::Invalid(s));
        if self.server.batch_max == 0 {
            return inv("server.batch_max must be at least 1".into());
        }
        match (&self.etcd, self.store_is_etcd()) {
            (None, true) => return inv("server.store = \"etcd\" needs an [etcd] section".into()),
            (Some(_), false) => {
                return inv("[etcd] is given but server.store is not \"etcd\"".into())
            }
            (Some(e), true) => {
                if e.endpoints.is_empty() {
                    return inv("etcd.endpoints is empty".into());
                }
                if e.prefix.is_empty() || !e.prefix.ends_with('/') {
                    return inv(format!("etcd.prefix {:?} must end with '/'", e.prefix));
                }
                if e.user.is_some() != e.password.is_some() {
                    return inv("etcd.user and etcd.password go together".into());
                }
                if e.connect_timeout_ms == 0 || e.request_timeout_ms == 0 {
                    return inv(
                        "etcd.connect_timeout_ms and request_timeout_ms must be above 0".into(),
                    );
                }
            }
            (None, false) => {}
        }
        if self.server.subscriber_queue == 0 {
            return inv("server.subscriber_queue must be at least 1".into());
        }
        if self.server.store_fold_ops == 0 {
            return inv("server.store_fold_ops must be at least 1".into());
        }
        if self.server.replay_window_ms == 0 {
            return inv("server.replay_window_ms must be at least 1".into());
        }
        if self.lease.max_per_request > 255 {
            return inv(format!(
                "lease.max_per_request = {}: at most 255 addresses fit in one reply",
                self.lease.max_per_request
            ));
        }
        if let Some(v4) = &self.ipv4 {
            if v4.client_prefix_len > 32 {
                return inv("ipv4.client_prefix_len must be 0..=32".into());
            }
        }
        if let Some(v6) = &self.ipv6 {
            if v6.client_prefix_len > 128 {
                return inv("ipv6.client_prefix_len must be 0..=128".into());
            }
        }
        let mut ids = std::collections::HashSet::new();
        for s in &self.switches {
            if s.id == u16::MAX {
                return inv("switch id 65535 is reserved".into());
            }
            if !ids.insert(s.id) {
                return inv(format!("switch id {} is configured twice", s.id));
            }
        }
        self.switch_keys()?;
        lease::Allocator::new(self.core()?).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        Ok(())
    }

    /// The core's configuration.
    pub fn core(&self) -> Result<lease::Config, ConfigError> {
        let ipv4 = match &self.ipv4 {
            Some(v4) => {
                let prefixes = v4
                    .prefixes
                    .iter()
                    .map(|p| {
                        p.parse::<Ipv4Prefix>()
                            .map_err(|e| ConfigError::Invalid(format!("ipv4.prefixes: {e}")))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Some(lease::V4Config {
                    prefixes,
                    reserved: v4.reserved.clone(),
                })
            }
            None => None,
        };
        let ipv6 = match &self.ipv6 {
            Some(v6) => Some(lease::V6Config {
                prefix: v6
                    .prefix
                    .parse::<Ipv6Prefix>()
                    .map_err(|e| ConfigError::Invalid(format!("ipv6.prefix: {e}")))?,
                alias_bits: v6.alias_bits,
                aliases_per_sid: v6.aliases_per_sid,
                k: v6.k,
                t_sid_ms: v6.t_sid_ms,
            }),
            None => None,
        };
        Ok(lease::Config {
            t_ip_min_ms: self.lease.t_ip_min_ms,
            t_ip_max_ms: self.lease.t_ip_max_ms,
            t_remove_ms: self.lease.t_remove_ms,
            max_per_request: self.lease.max_per_request,
            max_live_per_client: self.lease.max_live_per_client,
            rate_per_s: self.lease.rate_per_s,
            rate_burst: self.lease.rate_burst,
            max_live_per_port: self.lease.max_live_per_port,
            new_macs_per_port_per_s: self.lease.new_macs_per_port_per_s,
            new_macs_per_port_burst: self.lease.new_macs_per_port_burst,
            reclaim_silent_after_ms: self.lease.reclaim_silent_after_ms,
            sids: self
                .switches
                .iter()
                .filter(|s| s.role == Role::Access)
                .map(|s| s.id)
                .collect(),
            ipv4,
            ipv6,
        })
    }

    /// The switches' keys, decoded.
    pub fn switch_keys(&self) -> Result<Vec<SwitchKey>, ConfigError> {
        let mut out = Vec::new();
        for s in &self.switches {
            let hex = match (&s.key_hex, &s.key_file) {
                (Some(h), None) => h.clone(),
                (None, Some(f)) => std::fs::read_to_string(f).map_err(|e| {
                    ConfigError::Invalid(format!(
                        "switch {}: cannot read key_file {}: {e}",
                        s.id,
                        f.display()
                    ))
                })?,
                _ => {
                    return Err(ConfigError::Invalid(format!(
                        "switch {}: set exactly one of key_hex and key_file",
                        s.id
                    )))
                }
            };
            let secret = decode_hex(hex.trim()).ok_or_else(|| {
                ConfigError::Invalid(format!("switch {}: the key is not hex", s.id))
            })?;
            if secret.len() < 32 {
                return Err(ConfigError::Invalid(format!(
                    "switch {}: the key has {} bytes; HMAC-SHA256 keys need at least 32",
                    s.id,
                    secret.len()
                )));
            }
            out.push(SwitchKey {
                id: s.id,
                role: s.role,
                secret,
            });
        }
        Ok(out)
    }

    /// Whether the store is the in-memory one.
    pub fn store_is_memory(&self) -> bool {
        self.server.store.as_os_str() == "memory"
    }

    /// Whether the store is the etcd cluster of `[etcd]`.
    pub fn store_is_etcd(&self) -> bool {
        self.server.store.as_os_str() == "etcd"
    }

    /// Gateway and client prefix length per family (IPv4, IPv6), as told to clients.
    pub fn gateways(&self) -> (Option<Gateway>, Option<Gateway>) {
        (
            self.ipv4
                .as_ref()
                .map(|v| (IpAddr::V4(v.gateway), v.client_prefix_len)),
            self.ipv6
                .as_ref()
                .map(|v| (IpAddr::V6(v.gateway), v.client_prefix_len)),
        )
    }
}

fn default_relay() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 6364))
}
fn default_publish() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 6365))
}
fn default_metrics() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9364))
}
fn default_store() -> PathBuf {
    PathBuf::from("/var/lib/mimiq/allocator.redb")
}
fn default_etcd_prefix() -> String {
    "/mimiq/".into()
}
fn default_etcd_connect_timeout() -> u64 {
    15_000
}
fn default_etcd_request_timeout() -> u64 {
    2_000
}
fn default_fold_ops() -> u64 {
    crate::store::DEFAULT_FOLD_OPS
}
fn default_replay_window() -> u64 {
    30_000
}
fn default_batch() -> usize {
    1024
}
fn default_queue() -> usize {
    4096
}
fn default_per_request() -> u32 {
    8
}
fn default_live() -> u32 {
    64
}
fn default_rate() -> u32 {
    10
}
fn default_burst() -> u32 {
    20
}
fn default_live_per_port() -> u32 {
    256
}
fn default_new_macs_rate() -> u32 {
    20
}
fn default_new_macs_burst() -> u32 {
    64
}
fn default_reclaim_silent() -> u64 {
    60_000
}
fn default_v4_len() -> u8 {
    32
}
fn default_v6_len() -> u8 {
    128
}
fn default_alias_bits() -> u8 {
    16
}
fn default_n() -> u32 {
    4
}
fn default_k() -> u32 {
    4
}

/// A TOML error on one line, as every message of this crate's binaries is: where
/// (`line L, column C`) and what, without the snippet `toml` draws under it.
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

    const KEY: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

    fn base() -> String {
        format!(
            r#"
[server]
store = "memory"
[lease]
t_ip_min_ms = 60000
t_ip_max_ms = 120000
t_remove_ms = 5000
[ipv4]
prefixes = ["10.0.0.0/16"]
gateway = "10.0.0.1"
reserved = ["10.0.0.1"]
[[switch]]
id = 1
role = "access"
key_hex = "{KEY}"
"#
        )
    }

    #[test]
    fn a_toml_error_is_one_line_with_its_line_and_column() {
        let e = Config::parse("[server]\nbatch_max = \"x\"\n").unwrap_err();
        assert_eq!(e.to_string().lines().count(), 1, "{e}");
        assert!(
            e.to_string()
                .contains("line 2, column 13: invalid type: string \"x\", expected usize"),
            "{e}"
        );
    }

    #[test]
    fn example_config_parses() {
        let text = include_str!("../allocator.example.toml");
        let cfg = Config::parse(text).unwrap();
        assert!(cfg.ipv4.is_some() && cfg.ipv6.is_some());
        assert_eq!(cfg.switch_keys().unwrap().len(), 2);
    }

    #[test]
    fn minimal_config_parses_with_defaults() {
        let cfg = Config::parse(&base()).unwrap();
        assert_eq!(cfg.server.relay_listen.port(), 6364);
        assert_eq!(cfg.lease.max_per_request, 8);
        assert!(cfg.store_is_memory());
        assert_eq!(cfg.core().unwrap().sids, vec![1]);
    }

    #[test]
    fn unknown_fields_are_refused_by_name() {
        let text = base().replace("[lease]", "[lease]\nt_ip_mni_ms = 5");
        let e = Config::parse(&text).unwrap_err().to_string();
        assert!(e.contains("t_ip_mni_ms"), "{e}");
    }

    #[test]
    fn semantic_errors_are_clear() {
        let e = Config::parse(&base().replace("10.0.0.0/16", "10.0.0.1/16"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("host bits"), "{e}");
        let e = Config::parse(&base().replace(KEY, "abcd"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("at least 32"), "{e}");
        let e = Config::parse(&base().replace(KEY, "zz"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not hex"), "{e}");
        let e = Config::parse(&base().replace("t_ip_min_ms = 60000", "t_ip_min_ms = 600000"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("t_ip"), "{e}");
        let v6 = "[ipv6]\nprefix = \"2001:db8::/64\"\nalias_bits = 4\naliases_per_sid = 8\nk = 4\nt_sid_ms = 100000\ngateway = \"fe80::1\"\n[[switch]]";
        let e = Config::parse(&base().replacen("[[switch]]", v6, 1))
            .unwrap_err()
            .to_string();
        assert!(e.contains("SIDs·n·k < 2^a"), "{e}");
    }

    #[test]
    fn the_etcd_store_wants_its_section_and_a_sound_one() {
        let etcd =
            |section: &str| base().replace("store = \"memory\"", "store = \"etcd\"") + section;
        let ok =
            Config::parse(&etcd("[etcd]\nendpoints = [\"http://198.19.1.1:2379\"]\n")).unwrap();
        assert!(ok.store_is_etcd());
        assert_eq!(ok.etcd.unwrap().prefix, "/mimiq/");
        for (text, says) in [
            (etcd(""), "needs an [etcd] section"),
            (etcd("[etcd]\nendpoints = []\n"), "etcd.endpoints is empty"),
            (
                etcd("[etcd]\nendpoints = [\"http://e:2379\"]\nprefix = \"/mimiq\"\n"),
                "must end with '/'",
            ),
            (
                etcd("[etcd]\nendpoints = [\"http://e:2379\"]\nuser = \"u\"\n"),
                "go together",
            ),
            (
                base() + "[etcd]\nendpoints = [\"http://e:2379\"]\n",
                "server.store is not \"etcd\"",
            ),
        ] {
            let e = Config::parse(&text).unwrap_err().to_string();
            assert!(e.contains(says), "{e}");
        }
    }
}
