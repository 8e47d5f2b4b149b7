"""Fuzz targets of the scheduler (no torch): configs, plans, decode steps, KV ledgers.

Each target takes a :class:`~fuzz.values.Draw` and either returns normally, raises a
``chunkwise`` error (the expected outcome of bad input) or raises :class:`Violation` when an
accepted input produced a result that breaks an invariant of the documented contract.
"""

from __future__ import annotations

from typing import Any

import chunkwise as cw
import numpy as np
from chunkwise import kv

from .values import Draw

__all__ = ["Violation", "SCHEDULE_TARGETS"]


class Violation(AssertionError):
    """An accepted input produced a result outside the documented contract."""


def check(ok: bool, what: str) -> None:
    if not ok:
        raise Violation(what)


RUNG_SETS = [(0, 4, 8, 16, 32, 64), (0, 8), (1, 2, 3), (0, 16, 32), (4, 64, 128)]


def draw_config(d: Draw) -> dict[str, Any]:
    """Keyword arguments of a SchedulerConfig: a few fields set, each maybe nasty or extreme."""
    rungs = d.choice(RUNG_SETS)
    m = len(rungs)
    fields: dict[str, Any] = {}
    makers = {
        "rungs": lambda: rungs,
        "rung_scales": lambda: tuple(
            d.float(0, 2) if not d.chance(0.1) else d.extreme_float() for _ in range(m)
        ),
        "mode": lambda: d.choice(["threshold", "quantile", "target", "sinks"]),
        "thresholds": lambda: tuple(sorted(d.float(0, 1) for _ in range(m - 1))),
        "quantiles": lambda: tuple(sorted(d.float(0.01, 0.99) for _ in range(m - 1))),
        "target_mean_rank": lambda: d.float(rungs[0], rungs[-1]),
        "min_len": lambda: d.choice([8, 16, 32]),
        "max_len": lambda: d.choice([64, 128, 256, 2**20, 2**21]),
        "granularity": lambda: d.choice([1, 8, 16]),
        "chunk_penalty": lambda: d.float(0, 5) if not d.chance(0.1) else d.extreme_float(),
        "crossfade": lambda: d.choice([0, 4, 8]),
        "hysteresis": lambda: d.float(0, 0.2) if not d.chance(0.1) else d.extreme_float(),
        "budget_share": lambda: d.float(0, 1),
        "budget_rank": lambda: d.choice(rungs[1:]),
        "weights": lambda: {
            d.choice(["entropy", "surprisal", "novelty", "rarity", "position", "probe", "bogus"]): (
                d.float(0, 2) if not d.chance(0.2) else d.extreme_float()
            )
            for _ in range(d.int(1, 3))
        },
        "ngram": lambda: d.int(1, 5),
        "novelty_window": lambda: d.choice([16, 256, 2**16, 2**17]),
        "ema": lambda: d.float(0.01, 1),
        "position_tau": lambda: d.float(1, 500) if not d.chance(0.1) else d.extreme_float(),
        "probe_scale": lambda: d.float(0.1, 5) if not d.chance(0.1) else d.extreme_float(),
    }
    if d.chance(0.1):  # an out-of-range rung
        makers["rungs"] = lambda: d.choice(
            [(0, 2**31), (0, 2**32 - 1), (-1, 4), (0, 2**33), (3, 3), (0, 4.5)]
        )
    names = list(makers)
    for _ in range(d.int(0, 6)):
        name = d.choice(names)
        fields[name] = d.pick(makers[name])
    if "rungs" not in fields and d.chance(0.5):
        fields["rungs"] = rungs
    return fields


def make_scheduler(d: Draw) -> cw.Scheduler:
    # half the schedulers come from configs without nasty fields, so plans and steps get tested
    fields = draw_config(d if d.chance(0.5) else Draw(d.rng, 0.0))
    mode = fields.get("mode")
    if isinstance(mode, str) and (mode == "sinks" or (mode == "target") != ("target_mean_rank" in fields)):
        fields.pop("mode", None)
        fields.pop("target_mean_rank", None)
    cfg = cw.SchedulerConfig(**fields)
    hash(cfg)  # documented hashable
    check(
        cfg == cw.SchedulerConfig(**{k: getattr(cfg, k) for k in cfg.__dataclass_fields__}),
        "config round trip",
    )
    counts = None
    if d.chance(0.2):
        counts = d.pick(lambda: d.rng.integers(0, 100, 512).astype(np.float64))
    return cw.Scheduler(cfg, counts)


def check_plan(plan: cw.Plan, lengths: list[int], cfg: cw.SchedulerConfig) -> None:
    n = sum(lengths)
    rungs = set(cfg.rungs)
    check(plan.n_tokens == n and plan.n_seqs == len(lengths), "plan covers the input")
    check(bool(np.isfinite(plan.difficulty).all()), "difficulty is finite")
    check(bool(((plan.difficulty >= 0) & (plan.difficulty <= 1)).all()), "difficulty in [0, 1]")
    lens = np.diff(plan.chunk_offsets)
    check(
        bool((lens > 0).all()) and bool((lens <= cfg.max_len).all()), f"chunk lengths in [1, max_len]: {lens}"
    )
    check(set(plan.chunk_rank.tolist()) <= rungs, "chunk ranks are rungs")
    check(bool((plan.token_rank >= 0).all()), "token ranks are >= 0")
    check(bool((plan.token_rank <= max(rungs)).all()), "token ranks <= the top rung")
    check(
        bool(np.isfinite(plan.seg_scale).all()) and bool((plan.seg_scale >= 0).all()), "segment scales finite"
    )
    # gate_lo carries the ratio of two rung scales in a cross-fade (it may pass 1); gate_hi is a ramp
    check(bool(np.isfinite(plan.gate_lo).all()) and bool((plan.gate_lo >= 0).all()), "gate_lo finite, >= 0")
    check(bool(((plan.gate_hi >= 0) & (plan.gate_hi <= 1)).all()), "gate_hi in [0, 1]")
    check(int(plan.seg_offsets[-1]) == n and bool((np.diff(plan.seg_offsets) >= 0).all()), "segments cover")


