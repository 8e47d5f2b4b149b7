"""The logits processor of :mod:`chunkwise.vllm` (entry point ``vllm.logits_processors``): it
hands the scheduler the logits each request's next token is sampled from, for that token's
entropy and surprisal (:meth:`chunkwise.vllm.steps.RequestRanks.record_logits`). It never
changes the logits. Imported by vLLM only."""

from __future__ import annotations

from typing import Any

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor

from .steps import shared

__all__ = ["EntropyLogitsProcessor"]


class EntropyLogitsProcessor(LogitsProcessor):
    """Reads each step's logits for the chunkwise scheduler; inert (and skipped by vLLM in greedy
    batches) while ``CHUNKWISE_VLLM_SCHEDULER`` is unset."""

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        self._ranks = shared()

    def is_argmax_invariant(self) -> bool:
        # False makes vLLM apply it in greedy batches too (it still leaves the logits as they are)
        return self._ranks is None

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        return None

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if self._ranks is not None:
            self._ranks.record_logits(logits.detach().to("cpu", torch.float32).numpy())
        return logits
