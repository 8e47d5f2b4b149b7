"""KV-cache policies on SmolLM2-135M (CPU): perplexity of a long held-out stream, peak memory and
decode latency at the end of it, per policy, each measured in its own process.

    python -m benches.kv_cpu                       # 8192 tokens, budget 2048, all policies
    python -m benches.kv_cpu --tokens 2048 --budget 512 --json kv.json

(from the repository root: the script imports ``benches.prefill_cpu``).

For each policy a fresh worker process loads the model, streams ``--tokens`` tokens of held-out
Wikipedia text through a :class:`chunkwise.kv.PolicyCache` in chunks of ``--chunk`` tokens
(teacher forcing: every token is predicted from what the cache kept), then decodes ``--decode``
greedy tokens and times each step. Memory: the cache's peak bytes (exact: what its tensors hold
right after a forward, both precisions for an ``-int8`` policy; for transformers'
QuantizedCache the storages of its tensors) and the worker's peak RSS after loading (Linux
VmHWM, reset once the model is loaded; it includes the ~540 MB of fp32 weights).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import chunkwise as cw
import numpy as np
import torch
from chunkwise.assets.smollm2 import load_smollm2
from chunkwise.kv import KvPolicy, PolicyCache, track_attention

from benches.prefill_cpu import held_out_ids

POLICIES = ("full", "window", "sinks", "h2o", "difficulty")
#: A policy name with this suffix holds its least-ranked kept tokens in int8 (KvPolicy.int8) at
#: the same bytes as the evict-only policy's ``--budget`` full-precision tokens (``sinks-int8``:
#: the sinks, a full-precision window of half the rest, older tokens in int8).
INT8 = "-int8"
#: transformers' own QuantizedCache (keeps every token, quantized; not a chunkwise policy): the
#: per-tensor fp8 backend (needs nothing more), and quanto's 4-bit (``pip install optimum-quanto``).
QUANTIZED = {"hf-fp8": {"backend": "fp8"}, "hf-quanto4": {"backend": "quanto", "nbits": 4}}


def tensor_bytes(obj: object, seen: set[int] | None = None) -> int:
    """Bytes of the tensors an object holds (attributes, tuples, quantized tensor subclasses
    through their flattened parts), each storage counted once."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        if hasattr(obj, "__tensor_flatten__") and type(obj) is not torch.Tensor:
            names, _ = obj.__tensor_flatten__()
            return sum(tensor_bytes(getattr(obj, n), seen) for n in names)
        storage = obj.untyped_storage()
        if storage.data_ptr() in seen or obj.device.type == "meta":
            return 0
        seen.add(storage.data_ptr())
        return storage.nbytes()
    if isinstance(obj, tuple | list):
        return sum(tensor_bytes(o, seen) for o in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, torch.nn.Module):
        return sum(tensor_bytes(v, seen) for v in vars(obj).values())
    return 0


ROOT = Path(__file__).resolve().parent.parent  # the workers run as `python -m benches.kv_cpu` from here


