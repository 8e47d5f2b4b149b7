"""Benchmarks of the Rust scheduler against the numpy reference (``tests/oracles/scheduler.py``).

Run with ``pytest benches/ --benchmark-only``. Every benchmark checks its result and records its
median; the reference benchmarks put ``speedup = reference / Rust`` into ``extra_info``.
Targets (reported in ``extra_info`` and the terminal summary, never asserted): < 1 ms per
8 x 4096 plan, < 10 us per decode step, >= 20x the numpy reference.
"""

from __future__ import annotations

from typing import Any

import chunkwise
import numpy as np
import pytest

from tests.oracles.scheduler import PLAN_KEYS, ReferenceDecoder, reference_plan

B, T, VOCAB = 8, 4096, 32000
MODES = ("threshold", "quantile", "target")
DECODE_BATCHES = (1, 64)
TARGET_PLAN_S = 1e-3  # one 8 x 4096 plan
TARGET_STEP_S = 10e-6  # one decode step
TARGET_SPEEDUP = 20.0  # numpy reference / Rust


def make_config(mode: str) -> chunkwise.SchedulerConfig:
    """The default config in each rung mode (target: mean rank 16 of the default ladder)."""
    if mode == "target":
        return chunkwise.SchedulerConfig(mode="target", target_mean_rank=16.0)
    return chunkwise.SchedulerConfig(mode=mode)


@pytest.fixture(scope="module")
def batch() -> dict[str, list[np.ndarray]]:
    """8 sequences x 4096 tokens: int64 ids, float32 entropy and surprisal in [0, 1)."""
    rng = np.random.default_rng(2024)
    return {
        "ids": [rng.integers(0, VOCAB, T).astype(np.int64) for _ in range(B)],
        "entropy": [rng.random(T, dtype=np.float32) for _ in range(B)],
        "surprisal": [rng.random(T, dtype=np.float32) for _ in range(B)],
    }


def _check_plan(arrays: dict[str, np.ndarray], rungs: tuple[int, ...]) -> None:
    """The plan covers all 8 x 4096 tokens with valid chunks, ranks and segments."""
    n = B * T
    assert int(arrays["seq_offsets"][-1]) == n
    assert len(arrays["difficulty"]) == n and len(arrays["token_rank"]) == n
    co = arrays["chunk_offsets"]
    assert co[0] == 0 and co[-1] == n and np.all(np.diff(co) > 0)
    assert np.isin(arrays["chunk_rank"], rungs).all()
    assert arrays["seg_offsets"][-1] == n and len(arrays["seg_rank"]) >= B


# --------------------------------------------------------------------------------------------
# Prefill: one plan of 8 x 4096 tokens with entropy + surprisal
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_rust_plan(benchmark: Any, batch: dict[str, Any], timings: Any, mode: str) -> None:
    benchmark.group = "plan 8x4096"
    cfg = make_config(mode)
    sched = chunkwise.Scheduler(cfg)
    plan = benchmark(sched.plan, batch["ids"], entropy=batch["entropy"], surprisal=batch["surprisal"])
    _check_plan({k: getattr(plan, k) for k in PLAN_KEYS}, cfg.rungs)
    timings.record(f"rust_plan_{mode}", benchmark, target_s=TARGET_PLAN_S)


@pytest.mark.parametrize("mode", MODES)
def test_reference_plan(benchmark: Any, batch: dict[str, Any], timings: Any, mode: str) -> None:
    benchmark.group = "plan 8x4096"
    cfg = make_config(mode)
    out = benchmark.pedantic(
        reference_plan,
        args=(cfg, batch["ids"], batch["entropy"], batch["surprisal"]),
        rounds=10,
        iterations=1,
        warmup_rounds=1,
    )
    _check_plan(out, cfg.rungs)
    sched = chunkwise.Scheduler(cfg)

    def rust() -> chunkwise.Plan:
        return sched.plan(batch["ids"], entropy=batch["entropy"], surprisal=batch["surprisal"])

    plan = rust()
    assert np.array_equal(plan.chunk_offsets, out["chunk_offsets"])  # the same work was done
    assert np.array_equal(plan.token_rank, out["token_rank"])
    med = timings.record(f"reference_plan_{mode}", benchmark)
    if med is not None:
        fast = timings.get_or_measure(f"rust_plan_{mode}", rust, repeat=50)
        timings.add_speedup(f"plan_{mode}", benchmark, med, fast, TARGET_SPEEDUP)


# --------------------------------------------------------------------------------------------
# Decode: one step for a batch of 1 and of 64 sequences (entropy + surprisal)
# --------------------------------------------------------------------------------------------


def _decode_inputs(batch_size: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(batch_size)
    return {
        "ids": rng.integers(0, VOCAB, batch_size).astype(np.int64),
        "entropy": rng.random(batch_size, dtype=np.float32),
        "surprisal": rng.random(batch_size, dtype=np.float32),
    }


def _check_step(dec: Any, rungs: tuple[int, ...], benchmark: Any) -> None:
    assert np.isin(dec.rank, rungs).all() and np.all(dec.lo <= dec.rank)
    assert np.all((dec.difficulty >= 0) & (dec.difficulty <= 1))
    stats = getattr(benchmark, "stats", None)
    assert dec.counts(0)[1] >= (stats.stats.rounds if stats else 1)  # every timed call stepped


@pytest.mark.parametrize("batch_size", DECODE_BATCHES)
def test_rust_decode_step(benchmark: Any, timings: Any, batch_size: int) -> None:
    benchmark.group = f"decode step, batch {batch_size}"
    cfg = make_config("threshold")
    dec = chunkwise.Scheduler(cfg).decoder(batch_size)
    x = _decode_inputs(batch_size)
    benchmark(dec.step, x["ids"], entropy=x["entropy"], surprisal=x["surprisal"])
    _check_step(dec, cfg.rungs, benchmark)
    timings.record(f"rust_step_b{batch_size}", benchmark, target_s=TARGET_STEP_S)


@pytest.mark.parametrize("batch_size", DECODE_BATCHES)
def test_reference_decode_step(benchmark: Any, timings: Any, batch_size: int) -> None:
    benchmark.group = f"decode step, batch {batch_size}"
    cfg = make_config("threshold")
    dec = ReferenceDecoder(cfg, batch_size)
    x = _decode_inputs(batch_size)
    benchmark(dec.step, x["ids"], entropy=x["entropy"], surprisal=x["surprisal"])
    _check_step(dec, cfg.rungs, benchmark)
    med = timings.record(f"reference_step_b{batch_size}", benchmark)
    if med is not None:
        core = chunkwise.Scheduler(cfg).decoder(batch_size)
        fast = timings.get_or_measure(
            f"rust_step_b{batch_size}",
            lambda: core.step(x["ids"], entropy=x["entropy"], surprisal=x["surprisal"]),
            repeat=2000,
        )
        timings.add_speedup(f"decode_b{batch_size}", benchmark, med, fast, TARGET_SPEEDUP)
