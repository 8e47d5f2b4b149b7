//! KV-cache bookkeeping: which cached tokens a sequence keeps when its cache is over budget.
//!
//! The Python cache (`chunkwise.kv.PolicyCache`) owns the key/value tensors; this module owns
//! everything else: per-slot position, chunk, difficulty and accumulated attention, and the
//! eviction decision. A decision is a list of slot indices to keep per sequence, the same number
//! for every sequence so the tensors stay rectangular (docs/architecture.md §6).

mod ledger;
mod policy;

pub use ledger::{KvLedger, DEAD};
pub use policy::KvPolicy;
