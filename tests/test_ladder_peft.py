"""Rank ladders built from real PEFT adapters: the top rung reproduces PEFT exactly, rung k is the
best rank-k approximation of every module's update, and ladders survive a save / load round trip.

Every adapter is made with PEFT in the test (tiny random models, random non-zero lora_B).
"""

from __future__ import annotations

import copy
import json

import chunkwise
import numpy as np
import pytest
import torch
from chunkwise import AdapterError, RankLadder
from chunkwise.adapters.ladder import LADDER_FILE, LadderModule, factor_update
from chunkwise.nn.token_plan import TokenPlan

from tests.support.peft_helpers import (
    ATTN_TARGETS,
    all_top_scheduler,
    assert_matches,
    assert_unchanged,
    chunkwise_layer_names,
    ids_batch,
    load_peft,
    logits,
    make_adapter,
    ones_difficulty,
    peft_lora_layers,
    rel_err,
    snapshot,
    tiny_model,
    top_rung_logits,
    truncated,
    truncations,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning"),
    pytest.mark.usefixtures("one_torch_thread"),
]


CASES = {
    # the four architectures (GPT-2: Conv1D, fan_in_fan_out=True)
    "llama": ("llama", dict(target_modules=ATTN_TARGETS["llama"])),
    "mistral": ("mistral", dict(target_modules=ATTN_TARGETS["mistral"])),
    "qwen2": ("qwen2", dict(target_modules=ATTN_TARGETS["qwen2"])),
    "gpt2-conv1d": ("gpt2", dict(target_modules=ATTN_TARGETS["gpt2"], fan_in_fan_out=True)),
    # scaling
    "rslora": ("llama", dict(target_modules=["q_proj", "v_proj"], use_rslora=True, r=8, lora_alpha=5)),
    "rank-alpha-pattern": (
        "llama",
        dict(
            target_modules=["q_proj", "v_proj", "down_proj"],
            rank_pattern={"v_proj": 2, r"layers\.0\.mlp\.down_proj": 3, "model.layers.1.self_attn.q_proj": 6},
            alpha_pattern={"q_proj": 3.0, "down_proj": 20.0},
        ),
    ),
    "rank-pattern-rslora-mistral": (
        "mistral",
        dict(
            target_modules=["q_proj", "o_proj"],
            r=6,
            lora_alpha=4,
            use_rslora=True,
            rank_pattern={"o_proj": 3},
            alpha_pattern={"layers.1.self_attn.q_proj": 30.0},
        ),
    ),
    # which modules
    "target-regex": ("llama", dict(target_modules=r".*\.layers\.1\.self_attn\.(q|k)_proj")),
    "target-regex-gpt2": (
        "gpt2",
        dict(target_modules=r"transformer\.h\.0\.(attn\.c_attn|mlp\.c_proj)", fan_in_fan_out=True),
    ),
    "all-linear-llama": ("llama", dict(target_modules="all-linear")),
    "all-linear-qwen2": ("qwen2", dict(target_modules="all-linear", r=2)),
    "all-linear-gpt2": ("gpt2", dict(target_modules="all-linear", fan_in_fan_out=True)),
    "exclude-list": ("llama", dict(target_modules="all-linear", exclude_modules=["o_proj", "gate_proj"])),
    "exclude-regex": ("mistral", dict(target_modules="all-linear", exclude_modules=r".*layers\.0\..*")),
    "layers-to-transform": ("llama", dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[1])),
    "layers-to-transform-int": ("mistral", dict(target_modules=["k_proj", "up_proj"], layers_to_transform=0)),
    "layers-pattern": (
        "qwen2",
        dict(target_modules=["q_proj", "down_proj"], layers_to_transform=[0], layers_pattern="layers"),
    ),
    "layers-pattern-gpt2": (
        "gpt2",
        dict(
            target_modules=["c_attn", "c_fc"],
            layers_to_transform=[1],
            layers_pattern="h",
            fan_in_fan_out=True,
        ),
    ),
    # extra tensors
    "lora-bias": ("llama", dict(target_modules=["q_proj", "v_proj", "down_proj"], lora_bias=True)),
    "lora-bias-gpt2": (
        "gpt2",
        dict(target_modules=["c_attn", "c_proj"], lora_bias=True, fan_in_fan_out=True),
    ),
    "modules-to-save": ("llama", dict(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])),
    "everything-qwen2": (
        "qwen2",
        dict(
            target_modules="all-linear",
            exclude_modules=["k_proj"],
            r=6,
            use_rslora=True,
            rank_pattern={"down_proj": 2},
            alpha_pattern={"v_proj": 2.0},
            lora_bias=True,
            modules_to_save=["lm_head"],
        ),
    ),
}


