//! Errors of the scheduler core. Every error names the parameter it is about, so the Python
//! layer can raise `chunkwise.ConfigError` / `chunkwise.InputError` with a useful message.

use thiserror::Error;

/// What went wrong, and with which parameter.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum CoreError {
    /// A configuration value is out of range or inconsistent with another one.
    #[error("{param}: {msg}")]
    InvalidConfig { param: &'static str, msg: String },
    /// An input array has a bad shape, length, value or range.
    #[error("{param}: {msg}")]
    InvalidInput { param: &'static str, msg: String },
    /// An object was used out of order (e.g. a decoder stepped with the wrong batch size).
    #[error("{param}: {msg}")]
    InvalidState { param: &'static str, msg: String },
}

impl CoreError {
    /// A configuration error about `param`.
    pub fn config(param: &'static str, msg: impl Into<String>) -> Self {
        Self::InvalidConfig {
            param,
            msg: msg.into(),
        }
    }

    /// An input error about `param`.
    pub fn input(param: &'static str, msg: impl Into<String>) -> Self {
        Self::InvalidInput {
            param,
            msg: msg.into(),
        }
    }

    /// A state error about `param`.
    pub fn state(param: &'static str, msg: impl Into<String>) -> Self {
        Self::InvalidState {
            param,
            msg: msg.into(),
        }
    }

    /// The parameter this error is about.
    pub fn param(&self) -> &'static str {
        match self {
            Self::InvalidConfig { param, .. }
            | Self::InvalidInput { param, .. }
            | Self::InvalidState { param, .. } => param,
        }
    }
}

/// Result alias of the core.
pub type Result<T> = std::result::Result<T, CoreError>;

/// Checks that every value of `values` is finite; the error names `param` and the first bad index.
pub fn check_finite(param: &'static str, values: &[f32]) -> Result<()> {
    match values.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(i) => Err(CoreError::input(
            param,
            format!("value at index {i} is {} (must be finite)", values[i]),
        )),
    }
}

/// Checks that every value of `values` is finite and within [0, 1] (one pass: NaN and ±inf
/// fail the range test too).
pub fn check_unit(param: &'static str, values: &[f32]) -> Result<()> {
    match values.iter().position(|v| !(0.0..=1.0).contains(v)) {
        None => Ok(()),
        Some(i) => Err(CoreError::input(
            param,
            format!(
                "value at index {i} is {} (must be finite and in [0, 1])",
                values[i]
            ),
        )),
    }
}
