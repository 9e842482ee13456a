//! quiche settings, connection IDs, and the batched UDP socket shared by the proxy and its client.
//!
//! One place decides the transport parameters both ends run with: extended CONNECT and HTTP/3
//! datagrams on, a UDP payload large enough for 1280-byte inner packets (RFC 9484 §10.1), room for
//! spare connection IDs so a hopping client can migrate (`active_connection_id_limit` ≥ 4, never
//! `disable_active_migration`), and bounded datagram queues (overflow is a counted drop).

use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ring::rand::{SecureRandom, SystemRandom};
use serde::Deserialize;

use crate::server::admission::RetryMode;

/// Connection ID length used by mimiq endpoints.
pub const CID_LEN: usize = quiche::MAX_CONN_ID_LEN;

/// The largest UDP datagram read from the socket.
pub const MAX_UDP_RECV: usize = 65_535;

/// Transport settings (the `[quic]` table of the proxy and client configs).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuicSettings {
    /// Largest UDP payload this endpoint sends, bytes. 1350 at least so 1280-byte inner packets
    /// fit (the default, 1452, fills a 1500-byte IPv6 link).
    pub max_udp_payload_bytes: usize,
    /// Idle timeout, milliseconds.
    pub idle_timeout_ms: u64,
    /// Pad every 1-RTT packet to a multiple of this many bytes (as far as the path's maximum
    /// size and the congestion window allow), so that an observer sees sizes in buckets rather
    /// than what the tunnel carries (docs/PRIVACY.md); 0: no padding. A patch of quiche's
    /// (`vendor/quiche/MIMIQ-PATCH.md`).
    pub pad_to_bytes: usize,
    /// Proxy: a path a client hops to takes over the old path's congestion window and RTT
    /// estimate instead of starting afresh. A deviation from RFC 9000 §9.4 (which requires the
    /// reset unless only the port changed), for clients that hop within one access network; a
    /// patch of quiche's (`vendor/quiche/MIMIQ-PATCH.md`). Off by default.
    pub keep_congestion_on_migration: bool,
    /// Connection IDs the peer may keep issued to us: ≥ 4 on the proxy so hopping clients find
    /// spares; a hopping client uses 2 (see `client`).
    pub active_connection_id_limit: u64,
    /// Received and queued-to-send QUIC datagrams per connection; more is a counted drop.
    pub dgram_queue_len: usize,
    /// Connection-level flow-control window, bytes.
    pub max_data_bytes: u64,
    /// Per-stream flow-control window, bytes.
    pub max_stream_data_bytes: u64,
    /// Concurrent request streams the peer may open.
    pub max_streams_bidi: u64,
    /// Congestion control: `cubic`, `reno` or `bbr2`.
    pub congestion_control: String,
    /// Send `disable_active_migration` (RFC 9000 §18.2): clients must not hop. Off by default
    /// (the proxy serves hopping clients); for an operator who wants clients to stay put.
    pub disable_active_migration: bool,
    /// Forget a path the peer left, retiring the connection ID used there, as soon as the peer
    /// has left it, instead of after the wait that lets datagrams sent just before the hop
    /// arrive ([`LeftPaths`]). RFC 9000 §5.1.2 allows retiring at once, and conforming peers
    /// do; a hopping peer must then drop what still arrives with the retired ID. Off by
    /// default: for testing clients against such a peer.
    pub retire_left_paths_at_once: bool,
    /// Directory for one qlog file per connection (empty: none).
    pub qlog_dir: Option<PathBuf>,
    /// Append TLS secrets here (NSS key log format) so Wireshark can decrypt a capture; the
    /// `SSLKEYLOGFILE` environment variable does the same.
    pub keylog_file: Option<PathBuf>,
    /// Proxy: when new clients must prove their address with a Retry (RFC 9000 §8.1.2):
    /// `always`, `auto` (while `retry_threshold` handshakes are in flight) or `never`.
    pub retry: RetryMode,
    /// Proxy: half-open connections at which `retry = "auto"` starts sending Retry.
    pub retry_threshold: usize,
    /// Proxy: connections in their handshake kept at most, apart from `max_connections`;
    /// more Initials are dropped (counted) until handshakes finish or time out.
    pub max_half_open: usize,
    /// Proxy: a connection whose handshake has not finished this long after its first
    /// Initial is dropped.
    pub handshake_timeout_ms: u64,
    /// Proxy: the stateless reset key (RFC 9000 §10.3), 32 bytes, created (mode 0600) if
    /// missing. The same file on every proxy and across restarts lets a restarted proxy reset
    /// the connections it lost at once. Absent: a key for this process only.
    pub reset_key_file: Option<PathBuf>,
    /// Proxy: stateless resets sent per second at most, and as many Version Negotiation
    /// packets (0: none).
    pub unsolicited_per_second: u32,
    /// Proxy, with `reset_key_file`: stopped (SIGTERM) while a newer process of the same key
    /// runs, serve the open connections up to this long, passing new ones to it, before
    /// closing what is left (0: stop at once).
    pub drain_timeout_ms: u64,
}

