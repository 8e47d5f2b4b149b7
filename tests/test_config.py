"""SchedulerConfig: defaults, validation (ConfigError naming the field), immutability."""

from __future__ import annotations

import dataclasses
import math

import chunkwise
import numpy as np
import pytest
from chunkwise import ConfigError, SchedulerConfig

NAN = math.nan
INF = math.inf
Q5 = (0.1, 0.2, 0.3, 0.4, 0.5)  # a valid quantile vector for the default 6 rungs


def test_defaults_are_valid_and_resolved():
    cfg = SchedulerConfig()
    assert cfg.rungs == chunkwise.DEFAULT_RUNGS == (0, 4, 8, 16, 32, 64)
    m = len(cfg.rungs)
    assert cfg.resolved_thresholds == pytest.approx(tuple(j / m for j in range(1, m)))
    assert cfg.resolved_budget_rank == 64
    assert list(cfg.core.rung_scales) == [1.0] * m
    assert list(cfg.core.rungs) == list(cfg.rungs)
    # Every mode has valid defaults too.
    SchedulerConfig(mode="quantile")
    SchedulerConfig(mode="target", target_mean_rank=16.0)
    # And the default config plans a batch.
    chunkwise.Scheduler(cfg)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(rungs=(0, 8)),
        dict(rungs=(1, 2, 3), rung_scales=(0.0, 1.0, 2.5), thresholds=(0.2, 0.2)),
        dict(mode="quantile", quantiles=Q5),
        dict(mode="target", target_mean_rank=0.0),
        dict(mode="target", target_mean_rank=64.0),
        dict(min_len=1, max_len=1, crossfade=1, granularity=1),
        dict(min_len=8, max_len=8, crossfade=0),
        dict(min_len=3, max_len=7, granularity=1, crossfade=3),
        dict(min_len=12, max_len=36, granularity=4),
        dict(min_len=4096, max_len=4096, granularity=4096),
        dict(budget_share=0.0, budget_rank=4),
        dict(budget_share=1.0, budget_rank=64),
        dict(weights={"entropy": 0.0, "probe": 2.0}),
        dict(ngram=1, novelty_window=1, ema=1.0, position_tau=1e-3, probe_scale=1e-3),
        dict(chunk_penalty=0.0, hysteresis=0.0),
    ],
)
def test_valid_edge_values(kwargs):
    cfg = SchedulerConfig(**kwargs)
    for name, value in kwargs.items():
        got = getattr(cfg, name)
        assert got == value or tuple(got) == tuple(value)


def test_resolved_values_follow_config():
    cfg = SchedulerConfig(rungs=(2, 4, 8), thresholds=(0.3, 0.7), budget_rank=4)
    assert cfg.resolved_thresholds == (0.3, 0.7)
    assert cfg.resolved_budget_rank == 4
    cfg = SchedulerConfig(rungs=(0, 16), rung_scales=(0.5, 2.0))
    assert list(cfg.core.rung_scales) == [0.5, 2.0]
    assert cfg.resolved_thresholds == (0.5,)


