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