impl Default for QuicSettings {
    fn default() -> Self {
        QuicSettings {
            max_udp_payload_bytes: 1452,
            idle_timeout_ms: 30_000,
            pad_to_bytes: 0,
            keep_congestion_on_migration: false,
            active_connection_id_limit: 8,
            dgram_queue_len: 4096,
            max_data_bytes: 64 << 20,
            max_stream_data_bytes: 16 << 20,
            max_streams_bidi: 128,
            congestion_control: "cubic".into(),
            disable_active_migration: false,
            retire_left_paths_at_once: false,
            qlog_dir: None,
            keylog_file: None,
            retry: RetryMode::default(),
            retry_threshold: 64,
            max_half_open: 1024,
            handshake_timeout_ms: 10_000,
            reset_key_file: None,
            unsolicited_per_second: 1000,
            drain_timeout_ms: 60_000,
        }
    }
}

/// Smallest `max_udp_payload_bytes` accepted: 1280-byte inner packets plus QUIC and HTTP/3
/// datagram overhead.
pub const MIN_UDP_PAYLOAD: usize = 1350;

impl QuicSettings {
    /// Checks the settings; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        if !(MIN_UDP_PAYLOAD..=65_527).contains(&self.max_udp_payload_bytes) {
            return Err(format!(
                "quic.max_udp_payload_bytes = {}: must be in {MIN_UDP_PAYLOAD}..=65527 so 1280-byte inner packets fit",
                self.max_udp_payload_bytes
            ));
        }
        if self.pad_to_bytes != 0 && !(16..=self.max_udp_payload_bytes).contains(&self.pad_to_bytes)
        {
            return Err(format!(
                "quic.pad_to_bytes = {}: must be 0 (no padding) or 16..=max_udp_payload_bytes ({})",
                self.pad_to_bytes, self.max_udp_payload_bytes
            ));
        }
        if self.active_connection_id_limit < 2 {
            return Err(format!(
                "quic.active_connection_id_limit = {}: must be at least 2 (RFC 9000 §18.2)",
                self.active_connection_id_limit
            ));
        }
        if self.dgram_queue_len == 0 {
            return Err("quic.dgram_queue_len must be at least 1".into());
        }
        if self.max_half_open == 0 || self.handshake_timeout_ms == 0 {
            return Err(
                "quic.max_half_open and quic.handshake_timeout_ms must be at least 1".into(),
            );
        }
        if self
            .congestion_control
            .parse::<quiche::CongestionControlAlgorithm>()
            .is_err()
        {
            return Err(format!(
                "quic.congestion_control = {:?}: expected cubic, reno or bbr2",
                self.congestion_control
            ));
        }
        Ok(())
    }

    /// The paths left of a new connection, kept as [`Self::retire_left_paths_at_once`] says.
    pub fn left_paths(&self) -> LeftPaths {
        if self.retire_left_paths_at_once {
            LeftPaths::at_once()
        } else {
            LeftPaths::default()
        }
    }

    /// The quiche configuration for one side. The server loads its certificate and key; the
    /// client verifies the proxy against `ca` (a PEM file) or not at all when `ca` is `None`.
    pub fn transport_config(&self, tls: Tls<'_>) -> Result<quiche::Config, String> {
        self.validate()?;
        let mut c = quiche::Config::new(quiche::PROTOCOL_VERSION).map_err(|e| e.to_string())?;
        match tls {
            Tls::Server { cert, key } => {
                c.load_cert_chain_from_pem_file(&path_str(cert)?)
                    .map_err(|e| pem_error("certificate", cert, "CERTIFICATE", e))?;
                c.load_priv_key_from_pem_file(&path_str(key)?)
                    .map_err(|e| pem_error("private key", key, "PRIVATE KEY", e))?;
            }
            Tls::Client { ca: Some(ca) } => {
                c.load_verify_locations_from_file(&path_str(ca)?)
                    .map_err(|e| pem_error("CA file", ca, "CERTIFICATE", e))?;
                c.verify_peer(true);
            }
            Tls::Client { ca: None } => c.verify_peer(false),
        }
        c.set_application_protos(quiche::h3::APPLICATION_PROTOCOL)
            .map_err(|e| e.to_string())?;
        c.set_max_idle_timeout(self.idle_timeout_ms);
        c.set_max_recv_udp_payload_size(MAX_UDP_RECV);
        c.set_max_send_udp_payload_size(self.max_udp_payload_bytes);
        c.set_pad_short_packets_to(self.pad_to_bytes);
        c.set_keep_congestion_on_migration(self.keep_congestion_on_migration);
        c.set_initial_max_data(self.max_data_bytes);
        c.set_initial_max_stream_data_bidi_local(self.max_stream_data_bytes);
        c.set_initial_max_stream_data_bidi_remote(self.max_stream_data_bytes);
        c.set_initial_max_stream_data_uni(self.max_stream_data_bytes);
        c.set_initial_max_streams_bidi(self.max_streams_bidi);
        c.set_initial_max_streams_uni(16);
        c.set_active_connection_id_limit(self.active_connection_id_limit);
        c.set_disable_active_migration(self.disable_active_migration);
        c.enable_dgram(true, self.dgram_queue_len, self.dgram_queue_len);
        c.enable_pacing(false);
        if let Ok(cc) = self.congestion_control.parse() {
            c.set_cc_algorithm(cc);
        }
        if self.keylog_path().is_some() {
            c.log_keys();
        }
        Ok(c)
    }

    fn keylog_path(&self) -> Option<PathBuf> {
        self.keylog_file
            .clone()
            .or_else(|| std::env::var_os("SSLKEYLOGFILE").map(PathBuf::from))
    }

    /// Attaches the key log and a qlog file (when configured) to a new connection.
    pub fn instrument(&self, conn: &mut quiche::Connection, role: &str) -> io::Result<()> {
        if let Some(path) = self.keylog_path() {
            let f = File::options().create(true).append(true).open(&path)?;
            conn.set_keylog(Box::new(f));
        }
        if let Some(dir) = &self.qlog_dir {
            std::fs::create_dir_all(dir)?;
            let name = format!("{role}-{}.sqlog", hex(conn.source_id().as_ref()));
            let f = File::create(dir.join(name))?;
            conn.set_qlog(Box::new(f), format!("mimiq {role}"), String::new());
        }
        Ok(())
    }
}

