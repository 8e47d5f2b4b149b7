"""Scheduler.plan input forms, the Plan object, logit signals as input, and input errors."""

from __future__ import annotations

import dataclasses

import chunkwise
import numpy as np
import pytest
import torch
from chunkwise import InputError, Plan, Scheduler, SchedulerConfig

from tests.support.logits import random_logits

LENGTHS = (37, 5, 120, 64)
VOCAB = 50


def _batch(lengths=LENGTHS, seed=0):
    rng = np.random.default_rng(seed)
    ids = [rng.integers(0, VOCAB, size=n, dtype=np.int64) for n in lengths]
    ent = [rng.random(n, dtype=np.float32) for n in lengths]
    sur = [rng.random(n, dtype=np.float32) for n in lengths]
    probe = [(rng.random(n, dtype=np.float32) * 4).astype(np.float32) for n in lengths]
    return ids, ent, sur, probe


def _sched(**kw):
    base = dict(min_len=4, max_len=24, granularity=2, crossfade=2)
    base.update(kw)
    return Scheduler(SchedulerConfig(**base), unigram_counts=np.arange(VOCAB, dtype=np.float64))


FIELDS = [f.name for f in dataclasses.fields(Plan) if f.name != "rungs"]


def _assert_same_plan(a: Plan, b: Plan):
    assert a.rungs == b.rungs
    for name in FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype, name
        np.testing.assert_array_equal(x, y, err_msg=name)


# ---------------------------------------------------------------------------------------------
# input forms


def test_ragged_list_flat_torch_and_python_lists_agree():
    ids, ent, sur, probe = _batch()
    s = _sched()
    ref = s.plan(ids, entropy=ent, surprisal=sur, probe=probe, adapters=[3, 1, 4, 1])
    lens = np.array(LENGTHS, dtype=np.int64)
    flat = s.plan(
        np.concatenate(ids),
        seq_lengths=lens,
        entropy=np.concatenate(ent),
        surprisal=np.concatenate(sur),
        probe=np.concatenate(probe),
        adapters=np.array([3, 1, 4, 1], dtype=np.int32),
    )
    _assert_same_plan(ref, flat)
    flat_list_lens = s.plan(
        np.concatenate(ids),
        seq_lengths=list(LENGTHS),
        entropy=np.concatenate(ent),
        surprisal=np.concatenate(sur),
        probe=np.concatenate(probe),
        adapters=(3, 1, 4, 1),
    )
    _assert_same_plan(ref, flat_list_lens)
    tor = s.plan(
        [torch.from_numpy(x) for x in ids],
        entropy=[torch.from_numpy(x) for x in ent],
        surprisal=[torch.from_numpy(x) for x in sur],
        probe=[torch.from_numpy(x) for x in probe],
        adapters=torch.tensor([3, 1, 4, 1], dtype=torch.int32),
    )
    _assert_same_plan(ref, tor)
    tor_flat = s.plan(
        torch.from_numpy(np.concatenate(ids)),
        seq_lengths=torch.tensor(LENGTHS),
        entropy=torch.from_numpy(np.concatenate(ent)),
        surprisal=torch.from_numpy(np.concatenate(sur)),
        probe=torch.from_numpy(np.concatenate(probe)),
        adapters=[3, 1, 4, 1],
    )
    _assert_same_plan(ref, tor_flat)
    py = s.plan(
        [x.tolist() for x in ids],
        entropy=[x.tolist() for x in ent],
        surprisal=[x.tolist() for x in sur],
        probe=[x.tolist() for x in probe],
        adapters=[3, 1, 4, 1],
    )
    _assert_same_plan(ref, py)


def test_2d_array_equals_list_of_rows():
    ids, ent, _, _ = _batch(lengths=(50, 50, 50))
    s = _sched()
    ref = s.plan(ids, entropy=ent)
    two_d = s.plan(np.stack(ids), entropy=np.stack(ent))
    _assert_same_plan(ref, two_d)
    tor = s.plan(torch.from_numpy(np.stack(ids)), entropy=torch.from_numpy(np.stack(ent)))
    _assert_same_plan(ref, tor)
    # A python list of ints is one sequence.
    one = s.plan(ids[0].tolist(), entropy=ent[0].tolist())
    _assert_same_plan(s.plan([ids[0]], entropy=[ent[0]]), one)
    assert one.n_seqs == 1


