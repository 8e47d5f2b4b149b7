"""Injected models: padded batches, per-token cross-fade gates, several adapters in one batch,
unload() restoring the original model, and plans that do not fit the forward."""

from __future__ import annotations

import copy

import chunkwise
import numpy as np
import pytest
import torch
from chunkwise import AdapterError, InputError, RankLadder, StateError
from chunkwise.adapters.ladder import LadderModule
from chunkwise.nn.linear import ChunkwiseLinear
from chunkwise.nn.token_plan import TokenPlan
from torch import nn

from tests.support.peft_helpers import (
    all_top_scheduler,
    assert_matches,
    assert_unchanged,
    ids_batch,
    logits,
    make_adapter,
    ones_difficulty,
    snapshot,
    tiny_model,
    top_rung_logits,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning"),
    pytest.mark.usefixtures("one_torch_thread"),
]


TARGETS = {
    "llama": dict(target_modules=["q_proj", "v_proj", "up_proj"], lora_bias=True),
    "qwen2": dict(target_modules="all-linear", r=6, rank_pattern={"o_proj": 2}),
    "gpt2": dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True),
    "mistral": dict(target_modules=["k_proj", "down_proj"], use_rslora=True),
}


def _padded(lengths, seq, side, seed=0):
    ids = ids_batch(len(lengths), seq, seed=seed)
    mask = torch.zeros(len(lengths), seq, dtype=torch.long)
    for i, n in enumerate(lengths):
        if side == "left":
            mask[i, seq - n :] = 1
        else:
            mask[i, :n] = 1
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


# ---------------------------------------------------------------------------------------------
# padded batches


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("arch", list(TARGETS))
def test_padded_batch_all_top_plan_equals_peft(tmp_path, arch, side):
    base = tiny_model(arch)
    pm = make_adapter(base, tmp_path / "a", seed=2, **TARGETS[arch])
    ladder = RankLadder.from_peft(tmp_path / "a")
    lengths = [12, 7, 3]
    ids, mask = _padded(lengths, 12, side, seed=1)
    m = chunkwise.inject(copy.deepcopy(base), ladder, scheduler=all_top_scheduler(ladder.max_rank))
    if arch in ("llama", "gpt2"):  # planned through the model, difficulty given explicitly
        plan = m.plan_inputs(ids, attention_mask=mask, difficulty=ones_difficulty(lengths))
    else:  # planned directly on the unpadded sequences
        seqs = [row[mk.bool()].numpy().astype(np.int64) for row, mk in zip(ids, mask, strict=True)]
        plan = m.scheduler.plan(seqs, difficulty=ones_difficulty(lengths))
    assert plan.n_tokens == sum(lengths)
    assert (plan.token_rank == ladder.max_rank).all()
    with torch.no_grad():
        out = m.run(ids, attention_mask=mask, plan=plan).logits
    ref = logits(pm, ids, attention_mask=mask)
    base_out = logits(base, ids, attention_mask=mask)
    keep = mask.bool()
    assert_matches(out[keep], ref[keep], base_out[keep])


# ---------------------------------------------------------------------------------------------
# per-token gates (architecture.md §4)


def _gate_plan(crossfade=3):
    cfg = chunkwise.SchedulerConfig(
        rungs=(0, 2, 4, 8),
        rung_scales=(1.0, 0.5, 1.25, 2.0),
        thresholds=(0.2, 0.5, 0.8),
        min_len=4,
        max_len=8,
        granularity=1,
        crossfade=crossfade,
        chunk_penalty=0.01,
    )
    blocks = [(0.9, 8), (0.3, 6), (0.6, 5), (0.1, 7), (0.95, 6), (0.55, 8)]
    d0 = np.concatenate([np.full(n, v, np.float32) for v, n in blocks])
    d1 = d0[::-1].copy()
    ids = [np.zeros(len(d0), np.int64), np.zeros(len(d1), np.int64)]
    return chunkwise.Scheduler(cfg).plan(ids, difficulty=[d0, d1]), cfg


