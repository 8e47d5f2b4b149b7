"""The grouped pass (several adapters in one ``bmm`` pair, CPU): outputs against a float64
per-token reference, against the plain blocks, in decode plans, and the stacked factors held once."""

from __future__ import annotations

import copy

import chunkwise
import numpy as np
import pytest
import torch
from chunkwise import RankLadder
from chunkwise.adapters.ladder import LadderModule
from chunkwise.kernels import TokenArrays
from chunkwise.nn import ChunkwiseLinear, DecodePlan, TokenPlan
from chunkwise.nn.token_plan import DECODE_BAND_COST, DECODE_BAND_ROW, decode_rank
from chunkwise.schedule import gate_matrix
from torch import nn

from tests.support.peft_helpers import assert_matches, ids_batch, logits, make_adapter, tiny_model

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning"),
    pytest.mark.usefixtures("one_torch_thread"),
]

IN, OUT = 12, 10
RANKS = (8, 6, 8, 4)  # each adapter's own rank: the stack pads to 8


def _layer(ranks=RANKS, bias_of=(1,), seed=0):
    g = torch.Generator().manual_seed(seed)
    current: list[TokenPlan | None] = [None]
    layer = ChunkwiseLinear(nn.Linear(IN, OUT), lambda: current[0])
    mods = {}
    for i, r in enumerate(ranks):
        bias = torch.randn(OUT, generator=g) if i in bias_of else None
        mods[i] = LadderModule(torch.randn(r, IN, generator=g), torch.randn(OUT, r, generator=g), bias)
        layer.add_ladder(i, mods[i], stack=False)
    layer.stack_ladders()
    return layer, mods, current


def _tokens(adapters_per_entry, m, seed, rungs=(0, 2, 4, 8, 16)):
    """Random per-token ranks (runs of random length; 16 is above every adapter's own rank),
    cross-fade bands and scales."""
    rng = np.random.default_rng(seed)
    n = len(adapters_per_entry) * m
    rank = np.empty(n, np.int32)
    i = 0
    while i < n:
        k = int(rng.integers(1, 6))
        rank[i : i + k] = rng.choice(rungs)
        i += k
    lo = np.minimum(rank, rng.choice(rungs, n)).astype(np.int32)
    fade = rng.random(n) < 0.3
    gate_lo = np.where(fade, rng.random(n), 1.0).astype(np.float32)
    gate_hi = np.where(fade, rng.random(n), 1.0).astype(np.float32)
    scale = rng.choice([1.0, 0.5], n).astype(np.float32)
    adapter = np.repeat(np.asarray(adapters_per_entry, np.int32), m)
    return TokenArrays(rank, lo, gate_lo, gate_hi, scale, adapter, np.arange(n), n)


def _reference(x, tokens, mods):
    """float64, token by token: ``sum_j<rank G[t, j] (A'_j x) B'_j + bias``."""
    out = torch.zeros(len(tokens.rank), OUT, dtype=torch.float64)
    for t in range(len(tokens.rank)):
        mod = mods[int(tokens.adapter[t])]
        r = min(int(tokens.rank[t]), mod.rank)
        parts = [a[t : t + 1] for a in (tokens.rank, tokens.lo, tokens.gate_lo, tokens.gate_hi, tokens.scale)]
        g = torch.from_numpy(gate_matrix(*parts, max(r, 1))).double()[0, :r]
        h = (mod.a.double()[:r] @ x[t].double()) * g
        out[t] = mod.b.double()[:, :r] @ h
        if mod.bias is not None:
            out[t] += mod.bias.double()
    return out


def _delta(layer, current, plan, x):
    current[0] = plan
    with torch.no_grad():
        return (layer(x) - layer.base_layer(x)).double()


def _rel(got, want):
    return float((got - want).norm() / want.norm())


