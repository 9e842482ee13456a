//! The capsule protocol (RFC 9297 §3) and the capsules MASQUE uses: DATAGRAM (RFC 9297 §3.5) and
//! CONNECT-IP's ADDRESS_ASSIGN, ADDRESS_REQUEST and ROUTE_ADVERTISEMENT (RFC 9484 §4.7).
//!
//! ```text
//! Capsule {
//!   Capsule Type (i),
//!   Capsule Length (i),
//!   Capsule Value (..),
//! }
//! ```
//!
//! Reading: a [`CapsuleDecoder`] runs over whatever bytes of the request stream the caller has
//! buffered and answers "need more", "one capsule" (borrowed from the buffer), "skipped" (an
//! unknown type, or a DATAGRAM too large to keep) or an error. A capsule split across any number
//! of reads decodes the same as one read whole. Unknown capsule types are skipped without being
//! buffered, whatever their length; a known capsule longer than the decoder's bound is an error,
//! so hostile input cannot make the caller buffer without limit. The structured forms
//! ([`AddressAssign`], [`AddressRequest`], [`RouteAdvertisement`]) are validated views over the
//! capsule value: once built, their iterators yield entries without further checks.
//!
//! Writing: [`CapsuleRepr`] describes a capsule from plain slices, checks the RFC's rules (prefix
//! lengths, host bits, non-zero request IDs, range order) and emits it into a caller buffer.
//!
//! No allocation; nothing here panics on any input.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::varint;

/// A bound on a known capsule's value that a proxy can use when it has no better figure: larger
/// than any QUIC datagram and than any realistic address list.
pub const DEFAULT_MAX_CAPSULE_LEN: usize = 65_535;

/// Capsule types (the IANA "HTTP Capsule Types" registry). Unknown values round-trip.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CapsuleType {
    /// 0x00, RFC 9297 §3.5.
    Datagram,
    /// 0x01, RFC 9484 §4.7.1.
    AddressAssign,
    /// 0x02, RFC 9484 §4.7.2.
    AddressRequest,
    /// 0x03, RFC 9484 §4.7.3.
    RouteAdvertisement,
    /// Any other type; skipped on receipt.
    Unknown(u64),
}

impl From<u64> for CapsuleType {
    fn from(value: u64) -> Self {
        match value {
            0x00 => CapsuleType::Datagram,
            0x01 => CapsuleType::AddressAssign,
            0x02 => CapsuleType::AddressRequest,
            0x03 => CapsuleType::RouteAdvertisement,
            other => CapsuleType::Unknown(other),
        }
    }
}

impl From<CapsuleType> for u64 {
    fn from(value: CapsuleType) -> Self {
        match value {
            CapsuleType::Datagram => 0x00,
            CapsuleType::AddressAssign => 0x01,
            CapsuleType::AddressRequest => 0x02,
            CapsuleType::RouteAdvertisement => 0x03,
            CapsuleType::Unknown(other) => other,
        }
    }
}

/// Why a capsule could not be decoded or emitted. Every decoding error is a malformed capsule:
/// RFC 9297 §3.3 asks the receiver to treat it as a malformed request and abort the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// A known capsule's length is above the decoder's bound.
    CapsuleTooLong,
    /// The request stream ended inside a capsule.
    TruncatedAtEndOfStream,
    /// The capsule value ends inside one of its fields.
    TruncatedValue,
    /// An IP Version field other than 4 or 6.
    InvalidIpVersion,
    /// A prefix length above the address length in bits.
    PrefixLengthTooLong,
    /// Address bits beyond the prefix length are not zero.
    HostBitsSet,
    /// A Requested Address with Request ID zero.
    ZeroRequestId,
    /// An ADDRESS_REQUEST with no Requested Address.
    EmptyAddressRequest,
    /// A range whose start is after its end.
    RangeStartAfterEnd,
    /// Two ranges that break the order RFC 9484 §4.7.3 requires (or overlap).
    RangesOutOfOrder,
    /// A range for one protocol that overlaps a range for all protocols (IP Protocol 0) of the
    /// same IP version.
    OverlapsAllProtocolsRange,
    /// Emit: a range whose start and end are of different IP versions.
    MixedAddressFamilies,
    /// Emit: a varint field above 2^62 - 1.
    ValueTooLarge,
    /// Emit: the output buffer is too short.
    BufferTooSmall,
}