def _setup(tmp_path, case, seed=1):
    arch, kw = CASES[case]
    base = tiny_model(arch)
    pm = make_adapter(base, tmp_path / "adapter", seed=seed, **kw)
    return base, pm, tmp_path / "adapter"


@pytest.mark.parametrize("case", list(CASES))
def test_top_rung_equals_peft(tmp_path, case):
    base, pm, path = _setup(tmp_path, case)
    ids = ids_batch(2, 11)
    ref = logits(pm, ids)
    m = chunkwise.inject(copy.deepcopy(base), RankLadder.from_peft(path))
    # exactly the modules PEFT adapted, no more, no fewer
    assert chunkwise_layer_names(m.model) == set(peft_lora_layers(pm))
    assert_matches(top_rung_logits(m, ids), ref, logits(base, ids))


def test_top_rung_with_rank_above_out_features_equals_peft(tmp_path):
    # Fixed: a LoRA rank larger than a layer's out_features (legal in PEFT: k_proj is 32->16 here,
    # r=24) crashes RankLadder.from_peft with a raw RuntimeError ("The size of tensor a (16) must
    # match the size of tensor b (24)") from factor_update: torch.linalg.svd is called with the
    # default full_matrices=True, so vh is [r, r] while s has min(out, r) values. Expected: a
    # ladder of rank min(r, in, out) = 16 whose top rung equals PEFT (or at least an AdapterError).
    base = tiny_model("llama")
    pm = make_adapter(base, tmp_path / "a", target_modules=["k_proj"], r=24)
    ids = ids_batch(2, 9)
    m = chunkwise.inject(copy.deepcopy(base), RankLadder.from_peft(tmp_path / "a"))
    assert_matches(top_rung_logits(m, ids), logits(pm, ids), logits(base, ids))


def test_empty_layers_to_transform_means_every_layer_like_peft(tmp_path):
    # Fixed: PEFT treats layers_to_transform=[] (which it saves as such in adapter_config.json) as
    # "no layer restriction" and adapts q_proj/v_proj of every layer; chunkwise's
    # LoraSettings.targets treats the empty tuple as "no layer allowed", so inject raises
    # AdapterError("its target_modules match no linear layer of this model") for a valid adapter.
    base = tiny_model("llama")
    pm = make_adapter(base, tmp_path / "a", target_modules=["q_proj", "v_proj"], layers_to_transform=[])
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["layers_to_transform"] == []
    ids = ids_batch(2, 9)
    m = chunkwise.inject(copy.deepcopy(base), RankLadder.from_peft(tmp_path / "a"))
    assert chunkwise_layer_names(m.model) == set(peft_lora_layers(pm))
    assert_matches(top_rung_logits(m, ids), logits(pm, ids), logits(base, ids))


def test_modules_to_save_with_tied_embeddings_is_exact_or_refused(tmp_path):
    """lm_head tied to the input embedding: PEFT replaces only the output head. chunkwise must
    either reproduce that or refuse (an AdapterError, model untouched) — never overwrite the
    shared tensor, which would change the input embedding too."""
    base = tiny_model("llama", tie_word_embeddings=True)
    assert base.lm_head.weight is base.model.embed_tokens.weight
    pm = make_adapter(base, tmp_path / "a", target_modules=["q_proj"], modules_to_save=["lm_head"])
    ids = ids_batch(2, 9)
    model = copy.deepcopy(base)
    snap = snapshot(model)
    try:
        m = chunkwise.inject(model, RankLadder.from_peft(tmp_path / "a"))
    except AdapterError as e:
        assert e.parameter == "modules_to_save"
        assert_unchanged(model, snap)
        return
    assert_matches(top_rung_logits(m, ids), logits(pm, ids), logits(base, ids))


