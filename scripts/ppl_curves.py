#!/usr/bin/env python3
"""Rank-perplexity curves of the Wikipedia LM adapter (issue 11, the ``"ppl"`` section of
docs/results.json): uniform truncation, the scheduler with each signal alone and mixed, a random
allocation (control) and an oracle allocation (headroom) at mean ranks 4, 8, 16, 32 of 64, on the
held-out articles of the adapter's own split.

The held-out text is the stream ``scripts/train_adapter.py`` evaluated (its articles tokenized
and joined by end-of-text), cut into windows of 512 tokens 256 apart, each scoring its last 256
(:func:`chunkwise.eval.curves.window_items`), so the mean "answer NLL" of the curves is the mean
NLL per scored token and ``ppl = exp(nll)``. The rarity signal counts tokens of the adapter's
training articles only. Paired bootstrap 95 % intervals are over windows.

Writes ``--out`` (JSON, read by ``scripts/results.py``). Example (about 30 minutes on 2 cores)::

    python scripts/ppl_curves.py --adapter adapters/smollm2-wiki-r64 --out docs/ppl_curves.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from qa_curves import ints
from train_adapter import HelpFormatter, available_cores, environment, load_articles, log, token_stream

WINDOW, SCORED = 512, 256


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ppl_curves.py", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument(
        "--adapter",
        type=Path,
        default=Path("adapters/smollm2-wiki-r64"),
        help="the LM adapter (train_adapter.py)",
    )
    p.add_argument("--out", type=Path, default=Path("docs/ppl_curves.json"), help="results JSON")
    p.add_argument("--tokens", type=int, default=8192, help="held-out tokens scored (a multiple of 256)")
    p.add_argument("--budgets", type=ints, default=(4, 8, 16, 32), help="mean-rank budgets (rungs)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="fp32", help="model and ladder dtype")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward")
    p.add_argument("--seed", type=int, default=0, help="seed of the random control")
    p.add_argument("--threads", type=int, default=available_cores(), help="torch intra-op threads")
    p.add_argument("--cache-dir", type=Path, default=None, help="chunkwise cache")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.tokens < SCORED or args.tokens % SCORED or args.batch_size < 1:
        p.error(f"--tokens must be a positive multiple of {SCORED} (got {args.tokens}) and --batch-size >= 1")
    return args


def adapter_split(args: argparse.Namespace) -> tuple[dict[str, Any], list[Any], list[Any]]:
    """The adapter's training summary and its (train, held-out) articles, checked against the
    held-out titles it recorded."""
    summary = args.adapter / "training_summary.json"
    if not summary.is_file():
        raise SystemExit(
            f"{args.adapter} holds no trained adapter: run "
            f"python scripts/train_adapter.py --out {args.adapter} (about 30 minutes)"
        )
    trained = json.loads(summary.read_text())
    split = argparse.Namespace(**{**trained["args"], "cache_dir": args.cache_dir})
    train, held = load_articles(split)
    if [a.title for a in held][: len(trained["data"]["eval_titles"])] != trained["data"]["eval_titles"]:
        raise SystemExit(f"held-out articles differ from those {args.adapter} recorded")
    return trained, train, held


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    import chunkwise as cw
    from chunkwise.assets.smollm2 import load_smollm2
    from chunkwise.eval.curves import answer_curves, summarize, window_items
    from chunkwise.schedule.config import rungs_for
    from tqdm.auto import tqdm

    trained, train, held = adapter_split(args)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model, tokenizer = load_smollm2(dtype, cache_dir=args.cache_dir, progress=not args.no_progress)
    endoftext = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    separator = endoftext if isinstance(endoftext, int) and endoftext >= 0 else tokenizer.eos_token_id
    ladder = cw.RankLadder.from_peft(args.adapter)
    config = cw.SchedulerConfig(rungs=rungs_for(ladder.max_rank))
    lm = cw.inject(model, ladder, cw.Scheduler(config))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else separator

    counts = np.bincount(token_stream(tokenizer, train, separator).numpy(), minlength=len(tokenizer))
    stream = token_stream(tokenizer, held, separator).numpy()[: args.tokens + WINDOW - SCORED]
    windows = window_items(stream, WINDOW, SCORED)
    log(f"{len(windows)} windows, {SCORED * len(windows)} held-out tokens scored ({len(held)} articles)")

    t0 = time.perf_counter()
    with tqdm(total=len(windows), desc="perplexity", unit="win", disable=args.no_progress) as bar:
        data = answer_curves(
            lm, windows, config, args.budgets, counts.astype(np.float64), args.batch_size, pad, args.seed,
            bar.update,
        )  # fmt: skip
    out = summarize(data)
    for r in out["rows"]:
        r["ppl"] = float(np.exp(r["answer_nll"]))
    out["setup"] = {
        "adapter": str(args.adapter),
        "adapter_training": {k: trained[k] for k in ("args", "perplexity_before", "perplexity_after")},
        "tokens_scored": SCORED * len(windows),
        "windows": f"{WINDOW} tokens, {SCORED} apart, the last {SCORED} scored",
        "rarity_counts": "tokens of the adapter's training articles",
        "ladder_energy": {str(r): ladder.energy(r) for r in config.rungs},
        "dtype": args.dtype,
        "seed": args.seed,
        "seconds": {"curves": time.perf_counter() - t0, "total": time.perf_counter() - t_start},
        "environment": environment(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    log(f"wrote {args.out}")
    for r in out["rows"]:
        print(
            f"{r['mode']:9s} {r['signal'] or '':10s} b={r['budget'] or '':<3} "
            f"rank {r['mean_rank']:6.2f} ppl {r['ppl']:.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
