"""The streaming decoder (``Scheduler.decoder`` / DecodeBatch): shapes and in-place outputs, new
chunks, reset and counts, the budget, hysteresis, min_len, quantile thresholds from a plan, errors
that leave the state unchanged, and the decode state machine against the spec (architecture.md §5)."""

from __future__ import annotations

import chunkwise
import numpy as np
import pytest
from chunkwise import InputError, Scheduler, SchedulerConfig
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.oracles.scheduler import spec_ramp

VOCAB = 1000
PROBE_ONLY = dict(entropy=0.0, surprisal=0.0, novelty=0.0, rarity=0.0, position=0.0, probe=1.0)
OUT_FIELDS = ("rank", "lo", "gate_lo", "gate_hi", "scale", "rung", "difficulty", "new_chunk")


# ---------------------------------------------------------------------------------------------
# decoder basics


def _probe_for(d):
    """Probe value x with x / (x + 1) == d (probe_scale = 1)."""
    d = np.asarray(d, dtype=np.float64)
    return (d / (1.0 - d)).astype(np.float32)


def _probe_sched(**kw) -> Scheduler:
    base = dict(
        rungs=(0, 4, 8, 16), granularity=1, min_len=4, max_len=16, crossfade=2, ema=1.0, weights=PROBE_ONLY
    )
    base.update(kw)
    return Scheduler(SchedulerConfig(**base))


def test_decoder_shapes_and_dtypes():
    sched = Scheduler(SchedulerConfig())
    dec = sched.decoder(3)
    assert isinstance(dec, chunkwise.DecodeBatch)
    assert len(dec) == 3
    assert dec.thresholds == pytest.approx(list(SchedulerConfig().resolved_thresholds))
    want = dict(
        rank=np.int32,
        lo=np.int32,
        gate_lo=np.float32,
        gate_hi=np.float32,
        scale=np.float32,
        rung=np.int32,
        difficulty=np.float32,
        new_chunk=np.bool_,
    )
    for name, dtype in want.items():
        arr = getattr(dec, name)
        assert isinstance(arr, np.ndarray)
        assert arr.dtype == np.dtype(dtype), name
        assert arr.shape == (3,), name
    dec.step(np.array([1, 2, 3], dtype=np.int64))
    assert dec.new_chunk.tolist() == [True, True, True]
    assert np.all(np.isin(dec.rank, SchedulerConfig().rungs))


def test_decoder_arrays_are_updated_in_place():
    sched = _probe_sched()
    dec = sched.decoder(2)
    refs = {name: getattr(dec, name) for name in OUT_FIELDS}
    ids = np.array([1, 2], dtype=np.int64)
    dec.step(ids, probe=_probe_for([0.05, 0.95]))
    for name in OUT_FIELDS:
        assert getattr(dec, name) is refs[name]
    np.testing.assert_allclose(refs["difficulty"], [0.05, 0.95], rtol=1e-6)
    assert refs["rung"].tolist() == [0, 3]
    assert refs["rank"].tolist() == [0, 16]
    np.testing.assert_array_equal(refs["scale"], [1.0, 1.0])
    dec.step(ids, probe=_probe_for([0.10, 0.90]))
    np.testing.assert_allclose(refs["difficulty"], [0.10, 0.90], rtol=1e-6)
    assert refs["new_chunk"].tolist() == [False, False]


def test_new_chunk_flags_follow_max_len_and_granularity():
    # constant difficulty: a new chunk only at the start and every max_len tokens
    sched = _probe_sched(min_len=4, max_len=12, granularity=4)
    dec = sched.decoder(1)
    flags = []
    for _ in range(40):
        dec.step(np.array([7], dtype=np.int64), probe=_probe_for([0.6]))
        flags.append(bool(dec.new_chunk[0]))
    assert [i for i, f in enumerate(flags) if f] == [0, 12, 24, 36]
    # a big jump only starts a chunk at a chunk length that is a multiple of granularity
    dec = sched.decoder(1)
    for _ in range(6):  # chunk of 6 > min_len, 6 % 4 != 0
        dec.step(np.array([7], dtype=np.int64), probe=_probe_for([0.1]))
    dec.step(np.array([7], dtype=np.int64), probe=_probe_for([0.95]))  # chunk length 6
    assert not dec.new_chunk[0] and dec.rung[0] == 0
    dec.step(np.array([7], dtype=np.int64), probe=_probe_for([0.95]))  # chunk length 7
    assert not dec.new_chunk[0]
    dec.step(np.array([7], dtype=np.int64), probe=_probe_for([0.95]))  # chunk length 8: switch
    assert dec.new_chunk[0] and dec.rung[0] == 3


