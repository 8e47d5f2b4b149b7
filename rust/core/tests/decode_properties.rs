//! Property tests of streaming decode (docs/architecture.md §5): sequences fed token by token
//! through `DecodeBatch`, checked against the state machine of the spec, the budget, the
//! cross-fade formula and the prefill difficulty. Prefill is in plan_properties.rs.

use chunkwise_core::decode::{DecodeBatch, StepBuffers};
use chunkwise_core::difficulty::SignalArrays;
use chunkwise_core::signals::RarityTable;
use chunkwise_core::{PlanInput, Planner, RungMode, SchedulerConfig};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::RngSeed;

fn pt(cases: u32) -> ProptestConfig {
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
            RngSeed::Fixed(0xdec0_de01)
        },
        failure_persistence: None,
        ..d
    }
}

/// B sequences of equal length T, flattened sequence-major (token t of sequence b at b·T + t).
#[derive(Debug, Clone)]
struct Streams {
    b: usize,
    t: usize,
    ids: Vec<i64>,
    entropy: Option<Vec<f32>>,
    surprisal: Option<Vec<f32>>,
    probe: Option<Vec<f32>>,
    counts: Option<Vec<f64>>,
}

fn streams() -> impl Strategy<Value = Streams> {
    (1usize..=4, prop_oneof![1usize..=200, 1usize..=40]).prop_flat_map(|(b, t)| {
        let n = b * t;
        // Values on a coarse grid half the time, so thresholds and margins are hit exactly.
        let unit = prop_oneof![0.0f32..=1.0, (0u8..=20).prop_map(|k| k as f32 / 20.0)];
        let sig = move || prop::option::of(vec(unit.clone(), n));
        (
            Just((b, t)),
            (1i64..30).prop_flat_map(move |v| (vec(0..v, n), Just(v))),
            (sig(), sig(), prop::option::of(vec(0.0f32..5.0, n))),
            any::<bool>(),
        )
            .prop_map(
                |((b, t), (ids, v), (entropy, surprisal, probe), rare)| Streams {
                    b,
                    t,
                    counts: rare.then(|| (0..v).map(|i| ((i * 37) % 11) as f64).collect()),
                    ids,
                    entropy,
                    surprisal,
                    probe,
                },
            )
    })
}

fn config() -> impl Strategy<Value = SchedulerConfig> {
    (2usize..=6)
        .prop_flat_map(|m| {
            (
                (
                    any::<bool>(),
                    vec(1u32..=16, m),
                    prop::option::of(vec(0.0f64..=2.0, m)),
                ),
                prop::option::of(vec((0u8..=20).prop_map(|k| k as f64 / 20.0), m - 1)),
                (
                    1usize..=12,
                    0usize..=30,
                    0usize..=12,
                    prop_oneof![Just(1usize), Just(2), Just(4)],
                ),
                (
                    prop_oneof![Just(0.0), Just(0.05), 0.0f64..0.3],
                    prop_oneof![2 => Just(1.0), 1 => Just(0.0), 2 => 0.0f64..=1.0],
                    0..m - 1,
                ),
                (0u8..3, 0.0f64..=1.0, prop_oneof![Just(1.0), 0.05f64..=1.0]),
                vec(prop_oneof![Just(0.0), 0.0f64..2.0], 6),
            )
        })
        .prop_map(|((zero, incs, scales), th, lens, misc, mode, w)| {
            let mut rungs = vec![if zero { 0 } else { incs[0] }];
            for inc in &incs[1..] {
                rungs.push(rungs[rungs.len() - 1] + inc);
            }
            let m = rungs.len();
            let mut cfg = SchedulerConfig::with_rungs(rungs.clone());
            if let Some(s) = scales {
                cfg.rung_scales = s;
            }
            if let Some(mut t) = th {
                t.sort_by(f64::total_cmp);
                cfg.thresholds = t;
            }
            let g = lens.3;
            cfg.granularity = g;
            cfg.min_len = lens.0.div_ceil(g) * g;
            cfg.max_len = cfg.min_len + lens.1 / g * g;
            cfg.crossfade = lens.2.min(cfg.min_len);
            (cfg.hysteresis, cfg.budget_share) = (misc.0, misc.1);
            cfg.budget_rank = rungs[1 + misc.2];
            let (lo, hi) = (rungs[0] as f64, rungs[m - 1] as f64);
            cfg.mode = match mode.0 {
                0 => RungMode::Threshold,
                1 => RungMode::Quantile((1..m).map(|j| j as f64 / m as f64).collect()),
                _ => RungMode::Target(lo + mode.1 * (hi - lo)),
            };
            cfg.ema = mode.2;
            let ws = &mut cfg.weights;
            (ws.entropy, ws.surprisal, ws.novelty) = (w[0], w[1], w[2]);
            (ws.rarity, ws.position, ws.probe) = (w[3], w[4].max(0.1), w[5]);
            cfg.validate().unwrap();
            cfg
        })
}

