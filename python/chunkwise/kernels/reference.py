"""The float64 oracle of the segmented LoRA kernels, computed from the segment metadata."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import InputError
from .cuda import LaunchTuning, LoraFactors, check_tuning
from .segments import SegmentArrays, check_segments

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["lora_delta_reference"]


def lora_delta_reference(
    x2: torch.Tensor,
    y2: torch.Tensor,
    factors: LoraFactors | Sequence[tuple[torch.Tensor, torch.Tensor] | None],
    segments: SegmentArrays,
    **tuning: Unpack[LaunchTuning],
) -> torch.Tensor:
    """What :func:`~chunkwise.kernels.lora_delta_cuda` computes, in float64 on the CPU.

    Same arguments (tensors on any device, or numpy arrays), same in-place update of ``y2``
    (each touched row becomes ``(y2 + delta)`` rounded once to y2's dtype; other rows are left
    bit for bit), same return value. The metadata is validated first
    (:func:`~chunkwise.kernels.check_segments`). The tuning arguments of the CUDA path
    (``ksplit``, ``mma``, ``debug_poison``) are accepted and have no effect here.
    """
    check_tuning(tuning)  # accepted like the CUDA path's, and without effect here
    f = LoraFactors.coerce(factors)
    if x2.dim() != 2 or y2.dim() != 2 or x2.shape[0] != y2.shape[0]:
        raise ValueError(f"x2 {tuple(x2.shape)} and y2 {tuple(y2.shape)} must be 2-d with equal rows")
    meta = check_segments(segments, n_adapters=f.n_adapters, n_rows=int(x2.shape[0]))
    n_tok = len(meta["token_lo"])
    if segments.rows is None and n_tok != x2.shape[0]:
        raise InputError(f"token_lo: covers {n_tok} tokens, x2 has {x2.shape[0]} rows (pass rows=)", "rows")
    row_of = meta.get("rows", np.arange(n_tok, dtype=np.int64)).astype(np.int64)
    off = meta["seg_offsets"].astype(np.int64)
    token_seg = np.full(n_tok, -1, np.int64)
    token_seg[off[0] : off[-1]] = np.repeat(np.arange(len(off) - 1), np.diff(off))

    x64 = x2.detach().to("cpu", torch.float64)
    y_host = y2.detach().to("cpu")
    touched: list[np.ndarray] = []
    deltas: list[torch.Tensor] = []
    for a, pair in enumerate(f.pairs):
        if pair is None:
            continue
        A, B = (t.detach().to("cpu", torch.float64) for t in pair)
        full = A.shape[0]
        covered = token_seg >= 0
        sel = np.flatnonzero(covered & (meta["seg_adapter"][np.maximum(token_seg, 0)] == a))
        if sel.size == 0:
            continue
        seg = token_seg[sel]
        rank = np.minimum(meta["seg_rank"][seg].astype(np.int64), full)
        keep = rank > 0
        sel, seg, rank = sel[keep], seg[keep], rank[keep]
        if sel.size == 0:
            continue
        r_max = int(rank.max())
        j = np.arange(r_max)[None, :]
        lo = meta["token_lo"][sel][:, None]
        band = np.where(j < lo, meta["gate_lo"][sel][:, None], meta["gate_hi"][sel][:, None]).astype(
            np.float64
        )
        gates = np.where(j < rank[:, None], band, 0.0) * meta["seg_scale"][seg].astype(np.float64)[:, None]
        rows_a = row_of[sel]
        h = (x64[torch.from_numpy(rows_a)] @ A[:r_max].T) * torch.from_numpy(gates)
        touched.append(rows_a)
        deltas.append(h @ B[:, :r_max].T)
    if touched:
        rows_all = torch.from_numpy(np.concatenate(touched))
        delta = torch.cat(deltas)
        new = (y_host[rows_all].to(torch.float64) + delta).to(y2.dtype)
        y2[rows_all.to(y2.device)] = new.to(y2.device)
    return y2
