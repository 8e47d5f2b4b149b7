//! `_core.Config`: builds and validates a `SchedulerConfig` from Python keyword arguments.

use std::collections::HashMap;

use chunkwise_core::config::default_cuts;
use chunkwise_core::{RungMode, SchedulerConfig};
use pyo3::prelude::*;

use crate::errors::{config_err, IntoPyResult};

/// A validated scheduler configuration (immutable). Python users build it through
/// `chunkwise.SchedulerConfig`, which forwards its fields here.
#[pyclass(module = "chunkwise._core", frozen)]
pub struct Config {
    pub inner: SchedulerConfig,
}

fn nonneg(py: Python<'_>, param: &str, v: i64) -> PyResult<usize> {
    usize::try_from(v).map_err(|_| config_err(py, param, format!("{v} must be >= 0")))
}

#[pymethods]
impl Config {
    #[new]
    #[pyo3(signature = (*, rungs, rung_scales=None, mode="threshold", thresholds=None, quantiles=None,
        target_mean_rank=None, min_len=16, max_len=128, granularity=8, chunk_penalty=0.5, crossfade=4, hysteresis=0.05,
        budget_share=1.0, budget_rank=None, weights=None, ngram=2, novelty_window=256, ema=0.3,
        position_tau=64.0, probe_scale=1.0))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        rungs: Vec<i64>,
        rung_scales: Option<Vec<f64>>,
        mode: &str,
        thresholds: Option<Vec<f64>>,
        quantiles: Option<Vec<f64>>,
        target_mean_rank: Option<f64>,
        min_len: i64,
        max_len: i64,
        granularity: i64,
        chunk_penalty: f64,
        crossfade: i64,
        hysteresis: f64,
        budget_share: f64,
        budget_rank: Option<i64>,
        weights: Option<HashMap<String, f64>>,
        ngram: i64,
        novelty_window: i64,
        ema: f64,
        position_tau: f64,
        probe_scale: f64,
    ) -> PyResult<Self> {
        let rungs: Vec<u32> = rungs
            .iter()
            .map(|&r| {
                u32::try_from(r)
                    .map_err(|_| config_err(py, "rungs", format!("{r} is not a rank in [0, 2^32)")))
            })
            .collect::<PyResult<_>>()?;
        let m = rungs.len();
        let mut cfg = SchedulerConfig::with_rungs(rungs);
        if let Some(s) = rung_scales {
            cfg.rung_scales = s;
        }
        if let Some(t) = thresholds {
            cfg.thresholds = t;
        }
        cfg.mode = match (mode, quantiles, target_mean_rank) {
            ("threshold", None, None) => RungMode::Threshold,
            ("quantile", q, None) => {
                RungMode::Quantile(q.unwrap_or_else(|| default_cuts(m.max(1))))
            }
            ("target", None, Some(t)) => RungMode::Target(t),
            ("target", None, None) => {
                return Err(config_err(
                    py,
                    "target_mean_rank",
                    "is required when mode='target'",
                ))
            }
            ("threshold" | "target", Some(_), _) => {
                return Err(config_err(
                    py,
                    "quantiles",
                    format!("only applies to mode='quantile', not '{mode}'"),
                ))
            }
            ("threshold" | "quantile", _, Some(_)) => {
                return Err(config_err(
                    py,
                    "target_mean_rank",
                    format!("only applies to mode='target', not '{mode}'"),
                ))
            }
            _ => {
                return Err(config_err(
                    py,
                    "mode",
                    format!("unknown mode '{mode}' (expected 'threshold', 'quantile' or 'target')"),
                ))
            }
        };
        cfg.min_len = nonneg(py, "min_len", min_len)?;
        cfg.max_len = nonneg(py, "max_len", max_len)?;
        cfg.granularity = nonneg(py, "granularity", granularity)?;
        cfg.chunk_penalty = chunk_penalty;
        cfg.crossfade = nonneg(py, "crossfade", crossfade)?;
        cfg.hysteresis = hysteresis;
        cfg.budget_share = budget_share;
        if let Some(b) = budget_rank {
            cfg.budget_rank = u32::try_from(b)
                .map_err(|_| config_err(py, "budget_rank", format!("{b} is not a rung")))?;
        }
        for (name, value) in weights.unwrap_or_default() {
            let w = &mut cfg.weights;
            let slot = match name.as_str() {
                "entropy" => &mut w.entropy,
                "surprisal" => &mut w.surprisal,
                "novelty" => &mut w.novelty,
                "rarity" => &mut w.rarity,
                "position" => &mut w.position,
                "probe" => &mut w.probe,
                other => {
                    return Err(config_err(
                        py,
                        "weights",
                        format!("unknown signal '{other}' (expected entropy, surprisal, novelty, rarity, position, probe)"),
                    ))
                }
            };
            *slot = value;
        }
        cfg.ngram = nonneg(py, "ngram", ngram)?;
        cfg.novelty_window = nonneg(py, "novelty_window", novelty_window)?;
        cfg.ema = ema;
        cfg.position_tau = position_tau;
        cfg.probe_scale = probe_scale;
        cfg.validate().py_err(py)?;
        Ok(Self { inner: cfg })
    }

    /// The ladder's ranks.
    #[getter]
    fn rungs(&self) -> Vec<u32> {
        self.inner.rungs.clone()
    }

    /// The resolved base thresholds.
    #[getter]
    fn thresholds(&self) -> Vec<f64> {
        self.inner.thresholds.clone()
    }

    /// The per-rung scales.
    #[getter]
    fn rung_scales(&self) -> Vec<f64> {
        self.inner.rung_scales.clone()
    }

    /// The rank from which a rung counts against the budget.
    #[getter]
    fn budget_rank(&self) -> u32 {
        self.inner.budget_rank
    }

    fn __repr__(&self) -> String {
        format!("{:?}", self.inner)
    }
}
