//! The poll-mode worker: receive a burst, run the pipeline, transmit, reclaim, repeat.
//!
//! One worker owns its ports, their frame memory, its pipeline and its counters; nothing on the
//! per-packet path takes a lock, allocates or does an atomic read-modify-write. Counters are
//! plain integers and the burst-time histogram a plain `Histogram`, handed to whoever publishes
//! them at most once per `publish_every`.
//!
//! Between bursts the worker drains its rings ([`Rings`]): table updates from the control
//! thread, and frames coming back from the slow-path thread. Frames go to the slow path by
//! moving their handle over an SPSC ring (no copy); a full ring is a counted drop, never a wait.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::{Serialize, Serializer};

use crate::config::IdleStrategy;
use crate::pipeline::impair::{Impair, ImpairConfig, Offer};
use crate::pipeline::{DropReason, Pipeline, Verdict};
use crate::port::{FrameMemory, Port, PortId, XdpStats};

/// Frames per burst.
pub const BURST: usize = 64;

/// Empty polls before an adaptive worker sleeps in `poll()`.
const SPIN_POLLS: u32 = 256;

/// How long an adaptive worker sleeps at most before it checks for shutdown.
const IDLE_SLEEP: Duration = Duration::from_millis(10);

/// Counters of one port, as seen by its worker.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct PortCounters {
    /// Interface name.
    pub name: String,
    /// Frames received.
    pub rx_packets: u64,
    /// Bytes received (Ethernet frames without FCS).
    pub rx_bytes: u64,
    /// Frames queued for transmission.
    pub tx_packets: u64,
    /// Bytes queued for transmission.
    pub tx_bytes: u64,
    /// The kernel's socket statistics, where the port has them.
    pub xdp: Option<XdpStats>,
}

/// Drops by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DropCounters([u64; DropReason::ALL.len()]);

impl DropCounters {
    /// Drops for `reason`.
    pub fn get(&self, reason: DropReason) -> u64 {
        self.0[reason.index()]
    }

    /// All drops.
    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }
}

impl Serialize for DropCounters {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(DropReason::ALL.iter().map(|r| (r.name(), self.get(*r))))
    }
}

/// Counters of one worker.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct WorkerCounters {
    /// Per port, in port order.
    pub ports: Vec<PortCounters>,
    /// Drops by reason.
    pub drops: DropCounters,
    /// Non-empty bursts processed.
    pub bursts: u64,
    /// Frames handed to the slow path.
    pub to_slow_path: u64,
    /// Frames the slow path handed back (to transmit or to free).
    pub from_slow_path: u64,
    /// Table updates applied.
    pub updates_applied: u64,
    /// Frames of the worker's memory (UMEM), counted when it started.
    pub frames_total: u64,
    /// After a clean stop: frames neither on the free list, nor held by the kernel, nor with
    /// the slow path. 0 means every frame came back. Meaningful in the last publication only.
    pub frames_unaccounted: i64,
}

/// A frame on its way back from the slow path.
pub enum SlowPathReturn<F> {
    /// Transmit it on this port (e.g. an ARP reply written into the request's frame).
    Transmit(F, PortId),
    /// Done with it: back to the free list.
    Free(F),
}

/// `in_port` of a frame lent to the slow path for frames of its own (requests it originates).
pub const SPARE_FRAME: PortId = PortId::MAX;

/// A frame on its way to the slow path, with the port it arrived on.
pub struct SlowPathFrame<F> {
    /// The frame (ownership moves with it).
    pub frame: F,
    /// The port it was received on.
    pub in_port: PortId,
}

/// A worker's ends of the rings to one slow-path thread.
pub struct SlowPathRings<F> {
    /// Frames to the slow-path thread.
    pub to: rtrb::Producer<SlowPathFrame<F>>,
    /// Frames back from it.
    pub back: rtrb::Consumer<SlowPathReturn<F>>,
    /// The input ports whose slow-path frames it takes.
    pub ports: std::ops::RangeInclusive<PortId>,
}

