//! Zero-copy access to numpy arrays, with errors that name the parameter instead of PyO3's
//! generic conversion errors: wrong type, dtype, dimensionality or a non-contiguous layout.

use numpy::ndarray::{Dimension, Ix1, Ix2};
use numpy::{
    Element, PyArray, PyArrayMethods, PyReadonlyArray, PyReadonlyArray1, PyReadonlyArray2,
    PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::prelude::*;

use crate::errors::input_err;

fn describe(obj: &Bound<'_, PyAny>) -> String {
    match obj.cast::<PyUntypedArray>() {
        Ok(a) => format!(
            "a {}-d array of dtype {}",
            a.ndim(),
            a.dtype()
                .str()
                .map(|s| s.to_string())
                .unwrap_or_else(|_| "?".into())
        ),
        Err(_) => format!(
            "a {}",
            obj.get_type()
                .name()
                .map(|s| s.to_string())
                .unwrap_or_else(|_| "?".into())
        ),
    }
}

/// An n-d (n fixed by `D`), C-contiguous array of `T`, borrowed read-only.
fn array<'py, T: Element, D: Dimension>(
    obj: &Bound<'py, PyAny>,
    param: &str,
    dtype: &str,
) -> PyResult<PyReadonlyArray<'py, T, D>> {
    let py = obj.py();
    let arr = obj.cast::<PyArray<T, D>>().map_err(|_| {
        let nd = D::NDIM.map_or("n".to_string(), |n| n.to_string());
        input_err(
            py,
            param,
            format!(
                "must be a {nd}-d numpy array of {dtype}, got {}",
                describe(obj)
            ),
        )
    })?;
    if !arr.is_c_contiguous() {
        return Err(input_err(
            py,
            param,
            "must be C-contiguous (use numpy.ascontiguousarray)",
        ));
    }
    Ok(arr.readonly())
}

/// A 1-D, C-contiguous array of `T`, borrowed read-only.
pub fn array1<'py, T: Element>(
    obj: &Bound<'py, PyAny>,
    param: &str,
    dtype: &str,
) -> PyResult<PyReadonlyArray1<'py, T>> {
    array::<T, Ix1>(obj, param, dtype)
}

/// Optional variant of [`array1`] (`None` passes through).
pub fn opt_array1<'py, T: Element>(
    obj: Option<&Bound<'py, PyAny>>,
    param: &str,
    dtype: &str,
) -> PyResult<Option<PyReadonlyArray1<'py, T>>> {
    obj.filter(|o| !o.is_none())
        .map(|o| array1(o, param, dtype))
        .transpose()
}

/// A 2-D, C-contiguous array of `T`, borrowed read-only.
pub fn array2<'py, T: Element>(
    obj: &Bound<'py, PyAny>,
    param: &str,
    dtype: &str,
) -> PyResult<PyReadonlyArray2<'py, T>> {
    array::<T, Ix2>(obj, param, dtype)
}

/// Slice of a contiguous read-only array (contiguity was checked on construction).
pub fn slice<'a, T: Element>(a: &'a PyReadonlyArray1<'_, T>) -> &'a [T] {
    a.as_slice().unwrap_or(&[])
}

/// Optional slice.
pub fn opt_slice<'a, T: Element>(a: &'a Option<PyReadonlyArray1<'_, T>>) -> Option<&'a [T]> {
    a.as_ref().map(slice)
}
