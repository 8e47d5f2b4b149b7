//! Scheduler configuration and its validation: the single place where parameters are checked.

use crate::error::{CoreError, Result};
use crate::segment::Bounds;

/// How a chunk's difficulty becomes a rung.
#[derive(Debug, Clone, PartialEq)]
pub enum RungMode {
    /// Fixed thresholds (`SchedulerConfig::thresholds`).
    Threshold,
    /// Thresholds at token-weighted quantiles of the plan's chunk difficulties.
    Quantile(Vec<f64>),
    /// Thresholds shifted so the token-weighted mean rank is at most this value.
    Target(f64),
}

/// Weights of the difficulty signals; a signal with weight 0 is ignored.
#[derive(Debug, Clone, PartialEq)]
pub struct SignalWeights {
    pub entropy: f64,
    pub surprisal: f64,
    pub novelty: f64,
    pub rarity: f64,
    pub position: f64,
    pub probe: f64,
}

impl Default for SignalWeights {
    fn default() -> Self {
        Self {
            entropy: 1.0,
            surprisal: 1.0,
            novelty: 0.5,
            rarity: 0.5,
            position: 0.25,
            probe: 1.0,
        }
    }
}

/// The default rank ladder: no adapter, then ranks 4 to 64 doubling.
/// Largest novelty window: each sequence's n-gram tables are sized for it (two tables of 4
/// 16-byte slots per entry: 8 MiB per sequence at this size, in prefill and in every decode
/// row alike).
pub const MAX_NOVELTY_WINDOW: usize = 1 << 16;

pub const DEFAULT_RUNGS: [u32; 6] = [0, 4, 8, 16, 32, 64];

/// Largest rung (rank): plans carry ranks as int32 and LoRA ranks are far below this.
pub const MAX_RANK: u32 = 1 << 16;

/// Largest rung scale and signal weight: scales reach the layers as float32 and weights are
/// summed, so a larger value would overflow to inf (and NaN difficulty) instead of meaning more.
/// A rung scale other than 0 is also at least `1 / MAX_SCALE`.
pub const MAX_SCALE: f64 = 1e6;

/// Everything the scheduler needs to turn signals into a plan. Build it, then call
/// [`SchedulerConfig::validate`] (the planner does so too).
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerConfig {
    /// Ranks of the ladder, strictly increasing, first may be 0.
    pub rungs: Vec<u32>,
    /// Per-rung LoRA scale multiplier (same length as `rungs`), finite and ≥ 0.
    pub rung_scales: Vec<f64>,
    /// Rung selection mode.
    pub mode: RungMode,
    /// Base thresholds (len = rungs − 1), non-decreasing, finite.
    pub thresholds: Vec<f64>,
    /// Minimum chunk length in tokens (≥ 1).
    pub min_len: usize,
    /// Maximum chunk length in tokens (≥ min_len).
    pub max_len: usize,
    /// Chunk boundaries fall on multiples of this many tokens (min_len and max_len must be
    /// multiples of it). 8 keeps kernel tiles rank-homogeneous and makes the DP 64× cheaper
    /// than token-level boundaries; 1 gives token-exact boundaries.
    pub granularity: usize,
    /// Cost added per chunk in the segmentation DP (≥ 0): larger means fewer, longer chunks.
    pub chunk_penalty: f64,
    /// Cross-fade width in tokens at each rank change (0 disables; ≤ min_len).
    pub crossfade: usize,
    /// Hysteresis margin on thresholds for streaming decode (≥ 0).
    pub hysteresis: f64,
    /// Max share of a sequence's tokens on rungs with rank ≥ `budget_rank`, in [0, 1].
    pub budget_share: f64,
    /// The rank from which a rung counts as "high" for the budget; must be a rung > rungs[0].
    pub budget_rank: u32,
    /// Signal weights.
    pub weights: SignalWeights,
    /// n of the n-gram novelty signal (≥ 1).
    pub ngram: usize,
    /// Rolling window of the novelty signal, in tokens (≥ 1).
    pub novelty_window: usize,
    /// EMA weight of the newest raw difficulty, in (0, 1]; 1 disables smoothing.
    pub ema: f64,
    /// Decay length of the positional prior exp(−p/τ), > 0.
    pub position_tau: f64,
    /// Saturation scale of the probe signal x/(x+scale), > 0.
    pub probe_scale: f64,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self::with_rungs(DEFAULT_RUNGS.to_vec())
    }
}

impl SchedulerConfig {
    /// A config with the given ladder and defaults everywhere else (`Default` uses
    /// [`DEFAULT_RUNGS`]). These are the defaults Python reads: the one place they are written.
    pub fn with_rungs(rungs: Vec<u32>) -> Self {
        let m = rungs.len().max(1);
        let top = rungs.last().copied().unwrap_or(0);
        Self {
            rung_scales: vec![1.0; rungs.len()],
            thresholds: default_cuts(m),
            rungs,
            mode: RungMode::Threshold,
            min_len: 16,
            max_len: 128,
            granularity: 8,
            chunk_penalty: 0.5,
            crossfade: 4,
            hysteresis: 0.05,
            budget_share: 1.0,
            budget_rank: top,
            weights: SignalWeights::default(),
            ngram: 2,
            novelty_window: 256,
            ema: 0.3,
            position_tau: 64.0,
            probe_scale: 1.0,
        }
    }

