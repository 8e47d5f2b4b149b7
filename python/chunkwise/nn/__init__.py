"""The torch layer: a plan laid over a padded forward, the ladder-aware linear layer, injection
into a transformers model, and the scheduler's signals computed by torch.

May import: ``chunkwise.schedule``, ``chunkwise.adapters``, ``chunkwise.kernels``,
``chunkwise.errors``.
"""

from .injection import ChunkwiseModel, inject
from .linear import ChunkwiseLinear, linear_shape
from .signals import (
    SIGNAL_ROWS,
    SignalRequest,
    logit_signals,
    next_token_signals,
    prefill_signals,
    torch_entropy_surprisal,
)
from .token_plan import AdapterBlock, DecodePlan, TokenPlan

__all__ = [
    "SIGNAL_ROWS",
    "AdapterBlock",
    "SignalRequest",
    "ChunkwiseLinear",
    "ChunkwiseModel",
    "DecodePlan",
    "TokenPlan",
    "inject",
    "linear_shape",
    "logit_signals",
    "next_token_signals",
    "prefill_signals",
    "torch_entropy_surprisal",
]
