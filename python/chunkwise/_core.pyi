"""Type stubs of the Rust extension module ``chunkwise._core`` (see rust/py/src)."""

from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

__version__: str

class Config:
    """A validated scheduler configuration (built by ``chunkwise.SchedulerConfig``)."""

    def __init__(
        self,
        *,
        rungs: Sequence[int],
        rung_scales: Sequence[float] | None = None,
        mode: str = "threshold",
        thresholds: Sequence[float] | None = None,
        quantiles: Sequence[float] | None = None,
        target_mean_rank: float | None = None,
        min_len: int = 16,
        max_len: int = 128,
        granularity: int = 8,
        chunk_penalty: float = 0.5,
        crossfade: int = 4,
        hysteresis: float = 0.05,
        budget_share: float = 1.0,
        budget_rank: int | None = None,
        weights: Mapping[str, float] | None = None,
        ngram: int = 2,
        novelty_window: int = 256,
        ema: float = 0.3,
        position_tau: float = 64.0,
        probe_scale: float = 1.0,
    ) -> None: ...
    @property
    def rungs(self) -> list[int]: ...
    @property
    def thresholds(self) -> list[float]: ...
    @property
    def rung_scales(self) -> list[float]: ...
    @property
    def budget_rank(self) -> int: ...

class Scheduler:
    """An immutable planner; ``plan`` releases the GIL."""

    def __init__(self, config: Config, unigram_counts: npt.NDArray[np.float64] | None = None) -> None: ...
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

    def __init__(
        self, scheduler: Scheduler, batch_size: int, thresholds: Sequence[float] | None = None
    ) -> None: ...
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

class KvLedger:
    """KV-cache books of a batch (columns, chunks, difficulty, attention) and its evictions."""

    def __init__(
        self,
        padding: Sequence[int],
        *,
        sinks: int = 0,
        window: int = 0,
        budget: int | None = None,
        slack: int = 0,
        attention_weight: float = 0.0,
        difficulty_weight: float = 0.0,
    ) -> None: ...
    def append(
        self,
        n: int,
        difficulty: npt.NDArray[np.float32] | None = None,
        chunk: npt.NDArray[np.uint64] | None = None,
    ) -> None: ...
    def revise_difficulty(self, values: npt.NDArray[np.float32]) -> None: ...
    def add_scores(self, scores: npt.NDArray[np.float32]) -> None: ...
    def evict(self) -> npt.NDArray[np.int64] | None: ...
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
