"""The rank-quality curve machinery on a tiny model: per-token NLL against PEFT, the energy
signal against dense truncations, greedy decoding against transformers' generate, and the
curves' invariants (uniform rows are the rung runs, oracle and random stay within budget,
every mode at the top budget is the full adapter)."""

from __future__ import annotations

import chunkwise as cw
import numpy as np
import pytest
import torch
from chunkwise.eval.curves import (
    MIX,
    SIGNALS,
    QaItem,
    answer_curves,
    generation_curves,
    spearman,
    summarize,
    window_items,
)
from chunkwise.eval.qa_runs import base_signals, first_adapted_layer, greedy_with_plan, token_nll

from tests.support.peft_helpers import VOCAB, make_adapter, tiny_model

RUNGS = (0, 2, 4, 8)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = tmp_path_factory.mktemp("qa") / "adapter"
    base = tiny_model("llama", hidden=32)
    peft = make_adapter(base, path, r=8, lora_alpha=16, target_modules="all-linear")
    ladder = cw.RankLadder.from_peft(path)
    config = cw.SchedulerConfig(rungs=RUNGS, min_len=4, max_len=8, granularity=2, crossfade=1)
    cwm = cw.inject(tiny_model("llama", hidden=32), ladder, cw.Scheduler(config))
    return peft, cwm, config


def seqs_of(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, VOCAB, n).astype(np.int64) for n in lengths]


def nll_reference(model, seq):
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(seq)[None]).logits[0].double()
    logp = torch.log_softmax(logits[:-1], -1)
    return np.concatenate([[0.0], -logp.gather(-1, torch.from_numpy(seq[1:])[:, None])[:, 0].numpy()])


def test_token_nll_at_the_top_is_peft_and_batching_changes_nothing(setup):
    peft, cwm, config = setup
    seqs = seqs_of([20, 13, 30])
    got = token_nll(cwm, seqs, rank=RUNGS[-1])
    for s, g in zip(seqs, got, strict=True):
        np.testing.assert_allclose(g, nll_reference(peft, s), rtol=1e-4, atol=1e-5)
    # under per-sequence plans, batched (right-padded) == each sequence alone
    sched = cw.Scheduler(config)
    plans = [sched.plan([s]) for s in seqs]
    batched = token_nll(cwm, seqs, plans=plans)
    for s, p, b in zip(seqs, plans, batched, strict=True):
        np.testing.assert_allclose(b, token_nll(cwm, [s], plans=[p])[0], rtol=1e-5, atol=1e-6)
    # rank 0 is the base model
    base = token_nll(cwm, seqs[:1], rank=0)[0]
    with cwm.use(None):
        np.testing.assert_allclose(base, nll_reference(cwm.model, seqs[0]), rtol=1e-4, atol=1e-5)


def test_base_signals_energy_is_the_dense_truncation_error(setup):
    _, cwm, _ = setup
    seq = seqs_of([17])[0]
    sig = base_signals(cwm, [seq])[0]
    name, layer = first_adapted_layer(cwm)
    lad = cwm.ladders[0].modules[name]
    seen = []
    h = layer.register_forward_pre_hook(lambda _m, a: seen.append(a[0].detach()))
    with cwm.use(None), torch.no_grad():
        logits = cwm.model(input_ids=torch.from_numpy(seq)[None]).logits[0]
    h.remove()
    x = seen[0][0].double()
    full = lad.update().double()
    for r in range(lad.rank + 1):
        lost = x @ (full - (lad.update(r).double() if r else 0 * full)).T
        np.testing.assert_allclose(sig.tail[:, r], (lost**2).sum(-1).numpy(), rtol=1e-4, atol=1e-9)
    ent = cw.entropy_from_logits(logits[:-1].float().numpy())
    np.testing.assert_allclose(sig.entropy[1:], ent, rtol=1e-4, atol=1e-6)
    assert sig.entropy[0] == 0 and sig.surprisal[0] == 0
    # the probe of token t is the truncation cost at position t - 1, relative to its median
    e = sig.energy(4)
    np.testing.assert_allclose(e[1:] * np.median(sig.tail[:-1, 4]), sig.tail[:-1, 4], rtol=1e-5)


