//! Shared by the `fuzz_*` test files: the proptest configuration (bounded,
//! reproducible), the seed corpus under `tests/corpus/<target>/`, and
//! [`inflate`], a reference DEFLATE decoder.
//!
//! Runs are reproducible: the RNG seed is fixed unless `PROPTEST_RNG_SEED` is
//! set, and failures are not persisted (a minimized failing input goes into
//! the corpus by hand instead, see `tests/corpus/README.md`). For a longer
//! local fuzz run: `PROPTEST_CASES=100000 PROPTEST_RNG_SEED=$RANDOM cargo
//! test --release --test fuzz_frame`.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use proptest::test_runner::{Config, RngSeed};

pub mod inflate;

/// The seed used when `PROPTEST_RNG_SEED` is not set.
const SEED: u64 = 0x7269_6e67_6361_7374; // "ringcast"

/// `cases` per property (or `PROPTEST_CASES`), a fixed seed (or
/// `PROPTEST_RNG_SEED`), no failure persistence file.
pub fn config(cases: u32) -> Config {
    let defaults = Config::default();
    Config {
        cases: if std::env::var_os("PROPTEST_CASES").is_some() {
            defaults.cases
        } else {
            cases
        },
        rng_seed: if std::env::var_os("PROPTEST_RNG_SEED").is_some() {
            defaults.rng_seed
        } else {
            RngSeed::Fixed(SEED)
        },
        failure_persistence: None,
        // A failure should be reported in seconds, not after a long shrink.
        max_shrink_iters: 2048,
        ..defaults
    }
}

/// One seed input: its file name and bytes.
#[derive(Debug)]
pub struct Seed {
    pub name: String,
    pub bytes: Vec<u8>,
}

impl Seed {
    /// The expected class: the file name up to its first `-`
    /// (`ok-chromium.http` is `ok`, `1007-bad-utf8.bin` is `1007`).
    pub fn class(&self) -> &str {
        self.name.split('-').next().unwrap_or("")
    }
}

/// Every file in `tests/corpus/<target>/`, sorted by name. Panics when the
/// directory is missing or empty, so a moved corpus cannot pass silently.
pub fn corpus(target: &str) -> Vec<Seed> {
    let dir: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/corpus")
        .join(target);
    let mut seeds: Vec<Seed> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.unwrap().path();
            Seed {
                name: path.file_name().unwrap().to_string_lossy().into_owned(),
                bytes: std::fs::read(&path).unwrap(),
            }
        })
        .collect();
    seeds.sort_by(|a, b| a.name.cmp(&b.name));
    assert!(!seeds.is_empty(), "corpus {} is empty", dir.display());
    seeds
}

/// True when `text` holds no control character (a log line or response
/// body built from it stays one line).
pub fn no_control(text: &str) -> bool {
    !text.chars().any(char::is_control)
}
