//! Direct mode's test peers: the seed's experiment over HTTP/3 (seed 000 §4), many GETs over
//! one hopping connection against an HTTP/3 server that knows nothing about MIMIQ. Test support,
//! outside the agent's library: the agent's binary links none of it.
//!
//! - [`H3Server`]: a minimal HTTP/3 server written with quiche's own h3 API the way quiche's
//!   example server and quiche-server are (accept, route by connection ID, keep issuing CIDs
//!   while `scids_left() > 0`, standard transport config — it does not send
//!   `disable_active_migration` unless told to). `GET /N` answers N bytes of a fixed pattern
//!   ([`body_byte`]). It runs on one blocking UDP socket on the caller's thread.
//! - [`run_gets`]: the client side: GETs of the given sizes, one after the other, over a
//!   [`DirectConnection`] that hops as its strategy says (between requests and during
//!   responses), each body checked byte for byte ([`run_gets_until_hops`]: and on until the
//!   connection has hopped so many times). [`run_timed_gets`]: GETs of one size for a
//!   given time, each one timed, with a hook before each request (`mimiq-perf bench figure3`
//!   requests its hops there, at request boundaries as the seed did).
//! - [`TestCert`]: a TLS identity for test servers.
//!
//! Used by this crate's loopback tests (`tests/`) and examples (`examples/h3_server.rs`,
//! `examples/direct_h3.rs`), and by `mimiq-perf` (`perf/src/direct.rs`, the namespace tests in
//! `perf/tests/direct_hop.rs`, `bench interop` and `bench figure3`). Nothing here panics on input: a bad request gets a 404 or 400,
//! a bad datagram is counted.

use std::collections::{HashMap, HashSet};
use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use quiche::h3::NameValue;
use ring::rand::{SecureRandom, SystemRandom};

use mimiq_agent::direct::{DirectConnection, DirectError};
use mimiq_masque::quic::LeftPaths;

/// quiche's own example certificate (`quiche/examples/cert.crt`, CN quic.tech, valid until
/// 2047). Its private key is public: for tests and experiments only, never for a real server.
pub const TEST_CERT_PEM: &str = "-----BEGIN CERTIFICATE-----\n\
MIIC7TCCAdUCFDuGBhl3l5Z++VCLkvaav4yteBonMA0GCSqGSIb3DQEBCwUAMEUx\n\
CzAJBgNVBAYTAkFVMRMwEQYDVQQIDApTb21lLVN0YXRlMSEwHwYDVQQKDBhJbnRl\n\
cm5ldCBXaWRnaXRzIFB0eSBMdGQwHhcNMjAwMzIzMTYwNzU0WhcNNDcwODA5MTYw\n\
NzU0WjAhMQswCQYDVQQGEwJHQjESMBAGA1UEAwwJcXVpYy50ZWNoMIIBIjANBgkq\n\
hkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAz5bOL7LD9kiIagcVrZqZ13ZcR0KhMuzs\n\
brqULbZKyqC+uBRgINxYJ7LPnJ4LPYuCt/nAaQ7CLXfKgzAMFu8eIK6UEvZA6+7b\n\
20E4rvOpPbTB/T4JbYZNQKyM9AEwr6j0P6vFgrWT7aBzhkmiqEe5vv/7ZOEGb+Ab\n\
+cvMeszfBbk93nyzKdNaUuh95x7/p0Ow315np2PRuoT0QQnA9zE/9eZ3Jah3cNZn\n\
NuQ6BDHlkegzTV5JhYYblRo/pmt2E9E0ha+NWsRLf3ZJUYhkYR3UqMltEKuLglCO\n\
VWBbPmKd4IZUNIotpKMVQSVb9agNBF49hH9iBhN3fBm7Hp8KBpjJLwIDAQABMA0G\n\
CSqGSIb3DQEBCwUAA4IBAQCo/Rn4spa5XFk0cCoKypP27DxePkGD9rQZk/CY4inV\n\
JV16anZ1pr9yfO61+m3fRKTZq7yxtHRDWxDdROHx9LqV1dXLAmh1ecV9Kn6/796O\n\
EHsOcVB0Lfi9Ili7//oUqlhGNploRuQbgWAXU+Eo1xJRWIXeedhzBSgEOMaQk3Zn\n\
TdYFhP0/Ao/fEdI4VULv1A43ztnZIB2KXWgUQoFT32woL47eWge8LxxVmmH3STtz\n\
nNcGnYxIorCQemDHDzMrvxRWgHxkpFGGqAhkFFyCmhKFPglKwt+yVTx26T8tShID\n\
ISMj0rgVMptmtWKJfzNCvFG52gsuO4w3yGdjgjRRrBDm\n\
-----END CERTIFICATE-----\n";

