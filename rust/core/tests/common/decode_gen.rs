//! Generators for the decode tests: B equal-length token streams with optional signals and
//! unigram counts, random valid configs, and a runner that feeds the streams step by step
//! through `DecodeBatch` and records every step's outputs.

use super::{planner_for, pt_seeded, rungs_from};
use chunkwise_core::decode::{DecodeBatch, StepBuffers};
use chunkwise_core::difficulty::SignalArrays;
use chunkwise_core::{PlanInput, Planner, RungMode, SchedulerConfig};
use proptest::collection::vec;
use proptest::prelude::*;

/// The decode tests' proptest config: `cases` cases from a fixed seed.
pub fn pt(cases: u32) -> ProptestConfig {
    pt_seeded(cases, 0xdec0_de01)
}

/// B sequences of equal length T, flattened sequence-major (token t of sequence b at b·T + t).
#[derive(Debug, Clone)]
pub struct Streams {
    pub b: usize,
    pub t: usize,
    pub ids: Vec<i64>,
    pub entropy: Option<Vec<f32>>,
    pub surprisal: Option<Vec<f32>>,
    pub probe: Option<Vec<f32>>,
    pub counts: Option<Vec<f64>>,
}

pub fn streams() -> impl Strategy<Value = Streams> {
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

pub fn config() -> impl Strategy<Value = SchedulerConfig> {
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
            let rungs = rungs_from(zero, &incs);
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
pub struct Out {
    pub rank: Vec<i32>,
    pub lo: Vec<i32>,
    pub gate_lo: Vec<f32>,
    pub gate_hi: Vec<f32>,
    pub scale: Vec<f32>,
    pub rung: Vec<i32>,
    pub difficulty: Vec<f32>,
    pub new_chunk: Vec<bool>,
}

impl Out {
    pub fn new(b: usize) -> Self {
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
    pub fn step(
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
    pub fn planner(&self, cfg: &SchedulerConfig) -> Planner {
        planner_for(cfg, self.counts.as_deref())
    }
    /// Column `step` of an array (one value per sequence).
    pub fn col<T: Copy>(&self, a: &[T], step: usize) -> Vec<T> {
        (0..self.b).map(|s| a[s * self.t + step]).collect()
    }
    /// Feeds every step through a decoder; returns per-step outputs.
    pub fn decode(&self, planner: &Planner, th: Option<Vec<f64>>) -> Vec<Out> {
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
    pub fn prefill(&self, planner: &Planner) -> chunkwise_core::Plan {
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
