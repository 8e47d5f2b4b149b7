"""A plan laid onto the tokens of one forward pass: per-adapter gate matrices.

The scheduler's :class:`~chunkwise.Plan` is ragged (real tokens only); a forward pass sees a
padded [batch, seq] grid. :class:`TokenPlan` maps one onto the other once per forward and turns
each token's rank, cross-fade band and rung scale into one row of a gate matrix
``G[t, j] = scale_t · (gate_lo_t if j < lo_t else gate_hi_t if j < rank_t else 0)``, so every
:class:`~chunkwise.layers.ChunkwiseLinear` applies its ladder as ``((x A'ᵀ) ⊙ G) B'ᵀ``: two
matmuls and one multiply per adapter, no per-token Python and no gather when one adapter covers
the batch. (On CPU this beats rank-grouped gathers: the LoRA matmuls are a small share of the
layer, the extra passes over x are not. The CUDA kernels skip the zero columns instead.)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from ..errors import InputError

__all__ = ["AdapterBlock", "TokenPlan"]


@dataclasses.dataclass
class AdapterBlock:
    """The tokens of one adapter: ``rows`` of the flattened input (None: every row, in order),
    their gate matrix ``gates`` [n, max_rank] and the largest rank any of them uses."""

    adapter: int
    rows: torch.Tensor | None
    gates: torch.Tensor
    max_rank: int


@dataclasses.dataclass
class TokenPlan:
    """What every adapted layer applies in one forward: ``n_tokens`` rows of the flattened input."""

    n_tokens: int
    blocks: list[AdapterBlock]
    #: The same plan as kernel segments on the device (CUDA devices only; see chunkwise.kernels).
    segments: Any = None

    @classmethod
    def build(
        cls,
        token_rank: np.ndarray,
        token_lo: np.ndarray,
        gate_lo: np.ndarray,
        gate_hi: np.ndarray,
        scale: np.ndarray,
        token_adapter: np.ndarray,
        rows: np.ndarray,
        n_rows: int,
        device: Any = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> TokenPlan:
        """Builds the blocks. ``rows[i]`` is the row of planned token i in the flattened forward
        input of ``n_rows`` rows (rows with no planned token get no adapter)."""
        full = len(rows) == n_rows and np.array_equal(rows, np.arange(n_rows))
        blocks = []
        for adapter in np.unique(token_adapter):
            sel = token_adapter == adapter
            rank = token_rank[sel].astype(np.int64)
            r_max = int(rank.max()) if rank.size else 0
            j = np.arange(r_max)[None, :]
            band = np.where(j < token_lo[sel][:, None], gate_lo[sel][:, None], gate_hi[sel][:, None])
            gates = np.where(j < rank[:, None], band, 0.0) * scale[sel][:, None]
            everyone = full and bool(sel.all())
            blocks.append(
                AdapterBlock(
                    int(adapter),
                    None if everyone else torch.from_numpy(rows[sel].astype(np.int64)).to(device),
                    torch.from_numpy(np.ascontiguousarray(gates)).to(device=device, dtype=dtype),
                    r_max,
                )
            )
        segments = None
        if torch.device(device).type == "cuda":
            from ..kernels import KernelSegments

            segments = KernelSegments.from_token_arrays(
                token_rank, token_lo, gate_lo, gate_hi, scale, token_adapter, rows, n_rows, device
            )
        return cls(n_rows, blocks, segments)

    @classmethod
    def from_plan(
        cls,
        plan: Any,
        attention_mask: torch.Tensor | None,
        shape: tuple[int, int],
        adapters: np.ndarray | None = None,
        device: Any = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> TokenPlan:
        """Lays a scheduler plan over a [batch, seq] forward. With ``attention_mask`` the plan's
        sequences are the masked-in tokens of each row (left or right padding); without, the
        plan must cover the full grid row by row."""
        b, t = shape
        if plan.n_seqs != b:
            raise InputError(f"plan: has {plan.n_seqs} sequences for a batch of {b}", "plan")
        if attention_mask is None:
            if plan.n_tokens != b * t:
                raise InputError(f"plan: covers {plan.n_tokens} tokens, the forward has {b}x{t}", "plan")
            rows = np.arange(b * t)
            lengths = np.full(b, t)
        else:
            mask = attention_mask.detach().to("cpu").numpy().astype(bool)
            rows = np.flatnonzero(mask.reshape(-1))
            lengths = mask.sum(axis=1)
        if not np.array_equal(np.diff(plan.seq_offsets), lengths):
            raise InputError(
                f"plan: sequence lengths {np.diff(plan.seq_offsets).tolist()} do not match the "
                f"forward's {lengths.tolist()}",
                "plan",
            )
        seg_len = np.diff(plan.seg_offsets)
        scale = np.repeat(plan.seg_scale, seg_len)
        first_segment = np.searchsorted(plan.seg_offsets, plan.seq_offsets[:-1], side="left")
        adapter_of_seq = plan.seg_adapter[first_segment]
        if adapters is not None:
            adapter_of_seq = np.asarray(adapters, dtype=np.int32)
        token_adapter = np.repeat(adapter_of_seq, lengths)
        return cls.build(
            plan.token_rank,
            plan.token_lo,
            plan.gate_lo,
            plan.gate_hi,
            scale,
            token_adapter,
            rows,
            b * t,
            device,
            dtype,
        )

    @classmethod
    def uniform(
        cls, n_rows: int, rank: int, adapters_per_row: np.ndarray, device: Any, dtype: torch.dtype
    ) -> TokenPlan:
        """Every row at one rank (e.g. the top rung: what PEFT computes)."""
        ones = np.ones(n_rows, np.float32)
        r = np.full(n_rows, rank, np.int32)
        return cls.build(r, r, ones, ones, ones, adapters_per_row, np.arange(n_rows), n_rows, device, dtype)