/// TLS material for [`QuicSettings::transport_config`].
pub enum Tls<'a> {
    /// The proxy: certificate chain and private key, PEM.
    Server {
        /// Certificate chain.
        cert: &'a Path,
        /// Private key.
        key: &'a Path,
    },
    /// A client: verify the proxy against this CA (PEM), or not at all.
    Client {
        /// Trusted CA file.
        ca: Option<&'a Path>,
    },
}

/// Why BoringSSL refused a PEM file (it says only `TlsFail`): the PEM blocks it holds when none
/// is the kind wanted (a certificate given as the key, say), else that it is not valid PEM of
/// that kind.
fn pem_error(what: &str, path: &Path, wanted: &str, e: quiche::Error) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let labels: Vec<&str> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("-----BEGIN "))
        .filter_map(|l| l.strip_suffix("-----"))
        .collect();
    let has_wanted = labels.iter().any(|l| l.ends_with(wanted));
    if labels.is_empty() {
        format!(
            "{what} {}: no PEM block in it (expected \"-----BEGIN {wanted}-----\")",
            path.display()
        )
    } else if !has_wanted {
        format!(
            "{what} {}: holds {}, not a {wanted} (swapped with another file?)",
            path.display(),
            labels
                .iter()
                .map(|l| format!("a {l}"))
                .collect::<Vec<_>>()
                .join(" and ")
        )
    } else {
        format!(
            "{what} {}: BoringSSL refused its {wanted} ({e:?}): damaged, or not matching",
            path.display()
        )
    }
}

fn path_str(p: &Path) -> Result<String, String> {
    if !p.exists() {
        return Err(format!("{}: no such file", p.display()));
    }
    p.to_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("{}: path is not UTF-8", p.display()))
}

/// HTTP/3 settings: extended CONNECT (RFC 9220) on; datagrams follow the transport's setting.
pub fn h3_config() -> Result<quiche::h3::Config, String> {
    let mut h3 = quiche::h3::Config::new().map_err(|e| e.to_string())?;
    h3.enable_extended_connect(true);
    Ok(h3)
}

