//! Property tests of the prefill planner against docs/architecture.md §1–4: random ragged
//! batches, random valid configs (all three rung modes, budgets, cross-fades, scales), and
//! independent reference computations of every invariant (common/plan_check.rs,
//! common/ladder_check.rs, common/reference.rs). Bad inputs and configs are in plan_errors.rs,
//! regressions in plan_regressions.rs, decode in decode_properties.rs.

mod common;

use chunkwise_core::{Plan, RungMode};
use common::plan_check::check_plan;
use common::plan_gen::{batch, config, pt};
use common::reference::reference_difficulty;
use proptest::prelude::*;

proptest! {
    #![proptest_config(pt(512))]

    #[test]
    fn plan_satisfies_the_spec(cfg in config(), b in batch()) {
        let plan = b.planner(&cfg).plan(&b.input()).unwrap();
        check_plan(&cfg, &b, &plan)?;
    }

    #[test]
    fn difficulty_matches_the_formulas(cfg in config(), mut b in batch()) {
        b.difficulty = None;
        let plan = b.planner(&cfg).plan(&b.input()).unwrap();
        let want = reference_difficulty(&cfg, &b);
        for (t, (&got, &w)) in plan.difficulty.iter().zip(&want).enumerate() {
            prop_assert!((got as f64 - w).abs() < 1e-5, "token {}: {} vs {}", t, got, w);
        }
    }
}

proptest! {
    #![proptest_config(pt(64))]

    #[test]
    fn plan_is_deterministic_across_calls_and_threads(cfg in config(), b in batch()) {
        let planner = b.planner(&cfg);
        let input = b.input();
        let first = planner.plan(&input).unwrap();
        prop_assert_eq!(&first, &planner.plan(&input).unwrap());
        let (x, y) = std::thread::scope(|s| {
            let h1 = s.spawn(|| planner.plan(&input).unwrap());
            let h2 = s.spawn(|| planner.plan(&input).unwrap());
            (h1.join().unwrap(), h2.join().unwrap())
        });
        prop_assert_eq!(&first, &x);
        prop_assert_eq!(&first, &y);
    }

    #[test]
    fn threshold_batch_equals_sequences_alone(mut cfg in config(), b in batch()) {
        cfg.mode = RungMode::Threshold;
        let whole = b.planner(&cfg).plan(&b.input()).unwrap();
        let mut glued = Plan { seq_offsets: vec![0], chunk_offsets: vec![0], ..Plan::default() };
        glued.segments.offsets.push(0);
        for s in 0..b.lens.len() {
            let one = b.single(s);
            let p = b.planner(&cfg).plan(&one.input()).unwrap();
            let base = *glued.seq_offsets.last().unwrap();
            glued.seq_offsets.push(base + p.seq_offsets[1]);
            glued.difficulty.extend(&p.difficulty);
            glued.chunk_offsets.extend(p.chunk_offsets[1..].iter().map(|o| o + base));
            glued.chunk_seq.extend(p.chunk_seq.iter().map(|_| s as i32));
            glued.chunk_rung.extend(&p.chunk_rung);
            glued.chunk_rank.extend(&p.chunk_rank);
            glued.chunk_difficulty.extend(&p.chunk_difficulty);
            glued.token_rank.extend(&p.token_rank);
            glued.token_lo.extend(&p.token_lo);
            glued.gate_lo.extend(&p.gate_lo);
            glued.gate_hi.extend(&p.gate_hi);
            glued.segments.offsets.extend(p.segments.offsets[1..].iter().map(|o| o + base));
            glued.segments.rank.extend(&p.segments.rank);
            glued.segments.scale.extend(&p.segments.scale);
            glued.segments.adapter.extend(&p.segments.adapter);
            glued.thresholds = p.thresholds;
        }
        prop_assert_eq!(whole, glued);
    }
}
