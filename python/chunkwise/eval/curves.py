"""Rank-quality curves of one QA adapter, with a control and an upper bound.

At each mean-rank budget b the same questions are scored under

* ``uniform``: every position at rank b (the ladder truncated);
* ``adaptive``: the scheduler in ``target`` mode at mean rank b, with each difficulty signal
  alone and with the default mix (entropy, surprisal, novelty, rarity, position);
* ``random`` (control): the chunks of the mixed plan, each given a random difficulty, then the
  same target-mode allocation: same chunking, same mean rank, ranks placed blindly;
* ``oracle`` (headroom): the chunks of the mixed plan, each given the rung that maximises the
  drop in answer NLL knowing every token's NLL at every uniform rung of the full run (the
  multiple-choice knapsack of :func:`chunkwise.eval.allocation.lagrangian_allocation`; what
  the answer does not need is spread evenly over the prompt, see :data:`ORACLE_SPREAD`). It
  treats positions as independent, but a prompt position's rank also changes the keys and
  values every answer token reads, so it is a strong allocation, not a proven bound.

Planning is *teacher-forced*: signals come from one base-model forward over the whole sequence
(prompt and answer; :func:`chunkwise.eval.qa_runs.base_signals`), so every mode plans from the
same information. Position p's rank is credited with the NLL of token p + 1, the token it
predicts. The signal ``energy`` is the adapter's own truncation cost at its first adapted
layer (no extra forward in a real prefill: the layer's input is the embedding).

For answer NLL every question is one teacher-forced sequence (prompt + gold answer). For exact
match the full-rank model answers first; the plans are made over the prompt plus that answer,
and each mode then generates greedily with those ranks per position.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..errors import InputError
from ..nn.injection import ChunkwiseModel
from ..schedule.config import SchedulerConfig
from ..schedule.plan import Plan
from ..schedule.scheduler import Scheduler
from .allocation import (
    chunk_spans,
    lagrangian_allocation,
    pinned_config,
    pinned_difficulty,
    random_difficulty,
    spread_config,
)
from .metrics import exact_match, f1
from .qa_runs import BaseSignals, base_signals, greedy_with_plan, token_nll
from .stats import bootstrap_mean, paired_difference

__all__ = [
    "MIX",
    "ORACLE_SPREAD",
    "SIGNALS",
    "CurveData",
    "QaItem",
    "answer_curves",
    "generation_curves",
    "spearman",
    "summarize",
    "window_items",
]

#: the difficulty signals, each alone; ``energy`` is passed to the scheduler as its probe
SIGNALS: tuple[str, ...] = ("entropy", "surprisal", "novelty", "rarity", "position", "energy")
#: the default mix of today's signals (the scheduler's default weights)
MIX = "mix"
#: the oracle's reward per prompt position for rank (concave in rank, tiny next to any answer
#: NLL drop): spends the budget the answer does not need evenly over the prompt
ORACLE_SPREAD = 1e-4
_CORE_SIGNALS = ("entropy", "surprisal", "novelty", "rarity", "position", "probe")


@dataclasses.dataclass(frozen=True)
class QaItem:
    """One question as a token sequence: the prompt, then (for answer NLL) the answer."""

    ids: np.ndarray
    n_prompt: int
    answers: tuple[str, ...] = ()

    @property
    def answer_positions(self) -> slice:
        """Entries of a per-token array that are answer tokens."""
        return slice(self.n_prompt, len(self.ids))


def window_items(ids: Sequence[int] | np.ndarray, window: int = 512, scored: int = 256) -> list[QaItem]:
    """A long text as items for the perplexity curves: windows of ``window`` tokens, ``scored``
    apart, each scoring its last ``scored`` tokens (the rest is context), so every token after
    the first ``window - scored`` is scored once. Mean answer NLL over items = mean NLL per
    scored token (every item scores the same count)."""
    a = np.asarray(ids, np.int64).reshape(-1)
    if not 0 < scored < window or len(a) < window:
        raise InputError(f"window_items: need 0 < scored < window <= {len(a)} tokens", "window")
    return [QaItem(a[s : s + window], window - scored) for s in range(0, len(a) - window + 1, scored)]


def signal_config(base: SchedulerConfig, signal: str, budget: float) -> SchedulerConfig:
    """``base`` in target mode at mean rank ``budget``, weighing only ``signal`` (or the
    defaults for :data:`MIX`)."""
    if signal == MIX:
        weights: dict[str, float] | None = None
    elif signal in SIGNALS:
        name = "probe" if signal == "energy" else signal
        weights = {k: float(k == name) for k in _CORE_SIGNALS}
    else:
        raise InputError(f"signal: unknown {signal!r}; choose one of {', '.join((*SIGNALS, MIX))}", "signal")
    return dataclasses.replace(
        base, mode="target", target_mean_rank=float(budget), thresholds=None, quantiles=None, weights=weights
    )


def _signal_inputs(signal: str, sig: BaseSignals, budget: int) -> dict[str, Any]:
    if signal == MIX:
        return {"entropy": [sig.entropy], "surprisal": [sig.surprisal]}
    if signal in ("entropy", "surprisal"):
        return {signal: [getattr(sig, signal)]}
    if signal == "energy":
        return {"probe": [sig.energy(budget)]}
    return {}  # novelty, rarity, position: from the ids


def _gains(losses: np.ndarray, n_prompt: int, ranks: Sequence[int]) -> np.ndarray:
    """[T, m] the oracle's credit of position p at rung j: the NLL drop (from rung 0) of the
    answer token p predicts; a position that predicts no answer token gets the small concave
    :data:`ORACLE_SPREAD` reward instead, so the budget the answer does not need is spread
    evenly over the prompt rather than left unspent."""
    t = losses.shape[0]
    r = np.asarray(ranks, np.float64)
    spread = ORACLE_SPREAD * np.log1p(r) / np.log1p(r[-1])
    out = np.tile(spread, (t, 1))
    answer = slice(max(n_prompt - 1, 0), t - 1)  # positions that predict an answer token
    out[answer] = losses[answer.start + 1 :, :1] - losses[answer.start + 1 :]
    return out


class Planner:
    """Every plan of one question at one budget (see the module docs)."""

    def __init__(
        self, config: SchedulerConfig, unigram_counts: np.ndarray | None, budgets: Sequence[int], seed: int
    ) -> None:
        self.rungs = tuple(int(r) for r in config.rungs)
        self.seed = seed
        self.schedulers = {
            (s, b): Scheduler(signal_config(config, s, b), unigram_counts)
            for b in budgets
            for s in (*SIGNALS, MIX)
        }
        self.spread = {
            b: Scheduler(spread_config(signal_config(config, MIX, b)), unigram_counts) for b in budgets
        }
        self.pinned = Scheduler(pinned_config(config), unigram_counts)

    def adaptive(self, ids: np.ndarray, sig: BaseSignals, signal: str, budget: int) -> Plan:
        return self.schedulers[(signal, budget)].plan([ids], **_signal_inputs(signal, sig, budget))

    def random(self, ids: np.ndarray, mix: Plan, budget: int, index: int) -> Plan:
        rng = np.random.default_rng([self.seed, index, budget])
        return self.spread[budget].plan([ids], difficulty=[random_difficulty(chunk_spans(mix), rng)])

    def oracle(self, ids: np.ndarray, mix: Plan, losses: np.ndarray, n_prompt: int, budget: int) -> Plan:
        spans = chunk_spans(mix)
        gain = _gains(losses, n_prompt, self.rungs)
        util = np.stack([gain[s:e].sum(0) for s, e in spans])
        lens = [e - s for s, e in spans]
        choice = lagrangian_allocation(lens, util, self.rungs, budget)
        pins = pinned_difficulty(spans, [int(c) for c in choice], len(self.rungs))
        return self.pinned.plan([ids], difficulty=[pins])


def _mean_rank(plan: Plan) -> float:
    return float(np.mean(plan.token_rank))


@dataclasses.dataclass
class CurveData:
    """Per-question results of the answer-NLL curves (rows: questions, in input order)."""

    rungs: tuple[int, ...]
    budgets: tuple[int, ...]
    #: (mode, signal or "", budget or 0) -> per-question answer NLL (nats per answer token)
    answer_nll: dict[tuple[str, str, int], np.ndarray]
    #: the same keys -> per-question token-weighted mean rank
    mean_rank: dict[tuple[str, str, int], np.ndarray]
    #: (signal, budget) -> Spearman of difficulty against the oracle gain (all positions, and
    #: the positions that predict an answer token)
    spearman: dict[tuple[str, int], tuple[float, float]]
    #: the same for generation: (mode, signal, budget) -> per-question EM, F1 (percent)
    em: dict[tuple[str, str, int], np.ndarray] = dataclasses.field(default_factory=dict)
    f1: dict[tuple[str, str, int], np.ndarray] = dataclasses.field(default_factory=dict)
    gen_mean_rank: dict[tuple[str, str, int], np.ndarray] = dataclasses.field(default_factory=dict)
    #: the answer-NLL keys -> per-question standard deviation of the rank over its tokens: 0
    #: when a plan gives every token one rank (a scheduler that degenerates to uniform)
    rank_sd: dict[tuple[str, str, int], np.ndarray] = dataclasses.field(default_factory=dict)


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (1-based)."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return (ends - 0.5 * (counts - 1))[inverse]


def spearman(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Spearman's rank correlation (ties averaged); NaN when either side is constant."""
    a, b = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise InputError(f"spearman: need two 1-d arrays of one length, got {a.shape}, {b.shape}", "y")
    ra, rb = _ranks(a), _ranks(b)
    sa, sb = ra.std(), rb.std()
    if len(a) < 2 or sa == 0 or sb == 0:
        return math.nan
    return float(((ra - ra.mean()) * (rb - rb.mean())).mean() / (sa * sb))


