"""One adapted module at decode (pytest-benchmark): the per-module cost of LoRA left unmerged.

A 576 -> 576 linear layer (SmolLM2-135M's attention projections), one token, an r=64 adapter:
the bare layer, PEFT's LoRA layer, and ChunkwiseLinear at rank 32 (no gates: a decode step
outside a cross-fade) and at rank 32 inside a cross-fade (gates). The overhead over the bare
layer is what 210 such modules add to every decode step; figures are reported, not asserted
(`python -m benches.lora_overhead` measures whole models).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from chunkwise.adapters.ladder import LadderModule, factor_update
from chunkwise.kernels import TokenArrays
from chunkwise.nn import ChunkwiseLinear, TokenPlan
from torch import nn

IN = OUT = 576
RANK = 64


@pytest.fixture(scope="module")
def layers() -> dict[str, object]:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    holder = nn.Sequential(nn.Linear(IN, OUT))
    peft = get_peft_model(copy.deepcopy(holder), LoraConfig(r=RANK, lora_alpha=RANK, target_modules=["0"]))
    lora = peft.base_model.model[0]
    with torch.no_grad():
        lora.lora_B["default"].weight.normal_(0, 0.02)
    a, b = factor_update(lora.lora_A["default"].weight, lora.lora_B["default"].weight, 1.0)
    current: dict[str, TokenPlan] = {}
    ours = ChunkwiseLinear(copy.deepcopy(holder[0]), lambda: current.get("plan"))
    ours.add_ladder(0, LadderModule(a.float(), b.float()))
    one = np.ones(1, np.float32)
    r32 = np.full(1, 32, np.int32)
    plain = TokenPlan.build(TokenArrays(r32, r32, one, one, one, np.zeros(1, np.int32), np.arange(1), 1))
    r16, ad, rows = np.full(1, 16, np.int32), np.zeros(1, np.int32), np.arange(1)
    ramp = TokenPlan.build(TokenArrays(r32, r16, one, one * 0.5, one, ad, rows, 1))
    return {"base": holder[0], "peft": lora, "ours": ours, "current": current, "plain": plain, "ramp": ramp}


@pytest.mark.parametrize("variant", ["base", "peft", "chunkwise_r32", "chunkwise_r32_crossfade"])
def test_decode_step_of_one_module(benchmark, layers, variant):
    x = torch.randn(1, 1, IN)
    if variant.startswith("chunkwise"):
        layers["current"]["plan"] = layers["ramp" if variant.endswith("crossfade") else "plain"]
        fn = layers["ours"]
    else:
        fn = layers[variant]
    with torch.inference_mode():
        out = benchmark(fn, x)
    assert out.shape == (1, 1, OUT) and torch.isfinite(out).all()


ADAPTERS = 8


@pytest.fixture(scope="module")
def eight() -> dict[str, object]:
    """The same module with eight r=64 adapters: PEFT (mixed batch by ``adapter_names``) and
    ChunkwiseLinear with the adapters stacked, and plans of one row per adapter (decode) and
    64 rows per adapter (prefill), every token at rank 32."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    holder = nn.Sequential(nn.Linear(IN, OUT))
    names = [f"a{i}" for i in range(ADAPTERS)]
    config = LoraConfig(r=RANK, lora_alpha=RANK, target_modules=["0"])
    peft = get_peft_model(copy.deepcopy(holder), config, adapter_name=names[0])
    for name in names[1:]:
        peft.add_adapter(name, config)
    lora = peft.base_model.model[0]
    current: dict[str, TokenPlan] = {}
    ours = ChunkwiseLinear(copy.deepcopy(holder[0]), lambda: current.get("plan"))
    for i, name in enumerate(names):
        with torch.no_grad():
            lora.lora_B[name].weight.normal_(0, 0.02)
        a, b = factor_update(lora.lora_A[name].weight, lora.lora_B[name].weight, 1.0)
        ours.add_ladder(i, LadderModule(a.float(), b.float()), stack=False)
    ours.stack_ladders()
    plans = {}
    for kind, m in (("decode", 1), ("prefill", 64)):
        n = ADAPTERS * m
        one, r32 = np.ones(n, np.float32), np.full(n, 32, np.int32)
        tokens = TokenArrays(
            r32, r32, one, one, one, np.repeat(np.arange(ADAPTERS, dtype=np.int32), m), np.arange(n), n
        )
        plans[kind, "grouped"] = TokenPlan.build(tokens)
        plans[kind, "blocks"] = TokenPlan.build(tokens)
        plans[kind, "blocks"].grouped = None
        assert plans[kind, "grouped"].grouped is not None
    return {"base": holder[0], "peft": lora, "ours": ours, "current": current, "plans": plans, "names": names}


@pytest.mark.parametrize("kind", ["decode", "prefill"])
@pytest.mark.parametrize("variant", ["base", "peft_mixed", "chunkwise_grouped", "chunkwise_blocks"])
def test_eight_adapters_of_one_module(benchmark, eight, kind, variant):
    """Eight adapters, one per row of a batch of 8 (one token each, or 64): PEFT's mixed batch
    against chunkwise's grouped pass (one bmm pair) and its plain blocks (a matmul pair per
    adapter), every token at rank 32."""
    m = 1 if kind == "decode" else 64
    x = torch.randn(ADAPTERS, m, IN)
    names = eight["names"]  # one adapter per row
    if variant == "peft_mixed":
        fn = lambda x: eight["peft"](x, adapter_names=names)  # noqa: E731
    elif variant.startswith("chunkwise"):
        eight["current"]["plan"] = eight["plans"][kind, variant.split("_")[1]]
        fn = eight["ours"]
    else:
        fn = eight["base"]
    with torch.inference_mode():
        out = benchmark(fn, x)
    assert out.shape == (ADAPTERS, m, OUT) and torch.isfinite(out).all()
