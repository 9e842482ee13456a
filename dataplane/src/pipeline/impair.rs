//! The impair stage: a netem for a machine without netem. Per output port: a fixed delay plus
//! uniform jitter, a loss probability and a rate limit, applied to frames on their way to the TX
//! ring. Experiments (seed 000 Figure 3: RTT 10–50 ms) need it.
//!
//! Sans-IO: time is an argument (`now_ns`, any monotonic origin). Frames wait in a FIFO delay
//! line; jitter never reorders (a frame leaves no earlier than the one before it, as netem does
//! with a rate), and the rate limit spaces departures by each frame's serialisation time. The
//! line is bounded: a frame that finds it full is dropped and counted, so held frames can never
//! exhaust the UMEM. Every frame is accounted for: held, released, or dropped by reason.

use std::collections::VecDeque;

use serde::Deserialize;

/// The impairments of one port.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImpairConfig {
    /// Fixed delay, in microseconds (default 0).
    #[serde(default)]
    pub delay_us: u64,
    /// Uniform jitter added to the delay, 0..=jitter, in microseconds (default 0).
    #[serde(default)]
    pub jitter_us: u64,
    /// Probability that a frame is dropped, 0.0..=1.0 (default 0).
    #[serde(default)]
    pub loss: f64,
    /// Rate limit in bits per second; none when absent.
    #[serde(default)]
    pub rate_bps: Option<u64>,
    /// Frames the delay line holds at most (default 4096).
    #[serde(default = "default_max_held")]
    pub max_held: usize,
    /// Seed of the loss and jitter generator, for repeatable experiments (default 1).
    #[serde(default = "default_seed")]
    pub seed: u64,
}

fn default_max_held() -> usize {
    4096
}

fn default_seed() -> u64 {
    1
}

impl ImpairConfig {
    /// Checks the values.
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.loss) {
            return Err(format!("loss {} must be between 0.0 and 1.0", self.loss));
        }
        if self.rate_bps == Some(0) {
            return Err("rate_bps must be at least 1 (leave it out for no limit)".into());
        }
        if self.max_held == 0 {
            return Err("max_held must be at least 1".into());
        }
        Ok(())
    }
}

/// What happened to a frame offered to the stage.
#[derive(Debug, PartialEq, Eq)]
pub enum Offer<F> {
    /// Held in the delay line.
    Held,
    /// Dropped by the loss probability; the caller frees the frame.
    Lost(F),
    /// The delay line is full; the caller frees the frame.
    Full(F),
}

/// The delay line of one port.
pub struct Impair<F> {
    config: ImpairConfig,
    line: VecDeque<(u64, F)>,
    /// The earliest time the next frame may leave (rate limit and FIFO order).
    next_free_ns: u64,
    rng: u64,
}

impl<F> Impair<F> {
    /// A stage with `config` (validated by the caller).
    pub fn new(config: ImpairConfig) -> Self {
        Impair {
            line: VecDeque::with_capacity(config.max_held.min(1 << 16)),
            next_free_ns: 0,
            // xorshift64* needs a non-zero state.
            rng: config.seed.max(1),
            config,
        }
    }

    /// Offers a frame of `len_bytes` at `now_ns`.
    pub fn offer(&mut self, frame: F, len_bytes: usize, now_ns: u64) -> Offer<F> {
        if self.config.loss > 0.0 && self.uniform() < self.config.loss {
            return Offer::Lost(frame);
        }
        if self.line.len() >= self.config.max_held {
            return Offer::Full(frame);
        }
        let jitter = if self.config.jitter_us > 0 {
            (self.uniform() * (self.config.jitter_us * 1000 + 1) as f64) as u64
        } else {
            0
        };
        let due = (now_ns + self.config.delay_us * 1000 + jitter).max(self.next_free_ns);
        self.next_free_ns = match self.config.rate_bps {
            // Serialisation time of this frame at the rate, in ns.
            Some(bps) => due + (len_bytes as u64 * 8 * 1_000_000_000) / bps,
            None => due,
        };
        self.line.push_back((due, frame));
        Offer::Held
    }

    /// Moves the frames due at `now_ns` to `out`, in order; returns how many.
    pub fn release(&mut self, now_ns: u64, out: &mut Vec<F>) -> usize {
        let mut n = 0;
        while let Some((due, _)) = self.line.front() {
            if *due > now_ns {
                break;
            }
            if let Some((_, frame)) = self.line.pop_front() {
                out.push(frame);
                n += 1;
            }
        }
        n
    }

    /// When the next held frame is due, if any.
    pub fn next_due_ns(&self) -> Option<u64> {
        self.line.front().map(|(due, _)| *due)
    }

