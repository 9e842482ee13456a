//! The feature vector of one sub-flow, as a website-fingerprinting attacker computes it.
//!
//! Three families, concatenated in this order:
//!
//! - the hand-crafted features of k-FP (Hayes and Danezis, k-fingerprinting, USENIX Security
//!   2016): packet and byte counts, inter-arrival and transmission-time statistics, packet
//!   ordering, the concentration of outgoing packets, the first and last 30 packets, packets
//!   per second, bursts, and packet sizes ([`HAND_CRAFTED`] values);
//! - two sequences of the first [`SEQUENCE`] packets, zero-padded: the directional timing of
//!   Tik-Tok (Rahman et al., Tik-Tok: The Utility of Packet Timing in Website Fingerprinting
//!   Attacks, PETS 2020), each packet's time times its direction's sign, then the packet
//!   sizes times the same sign;
//! - CUMUL (Panchenko et al., Website Fingerprinting at Internet Scale, NDSS 2016): the
//!   cumulative sum of the signed packet sizes, sampled at [`CUMUL`] equidistant points by
//!   linear interpolation (a page's shape of bytes over packets, robust to a lost object).
//!
//! The hand-crafted block, in order (number of values in parentheses): packets in, out, total
//! and the in and out fractions (5); bytes in, out, total (3); duration (1); inter-arrival mean,
//! standard deviation, maximum and quartiles, overall, incoming, outgoing (18); quartiles of
//! the packets' times, overall, incoming, outgoing (12); mean and standard deviation of the
//! positions of outgoing, then incoming packets (4); outgoing packets per chunk of 20 packets:
//! mean, standard deviation, maximum, minimum, then the first 8 chunks (12); incoming and
//! outgoing among the first 30, then the last 30 packets (4); packets per second: mean,
//! standard deviation, maximum, minimum, median (5); bursts (maximal runs in one direction):
//! their number, then for outgoing and incoming bursts their number, mean and maximum length,
//! mean and maximum bytes (11); packet size mean, standard deviation and maximum, overall,
//! incoming, outgoing (9); distinct sizes, overall, incoming, outgoing (3).
//!
//! Directions are signed +1 for [`Dir::Out`] and −1 for [`Dir::In`]. Times are taken relative
//! to the first packet, and packets are expected in capture order. Every value is finite: an
//! empty sub-flow gives all zeros, statistics of an empty set are 0, and a non-finite value
//! (from non-finite input times) is replaced by 0.

/// The direction of a packet on the captured link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// Client to proxy.
    Out,
    /// Proxy to client.
    In,
}

impl Dir {
    /// +1 for [`Dir::Out`], −1 for [`Dir::In`].
    pub fn sign(self) -> f64 {
        match self {
            Dir::Out => 1.0,
            Dir::In => -1.0,
        }
    }
}

/// One captured packet of a sub-flow.
#[derive(Clone, Copy, Debug)]
pub struct Packet {
    /// Capture time in seconds, from any origin (features use times relative to the first
    /// packet).
    pub at: f64,
    /// IP-layer size in bytes.
    pub size: u32,
    /// Direction.
    pub dir: Dir,
}

/// Number of hand-crafted (k-FP) features.
pub const HAND_CRAFTED: usize = 87;
/// Packets in each of the two per-packet sequences (directional timing, signed sizes).
pub const SEQUENCE: usize = 64;
/// Points of the CUMUL curve.
pub const CUMUL: usize = 100;
/// Length of every feature vector.
pub const FEATURES: usize = HAND_CRAFTED + 2 * SEQUENCE + CUMUL;

/// Packets per chunk for the concentration of outgoing packets.
const CHUNK: usize = 20;
/// Leading chunks whose outgoing counts are features of their own.
const LEADING_CHUNKS: usize = 8;
/// Packets at each end of the trace whose directions are counted.
const ENDS: usize = 30;
/// One-second bins for the packets-per-second statistics; later packets fall in the last bin
/// (a page load lasts seconds, so this only bounds the work on odd input).
const MAX_SECONDS: usize = 600;

