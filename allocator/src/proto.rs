//! Wire formats of the allocator's protocols (ARCHITECTURE §5).
//!
//! Every message starts with the 8-byte header
//!
//! ```text
//!  0      2         3        4              8
//!  | "MQ" | version | type   | txid (u32 BE) |
//! ```
//!
//! and all integers are big-endian. Three families of messages:
//!
//! * **Client hop** (agent ↔ access switch, UDP port 6363, not keyed — the switch authenticates
//!   the client by the MAC it observes): `AllocRequest`, `AllocReply`, `Release`, `ReleaseReply`.
//! * **Relay hop** (access switch ↔ allocator, UDP, keyed): `Relay` wraps a client message with
//!   the switch's SID, the client's MAC, ingress port and UDP source port and a timestamp;
//!   `RelayReply` wraps the answer with the same relay information so the switch can deliver it
//!   without keeping state. The switch forwards the inner bytes unchanged both ways.
//! * **Rule stream** (allocator → switch, TCP, keyed): `Hello` (switch → allocator: who it is),
//!   then `Snapshot` + its updates, then numbered `BindingAdd` / `BindingRemove` / `AliasEpoch`.
//!   On TCP every message is preceded by its length (u32 BE). Updates are numbered
//!   consecutively; a switch that sees a gap (or whose connection breaks) reconnects and starts
//!   again from the fresh snapshot it gets on connect. Snapshot entries carry the snapshot's
//!   sequence number.
//!
//! Keyed messages end with a 32-byte HMAC-SHA256 tag (ring) over every byte before it, with the
//! key shared by the allocator and that switch. Parsing never panics: every read is bounds-checked
//! ([`check_len`] validates the header; the body readers return [`ParseError::Truncated`]).
//!
//! Body layouts (after the header; `addr` is 4 bytes for family 4, 16 for family 6):
//!
//! ```text
//! AllocRequest  0x01  family u8 | count u8 | nonce [16]
//! AllocReply    0x02  status u8 | family u8 | prefix_len u8 | count u8 | nonce [16] | gateway addr
//!                     | count × (addr | lifetime_ms u32)
//! Release       0x03  family u8 | count u8 | count × addr
//! ReleaseReply  0x04  status u8 | released u8
//! Seen          0x05  family u8 | count u8 | count × addr
//!                     (the access switch's own, in a `Relay`: the first packet it forwarded
//!                     from each of these addresses; answered by a `ReleaseReply` counting the
//!                     addresses the switch serves. A switch never relays a client's `Seen`.)
//! Relay         0x10  sid u16 | ingress_port u16 | mac [6] | client_port u16 | timestamp_ms u64
//!                     | inner_len u16 | inner message | tag [32]
//! RelayReply    0x11  sid u16 | ingress_port u16 | mac [6] | client_port u16
//!                     | inner_len u16 | inner message | tag [32]
//! Hello         0x20  switch_id u16 | timestamp_ms u64 | tag [32]
//! Snapshot      0x21  seq u64 | count u32 | tag [32]
//! BindingAdd    0x22  seq u64 | family u8 | addr | mac [6] | sid u16 | port u16
//!                     | valid_until_ms u64 | tag [32]
//! BindingRemove 0x23  seq u64 | family u8 | addr | tag [32]
//! AliasEpoch    0x24  seq u64 | epoch u64 | valid_until_ms u64 | sids u16
//!                     | sids × (sid u16 | n u16 | n × alias u32) | tag [32]
//! ```

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ring::hmac;

use crate::lease::{RuleUpdate, Sequenced};
use crate::{Family, Mac, Sid};

/// The magic bytes.
pub const MAGIC: [u8; 2] = *b"MQ";
/// The protocol version this crate speaks.
pub const VERSION: u8 = 1;
/// Header length.
pub const HEADER_LEN: usize = 8;
/// HMAC-SHA256 tag length.
pub const TAG_LEN: usize = 32;
/// Nonce length in requests.
pub const NONCE_LEN: usize = 16;
/// Default UDP port of the client hop.
pub const CLIENT_PORT: u16 = 6363;
/// Largest rule-stream frame accepted (bytes).
pub const MAX_FRAME_LEN: usize = 16 << 20;

mod field {
    use std::ops::Range;
    pub const MAGIC: Range<usize> = 0..2;
    pub const VERSION: usize = 2;
    pub const TYPE: usize = 3;
    pub const TXID: Range<usize> = 4..8;
}

/// Message types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MsgType {
    /// Client asks for addresses.
    AllocRequest,
    /// Answer to an `AllocRequest`.
    AllocReply,
    /// Client gives addresses back.
    Release,
    /// Answer to a `Release` (and to a `Seen`).
    ReleaseReply,
    /// The access switch saw packets from these addresses.
    Seen,
    /// Switch → allocator wrapper.
    Relay,
    /// Allocator → switch wrapper.
    RelayReply,
    /// Switch introduces itself on the rule stream.
    Hello,
    /// Rule stream: snapshot marker.
    Snapshot,
    /// Rule stream: binding add/replace.
    BindingAdd,
    /// Rule stream: binding removal.
    BindingRemove,
    /// Rule stream: new alias epoch.
    AliasEpoch,
    /// Anything else (kept so it can be counted and round-trips).
    Unknown(u8),
}

