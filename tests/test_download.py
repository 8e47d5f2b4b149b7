"""chunkwise.assets.download: the cache folder, and ``pip download`` run in a subprocess (its output
explained when it fails: no network, no matching distribution, no pip).

Everything here runs without network: ``sys.executable`` is replaced by a fake that plays pip.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from chunkwise import ChunkwiseError, InputError
from chunkwise.assets import download


def test_cache_root_rejects_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(InputError) as info:
        download.cache_root(f)
    assert info.value.parameter == "cache_dir"


def fake_python(tmp_path: Path, body: str) -> str:
    """An executable standing in for ``sys.executable`` (called as ``exe -m pip download ...``)."""
    exe = tmp_path / "fake-python"
    exe.write_text(f"#!{sys.executable}\nimport sys, os\nargs = sys.argv[1:]\n{body}\n")
    exe.chmod(0o755)
    return str(exe)


@pytest.mark.skipif(os.name != "posix", reason="fake executables need a POSIX shebang")
def test_pip_download_runs_pip_and_reports_the_file(tmp_path, monkeypatch):
    body = (
        "assert args[:3] == ['-m', 'pip', 'download'], args\n"
        "assert '--no-deps' in args\n"
        "dest = args[args.index('-d') + 1]\n"
        "open(os.path.join(dest, 'pkg-1.0.tar.gz'), 'wb').write(b'x' * 1000)\n"
        "print('Saved', dest)\n"
    )
    monkeypatch.setattr(sys, "executable", fake_python(tmp_path, body))
    got = download.pip_download("pkg==1.0", "pkg-1.0.tar.gz", tmp_path / "dl", expected_bytes=1000)
    assert got == tmp_path / "dl" / "pkg-1.0.tar.gz"
    assert got.stat().st_size == 1000


@pytest.mark.skipif(os.name != "posix", reason="fake executables need a POSIX shebang")
@pytest.mark.parametrize(
    ("output", "match"),
    [
        (
            "WARNING: Retrying after connection broken by 'NewConnectionError(... "
            "[Errno -3] Temporary failure in name resolution)'",
            "no network",
        ),
        ("ERROR: No matching distribution found for pkg==1.0", "no matching distribution"),
        ("ERROR: something else entirely", "pip failed"),
    ],
)
def test_pip_download_failures_are_explained(tmp_path, monkeypatch, output, match):
    body = f"sys.stderr.write({output!r} + '\\n')\nsys.exit(1)\n"
    monkeypatch.setattr(sys, "executable", fake_python(tmp_path, body))
    with pytest.raises(ChunkwiseError, match=match) as info:
        download.pip_download("pkg==1.0", "pkg-1.0.tar.gz", tmp_path / "dl", progress=False)
    assert "exit status 1" in str(info.value)
    assert output[:20] in str(info.value)  # pip's own words are kept


def test_pip_missing_is_explained(tmp_path, monkeypatch):
    monkeypatch.setattr(download, "pip_available", lambda: False)
    with pytest.raises(ChunkwiseError, match="pip is not available"):
        download.pip_download("pkg==1.0", "pkg-1.0.tar.gz", tmp_path / "dl", progress=False)