@pytest.mark.parametrize("entries", [(0, 1, 2, 3), (2, 0, 3, 1), (1, 2)])
@pytest.mark.parametrize("m", [1, 7])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grouped_pass_equals_float64_reference_and_the_blocks(entries, m, seed):
    layer, mods, current = _layer(seed=seed)
    tokens = _tokens(entries, m, seed)
    x = torch.randn(len(tokens.rank), IN, generator=torch.Generator().manual_seed(seed))
    want = _reference(x, tokens, mods)
    plan = TokenPlan.build(tokens)
    assert plan.grouped is not None and plan.grouped.adapters == entries
    assert (plan.grouped.first is None) == (
        list(entries) != list(range(entries[0], entries[0] + len(entries)))
    )
    assert _rel(_delta(layer, current, plan, x), want) < 1e-5
    blocks = TokenPlan.build(tokens)
    blocks.grouped = None  # the plain path, as a layer without a stack runs it
    assert _rel(_delta(layer, current, blocks, x), want) < 1e-5


@pytest.mark.parametrize("fade", [False, True])
def test_grouped_pass_cuts_bands_above_the_common_rank(fade):
    """Long runs: a few rank-8 runs over mostly rank-2 tokens are cheapest as a common rank 2
    plus band blocks from direction 2 on (with cross-fades: their gates from column 2 on), and
    the output is the same."""
    layer, mods, current = _layer()
    n = 4 * 64
    rank = np.full(n, 2, np.int32)
    rank[10:40] = 8
    rank[150:170] = 8
    rng = np.random.default_rng(7)
    lo = np.where(fade, rng.choice([0, 2, 4], n), rank).astype(np.int32)
    lo = np.minimum(lo, rank)
    gate_lo = (rng.random(n) if fade else np.ones(n)).astype(np.float32)
    gate_hi = (rng.random(n) if fade else np.ones(n)).astype(np.float32)
    ones = np.ones(n, np.float32)
    adapter = np.repeat(np.arange(4, dtype=np.int32), 64)
    tokens = TokenArrays(rank, lo, gate_lo, gate_hi, ones, adapter, np.arange(n), n)
    plan = TokenPlan.build(tokens, block_cost=64)
    g = plan.grouped
    assert g is not None and g.rank == 2 and (g.gates is None) == (not fade)
    assert [(b.span, b.col, b.max_rank) for b in g.extra] == [((10, 40), 2, 8), ((150, 170), 2, 8)]
    assert all((b.gates is None) == (not fade) for b in g.extra)
    x = torch.randn(n, IN, generator=torch.Generator().manual_seed(3))
    assert _rel(_delta(layer, current, plan, x), _reference(x, tokens, mods)) < 1e-5


@pytest.mark.parametrize(
    ("adapters", "rows", "n_rows"),
    [
        ((0, 1), [(0, 4), (4, 9)], 9),
        ((0, 1), [(0, 4), (3, 8)], 10),
        ((0,), [(0, 8)], 8),
        ((0, 1), [(0, 3), (5, 7)], 12),
    ],
    ids=["unequal cells", "a run across cells", "one adapter", "spare cell"],
)
def test_no_grouped_pass_where_the_adapters_do_not_own_a_cell_each(adapters, rows, n_rows):
    planned = np.concatenate([np.arange(a, b) for a, b in rows])
    adapter = np.concatenate(
        [np.full(b - a, ad, np.int32) for ad, (a, b) in zip(adapters, rows, strict=True)]
    )
    n = len(planned)
    r = np.full(n, 4, np.int32)
    ones = np.ones(n, np.float32)
    plan = TokenPlan.build(TokenArrays(r, r, ones, ones, ones, adapter, planned, n_rows))
    assert plan.grouped is None


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_cells_are_grouped_and_padding_is_left_alone(side):
    """Four prompts of 9, 5, 7, 2 tokens padded to 9 (one adapter each): one grouped pass over
    the 4 x 9 rows; the padding rows get exactly nothing, the tokens their reference delta."""
    layer, mods, current = _layer(seed=6)
    lengths, t = (9, 5, 7, 2), 9
    entries = (2, 0, 3, 1)
    rows = np.concatenate(
        [k * t + (np.arange(t - n, t) if side == "left" else np.arange(n)) for k, n in enumerate(lengths)]
    )
    tk = _tokens(entries, t, seed=6)
    keep = np.zeros(4 * t, bool)
    keep[rows] = True
    tokens = TokenArrays(
        tk.rank[keep],
        tk.lo[keep],
        tk.gate_lo[keep],
        tk.gate_hi[keep],
        tk.scale[keep],
        tk.adapter[keep],
        rows,
        4 * t,
    )
    plan = TokenPlan.build(tokens)
    assert plan.grouped is not None and (plan.grouped.n, plan.grouped.m) == (4, t)
    x = torch.randn(4 * t, IN, generator=torch.Generator().manual_seed(6))
    got = _delta(layer, current, plan, x)
    assert torch.equal(
        got[~torch.from_numpy(keep)], torch.zeros(int((~keep).sum()), OUT, dtype=torch.float64)
    )
    assert _rel(got[torch.from_numpy(rows)], _reference(x[torch.from_numpy(rows)], tokens, mods)) < 1e-5


