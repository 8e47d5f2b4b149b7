"""A rank ladder written back as an ordinary PEFT LoRA folder, for consumers that read only PEFT.

Every module's ``lora_A`` is the ladder's A' [r, in] and its ``lora_B`` the ladder's B' [out, r]
(the scaling is already folded in), and the config sets ``lora_alpha = r`` for every module so
PEFT's scale is 1. PEFT, vLLM or anything else that loads LoRA folders then applies exactly the
ladder's update, and the folder's rank-k prefixes are its best rank-k truncations
(Eckart–Young). Cut to ``rank`` k, the folder is that truncation itself. The same modules are
adapted (the config's target_modules, exclusions and layer choices are kept), ``lora_B.bias``
and ``modules_to_save`` tensors are carried over, and the ladder is saved beside the PEFT files
so chunkwise reads the folder without re-factoring it.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import AdapterError
from .files import CONFIG_FILE, LADDER_FILE, PICKLE_WEIGHTS_FILE, WEIGHTS_FILE, atomic_write
from .settings import settings_from_dict
from .weights import KEY_PREFIX

if TYPE_CHECKING:
    from .ladder import RankLadder

__all__ = ["peft_config", "peft_tensors", "write_peft"]


def peft_config(ladder: RankLadder) -> dict:
    """The ``adapter_config.json`` of ``ladder`` as a PEFT folder: its adapter's own config with
    ``r`` the largest module rank, ``lora_alpha`` equal to it and, for modules of another rank,
    ``rank_pattern`` and ``alpha_pattern`` entries (the module's full name, escaped: PEFT matches
    patterns as suffixes of full names) that keep the scale at 1; no rsLoRA."""
    top = ladder.max_rank
    config = dict(ladder.config)
    if config.get("peft_type") is None:  # a ladder built in memory: name its modules exactly
        config.update(peft_type="LORA", target_modules=sorted(ladder.modules), task_type=None)
    # longest names first: a pattern also matches the names it is a suffix of, and PEFT takes
    # the first pattern that matches
    other = sorted(
        ((mod, m.rank) for mod, m in ladder.modules.items() if m.rank != top), key=lambda x: -len(x[0])
    )
    config.update(
        r=top,
        lora_alpha=top,
        use_rslora=False,
        rank_pattern={re.escape(mod): rank for mod, rank in other},
        alpha_pattern={re.escape(mod): rank for mod, rank in other},
    )
    return config


def peft_tensors(ladder: RankLadder) -> dict[str, torch.Tensor]:
    """The ``adapter_model.safetensors`` tensors of ``ladder`` as a PEFT folder (the keys
    ``save_pretrained`` writes), contiguous in the ladder's dtype."""
    keys = {"a": "lora_A.weight", "b": "lora_B.weight", "bias": "lora_B.bias"}
    return ladder.flat_tensors(
        {part: f"{KEY_PREFIX}{{}}.{key}" for part, key in keys.items()}, f"{KEY_PREFIX}{{}}"
    )


def write_peft(
    ladder: RankLadder, path: str | Path, rank: int | None = None, *, overwrite: bool = False
) -> Path:
    """Writes ``ladder`` (cut to its rank-``rank`` prefixes if ``rank`` is given) into folder
    ``path`` as a PEFT LoRA adapter: ``adapter_config.json``, ``adapter_model.safetensors`` and
    the ladder beside them. Returns ``path``.

    A folder that already holds an adapter or a ladder is refused (:class:`AdapterError`) unless
    ``overwrite``, so a source adapter is never replaced by mistake; ``rank`` outside 1..max_rank
    is an :class:`InputError`. Each file is written whole or not at all.
    """
    from safetensors.torch import save_file

    if rank is not None:
        ladder = ladder.truncated(rank)
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise AdapterError(f"path: {path} exists and is not a folder", "path")
    present = [
        f for f in (CONFIG_FILE, WEIGHTS_FILE, PICKLE_WEIGHTS_FILE, LADDER_FILE) if (path / f).exists()
    ]
    if present and not overwrite:
        raise AdapterError(
            f"path: {path} already holds {', '.join(present)}; choose an empty folder or pass "
            "overwrite=True (--force) to replace them",
            "path",
        )
    path.mkdir(parents=True, exist_ok=True)
    config = peft_config(ladder)
    # the ladder beside the files carries their config, so chunkwise reads what PEFT reads
    ladder = dataclasses.replace(
        ladder, config=config, settings=settings_from_dict(config, str(path / CONFIG_FILE))
    )
    tensors = peft_tensors(ladder)
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"

    def write_text(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    # an older adapter_model.bin would sit beside the new tensors unused (safetensors is read
    # first) but mislead whoever lists the folder
    (path / PICKLE_WEIGHTS_FILE).unlink(missing_ok=True)
    atomic_write(path / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    ladder.save(path)
    atomic_write(path / CONFIG_FILE, write_text)  # last: a folder with a config is complete
    return path
