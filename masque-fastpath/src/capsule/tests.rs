//! Tests of the capsule codec: byte captures written from the RFCs' formats, poison-buffer emits,
//! truncation at every length, streaming splits, and property tests over random bytes.

use super::*;
use proptest::prelude::*;

const POISON: u8 = 0xA5;

fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

fn v6(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Decodes a whole buffer; panics on anything but one capsule taking all of it.
fn decode_one(bytes: &[u8]) -> Capsule<'_> {
    match CapsuleDecoder::default().decode(bytes) {
        Ok(Decoded::Capsule { capsule, consumed }) => {
            assert_eq!(consumed, bytes.len());
            capsule
        }
        other => panic!("expected one capsule, got {other:?}"),
    }
}

fn emit_poisoned(repr: &CapsuleRepr<'_>) -> Vec<u8> {
    let mut buf = vec![POISON; repr.buffer_len() + 8];
    let n = repr.emit(&mut buf).unwrap();
    assert_eq!(n, repr.buffer_len());
    assert!(
        buf[n..].iter().all(|&b| b == POISON),
        "emit wrote past its length"
    );
    buf.truncate(n);
    buf
}

// ADDRESS_ASSIGN giving 192.0.2.10/32 unprompted and 2001:db8:1::/48 in answer to request 7.
const ADDRESS_ASSIGN: [u8; 28] = [
    0x01, // Capsule Type = ADDRESS_ASSIGN (0x01)
    0x1a, // Capsule Length = 26
    0x00, // Request ID = 0 (unprompted)
    0x04, // IP Version = 4
    0xc0, 0x00, 0x02, 0x0a, // IP Address = 192.0.2.10
    0x20, // IP Prefix Length = 32
    0x07, // Request ID = 7
    0x06, // IP Version = 6
    0x20, 0x01, 0x0d, 0xb8, 0x00, 0x01, 0x00, 0x00, // IP Address = 2001:db8:1::
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, //
    0x30, // IP Prefix Length = 48
];

#[test]
fn address_assign_capture_parses_field_by_field() {
    let Capsule::AddressAssign(assign) = decode_one(&ADDRESS_ASSIGN) else {
        panic!()
    };
    let entries: Vec<_> = assign.iter().collect();
    assert_eq!(entries.len(), 2);
    assert_eq!(entries[0].request_id, 0);
    assert_eq!(entries[0].prefix.addr(), v4(192, 0, 2, 10));
    assert_eq!(entries[0].prefix.prefix_len(), 32);
    assert_eq!(entries[1].request_id, 7);
    assert_eq!(entries[1].prefix.addr(), v6("2001:db8:1::"));
    assert_eq!(entries[1].prefix.prefix_len(), 48);
    assert!(entries[1].prefix.contains(v6("2001:db8:1:ffff::1")));
    assert!(!entries[1].prefix.contains(v6("2001:db8:2::1")));
    assert!(!entries[1].prefix.contains(v4(192, 0, 2, 10)));
}

#[test]
fn address_assign_emits_the_capture() {
    let entries = [
        AddressEntry {
            request_id: 0,
            prefix: IpPrefix::host(v4(192, 0, 2, 10)),
        },
        AddressEntry {
            request_id: 7,
            prefix: IpPrefix::new(v6("2001:db8:1::"), 48).unwrap(),
        },
    ];
    assert_eq!(
        emit_poisoned(&CapsuleRepr::AddressAssign(&entries)),
        ADDRESS_ASSIGN
    );
}

//= https://www.rfc-editor.org/rfc/rfc9484#section-4.7.1
//# An ADDRESS_ASSIGN capsule can also be empty, indicating that
//# all addresses have been removed.
#[test]
fn empty_address_assign_is_legal() {
    let Capsule::AddressAssign(a) = decode_one(&[0x01, 0x00]) else {
        panic!()
    };
    assert_eq!(a.iter().count(), 0);
    assert_eq!(
        emit_poisoned(&CapsuleRepr::AddressAssign(&[])),
        [0x01, 0x00]
    );
}