/// A fresh random connection ID and its stateless reset token.
pub fn new_cid(rng: &SystemRandom) -> (quiche::ConnectionId<'static>, u128) {
    let mut id = [0u8; CID_LEN];
    let mut token = [0u8; 16];
    // SystemRandom only fails when the OS has no randomness source, which quiche needs too.
    rng.fill(&mut id).expect("OS randomness");
    rng.fill(&mut token).expect("OS randomness");
    (
        quiche::ConnectionId::from_vec(id.to_vec()),
        u128::from_be_bytes(token),
    )
}

/// A timer's wait as `poll(2)`'s milliseconds, rounded up: rounding down made every timer
/// less than a millisecond away a `poll` that returns at once, a spin until it expired.
pub fn poll_timeout_ms(wait: Duration) -> i32 {
    let ms = wait.as_nanos().div_ceil(1_000_000);
    i32::try_from(ms).unwrap_or(i32::MAX)
}

/// How long a path probe waits for its answer before the driver asks quiche for a new
/// PATH_CHALLENGE: three round trips of the active path, at least `min`.
///
/// quiche sends a challenge again only when the packet that carried it is declared lost, but
/// the peer acknowledges that packet on the path the connection still uses: a lost
/// PATH_RESPONSE (a receive buffer overflowing on a busy host) left the probe unanswered until
/// the hop's deadline. Both hop drivers (`mimiq_agent::migrate` and this crate's client) call
/// `probe_path` again after this wait, no more often than RFC 9000 §8.2.1 allows ("SHOULD NOT
/// probe a new path with packets containing a PATH_CHALLENGE frame more frequently than it
/// would send an Initial packet").
pub fn probe_retry_after(conn: &quiche::Connection, min: Duration) -> Duration {
    let rtt = conn
        .path_stats()
        .find(|p| p.active)
        .map_or(Duration::ZERO, |p| p.rtt);
    (rtt * 3).max(min)
}

/// Keeps a quiet connection alive: an ack-eliciting packet (a PING when nothing else is due)
/// once a third of the idle timeout has passed without a packet from the peer. The idle timeout
/// is the lesser of both ends' `max_idle_timeout` (RFC 9000 §10.1); the peer's answer restarts
/// both idle timers.
//= https://www.rfc-editor.org/rfc/rfc9000#section-10.1.2
//# An endpoint that sends packets close to the effective timeout risks having them be
//# discarded at the peer, since the idle timeout period might have expired at the peer
//# before these packets arrive.
#[derive(Debug, Clone, Copy)]
pub struct KeepAlive {
    local_idle: Duration,
    last_recv: usize,
    quiet_since: Instant,
    /// The connection is looked at no more often than half an interval (the event loop turns
    /// once per burst; quiche's counters are not free): a keep-alive goes out between one and
    /// one and a half intervals after the last packet received, inside the idle timeout.
    next_look: Instant,
    sent: u64,
}

impl KeepAlive {
    /// For a connection configured with `local_idle` as its `max_idle_timeout` (zero: none).
    pub fn new(local_idle: Duration, now: Instant) -> Self {
        Self {
            local_idle,
            last_recv: 0,
            quiet_since: now,
            next_look: now,
            sent: 0,
        }
    }

    /// How long the peer may stay quiet before a keep-alive goes out; `None` when neither end
    /// has an idle timeout.
    pub fn interval(&self, conn: &quiche::Connection) -> Option<Duration> {
        let peer = conn.peer_transport_params().map_or(Duration::ZERO, |p| {
            Duration::from_millis(p.max_idle_timeout)
        });
        [self.local_idle, peer]
            .into_iter()
            .filter(|d| !d.is_zero())
            .min()
            .map(|idle| idle / 3)
    }

    /// Call once per turn of the event loop; queues a keep-alive when one is due and says so.
    pub fn on_tick(&mut self, conn: &mut quiche::Connection, now: Instant) -> bool {
        if now < self.next_look {
            return false;
        }
        self.next_look = now
            + self
                .interval(conn)
                .map_or(Duration::from_secs(1), |i| i / 2);
        let recv = conn.stats().recv;
        if recv != self.last_recv {
            self.last_recv = recv;
            self.quiet_since = now;
            return false;
        }
        if !conn.is_established() || conn.is_closed() {
            return false;
        }
        match self.interval(conn) {
            Some(i) if now.saturating_duration_since(self.quiet_since) >= i => {
                self.quiet_since = now;
                self.sent += 1;
                conn.send_ack_eliciting().is_ok()
            }
            _ => false,
        }
    }

