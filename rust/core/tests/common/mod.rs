//! Test support shared by the integration tests: generators of random batches, configs and
//! decode streams, reference computations of the spec (docs/architecture.md §1–5) and the
//! prefill plan checker. Every test crate compiles this module whole but uses only part of it,
//! hence the `dead_code` allowance below.
#![allow(dead_code)]

pub mod decode_gen;
pub mod ladder_check;
pub mod plan_check;
pub mod plan_gen;
pub mod reference;

use chunkwise_core::signals::RarityTable;
use chunkwise_core::{Planner, SchedulerConfig};
use proptest::prelude::*;
use proptest::test_runner::RngSeed;

/// Fixed seed (reproducible runs) and no regression files written into the repo.
pub fn pt_seeded(cases: u32, seed: u64) -> ProptestConfig {
    // ProptestConfig::default() reads PROPTEST_CASES / PROPTEST_RNG_SEED: set them to explore.
    let env = |k: &str| std::env::var_os(k).is_some();
    let d = ProptestConfig::default();
    ProptestConfig {
        cases: if env("PROPTEST_CASES") {
            d.cases
        } else {
            cases
        },
        rng_seed: if env("PROPTEST_RNG_SEED") {
            d.rng_seed
        } else {
            RngSeed::Fixed(seed)
        },
        failure_persistence: None,
        ..d
    }
}

/// A planner for `cfg`, with a rarity table built from unigram `counts` when given.
pub fn planner_for(cfg: &SchedulerConfig, counts: Option<&[f64]>) -> Planner {
    let table = counts.map(|c| RarityTable::from_counts(c).unwrap());
    Planner::new(cfg.clone(), table).unwrap()
}

/// A strictly increasing ladder from positive increments, starting at 0 when `zero`.
pub fn rungs_from(zero: bool, incs: &[u32]) -> Vec<u32> {
    let mut rungs = vec![if zero { 0 } else { incs[0] }];
    for inc in &incs[1..] {
        rungs.push(rungs[rungs.len() - 1] + inc);
    }
    rungs
}

/// Index of the budget rung (the lowest rung counted against `budget_share`).
pub fn budget_rung(cfg: &SchedulerConfig) -> usize {
    cfg.rungs
        .iter()
        .position(|&r| r == cfg.budget_rank)
        .unwrap()
}

/// All rung scales are equal, so both gates must lie in [0, 1].
pub fn equal_scales(cfg: &SchedulerConfig) -> bool {
    cfg.rung_scales.windows(2).all(|w| w[0] == w[1])
}