/// The private key of [`TEST_CERT_PEM`] (`quiche/examples/cert.key`). Public; tests only.
pub const TEST_KEY_PEM: &str = "-----BEGIN PRIVATE KEY-----\n\
MIIEvgIBADANBgkqhkiG9w0BAQEFAASCBKgwggSkAgEAAoIBAQDPls4vssP2SIhq\n\
BxWtmpnXdlxHQqEy7OxuupQttkrKoL64FGAg3Fgnss+cngs9i4K3+cBpDsItd8qD\n\
MAwW7x4grpQS9kDr7tvbQTiu86k9tMH9Pglthk1ArIz0ATCvqPQ/q8WCtZPtoHOG\n\
SaKoR7m+//tk4QZv4Bv5y8x6zN8FuT3efLMp01pS6H3nHv+nQ7DfXmenY9G6hPRB\n\
CcD3MT/15nclqHdw1mc25DoEMeWR6DNNXkmFhhuVGj+ma3YT0TSFr41axEt/dklR\n\
iGRhHdSoyW0Qq4uCUI5VYFs+Yp3ghlQ0ii2koxVBJVv1qA0EXj2Ef2IGE3d8Gbse\n\
nwoGmMkvAgMBAAECggEBAMtFkpUmablKgTnBwjqCvs47OlUVK6AgW8x5qwuwC0Cr\n\
ctXyLcc/vJry/1UPdVZIvDHGv+Cf8Qhw2r7nV49FiqzaBmki9aOR+3uRPB4kvr6L\n\
t8Fw8+5pqlAAJu3wFGqN+M44N2mswDPaAAWpKTu7MGmVY+f+aT03qG1MYOiGoISK\n\
gP6DHiinddD38spM2muyCUyFZk9a+aBEfaQzZoU3gc0yB6R/qBOWZ7NIoIUMicku\n\
Zf3L6/06uunyZp+ueR83j1YWbg3JoYKlGAuQtDRF709+MQrim8lKTnfuHiBeZKYZ\n\
GNLSo7lGjrp6ccSyfXmlA36hSfdlrWtZJ4+utZShftECgYEA+NNOFNa1BLfDw3ot\n\
a6L4W6FE45B32bLbnBdg8foyEYrwzHLPFCbws1Z60pNr7NaCHDIMiKVOXvKQa78d\n\
qdWuPUVJ83uVs9GI8tAo00RAvBn6ut9yaaLa8mIv6ZpfU20IgE5sDjB7IBY9tTVd\n\
EDyJcDuKQXzQ48qmEw86wINQMd0CgYEA1ZMdt7yLnpDiYa6M/BuKjp7PWKcRlzVM\n\
BcCEYHA4LJ6xEOH4y9DEx2y5ljwOcXgJhXAfAyGQr7s1xiP/nXurqfmdP8u7bawp\n\
VwuWJ8Vv0ZXITaU0isezG2Dpnseuion3qSraWlmWUlWLVVgKETZmk7cF7VIXa0NT\n\
LFREdObI5HsCgYBUbm8KRyi5Zxm4VNbgtTYM8ZYMmdLxPe2i85PjyAABT+IRncuC\n\
jQwT7n5Swc9XWBpiMuFp5J3JPgmfZgRMwsMS61YClqbfk3Qi4FtaBMjqiu43Rubt\n\
zWL56DNV0xoRlufRkcq8rdq5spJR0L+5aLFCMhHh0taW1QaxZPOMq4IkyQKBgQC3\n\
GetubGzewqPyzuz77ri5URm+jW0dT4ofnE9hRpRCXMK9EJ52TkOGHYZ2cIKJcTno\n\
dpl/27Tpk/ykJJSu9SnVDbVszkOf4OuIPty6uCAHdPxG5Q3ItTCulkVz5QmUqHf1\n\
RlHxB8FCUSilQFdRLmx+03h3X9vID+4soQoXlwxAJQKBgE5SQpN+TG5V+E4zHgNd\n\
6cy6gA5dGDJ0KbsgxJwlKTFA9nIcs2ssBxLY9U4x75EGuqpeVNmq6xwwmPtBs0rp\n\
M3W4zdFrZQ3BneFRW7WbSBbsUSprkJW/p4GXa17GzGUq/MDXlGhNlApP1nknzFvE\n\
xGaH0/H/TZxpLCogVP9npUkj\n\
-----END PRIVATE KEY-----\n";

/// [`TEST_CERT_PEM`] and [`TEST_KEY_PEM`] written to files (quiche loads PEM from paths), and
/// removed again when dropped — which can be as soon as a config has loaded them.
pub struct TestCert {
    cert: PathBuf,
    key: PathBuf,
}

impl TestCert {
    /// Writes the pair into the temporary directory under names unique to this process.
    pub fn new() -> std::io::Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let base = std::env::temp_dir().join(format!(
            "mimiq-test-cert-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let cert = base.with_extension("crt");
        let key = base.with_extension("key");
        std::fs::write(&cert, TEST_CERT_PEM)?;
        std::fs::write(&key, TEST_KEY_PEM)?;
        Ok(Self { cert, key })
    }

    /// Loads the pair into a server config.
    pub fn load_into(&self, config: &mut quiche::Config) -> Result<(), quiche::Error> {
        config.load_cert_chain_from_pem_file(&self.cert.to_string_lossy())?;
        config.load_priv_key_from_pem_file(&self.key.to_string_lossy())
    }
}

impl Drop for TestCert {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.cert);
        let _ = std::fs::remove_file(&self.key);
    }
}

