//! Sequence numbers: the sender's numbering (with test-only faults) and the receiver's loss,
//! reordering and duplicate detection. Sans-IO: plain integers in, counters out.
//!
//! Definitions (after RFC 4737): per flow the receiver expects `next` (one past the highest
//! sequence number seen). A packet with a higher number opens a gap; the missing numbers count
//! as lost. A packet below `next` that was not seen before is *reordered* and closes one lost
//! number; one seen before is a *duplicate*. "Seen before" is remembered for the last
//! [`WINDOW`] numbers; an older late packet counts as reordered (and un-lost) without the
//! duplicate check. Numbers lost after the last packet of a flow are invisible here: compare
//! the receiver's count with the sender's for those.

/// How many sequence numbers below `next` the duplicate check remembers.
pub const WINDOW: u64 = 1024;
const WORDS: usize = (WINDOW / 64) as usize;

/// Receiver counters, summed over flows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct SeqCounters {
    /// Probes counted (including reordered ones, excluding duplicates).
    pub received: u64,
    /// Sequence numbers missing (gaps not filled by late packets).
    pub lost: u64,
    /// Probes that arrived after a higher sequence number of their flow.
    pub reordered: u64,
    /// Probes whose sequence number was already seen.
    pub duplicates: u64,
}

/// The receiver's state for one flow.
#[derive(Debug, Clone)]
pub struct FlowTracker {
    /// One past the highest (unwrapped) sequence number seen.
    next: u64,
    /// Bit `s % WINDOW` is set when `s` in `[next - WINDOW, next)` was seen.
    seen: [u64; WORDS],
}

impl Default for FlowTracker {
    fn default() -> Self {
        FlowTracker {
            next: 0,
            seen: [0; WORDS],
        }
    }
}

impl FlowTracker {
    /// Accounts one probe with 32-bit sequence number `seq` into `c`.
    #[inline]
    pub fn on_probe(&mut self, seq: u32, c: &mut SeqCounters) {
        // Unwrap: the 64-bit number nearest to `next` with these low 32 bits.
        let delta = i64::from(seq.wrapping_sub(self.next as u32) as i32);
        let Some(ext) = self.next.checked_add_signed(delta) else {
            // Before sequence number 0: older than anything this flow can have sent.
            c.received += 1;
            c.reordered += 1;
            c.lost = c.lost.saturating_sub(1);
            return;
        };
        if ext >= self.next {
            // In order, or a gap of `ext - next` numbers. Forget the numbers the window drops.
            let gap = ext - self.next;
            if gap + 1 >= WINDOW {
                self.seen = [0; WORDS];
            } else {
                for s in self.next..=ext {
                    self.clear(s);
                }
            }
            self.set(ext);
            self.next = ext + 1;
            c.received += 1;
            c.lost += gap;
        } else if self.next - ext <= WINDOW {
            if self.is_set(ext) {
                c.duplicates += 1;
            } else {
                self.set(ext);
                c.received += 1;
                c.reordered += 1;
                c.lost = c.lost.saturating_sub(1);
            }
        } else {
            c.received += 1;
            c.reordered += 1;
            c.lost = c.lost.saturating_sub(1);
        }
    }

    /// One past the highest sequence number seen.
    pub fn next(&self) -> u64 {
        self.next
    }

    #[inline]
    fn set(&mut self, s: u64) {
        let b = s % WINDOW;
        self.seen[(b / 64) as usize] |= 1 << (b % 64);
    }

    #[inline]
    fn clear(&mut self, s: u64) {
        let b = s % WINDOW;
        self.seen[(b / 64) as usize] &= !(1 << (b % 64));
    }

    #[inline]
    fn is_set(&self, s: u64) -> bool {
        let b = s % WINDOW;
        self.seen[(b / 64) as usize] & (1 << (b % 64)) != 0
    }
}

/// Trackers for all flows (indexed by flow id) and their summed counters.
#[derive(Debug, Default)]
pub struct SeqTracker {
    flows: Vec<FlowTracker>,
    counters: SeqCounters,
}

impl SeqTracker {
    /// Accounts one probe.
    #[inline]
    pub fn on_probe(&mut self, flow: u16, seq: u32) {
        let i = usize::from(flow);
        if i >= self.flows.len() {
            // A new flow id: at most 65536 of them, so this grows a handful of times.
            self.flows.resize_with(i + 1, FlowTracker::default);
        }
        self.flows[i].on_probe(seq, &mut self.counters);
    }

    /// The counters so far.
    pub fn counters(&self) -> SeqCounters {
        self.counters
    }

    /// Flows that sent at least one probe.
    pub fn flows_seen(&self) -> usize {
        self.flows.iter().filter(|f| f.next() > 0).count()
    }
}

/// Faults the sender injects into its own numbering, to test the receiver on a real path.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Fault {
    /// Number every packet in order.
    #[default]
    None,
    /// Every n-th packet of a flow skips one sequence number (the receiver sees one lost).
    SkipEvery(u64),
    /// Packets 1, n+1, 2n+1, ... of a flow are sent after the packet that follows them (the
    /// receiver sees one reordered per swap). n ≥ 2.
    SwapEvery(u64),
}

/// The sender's numbering of one flow.
#[derive(Debug, Clone, Default)]
pub struct FlowNumbering {
    /// Packets numbered so far.
    packets: u64,
    /// The next sequence number in order.
    next: u32,
    /// A swapped-out number to send after the current one.
    held: Option<u32>,
}