def test_layer_without_every_adapter_runs_the_blocks():
    """Adapters 0 and 2 only (1 does not adapt this layer): no stack; the plan's grouped pass
    over adapters 0..2 is not taken and adapter 1's rows are left alone."""
    g = torch.Generator().manual_seed(4)
    current: list[TokenPlan | None] = [None]
    layer = ChunkwiseLinear(nn.Linear(IN, OUT), lambda: current[0])
    mods = {
        i: LadderModule(torch.randn(4, IN, generator=g), torch.randn(OUT, 4, generator=g)) for i in (0, 2)
    }
    for i, mod in mods.items():
        layer.add_ladder(i, mod)
    buffers = dict(layer.named_buffers())
    assert (
        buffers["ladder_a_0"].untyped_storage().data_ptr()
        != buffers["ladder_a_2"].untyped_storage().data_ptr()
    )
    tokens = _tokens((0, 1, 2), 5, seed=4, rungs=(0, 4))
    plan = TokenPlan.build(tokens)
    assert plan.grouped is not None
    x = torch.randn(15, IN, generator=g)
    got = _delta(layer, current, plan, x)
    mine = tokens.adapter != 1
    want = torch.zeros(15, OUT, dtype=torch.float64)
    sub = TokenArrays(
        *(
            a[mine]
            for a in (tokens.rank, tokens.lo, tokens.gate_lo, tokens.gate_hi, tokens.scale, tokens.adapter)
        ),
        np.arange(10),
        10,
    )
    want[torch.from_numpy(mine)] = _reference(x[torch.from_numpy(mine)], sub, mods)
    assert torch.equal(got[5:10], torch.zeros(5, OUT, dtype=torch.float64))
    assert _rel(got, want) < 1e-5


class _Step:
    def __init__(self, rank, lo, gate_lo, gate_hi, scale):
        self.rank, self.lo, self.gate_lo, self.gate_hi, self.scale = rank, lo, gate_lo, gate_hi, scale


