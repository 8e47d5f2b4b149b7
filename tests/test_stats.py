"""Bootstrap intervals against the normal approximation and against their own definition."""

from __future__ import annotations

import math

import numpy as np
import pytest
from chunkwise.errors import InputError
from chunkwise.eval.stats import bootstrap_mean, paired_difference


def test_mean_interval_matches_the_normal_approximation():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, 2000)
    mean, lo, hi = bootstrap_mean(x, n_boot=4000)
    half = 1.96 * x.std() / math.sqrt(len(x))
    assert mean == pytest.approx(x.mean())
    assert lo == pytest.approx(mean - half, abs=0.25 * half)
    assert hi == pytest.approx(mean + half, abs=0.25 * half)


def test_paired_difference_sees_what_unpaired_noise_hides():
    rng = np.random.default_rng(1)
    question = rng.normal(0, 10, 500)  # per-question difficulty dominates both systems' scores
    a = question + 0.5 + rng.normal(0, 0.5, 500)
    b = question + rng.normal(0, 0.5, 500)
    d, lo, hi = paired_difference(a, b, n_boot=2000)
    assert d == pytest.approx(np.mean(a - b))
    assert 0 < lo < d < hi  # paired: excludes zero
    # each system's own interval is far wider than the difference
    _, alo, ahi = bootstrap_mean(a, n_boot=2000)
    assert ahi - alo > 5 * (hi - lo)


def test_identical_systems_and_seeds():
    x = np.arange(50.0)
    assert paired_difference(x, x) == (0.0, 0.0, 0.0)
    assert bootstrap_mean(x, seed=3) == bootstrap_mean(x, seed=3)
    assert bootstrap_mean(x, seed=3) != bootstrap_mean(x, seed=4)
    # a 0/1 score (EM) on one question: the interval is the point
    assert bootstrap_mean([1.0]) == (1.0, 1.0, 1.0)


def test_bad_input():
    with pytest.raises(InputError, match="finite"):
        bootstrap_mean([])
    with pytest.raises(InputError, match="finite"):
        bootstrap_mean([1.0, float("nan")])
    with pytest.raises(InputError, match="one score per question"):
        paired_difference([1.0, 2.0], [1.0])
    with pytest.raises(InputError, match="n_boot"):
        bootstrap_mean([1.0], n_boot=0)
