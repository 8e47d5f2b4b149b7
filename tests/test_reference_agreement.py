"""The Rust scheduler core agrees with the numpy reference in ``tests/oracles/scheduler.py``.

Random ragged batches and random configurations (all three rung modes, with and without a budget,
every signal present or absent, an optional unigram table, rung scales other than 1, quantised
signals that provoke ties) are planned by ``chunkwise.Scheduler`` and by ``reference_plan``;
decode runs are stepped token by token through ``DecodeBatch`` and ``ReferenceDecoder``.

Tolerances:

* ``difficulty``: float32, ``atol=1e-6`` (the reference evaluates the EMA with a doubling scan
  instead of the sequential recurrence; in practice the float32 values are identical).
* Everything downstream is compared exactly, on identical difficulty: if the difficulties are
  not bit-identical, the reference is re-run from the core's difficulty (``difficulty_list=``),
  so a last-ulp difference cannot masquerade as a chunking or rung bug.
* ``chunk_offsets`` exactly. The only legitimate way they may differ is a tie between two
  optimal segmentations evaluated in a different floating-point order; then the DP cost of both
  segmentations (recomputed two-pass in f64) must agree within 1e-9, and ranks / gates /
  segments are compared exactly given the core's chunks (``chunk_offsets_list=``). Both
  implementations evaluate the same f64 expression in the same order, so this fallback is not
  expected to trigger.
"""

from __future__ import annotations

from typing import Any

import chunkwise
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.oracles.scheduler import (
    PLAN_KEYS,
    ReferenceDecoder,
    dp_cost,
    reference_plan,
    segment_batch,
)

SETTINGS = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

SIGNALS = ("entropy", "surprisal", "novelty", "rarity", "position", "probe")

# --------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------


