use super::*;
use crate::capsule::{Capsule, CapsuleDecoder, Decoded, DEFAULT_MAX_CAPSULE_LEN};
use etherparse::{
    Icmpv4Header, Icmpv4Slice, Icmpv6Slice, Ipv4Header, Ipv4HeaderSlice, PacketBuilder,
};
use proptest::prelude::*;

const CLIENT_V4: [u8; 4] = [10, 77, 0, 1];
const SERVER_V4: [u8; 4] = [198, 51, 100, 7];
const CLIENT_V6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0x77, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const SERVER_V6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7];

fn pool() -> HostPool {
    HostPool::new(
        Some(IpPrefix::new(IpAddr::V4(Ipv4Addr::new(10, 77, 0, 0)), 16).unwrap()),
        Some(
            IpPrefix::new(
                IpAddr::V6(Ipv6Addr::from(0xfd00_0000_0077_0000_0000_0000_0000_0000)),
                64,
            )
            .unwrap(),
        ),
    )
}

fn any_session() -> ConnectIpSession {
    ConnectIpSession::new(IpScope::ANY, SessionConfig::default(), &mut pool())
}

fn udp_v4(src: [u8; 4], dst: [u8; 4], ttl: u8, payload_len: usize) -> Vec<u8> {
    let b = PacketBuilder::ipv4(src, dst, ttl).udp(4000, 53);
    let mut out = Vec::with_capacity(b.size(payload_len));
    b.write(&mut out, &vec![0xab; payload_len]).unwrap();
    out
}

fn udp_v6(src: [u8; 16], dst: [u8; 16], hop_limit: u8, payload_len: usize) -> Vec<u8> {
    let b = PacketBuilder::ipv6(src, dst, hop_limit).udp(4000, 53);
    let mut out = Vec::with_capacity(b.size(payload_len));
    b.write(&mut out, &vec![0xab; payload_len]).unwrap();
    out
}

/// Sets or clears DF and fixes the header checksum.
fn set_df(p: &mut [u8], df: bool) {
    if df {
        p[6] |= 0x40;
    } else {
        p[6] &= !0x40;
    }
    let (mut h, _) = Ipv4Header::from_slice(p).unwrap();
    h.header_checksum = h.calc_header_checksum();
    p[10..12].copy_from_slice(&h.header_checksum.to_be_bytes());
}

/// Splits a run of capsules into (type, value), checking each with the codec's decoder.
fn decode_all(buf: &[u8]) -> Vec<(CapsuleType, Vec<u8>)> {
    let mut d = CapsuleDecoder::new(DEFAULT_MAX_CAPSULE_LEN);
    let mut rest = buf;
    let mut out = Vec::new();
    while !rest.is_empty() {
        let Decoded::Capsule { consumed, .. } = d.decode(rest).unwrap() else {
            panic!("not one whole capsule")
        };
        let (t, a) = crate::varint::decode(rest).unwrap();
        let (l, b) = crate::varint::decode(&rest[a..]).unwrap();
        assert_eq!(a + b + l as usize, consumed);
        out.push((CapsuleType::from(t), rest[a + b..consumed].to_vec()));
        rest = &rest[consumed..];
    }
    out
}

use crate::capsule::CapsuleType;

#[test]
fn wildcard_scope_starts_with_assign_then_full_routes_v4_first() {
    let s = any_session();
    let mut buf = [0u8; 256];
    let n = s.emit_start(&mut buf).unwrap();
    let caps = decode_all(&buf[..n]);
    assert_eq!(caps.len(), 2);
    assert_eq!(caps[0].0, CapsuleType::AddressAssign);
    assert_eq!(caps[1].0, CapsuleType::RouteAdvertisement);
    let Some(Capsule::AddressAssign(a)) = Capsule::parse_value(caps[0].0, &caps[0].1).unwrap()
    else {
        panic!()
    };
    let entries: Vec<_> = a.iter().collect();
    assert_eq!(
        entries,
        vec![
            AddressEntry {
                request_id: 0,
                prefix: IpPrefix::host(IpAddr::V4(Ipv4Addr::from(CLIENT_V4)))
            },
            AddressEntry {
                request_id: 0,
                prefix: IpPrefix::host(IpAddr::V6(Ipv6Addr::from(CLIENT_V6)))
            },
        ]
    );
    let Some(Capsule::RouteAdvertisement(r)) = Capsule::parse_value(caps[1].0, &caps[1].1).unwrap()
    else {
        panic!()
    };
    let ranges: Vec<_> = r.iter().collect();
    assert_eq!(
        ranges,
        vec![
            IpAddressRange {
                start: "0.0.0.0".parse().unwrap(),
                end: "255.255.255.255".parse().unwrap(),
                ip_protocol: 0
            },
            IpAddressRange {
                start: "::".parse().unwrap(),
                end: "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff".parse().unwrap(),
                ip_protocol: 0
            },
        ]
    );
}

