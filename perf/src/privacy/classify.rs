//! Closed-world website fingerprinting: how often a random forest names the site a sub-flow
//! came from, estimated by stratified k-fold cross-validation.
//!
//! The classifier is smartcore's random forest, as in k-FP (Hayes and Danezis,
//! k-fingerprinting, USENIX Security 2016), with `sqrt(features)` candidate features per split
//! and fully grown trees. Every random choice (the folds, the forest's bootstrap samples and
//! feature draws) comes from the `seed`, so a run repeats exactly on one platform.
//!
//! Cost: smartcore grows each tree in time roughly quadratic in the training samples; in a
//! release build, 100 sites × 20 visits with 100 trees and 5 folds takes about 9 s on one core.

use std::collections::BTreeMap;

use smartcore::ensemble::random_forest_classifier::{
    RandomForestClassifier, RandomForestClassifierParameters,
};
use smartcore::linalg::basic::matrix::DenseMatrix;

use mimiq_agent::rng::HopRng;

/// The result of a cross-validation.
#[derive(Clone, Debug, PartialEq)]
pub struct Accuracy {
    /// Correct predictions over all held-out samples.
    pub accuracy: f64,
    /// Accuracy within each fold, in fold order.
    pub folds: Vec<f64>,
    /// Number of samples.
    pub samples: usize,
    /// Number of distinct classes.
    pub classes: usize,
    /// The accuracy of guessing: `1 / classes`.
    pub chance: f64,
}

/// Stratified `folds`-fold cross-validated accuracy of a random forest of `trees` trees on
/// feature rows `x` labelled `y`.
///
/// Each class's samples are shuffled by `seed` and dealt round-robin to the folds (one deal
/// continuing across classes, so folds differ in size by at most one); a class with fewer
/// samples than folds is simply missing from some folds. Each fold is predicted by a forest
/// trained on the others. Errors: empty input, `x` and `y` of different lengths, rows of
/// different or zero length, non-finite values, fewer than 2 classes, `folds < 2`, fewer
/// samples than `folds`, `trees == 0`.
pub fn cross_validate(
    x: &[Vec<f64>],
    y: &[u32],
    folds: usize,
    trees: u16,
    seed: u64,
) -> Result<Accuracy, String> {
    check_samples(x, y, "samples")?;
    let mut by_class: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    for (i, &label) in y.iter().enumerate() {
        by_class.entry(label).or_default().push(i);
    }
    if by_class.len() < 2 {
        return Err(format!("need at least 2 classes, got {}", by_class.len()));
    }
    if folds < 2 {
        return Err(format!("need at least 2 folds, got {folds}"));
    }
    if x.len() < folds {
        return Err(format!("{} samples cannot fill {folds} folds", x.len()));
    }
    if trees == 0 {
        return Err("need at least 1 tree".into());
    }

    let mut rng = HopRng::new(seed);
    let mut fold_of = vec![0usize; x.len()];
    let mut dealt = 0usize;
    for members in by_class.values_mut() {
        shuffle(members, &mut rng);
        for &i in members.iter() {
            fold_of[i] = dealt % folds;
            dealt += 1;
        }
    }

    let mut per_fold = Vec::with_capacity(folds);
    let mut correct = 0usize;
    for fold in 0..folds {
        let (test, train): (Vec<usize>, Vec<usize>) =
            (0..x.len()).partition(|&i| fold_of[i] == fold);
        let pick_x = |idx: &[usize]| idx.iter().map(|&i| x[i].clone()).collect::<Vec<_>>();
        let pick_y = |idx: &[usize]| idx.iter().map(|&i| y[i]).collect::<Vec<_>>();
        // Each fold's forest gets its own seed from the same generator.
        let forest_seed = rng.next_u64();
        let predicted = predict(
            &pick_x(&train),
            &pick_y(&train),
            &pick_x(&test),
            trees,
            forest_seed,
        )?;
        let hits = hits(&predicted, &pick_y(&test));
        correct += hits;
        per_fold.push(hits as f64 / test.len() as f64);
    }

    Ok(Accuracy {
        accuracy: correct as f64 / x.len() as f64,
        folds: per_fold,
        samples: x.len(),
        classes: by_class.len(),
        chance: 1.0 / by_class.len() as f64,
    })
}

/// Checks that `x` and `y` are non-empty, of one length, and that `x` is a finite matrix with
/// at least one column; `what` names the set in the messages.
fn check_samples(x: &[Vec<f64>], y: &[u32], what: &str) -> Result<(), String> {
    if x.is_empty() {
        return Err(format!("no {what}"));
    }
    if x.len() != y.len() {
        return Err(format!("{} {what} but {} labels", x.len(), y.len()));
    }
    let width = x[0].len();
    if width == 0 {
        return Err(format!("{what} have no features"));
    }
    for (i, row) in x.iter().enumerate() {
        if row.len() != width {
            return Err(format!(
                "{what}: row {i} has {} features, row 0 has {width}",
                row.len()
            ));
        }
        if let Some(j) = row.iter().position(|v| !v.is_finite()) {
            return Err(format!("{what}: row {i} feature {j} is not finite"));
        }
    }
    Ok(())
}

