//! Shared by `benches/roles.rs` and `examples/roles_callgrind.rs`: tables with 1M IPv4
//! bindings and 65,535 aliases, the two roles configured on them, and bursts of 64-byte frames
//! for each direction.

#![allow(dead_code)] // each includer uses its part

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use etherparse::PacketBuilder;
use mimiq_allocator::lease::{RuleUpdate, Sequenced};
use mimiq_allocator::Mac;
use mimiq_dataplane::pipeline::mimiq::{
    Access, AccessConfig, AccessSwitch, Edge, EdgeConfig, V4Prefix,
};
use mimiq_dataplane::pipeline::Pipeline;
use mimiq_dataplane::port::mem::{MemFrame, MemMemory};

pub const BURST: usize = 64;
pub const BINDINGS: u32 = 1_000_000;
pub const SID: u16 = 1;
pub const CLIENT: [u8; 6] = [2, 0, 0, 0, 0, 0xc1];
pub const NOW: u64 = 1_000;

pub fn v4(i: u32) -> Ipv4Addr {
    // 198.18.0.0/15 holds 131072 addresses; spread a million over 10.0.0.0/8 for the table.
    Ipv4Addr::from(0x0a00_0000 | (i + 1))
}

pub fn rules() -> Vec<Sequenced> {
    let mut updates: Vec<RuleUpdate> = (0..BINDINGS)
        .map(|i| RuleUpdate::BindingAdd {
            ip: IpAddr::V4(v4(i)),
            mac: Mac(CLIENT),
            sid: SID,
            port: 0,
            valid_until_ms: u64::MAX,
        })
        .collect();
    // 64k aliases over 16 SIDs... all of them ours (SID 1) for the lookup to succeed.
    updates.push(RuleUpdate::AliasEpoch {
        epoch: 1,
        aliases: vec![(SID, (1..65536).collect())],
        valid_until_ms: u64::MAX,
    });
    Sequenced::snapshot(1, updates)
}

pub fn edge(rules: &[Sequenced]) -> Edge {
    let mut e = Edge::new(EdgeConfig {
        inside: 0,
        outside: 1,
        inside_mac: [2, 0, 0, 0, 0, 0xe1],
        outside_mac: [2, 0, 0, 0, 0, 0xe2],
        outside_next_hop_mac: Some([2, 0, 0, 0, 0, 0x99]),
        internal: "fd00:ffff::e".parse().unwrap(),
        access: vec![AccessSwitch {
            sid: SID,
            internal: "fd00:ffff::a".parse().unwrap(),
            mac: [2, 0, 0, 0, 0, 0xa1],
        }],
        v6_prefix: "fd00:1::".parse().unwrap(),
        v6_prefix_len: 64,
        alias_bits: 16,
        alias_k: 4,
        v4_pools: vec![V4Prefix {
            addr: Ipv4Addr::new(10, 0, 0, 0),
            len: 8,
        }],
    });
    rules.iter().for_each(|r| e.apply(r.clone().into()));
    e.tick(NOW);
    e
}

pub fn access(rules: &[Sequenced]) -> Access {
    let mut a = Access::new(AccessConfig {
        sid: SID,
        client_ports: 1,
        uplink: 1,
        gateway_mac: [2, 0, 0, 0, 0, 1],
        gateway_v4: Some(Ipv4Addr::new(10, 0, 0, 1)),
        gateway_v6: vec!["fe80::1".parse().unwrap()],
        uplink_mac: [2, 0, 0, 0, 0, 0xa1],
        edge_mac: [2, 0, 0, 0, 0, 0xe1],
        internal: "fd00:ffff::a".parse().unwrap(),
        edge_internal: "fd00:ffff::e".parse().unwrap(),
        v6_prefix_len: 64,
        alias_bits: 16,
    });
    rules.iter().for_each(|r| a.apply(r.clone().into()));
    a.tick(NOW);
    // Steady state: every client has sent before (a binding's first packet, reported once,
    // is not what a switch forwards at rate).
    for i in 0..BINDINGS {
        a.mark_seen(IpAddr::V4(v4(i)));
    }
    a
}

/// 64-byte frames (with the Ethernet header, without FCS) to `dst` from `src`.
pub fn udp_v4(src_mac: [u8; 6], src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(src_mac, [2, 0, 0, 0, 0, 1])
        .ipv4(src.octets(), dst.octets(), 64)
        .udp(1, 2)
        .write(&mut out, &[0; 22])
        .unwrap();
    out
}

pub fn udp_v6(dst: Ipv6Addr) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2([2, 0, 0, 0, 0, 0x99], [2, 0, 0, 0, 0, 0xe2])
        .ipv6(
            [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5],
            dst.octets(),
            64,
        )
        .udp(1, 2)
        .write(&mut out, &[0; 2])
        .unwrap();
    out
}

/// Bursts of frames' bytes.
pub type Bursts = Vec<Vec<Vec<u8>>>;

/// Bursts the workloads rotate through: 65,536 packets, so the tables' lines a burst touches
/// are not in the caches from the burst before.
pub const BURSTS: usize = 1024;

/// `BURSTS` bursts whose packets name bindings drawn uniformly from the whole table (a fixed
/// seed: every run measures the same packets).
pub fn bursts(make: impl Fn(u32) -> Vec<u8>) -> Bursts {
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng % u64::from(BINDINGS)) as u32
    };
    (0..BURSTS)
        .map(|_| (0..BURST).map(|_| make(next())).collect())
        .collect()
}

pub fn frames(bytes: &[Vec<u8>]) -> Vec<MemFrame> {
    bytes.iter().map(|b| MemFrame::from_bytes(b)).collect()
}

pub fn run<P: Pipeline>(p: &mut P, port: u16, f: &mut [MemFrame]) -> usize {
    let mut verdicts = Vec::with_capacity(BURST);
    p.process(port, &mut MemMemory, f, &mut verdicts);
    verdicts.len()
}

/// The four role workloads and their input bursts: (name, port, bursts of frames), with the
/// frames the edge produces as the access switch's downstream input.
pub fn workloads(e: &mut Edge) -> Vec<(&'static str, u16, Bursts)> {
    let down_v4 = bursts(|i| udp_v4([2, 0, 0, 0, 0, 0x99], Ipv4Addr::new(203, 0, 113, 5), v4(i)));
    let down_v6 = bursts(|i| {
        udp_v6(Ipv6Addr::from(
            0xfd00_0001_0000_0000_0000_0000_0000_0000u128
                | (u128::from(i % 65535 + 1) << 48)
                | 0x10,
        ))
    });
    let up = bursts(|i| udp_v4(CLIENT, v4(i), Ipv4Addr::new(203, 0, 113, 5)));
    let encapsulated: Bursts = down_v4
        .iter()
        .map(|burst| {
            burst
                .iter()
                .map(|b| {
                    let mut f = vec![MemFrame::from_bytes(b)];
                    let mut v = Vec::new();
                    e.process(1, &mut MemMemory, &mut f, &mut v);
                    f[0].bytes().to_vec()
                })
                .collect()
        })
        .collect();
    vec![
        ("edge_down_v6_alias", 1, down_v6),
        ("edge_down_v4_exact_1m", 1, down_v4),
        ("access_down", 1, encapsulated),
        ("access_up", 0, up),
    ]
}
