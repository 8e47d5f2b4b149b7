//! Per-token difficulty signals, each normalised to [0, 1].
//!
//! Signals that need the model (entropy, surprisal) are computed from logits the caller already
//! has: the core never runs a scoring pass. Signals from token ids (novelty, rarity) and the
//! positional prior need no model at all.

use rayon::prelude::*;

use crate::error::{CoreError, Result};

/// Normalised predictive entropy H(softmax(row)) / ln V of each row of a `[rows, vocab]` matrix.
///
/// `-inf` logits are allowed (masked tokens); NaN and `+inf` are errors.
pub fn entropy_from_logits(logits: &[f32], vocab: usize) -> Result<Vec<f32>> {
    let rows = check_logits(logits, vocab)?;
    let ln_v = (vocab as f64).ln();
    let out = (0..rows)
        .into_par_iter()
        .map(|r| {
            let row = &logits[r * vocab..(r + 1) * vocab];
            let lse = log_sum_exp(row);
            let h: f64 = row
                .iter()
                .map(|&x| {
                    let lp = x as f64 - lse;
                    let p = lp.exp();
                    if p > 0.0 {
                        -p * lp
                    } else {
                        0.0
                    }
                })
                .sum();
            (h / ln_v).clamp(0.0, 1.0) as f32
        })
        .collect();
    Ok(out)
}

/// Normalised surprisal min(1, −ln softmax(row)[id] / ln V) of `ids[r]` under row r.
pub fn surprisal_from_logits(logits: &[f32], vocab: usize, ids: &[i64]) -> Result<Vec<f32>> {
    let rows = check_logits(logits, vocab)?;
    if ids.len() != rows {
        return Err(CoreError::input(
            "token_ids",
            format!("has {} ids but logits have {rows} rows", ids.len()),
        ));
    }
    if let Some(i) = ids.iter().position(|&t| t < 0 || t as u64 >= vocab as u64) {
        return Err(CoreError::input(
            "token_ids",
            format!(
                "id {} at index {i} is outside the vocabulary [0, {vocab})",
                ids[i]
            ),
        ));
    }
    let ln_v = (vocab as f64).ln();
    let out = (0..rows)
        .into_par_iter()
        .map(|r| {
            let row = &logits[r * vocab..(r + 1) * vocab];
            let s = log_sum_exp(row) - row[ids[r] as usize] as f64;
            (s / ln_v).clamp(0.0, 1.0) as f32
        })
        .collect();
    Ok(out)
}

fn check_logits(logits: &[f32], vocab: usize) -> Result<usize> {
    if vocab < 2 {
        return Err(CoreError::input(
            "logits",
            format!("vocabulary size {vocab} < 2"),
        ));
    }
    if logits.is_empty() || logits.len() % vocab != 0 {
        return Err(CoreError::input(
            "logits",
            format!(
                "length {} is not a positive multiple of vocab {vocab}",
                logits.len()
            ),
        ));
    }
    if let Some(i) = logits
        .iter()
        .position(|x| x.is_nan() || *x == f32::INFINITY)
    {
        return Err(CoreError::input(
            "logits",
            format!(
                "value {} at row {}, column {} (NaN and +inf are not allowed)",
                logits[i],
                i / vocab,
                i % vocab
            ),
        ));
    }
    let rows = logits.len() / vocab;
    if let Some(r) = (0..rows).find(|r| {
        logits[r * vocab..(r + 1) * vocab]
            .iter()
            .all(|x| *x == f32::NEG_INFINITY)
    }) {
        return Err(CoreError::input(
            "logits",
            format!("row {r} is entirely -inf"),
        ));
    }
    Ok(rows)
}

fn log_sum_exp(row: &[f32]) -> f64 {
    let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let s: f64 = row.iter().map(|&x| (x as f64 - m).exp()).sum();
    m + s.ln()
}

/// Token rarity from unigram counts: min-max normalised −ln((c + 1) / (Σc + V)).
#[derive(Debug, Clone, PartialEq)]
pub struct RarityTable {
    values: Vec<f32>,
}

