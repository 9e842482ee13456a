//! Pipelines: what a worker does with a burst of frames.
//!
//! A pipeline runs over a whole burst (VPP style) and gives every frame a [`Verdict`]; the
//! worker then moves the frames to their output ports and counts the drops once per burst.

pub mod gateway;
pub mod impair;
pub mod l2fwd;
pub mod mimiq;
pub mod single_box;

use serde::Serialize;

use crate::port::{FrameMemory, PortId};

/// What happens to one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Transmit on this port of the worker.
    Forward(PortId),
    /// Hand to the slow-path thread.
    ToSlowPath,
    /// Drop and count.
    Drop(DropReason),
}

/// Why a frame was dropped. Counters are indexed by this, never by free text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DropReason {
    /// Shorter than an Ethernet header.
    Runt,
    /// The output port's TX ring was full.
    TxRingFull,
    /// A verdict named a port the worker does not have.
    NoSuchPort,
    /// The frame needed the slow path and this role has none.
    NoSlowPath,
    /// The ring to the slow-path thread was full.
    SlowPathRingFull,
    /// The impair stage's loss probability.
    ImpairLoss,
    /// The impair stage's delay line was full.
    ImpairFull,
    /// Held in a delay line when the switch stopped.
    Shutdown,
    /// Not IPv4 or IPv6 where only IP is expected.
    NotIp,
    /// An IP header that is truncated or inconsistent.
    Malformed,
    /// TTL or hop limit would reach zero.
    HopLimitExceeded,
    /// Edge: the destination is in no client pool.
    NotInPool,
    /// No live binding or alias for the destination (unknown, or expired).
    NoRoute,
    /// Access: the (source MAC, source IP) pair is not a live binding of this switch.
    SpoofedSource,
    /// Access: encapsulated traffic not from the edge's internal address to ours.
    NotFromEdge,
    /// The encapsulated packet would exceed an IP packet's 65,535 bytes.
    TooBig,
    /// The next hop's MAC is not resolved yet.
    NoNeighbor,
    /// Link-scoped traffic (IPv6 link-local source or multicast destination) that a router
    /// does not forward.
    LinkLocal,
    /// Access: the tunnel's outer header says Congestion Experienced and the inner packet is
    /// not ECN-capable (RFC 6040 §4.2: drop).
    CeOnNotEct,
    /// The frame has too little headroom for an outer header.
    NoHeadroom,
}

impl DropReason {
    /// Every reason, in counter order.
    pub const ALL: [DropReason; 20] = [
        DropReason::Runt,
        DropReason::TxRingFull,
        DropReason::NoSuchPort,
        DropReason::NoSlowPath,
        DropReason::SlowPathRingFull,
        DropReason::ImpairLoss,
        DropReason::ImpairFull,
        DropReason::Shutdown,
        DropReason::NotIp,
        DropReason::Malformed,
        DropReason::HopLimitExceeded,
        DropReason::NotInPool,
        DropReason::NoRoute,
        DropReason::SpoofedSource,
        DropReason::NotFromEdge,
        DropReason::TooBig,
        DropReason::NoNeighbor,
        DropReason::LinkLocal,
        DropReason::CeOnNotEct,
        DropReason::NoHeadroom,
    ];

    /// The counter index of this reason.
    pub const fn index(self) -> usize {
        self as usize
    }

    /// The name used in stats and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            DropReason::Runt => "runt",
            DropReason::TxRingFull => "tx_ring_full",
            DropReason::NoSuchPort => "no_such_port",
            DropReason::NoSlowPath => "no_slow_path",
            DropReason::SlowPathRingFull => "slow_path_ring_full",
            DropReason::ImpairLoss => "impair_loss",
            DropReason::ImpairFull => "impair_full",
            DropReason::Shutdown => "shutdown",
            DropReason::NotIp => "not_ip",
            DropReason::Malformed => "malformed",
            DropReason::HopLimitExceeded => "hop_limit_exceeded",
            DropReason::NotInPool => "not_in_pool",
            DropReason::NoRoute => "no_route",
            DropReason::SpoofedSource => "spoofed_source",
            DropReason::NotFromEdge => "not_from_edge",
            DropReason::TooBig => "too_big",
            DropReason::NoNeighbor => "no_neighbor",
            DropReason::LinkLocal => "link_local",
            DropReason::CeOnNotEct => "ce_on_not_ect",
            DropReason::NoHeadroom => "no_headroom",
        }
    }
}

/// A stage that decides what happens to each frame of a burst.
pub trait Pipeline {
    /// A change to the pipeline's tables, sent by the control thread over the worker's update
    /// ring and applied between bursts.
    type Update: Send;

    /// Applies one update. Called by the worker between bursts, never during one.
    fn apply(&mut self, update: Self::Update);

    /// The wall-clock time in ms since the Unix epoch (the allocator's clock, which lifetimes
    /// are expressed in), given by the worker once per pass before any burst.
    fn tick(&mut self, _now_ms: u64) {}

    /// Sets `verdicts[i]` for every `frames[i]` (`verdicts` is cleared first by the worker);
    /// may rewrite frames in place through `memory`.
    fn process<M: FrameMemory>(
        &mut self,
        in_port: PortId,
        memory: &mut M,
        frames: &mut [M::Frame],
        verdicts: &mut Vec<Verdict>,
    );
}