impl From<u8> for MsgType {
    fn from(v: u8) -> Self {
        match v {
            0x01 => MsgType::AllocRequest,
            0x02 => MsgType::AllocReply,
            0x03 => MsgType::Release,
            0x04 => MsgType::ReleaseReply,
            0x05 => MsgType::Seen,
            0x10 => MsgType::Relay,
            0x11 => MsgType::RelayReply,
            0x20 => MsgType::Hello,
            0x21 => MsgType::Snapshot,
            0x22 => MsgType::BindingAdd,
            0x23 => MsgType::BindingRemove,
            0x24 => MsgType::AliasEpoch,
            x => MsgType::Unknown(x),
        }
    }
}

impl From<MsgType> for u8 {
    fn from(t: MsgType) -> u8 {
        match t {
            MsgType::AllocRequest => 0x01,
            MsgType::AllocReply => 0x02,
            MsgType::Release => 0x03,
            MsgType::ReleaseReply => 0x04,
            MsgType::Seen => 0x05,
            MsgType::Relay => 0x10,
            MsgType::RelayReply => 0x11,
            MsgType::Hello => 0x20,
            MsgType::Snapshot => 0x21,
            MsgType::BindingAdd => 0x22,
            MsgType::BindingRemove => 0x23,
            MsgType::AliasEpoch => 0x24,
            MsgType::Unknown(x) => x,
        }
    }
}

/// Reply status codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Success.
    Ok,
    /// Not enough free addresses.
    PoolExhausted,
    /// The client asks too often.
    RateLimited,
    /// The request is malformed or asks for something not offered (count, family).
    BadRequest,
    /// The client already holds its maximum of addresses.
    ClientCap,
    /// A code this version does not know.
    Unknown(u8),
}

impl From<u8> for Status {
    fn from(v: u8) -> Self {
        match v {
            0 => Status::Ok,
            1 => Status::PoolExhausted,
            2 => Status::RateLimited,
            3 => Status::BadRequest,
            4 => Status::ClientCap,
            x => Status::Unknown(x),
        }
    }
}

impl From<Status> for u8 {
    fn from(s: Status) -> u8 {
        match s {
            Status::Ok => 0,
            Status::PoolExhausted => 1,
            Status::RateLimited => 2,
            Status::BadRequest => 3,
            Status::ClientCap => 4,
            Status::Unknown(x) => x,
        }
    }
}

impl Status {
    /// A stable label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::PoolExhausted => "pool_exhausted",
            Status::RateLimited => "rate_limited",
            Status::BadRequest => "bad_request",
            Status::ClientCap => "client_cap",
            Status::Unknown(_) => "unknown",
        }
    }
}

/// Why a message was rejected. Small and `Copy`: a failed parse becomes a counted drop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Shorter than its fields say.
    #[error("truncated")]
    Truncated,
    /// Does not start with "MQ".
    #[error("bad magic")]
    BadMagic,
    /// A version this crate does not speak.
    #[error("unsupported version")]
    BadVersion,
    /// A type not expected here.
    #[error("unexpected message type")]
    UnexpectedType,
    /// The HMAC tag does not verify.
    #[error("bad HMAC tag")]
    BadTag,
    /// No key for the claimed switch.
    #[error("unknown switch")]
    UnknownSwitch,
    /// A field holds an invalid value (family, count, length).
    #[error("invalid field")]
    BadField,
    /// Bytes after the message.
    #[error("trailing bytes")]
    Trailing,
}

impl ParseError {
    /// A stable label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            ParseError::Truncated => "truncated",
            ParseError::BadMagic => "bad_magic",
            ParseError::BadVersion => "bad_version",
            ParseError::UnexpectedType => "unexpected_type",
            ParseError::BadTag => "bad_hmac",
            ParseError::UnknownSwitch => "unknown_switch",
            ParseError::BadField => "bad_field",
            ParseError::Trailing => "trailing_bytes",
        }
    }
}

/// A validated header view (zero-copy over the buffer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Message type.
    pub msg_type: MsgType,
    /// Transaction ID.
    pub txid: u32,
}

/// Validates the header of `buf` (length, magic, version). After it, the header fields can be
/// read without further checks.
pub fn check_len(buf: &[u8]) -> Result<Header, ParseError> {
    if buf.len() < HEADER_LEN {
        return Err(ParseError::Truncated);
    }
    if buf[field::MAGIC] != MAGIC {
        return Err(ParseError::BadMagic);
    }
    if buf[field::VERSION] != VERSION {
        return Err(ParseError::BadVersion);
    }
    let mut txid = [0u8; 4];
    txid.copy_from_slice(&buf[field::TXID]);
    Ok(Header {
        msg_type: MsgType::from(buf[field::TYPE]),
        txid: u32::from_be_bytes(txid),
    })
}

/// An HMAC-SHA256 key shared with one switch.
pub fn key(secret: &[u8]) -> hmac::Key {
    hmac::Key::new(hmac::HMAC_SHA256, secret)
}

