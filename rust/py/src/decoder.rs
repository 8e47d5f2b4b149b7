//! `_core.DecodeBatch`: streaming decode state for a batch, writing each step's decisions into
//! numpy arrays allocated once (no allocation per step).

use std::sync::Arc;

use chunkwise_core::decode::{DecodeBatch as CoreBatch, StepBuffers};
use chunkwise_core::difficulty::SignalArrays;
use chunkwise_core::Planner;
use numpy::{PyArray1, PyArrayMethods};
use pyo3::prelude::*;

use crate::arrays::{array1, opt_array1, opt_slice, slice};
use crate::errors::{input_err, int_arg, IntoPyResult};
use crate::scheduler::Scheduler;

/// Per-step outputs, one entry per sequence; rewritten in place by every `step`.
/// Mutable view of one output array; a borrow conflict is an error, not a panic.
fn borrow<'py, T: numpy::Element>(
    arr: &'py Py<PyArray1<T>>,
    py: Python<'py>,
) -> PyResult<numpy::PyReadwriteArray1<'py, T>> {
    arr.bind(py).try_readwrite().map_err(|e| {
        crate::errors::chunkwise_err(
            py,
            "StateError",
            "out",
            format!("out: output array is in use ({e})"),
        )
    })
}

#[pyclass(module = "chunkwise._core")]
pub struct DecodeBatch {
    planner: Arc<Planner>,
    inner: CoreBatch,
    #[pyo3(get)]
    rank: Py<PyArray1<i32>>,
    #[pyo3(get)]
    lo: Py<PyArray1<i32>>,
    #[pyo3(get)]
    gate_lo: Py<PyArray1<f32>>,
    #[pyo3(get)]
    gate_hi: Py<PyArray1<f32>>,
    #[pyo3(get)]
    scale: Py<PyArray1<f32>>,
    #[pyo3(get)]
    rung: Py<PyArray1<i32>>,
    #[pyo3(get)]
    difficulty: Py<PyArray1<f32>>,
    #[pyo3(get)]
    new_chunk: Py<PyArray1<bool>>,
}

#[pymethods]
impl DecodeBatch {
    /// `batch_size` fresh sequences planned by `scheduler`; `thresholds` default to the config's
    /// (pass `plan.thresholds` to continue a quantile / target plan).
    #[new]
    #[pyo3(signature = (scheduler, batch_size, thresholds=None))]
    fn new(
        py: Python<'_>,
        scheduler: &Scheduler,
        batch_size: &Bound<'_, PyAny>,
        thresholds: Option<Vec<f64>>,
    ) -> PyResult<Self> {
        let batch_size = int_arg(py, "batch_size", batch_size)?;
        let b = usize::try_from(batch_size)
            .map_err(|_| input_err(py, "batch_size", format!("{batch_size} is negative")))?;
        let planner = scheduler.planner.clone();
        let inner = CoreBatch::new(&planner, b, thresholds).py_err(py)?;
        Ok(Self {
            planner,
            inner,
            rank: PyArray1::zeros(py, b, false).unbind(),
            lo: PyArray1::zeros(py, b, false).unbind(),
            gate_lo: PyArray1::zeros(py, b, false).unbind(),
            gate_hi: PyArray1::zeros(py, b, false).unbind(),
            scale: PyArray1::zeros(py, b, false).unbind(),
            rung: PyArray1::zeros(py, b, false).unbind(),
            difficulty: PyArray1::zeros(py, b, false).unbind(),
            new_chunk: PyArray1::zeros(py, b, false).unbind(),
        })
    }

    /// Advances every sequence by one token (`token_ids`: int64, one per sequence; optional
    /// float32 signals, one per sequence). Results land in this object's arrays.
    #[pyo3(signature = (token_ids, *, entropy=None, surprisal=None, probe=None))]
    fn step(
        &mut self,
        py: Python<'_>,
        token_ids: &Bound<'_, PyAny>,
        entropy: Option<&Bound<'_, PyAny>>,
        surprisal: Option<&Bound<'_, PyAny>>,
        probe: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let ids = array1::<i64>(token_ids, "token_ids", "int64")?;
        let entropy = opt_array1::<f32>(entropy, "entropy", "float32")?;
        let surprisal = opt_array1::<f32>(surprisal, "surprisal", "float32")?;
        let probe = opt_array1::<f32>(probe, "probe", "float32")?;
        let sig = SignalArrays {
            entropy: opt_slice(&entropy),
            surprisal: opt_slice(&surprisal),
            probe: opt_slice(&probe),
        };
        let mut rank = borrow(&self.rank, py)?;
        let mut lo = borrow(&self.lo, py)?;
        let mut gate_lo = borrow(&self.gate_lo, py)?;
        let mut gate_hi = borrow(&self.gate_hi, py)?;
        let mut scale = borrow(&self.scale, py)?;
        let mut rung = borrow(&self.rung, py)?;
        let mut difficulty = borrow(&self.difficulty, py)?;
        let mut new_chunk = borrow(&self.new_chunk, py)?;
        let mut out = StepBuffers {
            rank: rank.as_slice_mut()?,
            lo: lo.as_slice_mut()?,
            gate_lo: gate_lo.as_slice_mut()?,
            gate_hi: gate_hi.as_slice_mut()?,
            scale: scale.as_slice_mut()?,
            rung: rung.as_slice_mut()?,
            difficulty: difficulty.as_slice_mut()?,
            new_chunk: new_chunk.as_slice_mut()?,
        };
        self.inner
            .step(&self.planner, slice(&ids), sig, &mut out)
            .py_err(py)
    }

    /// Starts a new sequence in slot `index` (continuous batching).
    fn reset(&mut self, py: Python<'_>, index: &Bound<'_, PyAny>) -> PyResult<()> {
        let index = int_arg(py, "index", index)?;
        let b = usize::try_from(index)
            .map_err(|_| input_err(py, "index", format!("{index} is negative")))?;
        self.inner.reset(&self.planner, b).py_err(py)
    }

    /// Tokens on high (budgeted) rungs and tokens in total, for sequence `index`.
    fn counts(&self, py: Python<'_>, index: &Bound<'_, PyAny>) -> PyResult<(usize, usize)> {
        let index = int_arg(py, "index", index)?;
        usize::try_from(index)
            .ok()
            .and_then(|b| self.inner.seq(b))
            .map(|s| s.counts())
            .ok_or_else(|| {
                input_err(
                    py,
                    "index",
                    format!("{index} is outside the batch of {}", self.inner.len()),
                )
            })
    }

    /// The thresholds in use.
    #[getter]
    fn thresholds(&self) -> Vec<f64> {
        self.inner.thresholds().to_vec()
    }

    /// Number of sequences.
    fn __len__(&self) -> usize {
        self.inner.len()
    }
}
