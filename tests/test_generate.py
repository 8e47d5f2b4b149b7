"""chunkwise.generate / stream: parity with transformers' greedy generate (plain model, and a
ChunkwiseModel at the top rung = PEFT, at rank 0 = base), chunked prefill, streaming, EOS, KV
policies inside generation, and errors."""

from __future__ import annotations

import copy

import chunkwise as cw
import numpy as np
import pytest
import torch
from chunkwise.kv import KvPolicy

from tests.support.peft_helpers import (
    VOCAB,
    all_top_scheduler,
    make_adapter,
    ragged_prompt,
    switching_scheduler,
    tiny_model,
)


def hf_greedy(model, ids, mask, n):
    with torch.no_grad():
        return model.generate(
            ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None
        )


@pytest.mark.parametrize("chunk", [None, 1, 4, 512])
def test_plain_model_matches_transformers_generate(chunk):
    model = tiny_model("llama", max_position_embeddings=256)
    ids, mask = ragged_prompt()
    out = cw.generate(model, ids, mask, max_new_tokens=25, prefill_chunk=chunk)
    assert torch.equal(out.sequences, hf_greedy(model, ids, mask, 25))
    assert (out.ranks == -1).all() and out.prefill_ranks == []


@pytest.fixture
def adapted(tmp_path):
    base = tiny_model("llama", max_position_embeddings=256)
    pm = make_adapter(base, tmp_path / "a", seed=3, target_modules=["q_proj", "v_proj", "down_proj"])
    ladder = cw.RankLadder.from_peft(tmp_path / "a")
    return base, pm, ladder


def test_top_rung_generation_is_peft_generation(adapted):
    base, pm, ladder = adapted
    cwm = cw.inject(copy.deepcopy(base), ladder, all_top_scheduler(ladder.max_rank))
    ids, mask = ragged_prompt()
    out = cw.generate(cwm, ids, mask, max_new_tokens=20, prefill_chunk=5)
    assert torch.equal(out.sequences, hf_greedy(pm, ids, mask, 20))
    assert (out.ranks == ladder.max_rank).all()
    assert out.prefill_ranks == [ladder.max_rank] * len(out.prefill_ranks) and len(out.prefill_ranks) > 1
    assert not torch.equal(out.sequences, hf_greedy(base, ids, mask, 20))  # the adapter matters


def test_rank_zero_generation_is_base_generation(adapted):
    base, _, ladder = adapted
    cfg = cw.SchedulerConfig(
        rungs=(0, ladder.max_rank), thresholds=(1.0,), min_len=4, max_len=8, granularity=1
    )
    cwm = cw.inject(copy.deepcopy(base), ladder, cw.Scheduler(cfg))
    ids, mask = ragged_prompt()
    out = cw.generate(cwm, ids, mask, max_new_tokens=20)
    assert torch.equal(out.sequences, hf_greedy(base, ids, mask, 20))
    assert (out.ranks == 0).all()


def test_adaptive_generation_changes_rank_within_the_ladder(adapted):
    base, _, ladder = adapted
    ids, mask = ragged_prompt()

    def run(thresholds):
        cwm = cw.inject(copy.deepcopy(base), ladder, switching_scheduler(thresholds))
        return cw.generate(cwm, ids, mask, max_new_tokens=40, temperature=1.5, seed=1)

    # A random tiny model is uncertain everywhere: put the thresholds inside its difficulty range.
    probe = run((0.3, 0.6))
    out = run(tuple(float(q) for q in np.percentile(probe.difficulty, [33, 66])))
    assert set(np.unique(out.ranks)) <= {0, 2, 4}
    assert len(np.unique(out.ranks)) > 1
    assert ((out.difficulty >= 0) & (out.difficulty <= 1)).all()


def test_chunked_prefill_bounds_the_forward_length(adapted):
    base, _, ladder = adapted
    cwm = cw.inject(copy.deepcopy(base), ladder)
    ids, mask = ragged_prompt(seq=23)  # rows padded by 0, 2, 4
    lengths = []
    hook = cwm.model.model.embed_tokens.register_forward_pre_hook(lambda m, a: lengths.append(a[0].shape[1]))
    cw.generate(cwm, ids, mask, max_new_tokens=3, prefill_chunk=6)
    hook.remove()
    # chunks counted back from the prompt's end (each row is cut where it would be alone): 23
    # columns = 5 + 6 + 6 + 6, then 2 decode steps; no forward is longer than the chunk
    assert lengths == [5, 6, 6, 6, 1, 1]


def test_stream_yields_each_step_and_generate_calls_the_streamer():
    model = tiny_model("llama", max_position_embeddings=256)
    ids, mask = ragged_prompt()
    seen = []
    out = cw.generate(model, ids, mask, max_new_tokens=7, streamer=seen.append)
    assert len(seen) == 7
    assert torch.equal(torch.stack([s.tokens for s in seen], 1), out.new_tokens)
    run = cw.stream(model, ids, mask, max_new_tokens=1000)
    first = [s.tokens for _, s in zip(range(3), run, strict=False)]
    assert torch.equal(torch.stack(first, 1), out.new_tokens[:, :3])


