"""int8 KV for easy chunks (KvPolicy.int8): the quantizer against float64, the two-precision
store against a plain reference of what each slot holds, the cache's byte budget and its choice
of which slots stay at full precision (the ledger's keep priority), and generation with it."""

from __future__ import annotations

import dataclasses

import chunkwise as cw
import numpy as np
import pytest
import torch
from chunkwise.kv import KvPolicy, PolicyCache, int8
from chunkwise.kv.int8 import MixedStore, dequantize, full_slots, quantize

from tests.support.peft_helpers import VOCAB, ragged_prompt, tiny_model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_is_within_half_a_step_of_float64(dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 2, 50, 16, generator=g) * torch.logspace(-3, 2, 50)[:, None]).to(dtype)
    x[0, 0, 0] = 0.0  # an all-zero vector gets a usable scale
    q, scale = quantize(x)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (3, 2, 50, 1)
    ref = x.double()
    step = ref.abs().amax(-1, keepdim=True) / 127
    err = (q.double() * scale.double() - ref).abs()
    assert bool((err <= step / 2 * (1 + 1e-5) + 1e-30).all())
    assert int(q.abs().max()) == 127  # the largest entry of each vector uses the full range
    assert torch.equal(dequantize(q, scale, dtype)[0, 0, 0], torch.zeros(16, dtype=dtype))


@pytest.mark.parametrize(
    "batch, max_runs, dtype",
    [(1, 0, torch.float32), (1, 10**6, torch.float32), (1, 10**6, torch.bfloat16), (3, 32, torch.float32)],
    ids=["one-row-index-copies", "one-row-slices", "one-row-slices-bf16", "three-rows-gather"],
)
def test_mixed_store_holds_what_a_plain_reference_holds(batch, max_runs, dtype, monkeypatch):
    """Random appends, demotions and evictions; after each, read() gives every slot in slot
    order: its full-precision value, or the dequantized value it had when it was demoted (one
    row: the slot-order reads, by slices or index copies; three rows moving differently: the
    general gather)."""
    monkeypatch.setattr(int8, "MAX_RUNS", max_runs)
    rng = np.random.default_rng(batch + max_runs)
    g = torch.Generator().manual_seed(1)
    heads, d = 2, 8
    first = torch.randn(batch, heads, 4, d, generator=g).to(dtype)
    store = MixedStore(first, first)
    ref_k: list[list[torch.Tensor]] = [[] for _ in range(batch)]  # per row, per slot [heads, d]
    for step in range(60):
        op = rng.integers(3) if store.slots else 0
        if op == 0:
            n = int(rng.integers(1, 4))
            k = torch.randn(batch, heads, n, d, generator=g).to(dtype)
            store.append(k, -k)
            for b in range(batch):
                ref_k[b].extend(k[b, :, i] for i in range(n))
        elif op == 1:
            mask = rng.random((batch, store.slots)) < 0.4
            before = store.is_q.copy()
            store.demote(mask)
            for b in range(batch):
                for i in np.flatnonzero(mask[b] & ~before[b]):
                    q, s = quantize(ref_k[b][i])
                    ref_k[b][i] = dequantize(q, s, dtype)
        else:
            keep_n = int(rng.integers(1, store.slots + 1))
            keep = np.stack([np.sort(rng.choice(store.slots, keep_n, replace=False)) for _ in range(batch)])
            store.keep(keep)
            ref_k = [[ref_k[b][i] for i in keep[b]] for b in range(batch)]
        keys, values = store.read()
        want = torch.stack([torch.stack(r, 1) for r in ref_k])
        assert torch.equal(keys, want), f"step {step}"
        assert torch.equal(values, -want), f"step {step}"
        # the stores hold no dropped entry: at most one row's worth of padding per store
        q_rows = store.int8_slots
        assert store.q_k.shape[2] == q_rows.max(initial=0)
        assert store.full_k.shape[2] == (store.slots - q_rows).max(initial=0)