// ADDRESS_REQUEST asking for any IPv4 address (request 1) and any IPv6 /64 (request 2).
const ADDRESS_REQUEST: [u8; 28] = [
    0x02, // Capsule Type = ADDRESS_REQUEST (0x02)
    0x1a, // Capsule Length = 26
    0x01, // Request ID = 1
    0x04, // IP Version = 4
    0x00, 0x00, 0x00, 0x00, // IP Address = 0.0.0.0 (no preference)
    0x20, // IP Prefix Length = 32
    0x02, // Request ID = 2
    0x06, // IP Version = 6
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // IP Address = :: (no preference)
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, //
    0x40, // IP Prefix Length = 64
];

#[test]
fn address_request_capture_round_trips() {
    let Capsule::AddressRequest(req) = decode_one(&ADDRESS_REQUEST) else {
        panic!()
    };
    let entries: Vec<_> = req.iter().collect();
    assert_eq!(
        entries[0],
        AddressEntry {
            request_id: 1,
            prefix: IpPrefix::host(v4(0, 0, 0, 0))
        }
    );
    assert_eq!(entries[1].request_id, 2);
    assert_eq!(entries[1].prefix.addr(), v6("::"));
    assert_eq!(entries[1].prefix.prefix_len(), 64);
    assert_eq!(
        emit_poisoned(&CapsuleRepr::AddressRequest(&entries)),
        ADDRESS_REQUEST
    );
}

//= https://www.rfc-editor.org/rfc/rfc9484#section-4.7.2
//# If an endpoint receives an ADDRESS_REQUEST capsule that contains zero Requested
//# Addresses, it MUST abort the IP proxying request stream.
#[test]
fn empty_address_request_is_rejected_both_ways() {
    assert_eq!(
        CapsuleDecoder::default().decode(&[0x02, 0x00]),
        Err(Error::EmptyAddressRequest)
    );
    assert_eq!(
        CapsuleRepr::AddressRequest(&[]).emit(&mut [0; 8]),
        Err(Error::EmptyAddressRequest)
    );
}

//= https://www.rfc-editor.org/rfc/rfc9484#section-4.7.2
//# Request IDs MUST NOT be reused by an endpoint,
//# and MUST NOT be zero.
#[test]
fn zero_request_id_in_a_request_is_rejected() {
    let mut bytes = ADDRESS_REQUEST;
    bytes[2] = 0x00;
    assert_eq!(
        CapsuleDecoder::default().decode(&bytes),
        Err(Error::ZeroRequestId)
    );
    let e = [AddressEntry {
        request_id: 0,
        prefix: IpPrefix::host(v4(0, 0, 0, 0)),
    }];
    assert_eq!(
        CapsuleRepr::AddressRequest(&e).emit(&mut [0; 32]),
        Err(Error::ZeroRequestId)
    );
}

//= https://www.rfc-editor.org/rfc/rfc9484#section-4.7.1
//# IP Version of this address assignment, encoded as an unsigned 8-bit integer.
//# MUST be either 4 or 6.
#[test]
fn ip_version_other_than_4_or_6_is_rejected() {
    for version in [0u8, 5, 7, 41, 255] {
        let mut bytes = ADDRESS_ASSIGN;
        bytes[3] = version;
        assert_eq!(
            CapsuleDecoder::default().decode(&bytes),
            Err(Error::InvalidIpVersion)
        );
    }
}

//= https://www.rfc-editor.org/rfc/rfc9484#section-4.7.1
//# This MUST be less than
//# or equal to the length of the IP Address field, in bits.
#[test]
fn prefix_longer_than_the_address_is_rejected() {
    let mut bytes = ADDRESS_ASSIGN;
    bytes[8] = 33;
    assert_eq!(
        CapsuleDecoder::default().decode(&bytes),
        Err(Error::PrefixLengthTooLong)
    );
    let mut bytes = ADDRESS_ASSIGN;
    bytes[27] = 129;
    assert_eq!(
        CapsuleDecoder::default().decode(&bytes),
        Err(Error::PrefixLengthTooLong)
    );
    assert_eq!(
        IpPrefix::new(v4(0, 0, 0, 0), 33),
        Err(Error::PrefixLengthTooLong)
    );
}