def test_flat_without_seq_lengths_is_one_sequence():
    ids, ent, _, _ = _batch(lengths=(80,))
    s = _sched()
    p = s.plan(ids[0], entropy=ent[0])
    assert p.n_seqs == 1
    np.testing.assert_array_equal(p.seq_offsets, [0, 80])
    _assert_same_plan(p, s.plan(ids, entropy=ent))


def test_sequences_are_planned_independently_in_threshold_mode():
    ids, ent, sur, _ = _batch()
    s = _sched()
    whole = s.plan(ids, entropy=ent, surprisal=sur)
    for b in range(len(ids)):
        alone = s.plan([ids[b]], entropy=[ent[b]], surprisal=[sur[b]])
        view = whole.sequence(b)
        np.testing.assert_array_equal(view["difficulty"], alone.difficulty)
        np.testing.assert_array_equal(view["chunk_offsets"], alone.chunk_offsets)
        np.testing.assert_array_equal(view["chunk_rank"], alone.chunk_rank)
        np.testing.assert_array_equal(view["token_rank"], alone.token_rank)


def test_inputs_are_not_modified():
    ids, ent, _, _ = _batch()
    flat_ids, flat_ent = np.concatenate(ids), np.concatenate(ent)
    ids_copy, ent_copy = flat_ids.copy(), flat_ent.copy()
    _sched().plan(flat_ids, seq_lengths=list(LENGTHS), entropy=flat_ent)
    np.testing.assert_array_equal(flat_ids, ids_copy)
    np.testing.assert_array_equal(flat_ent, ent_copy)
    # Read-only inputs are fine (zero-copy, never written).
    flat_ids.flags.writeable = False
    flat_ent.flags.writeable = False
    _sched().plan(flat_ids, seq_lengths=list(LENGTHS), entropy=flat_ent)


# ---------------------------------------------------------------------------------------------
# the Plan object


DTYPES = {
    "seq_offsets": np.int32,
    "difficulty": np.float32,
    "chunk_offsets": np.int32,
    "chunk_seq": np.int32,
    "chunk_rung": np.int32,
    "chunk_rank": np.int32,
    "chunk_difficulty": np.float32,
    "token_rank": np.int32,
    "token_lo": np.int32,
    "gate_lo": np.float32,
    "gate_hi": np.float32,
    "seg_offsets": np.int32,
    "seg_rank": np.int32,
    "seg_scale": np.float32,
    "seg_adapter": np.int32,
    "thresholds": np.float64,
}


@pytest.fixture(scope="module")
def plan() -> Plan:
    ids, ent, sur, probe = _batch()
    return _sched(rungs=(0, 4, 16, 64), rung_scales=(1.0, 0.5, 1.0, 2.0)).plan(
        ids, entropy=ent, surprisal=sur, probe=probe, adapters=[7, 0, 2, 7]
    )


def test_plan_dtypes_lengths_and_read_only(plan):
    assert set(DTYPES) == set(FIELDS)
    n, b, c, s = sum(LENGTHS), len(LENGTHS), plan.n_chunks, len(plan.seg_rank)
    want_len = {
        "seq_offsets": b + 1,
        "difficulty": n,
        "chunk_offsets": c + 1,
        "chunk_seq": c,
        "chunk_rung": c,
        "chunk_rank": c,
        "chunk_difficulty": c,
        "token_rank": n,
        "token_lo": n,
        "gate_lo": n,
        "gate_hi": n,
        "seg_offsets": s + 1,
        "seg_rank": s,
        "seg_scale": s,
        "seg_adapter": s,
        "thresholds": len(plan.rungs) - 1,
    }
    for name, dtype in DTYPES.items():
        arr = getattr(plan, name)
        assert isinstance(arr, np.ndarray), name
        assert arr.dtype == np.dtype(dtype), name
        assert arr.ndim == 1, name
        assert len(arr) == want_len[name], name
        assert not arr.flags.writeable, name
        with pytest.raises(ValueError):
            arr[0] = arr[0]
    assert plan.n_tokens == n and plan.n_seqs == b
    assert plan.rungs == (0, 4, 16, 64)
    np.testing.assert_array_equal(plan.seq_offsets, np.concatenate([[0], np.cumsum(LENGTHS)]))
    assert plan.chunk_offsets[0] == 0 and plan.chunk_offsets[-1] == n
    assert plan.seg_offsets[0] == 0 and plan.seg_offsets[-1] == n
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.difficulty = np.zeros(3)  # type: ignore[misc]


