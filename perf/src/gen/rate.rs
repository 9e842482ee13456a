//! Rate control and frame-size mixes. Sans-IO: time comes in as nanoseconds.

/// How fast the sender sends.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rate {
    /// As fast as the TX ring takes frames.
    Unlimited,
    /// Packets per second.
    Pps(f64),
    /// Bits per second, counting frames with their FCS.
    Bps(f64),
}

/// A token bucket checked once per burst: `refill(now)`, then `take(cost)` per packet.
///
/// Tokens are packets ([`Rate::Pps`]) or bytes ([`Rate::Bps`]). The bucket holds at most
/// `capacity`, which bounds how far the sender catches up after a late wake-up (and so the
/// burstiness of its output) while keeping the average rate exact.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    per_ns: f64,
    tokens: f64,
    capacity: f64,
    last_ns: u64,
    discarded: f64,
}

impl TokenBucket {
    /// A bucket of `per_s` tokens per second holding at most `capacity`, empty at `now_ns`.
    pub fn new(per_s: f64, capacity: f64, now_ns: u64) -> Self {
        TokenBucket {
            per_ns: per_s / 1e9,
            tokens: 0.0,
            capacity,
            last_ns: now_ns,
            discarded: 0.0,
        }
    }

    /// Adds the tokens earned since the last refill.
    #[inline]
    pub fn refill(&mut self, now_ns: u64) {
        let dt = now_ns.saturating_sub(self.last_ns);
        self.last_ns = self.last_ns.max(now_ns);
        let tokens = self.tokens + dt as f64 * self.per_ns;
        self.discarded += (tokens - self.capacity).max(0.0);
        self.tokens = tokens.min(self.capacity);
    }

    /// Tokens earned that did not fit in the bucket: what a sender that was not scheduled (or
    /// had no free frames) for longer than the bucket covers could not send.
    pub fn discarded(&self) -> f64 {
        self.discarded
    }

    /// Takes `cost` tokens if there are that many.
    #[inline]
    pub fn take(&mut self, cost: f64) -> bool {
        if self.tokens >= cost {
            self.tokens -= cost;
            true
        } else {
            false
        }
    }

    /// Nanoseconds until `cost` tokens are there (0 if they are).
    pub fn wait_ns(&self, cost: f64) -> u64 {
        if self.tokens >= cost || self.per_ns <= 0.0 {
            0
        } else {
            ((cost - self.tokens) / self.per_ns).ceil() as u64
        }
    }
}

/// A weighted mix of frame sizes, spread evenly (smooth weighted round robin): `7:4:1` of
/// 64/576/1500 gives a 12-frame pattern in which the large frames are not bunched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SizeMix {
    /// The distinct sizes (bytes with FCS), in the order given.
    pub sizes: Vec<usize>,
    /// The weights, parallel to `sizes`.
    pub weights: Vec<u32>,
    /// Indices into `sizes`, one period of the pattern.
    pub pattern: Vec<u8>,
}

/// Why a size mix was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeMixError {
    /// Not `SIZE[:WEIGHT],...`.
    #[error("bad size mix {0:?}: expected SIZE[:WEIGHT],... e.g. 64:7,576:4,1500:1")]
    Syntax(String),
    /// No sizes, too many, or weights summing to more than the pattern limit.
    #[error("bad size mix {0:?}: 1 to 16 sizes, weights 1..=1000 summing to at most 1000")]
    Limits(String),
}

impl SizeMix {
    /// The standard simple IMIX: 7:4:1 of 64, 576 and 1500-byte frames.
    pub fn imix() -> SizeMix {
        SizeMix::weighted(&[(64, 7), (576, 4), (1500, 1)]).expect("the IMIX is a valid mix")
    }

    /// One size.
    pub fn fixed(size: usize) -> SizeMix {
        SizeMix::weighted(&[(size, 1)]).expect("one size of weight 1 is a valid mix")
    }

    /// Parses `SIZE[:WEIGHT],...` (weight 1 when left out), or `imix`.
    pub fn parse(text: &str) -> Result<SizeMix, SizeMixError> {
        if text.eq_ignore_ascii_case("imix") {
            return Ok(SizeMix::imix());
        }
        let mut pairs = Vec::new();
        for part in text.split(',') {
            let (size, weight) = part.split_once(':').unwrap_or((part, "1"));
            let size = size
                .trim()
                .parse()
                .map_err(|_| SizeMixError::Syntax(text.into()))?;
            let weight = weight
                .trim()
                .parse()
                .map_err(|_| SizeMixError::Syntax(text.into()))?;
            pairs.push((size, weight));
        }
        SizeMix::weighted(&pairs).ok_or_else(|| SizeMixError::Limits(text.into()))
    }