/// The worker's ends of its SPSC rings.
pub struct Rings<F, U> {
    /// Table updates, one ring per producer (the control thread's rule subscriber, the slow
    /// path's neighbour resolution, ...).
    pub updates: Vec<rtrb::Consumer<U>>,
    /// The slow-path threads; a frame goes to the first whose `ports` hold its input port.
    pub slow_paths: Vec<SlowPathRings<F>>,
}

impl<F, U> Default for Rings<F, U> {
    fn default() -> Self {
        Rings {
            updates: Vec::new(),
            slow_paths: Vec::new(),
        }
    }
}

/// Updates applied between two passes at most, so a flood of updates cannot stall forwarding.
const UPDATES_PER_PASS: usize = 1024;

/// Milliseconds since the Unix epoch (a vDSO read, no syscall).
fn wall_clock_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub use mimiq_metrics::hlog::duration_histogram;

/// A poll-mode worker over ports of type `P` running pipeline `L`.
pub struct Worker<P: Port, L: Pipeline> {
    ports: Vec<P>,
    memory: P::Memory,
    free: Vec<P::Frame>,
    pipeline: L,
    rings: Rings<P::Frame, L::Update>,
    rx: Vec<P::Frame>,
    verdicts: Vec<Verdict>,
    tx: Vec<Vec<P::Frame>>,
    counters: WorkerCounters,
    burst_ns: Histogram<u64>,
    /// Per output port, an impair stage in front of the TX ring.
    impair: Vec<Option<Impair<P::Frame>>>,
    /// Origin of the worker's clock, and the wall-clock time then (ms since the Unix epoch);
    /// re-read at every publication so the derived wall clock cannot drift far.
    epoch: Instant,
    epoch_wall_ms: u64,
    /// The clock at the start of the current pass, ns since `epoch` (one read per pass).
    now_ns: u64,
}

/// How long a stopping worker keeps polling to let the kernel complete what it was given.
const DRAIN: Duration = Duration::from_millis(200);

impl<P: Port, L: Pipeline> Worker<P, L> {
    /// A worker over `ports`, whose frames live in `memory`; `free` are the frames not given to
    /// any port yet.
    pub fn new(mut ports: Vec<P>, memory: P::Memory, free: Vec<P::Frame>, pipeline: L) -> Self {
        let in_kernel: usize = ports.iter_mut().map(Port::frames_in_kernel).sum();
        let counters = WorkerCounters {
            frames_total: (free.len() + in_kernel) as u64,
            ports: ports
                .iter()
                .map(|p| PortCounters {
                    name: p.name().to_string(),
                    ..PortCounters::default()
                })
                .collect(),
            ..WorkerCounters::default()
        };
        let tx = ports.iter().map(|_| Vec::with_capacity(BURST)).collect();
        Worker {
            ports,
            memory,
            free,
            pipeline,
            rings: Rings::default(),
            rx: Vec::with_capacity(BURST),
            verdicts: Vec::with_capacity(BURST),
            tx,
            counters,
            burst_ns: duration_histogram(),
            impair: Vec::new(),
            epoch: Instant::now(),
            epoch_wall_ms: wall_clock_ms(),
            now_ns: 0,
        }
    }

    /// Puts an impair stage (delay, jitter, loss, rate) in front of port `port`'s TX ring.
    pub fn set_impair(&mut self, port: usize, config: ImpairConfig) {
        if port < self.ports.len() {
            self.impair.resize_with(self.ports.len(), || None);
            self.impair[port] = Some(Impair::new(config));
        }
    }