def test_per_token_gates_match_float64_reference():
    plan, cfg = _gate_plan()
    # the plan really cross-fades, up and down
    ramp = (plan.token_lo != plan.token_rank) | (plan.gate_hi != 1) | (plan.gate_lo != 1)
    assert ramp.sum() >= 6
    assert len(np.unique(plan.chunk_rank)) >= 3
    b, t = plan.n_seqs, plan.n_tokens // plan.n_seqs
    in_f, out_f, r = 12, 10, 6  # rank 6 < top rung 8: the top rung is clamped
    g = torch.Generator().manual_seed(11)
    base = nn.Linear(in_f, out_f)
    a = torch.randn(r, in_f, generator=g)
    bb = torch.randn(out_f, r, generator=g)
    tp = TokenPlan.from_plan(plan, None, (b, t))
    layer = ChunkwiseLinear(base, lambda: tp)
    layer.add_ladder(0, LadderModule(a, bb))
    x = torch.randn(b, t, in_f, generator=g)
    with torch.no_grad():
        delta = (layer(x) - base(x)).double().reshape(b * t, out_f)
    x64, a64, b64 = x.double().reshape(b * t, in_f), a.double(), bb.double()

    seg_of = np.searchsorted(plan.seg_offsets, np.arange(b * t), side="right") - 1
    ref = torch.zeros(b * t, out_f, dtype=torch.float64)
    ungated = torch.zeros_like(ref)  # the same without gates: must differ (guard)
    for i in range(b * t):
        rank, lo = int(plan.token_rank[i]), int(plan.token_lo[i])
        scale = float(plan.seg_scale[seg_of[i]])
        for j in range(min(rank, r)):
            gate = float(plan.gate_lo[i]) if j < lo else float(plan.gate_hi[i])
            term = scale * b64[:, j] * float(a64[j] @ x64[i])
            ref[i] += gate * term
            ungated[i] += term
    assert float((delta - ref).norm() / ref.norm()) < 1e-5
    assert float((ungated - ref).norm() / ref.norm()) > 1e-2

    # and that is the cross-fade (1-α)·s_a·ΔW_a + α·s_b·ΔW_b of the clamped rank prefixes
    def dw(k):
        k = min(k, r)
        return b64[:, :k] @ a64[:k]

    scales = cfg.rung_scales
    fade = torch.zeros_like(ref)
    for c in range(plan.n_chunks):
        lo_tok, hi_tok = int(plan.chunk_offsets[c]), int(plan.chunk_offsets[c + 1])
        rank_b, s_b = int(plan.chunk_rank[c]), scales[plan.chunk_rung[c]]
        prev_same_seq = c > 0 and plan.chunk_seq[c - 1] == plan.chunk_seq[c]
        for i in range(lo_tok, hi_tok):
            w = s_b * dw(rank_b)
            pos = i - lo_tok
            if prev_same_seq and plan.chunk_rank[c - 1] != rank_b and pos < cfg.crossfade:
                rank_a, s_a = int(plan.chunk_rank[c - 1]), scales[plan.chunk_rung[c - 1]]
                alpha = (pos + 1) / (cfg.crossfade + 1)
                w = (1 - alpha) * s_a * dw(rank_a) + alpha * w
            fade[i] = w @ x64[i]
    assert float((delta - fade).norm() / fade.norm()) < 1e-5


# ---------------------------------------------------------------------------------------------
# several adapters in one batch


def _two_adapters(tmp_path, base, second_kwargs=None):
    p0 = make_adapter(base, tmp_path / "a0", seed=3, target_modules=["q_proj", "v_proj"])
    kw = second_kwargs or dict(target_modules="all-linear", r=6, use_rslora=True, lora_bias=True)
    p1 = make_adapter(base, tmp_path / "a1", seed=4, **kw)
    return p0, p1, [RankLadder.from_peft(tmp_path / "a0"), RankLadder.from_peft(tmp_path / "a1")]


@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
def test_two_adapters_per_row_equal_each_peft_adapter(tmp_path, order):
    base = tiny_model("llama")
    p0, p1, ladders = _two_adapters(tmp_path, base)
    peft = [p0, p1]
    m = chunkwise.inject(copy.deepcopy(base), ladders)
    ids = ids_batch(2, 10, seed=6)
    out = top_rung_logits(m, ids, adapters=list(order))
    base_out = logits(base, ids)
    for row, ad in enumerate(order):
        ref = logits(peft[ad], ids[row : row + 1])[0]
        assert_matches(out[row], ref, base_out[row])


def test_two_adapters_padded_run_with_plan(tmp_path):
    base = tiny_model("llama")
    p0, p1, ladders = _two_adapters(tmp_path, base)
    top = max(lad.max_rank for lad in ladders)
    m = chunkwise.inject(copy.deepcopy(base), ladders, scheduler=all_top_scheduler(top))
    lengths = [5, 9]
    ids, mask = _padded(lengths, 9, "left", seed=8)
    adapters = np.array([1, 0], np.int32)
    plan = m.plan_inputs(ids, attention_mask=mask, adapters=adapters, difficulty=ones_difficulty(lengths))
    with torch.no_grad():
        out = m.run(ids, attention_mask=mask, plan=plan, adapters=adapters).logits
    for row, pm in enumerate((p1, p0)):
        keep = mask[row].bool()
        ref = logits(pm, ids[row : row + 1], attention_mask=mask[row : row + 1])[0]
        base_out = logits(base, ids[row : row + 1], attention_mask=mask[row : row + 1])[0]
        assert_matches(out[row][keep], ref[keep], base_out[keep])