def test_reset_and_counts():
    sched = _probe_sched(budget_share=0.5, budget_rank=8)
    rng = np.random.default_rng(1)
    d = rng.random((60, 3))
    ids = rng.integers(0, 50, size=(60, 3))
    a, b = sched.decoder(3), sched.decoder(3)
    fresh = sched.decoder(1)
    for t in range(60):
        a.step(np.ascontiguousarray(ids[t]), probe=_probe_for(d[t]))
        b.step(np.ascontiguousarray(ids[t]), probe=_probe_for(d[t]))
        if t == 29:
            b.reset(1)
            assert b.counts(1) == (0, 0)
            assert b.counts(0) == a.counts(0)
        if t >= 30:
            fresh.step(np.ascontiguousarray(ids[t, 1:2]), probe=_probe_for(d[t, 1:2]))
            if t == 30:
                assert b.new_chunk[1]
            for name in OUT_FIELDS:
                got, untouched = getattr(b, name), getattr(a, name)
                assert got[0] == untouched[0] and got[2] == untouched[2], name
                assert got[1] == getattr(fresh, name)[0], name
    for i in range(3):
        high, total = a.counts(i)
        assert total == 60
    assert b.counts(1)[1] == 30 and b.counts(1) == fresh.counts(0)
    for bad in (3, -1):
        with pytest.raises(InputError) as info:
            a.counts(bad)
        assert info.value.parameter == "index"
        with pytest.raises(InputError) as info:
            a.reset(bad)
        assert info.value.parameter == "index"


@pytest.mark.parametrize("share", [0.0, 0.2, 0.5, 0.9])
@pytest.mark.parametrize("budget_rank", [4, 16])
def test_decode_budget_never_exceeded(share, budget_rank):
    sched = _probe_sched(budget_share=share, budget_rank=budget_rank, min_len=2, max_len=6, hysteresis=0.0)
    cfg_rungs = (0, 4, 8, 16)
    hr = cfg_rungs.index(budget_rank)
    rng = np.random.default_rng(budget_rank)
    dec = sched.decoder(4)
    high_seen = np.zeros(4, dtype=int)
    for t in range(300):
        d = np.where(rng.random(4) < 0.7, rng.uniform(0.8, 0.99, 4), rng.uniform(0.0, 0.99, 4))
        dec.step(np.arange(4, dtype=np.int64), probe=_probe_for(d))
        high_seen += dec.rung >= hr
        for i in range(4):
            high, total = dec.counts(i)
            assert total == t + 1
            assert high == high_seen[i]
            assert high <= share * total + 1e-9, (t, i, high, total)
    if share >= 0.5:
        assert high_seen.min() > 0  # the budget was actually used, not just avoided


def test_hysteresis_keeps_the_rung_while_difficulty_wobbles():
    h = 0.1
    sched = _probe_sched(rungs=(0, 8), thresholds=(0.5,), hysteresis=h, min_len=2, max_len=10_000)
    rng = np.random.default_rng(0)
    for start, rung in ((0.55, 1), (0.45, 0), (0.5, 0)):
        dec = sched.decoder(1)
        dec.step(np.array([1], dtype=np.int64), probe=_probe_for([start]))
        assert dec.rung[0] == rung and dec.new_chunk[0]
        wobble = 0.5 + rng.uniform(-0.98 * h, 0.98 * h, size=500)
        wobble[::7] = 0.5 + 0.98 * h
        wobble[3::7] = 0.5 - 0.98 * h
        for x in wobble:
            dec.step(np.array([1], dtype=np.int64), probe=_probe_for([x]))
            assert dec.rung[0] == rung
            assert not dec.new_chunk[0]
            assert dec.rank[0] == (8 if rung else 0)
        # beyond the margin it switches (after min_len)
        far = 0.5 - 1.5 * h if rung else 0.5 + 1.5 * h
        dec.step(np.array([1], dtype=np.int64), probe=_probe_for([far]))
        assert dec.new_chunk[0] and dec.rung[0] == 1 - rung