def test_plan_values_are_consistent(plan):
    rungs = np.array(plan.rungs)
    np.testing.assert_array_equal(plan.chunk_rank, rungs[plan.chunk_rung])
    lens = np.diff(plan.chunk_offsets)
    np.testing.assert_array_equal(plan.chunk_lengths, lens)
    # chunk_difficulty is the mean difficulty of the chunk
    for c in range(plan.n_chunks):
        seg = plan.difficulty[plan.chunk_offsets[c] : plan.chunk_offsets[c + 1]].astype(np.float64)
        assert plan.chunk_difficulty[c] == pytest.approx(seg.mean(), abs=1e-6)
    assert np.all(plan.difficulty >= 0) and np.all(plan.difficulty <= 1)
    # adapters go to the segments of their sequence
    adapters = np.array([7, 0, 2, 7])
    seg_seq = np.searchsorted(plan.seq_offsets, plan.seg_offsets[:-1], side="right") - 1
    np.testing.assert_array_equal(plan.seg_adapter, adapters[seg_seq])
    scales = dict(zip((0, 4, 16, 64), (1.0, 0.5, 1.0, 2.0), strict=True))
    np.testing.assert_array_equal(plan.seg_scale, [scales[r] for r in plan.seg_rank])


def test_rung_histogram_and_mean_rank(plan):
    hist = plan.rung_histogram()
    assert hist.dtype == np.int64
    assert len(hist) == len(plan.rungs)
    assert hist.sum() == plan.n_tokens
    per_token_rung = np.repeat(plan.chunk_rung, plan.chunk_lengths)
    np.testing.assert_array_equal(hist, np.bincount(per_token_rung, minlength=len(plan.rungs)))
    per_token_rank = np.repeat(plan.chunk_rank, plan.chunk_lengths)
    manual = sum(int(r) for r in per_token_rank) / plan.n_tokens
    assert plan.mean_rank() == pytest.approx(manual, rel=1e-12)
    assert plan.mean_executed_rank() == pytest.approx(plan.token_rank.astype(np.float64).mean())
    # ramps run at the larger rank, so executed >= planned
    assert np.all(plan.token_rank >= per_token_rank)
    assert plan.mean_executed_rank() >= plan.mean_rank() - 1e-12


def test_sequence_views(plan):
    for b in range(plan.n_seqs):
        v = plan.sequence(b)
        lo, hi = int(plan.seq_offsets[b]), int(plan.seq_offsets[b + 1])
        assert v["tokens"] == (lo, hi)
        assert np.shares_memory(v["difficulty"], plan.difficulty)
        assert np.shares_memory(v["token_rank"], plan.token_rank)
        np.testing.assert_array_equal(v["difficulty"], plan.difficulty[lo:hi])
        np.testing.assert_array_equal(v["token_rank"], plan.token_rank[lo:hi])
        offs = v["chunk_offsets"]
        assert offs[0] == 0 and offs[-1] == hi - lo
        assert np.all(np.diff(offs) > 0)
        sel = plan.chunk_seq == b
        np.testing.assert_array_equal(offs[:-1] + lo, plan.chunk_offsets[:-1][sel])
        np.testing.assert_array_equal(v["chunk_rank"], plan.chunk_rank[sel])
        assert not v["difficulty"].flags.writeable
    for bad in (-1, plan.n_seqs):
        with pytest.raises(InputError) as info:
            plan.sequence(bad)
        assert info.value.parameter == "b"


def test_to_torch(plan):
    t = plan.to_torch()
    names = (
        "seg_offsets",
        "seg_rank",
        "seg_scale",
        "seg_adapter",
        "token_rank",
        "token_lo",
        "gate_lo",
        "gate_hi",
    )
    assert set(t) == set(names)
    for name in names:
        arr = getattr(plan, name)
        ten = t[name]
        assert isinstance(ten, torch.Tensor)
        assert ten.device.type == "cpu"
        assert ten.dtype == (torch.int32 if arr.dtype == np.int32 else torch.float32)
        np.testing.assert_array_equal(ten.numpy(), arr)
        # a copy: writing the tensor leaves the (read-only) plan alone
        before = arr.copy()
        ten.add_(1)
        np.testing.assert_array_equal(arr, before)