# (kwargs, parameter the error must name)
INVALID = [
    # rungs
    (dict(rungs=(0, 8, 4)), "rungs"),
    (dict(rungs=(0, 4, 4)), "rungs"),
    (dict(rungs=(8,)), "rungs"),
    (dict(rungs=()), "rungs"),
    (dict(rungs=(-1, 4)), "rungs"),
    # rung_scales
    (dict(rung_scales=(1.0,) * 5), "rung_scales"),
    (dict(rung_scales=(1.0,) * 7), "rung_scales"),
    (dict(rung_scales=(1.0, 1.0, 1.0, 1.0, 1.0, -0.5)), "rung_scales"),
    (dict(rung_scales=(1.0, 1.0, NAN, 1.0, 1.0, 1.0)), "rung_scales"),
    (dict(rung_scales=(1.0, 1.0, 1.0, 1.0, 1.0, INF)), "rung_scales"),
    # thresholds
    (dict(thresholds=(0.1, 0.2)), "thresholds"),
    (dict(thresholds=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6)), "thresholds"),
    (dict(thresholds=(0.1, 0.2, 0.3, 0.5, 0.4)), "thresholds"),
    (dict(thresholds=(0.1, 0.2, NAN, 0.5, 0.6)), "thresholds"),
    (dict(thresholds=(0.1, 0.2, 0.3, 0.5, INF)), "thresholds"),
    # quantiles
    (dict(mode="quantile", quantiles=(0.1, 0.2, 0.3, 0.4, 1.0)), "quantiles"),
    (dict(mode="quantile", quantiles=(0.0, 0.2, 0.3, 0.4, 0.5)), "quantiles"),
    (dict(mode="quantile", quantiles=(-0.1, 0.2, 0.3, 0.4, 0.5)), "quantiles"),
    (dict(mode="quantile", quantiles=(0.1, 0.2, 0.3, 0.4, 1.5)), "quantiles"),
    (dict(mode="quantile", quantiles=(0.1, 0.2, 0.2, 0.4, 0.5)), "quantiles"),
    (dict(mode="quantile", quantiles=(0.1, 0.3, 0.2, 0.4, 0.5)), "quantiles"),
    (dict(mode="quantile", quantiles=(0.1, 0.2, 0.4)), "quantiles"),
    (dict(mode="quantile", quantiles=(0.1, 0.2, 0.3, 0.4, NAN)), "quantiles"),
    (dict(quantiles=Q5), "quantiles"),  # wrong mode: threshold
    (dict(mode="target", target_mean_rank=8.0, quantiles=Q5), "quantiles"),  # wrong mode: target
    # mode / target
    (dict(mode="bogus"), "mode"),
    (dict(mode="Threshold"), "mode"),
    (dict(mode="target"), "target_mean_rank"),
    (dict(mode="target", target_mean_rank=64.5), "target_mean_rank"),
    (dict(mode="target", target_mean_rank=-1.0), "target_mean_rank"),
    (dict(rungs=(4, 8), mode="target", target_mean_rank=2.0), "target_mean_rank"),
    (dict(mode="target", target_mean_rank=NAN), "target_mean_rank"),
    (dict(mode="target", target_mean_rank=INF), "target_mean_rank"),
    (dict(target_mean_rank=8.0), "target_mean_rank"),
    (dict(mode="quantile", target_mean_rank=8.0), "target_mean_rank"),
    # lengths
    (dict(min_len=0), "min_len"),
    (dict(min_len=0, max_len=0, crossfade=0), "min_len"),
    (dict(min_len=12), "min_len"),  # not a multiple of the default granularity 8
    (dict(max_len=100), "max_len"),
    (dict(min_len=6, max_len=12, granularity=4), "min_len"),
    (dict(min_len=8, max_len=14, granularity=4), "max_len"),
    (dict(min_len=-1), "min_len"),
    (dict(min_len=16, max_len=15), "max_len"),
    (dict(max_len=-3), "max_len"),
    (dict(max_len=2**21), "max_len"),
    # other integers
    (dict(crossfade=-1), "crossfade"),
    (dict(crossfade=17), "crossfade"),
    (dict(min_len=2, max_len=8, granularity=1, crossfade=3), "crossfade"),
    (dict(granularity=0), "granularity"),
    (dict(granularity=-8), "granularity"),
    (dict(min_len=8192, max_len=8192, granularity=8192), "granularity"),
    (dict(ngram=-1), "ngram"),
    (dict(ngram=0), "ngram"),
    (dict(ngram=17), "ngram"),
    (dict(novelty_window=-1), "novelty_window"),
    (dict(novelty_window=0), "novelty_window"),
    (dict(novelty_window=2**16 + 1), "novelty_window"),  # the tables would fill: probing never ended
    (dict(novelty_window=2**22), "novelty_window"),
    # floats
    (dict(chunk_penalty=-0.1), "chunk_penalty"),
    (dict(chunk_penalty=NAN), "chunk_penalty"),
    (dict(hysteresis=-0.1), "hysteresis"),
    (dict(hysteresis=INF), "hysteresis"),
    (dict(budget_share=1.5), "budget_share"),
    (dict(budget_share=-0.1), "budget_share"),
    (dict(budget_share=NAN), "budget_share"),
    (dict(budget_rank=5), "budget_rank"),
    (dict(budget_rank=0), "budget_rank"),
    (dict(rungs=(2, 4, 8), budget_rank=2), "budget_rank"),
    (dict(budget_rank=-4), "budget_rank"),
    (dict(budget_rank=2**40), "budget_rank"),
    (dict(ema=0.0), "ema"),
    (dict(ema=-0.5), "ema"),
    (dict(ema=1.0000001), "ema"),
    (dict(ema=1.5), "ema"),
    (dict(ema=NAN), "ema"),
    (dict(position_tau=0.0), "position_tau"),
    (dict(position_tau=-1.0), "position_tau"),
    (dict(position_tau=NAN), "position_tau"),
    (dict(probe_scale=0.0), "probe_scale"),
    (dict(probe_scale=-2.0), "probe_scale"),
    (dict(probe_scale=INF), "probe_scale"),
    # weights
    (dict(weights={"foo": 1.0}), "weights"),
    (dict(weights={"Entropy": 1.0}), "weights"),
    (dict(weights=[("entropy", 1.0)]), "weights"),
    (dict(weights={"entropy": -1.0}), "weights"),
    (dict(weights={"probe": NAN}), "weights"),
    (dict(weights={"novelty": INF}), "weights"),
    (dict(weights={"position": 0.0, "rarity": -1e-9}), "weights"),
]


