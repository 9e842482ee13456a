//! Tests of the address allocator's output: is it uniform over its range, and can an attacker
//! who has seen the addresses so far predict the next one?
//!
//! A moving-target defence is only as good as the unpredictability of the next address (the
//! MIMIQ paper §5): [`chi_square_uniform`] tests a histogram of allocated addresses against the
//! uniform distribution, and [`next_address_prediction`] plays the simplest predicting attacker.

use std::collections::{BTreeMap, HashMap};

use mimiq_agent::rng::HopRng;

/// Iteration bound for the incomplete gamma function's series and continued fraction.
const MAX_ITERATIONS: usize = 100_000;
/// Relative accuracy at which the series and continued fraction stop.
const EPSILON: f64 = 1e-15;
/// A number near the smallest representable, for the modified Lentz method.
const TINY: f64 = 1e-300;
/// Draws spent on simulating the best-lag hit rate of a uniform allocator (split across
/// repetitions of the whole sequence, at least one and at most [`MAX_REPETITIONS`]).
const SIMULATION_DRAWS: u64 = 1 << 20;
/// Most repetitions averaged for that simulation.
const MAX_REPETITIONS: u64 = 32;
/// Seed of that simulation, so that a report repeats exactly.
const SIMULATION_SEED: u64 = 0x5EED_A110_C000;

/// Pearson's chi-square test of a histogram against the uniform distribution.
#[derive(Clone, Debug, PartialEq)]
pub struct ChiSquare {
    /// `sum((observed - expected)^2 / expected)`.
    pub statistic: f64,
    /// Degrees of freedom: bins − 1.
    pub dof: u32,
    /// Probability of a statistic at least this large from a uniform source.
    pub p_value: f64,
}

/// Chi-square test of `counts` (one bin each) against a uniform distribution with expected
/// count `total / bins` per bin; the p-value is `Q(dof / 2, statistic / 2)` ([`gamma_q`]).
/// Errors: fewer than 2 bins, a total of 0, more than `u32::MAX + 1` bins.
pub fn chi_square_uniform(counts: &[u64]) -> Result<ChiSquare, String> {
    if counts.len() < 2 {
        return Err(format!("need at least 2 bins, got {}", counts.len()));
    }
    let total: f64 = counts.iter().map(|&c| c as f64).sum();
    if total == 0.0 {
        return Err("all bins are empty".into());
    }
    let dof =
        u32::try_from(counts.len() - 1).map_err(|_| format!("too many bins: {}", counts.len()))?;
    let expected = total / counts.len() as f64;
    let statistic = counts
        .iter()
        .map(|&c| (c as f64 - expected).powi(2) / expected)
        .sum::<f64>();
    let p_value = gamma_q(f64::from(dof) / 2.0, statistic / 2.0)?;
    Ok(ChiSquare {
        statistic,
        dof,
        p_value,
    })
}

/// The upper regularized incomplete gamma function `Q(a, x) = Γ(a, x) / Γ(a)`, by its series
/// for `x < a + 1` and its continued fraction otherwise (Press et al., Numerical Recipes,
/// §6.2). Errors: `a` not positive and finite, `x` negative or NaN, or no convergence.
pub fn gamma_q(a: f64, x: f64) -> Result<f64, String> {
    if !(a.is_finite() && a > 0.0) {
        return Err(format!("Q(a, x) needs a positive finite a, got {a}"));
    }
    if x.is_nan() || x < 0.0 {
        return Err(format!("Q(a, x) needs x >= 0, got {x}"));
    }
    if x == 0.0 {
        return Ok(1.0);
    }
    if x.is_infinite() {
        return Ok(0.0);
    }
    // The common factor e^-x x^a / Γ(a).
    let prefactor = (-x + a * x.ln() - ln_gamma(a)).exp();
    let q = if x < a + 1.0 {
        1.0 - prefactor * lower_series(a, x)?
    } else {
        prefactor * upper_fraction(a, x)?
    };
    Ok(q.clamp(0.0, 1.0))
}

/// The series `sum_n x^n / (a (a+1) ... (a+n))`, which times the prefactor is `P(a, x)`.
fn lower_series(a: f64, x: f64) -> Result<f64, String> {
    let mut denominator = a;
    let mut term = 1.0 / a;
    let mut sum = term;
    for _ in 0..MAX_ITERATIONS {
        denominator += 1.0;
        term *= x / denominator;
        sum += term;
        if term.abs() < sum.abs() * EPSILON {
            return Ok(sum);
        }
    }
    Err(format!("the series for P({a}, {x}) did not converge"))
}

