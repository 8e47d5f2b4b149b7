//! Per-slot bookkeeping of a batch of KV caches, and the eviction decision.
//!
//! Slots are kept in column order (a column is a token's index in the padded stream the model
//! saw, padding included). Every row holds the same number of slots. Left padding occupies the
//! first `pad[b]` columns of row `b`; a row keeps padding slots only while it has fewer real
//! tokens than slots, and then exactly `slots - real` of them, at the front. That invariant is
//! what lets an attention mask over the *last* `slots` columns of the 2-D padding mask stay right
//! after any eviction (docs/architecture.md §6).
//!
//! With [`KvLedger::per_row`] each row instead evicts exactly when it would alone: when its own
//! real slots pass `budget + slack`. Rows then hold different numbers of real slots; the shorter
//! ones are filled at the front with *dead* slots (column [`DEAD`]), and the caller masks every
//! slot that [`KvLedger::valid`] says is padding or dead. That makes a row's tokens independent
//! of its batch-mates, at the price of a mask the caller builds (`chunkwise.generate` does).

use super::policy::KvPolicy;
use crate::error::{check_unit, CoreError, Result};

/// Column of a dead slot: a filler in front of a per-row ledger's shorter rows (never attended).
pub const DEAD: u64 = u64::MAX;

/// One sequence's slots.
#[derive(Debug, Clone, Default)]
struct Row {
    column: Vec<u64>,
    chunk: Vec<u64>,
    difficulty: Vec<f32>,
    score: Vec<f32>,
}

impl Row {
    fn gather(&mut self, keep: &[usize]) {
        self.column = keep.iter().map(|&i| self.column[i]).collect();
        self.chunk = keep.iter().map(|&i| self.chunk[i]).collect();
        self.difficulty = keep.iter().map(|&i| self.difficulty[i]).collect();
        self.score = keep.iter().map(|&i| self.score[i]).collect();
    }

    /// Each real slot's difficulty replaced by the mean over its chunk (a maximal run of equal
    /// chunk ids among the real slots), so a hard chunk's tokens stay or go together. Padding
    /// and dead slots (0 here) belong to no chunk.
    fn chunk_difficulty(&self, pad: u64) -> Vec<f32> {
        let real = |i: usize| self.column[i] != DEAD && self.column[i] >= pad;
        let mut out = vec![0.0; self.chunk.len()];
        let idx: Vec<usize> = (0..self.chunk.len()).filter(|&i| real(i)).collect();
        let mut start = 0;
        while start < idx.len() {
            let c = self.chunk[idx[start]];
            let end = start
                + idx[start..]
                    .iter()
                    .take_while(|&&i| self.chunk[i] == c)
                    .count();
            let mean = idx[start..end]
                .iter()
                .map(|&i| self.difficulty[i])
                .sum::<f32>()
                / (end - start) as f32;
            for &i in &idx[start..end] {
                out[i] = mean;
            }
            start = end;
        }
        out
    }
}

/// Bookkeeping of a batch of KV caches under one [`KvPolicy`].
#[derive(Debug, Clone)]
pub struct KvLedger {
    policy: KvPolicy,
    pad: Vec<usize>,
    seen: usize,
    rows: Vec<Row>,
    per_row: bool,
}

impl KvLedger {
    /// An empty ledger for `pad.len()` sequences with `pad[b]` columns of left padding each.
    pub fn new(policy: KvPolicy, pad: Vec<usize>) -> Result<Self> {
        policy.validate()?;
        if pad.is_empty() {
            return Err(CoreError::input("batch_size", "must be at least 1"));
        }
        Ok(Self {
            policy,
            rows: vec![Row::default(); pad.len()],
            pad,
            seen: 0,
            per_row: false,
        })
    }

    /// The same ledger deciding eviction per row, as each row would alone (module docs).
    pub fn per_row(mut self) -> Self {
        self.per_row = true;
        self
    }

    /// Whether eviction is decided per row.
    pub fn is_per_row(&self) -> bool {
        self.per_row
    }

    /// Whether slot `i` of row `b` holds a real token (not padding, not dead).
    fn is_real(&self, b: usize, i: usize) -> bool {
        let c = self.rows[b].column[i];
        c != DEAD && c >= self.pad[b] as u64
    }