impl core::fmt::Display for Error {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Error::CapsuleTooLong => "capsule longer than the bound",
            Error::TruncatedAtEndOfStream => "stream ended inside a capsule",
            Error::TruncatedValue => "capsule value ends inside a field",
            Error::InvalidIpVersion => "IP version not 4 or 6",
            Error::PrefixLengthTooLong => "prefix length longer than the address",
            Error::HostBitsSet => "address bits past the prefix length are set",
            Error::ZeroRequestId => "requested address with request ID 0",
            Error::EmptyAddressRequest => "ADDRESS_REQUEST with no requested address",
            Error::RangeStartAfterEnd => "range start after its end",
            Error::RangesOutOfOrder => "ranges out of the required order or overlapping",
            Error::OverlapsAllProtocolsRange => "range overlaps a range for all protocols",
            Error::MixedAddressFamilies => "range start and end of different IP versions",
            Error::ValueTooLarge => "value above 2^62-1",
            Error::BufferTooSmall => "output buffer too small",
        })
    }
}

impl std::error::Error for Error {}

/// An IP prefix: an address and a prefix length no longer than the address, with every bit past
/// the prefix zero (RFC 9484 §4.7.1, §4.7.2, §4.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpPrefix {
    addr: IpAddr,
    len: u8,
}

impl IpPrefix {
    /// Checks the RFC's rules: `len` at most 32 (IPv4) or 128 (IPv6), host bits zero.
    pub fn new(addr: IpAddr, len: u8) -> Result<Self, Error> {
        let bits = addr_bits(addr);
        if u32::from(len) > bits {
            return Err(Error::PrefixLengthTooLong);
        }
        if addr_to_u128(addr) & !prefix_mask(len, bits) != 0 {
            return Err(Error::HostBitsSet);
        }
        Ok(IpPrefix { addr, len })
    }

    /// A single address (/32 or /128).
    pub fn host(addr: IpAddr) -> Self {
        // Invariant: a full-length prefix has no host bits.
        IpPrefix {
            addr,
            len: addr_bits(addr) as u8,
        }
    }

    /// The network address.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length in bits.
    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    /// Whether `addr` falls inside this prefix (false across address families).
    pub fn contains(&self, addr: IpAddr) -> bool {
        if addr.is_ipv4() != self.addr.is_ipv4() {
            return false;
        }
        let mask = prefix_mask(self.len, addr_bits(addr));
        addr_to_u128(addr) & mask == addr_to_u128(self.addr)
    }
}

/// One Assigned Address (ADDRESS_ASSIGN) or Requested Address (ADDRESS_REQUEST); both share this
/// format (RFC 9484 §4.7.1, §4.7.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AddressEntry {
    /// The request this answers (0 when unprompted), or the request's own non-zero identifier.
    pub request_id: u64,
    /// The address or prefix.
    pub prefix: IpPrefix,
}

/// One IP Address Range of a ROUTE_ADVERTISEMENT (RFC 9484 §4.7.3). Start and end are of one IP
/// version; `ip_protocol` 0 means every protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpAddressRange {
    /// Inclusive start.
    pub start: IpAddr,
    /// Inclusive end.
    pub end: IpAddr,
    /// The IP protocol number allowed to this range; 0 for all.
    pub ip_protocol: u8,
}