@st.composite
def configs(draw: st.DrawFn, mode: str | None = None, budget: bool | None = None) -> dict[str, Any]:
    """Keyword arguments of a valid ``SchedulerConfig``."""
    rungs = sorted(draw(st.lists(st.integers(0, 96), min_size=2, max_size=6, unique=True)))
    m = len(rungs)
    kw: dict[str, Any] = {"rungs": tuple(rungs)}
    if draw(st.booleans()):
        kw["rung_scales"] = tuple(
            draw(st.lists(st.sampled_from([0.0, 0.25, 0.5, 1.0, 1.5, 2.0]), min_size=m, max_size=m))
        )
    if draw(st.booleans()):
        kw["thresholds"] = tuple(sorted(draw(st.lists(st.floats(0.0, 1.0), min_size=m - 1, max_size=m - 1))))
    mode = mode or draw(st.sampled_from(["threshold", "quantile", "target"]))
    kw["mode"] = mode
    if mode == "quantile" and draw(st.booleans()):
        qs = draw(st.lists(st.integers(1, 99), min_size=m - 1, max_size=m - 1, unique=True))
        kw["quantiles"] = tuple(q / 100 for q in sorted(qs))
    if mode == "target":
        kw["target_mean_rank"] = draw(st.floats(float(rungs[0]), float(rungs[-1])))
    g = draw(st.sampled_from([1, 2, 3, 4, 8]))
    min_len = g * draw(st.integers(1, max(1, 12 // g)))
    kw["granularity"] = g
    kw["min_len"] = min_len
    kw["max_len"] = min_len + g * draw(st.integers(0, 24 // g))
    kw["chunk_penalty"] = draw(st.one_of(st.sampled_from([0.0, 0.01, 0.5]), st.floats(0.0, 2.0)))
    kw["crossfade"] = draw(st.integers(0, min_len))
    kw["hysteresis"] = draw(st.sampled_from([0.0, 0.02, 0.05, 0.2]))
    if budget is None:
        budget = draw(st.booleans())
    if budget:
        kw["budget_share"] = draw(st.one_of(st.sampled_from([0.0, 0.25, 0.5]), st.floats(0.0, 1.0)))
        if draw(st.booleans()):
            kw["budget_rank"] = draw(st.sampled_from(rungs[1:]))
    if draw(st.booleans()):
        kw["weights"] = {
            k: draw(st.sampled_from([0.0, 0.3, 1.0, 2.5]))
            for k in draw(st.lists(st.sampled_from(SIGNALS), unique=True, max_size=6))
        }
    kw["ngram"] = draw(st.integers(1, 4))
    kw["novelty_window"] = draw(st.integers(1, 40))
    kw["ema"] = draw(st.one_of(st.just(1.0), st.floats(0.05, 1.0)))
    kw["position_tau"] = draw(st.sampled_from([1.0, 16.0, 64.0]))
    kw["probe_scale"] = draw(st.sampled_from([0.1, 1.0, 5.0]))
    return kw


def _unit(rng: np.random.Generator, n: int, quantised: bool) -> np.ndarray:
    x = rng.random(n, dtype=np.float32)
    return (np.round(x * 4) / 4).astype(np.float32) if quantised else x


@st.composite
def batches(draw: st.DrawFn) -> dict[str, Any]:
    """A ragged batch: ids, optional signals (lists of per-sequence arrays), table, adapters."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    lengths = draw(st.lists(st.integers(1, 150), min_size=1, max_size=5))
    vocab = draw(st.sampled_from([2, 5, 40, 1000, 2**40]))  # 2**40: grams too wide to pack
    quantised = draw(st.booleans())
    out: dict[str, Any] = {"ids": [rng.integers(0, vocab, t).astype(np.int64) for t in lengths]}
    for name in ("entropy", "surprisal"):
        out[name] = [_unit(rng, t, quantised) for t in lengths] if draw(st.booleans()) else None
    if draw(st.booleans()):
        out["probe"] = [(rng.exponential(1.0, t) * rng.integers(0, 2, t)).astype(np.float32) for t in lengths]
    else:
        out["probe"] = None
    if vocab < 2**20 and draw(st.booleans()):
        counts = rng.integers(0, 50, vocab + draw(st.integers(0, 3))).astype(np.float64)
        out["counts"] = np.zeros_like(counts) if draw(st.integers(0, 9)) == 0 else counts
    else:
        out["counts"] = None
    out["adapters"] = rng.integers(0, 4, len(lengths)).astype(np.int32) if draw(st.booleans()) else None
    return out


# --------------------------------------------------------------------------------------------
# Comparison
# --------------------------------------------------------------------------------------------


def _rust_plan(cfg: chunkwise.SchedulerConfig, b: dict[str, Any], **over: Any) -> chunkwise.Plan:
    sched = chunkwise.Scheduler(cfg, unigram_counts=b["counts"])
    kw = {k: b[k] for k in ("entropy", "surprisal", "probe", "adapters")}
    if "difficulty" in over:  # difficulty replaces the signals (passing both is an error)
        kw = {"adapters": b["adapters"]}
    kw.update(over)
    return sched.plan(b["ids"], **kw)


def _ref_plan(cfg: chunkwise.SchedulerConfig, b: dict[str, Any], **over: Any) -> dict[str, np.ndarray]:
    kw = {
        "entropy_list": b["entropy"],
        "surprisal_list": b["surprisal"],
        "probe_list": b["probe"],
        "adapters": b["adapters"],
        "unigram_counts": b["counts"],
    }
    kw.update(over)
    return reference_plan(cfg, b["ids"], **kw)


def _split(flat: np.ndarray, offsets: np.ndarray) -> list[np.ndarray]:
    return [flat[a:z] for a, z in zip(offsets[:-1], offsets[1:], strict=True)]


def _local_chunks(plan: Any) -> list[np.ndarray]:
    get = (lambda k: plan[k]) if isinstance(plan, dict) else (lambda k: getattr(plan, k))
    so, co, cs = get("seq_offsets"), get("chunk_offsets"), get("chunk_seq")
    return [np.append(co[:-1][cs == s] - so[s], so[s + 1] - so[s]) for s in range(len(so) - 1)]


def assert_exact(plan: chunkwise.Plan, ref: dict[str, np.ndarray], keys: tuple[str, ...] = PLAN_KEYS) -> None:
    for k in keys:
        got, want = getattr(plan, k), ref[k]
        assert got.dtype == want.dtype, f"{k}: dtype {got.dtype} != {want.dtype}"
        assert got.shape == want.shape, f"{k}: shape {got.shape} != {want.shape}"
        if not np.array_equal(got, want):
            bad = np.flatnonzero(got != want)
            i = bad[0]
            raise AssertionError(
                f"{k}: {bad.size} differences, first at {i}: core {got[i]} vs reference {want[i]}"
            )


def assert_plans_agree(
    cfg: chunkwise.SchedulerConfig, b: dict[str, Any], plan: chunkwise.Plan, ref: dict[str, np.ndarray]
) -> None:
    """The comparison described in the module docstring."""
    assert np.array_equal(plan.seq_offsets, ref["seq_offsets"])
    assert ref["difficulty"].dtype == np.float32
    np.testing.assert_allclose(plan.difficulty, ref["difficulty"], rtol=0, atol=1e-6)
    if not np.array_equal(plan.difficulty, ref["difficulty"]):
        # Compare the later stages on the core's difficulty (same inputs, exact comparisons).
        ref = _ref_plan(cfg, b, difficulty_list=_split(plan.difficulty, plan.seq_offsets))
    if np.array_equal(plan.chunk_offsets, ref["chunk_offsets"]):
        assert_exact(plan, ref, tuple(k for k in PLAN_KEYS if k != "difficulty"))
        return
    # A legitimate tie between optimal segmentations: equal DP cost, then equal later stages.
    d = _split(plan.difficulty.astype(np.float64), plan.seq_offsets)
    pen = cfg.chunk_penalty
    for s, (mine, theirs) in enumerate(zip(_local_chunks(ref), _local_chunks(plan), strict=True)):
        assert abs(dp_cost(d[s], mine, pen) - dp_cost(d[s], theirs, pen)) <= 1e-9, (
            f"sequence {s}: DP cost differs"
        )
    ref = _ref_plan(
        cfg,
        b,
        difficulty_list=_split(plan.difficulty, plan.seq_offsets),
        chunk_offsets_list=_local_chunks(plan),
    )
    assert_exact(plan, ref, tuple(k for k in PLAN_KEYS if k != "difficulty"))


def _check(cfg_kw: dict[str, Any], b: dict[str, Any]) -> None:
    cfg = chunkwise.SchedulerConfig(**cfg_kw)
    try:
        plan = _rust_plan(cfg, b)
    except chunkwise.ConfigError as e:
        # No signal with a positive weight: the reference refuses too.
        assert e.parameter == "weights"
        with pytest.raises(ValueError, match="weights"):
            _ref_plan(cfg, b)
        return
    except chunkwise.InputError as e:
        # An id outside the unigram table (only looked up when rarity has weight).
        assert e.parameter == "token_ids"
        with pytest.raises(ValueError, match="token_ids"):
            _ref_plan(cfg, b)
        return
    assert_plans_agree(cfg, b, plan, _ref_plan(cfg, b))
    # Two properties of the spec that hold whatever the implementation:
    if cfg.mode == "target":  # the token-weighted mean rank never exceeds the target
        assert plan.mean_rank() <= cfg.target_mean_rank
    for s in range(plan.n_seqs):  # within a sequence, a harder chunk never has a lower rung
        sel = plan.chunk_seq == s
        d, r = plan.chunk_difficulty[sel].astype(np.float64), plan.chunk_rung[sel]
        order = np.lexsort((r, d))
        assert np.all(np.diff(r[order]) >= 0)
    # The precomputed-difficulty path: no signals, no EMA.
    d = _split(plan.difficulty, plan.seq_offsets)
    assert_plans_agree(cfg, b, _rust_plan(cfg, b, difficulty=d), _ref_plan(cfg, b, difficulty_list=d))


# --------------------------------------------------------------------------------------------
# Prefill
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", [False, True], ids=["no-budget", "budget"])
@pytest.mark.parametrize("mode", ["threshold", "quantile", "target"])
@SETTINGS
@given(data=st.data())
def test_plan_matches_reference(mode: str, budget: bool, data: st.DataObject) -> None:
    _check(data.draw(configs(mode, budget), "config"), data.draw(batches(), "batch"))


@pytest.mark.parametrize("signal", ["entropy", "surprisal", "probe", "counts"])
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_each_signal_alone_and_left_out(signal: str, data: st.DataObject) -> None:
    """Every caller signal both on its own (id-based signals off) and left out of a full set."""
    b = data.draw(batches(), "batch")
    b["ids"] = [x % 1000 for x in b["ids"]]  # a unigram table over every id must fit in memory
    rng = np.random.default_rng(0)
    lengths = [len(x) for x in b["ids"]]
    full = {
        "entropy": [rng.random(t, dtype=np.float32) for t in lengths],
        "surprisal": [rng.random(t, dtype=np.float32) for t in lengths],
        "probe": [rng.exponential(1.0, t).astype(np.float32) for t in lengths],
        "counts": rng.integers(0, 50, int(np.concatenate(b["ids"]).max()) + 1).astype(np.float64),
    }
    kw = data.draw(configs(), "config")
    kw["weights"] = {"novelty": 0.0, "position": 0.0}
    alone = {**b, **{k: None for k in full}, signal: full[signal]}
    _check(kw, alone)
    kw["weights"] = {}
    _check(kw, {**b, **full, signal: None})


def test_tie_fallback_accepts_only_equally_optimal_chunks() -> None:
    """The harness itself: differing chunk boundaries pass only if their DP cost is equal."""
    cfg = chunkwise.SchedulerConfig(rungs=(0, 4, 8), min_len=4, max_len=8, granularity=2, chunk_penalty=0.0)
    ids = [np.zeros(16, dtype=np.int64)]
    b = {"ids": ids, "entropy": None, "surprisal": None, "probe": None, "counts": None, "adapters": None}
    flat = [np.full(16, 0.5, dtype=np.float32)]  # every segmentation costs 0: all tie
    plan = _rust_plan(cfg, b, difficulty=flat)
    other = [np.array([0, 6, 12, 16])]
    assert not np.array_equal(_local_chunks(plan)[0], other[0])
    assert_plans_agree(cfg, b, plan, _ref_plan(cfg, b, difficulty_list=flat, chunk_offsets_list=other))
    steps = [np.repeat(np.array([0.1, 0.9], dtype=np.float32), 8)]  # the optimum splits at 8
    plan = _rust_plan(cfg, b, difficulty=steps)
    worse = _ref_plan(cfg, b, difficulty_list=steps, chunk_offsets_list=other)
    with pytest.raises(AssertionError, match="DP cost differs"):
        assert_plans_agree(cfg, b, plan, worse)


def test_target_at_the_lowest_rank_puts_every_chunk_on_rung_0() -> None:
    """Regression (fixed in 39c67b9): theta + (D - theta) can round below D, so the largest
    candidate shift alone left this chunk on rung 1 with target_mean_rank = 0."""
    x = np.array([0.9511821866035461, 0.9950463771820068, 0.9144159555435181], dtype=np.float32)
    cfg = chunkwise.SchedulerConfig(
        rungs=(0, 8, 16),
        mode="target",
        target_mean_rank=0.0,
        min_len=3,
        max_len=3,
        granularity=1,
        crossfade=0,
    )
    b = {"ids": [np.zeros(3, dtype=np.int64)], "entropy": None, "surprisal": None, "probe": None}
    b.update(counts=None, adapters=None)
    plan = _rust_plan(cfg, b, difficulty=[x])
    assert plan.mean_rank() == 0.0
    assert_plans_agree(cfg, b, plan, _ref_plan(cfg, b, difficulty_list=[x]))


@pytest.mark.parametrize("mode", ["threshold", "quantile", "target"])
def test_large_default_batch(mode: str) -> None:
    """The benchmark's shape: 8 x 4096 tokens with entropy and surprisal, default config."""
    rng = np.random.default_rng(7)
    b = {
        "ids": [rng.integers(0, 32000, 4096).astype(np.int64) for _ in range(8)],
        "entropy": [rng.random(4096, dtype=np.float32) for _ in range(8)],
        "surprisal": [rng.random(4096, dtype=np.float32) for _ in range(8)],
        "probe": None,
        "counts": None,
        "adapters": None,
    }
    cfg = chunkwise.SchedulerConfig(mode=mode, **({"target_mean_rank": 16.0} if mode == "target" else {}))
    plan = _rust_plan(cfg, b)
    ref = _ref_plan(cfg, b)
    assert_exact(plan, ref)  # bit-identical, difficulty included


@settings(max_examples=60, deadline=None)
@given(
    d=st.lists(
        st.sampled_from([0.0, 0.25, 0.5, 1.0]) | st.floats(0.0, 1.0, width=32), min_size=1, max_size=12
    ),
    g=st.integers(1, 3),
    min_units=st.integers(1, 3),
    extra_units=st.integers(0, 4),
    pen=st.sampled_from([0.0, 0.1]) | st.floats(0.0, 0.5),
)
def test_reference_dp_is_optimal(
    d: list[float], g: int, min_units: int, extra_units: int, pen: float
) -> None:
    """The reference itself: its DP reaches the brute-force optimum over every partition with
    inner boundaries on the grid (same short-tail rule), and the core picks the same chunks."""
    x = np.array(d, dtype=np.float32)
    t = len(x)
    min_len, max_len = g * min_units, g * (min_units + extra_units)
    offs = segment_batch([x], min_len, max_len, pen, g)[0]
    lens = np.diff(offs)
    assert offs[0] == 0 and offs[-1] == t and np.all(lens > 0) and np.all(offs[:-1] % g == 0)
    assert np.all((lens[:-1] >= min_len) & (lens[:-1] <= max_len)) and lens[-1] <= max_len
    best_exact = best_tail = np.inf
    for mask in range(1 << (t - 1)):
        cand = np.array([0, *(i for i in range(1, t) if mask >> (i - 1) & 1), t])
        if np.any(cand[:-1] % g):
            continue
        cl = np.diff(cand)
        c = dp_cost(x, cand, pen)
        head_ok = np.all((cl[:-1] >= min_len) & (cl[:-1] <= max_len))
        if head_ok and min_len <= cl[-1] <= max_len:
            best_exact = min(best_exact, c)
        elif head_ok and cl[-1] < min_len:
            best_tail = min(best_tail, c)
    want = best_exact if np.isfinite(best_exact) else best_tail
    assert abs(dp_cost(x, offs, pen) - want) <= 1e-9
    cfg = chunkwise.SchedulerConfig(
        rungs=(0, 8), min_len=min_len, max_len=max_len, granularity=g, chunk_penalty=pen, crossfade=0
    )
    core = chunkwise.Scheduler(cfg).plan([np.zeros(t, dtype=np.int64)], difficulty=[x])
    assert np.array_equal(core.chunk_offsets, offs)


# --------------------------------------------------------------------------------------------
# Decode
# --------------------------------------------------------------------------------------------


DECODE_OUT = ("rank", "lo", "gate_lo", "gate_hi", "scale", "rung", "new_chunk")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg_kw=configs("threshold"), data=st.data())
def test_decode_matches_reference(cfg_kw: dict[str, Any], data: st.DataObject) -> None:
    cfg = chunkwise.SchedulerConfig(**cfg_kw)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), "seed"))
    batch = data.draw(st.integers(1, 6), "batch_size")
    steps = data.draw(st.integers(1, 250), "steps")
    vocab = data.draw(st.sampled_from([2, 5, 40]), "vocab")
    counts = rng.integers(0, 30, vocab).astype(np.float64) if data.draw(st.booleans(), "table") else None
    quantised = data.draw(st.booleans(), "quantised")
    thresholds = None
    if data.draw(st.booleans(), "own thresholds"):
        thresholds = np.sort(rng.random(len(cfg.rungs) - 1))
    sched = chunkwise.Scheduler(cfg, unigram_counts=counts)
    core = sched.decoder(batch, thresholds=thresholds)
    ref = ReferenceDecoder(cfg, batch, thresholds=thresholds, unigram_counts=counts)
    present = {k: data.draw(st.sampled_from([0.0, 0.5, 1.0]), k) for k in ("entropy", "surprisal", "probe")}
    resets = set(data.draw(st.lists(st.integers(0, steps), max_size=3), "resets"))
    for step in range(steps):
        ids = rng.integers(0, vocab, batch).astype(np.int64)
        sig = {
            "entropy": _unit(rng, batch, quantised),
            "surprisal": _unit(rng, batch, quantised),
            "probe": rng.exponential(1.0, batch).astype(np.float32),
        }
        sig = {k: v for k, v in sig.items() if rng.random() < present[k]}
        if step in resets:
            slot = int(rng.integers(0, batch))
            core.reset(slot)
            ref.reset(slot)
        core.step(ids, **sig)
        ref.step(ids, **sig)
        np.testing.assert_allclose(core.difficulty, ref.difficulty, rtol=0, atol=1e-6, err_msg=f"step {step}")
        for k in DECODE_OUT:
            got, want = getattr(core, k), getattr(ref, k)
            assert got.dtype == want.dtype, k
            assert np.array_equal(got, want), f"step {step}, {k}: core {got} vs reference {want}"
    for i in range(batch):
        assert core.counts(i) == ref.counts(i)


def test_decode_continues_a_quantile_plan() -> None:
    """Decoding with the thresholds a quantile plan resolved, batch of 64, 300 steps."""
    rng = np.random.default_rng(3)
    cfg = chunkwise.SchedulerConfig(
        mode="quantile", budget_share=0.4, rung_scales=(0.0, 1.0, 1.0, 0.5, 2.0, 1.0)
    )
    sched = chunkwise.Scheduler(cfg)
    plan = sched.plan(
        [rng.integers(0, 100, 500).astype(np.int64) for _ in range(4)],
        entropy=[rng.random(500, dtype=np.float32) for _ in range(4)],
    )
    core = sched.decoder(64, thresholds=plan.thresholds)
    ref = ReferenceDecoder(cfg, 64, thresholds=plan.thresholds)
    for step in range(300):
        ids = rng.integers(0, 100, 64).astype(np.int64)
        ent = rng.random(64, dtype=np.float32)
        core.step(ids, entropy=ent)
        ref.step(ids, entropy=ent)
        for k in (*DECODE_OUT, "difficulty"):
            assert np.array_equal(getattr(core, k), getattr(ref, k)), f"step {step}, {k}"
