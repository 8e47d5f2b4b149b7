"""Timings of the segmented LoRA kernels on a CUDA device (run by benches/gpu_suite.sh as
``python -m benches.gpu_timing``, from the repository root).

For each size (tokens x hidden, dtype) on a prefill-like batch (2 adapters of max rank 64,
segments of 16-128 tokens on the ladder 0/4/8/16/32/64, ramps at rank changes):

* the kernels (``lora_delta_cuda``), timed from CUDA-graph replays (device time, launch gaps
  removed) and as eager calls (host overhead included), each the median over repeats with CUDA
  events after a warm-up, rotating among input sets larger than the L2 cache;
* their bandwidth: the fewest bytes the update must move (x rows of adapted tokens read, their y
  rows read and written, the factors read once) over the time, against a measured device copy;
* the same kernels with every segment padded to the max rank, and launched once per rank;
* the torch path (``ChunkwiseLinear``'s: pad to the max rank with a gate matrix) and torch with
  one gather/matmul/scatter per rank;
* decode steps (one token per sequence) from graph replays.

``--device cpu`` runs the same script on tiny sizes with the float64 reference standing in for
the kernels, so that the script itself can be checked where there is no GPU (numbers meaningless).
Prints a table last; ``--out`` writes every number as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import chunkwise.kernels as K
import numpy as np
import torch
from chunkwise.kernels import KernelSegments, LoraFactors, TokenArrays
from chunkwise.nn.token_plan import TokenPlan

LADDER = (0, 4, 8, 16, 32, 64)
RANK_P = (0.15, 0.15, 0.2, 0.25, 0.15, 0.10)  # mean rank ~ 17
MAX_R = 64


# ---- timing -----------------------------------------------------------------------------------


def median_time(fn: Callable[[int], None], device: str, warmup: int, repeats: int) -> float:
    """Median seconds of ``fn(i)`` (i: the repeat, to rotate inputs) over ``repeats`` runs."""
    for i in range(warmup):
        fn(i)
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        for i in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(i)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for i in range(repeats):
            t = time.perf_counter()
            fn(i)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def copy_bandwidth(device: str, nbytes: int, warmup: int, repeats: int) -> float:
    """Bytes per second of a device-to-device copy, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = median_time(lambda i: dst.copy_(src), device, warmup, repeats)
    return 2 * src.numel() * 4 / t


def graphed(fn: Callable[[int], None], n_sets: int, device: str) -> Callable[[int], None]:
    """One CUDA graph per input set, replayed in turn (eager calls on the CPU)."""
    if device != "cuda":
        return fn
    for i in range(n_sets):  # warm-up: compiles and loads the module before capture
        fn(i)
    torch.cuda.synchronize()
    graphs = []
    for i in range(n_sets):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn(i)
        graphs.append(g)
    return lambda i: graphs[i % n_sets].replay()


# ---- a prefill-like batch ---------------------------------------------------------------------


