"""ChunkwiseModel.generate: transformers' own generate under the scheduler's ranks.

Oracles: chunkwise.generate (greedy tokens, ranks, difficulty, with and without KV policies),
and PEFT's own generate at the top rung (sampling, top-p, logits processors, stopping criteria,
streamers, return_dict_in_generate, several adapters in one batch), which must agree token for
token because the top rung reproduces PEFT."""

from __future__ import annotations

import copy

import chunkwise as cw
import numpy as np
import pytest
import torch
from chunkwise.kv import KvPolicy, PolicyCache
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from tests.support.peft_helpers import (
    VOCAB,
    all_top_scheduler,
    make_adapter,
    ragged_prompt,
    switching_scheduler,
    tiny_model,
)

GREEDY = dict(do_sample=False, pad_token_id=0, eos_token_id=None)


@pytest.fixture(scope="module")
def adapted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hfgen")
    base = tiny_model("llama", max_position_embeddings=256)
    pm = make_adapter(base, tmp / "a", seed=3, target_modules=["q_proj", "v_proj", "down_proj"])
    return base, pm, cw.RankLadder.from_peft(tmp / "a")


def adaptive(base, ladder, ids, mask):
    """A ChunkwiseModel whose greedy decode really switches rungs (thresholds put inside the
    random model's difficulty range, no hysteresis)."""

    def model(thresholds):
        return cw.inject(copy.deepcopy(base), ladder, switching_scheduler(thresholds, crossfade=1))

    probe = cw.generate(model((0.3, 0.6)), ids, mask, max_new_tokens=30, prefill_chunk=None)
    return model(tuple(float(q) for q in np.percentile(probe.difficulty, [33, 66])))


def hooks_of(module):
    return len(module._forward_hooks) + len(module._forward_pre_hooks)


@pytest.mark.parametrize(
    "policy",
    [
        None,
        KvPolicy.sliding_window(10, slack=3),
        KvPolicy.heavy_hitters(12, recent=4, sinks=1, slack=2),
        KvPolicy.difficulty_aware(12, 4, sinks=1, slack=2),
    ],
    ids=["full-dynamic-cache", "window", "h2o", "difficulty"],
)
def test_greedy_equals_chunkwise_generate_tokens_and_ranks(adapted, policy):
    base, _, ladder = adapted
    ids, mask = ragged_prompt(batch=3, seq=12)
    cwm = adaptive(base, ladder, ids, mask)
    ref = cw.generate(cwm, ids, mask, max_new_tokens=30, prefill_chunk=None, policy=policy)
    out = cwm.generate(ids, attention_mask=mask, max_new_tokens=30, policy=policy, **GREEDY)
    trace = cwm.last_trace
    assert torch.equal(out, ref.sequences)
    np.testing.assert_array_equal(trace.ranks, ref.ranks)
    np.testing.assert_allclose(trace.difficulty, ref.difficulty, atol=1e-6)
    np.testing.assert_array_equal(trace.prefill_token_ranks, ref.prefill_token_ranks)
    assert len(np.unique(trace.ranks)) > 1  # the ranks really change during decode
    assert trace.forwards == 30 and trace.hook_seconds > 0  # the prefill, then 29 decode steps
    if policy is not None:
        assert trace.cache.evictions > 0 and ref.cache.evictions == trace.cache.evictions
        assert np.array_equal(trace.cache.ledger.valid(), ref.cache.ledger.valid())
    assert hooks_of(cwm.model) == 0


def test_a_policy_cache_given_as_past_key_values(adapted):
    base, _, ladder = adapted
    ids, mask = ragged_prompt(batch=3, seq=12)
    cwm = adaptive(base, ladder, ids, mask)
    policy = KvPolicy.sliding_window(10, slack=3)
    ref = cw.generate(cwm, ids, mask, max_new_tokens=25, prefill_chunk=None, policy=policy)
    cache = PolicyCache(policy, cwm.model.config, mask, per_row=True)
    out = cwm.generate(ids, attention_mask=mask, max_new_tokens=25, past_key_values=cache, **GREEDY)
    assert torch.equal(out, ref.sequences)
    np.testing.assert_array_equal(cwm.last_trace.ranks, ref.ranks)
    assert cwm.last_trace.cache is cache and cache.evictions > 0