/// The continued fraction `1/(x+1-a- 1(1-a)/(x+3-a- 2(2-a)/(x+5-a- ...)))`, which times the
/// prefactor is `Q(a, x)`, by the modified Lentz method.
fn upper_fraction(a: f64, x: f64) -> Result<f64, String> {
    let mut b = x + 1.0 - a;
    let mut c = 1.0 / TINY;
    let mut d = 1.0 / b;
    let mut h = d;
    for i in 1..MAX_ITERATIONS {
        let i = i as f64;
        let an = -i * (i - a);
        b += 2.0;
        d = an * d + b;
        if d.abs() < TINY {
            d = TINY;
        }
        c = b + an / c;
        if c.abs() < TINY {
            c = TINY;
        }
        d = 1.0 / d;
        let delta = d * c;
        h *= delta;
        if (delta - 1.0).abs() < EPSILON {
            return Ok(h);
        }
    }
    Err(format!(
        "the continued fraction for Q({a}, {x}) did not converge"
    ))
}

/// `ln Γ(x)` for `x > 0` by Lanczos' approximation (Press et al., Numerical Recipes, §6.1;
/// error below 2e-10).
fn ln_gamma(x: f64) -> f64 {
    const COEFFICIENTS: [f64; 6] = [
        76.180_091_729_471_46,
        -86.505_320_329_416_77,
        24.014_098_240_830_91,
        -1.231_739_572_450_155,
        0.120_865_097_386_617_9e-2,
        -0.539_523_938_495_3e-5,
    ];
    let tmp = x + 5.5;
    let tmp = tmp - (x + 0.5) * tmp.ln();
    let mut y = x;
    let mut series = 1.000_000_000_190_015;
    for c in COEFFICIENTS {
        y += 1.0;
        series += c / y;
    }
    -tmp + (2.506_628_274_631_000_5 * series / x).ln()
}

/// How well the best constant-stride guess predicts the next address.
#[derive(Clone, Debug, PartialEq)]
pub struct Prediction {
    /// The stride `d` (mod the modulus) that predicted the most transitions; the smallest on
    /// ties.
    pub best_lag: u64,
    /// Transitions `previous -> next` with `next = previous + best_lag (mod modulus)`.
    pub hits: u64,
    /// Transitions: the sequence's length − 1.
    pub trials: u64,
    /// `hits / trials`.
    pub hit_rate: f64,
    /// The hit rate of a blind guess: `1 / modulus`.
    pub chance: f64,
    /// The best-lag hit rate a uniform allocator would show over as many trials (simulated).
    pub expected_best: f64,
}

/// The attacker who predicts each allocated address as the previous one plus a constant stride
/// `d` (mod `modulus`), with the `d` that worked best on `seq` itself (values are taken mod
/// `modulus`).
///
/// Choosing the best of `modulus` strides after the fact inflates the hit rate above `chance`
/// even for a uniform allocator: some stride is always the most frequent by luck. So the
/// result also carries `expected_best`, the same best-stride hit rate averaged over simulated
/// uniform sequences of the same length and modulus (seeded, so it repeats); an allocator
/// leaks when `hit_rate` stands clearly above `expected_best`, not merely above `chance`.
/// Errors: `modulus == 0`, fewer than 2 addresses.
pub fn next_address_prediction(seq: &[u64], modulus: u64) -> Result<Prediction, String> {
    if modulus == 0 {
        return Err("the modulus must be positive".into());
    }
    if seq.len() < 2 {
        return Err(format!("need at least 2 addresses, got {}", seq.len()));
    }
    let mut strides: BTreeMap<u64, u64> = BTreeMap::new();
    for w in seq.windows(2) {
        *strides.entry(stride(w[0], w[1], modulus)).or_default() += 1;
    }
    let (mut best_lag, mut hits) = (0, 0);
    for (&lag, &count) in &strides {
        if count > hits {
            (best_lag, hits) = (lag, count);
        }
    }
    let trials = seq.len() as u64 - 1;
    Ok(Prediction {
        best_lag,
        hits,
        trials,
        hit_rate: hits as f64 / trials as f64,
        chance: 1.0 / modulus as f64,
        expected_best: expected_best_rate(trials, modulus),
    })
}

/// `(to - from) mod modulus`, for any values.
fn stride(from: u64, to: u64, modulus: u64) -> u64 {
    let m = u128::from(modulus);
    let d = (u128::from(to % modulus) + m - u128::from(from % modulus)) % m;
    // d < modulus, so it fits.
    d as u64
}

