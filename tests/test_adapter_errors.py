"""Adapters chunkwise must refuse: each raises AdapterError naming the parameter and leaves the
model exactly as it was (same module objects, same state_dict). Pickles are never executed."""

from __future__ import annotations

import copy
import json
import os
import pickle
import shlex
import shutil

import chunkwise
import pytest
import torch
from chunkwise import AdapterError, RankLadder
from safetensors.torch import load_file, save_file

from tests.support.peft_helpers import (
    assert_matches,
    assert_unchanged,
    ids_batch,
    logits,
    make_adapter,
    snapshot,
    tiny_model,
    top_rung_logits,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning"),
    pytest.mark.usefixtures("one_torch_thread"),
]


TARGETS = dict(target_modules=["q_proj", "v_proj"], r=4)
Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def base():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def clean(base, tmp_path_factory):
    """A valid adapter (q_proj + v_proj, r=4) and PEFT's output on it."""
    path = tmp_path_factory.mktemp("clean") / "adapter"
    pm = make_adapter(base, path, seed=5, **TARGETS)
    ids = ids_batch(2, 9)
    return path, logits(pm, ids), ids


@pytest.fixture
def adapter(clean, tmp_path):
    """A fresh copy of the clean adapter directory to corrupt."""
    dst = tmp_path / "adapter"
    shutil.copytree(clean[0], dst)
    return dst


def _tensors(path):
    return load_file(str(path / "adapter_model.safetensors"))


def _write_tensors(path, tensors):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "adapter_model.safetensors"))


def _edit_config(path, **changes):
    file = path / "adapter_config.json"
    cfg = json.loads(file.read_text())
    cfg.update(changes)
    file.write_text(json.dumps(cfg))


def _refused(base, path, parameter, model=None):
    """Loading + injecting the adapter at ``path`` raises AdapterError(parameter); the model is
    untouched. Returns the error."""
    model = copy.deepcopy(base) if model is None else model
    snap = snapshot(model)
    with pytest.raises(AdapterError) as ei:
        chunkwise.inject(model, RankLadder.from_peft(path))
    assert ei.value.parameter == parameter, (ei.value.parameter, str(ei.value))
    assert str(ei.value)
    assert_unchanged(model, snap)
    return ei.value


def _accepted(base, path, clean):
    _, ref, ids = clean
    m = chunkwise.inject(copy.deepcopy(base), RankLadder.from_peft(path))
    assert_matches(top_rung_logits(m, ids), ref, logits(base, ids))


def test_clean_adapter_is_accepted(base, adapter, clean):
    """Guard: every refusal below is caused by the corruption, not by the adapter itself."""
    _accepted(base, adapter, clean)


# ---------------------------------------------------------------------------------------------
# corrupt tensor files


@pytest.mark.parametrize("keep", [0.5, 0.02])
def test_truncated_safetensors(base, adapter, keep):
    file = adapter / "adapter_model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep)])
    _refused(base, adapter, "adapter_model.safetensors")


def test_wrong_shape_that_does_not_chain(base, adapter):
    t = _tensors(adapter)
    a = t[f"{Q0}.lora_A.weight"]
    t[f"{Q0}.lora_A.weight"] = torch.randn(a.shape[0] + 1, a.shape[1])
    _write_tensors(adapter, t)
    e = _refused(base, adapter, "adapter_model")
    assert "q_proj" in str(e)


def test_wrong_shape_that_does_not_fit_the_layer(base, adapter):
    t = _tensors(adapter)
    a = t[f"{Q0}.lora_A.weight"]
    t[f"{Q0}.lora_A.weight"] = torch.randn(a.shape[0], a.shape[1] + 3)  # chains, but in=35 != 32
    _write_tensors(adapter, t)
    e = _refused(base, adapter, "adapter_model")
    assert "q_proj" in str(e)


def test_missing_lora_b(base, adapter):
    t = _tensors(adapter)
    del t[f"{Q0}.lora_B.weight"]
    _write_tensors(adapter, t)
    e = _refused(base, adapter, "adapter_model")
    assert "lora_B" in str(e)


