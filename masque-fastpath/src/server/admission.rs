//! What the proxy does with a datagram for no connection it knows, before any state is kept for
//! it (RFC 9000 §8 address validation, §10.3 stateless reset, §14.1 datagram size, §6 version
//! negotiation). Pure decisions over bytes, addresses and time: no socket, no clock of its own,
//! so every rule is unit-tested without root.
//!
//! - An Initial must come in a UDP datagram of at least 1200 bytes (RFC 9000 §14.1); smaller
//!   ones are dropped unanswered, so a flood of small Initials draws nothing.
//! - With Retry on (always, or when handshakes in flight pass a threshold), an Initial without
//!   a valid token is answered with a Retry (RFC 9000 §8.1.2) carrying a token bound to the
//!   client's address, the time, and the client's original destination ID, authenticated with
//!   HMAC-SHA256 under a key that rotates (the previous key is still accepted). The Retry is a
//!   few dozen bytes: no state, no amplification, and only a client that receives at its
//!   address can come back with the token.
//! - Half-open connections (handshake not done) are capped apart from established ones, and
//!   closed after a handshake timeout, so spoofed Initials cannot fill `max_connections`.
//! - Version Negotiation answers only datagrams of at least 1200 bytes (RFC 9000 §6.1 and
//!   §14.1), at a bounded rate.
//! - A short-header packet for an unknown connection ID draws a stateless reset (RFC 9000
//!   §10.3) whose token is HMAC(reset key, connection ID) truncated to 16 bytes: the same key
//!   gives the same tokens in every process that reads it, so a restarted proxy tells a client
//!   at once that its connection is gone. Resets are smaller than what triggered them (no
//!   loops, no amplification), never under 21 bytes, and rate-limited.

use std::fs;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use serde::Deserialize;

use crate::quic::CID_LEN;

/// The smallest UDP payload that may carry a client's Initial (RFC 9000 §14.1).
pub const MIN_INITIAL_DATAGRAM: usize = 1200;
/// A stateless reset is at least this long: 5 unpredictable bytes and the 16-byte token
/// (RFC 9000 §10.3).
const MIN_RESET_LEN: usize = 21;
/// RFC 9000 §10.3: a reset answering a packet of up to 43 bytes is one byte shorter; longer
/// triggers get a reset of this size (it must look like a short-header packet).
const RESET_LEN: usize = 43;
/// Bytes of the HMAC kept in a Retry token.
const TOKEN_TAG_LEN: usize = 16;
/// How long a Retry token is accepted after it was minted.
const TOKEN_LIFETIME: Duration = Duration::from_secs(10);
/// How often the Retry token key is replaced (the previous one is still accepted).
const TOKEN_KEY_ROTATION: Duration = Duration::from_secs(60);
/// Bytes of a reset key file.
pub const RESET_KEY_LEN: usize = 32;

/// When the proxy answers Initials with a Retry (`[quic] retry`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RetryMode {
    /// Every new client's address is validated with a Retry first (one more round trip).
    Always,
    /// Only while the half-open connections reach `quic.retry_threshold` (an Initial flood).
    #[default]
    Auto,
    /// Never: every Initial of a valid size is accepted up to `quic.max_half_open`.
    Never,
}

/// The stateless reset key: tokens are HMAC-SHA256(key, connection ID), first 16 bytes.
pub struct ResetKey(hmac::Key);

impl ResetKey {
    /// A key from raw bytes (at least [`RESET_KEY_LEN`]).
    pub fn from_bytes(bytes: &[u8]) -> ResetKey {
        ResetKey(hmac::Key::new(hmac::HMAC_SHA256, bytes))
    }

    /// A key for this process only (no `reset_key_file`): resets work while it runs, not
    /// across a restart.
    pub fn random(rng: &SystemRandom) -> ResetKey {
        let mut bytes = [0u8; RESET_KEY_LEN];
        rng.fill(&mut bytes).expect("OS randomness");
        ResetKey::from_bytes(&bytes)
    }