    /// Number of rungs.
    pub fn n_rungs(&self) -> usize {
        self.rungs.len()
    }

    /// Index of the first "high" rung (rank ≥ budget_rank). Valid after `validate`.
    pub fn budget_rung(&self) -> usize {
        self.rungs
            .iter()
            .position(|&r| r >= self.budget_rank)
            .unwrap_or(self.rungs.len())
    }

    /// Checks every parameter; the error names the first bad one.
    pub fn validate(&self) -> Result<()> {
        let m = self.rungs.len();
        if m < 2 {
            return Err(CoreError::config(
                "rungs",
                format!("need at least 2 rungs, got {m}"),
            ));
        }
        if let Some(i) = (1..m).find(|&i| self.rungs[i] <= self.rungs[i - 1]) {
            return Err(CoreError::config(
                "rungs",
                format!(
                    "must be strictly increasing, but rungs[{}]={} <= rungs[{}]={}",
                    i,
                    self.rungs[i],
                    i - 1,
                    self.rungs[i - 1]
                ),
            ));
        }
        if self.rung_scales.len() != m {
            return Err(CoreError::config(
                "rung_scales",
                format!(
                    "has {} values but there are {m} rungs",
                    self.rung_scales.len()
                ),
            ));
        }
        if let Some(&r) = self.rungs.iter().find(|&&r| r > MAX_RANK) {
            return Err(CoreError::config(
                "rungs",
                format!("{r} is larger than the largest rank {MAX_RANK}"),
            ));
        }
        // 0 or within [1/MAX_SCALE, MAX_SCALE]: a cross-fade divides by the upper rung's
        // scale, and a scale like 1e-300 would turn that ratio into inf in float32
        if let Some(s) = self.rung_scales.iter().find(|s| {
            !s.is_finite() || **s < 0.0 || **s > MAX_SCALE || (**s > 0.0 && **s < 1.0 / MAX_SCALE)
        }) {
            return Err(CoreError::config(
                "rung_scales",
                format!(
                    "{s} is neither 0 nor in [{:e}, {MAX_SCALE:e}]",
                    1.0 / MAX_SCALE
                ),
            ));
        }
        check_cuts("thresholds", &self.thresholds, m, false)?;
        match &self.mode {
            RungMode::Threshold => {}
            RungMode::Quantile(q) => {
                check_cuts("quantiles", q, m, true)?;
                if q.iter().any(|v| *v <= 0.0 || *v >= 1.0) {
                    return Err(CoreError::config("quantiles", "values must be in (0, 1)"));
                }
            }
            RungMode::Target(t) => {
                let (lo, hi) = (self.rungs[0] as f64, self.rungs[m - 1] as f64);
                if !t.is_finite() || *t < lo || *t > hi {
                    return Err(CoreError::config(
                        "target_mean_rank",
                        format!("{t} is outside the ladder's range [{lo}, {hi}]"),
                    ));
                }
            }
        }
        if self.min_len == 0 {
            return Err(CoreError::config("min_len", "must be >= 1"));
        }
        if self.max_len < self.min_len {
            return Err(CoreError::config(
                "max_len",
                format!("{} is smaller than min_len={}", self.max_len, self.min_len),
            ));
        }
        if self.max_len > 1 << 20 {
            return Err(CoreError::config("max_len", "must be <= 1048576"));
        }
        if self.granularity == 0 || self.granularity > 4096 {
            return Err(CoreError::config(
                "granularity",
                format!("{} is outside [1, 4096]", self.granularity),
            ));
        }
        for (name, v) in [("min_len", self.min_len), ("max_len", self.max_len)] {
            if v % self.granularity != 0 {
                return Err(CoreError::config(
                    name,
                    format!("{v} is not a multiple of granularity={}", self.granularity),
                ));
            }
        }
        check_nonneg("chunk_penalty", self.chunk_penalty)?;
        if self.chunk_penalty > 1e12 {
            // Costs add up over up to 2^31 chunks: keep every total finite.
            return Err(CoreError::config(
                "chunk_penalty",
                format!("{} is larger than 1e12", self.chunk_penalty),
            ));
        }
        if self.crossfade > self.min_len {
            return Err(CoreError::config(
                "crossfade",
                format!("{} is larger than min_len={}", self.crossfade, self.min_len),
            ));
        }
        check_nonneg("hysteresis", self.hysteresis)?;
        if !(0.0..=1.0).contains(&self.budget_share) {
            return Err(CoreError::config(
                "budget_share",
                format!("{} is outside [0, 1]", self.budget_share),
            ));
        }
        if !self.rungs[1..].contains(&self.budget_rank) {
            return Err(CoreError::config(
                "budget_rank",
                format!(
                    "{} is not one of the rungs above the lowest {:?}",
                    self.budget_rank,
                    &self.rungs[1..]
                ),
            ));
        }
        let w = &self.weights;
        for (name, v) in [
            ("weights.entropy", w.entropy),
            ("weights.surprisal", w.surprisal),
            ("weights.novelty", w.novelty),
            ("weights.rarity", w.rarity),
            ("weights.position", w.position),
            ("weights.probe", w.probe),
        ] {
            check_nonneg(name, v)?;
            if v > MAX_SCALE {
                return Err(CoreError::config(
                    name,
                    format!("{v} is larger than {MAX_SCALE:e}"),
                ));
            }
        }
        if self.ngram == 0 || self.ngram > 16 {
            return Err(CoreError::config(
                "ngram",
                format!("{} is outside [1, 16]", self.ngram),
            ));
        }
        if self.novelty_window == 0 || self.novelty_window > MAX_NOVELTY_WINDOW {
            return Err(CoreError::config(
                "novelty_window",
                format!(
                    "{} is outside [1, {MAX_NOVELTY_WINDOW}]",
                    self.novelty_window
                ),
            ));
        }
        if !(self.ema > 0.0 && self.ema <= 1.0) {
            return Err(CoreError::config(
                "ema",
                format!("{} is outside (0, 1]", self.ema),
            ));
        }
        check_pos("position_tau", self.position_tau)?;
        check_pos("probe_scale", self.probe_scale)?;
        Ok(())
    }