@pytest.mark.parametrize("part", ["lora_A", "lora_B"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights(base, adapter, part, value):
    t = _tensors(adapter)
    t[f"{Q0}.{part}.weight"][1, 2] = value
    _write_tensors(adapter, t)
    _refused(base, adapter, "adapter_model")


def test_no_tensor_file(base, adapter):
    (adapter / "adapter_model.safetensors").unlink()
    _refused(base, adapter, "path")


def test_not_an_adapter_directory(base, tmp_path):
    _refused(base, tmp_path, "path")


# ---------------------------------------------------------------------------------------------
# config and weights disagree with each other or with the model


def test_config_targets_modules_that_do_not_exist(base, adapter):
    _edit_config(adapter, target_modules=["nonexistent_proj"])
    _refused(base, adapter, "target_modules")


def test_weights_for_a_module_the_config_does_not_target(base, adapter):
    _edit_config(adapter, target_modules=["q_proj"])  # the weights also hold v_proj
    _refused(base, adapter, "target_modules")


def test_config_targets_a_module_without_weights(base, adapter):
    _edit_config(adapter, target_modules=["q_proj", "v_proj", "k_proj"])
    _refused(base, adapter, "target_modules")


def test_weights_for_a_module_the_model_lacks(base, adapter):
    t = _tensors(adapter)
    t["base_model.model.model.layers.0.self_attn.nonexistent_proj.lora_A.weight"] = torch.randn(4, 32)
    t["base_model.model.model.layers.0.self_attn.nonexistent_proj.lora_B.weight"] = torch.randn(32, 4)
    _write_tensors(adapter, t)
    _refused(base, adapter, "target_modules")


def test_rank_mismatch_with_rank_pattern(base, adapter):
    _edit_config(adapter, rank_pattern={"v_proj": 2})  # the weights are rank 4
    e = _refused(base, adapter, "rank_pattern")
    assert "v_proj" in str(e)


def test_rank_mismatch_with_r(base, adapter):
    _edit_config(adapter, r=8)
    _refused(base, adapter, "rank_pattern")


def test_adapter_for_a_different_hidden_size(base, clean, tmp_path):
    other = tiny_model("llama", hidden=48)
    _refused(other, clean[0], "adapter_model")


def test_modules_to_save_for_a_parameter_the_model_lacks(base, tmp_path):
    make_adapter(base, tmp_path / "a", target_modules=["q_proj"], modules_to_save=["lm_head"])
    bigger = tiny_model("llama", vocab_size=128)  # lm_head 128 x 32, the saved one is 96 x 32
    _refused(bigger, tmp_path / "a", "modules_to_save")


# ---------------------------------------------------------------------------------------------
# pickles and .bin files


class _Custom:
    """A class instance in a pickle: refusing to import it is the only safe answer."""

    def __init__(self):
        self.payload = torch.zeros(2)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def _to_bin(path, obj, raw):
    (path / "adapter_model.safetensors").unlink()
    if raw:
        (path / "adapter_model.bin").write_bytes(pickle.dumps(obj, protocol=2))
    else:
        torch.save(obj, str(path / "adapter_model.bin"))


@pytest.mark.parametrize("raw", [False, True], ids=["torch-zip", "raw-pickle"])
def test_pickle_with_os_system_is_refused_not_executed(base, adapter, tmp_path, raw):
    marker = tmp_path / "pwned"
    t = _tensors(adapter)
    t["extra"] = _Evil(marker)
    _to_bin(adapter, t, raw)
    _refused(base, adapter, "adapter_model.bin")
    assert not marker.exists(), "the pickle was executed"
    # guard: the file really is a live payload (an unrestricted unpickler would run it)
    if raw:
        pickle.loads((adapter / "adapter_model.bin").read_bytes())
        assert marker.exists()


@pytest.mark.parametrize("raw", [False, True], ids=["torch-zip", "raw-pickle"])
def test_pickle_with_a_custom_class_is_refused(base, adapter, raw):
    t = _tensors(adapter)
    t[f"{Q0}.lora_A.weight"] = _Custom()
    _to_bin(adapter, t, raw)
    _refused(base, adapter, "adapter_model.bin")


def test_plain_tensor_bin_is_accepted(base, adapter, clean):
    _to_bin(adapter, _tensors(adapter), raw=False)
    assert not (adapter / "adapter_model.safetensors").exists()
    _accepted(base, adapter, clean)


def test_bin_that_is_not_a_dict_of_tensors(base, adapter):
    _to_bin(adapter, {"a": 1, "b": [torch.zeros(2)]}, raw=False)
    _refused(base, adapter, "adapter_model.bin")


# ---------------------------------------------------------------------------------------------
# unsupported config


def test_dora_is_refused_by_name(base, tmp_path):
    make_adapter(base, tmp_path / "a", use_dora=True, **TARGETS)
    e = _refused(base, tmp_path / "a", "use_dora")
    assert "use_dora" in str(e)


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_trained_base_bias_is_refused(base, tmp_path, bias):
    qwen = tiny_model("qwen2")  # q/v have biases for PEFT to train
    make_adapter(qwen, tmp_path / "a", bias=bias, **TARGETS)
    e = _refused(qwen, tmp_path / "a", "bias")
    assert "bias" in str(e)


@pytest.mark.parametrize(
    "key,value",
    [("chunkwise_future_feature", 3), ("layer_replication", [[0, 2]]), ("target_parameters", ["w"])],
)
def test_unknown_config_key_with_a_value_is_refused_by_name(base, adapter, key, value):
    _edit_config(adapter, **{key: value})
    e = _refused(base, adapter, key)
    assert key in str(e)


@pytest.mark.parametrize("value", [None, False, [], {}])
def test_unknown_config_key_without_a_value_is_accepted(base, adapter, clean, value):
    _edit_config(adapter, chunkwise_future_feature=value)
    _accepted(base, adapter, clean)


def test_lora_on_an_embedding_is_refused(base, tmp_path):
    make_adapter(base, tmp_path / "a", target_modules=["embed_tokens", "q_proj"])
    e = _refused(base, tmp_path / "a", "target_modules")  # the option to change
    assert "embed_tokens" in str(e) and "embedding" in str(e)


def test_peft_type_other_than_lora(base, adapter):
    _edit_config(adapter, peft_type="IA3")
    _refused(base, adapter, "peft_type")


# ---------------------------------------------------------------------------------------------
# inject() misuse


def test_injecting_twice_is_refused(base, adapter, clean):
    model = copy.deepcopy(base)
    ladder = RankLadder.from_peft(adapter)
    m = chunkwise.inject(model, ladder)
    snap = snapshot(model)  # the injected model
    with pytest.raises(AdapterError) as ei:
        chunkwise.inject(model, ladder)
    assert ei.value.parameter == "model"
    assert_unchanged(model, snap)
    _, ref, ids = clean
    assert_matches(top_rung_logits(m, ids), ref, logits(base, ids))  # the first injection still works


def test_no_ladders(base):
    model = copy.deepcopy(base)
    snap = snapshot(model)
    with pytest.raises(AdapterError) as ei:
        chunkwise.inject(model, [])
    assert ei.value.parameter == "ladders"
    assert_unchanged(model, snap)


def test_two_adapters_with_modules_to_save_are_refused(base, tmp_path):
    make_adapter(base, tmp_path / "a", seed=1, target_modules=["q_proj"], modules_to_save=["lm_head"])
    make_adapter(base, tmp_path / "b", seed=2, target_modules=["v_proj"], modules_to_save=["lm_head"])
    model = copy.deepcopy(base)
    snap = snapshot(model)
    with pytest.raises(AdapterError) as ei:
        chunkwise.inject(model, [RankLadder.from_peft(tmp_path / "a"), RankLadder.from_peft(tmp_path / "b")])
    assert ei.value.parameter == "modules_to_save"
    assert_unchanged(model, snap)


def test_second_ladder_invalid_leaves_model_untouched(base, adapter, clean, tmp_path):
    """The first ladder fits, the second does not: nothing of the first may have been attached."""
    other = tmp_path / "bad"
    shutil.copytree(adapter, other)
    _edit_config(other, target_modules=["q_proj"])
    good = RankLadder.from_peft(adapter)
    bad = RankLadder.from_peft(other)  # loads; only inject can see it does not fit
    model = copy.deepcopy(base)
    snap = snapshot(model)
    with pytest.raises(AdapterError) as ei:
        chunkwise.inject(model, [good, bad])
    assert ei.value.parameter == "target_modules"
    assert_unchanged(model, snap)


# -- all or nothing, and PEFT's reading of a stray bias ----------------------------------------


def test_a_saved_tensor_of_an_adapted_layer_is_refused_before_anything_changes(base, adapter):
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    tensors[f"{Q0}.weight"] = base.model.layers[0].self_attn.q_proj.weight.detach().clone()
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    model = copy.deepcopy(base)
    snap = snapshot(model)
    with pytest.raises(AdapterError, match="q_proj.*either adapted or saved whole") as info:
        chunkwise.inject(model, RankLadder.from_peft(adapter))
    assert info.value.parameter == "modules_to_save"
    assert_unchanged(model, snap)


def test_a_failure_half_way_through_inject_leaves_the_model_as_it_was(base, clean, monkeypatch):
    from chunkwise.nn import ChunkwiseLinear

    model = copy.deepcopy(base)
    snap = snapshot(model)
    calls = []
    real = ChunkwiseLinear.add_ladder

    def fail_on_the_third(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory (simulated)")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ChunkwiseLinear, "add_ladder", fail_on_the_third)
    with pytest.raises(RuntimeError, match="simulated"):
        chunkwise.inject(model, RankLadder.from_peft(clean[0]))
    assert len(calls) == 3  # it did fail half-way, after wrapping two layers
    assert_unchanged(model, snap)
    monkeypatch.setattr(ChunkwiseLinear, "add_ladder", real)
    cwm = chunkwise.inject(model, RankLadder.from_peft(clean[0]))  # and a later inject works
    assert_matches(top_rung_logits(cwm, clean[2]), clean[1], logits(base, clean[2]))


def test_a_lora_bias_the_config_does_not_enable_is_ignored_like_peft_does(base, tmp_path):
    from peft import PeftModel

    path = tmp_path / "biased"
    make_adapter(base, path, seed=6, lora_bias=True, **TARGETS)
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["lora_bias"] = False
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    ids = ids_batch(2, 9)
    peft = PeftModel.from_pretrained(copy.deepcopy(base), str(path)).eval()
    with pytest.warns(UserWarning, match="lora_B.bias tensors of 4 module.*ignored"):
        ladder = RankLadder.from_peft(path)
    assert all(m.bias is None for m in ladder.modules.values())
    cwm = chunkwise.inject(copy.deepcopy(base), ladder)
    assert_matches(top_rung_logits(cwm, ids), logits(peft, ids), logits(base, ids))


# ---------------------------------------------------------------------------------------------
# what the fuzzer found (issue 12): each used to raise something outside the chunkwise hierarchy


@pytest.mark.parametrize(
    ("changes", "parameter"),
    [
        ({"target_modules": "("}, "target_modules"),  # re.error when matching
        ({"target_modules": ["q_proj", 3]}, "target_modules"),  # TypeError in endswith
        ({"exclude_modules": "["}, "exclude_modules"),
        ({"rank_pattern": ["q_proj"]}, "rank_pattern"),  # AttributeError: list has no items
        ({"rank_pattern": {"(": 4}}, "rank_pattern"),
        ({"rank_pattern": {"q_proj": "x"}}, "rank_pattern"),  # ValueError from int()
        ({"alpha_pattern": {"q_proj": float("nan")}}, "alpha_pattern"),
        ({"lora_alpha": float("nan")}, "lora_alpha"),  # LinAlgError in the SVD
        ({"lora_alpha": float("inf")}, "lora_alpha"),
        ({"r": 4.5}, "r"),
        ({"r": True}, "r"),
        ({"r": 2**40}, "r"),
        ({"lora_bias": "yes"}, "lora_bias"),
        ({"layers_to_transform": "x"}, "layers_to_transform"),
        ({"modules_to_save": [3]}, "modules_to_save"),
    ],
)
def test_bad_config_values_are_adapter_errors(base, adapter, changes, parameter):
    _edit_config(adapter, **changes)
    with pytest.raises(AdapterError) as ei:
        RankLadder.from_peft(adapter)
    assert ei.value.parameter == parameter, str(ei.value)


def test_an_integral_float_rank_is_read_as_the_rank(base, adapter, clean):
    _edit_config(adapter, r=4.0)
    _accepted(base, adapter, clean)


def test_a_deeply_nested_config_is_an_adapter_error(adapter):
    (adapter / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(AdapterError, match="not valid JSON"):
        RankLadder.from_peft(adapter)


def test_factors_that_overflow_the_ladder_dtype_are_refused(base, adapter):
    t = _tensors(adapter)
    key = next(k for k in t if "lora_B" in k)
    t[key] = t[key].clone()
    t[key].view(-1)[0] = 1e15  # finite, but the nested factors (~1e7) are not in float16
    _write_tensors(adapter, t)
    assert RankLadder.from_peft(adapter).modules  # float32 holds them
    with pytest.raises(AdapterError) as ei:
        RankLadder.from_peft(adapter, dtype=torch.float16)
    assert ei.value.parameter == "weights" and "float16" in str(ei.value)


def _refused_quickly(fn, match):
    """``fn()`` raises AdapterError(match) within 20 s (a blocking read would hang the test)."""
    import threading

    box: dict[str, BaseException] = {}

    def run():
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box["e"] = e

    th = threading.Thread(target=run, daemon=True)
    th.start()
    th.join(20)
    assert not th.is_alive(), "the read blocked"
    assert isinstance(box.get("e"), AdapterError), box
    assert match in str(box["e"])


@pytest.mark.parametrize("name", ["adapter_config.json", "adapter_model.safetensors"])
def test_a_fifo_in_place_of_an_adapter_file_is_refused_without_blocking(adapter, name):
    (adapter / name).unlink()
    os.mkfifo(adapter / name)
    _refused_quickly(lambda: RankLadder.from_peft(adapter), "FIFO")


@pytest.mark.parametrize("name", ["adapter_config.json", "adapter_model.safetensors"])
def test_a_link_to_an_endless_device_is_refused(adapter, name):
    (adapter / name).unlink()
    (adapter / name).symlink_to("/dev/zero")
    _refused_quickly(lambda: RankLadder.from_peft(adapter), "regular file")


def test_ladder_files_that_are_fifos_or_devices_are_refused(clean, tmp_path):
    ladder = RankLadder.from_peft(clean[0])
    file = ladder.save(tmp_path)
    file.unlink()
    os.mkfifo(file)
    _refused_quickly(lambda: RankLadder.load(tmp_path), "FIFO")
    file.unlink()
    file.symlink_to("/dev/zero")
    _refused_quickly(lambda: RankLadder.load(file), "regular file")


def test_a_path_that_is_not_a_path_is_an_adapter_error():
    for call in (RankLadder.from_peft, RankLadder.load):
        with pytest.raises(AdapterError) as ei:
            call(5)
        assert ei.value.parameter == "path"


@pytest.mark.parametrize("ladders", [None, "x", [None], [object()], 3])
def test_inject_names_ladders_that_are_not_ladders(base, ladders):
    model = copy.deepcopy(base)
    snap = snapshot(model)
    with pytest.raises(AdapterError) as ei:
        chunkwise.inject(model, ladders)
    assert ei.value.parameter == "ladders"
    assert_unchanged(model, snap)


def test_inject_names_a_scheduler_that_is_not_one(base, clean):
    model = copy.deepcopy(base)
    snap = snapshot(model)
    with pytest.raises(chunkwise.InputError) as ei:
        chunkwise.inject(model, RankLadder.from_peft(clean[0]), {"rungs": (0, 4)})
    assert ei.value.parameter == "scheduler"
    assert_unchanged(model, snap)