    /// The mix of `(size, weight)` pairs; `None` outside the limits of [`SizeMixError::Limits`].
    pub fn weighted(pairs: &[(usize, u32)]) -> Option<SizeMix> {
        let weights_in_range = pairs.iter().all(|p| (1..=1000).contains(&p.1));
        if pairs.is_empty() || pairs.len() > 16 || !weights_in_range {
            return None;
        }
        // At most 16 weights of at most 1000 each: the sum cannot overflow.
        let total: u32 = pairs.iter().map(|p| p.1).sum();
        if total > 1000 {
            return None;
        }
        let mut current = vec![0i64; pairs.len()];
        let mut pattern = Vec::with_capacity(total as usize);
        for _ in 0..total {
            for (c, p) in current.iter_mut().zip(pairs) {
                *c += i64::from(p.1);
            }
            let (best, _) = current
                .iter()
                .enumerate()
                .max_by_key(|(i, c)| (**c, std::cmp::Reverse(*i)))
                .expect("pairs is not empty");
            current[best] -= i64::from(total);
            pattern.push(best as u8);
        }
        Some(SizeMix {
            sizes: pairs.iter().map(|p| p.0).collect(),
            weights: pairs.iter().map(|p| p.1).collect(),
            pattern,
        })
    }

    /// Mean frame size in bytes.
    pub fn mean(&self) -> f64 {
        let total: u32 = self.weights.iter().sum();
        self.sizes
            .iter()
            .zip(&self.weights)
            .map(|(s, w)| *s as f64 * f64::from(*w))
            .sum::<f64>()
            / f64::from(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_grants_the_configured_rate_and_caps_catch_up() {
        let mut b = TokenBucket::new(1_000_000.0, 64.0, 0); // 1 Mpps
        let mut sent = 0u64;
        // 10 ms in 10 µs steps: 10 000 packets.
        for step in 1..=1000u64 {
            b.refill(step * 10_000);
            while b.take(1.0) {
                sent += 1;
            }
        }
        assert!((9_999..=10_000).contains(&sent), "{sent}");
        // A 1 s stall earns only the capacity.
        b.refill(1_010_000_000);
        let mut burst = 0;
        while b.take(1.0) {
            burst += 1;
        }
        assert_eq!(burst, 64);
        assert_eq!(b.wait_ns(1.0), 1000);
        // The rest of the second is accounted as discarded: earned = sent + held + discarded.
        assert!(
            (b.discarded() + (sent + burst) as f64 - 1_010_000.0).abs() < 2.0,
            "{}",
            b.discarded()
        );
    }

    #[test]
    fn the_imix_pattern_has_the_weights_and_spreads_large_frames() {
        let m = SizeMix::imix();
        assert_eq!(m.pattern.len(), 12);
        for (i, w) in m.weights.iter().enumerate() {
            assert_eq!(
                m.pattern.iter().filter(|&&p| usize::from(p) == i).count(),
                *w as usize
            );
        }
        // No two 576-byte frames in a row.
        assert!(
            m.pattern.windows(2).all(|w| !(w[0] == 1 && w[1] == 1)),
            "{:?}",
            m.pattern
        );
        assert!((m.mean() - (7.0 * 64.0 + 4.0 * 576.0 + 1500.0) / 12.0).abs() < 1e-9);
    }

    #[test]
    fn size_mixes_parse_or_say_why_not() {
        assert_eq!(SizeMix::parse("64").unwrap(), SizeMix::fixed(64));
        assert_eq!(SizeMix::parse("IMIX").unwrap(), SizeMix::imix());
        assert_eq!(
            SizeMix::parse("64:7,576:4,1500:1").unwrap(),
            SizeMix::imix()
        );
        for bad in [
            "",
            "x",
            "64:",
            "64:0",
            "64:2000",
            "-1",
            "64,,128",
            "64:4294967295,64:1",
        ] {
            assert!(SizeMix::parse(bad).is_err(), "{bad:?}");
        }
    }
}