def _batches(items: Sequence[QaItem], size: int) -> list[list[int]]:
    order = sorted(range(len(items)), key=lambda i: len(items[i].ids))
    return [order[s : s + size] for s in range(0, len(order), size)]


def answer_curves(
    cwm: ChunkwiseModel,
    items: Sequence[QaItem],
    config: SchedulerConfig,
    budgets: Sequence[int],
    unigram_counts: np.ndarray | None = None,
    batch_size: int = 8,
    pad: int = 0,
    seed: int = 0,
    progress: Callable[[int], object] | None = None,
) -> CurveData:
    """Teacher-forced answer NLL of every question under every mode at every budget (see the
    module docs), and the Spearman correlation of each signal with the oracle gain."""
    rungs = tuple(int(r) for r in config.rungs)
    bad = [b for b in budgets if b not in rungs or b == 0]
    if bad or not items:
        raise InputError(f"budgets: need rungs of the ladder {rungs} above 0, got {list(budgets)}", "budgets")
    planner = Planner(config, unigram_counts, budgets, seed)
    n = len(items)
    nll: dict[tuple[str, str, int], np.ndarray] = {}
    mean: dict[tuple[str, str, int], np.ndarray] = {}
    # (signal, budget) -> difficulty and gain at all positions, then at answer-side positions
    pooled: dict[tuple[str, int], tuple[list[np.ndarray], ...]] = {
        (s, b): ([], [], [], []) for s in (*SIGNALS, MIX) for b in budgets
    }

    spread: dict[tuple[str, str, int], np.ndarray] = {}

    def put(key: tuple[str, str, int], i: int, value: float, rank: float, sd: float = 0.0) -> None:
        nll.setdefault(key, np.full(n, np.nan))[i] = value
        mean.setdefault(key, np.full(n, np.nan))[i] = rank
        spread.setdefault(key, np.full(n, np.nan))[i] = sd

    for batch in _batches(items, batch_size):
        seqs = [items[i].ids for i in batch]
        sigs = base_signals(cwm, seqs, pad)
        losses = [np.empty((len(s), len(rungs))) for s in seqs]
        for j, r in enumerate(rungs):
            per = [s.nll for s in sigs] if r == 0 else token_nll(cwm, seqs, rank=r, pad=pad)
            for k, p in enumerate(per):
                losses[k][:, j] = p
        for k, i in enumerate(batch):
            ans = items[i].answer_positions
            put(("base", "", 0), i, float(losses[k][ans, 0].mean()), 0.0)
            put(("full", "", 0), i, float(losses[k][ans, -1].mean()), float(rungs[-1]))
            for b in budgets:
                put(("uniform", "", b), i, float(losses[k][ans, rungs.index(b)].mean()), float(b))
        for b in budgets:
            jb = rungs.index(b)
            plans: dict[tuple[str, str], list[Plan]] = {}
            for k, i in enumerate(batch):
                ids, it = items[i].ids, items[i]
                for s in (*SIGNALS, MIX):
                    plans.setdefault(("adaptive", s), []).append(planner.adaptive(ids, sigs[k], s, b))
                mix = plans[("adaptive", MIX)][-1]
                plans.setdefault(("random", ""), []).append(planner.random(ids, mix, b, i))
                oracle = planner.oracle(ids, mix, losses[k], it.n_prompt, b)
                plans.setdefault(("oracle", ""), []).append(oracle)
                gain = np.zeros(len(ids))
                gain[:-1] = losses[k][1:, jb] - losses[k][1:, -1]  # what truncation to b costs p's token
                answer_side = np.zeros(len(ids), bool)
                answer_side[max(it.n_prompt - 1, 0) : len(ids) - 1] = True
                for s in (*SIGNALS, MIX):
                    d = np.asarray(plans[("adaptive", s)][-1].difficulty, np.float64)
                    bucket = pooled[(s, b)]
                    for into, value in zip(bucket, (d, gain, d[answer_side], gain[answer_side]), strict=True):
                        into.append(value)
            for (mode, s), ps in plans.items():
                per = token_nll(cwm, seqs, plans=ps, pad=pad)
                for k, i in enumerate(batch):
                    answer_nll = float(per[k][items[i].answer_positions].mean())
                    put((mode, s, b), i, answer_nll, _mean_rank(ps[k]), float(np.std(ps[k].token_rank)))
        if progress is not None:
            progress(len(batch))
    rho = {
        key: (
            spearman(np.concatenate(v[0]), np.concatenate(v[1])),
            spearman(np.concatenate(v[2]), np.concatenate(v[3])),
        )
        for key, v in pooled.items()
    }
    return CurveData(rungs, tuple(budgets), nll, mean, rho, rank_sd=spread)


