"""KV-cache retention policies: what a :class:`~chunkwise.kv.PolicyCache` keeps per sequence.

One policy type covers the usual caches, so they compose: attention sinks (StreamingLLM) + a
recent window + a token budget whose remaining room goes to the best-scoring middle tokens,
scored by accumulated attention (H2O) and/or difficulty (hard chunks stay longer, easy ones go
first). The settings are validated by the Rust core, which also makes every eviction decision.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from .. import _core
from ..errors import ConfigError

__all__ = ["KvPolicy", "MAX_TOKENS", "POLICY_KINDS"]

#: Names accepted by :meth:`KvPolicy.named` (and the CLI's ``--kv``).
POLICY_KINDS: tuple[str, ...] = ("full", "window", "sinks", "h2o", "difficulty")


#: Largest token count a policy takes (sinks, window, budget, slack): token positions are int32.
MAX_TOKENS = 2**31 - 1


def _count(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ConfigError(f"{name}: must be an int, got {value!r}", name)
    if not 0 <= value <= MAX_TOKENS:
        raise ConfigError(f"{name}: must be in [0, {MAX_TOKENS}], got {value}", name)


def _weight(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise ConfigError(f"{name}: must be a number, got {value!r}", name)
    if not (math.isfinite(value) and value >= 0):
        raise ConfigError(f"{name}: must be finite and >= 0, got {value}", name)


@dataclasses.dataclass(frozen=True)
class KvPolicy:
    """What each sequence's KV cache keeps.

    Attributes:
        sinks: the first ``sinks`` real tokens are always kept (attention sinks).
        window: the last ``window`` tokens are always kept.
        budget: tokens kept per sequence after an eviction (``None``: keep everything).
        budget_bytes: alternatively, the budget in bytes of keys + values per sequence over all
            layers; turned into tokens once the cache sees the model's layer shapes and dtype.
        slack: evict only when ``budget + slack`` is exceeded, then back to ``budget`` — one
            gather of the cache tensors per ``slack + 1`` tokens instead of one per token.
        attention_weight: weight of accumulated attention (H2O) in ranking the middle tokens.
            Needs attention scores: run the model inside :func:`chunkwise.kv.track_attention`
            (:func:`chunkwise.generate` does).
        difficulty_weight: weight of a chunk's mean difficulty in that ranking.
        int8: hold the least worth keeping of the kept tokens (the same ranking: with
            ``difficulty_weight``, the easy chunks) in int8 with a float32 scale per token and
            head, before evicting anything. The budget is then in bytes of both precisions
            (``budget`` tokens mean the bytes of that many full-precision tokens): as many
            tokens are kept as fit in int8 besides the full-precision sinks and window, and the
            best-ranked of them stay at full precision while the bytes allow. Slack applies to
            both steps (up to ``slack`` tokens over before anything is moved or evicted).
    """

    sinks: int = 0
    window: int = 0
    budget: int | None = None
    budget_bytes: int | None = None
    slack: int = 0
    attention_weight: float = 0.0
    difficulty_weight: float = 0.0
    int8: bool = False

    def __post_init__(self) -> None:
        for name in ("sinks", "window", "slack"):
            _count(name, getattr(self, name))
        for name in ("attention_weight", "difficulty_weight"):
            _weight(name, getattr(self, name))
        _count("budget", self.budget, allow_none=True)
        _count("budget_bytes", self.budget_bytes, allow_none=True)
        if self.budget is not None and self.budget_bytes is not None:
            raise ConfigError("budget_bytes: give a budget in tokens or in bytes, not both", "budget_bytes")
        if self.budget is None and self.budget_bytes is None and (self.sinks or self.window or self.scored):
            raise ConfigError(
                "budget: sinks, window and scores only matter with a budget (None keeps everything)", "budget"
            )
        if self.budget_bytes == 0:
            raise ConfigError("budget_bytes: must be > 0", "budget_bytes")
        if not isinstance(self.int8, bool | np.bool_):
            raise ConfigError(f"int8: must be True or False, got {self.int8!r}", "int8")
        if self.int8 and self.is_full:
            raise ConfigError("int8: quantizing needs a budget (budget or budget_bytes)", "int8")
        # The Rust core owns the rules (e.g. budget >= sinks + window): ask it once here.
        if self.budget_bytes is None:
            self.ledger([0])

    @property
    def scored(self) -> bool:
        """Whether middle tokens are ranked by score (else the newest are kept)."""
        return self.attention_weight > 0 or self.difficulty_weight > 0

    @property
    def is_full(self) -> bool:
        """Whether nothing is ever evicted."""
        return self.budget is None and self.budget_bytes is None

    def budget_in_bytes(self, bytes_per_token: int) -> int | None:
        """The budget in bytes of keys + values per sequence (None: keep everything)."""
        if self.budget_bytes is not None:
            return self.budget_bytes
        return None if self.budget is None else self.budget * bytes_per_token

    def tokens(self, bytes_per_token: int, int8_bytes_per_token: int | None = None) -> KvPolicy:
        """This policy with a byte budget turned into tokens (``bytes_per_token``: keys + values
        of one token over all layers). With :attr:`int8` (``int8_bytes_per_token``: the same in
        int8 with its scales) the token budget is what fits besides the full-precision sinks
        and window when the other tokens are int8."""
        if self.int8:
            if int8_bytes_per_token is None:
                raise ConfigError("int8: the int8 bytes per token are needed to size the budget", "int8")
            budget = self.budget_in_bytes(bytes_per_token)
            assert budget is not None  # int8 policies have a budget
            protected = self.sinks + self.window
            room = budget - protected * bytes_per_token
            if room < 0 or protected + room // int8_bytes_per_token < 1:
                raise ConfigError(
                    f"budget: {budget} bytes cannot hold sinks + window = {protected} tokens of "
                    f"{bytes_per_token} bytes at full precision",
                    "budget_bytes" if self.budget_bytes is not None else "budget",
                )
            return dataclasses.replace(
                self, budget=protected + room // int8_bytes_per_token, budget_bytes=None
            )
        if self.budget_bytes is None:
            return self
        budget = self.budget_bytes // max(1, bytes_per_token)
        if budget < max(1, self.sinks + self.window):
            raise ConfigError(
                f"budget_bytes: {self.budget_bytes} bytes hold {budget} tokens of {bytes_per_token} bytes, "
                f"fewer than sinks + window = {self.sinks + self.window}",
                "budget_bytes",
            )
        return dataclasses.replace(self, budget=budget, budget_bytes=None)

    def ledger(self, padding: list[int], per_row: bool = False) -> _core.KvLedger:
        """The Rust books for a batch with ``padding[b]`` left-padding columns per sequence
        (``per_row``: each sequence evicts as it would alone; see :class:`PolicyCache`)."""
        if self.budget_bytes is not None:
            raise ConfigError("budget_bytes: resolve it with tokens() first", "budget_bytes")
        return _core.KvLedger(
            [int(p) for p in padding],
            sinks=self.sinks,
            window=self.window,
            budget=self.budget,
            slack=self.slack,
            attention_weight=float(self.attention_weight),
            difficulty_weight=float(self.difficulty_weight),
            per_row=per_row,
        )

    # -- the usual policies ------------------------------------------------------------------
    @classmethod
    def full(cls) -> KvPolicy:
        """Keep every token (what ``DynamicCache`` does)."""
        return cls()

    @classmethod
    def sliding_window(cls, window: int, slack: int = 32) -> KvPolicy:
        """Keep the last ``window`` tokens."""
        return cls(window=window, budget=window, slack=slack)

    @classmethod
    def streaming(cls, sinks: int, window: int, slack: int = 32) -> KvPolicy:
        """StreamingLLM: ``sinks`` first tokens + the last ``window``."""
        _count("sinks", sinks)
        _count("window", window)
        return cls(sinks=sinks, window=window, budget=sinks + window, slack=slack)

    @classmethod
    def heavy_hitters(cls, budget: int, recent: int, sinks: int = 0, slack: int = 32) -> KvPolicy:
        """H2O: ``recent`` newest tokens + the most-attended others, ``budget`` in all."""
        return cls(sinks=sinks, window=recent, budget=budget, slack=slack, attention_weight=1.0)

    @classmethod
    def difficulty_aware(
        cls, budget: int, recent: int, sinks: int = 4, slack: int = 32, attention_weight: float = 0.0
    ) -> KvPolicy:
        """Hard chunks keep their entries longer: the middle is ranked by chunk difficulty
        (optionally mixed with attention)."""
        return cls(
            sinks=sinks,
            window=recent,
            budget=budget,
            slack=slack,
            difficulty_weight=1.0,
            attention_weight=attention_weight,
        )

    @classmethod
    def named(cls, kind: str, budget: int | None = None, sinks: int = 4, slack: int = 32) -> KvPolicy:
        """A policy by name (one of :data:`POLICY_KINDS`) and token budget: ``window`` keeps the
        last ``budget``; ``sinks`` keeps ``sinks`` + the last ``budget - sinks``; ``h2o`` and
        ``difficulty`` keep ``sinks``, a recent window of a quarter of the budget, and the best
        scored others."""
        if not isinstance(kind, str) or kind not in POLICY_KINDS:
            raise ConfigError(
                f"kind: unknown KV policy {kind!r}; choose one of {', '.join(POLICY_KINDS)}", "kind"
            )
        if kind == "full":
            return cls.full()
        if budget is None:
            raise ConfigError(f"budget: the {kind!r} policy needs a token budget", "budget")
        _count("budget", budget)
        _count("sinks", sinks)
        if kind == "window":
            return cls.sliding_window(budget, slack)
        if budget < sinks:
            raise ConfigError(f"budget: {budget} tokens cannot hold {sinks} sinks", "budget")
        if kind == "sinks":
            return cls.streaming(sinks, budget - sinks, slack)
        recent = max(1, (budget - sinks) // 4) if budget > sinks else 0
        if kind == "h2o":
            return cls.heavy_hitters(budget, recent, sinks, slack)
        return cls.difficulty_aware(budget, recent, sinks, slack)