// ---------------------------------------------------------------------------------------------
// Client hop

/// `AllocRequest` body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllocRequest {
    /// Address family.
    pub family: Family,
    /// Number of addresses (1..=255).
    pub count: u8,
    /// Client nonce, echoed in the reply.
    pub nonce: [u8; NONCE_LEN],
}

/// `AllocReply` body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllocReply {
    /// Outcome.
    pub status: Status,
    /// Family of the addresses.
    pub family: Family,
    /// On-link prefix length the client configures with each address.
    pub prefix_len: u8,
    /// The request's nonce.
    pub nonce: [u8; NONCE_LEN],
    /// Gateway address (the access switch's virtual gateway).
    pub gateway: IpAddr,
    /// Granted addresses and their lifetimes (ms); empty unless `status` is `Ok`.
    pub addrs: Vec<(IpAddr, u32)>,
}

/// `Release` and `Seen` body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    /// Family of the addresses.
    pub family: Family,
    /// Addresses the client stops using, or the switch saw packets from (at most 255).
    pub addrs: Vec<IpAddr>,
}

/// `ReleaseReply` body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReleaseReply {
    /// Outcome.
    pub status: Status,
    /// How many addresses were released.
    pub released: u8,
}

/// A client-hop message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientMsg {
    /// See [`AllocRequest`].
    AllocRequest(AllocRequest),
    /// See [`AllocReply`].
    AllocReply(AllocReply),
    /// See [`Release`].
    Release(Release),
    /// See [`ReleaseReply`].
    ReleaseReply(ReleaseReply),
    /// The access switch's report of addresses it forwarded packets from (module docs).
    Seen(Release),
}

impl ClientMsg {
    /// Parses a complete client-hop message; returns its txid and body.
    pub fn parse(buf: &[u8]) -> Result<(u32, ClientMsg), ParseError> {
        let h = check_len(buf)?;
        let mut r = Reader::new(&buf[HEADER_LEN..]);
        let msg = match h.msg_type {
            MsgType::AllocRequest => {
                let family = r.family()?;
                let count = r.u8()?;
                if count == 0 {
                    return Err(ParseError::BadField);
                }
                ClientMsg::AllocRequest(AllocRequest {
                    family,
                    count,
                    nonce: r.array()?,
                })
            }
            MsgType::AllocReply => {
                let status = Status::from(r.u8()?);
                let family = r.family()?;
                let prefix_len = r.u8()?;
                let count = r.u8()?;
                let nonce = r.array()?;
                let gateway = r.addr(family)?;
                let mut addrs = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    addrs.push((r.addr(family)?, r.u32()?));
                }
                ClientMsg::AllocReply(AllocReply {
                    status,
                    family,
                    prefix_len,
                    nonce,
                    gateway,
                    addrs,
                })
            }
            MsgType::Release | MsgType::Seen => {
                let family = r.family()?;
                let count = r.u8()?;
                let mut addrs = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    addrs.push(r.addr(family)?);
                }
                let body = Release { family, addrs };
                if h.msg_type == MsgType::Seen {
                    ClientMsg::Seen(body)
                } else {
                    ClientMsg::Release(body)
                }
            }
            MsgType::ReleaseReply => ClientMsg::ReleaseReply(ReleaseReply {
                status: Status::from(r.u8()?),
                released: r.u8()?,
            }),
            _ => return Err(ParseError::UnexpectedType),
        };
        r.finish()?;
        Ok((h.txid, msg))
    }

    /// Appends the message with `txid` to `out`. Fails only if a list exceeds 255 entries or
    /// an address does not match the family.
    pub fn emit(&self, txid: u32, out: &mut Vec<u8>) -> Result<(), EmitError> {
        match self {
            ClientMsg::AllocRequest(m) => {
                header(out, MsgType::AllocRequest, txid);
                out.push(family_byte(m.family));
                out.push(m.count);
                out.extend_from_slice(&m.nonce);
            }
            ClientMsg::AllocReply(m) => {
                let count = u8::try_from(m.addrs.len()).map_err(|_| EmitError::TooMany)?;
                header(out, MsgType::AllocReply, txid);
                out.extend_from_slice(&[
                    m.status.into(),
                    family_byte(m.family),
                    m.prefix_len,
                    count,
                ]);
                out.extend_from_slice(&m.nonce);
                put_addr(out, m.family, m.gateway)?;
                for (a, life) in &m.addrs {
                    put_addr(out, m.family, *a)?;
                    out.extend_from_slice(&life.to_be_bytes());
                }
            }
            ClientMsg::Release(m) | ClientMsg::Seen(m) => {
                let count = u8::try_from(m.addrs.len()).map_err(|_| EmitError::TooMany)?;
                let t = match self {
                    ClientMsg::Seen(_) => MsgType::Seen,
                    _ => MsgType::Release,
                };
                header(out, t, txid);
                out.extend_from_slice(&[family_byte(m.family), count]);
                for a in &m.addrs {
                    put_addr(out, m.family, *a)?;
                }
            }
            ClientMsg::ReleaseReply(m) => {
                header(out, MsgType::ReleaseReply, txid);
                out.extend_from_slice(&[m.status.into(), m.released]);
            }
        }
        Ok(())
    }
}