def make_batch(
    n_tok: int, in_f: int, out_f: int, dtype: torch.dtype, device: str, n_sets: int, seed: int = 0
):
    rng = np.random.default_rng(seed)
    lens, ranks = [], []
    while sum(lens) < n_tok:
        lens.append(int(rng.integers(2, 17)) * 8)
        ranks.append(int(rng.choice(LADDER, p=RANK_P)))
    lens[-1] -= sum(lens) - n_tok
    token_rank = np.repeat(np.array(ranks, np.int32), lens)
    seq_len = 1024  # sequences of 1024 tokens, alternating adapters
    token_adapter = ((np.arange(n_tok) // seq_len) % 2).astype(np.int32)
    token_lo = token_rank.copy()
    gate_lo = np.ones(n_tok, np.float32)
    gate_hi = np.ones(n_tok, np.float32)
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    for k in range(1, len(lens)):  # a 4-token ramp after each rank change
        a, b = ranks[k - 1], ranks[k]
        if a == b:
            continue
        for i in range(min(4, lens[k])):
            t = starts[k] + i
            alpha = (i + 1) / 5
            token_rank[t], token_lo[t] = max(a, b), min(a, b)
            gate_lo[t] = 1.0
            gate_hi[t] = alpha if b > a else 1 - alpha
    scale = np.ones(n_tok, np.float32)
    rows = np.arange(n_tok)
    seg = KernelSegments.from_token_arrays(
        TokenArrays(token_rank, token_lo, gate_lo, gate_hi, scale, token_adapter, rows, n_tok), device
    )
    gen = torch.Generator(device="cpu").manual_seed(seed)
    factors = []
    for _ in range(2):
        a = torch.randn(MAX_R, in_f, generator=gen) / in_f**0.5
        b = torch.randn(out_f, MAX_R, generator=gen) / MAX_R**0.5
        factors.append((a.to(device, dtype).contiguous(), b.to(device, dtype).contiguous()))
    xs = [torch.randn(n_tok, in_f, device=device, dtype=dtype) for _ in range(n_sets)]
    ys = [torch.randn(n_tok, out_f, device=device, dtype=dtype) for _ in range(n_sets)]
    per_token = dict(
        token_rank=token_rank, token_lo=token_lo, gate_lo=gate_lo, gate_hi=gate_hi,
        scale=scale, token_adapter=token_adapter,
    )  # fmt: skip
    return seg, LoraFactors(factors), xs, ys, per_token


def with_ranks(
    seg: KernelSegments, rank_fn: Callable[[np.ndarray], np.ndarray], device: str
) -> KernelSegments:
    """``seg`` with seg_rank replaced by ``rank_fn(seg_rank)`` (token_lo clamped to match)."""
    r = rank_fn(seg.seg_rank.cpu().numpy()).astype(np.int32)
    return KernelSegments.from_arrays(
        seg_offsets=seg.seg_offsets.cpu().numpy(), seg_rank=r, seg_scale=seg.seg_scale.cpu().numpy(),
        seg_adapter=seg.seg_adapter.cpu().numpy(), token_lo=seg.token_lo.cpu().numpy(),
        gate_lo=seg.gate_lo.cpu().numpy(), gate_hi=seg.gate_hi.cpu().numpy(), rows=None,
        n_rows=seg.n_rows, device=device,
    )  # fmt: skip


def useful_bytes(per_token: dict[str, np.ndarray], in_f: int, out_f: int, es: int) -> tuple[int, float]:
    """(fewest bytes, FLOPs) of the update: x read, y read + written for adapted tokens; each
    adapter's factors once at the largest rank it uses."""
    r = per_token["token_rank"].astype(np.int64)
    active = r > 0
    nbytes = int(active.sum()) * (in_f + 2 * out_f) * es
    for a in np.unique(per_token["token_adapter"]):
        sel = per_token["token_adapter"] == a
        nbytes += int(r[sel].max(initial=0)) * (in_f + out_f) * es
    flops = 2.0 * float(r.sum()) * (in_f + out_f)
    return nbytes, flops


# ---- the paths compared -----------------------------------------------------------------------


def kernel_call(seg: KernelSegments, factors: LoraFactors, xs, ys, device: str) -> Callable[[int], None]:
    fn = K.lora_delta_cuda if device == "cuda" else K.lora_delta_reference
    return lambda i: fn(xs[i % len(xs)], ys[i % len(ys)], factors, seg)


def torch_padded_call(per_token, factors: LoraFactors, xs, ys, device, dtype) -> Callable[[int], None]:
    """ChunkwiseLinear's torch path: per adapter, ((x A'[:r]ᵀ) ⊙ G) B'[:, :r]ᵀ at its max rank r."""
    n = len(per_token["token_rank"])
    tokens = TokenArrays(
        per_token["token_rank"], per_token["token_lo"], per_token["gate_lo"], per_token["gate_hi"],
        per_token["scale"], per_token["token_adapter"], np.arange(n), n,
    )  # fmt: skip
    plan = TokenPlan.build(tokens, device, dtype)

    def run(i: int) -> None:
        x2, y2 = xs[i % len(xs)], ys[i % len(ys)]
        for block in plan.blocks:
            a, b = factors.pairs[block.adapter]
            r = block.max_rank
            if r == 0:
                continue
            xs_ = x2 if block.rows is None else x2.index_select(0, block.rows)
            h = xs_ @ a[:r].T
            if block.gates is not None:
                h.mul_(block.gates[:, :r])
            if block.rows is None:
                y2.addmm_(h, b[:, :r].T, alpha=block.scale)
            else:
                y2.index_add_(0, block.rows, h @ b[:, :r].T, alpha=block.scale)

    return run


def torch_per_rank_call(per_token, factors: LoraFactors, xs, ys, device, dtype) -> Callable[[int], None]:
    """One gather / two matmuls / scatter per (adapter, rank) group."""
    groups = []
    r_all, a_all = per_token["token_rank"], per_token["token_adapter"]
    for a in np.unique(a_all):
        for r in np.unique(r_all[a_all == a]):
            if r == 0:
                continue
            idx = np.flatnonzero((a_all == a) & (r_all == r))
            j = np.arange(r)[None, :]
            g = np.where(j < per_token["token_lo"][idx, None], per_token["gate_lo"][idx, None],
                         per_token["gate_hi"][idx, None]) * per_token["scale"][idx, None]  # fmt: skip
            groups.append(
                (int(a), int(r), torch.from_numpy(idx).to(device), torch.from_numpy(g).to(device, dtype))
            )

    def run(i: int) -> None:
        x2, y2 = xs[i % len(xs)], ys[i % len(ys)]
        for a, r, idx, g in groups:
            fa, fb = factors.pairs[a]
            h = (x2.index_select(0, idx) @ fa[:r].T).mul_(g)
            y2.index_add_(0, idx, h @ fb[:, :r].T)

    return run


def kernel_per_rank_call(seg: KernelSegments, factors, xs, ys, device) -> Callable[[int], None]:
    """The kernels launched once per rank (the other segments set to rank 0)."""
    ranks = sorted(set(seg.seg_rank.cpu().tolist()) - {0})
    parts = [with_ranks(seg, lambda s, r=r: np.where(s == r, s, 0), device) for r in ranks]
    calls = [kernel_call(p, factors, xs, ys, device) for p in parts]

    def run(i: int) -> None:
        for c in calls:
            c(i)

    return run


def decode_case(batch: int, in_f: int, out_f: int, dtype, device, factors: LoraFactors, n_sets: int):
    rng = np.random.default_rng(batch)
    dec = K.DecodeSegments(batch, adapters=np.arange(batch) % 2, device=device)

    class Step:
        rank = rng.choice(LADDER, size=batch, p=RANK_P).astype(np.int32)
        lo = rank.copy()
        gate_lo = np.ones(batch, np.float32)
        gate_hi = np.ones(batch, np.float32)
        scale = np.ones(batch, np.float32)

    dec.update(Step)
    xs = [torch.randn(batch, in_f, device=device, dtype=dtype) for _ in range(n_sets)]
    ys = [torch.randn(batch, out_f, device=device, dtype=dtype) for _ in range(n_sets)]
    fn = K.lora_delta_cuda if device == "cuda" else K.lora_delta_reference
    return lambda i: fn(xs[i % n_sets], ys[i % n_sets], factors, dec)


# ---- main ---------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--hidden", type=int, nargs="+", default=[4096, 576])
    ap.add_argument("--dtypes", nargs="+", default=["bf16", "f16"])
    ap.add_argument("--decode", type=int, nargs="+", default=[8, 64, 256])
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--out", default=None, help="JSON file for every number")
    args = ap.parse_args()
    dev = args.device
    dtypes = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}
    if dev == "cpu":  # a smoke run of the script itself
        args.tokens, args.hidden, args.decode = [300], [40], [4]
        args.warmup, args.repeats = 1, 2
    elif not torch.cuda.is_available():
        raise SystemExit("no CUDA device (use --device cpu to check the script)")
    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__}
    if dev == "cuda":
        props = torch.cuda.get_device_properties(0)
        l2 = getattr(props, "L2_cache_size", 50 << 20)
        info |= {"device": props.name, "sms": props.multi_processor_count, "l2_bytes": l2}
        try:
            import cupy

            info["cupy"] = cupy.__version__
        except ImportError:
            pass
        copy_bw = copy_bandwidth(dev, 1 << 30, args.warmup, args.repeats)
    else:
        l2 = 1 << 20
        copy_bw = copy_bandwidth(dev, 1 << 20, 1, 2)
    info["copy_bytes_per_s"] = copy_bw
    print(f"device copy: {copy_bw / 1e9:.0f} GB/s (read + write)  {info}")

    rows = []
    for dname in args.dtypes:
        dtype = dtypes[dname]
        es = torch.tensor([], dtype=dtype).element_size()
        for hidden in args.hidden:
            for n_tok in args.tokens:
                per_set = n_tok * hidden * es * 2
                n_sets = max(2, -(-3 * l2 // per_set)) if dev == "cuda" else 2
                seg, factors, xs, ys, per_token = make_batch(n_tok, hidden, hidden, dtype, dev, n_sets)
                nbytes, flops = useful_bytes(per_token, hidden, hidden, es)

                def t(fn: Callable[[int], None], graph: bool = True, n_sets=n_sets) -> float:
                    return median_time(
                        graphed(fn, n_sets, dev) if graph else fn, dev, args.warmup, args.repeats
                    )

                # correctness spot check: kernels vs the torch path on the same inputs (fp32 math)
                y_k, y_t = ys[0].clone(), ys[0].clone()
                kernel_call(seg, factors, [xs[0]], [y_k], dev)(0)
                f32 = LoraFactors([(a.float(), b.float()) for a, b in factors.pairs])
                y_t = ys[0].float().clone()
                torch_padded_call(per_token, f32, [xs[0].float()], [y_t], dev, torch.float32)(0)
                d_ref = (y_t - ys[0].float()).norm()
                rel = float((y_k.float() - y_t).norm() / d_ref) if d_ref > 0 else 0.0

                padded = with_ranks(seg, lambda s: np.where(s > 0, MAX_R, 0), dev)
                res = {
                    "dtype": dname,
                    "tokens": n_tok,
                    "hidden": hidden,
                    "mean_rank": float(per_token["token_rank"].mean()),
                    "segments": seg.n_segments,
                    "useful_bytes": nbytes,
                    "flops": flops,
                    "rel_err_vs_torch_f32": rel,
                    "kernel_graph_s": t(kernel_call(seg, factors, xs, ys, dev)),
                    "kernel_eager_s": t(kernel_call(seg, factors, xs, ys, dev), graph=False),
                    "kernel_padded_s": t(kernel_call(padded, factors, xs, ys, dev)),
                    "kernel_per_rank_s": t(kernel_per_rank_call(seg, factors, xs, ys, dev)),
                    "torch_padded_s": t(torch_padded_call(per_token, factors, xs, ys, dev, dtype)),
                    "torch_per_rank_s": t(torch_per_rank_call(per_token, factors, xs, ys, dev, dtype)),
                }
                res["kernel_bytes_per_s"] = nbytes / res["kernel_graph_s"]
                res["kernel_share_of_copy_bw"] = res["kernel_bytes_per_s"] / copy_bw
                res["kernel_flops_per_s"] = flops / res["kernel_graph_s"]
                rows.append(res)
                print(json.dumps(res))
        for batch in args.decode:
            hidden = args.hidden[0]
            _, factors, _, _, _ = make_batch(max(batch, 16), hidden, hidden, dtype, dev, 1)
            fn = decode_case(batch, hidden, hidden, dtype, dev, factors, 4)
            step_s = median_time(graphed(fn, 4, dev), dev, args.warmup, args.repeats)
            res = {"dtype": dname, "decode_batch": batch, "hidden": hidden, "kernel_graph_s": step_s}
            rows.append(res)
            print(json.dumps(res))

    print()
    print("prefill (us, median; kernel from graph replays unless 'eager'; BW = useful bytes / kernel time)")
    head = (
        f"{'dtype':5} {'tokens':>6} {'hidden':>6} {'mean r':>6} {'kernel':>8} {'eager':>8} {'GB/s':>6} "
        f"{'%copy':>5} {'k-pad':>8} {'k-rank':>8} {'t-pad':>8} {'t-rank':>8} {'relerr':>8}"
    )
    print(head)
    for r in rows:
        if "tokens" not in r:
            continue
        print(
            f"{r['dtype']:5} {r['tokens']:6d} {r['hidden']:6d} {r['mean_rank']:6.1f} "
            f"{r['kernel_graph_s'] * 1e6:8.1f} {r['kernel_eager_s'] * 1e6:8.1f} "
            f"{r['kernel_bytes_per_s'] / 1e9:6.0f} {100 * r['kernel_share_of_copy_bw']:5.1f} "
            f"{r['kernel_padded_s'] * 1e6:8.1f} {r['kernel_per_rank_s'] * 1e6:8.1f} "
            f"{r['torch_padded_s'] * 1e6:8.1f} {r['torch_per_rank_s'] * 1e6:8.1f} "
            f"{r['rel_err_vs_torch_f32']:8.1e}"
        )
    steps = [
        f"{r['dtype']} b={r['decode_batch']}: {r['kernel_graph_s'] * 1e6:.1f}"
        for r in rows
        if "decode_batch" in r
    ]
    print("decode (us per step, graph replay): " + ", ".join(steps))
    print(f"device copy {copy_bw / 1e9:.0f} GB/s")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"info": info, "results": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
