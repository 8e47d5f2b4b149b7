"""Shared state of the scheduler benchmarks (``pytest benches/ --benchmark-only``).

``timings`` collects the median of every benchmark so that the speedup of a reference benchmark
reuses the Rust median measured by its own benchmark (or measures it quickly when that one was
deselected), and prints targets and speedups at the end of the run (reported, never asserted).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest


class Timings:
    """Median seconds per benchmark name, optional upper-bound targets, and speedups."""

    def __init__(self) -> None:
        self.median: dict[str, float] = {}
        self.target: dict[str, float] = {}
        self.speedup: dict[str, tuple[float, float]] = {}

    def record(self, name: str, benchmark: Any, target_s: float | None = None) -> float | None:
        """Stores the benchmark's median (None under ``--benchmark-disable``)."""
        stats = getattr(benchmark, "stats", None)
        if not stats:
            return None
        med = self.median[name] = float(stats.stats.median)
        if target_s is not None:
            self.target[name] = target_s
            benchmark.extra_info["target_s"] = target_s
            benchmark.extra_info["meets_target"] = med < target_s
        return med

    def get_or_measure(self, name: str, fn: Callable[[], Any], repeat: int) -> float:
        """The recorded median of ``name``, or the median of ``repeat`` timed calls of ``fn``."""
        if name not in self.median:
            fn()
            runs = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                fn()
                runs.append(time.perf_counter() - t0)
            self.median[name] = float(np.median(runs))
        return self.median[name]

    def add_speedup(self, name: str, benchmark: Any, slow_s: float, fast_s: float, target: float) -> float:
        """Records ``slow_s / fast_s`` in the summary and in the benchmark's ``extra_info``."""
        x = slow_s / fast_s
        self.speedup[name] = (x, target)
        benchmark.extra_info["rust_median_s"] = fast_s
        benchmark.extra_info["speedup"] = x
        benchmark.extra_info["speedup_target"] = target
        benchmark.extra_info["meets_speedup_target"] = x >= target
        return x


_TIMINGS = Timings()


@pytest.fixture(scope="session")
def timings() -> Timings:
    return _TIMINGS


def _fmt(sec: float) -> str:
    return f"{sec * 1e3:9.3f} ms" if sec >= 1e-3 else f"{sec * 1e6:9.3f} us"


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _TIMINGS.median:
        return
    tr = terminalreporter
    tr.section("chunkwise scheduler: medians, targets and speedups (reported, not asserted)")
    for name, sec in sorted(_TIMINGS.median.items()):
        line = f"{name:26s} {_fmt(sec)}"
        if name in _TIMINGS.target:
            t = _TIMINGS.target[name]
            line += f"   target < {_fmt(t).strip()}: {'met' if sec < t else 'NOT met'}"
        tr.line(line)
    for name, (x, target) in sorted(_TIMINGS.speedup.items()):
        verdict = "met" if x >= target else "NOT met"
        tr.line(f"speedup {name:18s} {x:9.1f}x   target >= {target:.3g}x: {verdict}")
