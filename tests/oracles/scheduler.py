"""A pure numpy reference of the chunkwise scheduler: the prefill plan and the decode step.

This is what the Rust core (``rust/core``) is checked against (``tests/test_reference_agreement.py``)
and benchmarked against (``benches/test_bench_scheduler.py``). It follows
``docs/architecture.md`` section by section and reproduces the core's floating-point choices
where they decide discrete outcomes:

* difficulty: the weighted mean of the signals is accumulated in f64 in the core's order
  (entropy, surprisal, probe, rarity, novelty, position); probe, position and rarity values are
  rounded to f32 first, as in the core, and the positional prior is streamed like the core's
  (a running product with ``exp(-1/tau)``, flushed to 0 below 1e-30). The n-gram novelty is a
  sort of the grams instead of a hash map. The EMA is a linear recurrence, evaluated with a
  log-depth doubling scan (not bit-identical to the sequential recurrence in f64, but the result
  is rounded to f32, where the two agree except with probability ~1e-9 per token).
* segmentation: the exact DP on the ``granularity`` grid with f64 prefix sums, the same
  per-candidate cost expressions (``best[j] + (S2[k] - S2[j]) - a * a * inv_len + penalty`` on
  the grid, ``... - a * a / len + ...`` for the last chunk ending at T) and the first-minimum
  tie-break, vectorised over the candidate starts *and* over the sequences of the batch (one
  Python iteration per grid point, shared by all sequences).
* chunk difficulty: sequential f64 sums per chunk (as the core) so that ties against resolved
  thresholds (quantile mode sets a threshold equal to some chunk's difficulty) match exactly.
* rung modes: thresholds; quantiles by the chunks' token midpoints; target mean rank by the
  core's bisection over the candidate shifts; then the per-sequence budget.

Inputs are taken as given (lists of per-sequence arrays); only the checks that change the result
(no active signal, ids outside the unigram table) raise ``ValueError``.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np
from chunkwise.schedule.plan import PLAN_ARRAYS

__all__ = [
    "DEFAULT_WEIGHTS",
    "PLAN_KEYS",
    "RefConfig",
    "ReferenceDecoder",
    "chunk_stats",
    "compose",
    "dp_cost",
    "rarity_table",
    "reference_difficulty",
    "reference_plan",
    "resolve_thresholds",
    "segment_batch",
    "assign_rungs",
]

DEFAULT_WEIGHTS: dict[str, float] = {
    "entropy": 1.0,
    "surprisal": 1.0,
    "novelty": 0.5,
    "rarity": 0.5,
    "position": 0.25,
    "probe": 1.0,
}

PLAN_KEYS: tuple[str, ...] = PLAN_ARRAYS

_F32 = np.float32
_F64 = np.float64
_I32 = np.int32


def _cuts(m: int) -> np.ndarray:
    """Equally spaced cut points j/m, j = 1..m-1 (the default thresholds and quantiles)."""
    return np.array([j / m for j in range(1, m)], dtype=_F64)


@dataclasses.dataclass(frozen=True)
class RefConfig:
    """A :class:`chunkwise.SchedulerConfig` with every default resolved (numpy-friendly)."""

    rungs: np.ndarray
    scales: np.ndarray
    mode: str
    thresholds: np.ndarray
    quantiles: np.ndarray
    target: float | None
    min_len: int
    max_len: int
    granularity: int
    penalty: float
    crossfade: int
    hysteresis: float
    budget_share: float
    budget_rank: int
    budget_rung: int
    weights: dict[str, float]
    ngram: int
    window: int
    ema: float
    tau: float
    probe_scale: float

    @classmethod
    def from_config(cls, cfg: Any) -> RefConfig:
        """Resolves defaults exactly as the core does (``SchedulerConfig::with_rungs``)."""
        if isinstance(cfg, RefConfig):
            return cfg
        rungs = np.array(list(cfg.rungs), dtype=np.int64)
        m = len(rungs)
        scales = np.ones(m) if cfg.rung_scales is None else np.array(cfg.rung_scales, dtype=_F64)
        thresholds = _cuts(m) if cfg.thresholds is None else np.array(cfg.thresholds, dtype=_F64)
        quantiles = _cuts(m) if cfg.quantiles is None else np.array(cfg.quantiles, dtype=_F64)
        budget_rank = int(rungs[-1]) if cfg.budget_rank is None else int(cfg.budget_rank)
        weights = dict(DEFAULT_WEIGHTS)
        weights.update({k: float(v) for k, v in dict(cfg.weights or {}).items()})
        return cls(
            rungs=rungs,
            scales=scales,
            mode=str(cfg.mode),
            thresholds=thresholds,
            quantiles=quantiles,
            target=None if cfg.target_mean_rank is None else float(cfg.target_mean_rank),
            min_len=int(cfg.min_len),
            max_len=int(cfg.max_len),
            granularity=int(getattr(cfg, "granularity", 1)),
            penalty=float(cfg.chunk_penalty),
            crossfade=int(cfg.crossfade),
            hysteresis=float(cfg.hysteresis),
            budget_share=float(cfg.budget_share),
            budget_rank=budget_rank,
            budget_rung=int(np.argmax(rungs >= budget_rank)),
            weights=weights,
            ngram=int(cfg.ngram),
            window=int(cfg.novelty_window),
            ema=float(cfg.ema),
            tau=float(cfg.position_tau),
            probe_scale=float(cfg.probe_scale),
        )

    def scale_of_rank(self, ranks: np.ndarray) -> np.ndarray:
        """Scale (f64) of the rung of each rank (every rank passed in is a rung)."""
        return self.scales[np.searchsorted(self.rungs, ranks)]


# --------------------------------------------------------------------------------------------
# 1. Difficulty
# --------------------------------------------------------------------------------------------


def rarity_table(unigram_counts: Any) -> np.ndarray:
    """min-max normalised ``-ln((c + 1) / (sum(c) + V))`` as float32, one value per id."""
    c = np.asarray(unigram_counts, dtype=_F64).reshape(-1)
    if c.size == 0 or not np.all(np.isfinite(c)) or np.any(c < 0):
        raise ValueError("unigram_counts: must be a non-empty array of finite counts >= 0")
    total = np.cumsum(c)[-1] + c.size  # sequential sum, as the core
    s = -np.log((c + 1.0) / total)
    lo, hi = s.min(), s.max()
    if hi - lo > 0.0:
        return ((s - lo) / (hi - lo)).astype(_F32)
    return np.zeros(c.size, dtype=_F32)


def position_prior(tau: float, n: int) -> np.ndarray:
    """``exp(-p / tau)`` for p = 0..n-1 as float32, streamed like the core: ``v_0 = 1``,
    ``v_{p+1} = v_p * exp(-1 / tau)`` in f64 (a sequential product), flushed to 0 after the first
    value <= 1e-30."""
    v = np.full(n, math.exp(-1.0 / tau))
    v[0] = 1.0
    np.multiply.accumulate(v, out=v)
    tiny = np.flatnonzero(v <= 1e-30)
    if tiny.size:
        v[tiny[0] + 1 :] = 0.0
    return v.astype(_F32)


def _novelty(ids: np.ndarray, seq: np.ndarray, pos: np.ndarray, n: int, window: int) -> np.ndarray:
    """1.0 where the n-gram ending at a token did not end in the previous ``window`` positions of
    its sequence. Grams shorter than n (the first n-1 tokens) never repeat: always novel.

    A stable sort of the grams keeps equal grams in token order, so the row before a token in
    sorted order is the previous occurrence of its gram (in its sequence, if the sequences match).
    """
    out = np.ones(ids.size, dtype=_F32)
    valid = np.flatnonzero(pos >= n - 1)
    if valid.size < 2:
        return out
    # Row k of `grams` is ids[valid[k]-n+1 .. valid[k]] (always inside one sequence).
    grams = np.lib.stride_tricks.sliding_window_view(ids, n)[valid - (n - 1)]
    bits = max(1, int(ids.max()).bit_length())
    ibits = max(1, int(valid.size).bit_length())
    if n * bits + ibits <= 63:
        # Pack (gram, row) into one int64: a plain sort is then stable and fast (SIMD sort).
        key = grams[:, 0].copy()
        for j in range(1, n):
            key = (key << bits) | grams[:, j]
        packed = np.sort((key << ibits) | np.arange(valid.size))
        order = packed & ((1 << ibits) - 1)
        ks = packed >> ibits
        same = ks[1:] == ks[:-1]
    else:
        order = np.lexsort(grams.T[::-1])  # lexsort is stable
        g = grams[order]
        same = np.all(g[1:] == g[:-1], axis=1)
    s = seq[valid][order]
    p = pos[valid][order]
    repeat = same & (s[1:] == s[:-1]) & (p[1:] - p[:-1] <= window)  # t - window <= u < t
    out[valid[order[1:][repeat]]] = 0.0
    return out


def _ema_scan(raw: np.ndarray, ema: float) -> np.ndarray:
    """Row-wise ``d_0 = raw_0, d_t = ema * raw_t + (1 - ema) * d_{t-1}`` by a doubling scan."""
    if ema == 1.0:
        return raw
    a = 1.0 - ema
    y = ema * raw
    y[:, 0] = raw[:, 0]
    k, ak = 1, a
    while k < raw.shape[1] and ak > 0.0:
        nxt = y.copy()
        nxt[:, k:] += ak * y[:, :-k]
        y, k, ak = nxt, 2 * k, ak * ak
    return y


def _layout(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    seq = np.repeat(np.arange(len(lengths)), lengths)
    pos = np.arange(offsets[-1]) - offsets[seq]
    return offsets, seq, pos


def reference_difficulty(
    cfg: Any,
    ids: np.ndarray,
    lengths: np.ndarray,
    entropy: np.ndarray | None = None,
    surprisal: np.ndarray | None = None,
    probe: np.ndarray | None = None,
    rarity: np.ndarray | None = None,
) -> np.ndarray:
    """Per-token difficulty (float32) of a flat ragged batch (section 1)."""
    rc = RefConfig.from_config(cfg)
    w = rc.weights
    ids = np.asarray(ids, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    offsets, seq, pos = _layout(lengths)
    num = np.zeros(ids.size, dtype=_F64)
    den = 0.0

    def add(weight: float, value: np.ndarray | None) -> None:
        nonlocal num, den
        if weight > 0.0 and value is not None:
            num += weight * value.astype(_F64)
            den += weight

    add(w["entropy"], entropy)
    add(w["surprisal"], surprisal)
    if probe is not None:
        x = probe.astype(_F64)
        add(w["probe"], (x / (x + rc.probe_scale)).astype(_F32))
    if rarity is not None and w["rarity"] > 0.0:
        if ids.size and ids.max() >= rarity.size:
            raise ValueError(f"token_ids: id outside the unigram table of size {rarity.size}")
        add(w["rarity"], rarity[ids])
    if w["novelty"] > 0.0:
        add(w["novelty"], _novelty(ids, seq, pos, rc.ngram, rc.window))
    if w["position"] > 0.0:
        add(w["position"], position_prior(rc.tau, int(lengths.max()))[pos])
    if den == 0.0:
        raise ValueError("weights: no signal with a positive weight was supplied")
    raw = num / den
    # Ragged -> padded [B, T_max] for the scan along time.
    padded = np.zeros((len(lengths), int(lengths.max())), dtype=_F64)
    padded[seq, pos] = raw
    d = _ema_scan(padded, rc.ema)[seq, pos]
    return np.clip(d, 0.0, 1.0).astype(_F32)


# --------------------------------------------------------------------------------------------
# 2. Segmentation (exact DP)
# --------------------------------------------------------------------------------------------


def _grid_costs(best, s1, s2, k, lo, hi, inv, penalty):
    """Costs (the core's expression and order) of starts lo..hi for a chunk ending at grid k."""
    a = s1[:, k, None] - s1[:, lo : hi + 1]
    return best[:, lo : hi + 1] + (s2[:, k, None] - s2[:, lo : hi + 1]) - a * a * inv + penalty


def _end_costs(best, s1, s2, k_end, t_len, g, lo, hi, penalty):
    """Costs of grid starts lo..hi for the last chunk, ending at T (lengths T - j*g, divided)."""
    j = np.arange(lo, hi + 1)
    a = s1[k_end] - s1[lo : hi + 1]
    return best[lo : hi + 1] + (s2[k_end] - s2[lo : hi + 1]) - a * a / (t_len - j * g).astype(_F64) + penalty


def _first_min(cost: np.ndarray) -> int | None:
    """Index of the first minimum, or None if no cost is finite."""
    if cost.size == 0:
        return None
    j = int(cost.argmin())
    return j if np.isfinite(cost[j]) else None


def segment_batch(
    diffs: Sequence[np.ndarray], min_len: int, max_len: int, penalty: float, granularity: int = 1
) -> list[np.ndarray]:
    """Optimal local chunk offsets ``[0, ..., T]`` of every sequence (section 2).

    Inner boundaries lie on multiples of ``granularity`` g (min_len, max_len are multiples of
    g); the last chunk ends at T, usually off the grid. The DP runs over grid points k (one
    Python iteration each) with every sequence of the batch and every candidate start
    vectorised; ties go to the smallest start (first minimum).
    """
    g = max(int(granularity), 1)
    lengths = np.array([len(d) for d in diffs], dtype=np.int64)
    k_ends = -(-lengths // g)
    b, k_max = len(diffs), int(k_ends.max())
    x = np.zeros((b, k_max * g), dtype=_F64)
    for i, d in enumerate(diffs):
        x[i, : len(d)] = d
    # Prefix sums at the grid points (sequential accumulation, as the core; the zero padding
    # leaves every row's total unchanged).
    c1 = np.zeros((b, k_max * g + 1))
    c2 = np.zeros((b, k_max * g + 1))
    np.cumsum(x, axis=1, out=c1[:, 1:])
    np.cumsum(x * x, axis=1, out=c2[:, 1:])
    s1, s2 = np.ascontiguousarray(c1[:, ::g]), np.ascontiguousarray(c2[:, ::g])
    u_min, u_max = min_len // g, max_len // g
    best = np.full((b, k_max + 1), np.inf)
    best[:, 0] = 0.0
    arg = np.zeros((b, k_max + 1), dtype=np.int64)
    inv_desc = 1.0 / (np.arange(u_max, 0, -1, dtype=np.int64) * g).astype(_F64)  # lengths u_max..1
    rows = np.arange(b)
    for k in range(max(u_min, 1), k_max):
        lo, hi = max(0, k - u_max), k - u_min
        inv = inv_desc[u_max - (k - lo) : u_max - u_min + 1]
        cost = _grid_costs(best, s1, s2, k, lo, hi, inv, penalty)
        j = cost.argmin(axis=1)
        best[:, k] = cost[rows, j]  # stays inf where no start is feasible
        arg[:, k] = lo + j
    out = []
    for i, (t_len, k_end) in enumerate(zip(lengths.tolist(), k_ends.tolist(), strict=True)):
        end = (best[i], s1[i], s2[i], k_end, t_len, g)
        j_last = None
        if t_len >= min_len:
            lo = -(-max(0, t_len - max_len) // g)
            hi = (t_len - min_len) // g
            j_last = _first_min(_end_costs(*end, lo, hi, penalty))
            j_last = None if j_last is None else lo + j_last
        if j_last is None:
            # No exact partition: the last chunk starts at a grid point within min_len of T.
            lo = -(-max(0, t_len + 1 - min_len) // g)
            j = _first_min(_end_costs(*end, lo, k_end - 1, penalty))
            j_last = 0 if j is None else lo + j
        offs = [t_len, min(j_last * g, t_len)]
        k = j_last
        while k > 0:
            k = int(arg[i, k])
            offs.append(k * g)
        out.append(np.array(offs[::-1], dtype=np.int64))
    return out


def dp_cost(d: np.ndarray, offsets: np.ndarray, penalty: float) -> float:
    """Total cost of a segmentation: sum over chunks of the SSE around the mean + penalty."""
    d = np.asarray(d, dtype=_F64)
    return float(
        sum(
            ((d[a:b] - d[a:b].mean()) ** 2).sum() + penalty
            for a, b in zip(offsets[:-1], offsets[1:], strict=True)
        )
    )


def chunk_stats(d: np.ndarray, chunk_offsets: np.ndarray) -> np.ndarray:
    """Mean difficulty (f64) of each chunk, summed sequentially in f64 as the core does."""
    starts, lens = chunk_offsets[:-1], np.diff(chunk_offsets)
    width = int(lens.max())
    idx = starts[None, :] + np.arange(width)[:, None]  # [width, C]
    inside = np.arange(width)[:, None] < lens[None, :]
    vals = np.where(inside, np.asarray(d, dtype=_F64)[np.minimum(idx, len(d) - 1)], 0.0)
    return np.cumsum(vals, axis=0)[-1] / lens  # accumulate: sequential down each column


# --------------------------------------------------------------------------------------------
# 3. Rungs: thresholds / quantiles / target, then the budget
# --------------------------------------------------------------------------------------------


def _rung_of(d: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    return (d[:, None] > thresholds[None, :]).sum(axis=1)


def _mean_rank(rc: RefConfig, thresholds: np.ndarray, d: np.ndarray, lens: np.ndarray) -> float:
    # integer-valued products: the f64 sum is exact in any order
    return float(
        np.dot(rc.rungs[_rung_of(d, thresholds)].astype(_F64), lens.astype(_F64)) / max(lens.sum(), 1)
    )


def resolve_thresholds(cfg: Any, d: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """The thresholds every chunk of the plan is ranked with (section 3)."""
    rc = RefConfig.from_config(cfg)
    if rc.mode == "threshold" or len(d) == 0:
        return rc.thresholds.copy()
    if rc.mode == "quantile":
        # theta_j = D of the last sorted chunk whose token midpoint is <= q_j * N
        # (D_min - 1 if none): each rung gets the chunks whose middle falls in its share.
        order = np.lexsort((np.arange(len(d)), d))  # by (D, index)
        sl = lens[order]
        mids = (np.cumsum(sl) - sl).astype(_F64) + sl.astype(_F64) / 2.0
        k = np.searchsorted(mids, rc.quantiles * float(lens.sum()), side="right")
        return np.where(k > 0, d[order[np.maximum(k - 1, 0)]], d[order[0]] - 1.0).astype(_F64)
    # target: the smallest shift delta among {D_c - theta_j} with M(delta) <= target, found by
    # the same bisection as the core (so equal answers even if rounding breaks monotonicity).
    # Sentinels clear of rounding: min - 1 (every chunk on the top rung), max + 1 (all on rung 0;
    # theta_j + (D_c - theta_j) may round below D_c, so the largest candidate is not enough).
    cands = (d[:, None] - rc.thresholds[None, :]).reshape(-1)
    cands = np.unique(np.append(cands, [cands.min() - 1.0, cands.max() + 1.0]))
    lo, hi = 0, len(cands) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if _mean_rank(rc, rc.thresholds + cands[mid], d, lens) <= rc.target:
            hi = mid
        else:
            lo = mid + 1
    return rc.thresholds + cands[lo]


def assign_rungs(
    cfg: Any, thresholds: np.ndarray, d: np.ndarray, lens: np.ndarray, chunk_seq: np.ndarray
) -> np.ndarray:
    """Rung of every chunk: ``#{j: D > theta_j}``, then the per-sequence budget."""
    rc = RefConfig.from_config(cfg)
    rungs = _rung_of(d, thresholds)
    h = rc.budget_rung
    if h == 0 or rc.budget_share >= 1.0:
        return rungs
    bounds = np.flatnonzero(np.diff(chunk_seq)) + 1
    for sl in np.split(np.arange(len(d)), bounds):
        cap = rc.budget_share * float(lens[sl].sum())
        high_mask = rungs[sl] >= h
        high = int(lens[sl][high_mask].sum())
        if high <= cap:
            continue
        order = sl[np.lexsort((sl, d[sl]))]  # easiest first, by (D, index)
        hs = order[rungs[order] >= h]
        left = high - np.cumsum(lens[hs])
        n_demote = int(np.argmax(left <= cap)) + 1  # demote until the share fits
        rungs[hs[:n_demote]] = h - 1
    return rungs


# --------------------------------------------------------------------------------------------
# 4. Gates and segments
# --------------------------------------------------------------------------------------------


def spec_ramp(scale_of: Any, a: int, b: int, i: int, crossfade: int) -> tuple[int, int, float, float]:
    """(token_rank, token_lo, gate_lo, gate_hi) of ramp token i after a change a -> b, one
    token at a time in float64, straight from architecture.md section 4 (``scale_of(rank)``)."""
    alpha = (i + 1) / (crossfade + 1)
    lo, hi = min(a, b), max(a, b)
    shared = (1 - alpha) * scale_of(a) + alpha * scale_of(b)
    if scale_of(hi) > 0:
        return hi, lo, shared / scale_of(hi), alpha if b > a else 1 - alpha
    # the band weighs 0: the token runs at the lower rank, at its scale
    return lo, lo, shared / scale_of(lo) if scale_of(lo) > 0 else 0.0, 1.0


def _ramp(rc: RefConfig, a: np.ndarray, b: np.ndarray, i: np.ndarray):
    """Cross-fade (rank, lo, gate_lo, gate_hi) of the i-th token after a change a -> b (valid
    where a != b, i < w). The shared directions weigh (1 - alpha) s_a + alpha s_b, the band
    between the ranks s_hi alpha (or s_hi (1 - alpha)); the layer multiplies by the scale of
    the token's rank, so a zero upper scale puts the token at the lower rank."""
    alpha = (i + 1).astype(_F64) / float(rc.crossfade + 1)
    sa, sb = rc.scale_of_rank(a), rc.scale_of_rank(b)
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    s_lo, s_hi = rc.scale_of_rank(lo), rc.scale_of_rank(hi)
    shared = (1.0 - alpha) * sa + alpha * sb
    zero = s_hi == 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        on_lo = np.where(s_lo > 0.0, shared / s_lo, 0.0)
        gate_lo = np.where(zero, on_lo, shared / s_hi)
    gate_hi = np.where(zero, 1.0, np.where(b > a, alpha, 1.0 - alpha))
    return np.where(zero, lo, hi), lo, gate_lo.astype(_F32), gate_hi.astype(_F32)


def compose(
    cfg: Any,
    seq_offsets: np.ndarray,
    chunk_offsets: np.ndarray,
    chunk_seq: np.ndarray,
    chunk_rank: np.ndarray,
    adapters: np.ndarray,
) -> dict[str, np.ndarray]:
    """Per-token gates and kernel segments from the chunks' ranks (section 4)."""
    rc = RefConfig.from_config(cfg)
    n = int(seq_offsets[-1])
    lens = np.diff(chunk_offsets)
    cidx = np.repeat(np.arange(len(lens)), lens)
    i = np.arange(n) - chunk_offsets[:-1][cidx]
    rank = chunk_rank.astype(np.int64)
    prev = rank.copy()
    cont = chunk_seq[1:] == chunk_seq[:-1]  # chunk c-1 is in the same sequence as c
    prev[1:][cont] = rank[:-1][cont]
    a, b = prev[cidx], rank[cidx]
    in_ramp = (a != b) & (i < rc.crossfade)
    r_ramp, lo_ramp, g_lo, g_hi = _ramp(rc, a, b, i)
    token_rank = np.where(in_ramp, r_ramp, b)
    token_lo = np.where(in_ramp, lo_ramp, b)
    gate_lo = np.where(in_ramp, g_lo, _F32(1.0)).astype(_F32)
    gate_hi = np.where(in_ramp, g_hi, _F32(1.0)).astype(_F32)
    _, seq, pos = _layout(np.diff(seq_offsets))
    start = pos == 0
    start[1:] |= token_rank[1:] != token_rank[:-1]
    starts = np.flatnonzero(start)
    return {
        "token_rank": token_rank.astype(_I32),
        "token_lo": token_lo.astype(_I32),
        "gate_lo": gate_lo,
        "gate_hi": gate_hi,
        "seg_offsets": np.append(starts, n).astype(_I32),
        "seg_rank": token_rank[starts].astype(_I32),
        "seg_scale": rc.scale_of_rank(token_rank[starts]).astype(_F32),
        "seg_adapter": np.asarray(adapters, dtype=_I32)[seq[starts]],
    }


# --------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------


def _cat(parts: Sequence[Any] | None, dtype: type) -> np.ndarray | None:
    if parts is None:
        return None
    if isinstance(parts, np.ndarray) and parts.ndim == 1:
        return parts.astype(dtype, copy=False)
    return np.concatenate([np.asarray(p, dtype=dtype).reshape(-1) for p in parts])


def reference_plan(
    config: Any,
    token_ids_list: Sequence[np.ndarray],
    entropy_list: Sequence[np.ndarray] | None = None,
    surprisal_list: Sequence[np.ndarray] | None = None,
    probe_list: Sequence[np.ndarray] | None = None,
    difficulty_list: Sequence[np.ndarray] | None = None,
    adapters: Sequence[int] | np.ndarray | None = None,
    unigram_counts: Any | None = None,
    *,
    chunk_offsets_list: Sequence[np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """The plan of a ragged batch as a dict with the keys (and dtypes) of ``chunkwise.Plan``.

    ``token_ids_list`` and the optional per-token signals are lists with one 1-D array per
    sequence. ``chunk_offsets_list`` (local offsets ``[0, ..., T]`` per sequence) replaces the
    DP's segmentation: with it, the rung / gate / segment stages can be checked on given chunks.
    """
    rc = RefConfig.from_config(config)
    ids = _cat(token_ids_list, np.int64)
    lengths = np.array([len(x) for x in token_ids_list], dtype=np.int64)
    if len(lengths) == 0 or np.any(lengths == 0):
        raise ValueError("token_ids: the batch has no sequences, or an empty one")
    seq_offsets, _, _ = _layout(lengths)
    if difficulty_list is not None:
        d = _cat(difficulty_list, _F32)
    else:
        rarity = None if unigram_counts is None else rarity_table(unigram_counts)
        d = reference_difficulty(
            rc,
            ids,
            lengths,
            entropy=_cat(entropy_list, _F32),
            surprisal=_cat(surprisal_list, _F32),
            probe=_cat(probe_list, _F32),
            rarity=rarity,
        )
    per_seq = [d[a:b] for a, b in zip(seq_offsets[:-1], seq_offsets[1:], strict=True)]
    if chunk_offsets_list is None:
        local = segment_batch(per_seq, rc.min_len, rc.max_len, rc.penalty, rc.granularity)
    else:
        local = [np.asarray(o, dtype=np.int64) for o in chunk_offsets_list]
    chunk_offsets = np.concatenate([[0]] + [o[1:] + s for o, s in zip(local, seq_offsets[:-1], strict=True)])
    chunk_seq = np.repeat(np.arange(len(local)), [len(o) - 1 for o in local])
    lens = np.diff(chunk_offsets)
    cd = chunk_stats(d, chunk_offsets)
    thresholds = resolve_thresholds(rc, cd, lens)
    rungs = assign_rungs(rc, thresholds, cd, lens, chunk_seq)
    ranks = rc.rungs[rungs]
    if adapters is None:
        adapters = np.zeros(len(lengths), dtype=_I32)
    out = {
        "seq_offsets": seq_offsets.astype(_I32),
        "difficulty": d.astype(_F32),
        "chunk_offsets": chunk_offsets.astype(_I32),
        "chunk_seq": chunk_seq.astype(_I32),
        "chunk_rung": rungs.astype(_I32),
        "chunk_rank": ranks.astype(_I32),
        "chunk_difficulty": cd.astype(_F32),
        "thresholds": np.asarray(thresholds, dtype=_F64),
    }
    out.update(compose(rc, seq_offsets, chunk_offsets, chunk_seq, ranks, adapters))
    return {k: out[k] for k in PLAN_KEYS}


# --------------------------------------------------------------------------------------------
# 5. Decode
# --------------------------------------------------------------------------------------------


class ReferenceDecoder:
    """Streaming decode state of a batch, mirroring ``chunkwise.DecodeBatch``.

    ``step`` advances every sequence by one token and writes into the arrays ``rank``, ``lo``,
    ``gate_lo``, ``gate_hi``, ``scale``, ``rung``, ``difficulty``, ``new_chunk`` (allocated once).
    The state machine is vectorised over the batch; the n-gram novelty keeps one dict per
    sequence (gram tuple -> last position), as the core keeps one hash map.
    """

    def __init__(
        self,
        config: Any,
        batch_size: int = 1,
        thresholds: Sequence[float] | np.ndarray | None = None,
        unigram_counts: Any | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size: must be >= 1")
        self.cfg = rc = RefConfig.from_config(config)
        self.rarity = None if unigram_counts is None else rarity_table(unigram_counts)
        th = rc.thresholds if thresholds is None else np.asarray(thresholds, dtype=_F64).reshape(-1)
        if len(th) + 1 != len(rc.rungs):
            raise ValueError("thresholds: one fewer than the rungs")
        self.thresholds = th.copy()
        self._th_up = th + rc.hysteresis
        self._th_down = th - rc.hysteresis
        b = self.batch_size = int(batch_size)
        self.rank = np.zeros(b, dtype=_I32)
        self.lo = np.zeros(b, dtype=_I32)
        self.gate_lo = np.zeros(b, dtype=_F32)
        self.gate_hi = np.zeros(b, dtype=_F32)
        self.scale = np.zeros(b, dtype=_F32)
        self.rung = np.zeros(b, dtype=_I32)
        self.difficulty = np.zeros(b, dtype=_F32)
        self.new_chunk = np.zeros(b, dtype=bool)
        self._smoothed = np.zeros(b)
        self._started = np.zeros(b, dtype=bool)
        self._pos = np.zeros(b, dtype=np.int64)
        self._prior = np.ones(b)  # exp(-pos / tau), streamed as in the core
        self._decay = math.exp(-1.0 / rc.tau)
        self._k = np.full(b, -1, dtype=np.int64)  # current rung, -1 before the first token
        self._chunk_len = np.zeros(b, dtype=np.int64)
        self._ramp_from = np.full(b, -1, dtype=np.int64)  # rank before the change, -1: no ramp
        self._ramp_i = np.zeros(b, dtype=np.int64)
        self._high = np.zeros(b, dtype=np.int64)
        self._total = np.zeros(b, dtype=np.int64)
        self._recent = [deque(maxlen=rc.ngram) for _ in range(b)]
        self._seen: list[dict[tuple[int, ...], int]] = [{} for _ in range(b)]

    def __len__(self) -> int:
        return self.batch_size

    def reset(self, index: int) -> None:
        """Starts a new sequence in slot ``index``."""
        self._smoothed[index] = 0.0
        self._started[index] = False
        for arr, v in ((self._pos, 0), (self._k, -1), (self._chunk_len, 0), (self._ramp_from, -1)):
            arr[index] = v
        self._prior[index] = 1.0
        self._ramp_i[index] = self._high[index] = self._total[index] = 0
        self._recent[index] = deque(maxlen=self.cfg.ngram)
        self._seen[index] = {}

    def counts(self, index: int) -> tuple[int, int]:
        """Tokens on high (budgeted) rungs and tokens in total, for sequence ``index``."""
        return int(self._high[index]), int(self._total[index])

    def _novelty(self, ids: Sequence[int]) -> np.ndarray:
        w = self.cfg.window
        out = np.empty(self.batch_size, dtype=_F32)
        for b, tok in enumerate(ids):
            rec = self._recent[b]
            rec.append(tok)
            seen = self._seen[b]
            t = int(self._pos[b])
            u = seen.get(key := tuple(rec))
            seen[key] = t
            out[b] = 1.0 if u is None or u + w < t else 0.0
            if (t + 1) % (4 * w) == 0:  # forget grams that can no longer repeat in the window
                self._seen[b] = {g: v for g, v in seen.items() if v + w >= t + 1}
        return out

    def step(
        self,
        token_ids: Any,
        entropy: np.ndarray | None = None,
        surprisal: np.ndarray | None = None,
        probe: np.ndarray | None = None,
    ) -> None:
        """Advances every sequence by one token (section 5)."""
        rc, w = self.cfg, self.cfg.weights
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        if ids.size != self.batch_size:
            raise ValueError(f"token_ids: has {ids.size} ids for a batch of {self.batch_size}")
        if self.rarity is not None and w["rarity"] > 0.0 and ids.max() >= self.rarity.size:
            raise ValueError("token_ids: id outside the unigram table")
        num = np.zeros(self.batch_size)
        den = 0.0
        if probe is not None:
            x = np.asarray(probe, dtype=_F64)
            probe = (x / (x + rc.probe_scale)).astype(_F32)
        rare = self.rarity[ids] if self.rarity is not None and w["rarity"] > 0.0 else None
        # Same accumulation order as the core: entropy, surprisal, probe, rarity, novelty, position.
        for weight, value in (
            (w["entropy"], entropy),
            (w["surprisal"], surprisal),
            (w["probe"], probe),
            (w["rarity"], rare),
        ):
            if weight > 0.0 and value is not None:
                num += weight * np.asarray(value, dtype=_F32).astype(_F64)
                den += weight
        if w["novelty"] > 0.0:
            num += w["novelty"] * self._novelty(ids.tolist()).astype(_F64)
            den += w["novelty"]
        prior = self._prior
        self._prior = np.where(prior > 1e-30, prior * self._decay, 0.0)
        if w["position"] > 0.0:
            num += w["position"] * prior.astype(_F32).astype(_F64)
            den += w["position"]
        self._pos += 1
        raw = num / den if den > 0.0 else num
        d = np.where(self._started, rc.ema * raw + (1.0 - rc.ema) * self._smoothed, raw)
        self._smoothed = d
        first = ~self._started
        self._started[:] = True
        df = np.clip(d, 0.0, 1.0).astype(_F32)
        dd = df.astype(_F64)[:, None]

        # Chunk state machine.
        k = self._k
        up = (dd > self._th_up).sum(axis=1)
        down = (dd > self._th_down).sum(axis=1)
        nxt = np.where(first, (dd > self.thresholds).sum(axis=1), -1)
        ok = ~first & (self._chunk_len >= rc.min_len) & (self._chunk_len % rc.granularity == 0)
        go_up = ok & (up > k)
        go_down = ok & ~go_up & (down < k)
        renew = ok & ~go_up & ~go_down & (self._chunk_len >= rc.max_len)
        nxt = np.where(go_up, up, np.where(go_down, down, np.where(renew, k, nxt)))
        new = nxt >= 0
        hr = rc.budget_rung
        if rc.budget_share < 1.0:
            room = (self._high + rc.max_len).astype(_F64) <= rc.budget_share * (
                self._total + rc.max_len
            ).astype(_F64)
            nxt = np.where(new & (nxt >= hr) & ~room, hr - 1, nxt)
        prev_rank = np.where(first, -1, rc.rungs[np.maximum(k, 0)])
        new_rank = rc.rungs[np.maximum(nxt, 0)]
        changed = new & ~first & (prev_rank != new_rank)
        self._ramp_from = np.where(new, np.where(changed, prev_rank, -1), self._ramp_from)
        self._ramp_i = np.where(changed, 0, self._ramp_i)
        self._k = k = np.where(new, nxt, k)
        self._chunk_len = np.where(new, 0, self._chunk_len)

        # Gates: ramp tokens after each rank change.
        rank = rc.rungs[k]
        frm, i = self._ramp_from, self._ramp_i
        in_ramp = (frm >= 0) & (i < rc.crossfade)
        r_ramp, lo_ramp, g_lo, g_hi = _ramp(rc, np.where(in_ramp, frm, rank), rank, i)
        self._ramp_i = np.where(in_ramp, i + 1, i)
        self._ramp_from = np.where(in_ramp, frm, -1)
        g_rank = np.where(in_ramp, r_ramp, rank)
        self.rank[:] = g_rank
        self.lo[:] = np.where(in_ramp, lo_ramp, rank)
        self.gate_lo[:] = np.where(in_ramp, g_lo, 1.0)
        self.gate_hi[:] = np.where(in_ramp, g_hi, 1.0)
        self.scale[:] = rc.scale_of_rank(g_rank)
        self.rung[:] = k
        self.difficulty[:] = df
        self.new_chunk[:] = new
        self._chunk_len += 1
        self._total += 1
        self._high += k >= hr

    def outputs(self) -> dict[str, np.ndarray]:
        """Copies of the per-step output arrays."""
        names = ("rank", "lo", "gate_lo", "gate_hi", "scale", "rung", "difficulty", "new_chunk")
        return {n: getattr(self, n).copy() for n in names}