def test_eos_stops_a_sequence_and_pads_it():
    model = tiny_model("llama", max_position_embeddings=256)
    ids, mask = ragged_prompt()
    free = cw.generate(model, ids, mask, max_new_tokens=12)
    eos = int(free.new_tokens[0, 2])
    out = cw.generate(model, ids, mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=VOCAB - 1)
    first = int((free.new_tokens[0] == eos).nonzero()[0])
    assert (out.new_tokens[0, first + 1 :] == VOCAB - 1).all()
    assert torch.equal(out.new_tokens[0, : first + 1], free.new_tokens[0, : first + 1])


@pytest.mark.parametrize(
    "policy",
    [
        KvPolicy.heavy_hitters(12, recent=4, sinks=1, slack=2),
        KvPolicy.difficulty_aware(12, 4, sinks=1, slack=2),
    ],
)
def test_scored_policies_run_inside_generate(adapted, policy):
    base, _, ladder = adapted
    cwm = cw.inject(copy.deepcopy(base), ladder)
    ids, mask = ragged_prompt()
    impl = cwm.model.config._attn_implementation
    out = cw.generate(cwm, ids, mask, max_new_tokens=30, policy=policy)
    assert out.cache.evictions > 0
    # a row over budget + slack is cut back when the next forward starts: at most one decode
    # token sits on top once the last forward has run
    assert len(out.cache.ledger) <= policy.budget + policy.slack + 1
    assert cwm.model.config._attn_implementation == impl


def test_generate_names_what_it_cannot_take():
    model = tiny_model("llama")
    ids = torch.randint(3, VOCAB, (1, 4))
    for call, param in [
        (lambda: cw.generate(3, ids), "model"),  # AttributeError before
        (lambda: cw.generate(model, ids, adapters=[0]), "adapters"),  # silently ignored before
        (lambda: cw.generate(model, ids, max_new_token=3), "max_new_token"),  # TypeError before
    ]:
        with pytest.raises(cw.InputError) as e:
            call()
        assert e.value.parameter == param


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"prefill_chunk": 0}, "prefill_chunk"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"attention_mask": torch.full((1, 4), 2)}, "attention_mask"),  # 2s used to shift positions
        ({"attention_mask": torch.full((1, 4), 0.5)}, "attention_mask"),
        # found by the fuzzer: each raised TypeError, AttributeError, RuntimeError, OverflowError
        ({"policy": "sinks"}, "policy"),
        ({"pad_token_id": -1}, "pad_token_id"),
        ({"pad_token_id": VOCAB}, "pad_token_id"),
        ({"pad_token_id": b"\x00"}, "pad_token_id"),
        ({"eos_token_id": 2**40}, "eos_token_id"),
        ({"seed": {"a": 1}}, "seed"),
        ({"seed": -1}, "seed"),
        ({"top_k": True}, "top_k"),
        ({"prefill_chunk": True}, "prefill_chunk"),
        ({"max_new_tokens": 2**70}, "max_new_tokens"),
        ({"temperature": float("inf")}, "temperature"),
        ({"temperature": 10**400}, "temperature"),  # OverflowError converting to float
        ({"temperature": "0.5"}, "temperature"),
        ({"score_prompt": "yes"}, "score_prompt"),
    ],
)
def test_bad_generation_options(kwargs, param):
    model = tiny_model("llama")
    ids = torch.randint(3, VOCAB, (1, 4))
    with pytest.raises(cw.InputError) as e:
        cw.generate(model, ids, **kwargs)
    assert e.value.parameter == param


@pytest.mark.parametrize("temperature", [1e-45, 2**70, 1e308])
def test_extreme_temperatures_sample_vocabulary_ids(temperature):
    """A tiny temperature used to give NaN probabilities (inf logits), a huge int an
    OverflowError; a tiny one now samples the argmax."""
    model = tiny_model("llama")
    ids = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    out = cw.generate(model, ids, max_new_tokens=3, temperature=temperature, seed=1)
    new = out.sequences[:, 5:]
    assert ((new >= 0) & (new < VOCAB)).all()
    if temperature < 1:
        assert torch.equal(new, cw.generate(model, ids, max_new_tokens=3).sequences[:, 5:])


def test_a_float_mask_of_zeros_and_ones_is_a_mask():
    model = tiny_model("llama", max_position_embeddings=256)
    ids, mask = ragged_prompt()
    want = cw.generate(model, ids, mask, max_new_tokens=3)
    got = cw.generate(model, ids, mask.float(), max_new_tokens=3)
    assert torch.equal(got.sequences, want.sequences)


def test_a_generation_runs_once():
    """Iterating a Generation again used to continue from its used cache with other tokens."""
    model = tiny_model("llama")
    run = cw.stream(model, torch.randint(3, VOCAB, (1, 4)), max_new_tokens=3)
    assert len(list(run)) == 3
    with pytest.raises(cw.StateError, match="already iterated"):
        list(run)


