"""Cases of the segmented LoRA kernels: random data (never zeros) laid out in segment layouts, and
a dense float64 oracle computed from the per-token arrays (not from the segment metadata)."""

from __future__ import annotations

import dataclasses
from typing import Any

import chunkwise as cw
import numpy as np
import torch
from chunkwise.kernels import SEGMENT_ARRAYS, KernelSegments

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
#: Relative error of the delta (‖out − ref‖ / ‖ref − y0‖ over touched rows) allowed per dtype.
DELTA_TOL = {torch.float32: 2e-5, torch.float16: 6e-3, torch.bfloat16: 4e-2}
LAYOUTS = ("one_long", "many_short", "uniform", "skewed", "mixed_adapters", "plan", "padded_rows")
#: Ranks of the single-rank layouts: 0, 1, odd, a rung, the adapter's max (64), above it.
RANKS = (0, 1, 20, 32, 64, 80)
MAX_RANK = 64


@dataclasses.dataclass
class Case:
    """x2 [n_rows, in] and y2 [n_rows, out] (y2 rows without a planned token are NaN), one layer's
    factors per adapter, the kernel metadata and the per-token view of the same plan."""

    name: str
    x2: torch.Tensor
    y2: torch.Tensor
    factors: list[tuple[torch.Tensor, torch.Tensor] | None]
    segments: KernelSegments
    token_rank: np.ndarray
    token_lo: np.ndarray
    gate_lo: np.ndarray
    gate_hi: np.ndarray
    token_scale: np.ndarray
    token_adapter: np.ndarray
    row_of: np.ndarray

    def to(self, device: Any) -> Case:
        """The same case on ``device`` (x2 keeps its row stride)."""
        seg = dataclasses.replace(
            self.segments,
            **{k: None if (v := getattr(self.segments, k)) is None else v.to(device) for k in SEGMENT_ARRAYS},
        )
        big = torch.empty(self.x2.shape[0], self.x2.stride(0), dtype=self.x2.dtype, device=device)
        big.fill_(float("nan"))
        x2 = big[:, : self.x2.shape[1]]
        x2.copy_(self.x2)
        factors = [None if p is None else (p[0].to(device), p[1].to(device)) for p in self.factors]
        return dataclasses.replace(self, x2=x2, y2=self.y2.to(device), factors=factors, segments=seg)


def _factors(gen: torch.Generator, ranks: list[int | None], in_f: int, out_f: int, dtype: torch.dtype):
    out: list[tuple[torch.Tensor, torch.Tensor] | None] = []
    for r in ranks:
        if r is None:
            out.append(None)
            continue
        a = torch.randn(r, in_f, generator=gen, dtype=torch.float64) / in_f**0.5
        b = torch.randn(out_f, r, generator=gen, dtype=torch.float64) / max(r, 1) ** 0.5
        out.append((a.to(dtype).contiguous(), b.to(dtype).contiguous()))
    return out


def _synthetic_segments(layout: str, rank: int | None, rng: np.random.Generator):
    """(lengths, ranks, adapters) of a synthetic layout; adapter ranks are [64] except mixed."""
    if layout == "one_long":
        lens = [300]
    elif layout == "many_short":
        lens = list(rng.integers(1, 6, size=50))
    elif layout == "uniform":
        lens = [24] * 10
    elif layout == "skewed":
        lens = [1, 257, 3, 64, 2, 97, 1]
    elif layout == "mixed_adapters":
        lens = list(rng.integers(1, 41, size=24))
    else:
        raise ValueError(layout)
    n = len(lens)
    if rank is not None:
        ranks = [rank] * n
    else:
        ranks = list(rng.choice([0, 1, 4, 8, 16, 20, 32, 64, 70], size=n))
        ranks[0], ranks[-1] = 0, MAX_RANK  # always both ends of the range
    if layout == "mixed_adapters":
        adapters = list(rng.choice([-1, 0, 1, 2, 3, 4], size=n))
        adapters[1] = 1
    else:
        adapters = [0] * n
    return (np.array(lens, np.int64), np.array(ranks, np.int32), np.array(adapters, np.int32))


def numpy_arrays(segments: KernelSegments) -> dict[str, Any]:
    """The metadata arrays of ``segments`` as numpy (None stays None), by name."""
    return {k: None if (v := getattr(segments, k)) is None else v.numpy() for k in SEGMENT_ARRAYS}