def test_two_adapters_one_with_modules_to_save(tmp_path):
    # Fixed: with ladders [plain, with modules_to_save=["lm_head"]], inject copies adapter 1's
    # lm_head into the model for every row, so rows of adapter 0 run with adapter 1's head:
    # batch of 2 with adapters [0, 1] gives row 0 relative error ~1.0 against PEFT's adapter 0
    # alone (row 1 is exact). Expected: per-row equality, or an AdapterError at inject (the
    # docstring only refuses *more than one* adapter with modules_to_save).
    base = tiny_model("llama")
    p0, p1, ladders = _two_adapters(
        tmp_path, base, dict(target_modules=["k_proj", "v_proj"], modules_to_save=["lm_head"])
    )
    model = copy.deepcopy(base)
    snap = snapshot(model)
    try:
        m = chunkwise.inject(model, ladders)
    except AdapterError as e:
        assert e.parameter == "modules_to_save"
        assert_unchanged(model, snap)
        return
    ids = ids_batch(2, 10, seed=6)
    out = top_rung_logits(m, ids, adapters=[0, 1])
    base_out = logits(base, ids)
    assert_matches(out[1], logits(p1, ids[1:])[0], base_out[1])
    assert_matches(out[0], logits(p0, ids[:1])[0], base_out[0])


def test_adapter_ids_out_of_range(tmp_path):
    base = tiny_model("llama")
    _, _, ladders = _two_adapters(tmp_path, base)
    m = chunkwise.inject(copy.deepcopy(base), ladders)
    ids = ids_batch(2, 5)
    for bad in ([0, 2], [-1, 0], [0]):
        with pytest.raises(InputError) as ei:
            m.top_rung(ids, adapters=bad)
        assert ei.value.parameter == "adapters"


# ---------------------------------------------------------------------------------------------
# unload()

UNLOAD_CASES = {
    "llama": ("llama", dict(target_modules=["q_proj", "v_proj", "down_proj"])),
    "llama-modules-to-save-bias": (
        "llama",
        dict(target_modules="all-linear", lora_bias=True, modules_to_save=["lm_head"]),
    ),
    "gpt2-conv1d": ("gpt2", dict(target_modules="all-linear", fan_in_fan_out=True)),
}


@pytest.mark.parametrize("case", list(UNLOAD_CASES))
def test_unload_restores_the_original_model(tmp_path, case):
    arch, kw = UNLOAD_CASES[case]
    base = tiny_model(arch)
    pm = make_adapter(base, tmp_path / "a", **kw)
    model = copy.deepcopy(base)
    snap = snapshot(model)
    ids = ids_batch(2, 8, seed=2)
    before = logits(model, ids)
    ladder = RankLadder.from_peft(tmp_path / "a")
    m = chunkwise.inject(model, ladder)
    assert m.model is model
    # the injection really changed things (so the restore below is not vacuous)
    wrapped = [n for n, mod in model.named_modules() if isinstance(mod, ChunkwiseLinear)]
    assert wrapped
    if "modules_to_save" in kw:
        assert not torch.equal(model.lm_head.weight, snap[1]["lm_head.weight"])
    out = top_rung_logits(m, ids)
    assert_matches(out, logits(pm, ids), before)
    if "modules_to_save" not in kw:  # no plan: the base model (the saved lm_head stays swapped in)
        assert torch.allclose(logits(model, ids), before, atol=1e-6)

    assert m.unload() is model
    assert_unchanged(model, snap)
    assert torch.equal(logits(model, ids), before)
    # re-injecting the same ladder after unload works and still matches PEFT
    m2 = chunkwise.inject(model, ladder)
    assert_matches(top_rung_logits(m2, ids), logits(pm, ids), before)
    m2.unload()
    assert_unchanged(model, snap)


def test_unload_two_adapters(tmp_path):
    base = tiny_model("llama")
    _, _, ladders = _two_adapters(tmp_path, base)
    model = copy.deepcopy(base)
    snap = snapshot(model)
    ids = ids_batch(2, 8)
    before = logits(model, ids)
    m = chunkwise.inject(model, ladders)
    top_rung_logits(m, ids, adapters=[1, 0])
    m.unload()
    assert_unchanged(model, snap)
    assert torch.equal(logits(model, ids), before)