/// A decoded capsule, borrowing its value from the caller's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Capsule<'a> {
    /// A DATAGRAM capsule's HTTP Datagram Payload (Context ID then payload: see
    /// [`crate::datagram::ContextPayload`]).
    Datagram(&'a [u8]),
    /// ADDRESS_ASSIGN.
    AddressAssign(AddressAssign<'a>),
    /// ADDRESS_REQUEST.
    AddressRequest(AddressRequest<'a>),
    /// ROUTE_ADVERTISEMENT.
    RouteAdvertisement(RouteAdvertisement<'a>),
}

impl<'a> Capsule<'a> {
    /// Parses a complete capsule value of a known type; `None` for an unknown type (to skip).
    pub fn parse_value(capsule_type: CapsuleType, value: &'a [u8]) -> Result<Option<Self>, Error> {
        Ok(Some(match capsule_type {
            CapsuleType::Datagram => Capsule::Datagram(value),
            CapsuleType::AddressAssign => {
                Capsule::AddressAssign(AddressAssign::new_checked(value)?)
            }
            CapsuleType::AddressRequest => {
                Capsule::AddressRequest(AddressRequest::new_checked(value)?)
            }
            CapsuleType::RouteAdvertisement => {
                Capsule::RouteAdvertisement(RouteAdvertisement::new_checked(value)?)
            }
            CapsuleType::Unknown(_) => return Ok(None),
        }))
    }

    /// This capsule's type.
    pub fn capsule_type(&self) -> CapsuleType {
        match self {
            Capsule::Datagram(_) => CapsuleType::Datagram,
            Capsule::AddressAssign(_) => CapsuleType::AddressAssign,
            Capsule::AddressRequest(_) => CapsuleType::AddressRequest,
            Capsule::RouteAdvertisement(_) => CapsuleType::RouteAdvertisement,
        }
    }
}

/// A validated ADDRESS_ASSIGN value: zero or more Assigned Addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddressAssign<'a> {
    value: &'a [u8],
}

impl<'a> AddressAssign<'a> {
    /// Validates every Assigned Address of `value`.
    pub fn new_checked(value: &'a [u8]) -> Result<Self, Error> {
        //= https://www.rfc-editor.org/rfc/rfc9484#section-4.7.1
        //# The ADDRESS_ASSIGN capsule contains a sequence of zero or more Assigned
        //# Addresses.
        let mut pos = 0;
        while pos < value.len() {
            read_address_entry(value, &mut pos)?;
        }
        Ok(AddressAssign { value })
    }

    /// The Assigned Addresses, in wire order. An empty list withdraws every address.
    pub fn iter(&self) -> AddressEntries<'a> {
        AddressEntries {
            value: self.value,
            pos: 0,
        }
    }
}

/// A validated ADDRESS_REQUEST value: one or more Requested Addresses, none with Request ID 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddressRequest<'a> {
    value: &'a [u8],
}

impl<'a> AddressRequest<'a> {
    /// Validates every Requested Address of `value`.
    pub fn new_checked(value: &'a [u8]) -> Result<Self, Error> {
        //= https://www.rfc-editor.org/rfc/rfc9484#section-4.7.2
        //# If an endpoint receives an ADDRESS_REQUEST capsule that contains zero Requested
        //# Addresses, it MUST abort the IP proxying request stream.
        if value.is_empty() {
            return Err(Error::EmptyAddressRequest);
        }
        let mut pos = 0;
        while pos < value.len() {
            let entry = read_address_entry(value, &mut pos)?;
            //= https://www.rfc-editor.org/rfc/rfc9484#section-4.7.2
            //# Request IDs MUST NOT be reused by an endpoint,
            //# and MUST NOT be zero.
            if entry.request_id == 0 {
                return Err(Error::ZeroRequestId);
            }
        }
        Ok(AddressRequest { value })
    }

    /// The Requested Addresses, in wire order (which carries no meaning). An all-zero address asks
    /// for any address of that family with the given prefix length.
    pub fn iter(&self) -> AddressEntries<'a> {
        AddressEntries {
            value: self.value,
            pos: 0,
        }
    }
}

/// Iterator over the entries of a validated ADDRESS_ASSIGN or ADDRESS_REQUEST.
#[derive(Debug, Clone)]
pub struct AddressEntries<'a> {
    value: &'a [u8],
    pos: usize,
}

impl Iterator for AddressEntries<'_> {
    type Item = AddressEntry;

    fn next(&mut self) -> Option<AddressEntry> {
        if self.pos >= self.value.len() {
            return None;
        }
        // Invariant: the value was validated by new_checked, so this never fails; were it to,
        // the iteration ends rather than panics.
        read_address_entry(self.value, &mut self.pos).ok()
    }
}

/// A validated ROUTE_ADVERTISEMENT value: IP Address Ranges in the order RFC 9484 §4.7.3 requires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteAdvertisement<'a> {
    value: &'a [u8],
}

