"""The folded decode path of ``ChunkwiseLinear``: one GEMM over ``[W; A']`` for the base output
and the shrink. Checked against a float64 reference and against the same layer unfolded, with
gates, rung scales, biases and clamped ranks; and that it keeps the base layer's weight honest
(re-folds after the weight is replaced, moves with ``.to()``, stands alone again on release)."""

from __future__ import annotations

import copy

import chunkwise
import pytest
import torch
from chunkwise.adapters.ladder import LadderModule
from chunkwise.nn.linear import FOLD_MAX_ROWS, ChunkwiseLinear
from chunkwise.nn.token_plan import AdapterBlock, TokenPlan
from torch import nn

from tests.support.peft_helpers import (
    assert_matches,
    ids_batch,
    logits,
    make_adapter,
    rel_err,
    tiny_model,
    top_rung_logits,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning"),
    pytest.mark.usefixtures("one_torch_thread"),
]

IN, OUT, R = 12, 10, 6


def _layer(plan, fold=True, base_bias=True, lora_bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(IN, OUT, bias=base_bias)
    with torch.no_grad():
        base.weight.copy_(torch.randn(OUT, IN, generator=g))
        if base_bias:
            base.bias.copy_(torch.randn(OUT, generator=g))
    a, b = torch.randn(R, IN, generator=g), torch.randn(OUT, R, generator=g)
    bias = torch.randn(OUT, generator=g) if lora_bias else None
    layer = ChunkwiseLinear(base, lambda: plan[0], fold=fold)
    layer.add_ladder(0, LadderModule(a, b, bias))
    return layer, (
        base.weight.detach().clone(),
        None if not base_bias else base.bias.detach().clone(),
        a,
        b,
        bias,
    )


def _reference(x, params, rank, gates, scale):
    """float64: x Wᵀ + b + ((x A[:r]ᵀ) ⊙ G) B[:, :r]ᵀ · scale + lora bias."""
    w, wb, a, b, bias = (None if t is None else t.double() for t in params)
    x = x.double().reshape(-1, IN)
    y = x @ w.T + (0 if wb is None else wb)
    r = min(rank, R)
    h = x @ a[:r].T
    if gates is not None:
        h = h * gates.double()[:, :r]
    y = y + scale * h @ b[:, :r].T
    return y + (0 if bias is None else bias)


def _plan(n, rank, gates=None, scale=1.0, adapter=0):
    return TokenPlan(n, [AdapterBlock(adapter, None, gates, rank, None, scale)])


class _Calls:
    """Counts the forwards a module runs (a forward hook)."""

    def __init__(self, module):
        self.n = 0
        module.register_forward_hook(self)

    def __call__(self, *_):
        self.n += 1


@pytest.mark.parametrize(
    "rank, gated, scale, base_bias, lora_bias",
    [
        (4, False, 1.0, True, True),
        (4, True, 1.0, False, False),
        (8, True, 1.25, True, False),  # rank 8 > the ladder's 6: clamped
        (6, False, 0.5, False, True),
        (0, False, 1.0, True, True),  # rank 0: the base output (+ the lora bias, applied at every rung)
    ],
)
@pytest.mark.parametrize("rows", [1, 3, FOLD_MAX_ROWS])
def test_folded_decode_matches_float64_and_the_unfolded_layer(rank, gated, scale, base_bias, lora_bias, rows):
    g = torch.Generator().manual_seed(rows + rank)
    gates = torch.rand(rows, rank, generator=g) if gated and rank else None
    plan = [_plan(rows, rank, gates, scale)]
    folded, params = _layer(plan, True, base_bias, lora_bias)
    plain, _ = _layer(plan, False, base_bias, lora_bias)
    calls = _Calls(folded.base_layer)
    x = torch.randn(rows, 1, IN, generator=g)  # [batch, 1 step, in]: a decode step
    with torch.no_grad():
        y, y_plain = folded(x), plain(x)
    assert calls.n == 0, "the folded path ran the base module: it did not fold"
    assert y.shape == (rows, 1, OUT)
    ref = _reference(x, params, rank, gates, scale)
    assert rel_err(y.reshape(-1, OUT), ref) < 1e-6
    assert rel_err(y_plain.reshape(-1, OUT), ref) < 1e-6
    if gated:  # guard: the gates matter, so the check above could fail
        assert rel_err(y.reshape(-1, OUT), _reference(x, params, rank, None, scale)) > 1e-3


def test_what_does_not_fold_runs_the_base_module():
    plan = [_plan(FOLD_MAX_ROWS + 1, 4)]
    layer, params = _layer(plan)
    calls = _Calls(layer.base_layer)
    x = torch.randn(FOLD_MAX_ROWS + 1, IN)
    with torch.no_grad():
        y = layer(x)  # too many rows (prefill)
    assert calls.n == 1 and rel_err(y, _reference(x, params, 4, None, 1.0)) < 1e-6
    plan[0] = _plan(2, 4)
    y = layer(x[:2])  # gradients recorded: the base module's product, so autograd sees its weight
    assert calls.n == 2 and y.requires_grad
    y.sum().backward()
    assert layer.base_layer.weight.grad is not None
    plan[0] = _plan(2, 4, adapter=1)  # an adapter this layer has no ladder for: the base only
    with torch.no_grad():
        assert torch.allclose(layer(x[:2]), layer.base_layer(x[:2]))
    layer.fold = False  # switched off: the base module runs, hooks included
    plan[0] = _plan(2, 4)
    with torch.no_grad():
        y = layer(x[:2])
    assert calls.n == 5 and rel_err(y, _reference(x[:2], params, 4, None, 1.0)) < 1e-6
    # hooks on the ChunkwiseLinear itself run either way
    layer.fold = True
    outer = _Calls(layer)
    with torch.no_grad():
        layer(x[:2])
    assert outer.n == 1 and calls.n == 5


def test_fold_follows_a_replaced_weight_a_move_and_gives_the_weight_back():
    plan = [_plan(2, 6)]
    layer, params = _layer(plan)
    base = layer.base_layer
    x = torch.randn(2, IN)
    # the base weight views the fold: nothing was copied twice
    with torch.no_grad():
        new_w = torch.randn(OUT, IN)
        base.weight.data = new_w.clone()  # replaced behind the layer's back
        y = layer(x)
    params = (new_w, *params[1:])
    assert rel_err(y, _reference(x, params, 6, None, 1.0)) < 1e-6
    # load_state_dict copies in place: the fold sees it
    sd = {k: v.clone() for k, v in base.state_dict().items()}
    sd["weight"] += 1.0
    base.load_state_dict(sd)
    with torch.no_grad():
        y = layer(x)
    params = (sd["weight"], *params[1:])
    assert rel_err(y, _reference(x, params, 6, None, 1.0)) < 1e-6
    layer.double()
    with torch.no_grad():
        y64 = layer(x.double())
    assert y64.dtype == torch.float64 and rel_err(y64, _reference(x, params, 6, None, 1.0)) < 1e-12
    layer.release()
    w = base.weight
    assert w.untyped_storage().nbytes() == w.numel() * w.element_size()  # no A' rows under it
    assert torch.equal(w, sd["weight"].double())


def test_injected_model_decodes_the_same_folded_or_not_and_unloads_clean(tmp_path):
    base = tiny_model("llama")
    pm = make_adapter(base, tmp_path / "a", target_modules="all-linear", lora_bias=True)
    ladder = chunkwise.RankLadder.from_peft(tmp_path / "a")
    folded = chunkwise.inject(copy.deepcopy(base), ladder)
    plain = chunkwise.inject(copy.deepcopy(base), ladder, fold=False)
    calls = {
        n: _Calls(m.base_layer) for n, m in folded.model.named_modules() if isinstance(m, ChunkwiseLinear)
    }
    assert calls
    ids = ids_batch(2, 20, seed=5)  # prefill 40 rows (not folded), decode 2 rows (folded)
    out_f = chunkwise.generate(folded, ids, max_new_tokens=6, prefill_chunk=None)
    prefill_calls = sum(c.n for c in calls.values())
    assert prefill_calls == len(calls)  # the prefill ran each base once; the decode steps none
    out_p = chunkwise.generate(plain, ids, max_new_tokens=6, prefill_chunk=None)
    assert torch.equal(out_f.new_tokens, out_p.new_tokens)
    # the top rung, folded, is PEFT: a decode-sized forward (2 rows) of the whole model
    step = ids[:, :1]
    before = sum(c.n for c in calls.values())
    got = top_rung_logits(folded, step)
    assert sum(c.n for c in calls.values()) == before  # it really ran folded
    assert_matches(got, logits(pm, step), logits(base, step))
    model = folded.unload()
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            w = mod.weight
            assert w.untyped_storage().nbytes() == w.numel() * w.element_size(), name


@pytest.mark.parametrize("shape", [(3, IN), (1, 3, IN), (3, 1, IN)])
def test_folded_output_is_contiguous_in_the_input_shape(shape):
    """Downstream code views the output (``q.view(b, t, heads, d)``): like the base layer's, the
    folded result is a fresh contiguous tensor of the input's leading shape, gated or not."""
    gates = torch.rand(3, 4)
    for plan in ([_plan(3, 4)], [_plan(3, 4, gates, 0.5)], [_plan(3, 0)]):
        layer, params = _layer(plan)
        x = torch.randn(*shape)
        with torch.no_grad():
            y = layer(x)
        assert y.shape == (*shape[:-1], OUT) and y.is_contiguous()
        blk = plan[0].blocks[0]
        assert rel_err(y.reshape(-1, OUT), _reference(x, params, blk.max_rank, blk.gates, blk.scale)) < 1e-6


def test_fold_follows_a_replaced_bias_and_a_replaced_base_layer():
    plan = [_plan(2, 6)]
    layer, params = _layer(plan)
    x = torch.randn(2, IN)
    new_b = torch.randn(OUT)
    with torch.no_grad():
        layer.base_layer.bias.data = new_b.clone()  # only the bias replaced
        y = layer(x)
    params = (params[0], new_b, *params[2:])
    assert rel_err(y, _reference(x, params, 6, None, 1.0)) < 1e-6
    old = layer.base_layer
    new = nn.Linear(IN, OUT)
    layer.base_layer = new  # a new base module: the fold moves to it, the old one stands alone
    calls = _Calls(new)
    with torch.no_grad():
        y = layer(x)
    assert calls.n == 0  # folded
    params = (new.weight.detach().clone(), new.bias.detach().clone(), *params[2:])
    assert rel_err(y, _reference(x, params, 6, None, 1.0)) < 1e-6
    w = old.weight
    assert w.untyped_storage().nbytes() == w.numel() * w.element_size()