def generation_curves(
    cwm: ChunkwiseModel,
    tokenizer: Any,
    items: Sequence[QaItem],
    config: SchedulerConfig,
    budgets: Sequence[int],
    signals: Sequence[str] = (MIX, "energy"),
    unigram_counts: np.ndarray | None = None,
    max_new_tokens: int = 24,
    seed: int = 0,
    into: CurveData | None = None,
    progress: Callable[[int], object] | None = None,
) -> CurveData:
    """Greedy EM / F1 of every question (``items``: prompts only, with their gold answers) under
    base, full, and uniform / adaptive (``signals``) / random / oracle at each budget. Plans are
    made over the prompt plus the full-rank answer (see the module docs)."""
    rungs = tuple(int(r) for r in config.rungs)
    planner = Planner(config, unigram_counts, budgets, seed)
    data = into if into is not None else CurveData(rungs, tuple(budgets), {}, {}, {})
    n = len(items)
    eos = tokenizer.eos_token_id

    Key = tuple[str, str, int]

    def score(key: Key, i: int, new: list[int], used: np.ndarray, answers: Sequence[str]) -> None:
        text = tokenizer.decode(new, skip_special_tokens=True).strip().split("\n")[0]
        data.em.setdefault(key, np.full(n, np.nan))[i] = 100.0 * exact_match(text, answers)
        data.f1.setdefault(key, np.full(n, np.nan))[i] = 100.0 * f1(text, answers)
        data.gen_mean_rank.setdefault(key, np.full(n, np.nan))[i] = float(np.mean(used))

    for i, it in enumerate(items):
        prompt = [int(t) for t in it.ids[: it.n_prompt]]
        full_new, used = greedy_with_plan(cwm, prompt, None, max_new_tokens, eos, rank=rungs[-1])
        score(("full", "", 0), i, full_new, used, it.answers)
        new, used = greedy_with_plan(cwm, prompt, None, max_new_tokens, eos, rank=0)
        score(("base", "", 0), i, new, used, it.answers)
        ids = np.asarray(prompt + full_new, np.int64)
        sig = base_signals(cwm, [ids])[0]
        losses = np.stack([sig.nll if r == 0 else token_nll(cwm, [ids], rank=r)[0] for r in rungs], 1)
        for b in budgets:
            new, used = greedy_with_plan(cwm, prompt, None, max_new_tokens, eos, rank=b)
            score(("uniform", "", b), i, new, used, it.answers)
            mix = planner.adaptive(ids, sig, MIX, b)
            plans = {("adaptive", s): planner.adaptive(ids, sig, s, b) for s in signals}
            plans[("random", "")] = planner.random(ids, mix, b, i)
            plans[("oracle", "")] = planner.oracle(ids, mix, losses, it.n_prompt, b)
            for (mode, s), plan in plans.items():
                new, used = greedy_with_plan(cwm, prompt, plan, max_new_tokens, eos)
                score((mode, s, b), i, new, used, it.answers)
        if progress is not None:
            progress(1)
    return data


