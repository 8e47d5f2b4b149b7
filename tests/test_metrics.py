"""Evaluation metrics against hand-computed cases: SQuAD normalisation, EM and F1, and strided
perplexity (uniform model, a bigram model whose context never matters, a hand-worked case)."""

from __future__ import annotations

import math

import pytest
import torch
from chunkwise import InputError
from chunkwise.eval.metrics import (
    causal_lm_nll,
    exact_match,
    f1,
    normalize_answer,
    squad_scores,
    strided_perplexity,
)


@pytest.mark.parametrize(
    ("raw", "norm"),
    [
        ("The  Eiffel Tower!", "eiffel tower"),
        ("an apple, a pear", "apple pear"),
        ("Theatre", "theatre"),  # 'the' only as a word
        ("  U.S.A. ", "usa"),
        ("", ""),
    ],
)
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


def test_exact_match_takes_the_best_reference():
    assert exact_match("the Denver Broncos", ["Broncos", "Denver Broncos"]) == 1.0
    assert exact_match("Denver", ["Denver Broncos"]) == 0.0


def test_f1_by_hand():
    # prediction "denver broncos won" vs "broncos": overlap 1, precision 1/3, recall 1 -> 0.5
    assert f1("Denver Broncos won", ["Broncos"]) == pytest.approx(0.5)
    # best of two references: "the broncos" -> exact overlap with "Broncos" after normalisation
    assert f1("the Broncos", ["Denver", "Broncos"]) == pytest.approx(1.0)
    # repeated tokens count with multiplicity: pred "a b b", gold "b b c" -> overlap 2, p=r=2/3
    assert f1("x y y", ["y y z"]) == pytest.approx(2 / 3)
    assert f1("", [""]) == 1.0 and f1("word", [""]) == 0.0
    with pytest.raises(InputError):
        f1("x", [])


def test_squad_scores_average_in_percent():
    s = squad_scores(["Broncos", "Paris France"], [["Denver Broncos", "Broncos"], ["Paris"]])
    assert s["exact_match"] == pytest.approx(50.0)
    assert s["f1"] == pytest.approx(100 * (1.0 + 2 / 3) / 2)
    with pytest.raises(InputError):
        squad_scores(["a"], [["a"], ["b"]])


V = 5


def uniform(ids):
    return torch.zeros(ids.shape[0], ids.shape[1], V)


def bigram(ids):
    """p(next | prev) depends on prev only: favours prev + 1."""
    table = torch.log_softmax(torch.arange(V * V, dtype=torch.float32).reshape(V, V).sin() * 3, dim=-1)
    return table[ids]


def full_context_ppl(forward, ids):
    logp = torch.log_softmax(forward(ids[None])[0, :-1], -1)
    return math.exp(-logp.gather(-1, ids[1:, None]).mean().item())


@pytest.mark.parametrize(("window", "stride"), [(2, 1), (4, 3), (7, 3), (50, 10), (200, 199)])
def test_uniform_model_has_perplexity_vocab_size(window, stride):
    ids = torch.randint(0, V, (97,))
    scored = []
    ppl = strided_perplexity(causal_lm_nll(uniform), ids, window, stride, progress=scored.append)
    assert ppl == pytest.approx(V, rel=1e-6)
    assert sum(scored) == 96  # every token but the first, exactly once


@pytest.mark.parametrize(("window", "stride"), [(2, 1), (5, 2), (16, 15), (33, 7)])
def test_context_free_model_gives_the_full_context_perplexity(window, stride):
    ids = torch.randint(0, V, (120,), generator=torch.Generator().manual_seed(1))
    got = strided_perplexity(causal_lm_nll(bigram), ids, window, stride)
    assert got == pytest.approx(full_context_ppl(bigram, ids), rel=1e-5)


def test_stride_gives_context_by_hand():
    """A model that predicts 'previous + 1' only when it sees at least 2 tokens of context."""

    def needs_context(ids):
        logits = torch.zeros(1, ids.shape[1], V)
        for t in range(ids.shape[1]):
            if t >= 1:  # position t sees t + 1 tokens: the prediction for token t + 1 is sharp
                logits[0, t, (int(ids[0, t]) + 1) % V] = math.log(9.0 * (V - 1))  # p = 0.9
        return logits

    ids = torch.tensor([0, 1, 2, 3, 4, 0, 1])  # 'previous + 1' throughout
    # disjoint windows of 3: [0 1 2] [2 3 4] [4 0 1] -> scored tokens 1,2 | 3,4 | 0,1;
    # each window's first scored token has 1 token of context (p = 1/5), the second 2 (p = 0.9)
    disjoint = strided_perplexity(causal_lm_nll(needs_context), ids, 3, 2)
    assert disjoint == pytest.approx(math.exp(-(3 * math.log(0.2) + 3 * math.log(0.9)) / 6))
    # stride 1: only token 1 lacks context
    overlapped = strided_perplexity(causal_lm_nll(needs_context), ids, 3, 1)
    assert overlapped == pytest.approx(math.exp(-(math.log(0.2) + 5 * math.log(0.9)) / 6))


@pytest.mark.parametrize(("window", "stride", "n"), [(1, 1, 10), (4, 0, 10), (4, 4, 10), (4, 2, 1)])
def test_bad_perplexity_arguments(window, stride, n):
    with pytest.raises(InputError):
        strided_perplexity(causal_lm_nll(uniform), torch.zeros(n, dtype=torch.long), window, stride)