# ---------------------------------------------------------------------------------------------
# all top rungs == PEFT merge_and_unload

MERGE_CASES = ["llama", "gpt2-conv1d", "rank-alpha-pattern", "exclude-regex"]


@pytest.mark.parametrize("case", [*MERGE_CASES, "qwen2-lora-bias"])
def test_all_top_plan_equals_merge_and_unload(tmp_path, case):
    if case == "qwen2-lora-bias":  # qwen2's q/k/v have a base bias, so PEFT can merge lora_B's bias
        base = tiny_model("qwen2")
        pm = make_adapter(base, tmp_path / "a", target_modules=["q_proj", "v_proj"], lora_bias=True)
        path = tmp_path / "a"
    else:
        base, pm, path = _setup(tmp_path, case)
    ids = ids_batch(3, 10, seed=5)
    merged = copy.deepcopy(pm).merge_and_unload().eval()
    ref = logits(merged, ids)
    ladder = RankLadder.from_peft(path)
    m = chunkwise.inject(copy.deepcopy(base), ladder, scheduler=all_top_scheduler(ladder.max_rank))
    plan = m.plan_inputs(ids, difficulty=ones_difficulty([10, 10, 10]))
    assert (plan.token_rank == ladder.max_rank).all()
    with torch.no_grad():
        out = m.run(ids, plan=plan).logits
    assert_matches(out, ref, logits(base, ids))


# ---------------------------------------------------------------------------------------------
# rung k == best rank-k approximation

SVD_CASES = ["rank-alpha-pattern", "gpt2-conv1d", "rslora", "lora-bias"]


@pytest.mark.parametrize("case", SVD_CASES)
def test_rung_k_is_truncated_svd_of_peft_update(tmp_path, case):
    base, pm, path = _setup(tmp_path, case)
    layers = peft_lora_layers(pm)
    lad64 = RankLadder.from_peft(path, dtype=torch.float64)
    lad32 = RankLadder.from_peft(path)
    assert set(lad64.modules) == set(layers)
    for name, p in layers.items():
        dense = p["scaling"] * p["b"] @ p["a"]  # PEFT's own scaling, float64
        r = p["a"].shape[0]
        m64, m32 = lad64.modules[name], lad32.modules[name]
        assert m64.rank == r and m32.rank == r
        assert m32.a.dtype == torch.float32 and m64.a.dtype == torch.float64
        svals = torch.linalg.svdvals(dense)[:r]
        # singular values: sigma_j = |A'_j| |B'_j|, non-increasing, equal to the update's
        sig = m64.a.norm(dim=1) * m64.b.norm(dim=0)
        assert (sig[1:] <= sig[:-1] * (1 + 1e-12)).all(), (name, sig)
        assert torch.allclose(sig, svals, rtol=1e-10, atol=1e-14)
        gram = m64.a @ m64.a.T  # rows of A' orthogonal (nested prefixes are SVD prefixes)
        assert torch.allclose(gram, torch.diag(torch.diagonal(gram)), atol=1e-10 * float(gram.abs().max()))
        scale = float(dense.norm())
        best = truncations(dense)
        for k in range(0, r + 2):
            want = best[min(k, len(best) - 1)]
            err64 = float((m64.update(k) - want).norm()) / scale
            err32 = float((m32.update(k).double() - want).norm()) / scale
            assert err64 < 1e-10, (name, k, err64)
            assert err32 < 1e-6, (name, k, err32)
        # the top rung is the update itself; the lora_B bias is scaled like PEFT scales it
        assert torch.allclose(m64.update(), dense, rtol=0, atol=1e-12 * scale)
        if p["bias"] is None:
            assert m64.bias is None
        else:
            assert torch.allclose(m64.bias, p["scaling"] * p["bias"], rtol=1e-12, atol=1e-15)


