"""``chunkwise bench``: prefill latency and peak memory of base / merged / PEFT / chunkwise on
one model, side by side in one run, as a table (and a PNG with --png)."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from ..errors import InputError
from .loading import add_model_options, load_for_command, load_model

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> None:
    sp = sub.add_parser(
        "bench",
        help="prefill latency and peak memory: base vs merged vs PEFT vs chunkwise",
        description="Time one prefill of --batch x --tokens tokens for the base model, the adapter merged "
        "into it, PEFT unmerged and chunkwise (scheduler plan at --target-rank), rounds interleaved, "
        "medians reported; peak memory per variant. Without --adapter a random all-linear adapter "
        "of --random-rank is made (timing only).",
    )
    add_model_options(sp)
    sp.add_argument("--random-rank", type=int, default=64, help="rank of the random adapter (default: 64)")
    sp.add_argument("--tokens", type=int, default=512, help="tokens per sequence (default: 512)")
    sp.add_argument("--batch", type=int, default=1, help="sequences per prefill (default: 1)")
    sp.add_argument("--rounds", type=int, default=5, help="timing rounds (default: 5)")
    sp.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    sp.add_argument("--png", type=Path, help="write a bar chart here")
    sp.add_argument("--json", type=Path, help="write the results here")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..eval.benchmarking import measure, prefill_variants, random_adapter
    from ..eval.plotting import plot_bars

    for name in ("tokens", "batch", "rounds", "random_rank"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}", name)
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = None
    if args.adapter is None:
        # load the base once, make a random adapter for it, then load as with --adapter
        tmp = tempfile.TemporaryDirectory()
        base, _, _ = load_model(args.model)
        args.adapter = random_adapter(base, args.random_rank, Path(tmp.name) / "random")
        del base
    if args.target_rank is None:
        from ..adapters.ladder import RankLadder

        args.target_rank = RankLadder.from_peft(args.adapter).max_rank / 2
    cwm, tok, clean = load_for_command(args, clean_copy=True)
    assert clean is not None  # asked for
    config: Any = clean.config  # a transformers config
    vocab = int(config.vocab_size)
    batch = torch.randint(0, vocab, (args.batch, args.tokens), generator=torch.Generator().manual_seed(0))
    variants = prefill_variants(clean, args.adapter, cwm, batch)
    results = measure(variants, args.rounds, batch.device)
    with torch.inference_mode(), cwm.use(cwm.top_rung(batch)):
        ref = variants["peft"]()
        err = float((cwm.model(input_ids=batch).logits - ref).norm() / ref.norm())
    mean_rank = cwm.plan_inputs(batch).mean_rank()
    peft_ms, merged_ms = results["peft"]["ms"], results["merged"]["ms"]
    print(f"prefill of {args.batch} x {args.tokens} tokens, {torch.get_num_threads()} threads, "
          f"median of {args.rounds} interleaved rounds; chunkwise mean rank {mean_rank:.1f}")  # fmt: skip
    print(f"{'variant':<10}{'ms':>10}{'vs PEFT':>9}{'vs merged':>11}{'peak MB':>9}")
    for name, r in results.items():
        peak = "-" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}"
        print(f"{name:<10}{r['ms']:>10.1f}{r['ms'] / peft_ms:>9.3f}{r['ms'] / merged_ms:>11.3f}{peak:>9}")
    print(f"top rung vs PEFT: relative error {err:.2e}")
    if args.png is not None:
        title = f"prefill {args.batch}x{args.tokens} tokens, mean rank {mean_rank:.1f}"
        plot_bars(results, title, args.png)
        print(f"plot: {args.png}")
    if args.json is not None:
        record = {"tokens": args.tokens, "batch": args.batch, "mean_rank": mean_rank, "top_rung_rel_err": err}
        args.json.write_text(json.dumps({**record, "variants": results}, indent=2))
    if tmp is not None:
        tmp.cleanup()
    return 0