//= https://www.rfc-editor.org/rfc/rfc9484#section-4.7.1
//# If the
//# prefix length is strictly less than the length of the IP address in bits, the
//# lower bits of the IP Address field that are not covered by the prefix length
//# MUST all be set to 0.
#[test]
fn host_bits_past_the_prefix_are_rejected() {
    let mut bytes = ADDRESS_ASSIGN;
    bytes[8] = 24; // 192.0.2.10/24 has host bits set
    assert_eq!(
        CapsuleDecoder::default().decode(&bytes),
        Err(Error::HostBitsSet)
    );
    assert_eq!(
        IpPrefix::new(v6("2001:db8::1"), 64),
        Err(Error::HostBitsSet)
    );
    assert!(IpPrefix::new(v6("2001:db8::"), 32).is_ok());
    assert!(IpPrefix::new(v4(255, 255, 255, 255), 0).is_err());
    assert!(IpPrefix::new(v4(0, 0, 0, 0), 0).is_ok());
    assert!(IpPrefix::new(v6("::"), 0).is_ok());
}

// ROUTE_ADVERTISEMENT in the RFC's order: IPv4 all protocols, IPv4 UDP (two disjoint ranges),
// IPv6 all protocols.
const ROUTE_ADVERTISEMENT: [u8; 67] = [
    0x03, // Capsule Type = ROUTE_ADVERTISEMENT (0x03)
    0x40, 0x40, // Capsule Length = 64 (2-byte varint)
    0x04, // IP Version = 4
    0x0a, 0x00, 0x00, 0x00, // Start IP Address = 10.0.0.0
    0x0a, 0xff, 0xff, 0xff, // End IP Address = 10.255.255.255
    0x00, // IP Protocol = 0 (all)
    0x04, // IP Version = 4
    0xc0, 0x00, 0x02, 0x00, // Start IP Address = 192.0.2.0
    0xc0, 0x00, 0x02, 0x7f, // End IP Address = 192.0.2.127
    0x11, // IP Protocol = 17 (UDP)
    0x04, // IP Version = 4
    0xc0, 0x00, 0x02, 0x80, // Start IP Address = 192.0.2.128
    0xc0, 0x00, 0x02, 0xff, // End IP Address = 192.0.2.255
    0x11, // IP Protocol = 17 (UDP)
    0x06, // IP Version = 6
    0x20, 0x01, 0x0d, 0xb8, 0x00, 0x00, 0x00, 0x00, // Start IP Address = 2001:db8::
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, //
    0x20, 0x01, 0x0d, 0xb8, 0xff, 0xff, 0xff, 0xff, // End IP Address = 2001:db8:ffff:...:ffff
    0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, //
    0x00, // IP Protocol = 0 (all)
];

fn route_ranges() -> [IpAddressRange; 4] {
    [
        IpAddressRange {
            start: v4(10, 0, 0, 0),
            end: v4(10, 255, 255, 255),
            ip_protocol: 0,
        },
        IpAddressRange {
            start: v4(192, 0, 2, 0),
            end: v4(192, 0, 2, 127),
            ip_protocol: 17,
        },
        IpAddressRange {
            start: v4(192, 0, 2, 128),
            end: v4(192, 0, 2, 255),
            ip_protocol: 17,
        },
        IpAddressRange {
            start: v6("2001:db8::"),
            end: v6("2001:db8:ffff:ffff:ffff:ffff:ffff:ffff"),
            ip_protocol: 0,
        },
    ]
}

#[test]
fn route_advertisement_capture_parses_and_emits() {
    let Capsule::RouteAdvertisement(adv) = decode_one(&ROUTE_ADVERTISEMENT) else {
        panic!()
    };
    let ranges: Vec<_> = adv.iter().collect();
    assert_eq!(ranges, route_ranges());
    assert_eq!(
        emit_poisoned(&CapsuleRepr::RouteAdvertisement(&route_ranges())),
        ROUTE_ADVERTISEMENT
    );
}

