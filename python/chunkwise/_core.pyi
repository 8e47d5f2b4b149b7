"""Type stubs of the Rust extension module ``chunkwise._core`` (see rust/py/src)."""

from collections.abc import Mapping, Sequence
from typing import Literal, final

import numpy as np
import numpy.typing as npt

__all__ = [
    "Config",
    "Scheduler",
    "DecodeBatch",
    "KvLedger",
    "entropy_from_logits",
    "surprisal_from_logits",
    "__version__",
    "DEFAULT_RUNGS",
    "PLAN_ARRAYS",
    "MAX_RANK",
    "MAX_SCALE",
    "MAX_NOVELTY_WINDOW",
]

__version__: str
DEFAULT_RUNGS: tuple[int, ...]
PLAN_ARRAYS: tuple[str, ...]
MAX_RANK: int
MAX_SCALE: float
MAX_NOVELTY_WINDOW: int

@final
class Config:
    """A validated scheduler configuration (built by ``chunkwise.SchedulerConfig``).

    Every argument is optional; a missing one takes the core's default (``Config.default()``).
    """

    def __new__(
        cls,
        *,
        rungs: Sequence[int] | None = None,
        rung_scales: Sequence[float] | None = None,
        mode: str | None = None,
        thresholds: Sequence[float] | None = None,
        quantiles: Sequence[float] | None = None,
        target_mean_rank: float | None = None,
        min_len: int | None = None,
        max_len: int | None = None,
        granularity: int | None = None,
        chunk_penalty: float | None = None,
        crossfade: int | None = None,
        hysteresis: float | None = None,
        budget_share: float | None = None,
        budget_rank: int | None = None,
        weights: Mapping[str, float] | None = None,
        ngram: int | None = None,
        novelty_window: int | None = None,
        ema: float | None = None,
        position_tau: float | None = None,
        probe_scale: float | None = None,
    ) -> Config: ...
    @staticmethod
    def default() -> Config: ...
    @property
    def rungs(self) -> list[int]: ...
    @property
    def rung_scales(self) -> list[float]: ...
    @property
    def mode(self) -> Literal["threshold", "quantile", "target"]: ...
    @property
    def thresholds(self) -> list[float]: ...
    @property
    def quantiles(self) -> list[float] | None: ...
    @property
    def target_mean_rank(self) -> float | None: ...
    @property
    def min_len(self) -> int: ...
    @property
    def max_len(self) -> int: ...
    @property
    def granularity(self) -> int: ...
    @property
    def chunk_penalty(self) -> float: ...
    @property
    def crossfade(self) -> int: ...
    @property
    def hysteresis(self) -> float: ...
    @property
    def budget_share(self) -> float: ...
    @property
    def budget_rank(self) -> int: ...
    @property
    def weights(self) -> dict[str, float]: ...
    @property
    def ngram(self) -> int: ...
    @property
    def novelty_window(self) -> int: ...
    @property
    def ema(self) -> float: ...
    @property
    def position_tau(self) -> float: ...
    @property
    def probe_scale(self) -> float: ...

@final
class Scheduler:
    """An immutable planner; ``plan`` releases the GIL."""

    def __new__(cls, config: Config, unigram_counts: npt.NDArray[np.float64] | None = None) -> Scheduler: ...
    def plan(
        self,
        token_ids: npt.NDArray[np.int64],
        seq_lengths: npt.NDArray[np.int64],
        *,
        entropy: npt.NDArray[np.float32] | None = None,
        surprisal: npt.NDArray[np.float32] | None = None,
        probe: npt.NDArray[np.float32] | None = None,
        difficulty: npt.NDArray[np.float32] | None = None,
        adapters: npt.NDArray[np.int32] | None = None,
    ) -> dict[str, np.ndarray]: ...
    @property
    def config(self) -> Config: ...
    @property
    def has_unigram_table(self) -> bool: ...

@final
class DecodeBatch:
    """Streaming decode state; ``step`` rewrites the output arrays in place."""

    rank: npt.NDArray[np.int32]
    lo: npt.NDArray[np.int32]
    gate_lo: npt.NDArray[np.float32]
    gate_hi: npt.NDArray[np.float32]
    scale: npt.NDArray[np.float32]
    rung: npt.NDArray[np.int32]
    difficulty: npt.NDArray[np.float32]
    new_chunk: npt.NDArray[np.bool_]

    def __new__(
        cls, scheduler: Scheduler, batch_size: int, thresholds: Sequence[float] | None = None
    ) -> DecodeBatch: ...
    def step(
        self,
        token_ids: npt.NDArray[np.int64],
        *,
        entropy: npt.NDArray[np.float32] | None = None,
        surprisal: npt.NDArray[np.float32] | None = None,
        probe: npt.NDArray[np.float32] | None = None,
    ) -> None: ...
    def reset(self, index: int) -> None: ...
    def counts(self, index: int) -> tuple[int, int]: ...
    @property
    def thresholds(self) -> list[float]: ...
    def __len__(self) -> int: ...

@final
class KvLedger:
    """KV-cache books of a batch (columns, chunks, difficulty, attention) and its evictions."""

    def __new__(
        cls,
        padding: Sequence[int],
        *,
        sinks: int = 0,
        window: int = 0,
        budget: int | None = None,
        slack: int = 0,
        attention_weight: float = 0.0,
        difficulty_weight: float = 0.0,
        per_row: bool = False,
    ) -> KvLedger: ...
    def append(
        self,
        n: int,
        difficulty: npt.NDArray[np.float32] | None = None,
        chunk: npt.NDArray[np.uint64] | None = None,
    ) -> None: ...
    def revise_difficulty(self, values: npt.NDArray[np.float32]) -> None: ...
    def add_scores(self, scores: npt.NDArray[np.float32]) -> None: ...
    def evict(self) -> npt.NDArray[np.int64] | None: ...
    def valid(self) -> npt.NDArray[np.bool_]: ...
    def full_precision(self, n_full: int) -> npt.NDArray[np.bool_]: ...
    @property
    def per_row(self) -> bool: ...
    def columns(self) -> npt.NDArray[np.int64]: ...
    def scores(self) -> npt.NDArray[np.float32]: ...
    def difficulty(self) -> npt.NDArray[np.float32]: ...
    @property
    def pending_len(self) -> int: ...
    @property
    def seen(self) -> int: ...
    @property
    def padding(self) -> list[int]: ...
    def __len__(self) -> int: ...

def entropy_from_logits(logits: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]: ...
def surprisal_from_logits(
    logits: npt.NDArray[np.float32], token_ids: npt.NDArray[np.int64]
) -> npt.NDArray[np.float32]: ...
