"""The LoRA arithmetic of chunkwise's vLLM wrapper, in plain torch (no vLLM import, so it is
tested against a float64 reference in chunkwise's own environment).

vLLM's CPU punica ops (``vllm/lora/ops/torch_ops``) gather each token's whole ``[out, max_rank]``
weight (``lora_b_weights[token_indices]``, a copy per token and module) and contract with
``einsum``: at 512 prefill tokens of a 1536-wide module that is 200 MB copied per module. Here
the tokens of a batch are grouped once per step (:func:`group_tokens`: by LoRA slot, a slice
when consecutive), and each group is two plain matmuls on its LoRA's **rank prefix**
(``x[rows] @ A[slot, :r]ᵀ``, then ``@ B[slot, :, :r]ᵀ``, r the largest rank among its tokens,
a gate matrix zeroing each token's columns past its own rank): the weights are read once per
group and only up to that rank. Tokens of no LoRA (slot -1) are left alone.

Shapes follow vLLM's stacked tensors: ``A`` [max_loras, 1, R, in], ``B`` [max_loras, 1, out, R]
(a leading 4-D or a 3-D ``[max_loras, R, in]`` both work), the shrink buffer [tokens, R] in float32.
"""

from __future__ import annotations

import dataclasses

import torch

__all__ = ["TokenGroup", "expand", "group_tokens", "live_rank", "pack", "shrink", "uniform"]


@dataclasses.dataclass(frozen=True)
class TokenGroup:
    """Tokens of one LoRA slot that run at one rank: ``rows`` is a slice of the step's tokens
    when they are consecutive, else an int64 index tensor."""

    slot: int
    rank: int
    rows: slice | torch.Tensor


def group_tokens(slots: torch.Tensor, ranks: torch.Tensor) -> list[TokenGroup]:
    """Groups a step's tokens by LoRA slot: ``slots`` [tokens] (-1: no LoRA) and ``ranks``
    [tokens] (>= 0) on the CPU. A group runs at the largest rank of its tokens; tokens below it
    need the gate matrix (``chunkwise.schedule.gate_matrix``, zero past each token's rank), as in
    chunkwise's own layer: reading one LoRA's prefix once beats reading nested prefixes per rank
    (a decode step is bound by those bytes). Tokens without a LoRA or at rank 0 belong to no
    group (their output is the base layer's)."""
    slots = slots.to("cpu", torch.long)
    ranks = ranks.to("cpu", torch.long)
    live = (slots >= 0) & (ranks > 0)
    if not bool(live.any()):
        return []
    groups = []
    for slot in torch.unique(slots[live]).tolist():
        mine = live & (slots == slot)
        rows = torch.nonzero(mine).flatten()
        first, last = int(rows[0]), int(rows[-1])
        where: slice | torch.Tensor = slice(first, last + 1) if last - first + 1 == len(rows) else rows
        groups.append(TokenGroup(int(slot), int(ranks[mine].max()), where))
    return groups


def uniform(groups: list[TokenGroup], ranks: torch.Tensor) -> bool:
    """Whether every token of every group runs at its group's rank (no gate matrix needed for
    the ranks alone)."""
    return all(bool((ranks[g.rows] == g.rank).all()) for g in groups)


def pack(groups: list[TokenGroup]) -> tuple[torch.Tensor | None, list[TokenGroup]]:
    """``(perm, packed)``: when some group's rows are scattered (requests of one LoRA apart in the
    batch), ``perm`` lists every group's rows one group after another and ``packed`` gives each
    group as a slice of ``perm``, so a layer gathers its input once and scatters once instead of
    once per group; ``(None, groups)`` when every group is a slice already."""
    if all(isinstance(g.rows, slice) for g in groups):
        return None, groups
    parts, packed, start = [], [], 0
    for g in groups:
        rows = g.rows if isinstance(g.rows, torch.Tensor) else torch.arange(g.rows.start, g.rows.stop)
        parts.append(rows)
        packed.append(TokenGroup(g.slot, g.rank, slice(start, start + len(rows))))
        start += len(rows)
    return torch.cat(parts), packed