impl<'a> RouteAdvertisement<'a> {
    /// Validates every range of `value` and their order.
    pub fn new_checked(value: &'a [u8]) -> Result<Self, Error> {
        //= https://www.rfc-editor.org/rfc/rfc9484#section-4.7.3
        //# The ROUTE_ADVERTISEMENT capsule contains a sequence of zero or more IP Address
        //# Ranges.
        let mut pos = 0;
        let mut prev: Option<IpAddressRange> = None;
        let mut overlap = ZeroProtocolOverlap::default();
        let fetch = |at: usize| {
            let mut next = at;
            read_range(value, &mut next).ok().map(|r| (r, next))
        };
        while pos < value.len() {
            let at = pos;
            let range = read_range(value, &mut pos)?;
            if let Some(prev) = prev {
                check_range_order(&prev, &range)?;
            }
            overlap.step(&range, at, pos, fetch)?;
            prev = Some(range);
        }
        Ok(RouteAdvertisement { value })
    }

    /// The ranges, in wire order.
    pub fn iter(&self) -> IpAddressRanges<'a> {
        IpAddressRanges {
            value: self.value,
            pos: 0,
        }
    }
}

/// Iterator over the ranges of a validated ROUTE_ADVERTISEMENT.
#[derive(Debug, Clone)]
pub struct IpAddressRanges<'a> {
    value: &'a [u8],
    pos: usize,
}

impl Iterator for IpAddressRanges<'_> {
    type Item = IpAddressRange;

    fn next(&mut self) -> Option<IpAddressRange> {
        if self.pos >= self.value.len() {
            return None;
        }
        // Invariant: validated by new_checked; a failure would end the iteration, not panic.
        read_range(self.value, &mut self.pos).ok()
    }
}

/// What one call to [`CapsuleDecoder::decode`] found at the front of the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// The buffer holds only part of a capsule: read at least `at_least` more bytes and call
    /// again with the same bytes plus the new ones.
    NeedMore {
        /// A lower bound on the bytes still missing.
        at_least: usize,
    },
    /// One whole capsule; drop `consumed` bytes from the front of the buffer.
    Capsule {
        /// The capsule, borrowing from the buffer.
        capsule: Capsule<'a>,
        /// Bytes of the buffer it took (type, length and value).
        consumed: usize,
    },
    /// Bytes of a capsule that is dropped unread: an unknown type, or a DATAGRAM longer than the
    /// bound. The capsule may continue past the buffer; the decoder then skips the rest on the
    /// following calls, reporting each piece as `Skipped`.
    Skipped {
        /// The dropped capsule's type.
        capsule_type: CapsuleType,
        /// Bytes of the buffer to drop.
        consumed: usize,
    },
}

/// An incremental capsule parser for one request stream.
#[derive(Debug, Clone)]
pub struct CapsuleDecoder {
    max_value_len: usize,
    skipping: Option<(CapsuleType, u64)>,
}

impl Default for CapsuleDecoder {
    fn default() -> Self {
        CapsuleDecoder::new(DEFAULT_MAX_CAPSULE_LEN)
    }
}

impl CapsuleDecoder {
    /// A decoder that refuses known capsules whose value is longer than `max_value_len` bytes (and
    /// drops DATAGRAM capsules that long), so a caller never needs more than the capsule header
    /// plus `max_value_len` bytes buffered.
    pub fn new(max_value_len: usize) -> Self {
        CapsuleDecoder {
            max_value_len,
            skipping: None,
        }
    }

    /// True between capsules (nothing of a capsule has been consumed without finishing it).
    pub fn is_idle(&self) -> bool {
        self.skipping.is_none()
    }