def test_no_switch_before_min_len():
    sched = _probe_sched(rungs=(0, 8), thresholds=(0.5,), hysteresis=0.0, min_len=5, max_len=20, crossfade=0)
    dec = sched.decoder(1)
    seq = [0.9, 0.1, 0.1, 0.1, 0.1, 0.1]
    rungs = []
    for x in seq:
        dec.step(np.array([0], dtype=np.int64), probe=_probe_for([x]))
        rungs.append(int(dec.rung[0]))
    assert rungs == [1, 1, 1, 1, 1, 0]


def test_decode_with_quantile_plan_thresholds():
    cfg = SchedulerConfig(
        mode="quantile", granularity=1, min_len=1, max_len=1, crossfade=0, hysteresis=0.0, ema=0.5
    )
    sched = Scheduler(cfg)
    rng = np.random.default_rng(2)
    t_len, b = 200, 3
    ids = rng.integers(0, VOCAB, size=(b, t_len))
    ent = rng.random((b, t_len), dtype=np.float32)
    plan = sched.plan(ids, entropy=ent)
    assert not np.allclose(plan.thresholds, cfg.resolved_thresholds)
    dec = sched.decoder(b, thresholds=plan.thresholds)
    assert dec.thresholds == list(plan.thresholds)
    th = np.asarray(plan.thresholds)
    rungs = []
    for t in range(t_len):
        dec.step(np.ascontiguousarray(ids[:, t]), entropy=np.ascontiguousarray(ent[:, t]))
        # prefill and decode compute the same difficulty
        np.testing.assert_array_equal(dec.difficulty, plan.difficulty.reshape(b, t_len)[:, t])
        # min_len = max_len = 1, no hysteresis: every token is ranked by the plan's thresholds
        want = (dec.difficulty.astype(np.float64)[:, None] > th[None, :]).sum(axis=1)
        np.testing.assert_array_equal(dec.rung, want)
        assert dec.new_chunk.all()
        rungs.append(dec.rung.copy())
    # with max_len = 1 prefill puts every token in its own chunk, on the same rung
    np.testing.assert_array_equal(plan.chunk_rung.reshape(b, t_len), np.stack(rungs, axis=1))
    assert len(np.unique(plan.chunk_rung)) == len(cfg.rungs)


def test_decoder_errors():
    sched = Scheduler(SchedulerConfig())
    for bad, param in ((0, "batch_size"), (-1, "batch_size")):
        with pytest.raises(InputError) as info:
            sched.decoder(bad)
        assert info.value.parameter == param
    for th in (
        [0.1],
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
        [0.1, 0.2, np.nan, 0.4, 0.5],
        [0.5, 0.4, 0.6, 0.7, 0.8],
    ):
        with pytest.raises(InputError) as info:
            sched.decoder(2, thresholds=th)
        assert info.value.parameter == "thresholds"


def test_decoder_huge_batch_size_is_an_error_not_a_panic():
    # Regression (fixed): Scheduler.decoder(2**62) panics in Rust (capacity overflow), surfacing as
    # pyo3_runtime.PanicException instead of an InputError naming batch_size.
    sched = Scheduler(SchedulerConfig())
    try:
        sched.decoder(2**62)
    except InputError as e:
        assert e.parameter == "batch_size"
    except BaseException as e:  # noqa: BLE001 - PanicException derives from BaseException
        pytest.fail(f"expected InputError(batch_size), got {type(e).__module__}.{type(e).__name__}: {e}")
    else:
        pytest.fail("a batch of 2**62 sequences was allocated")


def test_decoder_non_numeric_thresholds_are_an_input_error():
    # Regression (fixed): thresholds that are not numbers escape as a bare ValueError from float() in
    # Scheduler.decoder, not a chunkwise InputError naming "thresholds".
    sched = Scheduler(SchedulerConfig(rungs=(0, 8)))
    with pytest.raises(InputError) as info:
        sched.decoder(1, thresholds=["abc"])
    assert info.value.parameter == "thresholds"


def _snapshot(dec, b):
    return [getattr(dec, n).copy() for n in OUT_FIELDS], [dec.counts(i) for i in range(b)]