/// The server half of CID upkeep, as quiche-server does it: issue random source CIDs while the
/// client accepts more. Returns the CIDs issued, for the caller's routing table.
pub fn issue_server_scids(
    conn: &mut quiche::Connection,
    rng: &SystemRandom,
) -> Vec<quiche::ConnectionId<'static>> {
    let mut issued = Vec::new();
    let len = conn.source_id().len().min(quiche::MAX_CONN_ID_LEN);
    if len == 0 {
        return issued;
    }
    while conn.scids_left() > 0 {
        let mut cid = [0u8; quiche::MAX_CONN_ID_LEN];
        let mut token = [0u8; 16];
        if rng.fill(&mut cid[..len]).is_err() || rng.fill(&mut token).is_err() {
            break;
        }
        let scid = quiche::ConnectionId::from_vec(cid[..len].to_vec());
        if conn
            .new_scid(&scid, u128::from_be_bytes(token), false)
            .is_err()
        {
            break;
        }
        issued.push(scid);
    }
    issued
}

/// Byte `offset` of every response body: a position-dependent pattern (period 251·256), so a
/// lost, duplicated or reordered chunk shows up as a mismatch.
pub fn body_byte(offset: u64) -> u8 {
    // Truncation to the low byte is the point; the value is < 251.
    ((offset.wrapping_mul(7) ^ (offset >> 8)) % 251) as u8
}

/// Fills `buf` with the body bytes starting at `offset`.
pub fn fill_body(offset: u64, buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = body_byte(offset + i as u64);
    }
}

/// The first offset (from `offset`) where `data` differs from the body pattern.
pub fn body_mismatch(offset: u64, data: &[u8]) -> Option<u64> {
    data.iter()
        .enumerate()
        .find(|&(i, &b)| b != body_byte(offset + i as u64))
        .map(|(i, _)| offset + i as u64)
}

/// A fresh random connection ID of `len` bytes (≤ 20).
pub fn random_cid(rng: &SystemRandom, len: usize) -> Option<quiche::ConnectionId<'static>> {
    let mut cid = vec![0u8; len.min(quiche::MAX_CONN_ID_LEN)];
    rng.fill(&mut cid).ok()?;
    Some(quiche::ConnectionId::from_vec(cid))
}

/// Settings of the test HTTP/3 server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct H3ServerConfig {
    /// Send `disable_active_migration` (a server that forbids clients to migrate). Default off.
    pub disable_active_migration: bool,
    /// `active_connection_id_limit` (ARCHITECTURE.md §6: at least 4). Default 8.
    pub active_cid_limit: u64,
    /// Largest body served; larger `/N` get 404. Default 100 MB.
    pub max_body_bytes: u64,
    /// QUIC idle timeout, in milliseconds. Default 30,000.
    pub idle_timeout_ms: u64,
    /// Forget each path a client left, retiring the client's connection ID used there, as
    /// soon as the client has left it ([`LeftPaths::at_once`]), as a conforming server may
    /// (RFC 9000 §5.1.2). Default off: a stock quiche server keeps a path per client address.
    pub retire_left_paths: bool,
}

impl Default for H3ServerConfig {
    fn default() -> Self {
        Self {
            disable_active_migration: false,
            active_cid_limit: 8,
            max_body_bytes: 100_000_000,
            idle_timeout_ms: 30_000,
            retire_left_paths: false,
        }
    }
}

/// What the server saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct H3ServerStats {
    /// Connections accepted.
    pub connections: u64,
    /// Requests received.
    pub requests: u64,
    /// Responses whose body was handed to quiche completely (with fin).
    pub responses_completed: u64,
    /// Body bytes handed to quiche.
    pub body_bytes: u64,
    /// Requests answered 404 (bad path, too large, not GET).
    pub not_found: u64,
    /// Datagrams dropped before reaching a connection (unparsable, unknown CID, not Initial).
    pub dropped: u64,
    /// Datagrams a connection refused (`recv` error).
    pub rx_rejected: u64,
    /// `PeerMigrated` events: times a client moved its connection to a new address.
    pub peer_migrations: u64,
    /// Distinct client addresses seen.
    pub client_addresses: u64,
    /// `ReusedSourceConnectionId` events: a client sent with one of the server's CIDs from a
    /// second address (RFC 9000 §9.5 forbids it; a MIMIQ client must never do it).
    pub reused_cids: u64,
    /// Paths a client left that the server forgot ([`H3ServerConfig::retire_left_paths`]).
    pub paths_forgotten: u64,
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum H3ServerError {
    /// The socket could not be bound or set up.
    #[error("server socket {addr}: {error}")]
    Socket {
        /// The address.
        addr: SocketAddr,
        /// What failed.
        error: std::io::Error,
    },
    /// quiche refused the config or the certificate.
    #[error("server config: {0}")]
    Config(quiche::Error),
    /// The HTTP/3 config could not be built.
    #[error("h3 config: {0}")]
    H3(quiche::h3::Error),
}

/// A minimal HTTP/3 server. See the module docs.
pub struct H3Server {
    socket: UdpSocket,
    addr: SocketAddr,
    quic: quiche::Config,
    h3: quiche::h3::Config,
    rng: SystemRandom,
    conns: HashMap<u64, ServerConn>,
    routes: HashMap<quiche::ConnectionId<'static>, u64>,
    next_conn: u64,
    config: H3ServerConfig,
    peers: HashSet<SocketAddr>,
    stats: H3ServerStats,
    /// Why each closed connection closed, in order.
    closes: Vec<String>,
    buf: Vec<u8>,
    out: Vec<u8>,
    scratch: Vec<u8>,
}