def make_case(
    layout: str,
    dtype: torch.dtype,
    *,
    rank: int | None = None,
    in_f: int = 96,
    out_f: int = 80,
    seed: int = 0,
    row_pad: int = 0,
) -> Case:
    """A random case. ``rank`` fixes every segment's rank (synthetic layouts); ``row_pad`` > 0
    gives x2 a row stride of in_f + row_pad."""
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    if layout in ("plan", "padded_rows"):
        config = cw.SchedulerConfig(
            rungs=(0, 4, 8, 16, 32, 64),
            rung_scales=(1.0, 1.0, 0.9, 1.1, 1.0, 0.8),
            min_len=8,
            max_len=64,
            granularity=8,
            chunk_penalty=0.01,
        )
        lengths = [150, 37, 90]
        # difficulty in plateaus from easy to hard (ranks 0 to 64, ramps between) plus noise
        diff = [
            np.clip(
                np.repeat(rng.choice([0.02, 0.3, 0.55, 0.8, 0.98], -(-n // 24)), 24)[:n]
                + rng.normal(0, 0.03, n),
                0,
                1,
            ).astype(np.float32)
            for n in lengths
        ]
        ids = [rng.integers(0, 1000, n).astype(np.int64) for n in lengths]
        plan = cw.Scheduler(config).plan(ids, difficulty=diff, adapters=np.array([0, 1, 0], np.int32))
        ranks = [MAX_RANK, 16]
        n_tok = plan.n_tokens
        seg_len = np.diff(plan.seg_offsets)
        token_adapter = np.repeat(plan.seg_adapter, seg_len)
        token_scale = np.repeat(plan.seg_scale, seg_len)
        token_rank = plan.token_rank.copy()
        assert np.array_equal(token_rank, np.repeat(plan.seg_rank, seg_len))
        token_lo, gate_lo, gate_hi = plan.token_lo.copy(), plan.gate_lo.copy(), plan.gate_hi.copy()
        if layout == "padded_rows":  # [3, 160] grid: rows 0 and 2 right-padded, row 1 left-padded
            width = 160
            row_of = np.concatenate(
                [np.arange(150), width + np.arange(width - 37, width), 2 * width + np.arange(90)]
            )
            n_rows = 3 * width
        else:
            row_of, n_rows = np.arange(n_tok), n_tok
        segments = KernelSegments.from_plan(plan, rows=row_of.astype(np.int32), n_rows=n_rows)
    else:
        lens, seg_rank, seg_adapter = _synthetic_segments(layout, rank, rng)
        ranks = [MAX_RANK] if layout != "mixed_adapters" else [MAX_RANK, 20, None, 1, 33]
        n_tok = int(lens.sum())
        seg_scale = rng.uniform(0.5, 2.0, len(lens)).astype(np.float32)
        token_rank = np.repeat(seg_rank, lens)
        token_adapter = np.repeat(seg_adapter, lens)
        token_scale = np.repeat(seg_scale, lens)
        token_lo = rng.integers(0, token_rank + 3).astype(np.int32)
        gate_lo = rng.uniform(0.05, 1.0, n_tok).astype(np.float32)
        gate_hi = rng.uniform(0.05, 1.0, n_tok).astype(np.float32)
        row_of, n_rows = np.arange(n_tok), n_tok
        segments = KernelSegments.from_arrays(
            seg_offsets=np.concatenate([[0], np.cumsum(lens)]).astype(np.int32),
            seg_rank=seg_rank,
            seg_scale=seg_scale,
            seg_adapter=seg_adapter,
            token_lo=token_lo,
            gate_lo=gate_lo,
            gate_hi=gate_hi,
            rows=None,
            n_rows=n_rows,
        )
    factors = _factors(gen, ranks, in_f, out_f, dtype)
    big = torch.randn(n_rows, in_f + row_pad, generator=gen, dtype=torch.float64).to(dtype)
    x2 = big[:, :in_f]
    y2 = torch.randn(n_rows, out_f, generator=gen, dtype=torch.float64).to(dtype)
    untouched = np.ones(n_rows, bool)
    untouched[row_of] = False
    y2[torch.from_numpy(untouched)] = float("nan")
    return Case(
        f"{layout}-{str(dtype).removeprefix('torch.')}-r{rank}",
        x2,
        y2,
        factors,
        segments,
        token_rank.astype(np.int64),
        token_lo.astype(np.int64),
        gate_lo.astype(np.float64),
        gate_hi.astype(np.float64),
        token_scale.astype(np.float64),
        token_adapter.astype(np.int64),
        row_of.astype(np.int64),
    )


def dense_expected(case: Case) -> torch.Tensor:
    """y2 after the update, token by token with the dense ΔW_t = c_t Σ_j g_t[j] B'[:, j] A'[j]
    in float64, rounded once to y2's dtype (rows without a planned token unchanged)."""
    x = case.x2.detach().to("cpu", torch.float64).numpy()
    y = case.y2.detach().to("cpu").clone()
    ydbl = y.to(torch.float64).numpy()
    for t in range(len(case.token_rank)):
        a = int(case.token_adapter[t])
        if a < 0 or a >= len(case.factors) or case.factors[a] is None:
            continue
        A, B = (m.detach().to("cpu", torch.float64).numpy() for m in case.factors[a])
        r = min(int(case.token_rank[t]), A.shape[0])
        if r == 0:
            continue
        g = np.where(np.arange(r) < case.token_lo[t], case.gate_lo[t], case.gate_hi[t])
        w = case.token_scale[t] * (B[:, :r] * g[None, :]) @ A[:r]  # [out, in]
        row = int(case.row_of[t])
        y[row] = torch.from_numpy(ydbl[row] + w @ x[row]).to(y.dtype)
    return y


def assert_matches(out: torch.Tensor, ref: torch.Tensor, y0: torch.Tensor, tol: float, what: str) -> None:
    """Rows untouched in ``ref`` (equal to y0, NaN included) must be bit-identical in ``out``;
    touched rows: no NaN, and the relative error of the delta within ``tol``."""
    out, ref, y0 = (t.detach().to("cpu") for t in (out, ref, y0))
    bits = {2: torch.int16, 4: torch.int32}[out.element_size()]
    same = (ref.view(bits) == y0.view(bits)).all(dim=1)
    assert torch.equal(out[same].view(bits), ref[same].view(bits)), (
        f"{what}: rows that must stay untouched changed"
    )
    touched = ~same
    o, r, y = (t[touched].to(torch.float64) for t in (out, ref, y0))
    assert not torch.isnan(o).any(), f"{what}: NaN in {int(torch.isnan(o).any(dim=1).sum())} updated rows"
    d_ref = (r - y).norm()
    err = (o - r).norm() / max(float(d_ref), 1e-30)
    assert err <= tol, f"{what}: relative error of the delta {err:.3g} > {tol:.1g}"