    /// Reads the next capsule from the front of `buf` (the bytes buffered and not yet consumed).
    pub fn decode<'a>(&mut self, buf: &'a [u8]) -> Result<Decoded<'a>, Error> {
        if let Some((capsule_type, remaining)) = self.skipping {
            if buf.is_empty() {
                return Ok(Decoded::NeedMore { at_least: 1 });
            }
            let consumed = usize::try_from(remaining).map_or(buf.len(), |r| r.min(buf.len()));
            let left = remaining - consumed as u64;
            self.skipping = if left == 0 {
                None
            } else {
                Some((capsule_type, left))
            };
            return Ok(Decoded::Skipped {
                capsule_type,
                consumed,
            });
        }

        let Ok((raw_type, type_len)) = varint::decode(buf) else {
            return Ok(Decoded::NeedMore { at_least: 1 });
        };
        let Ok((len, len_len)) = varint::decode(&buf[type_len..]) else {
            return Ok(Decoded::NeedMore { at_least: 1 });
        };
        let header = type_len + len_len;
        let available = (buf.len() - header) as u64;
        let capsule_type = CapsuleType::from(raw_type);

        //= https://www.rfc-editor.org/rfc/rfc9297#section-3.2
        //# Endpoints that receive a Capsule with an unknown Capsule Type MUST
        //# silently drop that Capsule and skip over it to parse the next Capsule.
        let too_long = len > self.max_value_len as u64;
        //= https://www.rfc-editor.org/rfc/rfc9297#section-3.5
        //# the implementation SHOULD discard the Capsule without buffering its
        //# contents into memory
        let skip = matches!(capsule_type, CapsuleType::Unknown(_))
            || (capsule_type == CapsuleType::Datagram && too_long);
        if skip {
            if len <= available {
                // len <= available <= buf.len(), so it fits usize.
                return Ok(Decoded::Skipped {
                    capsule_type,
                    consumed: header + len as usize,
                });
            }
            self.skipping = Some((capsule_type, len - available));
            return Ok(Decoded::Skipped {
                capsule_type,
                consumed: buf.len(),
            });
        }
        if too_long {
            return Err(Error::CapsuleTooLong);
        }
        // len <= max_value_len, a usize; the sum can only overflow on a 32-bit target with a
        // bound near usize::MAX, which is then too long.
        let end = header
            .checked_add(len as usize)
            .ok_or(Error::CapsuleTooLong)?;
        let len = end - header;
        let Some(value) = buf.get(header..end) else {
            return Ok(Decoded::NeedMore {
                at_least: end - buf.len(),
            });
        };
        match Capsule::parse_value(capsule_type, value)? {
            Some(capsule) => Ok(Decoded::Capsule {
                capsule,
                consumed: header + len,
            }),
            // Unknown types took the skip branch above.
            None => Ok(Decoded::Skipped {
                capsule_type,
                consumed: header + len,
            }),
        }
    }

    /// Call when the request stream ends with `remaining` bytes unconsumed: a capsule cut short by
    /// the end of the stream is malformed (RFC 9297 §3.3).
    pub fn finish(&self, remaining: &[u8]) -> Result<(), Error> {
        if self.is_idle() && remaining.is_empty() {
            Ok(())
        } else {
            Err(Error::TruncatedAtEndOfStream)
        }
    }
}