#[test]
fn restricted_scope_advertises_only_the_target_prefix_and_protocol() {
    let scope = IpScope::parse_path("/.well-known/masque/ip/198.51.100.0%2F24/17/").unwrap();
    let s = ConnectIpSession::new(scope, SessionConfig::default(), &mut pool());
    assert_eq!(
        s.routes(),
        &[IpAddressRange {
            start: "198.51.100.0".parse().unwrap(),
            end: "198.51.100.255".parse().unwrap(),
            ip_protocol: 17
        }]
    );
    let caps = s.start_capsules();
    assert!(matches!(caps[0], CapsuleRepr::AddressAssign(a) if a.len() == 2));
    let mut buf = [0u8; 128];
    let n = s.emit_start(&mut buf).unwrap();
    // ADDRESS_ASSIGN (type 1) first, ROUTE_ADVERTISEMENT (type 3) second: one range of
    // version (1) + start (4) + end (4) + protocol (1) = 10 bytes.
    let caps = decode_all(&buf[..n]);
    assert_eq!(caps[0].0, CapsuleType::AddressAssign);
    assert_eq!(caps[1].0, CapsuleType::RouteAdvertisement);
    assert_eq!(
        caps[1].1,
        [4, 198, 51, 100, 0, 198, 51, 100, 255, 17],
        "version, start, end, protocol"
    );
}

#[test]
fn v4_only_pool_assigns_and_routes_only_v4() {
    let mut p = HostPool::new(
        Some(IpPrefix::new("10.1.0.0".parse().unwrap(), 30).unwrap()),
        None,
    );
    let s = ConnectIpSession::new(IpScope::ANY, SessionConfig::default(), &mut p);
    assert_eq!(s.assigned().len(), 1);
    assert_eq!(s.routes().len(), 1);
    // 10.1.0.1 and .2 are usable in a /30; the network and broadcast addresses are not.
    let s2 = ConnectIpSession::new(IpScope::ANY, SessionConfig::default(), &mut p);
    assert_eq!(
        s2.assigned()[0].prefix.addr(),
        "10.1.0.2".parse::<IpAddr>().unwrap()
    );
    let s3 = ConnectIpSession::new(IpScope::ANY, SessionConfig::default(), &mut p);
    assert!(s3.assigned().is_empty());
    s.close(&mut p);
    assert_eq!(p.in_use(), 1);
}

fn request_value(entries: &[AddressEntry]) -> Vec<u8> {
    let mut buf = vec![0u8; 256];
    let n = CapsuleRepr::AddressRequest(entries).emit(&mut buf).unwrap();
    let caps = decode_all(&buf[..n]);
    caps[0].1.clone()
}

//= https://www.rfc-editor.org/rfc/rfc9484#section-4.7.2
//# For each Requested Address, the receiver of the ADDRESS_REQUEST capsule SHALL
//# respond with an Assigned Address with a matching Request ID.
#[test]
fn address_request_is_answered_with_matching_request_ids() {
    let mut p = HostPool::new(
        Some(IpPrefix::new("10.1.0.0".parse().unwrap(), 24).unwrap()),
        None,
    );
    let mut s = ConnectIpSession::new(IpScope::ANY, SessionConfig::default(), &mut p);
    let value = request_value(&[
        // Any IPv4 address: granted the one already held.
        AddressEntry {
            request_id: 7,
            prefix: IpPrefix::host("0.0.0.0".parse().unwrap()),
        },
        // An IPv6 address: the pool has none, refused as ::/128.
        AddressEntry {
            request_id: 8,
            prefix: IpPrefix::new("::".parse().unwrap(), 64).unwrap(),
        },
    ]);
    let req = AddressRequest::new_checked(&value).unwrap();
    let answer = s.on_address_request(&req, &mut p).unwrap();
    assert_eq!(
        answer,
        vec![
            AddressEntry {
                request_id: 7,
                prefix: IpPrefix::host("10.1.0.1".parse().unwrap())
            },
            //= https://www.rfc-editor.org/rfc/rfc9484#section-4.7.2
            //# If the requested address was not assigned, the IP address
            //# SHALL be all-zero and the IP Prefix Length SHALL be the maximum length
            //# (0.0.0.0/32 or ::/128) to indicate that no address was assigned.
            AddressEntry {
                request_id: 8,
                prefix: IpPrefix::host("::".parse().unwrap())
            },
        ]
    );
    // The answer emits as a valid ADDRESS_ASSIGN.
    let mut buf = [0u8; 128];
    CapsuleRepr::AddressAssign(&answer).emit(&mut buf).unwrap();
    // A reused request ID is an error for the caller to abort on.
    assert_eq!(
        s.on_address_request(&req, &mut p),
        Err(RequestError::ReusedRequestId(7))
    );
}

