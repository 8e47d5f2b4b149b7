"""Evaluation metrics: SQuAD v1.1 exact match / F1 (the official normalisation) and perplexity
over long texts with a sliding window.

Perplexity with a stride: windows of ``window`` tokens, each ending ``stride`` tokens after the
previous one and scoring only those ``stride`` new tokens (the usual strided evaluation): every
token is scored once, with at least ``window - stride`` tokens of context.
"""

from __future__ import annotations

import collections
import math
import re
import string
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ..errors import InputError

__all__ = ["causal_lm_nll", "exact_match", "f1", "normalize_answer", "squad_scores", "strided_perplexity"]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation and the articles a/an/the, collapse whitespace (SQuAD v1.1)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, answers: Iterable[str]) -> float:
    """1.0 if the normalised prediction equals any normalised answer, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(a) for a in answers))


def _f1_one(prediction: str, answer: str) -> float:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(answer).split()
    common = collections.Counter(pred) & collections.Counter(gold)
    same = sum(common.values())
    if not pred or not gold:
        return float(pred == gold)
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def f1(prediction: str, answers: Iterable[str]) -> float:
    """Best token-overlap F1 of the prediction against any answer (SQuAD v1.1)."""
    answers = list(answers)
    if not answers:
        raise InputError("answers: need at least one reference answer", "answers")
    return max(_f1_one(prediction, a) for a in answers)


def squad_scores(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> dict[str, float]:
    """Mean exact match and F1 in percent over a set of questions."""
    if len(predictions) != len(answers) or not predictions:
        raise InputError(
            f"predictions: {len(predictions)} predictions for {len(answers)} questions", "predictions"
        )
    em = sum(exact_match(p, a) for p, a in zip(predictions, answers, strict=True))
    f = sum(f1(p, a) for p, a in zip(predictions, answers, strict=True))
    return {"exact_match": 100 * em / len(predictions), "f1": 100 * f / len(predictions)}


def strided_perplexity(
    nll: Callable[[Any, int], tuple[float, int]],
    ids: Any,
    window: int,
    stride: int,
    progress: Callable[[int], None] | None = None,
) -> float:
    """Perplexity of a 1-D token sequence ``ids`` with a sliding window.

    The first window is ``ids[:window]`` and scores its tokens 1..window-1; each next window
    ends ``stride`` tokens later, is ``window`` tokens long and scores only its last ``stride``
    tokens, so every token but the first is scored exactly once, with at least
    ``window - stride`` tokens of context. ``nll(window_ids, n_scored)`` returns (sum of
    negative log-likelihoods, count) of the last ``n_scored`` tokens of ``window_ids`` given
    the tokens before them. ``progress`` is called with the tokens each window scored.
    """
    if not (isinstance(window, int) and window >= 2):
        raise InputError(f"window: must be an int >= 2, got {window!r}", "window")
    if not (isinstance(stride, int) and 1 <= stride < window):
        raise InputError(
            f"stride: must be an int in [1, window - 1 = {window - 1}], got {stride!r}", "stride"
        )
    n = len(ids)
    if n < 2:
        raise InputError(f"ids: need at least 2 tokens, got {n}", "ids")
    end = min(window, n)
    total, count = nll(ids[:end], end - 1)
    if progress is not None:
        progress(end - 1)
    while end < n:
        new_end = min(end + stride, n)
        s, c = nll(ids[new_end - window : new_end], new_end - end)
        total, count = total + s, count + c
        if progress is not None:
            progress(new_end - end)
        end = new_end
    return math.exp(total / count)


def causal_lm_nll(forward: Callable[[Any], Any]) -> Callable[[Any, int], tuple[float, int]]:
    """An ``nll`` for :func:`strided_perplexity` from ``forward(ids[1, T]) -> logits[1, T, V]``."""
    import torch

    def nll(window_ids: Any, n_scored: int) -> tuple[float, int]:
        ids = torch.as_tensor(window_ids).reshape(1, -1)
        with torch.inference_mode():
            logits = forward(ids).float()
        logp = torch.log_softmax(logits[0, :-1], dim=-1)
        per_token = -logp.gather(-1, ids[0, 1:, None])[:, 0]
        return float(per_token[-n_scored:].sum()), n_scored

    return nll
