"""PolicyCache: same tokens as DynamicCache under the full policy, exact agreement with a
masked full-attention replay under evicting policies (ragged batches), the evicted sets, flat
memory over 10,000 decode steps, heavy-hitter scores, and errors for bad policies."""

from __future__ import annotations

import chunkwise as cw
import numpy as np
import pytest
import torch
from chunkwise.kv import KvPolicy, PolicyCache

from tests.oracles.kv import cached_decode, masked_replay
from tests.support.peft_helpers import VOCAB, ragged_prompt, tiny_model


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
@pytest.mark.parametrize(
    ("arch", "kwarg"), [("llama", "cache"), ("qwen2", "cache"), ("llama", "past_key_values")]
)
def test_full_policy_generates_what_dynamic_cache_generates(arch, kwarg):
    model = tiny_model(arch, max_position_embeddings=256)
    ids, mask = ragged_prompt()
    kw = dict(attention_mask=mask, max_new_tokens=40, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        ref = model.generate(ids, **kw)
        cache = PolicyCache(KvPolicy.full(), model.config, mask)
        got = model.generate(ids, **{kwarg: cache}, **kw)
    assert torch.equal(got, ref)
    assert cache.seen == ids.shape[1] + 39  # the cache was the one generate used


POLICIES = {
    "window": KvPolicy.sliding_window(6, slack=0),
    "sinks+window": KvPolicy(sinks=2, window=5, budget=9, slack=2),
    "h2o": KvPolicy.heavy_hitters(10, recent=3, sinks=1, slack=2),
    "difficulty": KvPolicy.difficulty_aware(10, recent=3, sinks=1, slack=3),
    "mixed": KvPolicy(sinks=1, window=2, budget=8, slack=1, attention_weight=0.5, difficulty_weight=1.0),
}


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_evicting_cache_equals_masked_full_attention(name):
    """Every decode step's logits equal a full forward whose mask hides exactly what the cache
    evicted: positions (RoPE after eviction), padding and the slot layout are all right."""
    policy = POLICIES[name]
    model = tiny_model("llama", max_position_embeddings=256)
    ids, mask = ragged_prompt()
    seq, m, held, step_logits, cache = cached_decode(model, ids, mask, policy, steps=30, difficulty_seed=7)
    assert cache.evictions > 0
    replay = masked_replay(model, seq, m, ids.shape[1], held)
    for i, logits in enumerate(step_logits):
        torch.testing.assert_close(logits, replay[:, ids.shape[1] + i], rtol=1e-5, atol=1e-5)
    # And the replay differs from unmasked attention, so the comparison has teeth.
    with torch.no_grad():
        plain = model(input_ids=seq, attention_mask=m).logits
    assert (plain[:, -1] - replay[:, -1]).abs().max() > 1e-3


class ReferenceRow:
    """One row of an unscored cache, from the definition: before each forward, if more than
    ``budget + slack`` columns are held, keep ``budget``: the first ``sinks`` real columns and
    the newest real ones — or, with fewer real columns than that, all of them behind the newest
    padding columns."""

    def __init__(self, policy: KvPolicy, pad: int, prompt: int) -> None:
        self.policy, self.pad = policy, pad
        self.held = list(range(prompt))

    def forward(self, column: int) -> list[int]:
        budget, sinks = self.policy.budget, self.policy.sinks
        if len(self.held) > budget + self.policy.slack:
            real = [c for c in self.held if c >= self.pad]
            pads = [c for c in self.held if c < self.pad]
            if len(real) <= budget:
                self.held = pads[len(pads) - (budget - len(real)) :] + real
            else:
                self.held = real[:sinks] + real[len(real) - (budget - sinks) :]
        self.held.append(column)
        return self.held


@pytest.mark.parametrize(
    "policy",
    [
        KvPolicy.sliding_window(7, slack=3),
        KvPolicy.streaming(3, 6, slack=2),
        KvPolicy.streaming(2, 3, slack=0),
    ],
)
def test_evicted_sets_match_reference(policy):
    model = tiny_model("llama", max_position_embeddings=256)
    ids, mask = ragged_prompt(seq=6)
    _, _, held, _, cache = cached_decode(model, ids, mask, policy, steps=25)
    rows = [ReferenceRow(policy, 2 * b, ids.shape[1]) for b in range(3)]
    for i, cols in enumerate(held):
        for b, row in enumerate(rows):
            assert cols[b].tolist() == row.forward(ids.shape[1] + i), (i, b)
    assert cache.evictions > 0


@pytest.mark.parametrize(
    "policy", [KvPolicy.sliding_window(48, slack=16), KvPolicy.streaming(4, 44, slack=16)]
)
def test_memory_stays_flat_over_ten_thousand_decode_steps(policy, one_torch_thread):
    model = tiny_model("llama", hidden=16, max_position_embeddings=16384)
    ids, mask = ragged_prompt(batch=2, seq=10)
    from chunkwise.kv.cache import GROW_SLOTS

    sizes, allocated = [], []
    run = cw.stream(model, ids, mask, max_new_tokens=10_000, policy=policy, pad_token_id=0)
    for i, _ in enumerate(run):
        if i % 500 == 0:
            sizes.append(sum(layer.keys.numel() + layer.values.numel() for layer in run.cache.layers))
            allocated.append(
                sum(layer.key_buffer.numel() + layer.value_buffer.numel() for layer in run.cache.layers)
            )
    assert i == 9_999
    cap = (
        2 * len(run.cache.layers) * 2 * 2 * 4 * (policy.budget + policy.slack + 1)
    )  # K+V, batch, heads, head_dim
    assert max(sizes) <= cap
    # what the buffers hold stays flat too: the held slots plus at most GROW_SLOTS of room
    assert max(allocated) <= cap * (policy.budget + policy.slack + 1 + GROW_SLOTS) / (
        policy.budget + policy.slack + 1
    )
    assert allocated[-1] == allocated[1]
    assert run.cache.peak_slots <= policy.budget + policy.slack + 1
    cols = run.cache.ledger.columns()
    assert cols.shape[1] <= policy.budget + policy.slack
    assert cols[0, -1] == 10 + 9_999 - 1  # the newest processed column is held
    if policy.sinks:
        held = cols[1][cols[1] >= 0]  # -1: dead slots in front (row 1 evicts on its own clock)
        assert held[: policy.sinks].tolist() == [2, 3, 4, 5]  # row 1's first real tokens (2 pads)


def test_heavy_hitter_scores_are_attention_mass():
    """With scoring attention, each forward adds layers x heads x queries of probability mass
    per sequence (every attention row sums to 1)."""
    model = tiny_model("llama")
    ids = torch.randint(3, VOCAB, (2, 9))
    cache = PolicyCache(KvPolicy.heavy_hitters(64, 8), model.config)
    with torch.no_grad(), cw.kv.track_attention(model):
        model(input_ids=ids, cache=cache)
        model(input_ids=ids[:, :1], cache=cache)
    assert model.config._attn_implementation != cw.kv.attention.SCORING_ATTENTION
    # The scores of a forward reach the books when the next forward starts: one more (untracked)
    # step hands over the second forward's scores and adds one slot of its own, with no score.
    with torch.no_grad():
        model(input_ids=ids[:, :1], cache=cache)
    scores = cache.ledger.scores()
    layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    np.testing.assert_allclose(scores.sum(1), layers * heads * (9 + 1), rtol=1e-5)
    assert (scores[:, :-1] > 0).all()


def test_attention_policy_without_tracking_is_an_error():
    model = tiny_model("llama")
    ids = torch.randint(3, VOCAB, (1, 5))
    cache = PolicyCache(KvPolicy.heavy_hitters(4, 2, slack=0), model.config)
    with torch.no_grad():
        model(input_ids=ids, cache=cache)
        with pytest.raises(cw.StateError, match="track_attention"):
            model(input_ids=ids[:, :1], cache=cache)


def test_byte_budget_becomes_tokens():
    model = tiny_model("llama")  # 2 layers, 2 kv heads, head_dim 8, float32
    per_token = 2 * 2 * 2 * 8 * 4
    cache = PolicyCache(KvPolicy(window=4, budget_bytes=10 * per_token + 5), model.config)
    with torch.no_grad():
        model(input_ids=torch.randint(3, VOCAB, (1, 3)), cache=cache)
    assert cache.policy.budget == 10 and cache.policy.budget_bytes is None
    assert cache.bytes_per_token == per_token
    tight = PolicyCache(KvPolicy(window=4, budget_bytes=3 * per_token), model.config)
    with pytest.raises(cw.ConfigError, match="budget_bytes"), torch.no_grad():
        model(input_ids=torch.randint(3, VOCAB, (1, 3)), cache=tight)


@pytest.mark.parametrize(
    ("make", "param"),
    [
        (lambda: KvPolicy(sinks=4, window=8, budget=10), "budget"),
        (lambda: KvPolicy(window=-1, budget=10), "window"),
        (lambda: KvPolicy(sinks=2), "budget"),
        (lambda: KvPolicy(budget=0), "budget"),
        (lambda: KvPolicy(budget=8, attention_weight=-1.0), "attention_weight"),
        (lambda: KvPolicy(budget=8, budget_bytes=100), "budget_bytes"),
        (lambda: KvPolicy.named("lru", 64), "kind"),
        (lambda: KvPolicy.named("window"), "budget"),
        (lambda: KvPolicy.named("sinks", 2, sinks=4), "budget"),
        (lambda: KvPolicy.streaming(8, -3), "window"),
    ],
)
def test_bad_policies_name_their_parameter(make, param):
    with pytest.raises(cw.ConfigError) as e:
        make()
    assert e.value.parameter == param
    assert param in str(e.value)


def test_unsupported_uses_are_clear_errors():
    model = tiny_model("llama")
    ids = torch.randint(3, VOCAB, (2, 5))
    right = torch.ones_like(ids)
    right[0, -2:] = 0
    with pytest.raises(cw.InputError, match="left"):
        PolicyCache(KvPolicy.full(), model.config, right)
    with pytest.raises(cw.InputError, match="config"):
        PolicyCache(KvPolicy.full())
    cache = PolicyCache(KvPolicy.full(), model.config)
    with pytest.raises(cw.StateError, match="beam"), torch.no_grad():
        model.generate(ids, num_beams=2, max_new_tokens=3, cache=cache, pad_token_id=0)


@pytest.mark.parametrize(
    ("build", "param"),
    [
        (lambda cfg: PolicyCache("sinks", cfg), "policy"),  # AttributeError at the first forward before
        (lambda cfg: PolicyCache(None, cfg, [[1, 1]]), "attention_mask"),  # AttributeError before
        (lambda cfg: PolicyCache(None, cfg, torch.full((1, 3), 2)), "attention_mask"),  # read as 1s before
        (lambda cfg: PolicyCache(None, cfg).set_difficulty("x"), "difficulty"),  # ValueError before
    ],
)
def test_bad_cache_arguments_are_chunkwise_errors(build, param):
    with pytest.raises(cw.ChunkwiseError) as e:
        build(tiny_model("llama").config)
    assert e.value.parameter == param


def test_decode_steps_write_into_room_and_survive_a_replaced_tensor():
    """A decode step writes its token into the layer's buffer (no copy of the held slots), the
    buffer grows by GROW_SLOTS at a time, and a layer whose keys were replaced behind the cache
    (transformers' offloading does that) goes on correctly."""
    from chunkwise.kv.cache import GROW_SLOTS

    model = tiny_model("llama", max_position_embeddings=512)
    ids, mask = ragged_prompt()
    steps = GROW_SLOTS + 40
    kw = dict(attention_mask=mask, max_new_tokens=steps, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        ref = model.generate(ids, **kw)
    run = cw.stream(model, ids, mask, max_new_tokens=steps, pad_token_id=0)
    layer = run.cache.layers[0]
    buffers: list[torch.Tensor] = []  # held, so no address is reused
    tokens = []
    for i, step in enumerate(run):
        tokens.append(step.tokens)
        assert layer.keys.data_ptr() == layer.key_buffer.data_ptr()
        if not buffers or layer.key_buffer is not buffers[-1]:
            buffers.append(layer.key_buffer)
        if i == 10:  # replaced, as offload() / prefetch() would
            for lay in run.cache.layers:
                lay.keys, lay.values = lay.keys.clone(), lay.values.clone()
    assert torch.equal(torch.stack(tokens, 1), ref[:, ids.shape[1] :])
    # one buffer from the prompt, one after the replacement, one when the room ran out
    assert len(buffers) == 3
    assert layer.key_buffer.shape[-2] - layer.keys.shape[-2] <= GROW_SLOTS
