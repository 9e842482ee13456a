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
use mimiq_masque::template::{IpScope, UdpTarget, UriTemplate, IP_VARIABLES, UDP_VARIABLES};

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
    ("tun_coalescer", tun_coalescer),
    ("gen_capture", gen_capture),
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

/// Cuts the input of a target that takes several packets into them: each is preceded by its
/// length as two big-endian bytes; a last length that overshoots takes what is left.
pub fn pieces(data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut rest = data;
    while let [hi, lo, tail @ ..] = rest {
        let n = usize::from(u16::from_be_bytes([*hi, *lo])).min(tail.len());
        out.push(&tail[..n]);
        rest = &tail[n..];
    }
    out
}

/// The inverse of [`pieces`], for the seeds: every piece behind its length (at most 65535
/// bytes each).
pub fn joined(pieces: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in pieces {
        let n = u16::try_from(p.len()).expect("a piece of at most 65535 bytes");
        out.extend_from_slice(&n.to_be_bytes());
        out.extend_from_slice(p);
    }
    out
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
    let served = mimiq_masque::request::Templates::default();
    let _ = mimiq_masque::request::validate(&headers, &["secret".to_string()], &served);
    let _ = mimiq_masque::request::response_status(&headers);
    if let Ok(path) = std::str::from_utf8(data) {
        let _ = UdpTarget::parse_path(path);
        let _ = IpScope::parse_path(path);
        // Templates with the variables in the query, and the paths matched against them.
        for (udp, ip) in [
            ("/u{?target_host,target_port}", "/i{?target,ipproto}"),
            (
                "/u?h={target_host}&p={target_port}",
                "/i/{target}/{ipproto}",
            ),
        ] {
            let udp = UriTemplate::parse(udp, UDP_VARIABLES).expect("valid template");
            let ip = UriTemplate::parse(ip, IP_VARIABLES).expect("valid template");
            let _ = UdpTarget::match_path(&udp, path);
            let _ = IpScope::match_path(&ip, path);
        }
        let _ = UriTemplate::parse(path, UDP_VARIABLES);
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

/// The proxy's TCP coalescer for its TUN device (masque-fastpath/src/tundev.rs), driven as the
/// proxy drives it: IP packets (cut by [`pieces`]) pushed one by one, the pending batch written
/// when one is refused, a packet that an empty coalescer refuses written alone behind an
/// all-zero vnet header, the batch written at the end. What the kernel makes of those writes (a
/// GSO write segmented again, as `tcp_gso_segment` does) must be the packets pushed, in order,
/// byte for byte except the fields the kernel writes per segment (IPv4 ID and header checksum,
/// TCP checksum) and those no receiver reads (the IPv4 reserved flag, the TCP reserved bits,
/// the urgent pointer without URG); each GSO write's vnet header must describe its packet.
pub fn tun_coalescer(data: &[u8]) {
    use mimiq_masque::tundev::{TcpCoalescer, VNET_HDR_LEN};
    thread_local! {
        // Its 64 KB batch buffer is allocated once per thread: a batch leaves nothing behind
        // once taken.
        static COALESCER: std::cell::RefCell<TcpCoalescer> =
            std::cell::RefCell::new(TcpCoalescer::default());
    }
    /// The coalescer's pending batch, if any, as a write: (segments it counted, bytes).
    fn write_batch(co: &mut TcpCoalescer, writes: &mut Vec<(usize, Vec<u8>)>) {
        let segments = co.segments();
        match co.take() {
            Some(out) => writes.push((segments, out.to_vec())),
            None => assert_eq!(segments, 0),
        }
    }
    let packets = pieces(data);
    let mut writes = Vec::new();
    COALESCER.with_borrow_mut(|co| {
        for pkt in &packets {
            if co.push(pkt) {
                continue;
            }
            write_batch(co, &mut writes);
            if co.push(pkt) {
                continue;
            }
            writes.push((1, [&[0; VNET_HDR_LEN][..], pkt].concat()));
        }
        write_batch(co, &mut writes);
        assert!(co.take().is_none() && co.segments() == 0);
    });
    // What leaves the TUN device: (sent as written, packet).
    let mut sent = Vec::new();
    for (segments, write) in &writes {
        assert!(write.len() <= VNET_HDR_LEN + 65_535);
        let (hdr, pkt) = write.split_at(VNET_HDR_LEN);
        if hdr.iter().all(|&b| b == 0) {
            assert_eq!(*segments, 1);
            sent.push((true, pkt.to_vec()));
        } else {
            let segs = gso_segments(hdr, pkt);
            assert!(segs.len() >= 2 && segs.len() == *segments);
            sent.extend(segs.into_iter().map(|s| (false, s)));
        }
    }
    assert_eq!(sent.len(), packets.len());
    for ((as_written, got), want) in sent.iter().zip(&packets) {
        if *as_written {
            assert_eq!(got, want);
        } else {
            assert_eq!(normalised(got), normalised(want));
        }
    }
}

/// What the kernel makes of a TCP GSO write to a TUN device (`virtio_net_hdr_to_skb`, then
/// `tcp_gso_segment` under `inet_gso_segment` or `ipv6_gso_segment`), once the vnet header is
/// checked against the packet: each segment is the headers and `gso_size` bytes of payload (the
/// last one the rest), with its IP length and sequence number; FIN and PSH stay on the last
/// segment only, CWR on the first only. Checksums are left as they are (see [`normalised`]).
fn gso_segments(hdr: &[u8], pkt: &[u8]) -> Vec<Vec<u8>> {
    // include/uapi/linux/virtio_net.h; the u16 fields are in host byte order.
    const NEEDS_CSUM: u8 = 1;
    const GSO_TCPV4: u8 = 1;
    const GSO_TCPV6: u8 = 4;
    const FIN: u8 = 0x01;
    const PSH: u8 = 0x08;
    const CWR: u8 = 0x80;
    let ne16 = |at: usize| usize::from(u16::from_ne_bytes([hdr[at], hdr[at + 1]]));
    let be16 = |at: usize| usize::from(u16::from_be_bytes([pkt[at], pkt[at + 1]]));
    let (hdr_len, gso_size, csum_start, csum_offset) = (ne16(2), ne16(4), ne16(6), ne16(8));
    // At least an IPv4 and a TCP header and two bytes of payload.
    assert!(pkt.len() > 40, "GSO write of {} bytes", pkt.len());
    let (v4, ihl) = match pkt[0] >> 4 {
        4 => (true, 20),
        6 => (false, 40),
        v => panic!("GSO write of IP version {v}"),
    };
    let thl = usize::from(pkt[ihl + 12] >> 4) * 4;
    assert_eq!(hdr[0], NEEDS_CSUM);
    assert_eq!(hdr[1], if v4 { GSO_TCPV4 } else { GSO_TCPV6 });
    assert_eq!((hdr_len, csum_start, csum_offset), (ihl + thl, ihl, 16));
    assert!(gso_size > 0 && pkt.len() > hdr_len + gso_size);
    let pseudo = if v4 {
        assert_eq!(be16(2), pkt.len(), "IPv4 total length");
        assert_eq!(
            fold(internet_sum(&pkt[..20])),
            0xffff,
            "IPv4 header checksum"
        );
        internet_sum(&pkt[12..20])
    } else {
        assert_eq!(be16(4) + 40, pkt.len(), "IPv6 payload length");
        internet_sum(&pkt[8..40])
    };
    // The TCP checksum field holds the pseudo header's sum (not complemented); the kernel
    // adds each segment's bytes to it.
    let tcp_len = (pkt.len() - ihl) as u32;
    assert_eq!(be16(ihl + 16), usize::from(fold(pseudo + 6 + tcp_len)));
    let seq = u32::from_be_bytes([pkt[ihl + 4], pkt[ihl + 5], pkt[ihl + 6], pkt[ihl + 7]]);
    let chunks: Vec<&[u8]> = pkt[hdr_len..].chunks(gso_size).collect();
    let last = chunks.len() - 1;
    chunks
        .iter()
        .enumerate()
        .map(|(k, chunk)| {
            let mut s = [&pkt[..hdr_len], chunk].concat();
            let len = s.len() as u16;
            if v4 {
                s[2..4].copy_from_slice(&len.to_be_bytes());
            } else {
                s[4..6].copy_from_slice(&(len - 40).to_be_bytes());
            }
            let seq = seq.wrapping_add((k * gso_size) as u32);
            s[ihl + 4..ihl + 8].copy_from_slice(&seq.to_be_bytes());
            if k < last {
                s[ihl + 13] &= !(FIN | PSH);
            }
            if k > 0 {
                s[ihl + 13] &= !CWR;
            }
            s
        })
        .collect()
}

/// `pkt` with the fields that a GSO write's segments need not carry as they came zeroed: those
/// the kernel writes per segment (IPv4 ID and header checksum, TCP checksum) and those no
/// receiver reads (the IPv4 reserved flag, RFC 791 §3.1; the TCP reserved bits and the urgent
/// pointer without URG, RFC 9293 §3.1). Anything that is not IPv4 or IPv6 with room for a TCP
/// header comes back unchanged.
fn normalised(pkt: &[u8]) -> Vec<u8> {
    let mut p = pkt.to_vec();
    let ihl = match p.first().map(|b| b >> 4) {
        Some(4) => 20,
        Some(6) => 40,
        _ => return p,
    };
    if p.len() < ihl + 20 {
        return p;
    }
    if ihl == 20 {
        p[4..6].fill(0);
        p[6] &= 0x7f;
        p[10..12].fill(0);
    }
    let tcp = &mut p[ihl..];
    tcp[12] &= 0xf1;
    tcp[16..18].fill(0);
    if tcp[13] & 0x20 == 0 {
        tcp[18..20].fill(0);
    }
    p
}

/// The one's-complement sum of `bytes` as big-endian 16-bit words (an odd last byte padded),
/// unfolded (RFC 1071).
fn internet_sum(bytes: &[u8]) -> u32 {
    let mut words = bytes.chunks_exact(2);
    let mut sum: u32 = (&mut words)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    if let [last] = words.remainder() {
        sum += u32::from(*last) << 8;
    }
    sum
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// `mimiq-perf gen`'s reading side (perf/src/gen/); the first byte picks, modulo 3:
///
/// - 0: frames (cut by [`pieces`]) as the receiver takes them off its queue: the probe parser,
///   then the per-flow sequence tracker. A frame that etherparse reads as Ethernet, IPv4 (not a
///   fragment) or IPv6 (no extension header), UDP, and a payload starting with a probe must
///   parse to that probe; a parsed IPv4 frame is never a fragment; every probe is counted once,
///   as received or as a duplicate.
/// - 1: the rest as the text values `gen` reads: a MAC address (as `/sys/class/net/*/address`
///   holds it), rates, durations and size mixes; what parses is what the text says, in range.
/// - 2: a probe frame the generator builds from the rest (addresses, ports, flow, size,
///   sequence number and send time) parses back to its probe, with a valid UDP checksum.
pub fn gen_capture(data: &[u8]) {
    let (b, rest) = split(data);
    match b % 3 {
        0 => gen_frames(rest),
        1 => gen_values(rest),
        _ => gen_round_trip(rest),
    }
}

fn gen_frames(data: &[u8]) {
    use mimiq_perf::gen::{probe, seq::SeqTracker};
    let mut tracker = SeqTracker::default();
    let mut probes = 0u64;
    let mut flows = std::collections::BTreeSet::new();
    for frame in pieces(data) {
        let got = probe::parse(frame);
        if let Some(want) = probe_per_etherparse(frame) {
            assert_eq!(got, Some(want));
        }
        let Some(p) = got else {
            continue;
        };
        if frame[12..14] == [0x08, 0x00] {
            let frag = u16::from_be_bytes([frame[14 + 6], frame[14 + 7]]);
            assert_eq!(frag & 0x3fff, 0, "a probe in an IPv4 fragment");
        }
        tracker.on_probe(p.flow, p.seq);
        probes += 1;
        flows.insert(p.flow);
    }
    let c = tracker.counters();
    assert_eq!(c.received + c.duplicates, probes);
    assert!(c.reordered <= c.received);
    assert!(tracker.flows_seen() <= flows.len());
}

/// The probe in `frame` as etherparse reads the frame, when it is one the generator's parser
/// promises to read: Ethernet without VLAN tags, IPv4 that is not a fragment or IPv6 without
/// extension headers, UDP, at least a probe's bytes with its magic.
fn probe_per_etherparse(frame: &[u8]) -> Option<mimiq_perf::gen::probe::Probe> {
    use etherparse::{IpNumber, NetSlice, SlicedPacket, TransportSlice};
    use mimiq_perf::gen::probe::{Probe, MAGIC, PROBE_LEN};
    let p = SlicedPacket::from_ethernet(frame).ok()?;
    if !p.link_exts.is_empty() {
        return None;
    }
    match p.net? {
        NetSlice::Ipv4(ip)
            if ip.header().protocol() == IpNumber::UDP && !ip.is_payload_fragmented() => {}
        NetSlice::Ipv6(ip) if ip.header().next_header() == IpNumber::UDP => {}
        _ => return None,
    }
    let Some(TransportSlice::Udp(udp)) = p.transport else {
        return None;
    };
    let b = udp.payload().get(..PROBE_LEN)?;
    if u16::from_be_bytes([b[0], b[1]]) != MAGIC {
        return None;
    }
    Some(Probe {
        flow: u16::from_be_bytes([b[2], b[3]]),
        seq: u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
        time_ns: u64::from_be_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]),
    })
}

fn gen_values(data: &[u8]) {
    use mimiq_perf::gen::cli::{parse_duration, parse_mac, parse_si};
    use mimiq_perf::gen::rate::SizeMix;
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(mac) = parse_mac(text) {
        let written: Vec<String> = mac.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(written.join(":"), text.to_ascii_lowercase());
    }
    if let Ok(rate) = parse_si(text) {
        assert!(rate > 0.0 && rate <= 1e12, "{rate}");
    }
    if let Ok(d) = parse_duration(text) {
        assert!(d <= std::time::Duration::from_secs(86_400), "{d:?}");
    }
    if let Ok(mix) = SizeMix::parse(text) {
        assert!((1..=16).contains(&mix.sizes.len()) && mix.weights.len() == mix.sizes.len());
        let total: u32 = mix.weights.iter().sum();
        assert!(total <= 1000 && mix.pattern.len() == total as usize);
        for (i, w) in mix.weights.iter().enumerate() {
            let n = mix.pattern.iter().filter(|&&p| usize::from(p) == i).count();
            assert_eq!(n, *w as usize);
        }
        let _ = mix.mean();
    }
}

fn gen_round_trip(data: &[u8]) {
    use etherparse::{NetSlice, SlicedPacket, TransportSlice};
    use mimiq_perf::gen::probe::{parse, FlowAddrs, Probe, Template};
    let mut r = [0u8; 72];
    let n = data.len().min(r.len());
    r[..n].copy_from_slice(&data[..n]);
    let ip = |at: usize, v6: bool| -> IpAddr {
        if v6 {
            IpAddr::from(<[u8; 16]>::try_from(&r[at..at + 16]).expect("16 bytes"))
        } else {
            IpAddr::from(<[u8; 4]>::try_from(&r[at..at + 4]).expect("4 bytes"))
        }
    };
    let be16 = |at: usize| u16::from_be_bytes([r[at], r[at + 1]]);
    // Bit 1 of the first byte: the destination of the other family (refused).
    let addrs = FlowAddrs {
        src_mac: r[1..7].try_into().expect("6 bytes"),
        dst_mac: r[7..13].try_into().expect("6 bytes"),
        src_ip: ip(13, r[0] & 1 != 0),
        dst_ip: ip(29, (r[0] & 1 != 0) != (r[0] & 2 != 0)),
        src_port: be16(45),
        dst_port: be16(47),
    };
    let flow = be16(49);
    let size = usize::from(be16(51));
    let seq = u32::from_be_bytes(r[53..57].try_into().expect("4 bytes"));
    let time_ns = u64::from_be_bytes(r[57..65].try_into().expect("8 bytes"));
    let Ok(t) = Template::build(&addrs, flow, size) else {
        return;
    };
    assert_eq!(t.frame_len(), size);
    let mut buf = vec![0xa5; t.len()];
    t.write(&mut buf, seq, time_ns);
    assert_eq!(parse(&buf), Some(Probe { flow, seq, time_ns }));
    let p = SlicedPacket::from_ethernet(&buf).expect("a generator frame");
    let Some(TransportSlice::Udp(udp)) = p.transport else {
        panic!("a generator frame without UDP");
    };
    let header = udp.to_header();
    let want = match p.net {
        Some(NetSlice::Ipv4(ip)) => header.calc_checksum_ipv4_raw(
            ip.header().source(),
            ip.header().destination(),
            udp.payload(),
        ),
        Some(NetSlice::Ipv6(ip)) => header.calc_checksum_ipv6_raw(
            ip.header().source(),
            ip.header().destination(),
            udp.payload(),
        ),
        _ => panic!("a generator frame without IP"),
    }
    .expect("a UDP payload of at most 1472 bytes");
    // RFC 768: a computed 0 is sent as all ones.
    assert_eq!(udp.checksum(), if want == 0 { 0xffff } else { want });
}
