//! What each fuzz target does with its input: one function per target, named as the target
//! (`fuzz/fuzz_targets/<name>.rs` calls [`run`] with its name). The functions hold every input
//! to what must hold for any input: no panic, and the few invariants a parser promises (a view
//! never reaches past its buffer, a decoder never consumes more than it was given). The suite
//! replays every file of `fuzz/corpus/<name>/` and `fuzz/regressions/<name>/` through them
//! (`tests/replay.rs`); `scripts/fuzz` runs the targets under libFuzzer.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use mimiq_dataplane::wire::{
    arp::{ArpPacket, ArpRepr},
    checksum::PseudoHeader,
    ethernet::{EthernetFrame, EthernetRepr},
    icmpv4::{Icmpv4Packet, Icmpv4Repr},
    icmpv6::{Icmpv6Packet, Icmpv6Repr},
    ipip::{self, Outer, Span},
    ipv4::{Ipv4Packet, Ipv4Repr},
    ipv6::{Ipv6Packet, Ipv6Repr},
    udp::{UdpPacket, UdpRepr},
};
use mimiq_masque::capsule::{CapsuleDecoder, Decoded, IpPrefix};
use mimiq_masque::datagram::{ContextPayload, Datagram};
use mimiq_masque::session::connect_ip::{ConnectIpSession, HostPool, SessionConfig, Verdict};
use mimiq_masque::template::{IpScope, UdpTarget};

/// A target: its name and its function.
pub type Target = (&'static str, fn(&[u8]));

/// Every target.
pub const TARGETS: &[Target] = &[
    ("wire_views", wire_views),
    ("ipip", ipip),
    ("capsules", capsules),
    ("http_datagrams", http_datagrams),
    ("connect_ip_session", connect_ip_session),
    ("extended_connect", extended_connect),
    ("allocator_messages", allocator_messages),
    ("config_files", config_files),
    ("switch_pipelines", switch_pipelines),
];

/// Runs the target called `name` on `data`; false when there is no such target.
pub fn run(name: &str, data: &[u8]) -> bool {
    match TARGETS.iter().find(|(n, _)| *n == name) {
        Some((_, f)) => {
            f(data);
            true
        }
        None => false,
    }
}

/// The first byte picks a variant; the rest is the input.
fn split(data: &[u8]) -> (u8, &[u8]) {
    match data.split_first() {
        Some((&b, rest)) => (b, rest),
        None => (0, data),
    }
}

/// The dataplane's zero-copy views and their parsers, each on the whole input: Ethernet, ARP,
/// IPv4, IPv6, UDP, ICMPv4 and ICMPv6 (with neighbour-discovery options). Where a parser checks
/// a checksum it also gets the input with the checksum made right, so that the fuzzer reaches
/// what lies behind it.
pub fn wire_views(data: &[u8]) {
    let pseudo_v6 = PseudoHeader::V6 {
        src: Ipv6Addr::new(0xfe80, 0, 0, 0, 0x5054, 0xff, 0xfe12, 0x3456),
        dst: Ipv6Addr::new(0xff02, 0, 0, 0, 0, 1, 0xff00, 1),
    };
    let pseudo_v4 = PseudoHeader::V4 {
        src: Ipv4Addr::new(198, 18, 0, 10),
        dst: Ipv4Addr::new(198, 18, 0, 1),
    };
    if let Ok(f) = EthernetFrame::new_checked(data) {
        let _ = EthernetRepr::parse(&f);
        if let Ok(l2) = f.l2_header() {
            assert!(l2.payload_offset <= data.len());
        }
    }
    if let Ok(p) = ArpPacket::new_checked(data) {
        let _ = ArpRepr::parse(&p);
    }
    if let Ok(p) = Ipv4Packet::new_checked(data) {
        let _ = Ipv4Repr::parse(&p);
        assert!(p.payload().len() <= data.len());
    }
    let mut fixed = data.to_vec();
    if let Ok(mut p) = Ipv4Packet::new_checked(&mut fixed[..]) {
        p.fill_checksum();
        let _ = Ipv4Repr::parse(&p);
    }
    if let Ok(p) = Ipv6Packet::new_checked(data) {
        let _ = Ipv6Repr::parse(&p);
        assert!(p.payload().len() <= data.len());
    }
    for pseudo in [&pseudo_v4, &pseudo_v6] {
        let mut fixed = data.to_vec();
        if let Ok(mut p) = UdpPacket::new_checked(&mut fixed[..]) {
            p.fill_checksum(pseudo);
            let _ = UdpRepr::parse(&p, pseudo);
        }
    }
    if let Ok(p) = Icmpv4Packet::new_checked(data) {
        let _ = Icmpv4Repr::parse(&p);
    }
    let mut fixed = data.to_vec();
    if let Ok(mut p) = Icmpv4Packet::new_checked(&mut fixed[..]) {
        p.fill_checksum();
    }
    if let Ok(p) = Icmpv4Packet::new_checked(&fixed[..]) {
        let _ = Icmpv4Repr::parse(&p);
    }
    if let Ok(p) = Icmpv6Packet::new_checked(data) {
        let _ = Icmpv6Repr::parse(&p, &pseudo_v6);
    }
    let mut fixed = data.to_vec();
    if let Ok(mut p) = Icmpv6Packet::new_checked(&mut fixed[..]) {
        p.fill_checksum(&pseudo_v6);
    }
    if let Ok(p) = Icmpv6Packet::new_checked(&fixed[..]) {
        let _ = Icmpv6Repr::parse(&p, &pseudo_v6);
    }
}

/// IP-in-IP between the edge and the access switches (seed 000 §3.2): decapsulation of any
/// packet, and encapsulation at any span of any buffer.
pub fn ipip(data: &[u8]) {
    let (b, rest) = split(data);
    let _ = ipip::decap(rest);
    let _ = ipip::inner_protocol(rest);
    let span = Span {
        start: usize::from(b & 0x0f) * 4,
        end: rest.len().saturating_sub(usize::from(b >> 4)),
    };
    let mut buf = rest.to_vec();
    let _ = ipip::decap_frame(&mut buf, span);
    let outer = if b & 0x80 == 0 {
        Outer::V6 {
            src: Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0xe),
            dst: Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0xa),
            hop_limit: 64,
        }
    } else {
        Outer::V4 {
            src: Ipv4Addr::new(198, 18, 0, 1),
            dst: Ipv4Addr::new(198, 18, 0, 2),
            ttl: 64,
        }
    };
    let mut buf = rest.to_vec();
    buf.resize(rest.len() + 64, 0);
    if let Ok(out) = ipip::encap_frame(&mut buf, span, &outer) {
        assert!(out.start <= out.end && out.end <= buf.len());
    }
}

