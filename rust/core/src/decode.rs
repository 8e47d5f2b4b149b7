//! Streaming (decode) scheduling: one token per sequence per step, no look-ahead.
//!
//! Chunks close when the difficulty crosses a threshold by more than the hysteresis margin
//! (after at least `min_len` tokens) or at `max_len`; a high-rung chunk may only start if the
//! running share of high-rung tokens stays within the budget even if the chunk runs to
//! `max_len`. Ramps follow each rank change, as in prefill (docs/architecture.md §5).

use crate::compose::{ramp, TokenGate};
use crate::difficulty::{validate_signals, DifficultyState, SignalArrays, TokenSignals};
use crate::error::{CoreError, Result};
use crate::ladder::rung_of;
use crate::plan::Planner;
use crate::signals::NoveltyTracker;

/// What one decode step decided for one sequence.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepOut {
    pub gate: TokenGate,
    pub scale: f32,
    pub rung: u32,
    pub difficulty: f32,
    pub new_chunk: bool,
}

/// Streaming state of one sequence.
#[derive(Debug, Clone)]
pub struct DecodeSeq {
    diff: DifficultyState,
    rung: Option<usize>,
    chunk_len: usize,
    /// Rank before the last change, and position inside its ramp.
    ramp_from: Option<(u32, usize)>,
    high: usize,
    total: usize,
}

impl DecodeSeq {
    /// A fresh sequence.
    pub fn new(planner: &Planner) -> Self {
        Self {
            diff: DifficultyState::new(planner.config()),
            rung: None,
            chunk_len: 0,
            ramp_from: None,
            high: 0,
            total: 0,
        }
    }

    /// Tokens on high rungs and tokens in total so far.
    pub fn counts(&self) -> (usize, usize) {
        (self.high, self.total)
    }

    /// Advances by one token. Inputs must be validated; errors only for ids outside the
    /// rarity table.
    pub fn step(
        &mut self,
        planner: &Planner,
        thresholds: &[f64],
        id: i64,
        sig: TokenSignals,
    ) -> Result<StepOut> {
        let cfg = planner.config();
        let d = self.diff.push(cfg, planner.rarity(), id, sig)?;
        let dd = d as f64;
        let next = match self.rung {
            None => Some(rung_of(dd, thresholds)),
            Some(_) if self.chunk_len < cfg.min_len || self.chunk_len % cfg.granularity != 0 => {
                None
            }
            Some(k) => {
                let h = cfg.hysteresis;
                let up = thresholds.iter().filter(|&&t| dd > t + h).count();
                let down = thresholds.iter().filter(|&&t| dd > t - h).count();
                if up > k {
                    Some(up)
                } else if down < k {
                    Some(down)
                } else if self.chunk_len >= cfg.max_len {
                    Some(k)
                } else {
                    None
                }
            }
        };
        let new_chunk = next.is_some();
        if let Some(mut r) = next {
            let hr = cfg.budget_rung();
            let room = (self.high + cfg.max_len) as f64
                <= cfg.budget_share * (self.total + cfg.max_len) as f64;
            if r >= hr && cfg.budget_share < 1.0 && !room {
                r = hr - 1;
            }
            let prev = self.rung.map(|k| cfg.rungs[k]);
            self.ramp_from = prev.filter(|&p| p != cfg.rungs[r]).map(|p| (p, 0));
            self.rung = Some(r);
            self.chunk_len = 0;
        }
        let rung = self.rung.unwrap_or(0);
        let rank = cfg.rungs[rung];
        let gate = match self.ramp_from {
            Some((from, i)) => match ramp(cfg, from, rank, i) {
                Some(g) => {
                    self.ramp_from = Some((from, i + 1));
                    g
                }
                None => {
                    self.ramp_from = None;
                    TokenGate::plain(rank)
                }
            },
            None => TokenGate::plain(rank),
        };
        self.chunk_len += 1;
        self.total += 1;
        if rung >= cfg.budget_rung() {
            self.high += 1;
        }
        Ok(StepOut {
            gate,
            scale: cfg.scale_of_rank(gate.rank) as f32,
            rung: rung as u32,
            difficulty: d,
            new_chunk,
        })
    }
}

/// Output slices of a batched decode step (one entry per sequence).
pub struct StepBuffers<'a> {
    pub rank: &'a mut [i32],
    pub lo: &'a mut [i32],
    pub gate_lo: &'a mut [f32],
    pub gate_hi: &'a mut [f32],
    pub scale: &'a mut [f32],
    pub rung: &'a mut [i32],
    pub difficulty: &'a mut [f32],
    pub new_chunk: &'a mut [bool],
}

/// Largest decode batch (a guard against allocation overflow, far above any real batch).
pub const MAX_BATCH: usize = 1 << 20;

/// Largest streaming state of one decode batch, in bytes (the n-gram tables dominate: 32 KiB
/// per row at the default novelty window of 256); a batch that would need more is refused
/// instead of aborting the process when the allocation fails.
pub const MAX_DECODE_STATE_BYTES: usize = 4 << 30;