/// Why a message could not be emitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EmitError {
    /// A list is longer than its count field allows.
    #[error("too many entries for the count field")]
    TooMany,
    /// An address is not of the message's family.
    #[error("address family does not match the message family")]
    FamilyMismatch,
}

// ---------------------------------------------------------------------------------------------
// Relay hop

/// What the access switch adds to a client message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayInfo {
    /// The switch's SID.
    pub sid: Sid,
    /// The switch port the client is on.
    pub ingress_port: u16,
    /// The client's MAC as observed.
    pub mac: Mac,
    /// The client's UDP source port (where the reply goes).
    pub client_port: u16,
}

/// A relayed client message (switch → allocator), borrowing the inner bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Relay<'a> {
    /// Transaction ID (the inner message's).
    pub txid: u32,
    /// Relay information.
    pub info: RelayInfo,
    /// Switch clock when relayed (ms since the Unix epoch), for the replay window.
    pub timestamp_ms: u64,
    /// The client message, verbatim.
    pub inner: &'a [u8],
}

impl<'a> Relay<'a> {
    /// Parses and authenticates a relay message. `key_for` gives the key of a SID.
    pub fn parse<'k>(
        buf: &'a [u8],
        key_for: impl Fn(Sid) -> Option<&'k hmac::Key>,
    ) -> Result<Self, ParseError> {
        let h = check_len(buf)?;
        if h.msg_type != MsgType::Relay {
            return Err(ParseError::UnexpectedType);
        }
        let body = &buf[HEADER_LEN..];
        let sid = Reader::new(body).u16()?;
        let key = key_for(sid).ok_or(ParseError::UnknownSwitch)?;
        let mut r = Reader::new(verify(buf, key)?);
        r.skip(HEADER_LEN)?;
        let info = read_info(&mut r)?;
        let timestamp_ms = r.u64()?;
        let n = r.u16()? as usize;
        let inner = r.bytes(n)?;
        r.finish()?;
        Ok(Relay {
            txid: h.txid,
            info,
            timestamp_ms,
            inner,
        })
    }

    /// Appends the message, tagged with `key`.
    pub fn emit(&self, key: &hmac::Key, out: &mut Vec<u8>) -> Result<(), EmitError> {
        let start = out.len();
        header(out, MsgType::Relay, self.txid);
        put_info(out, &self.info);
        out.extend_from_slice(&self.timestamp_ms.to_be_bytes());
        let n = u16::try_from(self.inner.len()).map_err(|_| EmitError::TooMany)?;
        out.extend_from_slice(&n.to_be_bytes());
        out.extend_from_slice(self.inner);
        sign(out, start, key);
        Ok(())
    }
}

/// A reply to a relayed message (allocator → switch), borrowing the inner bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayReply<'a> {
    /// Transaction ID.
    pub txid: u32,
    /// The relay information of the request, echoed.
    pub info: RelayInfo,
    /// The client message to deliver, verbatim.
    pub inner: &'a [u8],
}

impl<'a> RelayReply<'a> {
    /// Parses and authenticates a relay reply with the switch's key.
    pub fn parse(buf: &'a [u8], key: &hmac::Key) -> Result<Self, ParseError> {
        let h = check_len(buf)?;
        if h.msg_type != MsgType::RelayReply {
            return Err(ParseError::UnexpectedType);
        }
        let mut r = Reader::new(verify(buf, key)?);
        r.skip(HEADER_LEN)?;
        let info = read_info(&mut r)?;
        let n = r.u16()? as usize;
        let inner = r.bytes(n)?;
        r.finish()?;
        Ok(RelayReply {
            txid: h.txid,
            info,
            inner,
        })
    }