def test_factor_update_nested_factors():
    g = torch.Generator().manual_seed(7)
    a = torch.randn(5, 9, generator=g, dtype=torch.float64)
    b = torch.randn(7, 5, generator=g, dtype=torch.float64)
    a2, b2 = factor_update(a, b, 0.75)
    assert a2.shape == (5, 9) and b2.shape == (7, 5)
    dense = 0.75 * b @ a
    assert torch.allclose(b2 @ a2, dense, atol=1e-12)
    sv = torch.linalg.svdvals(dense)[:5]  # rank 5
    assert torch.allclose(a2.norm(dim=1) ** 2, sv, rtol=1e-10)
    assert torch.allclose(b2.norm(dim=0) ** 2, sv, rtol=1e-10)
    for k in range(6):
        want = truncated(dense, k)
        assert float((b2[:, :k] @ a2[:k] - want).norm()) < 1e-10 * float(dense.norm())
        assert torch.allclose(LadderModule(a2, b2).update(k), want, atol=1e-10)


@pytest.mark.parametrize("case", ["rank-alpha-pattern", "gpt2-conv1d"])
def test_uniform_rank_k_equals_dense_truncations_merged(tmp_path, case):
    base, pm, path = _setup(tmp_path, case)
    layers = peft_lora_layers(pm)
    ladder = RankLadder.from_peft(path)
    m = chunkwise.inject(copy.deepcopy(base), ladder)
    ids = ids_batch(2, 10, seed=3)
    n = ids.numel()
    best = {name: truncations(p["scaling"] * p["b"] @ p["a"]) for name, p in layers.items()}
    outs = {}
    for k in sorted({0, 1, 2, 3, 5, ladder.max_rank}):
        ref_model = copy.deepcopy(base)
        mods = dict(ref_model.named_modules())
        with torch.no_grad():
            for name in layers:
                delta = best[name][min(k, len(best[name]) - 1)]
                w = mods[name].weight
                w += (delta.T if type(mods[name]).__name__ == "Conv1D" else delta).to(w.dtype)
        ref = logits(ref_model, ids)
        plan = TokenPlan.uniform(n, k, np.zeros(n, np.int32), "cpu", torch.float32)
        with torch.no_grad(), m.use(plan):
            out = m.model(input_ids=ids).logits
        assert rel_err(out, ref) < 1e-5, (k, rel_err(out, ref))
        outs[k] = out
    base_out = logits(base, ids)
    assert torch.allclose(outs[0], base_out, atol=1e-6)  # rank 0: the base model
    assert rel_err(outs[1], outs[ladder.max_rank]) > 1e-3  # ranks really differ
    assert rel_err(outs[ladder.max_rank], logits(pm, ids)) < 1e-5


# ---------------------------------------------------------------------------------------------
# save / load