def _rank(g: TokenGroup, width: int, rank_cap: dict[int, int] | None) -> int:
    """The rank group ``g`` runs at in a layer: its own, within the buffer's ``width`` and its
    LoRA's live rank there."""
    return min(g.rank, width, g.rank if rank_cap is None else rank_cap.get(g.slot, g.rank))


def _matrix(stacked: torch.Tensor, slot: int) -> torch.Tensor:
    """One slot's 2-D weight out of vLLM's stacked [max_loras, (1,) a, b] tensor."""
    w = stacked[slot]
    return w[0] if w.ndim == 3 else w


def live_rank(stacked: torch.Tensor, slot: int, rank_dim: int) -> int:
    """1 + the last rank index (along ``rank_dim`` of the slot's 2-D weight) that holds a nonzero:
    vLLM pads every LoRA to ``max_lora_rank`` with zeros, and the zero part adds nothing, so
    stopping there is exact."""
    w = _matrix(stacked, slot)
    other = 1 - rank_dim
    nonzero = torch.nonzero(w.abs().amax(dim=other) > 0).flatten()
    return int(nonzero[-1]) + 1 if len(nonzero) else 0


def shrink(
    out: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    groups: list[TokenGroup],
    scale: float,
    rank_cap: dict[int, int] | None = None,
    gates: torch.Tensor | None = None,
    perm: torch.Tensor | None = None,
) -> None:
    """``out`` [tokens, R] = ``scale · x[rows] @ A[slot, :r]ᵀ`` for each group's rows (columns at or
    above r zero), every other row zero; in ``out``'s dtype. ``rank_cap`` (slot -> rank) caps a
    group's rank at its LoRA's live rank in this layer. ``gates`` [tokens, >= every group's rank]
    (``chunkwise.schedule.gate_matrix``: cross-fades and rung scales) multiply the result.
    With ``perm`` (:func:`pack`), the groups' rows and the gates' rows are positions in ``perm``."""
    out.zero_()
    if perm is not None:
        packed = out.new_zeros(len(perm), out.shape[1])
        shrink(packed, x.index_select(0, perm), a, groups, scale, rank_cap, gates)
        out.index_copy_(0, perm, packed)
        return
    for g in groups:
        r = _rank(g, out.shape[1], rank_cap)
        if r <= 0:
            continue
        w = _matrix(a, g.slot)[:r].to(out.dtype)
        h = torch.mm(x[g.rows].to(out.dtype), w.T)
        if scale != 1.0:
            h.mul_(scale)
        if gates is not None:
            h.mul_(gates[g.rows, :r])
        out[g.rows, :r] = h


def expand(
    y: torch.Tensor,
    h: torch.Tensor,
    b: torch.Tensor,
    groups: list[TokenGroup],
    offset: int,
    size: int,
    add_inputs: bool = True,
    rank_cap: dict[int, int] | None = None,
    perm: torch.Tensor | None = None,
) -> None:
    """``y[rows, offset : offset + size] += h[rows, :r] @ B[slot, :, :r]ᵀ`` per group, in ``y``'s
    dtype (``add_inputs=False``: that block of ``y`` is overwritten, zero for rows of no group).
    With ``perm`` (:func:`pack`), the groups' rows are positions in ``perm``."""
    block = y[:, offset : offset + size]
    if not add_inputs:
        block.zero_()
    if perm is not None:
        packed = y.new_zeros(len(perm), size)
        expand(packed, h.index_select(0, perm), b, groups, 0, size, True, rank_cap)
        block.index_add_(0, perm, packed)
        return
    for g in groups:
        r = _rank(g, h.shape[1], rank_cap)
        if r <= 0:
            continue
        w = _matrix(b, g.slot)[:size, :r].to(y.dtype)
        hs = h[g.rows, :r].to(y.dtype)
        if isinstance(g.rows, slice):
            block[g.rows].addmm_(hs, w.T)
        else:
            block.index_add_(0, g.rows, torch.mm(hs, w.T))
