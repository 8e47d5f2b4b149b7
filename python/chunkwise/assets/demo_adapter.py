"""The demo's adapter: a small LoRA for SmolLM2 trained in about a minute on the bundled sample
text, cached after the first run (``<cache>/demo-adapter-r16``), so ``chunkwise demo`` needs no
manual step and no data download. Seeded: the same adapter on every machine up to float noise.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from ..adapters.files import CONFIG_FILE, WEIGHTS_FILE

__all__ = ["DEMO_RANK", "demo_adapter"]

DEMO_RANK = 16
_STEPS = 30
_BLOCK = 64


def demo_adapter(
    model: torch.nn.Module, tokenizer: Any, text: str, cache: Path, progress: bool = True
) -> Path:
    """The folder of the demo adapter for ``model`` (trained on ``text`` if not cached yet)."""
    folder = cache / f"demo-adapter-r{DEMO_RANK}-v2"  # v2: gentler training (lr 3e-4)
    if (folder / CONFIG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file():
        return folder
    from peft import LoraConfig, get_peft_model
    from tqdm.auto import tqdm

    torch.manual_seed(0)
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    n = max(1, (len(ids) - 1) // _BLOCK)
    blocks = ids[: n * _BLOCK].view(n, _BLOCK)
    lora = LoraConfig(r=DEMO_RANK, lora_alpha=2 * DEMO_RANK, target_modules=["q_proj", "v_proj", "o_proj"])
    pm = get_peft_model(copy.deepcopy(model), lora)
    pm.train()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=3e-4)
    for step in tqdm(
        range(_STEPS), desc="training the demo adapter (once)", disable=not progress, leave=False
    ):
        batch = blocks[step % n : step % n + 1]
        loss = pm(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    pm.eval()
    tmp = folder.with_name(folder.name + ".tmp")
    pm.save_pretrained(str(tmp))
    (tmp / "demo.json").write_text(
        json.dumps({"steps": _STEPS, "block": _BLOCK, "final_loss": float(loss.detach())})
    )
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder
