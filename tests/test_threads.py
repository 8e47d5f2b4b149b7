"""Planning and decoding from several Python threads at once: the same plans and steps as serial
calls, one scheduler and its input arrays shared, and the GIL released while the Rust core plans."""

from __future__ import annotations

import dataclasses
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import chunkwise
import numpy as np
import pytest
from chunkwise import Plan, Scheduler, SchedulerConfig

VOCAB = 1000
PLAN_FIELDS = [f.name for f in dataclasses.fields(Plan) if f.name != "rungs"]


def _big_batch(seed: int, n_seqs: int = 8, length: int = 20_000):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(length // 2, length, size=n_seqs)
    ids = [rng.integers(0, VOCAB, size=n, dtype=np.int64) for n in lengths]
    # slowly varying entropy so the chunking has real work to do
    ent = [
        np.clip(0.5 + 0.4 * np.sin(np.arange(n) / rng.uniform(20, 200)) + rng.normal(0, 0.1, n), 0, 1).astype(
            np.float32
        )
        for n in lengths
    ]
    probe = [rng.exponential(1.0, size=n).astype(np.float32) for n in lengths]
    return ids, dict(entropy=ent, probe=probe, adapters=rng.integers(0, 4, size=n_seqs).astype(np.int32))


def _same(a: Plan, b: Plan) -> bool:
    return all(np.array_equal(getattr(a, f), getattr(b, f)) for f in PLAN_FIELDS)


@pytest.fixture(scope="module")
def thread_setup():
    counts = np.random.default_rng(99).integers(0, 10_000, size=VOCAB).astype(np.float64)
    scheds = [
        Scheduler(SchedulerConfig(mode="quantile"), unigram_counts=counts),
        Scheduler(
            SchedulerConfig(mode="threshold", granularity=1, min_len=4, max_len=64), unigram_counts=counts
        ),
        Scheduler(
            SchedulerConfig(mode="target", target_mean_rank=20.0, budget_share=0.3), unigram_counts=counts
        ),
    ]
    batches = [_big_batch(seed) for seed in range(4)]
    jobs = [(s, b) for s in scheds for b in batches]
    serial = [s.plan(ids, **kw) for s, (ids, kw) in jobs]
    return jobs, serial


@pytest.mark.parametrize("workers", [2, 4])
def test_threads_plan_exactly_like_serial(thread_setup, workers):
    jobs, serial = thread_setup
    # all distinct: a mix-up between concurrent calls would be visible
    for i in range(len(serial)):
        for j in range(i + 1, len(serial)):
            assert not _same(serial[i], serial[j])
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for _ in range(2):
            got = list(pool.map(lambda job: job[0].plan(job[1][0], **job[1][1]), jobs))
            for want, plan in zip(serial, got, strict=True):
                assert _same(want, plan)


def test_threads_share_one_scheduler_and_input_arrays(thread_setup):
    jobs, serial = thread_setup
    sched, (ids, kw) = jobs[0]
    flat_ids = np.concatenate(ids)
    flat_kw = dict(
        seq_lengths=[len(x) for x in ids],
        entropy=np.concatenate(kw["entropy"]),
        probe=np.concatenate(kw["probe"]),
        adapters=kw["adapters"],
    )
    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(lambda _: sched.plan(flat_ids, **flat_kw), range(8)))
    for plan in got:
        assert _same(serial[0], plan)


def test_planning_releases_the_gil():
    # While one thread is inside Scheduler.plan, another Python thread keeps running. Were the
    # GIL held for the whole Rust call, the spinning thread would get at most one switch
    # interval (set to 0.1 ms here) of the call's time.
    sched = Scheduler(SchedulerConfig(granularity=1, min_len=8, max_len=128))
    ids, kw = _big_batch(7, n_seqs=16, length=60_000)
    flat_ids = np.concatenate(ids)
    flat_ent = np.concatenate(kw["entropy"])
    lens = np.array([len(x) for x in ids], dtype=np.int64)
    counter = [0]
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            counter[0] += 1

    old_interval = sys.getswitchinterval()
    worker = threading.Thread(target=spin)
    worker.start()
    try:
        sys.setswitchinterval(1e-4)
        c0 = counter[0]
        time.sleep(0.05)
        rate = (counter[0] - c0) / 0.05  # increments per second with the GIL free
        c1, t1 = counter[0], time.perf_counter()
        sched.plan(flat_ids, seq_lengths=lens, entropy=flat_ent)
        elapsed, during = time.perf_counter() - t1, counter[0] - c1
    finally:
        sys.setswitchinterval(old_interval)
        stop.set()
        worker.join()
    assert elapsed > 0.05  # long enough to tell
    assert during > rate * 0.01, (during, rate, elapsed)


def test_threads_decode_separate_batches():
    sched = Scheduler(SchedulerConfig(granularity=1, min_len=4, max_len=32, crossfade=2))
    rng = np.random.default_rng(5)
    streams = [
        (rng.integers(0, VOCAB, size=(400, 3)), rng.random((400, 3), dtype=np.float32)) for _ in range(4)
    ]

    def run(stream):
        ids, ent = stream
        dec = sched.decoder(3)
        out = []
        for t in range(len(ids)):
            dec.step(np.ascontiguousarray(ids[t]), entropy=np.ascontiguousarray(ent[t]))
            out.append(np.stack([dec.rank, dec.rung, dec.difficulty.view(np.int32)]))
        return np.stack(out)

    serial = [run(s) for s in streams]
    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(run, streams))
    for a, b in zip(serial, got, strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_thread_writing_into_the_inputs_cannot_make_a_plan_from_unchecked_values():
    """Planning runs with the GIL released. It used to check the signals, then read them again:
    a thread writing NaN meanwhile gave NaN plans. Now each plan sees one copy: it is refused
    (the copy held a NaN) or finite."""
    rng = np.random.default_rng(0)
    n = 1 << 15
    ids = rng.integers(0, 1000, n)
    ent = rng.random(n).astype(np.float32)
    sched = Scheduler(SchedulerConfig(novelty_window=64))
    stop = threading.Event()

    def writer():  # one value flips: a check may pass on 0.5 and the plan then read NaN
        k = n // 2
        while not stop.is_set():
            ent[k] = np.nan
            ent[k] = 0.5

    th = threading.Thread(target=writer, daemon=True)
    th.start()
    outcomes = {"refused": 0, "finite": 0}
    try:
        for _ in range(200):  # before the copy: ~20 % of these plans held NaN on 2 cores
            try:
                plan = sched.plan(ids, entropy=ent)
            except chunkwise.InputError as e:
                assert e.parameter == "entropy"
                outcomes["refused"] += 1
                continue
            assert np.isfinite(plan.difficulty).all() and np.isfinite(plan.chunk_difficulty).all()
            outcomes["finite"] += 1
    finally:
        stop.set()
        th.join()
    assert sum(outcomes.values()) == 200
