"""Seeded value generators: mostly valid arguments, sometimes the nastiest value of a kind.

Every call of the fuzzer draws from a ``numpy.random.Generator`` seeded by ``(seed, index)``,
so any single call can be replayed on its own (``python -m fuzz.driver --replay INDEX``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: Outcomes of a call that fail the run (crashes and hangs are counted per batch by the driver).
FAILURES = ("panic", "foreign", "violation")

#: Values no parameter should take without a clear error (or a documented meaning).
NASTY: tuple[Any, ...] = (
    None,
    True,
    -1,
    0,
    2**31,
    2**63,
    2**70,
    -(2**70),
    float("nan"),
    float("inf"),
    -float("inf"),
    1e308,
    -1e308,
    1e-45,
    -0.0,
    "x",
    "",
    b"\x00",
    [],
    [1, 2],
    {},
    {"a": 1},
    (None,),
    object(),
    np.float32(np.nan),
    np.int64(-5),
    np.zeros(0),
    np.zeros((2, 2)),
    np.array(["a"]),
    1j,
)


class Draw:
    """A seeded source of arguments; ``bad`` is the chance that one argument is nasty."""

    def __init__(self, rng: np.random.Generator, bad: float) -> None:
        self.rng, self.bad = rng, bad

    def chance(self, p: float) -> bool:
        return bool(self.rng.random() < p)

    def nasty(self) -> Any:
        return NASTY[int(self.rng.integers(len(NASTY)))]

    def pick(self, good: Any) -> Any:
        """``good`` (a value, or a zero-argument callable making one) or a nasty value."""
        if self.chance(self.bad):
            return self.nasty()
        return good() if callable(good) else good

    def int(self, lo: int, hi: int) -> int:
        return int(self.rng.integers(lo, hi + 1))

    def float(self, lo: float, hi: float) -> float:
        return float(self.rng.uniform(lo, hi))

    def choice(self, options: list[Any] | tuple[Any, ...]) -> Any:
        return options[int(self.rng.integers(len(options)))]

    def extreme_float(self) -> float:
        """A float that is valid-looking but at the edge (huge, tiny, negative, non-finite)."""
        return self.choice([1e308, -1e308, 1e39, 3.4e38, 1e-300, -1.0, 0.0, float("nan"), float("inf")])

    def lengths(self, max_seqs: int = 4, max_len: int = 96) -> list[int]:
        n = self.int(1, max_seqs)
        return [self.int(0 if self.chance(0.05) else 1, max_len) for _ in range(n)]

    def signal(self, n: int) -> np.ndarray:
        """A float32 signal of length n: usually in [0, 1], sometimes broken."""
        x = self.rng.random(n).astype(np.float32)
        if self.chance(self.bad):
            kind = self.int(0, 4)
            if kind == 0 and n:
                x[self.int(0, n - 1)] = np.nan
            elif kind == 1 and n:
                x[self.int(0, n - 1)] = np.inf
            elif kind == 2:
                x = x * 1e30
            elif kind == 3:
                x = -x
            else:
                return x.astype(np.float64)  # wrong dtype
        return x
