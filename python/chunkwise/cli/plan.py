"""``chunkwise plan``: any text cut into chunks and ranks, shown in colour, optionally plotted.

Without ``--model`` difficulty comes from n-gram novelty, word rarity and position over words
(no torch, no download); with ``--model`` from a language model's entropy and surprisal in its
own tokens. ``chunkwise demo --no-model`` runs the same on the bundled sample text.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ChunkwiseError
from ..schedule import DEFAULT_RUNGS, Plan, Scheduler, SchedulerConfig
from .render import add_color_option, legend, render_chunks, render_plan, use_color

__all__ = ["add_parser", "add_plan_options", "plan_text", "positive_int", "run", "word_tokenize"]

_TOKEN = re.compile(r"\w+|[^\w\s]")


def word_tokenize(text: str) -> list[str]:
    """Splits text into words and punctuation marks (a stand-in until a model's tokenizer)."""
    return _TOKEN.findall(text)


def positive_int(v: str) -> int:
    """argparse type: an integer >= 1."""
    n = int(v)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{v} is not a positive integer")
    return n


def add_plan_options(sp: argparse.ArgumentParser) -> None:
    """The options that shape a text plan (shared by ``plan`` and ``demo``)."""
    sp.add_argument(
        "--rungs",
        type=int,
        nargs="+",
        default=list(DEFAULT_RUNGS),
        help="ranks of the ladder, strictly increasing (default: %(default)s)",
    )
    sp.add_argument("--min-len", type=positive_int, default=4, help="shortest chunk in tokens (default: 4)")
    sp.add_argument("--max-len", type=positive_int, default=48, help="longest chunk in tokens (default: 48)")
    sp.add_argument(
        "--granularity",
        type=positive_int,
        default=4,
        help="chunk boundaries fall on multiples of this many tokens; --min-len and --max-len must "
        "be multiples of it (default: 4)",
    )
    sp.add_argument(
        "--penalty",
        type=float,
        default=0.15,
        help="segmentation cost per chunk; larger gives fewer chunks (default: 0.15)",
    )
    sp.add_argument(
        "--crossfade", type=int, default=2, help="tokens of cross-fade after a rank change (default: 2)"
    )
    sp.add_argument(
        "--ema",
        type=float,
        default=0.5,
        help="EMA weight of the newest difficulty; 1 disables smoothing (default: 0.5)",
    )
    sp.add_argument(
        "--mode",
        choices=("quantile", "threshold"),
        default="quantile",
        help="rung per chunk from quantiles of the text's difficulty (equal token "
        "shares per rung) or from fixed thresholds (default: %(default)s)",
    )
    sp.add_argument("--png", type=Path, help="also plot difficulty and ranks per token into this PNG")
    add_color_option(sp, "chunks")


def add_parser(sub: Any) -> None:
    sp = sub.add_parser("plan", help="plan a text file (or '-' for stdin): chunks and ranks")
    sp.add_argument("file", help="text file to plan, or '-' for standard input")
    sp.add_argument(
        "--model",
        nargs="?",
        const="smollm2",
        help="difficulty from a language model's entropy and surprisal, in its own tokens: --model alone "
        "uses SmolLM2-135M-Instruct, --model DIR a local transformers folder (default: no model; "
        "n-gram novelty, word rarity and position over words)",
    )
    add_plan_options(sp)


def _config(args: argparse.Namespace, weights: dict[str, float] | None) -> SchedulerConfig:
    return SchedulerConfig(
        rungs=tuple(args.rungs),
        min_len=args.min_len,
        max_len=args.max_len,
        granularity=args.granularity,
        chunk_penalty=args.penalty,
        crossfade=min(args.crossfade, args.min_len),
        ema=args.ema,
        mode=args.mode,
        weights=weights,
    )


def _timed_plan(sched: Scheduler, ids: np.ndarray, **signals: Any) -> tuple[Plan, float]:
    """The plan and the median of 5 planning times in ms (the first call also starts threads)."""
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        plan = sched.plan(ids, **signals)
        times.append(time.perf_counter() - t0)
    return plan, float(np.median(times)) * 1e3


def _show(rendered: str, plan: Plan, ms: float, args: argparse.Namespace, source: str) -> int:
    color = use_color(args.color, sys.stdout)
    print(rendered)
    print()
    print(legend(plan, color))
    print(plan.summary())
    print(
        f"planned in {ms:.3f} ms (Rust core, {plan.n_tokens} tokens, median of 5; difficulty from {source})"
    )
    if args.png is not None:
        from ..eval.plotting import plot_plan

        print(f"plot: {plot_plan(plan, args.png)}")
    return 0


def plan_text(text: str, args: argparse.Namespace) -> int:
    """Plans ``text`` as the options in ``args`` say, prints it in colour; the exit status."""
    if getattr(args, "model", None) is not None:
        return _plan_with_model(text, args)
    words = word_tokenize(text)
    if not words:
        raise ChunkwiseError("text: no tokens in the input", "text")
    vocab: dict[str, int] = {}
    ids = np.array([vocab.setdefault(w.lower(), len(vocab)) for w in words], dtype=np.int64)
    counts = Counter(ids.tolist())
    unigram = np.array([counts[i] for i in range(len(vocab))], dtype=np.float64)
    sched = Scheduler(
        _config(args, {"novelty": 1.0, "rarity": 1.0, "position": 0.25}), unigram_counts=unigram
    )
    plan, ms = _timed_plan(sched, ids)
    rendered = render_plan(words, plan, use_color(args.color, sys.stdout))
    return _show(rendered, plan, ms, args, "n-gram novelty, word rarity and position")


def _plan_with_model(text: str, args: argparse.Namespace) -> int:
    """Plans ``text`` in the model's own tokens, difficulty from its entropy and surprisal."""
    from ..nn import next_token_signals
    from .loading import load_model

    model, tok, _ = load_model(None if args.model == "smollm2" else Path(args.model))
    ids = tok(text, return_tensors="pt").input_ids[0]
    if len(ids) == 0:
        raise ChunkwiseError("text: no tokens in the input", "text")
    entropy, surprisal = next_token_signals(model, ids)
    sched = Scheduler(_config(args, {"entropy": 1.0, "surprisal": 1.0}))
    plan, ms = _timed_plan(sched, ids.numpy().astype(np.int64), entropy=entropy, surprisal=surprisal)
    bounds = plan.chunk_offsets.tolist()
    texts = [tok.decode(ids[lo:hi]) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
    rendered = render_chunks(texts, plan, use_color(args.color, sys.stdout), sep="")
    return _show(rendered, plan, ms, args, "the model's entropy and surprisal")


def run(args: argparse.Namespace) -> int:
    try:
        text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text(encoding="utf-8")
    except OSError as e:
        print(f"chunkwise: cannot read {args.file}: {e.strerror}", file=sys.stderr)
        return 2
    return plan_text(text, args)
