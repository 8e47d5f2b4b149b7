"""Fuzz targets on the torch side: ``RankLadder.from_peft`` / ``load`` on damaged files,
``inject`` (transactional: a refused inject leaves the model as it was) and ``generate`` on
tiny random models with good and bad options. The models and adapters are built once per
process (no hub access) and every call works on copies or fresh files.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

import chunkwise as cw
import numpy as np
import torch
from chunkwise import kv

from tests.support.peft_helpers import VOCAB, make_adapter, snapshot, tiny_model

from .schedule_targets import check, make_scheduler
from .values import Draw

__all__ = ["TORCH_TARGETS"]

torch.set_grad_enabled(False)
torch.set_num_threads(1)


@cache
def workspace() -> Path:
    return Path(tempfile.mkdtemp(prefix="chunkwise-fuzz-"))


@cache
def base(arch: str = "llama") -> torch.nn.Module:
    return tiny_model(arch, hidden=16)


@cache
def adapter_dirs() -> list[Path]:
    """PEFT adapters of the tiny llama: plain, with rank_pattern, with lora_bias, all-linear."""
    out = []
    variants: list[dict[str, Any]] = [
        {"target_modules": ["q_proj", "v_proj"]},
        {
            "target_modules": ["q_proj", "down_proj"],
            "rank_pattern": {"down_proj": 2},
            "alpha_pattern": {"q_proj": 3},
        },
        {"target_modules": ["k_proj"], "lora_bias": True},
        {"target_modules": "all-linear", "r": 8, "lora_alpha": 16},
    ]
    for i, kw in enumerate(variants):
        path = workspace() / f"adapter{i}"
        make_adapter(base(), path, seed=i + 1, **kw)
        out.append(path)
    return out


@cache
def ladders() -> list[cw.RankLadder]:
    return [cw.RankLadder.from_peft(p) for p in adapter_dirs()]


def fresh_dir(d: Draw, src: Path) -> Path:
    dst = Path(tempfile.mkdtemp(dir=workspace()))
    for f in src.iterdir():
        shutil.copy(f, dst / f.name)
    return dst


CONFIG_EDITS: dict[str, list[Any]] = {
    "r": [0, -1, 2**40, 4.5, "4", None, True],
    "lora_alpha": [float("nan"), float("inf"), -8, 0, "8", None, 1e308],
    "target_modules": [["nope"], "(", "[", 5, None, [], ["q_proj", 3], ".*"],
    "exclude_modules": ["(", 3, ["q_proj"]],
    "rank_pattern": [["q_proj"], {"(": 2}, {"q_proj": -1}, {"q_proj": "x"}, "x"],
    "alpha_pattern": [{"q_proj": float("nan")}, {"[": 1}, 3],
    "lora_bias": ["yes", 1, None],
    "use_dora": [True],
    "use_rslora": ["x", True],
    "fan_in_fan_out": [True, "no"],
    "peft_type": ["IA3", None, 3],
    "layers_to_transform": [[0], "x", [99], 0],
    "modules_to_save": [["lm_head"], "x", [3]],
}


def flip_bytes(d: Draw, file: Path) -> None:
    """Overwrites 1 to 8 random bytes of ``file`` with random values."""
    data = bytearray(file.read_bytes())
    for _ in range(d.int(1, 8)):
        data[d.int(0, len(data) - 1)] = d.int(0, 255)
    file.write_bytes(bytes(data))


def damage_config(d: Draw, folder: Path) -> None:
    file = folder / "adapter_config.json"
    kind = d.int(0, 9)
    if kind <= 5:
        cfg = json.loads(file.read_text())
        for _ in range(d.int(1, 2)):
            key = d.choice(list(CONFIG_EDITS))
            cfg[key] = d.choice(CONFIG_EDITS[key])
        file.write_text(json.dumps(cfg, allow_nan=True))
    elif kind == 6:
        file.write_text("[" * 100_000 + "]" * 100_000)  # deeper than the JSON parser recurses
    elif kind == 7:
        file.write_bytes(file.read_bytes()[: d.int(0, 50)])
    elif kind == 8:
        file.unlink()
        os.mkfifo(file)
    else:
        file.unlink()
        file.symlink_to("/dev/zero")


def damage_weights(d: Draw, folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    file = folder / "adapter_model.safetensors"
    kind = d.int(0, 6)
    if kind <= 2:
        tensors = load_file(str(file))
        key = d.choice(sorted(tensors))
        t = tensors[key]
        if kind == 0:
            t = t.clone()
            t.view(-1)[0] = d.choice([float("nan"), float("inf"), 1e38])
        elif kind == 1:
            t = t[:, :-1].contiguous() if t.ndim == 2 and t.shape[1] > 1 else t.to(torch.int32)
        else:
            del tensors[key]
            t = None
        if t is not None:
            tensors[key] = t
        if d.chance(0.3):  # a stray tensor
            tensors[d.choice(["base_model.model.model.layers.0.self_attn.q_proj.weight", "junk"])] = (
                torch.ones(2, 2)
            )
        save_file(tensors, str(file))
    elif kind == 3:
        flip_bytes(d, file)
    elif kind == 4:
        file.write_bytes(file.read_bytes()[: d.int(0, 200)])
    elif kind == 5:
        file.unlink()
        os.mkfifo(file)
    else:
        file.unlink()
        (folder / "adapter_model.bin").write_bytes(b"\x80\x04cos\nsystem\n(S'echo pwned'\ntR.")


def check_ladder(ladder: cw.RankLadder) -> None:
    for name, m in ladder.modules.items():
        check(bool(torch.isfinite(m.a).all()) and bool(torch.isfinite(m.b).all()), f"{name}: finite factors")
        check(m.a.shape[0] == m.b.shape[1] == ladder.modules[name].rank, f"{name}: factor ranks chain")


def target_from_peft(d: Draw) -> None:
    src = d.choice(adapter_dirs())
    folder = fresh_dir(d, src)
    try:
        if d.chance(0.4):
            damage_config(d, folder)
        if d.chance(0.4):
            damage_weights(d, folder)
        ladder = cw.RankLadder.from_peft(d.pick(folder))
        check_ladder(ladder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def target_load(d: Draw) -> None:
    ladder = d.choice(ladders())
    folder = Path(tempfile.mkdtemp(dir=workspace()))
    try:
        file = ladder.save(folder)
        kind = d.int(0, 5)
        if kind == 0:
            flip_bytes(d, file)
        elif kind == 1:
            file.write_bytes(file.read_bytes()[: d.int(0, 300)])
        elif kind == 2:
            n = int.from_bytes(file.read_bytes()[:8], "little")
            header = json.loads(file.read_bytes()[8 : 8 + n])
            key = d.choice([k for k in header if k != "__metadata__"])
            header[key]["dtype"] = d.choice(["I32", "F16", "BOOL", "F64"])
            if d.chance(0.3):
                header["__metadata__"]["adapter_config"] = d.choice(["[", "3", '{"r": "x"}', "[" * 50_000])
            raw = json.dumps(header).encode()
            raw += b" " * (-len(raw) % 8)
            file.write_bytes(len(raw).to_bytes(8, "little") + raw + file.read_bytes()[8 + n :])
        elif kind == 3:
            file.unlink()
            os.mkfifo(file)
        elif kind == 4:
            file.unlink()
            file.symlink_to("/dev/zero")
        loaded = cw.RankLadder.load(d.pick(folder))
        check_ladder(loaded)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def target_inject(d: Draw) -> None:
    model = copy.deepcopy(base(d.choice(["llama", "llama", "gpt2"])))
    before = snapshot(model)
    chosen = [d.choice(ladders()) for _ in range(d.int(1, 3))]
    arg: Any = chosen if len(chosen) > 1 or d.chance(0.5) else chosen[0]
    arg = d.pick(arg)
    sched = make_scheduler(d) if d.chance(0.5) else d.pick(None)
    try:
        cwm = cw.inject(model, arg, sched)
    except cw.ChunkwiseError:
        after = snapshot(model)
        check(before[0].keys() == after[0].keys(), "a refused inject leaves the modules")
        check(
            all(before[0][k] is after[0][k] for k in before[0]), "a refused inject keeps the module objects"
        )
        check(
            all(torch.equal(before[1][k], after[1][k]) for k in before[1]),
            "a refused inject keeps the tensors",
        )
        raise
    wanted = set().union(*(set(lad.modules) for lad in (arg if isinstance(arg, list) else [arg])))
    wrapped = [n for n, m in cwm.model.named_modules() if isinstance(m, cw.ChunkwiseLinear)]
    missing = [w for w in wanted if not any(n.endswith(w) or w.endswith(n) for n in wrapped)]
    check(
        not missing and len(wrapped) == len(wanted), f"inject wraps exactly the adapted modules ({missing})"
    )


@cache
def injected() -> cw.ChunkwiseModel:
    return cw.inject(copy.deepcopy(base()), [ladders()[0], ladders()[3]], cw.Scheduler())


def draw_prompt(d: Draw) -> tuple[Any, Any]:
    b, t = d.int(1, 4), d.int(1, 12)
    ids = torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(d.int(0, 10**6)))
    mask: Any = torch.ones_like(ids)
    for row in range(b):
        mask[row, : d.int(0, t - 1)] = 0
    if d.chance(d.bad):
        kind = d.int(0, 6)
        if kind == 0:
            ids[0, -1] = d.choice([VOCAB, -1, 2**40])
        elif kind == 1:
            ids = ids.bool()
        elif kind == 2:
            ids = ids.float()
        elif kind == 3:
            mask = mask * 2
        elif kind == 4:
            mask[0] = 0
        elif kind == 5:
            ids = ids[:0]
        else:
            mask = mask[:, :-1] if t > 1 else d.nasty()
    return ids, mask


def target_generate(d: Draw) -> None:
    model: Any = injected() if d.chance(0.8) else base()
    ids, mask = draw_prompt(d)
    options: dict[str, Any] = {}
    makers = {
        "max_new_tokens": lambda: d.int(0, 4),
        "policy": lambda: d.choice(
            [
                kv.KvPolicy.streaming(1, 3, slack=d.int(0, 2)),
                kv.KvPolicy.sliding_window(4, 0),
                kv.KvPolicy.full(),
                "sinks",
            ]
        ),
        "prefill_chunk": lambda: d.choice([None, 1, 3, 512]),
        "adapters": lambda: d.rng.integers(0, 2, ids.shape[0]).tolist() if ids.ndim == 2 else [0],
        "eos_token_id": lambda: d.int(0, VOCAB - 1),
        "pad_token_id": lambda: d.int(0, VOCAB - 1),
        "temperature": lambda: d.choice([0.0, 0.7, 1.5]),
        "top_k": lambda: d.choice([None, 1, 5]),
        "seed": lambda: d.int(0, 2**31),
        "score_prompt": lambda: d.chance(0.5),
    }
    for name in makers:
        if d.chance(0.4):
            options[name] = d.pick(makers[name])
    options.setdefault("max_new_tokens", 3)
    if not isinstance(model, cw.ChunkwiseModel):
        options.pop("adapters", None)
    out = cw.generate(model, ids, mask, **options)
    n = options["max_new_tokens"]
    check(out.sequences.shape[0] == ids.shape[0], "one output row per prompt row")
    new = out.sequences[:, ids.shape[1] :]
    check(new.shape[1] <= n, "at most max_new_tokens new tokens")
    check(bool(((new >= 0) & (new < VOCAB)).all()), "new tokens are vocabulary ids")
    if isinstance(model, cw.ChunkwiseModel) and out.ranks.size:
        rungs = set(model.scheduler.config.rungs)
        check(
            set(np.unique(out.ranks).tolist()) <= rungs | set(range(max(rungs) + 1)),
            "decode ranks in the ladder",
        )


TORCH_TARGETS = {
    "from_peft": target_from_peft,
    "load": target_load,
    "inject": target_inject,
    "generate": target_generate,
}
