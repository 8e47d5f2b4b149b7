"""One fuzz batch in this process: calls ``[start, start + count)`` of a seed, outcome counts
as JSON on stdout. Run by :mod:`fuzz.driver` in a subprocess, so a crash or hang is caught."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
import warnings
from collections import Counter
from typing import Any

import chunkwise as cw
import numpy as np

from .schedule_targets import SCHEDULE_TARGETS, Violation
from .values import FAILURES, Draw

#: Share of calls per target (the torch-side targets are ~1000x slower per call).
WEIGHTS: dict[str, float] = {
    "config": 0.25,
    "plan": 0.33,
    "decode": 0.30,
    "policy": 0.10,
    "torch": 0.04,
}
BAD = 0.08  # chance that any one argument is nasty


def _selftest(kind: str) -> Any:
    """A target that fails on purpose (``--selftest``): proves the driver catches each kind."""

    def target(d: Draw) -> None:
        if kind == "crash":
            os.abort()
        elif kind == "hang":
            time.sleep(3600)
        elif kind == "foreign":
            raise TypeError("selftest")
        elif kind == "violation":
            raise Violation("selftest")

    return target


def targets(with_torch: bool) -> dict[str, Any]:
    found = dict(SCHEDULE_TARGETS)
    kind = os.environ.get("CHUNKWISE_FUZZ_SELFTEST")
    if kind:
        return {"selftest": _selftest(kind)}
    if with_torch:
        from .torch_targets import TORCH_TARGETS

        found.update(TORCH_TARGETS)
    return found


def pick_target(rng: np.random.Generator, names: list[str], with_torch: bool) -> str:
    if names == ["selftest"]:
        return "selftest"
    w = {k: v for k, v in WEIGHTS.items() if k != "torch" or with_torch}
    keys = list(w)
    p = np.array([w[k] for k in keys])
    key = keys[int(rng.choice(len(keys), p=p / p.sum()))]
    if key == "torch":
        torch_names = [n for n in names if n not in SCHEDULE_TARGETS]
        return torch_names[int(rng.integers(len(torch_names)))]
    return key


def classify(exc: BaseException) -> str:
    if type(exc).__name__ == "PanicException":
        return "panic"
    if isinstance(exc, Violation):
        return "violation"
    if isinstance(exc, cw.ChunkwiseError):
        return "error"
    return "foreign"


def run_one(
    seed: int, index: int, with_torch: bool, only: str | None = None
) -> tuple[str, str, BaseException | None]:
    """(target, outcome, exception) of call ``index``; reproducible from (seed, index)."""
    rng = np.random.default_rng([seed, index])
    table = targets(with_torch)
    name = only or pick_target(rng, list(table), with_torch)
    d = Draw(rng, BAD)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with np.errstate(all="ignore"):
                table[name](d)
    except BaseException as e:  # noqa: BLE001 - classifying every outcome is the point
        if isinstance(e, KeyboardInterrupt):
            raise
        return name, classify(e), e
    return name, "ok", None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--start", type=int, required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--torch", action="store_true")
    p.add_argument("--progress", help="file the index of the running call is written to")
    p.add_argument("--examples", type=int, default=5, help="failures kept per kind")
    args = p.parse_args(argv)
    counts: Counter[str] = Counter()
    examples: list[dict[str, Any]] = []
    kept: Counter[str] = Counter()
    fd = open(args.progress, "r+b", buffering=0) if args.progress else None  # noqa: SIM115
    t0 = time.perf_counter()
    for i in range(args.start, args.start + args.count):
        if fd is not None:
            fd.seek(0)
            fd.write(i.to_bytes(8, "little"))
        name, outcome, exc = run_one(args.seed, i, args.torch)
        key = f"{outcome}:{type(exc).__name__}" if exc is not None else outcome
        counts[f"{name}/{key}"] += 1
        if outcome in FAILURES:
            kind = f"{outcome}:{name}:{type(exc).__name__}"
            if kept[kind] < args.examples:
                kept[kind] += 1
                tb = traceback.extract_tb(exc.__traceback__)[-1] if exc is not None else None
                examples.append(
                    {
                        "index": i,
                        "target": name,
                        "outcome": outcome,
                        "type": type(exc).__name__,
                        "message": str(exc)[:300],
                        "where": f"{tb.filename}:{tb.lineno}" if tb else "",
                    }
                )
    json.dump({"counts": counts, "examples": examples, "seconds": time.perf_counter() - t0}, sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