#[test]
fn a_session_starts_on_the_preferred_addresses_when_free_and_on_the_lowest_free_else() {
    let mut p = pool();
    let v4 = |s: &str| IpPrefix::host(s.parse().unwrap());
    let held = |s: &ConnectIpSession| s.assigned().iter().map(|a| a.prefix).collect::<Vec<_>>();
    // Two clients resuming at once, each asking for the address the other would get first.
    let a = ConnectIpSession::preferring(
        IpScope::ANY,
        SessionConfig::default(),
        &mut p,
        &[v4("10.77.0.3")],
    );
    let b = ConnectIpSession::preferring(
        IpScope::ANY,
        SessionConfig::default(),
        &mut p,
        &[v4("10.77.0.2")],
    );
    assert_eq!(held(&a)[0], v4("10.77.0.3"));
    assert_eq!(held(&b)[0], v4("10.77.0.2"));
    // Taken, or outside the pool: the lowest free one.
    let c = ConnectIpSession::preferring(
        IpScope::ANY,
        SessionConfig::default(),
        &mut p,
        &[v4("10.77.0.2"), v4("192.0.2.1")],
    );
    assert_eq!(held(&c)[0], v4("10.77.0.1"));
    // The IPv6 address is the lowest free one whatever IPv4 was preferred.
    assert_eq!(held(&a).len(), held(&c).len());
}

#[test]
fn a_request_for_another_free_address_exchanges_the_held_one_and_a_taken_one_is_refused() {
    let mut p = HostPool::new(
        Some(IpPrefix::new("10.1.0.0".parse().unwrap(), 24).unwrap()),
        None,
    );
    let other = ConnectIpSession::new(IpScope::ANY, SessionConfig::default(), &mut p);
    let mut s = ConnectIpSession::new(IpScope::ANY, SessionConfig::default(), &mut p);
    let held = |s: &ConnectIpSession| s.assigned().iter().map(|a| a.prefix).collect::<Vec<_>>();
    assert_eq!(held(&other), [IpPrefix::host("10.1.0.1".parse().unwrap())]);
    assert_eq!(held(&s), [IpPrefix::host("10.1.0.2".parse().unwrap())]);
    // The address a client had before its connection was lost, free again: exchanged.
    let ask = |id: u64, addr: &str| {
        request_value(&[AddressEntry {
            request_id: id,
            prefix: IpPrefix::host(addr.parse().unwrap()),
        }])
    };
    let value = ask(1, "10.1.0.9");
    let answer = s
        .on_address_request(&AddressRequest::new_checked(&value).unwrap(), &mut p)
        .unwrap();
    let nine = IpPrefix::host("10.1.0.9".parse().unwrap());
    assert_eq!(
        answer,
        [AddressEntry {
            request_id: 1,
            prefix: nine
        }]
    );
    assert_eq!(held(&s), [nine]);
    // The one given up is back in the pool, the one taken is not.
    assert!(p
        .allocate(IpPrefix::host("10.1.0.2".parse().unwrap()))
        .is_some());
    assert!(p.allocate(nine).is_none());
    // One another session holds: refused, the held address stays.
    let value = ask(2, "10.1.0.1");
    let answer = s
        .on_address_request(&AddressRequest::new_checked(&value).unwrap(), &mut p)
        .unwrap();
    assert_eq!(
        answer,
        [
            AddressEntry {
                request_id: 0,
                prefix: nine
            },
            AddressEntry {
                request_id: 2,
                prefix: IpPrefix::host("0.0.0.0".parse().unwrap())
            }
        ]
    );
    assert_eq!(held(&s), [nine]);
    assert_eq!(held(&other), [IpPrefix::host("10.1.0.1".parse().unwrap())]);
    other.close(&mut p);
}

#[test]
fn address_request_for_a_missing_family_is_granted_from_the_pool_and_routed() {
    let mut p = pool();
    let mut v4_only = HostPool::new(
        Some(IpPrefix::new("10.1.0.0".parse().unwrap(), 24).unwrap()),
        None,
    );
    let mut s = ConnectIpSession::new(IpScope::ANY, SessionConfig::default(), &mut v4_only);
    assert_eq!(s.routes().len(), 1);
    let wanted = IpPrefix::host(IpAddr::V6(Ipv6Addr::from(CLIENT_V6)));
    let value = request_value(&[AddressEntry {
        request_id: 1,
        prefix: wanted,
    }]);
    let req = AddressRequest::new_checked(&value).unwrap();
    let answer = s.on_address_request(&req, &mut p).unwrap();
    assert_eq!(answer.len(), 2, "the held IPv4 address, then the answer");
    assert_eq!(answer[0].request_id, 0);
    assert_eq!(
        answer[1],
        AddressEntry {
            request_id: 1,
            prefix: wanted
        }
    );
    assert_eq!(s.routes().len(), 2);
    // A specific address other than the one held is refused.
    let value = request_value(&[AddressEntry {
        request_id: 2,
        prefix: IpPrefix::host("10.1.0.9".parse().unwrap()),
    }]);
    let req = AddressRequest::new_checked(&value).unwrap();
    let answer = s.on_address_request(&req, &mut p).unwrap();
    assert!(answer.contains(&AddressEntry {
        request_id: 2,
        prefix: IpPrefix::host("0.0.0.0".parse().unwrap())
    }));
}