def test_greedy_with_plan_matches_transformers_generate(setup):
    peft, cwm, config = setup
    prompt = [int(t) for t in seqs_of([9], seed=3)[0]]
    new, used = greedy_with_plan(cwm, prompt, None, 6, eos=None, rank=RUNGS[-1])
    with torch.no_grad():
        ref = peft.generate(
            input_ids=torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=None
        )
    assert new == ref[0, len(prompt) :].tolist()
    assert len(used) == len(prompt) + 5 and (used == RUNGS[-1]).all()
    # a plan over prompt + that answer at one rank everywhere == that rank without a plan
    top = cw.Scheduler(cw.SchedulerConfig(rungs=(0, 8), thresholds=(-1.0,), crossfade=0))
    plan = top.plan([np.asarray(prompt + new, np.int64)])
    new2, used2 = greedy_with_plan(cwm, prompt, plan, 6, eos=None)
    assert new2 == new and (used2 == 8).all()
    # positions follow the plan's ranks, and positions past it keep its last one
    mixed = cw.Scheduler(config).plan([np.asarray(prompt + new[:2], np.int64)])
    _, used3 = greedy_with_plan(cwm, prompt, mixed, 6, eos=None)
    planned = np.asarray(mixed.token_rank)
    assert np.array_equal(used3[: len(planned)], planned)
    assert (used3[len(planned) :] == planned[-1]).all()


def test_plan_slice_follows_the_plan(setup):
    _, cwm, config = setup
    seq = seqs_of([24])[0]
    plan = cw.Scheduler(config).plan([seq])
    device, dtype = cwm.device_dtype()
    whole = cw.nn.TokenPlan.from_plan(plan, None, (1, 24), None, device, dtype)
    ids = torch.from_numpy(seq)[None]
    with cwm.use(whole), torch.no_grad():
        ref = cwm.model(input_ids=ids).logits
    # the prefix of the plan over the prefix of the input: the same logits (causal)
    with cwm.use(cw.nn.TokenPlan.from_plan_slice(plan, 0, 15, device, dtype)), torch.no_grad():
        part = cwm.model(input_ids=ids[:, :15]).logits
    torch.testing.assert_close(part, ref[:, :15], rtol=1e-5, atol=1e-6)
    with pytest.raises(cw.InputError):
        cw.nn.TokenPlan.from_plan_slice(plan, 5, 25, device, dtype)
    with pytest.raises(cw.InputError, match="one-sequence"):
        two = cw.Scheduler(config).plan([seq, seq])
        cw.nn.TokenPlan.from_plan_slice(two, 0, 5, device, dtype)


def items_of(lengths, seed=0):
    return [QaItem(s, len(s) - 3, ("x",)) for s in seqs_of(lengths, seed)]