    /// Appends the message, tagged with `key`.
    pub fn emit(&self, key: &hmac::Key, out: &mut Vec<u8>) -> Result<(), EmitError> {
        let start = out.len();
        header(out, MsgType::RelayReply, self.txid);
        put_info(out, &self.info);
        let n = u16::try_from(self.inner.len()).map_err(|_| EmitError::TooMany)?;
        out.extend_from_slice(&n.to_be_bytes());
        out.extend_from_slice(self.inner);
        sign(out, start, key);
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Rule stream

/// A rule-stream message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamMsg {
    /// Switch → allocator, first message on a connection.
    Hello {
        /// The switch's configured ID (an access switch's ID is its SID).
        switch_id: u16,
        /// Switch clock (ms since the Unix epoch), for the replay window.
        timestamp_ms: u64,
    },
    /// Allocator → switch.
    Update(Sequenced),
}

impl StreamMsg {
    /// Appends `len u32 | message | tag` to `out`.
    pub fn emit_frame(&self, key: &hmac::Key, out: &mut Vec<u8>) -> Result<(), EmitError> {
        let len_at = out.len();
        out.extend_from_slice(&[0; 4]);
        let start = out.len();
        match self {
            StreamMsg::Hello {
                switch_id,
                timestamp_ms,
            } => {
                header(out, MsgType::Hello, 0);
                out.extend_from_slice(&switch_id.to_be_bytes());
                out.extend_from_slice(&timestamp_ms.to_be_bytes());
            }
            StreamMsg::Update(Sequenced { seq, update }) => {
                let t = match update {
                    RuleUpdate::Snapshot { .. } => MsgType::Snapshot,
                    RuleUpdate::BindingAdd { .. } => MsgType::BindingAdd,
                    RuleUpdate::BindingRemove { .. } => MsgType::BindingRemove,
                    RuleUpdate::AliasEpoch { .. } => MsgType::AliasEpoch,
                };
                header(out, t, 0);
                out.extend_from_slice(&seq.to_be_bytes());
                match update {
                    RuleUpdate::Snapshot { seq: _, count } => {
                        out.extend_from_slice(&count.to_be_bytes())
                    }
                    RuleUpdate::BindingAdd {
                        ip,
                        mac,
                        sid,
                        port,
                        valid_until_ms,
                    } => {
                        put_family_addr(out, *ip);
                        out.extend_from_slice(&mac.0);
                        out.extend_from_slice(&sid.to_be_bytes());
                        out.extend_from_slice(&port.to_be_bytes());
                        out.extend_from_slice(&valid_until_ms.to_be_bytes());
                    }
                    RuleUpdate::BindingRemove { ip } => put_family_addr(out, *ip),
                    RuleUpdate::AliasEpoch {
                        epoch,
                        aliases,
                        valid_until_ms,
                    } => {
                        out.extend_from_slice(&epoch.to_be_bytes());
                        out.extend_from_slice(&valid_until_ms.to_be_bytes());
                        let n = u16::try_from(aliases.len()).map_err(|_| EmitError::TooMany)?;
                        out.extend_from_slice(&n.to_be_bytes());
                        for (sid, list) in aliases {
                            out.extend_from_slice(&sid.to_be_bytes());
                            let n = u16::try_from(list.len()).map_err(|_| EmitError::TooMany)?;
                            out.extend_from_slice(&n.to_be_bytes());
                            for a in list {
                                out.extend_from_slice(&a.to_be_bytes());
                            }
                        }
                    }
                }
            }
        }
        sign(out, start, key);
        let len = (out.len() - start) as u32;
        out[len_at..len_at + 4].copy_from_slice(&len.to_be_bytes());
        Ok(())
    }

    /// Parses one message (the bytes after the length prefix). `key_for` gives the key of a
    /// switch ID: for `Hello` the ID in the message, for updates the caller's own ID (the
    /// closure receives `u16::MAX` then; return the connection's key).
    pub fn parse<'k>(
        buf: &[u8],
        key_for: impl Fn(u16) -> Option<&'k hmac::Key>,
    ) -> Result<StreamMsg, ParseError> {
        let h = check_len(buf)?;
        let key = match h.msg_type {
            MsgType::Hello => key_for(Reader::new(&buf[HEADER_LEN..]).u16()?),
            _ => key_for(u16::MAX),
        }
        .ok_or(ParseError::UnknownSwitch)?;
        let mut r = Reader::new(verify(buf, key)?);
        r.skip(HEADER_LEN)?;
        let msg = match h.msg_type {
            MsgType::Hello => StreamMsg::Hello {
                switch_id: r.u16()?,
                timestamp_ms: r.u64()?,
            },
            MsgType::Snapshot => {
                let seq = r.u64()?;
                StreamMsg::Update(Sequenced {
                    seq,
                    update: RuleUpdate::Snapshot {
                        seq,
                        count: r.u32()?,
                    },
                })
            }
            MsgType::BindingAdd => {
                let seq = r.u64()?;
                let ip = r.family_addr()?;
                let mac = Mac(r.array()?);
                let sid = r.u16()?;
                let port = r.u16()?;
                let valid_until_ms = r.u64()?;
                StreamMsg::Update(Sequenced {
                    seq,
                    update: RuleUpdate::BindingAdd {
                        ip,
                        mac,
                        sid,
                        port,
                        valid_until_ms,
                    },
                })
            }
            MsgType::BindingRemove => {
                let seq = r.u64()?;
                StreamMsg::Update(Sequenced {
                    seq,
                    update: RuleUpdate::BindingRemove {
                        ip: r.family_addr()?,
                    },
                })
            }
            MsgType::AliasEpoch => {
                let seq = r.u64()?;
                let epoch = r.u64()?;
                let valid_until_ms = r.u64()?;
                let nsids = r.u16()?;
                let mut aliases = Vec::new();
                for _ in 0..nsids {
                    let sid = r.u16()?;
                    let n = r.u16()? as usize;
                    // Bound the allocation by what the buffer can hold.
                    if r.remaining() < n * 4 {
                        return Err(ParseError::Truncated);
                    }
                    let mut list = Vec::with_capacity(n);
                    for _ in 0..n {
                        list.push(r.u32()?);
                    }
                    aliases.push((sid, list));
                }
                StreamMsg::Update(Sequenced {
                    seq,
                    update: RuleUpdate::AliasEpoch {
                        epoch,
                        aliases,
                        valid_until_ms,
                    },
                })
            }
            _ => return Err(ParseError::UnexpectedType),
        };
        r.finish()?;
        Ok(msg)
    }
}

