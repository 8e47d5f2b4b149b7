//! Combining signals into one smoothed difficulty per token.
//!
//! The same [`DifficultyState`] serves prefill (fed a whole sequence) and decode (fed one token
//! per step), so both paths compute identical values for identical inputs.

use crate::config::SchedulerConfig;
use crate::error::{check_finite, check_unit, CoreError, Result};
use crate::signals::{probe_norm, NoveltyTracker, PositionPrior, RarityTable};

/// Caller-supplied signals of one token (already normalised to [0, 1], probe ≥ 0).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TokenSignals {
    pub entropy: Option<f32>,
    pub surprisal: Option<f32>,
    pub probe: Option<f32>,
}

/// Streaming state of the difficulty of one sequence.
#[derive(Debug, Clone)]
pub struct DifficultyState {
    novelty: Option<NoveltyTracker>,
    prior: PositionPrior,
    smoothed: Option<f64>,
    pos: usize,
}

impl DifficultyState {
    /// Fresh state for a new sequence.
    pub fn new(cfg: &SchedulerConfig) -> Self {
        let novelty =
            (cfg.weights.novelty > 0.0).then(|| NoveltyTracker::new(cfg.ngram, cfg.novelty_window));
        Self {
            novelty,
            prior: PositionPrior::new(cfg.position_tau),
            smoothed: None,
            pos: 0,
        }
    }

    /// Tokens seen so far.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Difficulty of the next token `id`. Inputs must have been validated
    /// (see [`validate_signals`]); the only error left is an id outside the rarity table.
    pub fn push(
        &mut self,
        cfg: &SchedulerConfig,
        rarity: Option<&RarityTable>,
        id: i64,
        sig: TokenSignals,
    ) -> Result<f32> {
        let (table, mix) = self.mix_for(
            cfg,
            rarity,
            [
                sig.entropy.is_some(),
                sig.surprisal.is_some(),
                sig.probe.is_some(),
            ],
        );
        let v = [
            sig.entropy.unwrap_or(0.0),
            sig.surprisal.unwrap_or(0.0),
            sig.probe.map_or(0.0, |x| probe_norm(x, cfg.probe_scale)),
            table.map_or(Ok(0.0), |t| t.get(id))?,
        ];
        Ok(self.advance(cfg, &mix, id, v))
    }

    /// Difficulties of a whole sequence: the same values as `push` token by token, bit for
    /// bit, computed column by column. Each present signal is one pass adding `w·value` in the
    /// same order `Mix::raw` uses (a skipped signal would add exactly +0.0), so the passes
    /// vectorise and only the EMA is serial. Inputs must have been validated.
    pub fn push_sequence(
        &mut self,
        cfg: &SchedulerConfig,
        rarity: Option<&RarityTable>,
        ids: &[i64],
        sig: SignalArrays<'_>,
    ) -> Result<Vec<f32>> {
        let (table, mix) = self.mix_for(
            cfg,
            rarity,
            [
                sig.entropy.is_some(),
                sig.surprisal.is_some(),
                sig.probe.is_some(),
            ],
        );
        let w = mix.w;
        let mut num = vec![0.0f64; ids.len()];
        add_column(&mut num, w[0], sig.entropy.unwrap_or(&[]).iter().copied());
        add_column(&mut num, w[1], sig.surprisal.unwrap_or(&[]).iter().copied());
        let probe = sig.probe.unwrap_or(&[]).iter();
        add_column(
            &mut num,
            w[2],
            probe.map(|&x| probe_norm(x, cfg.probe_scale)),
        );
        if let Some(tb) = table {
            let rare: Vec<f32> = ids.iter().map(|&id| tb.get(id)).collect::<Result<_>>()?;
            add_column(&mut num, w[3], rare.into_iter());
        }
        if let Some(nv) = self.novelty.as_mut() {
            add_column(&mut num, w[4], nv.push_all(ids).into_iter());
        }
        // The prior advances once per token even when its weight is 0 (decode does the same).
        let prior = &mut self.prior;
        let priors: Vec<f32> = ids.iter().map(|_| prior.advance()).collect();
        add_column(&mut num, w[5], priors.into_iter());
        self.pos += ids.len();
        let mut smoothed = self.smoothed;
        let out = num
            .iter()
            .map(|&x| {
                let raw = mix.div(x);
                let d = ema(cfg, smoothed, raw);
                smoothed = Some(d);
                d.clamp(0.0, 1.0) as f32
            })
            .collect();
        self.smoothed = smoothed;
        Ok(out)
    }

