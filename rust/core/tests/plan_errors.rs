//! Errors of the prefill planner: every bad input or config is an Err naming the parameter,
//! never a panic. The properties of valid plans are in plan_properties.rs.

mod common;

use chunkwise_core::difficulty::SignalArrays;
use chunkwise_core::{PlanInput, Planner, RungMode, SchedulerConfig};
use common::plan_gen::{batch, config, pt, Batch};
use proptest::prelude::*;

/// Corrupts a valid batch in one of several ways; returns the parameter the error must name.
fn corrupt(b: &mut Batch, cfg: &mut SchedulerConfig, kind: u8, pos: usize) -> &'static str {
    let n = b.ids.len();
    let i = pos % n;
    let bad = [f32::NAN, f32::INFINITY, -0.5, 1.5][pos % 4];
    let signal = |b: &mut Batch| b.difficulty = None;
    match kind {
        0 => b.lens.clear(),
        1 => b.lens.insert(pos % (b.lens.len() + 1), 0),
        2 => {
            if pos % 2 == 0 {
                b.ids.push(0);
            } else {
                b.ids.pop();
            }
        }
        3 => b.ids[i] = -1 - (pos as i64 % 1000),
        4 => {
            signal(b);
            b.entropy.get_or_insert_with(|| vec![0.5; n])[i] = bad;
            return "entropy";
        }
        5 => {
            signal(b);
            b.surprisal.get_or_insert_with(|| vec![0.5; n])[i] = bad;
            return "surprisal";
        }
        6 => {
            signal(b);
            b.probe.get_or_insert_with(|| vec![0.5; n])[i] =
                [f32::NAN, f32::INFINITY, -0.5][pos % 3];
            return "probe";
        }
        7 => {
            signal(b);
            let name = ["entropy", "surprisal", "probe"][pos % 3];
            let v = Some(vec![0.5; if pos % 2 == 0 { n + 1 } else { n - 1 }]);
            match pos % 3 {
                0 => b.entropy = v,
                1 => b.surprisal = v,
                _ => b.probe = v,
            }
            return name;
        }
        8 => {
            b.difficulty.get_or_insert_with(|| vec![0.5; n])[i] = bad;
            return "difficulty";
        }
        9 => {
            b.difficulty = Some(vec![0.5; n + 1 + pos % 3]);
            return "difficulty";
        }
        10 => {
            let a = b.adapters.get_or_insert_with(|| vec![0; b.lens.len()]);
            if pos % 2 == 0 {
                a.push(0);
            } else {
                let k = pos % a.len();
                a[k] = -1;
            }
            return "adapters";
        }
        _ => {
            signal(b);
            let vocab = b.counts.get_or_insert_with(|| vec![1.0; 4]).len();
            cfg.weights.rarity = 0.5;
            b.ids[i] = (vocab + pos % 3) as i64;
        }
    }
    "token_ids"
}

proptest! {
    #![proptest_config(pt(256))]

    #[test]
    fn bad_inputs_are_errors_naming_the_parameter(
        mut cfg in config(), mut b in batch(), kind in 0u8..12, pos in 0usize..10_000,
    ) {
        let want = corrupt(&mut b, &mut cfg, kind, pos);
        let got = b.planner(&cfg).plan(&b.input());
        prop_assert_eq!(got.as_ref().err().map(|e| e.param()), Some(want), "{:?}", got.err());
    }
}

#[test]
fn bad_configs_are_errors_naming_the_parameter() {
    let base = SchedulerConfig::with_rungs(vec![0, 4, 8]);
    type Edit = fn(&mut SchedulerConfig);
    let cases: [(&str, Edit); 14] = [
        ("rungs", |c| c.rungs = vec![4]),
        ("rung_scales", |c| c.rung_scales = vec![1.0, f64::NAN, 1.0]),
        ("thresholds", |c| c.thresholds = vec![0.6, 0.3]),
        ("quantiles", |c| c.mode = RungMode::Quantile(vec![0.5, 0.5])),
        ("target_mean_rank", |c| c.mode = RungMode::Target(f64::NAN)),
        ("min_len", |c| c.min_len = 0),
        ("min_len", |c| c.min_len = 12),
        ("granularity", |c| c.granularity = 0),
        ("max_len", |c| c.max_len = 1),
        ("crossfade", |c| c.crossfade = 17),
        ("budget_share", |c| c.budget_share = 1.5),
        ("budget_rank", |c| c.budget_rank = 5),
        ("ema", |c| c.ema = 0.0),
        ("ngram", |c| c.ngram = 0),
    ];
    for (param, edit) in cases {
        let mut c = base.clone();
        edit(&mut c);
        assert_eq!(Planner::new(c, None).unwrap_err().param(), param);
    }
}

// novelty_window is only checked to be >= 1, and Python can pass e.g. 2**62: the old
// NoveltyTracker computed `4 * window` and `u + window` and panicked (overflow in debug, `% 0` in
// release). Kept as a regression test: huge windows must plan, or be a ConfigError.
#[test]
fn huge_novelty_window_is_not_a_panic() {
    for window in [1usize << 62, usize::MAX] {
        let mut cfg = SchedulerConfig::with_rungs(vec![0, 8]);
        cfg.novelty_window = window;
        let ids: Vec<i64> = (0..40).map(|i| i % 3).collect();
        let run = std::panic::catch_unwind(|| {
            let planner = Planner::new(cfg, None)?;
            planner.plan(&PlanInput {
                token_ids: &ids,
                seq_lengths: &[40],
                signals: SignalArrays::default(),
                difficulty: None,
                adapters: None,
            })
        });
        match run {
            Err(_) => panic!("planning with novelty_window = {window} panicked"),
            Ok(Err(e)) => assert_eq!(e.param(), "novelty_window"),
            Ok(Ok(_)) => {}
        }
    }
}
