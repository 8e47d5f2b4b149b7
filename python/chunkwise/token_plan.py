"""A plan laid onto the tokens of one forward pass: rank groups as index tensors.

The scheduler's :class:`~chunkwise.Plan` is ragged (real tokens only); a forward pass sees a
padded [batch, seq] grid. :class:`TokenPlan` maps one onto the other once per forward and groups
tokens by (adapter, rank), so every :class:`~chunkwise.layers.ChunkwiseLinear` applies its ladder
with a handful of batched matmuls and no per-token Python.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from .errors import InputError

__all__ = ["RankGroup", "TokenPlan"]


@dataclasses.dataclass
class RankGroup:
    """Tokens of one adapter at one rank. ``index`` is None when the group is every token.

    ``lo``/``gate_lo``/``gate_hi`` are None when no token of the group is in a cross-fade ramp
    (all gates 1); ``scale`` is the per-token rung scale [n, 1].
    """

    adapter: int
    rank: int
    index: torch.Tensor | None
    scale: torch.Tensor
    lo: torch.Tensor | None = None
    gate_lo: torch.Tensor | None = None
    gate_hi: torch.Tensor | None = None


@dataclasses.dataclass
class TokenPlan:
    """What every adapted layer applies in one forward: ``n_tokens`` rows of the flattened input."""

    n_tokens: int
    groups: list[RankGroup]
    adapter_rows: dict[int, torch.Tensor | None]

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
        """Groups planned tokens. ``rows[i]`` is the row of planned token i in the flattened
        forward input of ``n_rows`` rows (rows with no planned token get no adapter)."""
        groups = []
        keys = np.stack([token_adapter.astype(np.int64), token_rank.astype(np.int64)], axis=1)
        uniq = np.unique(keys, axis=0) if len(keys) else np.zeros((0, 2), np.int64)
        full = len(rows) == n_rows and np.array_equal(rows, np.arange(n_rows))

        def put(x: np.ndarray, dt: torch.dtype) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(x)).to(device=device, dtype=dt)

        for adapter, rank in uniq:
            sel = (token_adapter == adapter) & (token_rank == rank)
            if rank == 0:
                continue
            everyone = full and bool(sel.all())
            index = None if everyone else put(rows[sel], torch.long)
            ramp = sel & ((gate_lo != 1.0) | (gate_hi != 1.0) | (token_lo != token_rank))
            g = RankGroup(int(adapter), int(rank), index, put(scale[sel][:, None], dtype))
            if ramp.any():
                g.lo = put(token_lo[sel][:, None], torch.long)
                g.gate_lo = put(gate_lo[sel][:, None], dtype)
                g.gate_hi = put(gate_hi[sel][:, None], dtype)
            groups.append(g)
        adapter_rows: dict[int, torch.Tensor | None] = {}
        for adapter in np.unique(token_adapter):
            sel = token_adapter == adapter
            adapter_rows[int(adapter)] = None if (full and sel.all()) else put(rows[sel], torch.long)
        return cls(n_rows, groups, adapter_rows)

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