def test_summary(plan):
    text = plan.summary()
    assert isinstance(text, str)
    assert f"{plan.n_tokens} tokens in {plan.n_seqs} sequence(s), {plan.n_chunks} chunks" in text
    assert f"{len(plan.seg_rank)} kernel segments" in text
    assert f"mean rank {plan.mean_rank():.2f}" in text
    share = plan.rung_histogram() / plan.n_tokens
    for r, sh in zip(plan.rungs, share, strict=True):
        assert f"r{r}: {sh:.0%}" in text


def test_difficulty_input_is_used_verbatim():
    rng = np.random.default_rng(3)
    d = rng.random(90, dtype=np.float32)
    p = _sched().plan(np.zeros(90, dtype=np.int64), difficulty=d)
    np.testing.assert_array_equal(p.difficulty, d)


# ---------------------------------------------------------------------------------------------
# logit signals as plan input (the signals themselves: test_signals.py)


def test_signals_feed_the_planner():
    logits = random_logits(rows=40, vocab=VOCAB, seed=2)
    ids = np.random.default_rng(3).integers(0, VOCAB, size=40, dtype=np.int64)
    s = _sched()
    p = s.plan(
        ids,
        entropy=chunkwise.entropy_from_logits(logits),
        surprisal=chunkwise.surprisal_from_logits(logits, ids),
    )
    assert p.n_tokens == 40


# ---------------------------------------------------------------------------------------------
# input errors

IDS = np.arange(20, dtype=np.int64) % 7
IDS2 = [IDS[:10].copy(), IDS[10:].copy()]


def _f(n, v=0.5):
    return np.full(n, v, dtype=np.float32)


def _with(a, i, v):
    a = a.copy()
    a[i] = v
    return a