/// Reads one length-prefixed frame from a stream into `buf` (cleared first). `Ok(false)` on a
/// clean end of stream before a frame starts.
pub fn read_frame(r: &mut impl std::io::Read, buf: &mut Vec<u8>) -> std::io::Result<bool> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(false),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(len) as usize;
    if !(HEADER_LEN + TAG_LEN..=MAX_FRAME_LEN).contains(&len) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "rule-stream frame length out of range",
        ));
    }
    buf.clear();
    buf.resize(len, 0);
    r.read_exact(buf)?;
    Ok(true)
}

// ---------------------------------------------------------------------------------------------
// Helpers

fn header(out: &mut Vec<u8>, t: MsgType, txid: u32) {
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(t.into());
    out.extend_from_slice(&txid.to_be_bytes());
}

fn sign(out: &mut Vec<u8>, start: usize, key: &hmac::Key) {
    let tag = hmac::sign(key, &out[start..]);
    out.extend_from_slice(tag.as_ref());
}

/// Verifies the trailing tag; returns the message without it.
fn verify<'a>(buf: &'a [u8], key: &hmac::Key) -> Result<&'a [u8], ParseError> {
    if buf.len() < HEADER_LEN + TAG_LEN {
        return Err(ParseError::Truncated);
    }
    let (msg, tag) = buf.split_at(buf.len() - TAG_LEN);
    hmac::verify(key, msg, tag).map_err(|_| ParseError::BadTag)?;
    Ok(msg)
}

fn family_byte(f: Family) -> u8 {
    match f {
        Family::V4 => 4,
        Family::V6 => 6,
    }
}

fn put_addr(out: &mut Vec<u8>, f: Family, a: IpAddr) -> Result<(), EmitError> {
    match (f, a) {
        (Family::V4, IpAddr::V4(a)) => out.extend_from_slice(&a.octets()),
        (Family::V6, IpAddr::V6(a)) => out.extend_from_slice(&a.octets()),
        _ => return Err(EmitError::FamilyMismatch),
    }
    Ok(())
}

fn put_family_addr(out: &mut Vec<u8>, a: IpAddr) {
    match a {
        IpAddr::V4(a) => {
            out.push(4);
            out.extend_from_slice(&a.octets());
        }
        IpAddr::V6(a) => {
            out.push(6);
            out.extend_from_slice(&a.octets());
        }
    }
}

fn put_info(out: &mut Vec<u8>, i: &RelayInfo) {
    out.extend_from_slice(&i.sid.to_be_bytes());
    out.extend_from_slice(&i.ingress_port.to_be_bytes());
    out.extend_from_slice(&i.mac.0);
    out.extend_from_slice(&i.client_port.to_be_bytes());
}

fn read_info(r: &mut Reader<'_>) -> Result<RelayInfo, ParseError> {
    Ok(RelayInfo {
        sid: r.u16()?,
        ingress_port: r.u16()?,
        mac: Mac(r.array()?),
        client_port: r.u16()?,
    })
}

