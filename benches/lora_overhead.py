"""LoRA overhead where adapters cannot be merged: base, merged, PEFT and chunkwise side by side.

``python -m benches.lora_overhead [--rounds 3] [--new-tokens 16] [--json out.json]`` runs, on
SmolLM2-135M (fp32, CPU) with random r=64 all-linear adapters and the scheduler at mean rank 32
(target mode), rounds interleaved in one process (ratios from one run are what counts):

Two chunkwise rows: the scheduler in target mode (mean rank 32 in prefill; decode follows the
thresholds of the prompt with hysteresis, so its mean rank is whatever the text asks for and is
printed), and ``chunkwise_r32``: every token at rank 32, the cost of exactly that rank.

- **S1**: one adapter, batch 1, a 256-token prompt: prefill ms and decode ms/token of base,
  merged, PEFT unmerged and chunkwise.
- **S2**: eight adapters, batch 8 (one adapter per row), 64-token prompts: prefill and decode of
  the base model, PEFT's mixed batch (``adapter_names=``) and chunkwise; each one's overhead
  over the base model.
- **loop**: ``chunkwise.generate`` against transformers' ``generate`` on a plain tiny model (ms
  per decode step; the loop's own cost).

Every model runs through the same loop (``chunkwise.generate``, full KV cache, greedy), so the
differences are the models' forwards. Next to the speed: how many greedy tokens chunkwise shares
with PEFT's full-rank adapter (at rank 32 of 64 they drift; at the top rung they are equal).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import chunkwise as cw
import torch
from chunkwise.assets import sample_text
from chunkwise.eval.benchmarking import random_adapter
from torch import nn


class _MixedBatch(nn.Module):
    """A PeftModel forward with one adapter name per row (PEFT's mixed-batch inference), shaped
    like a plain causal LM so the same generation loop drives it."""

    def __init__(self, peft: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.peft, self.names = peft, names
        self.config = peft.config if hasattr(peft, "config") else peft.base_model.config

    def forward(self, **kwargs: Any) -> Any:
        return self.peft(**kwargs, adapter_names=self.names)


def _prompt(tok: Any, n: int, batch: int) -> torch.Tensor:
    ids = tok(sample_text() * 4, return_tensors="pt").input_ids[0]
    return torch.stack([ids[i * 7 : i * 7 + n] for i in range(batch)])


MEAN_RANKS: dict[str, float] = {}


def _run(model: Any, ids: torch.Tensor, new: int, **options: Any) -> tuple[float, float, torch.Tensor]:
    """(prefill ms, decode ms per token, new tokens) of one greedy generation; a ChunkwiseModel's
    mean prefill and decode ranks are kept in MEAN_RANKS."""
    out = cw.generate(model, ids, torch.ones_like(ids), max_new_tokens=new, prefill_chunk=None, **options)
    if isinstance(model, cw.ChunkwiseModel) and len(model.scheduler.config.rungs) > 2:
        MEAN_RANKS["prefill"] = float(out.prefill_token_ranks.mean())
        MEAN_RANKS["decode"] = float(out.ranks[:, :-1].mean())  # the last token is never run
    return 1e3 * out.prefill_seconds, 1e3 * out.decode_seconds / max(new - 1, 1), out.new_tokens


def _interleaved(variants: dict[str, Callable[[], tuple[float, float, torch.Tensor]]], rounds: int) -> dict:
    """Median prefill / decode ms of each variant over ``rounds`` interleaved rounds."""
    rows: dict[str, dict[str, list]] = {k: {"prefill": [], "decode": []} for k in variants}
    tokens: dict[str, torch.Tensor] = {}
    for name, fn in variants.items():  # warm-up
        tokens[name] = fn()[2]
    for _ in range(rounds):
        for name, fn in variants.items():
            p, d, _ = fn()
            rows[name]["prefill"].append(p)
            rows[name]["decode"].append(d)
    return {
        k: {
            "prefill_ms": statistics.median(v["prefill"]),
            "decode_ms": statistics.median(v["decode"]),
            "tokens": tokens[k],
        }
        for k, v in rows.items()
    }


def _agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a == b).float().mean())


def _scheduler(top: int) -> cw.Scheduler:
    from chunkwise.schedule import rungs_for

    return cw.Scheduler(cw.SchedulerConfig(rungs=rungs_for(top), mode="target", target_mean_rank=top / 2))


def _fixed(rank: int) -> cw.Scheduler:
    """Every token at ``rank`` (prefill and decode): the cost of that rank, whatever the text."""
    return cw.Scheduler(cw.SchedulerConfig(rungs=(0, rank), thresholds=(-1.0,), crossfade=0))


def s1(base: nn.Module, tok: Any, tmp: Path, rounds: int, new: int) -> dict:
    from peft import PeftModel

    adapter = random_adapter(base, 64, tmp / "s1")
    peft = PeftModel.from_pretrained(copy.deepcopy(base), str(adapter)).eval()
    merged = PeftModel.from_pretrained(copy.deepcopy(base), str(adapter)).merge_and_unload().eval()
    ladder = cw.RankLadder.from_peft(adapter)
    cwm = cw.inject(copy.deepcopy(base), ladder, _scheduler(64))
    fixed = cw.inject(copy.deepcopy(base), ladder, _fixed(32))
    ids = _prompt(tok, 256, 1)
    res = _interleaved(
        {
            "base": lambda: _run(base, ids, new),
            "merged": lambda: _run(merged, ids, new),
            "peft": lambda: _run(peft, ids, new),
            "chunkwise": lambda: _run(cwm, ids, new),
            "chunkwise_r32": lambda: _run(fixed, ids, new),
        },
        rounds,
    )
    return _summary(res, floor="merged", reference="peft")


def s2(base: nn.Module, tok: Any, tmp: Path, rounds: int, new: int) -> dict:
    from peft import PeftModel

    paths = [random_adapter(base, 64, tmp / f"s2-{i}", seed=i) for i in range(8)]
    names = [f"a{i}" for i in range(8)]
    peft = PeftModel.from_pretrained(copy.deepcopy(base), str(paths[0]), adapter_name=names[0]).eval()
    for name, path in zip(names[1:], paths[1:], strict=True):
        peft.load_adapter(str(path), adapter_name=name)
    mixed = _MixedBatch(peft, names).eval()
    ladders = [cw.RankLadder.from_peft(p) for p in paths]
    cwm = cw.inject(copy.deepcopy(base), ladders, _scheduler(64))
    fixed = cw.inject(copy.deepcopy(base), ladders, _fixed(32))
    ids = _prompt(tok, 64, 8)
    rows = list(range(8))
    res = _interleaved(
        {
            "base": lambda: _run(base, ids, new),
            "peft_mixed": lambda: _run(mixed, ids, new),
            "chunkwise": lambda: _run(cwm, ids, new, adapters=rows),
            "chunkwise_r32": lambda: _run(fixed, ids, new, adapters=rows),
        },
        rounds,
    )
    return _summary(res, floor="base", reference="peft_mixed")


def _summary(res: dict, floor: str, reference: str) -> dict:
    out: dict[str, Any] = {}
    for name, r in res.items():
        out[name] = {
            "prefill_ms": round(r["prefill_ms"], 2),
            "decode_ms_per_token": round(r["decode_ms"], 2),
            f"prefill_x_{floor}": round(r["prefill_ms"] / res[floor]["prefill_ms"], 3),
            f"decode_x_{floor}": round(r["decode_ms"] / res[floor]["decode_ms"], 3),
        }
    for phase, key in (("prefill", "prefill_ms"), ("decode", "decode_ms")):
        over_ref = res[reference][key] - res[floor][key]
        for mine in ("chunkwise", "chunkwise_r32"):
            over = res[mine][key] - res[floor][key]
            ratio = round(over / over_ref, 3) if over_ref else None
            out[f"{phase}_overhead_ratio_{mine}_vs_{reference}"] = ratio
    out["chunkwise_mean_rank"] = {k: round(v, 2) for k, v in MEAN_RANKS.items()}
    out["greedy_token_agreement_chunkwise_vs_" + reference] = _agreement(
        res["chunkwise"]["tokens"], res[reference]["tokens"]
    )
    return out


def loop(rounds: int, new: int) -> dict:
    """chunkwise.generate vs transformers' generate on a tiny plain model: the loop alone."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 256, (1, 16))

    def ours() -> float:
        return _run(model, ids, new)[1]

    def theirs() -> float:
        with torch.inference_mode():
            t0 = time.perf_counter()
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False)
            t1 = time.perf_counter()
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False)
            t2 = time.perf_counter()
        return 1e3 * ((t2 - t1) - (t1 - t0)) / max(new - 1, 1)

    ours(), theirs()
    a, b = [], []
    for _ in range(rounds * 3):
        a.append(ours())
        b.append(theirs())
    mine, hf = statistics.median(a), statistics.median(b)
    return {
        "chunkwise_generate_ms_per_step": round(mine, 3),
        "transformers_generate_ms_per_step": round(hf, 3),
        "difference_ms": round(mine - hf, 3),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: 3)")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens generated per run (default: 16)")
    p.add_argument("--only", choices=("s1", "s2", "loop"), nargs="+", help="run only these parts")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    parts = args.only or ["s1", "s2", "loop"]
    torch.set_grad_enabled(False)
    results: dict[str, Any] = {
        "threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "new": args.new_tokens,
    }
    if "loop" in parts:
        results["loop"] = loop(args.rounds, args.new_tokens)
        print("loop", json.dumps(results["loop"]))
    if {"s1", "s2"} & set(parts):
        from chunkwise.assets.smollm2 import load_smollm2

        base, tok = load_smollm2()
        with tempfile.TemporaryDirectory() as d:
            for name, fn in (("s1", s1), ("s2", s2)):
                if name in parts:
                    results[name] = fn(base, tok, Path(d), args.rounds, args.new_tokens)
                    print(name, json.dumps(results[name], indent=1))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