def test_step_errors_leave_the_state_unchanged():
    counts = np.arange(1, 101, dtype=np.float64)
    sched = Scheduler(
        SchedulerConfig(granularity=1, min_len=3, max_len=9, crossfade=2, budget_share=0.5),
        unigram_counts=counts,
    )
    b = 3
    rng = np.random.default_rng(4)
    good = [
        (
            rng.integers(0, 100, size=b, dtype=np.int64),
            rng.random(b, dtype=np.float32),
            rng.exponential(1.0, size=b).astype(np.float32),
        )
        for _ in range(40)
    ]
    f = np.float32
    bad_steps = [
        (lambda ids, e, p: (ids[:2], e, p), "token_ids"),  # wrong batch length
        (lambda ids, e, p: (np.r_[ids, 1], e, p), "token_ids"),
        (lambda ids, e, p: (ids.astype(np.int32), e, p), "token_ids"),
        (lambda ids, e, p: (ids.tolist(), e, p), "token_ids"),
        (lambda ids, e, p: (np.r_[ids[:2], -1], e, p), "token_ids"),
        (lambda ids, e, p: (np.r_[ids[:2], 100], e, p), "token_ids"),  # outside the unigram table
        (lambda ids, e, p: (ids, np.r_[e[:2], f(np.nan)], p), "entropy"),
        (lambda ids, e, p: (ids, np.r_[e[:2], f(1.5)], p), "entropy"),
        (lambda ids, e, p: (ids, e[:2], p), "entropy"),
        (lambda ids, e, p: (ids, e.astype(np.float64), p), "entropy"),
        (lambda ids, e, p: (ids, e, np.r_[p[:2], f(-1.0)]), "probe"),
        (lambda ids, e, p: (ids, e, np.r_[p[:2], f(np.inf)]), "probe"),
        (lambda ids, e, p: (ids, e, np.repeat(p, 2)[::2]), "probe"),  # non-contiguous
    ]
    dec, ref = sched.decoder(b), sched.decoder(b)
    for t, (ids, ent, probe) in enumerate(good):
        if t % 3 == 1:
            for make, param in bad_steps:
                before = _snapshot(dec, b)
                bad_ids, bad_e, bad_p = make(ids, ent, probe)
                with pytest.raises(InputError) as info:
                    dec.step(bad_ids, entropy=bad_e, probe=bad_p)
                assert info.value.parameter == param
                after = _snapshot(dec, b)
                for x, y in zip(before[0], after[0], strict=True):
                    np.testing.assert_array_equal(x, y)
                assert before[1] == after[1]
        dec.step(ids, entropy=ent, probe=probe)
        ref.step(ids, entropy=ent, probe=probe)
        for name in OUT_FIELDS:
            np.testing.assert_array_equal(getattr(dec, name), getattr(ref, name), err_msg=f"{name} at {t}")
        assert [dec.counts(i) for i in range(b)] == [ref.counts(i) for i in range(b)]


# ---------------------------------------------------------------------------------------------
# the decode state machine against the spec (architecture.md §5), driven through the probe


class _RefSeq:
    def __init__(self, cfg: SchedulerConfig, thresholds):
        self.cfg, self.th = cfg, list(thresholds)
        self.rungs = list(cfg.rungs)
        self.scales = list(cfg.core.rung_scales)
        self.hr = self.rungs.index(cfg.resolved_budget_rank)
        self.rung = None
        self.chunk_len = self.high = self.total = 0
        self.ramp = None

    def step(self, d: float):
        cfg, th = self.cfg, self.th
        nxt = None
        if self.rung is None:
            nxt = sum(d > t for t in th)
        elif self.chunk_len >= cfg.min_len and self.chunk_len % cfg.granularity == 0:
            up = sum(d > t + cfg.hysteresis for t in th)
            down = sum(d > t - cfg.hysteresis for t in th)
            if up > self.rung:
                nxt = up
            elif down < self.rung:
                nxt = down
            elif self.chunk_len >= cfg.max_len:
                nxt = self.rung
        new = nxt is not None
        if new:
            room = self.high + cfg.max_len <= cfg.budget_share * (self.total + cfg.max_len)
            if nxt >= self.hr and cfg.budget_share < 1.0 and not room:
                nxt = self.hr - 1
            prev = None if self.rung is None else self.rungs[self.rung]
            self.ramp = (prev, 0) if prev is not None and prev != self.rungs[nxt] else None
            self.rung, self.chunk_len = nxt, 0
        rank = self.rungs[self.rung]
        gate = (rank, rank, 1.0, 1.0)
        if self.ramp is not None:
            a, i = self.ramp
            if i < cfg.crossfade:
                s = dict(zip(self.rungs, self.scales, strict=True))
                gate = spec_ramp(s.__getitem__, a, rank, i, cfg.crossfade)
                self.ramp = (a, i + 1)
            else:
                self.ramp = None
        self.chunk_len += 1
        self.total += 1
        self.high += self.rung >= self.hr
        scale = dict(zip(self.rungs, self.scales, strict=True))[gate[0]]
        return gate, scale, self.rung, new


