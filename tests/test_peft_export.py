"""A ladder written as a plain PEFT LoRA folder (``RankLadder.to_peft``, ``chunkwise convert
--peft-out``): PEFT itself loads it and reproduces the original adapter, its rank-k cut is the
float64 best rank-k truncation of every update (Eckart–Young) and equals chunkwise at uniform
rank k, and bad ranks or an occupied folder are refused before anything is written.

Oracles: the original adapter through PEFT, float64 SVDs of PEFT's own updates.
"""

from __future__ import annotations

import copy
import json

import chunkwise
import numpy as np
import pytest
import torch
from chunkwise import AdapterError, InputError, RankLadder
from chunkwise.adapters.files import CONFIG_FILE, LADDER_FILE, WEIGHTS_FILE
from chunkwise.cli import main
from chunkwise.nn.token_plan import TokenPlan

from tests.support.peft_helpers import (
    assert_matches,
    ids_batch,
    load_peft,
    logits,
    make_adapter,
    peft_lora_layers,
    rel_err,
    tiny_model,
    truncations,
)
from tests.test_ladder_peft import CASES as LADDER_CASES

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning"),
    pytest.mark.usefixtures("one_torch_thread"),
]

CASES = {
    "rank-alpha-pattern": LADDER_CASES["rank-alpha-pattern"],
    "everything-qwen2": LADDER_CASES["everything-qwen2"],
    "gpt2-conv1d-rslora": (
        "gpt2",
        dict(target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, use_rslora=True),
    ),
}


def _setup(tmp_path, case):
    arch, kw = CASES[case]
    base = tiny_model(arch)
    pm = make_adapter(base, tmp_path / "adapter", seed=3, **kw)
    return base, pm, RankLadder.from_peft(tmp_path / "adapter")