/// Everything `DecodeBatch::step` reports, per step and sequence.
#[derive(Debug, Clone, Default, PartialEq)]
struct Out {
    rank: Vec<i32>,
    lo: Vec<i32>,
    gate_lo: Vec<f32>,
    gate_hi: Vec<f32>,
    scale: Vec<f32>,
    rung: Vec<i32>,
    difficulty: Vec<f32>,
    new_chunk: Vec<bool>,
}

impl Out {
    fn new(b: usize) -> Self {
        Self {
            rank: vec![0; b],
            lo: vec![0; b],
            gate_lo: vec![0.0; b],
            gate_hi: vec![0.0; b],
            scale: vec![0.0; b],
            rung: vec![0; b],
            difficulty: vec![0.0; b],
            new_chunk: vec![false; b],
        }
    }
    fn step(
        &mut self,
        dec: &mut DecodeBatch,
        planner: &Planner,
        ids: &[i64],
        sig: SignalArrays<'_>,
    ) -> chunkwise_core::Result<()> {
        let mut buf = StepBuffers {
            rank: &mut self.rank,
            lo: &mut self.lo,
            gate_lo: &mut self.gate_lo,
            gate_hi: &mut self.gate_hi,
            scale: &mut self.scale,
            rung: &mut self.rung,
            difficulty: &mut self.difficulty,
            new_chunk: &mut self.new_chunk,
        };
        dec.step(planner, ids, sig, &mut buf)
    }
}

impl Streams {
    fn planner(&self, cfg: &SchedulerConfig) -> Planner {
        let table = self
            .counts
            .as_ref()
            .map(|c| RarityTable::from_counts(c).unwrap());
        Planner::new(cfg.clone(), table).unwrap()
    }
    /// Column `step` of an array (one value per sequence).
    fn col<T: Copy>(&self, a: &[T], step: usize) -> Vec<T> {
        (0..self.b).map(|s| a[s * self.t + step]).collect()
    }
    /// Feeds every step through a decoder; returns per-step outputs.
    fn decode(&self, planner: &Planner, th: Option<Vec<f64>>) -> Vec<Out> {
        let mut dec = DecodeBatch::new(planner, self.b, th).unwrap();
        let mut out = Out::new(self.b);
        (0..self.t)
            .map(|step| {
                let col = |a: &Option<Vec<f32>>| a.as_ref().map(|v| self.col(v, step));
                let (e, s, p) = (col(&self.entropy), col(&self.surprisal), col(&self.probe));
                let sig = SignalArrays {
                    entropy: e.as_deref(),
                    surprisal: s.as_deref(),
                    probe: p.as_deref(),
                };
                out.step(&mut dec, planner, &self.col(&self.ids, step), sig)
                    .unwrap();
                out.clone()
            })
            .collect()
    }
    fn prefill(&self, planner: &Planner) -> chunkwise_core::Plan {
        let lens = vec![self.t; self.b];
        planner
            .plan(&PlanInput {
                token_ids: &self.ids,
                seq_lengths: &lens,
                signals: SignalArrays {
                    entropy: self.entropy.as_deref(),
                    surprisal: self.surprisal.as_deref(),
                    probe: self.probe.as_deref(),
                },
                difficulty: None,
                adapters: None,
            })
            .unwrap()
    }
}