@pytest.mark.parametrize("adapters", [(0, 1, 2, 3), (3, 3, 1, 1, 0, 0, 2, 2), (1, 0, 3, 2)])
def test_decode_plan_grouped_steps_equal_reference(adapters):
    layer, mods, current = _layer(seed=5)
    batch = len(adapters)
    dplan = DecodePlan(np.asarray(adapters), 8, "cpu", torch.float32)
    assert dplan.plan.grouped is not None
    for step in range(6):
        if step % 3 == 0:  # every row at one rank, gate 1: no gate matrix
            rank = np.full(batch, 4, np.int32)
            lo, gl, gh, sc = (
                rank.copy(),
                np.ones(batch, np.float32),
                np.ones(batch, np.float32),
                np.ones(batch, np.float32),
            )
        else:
            tk = _tokens(adapters, 1, seed=step)
            rank, lo, gl, gh, sc = tk.rank, tk.lo, tk.gate_lo, tk.gate_hi, tk.scale
        plan = dplan.update(_Step(rank, lo, gl, gh, sc))
        assert plan.grouped is not None and plan.grouped.rank <= min(int(rank.max()), 8)
        assert (plan.grouped.gates is None) == (step % 3 == 0)
        x = torch.randn(batch, IN, generator=torch.Generator().manual_seed(step))
        tokens = TokenArrays(rank, lo, gl, gh, sc, np.asarray(adapters, np.int32), np.arange(batch), batch)
        assert _rel(_delta(layer, current, plan, x), _reference(x, tokens, mods)) < 1e-5, step


def test_stack_false_keeps_adapters_apart(tmp_path):
    """``inject(stack=False)``: the ladders' tensors stay their own, no layer has a stack, and a
    batch of one adapter per row still equals each adapter's PEFT output."""
    base = tiny_model("llama")
    pms = [make_adapter(base, tmp_path / f"a{i}", seed=i, target_modules=["v_proj"]) for i in range(2)]
    ladders = [RankLadder.from_peft(tmp_path / f"a{i}") for i in range(2)]
    before = [lad.modules["model.layers.0.self_attn.v_proj"].a.data_ptr() for lad in ladders]
    m = chunkwise.inject(copy.deepcopy(base), ladders, stack=False)
    buffers = dict(m.model.get_submodule("model.layers.0.self_attn.v_proj").named_buffers())
    assert [buffers[f"ladder_a_{i}"].data_ptr() for i in range(2)] == before
    ids = ids_batch(2, 9, seed=3)
    with torch.no_grad(), m.use(m.top_rung(ids, adapters=[1, 0])):
        out = m.model(input_ids=ids).logits
    base_out = logits(base, ids)
    assert_matches(out[0], logits(pms[1], ids[:1])[0], base_out[0])
    assert_matches(out[1], logits(pms[0], ids[1:])[0], base_out[1])


def test_stacked_factors_are_held_once_and_follow_moves(tmp_path):
    """inject with three adapters: each layer's factors sit in one tensor per side, and the
    ladders' tensors are views of it (no second copy); a dtype move keeps the outputs."""
    base = tiny_model("llama")
    pms = [
        make_adapter(base, tmp_path / f"a{i}", seed=i, target_modules=["q_proj", "up_proj"]) for i in range(3)
    ]
    ladders = [RankLadder.from_peft(tmp_path / f"a{i}") for i in range(3)]
    m = chunkwise.inject(copy.deepcopy(base), ladders)
    layer = m.model.get_submodule("model.layers.0.self_attn.q_proj")
    name = "model.layers.0.self_attn.q_proj"
    buffers = dict(layer.named_buffers())
    storage = buffers["ladder_a_0"].untyped_storage().data_ptr()
    for i, lad in enumerate(ladders):
        assert buffers[f"ladder_a_{i}"].untyped_storage().data_ptr() == storage
        assert lad.modules[name].a.untyped_storage().data_ptr() == storage
        assert lad.modules[name].b.T.is_contiguous()
    # a ladder whose tensors are views of a layer's stack still saves and loads as itself
    ladders[1].save(tmp_path / "saved")
    again = RankLadder.load(tmp_path / "saved")
    assert all(torch.equal(again.modules[k].b, mod.b) for k, mod in ladders[1].modules.items())
    assert all(torch.equal(again.modules[k].a, mod.a) for k, mod in ladders[1].modules.items())
    ids = ids_batch(3, 9, seed=2)
    want = [logits(pm, ids[i : i + 1])[0] for i, pm in enumerate(pms)]
    base_out = logits(base, ids)
    for dtype in (torch.float32, torch.float64):
        m.model.to(dtype)
        plan = m.top_rung(ids, adapters=[0, 1, 2])
        assert plan.grouped is not None
        with torch.no_grad(), m.use(plan):
            out = m.model(input_ids=ids).logits
        for i in range(3):
            assert_matches(out[i].float(), want[i], base_out[i])
    moved = dict(m.model.get_submodule(name).named_buffers())
    assert moved["ladder_a_2"].dtype == torch.float64
    assert (
        moved["ladder_a_2"].untyped_storage().data_ptr() == moved["ladder_a_0"].untyped_storage().data_ptr()
    )