@pytest.mark.parametrize("case", ["everything-qwen2", "gpt2-conv1d", "rank-alpha-pattern"])
def test_ladder_save_load_round_trip(tmp_path, case):
    base, pm, path = _setup(tmp_path, case)
    peft_files = {f.name: f.read_bytes() for f in path.iterdir()}
    ladder = RankLadder.from_peft(path)
    file = ladder.save(path)
    assert file == path / LADDER_FILE and file.exists()
    # PEFT's own files untouched
    assert {f.name: f.read_bytes() for f in path.iterdir() if f.name != LADDER_FILE} == peft_files
    for source in (path, file):
        loaded = RankLadder.load(source)
        assert loaded.name == ladder.name
        assert loaded.settings == ladder.settings
        assert loaded.config == ladder.config
        assert loaded.modules.keys() == ladder.modules.keys()
        for name, lm in ladder.modules.items():
            got = loaded.modules[name]
            assert torch.equal(got.a, lm.a) and got.a.dtype == lm.a.dtype
            assert torch.equal(got.b, lm.b)
            assert (got.bias is None) == (lm.bias is None)
            if lm.bias is not None:
                assert torch.equal(got.bias, lm.bias)
        assert loaded.saved.keys() == ladder.saved.keys()
        for k, t in ladder.saved.items():
            assert torch.equal(loaded.saved[k], t)
    ids = ids_batch(2, 9, seed=4)
    out_a = top_rung_logits(chunkwise.inject(copy.deepcopy(base), ladder), ids)
    out_b = top_rung_logits(chunkwise.inject(copy.deepcopy(base), RankLadder.load(path)), ids)
    assert torch.equal(out_a, out_b)
    # PEFT still loads the directory (with the ladder file beside its own) and agrees
    again = load_peft(base, path)
    ref = logits(again, ids)
    assert torch.allclose(ref, logits(pm, ids), atol=1e-6)
    assert_matches(out_b, ref, logits(base, ids))


def test_an_interrupted_ladder_save_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    import safetensors.torch

    base, pm, path = _setup(tmp_path, "rank-alpha-pattern")
    ladder = RankLadder.from_peft(path)
    file = ladder.save(path)
    before = file.read_bytes()
    temps = []

    def interrupted(tensors, filename, metadata=None):
        temps.append(filename)
        with open(filename, "wb") as fh:
            fh.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", interrupted)
    for _ in range(2):
        with pytest.raises(KeyboardInterrupt):
            ladder.save(path)
    assert file.read_bytes() == before  # the old ladder, whole
    assert len(set(temps)) == 2 and all(LADDER_FILE in t for t in temps)  # a temp name per save
    assert sorted(p.name for p in path.iterdir() if p.name.endswith(".tmp")) == []


def test_ladder_load_refuses_a_non_ladder_file(tmp_path):
    base, pm, path = _setup(tmp_path, "llama")
    with pytest.raises(AdapterError) as ei:
        RankLadder.load(path / "adapter_model.safetensors")  # a safetensors file, but not a ladder
    assert ei.value.parameter == "ladder"
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / LADDER_FILE).write_bytes(b"\x00" * 5)
    with pytest.raises(AdapterError) as ei:
        RankLadder.load(tmp_path / "junk")
    assert ei.value.parameter == "ladder"


def _damaged(file, change):
    """Rewrites the ladder ``file`` with ``change(tensors, meta)`` applied."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(file), "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iter
    change(tensors, meta)
    save_file(tensors, str(file), metadata=meta)


def _first(tensors, part):
    return next(k for k in tensors if k.endswith(part))


def _replace(tensors, part, fn):
    key = _first(tensors, part)
    tensors[key] = fn(tensors[key])


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda t, m: t[_first(t, ".a")].view(-1).__setitem__(0, float("nan")), "NaN or inf"),
        (lambda t, m: _replace(t, ".b", lambda x: x.to(torch.int32)), "not a float"),
        (
            lambda t, m: t.__setitem__(_first(t, ".b"), t[_first(t, ".b")][:, :-1].contiguous()),
            "inconsistent",
        ),
        (lambda t, m: _replace(t, ".a", lambda x: x.reshape(-1)), "inconsistent"),
        (lambda t, m: m.__setitem__("adapter_config", "{not json"), "not JSON"),
        (lambda t, m: m.__setitem__("adapter_config", "[1, 2]"), "not a JSON object"),
    ],
    ids=["nan", "int-dtype", "rank-mismatch", "1-d", "bad-json", "json-list"],
)
def test_ladder_load_refuses_a_damaged_ladder(tmp_path, change, needle):
    """A damaged ladder used to load and run (NaN data, another dtype, broken metadata)."""
    base, pm, path = _setup(tmp_path, "llama")
    file = RankLadder.from_peft(path).save(path)
    _damaged(file, change)
    with pytest.raises(AdapterError, match=needle) as ei:
        RankLadder.load(path)
    assert ei.value.parameter == "ladder"
