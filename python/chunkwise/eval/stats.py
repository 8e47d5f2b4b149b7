"""Bootstrap confidence intervals for per-question scores: a mean, and the paired difference of
two systems scored on the same questions (resampling questions, not tokens).

Percentile intervals over ``n_boot`` resamples of the questions, seeded, so a results file is
reproducible. Numpy only.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError

__all__ = ["bootstrap_mean", "paired_difference"]

#: resamples per interval: the 2.5 % and 97.5 % percentiles move by well under 0.1 point
#: between seeds at this count for the 300-2000 questions of the curves
N_BOOT = 10_000


def _scores(name: str, values: object) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64).reshape(-1)
    if a.size == 0 or not np.isfinite(a).all():
        raise InputError(f"{name}: need one finite score per question, got {a.size} values", name)
    return a


def _interval(values: np.ndarray, n_boot: int, seed: int) -> tuple[float, float]:
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise InputError(f"n_boot: need a positive int, got {n_boot!r}", "n_boot")
    rng = np.random.default_rng(seed)
    n = len(values)
    means = np.empty(n_boot)
    step = max(1, 2_000_000 // n)  # resamples per block: bounded temporaries
    for s in range(0, n_boot, step):
        k = min(step, n_boot - s)
        means[s : s + k] = values[rng.integers(0, n, (k, n))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def bootstrap_mean(values: object, n_boot: int = N_BOOT, seed: int = 0) -> tuple[float, float, float]:
    """(mean, lower, upper): the mean of per-question ``values`` and its 95 % percentile
    bootstrap interval."""
    a = _scores("values", values)
    lo, hi = _interval(a, n_boot, seed)
    return float(a.mean()), lo, hi


def paired_difference(
    a: object, b: object, n_boot: int = N_BOOT, seed: int = 0
) -> tuple[float, float, float]:
    """(mean of a - b, lower, upper): the paired difference of two systems' per-question scores
    on the same questions and its 95 % percentile bootstrap interval (the same questions are
    drawn for both systems in every resample)."""
    x, y = _scores("a", a), _scores("b", b)
    if x.shape != y.shape:
        raise InputError(f"b: need one score per question of a ({len(x)}), got {len(y)}", "b")
    return bootstrap_mean(x - y, n_boot, seed)