impl RarityTable {
    /// Builds the table from non-negative finite counts, one per vocabulary id.
    pub fn from_counts(counts: &[f64]) -> Result<Self> {
        if counts.is_empty() {
            return Err(CoreError::input("unigram_counts", "is empty"));
        }
        if let Some(i) = counts.iter().position(|c| !c.is_finite() || *c < 0.0) {
            return Err(CoreError::input(
                "unigram_counts",
                format!("value {} at index {i} is not finite and >= 0", counts[i]),
            ));
        }
        let total: f64 = counts.iter().sum::<f64>() + counts.len() as f64;
        let s: Vec<f64> = counts.iter().map(|c| -((c + 1.0) / total).ln()).collect();
        let lo = s.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let span = hi - lo;
        let values = s
            .iter()
            .map(|v| {
                if span > 0.0 {
                    ((v - lo) / span) as f32
                } else {
                    0.0
                }
            })
            .collect();
        Ok(Self { values })
    }

    /// Vocabulary size of the table.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// True if the table is empty (never, once built).
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// Rarity of `id`; ids outside the table are an error naming `token_ids`.
    pub fn get(&self, id: i64) -> Result<f32> {
        usize::try_from(id)
            .ok()
            .and_then(|i| self.values.get(i).copied())
            .ok_or_else(|| {
                CoreError::input(
                    "token_ids",
                    format!(
                        "id {id} is outside the unigram table of size {}",
                        self.values.len()
                    ),
                )
            })
    }
}

/// Positional prior exp(−p / τ): early tokens of a sequence count as harder. Streams by
/// multiplying with exp(−1/τ) per token (no `exp` per token).
#[derive(Debug, Clone)]
pub struct PositionPrior {
    value: f64,
    decay: f64,
}

impl PositionPrior {
    /// The prior at position 0 for decay length `tau` (> 0).
    pub fn new(tau: f64) -> Self {
        Self {
            value: 1.0,
            decay: (-1.0 / tau).exp(),
        }
    }

    /// The prior of the current position; advances to the next one.
    pub fn advance(&mut self) -> f32 {
        let v = self.value;
        // Flush to zero well before denormals (they are slow and meaningless here).
        self.value = if v > 1e-30 { v * self.decay } else { 0.0 };
        v as f32
    }
}

/// Probe normalisation x / (x + scale) for a non-negative probe value.
pub fn probe_norm(x: f32, scale: f64) -> f32 {
    (x as f64 / (x as f64 + scale)) as f32
}

