"""``chunkwise eval``: perplexity or SQuAD EM/F1 of one or more modes (base / full / uniform /
adaptive) of an adapted model, on held-out real data or on files you give."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..errors import InputError
from .loading import add_model_options, load_for_command

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> None:
    sp = sub.add_parser(
        "eval",
        help="perplexity or SQuAD EM/F1 of base / full / uniform / adaptive ranks",
        description="Evaluate modes of one model: base (no adapter), full (top rung, = PEFT), uniform "
        "(every token at --rank) and adaptive (per-chunk ranks aiming at --target-rank). Default data: "
        "held-out English Wikipedia (ppl) or SQuAD v1.1 dev (squad) from the bigbench sdist.",
    )
    sp.add_argument("task", choices=("ppl", "squad"), help="what to measure")
    add_model_options(sp)
    sp.add_argument(
        "--modes",
        default="base,full,adaptive",
        help="comma-separated modes to run, of base, full, uniform, adaptive (default: %(default)s)",
    )
    sp.add_argument("--rank", type=int, help="the rank of the uniform mode (default: adaptive's mean rank)")
    sp.add_argument("--text", type=Path, help="ppl: a UTF-8 text file instead of held-out Wikipedia")
    sp.add_argument("--tokens", type=int, default=4096, help="ppl: tokens evaluated (default: 4096)")
    sp.add_argument("--window", type=int, default=512, help="ppl: tokens per window (default: 512)")
    sp.add_argument("--stride", type=int, default=256, help="ppl: tokens scored per window (default: 256)")
    sp.add_argument("--squad-file", type=Path, help="squad: a SQuAD v1.1 JSON file instead of the dev set")
    sp.add_argument("--questions", type=int, default=100, help="squad: questions asked (default: 100)")
    sp.add_argument("--no-progress", action="store_true", help="no progress bars")
    sp.add_argument("--json", type=Path, help="also write the results here")


def _text_ids(args: argparse.Namespace, tok: Any) -> Any:
    if args.text is not None:
        try:
            text = args.text.read_text(encoding="utf-8")
        except OSError as e:
            raise InputError(f"--text: cannot read {args.text}: {e.strerror}", "text") from None
    else:
        from ..assets.corpora import split_by_article, wikipedia_articles

        # the held-out split of scripts/train_adapter.py: never trained on
        _, held_out = split_by_article(wikipedia_articles("en"), "title", eval_fraction=0.2, seed=0)
        text = "\n\n".join(a.text for a in held_out)
    ids = tok(text, return_tensors="pt").input_ids[0][: args.tokens]
    if len(ids) < 2:
        raise InputError("--text: fewer than 2 tokens to evaluate", "text")
    return ids


def _questions(args: argparse.Namespace) -> list[dict[str, Any]]:
    from ..assets.corpora import parse_squad, squad_examples

    if args.squad_file is not None:
        try:
            examples = parse_squad(json.loads(args.squad_file.read_text(encoding="utf-8")))
        except OSError as e:
            raise InputError(
                f"--squad-file: cannot read {args.squad_file}: {e.strerror}", "squad_file"
            ) from None
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise InputError(f"--squad-file: not SQuAD v1.1 JSON ({e})", "squad_file") from None
    else:
        examples = squad_examples()
    if not examples:
        raise InputError("--squad-file: no questions", "squad_file")
    step = max(1, len(examples) // args.questions)  # spread over the articles
    return examples[::step][: args.questions]


def run(args: argparse.Namespace) -> int:
    from ..eval.evaluation import MODES, perplexity, squad

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise InputError(f"--modes: unknown {bad or modes}; choose from {', '.join(MODES)}", "modes")
    for name in ("tokens", "window", "stride", "questions"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name}: must be >= 1, got {getattr(args, name)}", name)
    model, tok, _ = load_for_command(args)
    ids = _text_ids(args, tok) if args.task == "ppl" else None
    questions = _questions(args) if args.task != "ppl" else []
    results = []
    adaptive_mean = None
    for mode in sorted(modes, key=lambda m: m != "adaptive"):  # adaptive first: uniform matches it
        rank = args.target_rank if mode == "adaptive" else args.rank
        if mode == "uniform" and rank is None:
            if adaptive_mean is None:
                raise InputError("--rank: the uniform mode needs --rank (or run adaptive too)", "rank")
            rank = max(1, round(adaptive_mean))
        common = dict(mode=mode, rank=rank, progress=not args.no_progress)
        if ids is not None:
            r = perplexity(model, ids, window=args.window, stride=args.stride, **common)
            line = f"ppl {r.ppl:.3f}"
        else:
            r = squad(model, tok, questions, **common)
            line = f"EM {r.exact_match:.1f}  F1 {r.f1:.1f}"
        if mode == "adaptive":
            adaptive_mean = r.mean_rank
        results.append(r)
        print(f"{mode:<9} mean rank {r.mean_rank:6.2f}  {line}  ({r.seconds:.1f} s, {r.tokens} tokens)")
        sys.stdout.flush()
    if args.json is not None:
        args.json.write_text(json.dumps([r.__dict__ for r in results], indent=2))
    return 0
