"""Benchmarks of policy KV caching: the Rust eviction decision and the per-step overhead of a
PolicyCache against transformers' DynamicCache (reported in the terminal summary, not asserted).

Target: one eviction decision for 8 sequences x 2048 kept slots (scored by attention and
difficulty) under 1 ms; a decode step with a windowed PolicyCache within 1.2x of DynamicCache.
"""

from __future__ import annotations

import chunkwise as cw
import numpy as np
import pytest
import torch

B, BUDGET, SLACK = 8, 2048, 64
TARGET_EVICT_S = 1e-3


def test_kv_eviction_decision(benchmark, timings):
    """Append a slack's worth of tokens with scores, then decide and apply an eviction."""
    policy = cw.kv.KvPolicy(sinks=4, window=256, budget=BUDGET, slack=SLACK, attention_weight=1.0,
                            difficulty_weight=1.0)  # fmt: skip
    rng = np.random.default_rng(0)
    ledger = policy.ledger([0] * B)
    ledger.append(BUDGET, rng.random(B * BUDGET, dtype=np.float32))
    new_diff = rng.random(B * (SLACK + 1), dtype=np.float32)
    scores = rng.random(B * (BUDGET + SLACK + 1), dtype=np.float32)

    def step():
        ledger.append(SLACK + 1, new_diff)
        ledger.add_scores(scores)
        return ledger.evict()

    keep = benchmark(step)
    assert keep.shape == (B, BUDGET)
    assert (np.diff(keep, axis=1) > 0).all()
    timings.record("kv eviction 8 x 2048", benchmark, TARGET_EVICT_S)


@pytest.mark.parametrize("kind", ["dynamic", "policy-window"])
def test_decode_step_cache_overhead(benchmark, timings, kind):
    """One greedy decode step of a small random Llama with 1024 cached tokens."""
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192)  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 1000, (1, 1024))
    if kind == "dynamic":
        cache = DynamicCache(config=cfg)
    else:
        cache = cw.kv.PolicyCache(cw.kv.KvPolicy.sliding_window(1024, slack=64), cfg)
    with torch.inference_mode():
        model(input_ids=ids, cache=cache)
    pos = [1024]

    def step():
        with torch.inference_mode():
            out = model(input_ids=ids[:, :1], position_ids=torch.tensor([[pos[0]]]), cache=cache)
        pos[0] += 1
        return out.logits

    logits = benchmark.pedantic(step, rounds=200, warmup_rounds=5)
    assert torch.isfinite(logits).all()
    if kind != "dynamic":
        assert cache.peak_slots <= 1024 + 64 + 1
    timings.record(f"decode step, {kind} cache", benchmark)