/// What the numbering did, for the sender's report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct FaultCounters {
    /// Sequence numbers skipped (never sent).
    pub skipped: u64,
    /// Pairs of packets sent in swapped order.
    pub swapped: u64,
}

impl FlowNumbering {
    /// The sequence number of the flow's next packet.
    #[inline]
    pub fn next_seq(&mut self, fault: Fault, counters: &mut FaultCounters) -> u32 {
        self.packets += 1;
        if let Some(held) = self.held.take() {
            return held;
        }
        match fault {
            Fault::SkipEvery(n) if self.packets.is_multiple_of(n) => {
                self.next = self.next.wrapping_add(1);
                counters.skipped += 1;
            }
            Fault::SwapEvery(n) if self.packets % n == 1 => {
                // This packet carries next+1; the following one carries next.
                self.held = Some(self.next);
                let seq = self.next.wrapping_add(1);
                self.next = self.next.wrapping_add(2);
                counters.swapped += 1;
                return seq;
            }
            _ => {}
        }
        let seq = self.next;
        self.next = self.next.wrapping_add(1);
        seq
    }

    /// Whether a swapped-out number still waits to be sent (the sender sends it before
    /// stopping, or a swap at the very end would look like a loss).
    pub fn has_held(&self) -> bool {
        self.held.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(seqs: &[u32]) -> SeqCounters {
        let mut t = SeqTracker::default();
        for &s in seqs {
            t.on_probe(0, s);
        }
        t.counters()
    }

    #[test]
    fn in_order_packets_are_neither_lost_nor_reordered() {
        let c = run(&(0..5000).collect::<Vec<_>>());
        assert_eq!(
            c,
            SeqCounters {
                received: 5000,
                ..Default::default()
            }
        );
    }

    #[test]
    fn a_gap_counts_as_lost_and_a_late_packet_closes_it_as_reordered() {
        assert_eq!(
            run(&[0, 1, 3, 4]),
            SeqCounters {
                received: 4,
                lost: 1,
                ..Default::default()
            }
        );
        assert_eq!(
            run(&[0, 2, 1, 3]),
            SeqCounters {
                received: 4,
                reordered: 1,
                ..Default::default()
            }
        );
        // The first packet of the flow missing counts too: senders start at 0.
        assert_eq!(
            run(&[1, 2]),
            SeqCounters {
                received: 2,
                lost: 1,
                ..Default::default()
            }
        );
        assert_eq!(
            run(&[1, 0, 2]),
            SeqCounters {
                received: 3,
                reordered: 1,
                ..Default::default()
            }
        );
    }

    #[test]
    fn duplicates_are_counted_once_and_never_as_received() {
        assert_eq!(
            run(&[0, 1, 1, 2, 0, 3]),
            SeqCounters {
                received: 4,
                duplicates: 2,
                ..Default::default()
            }
        );
        // A duplicate of a late packet, still inside the window.
        assert_eq!(
            run(&[0, 5, 3, 3, 6]),
            SeqCounters {
                received: 4,
                lost: 3,
                reordered: 1,
                duplicates: 1
            }
        );
    }

    #[test]
    fn a_window_old_gap_is_still_accounted_and_sequence_numbers_wrap() {
        let mut seqs: Vec<u32> = (0..10).collect();
        seqs.push(5000); // gap of 4990
        seqs.push(10); // far behind the window: reordered, one fewer lost
        assert_eq!(
            run(&seqs),
            SeqCounters {
                received: 12,
                lost: 4989,
                reordered: 1,
                duplicates: 0
            }
        );

        let mut t = FlowTracker::default();
        let mut c = SeqCounters::default();
        t.next = u64::from(u32::MAX) - 2;
        for s in [u32::MAX - 2, u32::MAX - 1, u32::MAX, 0, 1, 2] {
            t.on_probe(s, &mut c);
        }
        assert_eq!(
            c,
            SeqCounters {
                received: 6,
                ..Default::default()
            }
        );
        assert_eq!(t.next(), (1 << 32) + 3);
    }

    #[test]
    fn flows_are_tracked_independently() {
        let mut t = SeqTracker::default();
        for s in 0..100 {
            t.on_probe(3, s);
            t.on_probe(1, s * 2); // every other number missing: 99 lost
        }
        assert_eq!(
            t.counters(),
            SeqCounters {
                received: 200,
                lost: 99,
                ..Default::default()
            }
        );
        assert_eq!(t.flows_seen(), 2);
    }

    #[test]
    fn the_senders_faults_are_exactly_what_the_receiver_reports() {
        for (fault, lost, reordered) in [
            (Fault::None, 0, 0),
            (Fault::SkipEvery(10), 100, 0),
            (Fault::SwapEvery(10), 0, 100),
        ] {
            let mut numbering = FlowNumbering::default();
            let mut faults = FaultCounters::default();
            let seqs: Vec<u32> = (0..1000)
                .map(|_| numbering.next_seq(fault, &mut faults))
                .collect();
            assert!(!numbering.has_held());
            let c = run(&seqs);
            assert_eq!(
                (c.received, c.lost, c.reordered, c.duplicates),
                (1000, lost, reordered, 0),
                "{fault:?}"
            );
            assert_eq!(faults.skipped, lost);
            assert_eq!(faults.swapped, reordered);
        }
    }
}