    /// The chunk-length rules of the segmentation.
    pub fn bounds(&self) -> Bounds {
        Bounds {
            min_len: self.min_len,
            max_len: self.max_len,
            granularity: self.granularity,
            penalty: self.chunk_penalty,
        }
    }

    /// Scale of the rung whose rank is `rank` (0 if the rank is not a rung).
    pub fn scale_of_rank(&self, rank: u32) -> f64 {
        self.rungs
            .iter()
            .position(|&r| r == rank)
            .map_or(0.0, |i| self.rung_scales[i])
    }
}

/// Equally spaced cut points j/m for j = 1..m−1.
pub fn default_cuts(m: usize) -> Vec<f64> {
    (1..m).map(|j| j as f64 / m as f64).collect()
}

fn check_cuts(param: &'static str, cuts: &[f64], m: usize, strict: bool) -> Result<()> {
    if cuts.len() != m - 1 {
        return Err(CoreError::config(
            param,
            format!(
                "needs {} values (one fewer than the {m} rungs), got {}",
                m - 1,
                cuts.len()
            ),
        ));
    }
    if let Some(v) = cuts.iter().find(|v| !v.is_finite()) {
        return Err(CoreError::config(param, format!("{v} is not finite")));
    }
    let bad = |a: f64, b: f64| if strict { b <= a } else { b < a };
    if let Some(i) = (1..cuts.len()).find(|&i| bad(cuts[i - 1], cuts[i])) {
        let kind = if strict {
            "strictly increasing"
        } else {
            "non-decreasing"
        };
        return Err(CoreError::config(
            param,
            format!("must be {kind}, but value {i} breaks it"),
        ));
    }
    Ok(())
}

fn check_nonneg(param: &'static str, v: f64) -> Result<()> {
    if v.is_finite() && v >= 0.0 {
        Ok(())
    } else {
        Err(CoreError::config(
            param,
            format!("{v} is not finite and >= 0"),
        ))
    }
}

fn check_pos(param: &'static str, v: f64) -> Result<()> {
    if v.is_finite() && v > 0.0 {
        Ok(())
    } else {
        Err(CoreError::config(
            param,
            format!("{v} is not finite and > 0"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_valid() {
        SchedulerConfig::with_rungs(vec![0, 4, 8, 16, 32, 64])
            .validate()
            .unwrap();
    }

    #[test]
    fn errors_name_the_parameter() {
        let base = SchedulerConfig::with_rungs(vec![0, 4, 8]);
        let mut c = base.clone();
        c.rungs = vec![0, 8, 4];
        assert_eq!(c.validate().unwrap_err().param(), "rungs");
        let mut c = base.clone();
        c.max_len = 4;
        assert_eq!(c.validate().unwrap_err().param(), "max_len");
        let mut c = base.clone();
        c.min_len = 12;
        assert_eq!(c.validate().unwrap_err().param(), "min_len");
        let mut c = base.clone();
        c.granularity = 0;
        assert_eq!(c.validate().unwrap_err().param(), "granularity");
        let mut c = base.clone();
        c.crossfade = 100;
        assert_eq!(c.validate().unwrap_err().param(), "crossfade");
        let mut c = base.clone();
        c.thresholds = vec![0.5];
        assert_eq!(c.validate().unwrap_err().param(), "thresholds");
        let mut c = base.clone();
        c.mode = RungMode::Target(100.0);
        assert_eq!(c.validate().unwrap_err().param(), "target_mean_rank");
        let mut c = base.clone();
        c.budget_rank = 0;
        assert_eq!(c.validate().unwrap_err().param(), "budget_rank");
        let mut c = base;
        c.ema = f64::NAN;
        assert_eq!(c.validate().unwrap_err().param(), "ema");
    }
}
