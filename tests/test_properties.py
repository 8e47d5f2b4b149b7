"""Property tests of the prefill planner (hypothesis): chunking, rungs, budget, gates, segments.

The arrays themselves come from a numpy generator seeded by hypothesis (fast to generate at
T = 400); hypothesis draws the seed and every structural parameter, so it still shrinks those.
"""

from __future__ import annotations

import itertools
import math

import chunkwise
import numpy as np
from chunkwise import Plan, Scheduler, SchedulerConfig
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.oracles.scheduler import spec_ramp

SETTINGS = dict(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
VOCAB = 64


# ---------------------------------------------------------------------------------------------
# strategies


@st.composite
def configs(draw, mode=None, full_budget=None):
    m = draw(st.integers(2, 5))
    rungs = tuple(sorted(draw(st.sets(st.integers(0, 64), min_size=m, max_size=m))))
    kw: dict = {"rungs": rungs}
    if draw(st.booleans()):
        if draw(st.booleans()):
            kw["rung_scales"] = (draw(st.sampled_from([0.5, 1.0, 2.0])),) * m
        else:
            kw["rung_scales"] = tuple(
                draw(st.lists(st.sampled_from([0.0, 0.25, 1.0, 1.5, 3.0]), min_size=m, max_size=m))
            )
    if draw(st.booleans()):
        kw["thresholds"] = tuple(
            sorted(draw(st.lists(st.floats(0.0, 1.0, width=32), min_size=m - 1, max_size=m - 1)))
        )
    mode = mode or draw(st.sampled_from(["threshold", "quantile", "target"]))
    kw["mode"] = mode
    if mode == "quantile" and draw(st.booleans()):
        qs = draw(st.sets(st.integers(1, 99), min_size=m - 1, max_size=m - 1))
        kw["quantiles"] = tuple(q / 100 for q in sorted(qs))
    if mode == "target":
        kw["target_mean_rank"] = draw(
            st.one_of(st.sampled_from([float(rungs[0]), float(rungs[-1])]), st.floats(rungs[0], rungs[-1]))
        )
    g = draw(st.sampled_from([1, 1, 2, 3, 4, 8]))
    min_len = g * draw(st.integers(1, max(1, 24 // g)))
    kw["granularity"] = g
    kw["min_len"] = min_len
    kw["max_len"] = min_len + g * draw(st.integers(0, 40 // g))
    kw["chunk_penalty"] = draw(st.sampled_from([0.0, 0.01, 0.1, 0.5, 2.0]))
    kw["crossfade"] = draw(st.integers(0, min(min_len, 6)))
    full = draw(st.booleans()) if full_budget is None else full_budget
    if not full:
        kw["budget_share"] = draw(st.floats(0.0, 1.0))
        if draw(st.booleans()):
            kw["budget_rank"] = draw(st.sampled_from(rungs[1:]))
    kw["ema"] = draw(st.sampled_from([1.0, 0.5, 0.3, 0.05]))
    kw["ngram"] = draw(st.integers(1, 3))
    kw["novelty_window"] = draw(st.sampled_from([1, 8, 256]))
    if draw(st.booleans()):
        kw["weights"] = {
            name: draw(st.sampled_from([0.0, 0.5, 1.0]))
            for name in ("entropy", "surprisal", "novelty", "rarity", "position", "probe")
        }
        kw["weights"]["entropy"] = 1.0  # keep one signal that is always supplied
    return SchedulerConfig(**kw)


def _difficulty_curve(rng: np.random.Generator, n: int, style: int) -> np.ndarray:
    if style == 0:  # i.i.d. uniform
        d = rng.random(n)
    elif style == 1:  # piecewise constant with noise
        k = int(rng.integers(1, 6))
        cuts = np.sort(rng.integers(0, n + 1, size=k - 1))
        levels = rng.random(k)
        d = np.repeat(levels, np.diff(np.concatenate([[0], cuts, [n]]))) + rng.normal(0, 0.05, n)
    elif style == 2:  # constant (ties everywhere)
        d = np.full(n, float(rng.choice([0.0, 0.5, 1.0])))
    elif style == 3:  # few discrete levels (many tied chunk means)
        d = rng.choice([0.0, 0.25, 0.75, 1.0], size=n)
    else:  # long blocks of very different levels: chunks land on many rungs
        d = np.empty(n)
        i = 0
        while i < n:
            k = int(rng.integers(4, 80))
            d[i : i + k] = rng.random() + rng.normal(0, 0.02, size=len(d[i : i + k]))
            i += k
    return np.clip(d, 0.0, 1.0).astype(np.float32)


@st.composite
def batches(draw, max_seqs=4, max_len=400):
    """(lengths, kwargs for Scheduler.plan) with either difficulty= or signals."""
    lengths = draw(st.lists(st.integers(1, max_len), min_size=1, max_size=max_seqs))
    seed = draw(st.integers(0, 2**32 - 1))
    use_difficulty = draw(st.booleans())
    style = draw(st.sampled_from([0, 1, 2, 3, 4, 4, 4]))
    rng = np.random.default_rng(seed)
    n = sum(lengths)
    ids = [rng.integers(0, VOCAB if draw(st.booleans()) else 4, size=t, dtype=np.int64) for t in lengths]
    kw: dict = {}
    if use_difficulty:
        kw["difficulty"] = [_difficulty_curve(rng, t, style) for t in lengths]
    else:
        kw["entropy"] = [_difficulty_curve(rng, t, style) for t in lengths]
        if draw(st.booleans()):
            kw["surprisal"] = [_difficulty_curve(rng, t, (style + 1) % 5) for t in lengths]
        if draw(st.booleans()):
            kw["probe"] = [(rng.random(t) * 3).astype(np.float32) for t in lengths]
    if draw(st.booleans()):
        kw["adapters"] = rng.integers(0, 5, size=len(lengths)).astype(np.int32)
    assert n == sum(len(x) for x in ids)
    return ids, kw


def _scheduler(cfg: SchedulerConfig) -> Scheduler:
    counts = np.random.default_rng(0).integers(0, 1000, size=VOCAB).astype(np.float64)
    return Scheduler(cfg, unigram_counts=counts)


# ---------------------------------------------------------------------------------------------
# reference pieces


def _chunk_means_f64(plan: Plan) -> np.ndarray:
    """Chunk means exactly as the core computes them: sequential f64 sum / length."""
    out = np.empty(plan.n_chunks)
    for c in range(plan.n_chunks):
        seg = plan.difficulty[plan.chunk_offsets[c] : plan.chunk_offsets[c + 1]].astype(np.float64)
        out[c] = np.cumsum(seg)[-1] / len(seg)
    return out


def _exact_split_exists(t: int, lo: int, hi: int, g: int = 1) -> bool:
    """Is there a partition of [0, t) with every length in [lo, hi] and inner boundaries on
    multiples of g (the end t may be off the grid)?"""
    reach = [True] + [False] * (t // g)  # reach[j]: [0, j*g) splits exactly
    for j in range(1, t // g + 1):
        reach[j] = any(reach[i] and lo <= (j - i) * g <= hi for i in range(j))
    return any(reach[j] and lo <= t - j * g <= hi for j in range(t // g + 1) if j * g < t)


def _scale_of(cfg: SchedulerConfig, rank: int) -> float:
    scales = cfg.core.rung_scales
    return float(scales[list(cfg.rungs).index(rank)])


def _expected_gates(cfg: SchedulerConfig, chunk_lens, chunk_ranks):
    """Per-token (token_rank, token_lo, gate_lo, gate_hi) of one sequence, from the spec (§4)."""
    out = []
    w = cfg.crossfade
    for c, (length, b) in enumerate(zip(chunk_lens, chunk_ranks, strict=True)):
        a = chunk_ranks[c - 1] if c > 0 else b
        for i in range(length):
            if a != b and i < w:
                out.append(spec_ramp(lambda r: _scale_of(cfg, r), a, b, i, w))
            else:
                out.append((b, b, 1.0, 1.0))
    return out


def _sse(x: np.ndarray) -> float:
    x = x.astype(np.float64)
    return float(((x - x.mean()) ** 2).sum())


# ---------------------------------------------------------------------------------------------
# the structural invariants every plan satisfies


def _check_plan(cfg: SchedulerConfig, ids, kw, plan: Plan) -> None:
    lengths = [len(x) for x in ids]
    b_count, n = len(lengths), sum(lengths)
    rungs = np.array(cfg.rungs)
    np.testing.assert_array_equal(plan.seq_offsets, np.concatenate([[0], np.cumsum(lengths)]))
    if "difficulty" in kw:
        np.testing.assert_array_equal(plan.difficulty, np.concatenate(kw["difficulty"]))
    assert np.all((plan.difficulty >= 0) & (plan.difficulty <= 1))

    # chunks tile every sequence
    co = plan.chunk_offsets
    assert co[0] == 0 and co[-1] == n
    assert np.all(np.diff(co) > 0)
    assert np.all(np.diff(plan.chunk_seq) >= 0)
    np.testing.assert_array_equal(plan.chunk_rank, rungs[plan.chunk_rung])
    for b in range(b_count):
        idx = np.flatnonzero(plan.chunk_seq == b)
        assert len(idx) >= 1
        assert co[idx[0]] == plan.seq_offsets[b] and co[idx[-1] + 1] == plan.seq_offsets[b + 1]
        local = co[idx[0] : idx[-1] + 2] - co[idx[0]]
        lens = np.diff(local)
        t = lengths[b]
        # inner boundaries on the granularity grid
        assert np.all(local[:-1] % cfg.granularity == 0), local
        # lengths in [min_len, max_len], except a short final tail when no exact split exists
        assert np.all((lens[:-1] >= cfg.min_len) & (lens[:-1] <= cfg.max_len)), lens
        if _exact_split_exists(t, cfg.min_len, cfg.max_len, cfg.granularity):
            event("exact split")
            assert cfg.min_len <= lens[-1] <= cfg.max_len, (t, lens)
        else:
            event("short tail")
            assert lens[-1] < cfg.min_len, (t, lens)

    # chunk difficulty is the chunk mean
    means = _chunk_means_f64(plan)
    np.testing.assert_array_equal(plan.chunk_difficulty, means.astype(np.float32))

    # monotone within a sequence (every mode, with or without a budget)
    for b in range(b_count):
        sel = plan.chunk_seq == b
        d, r = means[sel], plan.chunk_rung[sel]
        harder = d[:, None] > d[None, :]
        assert not np.any(harder & (r[:, None] < r[None, :])), (d, r)

    # thresholds: sorted, one fewer than the rungs
    th = plan.thresholds
    assert len(th) == len(cfg.rungs) - 1 and np.all(np.diff(th) >= 0)

    # budget per sequence
    if cfg.budget_share < 1.0:
        high = rungs[plan.chunk_rung] >= cfg.resolved_budget_rank
        clen = plan.chunk_lengths
        for b in range(b_count):
            sel = plan.chunk_seq == b
            assert clen[sel & high].sum() <= cfg.budget_share * lengths[b] + 1e-9

    # gates: exactly the spec's cross-fade after every rank change
    for b in range(b_count):
        sel = plan.chunk_seq == b
        exp = np.array(_expected_gates(cfg, plan.chunk_lengths[sel].tolist(), plan.chunk_rank[sel].tolist()))
        lo, hi = plan.seq_offsets[b], plan.seq_offsets[b + 1]
        np.testing.assert_array_equal(plan.token_rank[lo:hi], exp[:, 0].astype(np.int32))
        np.testing.assert_array_equal(plan.token_lo[lo:hi], exp[:, 1].astype(np.int32))
        np.testing.assert_allclose(plan.gate_lo[lo:hi], exp[:, 2], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(plan.gate_hi[lo:hi], exp[:, 3], rtol=1e-6, atol=1e-6)
    assert np.all(plan.token_lo <= plan.token_rank)
    event(f"ramps: {bool(np.any(plan.token_lo < plan.token_rank))}")
    event(f"mode: {cfg.mode}, rungs used: {min(len(np.unique(plan.chunk_rung)), 3)}")
    assert np.all(plan.gate_hi >= 0) and np.all(plan.gate_hi <= 1)
    if len(set(cfg.core.rung_scales)) == 1:
        assert np.all((plan.gate_lo >= 0) & (plan.gate_lo <= 1))

    # segments tile the sequences, with alternating ranks inside a sequence
    so = plan.seg_offsets
    assert so[0] == 0 and so[-1] == n and np.all(np.diff(so) > 0)
    assert set(plan.seq_offsets.tolist()) <= set(so.tolist())
    seg_seq = np.searchsorted(plan.seq_offsets, so[:-1], side="right") - 1
    assert np.all(np.searchsorted(plan.seq_offsets, so[1:], side="left") - 1 == seg_seq)
    for s in range(len(plan.seg_rank)):
        assert np.all(plan.token_rank[so[s] : so[s + 1]] == plan.seg_rank[s])
        if s > 0 and seg_seq[s] == seg_seq[s - 1]:
            assert plan.seg_rank[s] != plan.seg_rank[s - 1]
    np.testing.assert_allclose(plan.seg_scale, [_scale_of(cfg, int(r)) for r in plan.seg_rank], rtol=1e-6)
    adapters = kw.get("adapters")
    adapters = np.zeros(b_count, np.int32) if adapters is None else np.asarray(adapters)
    np.testing.assert_array_equal(plan.seg_adapter, adapters[seg_seq])


# ---------------------------------------------------------------------------------------------
# properties


@settings(max_examples=250, **SETTINGS)
@given(cfg=configs(), batch=batches())
def test_plan_invariants_all_modes(cfg, batch):
    ids, kw = batch
    plan = _scheduler(cfg).plan(ids, **kw)
    _check_plan(cfg, ids, kw, plan)


@settings(max_examples=150, **SETTINGS)
@given(cfg=configs(full_budget=True), batch=batches())
def test_rung_is_count_of_thresholds_below_without_budget(cfg, batch):
    ids, kw = batch
    plan = _scheduler(cfg).plan(ids, **kw)
    means = _chunk_means_f64(plan)
    th = plan.thresholds
    want = (means[:, None] > th[None, :]).sum(axis=1)
    np.testing.assert_array_equal(plan.chunk_rung, want)
    # hence monotone across the whole batch, not only inside a sequence
    harder = means[:, None] > means[None, :]
    r = plan.chunk_rung
    assert not np.any(harder & (r[:, None] < r[None, :]))
    if cfg.mode == "threshold":
        np.testing.assert_array_equal(th, cfg.resolved_thresholds)


@settings(max_examples=100, **SETTINGS)
@given(cfg=configs(mode="threshold"), batch=batches())
def test_threshold_mode_harder_chunk_never_lower_rung(cfg, batch):
    ids, kw = batch
    plan = _scheduler(cfg).plan(ids, **kw)
    np.testing.assert_array_equal(plan.thresholds, cfg.resolved_thresholds)
    means = _chunk_means_f64(plan)
    for b in range(plan.n_seqs):
        sel = plan.chunk_seq == b
        d, r = means[sel], plan.chunk_rung[sel]
        order = np.argsort(d, kind="stable")
        ds, rs = d[order], r[order]
        # sorted by difficulty, rungs never go down across a strict increase
        for i in range(1, len(ds)):
            if ds[i] > ds[i - 1]:
                assert rs[i] >= rs[i - 1]
    if cfg.budget_share >= 1.0:
        thr = np.array(cfg.resolved_thresholds)
        np.testing.assert_array_equal(plan.chunk_rung, (means[:, None] > thr[None, :]).sum(axis=1))


@settings(max_examples=200, **SETTINGS)
@given(cfg=configs(mode="target"), batch=batches())
def test_target_mode_mean_rank_at_most_target(cfg, batch):
    # (A target below every reachable mean rank but the lowest one, e.g. rungs[0], used to fail
    # on floating-point rounding; see the two regression tests below.)
    ids, kw = batch
    plan = _scheduler(cfg).plan(ids, **kw)
    assert plan.mean_rank() <= cfg.target_mean_rank + 1e-9
    if cfg.target_mean_rank >= cfg.rungs[-1] and cfg.budget_share >= 1.0:
        assert np.all(plan.chunk_rank == cfg.rungs[-1])


@settings(max_examples=20, **SETTINGS)
@given(
    rungs=st.sets(st.integers(0, 64), min_size=2, max_size=6).map(sorted),
    t=st.integers(1, 12),
    seed=st.integers(0, 2**32 - 1),
)
def test_target_mode_lowest_rung_target(rungs, t, seed):
    # Regression (fixed in 39c67b9): with target_mean_rank == rungs[0] every chunk must be on
    # the lowest rung. The largest candidate shift δ = max_c D_c - θ⁰_0 gave θ_0 = θ⁰_0 + δ,
    # which can round to just below max_c D_c, leaving that chunk on rung 1. Each plan had a
    # ~1-2% chance to hit it, so try 40 per example (found rungs=(0, 1), t=3, seed=0).
    cfg = SchedulerConfig(rungs=tuple(rungs), mode="target", target_mean_rank=float(rungs[0]))
    sched = Scheduler(cfg)
    rng = np.random.default_rng(seed)
    for _ in range(40):
        d = rng.random(t, dtype=np.float32)
        plan = sched.plan(np.zeros(t, dtype=np.int64), difficulty=d)
        assert plan.mean_rank() <= rungs[0], (d.tolist(), plan.chunk_rank, plan.thresholds)


def test_target_mode_lowest_rung_regression():
    # Regression (fixed in 39c67b9): mode="target", target_mean_rank=0 put this one chunk on
    # rank 4. D = mean(d) = 0.4963425199190776 and thresholds[0] = 1/6 + (D - 1/6) =
    # 0.4963425199190775 < D (floating-point rounding).
    d = np.array([0.15114611387252808, 0.7566757202148438, 0.5812057256698608], dtype=np.float32)
    cfg = SchedulerConfig(mode="target", target_mean_rank=0.0)
    plan = Scheduler(cfg).plan(np.zeros(3, dtype=np.int64), difficulty=d)
    assert plan.mean_rank() <= 0.0, (plan.chunk_rank, plan.thresholds)


@settings(max_examples=200, **SETTINGS)
@given(cfg=configs(mode="quantile", full_budget=True), batch=batches())
def test_quantile_mode_shares_follow_quantiles(cfg, batch):
    ids, kw = batch
    plan = _scheduler(cfg).plan(ids, **kw)
    n = plan.n_tokens
    m = len(cfg.rungs)
    qs = cfg.quantiles if cfg.quantiles is not None else tuple(j / m for j in range(1, m))
    means = _chunk_means_f64(plan)
    clen = plan.chunk_lengths
    largest = clen.max() / n
    for j, q in enumerate(qs):
        theta = plan.thresholds[j]
        # θ_j is the difficulty of a chunk (or below every chunk: rung j and below stay empty)
        assert np.any(means == theta) or theta < means.min()
        at_or_below = clen[plan.chunk_rung <= j].sum() / n
        np.testing.assert_array_equal(plan.chunk_rung <= j, means <= theta)
        tied = clen[means == theta].sum() / n
        # the cumulative token share of rungs 0..j is within the largest chunk's share of q_j
        # (ties at θ_j move together, so they may add their share on top)
        assert at_or_below >= q - largest - 1e-12, (j, q, at_or_below, largest)
        assert at_or_below <= q + largest + tied + 1e-12, (j, q, at_or_below, largest, tied)
        if len(np.unique(means)) == len(means):
            assert abs(at_or_below - q) <= largest + 1e-12


@settings(max_examples=120, **SETTINGS)
@given(cfg=configs(), batch=batches(max_seqs=3, max_len=120), data=st.data())
def test_budget_respected_per_sequence(cfg, batch, data):
    share = data.draw(st.floats(0.0, 0.99))
    rank = data.draw(st.sampled_from(cfg.rungs[1:]))
    kw = {f: getattr(cfg, f) for f in cfg.__dataclass_fields__}
    kw.update(budget_share=share, budget_rank=rank)
    cfg = SchedulerConfig(**kw)
    ids, pkw = batch
    plan = _scheduler(cfg).plan(ids, **pkw)
    _check_plan(cfg, ids, pkw, plan)
    # demotions take the easiest high chunks: a demoted chunk sits exactly one rung below
    # budget_rank, and no kept high chunk of that sequence is easier than a demoted one
    unbudgeted = _scheduler(SchedulerConfig(**{**kw, "budget_share": 1.0})).plan(ids, **pkw)
    # (thresholds are resolved before the budget, so they and the chunks are the same)
    np.testing.assert_array_equal(plan.chunk_offsets, unbudgeted.chunk_offsets)
    np.testing.assert_array_equal(plan.thresholds, unbudgeted.thresholds)
    h = list(cfg.rungs).index(rank)
    demoted = plan.chunk_rung != unbudgeted.chunk_rung
    assert np.all(plan.chunk_rung[demoted] == h - 1)
    assert np.all(unbudgeted.chunk_rung[demoted] >= h)
    means = _chunk_means_f64(plan)
    for b in range(plan.n_seqs):
        sel = plan.chunk_seq == b
        kept = sel & (plan.chunk_rung >= h)
        dem = sel & demoted
        if kept.any() and dem.any():
            assert means[dem].max() <= means[kept].min()
        # no more demotions than needed: undoing the hardest demotion would break the budget
        if dem.any():
            hardest = np.flatnonzero(dem)[np.argmax(means[dem])]
            high_tokens = plan.chunk_lengths[kept].sum() + plan.chunk_lengths[hardest]
            assert high_tokens > share * plan.chunk_lengths[sel].sum()


# ---------------------------------------------------------------------------------------------
# brute force: the chunk partition minimises Σ (SSE + penalty)


def _brute_force_cost(d: np.ndarray, lo: int, hi: int, g: int, pen: float) -> float:
    """Minimal Σ (SSE + penalty) over all 2^(T-1) partitions with the planner's feasibility
    rule: inner boundaries on multiples of g, every length in [lo, hi]; if no such partition
    exists, all but a final chunk shorter than ``lo``."""
    t = len(d)
    table = {(a, b): _sse(d[a:b]) + pen for a in range(t) for b in range(a + 1, t + 1)}
    best_exact, best_tail = math.inf, math.inf
    for mask in itertools.product((False, True), repeat=t - 1):
        cuts = [0] + [i + 1 for i, m in enumerate(mask) if m] + [t]
        if any(c % g for c in cuts[:-1]):
            continue
        lens = [b - a for a, b in itertools.pairwise(cuts)]
        if not all(lo <= x <= hi for x in lens[:-1]):
            continue
        cost = sum(table[w] for w in itertools.pairwise(cuts))
        if lo <= lens[-1] <= hi:
            best_exact = min(best_exact, cost)
        elif lens[-1] < lo:
            best_tail = min(best_tail, cost)
    return best_exact if best_exact < math.inf else best_tail


@settings(max_examples=300, **SETTINGS)
@given(
    t=st.integers(1, 12),
    g=st.sampled_from([1, 1, 2, 3]),
    min_units=st.integers(1, 4),
    extra_units=st.integers(0, 4),
    pen=st.sampled_from([0.0, 0.001, 0.02, 0.1, 0.5]),
    seed=st.integers(0, 2**32 - 1),
    style=st.integers(0, 4),
)
def test_partition_is_optimal_brute_force(t, g, min_units, extra_units, pen, seed, style):
    d = _difficulty_curve(np.random.default_rng(seed), t, style)
    lo, hi = min_units * g, (min_units + extra_units) * g
    cfg = SchedulerConfig(rungs=(0, 8), min_len=lo, max_len=hi, granularity=g, chunk_penalty=pen, crossfade=0)
    plan = Scheduler(cfg).plan(np.zeros(t, dtype=np.int64), difficulty=d)
    cuts = plan.chunk_offsets.tolist()
    lens = np.diff(cuts)
    assert cuts[0] == 0 and cuts[-1] == t
    assert all(c % g == 0 for c in cuts[:-1])
    assert np.all((lens[:-1] >= lo) & (lens[:-1] <= hi))
    got = sum(_sse(d[a:b]) + pen for a, b in itertools.pairwise(cuts))
    want = _brute_force_cost(d, lo, hi, g, pen)
    assert abs(got - want) <= 1e-9, (cuts, got, want)


def test_step_function_is_split_at_the_step():
    d = np.concatenate([np.full(40, 0.1), np.full(40, 0.9)]).astype(np.float32)
    cfg = SchedulerConfig(min_len=8, max_len=64, granularity=1, chunk_penalty=0.1)
    plan = Scheduler(cfg).plan(np.zeros(80, dtype=np.int64), difficulty=d)
    np.testing.assert_array_equal(plan.chunk_offsets, [0, 40, 80])
    assert plan.chunk_rank[0] < plan.chunk_rank[1]
    # the ramp after the boundary: crossfade tokens at the larger rank
    assert np.all(plan.token_rank[40:44] == plan.chunk_rank[1])
    np.testing.assert_allclose(plan.gate_hi[40:44], [0.2, 0.4, 0.6, 0.8], rtol=1e-6)
    assert np.all(plan.token_rank[:40] == plan.chunk_rank[0])


def test_planner_is_deterministic():
    rng = np.random.default_rng(7)
    ids = [rng.integers(0, VOCAB, size=n, dtype=np.int64) for n in (300, 17, 250)]
    ent = [rng.random(len(x), dtype=np.float32) for x in ids]
    s = _scheduler(SchedulerConfig(mode="quantile", min_len=4, max_len=32, granularity=2))
    a, b = s.plan(ids, entropy=ent), s.plan(ids, entropy=ent)
    for name in ("chunk_offsets", "chunk_rung", "token_rank", "gate_lo", "thresholds", "difficulty"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert isinstance(a, chunkwise.Plan)
