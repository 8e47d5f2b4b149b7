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
        let w = &cfg.weights;
        let mut num = 0.0f64;
        let mut den = 0.0f64;
        let mut add = |weight: f64, value: Option<f32>| {
            if let (true, Some(v)) = (weight > 0.0, value) {
                num += weight * v as f64;
                den += weight;
            }
        };
        add(w.entropy, sig.entropy);
        add(w.surprisal, sig.surprisal);
        add(w.probe, sig.probe.map(|x| probe_norm(x, cfg.probe_scale)));
        let rare = match rarity {
            Some(table) if w.rarity > 0.0 => Some(table.get(id)?),
            _ => None,
        };
        add(w.rarity, rare);
        add(w.novelty, self.novelty.as_mut().map(|n| n.push(id)));
        add(w.position, Some(self.prior.advance()));
        self.pos += 1;
        let raw = if den > 0.0 { num / den } else { 0.0 };
        let d = match self.smoothed {
            None => raw,
            Some(prev) => cfg.ema * raw + (1.0 - cfg.ema) * prev,
        };
        self.smoothed = Some(d);
        Ok(d.clamp(0.0, 1.0) as f32)
    }
}

/// Optional per-token signal arrays of a whole (flattened) batch.
#[derive(Debug, Clone, Copy, Default)]
pub struct SignalArrays<'a> {
    pub entropy: Option<&'a [f32]>,
    pub surprisal: Option<&'a [f32]>,
    pub probe: Option<&'a [f32]>,
}

impl SignalArrays<'_> {
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
