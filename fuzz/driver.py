"""The chunkwise fuzzer: ``python -m fuzz.driver --calls 1000000`` (``make fuzz``).

Runs seeded batches of calls over the public API (scheduler configs, ``plan``, decoder steps,
KV policies and, with ``--torch``, ``inject`` / ``RankLadder.from_peft`` / ``RankLadder.load`` /
``generate`` on tiny random models), each batch in a subprocess so that a crash (a signal, an
abort) or a hang (a batch past ``--timeout``) is caught and named. Prints the outcome counts
per target and fails (exit 1) on any panic, crash, hang, exception outside the ``chunkwise``
hierarchy, or broken invariant. ``--replay INDEX`` reruns one call in this process and shows
its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .values import FAILURES


def run_batch(seed: int, start: int, count: int, with_torch: bool, timeout: float) -> dict[str, Any]:
    """One subprocess batch; a crash or a timeout becomes an outcome with the call it hit."""
    with tempfile.NamedTemporaryFile(prefix="chunkwise-fuzz-", delete=False) as f:
        f.write((start).to_bytes(8, "little"))
        progress = f.name
    cmd = [sys.executable, "-m", "fuzz.worker", "--seed", str(seed), "--start", str(start)]
    cmd += ["--count", str(count), "--progress", progress] + (["--torch"] if with_torch else [])
    env = dict(os.environ, PYTHONFAULTHANDLER="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        at = int.from_bytes(Path(progress).read_bytes()[:8], "little")
        return {"counts": {"hang": 1}, "examples": [{"outcome": "hang", "index": at, "seed": seed}]}
    finally:
        at = int.from_bytes(Path(progress).read_bytes()[:8], "little") if Path(progress).exists() else start
        Path(progress).unlink(missing_ok=True)
    if proc.returncode != 0:
        lines = [
            ln for ln in proc.stderr.strip().splitlines() if ln and not ln.startswith("Extension modules")
        ]
        tail = lines[-10:]
        return {
            "counts": {"crash": 1},
            "examples": [
                {"outcome": "crash", "index": at, "seed": seed, "rc": proc.returncode, "stderr": tail}
            ],
        }
    return json.loads(proc.stdout)


def summarize(results: list[dict[str, Any]]) -> tuple[Counter[str], list[dict[str, Any]]]:
    counts: Counter[str] = Counter()
    examples: list[dict[str, Any]] = []
    for r in results:
        counts.update(r["counts"])
        examples.extend(r["examples"])
    return counts, examples


def report(counts: Counter[str], examples: list[dict[str, Any]], seconds: float) -> int:
    """Prints the table; returns the number of failing calls."""
    per_target: dict[str, Counter[str]] = {}
    for key, n in counts.items():
        target, _, outcome = key.partition("/")
        per_target.setdefault(target if outcome else "(batch)", Counter())[outcome or target] += n
    total = sum(n for k, n in counts.items() if "/" in k)
    print(f"{total} calls in {seconds:.0f} s")
    for target in sorted(per_target):
        row = per_target[target]
        print(
            f"  {target:10s} {sum(row.values()):9d}  " + ", ".join(f"{k} {v}" for k, v in row.most_common())
        )
    bad = {k: n for k, n in counts.items() if k.split("/")[-1].split(":")[0] in (*FAILURES, "crash", "hang")}
    failures = sum(bad.values())
    print(
        "panics {}, crashes {}, hangs {}, non-chunkwise exceptions {}, invariant violations {}".format(
            *(sum(n for k, n in bad.items() if k.split("/")[-1].startswith(w)) for w in FAILURES[:1]),
            counts.get("crash", 0),
            counts.get("hang", 0),
            *(sum(n for k, n in bad.items() if k.split("/")[-1].startswith(w)) for w in FAILURES[1:]),
        )
    )
    for ex in examples[:40]:
        print("  FAIL", json.dumps(ex))
    return failures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=10_000, help="calls in all (default: 10000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=20_000, help="calls per subprocess (default: 20000)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--timeout", type=float, default=600, help="seconds a batch may take (a hang)")
    p.add_argument("--torch", action="store_true", help="also inject / from_peft / load / generate")
    p.add_argument("--replay", type=int, help="rerun call INDEX here and print its traceback")
    p.add_argument("--target", help="with --replay: the target to run")
    p.add_argument(
        "--selftest",
        choices=["crash", "hang", "foreign", "violation"],
        help="run only a target failing this way (checks that the driver catches it)",
    )
    args = p.parse_args(argv)
    if args.replay is not None:
        from .worker import run_one  # imports chunkwise and torch: only here, not per driver

        name, outcome, exc = run_one(args.seed, args.replay, args.torch, args.target)
        print(f"call {args.replay}: {name} -> {outcome}")
        if exc is not None:
            traceback.print_exception(exc)
        return 0
    if args.selftest:
        os.environ["CHUNKWISE_FUZZ_SELFTEST"] = args.selftest  # the workers inherit it
    t0 = time.perf_counter()
    starts = list(range(0, args.calls, args.batch))
    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        futures = [
            pool.submit(run_batch, args.seed, s, min(args.batch, args.calls - s), args.torch, args.timeout)
            for s in starts
        ]
        results = []
        for i, fut in enumerate(futures, 1):
            results.append(fut.result())
            print(f"\rbatch {i}/{len(futures)}", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
    counts, examples = summarize(results)
    return 1 if report(counts, examples, time.perf_counter() - t0) else 0


if __name__ == "__main__":
    raise SystemExit(main())