def peak_rss_mb() -> float:
    """This process's peak RSS since the last :func:`reset_peak_rss` (Linux VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> None:
    """Resets VmHWM to the current RSS, so loading the model does not count as the peak."""
    Path("/proc/self/clear_refs").write_text("5")


def worker(kind: str, args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    model, tok = load_smollm2(progress=False)
    model.eval()
    ids = held_out_ids(tok, args.tokens)[None]
    with torch.inference_mode():  # touch every weight page (safetensors maps the file lazily)
        model(input_ids=ids[:, :8])
    gc.collect()
    reset_peak_rss()
    rss_model = peak_rss_mb()
    cache: Any
    if kind in QUANTIZED:
        from transformers import QuantizedCache

        cache = QuantizedCache(config=model.config, **QUANTIZED[kind])
        scoring: Any = torch.no_grad()
    else:
        name = kind.removesuffix(INT8)
        policy = KvPolicy.named(name, None if name == "full" else args.budget, sinks=4, slack=args.slack)
        if kind.endswith(INT8):
            # StreamingLLM's budget is all sinks + window, which int8 never touches: its int8
            # variant keeps a full-precision window of half the room and int8 for older tokens
            half = dict(window=(args.budget - policy.sinks) // 2) if name == "sinks" else {}
            policy = dataclasses.replace(policy, int8=True, **half)
        cache = PolicyCache(policy, model.config)
        scoring = track_attention(model) if policy.attention_weight > 0 else torch.no_grad()
    peak_bytes = 0
    nll, n, last_ent = 0.0, 0, torch.zeros(1, 1)
    t0 = time.perf_counter()
    with torch.inference_mode(), scoring:
        for s in range(0, ids.shape[1], args.chunk):
            chunk = ids[:, s : s + args.chunk]
            pos = torch.arange(s, s + chunk.shape[1])[None]
            logits = model(input_ids=chunk, position_ids=pos, cache=cache, use_cache=True).logits.float()
            ent, _ = cw.torch_entropy_surprisal(logits)
            if isinstance(cache, PolicyCache):
                cache.revise_difficulty(torch.cat([last_ent, ent[:, :-1]], 1).numpy())
            else:
                peak_bytes = max(peak_bytes, sum(tensor_bytes(layer) for layer in cache.layers))
            last_ent = ent[:, -1:]
            target = ids[:, s + 1 : s + 1 + chunk.shape[1]]
            if target.shape[1]:
                logp = torch.log_softmax(logits[:, : target.shape[1]], -1)
                nll -= logp.gather(-1, target[..., None]).sum().item()
                n += target.shape[1]
        stream_s = time.perf_counter() - t0
        step_ms = []
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        pos = torch.tensor([[ids.shape[1]]])
        for _ in range(args.decode):
            t1 = time.perf_counter()
            logits = model(input_ids=nxt, position_ids=pos, cache=cache, use_cache=True).logits
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            step_ms.append(1e3 * (time.perf_counter() - t1))
            pos = pos + 1
    if isinstance(cache, PolicyCache):
        peak_bytes = cache.peak_bytes
    return {
        "policy": kind,
        "budget": cache.policy.budget if isinstance(cache, PolicyCache) else None,
        "tokens": int(ids.shape[1]),
        "ppl": math.exp(nll / n),
        "kv_peak_mb": peak_bytes / 2**20,
        "kv_peak_slots": getattr(cache, "peak_slots", None),
        "int8_moves": getattr(cache, "quantized", 0),
        "rss_peak_mb": peak_rss_mb(),
        "rss_model_mb": rss_model,
        "decode_ms": statistics.median(step_ms),
        "stream_s": stream_s,
        "evictions": getattr(cache, "evictions", 0),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192, help="held-out tokens streamed (default 8192)")
    ap.add_argument(
        "--budget", type=int, default=2048, help="tokens kept by evicting policies (default 2048)"
    )
    ap.add_argument(
        "--slack", type=int, default=64, help="evict once budget + slack is exceeded (default 64)"
    )
    ap.add_argument("--chunk", type=int, default=32, help="tokens per forward while streaming (default 32)")
    ap.add_argument(
        "--decode", type=int, default=32, help="greedy decode steps timed at the end (default 32)"
    )
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument(
        "--policies",
        default=",".join(POLICIES),
        help=f"comma list of {POLICIES}, each optionally with the suffix {INT8!r}, or of {sorted(QUANTIZED)}",
    )
    ap.add_argument("--json", type=Path, help="write the rows as JSON here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return
    rows = []
    for kind in args.policies.split(","):
        cmd = [sys.executable, "-m", "benches.kv_cpu", "--worker", kind] + [
            f"--{k}={getattr(args, k)}" for k in ("tokens", "budget", "slack", "chunk", "decode", "threads")
        ]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(f"... {kind} done", file=sys.stderr)
    full = next((r for r in rows if r["policy"] == "full"), rows[0])
    head = ("policy", "budget", "ppl", "Δppl", "KV MB", "ΔKV", "RSS MB", "ΔRSS", "ms/tok")
    print(f"{head[0]:<11}" + "".join(f"{h:>9}" for h in head[1:]))
    for r in rows:
        rel = {k: 100 * (r[k] / full[k] - 1) for k in ("ppl", "kv_peak_mb", "rss_peak_mb", "decode_ms")}
        print(
            f"{r['policy']:<11}{r['budget'] or '-':>9}{r['ppl']:>9.3f}{rel['ppl']:>+8.2f}%"
            f"{r['kv_peak_mb']:>9.1f}{rel['kv_peak_mb']:>+8.0f}%{r['rss_peak_mb']:>9.0f}{rel['rss_peak_mb']:>+8.0f}%"
            f"{r['decode_ms']:>9.1f}"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