    /// Keep-alives queued so far.
    pub fn sent(&self) -> u64 {
        self.sent
    }
}

/// Why a connection closed, in one line: the error either end gave (code and reason), or the
/// idle timeout.
pub fn close_reason(conn: &quiche::Connection) -> String {
    let describe = |side: &str, e: &quiche::ConnectionError| {
        format!(
            "{side} {} error 0x{:x} {:?}",
            if e.is_app { "application" } else { "transport" },
            e.error_code,
            String::from_utf8_lossy(&e.reason)
        )
    };
    if let Some(e) = conn.local_error() {
        describe("local", e)
    } else if let Some(e) = conn.peer_error() {
        describe("peer", e)
    } else if conn.is_timed_out() {
        "idle timeout".to_string()
    } else {
        // Closed with no error on either side and no timeout: quiche marks a connection so
        // when a packet ends with one of the peer's reset tokens (RFC 9000 §10.3).
        "stateless reset: the peer no longer knows the connection".to_string()
    }
}

/// Lower-case hex of a byte string (connection IDs in logs and file names).
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The largest inner packet both ends carry for a UDP payload size, whatever the connection's
/// state: the payload minus the QUIC short header at its largest (1 + 20-byte CID + 4-byte packet
/// number), the AEAD tag (16), the DATAGRAM frame header (1 + 2-byte length) and the HTTP
/// datagram header at its largest (8 + 1). The proxy enforces it and the client sizes its TUN
/// device by it, so the two agree without negotiating.
pub fn tunnel_mtu(max_udp_payload: usize) -> usize {
    max_udp_payload.saturating_sub((1 + quiche::MAX_CONN_ID_LEN + 4) + 16 + 3 + 9)
}

/// The paths a connection left, forgotten once nothing is in flight on them
/// (`Connection::abandon_path`, vendor/quiche/MIMIQ-PATCH.md): that retires the connection ID used
/// there, so it is never seen from another address, and frees quiche's path slot for the next one.
/// Without it a connection stops accepting new addresses after `active_connection_id_limit` of
/// them. Both ends of a hopping connection keep one.
///
/// Only paths that were active and were left, or whose validation failed, are forgotten: a path
/// being probed is not active either, and forgetting it would drop the PATH_RESPONSE the probe
/// waits for. A path whose last packets are never acknowledged (sent to an address the peer had
/// already left) is forced out after [`LeftPaths::FORCE_AFTER_RTTS`] round trips; its
/// unacknowledged frames are retransmitted on the active path.
#[derive(Debug)]
pub struct LeftPaths {
    active: Option<(SocketAddr, SocketAddr)>,
    left: Vec<Left>,
    force_after_min: Duration,
    /// Forget a path as soon as it is left ([`LeftPaths::at_once`]).
    at_once: bool,
    returned: u64,
}

/// A path left: when, and when a packet last arrived on it.
#[derive(Debug, Clone, Copy)]
struct Left {
    local: SocketAddr,
    peer: SocketAddr,
    since: Instant,
    recv: usize,
    last_recv: Instant,
}

impl Default for LeftPaths {
    fn default() -> Self {
        Self::new(Self::FORCE_AFTER_MIN)
    }
}

impl LeftPaths {
    /// Round trips of the path left (at least the minimum given to [`LeftPaths::new`]) after
    /// which it is forgotten even with packets in flight.
    pub const FORCE_AFTER_RTTS: u32 = 4;
    /// Round trips of a path left without a packet arriving there before it may go.
    pub const HOLD_RTTS: u32 = 2;
    /// The default least time before a path left is forced out: long enough for datagrams sent
    /// just before a hop to arrive (the kernel reorders datagrams of different sockets); one
    /// that arrives with the retired connection ID is dropped by the peer (upstream quiche
    /// closed the connection for it: vendor/quiche/MIMIQ-PATCH.md).
    pub const FORCE_AFTER_MIN: Duration = Duration::from_millis(100);

    /// Forces a path left out after at least `force_after_min`.
    pub fn new(force_after_min: Duration) -> Self {
        Self {
            active: None,
            left: Vec::new(),
            force_after_min,
            at_once: false,
            returned: 0,
        }
    }

