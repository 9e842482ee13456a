//! `l2fwd`: every frame received on one port leaves on the other, unchanged.
//!
//! The first slice of the engine: it proves the AF_XDP path end to end (the namespace test in
//! `perf/tests/switch_l2fwd.rs` runs ping and iperf3 through it).

use super::{DropReason, Pipeline, Verdict};
use crate::port::{FrameMemory, PortId};

/// Bytes of an Ethernet header; anything shorter is a runt.
const ETHERNET_HEADER_LEN: usize = 14;

/// Forwards between port 0 and port 1.
#[derive(Debug, Default)]
pub struct L2Fwd;

impl Pipeline for L2Fwd {
    /// l2fwd has no tables.
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
        verdicts.extend(frames.iter().map(|frame| {
            if memory.len(frame) < ETHERNET_HEADER_LEN {
                Verdict::Drop(DropReason::Runt)
            } else {
                out
            }
        }));
    }
}
