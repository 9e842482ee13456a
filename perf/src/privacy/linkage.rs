//! The linkage attacker: an observer who tries to chain a client's sub-flows back together.
//!
//! Website fingerprinting per sub-flow (the MIMIQ paper §5) assumes the attacker cannot
//! reassemble a client's trace. This attacker tests that assumption with the most direct clue a
//! hop leaves on the wire: a new address starts talking just as an old one goes quiet, and
//! carries traffic at a similar rate. [`link`] predicts (predecessor, successor) pairs from
//! those two clues alone; [`score`] compares them with the ground truth.

use std::collections::BTreeSet;

/// Weight of the volume term against the timing term in a candidate's score: a factor of `e`
/// between the two flows' byte rates costs as much as 5% of the timing window, so timing
/// dominates and volume breaks near-ties.
pub const VOLUME_WEIGHT: f64 = 0.05;
/// Floor on a flow's duration when computing its byte rate, in seconds (a one-packet flow
/// has no duration).
const MIN_DURATION: f64 = 1e-3;

/// What the attacker sees of one sub-flow (the traffic of one client address).
#[derive(Clone, Debug)]
pub struct SubFlow {
    /// Time of the first packet, in seconds.
    pub first: f64,
    /// Time of the last packet, in seconds (`first <= last`).
    pub last: f64,
    /// Packets seen.
    pub packets: u64,
    /// Bytes seen.
    pub bytes: u64,
}

impl SubFlow {
    /// The logarithm of one plus the byte rate (bytes per second, the duration floored at
    /// 1 ms).
    fn log_rate(&self) -> f64 {
        let duration = (self.last - self.first).max(MIN_DURATION);
        (self.bytes as f64 / duration).ln_1p()
    }
}

/// Predicted links `(predecessor, successor)` between `flows`, sorted.
///
/// `b` may follow `a` when `b` starts strictly after `a` starts and `b.first` lies within
/// `[a.last - max_gap, a.last + max_gap]`: up to `max_gap` of silence between them, or up to as
/// much overlap (packets in flight still reach the old address after a hop). A candidate's
/// score is `|b.first - a.last| / max_gap` plus [`VOLUME_WEIGHT`] times the difference of the
/// flows' log byte rates; candidates are accepted greedily, lowest score first, while each flow
/// has at most one successor and one predecessor. Links point forward in time, so there are no
/// cycles. No links when `max_gap` is not a positive finite number; flows with non-finite times
/// are never linked.
pub fn link(flows: &[SubFlow], max_gap: f64) -> Vec<(usize, usize)> {
    if !(max_gap.is_finite() && max_gap > 0.0) {
        return Vec::new();
    }
    let mut by_start: Vec<usize> = (0..flows.len())
        .filter(|&i| flows[i].first.is_finite() && flows[i].last.is_finite())
        .collect();
    by_start.sort_by(|&a, &b| flows[a].first.total_cmp(&flows[b].first));

    let mut candidates: Vec<(f64, usize, usize)> = Vec::new();
    for &a in &by_start {
        let (fa, lo, hi) = (&flows[a], flows[a].last - max_gap, flows[a].last + max_gap);
        let from = by_start.partition_point(|&b| flows[b].first < lo);
        for &b in by_start[from..]
            .iter()
            .take_while(|&&b| flows[b].first <= hi)
        {
            let fb = &flows[b];
            if fb.first > fa.first {
                let timing = (fb.first - fa.last).abs() / max_gap;
                let volume = (fa.log_rate() - fb.log_rate()).abs();
                candidates.push((timing + VOLUME_WEIGHT * volume, a, b));
            }
        }
    }
    candidates.sort_by(|x, y| x.0.total_cmp(&y.0).then((x.1, x.2).cmp(&(y.1, y.2))));

    let mut has_successor = vec![false; flows.len()];
    let mut has_predecessor = vec![false; flows.len()];
    let mut links = Vec::new();
    for (_, a, b) in candidates {
        if !has_successor[a] && !has_predecessor[b] {
            has_successor[a] = true;
            has_predecessor[b] = true;
            links.push((a, b));
        }
    }
    links.sort_unstable();
    links
}

/// How well predicted links match the ground truth.
#[derive(Clone, Debug, PartialEq)]
pub struct LinkScore {
    /// Distinct links predicted.
    pub predicted: usize,
    /// Predicted links that are true links.
    pub correct: usize,
    /// True links: per client, each flow and the client's next flow by start time.
    pub true_links: usize,
    /// `correct / predicted`; 0 when nothing is predicted.
    pub precision: f64,
    /// `correct / true_links`; 0 when there are no true links.
    pub recall: f64,
}