    /// Reads the key from `path`, or creates the file (mode 0600) with a fresh random key when
    /// it does not exist, so that the next start, and every other worker, reads the same key.
    pub fn load_or_create(path: &Path, rng: &SystemRandom) -> Result<ResetKey, String> {
        match fs::read(path) {
            Ok(bytes) if bytes.len() >= RESET_KEY_LEN => Ok(ResetKey::from_bytes(&bytes)),
            Ok(bytes) => Err(format!(
                "quic.reset_key_file {}: {} bytes, a key needs at least {RESET_KEY_LEN}",
                path.display(),
                bytes.len()
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut bytes = [0u8; RESET_KEY_LEN];
                rng.fill(&mut bytes).expect("OS randomness");
                let written = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)
                    .and_then(|mut f| f.write_all(&bytes).and_then(|()| f.sync_all()));
                match written {
                    Ok(()) => Ok(ResetKey::from_bytes(&bytes)),
                    // Another process created it first: read what it wrote.
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        Self::load_or_create(path, rng)
                    }
                    Err(e) => Err(format!(
                        "quic.reset_key_file {}: cannot create: {e}",
                        path.display()
                    )),
                }
            }
            Err(e) => Err(format!(
                "quic.reset_key_file {}: cannot read: {e}",
                path.display()
            )),
        }
    }

    /// The stateless reset token of connection ID `cid`.
    pub fn token(&self, cid: &[u8]) -> u128 {
        let tag = self.derive(cid);
        let mut token = [0u8; 16];
        token.copy_from_slice(&tag[..16]);
        u128::from_be_bytes(token)
    }

    /// HMAC-SHA256(key, `input`): a secret derived from the key (the route table,
    /// `server/route.rs`, is drawn from these).
    pub fn derive(&self, input: &[u8]) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(hmac::sign(&self.0, input).as_ref());
        out
    }

    /// Writes a stateless reset for a packet of `trigger_len` bytes sent to `cid` into `out`;
    /// `None` when the trigger is too short to answer with a smaller reset (RFC 9000 §10.3).
    pub fn reset(
        &self,
        cid: &[u8],
        trigger_len: usize,
        rng: &SystemRandom,
        out: &mut [u8],
    ) -> Option<usize> {
        let len = trigger_len.checked_sub(1)?.min(RESET_LEN);
        if len < MIN_RESET_LEN || out.len() < len {
            return None;
        }
        let out = &mut out[..len];
        rng.fill(out).expect("OS randomness");
        // A short header: form bit 0, fixed bit 1, the rest unpredictable (RFC 9000 §10.3).
        out[0] = (out[0] & 0x3f) | 0x40;
        out[len - 16..].copy_from_slice(&self.token(cid).to_be_bytes());
        Some(len)
    }
}

/// Retry tokens (RFC 9000 §8.1.2): `issued (u64 seconds) | odcid length | odcid | tag`, the tag
/// HMAC-SHA256 over the client's address, the connection ID the Retry gave it (its next
/// Initial's destination, which becomes the connection's first ID: a client cannot choose it)
/// and the rest, under a key replaced every minute.
pub struct RetryTokens {
    current: hmac::Key,
    previous: Option<hmac::Key>,
    rotated: Instant,
    /// The clock tokens carry: seconds since this instant.
    epoch: Instant,
}

impl RetryTokens {
    /// Fresh keys.
    pub fn new(rng: &SystemRandom, now: Instant) -> RetryTokens {
        RetryTokens {
            current: random_key(rng),
            previous: None,
            rotated: now,
            epoch: now,
        }
    }

    /// Replaces the key when it is due (the previous one stays valid one more period).
    pub fn rotate(&mut self, rng: &SystemRandom, now: Instant) {
        if now.duration_since(self.rotated) >= TOKEN_KEY_ROTATION {
            self.previous = Some(std::mem::replace(&mut self.current, random_key(rng)));
            self.rotated = now;
        }
    }

    /// A token for a client at `peer` whose first Initial went to `odcid`, told by the Retry to
    /// use `retry_scid`.
    pub fn mint(&self, peer: SocketAddr, odcid: &[u8], retry_scid: &[u8], now: Instant) -> Vec<u8> {
        let issued = now.duration_since(self.epoch).as_secs();
        let mut token = Vec::with_capacity(9 + odcid.len() + TOKEN_TAG_LEN);
        token.extend_from_slice(&issued.to_be_bytes());
        token.push(odcid.len() as u8);
        token.extend_from_slice(odcid);
        let tag = sign(&self.current, peer, retry_scid, &token);
        token.extend_from_slice(&tag.as_ref()[..TOKEN_TAG_LEN]);
        token
    }