//= https://www.rfc-editor.org/rfc/rfc9484#section-4.7.3
//# If an endpoint receives a ROUTE_ADVERTISEMENT capsule that does not meet these
//# requirements, it MUST abort the IP proxying request stream.
#[test]
fn ranges_out_of_order_are_rejected_both_ways() {
    let r = route_ranges();
    // IPv6 before IPv4.
    let bad_version = [r[3], r[0]];
    // Same version, protocol 17 before 0.
    let bad_protocol = [r[1], r[0]];
    // Same version and protocol, overlapping or touching (end of A not below start of B).
    let overlap = [
        r[1],
        IpAddressRange {
            start: v4(192, 0, 2, 127),
            end: v4(192, 0, 2, 200),
            ip_protocol: 17,
        },
    ];
    let swapped = [r[2], r[1]];
    for bad in [
        &bad_version[..],
        &bad_protocol[..],
        &overlap[..],
        &swapped[..],
    ] {
        let repr = CapsuleRepr::RouteAdvertisement(bad);
        assert_eq!(repr.emit(&mut [0; 128]), Err(Error::RangesOutOfOrder));
        // Write the same ranges without the check and feed them to the decoder.
        let mut value = Vec::new();
        for range in bad {
            let one = [*range];
            let bytes = emit_poisoned(&CapsuleRepr::RouteAdvertisement(&one));
            value.extend_from_slice(&bytes[2..]);
        }
        let unknown = CapsuleRepr::Unknown {
            capsule_type: 0x03,
            value: &value,
        };
        let bytes = emit_poisoned(&unknown);
        assert_eq!(
            CapsuleDecoder::default().decode(&bytes),
            Err(Error::RangesOutOfOrder)
        );
    }
}

//= https://www.rfc-editor.org/rfc/rfc9484#section-4.7.3
//# The Start IP Address MUST be less than or equal to the End IP Address.
#[test]
fn range_start_after_end_is_rejected() {
    let mut bytes = ROUTE_ADVERTISEMENT;
    bytes[4] = 0x0b; // start 11.0.0.0 > end 10.255.255.255
    assert_eq!(
        CapsuleDecoder::default().decode(&bytes),
        Err(Error::RangeStartAfterEnd)
    );
    let r = [IpAddressRange {
        start: v4(10, 0, 0, 2),
        end: v4(10, 0, 0, 1),
        ip_protocol: 0,
    }];
    assert_eq!(
        CapsuleRepr::RouteAdvertisement(&r).emit(&mut [0; 32]),
        Err(Error::RangeStartAfterEnd)
    );
    let r = [IpAddressRange {
        start: v4(10, 0, 0, 2),
        end: v6("::1"),
        ip_protocol: 0,
    }];
    assert_eq!(
        CapsuleRepr::RouteAdvertisement(&r).emit(&mut [0; 64]),
        Err(Error::MixedAddressFamilies)
    );
}

#[test]
fn single_address_range_is_legal() {
    let r = [IpAddressRange {
        start: v4(10, 0, 0, 1),
        end: v4(10, 0, 0, 1),
        ip_protocol: 6,
    }];
    let bytes = emit_poisoned(&CapsuleRepr::RouteAdvertisement(&r));
    let Capsule::RouteAdvertisement(adv) = decode_one(&bytes) else {
        panic!()
    };
    assert_eq!(adv.iter().collect::<Vec<_>>(), r);
}

// A DATAGRAM capsule carrying context ID 0 and four payload bytes.
const DATAGRAM: [u8; 7] = [
    0x00, // Capsule Type = DATAGRAM (0x00)
    0x05, // Capsule Length = 5
    0x00, // Context ID = 0
    0x45, 0x00, 0x00, 0x14, // payload (start of an IPv4 header)
];

#[test]
fn datagram_capsule_capture() {
    let Capsule::Datagram(value) = decode_one(&DATAGRAM) else {
        panic!()
    };
    let inner = crate::datagram::ContextPayload::parse(value).unwrap();
    assert_eq!(inner.context_id, 0);
    assert_eq!(inner.payload, &[0x45, 0x00, 0x00, 0x14]);
    assert_eq!(
        emit_poisoned(&CapsuleRepr::Datagram(&DATAGRAM[2..])),
        DATAGRAM
    );
}

//= https://www.rfc-editor.org/rfc/rfc9297#section-3.2
//# Endpoints that receive a Capsule with an unknown Capsule Type MUST
//# silently drop that Capsule and skip over it to parse the next Capsule.
#[test]
fn unknown_capsule_is_skipped_and_the_next_one_parsed() {
    let mut stream = vec![
        0x80, 0xff, 0xf1,
        0x00, // Capsule Type = 0xfff100 (draft ADDRESS_ASSIGN), 4-byte varint
        0x03, // Capsule Length = 3
        0xaa, 0xbb, 0xcc, // value, ignored
    ];
    stream.extend_from_slice(&DATAGRAM);
    let mut dec = CapsuleDecoder::default();
    assert_eq!(
        dec.decode(&stream),
        Ok(Decoded::Skipped {
            capsule_type: CapsuleType::Unknown(0xfff100),
            consumed: 8
        })
    );
    let Ok(Decoded::Capsule {
        capsule: Capsule::Datagram(_),
        consumed: 7,
    }) = dec.decode(&stream[8..])
    else {
        panic!()
    };
    assert_eq!(dec.finish(&[]), Ok(()));
}