S = _sched()
BAD_INPUTS = [
    ("nan entropy", lambda s: s.plan(IDS, entropy=_with(_f(20), 19, np.nan)), "entropy"),
    ("inf surprisal", lambda s: s.plan(IDS, surprisal=_with(_f(20), 3, np.inf)), "surprisal"),
    ("-inf entropy", lambda s: s.plan(IDS, entropy=_with(_f(20), 3, -np.inf)), "entropy"),
    ("entropy > 1", lambda s: s.plan(IDS, entropy=_with(_f(20), 0, 1.0001)), "entropy"),
    ("surprisal < 0", lambda s: s.plan(IDS, surprisal=_with(_f(20), 0, -1e-6)), "surprisal"),
    ("difficulty > 1", lambda s: s.plan(IDS, difficulty=_f(20, 1.5)), "difficulty"),
    ("difficulty nan", lambda s: s.plan(IDS, difficulty=_with(_f(20), 4, np.nan)), "difficulty"),
    ("difficulty length", lambda s: s.plan(IDS, difficulty=_f(21)), "difficulty"),
    ("negative probe", lambda s: s.plan(IDS, probe=_with(_f(20), 2, -1.0)), "probe"),
    ("inf probe", lambda s: s.plan(IDS, probe=_with(_f(20), 2, np.inf)), "probe"),
    ("nan probe", lambda s: s.plan(IDS, probe=_with(_f(20), 2, np.nan)), "probe"),
    ("empty batch", lambda s: s.plan([]), "token_ids"),
    ("empty 2-d batch", lambda s: s.plan(np.zeros((0, 5), np.int64)), "token_ids"),
    ("empty sequence in list", lambda s: s.plan([IDS, np.array([], np.int64)]), "token_ids"),
    ("empty flat", lambda s: s.plan(np.array([], np.int64)), "token_ids"),
    ("empty rows", lambda s: s.plan(np.zeros((2, 0), np.int64)), "token_ids"),
    ("zero seq_length", lambda s: s.plan(IDS, seq_lengths=[10, 0, 10]), "token_ids"),
    ("int32 ids", lambda s: s.plan(IDS.astype(np.int32)), "token_ids"),
    ("int32 ids in list", lambda s: s.plan([IDS.astype(np.int32)]), "token_ids"),
    ("uint64 ids", lambda s: s.plan(IDS.astype(np.uint64)), "token_ids"),
    ("float ids list", lambda s: s.plan([1.0, 2.0]), "token_ids"),
    ("string ids", lambda s: s.plan("abc"), "token_ids"),
    ("None ids", lambda s: s.plan(None), "token_ids"),
    ("0-d ids", lambda s: s.plan(np.array(3, np.int64)), "token_ids"),
    ("float64 signals", lambda s: s.plan(IDS, entropy=_f(20).astype(np.float64)), "entropy"),
    (
        "float64 signals list",
        lambda s: s.plan(IDS2, surprisal=[_f(10).astype(np.float64), _f(10)]),
        "surprisal",
    ),
    ("float16 probe", lambda s: s.plan(IDS, probe=_f(20).astype(np.float16)), "probe"),
    ("float64 difficulty", lambda s: s.plan(IDS, difficulty=_f(20).astype(np.float64)), "difficulty"),
    ("3-d ids", lambda s: s.plan(IDS.reshape(2, 2, 5)), "token_ids"),
    ("3-d entropy", lambda s: s.plan(IDS, entropy=_f(20).reshape(2, 2, 5)), "entropy"),
    ("2-d part in list", lambda s: s.plan([IDS.reshape(4, 5)]), "token_ids"),
    (
        "non-contiguous flat ids",
        lambda s: s.plan(np.arange(40, dtype=np.int64)[::2], seq_lengths=[10, 10]),
        "token_ids",
    ),
    ("non-contiguous entropy", lambda s: s.plan(IDS, entropy=_f(40)[::2]), "entropy"),
    ("non-contiguous 2-d ids", lambda s: s.plan(np.zeros((4, 10), np.int64)[:, ::2]), "token_ids"),
    ("fortran 2-d ids", lambda s: s.plan(np.asfortranarray(np.zeros((4, 10), np.int64))), "token_ids"),
    ("reversed probe", lambda s: s.plan(IDS, probe=_f(20)[::-1]), "probe"),
    ("entropy too short", lambda s: s.plan(IDS, entropy=_f(19)), "entropy"),
    ("surprisal too long", lambda s: s.plan(IDS, surprisal=_f(21)), "surprisal"),
    ("probe list too short", lambda s: s.plan(IDS2, probe=[_f(10), _f(9)]), "probe"),
    ("seq_lengths sum too small", lambda s: s.plan(IDS, seq_lengths=[10, 9]), "token_ids"),
    ("seq_lengths sum too big", lambda s: s.plan(IDS, seq_lengths=[10, 11]), "token_ids"),
    ("negative seq_length", lambda s: s.plan(IDS, seq_lengths=[30, -10]), "seq_lengths"),
    ("float seq_lengths", lambda s: s.plan(IDS, seq_lengths=[10.0, 10.0]), "seq_lengths"),
    ("negative id", lambda s: s.plan(_with(IDS, 19, -1)), "token_ids"),
    ("negative id in list", lambda s: s.plan([[0, 1, -5]]), "token_ids"),
    ("id outside unigram table", lambda s: s.plan(_with(IDS, 3, VOCAB)), "token_ids"),
    ("adapters too short", lambda s: s.plan(IDS2, adapters=[0]), "adapters"),
    ("adapters too long", lambda s: s.plan(IDS2, adapters=[0, 1, 2]), "adapters"),
    ("negative adapter", lambda s: s.plan(IDS2, adapters=[0, -1]), "adapters"),
    ("float adapters", lambda s: s.plan(IDS2, adapters=[0.5, 1]), "adapters"),
]


