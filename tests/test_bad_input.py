"""Scheduler, decoder and KV-policy input the fuzzer (``fuzz/``) found answered with something
other than a chunkwise error, or accepted and turned into a broken plan (issue 12). Each case
names the parameter it blames."""

from __future__ import annotations

import chunkwise as cw
import numpy as np
import pytest
from chunkwise import kv


def test_a_config_with_weights_is_hashable_and_keeps_its_own_copy():
    weights = {"entropy": 2.0}
    a = cw.SchedulerConfig(weights=weights)
    b = cw.SchedulerConfig(weights={"entropy": 2.0})
    assert hash(a) == hash(b) and a == b and {a: 1}[b] == 1  # documented hashable
    weights["entropy"] = 0.0  # the caller's dict changing later changes nothing
    assert a.weights == {"entropy": 2.0} and a == b
    assert hash(cw.SchedulerConfig(weights={"entropy": 3.0})) != hash(a)


@pytest.mark.parametrize(
    ("fields", "parameter"),
    [
        ({"rungs": (0, 2**31)}, "rungs"),  # became a negative int32 rank
        ({"rungs": (0, 2**16 + 1)}, "rungs"),
        ({"rung_scales": (1.0, 1.0, 1.0, 1.0, 1.0, 1e39)}, "rung_scales"),  # inf in float32
        ({"rung_scales": (1.0, 1.0, 1.0, 1.0, 1e-300, 1.0)}, "rung_scales"),  # an inf cross-fade ratio
        ({"weights": {"entropy": 1e308, "surprisal": 1e308}}, "weights.entropy"),  # NaN difficulty
    ],
)
def test_values_that_would_overflow_are_refused(fields, parameter):
    with pytest.raises(cw.ConfigError) as e:
        cw.SchedulerConfig(**fields)
    assert e.value.parameter == parameter


def test_the_largest_accepted_values_plan_finite():
    cfg = cw.SchedulerConfig(
        rungs=(0, cw._core.MAX_RANK), rung_scales=(1.0, cw._core.MAX_SCALE), weights={"entropy": 1e6}
    )
    rng = np.random.default_rng(0)
    plan = cw.Scheduler(cfg).plan(rng.integers(0, 50, 300), entropy=rng.random(300).astype(np.float32))
    assert np.isfinite(plan.difficulty).all() and (plan.difficulty <= 1).all()
    assert np.isfinite(plan.seg_scale).all()
    assert set(plan.chunk_rank.tolist()) <= {0, cw._core.MAX_RANK}
    assert (np.diff(plan.chunk_offsets) <= cfg.max_len).all()


def test_a_cross_fade_into_a_rung_of_scale_zero_fades_the_lower_rank_out():
    """Rank 8 has scale 0: the ramp from 4 up to 8 used to weigh every direction 0 at once."""
    cfg = cw.SchedulerConfig(
        rungs=(0, 4, 8), rung_scales=(1.0, 2.0, 0.0), thresholds=(0.3, 0.6), crossfade=4,
        min_len=8, max_len=8, granularity=8, chunk_penalty=0.0, weights={"position": 0.0},
    )  # fmt: skip
    diff = np.r_[np.full(8, 0.5), np.full(8, 0.9)].astype(np.float32)
    plan = cw.Scheduler(cfg).plan(np.arange(16), difficulty=diff)
    assert plan.chunk_rank.tolist() == [4, 8]
    scale = np.repeat(plan.seg_scale, np.diff(plan.seg_offsets))
    # what the layer applies to the directions below 4: scale x gate_lo
    weight = scale * np.where(plan.token_lo > 0, plan.gate_lo, plan.gate_hi)
    alpha = np.arange(1, 5) / 5
    np.testing.assert_allclose(weight[8:12], 2.0 * (1 - alpha), rtol=1e-6)  # a ramp, not 0
    assert plan.token_rank[8:12].tolist() == [4] * 4  # the band above 4 weighs 0: not computed
    np.testing.assert_allclose(weight[12:], 0.0)
    np.testing.assert_allclose(weight[:8], 2.0)


@pytest.mark.parametrize(
    ("call", "parameter"),
    [
        (lambda s: s.decoder(2**70), "batch_size"),  # OverflowError
        (lambda s: s.decoder(-(2**70)), "batch_size"),
        (lambda s: s.decoder(True), "batch_size"),
        (lambda s: s.decoder(2).reset(2**70), "index"),
        (lambda s: s.decoder(2).reset("0"), "index"),  # TypeError
        (lambda s: s.decoder(2).counts(1.5), "index"),
    ],
)
def test_decoder_ints_are_input_errors(call, parameter):
    with pytest.raises(cw.InputError) as e:
        call(cw.Scheduler())
    assert e.value.parameter == parameter


@pytest.mark.parametrize("config", [{"rungs": (0, 4)}, "threshold", 3])
def test_a_scheduler_needs_a_config_object(config):
    with pytest.raises(cw.ConfigError, match="SchedulerConfig") as e:
        cw.Scheduler(config)
    assert e.value.parameter == "config"


@pytest.mark.parametrize(
    ("build", "parameter"),
    [
        (lambda: kv.KvPolicy(budget=2**63), "budget"),  # OverflowError in the core
        (lambda: kv.KvPolicy(budget=8, slack=2**40), "slack"),
        (lambda: kv.KvPolicy.streaming({}, 4), "sinks"),  # TypeError from sinks + window
        (lambda: kv.KvPolicy.streaming(2, "4"), "window"),
        (lambda: kv.KvPolicy(budget=8, attention_weight="x"), "attention_weight"),
        (lambda: kv.KvPolicy(budget=8, difficulty_weight=float("nan")), "difficulty_weight"),
        (lambda: kv.KvPolicy.named(["sinks"], 8), "kind"),
        (lambda: kv.KvPolicy.named("sinks", 8, sinks="2"), "sinks"),
    ],
)
def test_kv_policy_values_are_config_errors(build, parameter):
    with pytest.raises(cw.ConfigError) as e:
        build()
    assert e.value.parameter == parameter


@pytest.mark.parametrize("b", ["a", 1.0, True, 2, -1, 2**70])
def test_plan_sequence_names_a_bad_index(b):
    plan = cw.Scheduler().plan([np.arange(4), np.arange(3)])
    with pytest.raises(cw.InputError) as e:
        plan.sequence(b)
    assert e.value.parameter == "b"
