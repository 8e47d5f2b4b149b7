"""chunkwise: LoRA-adapted language models with a rank that changes chunk by chunk.

The scheduler (difficulty, adaptive chunking, rank ladder, cross-fade gates, kernel segment
metadata) runs in a Rust core; this package is the thin Python layer around it.
"""

from __future__ import annotations

from . import _core, kv
from .config import DEFAULT_RUNGS, SchedulerConfig
from .errors import AdapterError, ChunkwiseError, ConfigError, InputError, StateError
from .generate import GenerationResult, Step, generate, stream
from .injection import ChunkwiseModel, inject
from .ladder import RankLadder
from .layers import ChunkwiseLinear
from .plan import Plan
from .scheduler import DecodeBatch, Scheduler
from .signals import entropy_from_logits, surprisal_from_logits, torch_entropy_surprisal

__version__: str = _core.__version__

__all__ = [
    "DEFAULT_RUNGS",
    "AdapterError",
    "ChunkwiseLinear",
    "ChunkwiseModel",
    "RankLadder",
    "inject",
    "ChunkwiseError",
    "ConfigError",
    "DecodeBatch",
    "InputError",
    "Plan",
    "Scheduler",
    "SchedulerConfig",
    "StateError",
    "GenerationResult",
    "Step",
    "generate",
    "kv",
    "stream",
    "entropy_from_logits",
    "surprisal_from_logits",
    "torch_entropy_surprisal",
]
