"""Running the ``chunkwise`` command the way a user does: ``python -m chunkwise.cli`` in a subprocess."""

from __future__ import annotations

import subprocess
import sys


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Runs ``chunkwise *args`` (text output captured, two minutes at most)."""
    return subprocess.run(
        [sys.executable, "-m", "chunkwise.cli", *args], capture_output=True, text=True, timeout=120
    )