/// Decode state of a batch of sequences sharing one threshold set.
#[derive(Debug, Clone)]
pub struct DecodeBatch {
    seqs: Vec<DecodeSeq>,
    thresholds: Vec<f64>,
}

impl DecodeBatch {
    /// `batch_size` fresh sequences; `thresholds` default to the config's.
    pub fn new(planner: &Planner, batch_size: usize, thresholds: Option<Vec<f64>>) -> Result<Self> {
        if batch_size == 0 || batch_size > MAX_BATCH {
            return Err(CoreError::input(
                "batch_size",
                format!("{batch_size} is outside [1, {MAX_BATCH}]"),
            ));
        }
        let cfg = planner.config();
        let per_row = if cfg.weights.novelty > 0.0 {
            NoveltyTracker::table_bytes(cfg.novelty_window)
        } else {
            0
        };
        if batch_size.saturating_mul(per_row) > MAX_DECODE_STATE_BYTES {
            return Err(CoreError::input(
                "batch_size",
                format!(
                    "{batch_size} rows need {} MiB of novelty tables ({} KiB per row at novelty_window \
                     {}), over the {} MiB limit; use fewer rows or a smaller novelty_window",
                    batch_size.saturating_mul(per_row) >> 20,
                    per_row >> 10,
                    cfg.novelty_window,
                    MAX_DECODE_STATE_BYTES >> 20
                ),
            ));
        }
        let thresholds = thresholds.unwrap_or_else(|| cfg.thresholds.clone());
        if thresholds.len() + 1 != cfg.n_rungs() {
            return Err(CoreError::input(
                "thresholds",
                format!(
                    "needs {} values for {} rungs, got {}",
                    cfg.n_rungs() - 1,
                    cfg.n_rungs(),
                    thresholds.len()
                ),
            ));
        }
        if thresholds.iter().any(|t| !t.is_finite()) || thresholds.windows(2).any(|w| w[1] < w[0]) {
            return Err(CoreError::input(
                "thresholds",
                "must be finite and non-decreasing",
            ));
        }
        Ok(Self {
            seqs: vec![DecodeSeq::new(planner); batch_size],
            thresholds,
        })
    }

    /// Number of sequences.
    pub fn len(&self) -> usize {
        self.seqs.len()
    }

    /// Never true (a batch has at least one sequence).
    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }

    /// The thresholds in use.
    pub fn thresholds(&self) -> &[f64] {
        &self.thresholds
    }

    /// Per-sequence state (read-only).
    pub fn seq(&self, b: usize) -> Option<&DecodeSeq> {
        self.seqs.get(b)
    }

    /// Starts a new sequence in slot `b` (continuous batching).
    pub fn reset(&mut self, planner: &Planner, b: usize) -> Result<()> {
        let n = self.seqs.len();
        let slot = self
            .seqs
            .get_mut(b)
            .ok_or_else(|| CoreError::input("index", format!("{b} is outside the batch of {n}")))?;
        *slot = DecodeSeq::new(planner);
        Ok(())
    }

    /// One token for every sequence; results go into `out`. All or nothing: on an error no
    /// sequence has advanced.
    pub fn step(
        &mut self,
        planner: &Planner,
        ids: &[i64],
        sig: SignalArrays<'_>,
        out: &mut StepBuffers<'_>,
    ) -> Result<()> {
        let b = self.seqs.len();
        if ids.len() != b {
            return Err(CoreError::input(
                "token_ids",
                format!("has {} ids for a batch of {b}", ids.len()),
            ));
        }
        if let Some(i) = ids.iter().position(|&t| t < 0) {
            return Err(CoreError::input(
                "token_ids",
                format!("id {} at index {i} is negative", ids[i]),
            ));
        }
        if let (Some(table), true) = (planner.rarity(), planner.config().weights.rarity > 0.0) {
            for &id in ids {
                table.get(id)?;
            }
        }
        let lens = [
            out.rank.len(),
            out.lo.len(),
            out.gate_lo.len(),
            out.gate_hi.len(),
            out.scale.len(),
            out.rung.len(),
            out.difficulty.len(),
            out.new_chunk.len(),
        ];
        if lens.iter().any(|&l| l != b) {
            return Err(CoreError::state(
                "out",
                format!("output buffers have lengths {lens:?}, need {b}"),
            ));
        }
        validate_signals(&sig, b)?;
        for (i, seq) in self.seqs.iter_mut().enumerate() {
            let s = seq.step(planner, &self.thresholds, ids[i], sig.at(i))?;
            out.rank[i] = s.gate.rank as i32;
            out.lo[i] = s.gate.lo as i32;
            out.gate_lo[i] = s.gate.gate_lo;
            out.gate_hi[i] = s.gate.gate_hi;
            out.scale[i] = s.scale;
            out.rung[i] = s.rung as i32;
            out.difficulty[i] = s.difficulty;
            out.new_chunk[i] = s.new_chunk;
        }
        Ok(())
    }
}
