//! `mimiq-proxy`: the MASQUE proxy (`run`, `check`, `stats`), its client (`client ip`, `client udp`), and
//! a self-signed certificate maker for test setups (`cert`). Errors are one line on stderr and
//! exit status 1.
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use mimalloc::MiMalloc;
use mimiq_masque::client::{run_reconnecting, Client, ClientConfig, Mode, Reconnect};
use mimiq_masque::quic::QuicSettings;
use mimiq_masque::server::config::parse_prefix;
use mimiq_masque::server::{self, ProxyConfig};
use mimiq_masque::template::{IpScope, UdpTarget, UriTemplate, IP_VARIABLES, UDP_VARIABLES};

#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

#[derive(Parser)]
#[command(
    name = "mimiq-proxy",
    version,
    about = "MASQUE CONNECT-IP / CONNECT-UDP proxy over HTTP/3"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

// Parsed once at start; the client's options make one variant large, which costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Cmd {
    /// Serve until SIGINT/SIGTERM.
    Run {
        /// Proxy config (TOML).
        #[arg(long)]
        config: PathBuf,
    },
    /// Check a config file and exit.
    Check {
        /// Proxy config (TOML).
        #[arg(long)]
        config: PathBuf,
    },
    /// Print a running proxy's counters, in all and per worker, from its stats file.
    Stats {
        /// Proxy config (TOML): its `stats_file` is read.
        #[arg(long)]
        config: PathBuf,
        /// Also the counters that are zero.
        #[arg(long)]
        all: bool,
    },
    /// Write a self-signed certificate and key (PEM) for test setups.
    Cert {
        /// Output directory (files proxy-cert.pem, proxy-key.pem).
        #[arg(long)]
        out: PathBuf,
        /// DNS names and IP addresses the certificate is valid for.
        #[arg(long, required = true)]
        name: Vec<String>,
    },
    /// Run a client.
    #[command(subcommand)]
    Client(ClientCmd),
}

#[derive(Subcommand)]
enum ClientCmd {
    /// CONNECT-IP into a TUN device.
    Ip {
        #[command(flatten)]
        common: Common,
        /// TUN device name.
        #[arg(long, default_value = "mqtun0")]
        tun: String,
        /// Request path scope, as in the template: `*/*`, `198.18.3.2/17`, `fd00::/64/*`.
        #[arg(long, default_value = "*/*")]
        scope: String,
        /// Route only these prefixes through the tunnel (repeatable; `none` for no routes)
        /// instead of the advertised ranges.
        #[arg(long)]
        route: Vec<String>,
    },
    /// CONNECT-UDP exposed on a local UDP port.
    Udp {
        #[command(flatten)]
        common: Common,
        /// Target host:port (IP literal or name; IPv6 in brackets).
        #[arg(long)]
        target: String,
        /// Local address applications send to.
        #[arg(long)]
        listen: SocketAddr,
    },
}

#[derive(Args)]
struct Common {
    /// The proxy's UDP address.
    #[arg(long)]
    proxy: SocketAddr,
    /// TLS server name and :authority.
    #[arg(long, default_value = "proxy")]
    server_name: String,
    /// Local addresses (comma-separated); more than one lets --hop-every-ms move between them.
    #[arg(long, value_delimiter = ',')]
    bind: Vec<IpAddr>,
    /// Bearer token.
    #[arg(long)]
    token: Option<String>,
    /// CA file to verify the proxy; without it the proxy is not verified.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Largest UDP payload sent (>= 1350).
    #[arg(long, default_value_t = 1452)]
    max_udp_payload: usize,
    /// Migrate the connection to the next --bind address (new port) this often.
    #[arg(long)]
    hop_every_ms: Option<u64>,
    /// Directory for a qlog file.
    #[arg(long)]
    qlog_dir: Option<PathBuf>,
    /// The proxy's URI template for the request path (RFC 9298 §3, RFC 9484 §3), e.g.
    /// "/masque/udp/{target_host}/{target_port}"; default: the protocol's well-known one.
    #[arg(long)]
    template: Option<String>,
    /// Give up when the tunnel is not up within this many seconds.
    #[arg(long, default_value_t = 10)]
    connect_timeout_s: u64,
    /// The connection's idle timeout, milliseconds: a proxy that is gone is noticed after it
    /// (a keep-alive goes every third of it; the proxy's own timeout may be shorter).
    #[arg(long, default_value_t = 30_000)]
    idle_timeout_ms: u64,
    /// When a tunnel that was up is lost: new connections tried, from the next --bind address,
    /// before giving up (0: exit at once). Each keeps the TUN device or local port and asks the
    /// proxy for the tunnel's addresses again (RFC 9484 §4.7.2).
    #[arg(long, default_value_t = Reconnect::default().attempts)]
    reconnect_attempts: u32,
}

