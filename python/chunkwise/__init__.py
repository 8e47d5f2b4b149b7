"""chunkwise: LoRA-adapted language models with a rank that changes chunk by chunk.

The scheduler (difficulty, adaptive chunking, rank ladder, cross-fade gates, kernel segment
metadata) runs in a Rust core; this package is the thin Python layer around it.
"""

from __future__ import annotations

from typing import Any

from . import _core
from .config import DEFAULT_RUNGS, SchedulerConfig
from .errors import AdapterError, ChunkwiseError, ConfigError, InputError, StateError
from .injection import ChunkwiseModel, inject
from .ladder import RankLadder
from .layers import ChunkwiseLinear
from .plan import Plan
from .scheduler import DecodeBatch, Scheduler
from .signals import entropy_from_logits, surprisal_from_logits, torch_entropy_surprisal

__version__: str = _core.__version__

# Generation and the KV cache need transformers (the [hf] extra): imported on first use, so the
# scheduler and the CLI start without it.
_LAZY = {
    "kv": ("chunkwise.kv", None),
    "generate": ("chunkwise.generation", "generate"),
    "stream": ("chunkwise.generation", "stream"),
    "GenerationResult": ("chunkwise.generation", "GenerationResult"),
    "Step": ("chunkwise.generation", "Step"),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'chunkwise' has no attribute {name!r}")
    import importlib

    module, attr = _LAZY[name]
    value = importlib.import_module(module)
    return value if attr is None else getattr(value, attr)


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
