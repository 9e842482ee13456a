//! A buffered CSPRNG over `ring::rand::SystemRandom`.
//!
//! Every address, lifetime and alias the allocator hands out is drawn from here. `SystemRandom` is
//! the operating system's CSPRNG (getrandom); calling it once per draw would cost a syscall per
//! address, so [`Csprng`] fetches 4 KiB at a time and hands it out in 64-bit words. The output is
//! still the OS CSPRNG's output, used once and never reused, so an observer of past addresses
//! learns nothing about future ones.

use ring::rand::{SecureRandom, SystemRandom};

/// Bytes fetched from the OS per refill.
const BUF_LEN_BYTES: usize = 4096;

/// The entropy source failed (the OS CSPRNG returned an error; on Linux this does not happen once
/// the pool is initialised).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the operating system's random number generator failed")]
pub struct RngError;

/// A buffered cryptographically secure random number generator.
pub struct Csprng {
    sys: SystemRandom,
    buf: Box<[u8; BUF_LEN_BYTES]>,
    pos: usize,
}

impl std::fmt::Debug for Csprng {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Csprng")
    }
}

impl Csprng {
    /// A generator over the OS CSPRNG. Fails only if the OS refuses to give entropy.
    pub fn new() -> Result<Self, RngError> {
        let sys = SystemRandom::new();
        let mut buf = Box::new([0u8; BUF_LEN_BYTES]);
        sys.fill(&mut buf[..]).map_err(|_| RngError)?;
        Ok(Csprng { sys, buf, pos: 0 })
    }

    /// A uniformly random `u64`.
    pub fn next_u64(&mut self) -> u64 {
        if self.pos + 8 > BUF_LEN_BYTES {
            // SystemRandom on Linux is getrandom(2), which does not fail once the kernel's pool
            // is initialised (it was, or `new` would have failed). If it ever did, continuing
            // with stale bytes would make addresses predictable, so stopping is the only safe
            // answer: this is the one documented panic of the crate, and it is not input-driven.
            self.sys
                .fill(&mut self.buf[..])
                .expect("OS CSPRNG failed after initialisation");
            self.pos = 0;
        }
        let mut w = [0u8; 8];
        w.copy_from_slice(&self.buf[self.pos..self.pos + 8]);
        // Overwrite used bytes so that a memory disclosure cannot reveal past draws.
        self.buf[self.pos..self.pos + 8].fill(0);
        self.pos += 8;
        u64::from_le_bytes(w)
    }

    /// A uniformly random `u128`.
    pub fn next_u128(&mut self) -> u128 {
        (u128::from(self.next_u64()) << 64) | u128::from(self.next_u64())
    }

    /// A uniformly random integer in `[0, n)`; `n` must be non-zero (returns 0 for `n == 0`).
    ///
    /// Lemire's multiply-and-reject method: unbiased, and rejects with probability < n / 2^64.
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        // (2^64 - n) mod n: products whose low word falls below it are rejected.
        let threshold = n.wrapping_neg() % n;
        loop {
            let m = u128::from(self.next_u64()) * u128::from(n);
            if (m as u64) >= threshold {
                return (m >> 64) as u64;
            }
        }
    }

    /// A uniformly random integer in `[lo, hi]` (inclusive); returns `lo` if `hi <= lo`.
    pub fn in_range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            return lo;
        }
        match (hi - lo).checked_add(1) {
            Some(span) => lo + self.below(span),
            None => self.next_u64(), // the whole u64 range
        }
    }

    /// Fills `out` with random bytes.
    pub fn fill(&mut self, out: &mut [u8]) {
        for chunk in out.chunks_mut(8) {
            let w = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&w[..chunk.len()]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn below_stays_in_range_and_hits_every_value() {
        let mut rng = Csprng::new().unwrap();
        let mut seen = [0u32; 7];
        for _ in 0..7000 {
            let x = rng.below(7);
            assert!(x < 7);
            seen[x as usize] += 1;
        }
        assert!(seen.iter().all(|&c| c > 700), "{seen:?}");
    }

    #[test]
    fn in_range_is_inclusive() {
        let mut rng = Csprng::new().unwrap();
        let (mut lo, mut hi) = (false, false);
        for _ in 0..1000 {
            let x = rng.in_range(10, 12);
            assert!((10..=12).contains(&x));
            lo |= x == 10;
            hi |= x == 12;
        }
        assert!(lo && hi);
        assert_eq!(rng.in_range(5, 5), 5);
        assert_eq!(rng.in_range(6, 5), 6);
    }

    #[test]
    fn refills_past_the_buffer() {
        let mut rng = Csprng::new().unwrap();
        let words: Vec<u64> = (0..2000).map(|_| rng.next_u64()).collect();
        let distinct: std::collections::HashSet<_> = words.iter().collect();
        assert_eq!(distinct.len(), words.len());
    }
}