struct ServerConn {
    conn: quiche::Connection,
    h3: Option<quiche::h3::Connection>,
    /// Responses still being written, by stream.
    responses: HashMap<u64, Response>,
    /// Every CID routed to this connection (removed from the routes when it closes).
    cids: Vec<quiche::ConnectionId<'static>>,
    /// Paths the client left, when the server forgets them.
    left: Option<LeftPaths>,
}

#[derive(Debug, Clone, Copy)]
struct Response {
    status: u16,
    len: u64,
    written: u64,
    headers_sent: bool,
}

const NOT_FOUND_BODY: &[u8] = b"not found\n";

impl H3Server {
    /// Binds `addr` and loads `cert`.
    pub fn bind(
        addr: SocketAddr,
        cert: &TestCert,
        config: H3ServerConfig,
    ) -> Result<Self, H3ServerError> {
        let socket =
            UdpSocket::bind(addr).map_err(|error| H3ServerError::Socket { addr, error })?;
        let addr = socket
            .local_addr()
            .map_err(|error| H3ServerError::Socket { addr, error })?;
        let mut quic =
            quiche::Config::new(quiche::PROTOCOL_VERSION).map_err(H3ServerError::Config)?;
        cert.load_into(&mut quic).map_err(H3ServerError::Config)?;
        quic.set_application_protos(quiche::h3::APPLICATION_PROTOCOL)
            .map_err(H3ServerError::Config)?;
        // quiche's example server settings, plus the CID limit.
        quic.set_max_idle_timeout(config.idle_timeout_ms);
        quic.set_max_recv_udp_payload_size(1350);
        quic.set_max_send_udp_payload_size(1350);
        quic.set_initial_max_data(10_000_000);
        quic.set_initial_max_stream_data_bidi_local(1_000_000);
        quic.set_initial_max_stream_data_bidi_remote(1_000_000);
        quic.set_initial_max_stream_data_uni(1_000_000);
        quic.set_initial_max_streams_bidi(100);
        quic.set_initial_max_streams_uni(100);
        quic.set_active_connection_id_limit(config.active_cid_limit);
        quic.set_disable_active_migration(config.disable_active_migration);
        let h3 = quiche::h3::Config::new().map_err(H3ServerError::H3)?;
        Ok(Self {
            socket,
            addr,
            quic,
            h3,
            rng: SystemRandom::new(),
            conns: HashMap::new(),
            routes: HashMap::new(),
            next_conn: 0,
            config,
            peers: HashSet::new(),
            stats: H3ServerStats::default(),
            closes: Vec::new(),
            buf: vec![0; 65_535],
            out: vec![0; 1_500],
            scratch: vec![0; 64 * 1024],
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Counters so far.
    pub fn stats(&self) -> H3ServerStats {
        self.stats
    }

    /// Why each connection closed so far (see [`close_reason`]), oldest first.
    pub fn closes(&self) -> &[String] {
        &self.closes
    }

    /// Serves until `stop` is set (checked at least every 50 ms).
    pub fn run(&mut self, stop: &AtomicBool) -> std::io::Result<()> {
        while !stop.load(Ordering::Relaxed) {
            self.run_once(Duration::from_millis(50))?;
        }
        Ok(())
    }

    /// One turn: waits up to `max_wait` (or the next connection timer) for datagrams, handles
    /// all that arrived, runs timers, serves requests and sends.
    pub fn run_once(&mut self, max_wait: Duration) -> std::io::Result<()> {
        let wait = self
            .conns
            .values()
            .filter_map(|c| c.conn.timeout())
            .min()
            .map_or(max_wait, |t| t.min(max_wait))
            .max(Duration::from_micros(100));
        self.socket.set_nonblocking(false)?;
        self.socket.set_read_timeout(Some(wait))?;
        let mut first = true;
        loop {
            let (len, from) = match self.socket.recv_from(&mut self.buf) {
                Ok(v) => v,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    break
                }
                // ICMP errors surface as ConnectionRefused on the next read; ignore them.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => continue,
                Err(e) => return Err(e),
            };
            if first {
                first = false;
                self.socket.set_nonblocking(true)?;
            }
            self.handle_datagram(len, from);
        }
        let ids: Vec<u64> = self.conns.keys().copied().collect();
        for id in ids {
            self.service(id)?;
        }
        self.collect_closed();
        Ok(())
    }

    fn handle_datagram(&mut self, len: usize, from: SocketAddr) {
        let pkt = &mut self.buf[..len];
        let Ok(hdr) = quiche::Header::from_slice(pkt, quiche::MAX_CONN_ID_LEN) else {
            self.stats.dropped += 1;
            return;
        };
        let id = match self.routes.get(&hdr.dcid) {
            Some(&id) => id,
            None => {
                if hdr.ty != quiche::Type::Initial {
                    self.stats.dropped += 1;
                    return;
                }
                if !quiche::version_is_supported(hdr.version) {
                    if let Ok(n) = quiche::negotiate_version(&hdr.scid, &hdr.dcid, &mut self.out) {
                        let _ = self.socket.send_to(&self.out[..n], from);
                    }
                    return;
                }
                let Some(scid) = random_cid(&self.rng, quiche::MAX_CONN_ID_LEN) else {
                    self.stats.dropped += 1;
                    return;
                };
                let Ok(conn) = quiche::accept(&scid, None, self.addr, from, &mut self.quic) else {
                    self.stats.dropped += 1;
                    return;
                };
                let id = self.next_conn;
                self.next_conn += 1;
                self.stats.connections += 1;
                let odcid = hdr.dcid.clone().into_owned();
                self.routes.insert(scid.clone(), id);
                self.routes.insert(odcid.clone(), id);
                self.conns.insert(
                    id,
                    ServerConn {
                        conn,
                        h3: None,
                        responses: HashMap::new(),
                        cids: vec![scid, odcid],
                        left: self.config.retire_left_paths.then(LeftPaths::at_once),
                    },
                );
                id
            }
        };
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        if self.peers.insert(from) {
            self.stats.client_addresses += 1;
        }
        let info = quiche::RecvInfo {
            from,
            to: self.addr,
        };
        if c.conn.recv(&mut self.buf[..len], info).is_err() {
            self.stats.rx_rejected += 1;
        }
    }

    /// Timers, CIDs, path events, HTTP/3, sending — for one connection.
    fn service(&mut self, id: u64) -> std::io::Result<()> {
        let Some(c) = self.conns.get_mut(&id) else {
            return Ok(());
        };
        if c.conn.timeout() == Some(Duration::ZERO) {
            c.conn.on_timeout();
        }
        if c.conn.is_established() {
            // As quiche-server: "Provides as many CIDs as possible."
            for cid in issue_server_scids(&mut c.conn, &self.rng) {
                self.routes.insert(cid.clone(), id);
                c.cids.push(cid);
            }
        }
        while let Some(retired) = c.conn.retired_scid_next() {
            self.routes.remove(&retired);
            c.cids.retain(|x| *x != retired);
        }
        let now = Instant::now();
        while let Some(event) = c.conn.path_event_next() {
            if let Some(left) = c.left.as_mut() {
                left.on_event(&event, now);
            }
            match event {
                quiche::PathEvent::PeerMigrated(..) => self.stats.peer_migrations += 1,
                quiche::PathEvent::ReusedSourceConnectionId(..) => self.stats.reused_cids += 1,
                _ => {}
            }
        }
        if let Some(left) = c.left.as_mut() {
            self.stats.paths_forgotten += left.forget(&mut c.conn, now) as u64;
        }
        if (c.conn.is_established() || c.conn.is_in_early_data()) && c.h3.is_none() {
            match quiche::h3::Connection::with_transport(&mut c.conn, &self.h3) {
                Ok(h3) => c.h3 = Some(h3),
                Err(_) => {
                    let _ = c.conn.close(false, 0x1, b"h3 setup");
                }
            }
        }
        if let Some(h3) = c.h3.as_mut() {
            loop {
                match h3.poll(&mut c.conn) {
                    Ok((stream, quiche::h3::Event::Headers { list, .. })) => {
                        self.stats.requests += 1;
                        let (status, len) = route(&list, self.config.max_body_bytes);
                        if status != 200 {
                            self.stats.not_found += 1;
                        }
                        // The response depends on the headers only; ignore any request body.
                        let _ = c.conn.stream_shutdown(stream, quiche::Shutdown::Read, 0);
                        c.responses.insert(
                            stream,
                            Response {
                                status,
                                len,
                                written: 0,
                                headers_sent: false,
                            },
                        );
                    }
                    Ok(_) => {}
                    Err(quiche::h3::Error::Done) => break,
                    Err(_) => {
                        let _ = c.conn.close(false, 0x1, b"h3 error");
                        break;
                    }
                }
            }
            let streams: Vec<u64> = c.responses.keys().copied().collect();
            for stream in streams {
                let done = write_response(
                    &mut c.conn,
                    h3,
                    stream,
                    c.responses.get_mut(&stream),
                    &mut self.scratch,
                    &mut self.stats,
                );
                if done {
                    c.responses.remove(&stream);
                }
            }
        }
        loop {
            let (n, info) = match c.conn.send(&mut self.out) {
                Ok(v) => v,
                Err(quiche::Error::Done) => break,
                Err(e) => {
                    // As quiche's servers do: a failed send ends the connection.
                    let reason = format!("send failed: {e:?}");
                    let _ = c.conn.close(false, 0x1, reason.as_bytes());
                    break;
                }
            };
            match self.socket.send_to(&self.out[..n], info.to) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                // A vanished client address: the datagram is lost, QUIC recovers.
                Err(_) => {}
            }
        }
        Ok(())
    }

    fn collect_closed(&mut self) {
        let closed: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| c.conn.is_closed())
            .map(|(&id, _)| id)
            .collect();
        for id in closed {
            if let Some(c) = self.conns.remove(&id) {
                for cid in &c.cids {
                    self.routes.remove(cid);
                }
                self.closes.push(close_reason(&c.conn));
            }
        }
    }
}