#[test]
fn good_v4_packet_is_forwarded_unchanged_by_default() {
    let mut s = any_session();
    let mut p = udp_v4(CLIENT_V4, SERVER_V4, 64, 100);
    let orig = p.clone();
    let mut reply = [0u8; 1500];
    assert_eq!(
        s.on_datagram(&mut p, &mut reply),
        Verdict::Forward(orig.len())
    );
    assert_eq!(p, orig);
    assert_eq!(s.counters().forwarded_from_client, 1);
}

#[test]
fn good_v4_packet_is_forwarded_with_ttl_minus_one_and_valid_checksum() {
    let config = SessionConfig {
        decrement_ttl_from_client: true,
        ..SessionConfig::default()
    };
    let mut s = ConnectIpSession::new(IpScope::ANY, config, &mut pool());
    let mut p = udp_v4(CLIENT_V4, SERVER_V4, 64, 100);
    // Trailing bytes past the total length are not forwarded.
    let len = p.len();
    p.extend_from_slice(&[0xee; 5]);
    let mut reply = [0u8; 1500];
    assert_eq!(s.on_datagram(&mut p, &mut reply), Verdict::Forward(len));
    let h = Ipv4HeaderSlice::from_slice(&p[..len]).unwrap();
    assert_eq!(h.ttl(), 63);
    assert_eq!(h.header_checksum(), h.to_header().calc_header_checksum());
}

#[test]
fn good_v6_packet_is_forwarded_with_hop_limit_minus_one() {
    let config = SessionConfig {
        decrement_ttl_from_client: true,
        ..SessionConfig::default()
    };
    let mut s = ConnectIpSession::new(IpScope::ANY, config, &mut pool());
    let mut p = udp_v6(CLIENT_V6, SERVER_V6, 64, 100);
    let mut reply = [0u8; 1500];
    assert_eq!(s.on_datagram(&mut p, &mut reply), Verdict::Forward(p.len()));
    assert_eq!(p[7], 63);
}

#[test]
fn spoofed_sources_are_counted_drops() {
    let mut s = any_session();
    let mut reply = [0u8; 1500];
    let mut p = udp_v4([10, 77, 0, 2], SERVER_V4, 64, 10);
    assert_eq!(
        s.on_datagram(&mut p, &mut reply),
        Verdict::Drop(DropReason::SpoofedSource)
    );
    let mut src = CLIENT_V6;
    src[15] = 2;
    let mut p = udp_v6(src, SERVER_V6, 64, 10);
    assert_eq!(
        s.on_datagram(&mut p, &mut reply),
        Verdict::Drop(DropReason::SpoofedSource)
    );
    assert_eq!(s.counters().drops(DropReason::SpoofedSource), 2);
}

//= https://www.rfc-editor.org/rfc/rfc9484#section-7
//# For unroutable destination addresses, send Destination Unreachable
//# (Section 3.1 of [ICMPv6]) with a code 0, "No route to destination", or code
//# 1, "Communication with destination administratively prohibited".
#[test]
fn out_of_scope_v4_destination_gets_unreachable_quoting_the_packet() {
    let scope = IpScope::parse_path("/.well-known/masque/ip/198.51.100.0%2F24/17/").unwrap();
    let mut s = ConnectIpSession::new(scope, SessionConfig::default(), &mut pool());
    let mut reply = [0u8; 1500];
    let mut p = udp_v4(CLIENT_V4, [203, 0, 113, 1], 64, 30);
    let orig = p.clone();
    let Verdict::Reply(n) = s.on_datagram(&mut p, &mut reply) else {
        panic!("no reply")
    };
    let r = &reply[..n];
    let ip = Ipv4HeaderSlice::from_slice(r).unwrap();
    assert_eq!(ip.header_checksum(), ip.to_header().calc_header_checksum());
    assert_eq!(ip.destination(), CLIENT_V4);
    assert_eq!(ip.protocol(), etherparse::IpNumber::ICMP);
    assert_eq!(usize::from(ip.total_len()), n);
    let icmp = Icmpv4Slice::from_slice(&r[20..]).unwrap();
    assert_eq!((icmp.type_u8(), icmp.code_u8()), (3, 13));
    let expect = Icmpv4Header::with_checksum(icmp.icmp_type(), icmp.payload());
    assert_eq!(icmp.checksum(), expect.checksum);
    assert_eq!(icmp.payload(), &orig[..]);
    // In-scope destination but another protocol (TCP): also refused.
    let b = PacketBuilder::ipv4(CLIENT_V4, SERVER_V4, 64).tcp(1, 2, 3, 4);
    let mut p = Vec::new();
    b.write(&mut p, &[]).unwrap();
    assert!(matches!(
        s.on_datagram(&mut p, &mut reply),
        Verdict::Reply(_)
    ));
    assert_eq!(s.counters().drops(DropReason::OutOfScope), 2);
    assert_eq!(s.counters().icmp_errors, 2);
}