def test_eos_pads_and_ranks_match(adapted):
    base, _, ladder = adapted
    ids, mask = ragged_prompt(batch=3, seq=12)
    cwm = adaptive(base, ladder, ids, mask)
    free = cw.generate(cwm, ids, mask, max_new_tokens=15, prefill_chunk=None)
    eos = int(free.new_tokens[0, 3])
    ref = cw.generate(cwm, ids, mask, max_new_tokens=15, prefill_chunk=None, eos_token_id=eos, pad_token_id=1)
    out = cwm.generate(
        ids, attention_mask=mask, max_new_tokens=15, do_sample=False, eos_token_id=eos, pad_token_id=1
    )
    assert torch.equal(out, ref.sequences)
    np.testing.assert_array_equal(cwm.last_trace.ranks, ref.ranks)


class BanToken(LogitsProcessor):
    def __init__(self, token: int) -> None:
        self.token = token

    def __call__(self, input_ids, scores):
        scores[:, self.token] = -float("inf")
        return scores


class StopAfter(StoppingCriteria):
    def __init__(self, length: int) -> None:
        self.length = length

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, dtype=torch.bool)


class Collect(BaseStreamer):
    def __init__(self) -> None:
        self.chunks: list[torch.Tensor] = []

    def put(self, value):
        self.chunks.append(value.detach().clone())

    def end(self):
        self.chunks.append(torch.tensor([-1]))


def test_every_generate_option_at_the_top_rung_equals_peft(adapted):
    """Sampling with top-k / top-p and temperature, a logits processor, a stopping criterion,
    a streamer and the dict output: at the top rung the logits are PEFT's, so the same seed
    gives the same tokens as PEFT's own generate."""
    base, pm, ladder = adapted
    cwm = cw.inject(copy.deepcopy(base), ladder, all_top_scheduler(ladder.max_rank))
    ids, mask = ragged_prompt(batch=3, seq=12)
    banned = int(torch.argmax(pm(input_ids=ids, attention_mask=mask).logits[0, -1]))
    opts = dict(
        attention_mask=mask,
        max_new_tokens=30,
        do_sample=True,
        temperature=0.9,
        top_k=20,
        top_p=0.9,
        pad_token_id=0,
        eos_token_id=None,
        logits_processor=LogitsProcessorList([BanToken(banned)]),
        stopping_criteria=StoppingCriteriaList([StopAfter(12 + 17)]),
        return_dict_in_generate=True,
        output_scores=True,
    )
    torch.manual_seed(5)
    with torch.no_grad():
        want = pm.generate(input_ids=ids, **opts)
    streamer = Collect()
    torch.manual_seed(5)
    got = cwm.generate(ids, streamer=streamer, **opts)
    assert type(got) is type(want)
    assert torch.equal(got.sequences, want.sequences)
    assert got.sequences.shape[1] == 12 + 17  # the stopping criterion ended it
    assert not (got.sequences[:, 12:] == banned).any()
    assert len(got.scores) == 17
    assert (cwm.last_trace.ranks == ladder.max_rank).all() and cwm.last_trace.ranks.shape == (3, 17)
    streamed = torch.cat([c.reshape(3, -1) for c in streamer.chunks[:-1]], 1)
    assert torch.equal(streamed, got.sequences)


def test_sampling_runs_adaptive_ranks(adapted):
    base, _, ladder = adapted
    ids, mask = ragged_prompt(batch=3, seq=12)
    cwm = adaptive(base, ladder, ids, mask)
    torch.manual_seed(0)
    a = cwm.generate(
        ids, attention_mask=mask, max_new_tokens=30, do_sample=True, temperature=1.5, pad_token_id=0
    )
    ranks_a = cwm.last_trace.ranks
    torch.manual_seed(0)
    b = cwm.generate(
        ids, attention_mask=mask, max_new_tokens=30, do_sample=True, temperature=1.5, pad_token_id=0
    )
    assert torch.equal(a, b) and np.array_equal(ranks_a, cwm.last_trace.ranks)
    assert set(np.unique(ranks_a)) <= {0, 2, 4} and len(np.unique(ranks_a)) > 1


def test_several_adapters_by_name_equal_peft_mixed_batch(tmp_path):
    base = tiny_model("llama", max_position_embeddings=256)
    make_adapter(base, tmp_path / "sql", seed=1, target_modules=["q_proj", "v_proj"])
    make_adapter(base, tmp_path / "chat", seed=2, target_modules=["q_proj", "v_proj"])
    from peft import PeftModel

    pm = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "sql", adapter_name="sql")
    pm.load_adapter(tmp_path / "chat", adapter_name="chat")
    ids, mask = ragged_prompt(batch=3, seq=10)
    names = ["chat", "sql", "chat"]
    with torch.no_grad():
        want = pm.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=12, adapter_names=names, **GREEDY
        )
    top = max(cw.RankLadder.from_peft(tmp_path / n).max_rank for n in ("sql", "chat"))
    cwm = cw.inject(pm, scheduler=all_top_scheduler(top))
    got = cwm.generate(ids, attention_mask=mask, max_new_tokens=12, adapters=names, **GREEDY)
    assert torch.equal(got, want)