/// `GET /N` with `N <= max` → (200, N); anything else → (404, not-found body).
fn route(headers: &[quiche::h3::Header], max: u64) -> (u16, u64) {
    let mut method = None;
    let mut path = None;
    for h in headers {
        match h.name() {
            b":method" => method = Some(h.value()),
            b":path" => path = Some(h.value()),
            _ => {}
        }
    }
    let len = path
        .and_then(|p| p.strip_prefix(b"/"))
        .and_then(|p| std::str::from_utf8(p).ok())
        .and_then(|p| p.parse::<u64>().ok())
        .filter(|&n| n <= max);
    match (method, len) {
        (Some(b"GET"), Some(n)) => (200, n),
        _ => (404, NOT_FOUND_BODY.len() as u64),
    }
}

/// Writes as much of a response as quiche takes; `true` once it is complete.
fn write_response(
    conn: &mut quiche::Connection,
    h3: &mut quiche::h3::Connection,
    stream: u64,
    response: Option<&mut Response>,
    scratch: &mut [u8],
    stats: &mut H3ServerStats,
) -> bool {
    let Some(r) = response else {
        return true;
    };
    if !r.headers_sent {
        let status = r.status.to_string();
        let len = r.len.to_string();
        let headers = [
            quiche::h3::Header::new(b":status", status.as_bytes()),
            quiche::h3::Header::new(b"server", b"mimiq-h3-test"),
            quiche::h3::Header::new(b"content-length", len.as_bytes()),
        ];
        match h3.send_response(conn, stream, &headers, r.len == 0) {
            Ok(()) => r.headers_sent = true,
            Err(quiche::h3::Error::StreamBlocked) | Err(quiche::h3::Error::Done) => return false,
            // The stream is gone (reset by the client): nothing more to write.
            Err(_) => return true,
        }
        if r.len == 0 {
            stats.responses_completed += 1;
            return true;
        }
    }
    while r.written < r.len {
        let chunk = usize::try_from(r.len - r.written)
            .unwrap_or(usize::MAX)
            .min(scratch.len());
        if r.status == 200 {
            fill_body(r.written, &mut scratch[..chunk]);
        } else {
            let start = usize::try_from(r.written)
                .unwrap_or(0)
                .min(NOT_FOUND_BODY.len());
            scratch[..chunk].copy_from_slice(&NOT_FOUND_BODY[start..start + chunk]);
        }
        let fin = r.written + chunk as u64 == r.len;
        match h3.send_body(conn, stream, &scratch[..chunk], fin) {
            Ok(n) => {
                r.written += n as u64;
                stats.body_bytes += n as u64;
                if n < chunk {
                    return false;
                }
            }
            Err(quiche::h3::Error::Done) | Err(quiche::h3::Error::StreamBlocked) => return false,
            Err(_) => return true,
        }
    }
    stats.responses_completed += 1;
    true
}

