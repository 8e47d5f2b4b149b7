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
  the base model, PEFT's mixed batch (``adapter_names=``) and chunkwise (scheduler, fixed rank
  32, and the scheduler with ``stack=False``: no grouped pass); each one's overhead over the
  base model.
- **S3**: long generation: an 8k-token held-out Wikipedia context, then 64 new tokens. PEFT
  with transformers' ``generate`` and its DynamicCache, against chunkwise (scheduler) with the
  sinks policy (4 sinks + recent tokens, 2048 kept): decode ms/token, the memory each generation
  adds over its loaded model (torch's allocations at their peak, a separate untimed run; each
  system in a fresh process), the KV cache's bytes, and the
  perplexity of the context as each system predicted it (``score_prompt=True``; PEFT's through
  a full cache, which holds what a DynamicCache holds). ``chunkwise_top`` (every token at rank
  64, the same sinks cache) splits chunkwise's perplexity change into the cache's share and the
  rank's. Both prefill in chunks of 512 (``prefill_chunk_size`` for transformers).
- **hf**: ``ChunkwiseModel.generate`` (transformers' own ``generate`` with chunkwise's hooks)
  against transformers' ``generate`` on the base model, on PEFT unmerged and merged, and against
  ``chunkwise.generate``: decode ms per step (batch 1, a 64-token prompt), with the time spent
  inside chunkwise's hooks per step (:attr:`RankTrace.hook_seconds`) as a share of the plain
  model's step; ``hf_top`` runs every token at rank 64, the same work as PEFT unmerged.
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
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import chunkwise as cw
import torch
from chunkwise.assets import sample_text
from chunkwise.errors import ChunkwiseError
from chunkwise.eval.benchmarking import peak_memory_mb, random_adapter
from torch import nn

ROOT = Path(__file__).resolve().parent.parent  # S3's workers run as `python -m benches...` from here


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


def _one_adapter(base: nn.Module, out: Path) -> tuple[nn.Module, nn.Module, cw.RankLadder]:
    """A random r=64 adapter: (PEFT unmerged, PEFT merged, its ladder)."""
    from peft import PeftModel

    adapter = random_adapter(base, 64, out)
    peft = PeftModel.from_pretrained(copy.deepcopy(base), str(adapter)).eval()
    merged = PeftModel.from_pretrained(copy.deepcopy(base), str(adapter)).merge_and_unload().eval()
    return peft, merged, cw.RankLadder.from_peft(adapter)


def s1(base: nn.Module, tok: Any, tmp: Path, rounds: int, new: int) -> dict:
    peft, merged, ladder = _one_adapter(base, tmp / "s1")
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
    # unstacked first: it keeps the ladders' own tensors (stacking makes them views of a stack)
    apart = cw.inject(copy.deepcopy(base), ladders, _scheduler(64), stack=False)
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
            # the same scheduler without the grouped pass: a matmul pair per adapter and run
            "chunkwise_unstacked": lambda: _run(apart, ids, new, adapters=rows),
        },
        rounds,
    )
    return _summary(res, floor="base", reference="peft_mixed")


def hf(base: nn.Module, tok: Any, tmp: Path, rounds: int, new: int) -> dict:
    """ChunkwiseModel.generate against transformers' generate (see the module docstring)."""
    peft, merged, ladder = _one_adapter(base, tmp / "hf")
    cwm = cw.inject(copy.deepcopy(base), ladder, _scheduler(64))
    top = cw.inject(copy.deepcopy(base), ladder, _fixed(64))
    ids = _prompt(tok, 64, 1)
    mask = torch.ones_like(ids)
    greedy = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    hooks: dict[str, list[float]] = {"hf": [], "hf_top": []}

    def transformers_step(model: Any, name: str | None = None) -> float:
        stamps = _Stamps()
        model.generate(ids, attention_mask=mask, streamer=stamps, **greedy)
        if name is not None:
            trace = model.last_trace
            hooks[name].append(1e3 * trace.hook_seconds / trace.forwards)
        return stamps.step_ms(skip=2)  # the prompt's put, then the first token (after prefill)

    def loop_step() -> float:
        stamps = _Stamps()
        cw.generate(cwm, ids, mask, max_new_tokens=new, prefill_chunk=None, streamer=stamps)
        return stamps.step_ms(skip=1)  # a Step arrives before the forward that processes it

    variants: dict[str, Callable[[], float]] = {
        "base": lambda: transformers_step(base),
        "merged": lambda: transformers_step(merged),
        "peft": lambda: transformers_step(peft),
        "hf": lambda: transformers_step(cwm, "hf"),
        "hf_top": lambda: transformers_step(top, "hf_top"),
        "chunkwise_generate": loop_step,
    }
    for fn in variants.values():  # warm-up
        fn()
    for v in hooks.values():
        v.clear()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            times[name].append(fn())
    ms = {k: statistics.median(v) for k, v in times.items()}
    hook_ms = {k: statistics.median(v) for k, v in hooks.items()}
    return {
        "decode_ms_per_step": {k: round(v, 3) for k, v in ms.items()},
        "hook_ms_per_step": {k: round(v, 4) for k, v in hook_ms.items()},
        "hook_share_of_base_step": round(hook_ms["hf"] / ms["base"], 4),
        "hf_over_base": round(ms["hf"] / ms["base"], 3),
        "hf_top_over_peft": round(ms["hf_top"] / ms["peft"], 3),
        "hf_over_chunkwise_generate": round(ms["hf"] / ms["chunkwise_generate"], 3),
        "mean_decode_rank": float(cwm.last_trace.ranks[:, :-1].mean()),
    }


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
        for mine in [k for k in res if k.startswith("chunkwise")]:
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


