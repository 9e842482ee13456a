//! In-memory ports, for unit tests and benchmarks of the pipelines and the worker loop.
//!
//! A [`MemPort`] receives what a test [`MemPort::inject`]s and keeps what the worker transmits
//! until the test [`MemPort::take_sent`]s it. Frames own their buffers and move by value, so the
//! worker loop runs exactly as it does over AF_XDP: no copy between ports.

use std::collections::VecDeque;
use std::time::Duration;

use super::{FrameMemory, Port, XdpStats};

/// Bytes per in-memory frame, headroom included (as an AF_XDP frame of 2048 bytes).
pub const MEM_FRAME_BYTES: usize = 2048;

/// Bytes in front of a new frame's data (the kernel's XDP_PACKET_HEADROOM).
pub const MEM_HEADROOM: usize = 256;

/// A frame of an in-memory port.
pub struct MemFrame {
    buf: Box<[u8; MEM_FRAME_BYTES]>,
    /// Where the data starts in `buf`.
    head: usize,
    len: usize,
}

impl MemFrame {
    /// A frame holding a copy of `bytes` behind [`MEM_HEADROOM`] bytes of headroom (truncated
    /// to the room after it).
    pub fn from_bytes(bytes: &[u8]) -> Self {
        Self::with_headroom(bytes, MEM_HEADROOM)
    }

    /// A frame holding a copy of `bytes` behind `headroom` bytes of headroom (at most
    /// [`MEM_FRAME_BYTES`]; the bytes are truncated to the room after it).
    pub fn with_headroom(bytes: &[u8], headroom: usize) -> Self {
        let mut buf = Box::new([0u8; MEM_FRAME_BYTES]);
        let head = headroom.min(MEM_FRAME_BYTES);
        let len = bytes.len().min(MEM_FRAME_BYTES - head);
        buf[head..head + len].copy_from_slice(&bytes[..len]);
        MemFrame { buf, head, len }
    }

    /// The frame's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.buf[self.head..self.head + self.len]
    }
}

/// The frame memory of in-memory ports: frames carry their own buffers.
#[derive(Default)]
pub struct MemMemory;

impl FrameMemory for MemMemory {
    type Frame = MemFrame;

    fn len(&self, frame: &MemFrame) -> usize {
        frame.len
    }

    type Bytes<'a> = &'a mut [u8];

    fn data_mut<'a>(&'a mut self, frame: &'a mut MemFrame) -> &'a mut [u8] {
        &mut frame.buf[frame.head..frame.head + frame.len]
    }

    fn set_len(&mut self, frame: &mut MemFrame, len: usize) -> usize {
        frame.len = len.min(MEM_FRAME_BYTES - frame.head);
        frame.len
    }

    fn adjust_head(&mut self, frame: &mut MemFrame, delta: isize) -> bool {
        let end = frame.head + frame.len;
        match frame.head.checked_add_signed(delta) {
            Some(head) if head <= end => {
                frame.head = head;
                frame.len = end - head;
                true
            }
            _ => false,
        }
    }
}

/// An in-memory port with a bounded TX ring.
pub struct MemPort {
    name: String,
    inbox: VecDeque<MemFrame>,
    sent: Vec<MemFrame>,
    recycled: Vec<MemFrame>,
    tx_ring_size: usize,
}

impl MemPort {
    /// A port whose TX ring takes `tx_ring_size` frames between two [`MemPort::take_sent`]s.
    pub fn new(name: &str, tx_ring_size: usize) -> Self {
        MemPort {
            name: name.to_string(),
            inbox: VecDeque::new(),
            sent: Vec::new(),
            recycled: Vec::new(),
            tx_ring_size,
        }
    }

    /// Queues a frame for the worker to receive.
    pub fn inject(&mut self, frame: MemFrame) {
        self.inbox.push_back(frame);
    }

    /// Frames injected and not yet received by the worker.
    pub fn queued(&self) -> usize {
        self.inbox.len()
    }

    /// Takes the frames the worker freed (what an AF_XDP port puts on its fill ring).
    pub fn take_recycled(&mut self) -> Vec<MemFrame> {
        std::mem::take(&mut self.recycled)
    }

    /// Takes what the worker transmitted, in order.
    pub fn take_sent(&mut self) -> Vec<MemFrame> {
        std::mem::take(&mut self.sent)
    }
}

impl Port for MemPort {
    type Frame = MemFrame;
    type Memory = MemMemory;

    fn name(&self) -> &str {
        &self.name
    }

    fn rx_burst(&mut self, out: &mut Vec<MemFrame>, max: usize) -> usize {
        let n = max.min(self.inbox.len());
        out.extend(self.inbox.drain(..n));
        n
    }

    fn tx_burst(&mut self, frames: &mut Vec<MemFrame>) -> usize {
        let room = self.tx_ring_size.saturating_sub(self.sent.len());
        let n = room.min(frames.len());
        self.sent.extend(frames.drain(..n));
        n
    }

    fn reclaim(&mut self, free: &mut Vec<MemFrame>) {
        // Like a fill ring: the port takes the worker's free frames back.
        self.recycled.append(free);
    }

    fn frames_in_kernel(&mut self) -> usize {
        0
    }

    fn xdp_stats(&self) -> Option<XdpStats> {
        None
    }

    fn wait_rx(ports: &mut [Self], timeout: Duration) {
        if ports.iter().all(|p| p.inbox.is_empty()) {
            std::thread::sleep(timeout);
        }
    }
}