#[test]
fn out_of_scope_v6_destination_gets_unreachable_with_valid_checksum() {
    let scope = IpScope::parse_path("/.well-known/masque/ip/2001%3Adb8%3A%3A7/*/").unwrap();
    let mut s = ConnectIpSession::new(scope, SessionConfig::default(), &mut pool());
    let mut reply = [0u8; 1500];
    let mut dst = SERVER_V6;
    dst[15] = 8;
    let mut p = udp_v6(CLIENT_V6, dst, 64, 30);
    let orig = p.clone();
    let Verdict::Reply(n) = s.on_datagram(&mut p, &mut reply) else {
        panic!("no reply")
    };
    let r = &reply[..n];
    assert_eq!(r[0] >> 4, 6);
    assert_eq!(&r[24..40], &CLIENT_V6);
    let icmp = Icmpv6Slice::from_slice(&r[40..]).unwrap();
    assert_eq!((icmp.type_u8(), icmp.code_u8()), (1, 1));
    let src: [u8; 16] = r[8..24].try_into().unwrap();
    assert!(icmp.is_checksum_valid(src, CLIENT_V6));
    assert_eq!(icmp.payload(), &orig[..]);
    // The target itself is allowed.
    let mut p = udp_v6(CLIENT_V6, SERVER_V6, 64, 30);
    assert!(matches!(
        s.on_datagram(&mut p, &mut reply),
        Verdict::Forward(_)
    ));
}

//= https://www.rfc-editor.org/rfc/rfc9484#section-7
//# For packets that cannot fit within the MTU of the outgoing link, send Packet
//# Too Big (Section 3.2 of [ICMPv6]).
#[test]
fn too_large_packets_get_packet_too_big() {
    let mut s = any_session();
    let mut reply = [0u8; 1500];
    // IPv6, 1281 bytes: PTB with MTU 1280, quoting as much as fits in 1280 bytes.
    let mut p = udp_v6(CLIENT_V6, SERVER_V6, 64, 1281 - 48);
    assert_eq!(p.len(), 1281);
    let orig = p.clone();
    let Verdict::Reply(n) = s.on_datagram(&mut p, &mut reply) else {
        panic!("no reply")
    };
    assert_eq!(n, 1280);
    let icmp = Icmpv6Slice::from_slice(&reply[40..n]).unwrap();
    assert_eq!((icmp.type_u8(), icmp.code_u8()), (2, 0));
    assert_eq!(icmp.bytes5to8(), 1280u32.to_be_bytes());
    let src: [u8; 16] = reply[8..24].try_into().unwrap();
    assert!(icmp.is_checksum_valid(src, CLIENT_V6));
    assert_eq!(icmp.payload(), &orig[..1280 - 48]);
    // IPv4 with DF: Fragmentation Needed with the next-hop MTU, quoting up to 576 bytes total.
    let mut p = udp_v4(CLIENT_V4, SERVER_V4, 64, 1300);
    set_df(&mut p, true);
    let orig = p.clone();
    let Verdict::Reply(n) = s.on_datagram(&mut p, &mut reply) else {
        panic!("no reply")
    };
    assert_eq!(n, 576);
    let icmp = Icmpv4Slice::from_slice(&reply[20..n]).unwrap();
    assert_eq!((icmp.type_u8(), icmp.code_u8()), (3, 4));
    assert_eq!(icmp.bytes5to8(), [0, 0, 0x05, 0x00]);
    assert_eq!(icmp.payload(), &orig[..576 - 28]);
    // IPv4 without DF: a counted drop (this session does not fragment).
    let mut p = udp_v4(CLIENT_V4, SERVER_V4, 64, 1300);
    set_df(&mut p, false);
    assert_eq!(
        s.on_datagram(&mut p, &mut reply),
        Verdict::Drop(DropReason::TooBig)
    );
    assert_eq!(s.counters().drops(DropReason::TooBig), 3);
    // A larger configured tunnel MTU lets it through.
    let config = SessionConfig {
        tunnel_mtu_bytes: 1400,
        ..SessionConfig::default()
    };
    let mut s = ConnectIpSession::new(IpScope::ANY, config, &mut pool());
    let mut p = udp_v6(CLIENT_V6, SERVER_V6, 64, 1281 - 48);
    assert_eq!(s.on_datagram(&mut p, &mut reply), Verdict::Forward(1281));
}