def test_num_return_sequences_repeats_each_rows_adapter(adapted):
    base, _, ladder = adapted
    cwm = cw.inject(copy.deepcopy(base), ladder, all_top_scheduler(ladder.max_rank))
    ids, mask = ragged_prompt(batch=2, seq=8)
    torch.manual_seed(3)
    out = cwm.generate(
        ids, attention_mask=mask, max_new_tokens=6, do_sample=True, num_return_sequences=3, pad_token_id=0
    )
    assert out.shape == (6, 14) and cwm.last_trace.ranks.shape == (6, 6)
    assert torch.equal(out[:, :8], ids.repeat_interleave(3, 0))


@pytest.mark.parametrize(
    "kwargs, param",
    [
        (dict(num_beams=2), "num_beams"),
        (dict(prompt_lookup_num_tokens=3), "prompt_lookup_num_tokens"),
        (dict(prefill_chunk_size=4), "prefill_chunk_size"),
        (dict(use_cache=False), "use_cache"),
        (dict(inputs_embeds=torch.zeros(1, 4, 32)), "inputs_embeds"),
        (dict(policy="window"), "policy"),
        (dict(adapters=[0, 1]), "adapters"),
        (dict(adapters=["nope"]), "adapters"),
    ],
)
def test_what_cannot_work_is_refused_by_name(adapted, kwargs, param):
    base, _, ladder = adapted
    cwm = cw.inject(copy.deepcopy(base), ladder)
    ids = torch.randint(3, VOCAB, (1, 4))
    with pytest.raises(cw.InputError) as e:
        cwm.generate(ids, max_new_tokens=3, **kwargs)
    assert e.value.parameter == param and param in str(e.value)
    assert hooks_of(cwm.model) == 0
    cwm.generate(ids, max_new_tokens=3, **GREEDY)  # still usable


def test_bad_prompts_and_caches(adapted):
    base, _, ladder = adapted
    cwm = cw.inject(copy.deepcopy(base), ladder)
    ids, mask = ragged_prompt(batch=3, seq=8)
    with pytest.raises(cw.InputError, match="left-padded") as e:
        cwm.generate(ids, attention_mask=mask.flip(1), max_new_tokens=2)
    assert e.value.parameter == "attention_mask"
    with pytest.raises(cw.InputError, match="vocabulary"):
        cwm.generate(torch.full((1, 3), VOCAB), max_new_tokens=2)
    with pytest.raises(cw.InputError) as e:
        cwm.generate(ids.float(), max_new_tokens=2)
    assert e.value.parameter == "input_ids"
    used = PolicyCache(KvPolicy.full(), cwm.model.config, mask)
    cwm.generate(ids, attention_mask=mask, max_new_tokens=2, cache=used, **GREEDY)
    with pytest.raises(cw.InputError, match="already holds") as e:
        cwm.generate(ids, attention_mask=mask, max_new_tokens=2, cache=used, **GREEDY)
    unpadded = PolicyCache(KvPolicy.full(), cwm.model.config)
    with pytest.raises(cw.InputError, match="attention_mask") as e:
        cwm.generate(ids, attention_mask=mask, max_new_tokens=2, cache=unpadded, **GREEDY)
    assert e.value.parameter == "cache"
    with pytest.raises(cw.InputError, match="not both"):
        cwm.generate(ids, attention_mask=mask, max_new_tokens=2, cache=unpadded, policy=KvPolicy.full())
    assert hooks_of(cwm.model) == 0


def test_an_error_inside_generate_leaves_no_hook_and_no_plan(adapted):
    base, _, ladder = adapted
    cwm = cw.inject(copy.deepcopy(base), ladder)
    ids = torch.randint(3, VOCAB, (2, 5))

    class Boom(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        cwm.generate(ids, max_new_tokens=4, stopping_criteria=StoppingCriteriaList([Boom()]), **GREEDY)
    assert hooks_of(cwm.model) == 0
    # with no plan set, the wrapped model runs as the base model again
    with torch.no_grad():
        assert torch.equal(cwm.model(input_ids=ids).logits, base(input_ids=ids).logits)
