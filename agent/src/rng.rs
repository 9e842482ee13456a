//! A small seeded PRNG (SplitMix64) for hop decisions that must be reproducible in experiments.
//!
//! Not a CSPRNG: the addresses themselves are drawn by the allocator's CSPRNG; this generator
//! only decides *when* to hop and *which* of the client's own addresses to use next. A deployed
//! agent seeds it from the OS (the binary's job); an experiment seeds it from its config so a run
//! can be repeated hop for hop. Written here rather than pulled from `rand` so that the sequence
//! for a seed never changes under a dependency upgrade.

/// SplitMix64 (Steele, Lea, Flood 2014; the reference is Vigna's `splitmix64.c`).
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A generator whose whole output is fixed by `seed`.
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// The next 64 uniformly distributed bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A uniform value in `[lo, hi]` (both inclusive), without modulo bias (Lemire's method).
    /// `lo > hi` is a caller bug and swaps nothing: it returns `lo`.
    pub fn range_inclusive(&mut self, lo: u64, hi: u64) -> u64 {
        if lo >= hi {
            return lo;
        }
        let span = hi - lo;
        if span == u64::MAX {
            return self.next_u64();
        }
        let n = span + 1;
        // Widening multiply maps 64 random bits onto [0, n); reject the few low products that
        // would make some values one draw more likely than others.
        let threshold = n.wrapping_neg() % n;
        loop {
            let m = u128::from(self.next_u64()) * u128::from(n);
            // Truncation keeps the low 64 bits, which is the point.
            #[allow(clippy::cast_possible_truncation)]
            let low = m as u64;
            if low >= threshold {
                return lo + (m >> 64) as u64;
            }
        }
    }

    /// A uniform index in `[0, len)`; `len` must be non-zero (callers check), else 0.
    pub fn index(&mut self, len: usize) -> usize {
        if len <= 1 {
            return 0;
        }
        // usize fits in u64 on every supported target, and the result is < len.
        self.range_inclusive(0, (len - 1) as u64) as usize
    }
}

/// Derives an independent seed for stream `stream` of a run seeded with `seed` (one per
/// connection), so adding a connection does not shift the hops of the others.
pub fn derive_seed(seed: u64, stream: u64) -> u64 {
    let mut g = SplitMix64::new(seed ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03));
    g.next_u64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix64_matches_the_reference_sequence() {
        // First outputs of Vigna's splitmix64.c for seed 1234567.
        let mut g = SplitMix64::new(1_234_567);
        assert_eq!(g.next_u64(), 6_457_827_717_110_365_317);
        assert_eq!(g.next_u64(), 3_203_168_211_198_807_973);
        assert_eq!(g.next_u64(), 9_817_491_932_198_370_423);
    }

    #[test]
    fn range_inclusive_stays_in_bounds_and_covers_them() {
        let mut g = SplitMix64::new(7);
        let mut seen = [0u32; 6];
        for _ in 0..6_000 {
            let v = g.range_inclusive(10, 15);
            assert!((10..=15).contains(&v));
            seen[(v - 10) as usize] += 1;
        }
        // Each of 6 values expects 1000 draws; 800 is > 6 standard deviations below.
        assert!(seen.iter().all(|&c| c > 800), "{seen:?}");
    }

    #[test]
    fn range_inclusive_handles_degenerate_and_full_ranges() {
        let mut g = SplitMix64::new(1);
        assert_eq!(g.range_inclusive(5, 5), 5);
        let _ = g.range_inclusive(0, u64::MAX);
        assert_eq!(g.index(0), 0);
        assert_eq!(g.index(1), 0);
    }

    #[test]
    fn derived_seeds_differ_per_stream() {
        assert_ne!(derive_seed(1, 0), derive_seed(1, 1));
        assert_eq!(derive_seed(9, 3), derive_seed(9, 3));
    }
}