#[test]
fn ttl_one_gets_time_exceeded_when_decrementing() {
    let config = SessionConfig {
        decrement_ttl_from_client: true,
        ..SessionConfig::default()
    };
    let mut s = ConnectIpSession::new(IpScope::ANY, config, &mut pool());
    let mut reply = [0u8; 1500];
    let mut p = udp_v4(CLIENT_V4, SERVER_V4, 1, 10);
    let Verdict::Reply(n) = s.on_datagram(&mut p, &mut reply) else {
        panic!("no reply")
    };
    assert_eq!((reply[20], reply[21]), (11, 0));
    assert_eq!(n, 28 + p.len());
    assert_eq!(s.counters().drops(DropReason::TtlExpired), 1);
}

#[test]
fn truncated_and_garbage_packets_are_counted_drops() {
    let mut s = any_session();
    let mut reply = [0u8; 1500];
    let good = udp_v4(CLIENT_V4, SERVER_V4, 64, 20);
    for len in 0..good.len() {
        let mut p = good[..len].to_vec();
        let v = s.on_datagram(&mut p, &mut reply);
        assert!(matches!(v, Verdict::Drop(_)), "len {len}: {v:?}");
    }
    let good6 = udp_v6(CLIENT_V6, SERVER_V6, 64, 20);
    for len in 0..good6.len() {
        let mut p = good6[..len].to_vec();
        assert!(matches!(
            s.on_datagram(&mut p, &mut reply),
            Verdict::Drop(_)
        ));
    }
    let mut bad_version = good.clone();
    bad_version[0] = 0x55;
    assert_eq!(
        s.on_datagram(&mut bad_version, &mut reply),
        Verdict::Drop(DropReason::BadVersion)
    );
    let mut bad_sum = good.clone();
    bad_sum[10] ^= 0xff;
    assert_eq!(
        s.on_datagram(&mut bad_sum, &mut reply),
        Verdict::Drop(DropReason::BadChecksum)
    );
    let mut bad_ihl = good.clone();
    bad_ihl[0] = 0x44;
    assert_eq!(
        s.on_datagram(&mut bad_ihl, &mut reply),
        Verdict::Drop(DropReason::BadLength)
    );
    assert_eq!(s.counters().forwarded_from_client, 0);
    assert_eq!(s.counters().icmp_errors, 0);
    assert!(s.counters().drops(DropReason::Truncated) > 0);
}

#[test]
fn no_icmp_error_about_an_icmp_error() {
    let scope = IpScope::parse_path("/.well-known/masque/ip/198.51.100.7/*/").unwrap();
    let mut s = ConnectIpSession::new(scope, SessionConfig::default(), &mut pool());
    let mut reply = [0u8; 1500];
    let b = PacketBuilder::ipv4(CLIENT_V4, [203, 0, 113, 1], 64).icmpv4(
        etherparse::Icmpv4Type::TimeExceeded(
            etherparse::icmpv4::TimeExceededCode::TtlExceededInTransit,
        ),
    );
    let mut p = Vec::new();
    b.write(&mut p, &[0; 28]).unwrap();
    assert_eq!(
        s.on_datagram(&mut p, &mut reply),
        Verdict::Drop(DropReason::OutOfScope)
    );
}

#[test]
fn link_local_destinations_are_not_forwarded() {
    let mut s = any_session();
    let mut reply = [0u8; 1500];
    let mut p = udp_v4(CLIENT_V4, [169, 254, 1, 1], 64, 10);
    assert_eq!(
        s.on_datagram(&mut p, &mut reply),
        Verdict::Drop(DropReason::LinkLocal)
    );
}

#[test]
fn egress_packets_for_the_client_are_forwarded_with_ttl_minus_one() {
    let mut s = any_session();
    let mut reply = [0u8; 1500];
    let mut p = udp_v4(SERVER_V4, CLIENT_V4, 50, 100);
    assert_eq!(s.on_egress(&mut p, &mut reply), Verdict::Forward(p.len()));
    let h = Ipv4HeaderSlice::from_slice(&p).unwrap();
    assert_eq!(h.ttl(), 49);
    assert_eq!(h.header_checksum(), h.to_header().calc_header_checksum());
    let mut p = udp_v6(SERVER_V6, CLIENT_V6, 50, 100);
    assert_eq!(s.on_egress(&mut p, &mut reply), Verdict::Forward(p.len()));
    assert_eq!(p[7], 49);
    assert_eq!(s.counters().forwarded_to_client, 2);
}

