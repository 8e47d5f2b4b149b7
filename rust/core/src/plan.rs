//! The prefill planner: difficulty → chunks → rungs → gates and segments for a ragged batch.
//!
//! Sequences are independent until rung thresholds are resolved (quantile and target modes look
//! at the whole plan), so difficulty and segmentation run in parallel over sequences.

use rayon::prelude::*;

use crate::compose::{sequence_gates, Segments, TokenGate};
use crate::config::SchedulerConfig;
use crate::difficulty::{check_some_weight, validate_signals, DifficultyState, SignalArrays};
use crate::error::{check_unit, CoreError, Result};
use crate::ladder::{apply_budget, resolve_thresholds, rung_of, ChunkStat};
use crate::segment::Segmenter;
use crate::signals::RarityTable;

/// Inputs of one plan. `seq_lengths` splits the flat arrays into sequences.
#[derive(Debug, Clone, Copy)]
pub struct PlanInput<'a> {
    pub token_ids: &'a [i64],
    pub seq_lengths: &'a [usize],
    pub signals: SignalArrays<'a>,
    /// Precomputed difficulty in [0, 1]: if given, signals are not used.
    pub difficulty: Option<&'a [f32]>,
    /// Adapter id per sequence (default 0).
    pub adapters: Option<&'a [i32]>,
}

/// Names of a [`Plan`]'s arrays, in the order [`Plan::into_named`] yields them; the Python
/// `Plan` takes its field list from here.
pub const PLAN_ARRAYS: [&str; 16] = [
    "seq_offsets",
    "difficulty",
    "chunk_offsets",
    "chunk_seq",
    "chunk_rung",
    "chunk_rank",
    "chunk_difficulty",
    "token_rank",
    "token_lo",
    "gate_lo",
    "gate_hi",
    "seg_offsets",
    "seg_rank",
    "seg_scale",
    "seg_adapter",
    "thresholds",
];

/// One array of a plan, by element type (what a binding needs to hand it over without copying).
#[derive(Debug, Clone, PartialEq)]
pub enum PlanArray {
    I32(Vec<i32>),
    F32(Vec<f32>),
    F64(Vec<f64>),
}

/// Everything a layer or kernel needs, as flat arrays over the batch (see the architecture doc).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    pub seq_offsets: Vec<i32>,
    pub difficulty: Vec<f32>,
    pub chunk_offsets: Vec<i32>,
    pub chunk_seq: Vec<i32>,
    pub chunk_rung: Vec<i32>,
    pub chunk_rank: Vec<i32>,
    pub chunk_difficulty: Vec<f32>,
    pub token_rank: Vec<i32>,
    pub token_lo: Vec<i32>,
    pub gate_lo: Vec<f32>,
    pub gate_hi: Vec<f32>,
    pub segments: Segments,
    pub thresholds: Vec<f64>,
}

impl Plan {
    /// The arrays with their names ([`PLAN_ARRAYS`], same order), moved out of the plan.
    pub fn into_named(self) -> [(&'static str, PlanArray); 16] {
        use PlanArray::{F32, F64, I32};
        let n = PLAN_ARRAYS;
        [
            (n[0], I32(self.seq_offsets)),
            (n[1], F32(self.difficulty)),
            (n[2], I32(self.chunk_offsets)),
            (n[3], I32(self.chunk_seq)),
            (n[4], I32(self.chunk_rung)),
            (n[5], I32(self.chunk_rank)),
            (n[6], F32(self.chunk_difficulty)),
            (n[7], I32(self.token_rank)),
            (n[8], I32(self.token_lo)),
            (n[9], F32(self.gate_lo)),
            (n[10], F32(self.gate_hi)),
            (n[11], I32(self.segments.offsets)),
            (n[12], I32(self.segments.rank)),
            (n[13], F32(self.segments.scale)),
            (n[14], I32(self.segments.adapter)),
            (n[15], F64(self.thresholds)),
        ]
    }
}

/// A validated config plus the optional unigram table: immutable, shareable across threads.
#[derive(Debug, Clone)]
pub struct Planner {
    cfg: SchedulerConfig,
    rarity: Option<RarityTable>,
}

struct SeqResult {
    difficulty: Vec<f32>,
    offsets: Vec<usize>,
    stats: Vec<ChunkStat>,
}

impl Planner {
    /// Validates `cfg` and builds a planner.
    pub fn new(cfg: SchedulerConfig, rarity: Option<RarityTable>) -> Result<Self> {
        cfg.validate()?;
        Ok(Self { cfg, rarity })
    }

    /// The configuration.
    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    /// The unigram rarity table, if any.
    pub fn rarity(&self) -> Option<&RarityTable> {
        self.rarity.as_ref()
    }