#[test]
fn huge_unknown_capsule_is_skipped_without_buffering() {
    // Type 0x21 (reserved for GREASE-like use), length 2^40: far above any bound.
    let mut header = [0u8; 9];
    header[0] = 0x21;
    let n = varint::encode(1 << 40, &mut header[1..]).unwrap();
    let mut dec = CapsuleDecoder::new(1024);
    let mut left: u64 = (1 << 40) + 1 + n as u64;
    let Ok(Decoded::Skipped { consumed, .. }) = dec.decode(&header[..1 + n]) else {
        panic!()
    };
    left -= consumed as u64;
    assert!(!dec.is_idle());
    let chunk = [0u8; 4096];
    // Skip a few chunks, then check the count the decoder still expects.
    for _ in 0..3 {
        let Ok(Decoded::Skipped { consumed, .. }) = dec.decode(&chunk) else {
            panic!()
        };
        assert_eq!(consumed, chunk.len());
        left -= consumed as u64;
    }
    assert_eq!(dec.skipping.map(|s| s.1), Some(left));
    assert_eq!(dec.decode(&[]), Ok(Decoded::NeedMore { at_least: 1 }));
    assert_eq!(dec.finish(&[]), Err(Error::TruncatedAtEndOfStream));
}

#[test]
fn oversize_datagram_capsule_is_discarded_but_oversize_known_capsule_is_an_error() {
    let mut dec = CapsuleDecoder::new(4);
    // DATAGRAM of 5 bytes against a bound of 4: dropped, decoder carries on.
    assert_eq!(
        dec.decode(&DATAGRAM[..3]),
        Ok(Decoded::Skipped {
            capsule_type: CapsuleType::Datagram,
            consumed: 3
        })
    );
    assert_eq!(
        dec.decode(&DATAGRAM[3..]),
        Ok(Decoded::Skipped {
            capsule_type: CapsuleType::Datagram,
            consumed: 4
        })
    );
    assert!(dec.is_idle());
    // ADDRESS_ASSIGN of 28 bytes against a bound of 4: an error, before any value is buffered.
    assert_eq!(dec.decode(&ADDRESS_ASSIGN[..2]), Err(Error::CapsuleTooLong));
}

#[test]
fn truncation_at_every_length_needs_more_then_decodes() {
    for capture in [
        &ADDRESS_ASSIGN[..],
        &ADDRESS_REQUEST[..],
        &ROUTE_ADVERTISEMENT[..],
        &DATAGRAM[..],
    ] {
        for cut in 0..capture.len() {
            let mut dec = CapsuleDecoder::default();
            match dec.decode(&capture[..cut]) {
                Ok(Decoded::NeedMore { at_least }) => {
                    assert!(
                        at_least >= 1 && cut + at_least <= capture.len(),
                        "cut {cut}"
                    )
                }
                other => panic!("cut {cut}: {other:?}"),
            }
            let want = if cut == 0 {
                Ok(())
            } else {
                Err(Error::TruncatedAtEndOfStream)
            };
            assert_eq!(dec.finish(&capture[..cut]), want, "cut {cut}");
        }
        decode_one(capture);
    }
}

#[test]
fn value_cut_inside_an_entry_is_malformed() {
    // Rewrite the length so that the value stops inside each field in turn.
    for value_len in 1..ADDRESS_ASSIGN.len() - 2 {
        if value_len == 7 {
            continue; // a whole first entry: legal
        }
        let mut bytes = vec![0x01, value_len as u8];
        bytes.extend_from_slice(&ADDRESS_ASSIGN[2..2 + value_len]);
        assert_eq!(
            CapsuleDecoder::default().decode(&bytes),
            Err(Error::TruncatedValue),
            "len {value_len}"
        );
    }
}

