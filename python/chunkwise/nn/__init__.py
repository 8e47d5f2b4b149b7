"""The torch layer: a plan laid over a padded forward, the ladder-aware linear layer, injection
into a transformers model, and the scheduler's signals computed by torch.

May import: ``chunkwise.schedule``, ``chunkwise.adapters``, ``chunkwise.kernels``,
``chunkwise.errors``.
"""

from .injection import ChunkwiseModel, inject
from .linear import ChunkwiseLinear, linear_shape
from .signals import next_token_signals, torch_entropy_surprisal
from .token_plan import AdapterBlock, DecodePlan, TokenPlan

__all__ = [
    "AdapterBlock",
    "ChunkwiseLinear",
    "ChunkwiseModel",
    "DecodePlan",
    "TokenPlan",
    "inject",
    "linear_shape",
    "next_token_signals",
    "torch_entropy_surprisal",
]
