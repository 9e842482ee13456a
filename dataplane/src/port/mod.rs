//! Ports: where frames come from and go to.
//!
//! A [`Port`] is one queue of one network interface, owned by one worker. The frames of all
//! the ports of a worker live in one [`FrameMemory`] (for AF_XDP: one UMEM shared by the
//! worker's sockets), so a frame received on one port is transmitted on another without a copy:
//! only its descriptor moves. Frames a worker holds and has no use for go back to its free list,
//! from which [`Port::reclaim`] refills the fill rings.
//!
//! Two implementations: [`xsk::XskPort`] (AF_XDP through xsk-rs, the only place in the crate
//! that makes AF_XDP syscalls) and [`mem::MemPort`] (in memory, for tests and benchmarks of the
//! pipelines).

pub mod mem;
pub mod xdp_prog;
pub mod xsk;

use std::ops::DerefMut;
use std::time::Duration;

use serde::Serialize;

/// Index of a port within its worker.
pub type PortId = u16;

/// One queue of one interface, owned by one worker.
pub trait Port {
    /// A handle to one frame of the worker's frame memory.
    type Frame;
    /// The memory the frames live in, shared by all ports of a worker.
    type Memory: FrameMemory<Frame = Self::Frame>;

    /// The interface name (for counters and logs).
    fn name(&self) -> &str;

    /// Appends up to `max` received frames to `out`; returns how many.
    fn rx_burst(&mut self, out: &mut Vec<Self::Frame>, max: usize) -> usize;

    /// Queues the frames of `frames` for transmission, in order, and removes the ones it took
    /// from the front of `frames`; returns how many it took. What remains did not fit in the
    /// TX ring: the caller drops it (and counts it).
    fn tx_burst(&mut self, frames: &mut Vec<Self::Frame>) -> usize;

    /// Moves transmitted frames to `free`, refills the fill ring from `free`, and wakes the
    /// kernel where it asked for it.
    fn reclaim(&mut self, free: &mut Vec<Self::Frame>);

    /// Frames of the worker's memory that the kernel holds for this port: in the fill ring, or
    /// given for transmission and not yet completed. (In-memory ports hold none.)
    fn frames_in_kernel(&mut self) -> usize;

    /// The kernel's statistics for this queue, where there are any.
    fn xdp_stats(&self) -> Option<XdpStats>;

    /// Blocks until one of `ports` has received frames or `timeout` has passed.
    fn wait_rx(ports: &mut [Self], timeout: Duration)
    where
        Self: Sized;
}

/// Access to the bytes of frames.
pub trait FrameMemory {
    /// The frame handle.
    type Frame;

    /// The frame's length, in bytes.
    fn len(&self, frame: &Self::Frame) -> usize;

    /// A mutable view of a frame's bytes.
    type Bytes<'a>: DerefMut<Target = [u8]>
    where
        Self: 'a,
        Self::Frame: 'a;

    /// The frame's bytes.
    fn data_mut<'a>(&'a mut self, frame: &'a mut Self::Frame) -> Self::Bytes<'a>;

    /// Sets the frame's length (to grow it at the end, or shrink it); returns the new length,
    /// which is capped at the frame's capacity.
    fn set_len(&mut self, frame: &mut Self::Frame, len: usize) -> usize;

    /// Moves the frame's start by `delta` bytes and leaves its end where it is, as
    /// `bpf_xdp_adjust_head` does: a negative `delta` grows the frame at the front, into its
    /// headroom (for an outer header), a positive one drops its first bytes (an outer header
    /// taken off). Nothing is copied. Returns `false`, changing nothing, where the frame has no
    /// such room.
    fn adjust_head(&mut self, frame: &mut Self::Frame, delta: isize) -> bool;
}

/// The kernel's AF_XDP socket statistics (XDP_STATISTICS).
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct XdpStats {
    /// Frames dropped for reasons other than invalid descriptors.
    pub rx_dropped: u64,
    /// Invalid RX descriptors.
    pub rx_invalid_descs: u64,
    /// Invalid TX descriptors.
    pub tx_invalid_descs: u64,
    /// Frames dropped because the RX ring was full.
    pub rx_ring_full: u64,
    /// Times the fill ring was empty when the kernel needed a frame.
    pub rx_fill_ring_empty_descs: u64,
    /// Times the TX ring was empty when the kernel looked for work.
    pub tx_ring_empty_descs: u64,
}