impl Common {
    /// The client's settings, and how it reconnects; `variables` are the protocol's template
    /// variables.
    fn config(self, variables: [&'static str; 2]) -> Result<(ClientConfig, Reconnect), String> {
        let template = self
            .template
            .as_deref()
            .map(|t| UriTemplate::parse(t, variables))
            .transpose()
            .map_err(|e| format!("--template: {e}"))?;
        let bind = if self.bind.is_empty() {
            vec![if self.proxy.is_ipv4() {
                IpAddr::from([0, 0, 0, 0])
            } else {
                IpAddr::from([0u16; 8])
            }]
        } else {
            self.bind
        };
        let reconnect = Reconnect {
            attempts: self.reconnect_attempts,
            ..Reconnect::default()
        };
        let cfg = ClientConfig {
            proxy: self.proxy,
            server_name: self.server_name,
            bind,
            token: self.token,
            ca: self.ca,
            quic: QuicSettings {
                max_udp_payload_bytes: self.max_udp_payload,
                qlog_dir: self.qlog_dir,
                idle_timeout_ms: self.idle_timeout_ms,
                ..QuicSettings::default()
            },
            hop_every: self.hop_every_ms.map(Duration::from_millis),
            connect_timeout: Duration::from_secs(self.connect_timeout_s),
            template,
        };
        Ok((cfg, reconnect))
    }
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = real_main(Cli::parse()) {
        eprintln!("mimiq-proxy: error: {e}");
        std::process::exit(1);
    }
}

fn real_main(cli: Cli) -> Result<(), String> {
    match cli.cmd {
        Cmd::Run { config } => server::run_from_file(&config),
        Cmd::Check { config } => {
            ProxyConfig::load(&config)?;
            println!("{}: ok", config.display());
            Ok(())
        }
        Cmd::Stats { config, all } => {
            let cfg = ProxyConfig::load(&config)?;
            let path = cfg
                .stats_file
                .ok_or_else(|| format!("{}: no stats_file configured", config.display()))?;
            let text = std::fs::read_to_string(&path).map_err(|e| {
                format!(
                    "{}: cannot read: {e} (is the proxy running?)",
                    path.display()
                )
            })?;
            let stats: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| format!("{}: not a stats file: {e}", path.display()))?;
            print!("{}", server::stats_table(&stats, all));
            Ok(())
        }
        Cmd::Cert { out, name } => {
            let ck = rcgen::generate_simple_self_signed(name).map_err(|e| e.to_string())?;
            std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
            let cert = out.join("proxy-cert.pem");
            let key = out.join("proxy-key.pem");
            std::fs::write(&cert, ck.cert.pem()).map_err(|e| format!("{}: {e}", cert.display()))?;
            std::fs::write(&key, ck.signing_key.serialize_pem())
                .map_err(|e| format!("{}: {e}", key.display()))?;
            println!("wrote {} and {}", cert.display(), key.display());
            Ok(())
        }
        Cmd::Client(c) => {
            let (cfg, mode) = match c {
                ClientCmd::Ip {
                    common,
                    tun,
                    scope,
                    route,
                } => {
                    let routes = if route.is_empty() {
                        None
                    } else {
                        let mut v = Vec::new();
                        for r in route.iter().filter(|r| *r != "none") {
                            let v4 = !r.contains(':');
                            v.push(parse_prefix(r, v4).map_err(|e| format!("--route: {e}"))?);
                        }
                        Some(v)
                    };
                    let path = format!(
                        "{}{}/",
                        mimiq_masque::template::IP_PATH_PREFIX,
                        scope.trim_end_matches('/')
                    );
                    let scope = IpScope::parse_path(&path)
                        .map_err(|e| format!("--scope {scope:?}: {e}"))?;
                    (
                        common.config(IP_VARIABLES)?,
                        Mode::Ip { scope, tun, routes },
                    )
                }
                ClientCmd::Udp {
                    common,
                    target,
                    listen,
                } => {
                    let (host, port) = target
                        .rsplit_once(':')
                        .ok_or_else(|| format!("--target {target:?}: expected host:port"))?;
                    let host = host.trim_start_matches('[').trim_end_matches(']');
                    let path = format!(
                        "{}{}/{}/",
                        mimiq_masque::template::UDP_PATH_PREFIX,
                        host.replace(':', "%3A"),
                        port
                    );
                    let target =
                        UdpTarget::parse_path(&path).map_err(|e| format!("--target: {e}"))?;
                    (common.config(UDP_VARIABLES)?, Mode::Udp { target, listen })
                }
            };
            let stop = Arc::new(AtomicBool::new(false));
            for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
                signal_hook::flag::register(sig, Arc::clone(&stop)).map_err(|e| e.to_string())?;
            }
            // Each connection starts from the next --bind address.
            let (mut cfg, reconnect) = cfg;
            let stats = run_reconnecting(
                reconnect,
                &stop,
                || {
                    let client = Client::new(cfg.clone(), mode.clone());
                    cfg.bind.rotate_left(1);
                    client
                },
                |s| {
                    println!("ready addresses={} mtu={}", s.addresses.join(","), s.mtu);
                },
            )
            .map_err(|e| e.to_string())?;
            println!("{}", serde_json::to_string(&stats).unwrap_or_default());
            Ok(())
        }
    }
}