def target_config(d: Draw) -> None:
    cw.SchedulerConfig(**draw_config(d))


def _layout(d: Draw, lengths: list[int], values: list[np.ndarray]) -> Any:
    kind = d.int(0, 3)
    if kind == 0:
        return values
    if kind == 1 and len(set(lengths)) == 1:
        return np.stack(values) if values else np.zeros((0, 0))
    flat = np.concatenate(values) if values else np.zeros(0)
    return flat if kind != 3 else list(flat)


def target_plan(d: Draw) -> None:
    sched = make_scheduler(d)
    lengths = d.lengths()
    ids = [d.rng.integers(0, 600, n).astype(np.int64) for n in lengths]
    if d.chance(d.bad):
        ids[0] = d.choice(
            [ids[0].astype(np.int32), ids[0].astype(np.float64), -ids[0] - 1, ids[0].astype(bool)]
        )
    layout = d.int(0, 2)
    kwargs: dict[str, Any] = {}
    if layout == 0:
        tokens: Any = ids
    elif layout == 1 and len(set(lengths)) == 1:
        tokens = np.stack(ids)
    else:
        tokens = np.concatenate(ids)
        kwargs["seq_lengths"] = d.pick(lambda: np.array(lengths, np.int64))
    for name in ("entropy", "surprisal", "probe", "difficulty"):
        if d.chance(0.3):
            sig = [d.signal(n) for n in lengths]
            kwargs[name] = d.pick(lambda sig=sig: sig if layout == 0 else np.concatenate(sig))
    if d.chance(0.2):
        kwargs["adapters"] = d.pick(lambda: d.rng.integers(0, 3, len(lengths)).astype(np.int32))
    if d.chance(0.1):
        kwargs[d.choice(["token_ids", "entropy", "seq_lengths"])] = d.nasty()
        if "token_ids" in kwargs:
            tokens = kwargs.pop("token_ids")
            lengths = []  # whatever the nasty value is read as
    plan = sched.plan(tokens, **kwargs)
    flat = isinstance(tokens, np.ndarray) and tokens.ndim == 1
    if flat and kwargs.get("seq_lengths") is None:
        lengths = [sum(lengths)]
    if not lengths:
        lengths = np.diff(plan.seq_offsets).tolist()
    check_plan(plan, lengths, sched.config)


def target_decode(d: Draw) -> None:
    sched = make_scheduler(d)
    batch = d.pick(lambda: d.int(1, 6))
    thresholds = None
    if d.chance(0.2):
        m = len(sched.config.rungs) - 1
        thresholds = d.pick(lambda: sorted(d.float(0, 1) for _ in range(m)))
    dec = sched.decoder(batch, thresholds)
    batch = len(dec)
    rungs = set(sched.config.rungs)
    for _ in range(d.int(1, 12)):
        ids = d.pick(lambda: d.rng.integers(0, 600, batch).astype(np.int64))
        kwargs = {}
        for name in ("entropy", "surprisal", "probe"):
            if d.chance(0.4):
                kwargs[name] = d.pick(lambda: d.signal(batch))
        dec.step(ids, **kwargs)
        check(set(dec.rank.tolist()) <= rungs | set(range(max(rungs) + 1)), "decode ranks within the ladder")
        check(bool(np.isfinite(dec.difficulty).all()), "decode difficulty finite")
        check(bool(np.isfinite(dec.scale).all()), "decode scale finite")
        if d.chance(0.1):
            dec.reset(d.pick(lambda: d.int(0, batch - 1)))
        if d.chance(0.05):
            dec.counts(d.pick(lambda: d.int(0, batch - 1)))


def target_policy(d: Draw) -> None:
    kind = d.int(0, 3)
    if kind == 0:
        kv.KvPolicy.named(d.pick(lambda: d.choice(list(kv.POLICY_KINDS))), d.pick(lambda: d.int(8, 64)))
    elif kind == 1:
        kv.KvPolicy.streaming(
            d.pick(lambda: d.int(0, 4)), d.pick(lambda: d.int(1, 16)), d.pick(lambda: d.int(0, 8))
        )
    elif kind == 2:
        kv.KvPolicy(budget=d.pick(lambda: d.int(1, 64)), sinks=d.pick(2), slack=d.pick(0))
    else:
        kv.KvPolicy.heavy_hitters(d.pick(32), d.pick(8), d.pick(2))


SCHEDULE_TARGETS = {
    "config": target_config,
    "plan": target_plan,
    "decode": target_decode,
    "policy": target_policy,
}
