//! Maps core errors to the Python exception hierarchy defined in `chunkwise/errors.py`.

use chunkwise_core::CoreError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyType;

static ERRORS: PyOnceLock<Py<PyModule>> = PyOnceLock::new();

/// Builds a `chunkwise.errors.<class_name>(message, parameter)` exception.
pub fn chunkwise_err(py: Python<'_>, class_name: &str, param: &str, msg: String) -> PyErr {
    let build = || -> PyResult<PyErr> {
        let module =
            ERRORS.get_or_try_init(py, || py.import("chunkwise.errors").map(Bound::unbind))?;
        let cls = module.bind(py).getattr(class_name)?.cast_into::<PyType>()?;
        Ok(PyErr::from_type(cls, (msg.clone(), param.to_string())))
    };
    build().unwrap_or_else(|e| e)
}

/// A `chunkwise.InputError` about `param`.
pub fn input_err(py: Python<'_>, param: &str, msg: impl Into<String>) -> PyErr {
    chunkwise_err(py, "InputError", param, format!("{param}: {}", msg.into()))
}

/// A `chunkwise.ConfigError` about `param`.
pub fn config_err(py: Python<'_>, param: &str, msg: impl Into<String>) -> PyErr {
    chunkwise_err(py, "ConfigError", param, format!("{param}: {}", msg.into()))
}

/// An int argument as `i64`: a bool, a non-int or an int outside int64 is an `InputError`
/// naming `param` (PyO3 alone would raise `TypeError` / `OverflowError`).
pub fn int_arg(py: Python<'_>, param: &str, value: &Bound<'_, PyAny>) -> PyResult<i64> {
    let ty = || {
        value
            .get_type()
            .name()
            .map(|n| n.to_string())
            .unwrap_or_else(|_| "?".into())
    };
    if value.is_instance_of::<pyo3::types::PyBool>() {
        return Err(input_err(py, param, "expected an int, got bool"));
    }
    value.extract::<i64>().map_err(|why| {
        input_err(
            py,
            param,
            format!("expected an int in int64, got {} ({why})", ty()),
        )
    })
}

/// Converts a core error to the matching Python exception.
pub fn to_py(py: Python<'_>, e: CoreError) -> PyErr {
    let class = match e {
        CoreError::InvalidConfig { .. } => "ConfigError",
        CoreError::InvalidInput { .. } => "InputError",
        CoreError::InvalidState { .. } => "StateError",
    };
    chunkwise_err(py, class, e.param(), e.to_string())
}

/// `.map_err` helper: core result to PyResult.
pub trait IntoPyResult<T> {
    fn py_err(self, py: Python<'_>) -> PyResult<T>;
}

impl<T> IntoPyResult<T> for chunkwise_core::Result<T> {
    fn py_err(self, py: Python<'_>) -> PyResult<T> {
        self.map_err(|e| to_py(py, e))
    }
}