S3_KINDS = ("peft", "chunkwise", "chunkwise_top")


class _Stamps:
    """A streamer for transformers' ``generate`` and ``chunkwise.generate``: the time of every
    call (transformers calls it with the prompt first, then once per new token)."""

    def __init__(self) -> None:
        self.t: list[float] = []

    def put(self, _value: Any) -> None:
        self.t.append(time.perf_counter())

    def end(self) -> None:
        pass

    def __call__(self, _step: Any) -> None:
        self.t.append(time.perf_counter())

    def step_ms(self, skip: int) -> float:
        """Median ms between consecutive calls after the first ``skip`` ones."""
        t = self.t[skip:]
        return 1e3 * statistics.median(b - a for a, b in zip(t[:-1], t[1:], strict=True))


def s3_worker(kind: str, context: int, new: int, chunk: int, budget: int, timing_only: bool = False) -> dict:
    """One system of S3 in this (fresh) process: decode ms/token and peak memory of a plain
    generation, then the context's perplexity from a scored one. ``timing_only``: the bundled
    sample text may stand in for the held-out corpus, no perplexity is computed, and
    ``chunkwise_top`` is timed too (its speed does not depend on what the text asks for)."""
    from chunkwise.assets.smollm2 import load_smollm2
    from chunkwise.kv import KvPolicy
    from peft import PeftModel

    from benches.prefill_cpu import held_out_ids

    torch.set_grad_enabled(False)
    base, tok = load_smollm2(progress=False)
    ids = held_out_ids(tok, context, allow_sample=timing_only)[None]
    with tempfile.TemporaryDirectory() as d:
        adapter = random_adapter(base, 64, Path(d) / "s3")  # seed 0: the same adapter in every worker
        if kind == "peft":
            model: Any = PeftModel.from_pretrained(base, str(adapter)).eval()
        else:
            sched = _scheduler(64) if kind == "chunkwise" else _fixed(64)
            model = cw.inject(base, cw.RankLadder.from_peft(adapter), sched)
    policy = None if kind == "peft" else KvPolicy.streaming(4, budget - 4, slack=64)
    mask = torch.ones_like(ids)
    row: dict[str, Any] = {"system": kind, "context": context, "new": new}

    def run(stamps: _Stamps | None) -> Any:
        if kind == "peft":  # transformers' own loop and DynamicCache
            with torch.inference_mode():
                return model.generate(
                    ids, attention_mask=mask, max_new_tokens=new, do_sample=False, streamer=stamps,
                    prefill_chunk_size=chunk, pad_token_id=0,
                )  # fmt: skip
        return cw.generate(
            model, ids, mask, max_new_tokens=new, policy=policy, prefill_chunk=chunk, streamer=stamps
        )

    cw.generate(model, ids[:, :64], max_new_tokens=2)  # touch every weight page, warm the kernels
    if kind != "chunkwise_top" or timing_only:  # otherwise that one only splits the perplexity change
        stamps = _Stamps()
        out = run(stamps)
        # transformers calls its streamer with the prompt first; chunkwise once per token
        row["decode_ms_per_token"] = stamps.step_ms(skip=2 if kind == "peft" else 1)
        row["added_mb"] = peak_memory_mb(lambda: run(None), torch.device("cpu"))
        if kind == "peft":
            cfg = base.config
            head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
            per_token = (
                cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim * 4
            )  # fp32 keys + values
            row["kv_mb"] = (context + new) * per_token / 2**20
        else:
            row["kv_mb"] = out.cache.peak_slots * out.cache.bytes_per_token / 2**20
            row["decode_mean_rank"] = float(out.ranks[:, :-1].mean())
            row["prefill_mean_rank"] = float(out.prefill_token_ranks.mean())
    if timing_only:
        return row
    scored = cw.generate(
        model, ids, mask, max_new_tokens=1, policy=policy, prefill_chunk=chunk, score_prompt=True
    )
    row["ppl"] = scored.prompt_perplexity
    return row