@pytest.mark.parametrize(("kwargs", "param"), INVALID, ids=[f"{p}-{i}" for i, (_, p) in enumerate(INVALID)])
def test_invalid_values_raise_config_error_naming_the_field(kwargs, param):
    with pytest.raises(ConfigError) as info:
        SchedulerConfig(**kwargs)
    err = info.value
    assert isinstance(err, ValueError)
    assert isinstance(err, chunkwise.ChunkwiseError)
    # "weights.entropy" is an acceptable name for a bad weight; everything else is exact.
    if param == "weights":
        assert err.parameter == "weights" or err.parameter.startswith("weights.")
    else:
        assert err.parameter == param
    assert err.parameter in str(err)


def test_negative_weight_names_the_signal():
    with pytest.raises(ConfigError) as info:
        SchedulerConfig(weights={"surprisal": -2.0})
    assert "surprisal" in info.value.parameter
    assert "surprisal" in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        (dict(min_len="16"), "min_len"),
        (dict(ema="x"), "ema"),
        (dict(rungs=(0, "x")), "rungs"),
        (dict(mode=3), "mode"),
        (dict(budget_share=None), "budget_share"),
    ],
)
def test_wrong_python_types_name_the_field(kwargs, param):
    # Regression (fixed): a value of the wrong Python type raises ConfigError with parameter=None and the
    # message "config: ..." (config.py looks for "argument 'x'" in PyO3's TypeError message, but
    # PyO3 puts the name in the exception's __notes__: "while processing 'min_len'").
    with pytest.raises(ConfigError) as info:
        SchedulerConfig(**kwargs)
    assert info.value.parameter == param
    assert param in str(info.value)


def test_huge_int_is_a_config_error():
    # Regression (fixed): an int that does not fit in int64 escapes as a bare OverflowError (not ConfigError).
    with pytest.raises(ConfigError) as info:
        SchedulerConfig(min_len=2**70)
    assert info.value.parameter == "min_len"


def test_first_bad_field_wins_and_good_fields_do_not_mask_errors():
    # Several bad values: some field is named, and it is one of the bad ones.
    with pytest.raises(ConfigError) as info:
        SchedulerConfig(min_len=0, ema=2.0)
    assert info.value.parameter in ("min_len", "ema")


def test_config_is_frozen():
    cfg = SchedulerConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.min_len = 3  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.rungs = (0, 1)  # type: ignore[misc]


def test_sequences_become_tuples_hashable_and_comparable():
    a = SchedulerConfig(
        rungs=[0, 4, 8],
        rung_scales=[1.0, 1.0, 2.0],
        thresholds=[0.2, 0.6],
    )
    b = SchedulerConfig(rungs=(0, 4, 8), rung_scales=(1.0, 1.0, 2.0), thresholds=(0.2, 0.6))
    for name in ("rungs", "rung_scales", "thresholds"):
        assert isinstance(getattr(a, name), tuple)
    q = SchedulerConfig(rungs=[0, 4, 8], mode="quantile", quantiles=[0.3, 0.6])
    assert isinstance(q.quantiles, tuple)
    assert a == b
    assert hash(a) == hash(b)
    assert len({a, b, SchedulerConfig()}) == 2
    assert a != SchedulerConfig(rungs=(0, 4, 8), rung_scales=(1.0, 1.0, 2.0), thresholds=(0.2, 0.7))
    # A mutable input list does not leak into the frozen config.
    rungs = [0, 4, 8]
    c = SchedulerConfig(rungs=rungs)
    rungs.append(16)
    assert c.rungs == (0, 4, 8)
    assert list(c.core.rungs) == [0, 4, 8]


def test_replace_revalidates():
    cfg = SchedulerConfig()
    ok = dataclasses.replace(cfg, min_len=8)
    assert ok.min_len == 8
    with pytest.raises(ConfigError) as info:
        dataclasses.replace(cfg, max_len=4)
    assert info.value.parameter == "max_len"


def test_weights_are_applied():
    # Only probe counts, ema = 1: difficulty is exactly x / (x + probe_scale).
    cfg = SchedulerConfig(
        rungs=(0, 8),
        min_len=1,
        max_len=4,
        granularity=1,
        crossfade=0,
        ema=1.0,
        probe_scale=3.0,
        weights=dict(entropy=0, surprisal=0, novelty=0, rarity=0, position=0, probe=1),
    )
    sched = chunkwise.Scheduler(cfg)
    x = np.array([0.0, 1.0, 3.0, 9.0], dtype=np.float32)
    plan = sched.plan(np.arange(4, dtype=np.int64), probe=x)
    np.testing.assert_allclose(plan.difficulty, x / (x + 3.0), rtol=1e-6)
