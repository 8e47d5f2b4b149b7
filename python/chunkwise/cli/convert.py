"""``chunkwise convert``: a PEFT LoRA folder → its rank ladder (chunkwise_ladder.safetensors),
with how much of each module's update every rung keeps."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..adapters.files import LADDER_FILE
from ..errors import AdapterError

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


def run(args: argparse.Namespace) -> int:
    from ..adapters.ladder import RankLadder

    if not args.adapter.is_dir():
        raise AdapterError(f"adapter: {args.adapter} is not a folder", "adapter")
    ladder = RankLadder.from_peft(args.adapter)
    out = ladder.save(args.out if args.out is not None else args.adapter)
    ranks = sorted({m.rank for m in ladder.modules.values()})
    print(f"{len(ladder.modules)} modules, ranks {ranks}, {len(ladder.saved)} saved tensors -> {out}")
    print("rank  update energy kept (mean over modules)")
    k = 1
    while k < ladder.max_rank:
        print(f"{k:>4}  {100 * ladder.energy(k):6.2f} %")
        k *= 2
    print(f"{ladder.max_rank:>4}  {100 * ladder.energy(ladder.max_rank):6.2f} %")
    return 0