def test_full_slots_fill_the_byte_budget():
    assert full_slots(1000, 10, 100, 30) == 10  # everything fits at full precision
    assert full_slots(1000, 20, 100, 30) == 5  # 5 * 100 + 15 * 30 = 950 <= 1000
    assert full_slots(1000, 40, 100, 30) == 0
    for slots in range(1, 40):
        n = full_slots(1000, slots, 100, 30)
        if 0 < n < slots:
            assert n * 100 + (slots - n) * 30 <= 1000 < (n + 1) * 100 + (slots - n - 1) * 30


def test_int8_policies_are_checked():
    with pytest.raises(cw.ConfigError) as e:
        KvPolicy(int8=True)
    assert e.value.parameter == "int8"
    with pytest.raises(cw.ConfigError) as e:
        KvPolicy(budget=8, int8="yes")
    assert e.value.parameter == "int8"
    # 10 tokens of 256 bytes at full precision cannot hold sinks + window = 12 of them
    pol = KvPolicy(sinks=2, window=10, budget_bytes=2560, int8=True)
    with pytest.raises(cw.ConfigError, match="sinks"):
        pol.tokens(256, 96)
    # the token budget is what fits when all but sinks + window are int8
    assert KvPolicy(sinks=2, window=2, budget=10, int8=True).tokens(256, 96).budget == 4 + (6 * 256) // 96


def stream(model, policy, ids, chunk=4):
    """Teacher-forced stream through a PolicyCache: (cache, logits of every position)."""
    cache = PolicyCache(policy, model.config)
    out = []
    with torch.inference_mode():
        for s in range(0, ids.shape[1], chunk):
            c = ids[:, s : s + chunk]
            hard_first = np.linspace(1, 0, c.numel(), dtype=np.float32).reshape(c.shape)
            cache.set_difficulty(hard_first)
            pos = torch.arange(s, s + c.shape[1])[None].expand(ids.shape[0], -1)
            out.append(model(input_ids=c, position_ids=pos, cache=cache, use_cache=True).logits)
    return cache, torch.cat(out, 1)


def test_the_cache_keeps_its_byte_budget_and_the_best_ranked_slots_full():
    model = tiny_model("llama", max_position_embeddings=512)
    ids = torch.randint(3, VOCAB, (1, 200), generator=torch.Generator().manual_seed(2))
    policy = KvPolicy(sinks=2, window=8, budget=40, slack=3, difficulty_weight=1.0, int8=True)
    cache, _ = stream(model, policy, ids)
    evict_only, _ = stream(model, dataclasses.replace(policy, int8=False), ids)
    budget = 40 * cache.full_bytes
    # bytes never pass the budget by more than slack tokens and the newest chunk, at full precision
    assert cache.peak_bytes <= budget + (policy.slack + 4) * cache.full_bytes
    assert cache.nbytes <= budget + (policy.slack + 4) * cache.full_bytes
    assert evict_only.peak_bytes >= 40 * cache.full_bytes  # the same bytes ...
    assert len(cache.ledger) > 2 * len(evict_only.ledger)  # ... hold many more tokens
    assert cache.quantized > 0
    # the slots at full precision are the ledger's best-ranked ones (sinks, window, then the
    # hardest), except the newest, not yet ranked
    mixed = cache.policy_layer(0).mixed
    held_full = ~mixed.is_q[0]
    n_full = int(held_full.sum())
    best = cache.ledger.full_precision(n_full)[0]
    assert (held_full[:-4] == best[:-4]).mean() > 0.9
    cols = cache.ledger.columns()[0]
    assert held_full[:2].all() and cols[0] == 0  # the sinks stay full