    /// Lends up to `n` free frames to slow path `index` (marked [`SPARE_FRAME`]), for packets
    /// it originates itself (neighbour solicitations). Returns how many it lent.
    pub fn lend_to_slow_path(&mut self, index: usize, n: usize) -> usize {
        let Some(slow) = self.rings.slow_paths.get_mut(index) else {
            return 0;
        };
        let mut lent = 0;
        while lent < n {
            let Some(frame) = self.free.pop() else { break };
            if let Err(rtrb::PushError::Full(back)) = slow.to.push(SlowPathFrame {
                frame,
                in_port: SPARE_FRAME,
            }) {
                self.free.push(back.frame);
                break;
            }
            lent += 1;
        }
        self.counters.to_slow_path += lent as u64;
        lent
    }

    /// Connects the worker's rings.
    pub fn with_rings(mut self, rings: Rings<P::Frame, L::Update>) -> Self {
        self.rings = rings;
        self
    }

    /// One pass over every port: receive a burst, process, transmit; then reclaim. Returns the
    /// number of frames received.
    pub fn poll_once(&mut self) -> usize {
        let mut received = 0;
        // One clock read per pass serves the pipeline's wall clock, the impair stages and the
        // first burst's timing; each burst then costs one read, at its end.
        let mut mark = Instant::now();
        self.now_ns = mark.duration_since(self.epoch).as_nanos() as u64;
        self.pipeline
            .tick(self.epoch_wall_ms + self.now_ns / 1_000_000);
        for in_port in 0..self.ports.len() {
            self.rx.clear();
            let n = self.ports[in_port].rx_burst(&mut self.rx, BURST);
            if n == 0 {
                continue;
            }
            received += n;
            self.counters.bursts += 1;
            let rx_bytes: usize = self.rx.iter().map(|f| self.memory.len(f)).sum();
            let pc = &mut self.counters.ports[in_port];
            pc.rx_packets += n as u64;
            pc.rx_bytes += rx_bytes as u64;

            self.verdicts.clear();
            // `in_port` < ports.len() ≤ PortId::MAX (checked by the callers that build ports).
            let in_id = in_port as PortId;
            self.pipeline
                .process(in_id, &mut self.memory, &mut self.rx, &mut self.verdicts);
            // A pipeline that leaves a frame without a verdict drops it.
            self.verdicts
                .resize(self.rx.len(), Verdict::Drop(DropReason::NoSuchPort));
            for (frame, verdict) in self.rx.drain(..).zip(self.verdicts.iter()) {
                let reason = match *verdict {
                    Verdict::Forward(out) if usize::from(out) < self.tx.len() => {
                        self.tx[usize::from(out)].push(frame);
                        continue;
                    }
                    Verdict::Forward(_) => DropReason::NoSuchPort,
                    Verdict::ToSlowPath => match self
                        .rings
                        .slow_paths
                        .iter_mut()
                        .find(|s| s.ports.contains(&in_id))
                    {
                        Some(slow) => match slow.to.push(SlowPathFrame {
                            frame,
                            in_port: in_id,
                        }) {
                            Ok(()) => {
                                self.counters.to_slow_path += 1;
                                continue;
                            }
                            Err(rtrb::PushError::Full(back)) => {
                                self.counters.drops.0[DropReason::SlowPathRingFull.index()] += 1;
                                self.free.push(back.frame);
                                continue;
                            }
                        },
                        None => DropReason::NoSlowPath,
                    },
                    Verdict::Drop(reason) => reason,
                };
                self.counters.drops.0[reason.index()] += 1;
                self.free.push(frame);
            }
            self.flush_tx();
            // Receive, process and transmit of this burst (and any empty polls since the last).
            let end = Instant::now();
            self.burst_ns
                .saturating_record(end.duration_since(mark).as_nanos() as u64);
            mark = end;
        }
        received += self.drain_rings();
        if self
            .impair
            .iter()
            .any(|i| matches!(i, Some(s) if s.held() > 0))
        {
            self.flush_tx();
        }
        for port in &mut self.ports {
            port.reclaim(&mut self.free);
        }
        received
    }

