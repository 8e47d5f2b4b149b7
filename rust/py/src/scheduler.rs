//! `_core.Scheduler`: prefill planning with the GIL released, results moved into numpy arrays.

use std::sync::Arc;

use chunkwise_core::difficulty::SignalArrays;
use chunkwise_core::signals::RarityTable;
use chunkwise_core::{Plan, PlanArray, PlanInput, Planner};
use numpy::IntoPyArray;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::arrays::{array1, opt_array1, opt_slice, slice};
use crate::config::Config;
use crate::errors::{input_err, IntoPyResult};

/// The scheduler: an immutable planner, safe to share between threads.
#[pyclass(module = "chunkwise._core", frozen)]
pub struct Scheduler {
    pub planner: Arc<Planner>,
}

#[pymethods]
impl Scheduler {
    /// Builds a scheduler from a validated `Config` and optional unigram counts (float64, one
    /// per vocabulary id) for the rarity signal.
    #[new]
    #[pyo3(signature = (config, unigram_counts=None))]
    fn new(
        py: Python<'_>,
        config: &Config,
        unigram_counts: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let counts = opt_array1::<f64>(unigram_counts, "unigram_counts", "float64")?;
        let rarity = opt_slice(&counts)
            .map(RarityTable::from_counts)
            .transpose()
            .py_err(py)?;
        let planner = Planner::new(config.inner.clone(), rarity).py_err(py)?;
        Ok(Self {
            planner: Arc::new(planner),
        })
    }

    /// Plans a flattened ragged batch; returns a dict of numpy arrays (see `chunkwise.Plan`).
    #[pyo3(signature = (token_ids, seq_lengths, *, entropy=None, surprisal=None, probe=None, difficulty=None, adapters=None))]
    #[allow(clippy::too_many_arguments)]
    fn plan<'py>(
        &self,
        py: Python<'py>,
        token_ids: &Bound<'py, PyAny>,
        seq_lengths: &Bound<'py, PyAny>,
        entropy: Option<&Bound<'py, PyAny>>,
        surprisal: Option<&Bound<'py, PyAny>>,
        probe: Option<&Bound<'py, PyAny>>,
        difficulty: Option<&Bound<'py, PyAny>>,
        adapters: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let ids = array1::<i64>(token_ids, "token_ids", "int64")?;
        let lens_arr = array1::<i64>(seq_lengths, "seq_lengths", "int64")?;
        let lens: Vec<usize> = slice(&lens_arr)
            .iter()
            .map(|&l| {
                usize::try_from(l)
                    .map_err(|_| input_err(py, "seq_lengths", format!("{l} is negative")))
            })
            .collect::<PyResult<_>>()?;
        let entropy = opt_array1::<f32>(entropy, "entropy", "float32")?;
        let surprisal = opt_array1::<f32>(surprisal, "surprisal", "float32")?;
        let probe = opt_array1::<f32>(probe, "probe", "float32")?;
        let difficulty = opt_array1::<f32>(difficulty, "difficulty", "float32")?;
        let adapters = opt_array1::<i32>(adapters, "adapters", "int32")?;
        let (ids, entropy, surprisal) = (slice(&ids), opt_slice(&entropy), opt_slice(&surprisal));
        let (probe, difficulty, adapters) = (
            opt_slice(&probe),
            opt_slice(&difficulty),
            opt_slice(&adapters),
        );
        let planner = &self.planner;
        let plan = py
            .detach(|| {
                // The caller's arrays are copied once, then validated and planned from the copy:
                // another thread writing into them while the GIL is released cannot make the
                // plan read values other than those it checked (a few % of the plan's time).
                let owned = |x: Option<&[f32]>| x.map(<[f32]>::to_vec);
                let ids = ids.to_vec();
                let (entropy, surprisal) = (owned(entropy), owned(surprisal));
                let (probe, difficulty) = (owned(probe), owned(difficulty));
                let adapters = adapters.map(<[i32]>::to_vec);
                planner.plan(&PlanInput {
                    token_ids: &ids,
                    seq_lengths: &lens,
                    signals: SignalArrays {
                        entropy: entropy.as_deref(),
                        surprisal: surprisal.as_deref(),
                        probe: probe.as_deref(),
                    },
                    difficulty: difficulty.as_deref(),
                    adapters: adapters.as_deref(),
                })
            })
            .py_err(py)?;
        plan_to_dict(py, plan)
    }

    /// The configuration this scheduler was built with.
    #[getter]
    fn config(&self) -> Config {
        Config {
            inner: self.planner.config().clone(),
        }
    }

    /// True if a unigram table (rarity signal) is loaded.
    #[getter]
    fn has_unigram_table(&self) -> bool {
        self.planner.rarity().is_some()
    }
}

fn plan_to_dict(py: Python<'_>, p: Plan) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    for (name, array) in p.into_named() {
        match array {
            PlanArray::I32(v) => d.set_item(name, v.into_pyarray(py))?,
            PlanArray::F32(v) => d.set_item(name, v.into_pyarray(py))?,
            PlanArray::F64(v) => d.set_item(name, v.into_pyarray(py))?,
        }
    }
    Ok(d)
}