def test_replacing_an_adapter_unstacked_runs_the_new_factors():
    """``add_ladder(i, new, stack=False)`` on a stacked layer: the stale stack is dropped at
    once, so the grouped plan's output follows the new factors (blocks until restacked), and
    after ``stack_ladders()`` the grouped pass does too."""
    layer, mods, current = _layer(seed=8)
    g = torch.Generator().manual_seed(9)
    mods[1] = LadderModule(torch.randn(6, IN, generator=g), torch.randn(OUT, 6, generator=g))
    layer.add_ladder(1, mods[1], stack=False)
    tokens = _tokens((0, 1, 2, 3), 3, seed=8)
    plan = TokenPlan.build(tokens)
    assert plan.grouped is not None
    x = torch.randn(12, IN, generator=g)
    want = _reference(x, tokens, mods)
    assert _rel(_delta(layer, current, plan, x), want) < 1e-5
    layer.stack_ladders()
    buffers = dict(layer.named_buffers())
    assert (
        buffers["ladder_a_1"].untyped_storage().data_ptr()
        == buffers["ladder_a_3"].untyped_storage().data_ptr()
    )
    assert _rel(_delta(layer, current, plan, x), want) < 1e-5


def _shared(layer, i, j):
    buffers = dict(layer.named_buffers())
    return (
        buffers[f"ladder_a_{i}"].untyped_storage().data_ptr()
        == buffers[f"ladder_a_{j}"].untyped_storage().data_ptr()
    )


def test_share_memory_and_no_op_moves_keep_the_stack():
    layer, mods, current = _layer(seed=10)
    layer.share_memory()
    layer.float()
    assert _shared(layer, 0, 3) and all(
        b.is_shared() for n, b in layer.named_buffers() if n.startswith("ladder_a")
    )
    tokens = _tokens((0, 1, 2, 3), 2, seed=10)
    x = torch.randn(8, IN, generator=torch.Generator().manual_seed(10))
    assert _rel(_delta(layer, current, TokenPlan.build(tokens), x), _reference(x, tokens, mods)) < 1e-5


def test_not_stacked_when_padding_or_gradients_would_change_what_is_held():
    """Ranks 8 and 2, 2, 2 (a stack would be 2.3x their rows) and factors recording gradients
    (training must reach the caller's tensors) stay apart; outputs and gradients are right."""
    layer, mods, current = _layer(ranks=(8, 2, 2, 2), seed=11)
    assert not _shared(layer, 0, 1)
    tokens = _tokens((0, 1, 2, 3), 2, seed=11)
    x = torch.randn(8, IN, generator=torch.Generator().manual_seed(11))
    assert _rel(_delta(layer, current, TokenPlan.build(tokens), x), _reference(x, tokens, mods)) < 1e-5
    g = torch.Generator().manual_seed(12)
    current = [None]
    trained = ChunkwiseLinear(nn.Linear(IN, OUT), lambda: current[0])
    params = [
        LadderModule(torch.randn(4, IN, generator=g), torch.randn(OUT, 4, generator=g)) for _ in range(2)
    ]
    for i, mod in enumerate(params):
        mod.a.requires_grad_(True)
        trained.add_ladder(i, mod)
    assert not _shared(trained, 0, 1) and all(mod.a.requires_grad for mod in params)
    current[0] = TokenPlan.build(_tokens((0, 1), 3, seed=12, rungs=(4,)))
    trained(torch.randn(6, IN, generator=g)).sum().backward()
    assert all(mod.a.grad is not None and bool(mod.a.grad.abs().sum() > 0) for mod in params)