def _ci(values: np.ndarray) -> list[float]:
    _, lo, hi = bootstrap_mean(values)
    return [lo, hi]


def summarize(data: CurveData) -> dict[str, Any]:
    """The ``"qa"`` section of docs/results.json: rows per (mode, signal, budget) and the paired
    differences of every adaptive setting (and the controls) against uniform at its budget."""
    rows = []
    keys = sorted(set(data.answer_nll) | set(data.em), key=lambda k: (k[2], k[0], k[1]))
    for key in keys:
        mode, signal, budget = key
        row: dict[str, Any] = {
            "mode": mode,
            "signal": signal or None,
            "budget": budget or None,
            "mean_rank": float(np.mean(data.mean_rank[key])) if key in data.mean_rank else None,
            "rank_sd": float(np.mean(data.rank_sd[key])) if key in data.rank_sd else None,
            "answer_nll": float(np.mean(data.answer_nll[key])) if key in data.answer_nll else None,
            "answer_nll_ci95": _ci(data.answer_nll[key]) if key in data.answer_nll else None,
            "em": None,
            "f1": None,
            "em_ci95": None,
            "f1_ci95": None,
            "gen_mean_rank": None,
        }
        if key in data.em:
            row.update(
                em=float(np.mean(data.em[key])),
                f1=float(np.mean(data.f1[key])),
                em_ci95=_ci(data.em[key]),
                f1_ci95=_ci(data.f1[key]),
                gen_mean_rank=float(np.mean(data.gen_mean_rank[key])),
            )
        rows.append(row)
    paired = []
    for mode, signal, budget in keys:
        if mode not in ("adaptive", "random", "oracle"):
            continue
        a, u = (mode, signal, budget), ("uniform", "", budget)
        entry: dict[str, Any] = {"a": mode, "b": "uniform", "signal": signal or None, "budget": budget}
        if a in data.answer_nll and u in data.answer_nll:
            d, lo, hi = paired_difference(data.answer_nll[a], data.answer_nll[u])
            entry.update(nll_diff=d, nll_diff_ci95=[lo, hi])
        if a in data.em and u in data.em:
            d, lo, hi = paired_difference(data.em[a], data.em[u])
            entry.update(em_diff=d, em_diff_ci95=[lo, hi])
            d, lo, hi = paired_difference(data.f1[a], data.f1[u])
            entry.update(f1_diff=d, f1_diff_ci95=[lo, hi])
        paired.append(entry)
    spear = [
        {"signal": s, "budget": b, "spearman_all": r[0], "spearman_answer": r[1]}
        for (s, b), r in sorted(data.spearman.items(), key=lambda kv: (kv[0][1], kv[0][0]))
    ]
    questions = max((len(v) for v in data.answer_nll.values()), default=0)
    generated = max((len(v) for v in data.em.values()), default=0)
    return {
        "questions": questions,
        "generated_questions": generated,
        "rungs": list(data.rungs),
        "budgets": list(data.budgets),
        "rows": rows,
        "paired": paired,
        "spearman": spear,
    }
