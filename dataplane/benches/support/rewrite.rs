//! The forwarding rewrite measured by `benches/pipeline.rs` and `examples/rewrite_callgrind.rs`:
//! parse Ethernet + IPv4, rewrite both MACs for the next hop, decrement the TTL with an
//! incremental checksum update — and the naive baselines it is compared with in the same run.
//!
//! Shared by the bench and the example through `#[path]` so both measure the same code.

#![allow(dead_code)]

use mimiq_dataplane::pipeline::{Pipeline, Verdict};
use mimiq_dataplane::port::{FrameMemory, PortId};
use mimiq_dataplane::wire::{self, EtherType, EthernetAddress, EthernetFrame, Ipv4Packet};

/// Frames per burst (the engine's BURST).
pub const BURST: usize = 64;
/// Bytes per test frame: 14 Ethernet + 20 IPv4 + 8 UDP + 22 payload = 64 (a minimum-size
/// frame without FCS plus 4 bytes, the same size as the forwarding benchmark's).
pub const FRAME_LEN: usize = 64;
/// The TTL the frames start with; a run resets it before it can reach 1.
pub const START_TTL: u8 = 255;
/// Bursts that may run over the same frames before their TTL must be reset.
pub const BURSTS_PER_TTL_RESET: usize = 200;

/// The MACs of the next hop.
#[derive(Debug, Clone, Copy)]
pub struct NextHop {
    /// Our port's MAC.
    pub src: EthernetAddress,
    /// The next hop's MAC.
    pub dst: EthernetAddress,
}

/// The bench's next hop.
pub const NEXT_HOP: NextHop = NextHop {
    src: EthernetAddress([0x02, 0x00, 0x00, 0x00, 0x00, 0xaa]),
    dst: EthernetAddress([0x02, 0x00, 0x00, 0x00, 0x00, 0xbb]),
};

/// `BURST` Ethernet/IPv4/UDP frames of [`FRAME_LEN`] bytes over 16 flows, built with
/// etherparse (the slow-path way to build a packet; it also makes the bench's input
/// independent of the code under test).
pub fn frames() -> Vec<[u8; FRAME_LEN]> {
    frames_of_len(FRAME_LEN)
        .into_iter()
        .map(|f| {
            let mut frame = [0u8; FRAME_LEN];
            frame.copy_from_slice(&f);
            frame
        })
        .collect()
}

/// `BURST` Ethernet/IPv4/UDP frames of `len` (≥ 42) bytes over 16 flows.
pub fn frames_of_len(len: usize) -> Vec<Vec<u8>> {
    (0..BURST)
        .map(|i| {
            let flow = (i % 16) as u8;
            let builder =
                etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
                    .ipv4([10, 0, 0, 1 + flow], [10, 1, 0, 1 + flow], START_TTL)
                    .udp(1024 + u16::from(flow), 9);
            let payload = vec![flow; len - 14 - 20 - 8];
            let mut out = Vec::with_capacity(len);
            builder.write(&mut out, &payload).expect("the frame fits");
            out
        })
        .collect()
}

/// Baseline for encapsulation without headroom: move the inner packet `outer.header_len()`
/// bytes right inside the frame and write the outer header where it was (what a pipeline must
/// do while it cannot move a frame's start). `frame` is `start..end` in `buf`; returns the new
/// end.
pub fn encap_by_moving_packet(
    buf: &mut [u8],
    start: usize,
    end: usize,
    outer: &mimiq_dataplane::wire::ipip::Outer,
) -> wire::Result<usize> {
    let shift = outer.header_len();
    let ip_start = start + 14;
    if buf.len() < end + shift || end < ip_start {
        return Err(wire::Error::Truncated);
    }
    buf.copy_within(ip_start..end, ip_start + shift);
    mimiq_dataplane::wire::ipip::encap(buf, ip_start + shift, end + shift, outer)?;
    let ethertype = match outer {
        mimiq_dataplane::wire::ipip::Outer::V6 { .. } => EtherType::Ipv6,
        mimiq_dataplane::wire::ipip::Outer::V4 { .. } => EtherType::Ipv4,
    };
    EthernetFrame::new_unchecked(&mut buf[start..]).set_ethertype(ethertype);
    Ok(end + shift)
}