/// Scores `links` against the true links of `flows`, where `owner[i]` is the client of
/// `flows[i]`.
///
/// The true links are, per client, consecutive flows ordered by `first` (ties by index).
/// Duplicate predicted links count once. A link naming a flow without an owner (an index past
/// `flows` or `owner`) counts as predicted and wrong; flows past the end of `owner` have no
/// true links.
pub fn score(flows: &[SubFlow], owner: &[u32], links: &[(usize, usize)]) -> LinkScore {
    let known = flows.len().min(owner.len());
    let mut order: Vec<usize> = (0..known).collect();
    order.sort_by(|&a, &b| {
        owner[a]
            .cmp(&owner[b])
            .then(flows[a].first.total_cmp(&flows[b].first))
            .then(a.cmp(&b))
    });
    let truth: BTreeSet<(usize, usize)> = order
        .windows(2)
        .filter(|w| owner[w[0]] == owner[w[1]])
        .map(|w| (w[0], w[1]))
        .collect();

    let predicted: BTreeSet<(usize, usize)> = links.iter().copied().collect();
    let correct = predicted.intersection(&truth).count();
    let ratio = |n: usize, d: usize| if d == 0 { 0.0 } else { n as f64 / d as f64 };
    LinkScore {
        predicted: predicted.len(),
        correct,
        true_links: truth.len(),
        precision: ratio(correct, predicted.len()),
        recall: ratio(correct, truth.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mimiq_agent::rng::HopRng;

    fn flow(first: f64, last: f64, bytes: u64) -> SubFlow {
        SubFlow {
            first,
            last,
            packets: bytes / 1000 + 1,
            bytes,
        }
    }

    #[test]
    fn cleanly_alternating_clients_are_linked_exactly() {
        // Client 0 hops every second, client 1 every second half a second later; each new
        // address starts 10 ms after the old one's last packet.
        let mut flows = Vec::new();
        let mut owner = Vec::new();
        for k in 0..10 {
            for client in 0..2u32 {
                let start = f64::from(k) + 0.5 * f64::from(client);
                flows.push(flow(
                    start + 0.01,
                    start + 1.0,
                    50_000 * u64::from(client + 1),
                ));
                owner.push(client);
            }
        }
        let links = link(&flows, 0.2);
        let s = score(&flows, &owner, &links);
        assert_eq!(s.true_links, 18);
        assert_eq!((s.predicted, s.correct), (18, 18), "{links:?}");
        assert_eq!((s.precision, s.recall), (1.0, 1.0));
    }

    #[test]
    fn overlapping_hops_are_linked() {
        // The new address starts 50 ms before the old one's last packet.
        let flows = vec![
            flow(0.0, 1.0, 9_000),
            flow(0.95, 2.0, 9_000),
            flow(1.95, 3.0, 9_000),
        ];
        assert_eq!(link(&flows, 0.1), [(0, 1), (1, 2)]);
    }

    #[test]
    fn links_respect_degrees_and_direction() {
        let mut rng = HopRng::new(3);
        let flows: Vec<SubFlow> = (0..300)
            .map(|_| {
                let first = 20.0 * rng.unit();
                flow(first, first + rng.unit(), rng.range_inclusive(100, 100_000))
            })
            .collect();
        let links = link(&flows, 0.3);
        let mut successors = BTreeSet::new();
        let mut predecessors = BTreeSet::new();
        for &(a, b) in &links {
            assert!(
                flows[b].first > flows[a].first,
                "links point forward in time"
            );
            assert!(successors.insert(a) && predecessors.insert(b), "{a} -> {b}");
        }
    }

    #[test]
    fn random_timing_defeats_the_attacker() {
        // 20 clients over the same 10 s, each with 10 flows of random lengths and gaps.
        let mut rng = HopRng::new(11);
        let mut flows = Vec::new();
        let mut owner = Vec::new();
        for client in 0..20u32 {
            let mut t = rng.unit();
            for _ in 0..10 {
                let first = t + 0.3 * rng.unit();
                let last = first + 0.2 + 0.6 * rng.unit();
                flows.push(flow(first, last, rng.range_inclusive(1_000, 200_000)));
                owner.push(client);
                t = last;
            }
        }
        let s = score(&flows, &owner, &link(&flows, 0.3));
        assert_eq!(s.true_links, 180);
        assert!(s.precision < 0.5 && s.recall < 0.5, "{s:?}");
    }

    #[test]
    fn empty_and_odd_input_give_zeros() {
        let zero = LinkScore {
            predicted: 0,
            correct: 0,
            true_links: 0,
            precision: 0.0,
            recall: 0.0,
        };
        assert!(link(&[], 1.0).is_empty());
        assert_eq!(score(&[], &[], &[]), zero);
        let flows = vec![flow(0.0, 1.0, 10), flow(1.0, 2.0, 10)];
        assert!(link(&flows, 0.0).is_empty());
        assert!(link(&flows, f64::NAN).is_empty());
        assert!(link(&[flow(f64::NAN, 1.0, 1), flow(1.0, 2.0, 1)], 1.0).is_empty());
        // Out-of-range links and a short owner list do not panic.
        let s = score(&flows, &[0], &[(0, 1), (5, 9)]);
        assert_eq!((s.predicted, s.correct, s.true_links), (2, 0, 0));
    }
}