fn mix(mut z: u64) -> u64 {
    // splitmix64 finaliser
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Streaming n-gram novelty: is the n-gram ending at this token absent from the last `window`
/// positions? Exact up to 64-bit hash collisions of distinct n-grams.
///
/// Two tables by epoch of `window` tokens: `cur` holds n-grams that ended in this epoch, `prev`
/// those of the previous one, so every occurrence within the window is in one of them. At an
/// epoch change `prev` is dropped and `cur` becomes `prev`: no deletions, no tombstones, and
/// neither table ever holds more than `window` entries.
#[derive(Debug, Clone)]
pub struct NoveltyTracker {
    n: usize,
    window: usize,
    /// The last n ids, ring buffer; `head` is where the next id goes.
    recent: [i64; MAX_NGRAM],
    head: usize,
    cur: GramTable,
    prev: GramTable,
    pos: usize,
    epoch_end: usize,
}

/// Largest supported n of the novelty signal.
pub const MAX_NGRAM: usize = 16;

impl NoveltyTracker {
    /// A tracker for n-grams of length `n` (1..=16) over a rolling `window` of positions.
    pub fn new(n: usize, window: usize) -> Self {
        let n = n.clamp(1, MAX_NGRAM);
        let window = window.max(1);
        Self {
            n,
            window,
            recent: [0; MAX_NGRAM],
            head: 0,
            cur: GramTable::new(window),
            prev: GramTable::new(window),
            pos: 0,
            epoch_end: window,
        }
    }

    /// Bytes the two n-gram tables of a tracker with this `window` hold.
    pub fn table_bytes(window: usize) -> usize {
        2 * GramTable::slots(window) * (std::mem::size_of::<u64>() + std::mem::size_of::<usize>())
    }

    /// Feeds the next token; returns 1.0 if its n-gram is novel in the window, else 0.0.
    pub fn push(&mut self, id: i64) -> f32 {
        self.remember(id);
        let len = self.n.min(self.pos + 1);
        // Before the ring has wrapped the ids sit at 0..=t; after, the oldest is at `head`.
        let start = if len == self.n { self.head } else { 0 };
        let h = gram_hash((0..len).map(|age| {
            let k = start + age;
            self.recent[if k >= self.n { k - self.n } else { k }]
        }));
        self.observe(h)
    }

    /// Feeds a run of tokens: the same values as `push` one by one, bit for bit. All n-gram
    /// hashes are computed first (independent of each other, so they overlap in the pipeline),
    /// then looked up in order: about twice as fast as `push` on a prefill sequence.
    pub fn push_all(&mut self, ids: &[i64]) -> Vec<f32> {
        // The ids before this run that its first n-grams reach back to, oldest first.
        let seen = (self.n - 1).min(self.pos);
        let mut ctx: Vec<i64> = (0..seen)
            .map(|age| {
                // `head` is where the next id goes: the id of age a (a = 1 newest) before it
                let back = seen - age;
                self.recent[(self.head + self.n - back) % self.n]
            })
            .collect();
        ctx.extend_from_slice(ids);
        let hashes: Vec<u64> = (0..ids.len())
            .map(|i| {
                let end = seen + i + 1;
                let len = self.n.min(self.pos + i + 1);
                gram_hash(ctx[end - len..end].iter().copied())
            })
            .collect();
        hashes
            .iter()
            .zip(ids)
            .map(|(&h, &id)| {
                self.remember(id);
                self.observe(h)
            })
            .collect()
    }

    /// Puts `id` into the ring of the last n ids.
    #[inline(always)]
    fn remember(&mut self, id: i64) {
        self.recent[self.head] = id;
        self.head = if self.head + 1 == self.n {
            0
        } else {
            self.head + 1
        };
    }

    /// Records the n-gram hash `h` at the current position and says whether it was novel.
    #[inline(always)]
    fn observe(&mut self, h: u64) -> f32 {
        let t = self.pos;
        if t == self.epoch_end {
            std::mem::swap(&mut self.cur, &mut self.prev);
            self.cur.clear();
            self.epoch_end += self.window;
        }
        self.pos += 1;
        // An occurrence in this epoch is always within the window.
        if self.cur.insert(h, t).is_some() {
            return 0.0;
        }
        match self.prev.get(h) {
            Some(u) if u + self.window >= t => 0.0,
            _ => 1.0,
        }
    }
}

/// Hash of an n-gram given oldest id first: each id is mixed with its age independently of the
/// others (no serial chain between them, so the mixes overlap in the pipeline), then the sum is
/// mixed once more.
#[inline(always)]
fn gram_hash(ids: impl ExactSizeIterator<Item = i64>) -> u64 {
    let mut acc = mix(ids.len() as u64);
    for (age, id) in ids.enumerate() {
        let salted = (id as u64) ^ (age as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        acc = acc.wrapping_add(mix(salted));
    }
    mix(acc)
}

/// Open-addressing table of n-gram hash -> last position, for at most `window` entries per
/// epoch (load ≤ 1/4, short probe runs). Key 0 marks an empty slot, so a hash of 0 is stored as 1.
#[derive(Debug, Clone)]
struct GramTable {
    keys: Vec<u64>,
    pos: Vec<usize>,
    mask: usize,
}

impl GramTable {
    fn new(window: usize) -> Self {
        let cap = Self::slots(window);
        Self {
            keys: vec![0; cap],
            pos: vec![0; cap],
            mask: cap - 1,
        }
    }

    /// Slots for `window` entries: ≤ window entries per epoch at load ≤ 1/4, so a probe always
    /// finds an empty slot.
    fn slots(window: usize) -> usize {
        (4 * window.max(1)).next_power_of_two().max(8)
    }

    fn clear(&mut self) {
        self.keys.fill(0);
    }

    /// Slot of `h`, or of the empty slot where it would go.
    fn slot(&self, h: u64) -> usize {
        let mut i = (h as usize) & self.mask;
        loop {
            let k = self.keys[i];
            if k == h || k == 0 {
                return i;
            }
            i = (i + 1) & self.mask;
        }
    }

    /// Stores `t` for `h`; returns the previous position if `h` was present.
    fn insert(&mut self, h: u64, t: usize) -> Option<usize> {
        let h = h.max(1);
        let i = self.slot(h);
        let old = (self.keys[i] == h).then_some(self.pos[i]);
        self.keys[i] = h;
        self.pos[i] = t;
        old
    }

    fn get(&self, h: u64) -> Option<usize> {
        let h = h.max(1);
        let i = self.slot(h);
        (self.keys[i] == h).then_some(self.pos[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entropy_of_uniform_is_one_and_of_peaked_is_small() {
        let e = entropy_from_logits(&[0.0, 0.0, 0.0, 0.0, 30.0, 0.0, 0.0, 0.0], 4).unwrap();
        assert!((e[0] - 1.0).abs() < 1e-6);
        assert!(e[1] < 1e-6);
    }

    #[test]
    fn surprisal_matches_formula() {
        let s = surprisal_from_logits(&[0.0, 0.0, 0.0, 0.0], 4, &[2]).unwrap();
        assert!((s[0] - 1.0).abs() < 1e-6); // -ln(1/4)/ln 4 = 1
        let s = surprisal_from_logits(&[1.0, 0.0], 2, &[0]).unwrap();
        let want = -(1.0f64.exp() / (1.0f64.exp() + 1.0)).ln() / 2f64.ln();
        assert!((s[0] as f64 - want).abs() < 1e-6);
    }

    #[test]
    fn logits_errors() {
        assert_eq!(
            entropy_from_logits(&[f32::NAN, 0.0], 2)
                .unwrap_err()
                .param(),
            "logits"
        );
        assert!(entropy_from_logits(&[0.0, 0.0, 0.0], 2).is_err());
        assert!(entropy_from_logits(&[f32::NEG_INFINITY, f32::NEG_INFINITY], 2).is_err());
        assert_eq!(
            surprisal_from_logits(&[0.0, 0.0], 2, &[5])
                .unwrap_err()
                .param(),
            "token_ids"
        );
    }

    #[test]
    fn push_all_matches_push_bit_for_bit() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let ids: Vec<i64> = (0..3000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x % 7) as i64 // a small vocabulary, so n-grams repeat
            })
            .collect();
        for n in [1, 2, 3, 5, 16] {
            for window in [1, 3, 64, 1000] {
                let mut one = NoveltyTracker::new(n, window);
                let want: Vec<f32> = ids.iter().map(|&i| one.push(i)).collect();
                // runs of every shape, with single pushes in between: the state carries over
                let mut many = NoveltyTracker::new(n, window);
                let mut got = many.push_all(&ids[..1]);
                got.push(many.push(ids[1]));
                got.extend(many.push_all(&ids[2..2]));
                got.extend(many.push_all(&ids[2..4]));
                got.extend(many.push_all(&ids[4..1500]));
                got.push(many.push(ids[1500]));
                got.extend(many.push_all(&ids[1501..]));
                assert_eq!(got, want, "n={n} window={window}");
                if n <= 2 {
                    assert!(want.contains(&0.0) && want.contains(&1.0));
                }
            }
        }
    }

    #[test]
    fn novelty_repeats_within_window() {
        let mut t = NoveltyTracker::new(2, 3);
        let out: Vec<f32> = [1, 2, 1, 2, 9, 9, 9, 9, 1, 2]
            .iter()
            .map(|&i| t.push(i))
            .collect();
        // grams: [1] [1,2] [2,1] [1,2]* [2,9] [9,9] [9,9]* [9,9]* [9,1] [1,2](last at 3, 9-3>3)
        assert_eq!(out, vec![1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0]);
    }

    #[test]
    fn rarity_is_normalised() {
        let r = RarityTable::from_counts(&[100.0, 0.0, 10.0]).unwrap();
        assert_eq!(r.get(0).unwrap(), 0.0);
        assert_eq!(r.get(1).unwrap(), 1.0);
        assert!(r.get(3).is_err());
        assert!(RarityTable::from_counts(&[-1.0]).is_err());
    }
}
