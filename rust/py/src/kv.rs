//! `_core.KvLedger`: the KV-cache books of a batch (positions, chunks, difficulty, attention)
//! and its eviction decisions, for `chunkwise.kv.PolicyCache`.

use chunkwise_core::kv::{KvLedger as CoreLedger, KvPolicy};
use numpy::ndarray::Array2;
use numpy::{IntoPyArray, PyArray2};
use pyo3::prelude::*;

use crate::arrays::{array1, opt_array1, opt_slice, slice};
use crate::errors::{chunkwise_err, config_err, input_err, IntoPyResult};

/// A non-negative count from Python; negative values are a ConfigError naming `param`.
fn count(py: Python<'_>, param: &str, v: i64) -> PyResult<usize> {
    usize::try_from(v).map_err(|_| config_err(py, param, format!("must be >= 0, got {v}")))
}

/// Row-major values as a [rows, cols] numpy array.
fn grid<'py, T: numpy::Element>(
    py: Python<'py>,
    rows: usize,
    values: Vec<T>,
) -> PyResult<Bound<'py, PyArray2<T>>> {
    let cols = values.len().checked_div(rows).unwrap_or(0);
    Array2::from_shape_vec((rows, cols), values)
        .map(|a| a.into_pyarray(py))
        .map_err(|e| {
            chunkwise_err(
                py,
                "StateError",
                "ledger",
                format!("ledger: ragged rows ({e})"),
            )
        })
}

#[pyclass(module = "chunkwise._core")]
pub struct KvLedger {
    inner: CoreLedger,
}

#[pymethods]
impl KvLedger {
    /// Books for `len(padding)` sequences with `padding[b]` columns of left padding.
    #[new]
    /// With `per_row`, each sequence evicts when it would alone (dead slots fill the shorter
    /// rows; mask by `valid()`).
    #[pyo3(signature = (padding, *, sinks=0, window=0, budget=None, slack=0, attention_weight=0.0, difficulty_weight=0.0, per_row=false))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        padding: Vec<i64>,
        sinks: i64,
        window: i64,
        budget: Option<i64>,
        slack: i64,
        attention_weight: f32,
        difficulty_weight: f32,
        per_row: bool,
    ) -> PyResult<Self> {
        let policy = KvPolicy {
            sinks: count(py, "sinks", sinks)?,
            window: count(py, "window", window)?,
            budget: budget.map(|b| count(py, "budget", b)).transpose()?,
            slack: count(py, "slack", slack)?,
            attention_weight,
            difficulty_weight,
        };
        let pad = padding
            .into_iter()
            .map(|p| count(py, "padding", p))
            .collect::<PyResult<Vec<_>>>()?;
        let inner = CoreLedger::new(policy, pad).py_err(py)?;
        Ok(Self {
            inner: if per_row { inner.per_row() } else { inner },
        })
    }

    /// Appends `n` tokens to every sequence; optional float32 `difficulty` and uint64 `chunk`
    /// ids, row-major [batch * n].
    #[pyo3(signature = (n, difficulty=None, chunk=None))]
    fn append(
        &mut self,
        py: Python<'_>,
        n: i64,
        difficulty: Option<&Bound<'_, PyAny>>,
        chunk: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let n =
            usize::try_from(n).map_err(|_| input_err(py, "n", format!("must be >= 0, got {n}")))?;
        let difficulty = opt_array1::<f32>(difficulty, "difficulty", "float32")?;
        let chunk = opt_array1::<u64>(chunk, "chunk", "uint64")?;
        self.inner
            .append(n, opt_slice(&difficulty), opt_slice(&chunk))
            .py_err(py)
    }

    /// Overwrites the difficulty of the newest slots (float32, row-major [batch * n]).
    fn revise_difficulty(&mut self, py: Python<'_>, values: &Bound<'_, PyAny>) -> PyResult<()> {
        let v = array1::<f32>(values, "difficulty", "float32")?;
        self.inner.revise_difficulty(slice(&v)).py_err(py)
    }

    /// Difficulty per slot, float32 [batch, len].
    fn difficulty<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray2<f32>>> {
        grid(py, self.inner.batch_size(), self.inner.difficulty())
    }

    /// Adds attention received per slot (float32, row-major [batch * len]).
    fn add_scores(&mut self, py: Python<'_>, scores: &Bound<'_, PyAny>) -> PyResult<()> {
        let s = array1::<f32>(scores, "scores", "float32")?;
        self.inner.add_scores(slice(&s)).py_err(py)
    }

    /// Evicts if over budget + slack: int64 [batch, budget] slot indices to keep (ascending),
    /// or None.
    fn evict<'py>(&mut self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyArray2<i64>>>> {
        let b = self.inner.batch_size();
        self.inner
            .evict()
            .map(|keep| grid(py, b, keep.into_iter().map(|i| i as i64).collect()))
            .transpose()
    }

    /// Which slots to keep at full precision when each sequence may hold `n_full` of them:
    /// bool [batch, len], per row the first `n_full` real slots in keep priority (sinks,
    /// recent window, best-scored middle).
    fn full_precision<'py>(
        &self,
        py: Python<'py>,
        n_full: i64,
    ) -> PyResult<Bound<'py, PyArray2<bool>>> {
        let n = count(py, "n_full", n_full)?;
        grid(py, self.inner.batch_size(), self.inner.full_precision(n))
    }

    /// Slots per sequence after the eviction the next forward will run.
    #[getter]
    fn pending_len(&self) -> usize {
        self.inner.pending_len()
    }

    /// Whether each slot holds a real token (not padding, not dead), bool [batch, len].
    fn valid<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray2<bool>>> {
        grid(py, self.inner.batch_size(), self.inner.valid())
    }

    /// Whether eviction is decided per sequence.
    #[getter]
    fn per_row(&self) -> bool {
        self.inner.is_per_row()
    }

    /// Columns (token indices in the padded stream) held, int64 [batch, len]; -1 marks a dead
    /// slot of a per-row ledger.
    fn columns<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray2<i64>>> {
        let cols = self.inner.columns().into_iter().map(|c| c as i64).collect();
        grid(py, self.inner.batch_size(), cols)
    }

    /// Accumulated attention per slot, float32 [batch, len].
    fn scores<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray2<f32>>> {
        grid(py, self.inner.batch_size(), self.inner.scores())
    }

    /// Columns seen per sequence (padding included).
    #[getter]
    fn seen(&self) -> usize {
        self.inner.seen()
    }

    /// Left padding per sequence.
    #[getter]
    fn padding(&self) -> Vec<usize> {
        self.inner.padding().to_vec()
    }

    /// Slots held per sequence.
    fn __len__(&self) -> usize {
        self.inner.len()
    }
}