/// Predicted labels of `test_x` by a forest trained on `train_x`/`train_y` (checked by the
/// callers: non-empty, rectangular, finite, same width).
fn predict(
    train_x: &[Vec<f64>],
    train_y: &[u32],
    test_x: &[Vec<f64>],
    trees: u16,
    seed: u64,
) -> Result<Vec<u32>, String> {
    // smartcore's trees refuse a single class; the only sensible prediction is that class.
    if let Some(&only) = train_y.first() {
        if train_y.iter().all(|&label| label == only) {
            return Ok(vec![only; test_x.len()]);
        }
    }
    let matrix = |rows: &[Vec<f64>]| {
        DenseMatrix::from_2d_vec(&rows.to_vec())
            .map_err(|e| format!("building the feature matrix: {e}"))
    };
    let params = RandomForestClassifierParameters::default()
        .with_n_trees(trees)
        .with_seed(seed);
    let forest = RandomForestClassifier::fit(&matrix(train_x)?, &train_y.to_vec(), params)
        .map_err(|e| format!("training the random forest: {e}"))?;
    forest
        .predict(&matrix(test_x)?)
        .map_err(|e| format!("predicting with the random forest: {e}"))
}

/// How many of `predicted` equal `truth`, position by position.
fn hits(predicted: &[u32], truth: &[u32]) -> usize {
    predicted.iter().zip(truth).filter(|(p, t)| p == t).count()
}

/// Fisher–Yates shuffle driven by `rng`.
fn shuffle<T>(items: &mut [T], rng: &mut HopRng) {
    for i in (1..items.len()).rev() {
        items.swap(i, rng.index(i + 1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `per_class` samples of each of `classes` classes: 6 features, cluster centres 10 apart
    /// with unit-wide noise when `separated`, else labels independent of the features.
    fn data(
        classes: u32,
        per_class: usize,
        separated: bool,
        seed: u64,
    ) -> (Vec<Vec<f64>>, Vec<u32>) {
        let mut rng = HopRng::new(seed);
        let mut x = Vec::new();
        let mut y = Vec::new();
        for class in 0..classes {
            for _ in 0..per_class {
                let centre = if separated {
                    10.0 * f64::from(class)
                } else {
                    0.0
                };
                x.push((0..6).map(|_| centre + rng.unit()).collect());
                y.push(class);
            }
        }
        (x, y)
    }

    #[test]
    fn separable_clusters_are_classified() {
        let (x, y) = data(3, 20, true, 1);
        let acc = cross_validate(&x, &y, 5, 20, 9).expect("valid input");
        assert!(acc.accuracy >= 0.95, "{acc:?}");
        assert_eq!((acc.samples, acc.classes, acc.folds.len()), (60, 3, 5));
        assert!((acc.chance - 1.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn independent_labels_give_about_chance() {
        let (x, y) = data(2, 100, false, 2);
        let acc = cross_validate(&x, &y, 5, 30, 3).expect("valid input");
        assert!(acc.accuracy <= 0.6, "{acc:?}");
        assert_eq!(acc.chance, 0.5);
    }

    #[test]
    fn the_same_seed_gives_the_same_accuracy() {
        let (x, y) = data(3, 15, false, 4);
        let a = cross_validate(&x, &y, 3, 10, 5).expect("valid input");
        assert_eq!(a, cross_validate(&x, &y, 3, 10, 5).expect("valid input"));
    }

    #[test]
    fn small_classes_and_one_class_training_sets_are_handled() {
        // Class 1 has one sample: the fold holding it trains on class 0 alone.
        let x = vec![vec![0.0], vec![0.1], vec![0.2], vec![5.0]];
        let y = vec![0, 0, 0, 1];
        let acc = cross_validate(&x, &y, 2, 5, 1).expect("valid input");
        assert_eq!(acc.classes, 2);
        assert!(
            acc.accuracy <= 0.75,
            "the lone sample can never be right: {acc:?}"
        );
    }

    #[test]
    fn bad_input_is_an_error() {
        let (x, y) = data(2, 5, true, 6);
        assert!(cross_validate(&[], &[], 2, 5, 0)
            .unwrap_err()
            .contains("no samples"));
        assert!(cross_validate(&x, &y[1..], 2, 5, 0)
            .unwrap_err()
            .contains("labels"));
        let mut ragged = x.clone();
        ragged[3].push(1.0);
        assert!(cross_validate(&ragged, &y, 2, 5, 0)
            .unwrap_err()
            .contains("row 3"));
        let mut nan = x.clone();
        nan[2][1] = f64::NAN;
        assert!(cross_validate(&nan, &y, 2, 5, 0)
            .unwrap_err()
            .contains("not finite"));
        let one_class = vec![0; x.len()];
        assert!(cross_validate(&x, &one_class, 2, 5, 0)
            .unwrap_err()
            .contains("2 classes"));
        assert!(cross_validate(&x, &y, 1, 5, 0)
            .unwrap_err()
            .contains("2 folds"));
        assert!(cross_validate(&x, &y, 11, 5, 0)
            .unwrap_err()
            .contains("cannot fill"));
        assert!(cross_validate(&x, &y, 2, 0, 0)
            .unwrap_err()
            .contains("tree"));
        let empty_rows = vec![Vec::new(); 4];
        assert!(cross_validate(&empty_rows, &[0, 1, 0, 1], 2, 5, 0)
            .unwrap_err()
            .contains("no features"));
    }
}
