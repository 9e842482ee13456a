//! Writes the seed corpus of every fuzz target into `fuzz/corpus/<target>/seed-<n>`: well-formed
//! inputs built with the project's own encoders and etherparse (frames, packets, capsules,
//! allocator messages, extended CONNECT headers) and the sample config files of `configs/`.
//! libFuzzer mutates from there; uniform random bytes rarely get past a length or version
//! check.
//!
//! ```text
//! cargo run -p mimiq-fuzz-cases --example seeds
//! ```

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use etherparse::PacketBuilder;
use mimiq_allocator::proto::{key, AllocRequest, ClientMsg, Relay, RelayInfo, Release};
use mimiq_allocator::{Family, Mac};
use mimiq_dataplane::wire::ipip::{self, Outer, Span};

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