#[test]
fn emit_reports_short_buffers_at_every_length() {
    let entries = [AddressEntry {
        request_id: 300,
        prefix: IpPrefix::host(v6("2001:db8::1")),
    }];
    let ranges = route_ranges();
    for repr in [
        CapsuleRepr::AddressAssign(&entries),
        CapsuleRepr::AddressRequest(&entries),
        CapsuleRepr::RouteAdvertisement(&ranges),
        CapsuleRepr::Datagram(&[1, 2, 3]),
        CapsuleRepr::Unknown {
            capsule_type: 1 << 40,
            value: &[9],
        },
    ] {
        for len in 0..repr.buffer_len() {
            assert_eq!(
                repr.emit(&mut vec![0; len]),
                Err(Error::BufferTooSmall),
                "{repr:?} len {len}"
            );
        }
    }
}

#[test]
fn capsule_types_round_trip_including_unknown() {
    for raw in [0u64, 1, 2, 3, 4, 0x29, 0xfff100, varint::MAX] {
        assert_eq!(u64::from(CapsuleType::from(raw)), raw);
    }
    assert_eq!(CapsuleType::from(0xfff100), CapsuleType::Unknown(0xfff100));
}

// ---- property tests ----

fn arb_addr() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        any::<[u8; 4]>().prop_map(|b| IpAddr::V4(Ipv4Addr::from(b))),
        any::<[u8; 16]>().prop_map(|b| IpAddr::V6(Ipv6Addr::from(b))),
    ]
}

fn arb_prefix() -> impl Strategy<Value = IpPrefix> {
    (arb_addr(), any::<u8>()).prop_map(|(addr, len)| {
        let bits = addr_bits(addr);
        let len = (u32::from(len) % (bits + 1)) as u8;
        let masked = addr_to_u128(addr) & prefix_mask(len, bits);
        let addr = match addr {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::from(masked as u32)),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::from(masked)),
        };
        IpPrefix::new(addr, len).unwrap()
    })
}

fn arb_entry() -> impl Strategy<Value = AddressEntry> {
    (1..=varint::MAX, arb_prefix())
        .prop_map(|(request_id, prefix)| AddressEntry { request_id, prefix })
}

/// Sorted, disjoint ranges: sort (version, protocol, start) and drop any overlapping the previous.
/// Addresses mostly from two small blocks, so that generated ranges often meet or overlap.
fn arb_clustered_addr() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        (0u32..4096).prop_map(|o| IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + o))),
        (0u128..4096).prop_map(|o| IpAddr::V6(Ipv6Addr::from((0x2001_0db8u128 << 96) | o))),
        arb_addr(),
    ]
}

fn arb_ranges() -> impl Strategy<Value = Vec<IpAddressRange>> {
    proptest::collection::vec(
        (
            arb_clustered_addr(),
            any::<u64>(),
            prop::sample::select(vec![0u8, 6, 17]),
        ),
        0..8,
    )
    .prop_map(|raw| {
        let mut ranges: Vec<IpAddressRange> = raw
            .into_iter()
            .map(|(start, span, ip_protocol)| {
                let s = addr_to_u128(start);
                let max = if start.is_ipv4() {
                    u128::from(u32::MAX)
                } else {
                    u128::MAX
                };
                let e = s.saturating_add(u128::from(span % 2000)).min(max);
                let end = match start {
                    IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::from(e as u32)),
                    IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::from(e)),
                };
                IpAddressRange {
                    start,
                    end,
                    ip_protocol,
                }
            })
            .collect();
        ranges.sort_by_key(|r| (ip_version(r.start), r.ip_protocol, addr_to_u128(r.start)));
        let mut out: Vec<IpAddressRange> = Vec::new();
        for r in ranges {
            if out.last().is_none_or(|p| check_range_order(p, &r).is_ok()) {
                out.push(r);
            }
        }
        out
    })
}

/// Like [`arb_ranges`], without ranges for one protocol that overlap a range for all protocols.
fn arb_valid_ranges() -> impl Strategy<Value = Vec<IpAddressRange>> {
    arb_ranges().prop_map(|ranges| {
        let zero: Vec<_> = ranges
            .iter()
            .filter(|r| r.ip_protocol == 0)
            .copied()
            .collect();
        ranges
            .into_iter()
            .filter(|r| r.ip_protocol == 0 || !overlaps_zero(&zero, r))
            .collect()
    })
}

