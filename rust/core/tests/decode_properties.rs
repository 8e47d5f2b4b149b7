//! Property tests of streaming decode (docs/architecture.md §5): sequences fed token by token
//! through `DecodeBatch`, checked against the state machine of the spec, the budget, the
//! cross-fade formula and the prefill difficulty. Bad steps and setups are in decode_errors.rs;
//! prefill is in plan_properties.rs.

mod common;

use chunkwise_core::decode::DecodeBatch;
use chunkwise_core::difficulty::SignalArrays;
use chunkwise_core::SchedulerConfig;
use common::decode_gen::{config, pt, streams, Out, Streams};
use common::reference::check_ramp_token;
use common::{budget_rung, equal_scales};
use proptest::prelude::*;

/// Checks one sequence's step outputs against §5 (and the §4 ramp formula).
fn check_sequence(
    cfg: &SchedulerConfig,
    th: &[f64],
    steps: &[Out],
    s: usize,
) -> Result<(), TestCaseError> {
    let h = budget_rung(cfg);
    let (min, max, hy, g) = (cfg.min_len, cfg.max_len, cfg.hysteresis, cfg.granularity);
    let equal_scales = equal_scales(cfg);
    let (mut k, mut len, mut high) = (0usize, 0usize, 0usize);
    let (mut prev_rank, mut ramp_from) = (None::<i32>, None::<i32>);
    for (t, o) in steps.iter().enumerate() {
        let (d, r, new) = (o.difficulty[s] as f64, o.rung[s] as usize, o.new_chunk[s]);
        prop_assert!(r < cfg.n_rungs());
        let up = th.iter().filter(|&&x| d > x + hy).count();
        let down = th.iter().filter(|&&x| d > x - hy).count();
        if t == 0 {
            prop_assert!(new, "the first token starts a chunk");
        } else if new {
            prop_assert!(
                len >= min && len <= max && len % g == 0,
                "step {}: chunk of {} closed",
                t,
                len
            );
        } else {
            prop_assert_eq!(r, k, "step {}: rung changed inside a chunk", t);
            prop_assert!(
                len < min || len % g != 0 || (up <= k && down >= k && len < max),
                "step {}: should close",
                t
            );
        }
        if new {
            // The rung the state machine wants, then the budget on high rungs.
            let want = if t == 0 {
                th.iter().filter(|&&x| d > x).count()
            } else if up > k {
                up
            } else if down < k {
                down
            } else {
                prop_assert_eq!(len, max, "step {}: no reason to close", t);
                k
            };
            let room = (high + max) as f64 <= cfg.budget_share * (t + max) as f64;
            let want = if want >= h && cfg.budget_share < 1.0 && !room {
                h - 1
            } else {
                want
            };
            prop_assert_eq!(
                r,
                want,
                "step {}: d={} k={} up={} down={}",
                t,
                d,
                k,
                up,
                down
            );
            if t > 0 && r > k && cfg.budget_share >= 1.0 {
                prop_assert!(
                    th[..r].iter().all(|&x| d > x + hy),
                    "went up without margin"
                );
            }
            if t > 0 && r < k && cfg.budget_share >= 1.0 {
                prop_assert!(
                    th[r..].iter().all(|&x| d <= x - hy),
                    "went down without margin"
                );
            }
            let rank = cfg.rungs[r] as i32;
            ramp_from = prev_rank.filter(|&p| p != rank);
            len = 0;
        }
        k = r;
        len += 1;
        high += usize::from(r >= h);
        if cfg.budget_share < 1.0 {
            prop_assert!(
                high as f64 <= cfg.budget_share * (t + 1) as f64 + 1e-9,
                "step {}: over budget",
                t
            );
        }
        // Gates: the prefill cross-fade, counted from the chunk start.
        let b = cfg.rungs[r] as i32;
        let (rank, lo, glo, ghi) = (o.rank[s], o.lo[s], o.gate_lo[s], o.gate_hi[s]);
        prop_assert!(lo <= rank);
        prop_assert_eq!(o.scale[s], cfg.scale_of_rank(rank as u32) as f32);
        if equal_scales {
            prop_assert!((0.0..=1.0).contains(&glo) && (0.0..=1.0).contains(&ghi));
        }
        let i = len - 1;
        match ramp_from {
            Some(a) if i < cfg.crossfade => {
                check_ramp_token(cfg, (a, b, i), (rank, lo, glo, ghi), &format!("step {t}"))?;
            }
            _ => prop_assert_eq!((rank, lo, glo, ghi), (b, b, 1.0, 1.0), "step {}", t),
        }
        prev_rank = Some(b);
    }
    Ok(())
}

