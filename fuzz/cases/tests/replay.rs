//! Replays every input the fuzz targets keep, through the same functions the targets call:
//! `fuzz/corpus/<target>/` (the seeds of `examples/seeds.rs` and what fuzzing added) and
//! `fuzz/regressions/<target>/` (inputs that once crashed a target, kept when fixed). No
//! fuzzing runs here; `scripts/fuzz` does that.

use std::path::{Path, PathBuf};

use mimiq_fuzz_cases::{run, TARGETS};

fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn every_corpus_and_regression_input_runs_through_its_target() {
    let mut replayed = 0;
    for (name, _) in TARGETS {
        let corpus = files(&fuzz_dir().join("corpus").join(name));
        assert!(
            !corpus.is_empty(),
            "{name}: no seed corpus (examples/seeds.rs)"
        );
        for file in corpus
            .iter()
            .chain(&files(&fuzz_dir().join("regressions").join(name)))
        {
            let data = std::fs::read(file).unwrap();
            assert!(run(name, &data));
            replayed += 1;
        }
    }
    eprintln!("{replayed} inputs replayed");
}

#[test]
fn every_directory_of_inputs_belongs_to_a_target() {
    for kind in ["corpus", "regressions"] {
        for dir in std::fs::read_dir(fuzz_dir().join(kind))
            .into_iter()
            .flatten()
        {
            let name = dir.unwrap().file_name().into_string().unwrap();
            assert!(
                TARGETS.iter().any(|(n, _)| *n == name),
                "fuzz/{kind}/{name}: no such target"
            );
        }
    }
}

#[test]
fn every_target_has_its_libfuzzer_binary() {
    for (name, _) in TARGETS {
        let target = fuzz_dir()
            .join("libfuzzer/fuzz_targets")
            .join(format!("{name}.rs"));
        let text = std::fs::read_to_string(&target)
            .unwrap_or_else(|e| panic!("{}: {e}", target.display()));
        assert!(
            text.contains(&format!("run(\"{name}\"")),
            "{}",
            target.display()
        );
    }
}
