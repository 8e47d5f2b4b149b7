//! `_core.Config`: builds and validates a `SchedulerConfig` from Python keyword arguments.
//!
//! Every argument is optional: a missing one takes the core's default
//! (`SchedulerConfig::default()`), which Python reads back through `Config.default()` and the
//! getters, so the defaults are written once, in `chunkwise-core`. Each argument is converted
//! here, by hand, so a value of the wrong type raises `chunkwise.ConfigError` naming it.

use std::collections::HashMap;

use chunkwise_core::config::default_cuts;
use chunkwise_core::{RungMode, SchedulerConfig, DEFAULT_RUNGS};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::errors::{config_err, IntoPyResult};

/// A validated scheduler configuration (immutable). Python users build it through
/// `chunkwise.SchedulerConfig`, which forwards its fields here.
#[pyclass(module = "chunkwise._core", frozen)]
pub struct Config {
    pub inner: SchedulerConfig,
}

/// `value` converted to `T`, or a `ConfigError` naming `param` (None stays None).
fn arg<'py, T: FromPyObjectOwned<'py>>(
    py: Python<'py>,
    param: &str,
    value: Option<&Bound<'py, PyAny>>,
    expected: &str,
) -> PyResult<Option<T>> {
    match value {
        None => Ok(None),
        Some(v) if v.is_none() => Ok(None),
        Some(v) => v.extract::<T>().map(Some).map_err(|e| {
            let ty = v
                .get_type()
                .name()
                .map(|n| n.to_string())
                .unwrap_or_else(|_| "?".into());
            let why: PyErr = e.into();
            config_err(py, param, format!("expected {expected}, got {ty} ({why})"))
        }),
    }
}

/// A count (`usize`) from an int argument: negative values and non-ints are `ConfigError`s.
fn count(
    py: Python<'_>,
    param: &str,
    value: Option<&Bound<'_, PyAny>>,
    default: usize,
) -> PyResult<usize> {
    match arg::<i64>(py, param, value, "an int")? {
        None => Ok(default),
        Some(v) => {
            usize::try_from(v).map_err(|_| config_err(py, param, format!("{v} must be >= 0")))
        }
    }
}

/// A rank (`u32`) from an int argument.
fn rank(py: Python<'_>, param: &str, v: i64) -> PyResult<u32> {
    u32::try_from(v).map_err(|_| config_err(py, param, format!("{v} is not a rank in [0, 2^32)")))
}

fn rung_mode(
    py: Python<'_>,
    mode: &str,
    m: usize,
    quantiles: Option<Vec<f64>>,
    target: Option<f64>,
) -> PyResult<RungMode> {
    match (mode, quantiles, target) {
        ("threshold", None, None) => Ok(RungMode::Threshold),
        ("quantile", q, None) => Ok(RungMode::Quantile(
            q.unwrap_or_else(|| default_cuts(m.max(1))),
        )),
        ("target", None, Some(t)) => Ok(RungMode::Target(t)),
        ("target", None, None) => Err(config_err(
            py,
            "target_mean_rank",
            "is required when mode='target'",
        )),
        ("threshold" | "target", Some(_), _) => Err(config_err(
            py,
            "quantiles",
            format!("only applies to mode='quantile', not '{mode}'"),
        )),
        ("threshold" | "quantile", _, Some(_)) => Err(config_err(
            py,
            "target_mean_rank",
            format!("only applies to mode='target', not '{mode}'"),
        )),
        _ => Err(config_err(
            py,
            "mode",
            format!("unknown mode '{mode}' (expected 'threshold', 'quantile' or 'target')"),
        )),
    }
}

fn set_weights(
    py: Python<'_>,
    cfg: &mut SchedulerConfig,
    weights: HashMap<String, f64>,
) -> PyResult<()> {
    for (name, value) in weights {
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
                    format!(
                        "unknown signal '{other}' (expected entropy, surprisal, novelty, rarity, position, probe)"
                    ),
                ))
            }
        };
        *slot = value;
    }
    Ok(())
}