proptest! {
    #![proptest_config(pt(384))]

    #[test]
    fn decode_follows_the_state_machine(cfg in config(), st in streams(), plan_th in any::<bool>()) {
        let planner = st.planner(&cfg);
        let plan = st.prefill(&planner);
        let th = if plan_th { plan.thresholds.clone() } else { cfg.thresholds.clone() };
        let steps = st.decode(&planner, Some(th.clone()));
        for s in 0..st.b {
            // Same DifficultyState code: decode difficulty == prefill difficulty, bit for bit.
            let got: Vec<f32> = steps.iter().map(|o| o.difficulty[s]).collect();
            prop_assert_eq!(&got[..], &plan.difficulty[s * st.t..(s + 1) * st.t]);
            check_sequence(&cfg, &th, &steps, s)?;
        }
    }

    #[test]
    fn decode_sequences_are_independent(cfg in config(), st in streams()) {
        let planner = st.planner(&cfg);
        let batch = st.decode(&planner, None);
        for s in 0..st.b {
            let cut = |a: &Option<Vec<f32>>| a.as_ref().map(|v| v[s * st.t..(s + 1) * st.t].to_vec());
            let one = Streams {
                b: 1,
                ids: st.ids[s * st.t..(s + 1) * st.t].to_vec(),
                entropy: cut(&st.entropy),
                surprisal: cut(&st.surprisal),
                probe: cut(&st.probe),
                ..st.clone()
            };
            for (x, y) in batch.iter().zip(one.decode(&planner, None)) {
                prop_assert_eq!(
                    (x.rank[s], x.lo[s], x.gate_lo[s], x.gate_hi[s], x.rung[s], x.difficulty[s]),
                    (y.rank[0], y.lo[0], y.gate_lo[0], y.gate_hi[0], y.rung[0], y.difficulty[0])
                );
            }
        }
    }

    #[test]
    fn reset_starts_a_fresh_sequence(cfg in config(), st in streams(), at in 0usize..200) {
        // Ids only (no caller signals). Slot `slot` is reset at step `at`: from then on it must
        // match a fresh decoder fed the same tokens, and the other slots must not notice.
        let planner = st.planner(&cfg);
        let at = at % st.t;
        let new = || DecodeBatch::new(&planner, st.b, None).unwrap();
        let (mut dec, mut fresh, mut whole) = (new(), new(), new());
        let (mut out, mut out_fresh, mut out_whole) = (Out::new(st.b), Out::new(st.b), Out::new(st.b));
        let slot = st.b - 1;
        let key = |o: &Out, s: usize| (o.rank[s], o.lo[s], o.rung[s], o.gate_hi[s], o.difficulty[s]);
        for step in 0..st.t {
            if step == at {
                dec.reset(&planner, slot).unwrap();
                prop_assert_eq!(dec.seq(slot).unwrap().counts(), (0, 0));
            }
            let ids = st.col(&st.ids, step);
            out.step(&mut dec, &planner, &ids, SignalArrays::default()).unwrap();
            out_whole.step(&mut whole, &planner, &ids, SignalArrays::default()).unwrap();
            for s in 0..slot {
                prop_assert_eq!(key(&out, s), key(&out_whole, s));
            }
            if step >= at {
                out_fresh.step(&mut fresh, &planner, &ids, SignalArrays::default()).unwrap();
                prop_assert_eq!(key(&out, slot), key(&out_fresh, slot), "step {}", step);
            }
        }
    }
}
