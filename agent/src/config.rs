//! The agent's config file (TOML): the hop strategy, the address-set settings and the seed.
//!
//! ```toml
//! seed = 42            # optional; fixes every hop decision (experiments only: predictable).
//!                      # Absent: a 256-bit key from the OS.
//!
//! [hop]
//! kind = "every_packets"
//! packets = 25
//!
//! [addresses]          # optional; every field has a default (see AddressSetConfig)
//! expiry_margin_ms = 2000
//! refill_lead_ms = 10000
//! ```
//!
//! Unknown fields are refused, and every error is one line, naming the line of the file where
//! the parser knows it. `agent.example.toml` documents every field and is parsed by the tests.

use serde::Deserialize;

use crate::addrset::{AddressSetConfig, AddressSetConfigError};
use crate::strategy::{HopStrategyConfig, StrategyConfigError};
use crate::tunnel::{AddressSource, TunnelConfig};

/// The whole agent config.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Seed for every random hop decision; `None` means the binary draws one from the OS.
    #[serde(default)]
    pub seed: Option<u64>,
    /// When connections hop.
    pub hop: HopStrategyConfig,
    /// Address-set bookkeeping; defaults when absent.
    #[serde(default)]
    pub addresses: AddressSetConfig,
    /// Tunnel mode: the MASQUE proxy and the TUN device (required by `mimiq-agent run`).
    #[serde(default)]
    pub tunnel: Option<TunnelConfig>,
    /// Where the addresses come from (required by `mimiq-agent run`).
    #[serde(default)]
    pub source: Option<AddressSource>,
}

