//! Generators for the prefill tests: random ragged batches (ids, optional signals, a given
//! difficulty, adapters, unigram counts) and random valid configs (all three rung modes,
//! budgets, cross-fades, scales).

use super::{planner_for, pt_seeded, rungs_from};
use chunkwise_core::difficulty::SignalArrays;
use chunkwise_core::{PlanInput, Planner, RungMode, SchedulerConfig};
use proptest::collection::vec;
use proptest::prelude::*;

/// The prefill tests' proptest config: `cases` cases from a fixed seed.
pub fn pt(cases: u32) -> ProptestConfig {
    pt_seeded(cases, 0x0c4a_7e11)
}

/// splitmix64: arrays are derived from a seed so cases stay cheap to generate.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A curve in [0, 1]: uniform noise, 5 quantised levels (ties), noisy blocks, or a constant.
fn curve(rng: &mut Rng, n: usize, style: u64) -> Vec<f32> {
    match style % 4 {
        0 => (0..n).map(|_| rng.unit()).collect(),
        1 => (0..n).map(|_| rng.below(5) as f32 / 4.0).collect(),
        2 => {
            let mut out = Vec::with_capacity(n + 64);
            while out.len() < n {
                let (level, len) = (rng.unit(), 1 + rng.below(60));
                for _ in 0..len {
                    out.push((level + (rng.unit() - 0.5) * 0.1).clamp(0.0, 1.0));
                }
            }
            out.truncate(n);
            out
        }
        _ => vec![[0.0, 1.0, rng.unit()][rng.below(3) as usize]; n],
    }
}

#[derive(Debug, Clone)]
pub struct Batch {
    pub lens: Vec<usize>,
    pub ids: Vec<i64>,
    pub entropy: Option<Vec<f32>>,
    pub surprisal: Option<Vec<f32>>,
    pub probe: Option<Vec<f32>>,
    pub difficulty: Option<Vec<f32>>,
    pub adapters: Option<Vec<i32>>,
    pub counts: Option<Vec<f64>>,
}

impl Batch {
    pub fn input(&self) -> PlanInput<'_> {
        PlanInput {
            token_ids: &self.ids,
            seq_lengths: &self.lens,
            signals: SignalArrays {
                entropy: self.entropy.as_deref(),
                surprisal: self.surprisal.as_deref(),
                probe: self.probe.as_deref(),
            },
            difficulty: self.difficulty.as_deref(),
            adapters: self.adapters.as_deref(),
        }
    }
    pub fn planner(&self, cfg: &SchedulerConfig) -> Planner {
        planner_for(cfg, self.counts.as_deref())
    }
    pub fn offsets(&self) -> Vec<usize> {
        let mut o = vec![0];
        for l in &self.lens {
            o.push(o[o.len() - 1] + l);
        }
        o
    }
    /// Sequence `b` alone.
    pub fn single(&self, b: usize) -> Batch {
        let o = self.offsets();
        let cut = |a: &Option<Vec<f32>>| a.as_ref().map(|v| v[o[b]..o[b + 1]].to_vec());
        Batch {
            lens: vec![self.lens[b]],
            ids: self.ids[o[b]..o[b + 1]].to_vec(),
            entropy: cut(&self.entropy),
            surprisal: cut(&self.surprisal),
            probe: cut(&self.probe),
            difficulty: cut(&self.difficulty),
            adapters: self.adapters.as_ref().map(|a| vec![a[b]]),
            counts: self.counts.clone(),
        }
    }
}

fn build_batch(lens: Vec<usize>, seed: u64, flags: u8) -> Batch {
    let mut rng = Rng(seed);
    let n: usize = lens.iter().sum();
    let vocab = 1 + rng.below(40);
    let sig = |on: bool, rng: &mut Rng| {
        on.then(|| {
            let s = rng.next();
            curve(rng, n, s)
        })
    };
    let entropy = sig(flags & 2 != 0, &mut rng);
    let surprisal = sig(flags & 4 != 0, &mut rng);
    let probe = sig(flags & 8 != 0, &mut rng).map(|v| v.iter().map(|x| x * 3.0).collect());
    let difficulty = sig(flags & 1 != 0, &mut rng);
    Batch {
        ids: (0..n).map(|_| rng.below(vocab) as i64).collect(),
        counts: (flags & 16 != 0).then(|| (0..vocab).map(|_| rng.below(100) as f64).collect()),
        adapters: (flags & 32 != 0).then(|| lens.iter().map(|_| rng.below(4) as i32).collect()),
        lens,
        entropy,
        surprisal,
        probe,
        difficulty,
    }
}

