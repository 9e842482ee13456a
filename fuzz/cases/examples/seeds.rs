//! Writes the seed corpus of every fuzz target into `fuzz/corpus/<target>/seed-<n>`: well-formed
//! inputs built with the project's own encoders and etherparse (frames, packets, capsules,
//! allocator messages, extended CONNECT headers, TCP flows, the traffic generator's probes) and
//! the sample config files of `configs/`.
//! libFuzzer mutates from there; uniform random bytes rarely get past a length or version
//! check.
//!
//! ```text
//! cargo run -p mimiq-fuzz-cases --example seeds
//! ```

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use etherparse::{PacketBuilder, TcpOptionElement};
use mimiq_allocator::proto::{key, AllocRequest, ClientMsg, Relay, RelayInfo, Release};
use mimiq_allocator::{Family, Mac};
use mimiq_dataplane::wire::ipip::{self, Outer, Span};
use mimiq_fuzz_cases::joined;
use mimiq_perf::gen::probe::{FlowAddrs, Template};
use mimiq_perf::gen::send::Garble;

const MAC_A: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0a];
const MAC_B: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0b];

fn packets() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut frames = Vec::new();
    let mut v = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4([198, 18, 0, 10], [203, 0, 113, 5], 64)
        .udp(40000, 443)
        .write(&mut v, b"hello")
        .unwrap();
    frames.push(v);
    let mut v = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv6([0xfd; 16], [0x20; 16], 64)
        .udp(40000, 443)
        .write(&mut v, b"hello")
        .unwrap();
    frames.push(v);
    let mut v = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4([198, 18, 0, 10], [198, 18, 0, 1], 64)
        .icmpv4_echo_request(1, 1)
        .write(&mut v, &[0; 8])
        .unwrap();
    frames.push(v);
    let mut v = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv6(
            [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, 0, 0, 1],
            255,
        )
        .icmpv6(etherparse::Icmpv6Type::Unknown {
            type_u8: 135,
            code_u8: 0,
            bytes5to8: [0; 4],
        })
        // Target address, then a source link-layer address option (RFC 4861 §4.3, §4.6.1).
        .write(
            &mut v,
            &[
                0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 2, 0, 0, 0, 0, 0x0a,
            ],
        )
        .unwrap();
    frames.push(v);
    // An ARP request for 198.18.0.1 (RFC 826).
    let mut arp = Vec::new();
    arp.extend_from_slice(&[0xff; 6]);
    arp.extend_from_slice(&MAC_A);
    arp.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    arp.extend_from_slice(&MAC_A);
    arp.extend_from_slice(&[198, 18, 0, 10, 0, 0, 0, 0, 0, 0, 198, 18, 0, 1]);
    frames.push(arp);
    for f in frames {
        // The frame, and the IP packet inside it.
        out.push(f[14..].to_vec());
        out.push(f);
    }
    out
}

/// Each frame encapsulated by an edge switch (IPv6 and IPv4 outer headers).
fn encapsulated(frames: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for f in frames
        .iter()
        .filter(|f| f.len() > 14 && f[12] == 0x08 && f[13] == 0x00)
    {
        for outer in [
            Outer::V6 {
                src: "fd00::e".parse().unwrap(),
                dst: "fd00::a".parse().unwrap(),
                hop_limit: 64,
            },
            Outer::V4 {
                src: Ipv4Addr::new(198, 18, 0, 1),
                dst: Ipv4Addr::new(198, 18, 0, 2),
                ttl: 64,
            },
        ] {
            let mut buf = vec![0u8; 64];
            buf.extend_from_slice(f);
            let span = Span {
                start: 64,
                end: buf.len(),
            };
            if let Ok(s) = ipip::encap_frame(&mut buf, span, &outer) {
                out.push(buf[s.start..s.end].to_vec());
            }
        }
    }
    out
}

fn allocator_messages() -> Vec<Vec<u8>> {
    let k = key(b"switch-1-secret");
    let mut out = Vec::new();
    let msgs = [
        ClientMsg::AllocRequest(AllocRequest {
            family: Family::V4,
            count: 3,
            nonce: [7; 16],
        }),
        ClientMsg::AllocRequest(AllocRequest {
            family: Family::V6,
            count: 1,
            nonce: [9; 16],
        }),
        ClientMsg::Release(Release {
            family: Family::V4,
            addrs: vec![IpAddr::from([198, 18, 1, 10])],
        }),
    ];
    for (i, m) in msgs.iter().enumerate() {
        let mut inner = Vec::new();
        m.emit(i as u32, &mut inner).unwrap();
        let relay = Relay {
            txid: i as u32,
            info: RelayInfo {
                sid: 1,
                ingress_port: 1,
                mac: Mac(MAC_A),
                client_port: 5353,
            },
            timestamp_ms: 1_796_000_000_000,
            inner: &inner,
        };
        let mut r = Vec::new();
        relay.emit(&k, &mut r).unwrap();
        out.push(inner);
        out.push(r);
    }
    out
}

