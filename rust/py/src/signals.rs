//! Logit-derived signals for numpy users (torch users can compute the same on device).

use chunkwise_core::signals;
use numpy::{IntoPyArray, PyArray1, PyUntypedArrayMethods};
use pyo3::prelude::*;

use crate::arrays::{array1, array2, slice};
use crate::errors::IntoPyResult;

/// Normalised entropy H/ln V of each row of float32 `logits` [rows, vocab].
#[pyfunction]
pub fn entropy_from_logits<'py>(
    py: Python<'py>,
    logits: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyArray1<f32>>> {
    let arr = array2::<f32>(logits, "logits", "float32")?;
    let vocab = arr.shape()[1];
    let data = arr.as_slice()?;
    let out = py
        .detach(|| signals::entropy_from_logits(data, vocab))
        .py_err(py)?;
    Ok(out.into_pyarray(py))
}

/// Normalised surprisal of `token_ids[r]` (int64) under row r of float32 `logits`.
#[pyfunction]
pub fn surprisal_from_logits<'py>(
    py: Python<'py>,
    logits: &Bound<'py, PyAny>,
    token_ids: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyArray1<f32>>> {
    let arr = array2::<f32>(logits, "logits", "float32")?;
    let ids = array1::<i64>(token_ids, "token_ids", "int64")?;
    let vocab = arr.shape()[1];
    let data = arr.as_slice()?;
    let ids = slice(&ids);
    let out = py
        // the ids are copied before they are checked: a thread writing into them meanwhile
        // cannot turn a checked id into an out-of-range index
        .detach(|| {
            let snapshot: Vec<i64> = ids.to_vec();
            signals::surprisal_from_logits(data, vocab, &snapshot)
        })
        .py_err(py)?;
    Ok(out.into_pyarray(py))
}