pub fn batch() -> impl Strategy<Value = Batch> {
    (
        vec(prop_oneof![1usize..=300, 1usize..=30], 1..=5),
        any::<u64>(),
        any::<u8>(),
    )
        .prop_map(|(lens, seed, flags)| build_batch(lens, seed, flags))
}

type Ladder = (bool, Vec<u32>, Option<Vec<f64>>);
type Cuts = (Option<Vec<f64>>, Vec<f64>);
type Misc = (f64, f64, f64, usize);
type Sig = (Vec<f64>, usize, usize, f64, f64, f64);

#[allow(clippy::type_complexity)]
fn build_config(
    (m, ladder, cuts, mode, lens, misc, sig): (
        usize,
        Ladder,
        Cuts,
        (u8, f64),
        (usize, usize, usize, usize),
        Misc,
        Sig,
    ),
) -> SchedulerConfig {
    let (zero, incs, scales) = ladder;
    let rungs = rungs_from(zero, &incs);
    let mut cfg = SchedulerConfig::with_rungs(rungs.clone());
    if let Some(s) = scales {
        cfg.rung_scales = s;
    }
    if let Some(mut t) = cuts.0 {
        t.sort_by(f64::total_cmp);
        cfg.thresholds = t;
    }
    let gaps = cuts.1;
    let total: f64 = gaps.iter().sum();
    let q: Vec<f64> = (1..m)
        .map(|j| gaps[..j].iter().sum::<f64>() / total)
        .collect();
    let (lo, hi) = (rungs[0] as f64, rungs[m - 1] as f64);
    cfg.mode = match mode.0 {
        0 => RungMode::Threshold,
        1 => RungMode::Quantile(q),
        _ => RungMode::Target(lo + mode.1 * (hi - lo)),
    };
    let g = lens.3;
    cfg.granularity = g;
    cfg.min_len = lens.0.div_ceil(g) * g;
    cfg.max_len = cfg.min_len + lens.1 / g * g;
    cfg.crossfade = lens.2.min(cfg.min_len);
    (cfg.chunk_penalty, cfg.hysteresis, cfg.budget_share) = (misc.0, misc.1, misc.2);
    cfg.budget_rank = rungs[1 + misc.3];
    let w = &sig.0;
    cfg.weights.entropy = w[0];
    cfg.weights.surprisal = w[1];
    cfg.weights.novelty = w[2];
    cfg.weights.rarity = w[3];
    cfg.weights.position = if w[2] == 0.0 && w[4] == 0.0 {
        0.5
    } else {
        w[4]
    };
    cfg.weights.probe = w[5];
    (cfg.ngram, cfg.novelty_window, cfg.ema) = (sig.1, sig.2, sig.3);
    (cfg.position_tau, cfg.probe_scale) = (sig.4, sig.5);
    cfg.validate().unwrap();
    cfg
}

pub fn config() -> impl Strategy<Value = SchedulerConfig> {
    (2usize..=6)
        .prop_flat_map(|m| {
            let ladder = (
                any::<bool>(),
                vec(1u32..=16, m),
                prop_oneof![3 => Just(None), 1 => vec(0.0f64..=2.0, m).prop_map(Some)],
            );
            let quarter = |v: Vec<u8>| Some(v.iter().map(|&x| x as f64 / 4.0).collect());
            let cuts = (
                prop_oneof![
                    Just(None),
                    vec(0.0f64..=1.0, m - 1).prop_map(Some),
                    vec(0u8..=4, m - 1).prop_map(quarter),
                ],
                vec(0.05f64..1.0, m),
            );
            let mode = (0u8..3, prop_oneof![Just(0.0), Just(1.0), 0.0f64..=1.0]);
            let grid = prop_oneof![3 => Just(1usize), 1 => Just(2), 1 => Just(4), 1 => Just(8)];
            let lens = (1usize..=20, 0usize..=40, 0usize..=20, grid);
            let misc = (
                prop_oneof![Just(0.0), 0.0f64..2.0],
                0.0f64..0.2,
                prop_oneof![2 => Just(1.0), 1 => Just(0.0), 2 => 0.0f64..=1.0],
                0..m - 1,
            );
            let w = prop_oneof![Just(0.0), 0.0f64..2.0];
            let sig = (
                vec(w, 6),
                1usize..=4,
                1usize..=64,
                prop_oneof![Just(1.0), 0.05f64..=1.0],
                1.0f64..200.0,
                0.1f64..10.0,
            );
            (Just(m), ladder, cuts, mode, lens, misc, sig)
        })
        .prop_map(build_config)
}