def s3(context: int, new: int, chunk: int, budget: int, timing_only: bool = False) -> dict:
    """S3: every system in its own process (clean peak memory), then the ratios
    (``timing_only``: see :func:`s3_worker`; no perplexity, not a figure of record)."""
    rows = {}
    for kind in S3_KINDS:
        cmd = [
            sys.executable, "-m", "benches.lora_overhead", "--s3-worker", kind, "--context", str(context),
            "--new-tokens", str(new), "--chunk", str(chunk), "--budget", str(budget),
        ] + (["--s3-timing-only"] if timing_only else [])  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if done.returncode != 0:  # say why: the worker's last line is its exception
            why = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise ChunkwiseError(f"S3 worker {kind!r} failed (exit {done.returncode}): {why}")
        rows[kind] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"... s3 {kind} done", file=sys.stderr)
    peft, mine, top = rows["peft"], rows["chunkwise"], rows["chunkwise_top"]
    rounded = {
        k: {m: round(v, 3) if isinstance(v, float) else v for m, v in r.items()} for k, r in rows.items()
    }
    if timing_only:
        return {
            "text": "timing only: no perplexity; the bundled sample stands in if the corpus is missing",
            **rounded,
            "decode_x_peft": round(mine["decode_ms_per_token"] / peft["decode_ms_per_token"], 3),
            "decode_x_peft_top_rank": round(top["decode_ms_per_token"] / peft["decode_ms_per_token"], 3),
            "added_memory_x_peft": round(mine["added_mb"] / peft["added_mb"], 3),
            "kv_x_peft": round(mine["kv_mb"] / peft["kv_mb"], 3),
        }
    return {
        **rounded,
        "decode_x_peft": round(mine["decode_ms_per_token"] / peft["decode_ms_per_token"], 3),
        "added_memory_x_peft": round(mine["added_mb"] / peft["added_mb"], 3),
        "kv_x_peft": round(mine["kv_mb"] / peft["kv_mb"], 3),
        "ppl_change_pct": round(100 * (mine["ppl"] / peft["ppl"] - 1), 2),
        "ppl_change_pct_from_the_cache": round(100 * (top["ppl"] / peft["ppl"] - 1), 2),
        "ppl_change_pct_from_the_rank": round(100 * (mine["ppl"] / top["ppl"] - 1), 2),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: 3)")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens generated per run (default: 16)")
    p.add_argument("--only", choices=("s1", "s2", "hf", "s3", "loop"), nargs="+", help="run only these parts")
    p.add_argument("--context", type=int, default=8192, help="S3 context tokens (default: 8192)")
    p.add_argument("--s3-new", type=int, default=64, help="S3 new tokens (default: 64)")
    p.add_argument("--chunk", type=int, default=512, help="S3 prefill chunk (default: 512)")
    p.add_argument("--budget", type=int, default=2048, help="S3 tokens the sinks cache keeps (default: 2048)")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument(
        "--s3-timing-only",
        action="store_true",
        help="S3 without perplexities; the bundled sample text stands in when the corpus is missing",
    )
    p.add_argument("--s3-worker", choices=S3_KINDS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.s3_worker:
        a = args
        row = s3_worker(a.s3_worker, a.context, a.new_tokens, a.chunk, a.budget, a.s3_timing_only)
        print(json.dumps(row))
        return 0
    parts = args.only or ["s1", "s2", "hf", "s3", "loop"]
    torch.set_grad_enabled(False)
    results: dict[str, Any] = {
        "threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "new": args.new_tokens,
    }
    if "loop" in parts:
        results["loop"] = loop(args.rounds, args.new_tokens)
        print("loop", json.dumps(results["loop"]))
    if {"s1", "s2", "hf"} & set(parts):
        from chunkwise.assets.smollm2 import load_smollm2

        loaded, tok = load_smollm2()
        # every system runs a deep copy: the loaded weights may be memory-mapped from the
        # safetensors file, and mapped pages the kernel reclaims and refaults made the plain
        # model up to 1.4x slower than its own copies (merged, PEFT, chunkwise) on this machine
        base = copy.deepcopy(loaded)
        del loaded
        with tempfile.TemporaryDirectory() as d:
            for name, fn in (("s1", s1), ("s2", s2), ("hf", hf)):
                if name in parts:
                    results[name] = fn(base, tok, Path(d), args.rounds, args.new_tokens)
                    print(name, json.dumps(results[name], indent=1))
    if "s3" in parts:
        results["s3"] = s3(args.context, args.s3_new, args.chunk, args.budget, args.s3_timing_only)
        print("s3", json.dumps(results["s3"], indent=1))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
