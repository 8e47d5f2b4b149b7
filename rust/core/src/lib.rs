//! chunkwise-core: the ChunkWise LoRA scheduler.
//!
//! Plain arrays in, plain arrays out: no Python, no torch, no CUDA. The pieces, in the order a
//! plan is built: [`signals`] → [`difficulty`] → [`segment`] → [`ladder`] → [`compose`], driven
//! by [`plan`] for prefill and [`decode`] for streaming generation; [`kv`] keeps the books of
//! policy-driven KV caches.

pub mod config;
pub mod difficulty;
pub mod error;
pub mod segment;
pub mod signals;

pub use config::{
    RungMode, SchedulerConfig, SignalWeights, DEFAULT_RUNGS, MAX_NOVELTY_WINDOW, MAX_RANK,
    MAX_SCALE,
};
pub use error::{CoreError, Result};
pub mod compose;
pub mod decode;
pub mod kv;
pub mod ladder;
pub mod plan;

pub use plan::{Plan, PlanArray, PlanInput, Planner, PLAN_ARRAYS};