/// The [`FEATURES`] values of one sub-flow (see the module doc); zeros when `packets` is empty.
pub fn features(packets: &[Packet]) -> Vec<f64> {
    let mut f = Vec::with_capacity(FEATURES);
    let Some(start) = packets.first().map(|p| p.at) else {
        return vec![0.0; FEATURES];
    };
    let times: Vec<f64> = packets.iter().map(|p| p.at - start).collect();
    let of = |dir: Dir| -> Vec<usize> {
        (0..packets.len())
            .filter(|&i| packets[i].dir == dir)
            .collect()
    };
    let (outs, ins) = (of(Dir::Out), of(Dir::In));
    let n = packets.len() as f64;

    // Counts and bytes.
    let bytes = |idx: &[usize]| idx.iter().map(|&i| f64::from(packets[i].size)).sum::<f64>();
    let (bytes_out, bytes_in) = (bytes(&outs), bytes(&ins));
    let (n_out, n_in) = (outs.len() as f64, ins.len() as f64);
    f.extend([n_in, n_out, n, n_in / n, n_out / n]);
    f.extend([bytes_in, bytes_out, bytes_in + bytes_out]);
    let duration = times.last().copied().unwrap_or(0.0);
    f.push(duration);

    // Inter-arrival times, overall and per direction.
    let all: Vec<usize> = (0..packets.len()).collect();
    for idx in [&all, &ins, &outs] {
        let gaps: Vec<f64> = idx.windows(2).map(|w| times[w[1]] - times[w[0]]).collect();
        f.extend(summary(&gaps));
    }

    // Transmission times: quartiles of the packets' times, overall and per direction.
    for idx in [&all, &ins, &outs] {
        let at: Vec<f64> = idx.iter().map(|&i| times[i]).collect();
        f.extend([0.25, 0.5, 0.75, 1.0].map(|q| percentile(&at, q)));
    }

    // Packet ordering: the positions of each direction's packets in the trace.
    for idx in [&outs, &ins] {
        let positions: Vec<f64> = idx.iter().map(|&i| i as f64).collect();
        f.extend([mean(&positions), std_dev(&positions)]);
    }

    // Concentration of outgoing packets in chunks of CHUNK packets.
    let chunks: Vec<f64> = packets
        .chunks(CHUNK)
        .map(|c| c.iter().filter(|p| p.dir == Dir::Out).count() as f64)
        .collect();
    f.extend([mean(&chunks), std_dev(&chunks), max(&chunks), min(&chunks)]);
    f.extend(padded(chunks.iter().copied(), LEADING_CHUNKS));

    // Directions of the first and last ENDS packets.
    let count = |slice: &[Packet], dir: Dir| slice.iter().filter(|p| p.dir == dir).count() as f64;
    let first = &packets[..packets.len().min(ENDS)];
    let last = &packets[packets.len().saturating_sub(ENDS)..];
    f.extend([count(first, Dir::In), count(first, Dir::Out)]);
    f.extend([count(last, Dir::In), count(last, Dir::Out)]);

    // Packets per second.
    let seconds = (duration.max(0.0) as usize).min(MAX_SECONDS - 1) + 1;
    let mut per_second = vec![0.0; seconds];
    for &t in &times {
        per_second[(t.max(0.0) as usize).min(seconds - 1)] += 1.0;
    }
    f.extend([
        mean(&per_second),
        std_dev(&per_second),
        max(&per_second),
        min(&per_second),
        percentile(&per_second, 0.5),
    ]);

    // Bursts: maximal runs of packets in one direction.
    let bursts = bursts(packets);
    f.push(bursts.len() as f64);
    for dir in [Dir::Out, Dir::In] {
        let (lengths, sizes): (Vec<f64>, Vec<f64>) = bursts
            .iter()
            .filter(|b| b.dir == dir)
            .map(|b| (b.packets as f64, b.bytes as f64))
            .unzip();
        f.extend([
            lengths.len() as f64,
            mean(&lengths),
            max(&lengths),
            mean(&sizes),
            max(&sizes),
        ]);
    }

    // Packet sizes, overall and per direction.
    for idx in [&all, &ins, &outs] {
        let sizes: Vec<f64> = idx.iter().map(|&i| f64::from(packets[i].size)).collect();
        f.extend([mean(&sizes), std_dev(&sizes), max(&sizes)]);
    }
    for idx in [&all, &ins, &outs] {
        let mut sizes: Vec<u32> = idx.iter().map(|&i| packets[i].size).collect();
        sizes.sort_unstable();
        sizes.dedup();
        f.push(sizes.len() as f64);
    }
    debug_assert_eq!(f.len(), HAND_CRAFTED);

    // Tik-Tok's directional timing, then signed sizes.
    let head = &packets[..packets.len().min(SEQUENCE)];
    f.extend(padded(
        head.iter().zip(&times).map(|(p, &t)| t * p.dir.sign()),
        SEQUENCE,
    ));
    f.extend(padded(
        head.iter().map(|p| f64::from(p.size) * p.dir.sign()),
        SEQUENCE,
    ));
    f.extend(cumul(packets));

    for v in &mut f {
        if !v.is_finite() {
            *v = 0.0;
        }
    }
    f
}

