"""TokenPlan / DecodePlan and the ChunkwiseLinear paths they select, against a float64 oracle.

The oracle applies the gate formula of docs/architecture.md §4 token by token in float64:
``y[t] += scale_t · Σ_{j<rank_t} g_t(j) · B'[:, j] (A'[j] · x_t)``. Each layout the layer
special-cases is covered: one adapter over every row, consecutive rows (a span), scattered rows
(gather / scatter), gate-free blocks, cross-fades, rank 0, scales != 1 and lora_B biases.
"""

from __future__ import annotations

import itertools

import chunkwise as cw
import numpy as np
import pytest
import torch
from chunkwise.adapters.ladder import LadderModule
from chunkwise.kernels import TokenArrays
from chunkwise.nn import ChunkwiseLinear, DecodePlan, TokenPlan
from torch import nn

IN, OUT, R = 12, 10, 8


def oracle(x, base, ladders, rank, lo, g_lo, g_hi, scale, adapter, rows):
    """Float64, token by token."""
    y = base(x).double()
    xd = x.double()
    for i, row in enumerate(rows):
        lad = ladders.get(int(adapter[i]))
        if lad is None:
            continue
        a, b = lad.a.double(), lad.b.double()
        r = min(int(rank[i]), a.shape[0])
        g = torch.tensor([g_lo[i] if j < lo[i] else g_hi[i] for j in range(r)], dtype=torch.float64)
        y[row] += scale[i] * (b[:, :r] @ (g * (a[:r] @ xd[row])))
        if lad.bias is not None:
            y[row] += lad.bias.double()
    return y


