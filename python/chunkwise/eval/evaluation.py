"""Perplexity and SQuAD for one *mode* of an adapted model, the comparisons the results table
makes: ``base`` (no adapter), ``full`` (every token at the top rung = PEFT), ``uniform``
(every token truncated to one rank) and ``adaptive`` (the scheduler's per-chunk ranks).

Every mode runs the same injected model; only the scheduler changes, so the numbers differ by
the ranks alone. Long work shows a progress bar (tqdm) unless ``progress=False``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import InputError
from ..nn.injection import ChunkwiseModel
from ..schedule.config import SchedulerConfig
from ..schedule.scheduler import Scheduler
from .metrics import exact_match, f1, strided_perplexity

__all__ = ["MODES", "ModeResult", "perplexity", "squad", "squad_prompt"]

MODES: tuple[str, ...] = ("base", "full", "uniform", "adaptive")


@dataclasses.dataclass
class ModeResult:
    """One evaluation of one mode."""

    mode: str
    #: Token-weighted mean LoRA rank the mode ran at (0 for base).
    mean_rank: float
    seconds: float
    tokens: int
    ppl: float | None = None
    exact_match: float | None = None
    f1: float | None = None
    questions: int | None = None


def _single_rank(rank: int) -> Scheduler:
    """A scheduler that gives every token ``rank`` (one rung above a threshold below any difficulty)."""
    return Scheduler(SchedulerConfig(rungs=(0, rank), thresholds=(-1.0,), crossfade=0))


def mode_scheduler(cwm: ChunkwiseModel, mode: str, rank: float | None) -> Scheduler | None:
    """The scheduler a mode runs with (None: base model). ``rank``: the uniform rank, or the
    adaptive target mean rank (default: the injected scheduler as configured)."""
    top = max(lad.max_rank for lad in cwm.ladders)
    if mode == "base":
        return None
    if mode == "full":
        return _single_rank(top)
    if mode == "uniform":
        if rank is None or not 1 <= rank <= top or int(rank) != rank:
            raise InputError(f"rank: uniform mode needs an integer rank in [1, {top}], got {rank!r}", "rank")
        return _single_rank(int(rank))
    if mode == "adaptive":
        if rank is None:
            return cwm.scheduler
        base = cwm.scheduler.config
        return Scheduler(
            dataclasses.replace(base, mode="target", target_mean_rank=float(rank), thresholds=None)
        )
    raise InputError(f"mode: unknown {mode!r}; choose one of {', '.join(MODES)}", "mode")


@contextlib.contextmanager
def _running(model: Any, mode: str, rank: float | None) -> Iterator[tuple[Any, Scheduler | None]]:
    """(what to call, its scheduler) for ``mode``; restores the injected scheduler afterwards."""
    if not isinstance(model, ChunkwiseModel):
        if mode != "base":
            raise InputError(f"mode: {mode!r} needs an adapter (only 'base' runs a plain model)", "mode")
        yield model, None
        return
    sched = mode_scheduler(model, mode, rank)
    if sched is None:
        yield model.model, None
        return
    previous, model.scheduler = model.scheduler, sched
    try:
        yield model, sched
    finally:
        model.scheduler = previous


def _bar(total: int, desc: str, progress: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tok", disable=not progress, leave=False)


def perplexity(
    model: ChunkwiseModel | nn.Module,
    ids: torch.Tensor,
    mode: str = "adaptive",
    rank: float | None = None,
    window: int = 512,
    stride: int = 256,
    progress: bool = True,
) -> ModeResult:
    """Strided perplexity of the 1-D token sequence ``ids`` under ``mode`` (see module docs)."""
    ranks: list[np.ndarray] = []
    t0 = time.perf_counter()
    with _running(model, mode, rank) as (runner, sched), _bar(len(ids) - 1, f"ppl {mode}", progress) as bar:

        def nll(window_ids: torch.Tensor, n_scored: int) -> tuple[float, int]:
            x = window_ids.reshape(1, -1)
            with torch.inference_mode():
                if sched is None:
                    logits = runner(input_ids=x).logits
                else:
                    plan = runner.plan_inputs(x)
                    ranks.append(plan.token_rank[-n_scored:])
                    logits = runner.run(x, plan=plan).logits
            logp = torch.log_softmax(logits[0, :-1].float(), dim=-1)
            per_token = -logp.gather(-1, x[0, 1:, None])[:, 0]
            return float(per_token[-n_scored:].sum()), n_scored

        ppl = strided_perplexity(nll, ids, window, stride, progress=bar.update)
    mean = float(np.concatenate(ranks).mean()) if ranks else 0.0
    return ModeResult(mode, mean, time.perf_counter() - t0, len(ids) - 1, ppl=ppl)


def squad_prompt(tokenizer: Any, context: str, question: str) -> str:
    """The question as the model sees it (the chat template when the tokenizer has one)."""
    text = (
        f"{context}\n\nQuestion: {question}\n"
        "Answer with the exact words from the text above, as briefly as possible."
    )
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
    return text + "\nAnswer:"


def squad(
    model: ChunkwiseModel | nn.Module,
    tokenizer: Any,
    examples: Sequence[dict[str, Any]],
    mode: str = "adaptive",
    rank: float | None = None,
    max_new_tokens: int = 24,
    progress: bool = True,
) -> ModeResult:
    """Greedy answers to SQuAD questions under ``mode``: EM and F1 in percent."""
    from tqdm.auto import tqdm

    from ..generation import generate

    if not examples:
        raise InputError("examples: no questions to answer", "examples")
    em = f = 0.0
    ranks: list[np.ndarray] = []
    tokens = 0
    t0 = time.perf_counter()
    eos = tokenizer.eos_token_id
    with _running(model, mode, rank) as (runner, sched):
        for ex in tqdm(examples, desc=f"squad {mode}", unit="q", disable=not progress, leave=False):
            ids = tokenizer(
                squad_prompt(tokenizer, ex["context"], ex["question"]), return_tensors="pt"
            ).input_ids
            out = generate(
                runner, ids, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=eos or 0
            )
            answer = tokenizer.decode(out.new_tokens[0], skip_special_tokens=True).strip().split("\n")[0]
            em += exact_match(answer, ex["answers"])
            f += f1(answer, ex["answers"])
            tokens += ids.shape[1] + out.new_tokens.shape[1]
            if sched is not None:
                ranks += [out.prefill_token_ranks, out.ranks[0]]
    n = len(examples)
    mean = float(np.concatenate(ranks).mean()) if ranks else 0.0
    return ModeResult(
        mode, mean, time.perf_counter() - t0, tokens, exact_match=100 * em / n, f1=100 * f / n, questions=n
    )