/// The CUMUL curve: the cumulative signed bytes after each packet (starting from 0 before the
/// first), sampled at [`CUMUL`] equidistant points of the packet index.
fn cumul(packets: &[Packet]) -> Vec<f64> {
    let mut sums = Vec::with_capacity(packets.len() + 1);
    sums.push(0.0);
    for p in packets {
        let last = sums[sums.len() - 1];
        sums.push(last + f64::from(p.size) * p.dir.sign());
    }
    let span = (sums.len() - 1) as f64;
    (0..CUMUL)
        .map(|k| {
            let x = span * k as f64 / (CUMUL - 1) as f64;
            let i = (x.floor() as usize).min(sums.len() - 1);
            let j = (i + 1).min(sums.len() - 1);
            sums[i] + (sums[j] - sums[i]) * (x - i as f64)
        })
        .collect()
}

/// A maximal run of consecutive packets in one direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Burst {
    dir: Dir,
    packets: u64,
    bytes: u64,
}

/// The bursts of `packets`, in order.
fn bursts(packets: &[Packet]) -> Vec<Burst> {
    let mut runs: Vec<Burst> = Vec::new();
    for p in packets {
        match runs.last_mut() {
            Some(run) if run.dir == p.dir => {
                run.packets += 1;
                run.bytes += u64::from(p.size);
            }
            _ => runs.push(Burst {
                dir: p.dir,
                packets: 1,
                bytes: u64::from(p.size),
            }),
        }
    }
    runs
}

/// Mean, standard deviation, maximum and quartiles of `values` (6 values).
fn summary(values: &[f64]) -> [f64; 6] {
    [
        mean(values),
        std_dev(values),
        max(values),
        percentile(values, 0.25),
        percentile(values, 0.5),
        percentile(values, 0.75),
    ]
}

/// The first `len` of `values`, zero-padded to exactly `len`.
fn padded(values: impl Iterator<Item = f64>, len: usize) -> impl Iterator<Item = f64> {
    values.chain(std::iter::repeat(0.0)).take(len)
}

