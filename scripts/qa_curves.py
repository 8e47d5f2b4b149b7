#!/usr/bin/env python3
"""Rank-quality curves of the QA adapter (issue 11): uniform truncation, the scheduler with each
signal alone and mixed, a random allocation (control) and an oracle allocation (headroom) at
mean ranks 4, 8, 16, 32 of 64, on held-out squaddev articles only.

Teacher-forced answer NLL on ``--nll-questions`` held-out questions (0: all), greedy EM / F1 on
``--gen-questions`` of them at ``--gen-budgets``, paired bootstrap 95 % intervals against uniform,
and the Spearman correlation of each signal with the oracle gain. The adapter is trained first
if ``--adapter`` does not hold it (``scripts/train_qa_adapter.py``, same seed and split).

Writes ``--out`` (JSON: the ``"qa"`` section of docs/results.json plus its provenance);
``scripts/results.py`` reads it. The LM adapter's perplexity curves are ``scripts/ppl_curves.py``.

Example (about 90 minutes on 2 cores in bfloat16)::

    python scripts/qa_curves.py --adapter adapters/smollm2-qa-r64 --out docs/qa_curves.json
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
from train_adapter import HelpFormatter, available_cores, environment, log
from train_qa_adapter import held_out_split


def ints(text: str) -> tuple[int, ...]:
    return tuple(int(t) for t in text.split(",") if t.strip())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="qa_curves.py", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--adapter", type=Path, default=Path("adapters/smollm2-qa-r64"), help="the QA adapter")
    p.add_argument("--out", type=Path, default=Path("docs/qa_curves.json"), help="results JSON")
    p.add_argument("--nll-questions", type=int, default=0, help="held-out questions for answer NLL (0: all)")
    p.add_argument("--gen-questions", type=int, default=300, help="held-out questions for EM / F1")
    p.add_argument("--budgets", type=ints, default=(4, 8, 16, 32), help="mean-rank budgets (rungs)")
    p.add_argument("--gen-budgets", type=ints, default=(8, 16), help="budgets with EM / F1")
    p.add_argument("--gen-signals", default="mix,energy", help="adaptive signals generated with")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="model and ladder dtype")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per teacher-forced forward")
    p.add_argument("--eval-fraction", type=float, default=0.2, help="must match the adapter's split")
    p.add_argument("--split-seed", type=int, default=0, help="must match the adapter's split")
    p.add_argument("--seed", type=int, default=0, help="seed of the question sample and the random control")
    p.add_argument("--threads", type=int, default=available_cores(), help="torch intra-op threads")
    p.add_argument("--cache-dir", type=Path, default=None, help="chunkwise cache")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.nll_questions < 0 or args.gen_questions < 0 or args.batch_size < 1:
        p.error("--nll-questions / --gen-questions must be >= 0 and --batch-size >= 1")
    if not set(args.gen_budgets) <= set(args.budgets):
        p.error(f"--gen-budgets {args.gen_budgets} must be among --budgets {args.budgets}")
    return args


def ensure_adapter(args: argparse.Namespace) -> dict[str, Any]:
    """The adapter's training summary; trains it (seeded) when it is missing."""
    summary = args.adapter / "training_summary.json"
    if not summary.is_file():
        import train_qa_adapter

        log(f"{args.adapter} has no adapter: training it (about an hour)")
        flags = ["--out", str(args.adapter), "--eval-fraction", str(args.eval_fraction)]
        flags += ["--split-seed", str(args.split_seed)]
        if train_qa_adapter.main(flags + (["--no-progress"] if args.no_progress else [])) != 0:
            raise SystemExit("training the QA adapter failed")
    return json.loads(summary.read_text())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    import chunkwise as cw
    from chunkwise.assets.corpora import squad_examples
    from chunkwise.assets.smollm2 import load_smollm2
    from chunkwise.eval.curves import QaItem, answer_curves, generation_curves, summarize
    from chunkwise.eval.qa import qa_ids
    from chunkwise.schedule.config import rungs_for
    from tqdm.auto import tqdm

    trained = ensure_adapter(args)
    train_q, held_q = held_out_split(args.cache_dir, args.eval_fraction, args.split_seed)
    if sorted({q["title"] for q in held_q}) != trained["data"]["held_out_titles"]:
        raise SystemExit("held-out articles differ from the adapter's: check --eval-fraction / --split-seed")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model, tokenizer = load_smollm2(dtype, cache_dir=args.cache_dir, progress=not args.no_progress)
    ladder = cw.RankLadder.from_peft(args.adapter)
    config = cw.SchedulerConfig(rungs=rungs_for(ladder.max_rank))
    cwm = cw.inject(model, ladder, cw.Scheduler(config))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    # unigram counts (the rarity signal) from the training side only
    counts = np.zeros(len(tokenizer), np.float64)
    for q in train_q + squad_examples(args.cache_dir, shift="new_wiki"):
        np.add.at(counts, np.asarray(qa_ids(tokenizer, q).ids), 1.0)

    def item(q: dict[str, Any]) -> QaItem:
        e = qa_ids(tokenizer, q)
        return QaItem(np.asarray(e.ids, np.int64), len(e.prompt), tuple(q["answers"]))

    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(held_q))
    nll_q = [held_q[i] for i in sorted(order[: args.nll_questions or len(held_q)])]
    gen_q = [held_q[i] for i in sorted(order[: args.gen_questions])]
    log(f"{len(nll_q)} questions for answer NLL, {len(gen_q)} for EM / F1 ({len(held_q)} held out)")

    t0 = time.perf_counter()
    with tqdm(total=len(nll_q), desc="answer NLL", unit="q", disable=args.no_progress) as bar:
        items = [item(q) for q in nll_q]
        data = answer_curves(
            cwm, items, config, args.budgets, counts, args.batch_size, pad, args.seed, bar.update
        )
    t_nll = time.perf_counter() - t0
    log(f"answer NLL curves: {t_nll:.0f} s")
    t0 = time.perf_counter()
    if gen_q:
        signals = tuple(s.strip() for s in args.gen_signals.split(",") if s.strip())
        with tqdm(total=len(gen_q), desc="EM / F1", unit="q", disable=args.no_progress) as bar:
            generation_curves(
                cwm, tokenizer, [item(q) for q in gen_q], config, args.gen_budgets, signals, counts,
                seed=args.seed, into=data, progress=bar.update,
            )  # fmt: skip
    t_gen = time.perf_counter() - t0
    log(f"EM / F1 curves: {t_gen:.0f} s")

    out = summarize(data)
    out["setup"] = {
        "adapter": str(args.adapter),
        "adapter_training": {
            k: trained[k] for k in ("args", "answer_nll_before", "answer_nll_after", "data")
        },
        "ladder_energy": {str(r): ladder.energy(r) for r in config.rungs},
        "dtype": args.dtype,
        "held_out_questions": len(held_q),
        "seed": args.seed,
        "seconds": {"answer_nll": t_nll, "generation": t_gen, "total": time.perf_counter() - t_start},
        "environment": environment(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    log(f"wrote {args.out}")
    for r in out["rows"]:
        em = "" if r["em"] is None else f" EM {r['em']:.1f} F1 {r['f1']:.1f}"
        nll = "" if r["answer_nll"] is None else f" nll {r['answer_nll']:.4f}"
        mr = r["mean_rank"] if r["mean_rank"] is not None else r["gen_mean_rank"]
        print(f"{r['mode']:9s} {r['signal'] or '':10s} b={r['budget'] or '':<3} rank {mr:6.2f}{nll}{em}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
