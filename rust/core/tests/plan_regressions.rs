//! Regression tests of the prefill planner: minimal cases of bugs found by the property tests
//! (plan_properties.rs), kept so they stay fixed.

mod common;

use chunkwise_core::{RungMode, SchedulerConfig};
use common::reference::plan_difficulty;

// Regression: θ⁰_j + (D_c − θ⁰_j) can round below D_c in f64, so the largest candidate
// δ = D_c − θ⁰_j need not put every chunk on rung 0; the search now ends on a sentinel
// (largest candidate + 1) that does. Minimal: rungs [0, 8], θ⁰ = [0.5], target 0, one chunk of
// [0.0, 0.0, 0.2] (D = 0.0667) used to get rank 8.
#[test]
fn target_mode_meets_target_despite_rounding() {
    let mut cfg = SchedulerConfig::with_rungs(vec![0, 8]);
    cfg.mode = RungMode::Target(0.0);
    (cfg.min_len, cfg.max_len, cfg.crossfade, cfg.granularity) = (3, 3, 0, 1);
    let plan = plan_difficulty(cfg, &[0.0, 0.0, 0.2]).unwrap();
    assert_eq!(plan.chunk_rank, vec![0], "thresholds {:?}", plan.thresholds);
}

// Regression: a huge chunk_penalty used to overflow the DP's f64 costs to +inf, which read as
// "no feasible split" and produced a chunk longer than max_len. Validation now caps it at 1e12.
#[test]
fn huge_chunk_penalty_is_refused_or_respects_max_len() {
    let mut cfg = SchedulerConfig::with_rungs(vec![0, 8]);
    (cfg.min_len, cfg.max_len, cfg.crossfade, cfg.chunk_penalty) = (1, 1, 0, 1e308);
    cfg.granularity = 1;
    match plan_difficulty(cfg, &[0.5, 0.5]) {
        Err(e) => assert_eq!(e.param(), "chunk_penalty"),
        Ok(plan) => assert_eq!(plan.chunk_offsets, vec![0, 1, 2]),
    }
}