/// The brute-force reference for the protocol-0 overlap rule.
fn overlaps_zero(zero: &[IpAddressRange], r: &IpAddressRange) -> bool {
    zero.iter().any(|z| {
        ip_version(z.start) == ip_version(r.start)
            && addr_to_u128(z.start) <= addr_to_u128(r.end)
            && addr_to_u128(r.start) <= addr_to_u128(z.end)
    })
}

/// ROUTE_ADVERTISEMENT bytes written without the emit-side checks, to test the decoder's.
fn unchecked_route_advertisement(ranges: &[IpAddressRange]) -> Vec<u8> {
    let mut value = Vec::new();
    for range in ranges {
        value.push(ip_version(range.start));
        for a in [range.start, range.end] {
            match a {
                IpAddr::V4(a) => value.extend_from_slice(&a.octets()),
                IpAddr::V6(a) => value.extend_from_slice(&a.octets()),
            }
        }
        value.push(range.ip_protocol);
    }
    emit_poisoned(&CapsuleRepr::Unknown {
        capsule_type: 0x03,
        value: &value,
    })
}

//= https://www.rfc-editor.org/rfc/rfc9484#section-4.7.3
//# Endpoints MUST NOT send a
//# ROUTE_ADVERTISEMENT capsule with routes that overlap in such a way. Validating
//# this requirement is OPTIONAL, but if an endpoint detects the violation, it MUST
//# abort the IP proxying request stream.
#[test]
fn a_protocol_range_inside_an_all_protocols_range_is_rejected_both_ways() {
    let all = IpAddressRange {
        start: v4(10, 0, 0, 0),
        end: v4(10, 255, 255, 255),
        ip_protocol: 0,
    };
    let udp = IpAddressRange {
        start: v4(10, 1, 0, 0),
        end: v4(10, 1, 0, 255),
        ip_protocol: 17,
    };
    let bad = [all, udp];
    assert_eq!(
        CapsuleRepr::RouteAdvertisement(&bad).emit(&mut [0; 64]),
        Err(Error::OverlapsAllProtocolsRange)
    );
    assert_eq!(
        CapsuleDecoder::default().decode(&unchecked_route_advertisement(&bad)),
        Err(Error::OverlapsAllProtocolsRange)
    );
    // The same UDP range next to, not inside, the all-protocols range is fine; so is an IPv6
    // range for one protocol after an IPv4 range for all.
    let beside = IpAddressRange {
        start: v4(11, 0, 0, 0),
        end: v4(11, 0, 0, 255),
        ip_protocol: 17,
    };
    let v6_udp = IpAddressRange {
        start: v6("::"),
        end: v6("::ffff"),
        ip_protocol: 17,
    };
    let good = [all, beside, v6_udp];
    let bytes = emit_poisoned(&CapsuleRepr::RouteAdvertisement(&good));
    assert_eq!(bytes, unchecked_route_advertisement(&good));
    decode_one(&bytes);
}

/// Feeds `stream` to a decoder in pieces cut at `cuts`, like reads from a stream, and records each
/// result as (kind, bytes of the capsule).
fn feed(stream: &[u8], cuts: &[usize], max: usize) -> Result<Vec<(u8, Vec<u8>)>, Error> {
    let mut dec = CapsuleDecoder::new(max);
    let mut buffered: Vec<u8> = Vec::new();
    let mut out = Vec::new();
    let mut fed = 0;
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (stream.len() + 1)).collect();
    cuts.push(stream.len());
    cuts.sort_unstable();
    for cut in cuts {
        if cut > fed {
            buffered.extend_from_slice(&stream[fed..cut]);
            fed = cut;
        }
        loop {
            match dec.decode(&buffered)? {
                Decoded::NeedMore { .. } => break,
                Decoded::Capsule { capsule, consumed } => {
                    out.push((
                        u64::from(capsule.capsule_type()) as u8,
                        buffered[..consumed].to_vec(),
                    ));
                    buffered.drain(..consumed);
                }
                Decoded::Skipped { consumed, .. } => {
                    buffered.drain(..consumed);
                    if buffered.is_empty() {
                        break;
                    }
                }
            }
        }
    }
    dec.finish(&buffered)?;
    Ok(out)
}