    /// Plans a ragged batch.
    pub fn plan(&self, input: &PlanInput<'_>) -> Result<Plan> {
        let offsets = self.validate(input)?;
        let n_seq = input.seq_lengths.len();
        let per_seq: Vec<SeqResult> = (0..n_seq)
            .into_par_iter()
            .map(|b| self.plan_sequence(input, offsets[b], offsets[b + 1]))
            .collect::<Result<_>>()?;
        let all_stats: Vec<ChunkStat> = per_seq
            .iter()
            .flat_map(|s| s.stats.iter().copied())
            .collect();
        let thresholds = resolve_thresholds(&self.cfg, &all_stats);

        let n = offsets[n_seq];
        let mut plan = Plan {
            seq_offsets: offsets.iter().map(|&o| o as i32).collect(),
            difficulty: Vec::with_capacity(n),
            chunk_offsets: vec![0],
            thresholds,
            ..Default::default()
        };
        let mut gates: Vec<TokenGate> = Vec::with_capacity(n);
        for (b, seq) in per_seq.into_iter().enumerate() {
            let mut rungs: Vec<usize> = seq
                .stats
                .iter()
                .map(|c| rung_of(c.difficulty, &plan.thresholds))
                .collect();
            apply_budget(&self.cfg, &seq.stats, &mut rungs);
            let ranks: Vec<u32> = rungs.iter().map(|&r| self.cfg.rungs[r]).collect();
            sequence_gates(&self.cfg, &seq.offsets, &ranks, &mut gates);
            for (c, stat) in seq.stats.iter().enumerate() {
                plan.chunk_offsets
                    .push((offsets[b] + seq.offsets[c + 1]) as i32);
                plan.chunk_seq.push(b as i32);
                plan.chunk_rung.push(rungs[c] as i32);
                plan.chunk_rank.push(ranks[c] as i32);
                plan.chunk_difficulty.push(stat.difficulty as f32);
            }
            plan.difficulty.extend_from_slice(&seq.difficulty);
        }
        plan.token_rank = gates.iter().map(|g| g.rank as i32).collect();
        plan.token_lo = gates.iter().map(|g| g.lo as i32).collect();
        plan.gate_lo = gates.iter().map(|g| g.gate_lo).collect();
        plan.gate_hi = gates.iter().map(|g| g.gate_hi).collect();
        let adapters = input
            .adapters
            .map_or_else(|| vec![0; n_seq], <[i32]>::to_vec);
        plan.segments = Segments::build(&self.cfg, &plan.token_rank, &offsets, &adapters);
        Ok(plan)
    }

    /// Checks the input and returns the sequence offsets.
    fn validate(&self, input: &PlanInput<'_>) -> Result<Vec<usize>> {
        if input.seq_lengths.is_empty() {
            return Err(CoreError::input("token_ids", "the batch has no sequences"));
        }
        if let Some(b) = input.seq_lengths.iter().position(|&l| l == 0) {
            return Err(CoreError::input(
                "token_ids",
                format!("sequence {b} is empty"),
            ));
        }
        let mut offsets = Vec::with_capacity(input.seq_lengths.len() + 1);
        offsets.push(0usize);
        for &l in input.seq_lengths {
            let next = offsets[offsets.len() - 1]
                .checked_add(l)
                .filter(|&n| n <= i32::MAX as usize);
            offsets.push(next.ok_or_else(|| {
                CoreError::input(
                    "seq_lengths",
                    "the sequence lengths add up to more than 2^31 - 1 tokens",
                )
            })?);
        }
        let n = offsets[offsets.len() - 1];
        if n > i32::MAX as usize {
            return Err(CoreError::input(
                "token_ids",
                format!("{n} tokens exceed the int32 offsets of a plan"),
            ));
        }
        if input.token_ids.len() != n {
            return Err(CoreError::input(
                "token_ids",
                format!(
                    "has {} ids but the sequence lengths add up to {n}",
                    input.token_ids.len()
                ),
            ));
        }
        if let Some(i) = input.token_ids.iter().position(|&t| t < 0) {
            return Err(CoreError::input(
                "token_ids",
                format!("id {} at index {i} is negative", input.token_ids[i]),
            ));
        }
        if let Some(d) = input.difficulty {
            if d.len() != n {
                return Err(CoreError::input(
                    "difficulty",
                    format!("has {} values for {n} tokens", d.len()),
                ));
            }
            check_unit("difficulty", d)?;
        } else {
            validate_signals(&input.signals, n)?;
            check_some_weight(&self.cfg, &input.signals, self.rarity.is_some())?;
        }
        if let Some(a) = input.adapters {
            if a.len() != input.seq_lengths.len() {
                return Err(CoreError::input(
                    "adapters",
                    format!(
                        "has {} ids for {} sequences",
                        a.len(),
                        input.seq_lengths.len()
                    ),
                ));
            }
            if let Some(i) = a.iter().position(|&x| x < 0) {
                return Err(CoreError::input(
                    "adapters",
                    format!("id {} at index {i} is negative", a[i]),
                ));
            }
        }
        Ok(offsets)
    }

    fn plan_sequence(&self, input: &PlanInput<'_>, start: usize, end: usize) -> Result<SeqResult> {
        let difficulty = match input.difficulty {
            Some(d) => d[start..end].to_vec(),
            None => {
                let sig = input.signals.slice(start, end);
                DifficultyState::new(&self.cfg).push_sequence(
                    &self.cfg,
                    self.rarity.as_ref(),
                    &input.token_ids[start..end],
                    sig,
                )?
            }
        };
        let cfg = &self.cfg;
        let offsets = Segmenter::default().segment(&difficulty, cfg.bounds());
        let stats = offsets
            .windows(2)
            .map(|w| {
                let sum: f64 = difficulty[w[0]..w[1]].iter().map(|&x| x as f64).sum();
                ChunkStat {
                    difficulty: sum / (w[1] - w[0]) as f64,
                    len: w[1] - w[0],
                }
            })
            .collect();
        Ok(SeqResult {
            difficulty,
            offsets,
            stats,
        })
    }
}