#[test]
fn egress_packets_for_others_or_from_outside_the_scope_are_dropped() {
    let scope = IpScope::parse_path("/.well-known/masque/ip/198.51.100.7/17/").unwrap();
    let mut s = ConnectIpSession::new(scope, SessionConfig::default(), &mut pool());
    let mut reply = [0u8; 1500];
    let mut p = udp_v4(SERVER_V4, [10, 77, 0, 9], 50, 10);
    assert_eq!(
        s.on_egress(&mut p, &mut reply),
        Verdict::Drop(DropReason::NotForClient)
    );
    let mut p = udp_v4([198, 51, 100, 8], CLIENT_V4, 50, 10);
    assert_eq!(
        s.on_egress(&mut p, &mut reply),
        Verdict::Drop(DropReason::SourceOutOfScope)
    );
    // ICMP from anywhere reaches the client.
    let b = PacketBuilder::ipv4([203, 0, 113, 1], CLIENT_V4, 64).icmpv4_echo_reply(1, 1);
    let mut p = Vec::new();
    b.write(&mut p, &[]).unwrap();
    assert!(matches!(
        s.on_egress(&mut p, &mut reply),
        Verdict::Forward(_)
    ));
    // TTL 1 cannot be decremented: Time Exceeded back to the egress source.
    let mut p = udp_v4(SERVER_V4, CLIENT_V4, 1, 10);
    let Verdict::Reply(n) = s.on_egress(&mut p, &mut reply) else {
        panic!("no reply")
    };
    assert_eq!(&reply[16..20], &SERVER_V4);
    assert_eq!((reply[20], reply[21]), (11, 0));
    assert!(n > 28);
}

#[test]
fn tiny_reply_buffer_turns_icmp_into_counted_drop() {
    let scope = IpScope::parse_path("/.well-known/masque/ip/198.51.100.7/*/").unwrap();
    let mut s = ConnectIpSession::new(scope, SessionConfig::default(), &mut pool());
    let mut reply = [0u8; 30];
    let mut p = udp_v4(CLIENT_V4, [203, 0, 113, 1], 64, 30);
    assert_eq!(
        s.on_datagram(&mut p, &mut reply),
        Verdict::Drop(DropReason::OutOfScope)
    );
}

proptest! {
    #[test]
    fn random_bytes_never_panic(mut bytes in proptest::collection::vec(any::<u8>(), 0..1600),
                                reply_len in 0usize..1500, decrement in any::<bool>()) {
        let config = SessionConfig { decrement_ttl_from_client: decrement, ..SessionConfig::default() };
        let scope = IpScope::parse_path("/.well-known/masque/ip/198.51.100.0%2F24/17/").unwrap();
        let mut s = ConnectIpSession::new(scope, config, &mut pool());
        let mut reply = vec![0u8; reply_len];
        let mut copy = bytes.clone();
        match s.on_datagram(&mut bytes, &mut reply) {
            Verdict::Forward(n) => prop_assert!(n <= bytes.len()),
            Verdict::Reply(n) => prop_assert!(n <= reply.len()),
            Verdict::Drop(_) => {}
        }
        let _ = s.on_egress(&mut copy, &mut reply);
    }

    #[test]
    fn random_headers_with_client_addresses_never_panic(
        v6 in any::<bool>(), mut tail in proptest::collection::vec(any::<u8>(), 0..200)) {
        let mut s = any_session();
        let mut p = if v6 { udp_v6(CLIENT_V6, SERVER_V6, 2, 0) } else { udp_v4(CLIENT_V4, SERVER_V4, 2, 0) };
        let hdr = if v6 { 8 } else { 2 };
        p.truncate(hdr);
        p.append(&mut tail);
        let mut reply = [0u8; 1500];
        let _ = s.on_datagram(&mut p.clone(), &mut reply);
        let _ = s.on_egress(&mut p, &mut reply);
    }
}

//= https://www.rfc-editor.org/rfc/rfc9484#section-4.7.3
//# ICMP traffic is always allowed, regardless of the value of this field.
#[test]
fn icmp_to_the_target_is_allowed_whatever_the_scoped_protocol() {
    let scope = IpScope::parse_path("/.well-known/masque/ip/198.51.100.7/17/").unwrap();
    let mut s = ConnectIpSession::new(scope, SessionConfig::default(), &mut pool());
    let mut reply = [0u8; 1500];
    let b = PacketBuilder::ipv4(CLIENT_V4, SERVER_V4, 64).icmpv4_echo_request(1, 1);
    let mut p = Vec::new();
    b.write(&mut p, &[0; 8]).unwrap();
    assert_eq!(s.on_datagram(&mut p, &mut reply), Verdict::Forward(p.len()));
    // But not to another host.
    let b = PacketBuilder::ipv4(CLIENT_V4, [198, 51, 100, 8], 64).icmpv4_echo_request(1, 1);
    let mut p = Vec::new();
    b.write(&mut p, &[0; 8]).unwrap();
    assert!(matches!(
        s.on_datagram(&mut p, &mut reply),
        Verdict::Reply(_)
    ));
}