def test_attention_reads_the_dequantized_slots():
    """The next forward through the int8 cache equals the same forward through a plain cache
    holding exactly what read() returns."""
    from transformers import DynamicCache

    model = tiny_model("llama", max_position_embeddings=512)
    ids = torch.randint(3, VOCAB, (1, 120), generator=torch.Generator().manual_seed(3))
    policy = KvPolicy(sinks=2, window=4, budget=30, slack=0, difficulty_weight=1.0, int8=True)
    cache, _ = stream(model, policy, ids)
    cache.prepare()  # the eviction / int8 step the next forward starts with, now
    plain = DynamicCache()
    for i in range(len(cache.layers)):
        k, v = cache.policy_layer(i).mixed.read()
        plain.update(k.clone(), v.clone(), i)
    assert cache.quantized > 0
    nxt, pos = ids[:, -1:], torch.tensor([[ids.shape[1]]])
    with torch.inference_mode():
        mask = cache.forward_mask(torch.ones_like(nxt))
        a = model(input_ids=nxt, position_ids=pos, attention_mask=mask, cache=cache, use_cache=True).logits
        b = model(
            input_ids=nxt, position_ids=pos, attention_mask=torch.ones(1, plain.get_seq_length() + 1),
            cache=plain, use_cache=True,
        ).logits  # fmt: skip
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_a_budget_that_fits_everything_changes_nothing():
    model = tiny_model("llama", max_position_embeddings=256)
    ids, mask = ragged_prompt(batch=3, seq=12)
    full = cw.generate(model, ids, mask, max_new_tokens=30)
    roomy = KvPolicy(sinks=1, window=4, budget=100, slack=2, difficulty_weight=1.0, int8=True)
    out = cw.generate(model, ids, mask, max_new_tokens=30, policy=roomy)
    assert torch.equal(out.sequences, full.sequences) and out.cache.quantized == 0


@pytest.mark.parametrize(
    "policy",
    [
        KvPolicy(sinks=2, window=6, budget=12, slack=2),
        KvPolicy.heavy_hitters(12, recent=4, sinks=1, slack=2),
        KvPolicy.difficulty_aware(12, 4, sinks=1, slack=2),
    ],
    ids=["sinks", "h2o", "difficulty"],
)
def test_int8_composes_with_every_policy_in_generation(policy):
    """At the bytes of the evict-only budget, the int8 variant keeps more tokens and evicts
    fewer times, in chunkwise.generate and in transformers' generate."""
    model = tiny_model("llama", max_position_embeddings=256)
    ids, mask = ragged_prompt(batch=2, seq=12)
    evict = cw.generate(model, ids, mask, max_new_tokens=40, policy=policy)
    q = cw.generate(model, ids, mask, max_new_tokens=40, policy=dataclasses.replace(policy, int8=True))
    assert q.cache.quantized > 0
    assert len(q.cache.ledger) > len(evict.cache.ledger)
    assert q.cache.evictions < evict.cache.evictions
    int8_policy = dataclasses.replace(policy, int8=True)
    cache = PolicyCache(int8_policy, model.config, mask)
    with cw.kv.track_attention(model):
        model.generate(
            ids, attention_mask=mask, cache=cache, max_new_tokens=40, do_sample=False, pad_token_id=0
        )
    assert cache.quantized > 0 and len(cache.ledger) > len(evict.cache.ledger)


def test_sinks_and_window_are_never_int8():
    """StreamingLLM's budget is its sinks + window: no room for int8 tokens, so the int8
    variant is the evict-only cache, token for token."""
    model = tiny_model("llama", max_position_embeddings=256)
    ids, mask = ragged_prompt(batch=2, seq=12)
    policy = KvPolicy.streaming(sinks=2, window=6, slack=2)
    evict = cw.generate(model, ids, mask, max_new_tokens=30, policy=policy)
    q = cw.generate(model, ids, mask, max_new_tokens=30, policy=dataclasses.replace(policy, int8=True))
    assert q.cache.quantized == 0
    assert torch.equal(q.sequences, evict.sequences)


def test_peak_bytes_of_a_one_precision_cache_is_its_largest_nbytes():
    model = tiny_model("llama", max_position_embeddings=256)
    ids, mask = ragged_prompt(batch=2, seq=12)
    seen = []
    out = cw.generate(
        model, ids, mask, max_new_tokens=20, policy=KvPolicy.sliding_window(10, slack=3),
        streamer=lambda step: seen.append(0),
    )  # fmt: skip
    cache = out.cache
    assert cache.peak_bytes == cache.peak_slots * cache.full_bytes * 2
    assert cache.peak_bytes >= cache.nbytes > 0