/// Checks one sequence's step outputs against §5 (and the §4 ramp formula).
fn check_sequence(
    cfg: &SchedulerConfig,
    th: &[f64],
    steps: &[Out],
    s: usize,
) -> Result<(), TestCaseError> {
    let h = cfg
        .rungs
        .iter()
        .position(|&r| r == cfg.budget_rank)
        .unwrap();
    let (min, max, hy, g) = (cfg.min_len, cfg.max_len, cfg.hysteresis, cfg.granularity);
    let equal_scales = cfg.rung_scales.windows(2).all(|w| w[0] == w[1]);
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
                let al = (i + 1) as f64 / (cfg.crossfade + 1) as f64;
                let sc = |x: i32| cfg.scale_of_rank(x as u32);
                let smax = sc(a.max(b));
                let want_lo = if smax > 0.0 {
                    ((1.0 - al) * sc(a) + al * sc(b)) / smax
                } else {
                    0.0
                };
                let want_hi = if b > a { al } else { 1.0 - al };
                prop_assert_eq!((rank, lo), (a.max(b), a.min(b)), "step {}", t);
                prop_assert!(
                    (glo as f64 - want_lo).abs() <= 1e-6 * want_lo.max(1.0)
                        && (ghi as f64 - want_hi).abs() < 1e-6,
                    "gates {} {} vs {} {}",
                    glo,
                    ghi,
                    want_lo,
                    want_hi
                );
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

// ---------------------------------------------------------------------------------------------
// Errors: an Err naming the parameter, never a panic, and a failed step advances nothing.

proptest! {
    #![proptest_config(pt(128))]

    #[test]
    fn bad_steps_are_errors_and_change_nothing(
        cfg in config(), st in streams(), kind in 0u8..6, pos in 0usize..1000,
    ) {
        let planner = st.planner(&cfg);
        let mut dec = DecodeBatch::new(&planner, st.b, None).unwrap();
        let mut out = Out::new(st.b);
        let half = st.t / 2;
        for step in 0..half {
            out.step(&mut dec, &planner, &st.col(&st.ids, step), SignalArrays::default()).unwrap();
        }
        let before = dec.clone();
        let mut ids = st.col(&st.ids, half.min(st.t - 1));
        let mut sig = vec![0.5f32; st.b];
        let i = pos % st.b;
        let (name, result) = match kind {
            0 => {
                ids.push(1);
                ("token_ids", out.step(&mut dec, &planner, &ids, SignalArrays::default()))
            }
            1 => {
                ids[i] = -1;
                ("token_ids", out.step(&mut dec, &planner, &ids, SignalArrays::default()))
            }
            2 => {
                let table = RarityTable::from_counts(&[1.0, 2.0]).unwrap();
                let mut c2 = cfg.clone();
                c2.weights.rarity = 1.0;
                let p2 = Planner::new(c2, Some(table)).unwrap();
                dec = DecodeBatch::new(&p2, st.b, None).unwrap();
                ids[i] = 2 + pos as i64 % 5;
                ("token_ids", out.step(&mut dec, &p2, &ids, SignalArrays::default()))
            }
            3 => {
                sig[i] = [f32::NAN, f32::INFINITY, -0.1, 1.1][pos % 4];
                let s = SignalArrays { entropy: Some(&sig), ..Default::default() };
                ("entropy", out.step(&mut dec, &planner, &ids, s))
            }
            4 => {
                sig.push(0.5);
                let s = SignalArrays { surprisal: Some(&sig), ..Default::default() };
                ("surprisal", out.step(&mut dec, &planner, &ids, s))
            }
            _ => {
                sig[i] = [f32::NAN, -1.0][pos % 2];
                let s = SignalArrays { probe: Some(&sig), ..Default::default() };
                ("probe", out.step(&mut dec, &planner, &ids, s))
            }
        };
        prop_assert_eq!(result.err().map(|e| e.param()), Some(name));
        if kind != 2 {
            // All or nothing: the rest of the stream decodes as if the bad step never came.
            let mut again = before.clone();
            let mut o2 = Out::new(st.b);
            for step in half..st.t {
                let ids = st.col(&st.ids, step);
                out.step(&mut dec, &planner, &ids, SignalArrays::default()).unwrap();
                o2.step(&mut again, &planner, &ids, SignalArrays::default()).unwrap();
                prop_assert_eq!(&out, &o2);
            }
        }
    }
}

#[test]
fn bad_decoder_setup_is_an_error() {
    let cfg = SchedulerConfig::with_rungs(vec![0, 4, 8]);
    let planner = Planner::new(cfg, None).unwrap();
    let param = |r: chunkwise_core::Result<DecodeBatch>| r.unwrap_err().param();
    assert_eq!(param(DecodeBatch::new(&planner, 0, None)), "batch_size");
    assert_eq!(
        param(DecodeBatch::new(&planner, 2, Some(vec![0.5]))),
        "thresholds"
    );
    assert_eq!(
        param(DecodeBatch::new(&planner, 2, Some(vec![0.5, f64::NAN]))),
        "thresholds"
    );
    assert_eq!(
        param(DecodeBatch::new(&planner, 2, Some(vec![0.6, 0.3]))),
        "thresholds"
    );
    let mut dec = DecodeBatch::new(&planner, 2, None).unwrap();
    assert_eq!(dec.reset(&planner, 2).unwrap_err().param(), "index");
}

// Regression: prefill and decode must agree on ids outside the unigram table when the rarity
// weight is 0 (decode used to reject them, prefill accepted them; both accept them now).
#[test]
fn prefill_and_decode_agree_on_ids_outside_the_table() {
    let mut cfg = SchedulerConfig::with_rungs(vec![0, 8]);
    cfg.weights.rarity = 0.0;
    let table = RarityTable::from_counts(&[1.0, 2.0]).unwrap();
    let planner = Planner::new(cfg, Some(table)).unwrap();
    let ids = [5i64];
    let prefill = planner.plan(&PlanInput {
        token_ids: &ids,
        seq_lengths: &[1],
        signals: SignalArrays::default(),
        difficulty: None,
        adapters: None,
    });
    let mut dec = DecodeBatch::new(&planner, 1, None).unwrap();
    let decode = Out::new(1).step(&mut dec, &planner, &ids, SignalArrays::default());
    assert_eq!(
        prefill.as_ref().err().map(|e| e.param()),
        decode.as_ref().err().map(|e| e.param()),
        "prefill {:?} vs decode {:?}",
        prefill.err(),
        decode.err()
    );
}
