//! What a KV policy keeps: attention sinks, a recent window, and — when a token budget is set —
//! the best-scoring of the remaining tokens, scored by accumulated attention (H2O) and/or
//! difficulty. Full, sliding-window, StreamingLLM, H2O and difficulty-aware caches are all
//! settings of this one policy, so they compose.

use crate::error::{CoreError, Result};

/// A KV-cache retention policy (per sequence; padding never counts as a sink or as recent).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KvPolicy {
    /// The first `sinks` real tokens are always kept (StreamingLLM's attention sinks).
    pub sinks: usize,
    /// The last `window` tokens are always kept.
    pub window: usize,
    /// Slots kept per sequence after an eviction; `None` keeps everything (full cache).
    pub budget: Option<usize>,
    /// An eviction runs only once the cache exceeds `budget + slack` slots, and then brings it
    /// back to `budget`: one gather per `slack + 1` tokens instead of one per token.
    pub slack: usize,
    /// Weight of a token's accumulated attention in the ranking of the middle tokens.
    pub attention_weight: f32,
    /// Weight of a token's difficulty (hard tokens are kept longer, easy ones evicted first).
    pub difficulty_weight: f32,
}

impl KvPolicy {
    /// Keeps everything.
    pub fn full() -> Self {
        Self {
            sinks: 0,
            window: 0,
            budget: None,
            slack: 0,
            attention_weight: 0.0,
            difficulty_weight: 0.0,
        }
    }

    /// Checks the settings against each other; errors name the offending parameter.
    pub fn validate(&self) -> Result<()> {
        for (name, w) in [
            ("attention_weight", self.attention_weight),
            ("difficulty_weight", self.difficulty_weight),
        ] {
            if !(w.is_finite() && w >= 0.0) {
                return Err(CoreError::config(
                    name,
                    format!("must be finite and >= 0, got {w}"),
                ));
            }
        }
        let Some(budget) = self.budget else {
            return Ok(());
        };
        if budget == 0 {
            return Err(CoreError::config("budget", "must be at least 1 token"));
        }
        if budget < self.sinks + self.window {
            return Err(CoreError::config(
                "budget",
                format!(
                    "{budget} tokens cannot hold {} sinks + a window of {}",
                    self.sinks, self.window
                ),
            ));
        }
        Ok(())
    }

    /// Whether the middle (neither sink nor recent) tokens are ranked by score; otherwise the
    /// newest of them are kept.
    pub fn scored(&self) -> bool {
        self.attention_weight > 0.0 || self.difficulty_weight > 0.0
    }
}