/// One TCP segment of the flow 198.18.0.10:40000 → 203.0.113.5:443 (or fd00::a → fd00::5 with
/// `v6`), ACK 7 with timestamps, as a client's stack sends it through the tunnel.
fn tcp_segment(v6: bool, seq: u32, payload: &[u8], psh: bool) -> Vec<u8> {
    let ip = if v6 {
        PacketBuilder::ipv6(
            [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x0a],
            [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x05],
            64,
        )
    } else {
        PacketBuilder::ipv4([198, 18, 0, 10], [203, 0, 113, 5], 64)
    };
    let tcp = ip
        .tcp(40000, 443, seq, 512)
        .ack(7)
        .options(&[
            TcpOptionElement::Noop,
            TcpOptionElement::Noop,
            TcpOptionElement::Timestamp(9, 3),
        ])
        .unwrap();
    let tcp = if psh { tcp.psh() } else { tcp };
    let mut v = Vec::new();
    tcp.write(&mut v, payload).unwrap();
    v
}

/// Packet sequences for the TUN coalescer: consecutive segments of one flow that it merges
/// (IPv4 and IPv6, the last one short and with PSH), and sequences it must split: another flow
/// between, a gap, a SYN, a UDP packet.
fn tcp_flows() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for v6 in [false, true] {
        let mut flow = Vec::new();
        for i in 0..3u8 {
            flow.push(tcp_segment(
                v6,
                1000 + 200 * u32::from(i),
                &[0xa0 + i; 200],
                false,
            ));
        }
        flow.push(tcp_segment(v6, 1600, &[0xa3; 80], true));
        out.push(joined(&flow));
        out.push(joined(&flow[..3]));
    }
    let mut udp = Vec::new();
    PacketBuilder::ipv4([198, 18, 0, 10], [203, 0, 113, 5], 64)
        .udp(40000, 443)
        .write(&mut udp, &[0x55; 100])
        .unwrap();
    let mut syn = Vec::new();
    PacketBuilder::ipv4([198, 18, 0, 10], [203, 0, 113, 5], 64)
        .tcp(40000, 443, 999, 512)
        .syn()
        .write(&mut syn, &[])
        .unwrap();
    out.push(joined(&[
        syn,
        tcp_segment(false, 1000, &[1; 200], false),
        tcp_segment(true, 1000, &[2; 200], false),
        tcp_segment(false, 1200, &[3; 200], false),
        tcp_segment(false, 1600, &[4; 200], false),
        udp,
        tcp_segment(false, 1800, &[5; 200], false),
        tcp_segment(false, 2000, &[6; 100], false),
        tcp_segment(false, 2100, &[7; 100], false),
    ]));
    out
}

