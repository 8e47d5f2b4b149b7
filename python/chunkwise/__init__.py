"""chunkwise: LoRA-adapted language models with a rank that changes chunk by chunk.

The scheduler (difficulty, adaptive chunking, rank ladder, cross-fade gates, kernel segment
metadata) runs in a Rust core; this package is the thin Python layer around it. The layout and
what each folder may import are in ``docs/architecture.md``.

``import chunkwise`` loads only the scheduler (numpy and the Rust core). The torch-side names
(:class:`RankLadder`, :func:`inject`, :func:`generate`, ...) are imported on first use, so
planning never pays for torch and the command line starts without transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import _core, compat
from .errors import AdapterError, ChunkwiseError, ConfigError, InputError, KernelError, StateError
from .schedule import (
    DEFAULT_RUNGS,
    DecodeBatch,
    Plan,
    Scheduler,
    SchedulerConfig,
    entropy_from_logits,
    surprisal_from_logits,
)

if TYPE_CHECKING:  # what the lazy names below resolve to, for type checkers and IDEs
    from . import kv
    from .adapters.ladder import RankLadder
    from .generation import GenerationResult, Step, generate, stream
    from .nn import ChunkwiseLinear, ChunkwiseModel, inject, torch_entropy_surprisal

__version__: str = _core.__version__

# name -> (module, attribute or None for the module itself); imported on first access.
_LAZY: dict[str, tuple[str, str | None]] = {
    "RankLadder": ("chunkwise.adapters.ladder", "RankLadder"),
    "ChunkwiseLinear": ("chunkwise.nn", "ChunkwiseLinear"),
    "ChunkwiseModel": ("chunkwise.nn", "ChunkwiseModel"),
    "inject": ("chunkwise.nn", "inject"),
    "torch_entropy_surprisal": ("chunkwise.nn", "torch_entropy_surprisal"),
    "kv": ("chunkwise.kv", None),
    "generate": ("chunkwise.generation", "generate"),
    "stream": ("chunkwise.generation", "stream"),
    "GenerationResult": ("chunkwise.generation", "GenerationResult"),
    "Step": ("chunkwise.generation", "Step"),
}

compat.install()


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'chunkwise' has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = importlib.import_module(module)
    value = value if attr is None else getattr(value, attr)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "DEFAULT_RUNGS",
    "AdapterError",
    "ChunkwiseError",
    "ChunkwiseLinear",
    "ChunkwiseModel",
    "ConfigError",
    "DecodeBatch",
    "GenerationResult",
    "InputError",
    "KernelError",
    "Plan",
    "RankLadder",
    "Scheduler",
    "SchedulerConfig",
    "StateError",
    "Step",
    "entropy_from_logits",
    "generate",
    "inject",
    "kv",
    "stream",
    "surprisal_from_logits",
    "torch_entropy_surprisal",
]
