"""Rank allocations the scheduler did not choose, for the controls of the rank-quality curves:
an *oracle* (chunk ranks chosen knowing every token's loss at every rung) and a *random*
allocation, both on a given chunking and at a given mean rank.

Both are realised through the scheduler itself, so they get the same cross-fades, kernel
segments and token plans as its own plans: :func:`pinned_difficulty` writes one difficulty per
chunk that makes ``threshold`` mode (with :func:`pinned_config`) put each chunk on a chosen
rung, and a random difficulty per chunk in ``target`` mode gives a random allocation at the
target mean rank. With ``chunk_penalty=0`` a piecewise-constant difficulty is segmented at its
own steps (any coarser chunking costs more, any finer one gives the same ranks).

Numpy only: no torch, no model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from ..errors import InputError
from ..schedule.config import SchedulerConfig
from ..schedule.plan import Plan

__all__ = [
    "chunk_spans",
    "lagrangian_allocation",
    "pinned_config",
    "pinned_difficulty",
    "random_difficulty",
    "spread_config",
]


def chunk_spans(plan: Plan, seq: int = 0) -> list[tuple[int, int]]:
    """The chunks of sequence ``seq`` of ``plan`` as (start, end) offsets inside the sequence."""
    if not 0 <= seq < len(plan.seq_offsets) - 1:
        raise InputError(f"seq: the plan has {len(plan.seq_offsets) - 1} sequences, got {seq}", "seq")
    base = int(plan.seq_offsets[seq])
    idx = np.flatnonzero(plan.chunk_seq == seq)
    return [(int(plan.chunk_offsets[c]) - base, int(plan.chunk_offsets[c + 1]) - base) for c in idx]


def _check_spans(spans: Sequence[tuple[int, int]]) -> int:
    end = 0
    for s, e in spans:
        if s != end or e <= s:
            raise InputError(f"spans: must tile [0, T) in order, got {list(spans)}", "spans")
        end = e
    if not spans:
        raise InputError("spans: no chunks", "spans")
    return end


def lagrangian_allocation(
    lengths: Sequence[int] | np.ndarray,
    utility: np.ndarray,
    ranks: Sequence[int],
    mean_rank: float,
    fill: bool = True,
) -> np.ndarray:
    """The rung of each chunk that maximises ``sum_c utility[c, rung_c]`` subject to the
    token-weighted mean rank ``sum_c len_c * ranks[rung_c] / sum_c len_c <= mean_rank``.

    The multiple-choice knapsack is solved by its Lagrangian relaxation: each chunk takes
    ``argmax_j utility[c, j] - lam * len_c * ranks[j]`` (ties to the lower rung), and ``lam`` is
    the smallest multiplier (found by bisection to float precision) whose allocation fits. Every
    Lagrangian solution is optimal among all allocations that cost no more than it does, so
    the result is exact up to the gap between the budget and the cost of the nearest
    breakpoint. ``fill`` then spends that gap greedily: while some chunk's one-rung upgrade
    fits the budget and gains utility, the one with the best gain per rank-token is taken
    (identical chunks, which the multiplier can only move together, are thus split).
    Returns int64 rung indices.
    """
    lens = np.asarray(lengths, dtype=np.float64).reshape(-1)
    util = np.asarray(utility, dtype=np.float64)
    r = np.asarray(ranks, dtype=np.float64).reshape(-1)
    if util.shape != (len(lens), len(r)):
        raise InputError(f"utility: need shape ({len(lens)}, {len(r)}), got {util.shape}", "utility")
    if not (np.isfinite(util).all() and (lens > 0).all() and np.all(np.diff(r) > 0)):
        raise InputError("utility: need finite utilities, positive lengths and rising ranks", "utility")
    budget = float(mean_rank) * lens.sum()
    if not np.isfinite(budget) or mean_rank < r[0]:
        msg = f"mean_rank: must be at least the lowest rank {r[0]:g}, got {mean_rank}"
        raise InputError(msg, "mean_rank")
    cost_of = lens[:, None] * r[None, :]

    def pick(lam: float) -> np.ndarray:
        return np.argmax(util - lam * cost_of, axis=1)  # first max: the lower rung on ties

    def cost(choice: np.ndarray) -> float:
        return float(cost_of[np.arange(len(lens)), choice].sum())

    choice = pick(0.0)
    if cost(choice) > budget:
        lo, hi = 0.0, 1.0
        while cost(pick(hi)) > budget and hi < 1e300:  # the top of the bracket: a multiplier that fits
            hi *= 2.0
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            if mid in (lo, hi):
                break
            if cost(pick(mid)) > budget:
                lo = mid
            else:
                hi = mid
        choice = pick(hi) if cost(pick(hi)) <= budget else np.zeros(len(lens), np.int64)
    if fill:
        _fill(choice, util, cost_of, budget - cost(choice))
    return choice.astype(np.int64)


def _fill(choice: np.ndarray, util: np.ndarray, cost_of: np.ndarray, spare: float) -> None:
    """Greedy one-rung upgrades of ``choice`` (in place) within ``spare`` rank-tokens."""
    top = util.shape[1] - 1
    rows = np.arange(len(choice))
    while True:
        up = np.minimum(choice + 1, top)
        d_util = util[rows, up] - util[rows, choice]
        d_cost = cost_of[rows, up] - cost_of[rows, choice]
        ok = (up > choice) & (d_util > 0) & (d_cost <= spare + 1e-9)
        if not ok.any():
            return
        idx = np.flatnonzero(ok)  # chunks already on the top rung (d_cost 0) are never ok
        c = int(idx[np.argmax(d_util[idx] / d_cost[idx])])
        choice[c] += 1
        spare -= float(d_cost[c])


def pinned_difficulty(spans: Sequence[tuple[int, int]], rungs: Sequence[int], n_rungs: int) -> np.ndarray:
    """Per-token difficulty that puts chunk k of ``spans`` on rung ``rungs[k]`` under
    :func:`pinned_config` (float32 ``(rung + 0.5) / n_rungs``, constant over each chunk)."""
    total = _check_spans(spans)
    if len(rungs) != len(spans):
        raise InputError(f"rungs: need one per chunk ({len(spans)}), got {len(rungs)}", "rungs")
    out = np.empty(total, np.float32)
    for (s, e), k in zip(spans, rungs, strict=True):
        if not 0 <= int(k) < n_rungs:
            raise InputError(f"rungs: rung {k} is not in [0, {n_rungs})", "rungs")
        out[s:e] = (int(k) + 0.5) / n_rungs
    return out


def random_difficulty(spans: Sequence[tuple[int, int]], rng: np.random.Generator) -> np.ndarray:
    """Per-token difficulty, one uniform random value per chunk of ``spans`` (float32)."""
    total = _check_spans(spans)
    out = np.empty(total, np.float32)
    for (s, e), v in zip(spans, rng.random(len(spans)), strict=True):
        out[s:e] = v
    return out


def spread_config(config: SchedulerConfig) -> SchedulerConfig:
    """``config`` with no chunk penalty and no rank budget: a piecewise-constant difficulty is
    then chunked at its steps, and the rungs it asks for are not demoted."""
    return dataclasses.replace(config, chunk_penalty=0.0, budget_share=1.0)


def pinned_config(config: SchedulerConfig) -> SchedulerConfig:
    """:func:`spread_config` in threshold mode with the default thresholds ``j / m``: the rung
    of a chunk of :func:`pinned_difficulty` is the one it was pinned to."""
    return dataclasses.replace(
        spread_config(config), mode="threshold", thresholds=None, quantiles=None, target_mean_rank=None
    )
