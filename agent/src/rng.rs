//! The generator behind every hop decision: *when* a connection hops and *which* of the client's
//! own addresses it moves to (the addresses themselves are drawn by the allocator's CSPRNG).
//!
//! An on-path observer who could predict the next hop could link the old address to the new one
//! by waiting for it (the MIMIQ paper §5 assumes the hop timing is unknown to it), so the stream
//! is ChaCha20 (RFC 8439 §2.3) keyed with 256 bits. A deployed agent draws the key from the OS;
//! an experiment fixes it with a 64-bit `seed` so a run can be repeated hop for hop (the binary
//! warns that such a run is predictable). Connections and purposes get independent streams,
//! derived from the run's key with SHA-256 ([`Seed::derive`]), so adding one does not shift the
//! draws of the others.

use chacha20::rand_core::{Rng, SeedableRng};
use chacha20::ChaCha20Rng;
use ring::digest;

/// The stream of a run's key that picks the next address (the other streams, one per
/// connection, decide when to hop).
pub const ADDRESS_STREAM: u64 = 0x6469_7265_6374;
/// The stream that draws the idle before each hop (`tunnel.hop_idle_max_ms`).
pub const IDLE_STREAM: u64 = 0x6964_6c65;

/// The 256-bit key of a run, or of one of its streams.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Seed([u8; 32]);

impl Seed {
    /// A key from the OS's CSPRNG (a deployed agent's).
    pub fn from_os() -> Result<Self, ring::error::Unspecified> {
        use ring::rand::SecureRandom;
        let mut key = [0u8; 32];
        ring::rand::SystemRandom::new().fill(&mut key)?;
        Ok(Self(key))
    }

    /// An experiment's key: fixed by `seed`, and anyone who knows `seed` predicts every draw.
    pub fn experiment(seed: u64) -> Self {
        Self::digest(b"mimiq experiment seed", &seed.to_le_bytes())
    }

    /// The key of stream `stream` of this run (one per connection or purpose).
    #[must_use]
    pub fn derive(&self, stream: u64) -> Self {
        Self::digest(&self.0, &stream.to_le_bytes())
    }

    fn digest(a: &[u8], b: &[u8]) -> Self {
        let mut ctx = digest::Context::new(&digest::SHA256);
        ctx.update(a);
        ctx.update(b);
        let mut key = [0u8; 32];
        key.copy_from_slice(ctx.finish().as_ref());
        Self(key)
    }
}

impl From<u64> for Seed {
    /// [`Seed::experiment`]: tests and experiments name their runs by a number.
    fn from(seed: u64) -> Self {
        Self::experiment(seed)
    }
}

impl std::fmt::Debug for Seed {
    /// The key itself is never printed (logs are not where an observer should find it).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Seed(..)")
    }
}

/// A ChaCha20 stream with the draws the hop logic needs.
pub struct HopRng(ChaCha20Rng);

impl Clone for HopRng {
    /// The same stream at the same position (ChaCha20Rng carries its state, not `Clone`).
    fn clone(&self) -> Self {
        Self(ChaCha20Rng::deserialize_state(&self.0.serialize_state()))
    }
}

impl std::fmt::Debug for HopRng {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HopRng(..)")
    }
}

impl HopRng {
    /// The stream keyed by `seed`.
    pub fn new(seed: impl Into<Seed>) -> Self {
        Self(ChaCha20Rng::from_seed(seed.into().0))
    }

    /// The next 64 uniformly distributed bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
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

    /// A uniform value in `[0, 1)` (53 bits).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stream_is_chacha20_with_the_rfc_8439_key_stream() {
        // RFC 8439 §A.1, test vector 1: key 0, nonce 0, block counter 0; the key stream
        // starts 76 b8 e0 ad a0 f1 3d 90.
        let mut g = ChaCha20Rng::from_seed([0; 32]);
        assert_eq!(
            g.next_u64().to_le_bytes(),
            [0x76, 0xb8, 0xe0, 0xad, 0xa0, 0xf1, 0x3d, 0x90]
        );
    }

    #[test]
    fn an_experiment_seed_repeats_and_os_keys_do_not() {
        let draws = |s: Seed| {
            let mut g = HopRng::new(s);
            (0..4).map(|_| g.next_u64()).collect::<Vec<_>>()
        };
        assert_eq!(draws(Seed::experiment(9)), draws(Seed::from(9)));
        assert_ne!(draws(Seed::experiment(9)), draws(Seed::experiment(10)));
        let a = Seed::from_os().unwrap();
        let b = Seed::from_os().unwrap();
        assert_ne!(draws(a), draws(b));
        assert_eq!(format!("{a:?}"), "Seed(..)");
    }

    #[test]
    fn range_inclusive_stays_in_bounds_and_covers_them() {
        let mut g = HopRng::new(7);
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
        let mut g = HopRng::new(1);
        assert_eq!(g.range_inclusive(5, 5), 5);
        let _ = g.range_inclusive(0, u64::MAX);
        assert_eq!(g.index(0), 0);
        assert_eq!(g.index(1), 0);
        let u = g.unit();
        assert!((0.0..1.0).contains(&u));
    }

    #[test]
    fn a_clone_continues_the_same_stream() {
        let mut g = HopRng::new(3);
        g.next_u64();
        let mut h = g.clone();
        assert_eq!(g.next_u64(), h.next_u64());
    }

    #[test]
    fn derived_streams_differ_per_stream_and_repeat_per_run() {
        let run = Seed::experiment(1);
        assert_ne!(run.derive(0), run.derive(1));
        assert_ne!(run.derive(0), run);
        assert_eq!(Seed::experiment(9).derive(3), Seed::experiment(9).derive(3));
    }
}