    /// Real slots of row `b`.
    fn real_count(&self, b: usize) -> usize {
        (0..self.rows[b].column.len())
            .filter(|&i| self.is_real(b, i))
            .count()
    }

    /// Per row: the real slots it keeps at the next eviction, and whether it evicts.
    fn row_targets(&self) -> Vec<(usize, bool)> {
        (0..self.rows.len())
            .map(|b| {
                let real = self.real_count(b);
                match self.policy.budget {
                    Some(budget) if real > budget + self.policy.slack => (budget, true),
                    _ => (real, false),
                }
            })
            .collect()
    }

    /// Whether each slot holds a real token (row-major [batch, len]): what the next forward may
    /// attend to. Without [`Self::per_row`] this is the padding mask's last `len` columns.
    pub fn valid(&self) -> Vec<bool> {
        (0..self.rows.len())
            .flat_map(|b| (0..self.rows[b].column.len()).map(move |i| (b, i)))
            .map(|(b, i)| self.is_real(b, i))
            .collect()
    }

    /// The policy.
    pub fn policy(&self) -> &KvPolicy {
        &self.policy
    }

    /// Number of sequences.
    pub fn batch_size(&self) -> usize {
        self.rows.len()
    }

    /// Slots held per sequence.
    pub fn len(&self) -> usize {
        self.rows[0].column.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Columns appended so far (tokens seen per sequence, padding included).
    pub fn seen(&self) -> usize {
        self.seen
    }

    /// Left padding of each sequence.
    pub fn padding(&self) -> &[usize] {
        &self.pad
    }

    /// Slots per sequence once [`Self::evict`] has run: what the next forward attends to
    /// (besides its own tokens).
    pub fn pending_len(&self) -> usize {
        if self.per_row {
            let targets = self.row_targets();
            if !targets.iter().any(|t| t.1) {
                return self.len();
            }
            return targets.iter().map(|t| t.0).max().unwrap_or(0);
        }
        match self.policy.budget {
            Some(b) if self.len() > b + self.policy.slack => b,
            _ => self.len(),
        }
    }

    /// Appends `n` columns to every row. `difficulty` (row-major [batch, n], each in [0, 1])
    /// and `chunk` ([batch, n] chunk ids) default to 0 and to one chunk per token.
    pub fn append(
        &mut self,
        n: usize,
        difficulty: Option<&[f32]>,
        chunk: Option<&[u64]>,
    ) -> Result<()> {
        let want = self.rows.len() * n;
        if let Some(d) = difficulty {
            if d.len() != want {
                return Err(CoreError::input(
                    "difficulty",
                    format!(
                        "has {} values for {} sequences x {n} tokens",
                        d.len(),
                        self.rows.len()
                    ),
                ));
            }
            check_unit("difficulty", d)?;
        }
        if let Some(c) = chunk {
            if c.len() != want {
                return Err(CoreError::input(
                    "chunk",
                    format!(
                        "has {} values for {} sequences x {n} tokens",
                        c.len(),
                        self.rows.len()
                    ),
                ));
            }
        }
        for (b, row) in self.rows.iter_mut().enumerate() {
            for i in 0..n {
                let col = (self.seen + i) as u64;
                row.column.push(col);
                row.chunk.push(chunk.map_or(col, |c| c[b * n + i]));
                row.difficulty
                    .push(difficulty.map_or(0.0, |d| d[b * n + i]));
                row.score.push(0.0);
            }
        }
        self.seen += n;
        Ok(())
    }

    /// Overwrites the difficulty of each row's newest `values.len() / batch` slots (row-major):
    /// prefill learns a token's difficulty only from the logits its own forward produced.
    pub fn revise_difficulty(&mut self, values: &[f32]) -> Result<()> {
        let b = self.rows.len();
        let n = values.len() / b;
        if values.len() % b != 0 || n > self.len() {
            return Err(CoreError::input(
                "difficulty",
                format!(
                    "has {} values; need batch ({b}) x at most {} held slots",
                    values.len(),
                    self.len()
                ),
            ));
        }
        check_unit("difficulty", values)?;
        for (row, v) in self.rows.iter_mut().zip(values.chunks_exact(n.max(1))) {
            let start = row.difficulty.len() - n;
            row.difficulty[start..].copy_from_slice(&v[..n]);
        }
        Ok(())
    }

    /// Difficulty of each slot (row-major [batch, len]).
    pub fn difficulty(&self) -> Vec<f32> {
        self.rows
            .iter()
            .flat_map(|r| r.difficulty.iter().copied())
            .collect()
    }

    /// Adds attention received by each slot (row-major [batch, len], finite, >= 0).
    pub fn add_scores(&mut self, scores: &[f32]) -> Result<()> {
        let len = self.len();
        if scores.len() != self.rows.len() * len {
            return Err(CoreError::input(
                "scores",
                format!(
                    "has {} values; the cache holds {} sequences x {len} slots",
                    scores.len(),
                    self.rows.len()
                ),
            ));
        }
        if let Some(i) = scores.iter().position(|s| !(s.is_finite() && *s >= 0.0)) {
            return Err(CoreError::input(
                "scores",
                format!(
                    "value at index {i} is {} (must be finite and >= 0)",
                    scores[i]
                ),
            ));
        }
        for (row, s) in self.rows.iter_mut().zip(scores.chunks_exact(len.max(1))) {
            row.score.iter_mut().zip(s).for_each(|(a, b)| *a += b);
        }
        Ok(())
    }

    /// Runs the eviction if the cache is over `budget + slack`: returns the slot indices each
    /// row keeps (row-major [batch, budget], ascending), already applied to the ledger. `None`
    /// when nothing is evicted.
    pub fn evict(&mut self) -> Option<Vec<usize>> {
        if self.per_row {
            return self.evict_per_row();
        }
        let target = self.pending_len();
        if target == self.len() {
            return None;
        }
        let mut all = Vec::with_capacity(self.rows.len() * target);
        for (b, row) in self.rows.iter_mut().enumerate() {
            let keep = select(&self.policy, row, self.pad[b] as u64, target);
            row.gather(&keep);
            all.extend_from_slice(&keep);
        }
        Some(all)
    }

    /// [`Self::evict`] of a per-row ledger: rows over `budget + slack` keep `budget` real slots
    /// (chosen as alone), the others all theirs; each row is then filled at the front with dead
    /// slots up to the longest row.
    fn evict_per_row(&mut self) -> Option<Vec<usize>> {
        let targets = self.row_targets();
        if !targets.iter().any(|t| t.1) {
            return None;
        }
        let width = targets.iter().map(|t| t.0).max().unwrap_or(0);
        let mut all = Vec::with_capacity(self.rows.len() * width);
        for (b, &(target, evicts)) in targets.iter().enumerate() {
            let real: Vec<usize> = (0..self.rows[b].column.len())
                .filter(|&i| self.is_real(b, i))
                .collect();
            let kept = if evicts {
                select(&self.policy, &self.rows[b], self.pad[b] as u64, target)
            } else {
                real
            };
            let dead = width - kept.len();
            let mut keep = vec![kept.first().copied().unwrap_or(0); dead];
            keep.extend_from_slice(&kept);
            let row = &mut self.rows[b];
            row.gather(&keep);
            for i in 0..dead {
                (row.column[i], row.chunk[i]) = (DEAD, DEAD);
                (row.difficulty[i], row.score[i]) = (0.0, 0.0);
            }
            all.extend_from_slice(&keep);
        }
        Some(all)
    }

    /// Which slots to hold at full precision when each row may hold `n_full` of them (the
    /// others in a low precision): per row, the first `n_full` of its real slots in keep
    /// priority (sinks, recent window, then the best-scored middle: what an eviction would
    /// keep longest). Row-major [batch, len]; padding and dead slots are never chosen.
    pub fn full_precision(&self, n_full: usize) -> Vec<bool> {
        let len = self.len();
        let mut out = vec![false; self.rows.len() * len];
        for (b, row) in self.rows.iter().enumerate() {
            for &i in priority(&self.policy, row, self.pad[b] as u64)
                .iter()
                .take(n_full)
            {
                out[b * len + i] = true;
            }
        }
        out
    }

    /// Columns held by each row (row-major [batch, len]).
    pub fn columns(&self) -> Vec<u64> {
        self.rows
            .iter()
            .flat_map(|r| r.column.iter().copied())
            .collect()
    }

    /// Accumulated attention of each slot (row-major [batch, len]).
    pub fn scores(&self) -> Vec<f32> {
        self.rows
            .iter()
            .flat_map(|r| r.score.iter().copied())
            .collect()
    }
}

/// The value of each of `middle`'s slots in a scored policy's ranking: weighted attention
/// (relative to the middle's largest) plus weighted chunk difficulty.
fn middle_values(policy: &KvPolicy, row: &Row, pad: u64, middle: &[usize]) -> Vec<f32> {
    let diff = row.chunk_difficulty(pad);
    let max_attn = middle.iter().map(|&i| row.score[i]).fold(0.0f32, f32::max);
    // score / max (not score * (1 / max)): the reciprocal rounds differently and used to
    // break exact ties among the middle slots in another order than the definition
    let attn = |i: usize| {
        if max_attn > 0.0 {
            row.score[i] / max_attn
        } else {
            0.0
        }
    };
    middle
        .iter()
        .map(|&i| policy.attention_weight * attn(i) + policy.difficulty_weight * diff[i])
        .collect()
}

/// One row's real slots, most worth keeping first: the sinks, the recent window (newest
/// first), then the middle by value (scored policies; ties: the newer first) or newest first.
/// Keeping the first `target` of them is what [`select`] keeps.
fn priority(policy: &KvPolicy, row: &Row, pad: u64) -> Vec<usize> {
    let real: Vec<usize> = (0..row.column.len())
        .filter(|&i| row.column[i] != DEAD && row.column[i] >= pad)
        .collect();
    let sinks = policy.sinks.min(real.len());
    let window = policy.window.min(real.len() - sinks);
    let middle = &real[sinks..real.len() - window];
    let mut order: Vec<usize> = real[..sinks].to_vec();
    order.extend(real[real.len() - window..].iter().rev());
    if policy.scored() {
        let value = middle_values(policy, row, pad, middle);
        let mut idx: Vec<usize> = (0..middle.len()).collect();
        idx.sort_unstable_by(|&a, &b| value[b].total_cmp(&value[a]).then(b.cmp(&a)));
        order.extend(idx.into_iter().map(|k| middle[k]));
    } else {
        order.extend(middle.iter().rev());
    }
    order
}

/// The `target` slots one row keeps, ascending. See the module docs for padding.
fn select(policy: &KvPolicy, row: &Row, pad: u64, target: usize) -> Vec<usize> {
    let real: Vec<usize> = (0..row.column.len())
        .filter(|&i| row.column[i] != DEAD && row.column[i] >= pad)
        .collect();
    let n_pad = row.column.len() - real.len();
    if real.len() <= target {
        // Padding slots come first in column order: keep the last `target - real` of them.
        let pads = target - real.len();
        return (n_pad - pads..n_pad).chain(real).collect();
    }
    let sinks = policy.sinks.min(target);
    let window = policy.window.min(target - sinks);
    let middle = &real[sinks..real.len() - window];
    let room = target - sinks - window;
    let mut chosen: Vec<usize> = if policy.scored() {
        let value = middle_values(policy, row, pad, middle);
        // Highest value first; ties keep the newer token. A partial selection is enough: the
        // kept slots are sorted by position afterwards.
        let mut order: Vec<usize> = (0..middle.len()).collect();
        if room > 0 && room < order.len() {
            order.select_nth_unstable_by(room - 1, |&a, &b| {
                value[b].total_cmp(&value[a]).then(b.cmp(&a))
            });
        }
        order.truncate(room);
        order.into_iter().map(|k| middle[k]).collect()
    } else {
        middle[middle.len() - room..].to_vec()
    };
    chosen.extend_from_slice(&real[..sinks]);
    chosen.extend_from_slice(&real[real.len() - window..]);
    chosen.sort_unstable();
    chosen
}