/// The mean best-stride hit rate of uniform strides: each repetition draws `trials` strides
/// uniformly in `[0, modulus)` and takes the largest count over `trials`.
fn expected_best_rate(trials: u64, modulus: u64) -> f64 {
    let repetitions = (SIMULATION_DRAWS / trials.max(1)).clamp(1, MAX_REPETITIONS);
    let mut rng = HopRng::new(SIMULATION_SEED);
    let mut total = 0.0;
    for _ in 0..repetitions {
        let mut counts: HashMap<u64, u64> = HashMap::new();
        for _ in 0..trials {
            *counts
                .entry(rng.range_inclusive(0, modulus - 1))
                .or_default() += 1;
        }
        let best = counts.values().copied().max().unwrap_or(0);
        total += best as f64 / trials as f64;
    }
    total / repetitions as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tolerance: f64) -> bool {
        (a - b).abs() <= tolerance
    }

    #[test]
    fn gamma_q_matches_known_values() {
        let q = |a, x| gamma_q(a, x).expect("valid arguments");
        assert!(close(q(1.0, 1.0), (-1.0f64).exp(), 1e-9));
        // Q(1, x) = e^-x on both sides of the series/fraction switch.
        assert!(close(q(1.0, 0.5), (-0.5f64).exp(), 1e-9));
        assert!(close(q(1.0, 7.0), (-7.0f64).exp(), 1e-12));
        // Q(1/2, x) = erfc(sqrt x); erfc(1) = 0.157299207050285.
        assert!(close(q(0.5, 1.0), 0.157_299_207_050_285, 1e-9));
        assert_eq!(q(3.0, 0.0), 1.0);
        assert_eq!(q(3.0, f64::INFINITY), 0.0);
        // Chi-square upper tails: dof 10 at 18.307 is the 5% point, dof 1 at 3.841 too.
        assert!(close(q(5.0, 18.307 / 2.0), 0.05, 1e-3));
        assert!(close(q(0.5, 3.841 / 2.0), 0.05, 1e-3));
        // A large a, near its mean.
        assert!(close(q(5_000.0, 5_000.0), 0.5, 0.01));
        assert!(gamma_q(0.0, 1.0).is_err());
        assert!(gamma_q(1.0, -1.0).is_err());
        assert!(gamma_q(1.0, f64::NAN).is_err());
    }

    #[test]
    fn chi_square_tells_uniform_from_skewed() {
        let flat = chi_square_uniform(&[100; 10]).expect("valid histogram");
        assert_eq!((flat.statistic, flat.dof), (0.0, 9));
        assert!(close(flat.p_value, 1.0, 1e-12));
        let skewed = chi_square_uniform(&[1_000, 10, 10, 10]).expect("valid histogram");
        assert!(skewed.p_value < 1e-6, "{skewed:?}");
        // A uniform source's histogram is not rejected.
        let mut rng = HopRng::new(1);
        let mut counts = [0u64; 64];
        for _ in 0..64_000 {
            counts[rng.index(counts.len())] += 1;
        }
        let fair = chi_square_uniform(&counts).expect("valid histogram");
        assert!(fair.p_value > 0.001, "{fair:?}");
    }

    #[test]
    fn chi_square_rejects_degenerate_histograms() {
        assert!(chi_square_uniform(&[]).unwrap_err().contains("2 bins"));
        assert!(chi_square_uniform(&[5]).unwrap_err().contains("2 bins"));
        assert!(chi_square_uniform(&[0, 0, 0])
            .unwrap_err()
            .contains("empty"));
    }

    #[test]
    fn a_sequential_allocator_is_predicted() {
        let seq: Vec<u64> = (0..1_000).map(|i| (7 + i) % 256).collect();
        let p = next_address_prediction(&seq, 256).expect("valid sequence");
        assert_eq!(
            (p.best_lag, p.hits, p.trials, p.hit_rate),
            (1, 999, 999, 1.0)
        );
        assert!(p.expected_best < 0.05, "{p:?}");
        // Strides wrap around the modulus, and values are reduced first.
        let down = next_address_prediction(&[1_005, 4, 3, 2], 1_000).expect("valid sequence");
        assert_eq!((down.best_lag, down.hits), (999, 3));
    }

    #[test]
    fn a_random_allocator_is_predicted_only_by_luck() {
        let mut rng = HopRng::new(2);
        let seq: Vec<u64> = (0..2_000).map(|_| rng.range_inclusive(0, 255)).collect();
        let p = next_address_prediction(&seq, 256).expect("valid sequence");
        assert!(
            p.hit_rate > 1.5 * p.chance,
            "best-of-256 inflates the rate: {p:?}"
        );
        assert!(close(p.hit_rate, p.expected_best, 0.004), "{p:?}");
    }

    #[test]
    fn prediction_rejects_degenerate_input() {
        assert!(next_address_prediction(&[1, 2], 0)
            .unwrap_err()
            .contains("modulus"));
        assert!(next_address_prediction(&[1], 10)
            .unwrap_err()
            .contains("2 addresses"));
        let one = next_address_prediction(&[3, 9, 4], 1).expect("valid sequence");
        assert_eq!(
            (one.best_lag, one.hit_rate, one.chance, one.expected_best),
            (0, 1.0, 1.0, 1.0)
        );
    }
}