def test_bad_prompts():
    model = tiny_model("llama")
    ids = torch.randint(3, VOCAB, (2, 4))
    with pytest.raises(cw.InputError, match="left"):
        cw.generate(model, ids, torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]))
    with pytest.raises(cw.InputError, match="no real token"):
        cw.generate(model, ids, torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1]]))
    with pytest.raises(cw.InputError, match="input_ids"):
        cw.generate(model, ids.float())
    # found by the fuzzer: IndexError / RuntimeError from inside the model before
    for bad, match in [
        (ids.bool(), "bool"),
        (ids[:0], "batch is empty"),
        (torch.full((1, 3), VOCAB), "vocabulary"),
        (torch.full((1, 3), -1), "vocabulary"),
    ]:
        with pytest.raises(cw.InputError, match=match) as e:
            cw.generate(model, bad, max_new_tokens=1)
        assert e.value.parameter == "input_ids"
    # padding columns are embedded too: an out-of-vocabulary id there is refused as well
    with pytest.raises(cw.InputError, match="padding included"):
        cw.generate(model, torch.tensor([[-5, 7, 8]]), torch.tensor([[0, 1, 1]]), max_new_tokens=1)


def test_prefill_difficulty_in_the_cache_is_the_predicting_entropy():
    """A plain model's chunked prefill books token t with the entropy of the logits at t - 1,
    under a policy that ranks by difficulty (other policies never read it, and the prompt's
    vocabulary projection is skipped)."""
    model = tiny_model("llama", max_position_embeddings=256)
    ids = torch.randint(3, VOCAB, (2, 11))
    policy = KvPolicy(budget=64, difficulty_weight=1.0)  # nothing evicted: columns stay put
    out = cw.generate(model, ids, max_new_tokens=2, prefill_chunk=3, policy=policy)
    with torch.no_grad():
        ent, _ = cw.torch_entropy_surprisal(model(input_ids=ids).logits)
    booked = out.cache.ledger.difficulty()
    np.testing.assert_allclose(booked[:, 1:11], ent[:, :10].numpy(), rtol=1e-5, atol=1e-6)
    assert (booked[:, 0] == 0).all()
    np.testing.assert_allclose(booked[:, 11], out.difficulty[:, 0], rtol=1e-6)


@pytest.mark.parametrize(
    "policy",
    [
        KvPolicy.streaming(2, 4),  # default slack 32: the case
        KvPolicy.sliding_window(5, slack=3),
        KvPolicy.heavy_hitters(8, recent=2, sinks=1, slack=4),
        KvPolicy.difficulty_aware(8, recent=2, sinks=1, slack=3, attention_weight=0.5),
        KvPolicy.full(),
    ],
    ids=["sinks-slack32", "window", "h2o", "difficulty", "full"],
)
@pytest.mark.parametrize("chunk", [None, 5], ids=["one-prefill-chunk", "prefill-chunks-of-5"])
def test_a_row_generates_in_a_ragged_batch_what_it_generates_alone(adapted, policy, chunk):
    """Eviction is decided per row and prefill chunks are cut where each row would cut them
    alone: each row's tokens and ranks equal that row run alone. With the batch evicting
    together, three of four rows used to generate other tokens."""
    base, _, ladder = adapted
    cwm = cw.inject(copy.deepcopy(base), ladder)
    g = torch.Generator().manual_seed(11)
    pads = [0, 3, 5, 9]
    ids = torch.randint(3, VOCAB, (4, 16), generator=g)
    mask = torch.ones_like(ids)
    for b, p in enumerate(pads):
        mask[b, :p] = 0
    ids = ids.masked_fill(mask == 0, 0)
    n = 48  # the longest row passes budget + slack = 38 real tokens; the padded ones later
    opts = dict(max_new_tokens=n, policy=policy, prefill_chunk=chunk)
    batch = cw.generate(cwm, ids, mask, **opts)
    if policy.budget is not None:
        assert batch.cache.evictions > 0
    for b, p in enumerate(pads):
        alone = cw.generate(cwm, ids[b : b + 1, p:], **opts)
        assert torch.equal(batch.sequences[b, 16:], alone.sequences[0, 16 - p :]), f"row {b}"
        np.testing.assert_array_equal(batch.ranks[b], alone.ranks[0], err_msg=f"row {b}")
        np.testing.assert_array_equal(_row_prefill_ranks(batch, mask, chunk, b), alone.prefill_token_ranks)
    if chunk is not None:
        assert len(batch.prefill_ranks) == 4  # 16 columns = 1 + 5 + 5 + 5, cut from the end


def _row_prefill_ranks(out, mask, chunk, b):
    """Row b's prompt ranks out of a batch's (listed chunk by chunk, row by row)."""
    t = mask.shape[1]
    bounds = [0, t] if chunk is None else [0, *range(t - chunk * ((t - 1) // chunk), t, chunk), t]
    pos, mine = 0, []
    for s, e in zip(bounds[:-1], bounds[1:], strict=True):
        counts = mask[:, s:e].sum(-1).tolist()
        start = pos + sum(counts[:b])
        mine.append(out.prefill_token_ranks[start : start + counts[b]])
        pos += sum(counts)
    return np.concatenate(mine)
