"""The tensors of a PEFT LoRA adapter: read without unpickling, checked, grouped by module."""

from __future__ import annotations

import dataclasses
import pickle
import re
from pathlib import Path

import torch

from ..errors import AdapterError
from .files import PICKLE_WEIGHTS_FILE, WEIGHTS_FILE, regular_file

__all__ = ["KEY_PREFIX", "LoraModuleWeights", "AdapterWeights", "read_weights", "weights_from_tensors"]

#: What PEFT puts before a module name in the keys of an adapter's tensors.
KEY_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias)$")


@dataclasses.dataclass
class LoraModuleWeights:
    """``lora_A`` [r, in], ``lora_B`` [out, r] and the optional ``lora_B`` bias [out] of one module."""

    a: torch.Tensor
    b: torch.Tensor
    bias: torch.Tensor | None = None


@dataclasses.dataclass
class AdapterWeights:
    """All LoRA factors by module name, plus ``modules_to_save`` parameters by parameter name."""

    modules: dict[str, LoraModuleWeights]
    saved: dict[str, torch.Tensor]


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    st = path / WEIGHTS_FILE
    binf = path / PICKLE_WEIGHTS_FILE
    if st.exists():
        regular_file(st, WEIGHTS_FILE)
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(st))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise AdapterError(f"{st}: not a readable safetensors file ({e})", WEIGHTS_FILE) from None
    if binf.exists():
        regular_file(binf, PICKLE_WEIGHTS_FILE)
        try:
            out = torch.load(str(binf), map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
            first = (str(e).splitlines() or [""])[0][:200]
            raise AdapterError(
                f"{binf}: refused: not a plain tensor file ({type(e).__name__}: {first}); "
                "adapter files are data and are never unpickled",
                PICKLE_WEIGHTS_FILE,
            ) from None
        if not isinstance(out, dict) or not all(isinstance(v, torch.Tensor) for v in out.values()):
            raise AdapterError(f"{binf}: expected a dict of tensors", PICKLE_WEIGHTS_FILE)
        return out
    raise AdapterError(f"{path}: no adapter_model.safetensors or adapter_model.bin", "path")


def read_weights(path: str | Path) -> AdapterWeights:
    """Reads the adapter tensors of directory ``path`` and groups them per module.

    Raises :class:`AdapterError` for a missing or corrupt file, a pickle, a module with only one
    of ``lora_A`` / ``lora_B``, shapes that do not chain, or non-finite values.
    """
    return weights_from_tensors(_load_tensors(Path(path)), str(path))


def weights_from_tensors(tensors: dict[str, torch.Tensor], path: str) -> AdapterWeights:
    """Groups a PEFT adapter state dict (the keys ``save_pretrained`` writes, e.g. from
    ``peft.get_peft_model_state_dict``) per module, with :func:`read_weights`' checks; ``path``
    names the source in errors."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    saved: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        name = key[len(KEY_PREFIX) :] if key.startswith(KEY_PREFIX) else key
        m = _LORA_KEY.match(name)
        if m:
            parts.setdefault(m["module"], {})[m["part"]] = t
        elif ".lora_embedding_" in name:
            raise AdapterError(
                f"{path}: {key!r} is a LoRA on an embedding layer: chunkwise adapts Linear and Conv1D "
                "layers only (leave embeddings out of target_modules)",
                "target_modules",
            )
        elif ".lora_" in name:
            raise AdapterError(f"{path}: unexpected LoRA tensor {key!r}", "adapter_model")
        else:
            saved[name] = t
    modules: dict[str, LoraModuleWeights] = {}
    for mod, p in sorted(parts.items()):
        if "lora_A.weight" not in p or "lora_B.weight" not in p:
            missing = "lora_A.weight" if "lora_A.weight" not in p else "lora_B.weight"
            raise AdapterError(f"{path}: module {mod!r} has no {missing}", "adapter_model")
        a, b = p["lora_A.weight"], p["lora_B.weight"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1] or a.shape[0] == 0:
            raise AdapterError(
                f"{path}: module {mod!r} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, "
                "which do not chain as [r, in] and [out, r]",
                "adapter_model",
            )
        bias = p.get("lora_B.bias")
        if bias is not None and tuple(bias.shape) != (b.shape[0],):
            raise AdapterError(
                f"{path}: module {mod!r} has a lora_B bias of shape {tuple(bias.shape)}", "adapter_model"
            )
        for label, x in (("lora_A", a), ("lora_B", b), ("lora_B.bias", bias)):
            if x is not None and not torch.isfinite(x).all():
                raise AdapterError(f"{path}: module {mod!r} {label} holds NaN or inf", "adapter_model")
        modules[mod] = LoraModuleWeights(a, b, bias)
    if not modules:
        raise AdapterError(f"{path}: the adapter holds no LoRA tensors", "adapter_model")
    for name, t in saved.items():
        if not torch.isfinite(t).all():
            raise AdapterError(f"{path}: saved module tensor {name!r} holds NaN or inf", "adapter_model")
    return AdapterWeights(modules, saved)