@pytest.mark.parametrize(("call", "param"), [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_raises_input_error_naming_the_parameter(call, param):
    try:
        call(S)
    except InputError as e:
        assert isinstance(e, ValueError)
        assert e.parameter == param, str(e)
        assert param in str(e)
    except BaseException as e:  # noqa: BLE001 - a PanicException is a BaseException
        pytest.fail(f"expected InputError({param}), got {type(e).__module__}.{type(e).__name__}: {e}")
    else:
        pytest.fail(f"expected InputError({param}), nothing was raised")


def test_bad_unigram_counts():
    for counts in (np.array([-1.0, 2.0]), np.array([]), np.array([np.nan, 1.0]), np.array([np.inf])):
        with pytest.raises(InputError) as info:
            Scheduler(SchedulerConfig(), unigram_counts=counts)
        assert info.value.parameter == "unigram_counts"


def test_no_active_signal_is_a_config_error_at_plan_time():
    s = Scheduler(SchedulerConfig(weights=dict(novelty=0.0, position=0.0)))
    with pytest.raises(chunkwise.ConfigError) as info:
        s.plan(IDS)
    assert info.value.parameter == "weights"
    # ... but a supplied signal with a positive weight is enough, and so is difficulty=.
    assert s.plan(IDS, entropy=_f(20)).n_tokens == 20
    assert s.plan(IDS, difficulty=_f(20)).n_tokens == 20


def test_errors_leave_the_scheduler_usable():
    s = _sched()
    ref = s.plan(IDS2)
    for _, call, _ in BAD_INPUTS:
        try:
            call(s)
        except InputError:
            pass
    _assert_same_plan(ref, s.plan(IDS2))


def test_cpu_torch_tensors_need_no_cuda():
    t = torch.from_numpy(IDS.copy())
    assert t.device.type == "cpu"
    p = S.plan(t, entropy=torch.full((20,), 0.25), probe=torch.ones(20))
    _assert_same_plan(p, S.plan(IDS, entropy=_f(20, 0.25), probe=np.ones(20, np.float32)))
    # requires_grad tensors are detached, not rejected
    q = S.plan(t, entropy=torch.full((20,), 0.25, requires_grad=True), probe=torch.ones(20))
    _assert_same_plan(p, q)


def test_non_cpu_tensor_error_names_the_parameter():
    # Regression (fixed): a tensor on a non-CPU device raises InputError with parameter=None and a message
    # that does not name the argument (scheduler._as_numpy has no name to report).
    meta = torch.empty(20, dtype=torch.int64, device="meta")
    with pytest.raises(InputError) as info:
        S.plan(meta)
    assert info.value.parameter == "token_ids"
    assert "token_ids" in str(info.value)


def test_bfloat16_tensor_is_an_input_error():
    # Regression (fixed): a bfloat16 torch tensor (typical for signals computed on device) escapes as a bare
    # TypeError("Got unsupported ScalarType BFloat16") from tensor.numpy(), not an InputError.
    try:
        S.plan(IDS, entropy=torch.zeros(20, dtype=torch.bfloat16))
    except InputError as e:
        assert e.parameter == "entropy"
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"expected InputError(entropy), got {type(e).__name__}: {e}")
    else:
        pytest.fail("a bfloat16 tensor was accepted")


def test_per_sequence_signal_lengths_must_match_ids():
    # Regression (fixed): a ragged list of signals is concatenated and only its total length is checked, so
    # per-sequence lengths that differ from the ids' ([10, 10] ids, [9, 11] entropy) are
    # silently accepted and the signals are shifted across sequences.
    with pytest.raises(InputError) as info:
        S.plan(IDS2, entropy=[_f(9), _f(11)])
    assert info.value.parameter == "entropy"


def test_out_of_range_adapter_is_rejected_not_wrapped():
    # Regression (fixed): adapters given as a python list / int64 array are cast with astype(int32) and wrap
    # silently: adapters=[2**32 + 1, 1] gives seg_adapter [1, ..., 1].
    try:
        p = S.plan(IDS2, adapters=[2**32 + 1, 1])
    except InputError as e:
        assert e.parameter == "adapters"
    else:
        pytest.fail(f"adapter 2**32 + 1 was accepted and became {sorted(set(p.seg_adapter.tolist()))}")


def test_seq_lengths_overflow_is_an_input_error_not_a_panic():
    # Regression (fixed): seq_lengths whose sum overflows (wraps to len(ids)) pass the length check and the
    # Rust core panics (pyo3_runtime.PanicException: index out of bounds).
    big = 2**63 - 1
    try:
        S.plan(IDS, seq_lengths=np.array([big, big, 22], dtype=np.int64))
    except InputError as e:
        assert e.parameter in ("seq_lengths", "token_ids")
    except BaseException as e:  # noqa: BLE001 - PanicException derives from BaseException
        pytest.fail(f"expected InputError, got {type(e).__module__}.{type(e).__name__}: {e}")
    else:
        pytest.fail("overflowing seq_lengths were accepted")