    /// Frames held.
    pub fn held(&self) -> usize {
        self.line.len()
    }

    /// Takes every held frame (at shutdown), in order.
    pub fn drain(&mut self) -> impl Iterator<Item = F> + '_ {
        self.line.drain(..).map(|(_, f)| f)
    }

    /// A uniform number in [0, 1) from xorshift64*.
    fn uniform(&mut self) -> f64 {
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        let x = self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d);
        (x >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ImpairConfig {
        ImpairConfig {
            delay_us: 0,
            jitter_us: 0,
            loss: 0.0,
            rate_bps: None,
            max_held: 4096,
            seed: 7,
        }
    }

    const MS: u64 = 1_000_000;

    #[test]
    fn frames_leave_after_the_delay_and_not_before_in_order() {
        let mut s = Impair::new(ImpairConfig {
            delay_us: 10_000,
            ..config()
        });
        for i in 0..5u32 {
            assert_eq!(s.offer(i, 100, u64::from(i) * MS), Offer::Held);
        }
        let mut out = Vec::new();
        assert_eq!(
            s.release(10 * MS - 1, &mut out),
            0,
            "not a nanosecond early"
        );
        assert_eq!(s.release(10 * MS, &mut out), 1);
        assert_eq!(s.release(12 * MS + MS / 2, &mut out), 2);
        assert_eq!(s.next_due_ns(), Some(13 * MS));
        assert_eq!(s.release(100 * MS, &mut out), 2);
        assert_eq!(out, [0, 1, 2, 3, 4]);
        assert_eq!(s.held(), 0);
    }

    #[test]
    fn jitter_stays_within_bounds_and_never_reorders() {
        let mut s = Impair::new(ImpairConfig {
            delay_us: 20_000,
            jitter_us: 5_000,
            ..config()
        });
        for i in 0..10_000u64 {
            s.offer(i, 64, i * 1000);
        }
        let mut last_due = 0;
        let mut spread = (u64::MAX, 0);
        for (i, (due, frame)) in s.line.iter().enumerate() {
            assert_eq!(*frame, i as u64);
            assert!(*due >= last_due, "FIFO");
            last_due = *due;
            let extra = due - (i as u64 * 1000) - 20 * MS;
            spread = (spread.0.min(extra), spread.1.max(extra));
        }
        assert!(spread.1 <= 5 * MS, "jitter ≤ 5 ms: {spread:?}");
        assert!(spread.1 > 4 * MS, "jitter uses its range: {spread:?}");
    }

    #[test]
    fn loss_drops_the_configured_fraction_repeatably() {
        let run = || {
            let mut s = Impair::new(ImpairConfig {
                loss: 0.25,
                ..config()
            });
            (0..100_000u32)
                .filter(|&i| matches!(s.offer(i, 64, 0), Offer::Lost(_)))
                .count()
        };
        let lost = run();
        assert!((24_000..26_000).contains(&lost), "{lost} of 100000 at 25 %");
        assert_eq!(lost, run(), "same seed, same losses");
    }

    #[test]
    fn the_rate_limit_spaces_frames_by_their_serialisation_time() {
        // 1500 bytes at 12 Mbit/s = 1 ms each.
        let mut s = Impair::new(ImpairConfig {
            rate_bps: Some(12_000_000),
            ..config()
        });
        for i in 0..10u32 {
            s.offer(i, 1500, 0);
        }
        let mut out = Vec::new();
        assert_eq!(s.release(0, &mut out), 1, "the first leaves at once");
        assert_eq!(s.release(5 * MS, &mut out), 5);
        assert_eq!(s.release(9 * MS, &mut out), 4);
    }

    #[test]
    fn a_full_delay_line_drops_and_counts_instead_of_growing() {
        let mut s = Impair::new(ImpairConfig {
            delay_us: 1_000,
            max_held: 3,
            ..config()
        });
        for i in 0..3 {
            assert_eq!(s.offer(i, 64, 0), Offer::Held);
        }
        assert_eq!(s.offer(9, 64, 0), Offer::Full(9));
        assert_eq!(s.drain().collect::<Vec<_>>(), [0, 1, 2]);
    }

    #[test]
    fn invalid_configs_are_refused() {
        assert!(ImpairConfig {
            loss: 1.5,
            ..config()
        }
        .validate()
        .is_err());
        assert!(ImpairConfig {
            rate_bps: Some(0),
            ..config()
        }
        .validate()
        .is_err());
        assert!(ImpairConfig {
            max_held: 0,
            ..config()
        }
        .validate()
        .is_err());
        assert!(config().validate().is_ok());
    }
}