@pytest.mark.parametrize("case", list(CASES))
def test_the_peft_folder_reproduces_the_adapter_through_peft(tmp_path, case):
    base, pm, ladder = _setup(tmp_path, case)
    out = ladder.to_peft(tmp_path / "export")
    config = json.loads((out / CONFIG_FILE).read_text())
    assert config["r"] == config["lora_alpha"] == ladder.max_rank and config["use_rslora"] is False
    again = load_peft(base, out)
    # exactly the modules the original adapts, each at its own rank, with scale 1
    layers, want = peft_lora_layers(again), peft_lora_layers(pm)
    assert set(layers) == set(want)
    for name, p in layers.items():
        assert p["scaling"] == 1.0 and p["a"].shape[0] == ladder.modules[name].rank, name
    ids = ids_batch(2, 11, seed=2)
    assert_matches(logits(again, ids), logits(pm, ids), logits(base, ids))
    # chunkwise reads the folder (through the ladder beside it, and from the PEFT files) alike
    assert (out / LADDER_FILE).is_file()
    for read in (RankLadder.load(out), RankLadder.from_peft(out)):
        assert read.settings == RankLadder.load(out).settings
        for name, m in ladder.modules.items():
            torch.testing.assert_close(read.modules[name].update(), m.update(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("case", ["rank-alpha-pattern", "everything-qwen2"])
def test_a_rank_k_folder_is_the_best_truncation_and_equals_chunkwise_at_rank_k(tmp_path, case):
    base, pm, ladder = _setup(tmp_path, case)
    original = peft_lora_layers(pm)
    best = {name: truncations(p["scaling"] * p["b"] @ p["a"]) for name, p in original.items()}
    cw = chunkwise.inject(copy.deepcopy(base), ladder)
    ids = ids_batch(2, 10, seed=4)
    n = ids.numel()
    outs = {}
    for k in (1, 2, 3):
        out = ladder.to_peft(tmp_path / f"r{k}", rank=k)
        assert json.loads((out / CONFIG_FILE).read_text())["r"] == k
        cut = load_peft(base, out)
        for name, p in peft_lora_layers(cut).items():
            dense = original[name]["scaling"] * original[name]["b"] @ original[name]["a"]
            got = p["scaling"] * p["b"] @ p["a"]
            want = best[name][min(k, len(best[name]) - 1)]
            # Eckart–Young: the cut is the best rank-k approximation, so its error is the SVD tail
            assert float((got - want).norm()) <= 1e-6 * float(dense.norm()), (name, k)
            tail = torch.linalg.svdvals(dense)[k:].square().sum().sqrt()
            assert abs(float((dense - got).norm()) - float(tail)) <= 1e-6 * float(dense.norm()), (name, k)
        plan = TokenPlan.uniform(n, k, np.zeros(n, np.int32), "cpu", torch.float32)
        with torch.no_grad(), cw.use(plan):
            ref = cw.model(input_ids=ids).logits
        outs[k] = logits(cut, ids)
        assert rel_err(outs[k], ref) < 1e-5, (k, rel_err(outs[k], ref))
    assert rel_err(outs[1], logits(pm, ids)) > 1e-3  # the cut really changes the output


def test_a_module_name_that_ends_another_keeps_its_own_rank(tmp_path):
    """Patterns are matched as suffixes: ``model.layers.0.self_attn.q_proj`` must not give its
    rank to a module whose name merely ends the same way, whatever order the dict has."""
    _, _, ladder = _setup(tmp_path, "rank-alpha-pattern")
    config = chunkwise.adapters.export.peft_config(ladder)
    keys = list(config["rank_pattern"])
    assert [len(k) for k in keys] == sorted((len(k) for k in keys), reverse=True)
    settings = chunkwise.adapters.settings_from_dict(config)
    for name, m in ladder.modules.items():
        assert settings.rank_alpha(name) == (m.rank, m.rank), name


@pytest.mark.parametrize("rank", [0, -1, 7, 2.5, True, "2", None])
def test_a_bad_rank_is_refused_before_anything_is_written(tmp_path, rank):
    _, _, ladder = _setup(tmp_path, "rank-alpha-pattern")
    assert ladder.max_rank == 6
    if rank is None:
        ladder.to_peft(tmp_path / "ok", rank=None)  # None: the full ladder
        return
    with pytest.raises(InputError, match=r"rank.*1 to the ladder's top rank 6") as e:
        ladder.to_peft(tmp_path / "out", rank=rank)
    assert e.value.parameter == "rank"
    assert not (tmp_path / "out").exists()


def test_an_occupied_folder_is_refused_unless_overwrite(tmp_path):
    _, _, ladder = _setup(tmp_path, "rank-alpha-pattern")
    source = tmp_path / "adapter"
    before = {f.name: f.read_bytes() for f in source.iterdir()}
    with pytest.raises(AdapterError, match="already holds adapter_config.json") as e:
        ladder.to_peft(source, rank=2)
    assert e.value.parameter == "path"
    assert {f.name: f.read_bytes() for f in source.iterdir()} == before  # the source adapter, whole
    (tmp_path / "file").write_text("x")
    with pytest.raises(AdapterError, match="not a folder"):
        ladder.to_peft(tmp_path / "file")
    out = ladder.to_peft(tmp_path / "out", rank=2)
    ladder.to_peft(out, rank=3, overwrite=True)
    assert json.loads((out / CONFIG_FILE).read_text())["r"] == 3
    assert RankLadder.load(out).max_rank == 3
    assert sorted(p.name for p in out.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE, LADDER_FILE])


def test_convert_peft_out_writes_a_folder_peft_loads(tmp_path, capsys):
    base, pm, ladder = _setup(tmp_path, "gpt2-conv1d-rslora")
    src, out = tmp_path / "adapter", tmp_path / "peft"
    assert main(["convert", str(src), "--peft-out", str(out), "--rank", "2"]) == 0
    assert f"rank 2 ({100 * ladder.energy(2):.2f} % of the update energy) -> {out}" in capsys.readouterr().out
    ids = ids_batch(2, 9, seed=5)
    cw = chunkwise.inject(copy.deepcopy(base), RankLadder.from_peft(src))
    plan = TokenPlan.uniform(ids.numel(), 2, np.zeros(ids.numel(), np.int32), "cpu", torch.float32)
    with torch.no_grad(), cw.use(plan):
        ref = cw.model(input_ids=ids).logits
    assert rel_err(logits(load_peft(base, out), ids), ref) < 1e-5
    # refused, exit 2, with the reason: an occupied folder, a bad rank, --rank alone, the source itself
    for argv, needle in (
        (["--peft-out", str(out)], "already holds"),
        (["--peft-out", str(tmp_path / "x"), "--rank", "9"], "top rank 4"),
        (["--rank", "2"], "only with --peft-out"),
        (["--peft-out", str(src), "--force"], "the adapter folder itself"),
    ):
        assert main(["convert", str(src), *argv]) == 2, argv
        assert needle in capsys.readouterr().err, argv
    assert not (tmp_path / "x").exists()
    assert main(["convert", str(src), "--peft-out", str(out), "--force"]) == 0
    assert json.loads((out / CONFIG_FILE).read_text())["r"] == 4
