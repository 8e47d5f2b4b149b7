"""Side-by-side prefill timing and peak memory: base, PEFT merged, PEFT unmerged and chunkwise,
measured in one run with rounds interleaved (these machines are noisy: only ratios from one
run mean anything).

Peak memory per variant: what the call allocates on top of the loaded models at its peak —
``torch.cuda.max_memory_allocated`` after a reset on CUDA, the torch profiler's allocation
records on CPU (measured in a separate, untimed call: profiling slows it down).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

__all__ = ["measure", "peak_memory_mb", "prefill_variants", "random_adapter"]


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Sends file descriptor 2 to /dev/null meanwhile: the profiler's C++ layers print their
    start/stop notices there, past Python's ``sys.stderr`` (and past KINETO_LOG_LEVEL)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real descriptor 2 (embedded, closed): nothing to silence
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak of live torch CPU allocations during ``fn()``: the profiler's per-op allocation
    records, replayed in time order (temporaries freed inside one op are not seen)."""
    from torch.profiler import ProfilerActivity, profile

    os.environ.setdefault("KINETO_LOG_LEVEL", "5")
    with _native_stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events())
    live = peak = 0
    for _, delta in events:
        live += delta
        peak = max(peak, live)
    return peak


def peak_memory_mb(fn: Callable[[], Any], device: torch.device) -> float:
    """Memory ``fn()`` adds at its peak, in MiB, on top of what existed before (weights, models):
    ``torch.cuda.max_memory_allocated`` on CUDA, the torch profiler's allocation records on CPU.
    Independent of what ran before, unlike the process RSS."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    return _cpu_peak_bytes(fn) / 2**20


def measure(variants: dict[str, Callable[[], Any]], rounds: int, device: torch.device) -> dict[str, dict]:
    """Median milliseconds per call (rounds interleaved, after one warm-up each) and peak MiB."""
    times: dict[str, list[float]] = {k: [] for k in variants}
    with torch.inference_mode():
        for f in variants.values():
            f()
        for _ in range(rounds):
            for name, f in variants.items():
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                f()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times[name].append(time.perf_counter() - t0)
        peaks = {name: peak_memory_mb(f, device) for name, f in variants.items()}
    return {k: {"ms": 1e3 * statistics.median(v), "peak_mb": peaks[k]} for k, v in times.items()}


def prefill_variants(
    base: torch.nn.Module, adapter: Path, cwm: Any, batch: torch.Tensor
) -> dict[str, Callable]:
    """The four prefill calls on ``batch``: base, merged, PEFT unmerged and chunkwise (the
    injected model ``cwm`` under its scheduler's plan of ``batch``, planned once up front)."""
    from peft import PeftModel

    peft = PeftModel.from_pretrained(copy.deepcopy(base), str(adapter)).eval()
    merged = PeftModel.from_pretrained(copy.deepcopy(base), str(adapter)).merge_and_unload().eval()
    token_plan = cwm.token_plan(cwm.plan_inputs(batch), batch)

    def chunkwise() -> Any:
        with cwm.use(token_plan):
            return cwm.model(input_ids=batch).logits

    return {
        "base": lambda: base(input_ids=batch).logits,
        "merged": lambda: merged(input_ids=batch).logits,
        "peft": lambda: peft(input_ids=batch).logits,
        "chunkwise": chunkwise,
    }


def random_adapter(model: torch.nn.Module, rank: int, out: Path, seed: int = 0) -> Path:
    """Saves an all-linear PEFT LoRA of ``rank`` with random non-zero B (PEFT initialises B to
    0, which would time a no-op adapter) to ``out``; for timing only."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    pm = get_peft_model(
        copy.deepcopy(model), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear")
    )
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    pm.save_pretrained(str(out))
    return out