/// Inputs of `gen_capture` (first byte: 0 frames, 1 text, 2 a frame to build): the generator's
/// probes as `gen send` builds them (IPv4 and IPv6, two flows, a gap, a late and a duplicate
/// probe), the frames `gen send --garble` spoils, the values of its command line, and the
/// fields of frames to build.
fn gen_inputs() -> Vec<Vec<u8>> {
    let addrs = |v6: bool, port: u16| FlowAddrs {
        src_mac: MAC_A,
        dst_mac: MAC_B,
        src_ip: if v6 {
            "fd00::1".parse().unwrap()
        } else {
            "198.18.0.1".parse().unwrap()
        },
        dst_ip: if v6 {
            "fd00::2".parse().unwrap()
        } else {
            "198.18.0.2".parse().unwrap()
        },
        src_port: port,
        dst_port: 9,
    };
    let frame = |v6: bool, flow: u16, size: usize, seq: u32| {
        let t = Template::build(&addrs(v6, 10_000 + flow), flow, size).unwrap();
        let mut buf = vec![0; t.len()];
        t.write(&mut buf, seq, 1_000_000_000 + u64::from(seq) * 1000);
        buf
    };
    let mut out = Vec::new();
    for v6 in [false, true] {
        let size = if v6 { 86 } else { 64 };
        let frames: Vec<Vec<u8>> = [
            (0, 0),
            (0, 1),
            (1, 0),
            (0, 2),
            (0, 4),
            (1, 1),
            (0, 3),
            (0, 3),
        ]
        .iter()
        .map(|&(flow, seq)| frame(v6, flow, size, seq))
        .collect();
        out.push([&[0][..], &joined(&frames)].concat());
        out.push([&[0][..], &joined(&[frame(v6, 0, 576, 7)])].concat());
    }
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let garbled: Vec<Vec<u8>> = [Garble::Random, Garble::Truncated, Garble::Ethertype]
        .iter()
        .enumerate()
        .map(|(n, g)| {
            let mut f = frame(false, 0, 64, n as u32);
            let len = g.apply(&mut f, n as u64, &mut rng);
            f.truncate(len);
            f
        })
        .collect();
    out.push([&[0][..], &joined(&garbled)].concat());
    for text in [
        "02:00:0a:ff:00:01",
        "1.5M",
        "10G",
        "2.5s",
        "500ms",
        "64:7,576:4,1500:1",
        "imix",
        "1518",
    ] {
        out.push([&[1][..], text.as_bytes()].concat());
    }
    // Fields of a frame to build: family, MACs, addresses, ports, flow, size, sequence, time.
    for (v6, size) in [(0u8, 64u16), (1, 82), (0, 1518), (1, 1518)] {
        let mut r = vec![v6];
        r.extend_from_slice(&MAC_A);
        r.extend_from_slice(&MAC_B);
        // 198.18.0.1 → 198.18.0.2, or the 16 bytes as IPv6 addresses.
        r.extend_from_slice(&[198, 18, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        r.extend_from_slice(&[198, 18, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        r.extend_from_slice(&[0x27, 0x10, 0x4e, 0x20, 0, 7]);
        r.extend_from_slice(&size.to_be_bytes());
        r.extend_from_slice(&0xffff_fffeu32.to_be_bytes());
        r.extend_from_slice(&0xdead_beef_0bad_f00du64.to_be_bytes());
        out.push([&[2][..], &r].concat());
    }
    out
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let frames = packets();
    let with_byte = |b: u8, v: &[u8]| [&[b][..], v].concat();
    let mut seeds: Vec<(&str, Vec<Vec<u8>>)> = Vec::new();
    seeds.push(("wire_views", frames.clone()));
    seeds.push(("switch_pipelines", frames.clone()));
    let enc = encapsulated(&frames);
    seeds.push((
        "ipip",
        enc.iter().chain(&frames).map(|f| with_byte(0, f)).collect(),
    ));
    // Capsules (RFC 9297 §3.2, RFC 9484 §4.7): DATAGRAM, ADDRESS_ASSIGN, ADDRESS_REQUEST,
    // ROUTE_ADVERTISEMENT, and an unknown type, as one stream, cut after the first.
    let stream: Vec<u8> = [
        &[0x00, 0x04, 0x00, 0x45, 0x00, 0x00][..],
        &[0x01, 0x07, 0x00, 0x04, 198, 18, 0, 10, 32],
        &[0x02, 0x07, 0x01, 0x04, 0, 0, 0, 0, 32],
        &[0x03, 0x0a, 0x04, 0, 0, 0, 0, 255, 255, 255, 255, 0],
        &[0x17, 0x02, 0xaa, 0xbb],
    ]
    .concat();
    seeds.push((
        "capsules",
        vec![with_byte(6, &stream), with_byte(0, &stream)],
    ));
    seeds.push((
        "http_datagrams",
        vec![
            [&[0x00][..], &frames[0][14..]].concat(),
            vec![0x40, 0x02, 1, 2, 3],
        ],
    ));
    seeds.push((
        "connect_ip_session",
        frames
            .iter()
            .filter(|f| f[12] != 0x08 || f[13] != 0x06)
            .flat_map(|f| [with_byte(0, &f[14..]), with_byte(1, &f[14..])])
            .collect(),
    ));
    let headers = |protocol: &str, path: &str| {
        [
            ":method",
            "CONNECT",
            ":protocol",
            protocol,
            ":scheme",
            "https",
            ":authority",
            "proxy.example:443",
            ":path",
            path,
            "capsule-protocol",
            "?1",
            "authorization",
            "Bearer secret",
        ]
        .join("\0")
        .into_bytes()
    };
    seeds.push((
        "extended_connect",
        vec![
            headers("connect-ip", "/.well-known/masque/ip/*/*/"),
            headers("connect-ip", "/.well-known/masque/ip/198.51.100.0%2F24/17/"),
            headers("connect-udp", "/.well-known/masque/udp/192.0.2.6/443/"),
            headers(
                "connect-udp",
                "/.well-known/masque/udp/2001%3Adb8%3A%3A1/443/",
            ),
        ],
    ));
    seeds.push(("allocator_messages", allocator_messages()));
    let configs: Vec<(u8, &str)> = vec![
        (0, "switch-access.toml"),
        (0, "switch-edge.toml"),
        (0, "switch-l2fwd.toml"),
        (0, "switch-single-box.toml"),
        (1, "allocator.toml"),
        (2, "agent.toml"),
        (3, "proxy.toml"),
    ];
    seeds.push((
        "config_files",
        configs
            .iter()
            .map(|(b, f)| with_byte(*b, &std::fs::read(root.join("configs").join(f)).unwrap()))
            .collect(),
    ));
    seeds.push(("tun_coalescer", tcp_flows()));
    seeds.push(("gen_capture", gen_inputs()));
    for (name, inputs) in seeds {
        assert!(
            mimiq_fuzz_cases::TARGETS.iter().any(|(n, _)| *n == name),
            "{name}"
        );
        let dir: PathBuf = root.join("fuzz/corpus").join(name);
        std::fs::create_dir_all(&dir).unwrap();
        for (i, input) in inputs.iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i}")), input).unwrap();
        }
        println!("{name}: {} seeds", inputs.len());
    }
}