/// The capsule protocol (RFC 9297 §3.2) as a stream, fed in two pieces cut where the first
/// byte says: what it decodes, and the bytes it consumes, never exceed what it was given.
pub fn capsules(data: &[u8]) {
    let (cut, stream) = split(data);
    let cut = usize::from(cut).min(stream.len());
    let mut dec = CapsuleDecoder::new(1500);
    let mut buffered = stream[..cut].to_vec();
    let mut fed = cut;
    loop {
        match dec.decode(&buffered) {
            Ok(Decoded::NeedMore { .. }) => {
                if fed == stream.len() {
                    return;
                }
                buffered.extend_from_slice(&stream[fed..]);
                fed = stream.len();
            }
            Ok(Decoded::Capsule { consumed, .. }) | Ok(Decoded::Skipped { consumed, .. }) => {
                assert!(consumed > 0 && consumed <= buffered.len());
                buffered.drain(..consumed);
            }
            Err(_) => return,
        }
    }
}

/// HTTP datagrams (RFC 9297 §2.1) and their context payloads (RFC 9298 §5, RFC 9484 §6).
pub fn http_datagrams(data: &[u8]) {
    let _ = Datagram::parse(data);
    let _ = ContextPayload::parse(data);
    let _ = mimiq_masque::varint::decode(data);
}

/// A CONNECT-IP session (RFC 9484) with an address assigned: every datagram from the client,
/// and every packet from the host side towards it.
pub fn connect_ip_session(data: &[u8]) {
    let (b, rest) = split(data);
    let mut pool = HostPool::new(
        IpPrefix::new(IpAddr::V4(Ipv4Addr::new(10, 77, 0, 0)), 16).ok(),
        IpPrefix::new(
            IpAddr::V6(Ipv6Addr::from(0xfd00_0000_0077_0000_0000_0000_0000_0000)),
            64,
        )
        .ok(),
    );
    let scope = if b & 1 == 0 {
        "/.well-known/masque/ip/*/*/"
    } else {
        "/.well-known/masque/ip/198.51.100.0%2F24/17/"
    };
    let Ok(scope) = IpScope::parse_path(scope) else {
        return;
    };
    let config = SessionConfig {
        decrement_ttl_from_client: b & 2 != 0,
        ..SessionConfig::default()
    };
    let mut s = ConnectIpSession::new(scope, config, &mut pool);
    let mut reply = vec![0u8; 1500];
    let mut packet = rest.to_vec();
    match s.on_datagram(&mut packet, &mut reply) {
        Verdict::Forward(n) => assert!(n <= packet.len()),
        Verdict::Reply(n) => assert!(n <= reply.len()),
        Verdict::Drop(_) => {}
    }
    let mut packet = rest.to_vec();
    let _ = s.on_egress(&mut packet, &mut reply);
}

