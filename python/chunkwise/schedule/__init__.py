"""The scheduler's Python face: configuration, planning, decode state and the plan it returns.

Numpy and the Rust core only: no torch, so planning text costs no torch import.
May import: ``chunkwise._core``, ``chunkwise.errors``.
"""

from .config import DEFAULT_RUNGS, SchedulerConfig, rungs_for
from .plan import PLAN_ARRAYS, Plan, gate_matrix, gates_one
from .scheduler import DecodeBatch, Scheduler
from .signals import entropy_from_logits, surprisal_from_logits

__all__ = [
    "DEFAULT_RUNGS",
    "PLAN_ARRAYS",
    "DecodeBatch",
    "Plan",
    "Scheduler",
    "SchedulerConfig",
    "entropy_from_logits",
    "gate_matrix",
    "gates_one",
    "rungs_for",
    "surprisal_from_logits",
]
