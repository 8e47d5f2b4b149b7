"""The :class:`Plan`: what the scheduler decided for every token of a ragged batch."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import _core
from ..errors import InputError

if TYPE_CHECKING:  # the scheduler runs without torch; only to_torch needs it
    import torch

__all__ = ["Plan", "PLAN_ARRAYS", "gate_matrix", "gates_one"]


def gate_matrix(
    rank: np.ndarray,
    lo: np.ndarray,
    gate_lo: np.ndarray,
    gate_hi: np.ndarray,
    scale: np.ndarray,
    r_max: int,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """The per-token gate on singular directions j < ``r_max`` (float32 [tokens, r_max]):
    ``G[t, j] = scale_t · (gate_lo_t if j < lo_t, gate_hi_t if j < rank_t, else 0)``, the
    cross-fade of docs/architecture.md §4 in one matrix; a token's LoRA update is
    ``B'[:, :r] ((A'[:r] x) ⊙ G[t])``. ``out``: a float32 [tokens, r_max] array written in place
    (decode steps reuse one)."""
    j = np.arange(r_max)[None, :]
    band = np.where(j < lo[:, None], gate_lo[:, None], gate_hi[:, None])
    if out is None:
        out = np.empty((len(rank), r_max), np.float32)
    np.multiply(np.where(j < rank[:, None], band, 0.0), scale[:, None], out=out)
    return out


def gates_one(rank: np.ndarray, lo: np.ndarray, gate_lo: np.ndarray, gate_hi: np.ndarray) -> np.ndarray:
    """Per token, whether every gate it uses is 1 (no cross-fade): then :func:`gate_matrix`'s row
    is its scale on its rank prefix and nothing else."""
    return ((lo <= 0) | (gate_lo == 1.0)) & ((lo >= rank) | (gate_hi == 1.0))


#: Names of the arrays of a plan, in the order the Rust core returns them (its ``PLAN_ARRAYS``;
#: the fields of :class:`Plan` below repeat them with their types, and a test ties the two).
PLAN_ARRAYS: tuple[str, ...] = tuple(_core.PLAN_ARRAYS)


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
    """Flat, read-only arrays over the batch (N tokens, B sequences, C chunks, S segments).

    Per sequence: ``seq_offsets`` (int32, B+1). Per token: ``difficulty`` (float32),
    ``token_rank`` (int32, the rank the layer runs at), ``token_lo`` (int32), ``gate_lo`` and
    ``gate_hi`` (float32): direction j < token_rank is weighted ``gate_lo`` if j < token_lo else
    ``gate_hi``. Per chunk: ``chunk_offsets`` (int32, C+1, global token offsets), ``chunk_seq``,
    ``chunk_rung``, ``chunk_rank`` (int32), ``chunk_difficulty`` (float32, mean). Per kernel
    segment (maximal run of equal rank inside a sequence): ``seg_offsets`` (int32, S+1),
    ``seg_rank`` (int32), ``seg_scale`` (float32), ``seg_adapter`` (int32). ``thresholds``
    (float64): the resolved thresholds, reusable for decode.
    """

    seq_offsets: np.ndarray
    difficulty: np.ndarray
    chunk_offsets: np.ndarray
    chunk_seq: np.ndarray
    chunk_rung: np.ndarray
    chunk_rank: np.ndarray
    chunk_difficulty: np.ndarray
    token_rank: np.ndarray
    token_lo: np.ndarray
    gate_lo: np.ndarray
    gate_hi: np.ndarray
    seg_offsets: np.ndarray
    seg_rank: np.ndarray
    seg_scale: np.ndarray
    seg_adapter: np.ndarray
    thresholds: np.ndarray
    rungs: tuple[int, ...]

    @classmethod
    def from_core(cls, arrays: dict[str, np.ndarray], rungs: tuple[int, ...]) -> Plan:
        """Wraps the dict the Rust core returns; arrays are made read-only, not copied."""
        for a in arrays.values():
            a.flags.writeable = False
        return cls(**{k: arrays[k] for k in PLAN_ARRAYS}, rungs=tuple(rungs))

    @property
    def n_tokens(self) -> int:
        """Tokens in the batch."""
        return int(self.seq_offsets[-1])

    @property
    def n_seqs(self) -> int:
        """Sequences in the batch."""
        return len(self.seq_offsets) - 1

    @property
    def n_chunks(self) -> int:
        """Chunks in the batch."""
        return len(self.chunk_rank)

    @property
    def chunk_lengths(self) -> np.ndarray:
        """Length of every chunk."""
        return np.diff(self.chunk_offsets)

    def rung_histogram(self) -> np.ndarray:
        """Tokens per rung (index i counts tokens whose chunk is on rung i)."""
        return np.bincount(self.chunk_rung, weights=self.chunk_lengths, minlength=len(self.rungs)).astype(
            np.int64
        )

    def mean_rank(self) -> float:
        """Token-weighted mean of the chunks' ranks (LoRA FLOPs are proportional to it)."""
        return float(np.dot(self.chunk_rank, self.chunk_lengths) / max(self.n_tokens, 1))

    def mean_executed_rank(self) -> float:
        """Mean rank the layers actually run at (ramps run at the larger of two ranks)."""
        return float(self.token_rank.mean()) if self.n_tokens else 0.0

    def sequence(self, b: int) -> dict[str, Any]:
        """Views of sequence ``b``: its token range, chunks (local offsets) and ranks."""
        if isinstance(b, bool) or not isinstance(b, int | np.integer) or not 0 <= b < self.n_seqs:
            raise InputError(f"b: {b!r} is not a sequence index of the batch of {self.n_seqs}", "b")
        lo, hi = int(self.seq_offsets[b]), int(self.seq_offsets[b + 1])
        sel = self.chunk_seq == b
        idx = np.flatnonzero(sel)
        starts = self.chunk_offsets[idx] - lo
        return {
            "tokens": (lo, hi),
            "difficulty": self.difficulty[lo:hi],
            "chunk_offsets": np.append(starts, hi - lo),
            "chunk_rank": self.chunk_rank[sel],
            "token_rank": self.token_rank[lo:hi],
        }

    def to_torch(self, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """The kernel metadata as torch tensors on ``device`` (one copy to the device)."""
        import torch

        names = (
            "seg_offsets",
            "seg_rank",
            "seg_scale",
            "seg_adapter",
            "token_rank",
            "token_lo",
            "gate_lo",
            "gate_hi",
        )
        return {n: torch.from_numpy(np.array(getattr(self, n))).to(device) for n in names}

    def summary(self) -> str:
        """One-paragraph human summary: tokens, chunks, mean rank and rung histogram."""
        hist = self.rung_histogram()
        share = hist / max(self.n_tokens, 1)
        rows = ", ".join(f"r{r}: {s:.0%}" for r, s in zip(self.rungs, share, strict=True))
        return (
            f"{self.n_tokens} tokens in {self.n_seqs} sequence(s), {self.n_chunks} chunks, "
            f"{len(self.seg_rank)} kernel segments; mean rank {self.mean_rank():.2f} "
            f"(executed {self.mean_executed_rank():.2f}); rungs {rows}"
        )