/// The extended CONNECT request (RFC 9220, RFC 9298 §3, RFC 9484 §4): headers as
/// NUL-separated name and value pairs, and the URI templates' paths on their own.
pub fn extended_connect(data: &[u8]) {
    let mut fields = data.split(|&b| b == 0);
    let mut headers = Vec::new();
    while let (Some(name), Some(value)) = (fields.next(), fields.next()) {
        headers.push(quiche::h3::Header::new(name, value));
    }
    let _ = mimiq_masque::request::validate(&headers, &["secret".to_string()]);
    let _ = mimiq_masque::request::response_status(&headers);
    if let Ok(path) = std::str::from_utf8(data) {
        let _ = UdpTarget::parse_path(path);
        let _ = IpScope::parse_path(path);
    }
}

/// The allocator's messages (ARCHITECTURE.md, "Allocator protocol"): client requests, HMAC'd
/// relays from the switches and their replies, and the rule stream.
pub fn allocator_messages(data: &[u8]) {
    use mimiq_allocator::proto::{key, ClientMsg, Relay, RelayReply, StreamMsg};
    let k = key(b"switch-1-secret");
    let _ = ClientMsg::parse(data);
    let _ = Relay::parse(data, |_| Some(&k));
    let _ = RelayReply::parse(data, &k);
    let _ = StreamMsg::parse(data, |_| Some(&k));
}

/// Every config file: the switch's, the allocator's, the agent's and the proxy's, picked by
/// the first byte, the rest as its text.
pub fn config_files(data: &[u8]) {
    let (which, rest) = split(data);
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    match which % 4 {
        0 => {
            let _ = mimiq_dataplane::config::SwitchConfig::parse(
                text,
                std::path::Path::new("fuzz.toml"),
            );
        }
        1 => {
            let _ = mimiq_allocator::config::Config::parse(text);
        }
        2 => {
            let _ = mimiq_agent::config::AgentConfig::from_toml_str(text);
        }
        _ => {
            let _ = mimiq_masque::server::config::ProxyConfig::parse(text);
        }
    }
}

/// The roles as the benches configure them: dataplane/benches/support/roles.rs.
#[path = "../../../dataplane/benches/support/roles.rs"]
mod roles;

/// The switch roles' pipelines (access and edge, configured as the benches do, with a client's
/// bindings and an alias epoch in their tables) on every port, and the gateway's ARP and
/// neighbour discovery answers: a frame of any bytes gets a verdict, and a forwarded frame
/// stays within its buffer.
pub fn switch_pipelines(data: &[u8]) {
    use mimiq_allocator::lease::{RuleUpdate, Sequenced};
    use mimiq_allocator::Mac;
    use mimiq_dataplane::pipeline::gateway::{Answer, Gateway};
    use mimiq_dataplane::pipeline::mimiq::{Access, Edge};
    use mimiq_dataplane::pipeline::{Pipeline, Verdict as SwitchVerdict};
    use mimiq_dataplane::port::mem::{MemFrame, MemMemory};
    use mimiq_dataplane::wire::ethernet::EthernetAddress;

    let updates = vec![
        RuleUpdate::BindingAdd {
            ip: IpAddr::V4(roles::v4(0)),
            mac: Mac(roles::CLIENT),
            sid: roles::SID,
            port: 0,
            valid_until_ms: u64::MAX,
        },
        RuleUpdate::BindingAdd {
            ip: "fd00:1::101:0:0:10".parse().expect("address"),
            mac: Mac(roles::CLIENT),
            sid: roles::SID,
            port: 0,
            valid_until_ms: u64::MAX,
        },
        RuleUpdate::AliasEpoch {
            epoch: 1,
            aliases: vec![(roles::SID, vec![0x0101])],
            valid_until_ms: u64::MAX,
        },
    ];
    thread_local! {
        // Built once per thread: their tables are sized for a million bindings, and the frames
        // change nothing in them.
        static ROLES: std::cell::RefCell<Option<(Access, Edge)>> =
            const { std::cell::RefCell::new(None) };
    }
    fn one<P: Pipeline>(p: &mut P, port: u16, data: &[u8]) {
        let mut frame = MemFrame::from_bytes(data);
        let mut verdicts = Vec::new();
        p.process(
            port,
            &mut MemMemory,
            std::slice::from_mut(&mut frame),
            &mut verdicts,
        );
        assert_eq!(verdicts.len(), 1);
        if let SwitchVerdict::Forward(_) = verdicts[0] {
            assert!(!frame.bytes().is_empty());
        }
    }
    ROLES.with_borrow_mut(|r| {
        let (access, edge) = r.get_or_insert_with(|| {
            let rules = Sequenced::snapshot(1, updates);
            (roles::access(&rules), roles::edge(&rules))
        });
        for port in 0..3 {
            one(access, port, data);
            one(edge, port, data);
        }
    });
    let gateway = Gateway {
        mac: EthernetAddress([2, 0, 0, 0, 0, 1]),
        v4: Some(Ipv4Addr::new(10, 0, 0, 1)),
        v6: vec!["fe80::1".parse().expect("address")],
    };
    let mut buf = data.to_vec();
    buf.resize(data.len().max(128), 0);
    if let Ok(Answer::Reply(n)) = gateway.answer(&mut buf, data.len()) {
        assert!(n <= buf.len());
    }
}