/// A capsule to emit, described from plain slices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CapsuleRepr<'a> {
    /// DATAGRAM with this HTTP Datagram Payload (Context ID included).
    Datagram(&'a [u8]),
    /// ADDRESS_ASSIGN with these Assigned Addresses (may be empty).
    AddressAssign(&'a [AddressEntry]),
    /// ADDRESS_REQUEST with these Requested Addresses (at least one, no Request ID 0).
    AddressRequest(&'a [AddressEntry]),
    /// ROUTE_ADVERTISEMENT with these ranges, already in the RFC's order.
    RouteAdvertisement(&'a [IpAddressRange]),
    /// Any other capsule, value given raw (extensions, GREASE, tests).
    Unknown {
        /// The capsule type.
        capsule_type: u64,
        /// The value.
        value: &'a [u8],
    },
}

impl CapsuleRepr<'_> {
    /// The capsule type.
    pub fn capsule_type(&self) -> CapsuleType {
        match self {
            CapsuleRepr::Datagram(_) => CapsuleType::Datagram,
            CapsuleRepr::AddressAssign(_) => CapsuleType::AddressAssign,
            CapsuleRepr::AddressRequest(_) => CapsuleType::AddressRequest,
            CapsuleRepr::RouteAdvertisement(_) => CapsuleType::RouteAdvertisement,
            CapsuleRepr::Unknown { capsule_type, .. } => CapsuleType::from(*capsule_type),
        }
    }

    /// Bytes of the Capsule Value.
    pub fn value_len(&self) -> usize {
        match self {
            CapsuleRepr::Datagram(v) | CapsuleRepr::Unknown { value: v, .. } => v.len(),
            CapsuleRepr::AddressAssign(e) | CapsuleRepr::AddressRequest(e) => e
                .iter()
                .map(|e| varint::encoded_len(e.request_id) + 2 + addr_bytes(e.prefix.addr))
                .sum(),
            CapsuleRepr::RouteAdvertisement(r) => {
                r.iter().map(|r| 2 + 2 * addr_bytes(r.start)).sum()
            }
        }
    }

    /// Bytes [`CapsuleRepr::emit`] writes: type, length and value.
    pub fn buffer_len(&self) -> usize {
        let len = self.value_len();
        varint::encoded_len(u64::from(self.capsule_type())) + varint::encoded_len(len as u64) + len
    }

    /// Checks the RFC's rules for this capsule, then writes it at the front of `buf`; returns the
    /// bytes written.
    pub fn emit(&self, buf: &mut [u8]) -> Result<usize, Error> {
        self.check()?;
        let value_len = self.value_len();
        let mut pos = 0;
        pos += varint::encode(u64::from(self.capsule_type()), buf).map_err(map_varint)?;
        pos += varint::encode(value_len as u64, tail(buf, pos)?).map_err(map_varint)?;
        if buf.len() < pos + value_len {
            return Err(Error::BufferTooSmall);
        }
        match self {
            CapsuleRepr::Datagram(v) | CapsuleRepr::Unknown { value: v, .. } => {
                buf[pos..pos + v.len()].copy_from_slice(v);
                pos += v.len();
            }
            CapsuleRepr::AddressAssign(entries) | CapsuleRepr::AddressRequest(entries) => {
                for e in entries.iter() {
                    pos += varint::encode(e.request_id, tail(buf, pos)?).map_err(map_varint)?;
                    pos = put_u8(buf, pos, ip_version(e.prefix.addr))?;
                    pos = put_addr(buf, pos, e.prefix.addr)?;
                    pos = put_u8(buf, pos, e.prefix.len)?;
                }
            }
            CapsuleRepr::RouteAdvertisement(ranges) => {
                for r in ranges.iter() {
                    pos = put_u8(buf, pos, ip_version(r.start))?;
                    pos = put_addr(buf, pos, r.start)?;
                    pos = put_addr(buf, pos, r.end)?;
                    pos = put_u8(buf, pos, r.ip_protocol)?;
                }
            }
        }
        Ok(pos)
    }

    fn check(&self) -> Result<(), Error> {
        match self {
            CapsuleRepr::Datagram(_) | CapsuleRepr::AddressAssign(_) => {}
            CapsuleRepr::Unknown { capsule_type, .. } => {
                if *capsule_type > varint::MAX {
                    return Err(Error::ValueTooLarge);
                }
            }
            CapsuleRepr::AddressRequest(entries) => {
                if entries.is_empty() {
                    return Err(Error::EmptyAddressRequest);
                }
                if entries.iter().any(|e| e.request_id == 0) {
                    return Err(Error::ZeroRequestId);
                }
            }
            CapsuleRepr::RouteAdvertisement(ranges) => {
                for r in ranges.iter() {
                    if r.start.is_ipv4() != r.end.is_ipv4() {
                        return Err(Error::MixedAddressFamilies);
                    }
                    if addr_to_u128(r.start) > addr_to_u128(r.end) {
                        return Err(Error::RangeStartAfterEnd);
                    }
                }
                for pair in ranges.windows(2) {
                    check_range_order(&pair[0], &pair[1])?;
                }
                let mut overlap = ZeroProtocolOverlap::default();
                for (i, r) in ranges.iter().enumerate() {
                    overlap.step(r, i, i + 1, |j| ranges.get(j).map(|r| (*r, j + 1)))?;
                }
            }
        }
        if let CapsuleRepr::AddressAssign(e) | CapsuleRepr::AddressRequest(e) = self {
            if e.iter().any(|e| e.request_id > varint::MAX) {
                return Err(Error::ValueTooLarge);
            }
        }
        Ok(())
    }
}

// ---- helpers ----

fn read_u8(buf: &[u8], pos: &mut usize) -> Result<u8, Error> {
    let b = *buf.get(*pos).ok_or(Error::TruncatedValue)?;
    *pos += 1;
    Ok(b)
}

fn read_addr(version: u8, buf: &[u8], pos: &mut usize) -> Result<IpAddr, Error> {
    //= https://www.rfc-editor.org/rfc/rfc9484#section-4.7.1
    //# If the IP Version field has value 4, the IP Address
    //# field SHALL have a length of 32 bits. If the IP Version field has value 6, the
    //# IP Address field SHALL have a length of 128 bits.
    let addr = match version {
        4 => {
            let b: [u8; 4] = buf
                .get(*pos..*pos + 4)
                .and_then(|s| s.try_into().ok())
                .ok_or(Error::TruncatedValue)?;
            *pos += 4;
            IpAddr::V4(Ipv4Addr::from(b))
        }
        6 => {
            let b: [u8; 16] = buf
                .get(*pos..*pos + 16)
                .and_then(|s| s.try_into().ok())
                .ok_or(Error::TruncatedValue)?;
            *pos += 16;
            IpAddr::V6(Ipv6Addr::from(b))
        }
        _ => return Err(Error::InvalidIpVersion),
    };
    Ok(addr)
}

fn read_version(buf: &[u8], pos: &mut usize) -> Result<u8, Error> {
    //= https://www.rfc-editor.org/rfc/rfc9484#section-4.7.1
    //# IP Version of this address assignment, encoded as an unsigned 8-bit integer.
    //# MUST be either 4 or 6.
    let v = read_u8(buf, pos)?;
    if v != 4 && v != 6 {
        return Err(Error::InvalidIpVersion);
    }
    Ok(v)
}

fn read_address_entry(buf: &[u8], pos: &mut usize) -> Result<AddressEntry, Error> {
    let (request_id, n) =
        varint::decode(buf.get(*pos..).unwrap_or(&[])).map_err(|_| Error::TruncatedValue)?;
    *pos += n;
    let version = read_version(buf, pos)?;
    let addr = read_addr(version, buf, pos)?;
    //= https://www.rfc-editor.org/rfc/rfc9484#section-4.7.1
    //# This MUST be less than
    //# or equal to the length of the IP Address field, in bits.
    //= https://www.rfc-editor.org/rfc/rfc9484#section-4.7.1
    //# If the
    //# prefix length is strictly less than the length of the IP address in bits, the
    //# lower bits of the IP Address field that are not covered by the prefix length
    //# MUST all be set to 0.
    let prefix = IpPrefix::new(addr, read_u8(buf, pos)?)?;
    Ok(AddressEntry { request_id, prefix })
}

fn read_range(buf: &[u8], pos: &mut usize) -> Result<IpAddressRange, Error> {
    let version = read_version(buf, pos)?;
    let start = read_addr(version, buf, pos)?;
    let end = read_addr(version, buf, pos)?;
    let ip_protocol = read_u8(buf, pos)?;
    //= https://www.rfc-editor.org/rfc/rfc9484#section-4.7.3
    //# The Start IP Address MUST be less than or equal to the End IP Address.
    if addr_to_u128(start) > addr_to_u128(end) {
        return Err(Error::RangeStartAfterEnd);
    }
    Ok(IpAddressRange {
        start,
        end,
        ip_protocol,
    })
}

//= https://www.rfc-editor.org/rfc/rfc9484#section-4.7.3
//# If an IP Address Range A precedes an IP Address Range B
//# in the same ROUTE_ADVERTISEMENT capsule, they MUST follow these requirements:
//= https://www.rfc-editor.org/rfc/rfc9484#section-4.7.3
//# If an endpoint receives a ROUTE_ADVERTISEMENT capsule that does not meet these
//# requirements, it MUST abort the IP proxying request stream.
fn check_range_order(a: &IpAddressRange, b: &IpAddressRange) -> Result<(), Error> {
    let (va, vb) = (ip_version(a.start), ip_version(b.start));
    //= https://www.rfc-editor.org/rfc/rfc9484#section-4.7.3
    //# IP Version of A MUST be less than or equal to IP Version of B
    if va != vb {
        return if va < vb {
            Ok(())
        } else {
            Err(Error::RangesOutOfOrder)
        };
    }
    //= https://www.rfc-editor.org/rfc/rfc9484#section-4.7.3
    //# If the IP Version of A and B are equal, the IP Protocol of A MUST be less
    //# than or equal to IP Protocol of B.
    if a.ip_protocol != b.ip_protocol {
        return if a.ip_protocol < b.ip_protocol {
            Ok(())
        } else {
            Err(Error::RangesOutOfOrder)
        };
    }
    //= https://www.rfc-editor.org/rfc/rfc9484#section-4.7.3
    //# If the IP Version and IP Protocol of A and B are both equal, the End IP
    //# Address of A MUST be strictly less than the Start IP Address of B.
    if addr_to_u128(a.end) < addr_to_u128(b.start) {
        Ok(())
    } else {
        Err(Error::RangesOutOfOrder)
    }
}

/// Checks, range by range in wire order (already checked by [`check_range_order`]), that no range
/// for one protocol overlaps a range for all protocols of the same IP version. Ranges are sorted,
/// so each protocol group walks the protocol-0 ranges once: linear in the ranges plus (groups ×
/// protocol-0 ranges), never quadratic in the capsule.
///
/// Positions are opaque cursors (byte offsets in a capsule value, or slice indices); `fetch(at)`
/// returns the range at `at` and the cursor after it.
#[derive(Debug, Default)]
struct ZeroProtocolOverlap {
    version: u8,
    zero_start: usize,
    zero_end: usize,
    group: Option<u8>,
    cursor: usize,
}

impl ZeroProtocolOverlap {
    //= https://www.rfc-editor.org/rfc/rfc9484#section-4.7.3
    //# Endpoints MUST NOT send a
    //# ROUTE_ADVERTISEMENT capsule with routes that overlap in such a way. Validating
    //# this requirement is OPTIONAL, but if an endpoint detects the violation, it MUST
    //# abort the IP proxying request stream.
    fn step(
        &mut self,
        range: &IpAddressRange,
        at: usize,
        next: usize,
        fetch: impl Fn(usize) -> Option<(IpAddressRange, usize)>,
    ) -> Result<(), Error> {
        let version = ip_version(range.start);
        if version != self.version {
            *self = ZeroProtocolOverlap {
                version,
                zero_start: at,
                zero_end: at,
                group: None,
                cursor: at,
            };
        }
        if range.ip_protocol == 0 {
            // Protocol-0 ranges come first within a version, so they form one block.
            self.zero_end = next;
            return Ok(());
        }
        if self.group != Some(range.ip_protocol) {
            self.group = Some(range.ip_protocol);
            self.cursor = self.zero_start;
        }
        let (start, end) = (addr_to_u128(range.start), addr_to_u128(range.end));
        while self.cursor < self.zero_end {
            let Some((zero, after)) = fetch(self.cursor) else {
                break;
            };
            if addr_to_u128(zero.end) < start {
                self.cursor = after;
                continue;
            }
            if addr_to_u128(zero.start) <= end {
                return Err(Error::OverlapsAllProtocolsRange);
            }
            break;
        }
        Ok(())
    }
}

fn tail(buf: &mut [u8], pos: usize) -> Result<&mut [u8], Error> {
    buf.get_mut(pos..).ok_or(Error::BufferTooSmall)
}

fn put_u8(buf: &mut [u8], pos: usize, b: u8) -> Result<usize, Error> {
    *buf.get_mut(pos).ok_or(Error::BufferTooSmall)? = b;
    Ok(pos + 1)
}

fn put_addr(buf: &mut [u8], pos: usize, addr: IpAddr) -> Result<usize, Error> {
    let n = addr_bytes(addr);
    let out = buf.get_mut(pos..pos + n).ok_or(Error::BufferTooSmall)?;
    match addr {
        IpAddr::V4(a) => out.copy_from_slice(&a.octets()),
        IpAddr::V6(a) => out.copy_from_slice(&a.octets()),
    }
    Ok(pos + n)
}

fn map_varint(e: varint::Error) -> Error {
    match e {
        varint::Error::ValueTooLarge => Error::ValueTooLarge,
        _ => Error::BufferTooSmall,
    }
}

fn ip_version(addr: IpAddr) -> u8 {
    if addr.is_ipv4() {
        4
    } else {
        6
    }
}

fn addr_bytes(addr: IpAddr) -> usize {
    if addr.is_ipv4() {
        4
    } else {
        16
    }
}

fn addr_bits(addr: IpAddr) -> u32 {
    if addr.is_ipv4() {
        32
    } else {
        128
    }
}

pub(crate) fn addr_to_u128(addr: IpAddr) -> u128 {
    match addr {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

/// Mask of the first `len` bits of a `bits`-bit address, right-aligned in a u128. `len <= bits`.
fn prefix_mask(len: u8, bits: u32) -> u128 {
    let all = if bits == 128 {
        u128::MAX
    } else {
        (1u128 << bits) - 1
    };
    let host = bits.saturating_sub(u32::from(len));
    if host >= 128 {
        0
    } else {
        all & !((1u128 << host) - 1)
    }
}

#[cfg(test)]
mod tests;