def test_answer_curves_invariants(setup):
    _, cwm, config = setup
    items = items_of([20, 26, 31, 18, 22])
    counts = np.random.default_rng(0).integers(0, 50, VOCAB).astype(np.float64)
    data = answer_curves(cwm, items, config, budgets=(2, 4, 8), unigram_counts=counts, batch_size=2)
    for b in (2, 4, 8):
        want = [float(token_nll(cwm, [it.ids], rank=b)[0][it.answer_positions].mean()) for it in items]
        np.testing.assert_allclose(data.answer_nll[("uniform", "", b)], want, rtol=1e-5)
        for mode, s in [("adaptive", x) for x in (*SIGNALS, MIX)] + [("random", ""), ("oracle", "")]:
            assert np.isfinite(data.answer_nll[(mode, s, b)]).all()
            # cross-fade ramps run at the larger rank: at most a ramp's worth over the budget
            assert (data.mean_rank[(mode, s, b)] <= b + 8 * 2 / 18 + 1e-9).all(), (mode, s, b)
    full = data.answer_nll[("full", "", 0)]
    np.testing.assert_allclose(data.answer_nll[("uniform", "", 8)], full, rtol=1e-6)
    # at the top budget everything runs at the top rank
    for s in (*SIGNALS, MIX):
        np.testing.assert_allclose(data.answer_nll[("adaptive", s, 8)], full, rtol=1e-5)
        assert (data.rank_sd[("adaptive", s, 8)] == 0).all()  # one rank for every token
    assert (data.rank_sd[("uniform", "", 2)] == 0).all()
    # the random control spreads the same chunks over rungs: its ranks vary within a question
    assert (data.rank_sd[("random", "", 4)] > 0).any()
    # (the oracle is not: at the top budget it still picks, per chunk, the rung whose answer
    # NLL is lowest, and a random adapter's lower rungs are sometimes better)
    for rho in data.spearman.values():
        assert all(np.isnan(r) or -1 <= r <= 1 for r in rho)
    out = summarize(data)
    assert out["questions"] == len(items)
    keys = {(r["mode"], r["signal"], r["budget"]) for r in out["rows"]}
    assert ("oracle", None, 4) in keys and ("adaptive", "energy", 2) in keys
    row = next(r for r in out["rows"] if (r["mode"], r["budget"]) == ("random", 4))
    assert row["rank_sd"] == pytest.approx(np.mean(data.rank_sd[("random", "", 4)]))
    pair = next(p for p in out["paired"] if p["a"] == "oracle" and p["budget"] == 2)
    d = np.mean(data.answer_nll[("oracle", "", 2)] - data.answer_nll[("uniform", "", 2)])
    assert pair["nll_diff"] == pytest.approx(d)
    assert pair["nll_diff_ci95"][0] <= d <= pair["nll_diff_ci95"][1]


class DigitTokenizer:
    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids)


def test_generation_curves_full_and_base_rows(setup):
    peft, cwm, config = setup
    items = items_of([12, 15], seed=5)
    counts = np.ones(VOCAB)
    data = generation_curves(
        cwm, DigitTokenizer(), items, config, budgets=(4,), unigram_counts=counts, max_new_tokens=3
    )
    for i, it in enumerate(items):
        prompt = torch.from_numpy(it.ids[: it.n_prompt])[None]
        with torch.no_grad():
            ref = peft.generate(input_ids=prompt, max_new_tokens=3, do_sample=False, eos_token_id=None)
        text = " ".join(str(t) for t in ref[0, it.n_prompt :].tolist())
        assert data.em[("full", "", 0)][i] == (100.0 if text == "x" else 0.0)
        assert data.gen_mean_rank[("full", "", 0)][i] == 8
        assert data.gen_mean_rank[("base", "", 0)][i] == 0
    for key in [("uniform", "", 4), ("adaptive", MIX, 4), ("adaptive", "energy", 4), ("random", "", 4)]:
        assert key in data.em and np.isfinite(data.f1[key]).all()
    assert summarize(data)["generated_questions"] == 2


def test_spearman_against_the_textbook_formula():
    rng = np.random.default_rng(0)
    x, y = rng.random(200), rng.random(200)
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    d = rx - ry
    assert spearman(x, y) == pytest.approx(1 - 6 * (d**2).sum() / (200 * (200**2 - 1)))
    assert spearman([1, 2, 2, 3], [1, 2, 2, 3]) == pytest.approx(1.0)
    assert np.isnan(spearman([1, 1, 1], [1, 2, 3]))
    with pytest.raises(cw.InputError):
        spearman([1, 2], [1, 2, 3])


def test_window_items_score_every_token_once():
    ids = np.arange(40)
    items = window_items(ids, window=16, scored=8)
    assert [len(it.ids) for it in items] == [16] * 4
    scored = np.concatenate([it.ids[it.answer_positions] for it in items])
    assert np.array_equal(scored, np.arange(8, 40))
    with pytest.raises(cw.InputError):
        window_items(ids, window=8, scored=8)
    with pytest.raises(cw.InputError):
        window_items(ids[:10], window=16, scored=8)