    /// The rarity table in use (only with a positive weight) and the weights of the signals
    /// present (entropy, surprisal, probe as given; rarity, novelty, position from the state).
    fn mix_for<'t>(
        &self,
        cfg: &SchedulerConfig,
        rarity: Option<&'t RarityTable>,
        given: [bool; 3],
    ) -> (Option<&'t RarityTable>, Mix) {
        let table = rarity.filter(|_| cfg.weights.rarity > 0.0);
        let has = [given[0], given[1], given[2], table.is_some()];
        (table, Mix::new(cfg, has, self.novelty.is_some()))
    }

    /// One token: the id-derived signals, the weighted mix and the EMA.
    #[inline(always)]
    fn advance(&mut self, cfg: &SchedulerConfig, mix: &Mix, id: i64, v: [f32; 4]) -> f32 {
        let raw = self.mix_raw(mix, id, v);
        let d = ema(cfg, self.smoothed, raw);
        self.smoothed = Some(d);
        d.clamp(0.0, 1.0) as f32
    }

    /// The unsmoothed difficulty of the next token (advances novelty and position).
    #[inline(always)]
    fn mix_raw(&mut self, mix: &Mix, id: i64, v: [f32; 4]) -> f64 {
        let novel = self.novelty.as_mut().map_or(0.0, |n| n.push(id));
        let prior = self.prior.advance();
        self.pos += 1;
        mix.raw([v[0], v[1], v[2], v[3], novel, prior])
    }
}

/// `num[t] += weight · column[t]` (skipped entirely when the weight is 0).
#[inline(always)]
fn add_column(num: &mut [f64], weight: f64, column: impl Iterator<Item = f32>) {
    if weight > 0.0 {
        for (x, v) in num.iter_mut().zip(column) {
            *x += weight * v as f64;
        }
    }
}

/// EMA step: the first value passes through.
#[inline(always)]
fn ema(cfg: &SchedulerConfig, prev: Option<f64>, raw: f64) -> f64 {
    match prev {
        None => raw,
        Some(p) => cfg.ema * raw + (1.0 - cfg.ema) * p,
    }
}

/// Signal weights with absent signals zeroed, in the fixed order entropy, surprisal, probe,
/// rarity, novelty, position; `raw` sums in that order so every path rounds identically.
struct Mix {
    w: [f64; 6],
    den: f64,
}

impl Mix {
    fn new(cfg: &SchedulerConfig, has: [bool; 4], novelty: bool) -> Self {
        let c = &cfg.weights;
        let on = |present: bool, w: f64| if present && w > 0.0 { w } else { 0.0 };
        let w = [
            on(has[0], c.entropy),
            on(has[1], c.surprisal),
            on(has[2], c.probe),
            on(has[3], c.rarity),
            on(novelty, c.novelty),
            on(true, c.position),
        ];
        Self {
            w,
            den: w.iter().sum(),
        }
    }

    #[inline(always)]
    fn raw(&self, v: [f32; 6]) -> f64 {
        let mut num = 0.0f64;
        for (w, x) in self.w.iter().zip(v) {
            num += w * x as f64;
        }
        self.div(num)
    }

    /// The weighted sum divided by the total weight (0 when nothing is weighted).
    #[inline(always)]
    fn div(&self, num: f64) -> f64 {
        if self.den > 0.0 {
            num / self.den
        } else {
            0.0
        }
    }
}