/// Its inverse: validate, move the inner packet left over the outer header; returns the new
/// end.
pub fn decap_by_moving_packet(buf: &mut [u8], start: usize, end: usize) -> wire::Result<usize> {
    let ip_start = start + 14;
    let inner =
        mimiq_dataplane::wire::ipip::decap(buf.get(ip_start..end).ok_or(wire::Error::Truncated)?)?;
    let from = ip_start + inner.offset;
    buf.copy_within(from..from + inner.len, ip_start);
    let ethertype = match inner.protocol {
        wire::IpProtocol::Ipv4 => EtherType::Ipv4,
        _ => EtherType::Ipv6,
    };
    EthernetFrame::new_unchecked(&mut buf[start..]).set_ethertype(ethertype);
    Ok(ip_start + inner.len)
}

/// Puts the TTL back to [`START_TTL`] (with a full checksum) so a run can go on.
pub fn reset_ttl(frame: &mut [u8]) {
    let mut eth = EthernetFrame::new_unchecked(frame);
    let mut ip = Ipv4Packet::new_unchecked(eth.payload_mut());
    ip.set_ttl(START_TTL);
    ip.fill_checksum();
}

/// The fast path: views, MAC rewrite, TTL decrement with RFC 1624 incremental checksum.
///
/// The header checksum is not verified: the incremental update keeps a wrong checksum wrong
/// (RFC 1624 §2), so the receiver still detects a corrupted header.
#[inline]
pub fn rewrite_fast(frame: &mut [u8], next_hop: &NextHop) -> wire::Result<()> {
    let mut eth = EthernetFrame::new_checked(frame)?;
    if eth.ethertype() != EtherType::Ipv4 {
        return Err(wire::Error::Unsupported);
    }
    {
        let mut ip = Ipv4Packet::new_checked(eth.payload_mut())?;
        if ip.version() != 4 {
            return Err(wire::Error::Malformed);
        }
        ip.decrement_ttl()?;
    }
    eth.set_src_addr(next_hop.src);
    eth.set_dst_addr(next_hop.dst);
    Ok(())
}

/// Baseline 1: the same views, but the header checksum is recomputed in full after the TTL
/// changes (what a straightforward implementation does).
#[inline]
pub fn rewrite_full_checksum(frame: &mut [u8], next_hop: &NextHop) -> wire::Result<()> {
    let mut eth = EthernetFrame::new_checked(frame)?;
    if eth.ethertype() != EtherType::Ipv4 {
        return Err(wire::Error::Unsupported);
    }
    {
        let mut ip = Ipv4Packet::new_checked(eth.payload_mut())?;
        if ip.version() != 4 {
            return Err(wire::Error::Malformed);
        }
        let ttl = ip.ttl();
        if ttl <= 1 {
            return Err(wire::Error::HopLimitExceeded);
        }
        ip.set_ttl(ttl - 1);
        ip.fill_checksum();
    }
    eth.set_src_addr(next_hop.src);
    eth.set_dst_addr(next_hop.dst);
    Ok(())
}

/// Baseline 2: classify with etherparse's slicing (`SlicedPacket::from_ethernet`, which walks
/// and validates every layer down to UDP), then rewrite the bytes at their offsets and
/// recompute the header checksum with etherparse.
#[inline]
pub fn rewrite_etherparse(frame: &mut [u8], next_hop: &NextHop) -> wire::Result<()> {
    let (ip_offset, ttl, new_checksum) = {
        let sliced =
            etherparse::SlicedPacket::from_ethernet(frame).map_err(|_| wire::Error::Malformed)?;
        let Some(etherparse::NetSlice::Ipv4(ipv4)) = sliced.net else {
            return Err(wire::Error::Unsupported);
        };
        let mut header = ipv4.header().to_header();
        if header.time_to_live <= 1 {
            return Err(wire::Error::HopLimitExceeded);
        }
        header.time_to_live -= 1;
        let offset = frame.len() - ipv4.header().slice().len() - ipv4.payload().payload.len();
        (offset, header.time_to_live, header.calc_header_checksum())
    };
    frame[ip_offset + 8] = ttl;
    frame[ip_offset + 10..ip_offset + 12].copy_from_slice(&new_checksum.to_be_bytes());
    frame[0..6].copy_from_slice(next_hop.dst.as_bytes());
    frame[6..12].copy_from_slice(next_hop.src.as_bytes());
    Ok(())
}

