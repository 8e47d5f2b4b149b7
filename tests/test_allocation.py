"""The controls of the rank-quality curves: the oracle's knapsack against brute force, and the
pinned / random allocations realised through the scheduler."""

from __future__ import annotations

import itertools

import chunkwise as cw
import numpy as np
import pytest
from chunkwise.errors import InputError
from chunkwise.eval.allocation import (
    chunk_spans,
    lagrangian_allocation,
    pinned_config,
    pinned_difficulty,
    random_difficulty,
    spread_config,
)

RANKS = (0, 4, 8, 16, 32, 64)


def brute_force(lengths, utility, ranks, budget_cost):
    best = -np.inf
    for choice in itertools.product(range(len(ranks)), repeat=len(lengths)):
        cost = sum(n * ranks[j] for n, j in zip(lengths, choice, strict=True))
        if cost <= budget_cost + 1e-9:
            best = max(best, sum(utility[c, j] for c, j in enumerate(choice)))
    return best


@pytest.mark.parametrize("seed", range(30))
def test_lagrangian_is_optimal_at_its_own_cost_and_fits(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 6))
    ranks = RANKS[: int(rng.integers(2, 5))]
    lengths = rng.integers(1, 40, n)
    # concave-ish and arbitrary utilities alike
    utility = np.cumsum(rng.random((n, len(ranks))) * (rng.random() < 0.5 or -1), axis=1)
    mean = float(rng.uniform(ranks[0], ranks[-1]))
    choice = lagrangian_allocation(lengths, utility, ranks, mean, fill=False)
    cost = float((lengths * np.asarray(ranks)[choice]).sum())
    assert cost <= mean * lengths.sum() + 1e-9
    got = float(utility[np.arange(n), choice].sum())
    # no allocation that costs at most as much does better
    assert got >= brute_force(lengths, utility, ranks, cost) - 1e-9
    # filling spends more of the budget, never past it, and only for gains
    filled = lagrangian_allocation(lengths, utility, ranks, mean)
    f_cost = float((lengths * np.asarray(ranks)[filled]).sum())
    assert cost <= f_cost <= mean * lengths.sum() + 1e-9
    assert float(utility[np.arange(n), filled].sum()) >= got - 1e-12
    assert (filled >= choice).all()
    spare = mean * lengths.sum() - f_cost
    for c in range(n):  # no one-rung upgrade that gains still fits
        k = filled[c]
        if k + 1 < len(ranks) and utility[c, k + 1] > utility[c, k]:
            assert lengths[c] * (ranks[k + 1] - ranks[k]) > spare + 1e-9


def test_identical_chunks_are_split_to_spend_the_budget():
    util = np.tile(np.log1p(np.array(RANKS, float)), (4, 1))
    # four identical chunks, budget for two of them one rung up: the multiplier alone moves all
    # four or none
    got = lagrangian_allocation([10] * 4, util, RANKS, 2.0)
    assert sorted(got.tolist()) == [0, 0, 1, 1]
    assert lagrangian_allocation([10] * 4, util, RANKS, 2.0, fill=False).tolist() == [0, 0, 0, 0]


def test_lagrangian_spends_nothing_it_does_not_need():
    util = np.array([[0.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    # chunk 0 gains from rung 1 only; chunk 1 gains nothing: ties go to the lower rung
    assert lagrangian_allocation([10, 10], util, (0, 4, 8), 8).tolist() == [1, 0]
    # a budget below what chunk 0 wants leaves it at rung 0
    assert lagrangian_allocation([10, 10], util, (0, 4, 8), 1.9).tolist() == [0, 0]


def test_lagrangian_bad_input():
    with pytest.raises(InputError, match="shape"):
        lagrangian_allocation([1, 2], np.zeros((3, 2)), (0, 4), 2)
    with pytest.raises(InputError, match="lowest rank"):
        lagrangian_allocation([1], np.zeros((1, 2)), (4, 8), 2)
    with pytest.raises(InputError):
        lagrangian_allocation([1], np.array([[0.0, np.nan]]), (0, 4), 2)


def plan_of(ids, config, difficulty):
    return cw.Scheduler(config).plan([ids], difficulty=[difficulty])


@pytest.mark.parametrize("seed", range(5))
def test_pinned_difficulty_gives_every_chunk_its_rung(seed):
    rng = np.random.default_rng(seed)
    base = cw.SchedulerConfig(mode="target", target_mean_rank=16)
    ids = rng.integers(0, 500, 300).astype(np.int64)
    spans = chunk_spans(cw.Scheduler(base).plan([ids]))
    rungs = rng.integers(0, len(RANKS), len(spans))
    plan = plan_of(ids, pinned_config(base), pinned_difficulty(spans, rungs, len(RANKS)))
    # every token outside a cross-fade ramp runs at its chunk's pinned rank
    want = np.concatenate([np.full(e - s, RANKS[k]) for (s, e), k in zip(spans, rungs, strict=True)])
    steady = plan.token_rank == plan.token_lo
    assert np.array_equal(plan.token_rank[steady], want[steady])
    # every rank change of the pins is a chunk boundary of the plan (between chunks of equal
    # rungs the constant difficulty may be cut anywhere: the same ranks either way)
    changes = {s for (s, _), k, prev in zip(spans[1:], rungs[1:], rungs[:-1], strict=True) if k != prev}
    assert changes <= {s for s, _ in chunk_spans(plan)}


def test_random_difficulty_keeps_the_chunks_and_meets_the_target():
    rng = np.random.default_rng(0)
    base = cw.SchedulerConfig(mode="target", target_mean_rank=16)
    ids = rng.integers(0, 500, 1000).astype(np.int64)
    spans = chunk_spans(cw.Scheduler(base).plan([ids]))
    d = random_difficulty(spans, rng)
    assert all(len(set(d[s:e].tolist())) == 1 for s, e in spans)
    plan = plan_of(ids, spread_config(base), d)
    starts = {s for s, _ in chunk_spans(plan)}
    # random values differ from chunk to chunk, so every boundary stays
    assert {s for s, _ in spans} <= starts
    rank_of_chunk = plan.chunk_rank.astype(float)
    lens = np.diff(plan.chunk_offsets)
    assert (rank_of_chunk * lens).sum() / lens.sum() <= 16 + 1e-9
    # random: two seeds give two different allocations on the same chunks
    other = plan_of(ids, spread_config(base), random_difficulty(spans, np.random.default_rng(1)))
    assert not np.array_equal(plan.token_rank, other.token_rank)


def test_spans_and_pins_refuse_bad_input():
    with pytest.raises(InputError, match="tile"):
        pinned_difficulty([(0, 4), (5, 8)], [0, 1], 6)
    with pytest.raises(InputError, match="one per chunk"):
        pinned_difficulty([(0, 4)], [0, 1], 6)
    with pytest.raises(InputError, match="not in"):
        pinned_difficulty([(0, 4)], [6], 6)
    with pytest.raises(InputError, match="no chunks"):
        random_difficulty([], np.random.default_rng(0))
    plan = cw.Scheduler().plan([np.arange(40)])
    with pytest.raises(InputError, match="sequences"):
        chunk_spans(plan, 1)
