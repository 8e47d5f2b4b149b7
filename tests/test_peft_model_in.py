"""``chunkwise.inject(peft_model)``: a loaded PeftModel (one or several named LoRA adapters) goes
in as it is; the top rung of each adapter reproduces that PeftModel's own output (PEFT is the
oracle); what chunkwise cannot run is refused by name with the model untouched."""

from __future__ import annotations

import copy

import chunkwise as cw
import numpy as np
import pytest
import torch
from chunkwise.errors import AdapterError, InputError
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model

from tests.support.peft_helpers import (
    assert_unchanged,
    ids_batch,
    make_adapter,
    randomize_lora,
    rel_err,
    snapshot,
    tiny_model,
)

TARGETS = ["q_proj", "v_proj", "down_proj"]


def no_peft_layers(model: torch.nn.Module) -> bool:
    return not any(type(m).__module__.startswith("peft") for m in model.modules())


def test_one_adapter_top_rung_is_the_peft_model(tmp_path):
    base = tiny_model()
    pm = make_adapter(base, tmp_path / "a", r=4, lora_alpha=8, target_modules=TARGETS)
    ids = ids_batch(2, 11)
    with torch.no_grad():
        want = pm(input_ids=ids).logits
    cwm = cw.inject(pm)
    assert cwm.adapter_names == ["default"]
    assert no_peft_layers(cwm.model)
    with torch.no_grad(), cwm.use(cwm.top_rung(ids)):
        got = cwm.model(input_ids=ids).logits
    assert rel_err(got, want) < 1e-5
    # the in-memory ladder is the ladder of the saved folder
    disk = cw.RankLadder.from_peft(tmp_path / "a")
    assert disk.modules.keys() == cwm.ladders[0].modules.keys()
    for name, m in disk.modules.items():
        torch.testing.assert_close(cwm.ladders[0].modules[name].a, m.a)
        torch.testing.assert_close(cwm.ladders[0].modules[name].b, m.b)
    # unload gives the base model back
    with torch.no_grad():
        torch.testing.assert_close(cwm.unload()(input_ids=ids).logits, base(input_ids=ids).logits)


def test_several_named_adapters_are_addressable_by_name(tmp_path):
    base = tiny_model()
    make_adapter(base, tmp_path / "sql", seed=1, r=4, target_modules=TARGETS)
    make_adapter(base, tmp_path / "chat", seed=2, r=8, lora_alpha=4, target_modules=["q_proj", "up_proj"])
    pm = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "sql"), adapter_name="sql").eval()
    pm.load_adapter(str(tmp_path / "chat"), adapter_name="chat")
    ids = ids_batch(2, 9, seed=4)
    want = {}
    for name in ("sql", "chat"):
        pm.set_adapter(name)
        with torch.no_grad():
            want[name] = pm(input_ids=ids).logits
    cwm = cw.inject(pm)
    assert cwm.adapter_names == ["sql", "chat"]
    assert no_peft_layers(cwm.model)
    assert cwm.adapter_ids(["chat", "sql"], 2).tolist() == [1, 0]
    # one batch, one adapter per row, chosen by name
    with torch.no_grad(), cwm.use(cwm.top_rung(ids, adapters=["chat", "sql"])):
        got = cwm.model(input_ids=ids).logits
    assert rel_err(got[0], want["chat"][0]) < 1e-5
    assert rel_err(got[1], want["sql"][1]) < 1e-5
    with pytest.raises(InputError, match="unknown"):
        cwm.adapter_ids(["sql", "nope"], 2)
    # generate takes the names too
    out = cw.generate(cwm, ids[:, :5], max_new_tokens=3, adapters=["sql", "chat"])
    assert out.new_tokens.shape == (2, 3)


def test_modules_to_save_are_applied_and_the_originals_come_back(tmp_path):
    base = tiny_model()
    original_head = base.lm_head.weight.detach().clone()
    pm = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=4, target_modules=TARGETS, modules_to_save=["lm_head"])
    )
    randomize_lora(pm, seed=3)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if ".modules_to_save." in name:
                p.add_(0.5)
    pm.eval()
    ids = ids_batch(1, 10)
    with torch.no_grad():
        want = pm(input_ids=ids).logits
    cwm = cw.inject(pm)
    with torch.no_grad(), cwm.use(cwm.top_rung(ids)):
        got = cwm.model(input_ids=ids).logits
    assert rel_err(got, want) < 1e-5
    model = cwm.unload()
    torch.testing.assert_close(model.lm_head.weight, original_head)  # not PEFT's trained copy


def test_dora_and_other_tuners_are_refused_by_name_model_untouched():
    base = tiny_model()
    dora = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=TARGETS, use_dora=True))
    snap = snapshot(dora)
    with pytest.raises(AdapterError, match="DoRA") as info:
        cw.inject(dora)
    assert info.value.parameter == "use_dora"
    assert_unchanged(dora, snap)
    ia3_config = IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"])
    ia3 = get_peft_model(copy.deepcopy(base), ia3_config)
    snap = snapshot(ia3)
    with pytest.raises(AdapterError, match="not LORA") as info:
        cw.inject(ia3)
    assert info.value.parameter == "peft_type"
    assert_unchanged(ia3, snap)
    emb = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"]))
    snap = snapshot(emb)
    with pytest.raises(AdapterError, match="embedding") as info:
        cw.inject(emb)
    assert info.value.parameter == "target_modules"
    assert_unchanged(emb, snap)


def test_bad_calls(tmp_path):
    base = tiny_model()
    pm = make_adapter(base, tmp_path / "a", target_modules=TARGETS)
    ladder = cw.RankLadder.from_peft(tmp_path / "a")
    snap = snapshot(pm)
    with pytest.raises(InputError, match="brings its own adapters"):
        cw.inject(pm, ladder)
    assert_unchanged(pm, snap)
    with pytest.raises(AdapterError, match="ladders"):
        cw.inject(tiny_model())
    with pytest.raises(AdapterError, match="not an adapter"):
        cw.RankLadder.from_peft_model(pm, "other")
    with pytest.raises(AdapterError, match="PeftModel"):
        cw.RankLadder.from_peft_model(base)
    # two ladders of one name: names are ambiguous, ids still work
    cwm = cw.inject(tiny_model(), [ladder, ladder])
    with pytest.raises(InputError, match="ambiguous"):
        cwm.adapter_ids(["a", "a"], 2)
    assert cwm.adapter_ids(np.array([1, 0]), 2).tolist() == [1, 0]