    /// Forgets every path as soon as the connection has left it (or its validation failed),
    /// whatever is still in flight there: what a conforming peer may do (RFC 9000 §5.1.2), and
    /// what a hopping peer must survive.
    pub fn at_once() -> Self {
        Self {
            at_once: true,
            ..Self::new(Duration::ZERO)
        }
    }

    /// When [`LeftPaths::forget`] may have something to force out next (a lower bound).
    pub fn timeout(&self, now: Instant) -> Option<Duration> {
        self.left
            .iter()
            .map(|l| (l.since + self.force_after_min).saturating_duration_since(now))
            .min()
    }

    /// Notes a path event that `path_event_next` returned.
    pub fn on_event(&mut self, ev: &quiche::PathEvent, now: Instant) {
        if let quiche::PathEvent::FailedValidation(local, peer) = *ev {
            self.push(local, peer, now);
        }
    }

    /// Notes the active path and forgets the paths left that are done; returns how many were
    /// forgotten. Call after every burst of `recv`.
    ///
    /// A path left is kept until nothing arrived on it for [`LeftPaths::HOLD_RTTS`] of its round
    /// trips, even when nothing of ours is in flight there: the peer keeps sending there until it
    /// sees our first packet from the new address, and what arrives on a forgotten path is
    /// dropped unread (and stays in flight at the peer until it forces its side out).
    pub fn forget(&mut self, conn: &mut quiche::Connection, now: Instant) -> usize {
        let active = conn
            .path_stats()
            .find(|p| p.active)
            .map(|p| (p.local_addr, p.peer_addr));
        if active != self.active {
            if let Some((local, peer)) = self.active {
                self.push(local, peer, now);
            }
            self.active = active;
        }
        if self.left.is_empty() {
            return 0;
        }
        // Round trips measured on each path left (a path just moved to has no sample yet), and
        // what arrived there.
        let stats: Vec<(SocketAddr, SocketAddr, Duration, usize)> = conn
            .path_stats()
            .filter(|p| !p.active)
            .map(|p| (p.local_addr, p.peer_addr, p.rtt, p.recv))
            .collect();
        let mut forgotten = 0;
        let mut returned = 0;
        let (force_after_min, at_once) = (self.force_after_min, self.at_once);
        self.left.retain_mut(|left| {
            let (local, peer) = (left.local, left.peer);
            if Some((local, peer)) == active {
                // The connection came back to it.
                returned += 1;
                return false;
            }
            let (rtt, recv) = stats
                .iter()
                .find(|&&(l, p, _, _)| (l, p) == (local, peer))
                .map_or((Duration::ZERO, 0), |&(_, _, rtt, recv)| (rtt, recv));
            if recv != left.recv {
                left.recv = recv;
                left.last_recv = now;
            }
            let age = now.saturating_duration_since(left.since);
            let quiet = now.saturating_duration_since(left.last_recv);
            if !at_once && quiet < rtt * Self::HOLD_RTTS && age < rtt * Self::FORCE_AFTER_RTTS {
                return true;
            }
            let force = at_once || age >= (rtt * Self::FORCE_AFTER_RTTS).max(force_after_min);
            match conn.abandon_path(local, peer, force) {
                Ok(()) => {
                    forgotten += 1;
                    false
                }
                // Bytes in flight there: try again later.
                Err(quiche::Error::Done) => true,
                // quiche no longer knows it.
                Err(_) => false,
            }
        });
        self.returned += returned;
        forgotten
    }

    /// Notes that the connection just left the path `local` → `peer`, before [`LeftPaths::forget`]
    /// sees it (a migration the caller made): it is held from now on ([`LeftPaths::holds`]).
    pub fn leave(&mut self, local: SocketAddr, peer: SocketAddr, now: Instant) {
        self.push(local, peer, now);
    }

    /// The connection probes a path it left and has not forgotten yet (a hop back to an address
    /// used shortly before): it is no longer one to forget, since forgetting it under the probe
    /// drops the PATH_RESPONSE and the hop waits for its next probe. Counted as returned.
    pub fn reuse(&mut self, local: SocketAddr, peer: SocketAddr) {
        let before = self.left.len();
        self.left.retain(|l| (l.local, l.peer) != (local, peer));
        self.returned += (before - self.left.len()) as u64;
    }

    /// Paths left that became active again, or were probed again, before they were forgotten.
    pub fn returned(&self) -> u64 {
        self.returned
    }

    /// Paths left and not forgotten yet.
    pub fn pending(&self) -> usize {
        self.left.len()
    }