#[pymethods]
impl Config {
    #[new]
    #[pyo3(signature = (*, rungs=None, rung_scales=None, mode=None, thresholds=None, quantiles=None,
        target_mean_rank=None, min_len=None, max_len=None, granularity=None, chunk_penalty=None,
        crossfade=None, hysteresis=None, budget_share=None, budget_rank=None, weights=None, ngram=None,
        novelty_window=None, ema=None, position_tau=None, probe_scale=None))]
    #[allow(clippy::too_many_arguments)]
    fn new<'py>(
        py: Python<'py>,
        rungs: Option<&Bound<'py, PyAny>>,
        rung_scales: Option<&Bound<'py, PyAny>>,
        mode: Option<&Bound<'py, PyAny>>,
        thresholds: Option<&Bound<'py, PyAny>>,
        quantiles: Option<&Bound<'py, PyAny>>,
        target_mean_rank: Option<&Bound<'py, PyAny>>,
        min_len: Option<&Bound<'py, PyAny>>,
        max_len: Option<&Bound<'py, PyAny>>,
        granularity: Option<&Bound<'py, PyAny>>,
        chunk_penalty: Option<&Bound<'py, PyAny>>,
        crossfade: Option<&Bound<'py, PyAny>>,
        hysteresis: Option<&Bound<'py, PyAny>>,
        budget_share: Option<&Bound<'py, PyAny>>,
        budget_rank: Option<&Bound<'py, PyAny>>,
        weights: Option<&Bound<'py, PyAny>>,
        ngram: Option<&Bound<'py, PyAny>>,
        novelty_window: Option<&Bound<'py, PyAny>>,
        ema: Option<&Bound<'py, PyAny>>,
        position_tau: Option<&Bound<'py, PyAny>>,
        probe_scale: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Self> {
        let rungs: Vec<u32> = match arg::<Vec<i64>>(py, "rungs", rungs, "a sequence of ints")? {
            None => DEFAULT_RUNGS.to_vec(),
            Some(r) => r
                .into_iter()
                .map(|v| rank(py, "rungs", v))
                .collect::<PyResult<_>>()?,
        };
        let m = rungs.len();
        let mut cfg = SchedulerConfig::with_rungs(rungs);
        let floats = "a sequence of floats";
        if let Some(s) = arg::<Vec<f64>>(py, "rung_scales", rung_scales, floats)? {
            cfg.rung_scales = s;
        }
        if let Some(t) = arg::<Vec<f64>>(py, "thresholds", thresholds, floats)? {
            cfg.thresholds = t;
        }
        let mode = arg::<String>(py, "mode", mode, "a str")?;
        cfg.mode = rung_mode(
            py,
            mode.as_deref().unwrap_or("threshold"),
            m,
            arg::<Vec<f64>>(py, "quantiles", quantiles, floats)?,
            arg::<f64>(py, "target_mean_rank", target_mean_rank, "a float")?,
        )?;
        let d = SchedulerConfig::default();
        cfg.min_len = count(py, "min_len", min_len, d.min_len)?;
        cfg.max_len = count(py, "max_len", max_len, d.max_len)?;
        cfg.granularity = count(py, "granularity", granularity, d.granularity)?;
        cfg.crossfade = count(py, "crossfade", crossfade, d.crossfade)?;
        cfg.ngram = count(py, "ngram", ngram, d.ngram)?;
        cfg.novelty_window = count(py, "novelty_window", novelty_window, d.novelty_window)?;
        let float = |param: &str, v: Option<&Bound<'py, PyAny>>, default: f64| -> PyResult<f64> {
            Ok(arg::<f64>(py, param, v, "a float")?.unwrap_or(default))
        };
        cfg.chunk_penalty = float("chunk_penalty", chunk_penalty, d.chunk_penalty)?;
        cfg.hysteresis = float("hysteresis", hysteresis, d.hysteresis)?;
        cfg.budget_share = float("budget_share", budget_share, d.budget_share)?;
        cfg.ema = float("ema", ema, d.ema)?;
        cfg.position_tau = float("position_tau", position_tau, d.position_tau)?;
        cfg.probe_scale = float("probe_scale", probe_scale, d.probe_scale)?;
        if let Some(b) = arg::<i64>(py, "budget_rank", budget_rank, "an int")? {
            cfg.budget_rank = rank(py, "budget_rank", b)?;
        }
        let mapping = "a mapping of signal name to float";
        if let Some(w) = arg::<HashMap<String, f64>>(py, "weights", weights, mapping)? {
            set_weights(py, &mut cfg, w)?;
        }
        cfg.validate().py_err(py)?;
        Ok(Self { inner: cfg })
    }

    /// The configuration with every default (the defaults Python's `SchedulerConfig` shows).
    #[staticmethod]
    fn default() -> Self {
        Self {
            inner: SchedulerConfig::default(),
        }
    }

    /// The ladder's ranks.
    #[getter]
    fn rungs(&self) -> Vec<u32> {
        self.inner.rungs.clone()
    }

    /// The per-rung scales.
    #[getter]
    fn rung_scales(&self) -> Vec<f64> {
        self.inner.rung_scales.clone()
    }

    /// `"threshold"`, `"quantile"` or `"target"`.
    #[getter]
    fn mode(&self) -> &'static str {
        match self.inner.mode {
            RungMode::Threshold => "threshold",
            RungMode::Quantile(_) => "quantile",
            RungMode::Target(_) => "target",
        }
    }

    /// The resolved base thresholds.
    #[getter]
    fn thresholds(&self) -> Vec<f64> {
        self.inner.thresholds.clone()
    }

    /// The cumulative token shares of quantile mode (None in the other modes).
    #[getter]
    fn quantiles(&self) -> Option<Vec<f64>> {
        match &self.inner.mode {
            RungMode::Quantile(q) => Some(q.clone()),
            _ => None,
        }
    }

    /// The mean rank target mode aims for (None in the other modes).
    #[getter]
    fn target_mean_rank(&self) -> Option<f64> {
        match self.inner.mode {
            RungMode::Target(t) => Some(t),
            _ => None,
        }
    }

    #[getter]
    fn min_len(&self) -> usize {
        self.inner.min_len
    }

    #[getter]
    fn max_len(&self) -> usize {
        self.inner.max_len
    }

    #[getter]
    fn granularity(&self) -> usize {
        self.inner.granularity
    }

    #[getter]
    fn chunk_penalty(&self) -> f64 {
        self.inner.chunk_penalty
    }

    #[getter]
    fn crossfade(&self) -> usize {
        self.inner.crossfade
    }

    #[getter]
    fn hysteresis(&self) -> f64 {
        self.inner.hysteresis
    }

    #[getter]
    fn budget_share(&self) -> f64 {
        self.inner.budget_share
    }

    /// The rank from which a rung counts against the budget.
    #[getter]
    fn budget_rank(&self) -> u32 {
        self.inner.budget_rank
    }

    /// The weight of every signal.
    #[getter]
    fn weights<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let w = &self.inner.weights;
        let d = PyDict::new(py);
        for (name, value) in [
            ("entropy", w.entropy),
            ("surprisal", w.surprisal),
            ("novelty", w.novelty),
            ("rarity", w.rarity),
            ("position", w.position),
            ("probe", w.probe),
        ] {
            d.set_item(name, value)?;
        }
        Ok(d)
    }

    #[getter]
    fn ngram(&self) -> usize {
        self.inner.ngram
    }

    #[getter]
    fn novelty_window(&self) -> usize {
        self.inner.novelty_window
    }

    #[getter]
    fn ema(&self) -> f64 {
        self.inner.ema
    }

    #[getter]
    fn position_tau(&self) -> f64 {
        self.inner.position_tau
    }

    #[getter]
    fn probe_scale(&self) -> f64 {
        self.inner.probe_scale
    }

    fn __repr__(&self) -> String {
        format!("{:?}", self.inner)
    }
}