/// What a run of GETs achieved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GetReport {
    /// Responses received complete, status 200, byte-exact.
    pub responses: u64,
    /// Body bytes received and checked.
    pub body_bytes: u64,
    /// From the first request to the last response.
    pub elapsed: Duration,
    /// Until the handshake completed.
    pub handshake: Duration,
    /// Hops that completed after a request was sent and before its first body byte arrived
    /// (between one response and the next).
    pub hops_between_bodies: u64,
    /// Hops that completed while a response body was partly received.
    pub hops_during_bodies: u64,
}

/// Why a run of GETs stopped.
#[derive(Debug, thiserror::Error)]
pub enum GetError {
    /// The I/O shell failed.
    #[error("direct mode: {0}")]
    Direct(#[from] DirectError),
    /// HTTP/3 failed.
    #[error("http/3: {0}")]
    H3(quiche::h3::Error),
    /// The handshake or the run did not finish in time.
    #[error("timed out after {completed} responses")]
    TimedOut {
        /// Responses completed before the deadline.
        completed: u64,
    },
    /// The connection closed under the run.
    #[error("connection closed after {completed} responses: {reason}")]
    Closed {
        /// Responses completed.
        completed: u64,
        /// Who closed it and why (quiche's local or peer error), or "idle timeout".
        reason: String,
    },
    /// A response had another status than 200.
    #[error("request {request}: status {status}")]
    Status {
        /// Index of the request.
        request: usize,
        /// The status received.
        status: String,
    },
    /// A body byte differed from the pattern.
    #[error("request {request}: body differs at byte {offset}")]
    Mismatch {
        /// Index of the request.
        request: usize,
        /// First differing offset.
        offset: u64,
    },
    /// A body ended at the wrong length.
    #[error("request {request}: body of {got} bytes, expected {expected}")]
    Length {
        /// Index of the request.
        request: usize,
        /// The size asked for.
        expected: u64,
        /// The size received.
        got: u64,
    },
    /// The stream was reset.
    #[error("request {request}: stream reset ({code})")]
    Reset {
        /// Index of the request.
        request: usize,
        /// The error code.
        code: u64,
    },
}

/// GETs `/N` for each `N` in `sizes`, one after the other, over `direct` (which hops as its
/// strategy says), checking every body byte for byte; gives up after `deadline`.
pub fn run_gets(
    direct: &mut DirectConnection,
    authority: &str,
    sizes: &[u64],
    deadline: Duration,
) -> Result<GetReport, GetError> {
    run_gets_until_hops(direct, authority, sizes, 0, deadline)
}

/// [`run_gets`], then GETs `sizes` again from the start, as often as it takes, until the
/// connection has completed `min_hops` hops in all. How many hops a run of GETs sees depends on
/// how busy the machine is (a hop waits a round trip for its probe, and requests that arrive
/// meanwhile are not started), so a test that needs a number of hops runs until it has them;
/// [`GetReport::responses`] says how many GETs that took (request `i` asked for
/// `sizes[i % sizes.len()]` bytes).
pub fn run_gets_until_hops(
    direct: &mut DirectConnection,
    authority: &str,
    sizes: &[u64],
    min_hops: u64,
    deadline: Duration,
) -> Result<GetReport, GetError> {
    let start = Instant::now();
    let mut report = GetReport::default();
    let mut h3 = handshake(direct, start, deadline, &mut report)?;
    let first_request = Instant::now();
    let mut buf = vec![0u8; 64 * 1024];
    for (request, &size) in sizes.iter().cycle().enumerate() {
        if request >= sizes.len() && direct.migration_stats().hops_completed >= min_hops {
            break;
        }
        let mut get = Get {
            h3: &mut h3,
            buf: &mut buf,
            authority,
            start,
            deadline,
        };
        get.one(direct, request, size, &mut report, &mut |_| {})?;
    }
    report.elapsed = first_request.elapsed();
    Ok(report)
}

/// One GET of [`run_timed_gets`]: when it was sent and when its body had arrived complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimedGet {
    /// Just before the request was handed to quiche.
    pub sent: Instant,
    /// When the response's `Finished` event was read.
    pub finished: Instant,
}