    /// The original destination connection ID a token from `peer`, in an Initial sent to
    /// `dcid`, carries, if the token is ours, for this address and ID, and not expired.
    pub fn validate(
        &self,
        peer: SocketAddr,
        dcid: &[u8],
        token: &[u8],
        now: Instant,
    ) -> Option<Vec<u8>> {
        let body_len = token.len().checked_sub(TOKEN_TAG_LEN)?;
        let (body, tag) = token.split_at(body_len);
        let issued = u64::from_be_bytes(body.get(..8)?.try_into().ok()?);
        let odcid_len = usize::from(*body.get(8)?);
        let odcid = body.get(9..)?;
        if odcid.len() != odcid_len || odcid_len > quiche::MAX_CONN_ID_LEN {
            return None;
        }
        let authentic = [Some(&self.current), self.previous.as_ref()]
            .into_iter()
            .flatten()
            .any(|key| sign(key, peer, dcid, body).as_ref()[..TOKEN_TAG_LEN] == *tag);
        let age = now
            .duration_since(self.epoch)
            .as_secs()
            .checked_sub(issued)?;
        (authentic && age <= TOKEN_LIFETIME.as_secs()).then(|| odcid.to_vec())
    }
}

fn random_key(rng: &SystemRandom) -> hmac::Key {
    let mut bytes = [0u8; 32];
    rng.fill(&mut bytes).expect("OS randomness");
    hmac::Key::new(hmac::HMAC_SHA256, &bytes)
}

fn sign(key: &hmac::Key, peer: SocketAddr, dcid: &[u8], body: &[u8]) -> hmac::Tag {
    let mut ctx = hmac::Context::with_key(key);
    match peer.ip() {
        IpAddr::V4(a) => ctx.update(&a.octets()),
        IpAddr::V6(a) => ctx.update(&a.octets()),
    }
    ctx.update(&peer.port().to_be_bytes());
    ctx.update(&[dcid.len() as u8]);
    ctx.update(dcid);
    ctx.update(body);
    ctx.sign()
}

/// A token bucket: at most `rate` events per second, in bursts of up to `rate`; 0 allows none.
#[derive(Debug, Clone)]
pub struct RateLimit {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl RateLimit {
    /// A full bucket.
    pub fn new(per_second: u32, now: Instant) -> RateLimit {
        let rate = f64::from(per_second);
        RateLimit {
            rate,
            tokens: rate,
            last: now,
        }
    }

    /// Takes one token if there is one.
    pub fn allow(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// What a datagram for no known connection gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Start a connection; `odcid` is the client's original destination ID when it came back
    /// with a Retry token.
    Accept {
        /// From the token.
        odcid: Option<Vec<u8>>,
    },
    /// Answer with a Retry.
    Retry,
    /// Answer with Version Negotiation.
    VersionNegotiation,
    /// Answer with a stateless reset.
    Reset,
    /// Nothing: dropped and counted under this reason.
    Drop(Refused),
}

/// Why a datagram for no known connection was dropped (a counter each).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refused {
    /// Not a QUIC packet header.
    Unparsable,
    /// An Initial in a datagram under 1200 bytes (RFC 9000 §14.1).
    InitialTooSmall,
    /// A Retry token that is not ours, not for this address, or expired.
    BadToken,
    /// The half-open connections are at `quic.max_half_open`.
    HalfOpenFull,
    /// The connections are at `max_connections`.
    ConnectionsFull,
    /// A long-header packet that is not an Initial, for no connection.
    NotInitial,
    /// A short-header packet too short to answer with a smaller reset, or over the reset rate.
    NoReset,
    /// Over the Version Negotiation rate, or in a datagram under 1200 bytes.
    NoVersionNegotiation,
    /// A short header for a connection ID of the other process generation while that process
    /// lives (`server/generation.rs`): its connection may be alive there.
    OtherGeneration,
}

impl Refused {
    /// Every reason, for counters.
    pub const ALL: [Refused; 9] = [
        Refused::Unparsable,
        Refused::InitialTooSmall,
        Refused::BadToken,
        Refused::HalfOpenFull,
        Refused::ConnectionsFull,
        Refused::NotInitial,
        Refused::NoReset,
        Refused::NoVersionNegotiation,
        Refused::OtherGeneration,
    ];