    /// Whether `local` (to any peer) is a path left and not forgotten yet: its socket must stay
    /// open for the acknowledgements still due there.
    pub fn holds(&self, local: SocketAddr) -> bool {
        self.left.iter().any(|l| l.local == local)
    }

    fn push(&mut self, local: SocketAddr, peer: SocketAddr, now: Instant) {
        if !self.left.iter().any(|l| (l.local, l.peer) == (local, peer)) {
            self.left.push(Left {
                local,
                peer,
                since: now,
                recv: usize::MAX,
                last_recv: now,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificate_given_as_the_key_is_named_in_the_error() {
        let dir = std::env::temp_dir().join(format!("mimiq-pem-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ck = rcgen::generate_simple_self_signed(vec!["proxy.test".into()]).unwrap();
        let (cert, key, empty) = (dir.join("c.pem"), dir.join("k.pem"), dir.join("e.pem"));
        std::fs::write(&cert, ck.cert.pem()).unwrap();
        std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
        std::fs::write(&empty, "not pem\n").unwrap();
        let quic = QuicSettings::default();
        let load = |cert: &Path, key: &Path| {
            quic.transport_config(Tls::Server { cert, key })
                .err()
                .unwrap_or_default()
        };
        let swapped = load(&cert, &cert);
        let garbage = load(&cert, &empty);
        let key_as_cert = load(&key, &key);
        let fine = load(&cert, &key);
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(
            swapped.contains("private key")
                && swapped.contains("holds a CERTIFICATE, not a PRIVATE KEY"),
            "{swapped}"
        );
        assert!(garbage.contains("no PEM block"), "{garbage}");
        assert!(
            key_as_cert.starts_with("certificate") && key_as_cert.contains("not a CERTIFICATE"),
            "{key_as_cert}"
        );
        assert_eq!(fine, "");
    }

    /// Delivers what `from` sends to `to`, noting the size of each 1-RTT packet (short header:
    /// the first bit clear), and drains `to`'s datagrams; returns how many packets moved.
    fn flush(
        from: &mut quiche::Connection,
        to: &mut quiche::Connection,
        sizes: &mut Vec<usize>,
        buf: &mut [u8],
    ) -> usize {
        let mut moved = 0;
        while let Ok((n, sent)) = from.send(buf) {
            moved += 1;
            if buf[0] & 0x80 == 0 {
                sizes.push(n);
            }
            let info = quiche::RecvInfo {
                from: sent.from,
                to: sent.to,
            };
            let _ = to.recv(&mut buf[..n], info);
        }
        while to.dgram_recv(buf).is_ok() {}
        moved
    }

    /// A client and a server of `quic`'s settings, their handshake done in memory; the client
    /// at 10.0.0.1:5000, the server at 10.0.0.2:443.
    fn connected(quic: &QuicSettings) -> (quiche::Connection, quiche::Connection) {
        let dir = tempfile::tempdir().unwrap();
        let ck = rcgen::generate_simple_self_signed(vec!["proxy.test".into()]).unwrap();
        let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::write(&cert, ck.cert.pem()).unwrap();
        std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
        let mut sc = quic
            .transport_config(Tls::Server {
                cert: &cert,
                key: &key,
            })
            .unwrap();
        let mut cc = quic.transport_config(Tls::Client { ca: None }).unwrap();
        let (ca, sa): (SocketAddr, SocketAddr) = (
            "10.0.0.1:5000".parse().unwrap(),
            "10.0.0.2:443".parse().unwrap(),
        );
        let mut client = quiche::connect(
            Some("proxy.test"),
            &quiche::ConnectionId::from_ref(&[1u8; CID_LEN]),
            ca,
            sa,
            &mut cc,
        )
        .unwrap();
        let mut server = quiche::accept(
            &quiche::ConnectionId::from_ref(&[2u8; CID_LEN]),
            None,
            sa,
            ca,
            &mut sc,
        )
        .unwrap();
        let mut buf = vec![0u8; 65_535];
        for _ in 0..100 {
            if client.is_established() && server.is_established() {
                break;
            }
            flush(&mut client, &mut server, &mut Vec::new(), &mut buf);
            flush(&mut server, &mut client, &mut Vec::new(), &mut buf);
        }
        assert!(client.is_established() && server.is_established());
        (client, server)
    }

    #[test]
    fn padded_endpoints_send_every_1rtt_packet_in_buckets_and_bad_buckets_are_refused() {
        let quic = QuicSettings {
            pad_to_bytes: 256,
            ..QuicSettings::default()
        };
        let (mut client, mut server) = connected(&quic);
        // Datagrams of every size from 1 to 1,200 bytes each way.
        let mut sizes = Vec::new();
        let mut buf = vec![0u8; 65_535];
        for size in 1..=1_200 {
            let payload = vec![7u8; size];
            let _ = client.dgram_send(&payload);
            let _ = server.dgram_send(&payload);
            flush(&mut client, &mut server, &mut sizes, &mut buf);
            flush(&mut server, &mut client, &mut sizes, &mut buf);
        }
        assert!(sizes.len() > 1_000, "{} 1-RTT packets", sizes.len());
        let off: Vec<usize> = sizes.iter().copied().filter(|n| n % 256 != 0).collect();
        assert!(off.is_empty(), "not in a 256-byte bucket: {off:?}");

        for bad in [8, 1_453] {
            let q = QuicSettings {
                pad_to_bytes: bad,
                ..QuicSettings::default()
            };
            let e = q.validate().unwrap_err();
            assert!(e.starts_with("quic.pad_to_bytes"), "{e}");
        }
    }

    /// The server's congestion window on the path its client migrated to, after the window
    /// grew on the first path, with `keep` for `keep_congestion_on_migration`; and the window
    /// it had before the migration.
    fn cwnd_after_migration(keep: bool) -> (usize, usize) {
        let quic = QuicSettings {
            keep_congestion_on_migration: keep,
            ..QuicSettings::default()
        };
        let (mut client, mut server) = connected(&quic);
        let mut buf = vec![0u8; 65_535];
        // Spare connection IDs each way, as a hopping client and the proxy keep.
        for i in 0..4u8 {
            for (conn, base) in [(&mut server, 0x30), (&mut client, 0x40)] {
                let cid = [base + i; CID_LEN];
                let token = u128::from(base + i);
                conn.new_scid(&quiche::ConnectionId::from_ref(&cid), token, false)
                    .unwrap();
            }
        }
        // A download on the first path: the window grows past its initial 10 packets.
        let payload = vec![9u8; 1_000];
        for _ in 0..200 {
            for _ in 0..20 {
                let _ = server.dgram_send(&payload);
            }
            flush(&mut server, &mut client, &mut Vec::new(), &mut buf);
            flush(&mut client, &mut server, &mut Vec::new(), &mut buf);
        }
        let before = server.path_stats().find(|p| p.active).unwrap().cwnd;
        // The client hops to a new address: probes it, then moves there.
        let new: SocketAddr = "10.0.0.9:6000".parse().unwrap();
        let server_addr: SocketAddr = "10.0.0.2:443".parse().unwrap();
        client.probe_path(new, server_addr).unwrap();
        for _ in 0..5 {
            flush(&mut client, &mut server, &mut Vec::new(), &mut buf);
            flush(&mut server, &mut client, &mut Vec::new(), &mut buf);
        }
        client.migrate(new, server_addr).unwrap();
        client.dgram_send(b"from the new address").unwrap();
        flush(&mut client, &mut server, &mut Vec::new(), &mut buf);
        let after = server.path_stats().find(|p| p.active).unwrap();
        assert_eq!(after.peer_addr, new, "the server follows the client");
        (before, after.cwnd)
    }

    #[test]
    fn a_migrated_path_starts_afresh_unless_the_congestion_state_is_kept() {
        let initial = 10 * 1_200;
        let (before, reset) = cwnd_after_migration(false);
        assert!(
            before > 4 * initial,
            "the window grew on the first path: {before}"
        );
        assert!(
            reset < 2 * initial,
            "RFC 9000 §9.4: a fresh window ({reset})"
        );
        let (before, kept) = cwnd_after_migration(true);
        // The same window, or larger by the ACKs the first packet from the new address carried.
        assert!(
            kept >= before,
            "the new path took the old one's window: {kept} < {before}"
        );
    }

    #[test]
    fn poll_timeouts_round_up_so_a_short_timer_sleeps() {
        assert_eq!(poll_timeout_ms(Duration::ZERO), 0);
        assert_eq!(poll_timeout_ms(Duration::from_micros(1)), 1);
        assert_eq!(poll_timeout_ms(Duration::from_micros(999)), 1);
        assert_eq!(poll_timeout_ms(Duration::from_millis(25)), 25);
        assert_eq!(poll_timeout_ms(Duration::from_micros(25_001)), 26);
        assert_eq!(poll_timeout_ms(Duration::MAX), i32::MAX);
    }
}