/// What [`run_timed_gets`] measured.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TimedGets {
    /// The totals, as [`run_gets`] reports them.
    pub report: GetReport,
    /// Every GET, in order.
    pub gets: Vec<TimedGet>,
    /// When each completed hop was seen to have switched the connection (right after the
    /// [`DirectConnection::poll`] in which the migrator switched), in order.
    pub switches: Vec<Instant>,
}

/// GETs `/size` again and again, one after the other, for `run_for` (the last GET started
/// before then is completed), timing each one; `before_request(direct, i)` runs just before
/// GET number `i` is sent (to request hops at request boundaries, say) and ends the run early
/// by returning `false`. Bodies are checked byte for byte. Gives up after `deadline` from the
/// start (handshake included).
pub fn run_timed_gets(
    direct: &mut DirectConnection,
    authority: &str,
    size: u64,
    run_for: Duration,
    deadline: Duration,
    before_request: &mut dyn FnMut(&mut DirectConnection, usize) -> bool,
) -> Result<TimedGets, GetError> {
    let start = Instant::now();
    let mut out = TimedGets::default();
    let mut h3 = handshake(direct, start, deadline, &mut out.report)?;
    let first_request = Instant::now();
    let mut buf = vec![0u8; 64 * 1024];
    let mut request = 0;
    while first_request.elapsed() < run_for {
        if !before_request(direct, request) {
            break;
        }
        let sent = Instant::now();
        let mut get = Get {
            h3: &mut h3,
            buf: &mut buf,
            authority,
            start,
            deadline,
        };
        let switches = &mut out.switches;
        get.one(direct, request, size, &mut out.report, &mut |at| {
            switches.push(at)
        })?;
        out.gets.push(TimedGet {
            sent,
            finished: Instant::now(),
        });
        request += 1;
    }
    out.report.elapsed = first_request.elapsed();
    Ok(out)
}

/// Waits for the handshake and opens HTTP/3 on the connection.
fn handshake(
    direct: &mut DirectConnection,
    start: Instant,
    deadline: Duration,
    report: &mut GetReport,
) -> Result<quiche::h3::Connection, GetError> {
    let tick = Duration::from_millis(20);
    while !direct.connection().is_established() {
        if direct.connection().is_closed() {
            return Err(GetError::Closed {
                completed: 0,
                reason: close_reason(direct.connection()),
            });
        }
        if start.elapsed() > deadline {
            return Err(GetError::TimedOut { completed: 0 });
        }
        direct.poll(tick)?;
    }
    report.handshake = start.elapsed();
    let h3_config = quiche::h3::Config::new().map_err(GetError::H3)?;
    quiche::h3::Connection::with_transport(direct.connection_mut(), &h3_config)
        .map_err(GetError::H3)
}

/// What one GET needs besides the connection.
struct Get<'a> {
    h3: &'a mut quiche::h3::Connection,
    buf: &'a mut Vec<u8>,
    authority: &'a str,
    start: Instant,
    deadline: Duration,
}

