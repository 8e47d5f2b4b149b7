"""``chunkwise convert``: a PEFT LoRA folder → its rank ladder (chunkwise_ladder.safetensors),
with how much of each module's update every rung keeps; with ``--peft-out``, the ladder also
written as a plain PEFT LoRA folder (optionally cut to ``--rank``) for PEFT-only consumers."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..adapters.files import LADDER_FILE
from ..errors import AdapterError, InputError

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> None:
    sp = sub.add_parser(
        "convert",
        help="turn a PEFT LoRA adapter into a rank ladder",
        description="Factor every adapted module's update s·B·A into nested SVD factors (float64) and "
        f"save them as {LADDER_FILE}, beside the adapter unless --out says otherwise. "
        "Later commands read the ladder instead of re-factoring.",
    )
    sp.add_argument("adapter", type=Path, help="PEFT adapter folder (adapter_config.json + weights)")
    sp.add_argument("--out", type=Path, help="folder to write the ladder into (default: the adapter folder)")
    sp.add_argument(
        "--peft-out",
        type=Path,
        metavar="DIR",
        help="also write the ladder as an ordinary PEFT LoRA folder (lora_A = A', lora_B = B', scale 1) "
        "that PEFT or vLLM load as they load any adapter; its rank prefixes are the best truncations",
    )
    sp.add_argument(
        "--rank",
        type=int,
        metavar="K",
        help="with --peft-out: write the best rank-K truncation instead of the full adapter",
    )
    sp.add_argument("--force", action="store_true", help="with --peft-out: replace an adapter already in DIR")


def run(args: argparse.Namespace) -> int:
    from ..adapters.ladder import RankLadder

    if not args.adapter.is_dir():
        raise AdapterError(f"adapter: {args.adapter} is not a folder", "adapter")
    if args.peft_out is None and (args.rank is not None or args.force):
        raise InputError(
            "--rank and --force: only with --peft-out", "rank" if args.rank is not None else "force"
        )
    ladder = RankLadder.from_peft(args.adapter)
    if args.peft_out is not None:
        rank = ladder.max_rank if args.rank is None else ladder.check_rank(args.rank)  # before any write
        if args.peft_out.resolve() == args.adapter.resolve():
            raise AdapterError("--peft-out: is the adapter folder itself; choose another folder", "peft_out")
    out = ladder.save(args.out if args.out is not None else args.adapter)
    ranks = sorted({m.rank for m in ladder.modules.values()})
    print(f"{len(ladder.modules)} modules, ranks {ranks}, {len(ladder.saved)} saved tensors -> {out}")
    print("rank  update energy kept (mean over modules)")
    k = 1
    while k < ladder.max_rank:
        print(f"{k:>4}  {100 * ladder.energy(k):6.2f} %")
        k *= 2
    print(f"{ladder.max_rank:>4}  {100 * ladder.energy(ladder.max_rank):6.2f} %")
    if args.peft_out is not None:
        ladder.to_peft(args.peft_out, args.rank, overwrite=args.force)
        print(
            f"PEFT LoRA folder, rank {rank} ({100 * ladder.energy(rank):.2f} % of the update energy) "
            f"-> {args.peft_out}"
        )
    return 0