proptest! {
    #[test]
    fn address_assign_round_trip(entries in proptest::collection::vec(arb_entry(), 0..6)) {
        let entries: Vec<_> = entries.into_iter().enumerate()
            .map(|(i, e)| AddressEntry { request_id: if i % 2 == 0 { 0 } else { e.request_id }, ..e })
            .collect();
        let bytes = emit_poisoned(&CapsuleRepr::AddressAssign(&entries));
        let Capsule::AddressAssign(a) = decode_one(&bytes) else { panic!() };
        prop_assert_eq!(a.iter().collect::<Vec<_>>(), entries);
    }

    #[test]
    fn address_request_round_trip(entries in proptest::collection::vec(arb_entry(), 1..6)) {
        let bytes = emit_poisoned(&CapsuleRepr::AddressRequest(&entries));
        let Capsule::AddressRequest(a) = decode_one(&bytes) else { panic!() };
        prop_assert_eq!(a.iter().collect::<Vec<_>>(), entries);
    }

    #[test]
    fn route_advertisement_round_trip(ranges in arb_valid_ranges()) {
        let bytes = emit_poisoned(&CapsuleRepr::RouteAdvertisement(&ranges));
        let Capsule::RouteAdvertisement(a) = decode_one(&bytes) else { panic!() };
        prop_assert_eq!(a.iter().collect::<Vec<_>>(), ranges);
    }

    #[test]
    fn a_stream_split_anywhere_decodes_like_one_read(
        entries in proptest::collection::vec(arb_entry(), 1..3),
        ranges in arb_valid_ranges(),
        payload in proptest::collection::vec(any::<u8>(), 0..40),
        unknown_type in 4..=varint::MAX,
        cuts in proptest::collection::vec(any::<usize>(), 0..12),
    ) {
        let reprs = [
            CapsuleRepr::AddressRequest(&entries),
            CapsuleRepr::Unknown { capsule_type: unknown_type, value: &payload },
            CapsuleRepr::AddressAssign(&entries),
            CapsuleRepr::RouteAdvertisement(&ranges),
            CapsuleRepr::Datagram(&payload),
        ];
        let mut stream = Vec::new();
        let mut expected = Vec::new();
        for r in &reprs {
            let bytes = emit_poisoned(r);
            if !matches!(r, CapsuleRepr::Unknown { .. }) {
                expected.push((u64::from(r.capsule_type()) as u8, bytes.clone()));
            }
            stream.extend_from_slice(&bytes);
        }
        prop_assert_eq!(feed(&stream, &[], 1 << 20), Ok(expected.clone()));
        prop_assert_eq!(feed(&stream, &cuts, 1 << 20), Ok(expected));
    }

    #[test]
    fn protocol_zero_overlap_check_matches_brute_force(ranges in arb_ranges()) {
        let zero: Vec<_> = ranges.iter().filter(|r| r.ip_protocol == 0).copied().collect();
        let brute = ranges.iter().any(|r| r.ip_protocol != 0 && overlaps_zero(&zero, r));
        let want = if brute { Err(Error::OverlapsAllProtocolsRange) } else { Ok(()) };
        let repr = CapsuleRepr::RouteAdvertisement(&ranges);
        prop_assert_eq!(repr.emit(&mut vec![0; repr.buffer_len()]).map(|_| ()), want);
        let decoded = CapsuleDecoder::default()
            .decode(&unchecked_route_advertisement(&ranges))
            .map(|_| ());
        prop_assert_eq!(decoded, want);
    }

    #[test]
    fn random_bytes_never_panic_and_splits_agree(
        bytes in proptest::collection::vec(any::<u8>(), 0..96),
        cuts in proptest::collection::vec(any::<usize>(), 0..8),
    ) {
        let whole = feed(&bytes, &[], 64);
        let split = feed(&bytes, &cuts, 64);
        // A split stream may see an error only once enough bytes arrive, never a different one.
        prop_assert_eq!(whole, split);
    }

    #[test]
    fn random_values_of_known_types_never_panic(
        ty in 0u64..4,
        value in proptest::collection::vec(any::<u8>(), 0..80),
    ) {
        if let Ok(Some(c)) = Capsule::parse_value(CapsuleType::from(ty), &value) {
            match c {
                Capsule::AddressAssign(a) => { a.iter().count(); }
                Capsule::AddressRequest(a) => { a.iter().count(); }
                Capsule::RouteAdvertisement(a) => { a.iter().count(); }
                Capsule::Datagram(_) => {}
            }
        }
    }
}
