"""The file names of an adapter folder: PEFT's own and the ladder chunkwise writes beside them.

One place for them, torch-free, so the command line can name them without importing torch.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import AdapterError

__all__ = [
    "CONFIG_FILE",
    "LADDER_FILE",
    "MAX_CONFIG_BYTES",
    "PICKLE_WEIGHTS_FILE",
    "WEIGHTS_FILE",
    "atomic_write",
    "read_json",
    "regular_file",
]

#: PEFT's adapter configuration (JSON).
CONFIG_FILE = "adapter_config.json"
#: PEFT's adapter tensors (safetensors), preferred over :data:`PICKLE_WEIGHTS_FILE`.
WEIGHTS_FILE = "adapter_model.safetensors"
#: PEFT's older tensor file (a torch pickle, read with ``weights_only=True`` only).
PICKLE_WEIGHTS_FILE = "adapter_model.bin"
#: The rank ladder chunkwise writes beside a PEFT adapter (PEFT ignores it).
LADDER_FILE = "chunkwise_ladder.safetensors"

#: Largest adapter_config.json read (PEFT's are a few KiB).
MAX_CONFIG_BYTES = 16 << 20


def regular_file(path: Path, param: str) -> Path:
    """``path`` if it is (a link to) a regular file, else :class:`AdapterError`: a FIFO would
    block the reader forever and a device (``/dev/zero``) never ends."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise
    except OSError as e:
        raise AdapterError(f"{path}: cannot be read ({e})", param) from None
    if not stat.S_ISREG(mode):
        kind = (
            "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file"
        )
        raise AdapterError(f"{path}: is {kind}; adapter files must be regular files", param)
    return path


def read_json(path: Path, param: str, max_bytes: int = MAX_CONFIG_BYTES) -> Any:
    """The JSON value of the regular file ``path``, read without blocking and at most
    ``max_bytes`` long; unreadable, oversized, non-UTF-8, invalid or too deeply nested JSON is
    an :class:`AdapterError` naming ``param``. A missing file raises ``FileNotFoundError``."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise
    except OSError as e:
        raise AdapterError(f"{path}: cannot be read ({e})", param) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise AdapterError(f"{path}: is not a regular file (a FIFO or a device?)", param)
        data = os.read(fd, max_bytes + 1)
    except OSError as e:
        raise AdapterError(f"{path}: cannot be read ({e})", param) from None
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise AdapterError(f"{path}: larger than {max_bytes >> 20} MiB; not an adapter config", param)
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise AdapterError(f"{path}: not valid JSON ({type(e).__name__}: {str(e)[:200]})", param) from None


def atomic_write(out: Path, write: Callable[[str], None]) -> Path:
    """Writes ``out`` through ``write(temp_path)`` into a temp file of its own beside it (two
    writers of one folder never share one), synced and renamed over ``out`` only once complete:
    a reader sees the old file or the new one, never a part, and an interrupted write leaves no
    temp behind. The temp file gets the umask's mode. Returns ``out``."""
    tmp = str(out.parent / f".{out.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return out
