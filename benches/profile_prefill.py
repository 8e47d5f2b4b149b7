"""Where S1's prefill time goes: cProfile of ``chunkwise.generate``'s prefill for the scheduler
and for every token at rank 32, on the S1 setup of ``benches.lora_overhead`` (SmolLM2-135M,
random r=64 all-linear adapter, a 256-token prompt, one forward).

    python -m benches.profile_prefill [--runs 3] [--top 14]

Prints the plan's chunks and, per variant, the chunkwise functions by cumulative time: compare
``ChunkwiseLinear._deltas`` (the LoRA path) and ``_block_delta``'s call count.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import io
import pstats
import tempfile
from pathlib import Path

import chunkwise as cw
import numpy as np
import torch
from chunkwise.assets.smollm2 import load_smollm2
from chunkwise.eval.benchmarking import random_adapter

from benches.lora_overhead import _fixed, _prompt, _scheduler


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3, help="profiled prefills per variant (default: 3)")
    p.add_argument("--top", type=int, default=14, help="functions shown per variant (default: 14)")
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    base, tok = load_smollm2(progress=False)
    with tempfile.TemporaryDirectory() as d:
        ladder = cw.RankLadder.from_peft(random_adapter(base, 64, Path(d) / "a"))
    variants = {
        "scheduler": cw.inject(copy.deepcopy(base), ladder, _scheduler(64)),
        "rank 32": cw.inject(copy.deepcopy(base), ladder, _fixed(32)),
    }
    ids = _prompt(tok, 256, 1)
    mask = torch.ones_like(ids)
    plan = variants["scheduler"].plan_inputs(ids, mask, None)
    lengths = np.diff(plan.chunk_offsets).tolist()
    print(
        "scheduler chunks (rank x tokens):",
        [f"{r}x{n}" for r, n in zip(plan.chunk_rank, lengths, strict=True)],
    )

    def run(model: cw.ChunkwiseModel) -> None:
        cw.generate(model, ids, mask, max_new_tokens=1, prefill_chunk=None)

    for model in variants.values():  # warm-up
        run(model)
    for name, model in variants.items():
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.runs):
            run(model)
        prof.disable()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("cumtime").print_stats("chunkwise/", args.top)
        print(f"== {name}, {args.runs} prefills\n{out.getvalue()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
