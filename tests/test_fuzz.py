"""The fuzzer (``fuzz/``, ``make fuzz``): a short seeded slice of it finds nothing, and its
driver does catch each kind of failure it promises to (crash, hang, foreign exception, broken
invariant), so a clean slice means something."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLEAN = "panics 0, crashes 0, hangs 0, non-chunkwise exceptions 0, invariant violations 0"


def _driver(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CHUNKWISE_FUZZ_SELFTEST"}
    return subprocess.run(
        [sys.executable, "-m", "fuzz.driver", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def test_a_seeded_slice_of_the_fuzzer_is_clean():
    """CI's slice: 4000 calls over every target, the torch ones included."""
    out = _driver("--calls", "4000", "--batch", "2000", "--seed", "20261202", "--torch")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert CLEAN in out.stdout
    calls = re.search(r"^(\d+) calls", out.stdout, re.M)
    assert calls is not None and int(calls.group(1)) == 4000
    for target in ("config", "plan", "decode", "policy", "from_peft", "load", "inject", "generate"):
        row = re.search(rf"^\s+{target}\s+(\d+)\s+(.*)$", out.stdout, re.M)
        assert row is not None and int(row.group(1)) > 0, (target, out.stdout)
        assert "ok" in row.group(2), f"{target}: no call succeeded, so nothing was checked"


@pytest.mark.parametrize(
    ("kind", "counter"),
    [
        ("crash", "crashes"),
        ("hang", "hangs"),
        ("foreign", "non-chunkwise exceptions"),
        ("violation", "invariant violations"),
    ],
)
def test_the_driver_reports_each_failure(kind, counter):
    # a batch's timeout is what names a hang: long enough for a worker to import torch
    limit = "15" if kind == "hang" else "300"
    out = _driver("--calls", "2", "--workers", "1", "--timeout", limit, "--selftest", kind, timeout=600)
    assert out.returncode == 1, out.stdout
    found = re.search(rf"{counter} (\d+)", out.stdout)
    assert found is not None and int(found.group(1)) >= 1, out.stdout
    assert '"index": 0' in out.stdout  # the failing call is named, to replay it
