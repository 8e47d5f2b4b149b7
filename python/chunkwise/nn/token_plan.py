"""A plan laid onto the tokens of one forward pass: the tokens of each adapter and their gates.

The scheduler's :class:`~chunkwise.Plan` is ragged (real tokens only); a forward pass sees a
padded [batch, seq] grid. :class:`TokenPlan` maps one onto the other once per forward, so that
every :class:`~chunkwise.nn.ChunkwiseLinear` of the model does only tensor work: for each
adapter block, ``y[rows] += ((x[rows] A'[:r]ᵀ) ⊙ G) B'[:, :r]ᵀ`` with the gate matrix
``G[t, j] = scale_t · (gate_lo_t if j < lo_t else gate_hi_t if j < rank_t else 0)`` built here,
once, in the layers' dtype. Everything a layer would otherwise redo per module is settled here:

- which rows each adapter owns, as a contiguous ``span`` (a view, no gather or scatter) when
  they are consecutive — one sequence per adapter without padding, or any decode step — else
  as an index tensor;
- ``gates`` is None when every token of the block runs the same rank at gate 1 and the same
  scale (no cross-fade inside): the layer then needs two matmuls and nothing else;
- the largest rank any token of the block uses, so layers read only that prefix.

On CPU this beats rank-grouped gathers: the LoRA matmuls are a small share of the layer, the
extra passes over x are not. The CUDA kernels skip the zero columns instead.

When several adapters share a CPU forward and each owns a cell of its own (the forward's rows
cut into equal runs: one adapter per batch row, padding included; decode steps),
:class:`GroupedPass` runs them all in one batched matmul pair at a common rank, the few tokens
above it in band blocks: one ``bmm`` over n adapters costs a fraction of n pairs of small
matmuls.

:class:`DecodePlan` is the same for decode steps, with every buffer allocated once: each step
rewrites the gates in place (the CPU twin of :class:`~chunkwise.kernels.DecodeSegments`).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import InputError
from ..kernels.segments import DecodeSegments, StepDecisions, TokenArrays
from ..schedule import gate_matrix, gates_one

if TYPE_CHECKING:
    from ..kernels import KernelSegments
    from ..schedule import Plan

__all__ = [
    "BLOCK_COST",
    "AdapterBlock",
    "DecodePlan",
    "GroupedPass",
    "TokenPlan",
    "band_cost",
    "decode_rank",
    "rank_runs",
]


@dataclasses.dataclass
class AdapterBlock:
    """The tokens of one adapter in one forward.

    ``rows``: their rows of the flattened input (None: every row, in order); ``span``: the same
    rows as ``(start, stop)`` when they are consecutive; ``gates`` [n, max_rank - col] (None:
    every token at ``max_rank``, gate 1, times ``scale``); ``max_rank``: the largest rank any of
    them uses. ``col`` > 0 makes it a band: only singular directions ``col <= j < max_rank``
    (a :class:`GroupedPass` ran the ones below), and no lora_B bias.
    """

    adapter: int
    rows: torch.Tensor | None
    gates: torch.Tensor | None
    max_rank: int
    span: tuple[int, int] | None = None
    scale: float = 1.0
    col: int = 0


@dataclasses.dataclass
class GroupedPass:
    """Every adapter of a forward in one batched matmul pair (the CPU torch path).

    The forward's rows are ``n`` cells of ``m`` consecutive rows, cell k's planned tokens all
    of adapter ``adapters[k]`` (each adapter once; its other rows, padding, are gated to 0);
    one ``bmm`` and one ``baddbmm`` add
    ``((x A'[:rank]ᵀ) ⊙ G) B'[:, :rank]ᵀ`` of every entry's adapter, ``gates`` [n, m, rank]
    (None: every token at ``rank``, gate 1, times ``scale``). The adapters' weights are a view of
    the layer's stacked factors when ``adapters`` is ``first, first + 1, ...``, else gathered by
    ``ids``. Tokens above ``rank`` get their remaining directions from the ``extra`` band blocks
    (``col == rank``); lora_B biases are added per block of :attr:`TokenPlan.blocks`.
    """

    n: int
    m: int
    adapters: tuple[int, ...]
    first: int | None
    ids: torch.Tensor | None
    rank: int = 0
    gates: torch.Tensor | None = None
    scale: float = 1.0
    extra: list[AdapterBlock] = dataclasses.field(default_factory=list)


def _cells(spans: list[tuple[int, int] | None], n_rows: int) -> tuple[list[int], int] | None:
    """For the row span of each adapter of a forward of ``n_rows`` rows: ``(order, m)`` when
    there are n >= 2, ``n_rows`` is n cells of m consecutive rows and each adapter's rows lie in
    a cell of their own (cell k holds the rows of adapter ``order[k]``; its other rows are not
    planned: padding); else None (no grouped pass)."""
    n = len(spans)
    if n < 2 or n_rows % n:
        return None
    m = n_rows // n
    cell = []
    for span in spans:
        if span is None or span[1] > (span[0] // m + 1) * m:
            return None
        cell.append(span[0] // m)
    if len(set(cell)) != n:
        return None
    return sorted(range(n), key=cell.__getitem__), m


#: The largest cell whose adapters may be gathered (entries not counting up: their weights are
#: copied per module and forward): in decode steps the copy costs less than a matmul pair per
#: adapter (8 adapters of SmolLM2: 10.8 against 24.4 ms per step's LoRA path), in prefill cells
#: of 64 rows it cost more than the blocks it replaced.
GATHER_MAX_ROWS = 16


def _entries(
    adapters: list[int], m: int, device: str | torch.device
) -> tuple[int | None, torch.Tensor | None] | None:
    """``(first, None)`` when the entries' adapters count up from ``first`` (their weights are a
    view), else ``(None, ids)`` to gather them by, or None when cells of ``m`` rows are too
    large for that (:data:`GATHER_MAX_ROWS`)."""
    if adapters == list(range(adapters[0], adapters[0] + len(adapters))):
        return adapters[0], None
    if m > GATHER_MAX_ROWS:
        return None
    return None, torch.tensor(adapters, dtype=torch.int64, device=device)


def _span(rows: np.ndarray) -> tuple[int, int] | None:
    """``(first, last + 1)`` when ``rows`` are consecutive increasing integers, else None."""
    if rows.size == 0:
        return None
    first, last = int(rows[0]), int(rows[-1])
    if last - first + 1 == rows.size and (rows.size == 1 or bool((np.diff(rows) == 1).all())):
        return first, last + 1
    return None


def _uniform(
    rank: np.ndarray, lo: np.ndarray, gate_lo: np.ndarray, gate_hi: np.ndarray, scale: np.ndarray
) -> float | None:
    """The common scale when every token runs one rank with all its gates 1 and one scale (no
    cross-fade among them), else None."""
    if rank.size == 0:
        return 1.0
    r, s = rank[0], scale[0]
    ones = gates_one(rank, lo, gate_lo, gate_hi)
    if bool((rank == r).all()) and bool((scale == s).all()) and bool(ones.all()):
        return float(s)
    return None


#: What one more adapter block costs, in rank-tokens (one token at one rank through every
#: adapted module): each block is its own pair of small BLAS calls per module, whose fixed cost
#: (``python -m benches.lora_blocks``, SmolLM2-135M, 2 threads on the 2-core CPU) was what
#: ~4-6k rank-tokens of LoRA work cost on the 2026-12-03 instance and ~2-3.7k on 2026-12-04's:
#: 4096 sits in that range; ``TokenPlan.build(block_cost=)`` sets it per machine.
BLOCK_COST = 4096

#: Runs of equal rank the block search looks back over: exact below it, and it keeps
#: :func:`rank_runs` linear in the number of runs of a long prompt.
RUN_WINDOW = 64


def rank_runs(rank: np.ndarray, block_cost: int = BLOCK_COST) -> list[tuple[int, int]]:
    """``[start, stop)`` blocks covering ``range(len(rank))`` that minimise the LoRA path's cost
    ``sum(block_cost + len(block) * max(rank[block]))`` (a block whose tokens are all at rank 0
    costs nothing: the layer skips it).

    Blocks are unions of consecutive runs of equal rank; a block runs at its largest rank, the
    gates keep each token's own (the output does not depend on the blocks, only the time). A
    dynamic programme over the runs, each block spanning at most :data:`RUN_WINDOW` of them.
    """
    if block_cost < 0:
        raise InputError(f"block_cost: must be >= 0, got {block_cost}", "block_cost")
    n = len(rank)
    if n == 0:
        return [(0, 0)]
    cuts = np.flatnonzero(rank[1:] != rank[:-1]) + 1
    ends = np.append(cuts, n)  # stop of run k
    begins = np.concatenate([[0], ends])  # begins[k]: start of run k; begins[m] == n
    run_rank = np.asarray(rank)[begins[:-1]].astype(np.int64)
    m = len(run_rank)
    best = np.zeros(m + 1)
    first = np.zeros(m + 1, np.int64)  # first run of the last block of the best cover of runs [0, j)
    for j in range(1, m + 1):
        lo = max(0, j - RUN_WINDOW)
        peak = np.maximum.accumulate(run_rank[lo:j][::-1])[::-1]  # max rank of runs [i, j)
        cost = best[lo:j] + (begins[j] - begins[lo:j]) * peak + np.where(peak > 0, block_cost, 0)
        k = int(np.argmin(cost))
        best[j], first[j] = cost[k], lo + k
    runs: list[tuple[int, int]] = []
    j = m
    while j > 0:
        i = int(first[j])
        runs.append((int(begins[i]), int(begins[j])))
        j = i
    return runs[::-1]


def _token_pieces(
    plan: Plan, rows: np.ndarray, mask: np.ndarray | None, t: int, adapters: np.ndarray | None
) -> tuple[np.ndarray, ...]:
    """(rank, lo, gate_lo, gate_hi, scale, adapter, flat row) of each token ``plan`` plans for
    the batch rows ``rows`` of a [batch, t] forward (``mask``: its 0/1 mask, or None: full)."""
    if plan.n_seqs != len(rows):
        raise InputError(f"plan: has {plan.n_seqs} sequences for a batch of {len(rows)}", "plan")
    if mask is None:
        if plan.n_tokens != len(rows) * t:
            raise InputError(f"plan: covers {plan.n_tokens} tokens, the forward has {len(rows)}x{t}", "plan")
        cols = np.tile(np.arange(t), len(rows))
        row_of = np.repeat(rows, t)
        lengths = np.full(len(rows), t)
    else:
        sub = mask[rows]
        r, cols = np.nonzero(sub)
        row_of = rows[r]
        lengths = sub.sum(axis=1)
    if not np.array_equal(np.diff(plan.seq_offsets), lengths):
        raise InputError(
            f"plan: sequence lengths {np.diff(plan.seq_offsets).tolist()} do not match the "
            f"forward's {lengths.tolist()}",
            "plan",
        )
    scale = np.repeat(plan.seg_scale, np.diff(plan.seg_offsets))
    if adapters is None and len(plan.seg_adapter):
        # a sequence's adapter is its first segment's (an empty sequence reads a neighbour's:
        # it has no token to apply it to)
        first_segment = np.searchsorted(plan.seg_offsets, plan.seq_offsets[:-1], side="left")
        adapter_of_seq = plan.seg_adapter[np.minimum(first_segment, len(plan.seg_adapter) - 1)]
    else:
        adapter_of_seq = np.zeros(len(rows), np.int32)
    if adapters is not None:
        adapter_of_seq = np.asarray(adapters, dtype=np.int32)[rows]
    token_adapter = np.repeat(adapter_of_seq, lengths)
    flat = (row_of * t + cols).astype(np.int64)
    return (plan.token_rank, plan.token_lo, plan.gate_lo, plan.gate_hi, scale, token_adapter, flat)


def _block(
    parts: tuple[np.ndarray, ...],
    adapter: int,
    index: torch.Tensor | None,
    span: tuple[int, int] | None,
    col: int,
    device: str | torch.device,
    dtype: torch.dtype,
) -> AdapterBlock:
    """The block of the tokens whose (rank, lo, gate_lo, gate_hi, scale) are ``parts`` (their
    gates from direction ``col`` on)."""
    rank, lo, gate_lo, gate_hi, scale = parts
    rank = rank.astype(np.int64)
    r_max = int(rank.max()) if rank.size else 0
    common = _uniform(rank, lo, gate_lo, gate_hi, scale)
    gates = None
    if common is None:
        g = np.ascontiguousarray(gate_matrix(rank, lo, gate_lo, gate_hi, scale, r_max)[:, col:])
        gates = torch.from_numpy(g).to(device=device, dtype=dtype)
    return AdapterBlock(adapter, index, gates, r_max, span, 1.0 if common is None else common, col)


#: What a band block costs in a decode step against the grouped pass's rank rows (one adapter
#: reading one more rank row in the batched matmul): a pair of small matmuls per module ~11 us,
#: a rank row of the bmm ~0.23 us, a band's own rank row ~2 of those (8 adapters of SmolLM2,
#: 2-core CPU, 2026-12-07; one row at rank 64 among seven at 4: 14.1 ms per step's LoRA path as
#: rank 4 + a band, 30.5 ms all at 64).
DECODE_BAND_COST = 48
DECODE_BAND_ROW = 2


def decode_rank(tops: list[int], n: int) -> int:
    """The common rank of a decode step's grouped pass over ``n`` cells whose largest ranks are
    ``tops``: the one minimising ``n x c`` plus, per cell above it, ``DECODE_BAND_COST +
    DECODE_BAND_ROW x (top - c)`` (decode reads weights: their rows are the cost)."""
    best, rank = None, max(tops, default=0)
    for c in sorted(set(tops), reverse=True):
        cost = n * c + sum(DECODE_BAND_COST + DECODE_BAND_ROW * (t - c) for t in tops if t > c)
        if best is None or cost < best:
            best, rank = cost, c
    return rank


def band_cost(cells: np.ndarray, c: int, block_cost: int) -> int:
    """``sum(block_cost + len x top)`` over the maximal runs of tokens above rank ``c`` in the
    rows of ``cells`` [n, m] (top: the run's largest rank minus c), vectorised."""
    above = np.maximum(cells - c, 0)
    live = np.pad(above > 0, ((0, 0), (1, 1)))
    edges = np.diff(live.astype(np.int8), axis=1)
    starts, stops = np.nonzero(edges == 1), np.nonzero(edges == -1)
    if starts[0].size == 0:
        return 0
    flat = above.reshape(-1)
    begin = starts[0] * cells.shape[1] + starts[1]
    end = stops[0] * cells.shape[1] + stops[1]
    tops = np.maximum.reduceat(flat, begin)  # each run's max: reduceat stops at the next start
    return int(len(begin) * block_cost + ((end - begin) * tops).sum())


def _grouped_prefill(
    tokens: TokenArrays,
    groups: list[tuple[int, np.ndarray, tuple[int, int] | None]],
    blocks_cost: int,
    block_cost: int,
    device: str | torch.device,
    dtype: torch.dtype,
) -> GroupedPass | None:
    """The grouped pass of a forward whose adapters own a cell of rows each (a batch row each,
    padding included), at the common rank that minimises ``block_cost + rows x rank`` plus the
    band blocks above it (the cost :func:`rank_runs` counts; padding rows count as rank 0 under
    the bands and at the full common rank in the pass); None when the layout does not allow one
    or ``blocks_cost`` (the plain blocks') is not higher."""
    lay = _cells([span for _, _, span in groups], tokens.n_rows)
    if lay is None:
        return None
    order, m = lay
    n = len(order)
    # per row of the forward: unplanned rows (padding) at rank 0, which gates them to 0
    rank = np.zeros(tokens.n_rows, np.int64)
    lo = np.zeros(tokens.n_rows, np.int32)
    gate_lo, gate_hi, scale = (np.ones(tokens.n_rows, np.float32) for _ in range(3))
    for _, sel, _ in groups:
        at = tokens.rows[sel]
        rank[at], lo[at], scale[at] = tokens.rank[sel], tokens.lo[sel], tokens.scale[sel]
        gate_lo[at], gate_hi[at] = tokens.gate_lo[sel], tokens.gate_hi[sel]
    adapters = [groups[k][0] for k in order]
    entries = _entries(adapters, m, device)
    if entries is None:
        return None
    cells = rank.reshape(n, m)
    # the common rank: each run above it one band (an upper bound of what rank_runs then finds)
    best: tuple[int, int] | None = None
    for c in np.unique(rank):
        if c <= 0:
            continue
        cost = block_cost + n * m * int(c) + band_cost(cells, int(c), block_cost)
        if best is None or cost < best[0]:
            best = (cost, int(c))
    if best is None or best[0] >= blocks_cost:
        return None
    c = best[1]
    bands = []
    for k in range(n):
        above = np.maximum(cells[k] - c, 0)
        bands += [(k * m + a, k * m + b) for a, b in rank_runs(above, block_cost) if above[a:b].max() > 0]
    first, ids = entries
    # no gate matrix when every row uses all of directions < c at gate 1 and one scale
    common = _uniform(np.minimum(rank, c), lo, gate_lo, gate_hi, scale)
    gates = None
    if common is None:
        g = gate_matrix(rank, lo, gate_lo, gate_hi, scale, c)
        gates = torch.from_numpy(g.reshape(n, m, c)).to(device=device, dtype=dtype)
    extra = []
    for a, b in bands:
        index = torch.arange(a, b, device=device)
        parts = (rank[a:b], lo[a:b], gate_lo[a:b], gate_hi[a:b], scale[a:b])
        extra.append(_block(parts, adapters[a // m], index, (a, b), c, device, dtype))
    scale_all = 1.0 if common is None else common
    return GroupedPass(n, m, tuple(adapters), first, ids, c, gates, scale_all, extra)


@dataclasses.dataclass
class TokenPlan:
    """What every adapted layer applies in one forward: ``n_tokens`` rows of the flattened input."""

    n_tokens: int
    blocks: list[AdapterBlock]
    #: The same plan as kernel segments on the device (CUDA devices only; see chunkwise.kernels).
    segments: KernelSegments | DecodeSegments | None = None
    #: The blocks' work as one batched pass (CPU, several adapters a cell each), else None; a
    #: layer without stacked factors for all of its adapters runs ``blocks`` instead.
    grouped: GroupedPass | None = None
    #: The only block when it covers every row in order (``rows`` None), else None: what a
    #: layer checks once per forward to take its folded path (set from ``blocks`` at creation;
    #: the blocks' ranks and gates may change later, their adapter and rows may not).
    whole: AdapterBlock | None = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        only = self.blocks[0] if len(self.blocks) == 1 else None
        self.whole = only if only is not None and only.rows is None else None

    @classmethod
    def build(
        cls,
        tokens: TokenArrays,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        block_cost: int = BLOCK_COST,
    ) -> TokenPlan:
        """Builds the blocks. ``tokens.rows[i]`` is the row of planned token i in the flattened
        forward input of ``tokens.n_rows`` rows (rows with no planned token get no adapter);
        consecutive rows of one adapter are cut into blocks by :func:`rank_runs` at
        ``block_cost``."""
        token_rank, rows, n_rows = tokens.rank, tokens.rows, tokens.n_rows
        full = len(rows) == n_rows and np.array_equal(rows, np.arange(n_rows))
        blocks = []
        groups: list[tuple[int, np.ndarray, tuple[int, int] | None]] = []
        cost = 0
        for adapter in np.unique(tokens.adapter):
            sel = np.flatnonzero(tokens.adapter == adapter)
            mine = rows[sel]
            everyone = full and len(sel) == n_rows
            span = (0, n_rows) if everyone else _span(mine)
            groups.append((int(adapter), sel, span))
            # consecutive rows: the cheapest blocks of runs of equal rank (views);
            # scattered rows: one gathered block
            runs = rank_runs(token_rank[sel], block_cost) if span is not None else [(0, len(sel))]
            for start, stop in runs:
                idx = sel[start:stop]
                whole = everyone and len(runs) == 1
                sub = None if whole or span is None else (span[0] + start, span[0] + stop)
                index = None if whole else torch.from_numpy(rows[idx].astype(np.int64)).to(device)
                parts = (
                    token_rank[idx],
                    tokens.lo[idx],
                    tokens.gate_lo[idx],
                    tokens.gate_hi[idx],
                    tokens.scale[idx],
                )
                block = _block(parts, int(adapter), index, sub, 0, device, dtype)
                cost += block_cost + len(idx) * block.max_rank if block.max_rank > 0 else 0
                blocks.append(block)
        grouped = None
        if torch.device(device).type == "cpu":
            grouped = _grouped_prefill(tokens, groups, cost, block_cost, device, dtype)
        segments = None
        if torch.device(device).type == "cuda":
            from ..kernels import KernelSegments

            segments = KernelSegments.from_token_arrays(tokens, device)
        return cls(n_rows, blocks, segments, grouped)

    @classmethod
    def from_plan(
        cls,
        plan: Plan,
        attention_mask: torch.Tensor | None,
        shape: tuple[int, int],
        adapters: np.ndarray | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> TokenPlan:
        """Lays a scheduler plan over a [batch, seq] forward. With ``attention_mask`` the plan's
        sequences are the masked-in tokens of each row (left or right padding); without, the
        plan must cover the full grid row by row."""
        return cls.from_plans([(plan, np.arange(shape[0]))], attention_mask, shape, adapters, device, dtype)

    @classmethod
    def from_plans(
        cls,
        parts: list[tuple[Plan, np.ndarray]],
        attention_mask: torch.Tensor | None,
        shape: tuple[int, int],
        adapters: np.ndarray | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> TokenPlan:
        """:meth:`from_plan` for a batch planned in parts: ``(plan, rows)`` plans the batch rows
        ``rows`` (its sequence i is row ``rows[i]``); every row with a token belongs to exactly
        one part (a row the mask leaves empty may belong to none). Generation plans the rows that
        start in a prefill chunk apart from the others."""
        b, t = shape
        mask = None if attention_mask is None else attention_mask.detach().to("cpu").numpy().astype(bool)
        covered = np.concatenate([np.asarray(r) for _, r in parts]) if parts else np.zeros(0, np.int64)
        needed = np.arange(b) if mask is None else np.flatnonzero(mask.any(axis=1))
        if len(np.unique(covered)) != len(covered) or not np.isin(needed, covered).all():
            raise InputError(f"plan: its parts cover rows {covered.tolist()} of a batch of {b}", "plan")
        pieces = [_token_pieces(plan, np.asarray(rows), mask, t, adapters) for plan, rows in parts]
        rank, lo, g_lo, g_hi, scale, adapter, flat = (
            np.concatenate([p[i] for p in pieces]) for i in range(7)
        )
        order = np.argsort(flat, kind="stable")  # by row of the flattened input
        tokens = TokenArrays(
            rank[order], lo[order], g_lo[order], g_hi[order], scale[order], adapter[order], flat[order], b * t
        )
        return cls.build(tokens, device, dtype)

    @classmethod
    def from_plan_slice(
        cls,
        plan: Plan,
        start: int,
        stop: int,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> TokenPlan:
        """Tokens [start, stop) of a one-sequence ``plan`` as the plan of a forward of
        ``stop - start`` rows, ranks, cross-fade gates and rung scales as planned: a prefill, or
        one decode step, that follows a plan made ahead over a longer sequence."""
        n = int(plan.seq_offsets[-1])
        if len(plan.seq_offsets) != 2 or not 0 <= start < stop <= n:
            raise InputError(
                f"plan: slicing needs a one-sequence plan and 0 <= start < stop <= {n}, "
                f"got {len(plan.seq_offsets) - 1} sequences, [{start}, {stop})",
                "plan",
            )
        per_segment = np.diff(plan.seg_offsets)
        sl = slice(start, stop)
        tokens = TokenArrays(
            plan.token_rank[sl],
            plan.token_lo[sl],
            plan.gate_lo[sl],
            plan.gate_hi[sl],
            np.repeat(plan.seg_scale, per_segment).astype(np.float32)[sl],
            np.repeat(plan.seg_adapter, per_segment)[sl],
            np.arange(stop - start),
            stop - start,
        )
        return cls.build(tokens, device, dtype)

    @classmethod
    def uniform(
        cls,
        n_rows: int,
        rank: int,
        adapters_per_row: np.ndarray,
        device: str | torch.device,
        dtype: torch.dtype,
    ) -> TokenPlan:
        """Every row at one rank (e.g. the top rung: what PEFT computes)."""
        ones = np.ones(n_rows, np.float32)
        r = np.full(n_rows, rank, np.int32)
        tokens = TokenArrays(r, r, ones, ones, ones, adapters_per_row, np.arange(n_rows), n_rows)
        return cls.build(tokens, device, dtype)


class DecodePlan:
    """The :class:`TokenPlan` of decode steps (row i = sequence i), reused for every step.

    The adapter blocks (which rows each adapter owns) are fixed for the whole generation and
    the gate matrix [batch, top rank] is allocated once; :meth:`update` writes a step's
    decisions into it in place and sets each block's rank, gates view and scale. On CUDA the
    host matrix is copied to the device buffer in one copy, so a captured graph could replay.
    On the CPU, when the adapters own a cell of rows each (one row each, say), the
    plan also carries a :class:`GroupedPass` at the step's top rank (its gates a view of the
    same matrix): one batched matmul pair for all adapters, where a pair per adapter cost ~3x
    as much at 8 adapters of SmolLM2 (``python -m benches.lora_blocks --grouped``).
    """

    def __init__(
        self, adapters: np.ndarray, top_rank: int, device: str | torch.device, dtype: torch.dtype
    ) -> None:
        self.adapters = np.asarray(adapters, np.int32).reshape(-1)
        self.batch = len(self.adapters)
        self.top_rank = int(top_rank)
        self._host = np.zeros((self.batch, self.top_rank), np.float32)
        self._dev = torch.zeros((self.batch, self.top_rank), device=device, dtype=dtype)
        self._shares_memory = torch.device(device).type == "cpu" and dtype == torch.float32
        if self._shares_memory:
            self._dev = torch.from_numpy(self._host)
        self._groups: list[tuple[int, np.ndarray, tuple[int, int] | None, torch.Tensor | None]] = []
        self._order: list[int] = []  # cell k of the grouped pass is group _order[k]
        blocks = []
        for adapter in np.unique(self.adapters):
            rows = np.flatnonzero(self.adapters == adapter)
            span = _span(rows)
            everyone = len(rows) == self.batch
            index = None if everyone else torch.from_numpy(rows.astype(np.int64)).to(device)
            self._groups.append((int(adapter), rows, None if everyone else span, index))
            blocks.append(AdapterBlock(int(adapter), index, None, 0, None if everyone else span))
        self.plan = TokenPlan(self.batch, blocks)
        lay = _cells([group[2] for group in self._groups], self.batch)
        if lay is not None and torch.device(device).type == "cpu":
            order, m = lay  # every row is planned: the spans are the cells
            entries = [self._groups[k][0] for k in order]
            found = _entries(entries, m, device)
            if found is not None:
                self.plan.grouped = GroupedPass(len(order), m, tuple(entries), *found)
                self._order = order
        if torch.device(device).type == "cuda":  # the kernels read fixed buffers too
            self.plan.segments = DecodeSegments(self.batch, self.adapters, device)

    def _band(self, k: int, c: int, r: int, common: float | None) -> AdapterBlock:
        """Cell k's directions [c, r) as a band block (gates a view of the step's matrix)."""
        adapter, _, span, index = self._groups[self._order[k]]
        assert span is not None  # a cell: consecutive rows
        gates = None if common is not None else self._dev[span[0] : span[1], c:r]
        return AdapterBlock(adapter, index, gates, r, span, 1.0 if common is None else common, c)

    def update(self, step: StepDecisions) -> TokenPlan:
        """The plan of the next forward, from the decisions of this step (no allocation of
        device memory; one host-to-device copy off the CPU)."""
        if isinstance(self.plan.segments, DecodeSegments):
            self.plan.segments.update(step)
        rank = np.asarray(step.rank)
        lo, g_lo, g_hi, sc = (np.asarray(a) for a in (step.lo, step.gate_lo, step.gate_hi, step.scale))
        uniform = [
            _uniform(rank[rows], lo[rows], g_lo[rows], g_hi[rows], sc[rows]) for _, rows, _, _ in self._groups
        ]
        grouped = self.plan.grouped
        every: float | None = 1.0
        if grouped is not None:
            # cell k is rows [k m, (k + 1) m): its largest rank, as far as any adapter goes
            top = np.minimum(rank.reshape(grouped.n, grouped.m).max(axis=1), self.top_rank).tolist()
            c = decode_rank(top, grouped.n)
            every = _uniform(np.minimum(rank, c), lo, g_lo, g_hi, sc)
        if any(u is None for u in uniform) or every is None:
            gate_matrix(rank, lo, g_lo, g_hi, sc, self.top_rank, out=self._host)
            if not self._shares_memory:
                self._dev.copy_(torch.from_numpy(self._host), non_blocking=self._dev.is_cuda)
        if grouped is not None:  # every cell at rank c in one pass, the cells above it in bands
            grouped.rank, grouped.scale = c, 1.0 if every is None else every
            grouped.gates = None if every is not None else self._dev[:, :c].view(grouped.n, grouped.m, c)
            grouped.extra = [self._band(k, c, r, uniform[self._order[k]]) for k, r in enumerate(top) if r > c]
        for block, (_, rows, span, index), common in zip(
            self.plan.blocks, self._groups, uniform, strict=True
        ):
            r = int(rank[rows].max()) if rows.size else 0
            block.max_rank, block.scale = r, 1.0 if common is None else common
            if common is not None:
                block.gates = None
            elif index is None:
                block.gates = self._dev[:, :r]
            elif span is not None:
                block.gates = self._dev[span[0] : span[1], :r]
            else:
                assert index is not None  # rows neither all nor consecutive
                block.gates = self._dev.index_select(0, index)[:, :r]
        return self.plan