fn mean(values: &[f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.iter().sum::<f64>() / values.len() as f64
}

/// Population standard deviation; 0 for an empty set.
fn std_dev(values: &[f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let m = mean(values);
    (values.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / values.len() as f64).sqrt()
}

fn max(values: &[f64]) -> f64 {
    values.iter().copied().reduce(f64::max).unwrap_or(0.0)
}

fn min(values: &[f64]) -> f64 {
    values.iter().copied().reduce(f64::min).unwrap_or(0.0)
}

/// The nearest-rank `q`-quantile (`q` in `[0, 1]`) of `values`; 0 for an empty set.
fn percentile(values: &[f64], q: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted
        .get(rank.saturating_sub(1).min(sorted.len().saturating_sub(1)))
        .copied()
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(at: f64, size: u32, dir: Dir) -> Packet {
        Packet { at, size, dir }
    }

    /// Out 100, In 1500, In 1500, In 500, Out 80, In 700 at 10 s + 0.1 s steps.
    fn tiny() -> Vec<Packet> {
        [
            (100, Dir::Out),
            (1500, Dir::In),
            (1500, Dir::In),
            (500, Dir::In),
            (80, Dir::Out),
            (700, Dir::In),
        ]
        .iter()
        .enumerate()
        .map(|(i, &(size, dir))| packet(10.0 + 0.1 * i as f64, size, dir))
        .collect()
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn length_is_constant_and_values_finite() {
        for n in [0, 1, 2, 19, 20, 21, 64, 65, 500] {
            let trace: Vec<Packet> = (0..n)
                .map(|i| {
                    let dir = if i % 3 == 0 { Dir::Out } else { Dir::In };
                    packet(i as f64 * 0.37, 40 + i as u32, dir)
                })
                .collect();
            let f = features(&trace);
            assert_eq!(f.len(), FEATURES, "{n} packets");
            assert!(f.iter().all(|v| v.is_finite()), "{n} packets");
        }
    }

    #[test]
    fn empty_gives_zeros() {
        assert_eq!(features(&[]), vec![0.0; FEATURES]);
    }

    #[test]
    fn one_packet_and_odd_times_stay_finite() {
        let f = features(&[packet(5.0, 1200, Dir::In)]);
        assert!(f.iter().all(|v| v.is_finite()));
        assert_eq!(f[..3], [1.0, 0.0, 1.0]);
        let odd = [
            packet(f64::NAN, 1, Dir::Out),
            packet(f64::INFINITY, 2, Dir::In),
            packet(-1e300, 3, Dir::In),
        ];
        let f = features(&odd);
        assert_eq!(f.len(), FEATURES);
        assert!(f.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn a_known_trace_gives_the_expected_counts_bytes_and_bursts() {
        let f = features(&tiny());
        // Counts: in, out, total, fractions.
        assert_eq!(f[..3], [4.0, 2.0, 6.0]);
        assert!(close(f[3], 4.0 / 6.0) && close(f[4], 2.0 / 6.0));
        // Bytes: in, out, total; duration.
        assert_eq!(f[5..8], [4200.0, 180.0, 4380.0]);
        assert!(close(f[8], 0.5));
        // Overall inter-arrival mean and max are the 0.1 s step.
        assert!(close(f[9], 0.1) && close(f[11], 0.1));

        let b = bursts(&tiny());
        let runs: Vec<(Dir, u64, u64)> = b.iter().map(|r| (r.dir, r.packets, r.bytes)).collect();
        assert_eq!(
            runs,
            [
                (Dir::Out, 1, 100),
                (Dir::In, 3, 3500),
                (Dir::Out, 1, 80),
                (Dir::In, 1, 700)
            ]
        );
        // Burst features: total count, then out (count, mean len, max len, mean bytes, max
        // bytes), then in.
        let at = 9 + 18 + 12 + 4 + 4 + LEADING_CHUNKS + 4 + 5;
        assert_eq!(f[at], 4.0);
        assert_eq!(f[at + 1..at + 6], [2.0, 1.0, 1.0, 90.0, 100.0]);
        assert_eq!(f[at + 6..at + 11], [2.0, 2.0, 3.0, 2100.0, 3500.0]);
        // Unique sizes: overall, in, out.
        assert_eq!(f[HAND_CRAFTED - 3..HAND_CRAFTED], [5.0, 3.0, 2.0]);
    }

    #[test]
    fn sequences_are_signed_and_padded() {
        let f = features(&tiny());
        let timing = &f[HAND_CRAFTED..HAND_CRAFTED + SEQUENCE];
        let sizes = &f[HAND_CRAFTED + SEQUENCE..HAND_CRAFTED + 2 * SEQUENCE];
        assert!(close(timing[1], -0.1) && close(timing[4], 0.4));
        assert_eq!(timing[0], 0.0);
        assert!(timing[6..].iter().all(|&v| v == 0.0));
        assert_eq!(sizes[..6], [100.0, -1500.0, -1500.0, -500.0, 80.0, -700.0]);
        assert!(sizes[6..].iter().all(|&v| v == 0.0));
        // CUMUL: from 0 to the trace's net bytes (100 + 80 out, 4200 in), through its points.
        let curve = &f[HAND_CRAFTED + 2 * SEQUENCE..];
        assert_eq!(curve.len(), CUMUL);
        assert_eq!((curve[0], curve[CUMUL - 1]), (0.0, -4020.0));
        assert!(curve.iter().all(|&v| (-4020.0..=100.0).contains(&v)));
    }

    #[test]
    fn outgoing_concentration_and_ends_count_directions() {
        // 45 packets, every third outgoing: chunks of 20, 20 and 5 packets.
        let trace: Vec<Packet> = (0..45)
            .map(|i| {
                let dir = if i % 3 == 0 { Dir::Out } else { Dir::In };
                packet(i as f64 * 0.01, 600, dir)
            })
            .collect();
        let f = features(&trace);
        let at = 9 + 18 + 12 + 4;
        // Outgoing per chunk: 7, 7, 1 (packets 0,3,..,18; 21,..,39; 42).
        assert_eq!(f[at + 2..at + 4], [7.0, 1.0], "max, min");
        assert_eq!(f[at + 4..at + 8], [7.0, 7.0, 1.0, 0.0]);
        let ends = at + 4 + LEADING_CHUNKS;
        assert_eq!(f[ends..ends + 4], [20.0, 10.0, 20.0, 10.0]);
    }

    #[test]
    fn percentile_is_nearest_rank() {
        let v = [4.0, 1.0, 3.0, 2.0];
        assert_eq!(percentile(&v, 0.25), 1.0);
        assert_eq!(percentile(&v, 0.5), 2.0);
        assert_eq!(percentile(&v, 1.0), 4.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }
}