def layer_with(ladders, seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(IN, OUT)
    current = {}
    layer = ChunkwiseLinear(base, lambda: current.get("plan"))
    for i, lad in ladders.items():
        layer.add_ladder(i, lad)
    return base, layer, current


def ladder(seed, rank=R, bias=False):
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(OUT, generator=g) if bias else None
    return LadderModule(torch.randn(rank, IN, generator=g), torch.randn(OUT, rank, generator=g), b)


def decisions(n, seed, crossfade=True):
    rng = np.random.default_rng(seed)
    rank = rng.choice([0, 2, 4, 8], n).astype(np.int32)
    lo = np.minimum(rank, rng.choice([0, 2, 4, 8], n)).astype(np.int32) if crossfade else rank.copy()
    g_lo = rng.uniform(0.2, 1.0, n).astype(np.float32) if crossfade else np.ones(n, np.float32)
    g_hi = rng.uniform(0.0, 1.0, n).astype(np.float32) if crossfade else np.ones(n, np.float32)
    scale = rng.choice([1.0, 0.5], n).astype(np.float32)
    return rank, lo, g_lo, g_hi, scale


@pytest.mark.parametrize("layout", ["all_rows_one_adapter", "spans", "scattered", "some_rows_unplanned"])
@pytest.mark.parametrize("crossfade", [True, False])
def test_token_plan_paths_match_the_oracle(layout, crossfade):
    ladders = {0: ladder(1), 1: ladder(2, rank=6, bias=True), 2: ladder(3)}
    base, layer, current = layer_with(ladders)
    n_rows = 12
    x = torch.randn(n_rows, IN, generator=torch.Generator().manual_seed(7))
    rows = np.arange(n_rows)
    if layout == "all_rows_one_adapter":
        adapter = np.zeros(n_rows, np.int32)
    elif layout == "spans":
        adapter = np.repeat([0, 1, 2], 4).astype(np.int32)
    elif layout == "scattered":
        adapter = np.tile([0, 1, 2], 4).astype(np.int32)
    else:
        rows = np.array([0, 2, 3, 7, 8, 11])
        adapter = np.array([1, 0, 0, 2, 2, 1], np.int32)
    rank, lo, g_lo, g_hi, scale = decisions(len(rows), seed=5, crossfade=crossfade)
    current["plan"] = TokenPlan.build(TokenArrays(rank, lo, g_lo, g_hi, scale, adapter, rows, n_rows))
    with torch.no_grad():
        got = layer(x)
        want = oracle(x, base, ladders, rank, lo, g_lo, g_hi, scale, adapter, rows)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_uniform_blocks_need_no_gates_and_ramps_do():
    ones = np.ones(4, np.float32)
    r = np.full(4, 8, np.int32)
    plain = TokenPlan.build(TokenArrays(r, r, ones, ones, ones * 0.5, np.zeros(4, np.int32), np.arange(4), 4))
    assert plain.blocks[0].gates is None and plain.blocks[0].scale == 0.5 and plain.blocks[0].rows is None
    lo = np.array([8, 8, 4, 8], np.int32)
    ramp = TokenPlan.build(TokenArrays(r, lo, ones, ones * 0.5, ones, np.zeros(4, np.int32), np.arange(4), 4))
    assert ramp.blocks[0].gates is not None
    two = TokenPlan.build(
        TokenArrays(r, r, ones, ones, ones, np.array([0, 0, 1, 1], np.int32), np.arange(4), 4)
    )
    assert [b.span for b in two.blocks] == [(0, 2), (2, 4)]
    mixed = TokenPlan.build(
        TokenArrays(r, r, ones, ones, ones, np.array([0, 1, 0, 1], np.int32), np.arange(4), 4)
    )
    assert [b.span for b in mixed.blocks] == [None, None]
    assert [b.rows.tolist() for b in mixed.blocks] == [[0, 2], [1, 3]]


class Step:
    def __init__(self, rank, lo, gate_lo, gate_hi, scale):
        self.rank, self.lo, self.gate_lo, self.gate_hi, self.scale = rank, lo, gate_lo, gate_hi, scale


@pytest.mark.parametrize("adapters", [[0, 0, 0, 0, 0], [0, 1, 2, 1, 0], [2, 2, 0, 0, 1]])
def test_decode_plan_reuses_its_buffers_and_matches_token_plan(adapters):
    ladders = {0: ladder(1), 1: ladder(2, rank=6, bias=True), 2: ladder(3)}
    base, layer, current = layer_with(ladders)
    ad = np.array(adapters, np.int32)
    dplan = DecodePlan(ad, R, "cpu", torch.float32)
    first = dplan.plan
    buffers = {id(first)}
    for step in range(6):
        decided = decisions(len(ad), seed=step, crossfade=step % 2 == 0)
        plan = dplan.update(Step(*decided))
        buffers.add(id(plan))
        x = torch.randn(len(ad), IN, generator=torch.Generator().manual_seed(step))
        with torch.no_grad():
            current["plan"] = plan
            got = layer(x)
            current["plan"] = TokenPlan.build(TokenArrays(*decided, ad, np.arange(len(ad)), len(ad)))
            fresh = layer(x)
            want = oracle(x, base, ladders, *decided, ad, np.arange(len(ad)))
        torch.testing.assert_close(got, fresh, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert buffers == {id(first)}  # one plan object, rewritten in place


def test_layer_follows_to_and_keeps_no_stale_factors():
    ladders = {0: ladder(1)}
    base, layer, current = layer_with(ladders)
    x = torch.randn(3, IN)
    r = np.full(3, R, np.int32)
    ones = np.ones(3, np.float32)
    layer.double()
    current["plan"] = TokenPlan.build(
        TokenArrays(r, r, ones, ones, ones, np.zeros(3, np.int32), np.arange(3), 3), dtype=torch.float64
    )
    with torch.no_grad():
        got = layer(x.double())
    assert got.dtype == torch.float64
    want = oracle(x.double(), base.double(), ladders, r, r, ones, ones, ones, np.zeros(3), np.arange(3))
    torch.testing.assert_close(got, want)


def test_long_runs_of_one_rank_get_their_own_blocks_and_match_the_oracle():
    ladders = {0: ladder(1), 1: ladder(2, rank=6, bias=True)}
    base, layer, current = layer_with(ladders)
    n = 200
    rank = np.array([8] * 40 + [2] * 3 + [4] * 57 + [8] * 100, np.int32)
    lo = rank.copy()
    lo[40:44] = 2  # a cross-fade after the first change
    g_lo, g_hi, scale = np.ones(n, np.float32), np.ones(n, np.float32), np.ones(n, np.float32)
    g_hi[40:44] = np.linspace(0.8, 0.2, 4)
    adapter = np.array([0] * 100 + [1] * 100, np.int32)
    tokens = TokenArrays(rank, lo, g_lo, g_hi, scale, adapter, np.arange(n), n)
    # at the default block cost 200 tokens are not worth a second block per adapter
    assert [(b.adapter, b.span) for b in TokenPlan.build(tokens).blocks] == [(0, (0, 100)), (1, (100, 200))]
    plan = TokenPlan.build(tokens, block_cost=100)
    spans = [(b.adapter, b.span, b.max_rank) for b in plan.blocks]
    # the 3 tokens at rank 2 are not worth a block: they run with the cheaper (rank-4) neighbour
    assert spans == [(0, (0, 40), 8), (0, (40, 100), 4), (1, (100, 200), 8)]
    x = torch.randn(n, IN, generator=torch.Generator().manual_seed(3))
    current["plan"] = plan
    with torch.no_grad():
        got = layer(x)
    want = oracle(x, base, ladders, rank, lo, g_lo, g_hi, scale, adapter, np.arange(n))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def _block_cost(rank: np.ndarray, runs: list[tuple[int, int]], block_cost: int) -> int:
    peaks = [int(rank[lo:hi].max()) for lo, hi in runs]
    return sum((block_cost if p > 0 else 0) + (hi - lo) * p for (lo, hi), p in zip(runs, peaks, strict=True))


def _brute_force_cost(rank: np.ndarray, block_cost: int) -> int:
    """The cheapest cover over every way of cutting at rank changes (2^(changes) of them)."""
    cuts = (np.flatnonzero(rank[1:] != rank[:-1]) + 1).tolist()
    best = None
    for chosen in itertools.product((False, True), repeat=len(cuts)):
        bounds = [0, *(c for c, keep in zip(cuts, chosen, strict=True) if keep), len(rank)]
        runs = list(zip(bounds[:-1], bounds[1:], strict=True))
        cost = _block_cost(rank, runs, block_cost)
        best = cost if best is None else min(best, cost)
    assert best is not None
    return best


@pytest.mark.parametrize("seed", range(40))
def test_rank_runs_is_the_cheapest_cover_brute_force(seed):
    from chunkwise.nn.token_plan import rank_runs

    rng = np.random.default_rng(seed)
    n_runs = int(rng.integers(1, 11))
    rank = np.repeat(rng.choice([0, 4, 8, 16, 32, 64], n_runs), rng.integers(1, 200, n_runs))
    block_cost = int(rng.choice([0, 512, 4096, 20000]))
    runs = rank_runs(rank, block_cost)
    assert runs[0][0] == 0 and runs[-1][1] == len(rank)
    assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(runs[:-1], runs[1:], strict=False))
    for lo, _hi in runs:  # a boundary is only ever placed where the rank changes
        assert lo == 0 or rank[lo] != rank[lo - 1]
    assert _block_cost(rank, runs, block_cost) == _brute_force_cost(rank, block_cost)


def test_rank_runs_extremes():
    from chunkwise.nn.token_plan import rank_runs

    rank = np.repeat([64, 8, 32, 4], [48, 24, 144, 40])
    assert rank_runs(rank, 0) == [(0, 48), (48, 72), (72, 216), (216, 256)]  # blocks are free
    assert rank_runs(rank, 10**9) == [(0, 256)]  # blocks are dear: one at rank 64
    assert rank_runs(np.zeros(0, np.int64)) == [(0, 0)]
    with pytest.raises(cw.InputError, match="block_cost"):
        rank_runs(rank, -1)


def test_activations_of_another_dtype_than_the_factors_take_the_slow_path():
    ladders = {0: ladder(1)}
    base, layer, current = layer_with(ladders)
    r = np.full(3, R, np.int32)
    ones = np.ones(3, np.float32)
    current["plan"] = TokenPlan.build(
        TokenArrays(r, r, ones, ones, ones, np.zeros(3, np.int32), np.arange(3), 3)
    )
    x = torch.randn(3, IN)
    with torch.no_grad():
        want = layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # base output bf16, factors float32
            got = layer(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=5e-2)