impl Get<'_> {
    /// GETs `/size` (request number `request`), checks the body, counts it in `report`, and
    /// calls `on_switch(now)` for each hop that completed meanwhile.
    fn one(
        &mut self,
        direct: &mut DirectConnection,
        request: usize,
        size: u64,
        report: &mut GetReport,
        on_switch: &mut dyn FnMut(Instant),
    ) -> Result<(), GetError> {
        let tick = Duration::from_millis(20);
        let path = format!("/{size}");
        let headers = [
            quiche::h3::Header::new(b":method", b"GET"),
            quiche::h3::Header::new(b":scheme", b"https"),
            quiche::h3::Header::new(b":authority", self.authority.as_bytes()),
            quiche::h3::Header::new(b":path", path.as_bytes()),
            quiche::h3::Header::new(b"user-agent", b"mimiq-direct"),
        ];
        let h3 = &mut *self.h3;
        let buf = &mut *self.buf;
        let stream = loop {
            match h3.send_request(direct.connection_mut(), &headers, true) {
                Ok(id) => break id,
                Err(quiche::h3::Error::StreamBlocked)
                | Err(quiche::h3::Error::TransportError(quiche::Error::StreamLimit))
                | Err(quiche::h3::Error::Done) => {
                    check_alive(direct, self.start, self.deadline, report.responses)?;
                    let before = direct.migration_stats().hops_completed;
                    direct.poll(tick)?;
                    let now = Instant::now();
                    for _ in before..direct.migration_stats().hops_completed {
                        on_switch(now);
                    }
                }
                Err(e) => return Err(GetError::H3(e)),
            }
        };
        let mut got: u64 = 0;
        let mut finished = false;
        while !finished {
            loop {
                match h3.poll(direct.connection_mut()) {
                    Ok((id, quiche::h3::Event::Headers { list, .. })) if id == stream => {
                        let status = list
                            .iter()
                            .find(|h| h.name() == b":status")
                            .map(|h| String::from_utf8_lossy(h.value()).into_owned())
                            .unwrap_or_default();
                        if status != "200" {
                            return Err(GetError::Status { request, status });
                        }
                    }
                    Ok((id, quiche::h3::Event::Data)) if id == stream => {
                        while let Ok(n) = h3.recv_body(direct.connection_mut(), stream, buf) {
                            if let Some(offset) = body_mismatch(got, &buf[..n]) {
                                return Err(GetError::Mismatch { request, offset });
                            }
                            got += n as u64;
                        }
                    }
                    Ok((id, quiche::h3::Event::Finished)) if id == stream => {
                        finished = true;
                    }
                    Ok((id, quiche::h3::Event::Reset(code))) if id == stream => {
                        return Err(GetError::Reset { request, code });
                    }
                    Ok(_) => {}
                    Err(quiche::h3::Error::Done) => break,
                    Err(e) => return Err(GetError::H3(e)),
                }
            }
            if !finished {
                check_alive(direct, self.start, self.deadline, report.responses)?;
                let before = direct.migration_stats().hops_completed;
                direct.poll(tick)?;
                let now = Instant::now();
                let hops = direct.migration_stats().hops_completed - before;
                for _ in 0..hops {
                    on_switch(now);
                }
                if got == 0 {
                    report.hops_between_bodies += hops;
                } else {
                    report.hops_during_bodies += hops;
                }
            }
        }
        if got != size {
            return Err(GetError::Length {
                request,
                expected: size,
                got,
            });
        }
        report.responses += 1;
        report.body_bytes += got;
        Ok(())
    }
}

fn check_alive(
    direct: &DirectConnection,
    start: Instant,
    deadline: Duration,
    completed: u64,
) -> Result<(), GetError> {
    if direct.connection().is_closed() {
        return Err(GetError::Closed {
            completed,
            reason: close_reason(direct.connection()),
        });
    }
    if start.elapsed() > deadline {
        return Err(GetError::TimedOut { completed });
    }
    Ok(())
}

pub use mimiq_masque::quic::close_reason;

/// A quiche client config for [`run_gets`] against [`H3Server`]: h3 ALPN, the server's
/// flow-control windows, certificate verification off (the test identity), and a CID limit
/// for hopping among `addresses` addresses.
pub fn client_config(addresses: usize) -> Result<quiche::Config, quiche::Error> {
    let mut c = quiche::Config::new(quiche::PROTOCOL_VERSION)?;
    c.set_application_protos(quiche::h3::APPLICATION_PROTOCOL)?;
    c.verify_peer(false);
    c.set_max_idle_timeout(30_000);
    c.set_max_recv_udp_payload_size(1350);
    c.set_max_send_udp_payload_size(1350);
    c.set_initial_max_data(10_000_000);
    c.set_initial_max_stream_data_bidi_local(1_000_000);
    c.set_initial_max_stream_data_bidi_remote(1_000_000);
    c.set_initial_max_stream_data_uni(1_000_000);
    c.set_initial_max_streams_bidi(100);
    c.set_initial_max_streams_uni(100);
    c.set_active_connection_id_limit(mimiq_agent::migrate::recommended_active_cid_limit(
        addresses,
    ));
    // The test server runs on loopback or in namespaces (round trips well under a millisecond).
    // A new path's RTT is this estimate until its first sample, and a probe is sent again only
    // after a probe timeout of the new path: with quiche's default (333 ms, RFC 9002 §6.2.2)
    // a probe lost on a busy machine held its hop for about a second, longer than a whole
    // run of GETs.
    c.set_initial_rtt(std::time::Duration::from_millis(20));
    Ok(c)
}