# ---------------------------------------------------------------------------------------------
# plans that do not fit the forward


def test_plan_for_the_wrong_number_of_tokens_is_a_state_error(tmp_path):
    base = tiny_model("llama")
    make_adapter(base, tmp_path / "a", target_modules=["q_proj"])
    m = chunkwise.inject(copy.deepcopy(base), RankLadder.from_peft(tmp_path / "a"))
    plan = m.top_rung(ids_batch(2, 10))
    with pytest.raises(StateError) as ei, torch.no_grad(), m.use(plan):
        m.model(input_ids=ids_batch(2, 8))
    assert ei.value.parameter == "plan"
    assert "plan" in str(ei.value)
    # the plan is not left behind after the failed block: the model runs as its base again
    ids = ids_batch(2, 8)
    assert torch.allclose(logits(m.model, ids), logits(base, ids), atol=1e-6)


def test_scheduler_plan_for_other_lengths_is_refused(tmp_path):
    base = tiny_model("llama")
    make_adapter(base, tmp_path / "a", target_modules=["q_proj"])
    ladder = RankLadder.from_peft(tmp_path / "a")
    m = chunkwise.inject(copy.deepcopy(base), ladder, scheduler=all_top_scheduler(ladder.max_rank))
    ids = ids_batch(2, 8)
    plan = m.plan_inputs(ids_batch(2, 6), difficulty=ones_difficulty([6, 6]))
    with pytest.raises(InputError) as ei:
        m.run(ids, plan=plan)
    assert ei.value.parameter == "plan"
    _, mask = _padded([8, 5], 8, "right")
    with pytest.raises(InputError) as ei:  # plan of unpadded length 8 + 8 for a mask of 8 + 5
        m.run(ids, attention_mask=mask, plan=m.plan_inputs(ids, difficulty=ones_difficulty([8, 8])))
    assert ei.value.parameter == "plan"


def test_use_nests_and_restores(tmp_path):
    base = tiny_model("llama")
    pm = make_adapter(base, tmp_path / "a", target_modules=["q_proj", "v_proj"])
    m = chunkwise.inject(copy.deepcopy(base), RankLadder.from_peft(tmp_path / "a"))
    ids = ids_batch(1, 7)
    with torch.no_grad(), m.use(m.top_rung(ids)):
        with m.use(None):
            inner = m.model(input_ids=ids).logits
        outer = m.model(input_ids=ids).logits
    assert torch.allclose(inner, logits(base, ids), atol=1e-6)
    assert_matches(outer, logits(pm, ids), inner)


def test_cpu_layout_of_b_keeps_rank_prefixes_contiguous_and_exact():
    """On the CPU B' is kept as the transpose of a contiguous [R, out] tensor (its rank prefixes
    are then contiguous rows), in the ladder, in the layer (shared) and after a dtype move;
    outputs are unchanged."""
    g = torch.Generator().manual_seed(5)
    in_f, out_f, r = 12, 10, 8
    base = nn.Linear(in_f, out_f, bias=False)
    a = torch.randn(r, in_f, generator=g)
    bb = torch.randn(out_f, r, generator=g)
    assert bb.is_contiguous() and not bb.T.is_contiguous()  # the ladder's own layout differs
    current: list[TokenPlan | None] = [None]
    layer = ChunkwiseLinear(base, lambda: current[0])
    ladder = LadderModule(a, bb)
    assert ladder.b.T.is_contiguous() and torch.equal(ladder.b, bb)  # built in that layout
    layer.add_ladder(0, ladder)
    # the layer shares the ladder's tensor (no second copy of B' on the same device and dtype)
    assert dict(layer.named_buffers())["ladder_b_0"].data_ptr() == ladder.b.data_ptr()
    x = torch.randn(3, in_f, generator=g)
    for moved in (False, True):
        if moved:
            layer = layer.double()
            x = x.double()
        stored = dict(layer.named_buffers())["ladder_b_0"]
        assert stored.T.is_contiguous() and stored.shape == (out_f, r)
        for rank in (2, 5, 8):
            current[0] = TokenPlan.uniform(3, rank, np.zeros(3, np.int32), "cpu", x.dtype)
            with torch.no_grad():
                got = (layer(x) - layer.base_layer(x)).double()
            want = x.double() @ a.double()[:rank].T @ bb.double()[:, :rank].T
            tol = 1e-12 if moved else 1e-5
            assert float((got - want).norm() / want.norm()) < tol, (moved, rank)