/// A bounds-checked big-endian cursor.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], ParseError> {
        let end = self.pos.checked_add(n).ok_or(ParseError::Truncated)?;
        let s = self.buf.get(self.pos..end).ok_or(ParseError::Truncated)?;
        self.pos = end;
        Ok(s)
    }
    fn skip(&mut self, n: usize) -> Result<(), ParseError> {
        self.bytes(n).map(|_| ())
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], ParseError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.bytes(N)?);
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, ParseError> {
        Ok(self.array::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, ParseError> {
        Ok(u16::from_be_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, ParseError> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, ParseError> {
        Ok(u64::from_be_bytes(self.array()?))
    }
    fn family(&mut self) -> Result<Family, ParseError> {
        match self.u8()? {
            4 => Ok(Family::V4),
            6 => Ok(Family::V6),
            _ => Err(ParseError::BadField),
        }
    }
    fn addr(&mut self, f: Family) -> Result<IpAddr, ParseError> {
        Ok(match f {
            Family::V4 => IpAddr::V4(Ipv4Addr::from(self.array::<4>()?)),
            Family::V6 => IpAddr::V6(Ipv6Addr::from(self.array::<16>()?)),
        })
    }
    fn family_addr(&mut self) -> Result<IpAddr, ParseError> {
        let f = self.family()?;
        self.addr(f)
    }
    fn finish(&self) -> Result<(), ParseError> {
        if self.pos == self.buf.len() {
            Ok(())
        } else {
            Err(ParseError::Trailing)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const NONCE: [u8; 16] = [0xa5; 16];

    fn k1() -> hmac::Key {
        key(b"switch-1-secret")
    }

    #[test]
    fn alloc_request_bytes_field_by_field() {
        let mut out = Vec::new();
        ClientMsg::AllocRequest(AllocRequest {
            family: Family::V6,
            count: 3,
            nonce: NONCE,
        })
        .emit(0x01020304, &mut out)
        .unwrap();
        let mut want = vec![
            b'M', b'Q', // magic
            1,    // version
            0x01, // type AllocRequest
            1, 2, 3, 4, // txid
            6, // family IPv6
            3, // count
        ];
        want.extend_from_slice(&NONCE);
        assert_eq!(out, want);
        assert_eq!(
            ClientMsg::parse(&out).unwrap(),
            (
                0x01020304,
                ClientMsg::AllocRequest(AllocRequest {
                    family: Family::V6,
                    count: 3,
                    nonce: NONCE
                })
            )
        );
    }

    #[test]
    fn header_errors() {
        assert_eq!(check_len(b"MQ\x01\x01\0\0\0"), Err(ParseError::Truncated));
        assert_eq!(check_len(b"XQ\x01\x01\0\0\0\0"), Err(ParseError::BadMagic));
        assert_eq!(
            check_len(b"MQ\x02\x01\0\0\0\0"),
            Err(ParseError::BadVersion)
        );
        assert_eq!(
            check_len(b"MQ\x01\x7f\0\0\0\x09").unwrap(),
            Header {
                msg_type: MsgType::Unknown(0x7f),
                txid: 9
            }
        );
        assert_eq!(
            ClientMsg::parse(b"MQ\x01\x7f\0\0\0\x09"),
            Err(ParseError::UnexpectedType)
        );
    }

    fn sample_msgs() -> Vec<ClientMsg> {
        vec![
            ClientMsg::AllocRequest(AllocRequest {
                family: Family::V4,
                count: 2,
                nonce: NONCE,
            }),
            ClientMsg::AllocReply(AllocReply {
                status: Status::Ok,
                family: Family::V4,
                prefix_len: 8,
                nonce: NONCE,
                gateway: "10.0.0.1".parse().unwrap(),
                addrs: vec![
                    ("10.1.2.3".parse().unwrap(), 60_000),
                    ("10.9.9.9".parse().unwrap(), 1),
                ],
            }),
            ClientMsg::Release(Release {
                family: Family::V6,
                addrs: vec!["2001:db8::1".parse().unwrap()],
            }),
            ClientMsg::ReleaseReply(ReleaseReply {
                status: Status::Ok,
                released: 1,
            }),
            ClientMsg::Seen(Release {
                family: Family::V4,
                addrs: vec!["10.1.2.3".parse().unwrap(), "10.1.2.4".parse().unwrap()],
            }),
        ]
    }

    #[test]
    fn client_messages_round_trip_and_every_truncation_is_rejected() {
        for m in sample_msgs() {
            let mut out = Vec::new();
            m.emit(7, &mut out).unwrap();
            assert_eq!(ClientMsg::parse(&out).unwrap(), (7, m.clone()));
            for n in 0..out.len() {
                assert!(
                    ClientMsg::parse(&out[..n]).is_err(),
                    "{m:?} truncated to {n} parsed"
                );
            }
            out.push(0);
            assert_eq!(ClientMsg::parse(&out), Err(ParseError::Trailing));
        }
    }

    #[test]
    fn family_mismatch_is_an_emit_error() {
        let m = ClientMsg::Release(Release {
            family: Family::V4,
            addrs: vec!["2001:db8::1".parse().unwrap()],
        });
        assert_eq!(m.emit(1, &mut Vec::new()), Err(EmitError::FamilyMismatch));
    }

    #[test]
    fn relay_round_trips_and_rejects_bad_tag_wrong_key_truncation() {
        let mut inner = Vec::new();
        sample_msgs()[0].emit(42, &mut inner).unwrap();
        let relay = Relay {
            txid: 42,
            info: RelayInfo {
                sid: 1,
                ingress_port: 3,
                mac: Mac([2, 0, 0, 0, 0, 1]),
                client_port: 40000,
            },
            timestamp_ms: 1_700_000_000_000,
            inner: &inner,
        };
        let k = k1();
        let mut out = Vec::new();
        relay.emit(&k, &mut out).unwrap();
        let keys = |sid: Sid| (sid == 1).then_some(&k);
        assert_eq!(Relay::parse(&out, keys).unwrap(), relay);
        // Wrong key for the SID.
        let other = key(b"other");
        assert_eq!(
            Relay::parse(&out, |_| Some(&other)),
            Err(ParseError::BadTag)
        );
        // Unknown SID.
        assert_eq!(Relay::parse(&out, |_| None), Err(ParseError::UnknownSwitch));
        // Any flipped bit breaks the tag (or the header).
        for i in 0..out.len() {
            let mut bad = out.clone();
            bad[i] ^= 0x10;
            assert!(
                Relay::parse(&bad, keys).is_err(),
                "bit flip at {i} accepted"
            );
        }
        for n in 0..out.len() {
            assert!(
                Relay::parse(&out[..n], keys).is_err(),
                "truncated to {n} accepted"
            );
        }
        // Reply.
        let reply = RelayReply {
            txid: 42,
            info: relay.info,
            inner: &inner,
        };
        let mut out = Vec::new();
        reply.emit(&k, &mut out).unwrap();
        assert_eq!(RelayReply::parse(&out, &k).unwrap(), reply);
        assert_eq!(RelayReply::parse(&out, &other), Err(ParseError::BadTag));
        for n in 0..out.len() {
            assert!(RelayReply::parse(&out[..n], &k).is_err());
        }
    }

    #[test]
    fn emit_appends_after_existing_bytes_and_signs_only_its_own() {
        let k = k1();
        let mut inner = Vec::new();
        sample_msgs()[1].emit(5, &mut inner).unwrap();
        let relay = Relay {
            txid: 5,
            info: RelayInfo {
                sid: 1,
                ingress_port: 2,
                mac: Mac([2, 0, 0, 0, 0, 3]),
                client_port: 4,
            },
            timestamp_ms: 6,
            inner: &inner,
        };
        let mut clean = Vec::new();
        relay.emit(&k, &mut clean).unwrap();
        let mut poisoned = vec![0xEE; 37];
        relay.emit(&k, &mut poisoned).unwrap();
        assert!(
            poisoned[..37].iter().all(|&b| b == 0xEE),
            "bytes before the message untouched"
        );
        assert_eq!(&poisoned[37..], &clean[..]);
        assert_eq!(Relay::parse(&poisoned[37..], |_| Some(&k)).unwrap(), relay);
        let mut frame = vec![0xEE; 11];
        StreamMsg::Hello {
            switch_id: 1,
            timestamp_ms: 2,
        }
        .emit_frame(&k, &mut frame)
        .unwrap();
        let mut cur = std::io::Cursor::new(&frame[11..]);
        let mut buf = Vec::new();
        assert!(read_frame(&mut cur, &mut buf).unwrap());
        assert_eq!(
            StreamMsg::parse(&buf, |_| Some(&k)).unwrap(),
            StreamMsg::Hello {
                switch_id: 1,
                timestamp_ms: 2
            }
        );
    }

    #[test]
    fn stream_messages_round_trip() {
        let k = k1();
        let msgs = vec![
            StreamMsg::Hello {
                switch_id: 1,
                timestamp_ms: 5,
            },
            StreamMsg::Update(Sequenced {
                seq: 9,
                update: RuleUpdate::Snapshot { seq: 9, count: 2 },
            }),
            StreamMsg::Update(Sequenced {
                seq: 9,
                update: RuleUpdate::BindingAdd {
                    ip: "10.0.0.7".parse().unwrap(),
                    mac: Mac([1, 2, 3, 4, 5, 6]),
                    sid: 1,
                    port: 3,
                    valid_until_ms: 77,
                },
            }),
            StreamMsg::Update(Sequenced {
                seq: 10,
                update: RuleUpdate::BindingRemove {
                    ip: "2001:db8::7".parse().unwrap(),
                },
            }),
            StreamMsg::Update(Sequenced {
                seq: 11,
                update: RuleUpdate::AliasEpoch {
                    epoch: 3,
                    aliases: vec![(1, vec![5, 6]), (2, vec![7, 8])],
                    valid_until_ms: 99,
                },
            }),
        ];
        for m in msgs {
            let mut out = Vec::new();
            m.emit_frame(&k, &mut out).unwrap();
            let mut cur = std::io::Cursor::new(&out);
            let mut buf = Vec::new();
            assert!(read_frame(&mut cur, &mut buf).unwrap());
            assert_eq!(StreamMsg::parse(&buf, |_| Some(&k)).unwrap(), m);
            assert!(
                !read_frame(&mut cur, &mut buf).unwrap(),
                "clean end of stream"
            );
            for n in 0..buf.len() {
                assert!(StreamMsg::parse(&buf[..n], |_| Some(&k)).is_err());
            }
            let other = key(b"x");
            assert_eq!(
                StreamMsg::parse(&buf, |_| Some(&other)),
                Err(ParseError::BadTag)
            );
        }
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            let k = k1();
            let _ = ClientMsg::parse(&bytes);
            let _ = Relay::parse(&bytes, |_| Some(&k));
            let _ = RelayReply::parse(&bytes, &k);
            let _ = StreamMsg::parse(&bytes, |_| Some(&k));
            let mut b = b"MQ\x01".to_vec();
            b.extend_from_slice(&bytes);
            let _ = ClientMsg::parse(&b);
            let _ = StreamMsg::parse(&b, |_| Some(&k));
        }

        #[test]
        fn alloc_reply_round_trips(v4 in prop::collection::vec((any::<u32>(), any::<u32>()), 0..40), status in any::<u8>(), txid in any::<u32>()) {
            let m = ClientMsg::AllocReply(AllocReply {
                status: Status::from(status),
                family: Family::V4,
                prefix_len: 24,
                nonce: NONCE,
                gateway: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
                addrs: v4.iter().map(|&(a, l)| (IpAddr::V4(Ipv4Addr::from(a)), l)).collect(),
            });
            let mut out = Vec::new();
            m.emit(txid, &mut out).unwrap();
            prop_assert_eq!(ClientMsg::parse(&out).unwrap(), (txid, m));
        }
    }
}
