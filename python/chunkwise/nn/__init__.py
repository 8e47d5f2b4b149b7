"""The torch layer: a plan laid over a padded forward, the ladder-aware linear layer, injection
into a transformers model, and the scheduler's signals computed by torch.

May import: ``chunkwise.schedule``, ``chunkwise.adapters``, ``chunkwise.kernels``,
``chunkwise.kv`` (the cache that :meth:`ChunkwiseModel.generate` books ranks in),
``chunkwise.errors``.
"""

from .hf_generate import REFUSED_OPTIONS, RankTrace
from .injection import ChunkwiseModel, inject
from .linear import ChunkwiseLinear, linear_shape
from .prompt import check_prompt, check_token_range, vocab_size
from .signals import (
    SIGNAL_ROWS,
    SignalRequest,
    host_step,
    logit_signals,
    next_token_signals,
    prefill_signals,
    torch_entropy_surprisal,
)
from .token_plan import AdapterBlock, DecodePlan, TokenPlan

__all__ = [
    "REFUSED_OPTIONS",
    "SIGNAL_ROWS",
    "RankTrace",
    "AdapterBlock",
    "SignalRequest",
    "ChunkwiseLinear",
    "ChunkwiseModel",
    "DecodePlan",
    "TokenPlan",
    "check_prompt",
    "check_token_range",
    "host_step",
    "inject",
    "linear_shape",
    "logit_signals",
    "next_token_signals",
    "prefill_signals",
    "torch_entropy_surprisal",
    "vocab_size",
]