/// Which rewrite a run uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// [`rewrite_fast`].
    Fast,
    /// [`rewrite_full_checksum`].
    FullChecksum,
    /// [`rewrite_etherparse`].
    Etherparse,
}

/// Runs `variant` over one burst of frames; returns how many were rewritten.
#[inline(never)]
pub fn rewrite_burst(frames: &mut [[u8; FRAME_LEN]], variant: Variant) -> usize {
    let hop = NEXT_HOP;
    let mut ok = 0;
    match variant {
        Variant::Fast => {
            for f in frames.iter_mut() {
                ok += usize::from(rewrite_fast(f, &hop).is_ok());
            }
        }
        Variant::FullChecksum => {
            for f in frames.iter_mut() {
                ok += usize::from(rewrite_full_checksum(f, &hop).is_ok());
            }
        }
        Variant::Etherparse => {
            for f in frames.iter_mut() {
                ok += usize::from(rewrite_etherparse(f, &hop).is_ok());
            }
        }
    }
    ok
}

/// Bytes between frames in an AF_XDP UMEM with 2048-byte frames (and in `MemPort` frames).
pub const UMEM_FRAME_BYTES: usize = 2048;

/// The burst of [`frames`] laid out `stride` bytes apart in one buffer, as in a UMEM.
pub fn strided_frames(stride: usize) -> Vec<u8> {
    let mut umem = vec![0u8; BURST * stride];
    for (i, f) in frames().iter().enumerate() {
        umem[i * stride..i * stride + FRAME_LEN].copy_from_slice(f);
    }
    umem
}

/// [`rewrite_fast`] over a burst laid out `stride` bytes apart; returns how many were
/// rewritten.
#[inline(never)]
pub fn rewrite_burst_strided(umem: &mut [u8], stride: usize) -> usize {
    let hop = NEXT_HOP;
    let mut ok = 0;
    for frame in umem.chunks_mut(stride) {
        let len = FRAME_LEN.min(frame.len());
        let frame = &mut frame[..len];
        ok += usize::from(rewrite_fast(frame, &hop).is_ok());
    }
    ok
}

/// The fast rewrite as a worker pipeline: every frame it can rewrite leaves on the other port;
/// anything else (ARP, IPv6, TTL expiry, malformed) goes to the slow path.
#[derive(Debug)]
pub struct RewritePipeline {
    /// The next hop.
    pub next_hop: NextHop,
}

impl Pipeline for RewritePipeline {
    type Update = std::convert::Infallible;

    fn apply(&mut self, update: Self::Update) {
        match update {}
    }

    fn process<M: FrameMemory>(
        &mut self,
        in_port: PortId,
        memory: &mut M,
        frames: &mut [M::Frame],
        verdicts: &mut Vec<Verdict>,
    ) {
        let out = Verdict::Forward(in_port ^ 1);
        for frame in frames.iter_mut() {
            let mut bytes = memory.data_mut(frame);
            verdicts.push(match rewrite_fast(&mut bytes, &self.next_hop) {
                Ok(()) => out,
                Err(_) => Verdict::ToSlowPath,
            });
        }
    }
}

/// Checks that the three variants produce identical bytes (run by the bench before measuring,
/// so a figure is never reported for a rewrite that differs from the others).
pub fn assert_variants_agree() {
    let mut a = frames();
    let mut b = frames();
    let mut c = frames();
    for _ in 0..3 {
        assert_eq!(rewrite_burst(&mut a, Variant::Fast), BURST);
        assert_eq!(rewrite_burst(&mut b, Variant::FullChecksum), BURST);
        assert_eq!(rewrite_burst(&mut c, Variant::Etherparse), BURST);
    }
    assert_eq!(a, b);
    assert_eq!(a, c);
    for f in &a {
        let ip = Ipv4Packet::new_checked(&f[14..]).expect("IPv4");
        assert!(ip.verify_checksum());
        assert_eq!(ip.ttl(), START_TTL - 3);
        assert_eq!(
            EthernetFrame::new_checked(&f[..])
                .expect("frame")
                .dst_addr(),
            NEXT_HOP.dst
        );
    }
}