def test_band_cost_equals_counting_runs_one_by_one():
    from chunkwise.nn.token_plan import band_cost

    rng = np.random.default_rng(13)
    for _ in range(200):
        cells = rng.choice([0, 2, 4, 8, 16], size=(int(rng.integers(1, 5)), int(rng.integers(1, 12))))
        c = int(rng.choice([0, 2, 4, 8]))
        want = 0
        for row in cells:
            i = 0
            while i < len(row):
                if row[i] > c:
                    j = i
                    while j < len(row) and row[j] > c:
                        j += 1
                    want += 64 + (j - i) * int(row[i:j].max() - c)
                    i = j
                else:
                    i += 1
        assert band_cost(cells, c, 64) == want


def test_large_cells_of_unordered_adapters_run_the_blocks():
    """Cells above GATHER_MAX_ROWS whose adapters do not count up would gather every module's
    weights per forward: the plan keeps the blocks; in order, the same cells are grouped."""
    from chunkwise.nn.token_plan import GATHER_MAX_ROWS

    m = GATHER_MAX_ROWS + 4
    assert TokenPlan.build(_tokens((2, 0, 3, 1), m, seed=14)).grouped is None
    assert TokenPlan.build(_tokens((0, 1, 2, 3), m, seed=14)).grouped is not None
    assert TokenPlan.build(_tokens((2, 0, 3, 1), GATHER_MAX_ROWS, seed=14)).grouped is not None


def test_decode_rank_weighs_bands_against_rank_rows():
    assert decode_rank([4, 8, 4, 8, 16, 8, 8, 8], 8) in (8, 16)  # a tie at these costs
    assert decode_rank([4] * 7 + [64], 8) == 4  # one spike: rank 4 and a band
    assert decode_rank([4, 64], 2) == 64  # two cells: a band costs more than the rows
    assert decode_rank([0, 0, 0], 3) == 0 and decode_rank([], 0) == 0
    tops = [2, 5, 9, 9, 30]
    costs = {
        c: 5 * c + sum(DECODE_BAND_COST + DECODE_BAND_ROW * (t - c) for t in tops if t > c) for c in set(tops)
    }
    assert costs[decode_rank(tops, 5)] == min(costs.values())


def test_decode_step_with_one_rank_spike_runs_a_band():
    """Eight adapters of rank 64, seven rows at rank 4 and one at 64 (cross-fading): the pass
    runs at rank 4 and that row's directions [4, 64) in a band; equal to the reference."""
    layer, mods, current = _layer(ranks=(64,) * 8, bias_of=(3,), seed=15)
    dplan = DecodePlan(np.arange(8), 64, "cpu", torch.float32)
    rank = np.array([4] * 7 + [64], np.int32)
    lo = np.array([4] * 7 + [32], np.int32)
    gate_lo = np.ones(8, np.float32)
    gate_hi = np.array([1.0] * 7 + [0.4], np.float32)
    scale = np.ones(8, np.float32)
    plan = dplan.update(_Step(rank, lo, gate_lo, gate_hi, scale))
    g = plan.grouped
    assert g is not None and g.rank == 4 and g.gates is None
    assert [(b.span, b.col, b.max_rank, b.gates is None) for b in g.extra] == [((7, 8), 4, 64, False)]
    x = torch.randn(8, IN, generator=torch.Generator().manual_seed(15))
    tokens = TokenArrays(rank, lo, gate_lo, gate_hi, scale, np.arange(8, dtype=np.int32), np.arange(8), 8)
    assert _rel(_delta(layer, current, plan, x), _reference(x, tokens, mods)) < 1e-5
