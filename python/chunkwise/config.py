"""Scheduler configuration: a frozen dataclass validated by the Rust core on construction."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Literal

from . import _core

__all__ = ["SchedulerConfig", "DEFAULT_RUNGS"]

DEFAULT_RUNGS: tuple[int, ...] = (0, 4, 8, 16, 32, 64)


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """How difficulty becomes chunks and ranks. See ``docs/architecture.md`` for the math.

    Validation happens once, here, in the Rust core: a bad value raises
    :class:`chunkwise.ConfigError` whose ``parameter`` names the field.

    Attributes:
        rungs: ranks of the ladder, strictly increasing (the first may be 0).
        rung_scales: per-rung multiplier of the LoRA scale (default all 1.0).
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
        weights: weight per signal (entropy, surprisal, novelty, rarity, position, probe);
            missing keys keep their defaults, 0 disables a signal.
        ngram, novelty_window: n-gram length and rolling window of the novelty signal.
        ema: EMA weight of the newest difficulty (1 disables smoothing).
        position_tau: decay length of the positional prior ``exp(-p / tau)``.
        probe_scale: saturation scale of the probe signal ``x / (x + probe_scale)``.
    """

    rungs: Sequence[int] = DEFAULT_RUNGS
    rung_scales: Sequence[float] | None = None
    mode: Literal["threshold", "quantile", "target"] = "threshold"
    thresholds: Sequence[float] | None = None
    quantiles: Sequence[float] | None = None
    target_mean_rank: float | None = None
    min_len: int = 16
    max_len: int = 128
    granularity: int = 8
    chunk_penalty: float = 0.5
    crossfade: int = 4
    hysteresis: float = 0.05
    budget_share: float = 1.0
    budget_rank: int | None = None
    weights: Mapping[str, float] | None = None
    ngram: int = 2
    novelty_window: int = 256
    ema: float = 0.3
    position_tau: float = 64.0
    probe_scale: float = 1.0

    def __post_init__(self) -> None:
        # Normalise sequences to tuples so the frozen config is hashable and comparable.
        for name in ("rungs", "rung_scales", "thresholds", "quantiles"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))
        if self.weights is not None and not isinstance(self.weights, Mapping):
            from .errors import ConfigError

            raise ConfigError(
                f"weights: must be a mapping of signal name to weight, got {type(self.weights)}",
                "weights",
            )
        try:
            core = _core.Config(**self._kwargs())
        except (TypeError, OverflowError) as e:  # wrong Python type or out of int64, from PyO3
            from .errors import ConfigError

            text = " ".join([str(e), *getattr(e, "__notes__", [])])
            m = re.search(r"(?:argument|processing) '(\w+)'", text)
            param = m.group(1) if m else None
            raise ConfigError(f"{param or 'config'}: {e}", param) from None
        object.__setattr__(self, "_core_config", core)

    def _kwargs(self) -> dict[str, object]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["rungs"] = list(self.rungs)
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
