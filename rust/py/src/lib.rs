//! `chunkwise._core`: thin PyO3 bindings over `chunkwise-core`.
//!
//! Arrays cross without copies (numpy slices in, `Vec`s moved into numpy arrays out); the work
//! runs with the GIL released; core errors become `chunkwise.errors` exceptions.

mod arrays;
mod config;
mod decoder;
mod errors;
mod kv;
mod scheduler;
mod signals;

use pyo3::prelude::*;
use pyo3::types::PyTuple;

/// Every Rust allocation of the extension (plan arrays handed to numpy included) goes through
/// mimalloc: it keeps freed pages for reuse, where glibc's malloc maps and unmaps each array of
/// 128 KiB or more and faults its pages in again on every plan (half the time of an 8 × 4096
/// plan on the 2-core machine).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<config::Config>()?;
    m.add_class::<scheduler::Scheduler>()?;
    m.add_class::<decoder::DecodeBatch>()?;
    m.add_class::<kv::KvLedger>()?;
    m.add_function(wrap_pyfunction!(signals::entropy_from_logits, m)?)?;
    m.add_function(wrap_pyfunction!(signals::surprisal_from_logits, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add(
        "DEFAULT_RUNGS",
        PyTuple::new(m.py(), chunkwise_core::DEFAULT_RUNGS)?,
    )?;
    m.add("MAX_RANK", chunkwise_core::MAX_RANK)?;
    m.add("MAX_SCALE", chunkwise_core::MAX_SCALE)?;
    m.add("MAX_NOVELTY_WINDOW", chunkwise_core::MAX_NOVELTY_WINDOW)?;
    m.add(
        "PLAN_ARRAYS",
        PyTuple::new(m.py(), chunkwise_core::PLAN_ARRAYS)?,
    )?;
    Ok(())
}
