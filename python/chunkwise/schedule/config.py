"""Scheduler configuration: a frozen dataclass validated by the Rust core on construction."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

from .. import _core
from ..errors import ConfigError

__all__ = ["SchedulerConfig", "DEFAULT_RUNGS", "rungs_for"]

#: The default rank ladder (the Rust core's ``DEFAULT_RUNGS``).
DEFAULT_RUNGS: tuple[int, ...] = tuple(_core.DEFAULT_RUNGS)

# Every default below is read from the Rust core, the one place they are written.
_D = _core.Config.default()


def rungs_for(max_rank: int) -> tuple[int, ...]:
    """The default ladder for an adapter of rank ``max_rank``: 0 and ``max_rank / 2^k`` for
    k = 4..0 (ranks below 1 dropped), e.g. 64 -> (0, 4, 8, 16, 32, 64), the default rungs."""
    if isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1:
        raise ConfigError(f"max_rank: must be an integer >= 1, got {max_rank!r}", "max_rank")
    return tuple(sorted({0} | {max_rank >> k for k in range(5)}))


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """How difficulty becomes chunks and ranks. See ``docs/architecture.md`` for the math.

    Validation happens once, here, in the Rust core: a bad value raises
    :class:`chunkwise.ConfigError` whose ``parameter`` names the field.

    Attributes:
        rungs: ranks of the ladder, strictly increasing (the first may be 0), at most 2^16.
        rung_scales: per-rung multiplier of the LoRA scale (default all 1.0): 0, or within
            [1e-6, 1e6].
        mode: ``"threshold"`` (fixed thresholds), ``"quantile"`` (token-weighted quantiles of
            the plan's chunk difficulties) or ``"target"`` (mean rank at most
            ``target_mean_rank``; LoRA FLOPs are proportional to it).
        thresholds: base difficulty thresholds, ``len(rungs) - 1`` non-decreasing values
            (default ``j / len(rungs)``). A chunk's rung is ``#{j: D > thresholds[j]}``.
        quantiles: cumulative token shares for ``mode="quantile"`` (default equal shares).
        target_mean_rank: the token-weighted mean rank for ``mode="target"``.
        min_len, max_len: chunk length bounds in tokens (multiples of ``granularity``).
        granularity: chunk boundaries fall on multiples of this many tokens (default 8: kernel
            tiles see one rank, and the segmentation is 64x cheaper than token-level); 1 gives
            token-exact boundaries.
        chunk_penalty: cost per chunk in the segmentation (larger: fewer, longer chunks).
        crossfade: tokens of linear cross-fade after each rank change (0 disables; <= min_len).
        hysteresis: decode only: difficulty must cross a threshold by this margin to switch.
        budget_share: at most this share of a sequence's tokens on rungs >= ``budget_rank``.
        budget_rank: the rank from which a rung counts against the budget (default: top rung).
        weights: weight per signal (entropy, surprisal, novelty, rarity, position, probe), each
            in [0, 1e6]; missing keys keep their defaults, 0 disables a signal.
        ngram, novelty_window: n-gram length (1..16) and rolling window (1..65536 tokens; each
            sequence's n-gram tables take 128 bytes per window token) of the novelty signal.
        ema: EMA weight of the newest difficulty (1 disables smoothing).
        position_tau: decay length of the positional prior ``exp(-p / tau)``.
        probe_scale: saturation scale of the probe signal ``x / (x + probe_scale)``.
    """

    rungs: Sequence[int] = DEFAULT_RUNGS
    rung_scales: Sequence[float] | None = None
    mode: Literal["threshold", "quantile", "target"] = _D.mode
    thresholds: Sequence[float] | None = None
    quantiles: Sequence[float] | None = None
    target_mean_rank: float | None = None
    min_len: int = _D.min_len
    max_len: int = _D.max_len
    granularity: int = _D.granularity
    chunk_penalty: float = _D.chunk_penalty
    crossfade: int = _D.crossfade
    hysteresis: float = _D.hysteresis
    budget_share: float = _D.budget_share
    budget_rank: int | None = None
    weights: Mapping[str, float] | None = None
    ngram: int = _D.ngram
    novelty_window: int = _D.novelty_window
    ema: float = _D.ema
    position_tau: float = _D.position_tau
    probe_scale: float = _D.probe_scale

    def __post_init__(self) -> None:
        # Normalise sequences to tuples so the frozen config is hashable and comparable.
        for name in ("rungs", "rung_scales", "thresholds", "quantiles"):
            value = getattr(self, name)
            if isinstance(value, Iterable) and not isinstance(value, (tuple, str, bytes)):
                object.__setattr__(self, name, tuple(value))
        if self.weights is not None and not isinstance(self.weights, Mapping):
            raise ConfigError(
                f"weights: must be a mapping of signal name to weight, got {type(self.weights)}",
                "weights",
            )
        if self.weights is not None:  # a copy: the caller's dict may change later
            object.__setattr__(self, "weights", dict(self.weights))
        for f in dataclasses.fields(self):  # the core reads None as "default": refuse it where
            if f.default is not None and getattr(self, f.name) is None:  # the field is not optional
                raise ConfigError(f"{f.name}: must not be None (default {f.default!r})", f.name)
        # The bindings convert and validate every field and name the bad one themselves.
        object.__setattr__(self, "_core_config", _core.Config(**self._kwargs()))

    def __hash__(self) -> int:
        # ``weights`` is a mapping (unhashable): it hashes as its sorted items
        weights = None if self.weights is None else tuple(sorted(dict(self.weights).items()))
        return hash(
            tuple(weights if f.name == "weights" else getattr(self, f.name) for f in dataclasses.fields(self))
        )

    def _kwargs(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if self.weights is not None:
            out["weights"] = dict(self.weights)
        return out

    @property
    def core(self) -> _core.Config:
        """The validated Rust-side configuration."""
        return self._core_config  # type: ignore[attr-defined]

    @property
    def resolved_thresholds(self) -> tuple[float, ...]:
        """The base thresholds after defaults were filled in."""
        return tuple(self.core.thresholds)

    @property
    def resolved_budget_rank(self) -> int:
        """The budget rank after defaults were filled in."""
        return int(self.core.budget_rank)