/// Why a config file was refused. The message is one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The file is not valid TOML, or a field is unknown, missing or of the wrong type.
    #[error("config{}: {message}", line.map(|l| format!(" line {l}")).unwrap_or_default())]
    Parse {
        /// 1-based line of the error, when the parser knows it (it does not for values inside
        /// the tagged `[hop]` table, which serde buffers before choosing the variant).
        line: Option<usize>,
        /// The parser's message, on one line.
        message: String,
    },
    /// The hop strategy is impossible.
    #[error("config: {0}")]
    Strategy(#[from] StrategyConfigError),
    /// The address-set settings are impossible.
    #[error("config: {0}")]
    Addresses(#[from] AddressSetConfigError),
}

impl AgentConfig {
    /// Parses and validates a config file's text.
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1);
            let message = e.message().trim().replace('\n', " ");
            ConfigError::Parse { line, message }
        })?;
        config.hop.validate()?;
        config.addresses.validate()?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(text: &str) -> String {
        let message = AgentConfig::from_toml_str(text).unwrap_err().to_string();
        assert!(!message.contains('\n'), "multi-line error: {message}");
        message
    }

    #[test]
    fn the_example_config_parses_with_its_stated_defaults() {
        let config = AgentConfig::from_toml_str(include_str!("../agent.example.toml")).unwrap();
        assert_eq!(config.seed, None);
        assert_eq!(
            config.hop,
            HopStrategyConfig::RandomPackets {
                min_packets: 25,
                max_packets: 100
            }
        );
        assert_eq!(config.addresses, AddressSetConfig::default());
    }

    #[test]
    fn parses_every_strategy_kind() {
        let cases = [
            ("kind = \"never\"", HopStrategyConfig::Never {}),
            (
                "kind = \"every_packets\"\npackets = 25",
                HopStrategyConfig::EveryPackets { packets: 25 },
            ),
            (
                "kind = \"random_packets\"\nmin_packets = 10\nmax_packets = 40",
                HopStrategyConfig::RandomPackets {
                    min_packets: 10,
                    max_packets: 40,
                },
            ),
            (
                "kind = \"random_time\"\nmin_ms = 100\nmax_ms = 500",
                HopStrategyConfig::RandomTime {
                    min_ms: 100,
                    max_ms: 500,
                },
            ),
            (
                "kind = \"once_after\"\npackets = 30",
                HopStrategyConfig::OnceAfter { packets: 30 },
            ),
            (
                "kind = \"per_connection\"",
                HopStrategyConfig::PerConnection {},
            ),
        ];
        for (hop, expected) in cases {
            let config = AgentConfig::from_toml_str(&format!("seed = 7\n[hop]\n{hop}\n")).unwrap();
            assert_eq!(config.hop, expected);
            assert_eq!(config.seed, Some(7));
            assert_eq!(config.addresses, AddressSetConfig::default());
        }
    }

    #[test]
    fn parses_address_settings_and_keeps_defaults_for_the_rest() {
        let config = AgentConfig::from_toml_str(
            "[hop]\nkind = \"never\"\n[addresses]\nrefill_lead_ms = 3000\nset_size = 4\n",
        )
        .unwrap();
        assert_eq!(config.seed, None);
        assert_eq!(config.addresses.refill_lead_ms, 3_000);
        assert_eq!(config.addresses.set_size, 4);
        assert_eq!(config.addresses.expiry_margin_ms, 2_000);
    }

    #[test]
    fn refuses_impossible_strategy_values_in_one_line() {
        assert_eq!(
            error("[hop]\nkind = \"random_packets\"\nmin_packets = 9\nmax_packets = 3\n"),
            "config: hop strategy random_packets: min_packets (9) is greater than max_packets (3)"
        );
        assert_eq!(
            error("[hop]\nkind = \"every_packets\"\npackets = 0\n"),
            "config: hop strategy every_packets: packets must be at least 1, got 0"
        );
        assert_eq!(
            error("[hop]\nkind = \"random_time\"\nmin_ms = 0\nmax_ms = 10\n"),
            "config: hop strategy random_time: min_ms must be at least 1, got 0"
        );
    }

    #[test]
    fn refuses_impossible_address_settings_in_one_line() {
        assert_eq!(
            error("[hop]\nkind = \"never\"\n[addresses]\nmin_usable = 1\n"),
            "config: addresses: min_usable must be at least 2 (the current address and one to \
             hop to), got 1"
        );
        assert_eq!(
            error("[hop]\nkind = \"never\"\n[addresses]\nset_size = 0\n"),
            "config: addresses: set_size must be between 1 and 1024, got 0"
        );
        assert_eq!(
            error("[hop]\nkind = \"never\"\n[addresses]\nrefill_retry_ms = 0\n"),
            "config: addresses: refill_retry_ms must be at least 1, got 0"
        );
    }

    #[test]
    fn refuses_unknown_fields_and_kinds_with_the_line() {
        let unknown = error("[hop]\nkind = \"every_packets\"\npackets = 5\npackts = 6\n");
        assert!(unknown.starts_with("config line "), "{unknown}");
        assert!(unknown.contains("packts"), "{unknown}");
        let kind = error("[hop]\nkind = \"sometimes\"\n");
        assert!(kind.starts_with("config line "), "{kind}");
        assert!(kind.contains("sometimes"), "{kind}");
        let addresses = error("[hop]\nkind = \"never\"\n[addresses]\nmargin_ms = 5\n");
        assert!(addresses.starts_with("config line 4:"), "{addresses}");
        let top = error("colour = 1\n[hop]\nkind = \"never\"\n");
        assert!(top.starts_with("config line 1:"), "{top}");
        let extra = error("[hop]\nkind = \"never\"\npackets = 5\n");
        assert!(extra.contains("packets"), "{extra}");
        let extra = error("[hop]\nkind = \"per_connection\"\nmin_ms = 5\n");
        assert!(extra.contains("min_ms"), "{extra}");
        let missing = error("seed = 1\n");
        assert!(missing.contains("hop"), "{missing}");
        let negative = error("[hop]\nkind = \"every_packets\"\npackets = -3\n");
        assert!(negative.starts_with("config"), "{negative}");
        assert!(negative.contains("-3"), "{negative}");
        let wrong_type = error("seed = \"x\"\n[hop]\nkind = \"never\"\n");
        assert!(wrong_type.starts_with("config line 1:"), "{wrong_type}");
    }

    #[test]
    fn check_refuses_a_tun_name_the_kernel_would_refuse() {
        let text = include_str!("../../configs/agent.toml");
        for bad in ["mimiq-tunnel-0123", "", "a b", "tun:0"] {
            let changed = text.replacen("tun = \"mqagent0\"", &format!("tun = {bad:?}"), 1);
            assert_ne!(changed, text, "the shipped config names its TUN device");
            let config = AgentConfig::from_toml_str(&changed).unwrap();
            let e = crate::tunnel::check(&config).unwrap_err().to_string();
            assert!(
                e.contains("tunnel.tun") && e.contains("1 to 15 bytes"),
                "{bad:?}: {e}"
            );
        }
    }

    #[test]
    fn the_shipped_tunnel_config_parses_and_checks() {
        let text = include_str!("../../configs/agent.toml");
        let config = AgentConfig::from_toml_str(text).unwrap();
        crate::tunnel::check(&config).unwrap();
        // The allocator source, as commented out in the file.
        let start = text.find("[source]\nkind = \"static\"").unwrap();
        let end = text.find("# ...or the allocator").unwrap();
        let commented = &text[end..];
        let uncommented: String = commented
            .lines()
            .filter(|l| l.starts_with("# [") || l.starts_with("# kind") || l.contains(" = "))
            .map(|l| l.trim_start_matches("# ").to_string() + "\n")
            .collect();
        let alloc = format!("{}{}", &text[..start], uncommented);
        let config = AgentConfig::from_toml_str(&alloc).unwrap();
        crate::tunnel::check(&config).unwrap();
        assert!(matches!(
            config.source,
            Some(crate::tunnel::AddressSource::Allocator { .. })
        ));
    }
}