    /// Applies pending table updates and takes back frames from the slow path. Returns the
    /// amount of work done (so an idle strategy does not sleep while rings are busy).
    fn drain_rings(&mut self) -> usize {
        let mut work = 0;
        for updates in &mut self.rings.updates {
            let n = updates.slots().min(UPDATES_PER_PASS);
            for _ in 0..n {
                let Ok(update) = updates.pop() else { break };
                self.pipeline.apply(update);
                self.counters.updates_applied += 1;
                work += 1;
            }
        }
        let mut any_tx = false;
        for slow in &mut self.rings.slow_paths {
            while let Ok(ret) = slow.back.pop() {
                self.counters.from_slow_path += 1;
                work += 1;
                match ret {
                    SlowPathReturn::Transmit(frame, port) if usize::from(port) < self.tx.len() => {
                        self.tx[usize::from(port)].push(frame);
                        any_tx = true;
                    }
                    SlowPathReturn::Transmit(frame, _) => {
                        self.counters.drops.0[DropReason::NoSuchPort.index()] += 1;
                        self.free.push(frame);
                    }
                    SlowPathReturn::Free(frame) => self.free.push(frame),
                }
            }
        }
        if any_tx {
            self.flush_tx();
        }
        work
    }

    /// Runs until `stop` is set, publishing counters and the burst-time histogram of the
    /// interval every `publish_every` (and once at the end); the histogram restarts empty
    /// after each publication.
    pub fn run(
        &mut self,
        stop: &AtomicBool,
        idle: IdleStrategy,
        publish_every: Duration,
        publish: &mut dyn FnMut(&WorkerCounters, &Histogram<u64>),
    ) {
        let mut empty_polls = 0u32;
        let mut next_publish = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            if self.poll_once() > 0 {
                empty_polls = 0;
            } else {
                empty_polls = empty_polls.saturating_add(1);
                if idle == IdleStrategy::Adaptive && empty_polls > SPIN_POLLS {
                    // Never sleep past a delayed frame's departure; within the kernel's timer
                    // slack (50 µs) of it, spin.
                    let sleep = match self.next_impair_due() {
                        Some(due_in) if due_in < Duration::from_micros(60) => Duration::ZERO,
                        Some(due_in) => (due_in - Duration::from_micros(50)).min(IDLE_SLEEP),
                        None => IDLE_SLEEP,
                    };
                    if !sleep.is_zero() {
                        P::wait_rx(&mut self.ports, sleep);
                    }
                }
            }
            let now = Instant::now();
            if now >= next_publish {
                self.publish(publish);
                next_publish = now + publish_every;
            }
        }
        self.drain_and_account();
        self.publish(publish);
    }

    /// After a stop: forwards what is still arriving (bounded by [`DRAIN`]), then counts where
    /// every frame is: on the free list, with the kernel (fill ring, or transmitted and not yet
    /// completed), or with the slow path.
    fn drain_and_account(&mut self) {
        let deadline = Instant::now() + DRAIN;
        while self.poll_once() > 0 && Instant::now() < deadline {}
        for stage in self.impair.iter_mut().flatten() {
            for frame in stage.drain() {
                self.counters.drops.0[DropReason::Shutdown.index()] += 1;
                self.free.push(frame);
            }
        }
        let in_kernel: usize = self.ports.iter_mut().map(Port::frames_in_kernel).sum();
        let with_slow_path =
            self.counters.to_slow_path as i64 - self.counters.from_slow_path as i64;
        self.counters.frames_unaccounted = self.counters.frames_total as i64
            - self.free.len() as i64
            - in_kernel as i64
            - with_slow_path;
    }

    fn publish(&mut self, publish: &mut dyn FnMut(&WorkerCounters, &Histogram<u64>)) {
        // Re-anchor the derived wall clock (NTP may have moved the real one).
        let elapsed_ms = self.epoch.elapsed().as_millis() as u64;
        self.epoch_wall_ms = wall_clock_ms().saturating_sub(elapsed_ms);
        self.refresh_xdp_stats();
        publish(&self.counters, &self.burst_ns);
        self.burst_ns.reset();
    }

    /// The counters so far.
    pub fn counters(&self) -> &WorkerCounters {
        &self.counters
    }

    /// The worker's ports (tests inject into and read from in-memory ports through this).
    pub fn ports_mut(&mut self) -> &mut [P] {
        &mut self.ports
    }

    /// Frames on the worker's free list.
    pub fn free_frames(&self) -> usize {
        self.free.len()
    }

    /// Burst processing times since the last publication, in nanoseconds.
    pub fn burst_ns(&self) -> &Histogram<u64> {
        &self.burst_ns
    }

    /// The pipeline (tests inspect its tables through this).
    pub fn pipeline(&self) -> &L {
        &self.pipeline
    }

    fn flush_tx(&mut self) {
        // The pass's clock reading may predate this burst's arrival (a worker preempted between
        // the two would let delayed frames leave early): impair stages read the clock afresh.
        let now_ns = if self.impair.is_empty() {
            self.now_ns
        } else {
            self.clock_ns()
        };
        for out in 0..self.tx.len() {
            if let Some(Some(stage)) = self.impair.get_mut(out) {
                let mut queue = std::mem::take(&mut self.tx[out]);
                for frame in queue.drain(..) {
                    let len = self.memory.len(&frame);
                    let (reason, frame) = match stage.offer(frame, len, now_ns) {
                        Offer::Held => continue,
                        Offer::Lost(f) => (DropReason::ImpairLoss, f),
                        Offer::Full(f) => (DropReason::ImpairFull, f),
                    };
                    self.counters.drops.0[reason.index()] += 1;
                    self.free.push(frame);
                }
                stage.release(now_ns, &mut queue);
                self.tx[out] = queue;
            }
            let queue = &mut self.tx[out];
            if queue.is_empty() {
                continue;
            }
            let bytes_before: usize = queue.iter().map(|f| self.memory.len(f)).sum();
            let sent = self.ports[out].tx_burst(queue);
            let bytes_left: usize = queue.iter().map(|f| self.memory.len(f)).sum();
            let pc = &mut self.counters.ports[out];
            pc.tx_packets += sent as u64;
            pc.tx_bytes += (bytes_before - bytes_left) as u64;
            self.counters.drops.0[DropReason::TxRingFull.index()] += queue.len() as u64;
            self.free.append(queue);
        }
    }

    /// Nanoseconds since the worker started (the impair stages' clock).
    fn clock_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// Time until the next delayed frame is due, if any is held.
    fn next_impair_due(&self) -> Option<Duration> {
        let now = self.clock_ns();
        self.impair
            .iter()
            .flatten()
            .filter_map(Impair::next_due_ns)
            .min()
            .map(|due| Duration::from_nanos(due.saturating_sub(now)))
    }

    fn refresh_xdp_stats(&mut self) {
        for (port, pc) in self.ports.iter().zip(self.counters.ports.iter_mut()) {
            pc.xdp = port.xdp_stats();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::l2fwd::L2Fwd;
    use crate::port::mem::{MemFrame, MemMemory, MemPort};

    fn frame(tag: u8, len: usize) -> MemFrame {
        let mut bytes = vec![tag; len];
        bytes[0] = tag;
        MemFrame::from_bytes(&bytes)
    }

    fn worker(tx_ring: usize) -> Worker<MemPort, L2Fwd> {
        let ports = vec![MemPort::new("a", tx_ring), MemPort::new("b", tx_ring)];
        Worker::new(ports, MemMemory, Vec::new(), L2Fwd)
    }

    #[test]
    fn l2fwd_moves_every_frame_to_the_other_port_in_order_and_counts_it() {
        let mut w = worker(1024);
        for i in 0..100u8 {
            w.ports_mut()[0].inject(frame(i, 60 + usize::from(i)));
        }
        w.ports_mut()[1].inject(frame(200, 1514));
        while w.poll_once() > 0 {}

        let to_b = w.ports_mut()[1].take_sent();
        assert_eq!(to_b.len(), 100);
        for (i, f) in to_b.iter().enumerate() {
            assert_eq!(f.bytes()[0], i as u8, "order kept");
            assert_eq!(f.bytes().len(), 60 + i, "length kept");
        }
        let to_a = w.ports_mut()[0].take_sent();
        assert_eq!(to_a.len(), 1);
        assert_eq!(to_a[0].bytes().len(), 1514);

        let c = w.counters();
        let bytes_a_to_b: u64 = (0..100u64).map(|i| 60 + i).sum();
        assert_eq!(
            (c.ports[0].rx_packets, c.ports[0].rx_bytes),
            (100, bytes_a_to_b)
        );
        assert_eq!(
            (c.ports[1].tx_packets, c.ports[1].tx_bytes),
            (100, bytes_a_to_b)
        );
        assert_eq!((c.ports[1].rx_packets, c.ports[0].tx_packets), (1, 1));
        assert_eq!(c.drops.total(), 0);
        assert_eq!(
            c.bursts, 3,
            "100 frames in bursts of 64 and 36, plus one burst of 1"
        );
    }

    #[test]
    fn runts_and_full_tx_rings_are_counted_drops_and_frames_return_to_the_free_list() {
        let mut w = worker(10);
        w.ports_mut()[0].inject(frame(1, 13));
        for i in 0..30 {
            w.ports_mut()[0].inject(frame(i, 64));
        }
        w.poll_once();
        let c = w.counters();
        assert_eq!(c.drops.get(DropReason::Runt), 1);
        assert_eq!(c.drops.get(DropReason::TxRingFull), 20);
        assert_eq!(c.ports[1].tx_packets, 10);
        assert_eq!(
            w.ports_mut()[0].take_recycled().len(),
            21,
            "dropped frames are reusable"
        );
        assert_eq!(w.ports_mut()[1].take_sent().len(), 10);
    }

    #[test]
    fn run_stops_on_the_flag_and_publishes_final_counters() {
        let mut w = worker(1024);
        w.ports_mut()[0].inject(frame(7, 64));
        let stop = AtomicBool::new(false);
        let mut published = Vec::new();
        w.run(
            &stop,
            IdleStrategy::Busy,
            Duration::from_secs(3600),
            &mut |c, _| {
                published.push(c.clone());
                stop.store(true, Ordering::Relaxed);
            },
        );
        let last = published.last().expect("published at least once");
        assert_eq!(last.ports[0].rx_packets, 1);
        assert_eq!(last.ports[1].tx_packets, 1);
    }

    /// Frames whose first byte equals `slow_tag` go to the slow path; the rest to port 1.
    struct Tagger {
        slow_tag: u8,
        updates_seen: u32,
    }

    impl Pipeline for Tagger {
        type Update = u8;

        fn apply(&mut self, update: u8) {
            self.slow_tag = update;
            self.updates_seen += 1;
        }

        fn process<M: FrameMemory>(
            &mut self,
            _in_port: PortId,
            memory: &mut M,
            frames: &mut [M::Frame],
            verdicts: &mut Vec<Verdict>,
        ) {
            for frame in frames.iter_mut() {
                let first = memory.data_mut(frame)[0];
                verdicts.push(if first == self.slow_tag {
                    Verdict::ToSlowPath
                } else {
                    Verdict::Forward(1)
                });
            }
        }
    }

    type SlowEnds = (
        rtrb::Producer<u8>,
        rtrb::Consumer<SlowPathFrame<MemFrame>>,
        rtrb::Producer<SlowPathReturn<MemFrame>>,
    );

    fn tagger_worker(slow_ring: usize) -> (Worker<MemPort, Tagger>, SlowEnds) {
        let (update_tx, update_rx) = rtrb::RingBuffer::new(4096);
        let (slow_tx, slow_rx) = rtrb::RingBuffer::new(slow_ring);
        let (back_tx, back_rx) = rtrb::RingBuffer::new(slow_ring);
        let ports = vec![MemPort::new("a", 1 << 20), MemPort::new("b", 1 << 20)];
        let w = Worker::new(
            ports,
            MemMemory,
            Vec::new(),
            Tagger {
                slow_tag: 0xee,
                updates_seen: 0,
            },
        )
        .with_rings(Rings {
            updates: vec![update_rx],
            slow_paths: vec![SlowPathRings {
                to: slow_tx,
                back: back_rx,
                ports: 0..=PortId::MAX,
            }],
        });
        (w, (update_tx, slow_rx, back_tx))
    }

    #[test]
    fn updates_are_applied_between_bursts_at_most_a_bounded_number_per_pass() {
        let (mut w, (mut updates, _, _)) = tagger_worker(64);
        for i in 0..3000u32 {
            updates.push((i % 200) as u8).unwrap();
        }
        w.poll_once();
        assert_eq!(w.counters().updates_applied, UPDATES_PER_PASS as u64);
        while w.poll_once() > 0 {}
        assert_eq!(w.counters().updates_applied, 3000);
        assert_eq!(w.pipeline().updates_seen, 3000);
        assert_eq!(
            w.pipeline().slow_tag,
            (2999 % 200) as u8,
            "applied in order"
        );
    }

    #[test]
    fn slow_path_frames_move_to_another_thread_and_come_back_to_be_sent() {
        let (mut w, (_, mut to_slow, mut back)) = tagger_worker(256);
        for i in 0..200u8 {
            w.ports_mut()[0].inject(frame(if i % 2 == 0 { 0xee } else { i }, 64));
        }
        let slow = std::thread::spawn(move || {
            let mut handled = 0;
            while handled < 100 {
                if let Ok(SlowPathFrame { mut frame, in_port }) = to_slow.pop() {
                    // Answer on the port the frame came from, e.g. an ARP reply.
                    MemMemory.data_mut(&mut frame)[1] = 0xaa;
                    let mut ret = SlowPathReturn::Transmit(frame, in_port);
                    while let Err(rtrb::PushError::Full(r)) = back.push(ret) {
                        ret = r;
                        std::thread::yield_now();
                    }
                    handled += 1;
                } else {
                    std::thread::yield_now();
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while w.counters().from_slow_path < 100 && Instant::now() < deadline {
            w.poll_once();
        }
        slow.join().unwrap();
        let c = w.counters().clone();
        assert_eq!((c.to_slow_path, c.from_slow_path), (100, 100));
        let answered = w.ports_mut()[0].take_sent();
        assert_eq!(answered.len(), 100, "answers leave on the ingress port");
        assert!(answered
            .iter()
            .all(|f| f.bytes()[0] == 0xee && f.bytes()[1] == 0xaa));
        assert_eq!(
            w.ports_mut()[1].take_sent().len(),
            100,
            "the rest is forwarded"
        );
        assert_eq!(c.drops.total(), 0);
    }

    #[test]
    fn each_port_s_slow_path_frames_go_to_the_slow_path_that_claims_the_port() {
        let mut rings = Rings::default();
        let mut far_ends = Vec::new();
        for ports in [0..=0, 1..=PortId::MAX] {
            let (to, from_worker) = rtrb::RingBuffer::new(64);
            let (to_worker, back) = rtrb::RingBuffer::new(64);
            rings.slow_paths.push(SlowPathRings { to, back, ports });
            far_ends.push((from_worker, to_worker));
        }
        let ports = vec![MemPort::new("a", 64), MemPort::new("b", 64)];
        let tagger = Tagger {
            slow_tag: 0xee,
            updates_seen: 0,
        };
        let spares = vec![frame(0, 64), frame(0, 64)];
        let mut w = Worker::new(ports, MemMemory, spares, tagger).with_rings(rings);
        // Spare frames go to the slow path asked for.
        assert_eq!(w.lend_to_slow_path(2, 2), 0, "no third slow path");
        assert_eq!(w.lend_to_slow_path(1, 2), 2);
        w.ports_mut()[0].inject(frame(0xee, 64));
        for _ in 0..3 {
            w.ports_mut()[1].inject(frame(0xee, 64));
        }
        w.poll_once();
        let got: Vec<Vec<PortId>> = far_ends
            .iter_mut()
            .map(|(from_worker, _)| {
                std::iter::from_fn(|| from_worker.pop().ok().map(|f| f.in_port)).collect()
            })
            .collect();
        let spare = SPARE_FRAME;
        assert_eq!(got, [vec![0], vec![spare, spare, 1, 1, 1]]);
        assert_eq!(w.counters().to_slow_path, 6);
    }

    #[test]
    fn a_full_slow_path_ring_is_a_counted_drop_and_the_frame_is_kept() {
        let (mut w, (_, to_slow, _)) = tagger_worker(4);
        for _ in 0..10 {
            w.ports_mut()[0].inject(frame(0xee, 64));
        }
        w.poll_once();
        assert_eq!(w.counters().to_slow_path, 4);
        assert_eq!(w.counters().drops.get(DropReason::SlowPathRingFull), 6);
        assert_eq!(w.ports_mut()[0].take_recycled().len(), 6);
        assert_eq!(to_slow.slots(), 4);
    }

    #[test]
    fn no_frame_is_ever_lost_over_a_long_run() {
        // Every frame is always in exactly one place: the test's pool, a port's inbox, a port's
        // sent list, the worker's free list, or one of the two slow-path rings.
        const FRAMES: usize = 500;
        let (mut w, (_, mut to_slow, mut back)) = tagger_worker(16);
        let mut pool: Vec<MemFrame> = (0..FRAMES).map(|_| frame(0, 64)).collect();
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for _ in 0..20_000 {
            for _ in 0..next() % 80 {
                let Some(mut f) = pool.pop() else { break };
                let r = next();
                // Some runts' worth of tags: slow path, forward; lengths vary.
                MemMemory.data_mut(&mut f)[0] = if r % 5 == 0 { 0xee } else { r as u8 & 0x7f };
                let port = (r >> 8) as usize % 2;
                w.ports_mut()[port].inject(f);
            }
            w.poll_once();
            // The slow path answers some, frees some, and sometimes lags behind.
            for _ in 0..next() % 20 {
                let Ok(SlowPathFrame { frame, in_port }) = to_slow.pop() else {
                    break;
                };
                let ret = if next() % 2 == 0 {
                    SlowPathReturn::Transmit(frame, in_port)
                } else {
                    SlowPathReturn::Free(frame)
                };
                if let Err(rtrb::PushError::Full(
                    SlowPathReturn::Transmit(f, _) | SlowPathReturn::Free(f),
                )) = back.push(ret)
                {
                    pool.push(f);
                }
            }
            for port in w.ports_mut() {
                pool.extend(port.take_sent());
                pool.extend(port.take_recycled());
            }
            let in_rings = to_slow.slots() + (16 - back.slots());
            let inboxes: usize = w.ports_mut().iter().map(MemPort::queued).sum();
            assert_eq!(pool.len() + inboxes + w.free_frames() + in_rings, FRAMES);
        }
        let c = w.counters();
        assert!(c.to_slow_path > 1000 && c.from_slow_path > 1000, "{c:?}");
        assert!(
            c.drops.get(DropReason::SlowPathRingFull) > 0,
            "the lagging slow path filled its ring"
        );
    }
}