    /// The counter's name.
    pub fn label(self) -> &'static str {
        match self {
            Refused::Unparsable => "unparsable",
            Refused::InitialTooSmall => "initial_too_small",
            Refused::BadToken => "bad_token",
            Refused::HalfOpenFull => "half_open_full",
            Refused::ConnectionsFull => "connections_full",
            Refused::NotInitial => "not_initial",
            Refused::NoReset => "no_reset",
            Refused::NoVersionNegotiation => "no_version_negotiation",
            Refused::OtherGeneration => "other_generation",
        }
    }
}

/// The admission settings (from `[quic]` and `max_connections`).
#[derive(Debug, Clone)]
pub struct Policy {
    /// When to Retry.
    pub retry: RetryMode,
    /// Half-open connections at which `auto` starts sending Retry.
    pub retry_threshold: usize,
    /// Half-open connections kept at most.
    pub max_half_open: usize,
    /// Connections kept at most.
    pub max_connections: usize,
}

/// The state a decision needs: the connection counts and the rate limits.
pub struct Gate {
    /// The settings.
    pub policy: Policy,
    resets: RateLimit,
    negotiations: RateLimit,
}

impl Gate {
    /// A gate with full buckets: `resets_per_second` stateless resets and as many Version
    /// Negotiation packets.
    pub fn new(policy: Policy, resets_per_second: u32, now: Instant) -> Gate {
        Gate {
            policy,
            resets: RateLimit::new(resets_per_second, now),
            negotiations: RateLimit::new(resets_per_second, now),
        }
    }

    /// The decision for a datagram of `datagram_len` bytes (one UDP payload) from `peer`,
    /// whose first packet has header `hdr`, for a destination connection ID no connection has,
    /// with `open` connections of which `half_open` are in their handshake.
    #[allow(clippy::too_many_arguments)]
    pub fn admit(
        &mut self,
        hdr: &quiche::Header<'_>,
        datagram_len: usize,
        peer: SocketAddr,
        open: usize,
        half_open: usize,
        tokens: &RetryTokens,
        now: Instant,
    ) -> Admission {
        if hdr.ty == quiche::Type::Short {
            let answerable = datagram_len > MIN_RESET_LEN && hdr.dcid.len() == CID_LEN;
            return if answerable && self.resets.allow(now) {
                Admission::Reset
            } else {
                Admission::Drop(Refused::NoReset)
            };
        }
        if !quiche::version_is_supported(hdr.version) {
            return if datagram_len >= MIN_INITIAL_DATAGRAM && self.negotiations.allow(now) {
                Admission::VersionNegotiation
            } else {
                Admission::Drop(Refused::NoVersionNegotiation)
            };
        }
        if hdr.ty != quiche::Type::Initial {
            return Admission::Drop(Refused::NotInitial);
        }
        if datagram_len < MIN_INITIAL_DATAGRAM {
            return Admission::Drop(Refused::InitialTooSmall);
        }
        let token = hdr.token.as_deref().unwrap_or_default();
        let odcid = if token.is_empty() {
            None
        } else {
            match tokens.validate(peer, &hdr.dcid, token, now) {
                Some(odcid) => Some(odcid),
                None => return Admission::Drop(Refused::BadToken),
            }
        };
        if odcid.is_none() {
            let retry = match self.policy.retry {
                RetryMode::Always => true,
                RetryMode::Auto => half_open >= self.policy.retry_threshold,
                RetryMode::Never => false,
            };
            if retry {
                return Admission::Retry;
            }
        }
        if open >= self.policy.max_connections {
            return Admission::Drop(Refused::ConnectionsFull);
        }
        if half_open >= self.policy.max_half_open {
            return Admission::Drop(Refused::HalfOpenFull);
        }
        Admission::Accept { odcid }
    }
}

#[cfg(test)]
mod tests;