@st.composite
def decode_cases(draw):
    m = draw(st.integers(2, 5))
    rungs = tuple(sorted(draw(st.sets(st.integers(0, 64), min_size=m, max_size=m))))
    g = draw(st.sampled_from([1, 1, 2, 4]))
    min_len = g * draw(st.integers(1, 4))
    kw = dict(
        rungs=rungs,
        rung_scales=tuple(draw(st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0]), min_size=m, max_size=m))),
        thresholds=tuple(sorted(draw(st.lists(st.floats(0.05, 0.95), min_size=m - 1, max_size=m - 1)))),
        granularity=g,
        min_len=min_len,
        max_len=min_len + g * draw(st.integers(0, 6)),
        crossfade=draw(st.integers(0, min_len)),
        hysteresis=draw(st.sampled_from([0.0, 0.02, 0.1])),
        budget_share=draw(st.sampled_from([1.0, 1.0, 0.0, 0.3, 0.7])),
        budget_rank=draw(st.sampled_from(rungs[1:])),
        ema=1.0,
        weights=PROBE_ONLY,
    )
    return SchedulerConfig(**kw), draw(st.integers(0, 2**32 - 1)), draw(st.integers(1, 4))


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(case=decode_cases())
def test_decode_matches_the_spec_state_machine(case):
    cfg, seed, b = case
    rng = np.random.default_rng(seed)
    sched = Scheduler(cfg)
    dec = sched.decoder(b)
    refs = [_RefSeq(cfg, dec.thresholds) for _ in range(b)]
    # a slowly drifting difficulty with jumps, so every branch of the machine is taken
    level = rng.random(b)
    for t in range(150):
        jump = rng.random(b) < 0.05
        level = np.where(jump, rng.random(b), np.clip(level + rng.normal(0, 0.05, b), 0.001, 0.999))
        if t == 90:
            dec.reset(0)
            refs[0] = _RefSeq(cfg, dec.thresholds)
        dec.step(np.zeros(b, dtype=np.int64), probe=_probe_for(level))
        np.testing.assert_allclose(dec.difficulty, level, rtol=1e-5, atol=1e-6)
        for i, ref in enumerate(refs):
            gate, scale, rung, new = ref.step(float(dec.difficulty[i]))
            got = (int(dec.rank[i]), int(dec.lo[i]), float(dec.gate_lo[i]), float(dec.gate_hi[i]))
            assert got[:2] == gate[:2], (t, i, got, gate)
            assert got[2] == pytest.approx(gate[2], abs=1e-6) and got[3] == pytest.approx(gate[3], abs=1e-6)
            assert dec.scale[i] == pytest.approx(scale)
            assert (int(dec.rung[i]), bool(dec.new_chunk[i])) == (rung, new), (t, i)
            assert dec.counts(i) == (ref.high, ref.total)
            assert ref.high <= cfg.budget_share * ref.total + 1e-9


def test_a_decoder_whose_tables_would_not_fit_memory_is_refused():
    """decoder(2**20) was within the batch limit but needed ~32 GiB of novelty tables, and
    aborted the process under a memory cap."""
    sched = Scheduler(SchedulerConfig())
    with pytest.raises(InputError, match="novelty_window") as e:
        sched.decoder(2**20)
    assert e.value.parameter == "batch_size"
    assert sched.decoder(1024).counts(0) == (0, 0)  # a real batch is fine
    no_novelty = Scheduler(SchedulerConfig(weights={"novelty": 0.0}))
    assert no_novelty.decoder(2**16).counts(0) == (0, 0)  # no tables: no such bound
