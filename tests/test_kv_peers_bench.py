"""The answer protocol of ``benches/kv_peers.py`` (the kvpress side by side), on a tiny random
model: its greedy answer is transformers' own greedy ``generate``; the gold answer's NLL it takes
from the greedy pass (when the two agree) is the teacher-forced NLL; the EM / F1 table is paired
against the full cache. kvpress itself needs its own environment and is not imported here."""

from __future__ import annotations

import functools

import pytest
import torch
from chunkwise.kv import KvPolicy
from transformers import DynamicCache

from benches import kv_peers
from tests.support.peft_helpers import VOCAB, tiny_model

CONTEXT, QUESTION = 30, 6
# the kvpress side passes its DynamicCache as past_key_values (kvpress pins transformers < 5.3)
pytestmark = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")


def _prompt(seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (CONTEXT + QUESTION,), generator=g).tolist()


def _hf_greedy(model, ids: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids) :].tolist()


def _item(ids: list[int], answer: list[int]) -> dict:
    return {"id": "q", "ids": ids, "context_len": CONTEXT, "answers": ["x"], "answer_ids": answer}


def _gold_ending_at_a_new_token(greedy: list[int]) -> list[int]:
    """The shortest prefix (>= 3 tokens) of ``greedy`` whose last token occurs nowhere before it:
    greedy decoding stops there when that token is the end-of-turn id."""
    j = next(j for j in range(3, len(greedy) + 1) if greedy[j - 1] not in greedy[: j - 1])
    return greedy[:j]


def _dynamic(model, ids: list[int]) -> DynamicCache:
    cache = DynamicCache()
    with torch.inference_mode():
        model(input_ids=torch.tensor([ids[:CONTEXT]]), past_key_values=cache, use_cache=True)
    return cache


def _caches(model, ids):
    """(cache keyword, prefill) for both sides: a DynamicCache, and a full PolicyCache."""
    context = torch.tensor([ids[:CONTEXT]])
    return [
        ("past_key_values", functools.partial(_dynamic, model, ids)),
        ("cache", functools.partial(kv_peers.policy_prefill, model, context, KvPolicy.full())),
    ]


@pytest.mark.parametrize("side", [0, 1], ids=["dynamic-cache", "policy-cache"])
def test_greedy_answer_is_transformers_greedy_and_its_nll_the_teacher_forced_one(side):
    model = tiny_model()
    ids = _prompt()
    greedy = _hf_greedy(model, ids, 12)
    gold = _gold_ending_at_a_new_token(greedy)
    item = _item(ids, gold)
    kw, prefilled = _caches(model, ids)[side]
    with torch.inference_mode():
        pred, nll = kv_peers.greedy_answer(model, item, prefilled(), kw, max_answer=12)
        forced, n = kv_peers.answer_nll(model, item, prefilled(), kw)
        row = kv_peers.answer_pass(model, item, prefilled, prefilled(), kw, max_answer=12)
    assert pred == gold  # stopped at the end-of-turn id, the rest is transformers' greedy
    assert nll is not None and n == len(gold)
    assert nll == pytest.approx(forced, rel=1e-5, abs=1e-5)
    assert row == {"pred": gold, "nll": nll, "n": len(gold)}


@pytest.mark.parametrize("side", [0, 1], ids=["dynamic-cache", "policy-cache"])
def test_a_wrong_greedy_answer_gets_the_gold_nll_teacher_forced(side):
    model = tiny_model()
    ids = _prompt(1)
    greedy = _hf_greedy(model, ids, 8)
    wrong = (greedy[0] + 1) % VOCAB or 1
    eot = next(t for t in range(1, VOCAB) if t not in greedy)  # never generated: runs to max_answer
    item = _item(ids, [wrong, eot])
    kw, prefilled = _caches(model, ids)[side]
    with torch.inference_mode():
        pred, nll = kv_peers.greedy_answer(model, item, prefilled(), kw, max_answer=8)
        row = kv_peers.answer_pass(model, item, prefilled, prefilled(), kw, max_answer=8)
        forced, _ = kv_peers.answer_nll(model, item, prefilled(), kw)
    assert pred == greedy and nll is None
    assert row["pred"] == greedy and row["nll"] == pytest.approx(forced, rel=1e-6)


class _Tok:
    """Decodes ids as space-joined words w<id> (what score_rows needs of a tokenizer)."""

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(f"w{i}" for i in ids)


def test_scores_and_table_pair_every_method_with_the_full_cache():
    items = [
        {"id": "a", "answers": ["w1 w2"], "answer_ids": [1, 2, 9]},
        {"id": "b", "answers": ["w3"], "answer_ids": [3, 9]},
    ]
    rows = []
    preds = {"full": {"a": [1, 2, 9], "b": [3, 9]}, "press": {"a": [1, 9], "b": [4, 4]}}
    for method, by_id in preds.items():
        for qid, pred in by_id.items():
            budget = None if method == "full" else 0.5
            nll = 2.0 if method == "full" else 3.0
            rows.append({"side": "s", "method": method, "budget": budget, "id": qid, "pred": pred,
                         "nll": nll, "n": 2, "kv_mb": 1.0, "seconds": 0.1})  # fmt: skip
    kv_peers.score_rows(rows, items, _Tok())
    assert [r["answer"] for r in rows] == ["w1 w2", "w3", "w1", "w4 w4"]  # end-of-turn id dropped
    assert [r["em"] for r in rows] == [100.0, 100.0, 0.0, 0.0]
    assert rows[2]["f1"] == pytest.approx(100 * 2 / 3)  # "w1" against "w1 w2"
    table = {t["method"]: t for t in kv_peers.summarize(rows)}
    assert table["full"]["em"] == 100.0 and table["full"]["delta_em"] == 0.0
    assert table["press"]["em"] == 0.0 and table["press"]["delta_em"] == pytest.approx(-100.0)
    assert table["press"]["delta_nll"] == pytest.approx(0.5)  # 1.5 against 1.0 nats per token
    assert table["press"]["f1"] == pytest.approx(100 / 3)
