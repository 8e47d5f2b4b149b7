"""Shared helpers for the PEFT / ladder / injection / KV / generation tests: tiny random models and
adapters, and their inputs.

A plain module (not a conftest): the tests import it as ``tests.support.peft_helpers``. Everything
is built locally from transformers configs (no hub access), in float32, in eval mode, from fixed
seeds.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import chunkwise
import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 96
ARCHS = ("llama", "mistral", "qwen2", "gpt2")
# target modules that exist in each architecture (GPT-2 uses Conv1D: fan_in_fan_out=True)
ATTN_TARGETS = {
    "llama": ["q_proj", "v_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "o_proj", "up_proj"],
    "qwen2": ["q_proj", "v_proj", "gate_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}


def tiny_model(arch: str = "llama", hidden: int = 32, seed: int = 0, **overrides: Any) -> nn.Module:
    """A 2-layer random causal LM of ``arch`` in float32 / eval mode."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, initializer_range=0.1)
    if arch == "gpt2":
        kw = dict(n_embd=hidden, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
        kw.update(overrides)
        cfg = GPT2Config(**common, **kw)
        model = GPT2LMHeadModel(cfg)
    else:
        kw = dict(
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            **common,
        )
        kw.update(overrides)
        cls_cfg, cls_model = {
            "llama": (LlamaConfig, LlamaForCausalLM),
            "mistral": (MistralConfig, MistralForCausalLM),
            "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        }[arch]
        model = cls_model(cls_cfg(**kw))
    return model.float().eval()


def randomize_lora(peft_model: nn.Module, seed: int, std: float = 0.1) -> None:
    """PEFT initialises lora_B to zero (the adapter would be a no-op): give every lora_B weight
    and bias random non-zero values; lora_A is re-drawn too so adapters from different seeds
    differ everywhere."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
                assert bool((p != 0).all()), name


def make_adapter(
    base: nn.Module, path: Path, seed: int = 1, std: float = 0.1, **lora_kwargs: Any
) -> nn.Module:
    """Creates a PEFT LoRA adapter of ``base`` (a deep copy; ``base`` is untouched) with random
    non-zero factors, saves it to ``path`` and returns the PEFT model (eval)."""
    lora_kwargs.setdefault("r", 4)
    lora_kwargs.setdefault("lora_alpha", 8)
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(**lora_kwargs))
    randomize_lora(pm, seed, std)
    if lora_kwargs.get("modules_to_save"):
        g = torch.Generator().manual_seed(seed + 1000)
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if ".modules_to_save." in name:
                    p.add_(torch.randn(p.shape, generator=g) * 0.1)
    pm.eval()
    pm.save_pretrained(str(path))
    return pm


def load_peft(base: nn.Module, path: Path) -> nn.Module:
    """PEFT's own reading of the adapter at ``path`` onto a copy of ``base``."""
    return PeftModel.from_pretrained(copy.deepcopy(base), str(path)).eval()


def ids_batch(batch: int = 2, seq: int = 11, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=g)


def ragged_prompt(batch: int = 3, seq: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts: row b has ``2 * b`` padding columns (row 0 none)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    for b in range(batch):
        mask[b, : 2 * b] = 0
    return ids.masked_fill(mask == 0, 0), mask


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm())


def assert_matches(out: torch.Tensor, ref: torch.Tensor, base: torch.Tensor | None, tol: float = 1e-5):
    """``out`` equals ``ref`` to ``tol`` relative error, and (guard against a vacuous pass) the
    adapter really changes the output: ``ref`` is far from the base model's ``base``."""
    assert out.shape == ref.shape
    err = rel_err(out, ref)
    assert err < tol, f"relative error {err:.3e} >= {tol:.0e}"
    if base is not None:
        effect = rel_err(base, ref)
        assert effect > 1e-2, f"the adapter barely changes the output ({effect:.2e}): vacuous test"


def logits(model: nn.Module, ids: torch.Tensor, **kw: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


def top_rung_logits(cw: chunkwise.ChunkwiseModel, ids: torch.Tensor, adapters: Any = None) -> torch.Tensor:
    with torch.no_grad(), cw.use(cw.top_rung(ids, adapters)):
        return cw.model(input_ids=ids).logits


def all_top_scheduler(top: int, crossfade: int = 0) -> chunkwise.Scheduler:
    """A scheduler whose every chunk gets rank ``top`` (threshold below any difficulty)."""
    cfg = chunkwise.SchedulerConfig(
        rungs=(0, top), thresholds=(-1.0,), min_len=4, max_len=8, granularity=1, crossfade=crossfade
    )
    return chunkwise.Scheduler(cfg)


def switching_scheduler(thresholds: tuple[float, ...], crossfade: int = 0) -> chunkwise.Scheduler:
    """Rungs (0, 2, 4) at ``thresholds``, short chunks, no hysteresis and no smoothing: the
    rank follows each token's difficulty, so decoding really switches rungs."""
    cfg = chunkwise.SchedulerConfig(
        rungs=(0, 2, 4),
        thresholds=thresholds,
        min_len=2,
        max_len=4,
        granularity=1,
        hysteresis=0.0,
        ema=1.0,
        crossfade=crossfade,
    )
    return chunkwise.Scheduler(cfg)


def ones_difficulty(lengths: list[int]) -> list[np.ndarray]:
    return [np.ones(n, np.float32) for n in lengths]


# -- model snapshots: "left exactly as it was" -------------------------------------------------


def snapshot(model: nn.Module) -> tuple[dict[str, nn.Module], dict[str, torch.Tensor]]:
    """Module objects by name and a deep copy of the state dict."""
    ids = dict(model.named_modules())
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return ids, state


def assert_unchanged(model: nn.Module, snap: tuple[dict[str, nn.Module], dict[str, torch.Tensor]]) -> None:
    mods, state = snap
    now = dict(model.named_modules())
    assert now.keys() == mods.keys(), "module names differ from the snapshot"
    for name, m in mods.items():
        assert now[name] is m, f"module {name!r} is not the same object as before"
    sd = model.state_dict()
    assert sd.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(sd[k], v), f"state_dict[{k!r}] changed"


def peft_lora_layers(pm: nn.Module, adapter: str = "default") -> dict[str, dict[str, Any]]:
    """PEFT's own view of every adapted layer: factors, lora_B bias and scaling, by module name
    (as in the base model, without PEFT's ``base_model.model.`` prefix)."""
    out = {}
    for name, mod in pm.named_modules():
        if hasattr(mod, "lora_A") and adapter in getattr(mod, "lora_A", {}):
            key = name.removeprefix("base_model.model.")
            out[key] = {
                "a": mod.lora_A[adapter].weight.detach().double(),
                "b": mod.lora_B[adapter].weight.detach().double(),
                "bias": None
                if mod.lora_B[adapter].bias is None
                else mod.lora_B[adapter].bias.detach().double(),
                "scaling": float(mod.scaling[adapter]),
            }
    return out


def chunkwise_layer_names(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, chunkwise.ChunkwiseLinear)}


def truncations(dense: torch.Tensor) -> list[torch.Tensor]:
    """The best rank-k approximations of ``dense`` for k = 0..min(shape) (one float64 SVD,
    Eckart–Young); index with ``min(k, len - 1)``."""
    u, s, vh = torch.linalg.svd(dense.double(), full_matrices=False)
    out = [torch.zeros_like(dense, dtype=torch.float64)]
    for k in range(1, len(s) + 1):
        out.append(out[-1] + s[k - 1] * torch.outer(u[:, k - 1], vh[k - 1]))
    return out


def truncated(dense: torch.Tensor, k: int) -> torch.Tensor:
    """The best rank-k approximation of ``dense``."""
    t = truncations(dense)
    return t[min(k, len(t) - 1)]