/// Optional per-token signal arrays of a whole (flattened) batch.
#[derive(Debug, Clone, Copy, Default)]
pub struct SignalArrays<'a> {
    pub entropy: Option<&'a [f32]>,
    pub surprisal: Option<&'a [f32]>,
    pub probe: Option<&'a [f32]>,
}

impl<'a> SignalArrays<'a> {
    /// The signals of tokens `start..end`.
    pub fn slice(&self, start: usize, end: usize) -> SignalArrays<'a> {
        SignalArrays {
            entropy: self.entropy.map(|a| &a[start..end]),
            surprisal: self.surprisal.map(|a| &a[start..end]),
            probe: self.probe.map(|a| &a[start..end]),
        }
    }

    /// Signals of token `t`.
    pub fn at(&self, t: usize) -> TokenSignals {
        TokenSignals {
            entropy: self.entropy.map(|a| a[t]),
            surprisal: self.surprisal.map(|a| a[t]),
            probe: self.probe.map(|a| a[t]),
        }
    }
}

/// Checks lengths and ranges of the signal arrays against `n` tokens.
pub fn validate_signals(sig: &SignalArrays<'_>, n: usize) -> Result<()> {
    for (name, arr) in [
        ("entropy", sig.entropy),
        ("surprisal", sig.surprisal),
        ("probe", sig.probe),
    ] {
        if let Some(a) = arr {
            if a.len() != n {
                return Err(CoreError::input(
                    name,
                    format!("has {} values for {n} tokens", a.len()),
                ));
            }
        }
    }
    if let Some(a) = sig.entropy {
        check_unit("entropy", a)?;
    }
    if let Some(a) = sig.surprisal {
        check_unit("surprisal", a)?;
    }
    if let Some(a) = sig.probe {
        check_finite("probe", a)?;
        if let Some(i) = a.iter().position(|v| *v < 0.0) {
            return Err(CoreError::input(
                "probe",
                format!("value {} at index {i} is negative", a[i]),
            ));
        }
    }
    Ok(())
}

/// Which weights are active: at least one must be, or every difficulty would be 0.
pub fn check_some_weight(
    cfg: &SchedulerConfig,
    sig: &SignalArrays<'_>,
    has_rarity: bool,
) -> Result<()> {
    let w = &cfg.weights;
    let any = (w.entropy > 0.0 && sig.entropy.is_some())
        || (w.surprisal > 0.0 && sig.surprisal.is_some())
        || (w.probe > 0.0 && sig.probe.is_some())
        || (w.rarity > 0.0 && has_rarity)
        || w.novelty > 0.0
        || w.position > 0.0;
    if any {
        Ok(())
    } else {
        Err(CoreError::config(
            "weights",
            "no signal with a positive weight was supplied",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ema_and_weights() {
        let mut cfg = SchedulerConfig::with_rungs(vec![0, 8]);
        cfg.weights.novelty = 0.0;
        cfg.weights.position = 0.0;
        cfg.ema = 0.5;
        let mut st = DifficultyState::new(&cfg);
        let s = |e| TokenSignals {
            entropy: Some(e),
            ..Default::default()
        };
        assert_eq!(st.push(&cfg, None, 1, s(1.0)).unwrap(), 1.0);
        assert_eq!(st.push(&cfg, None, 1, s(0.0)).unwrap(), 0.5);
        assert_eq!(st.push(&cfg, None, 1, s(0.0)).unwrap(), 0.25);
    }

    #[test]
    fn bad_signals() {
        let e = [0.5, 1.5];
        let sig = SignalArrays {
            entropy: Some(&e),
            ..Default::default()
        };
        assert_eq!(validate_signals(&sig, 2).unwrap_err().param(), "entropy");
        assert_eq!(validate_signals(&sig, 3).unwrap_err().param(), "entropy");
        let p = [-1.0f32];
        let sig = SignalArrays {
            probe: Some(&p),
            ..Default::default()
        };
        assert_eq!(validate_signals(&sig, 1).unwrap_err().param(), "probe");
    }
}