//= https://www.rfc-editor.org/rfc/rfc9484#section-7
//# Note that endpoints will decrement the IP Hop Count (or TTL) upon encapsulation
//# but not decapsulation.
#[test]
fn hop_count_is_decremented_on_encapsulation_only_by_default() {
    let mut s = any_session();
    let mut reply = [0u8; 1500];
    let mut up = udp_v6(CLIENT_V6, SERVER_V6, 9, 10);
    assert!(matches!(
        s.on_datagram(&mut up, &mut reply),
        Verdict::Forward(_)
    ));
    assert_eq!(up[7], 9);
    let mut down = udp_v6(SERVER_V6, CLIENT_V6, 9, 10);
    assert!(matches!(
        s.on_egress(&mut down, &mut reply),
        Verdict::Forward(_)
    ));
    assert_eq!(down[7], 8);
}

#[test]
fn v6_extension_headers_are_walked_to_the_upper_layer_protocol() {
    let scope = IpScope::parse_path("/.well-known/masque/ip/2001%3Adb8%3A%3A7/17/").unwrap();
    let mut s = ConnectIpSession::new(scope, SessionConfig::default(), &mut pool());
    let mut reply = [0u8; 1500];
    // UDP behind an 8-byte Hop-by-Hop Options header (next header 17, length 0, PadN).
    let udp = udp_v6(CLIENT_V6, SERVER_V6, 64, 10);
    let mut p = udp[..40].to_vec();
    p[6] = 0; // Hop-by-Hop
    let payload_len = udp.len() - 40 + 8;
    p[4..6].copy_from_slice(&(payload_len as u16).to_be_bytes());
    p.extend_from_slice(&[17, 0, 1, 4, 0, 0, 0, 0]);
    p.extend_from_slice(&udp[40..]);
    assert_eq!(s.on_datagram(&mut p, &mut reply), Verdict::Forward(p.len()));
    // An extension header running past the payload is a truncation.
    let mut bad = p.clone();
    bad[41] = 200;
    assert_eq!(
        s.on_datagram(&mut bad, &mut reply),
        Verdict::Drop(DropReason::Truncated)
    );
}

#[test]
fn egress_packets_too_big_for_the_tunnel_get_packet_too_big_towards_their_source() {
    let mut s = any_session();
    let mut reply = [0u8; 1500];
    let mut p = udp_v6(SERVER_V6, CLIENT_V6, 64, 1300);
    let Verdict::Reply(n) = s.on_egress(&mut p, &mut reply) else {
        panic!("no reply")
    };
    assert_eq!(&reply[24..40], &SERVER_V6, "back to the egress source");
    let icmp = Icmpv6Slice::from_slice(&reply[40..n]).unwrap();
    assert_eq!((icmp.type_u8(), icmp.code_u8()), (2, 0));
    assert_eq!(icmp.bytes5to8(), 1280u32.to_be_bytes());
    let src: [u8; 16] = reply[8..24].try_into().unwrap();
    assert!(icmp.is_checksum_valid(src, SERVER_V6));
    assert_eq!(s.counters().drops(DropReason::TooBig), 1);
    assert_eq!(s.counters().forwarded_to_client, 0);
}

#[test]
fn counters_label_every_reason_distinctly() {
    let labels: HashSet<_> = DropReason::ALL.iter().map(|r| r.label()).collect();
    assert_eq!(labels.len(), DropReason::ALL.len());
    for (i, r) in DropReason::ALL.iter().enumerate() {
        assert_eq!(r.index(), i);
    }
}

#[test]
fn reserved_addresses_are_not_handed_out_until_given_back() {
    let v4 = IpPrefix::new("198.18.200.0".parse().unwrap(), 24).unwrap();
    let mut pool = HostPool::new(Some(v4), None);
    let any = IpPrefix::new("0.0.0.0".parse().unwrap(), 32).unwrap();
    let first: IpAddr = "198.18.200.1".parse().unwrap();
    pool.reserve([first].into_iter().collect());
    assert_eq!(
        pool.allocate(IpPrefix::host(first)),
        None,
        "asked for by name"
    );
    let got = pool.allocate(any).unwrap();
    assert_eq!(got.addr(), "198.18.200.2".parse::<IpAddr>().unwrap());
    assert_eq!(pool.handed_out(), [got.addr()]);
    pool.reserve(Default::default());
    assert_eq!(pool.allocate(any).unwrap().addr(), first);
}
