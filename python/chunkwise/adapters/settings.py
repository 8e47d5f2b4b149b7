"""``adapter_config.json`` of a PEFT LoRA adapter: parsed, checked, and refused where unsupported.

Every key PEFT writes is either understood here, known to be irrelevant at inference (training
initialisation, dropout, bookkeeping), or refused by name when it is set. Unknown keys are
refused when they carry a value (not None / False / empty), so a new PEFT feature is never
silently ignored.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import AdapterError
from .files import CONFIG_FILE, read_json

__all__ = ["LoraSettings", "read_config", "read_settings", "settings_from_dict"]

# Keys that change nothing at inference once the weights are saved.
_NEUTRAL = {
    "peft_type",
    "task_type",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "lora_dropout",
    "init_lora_weights",
    "auto_mapping",
    "peft_version",
    "megatron_core",
    "qalora_group_size",
    "loftq_config",
    "corda_config",
    "eva_config",
    "lora_ga_config",
    "kasa_config",
    "monteclora_config",
    "velora_config",
    "ensure_weight_tying",
}
# Keys we implement.
_SUPPORTED = {
    "r",
    "lora_alpha",
    "use_rslora",
    "rank_pattern",
    "alpha_pattern",
    "target_modules",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "fan_in_fan_out",
    "lora_bias",
    "modules_to_save",
    "bias",
    "use_dora",
}


def _inactive(value: Any) -> bool:
    return value is None or value is False or (isinstance(value, (dict, list, str)) and len(value) == 0)


@dataclasses.dataclass(frozen=True)
class LoraSettings:
    """The parts of a LoRA config that decide which modules are adapted and how strongly."""

    r: int
    lora_alpha: float
    use_rslora: bool = False
    rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)
    target_modules: tuple[str, ...] | str | None = None
    exclude_modules: tuple[str, ...] | str | None = None
    layers_to_transform: tuple[int, ...] | None = None
    layers_pattern: tuple[str, ...] | None = None
    fan_in_fan_out: bool = False
    lora_bias: bool = False
    modules_to_save: tuple[str, ...] = ()

    def rank_alpha(self, key: str) -> tuple[int, float]:
        """Rank and alpha of module ``key`` (PEFT's rank_pattern / alpha_pattern rules)."""
        r = self.rank_pattern.get(_pattern_key(self.rank_pattern, key), self.r)
        alpha = self.alpha_pattern.get(_pattern_key(self.alpha_pattern, key), self.lora_alpha)
        return int(r), float(alpha)

    def scaling(self, key: str) -> float:
        """PEFT's scaling of module ``key``: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        r, alpha = self.rank_alpha(key)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def targets(self, key: str, all_linear: frozenset[str] = frozenset()) -> bool:
        """Whether PEFT would adapt module ``key`` (target / exclude / layer rules).

        ``all_linear`` is the model's set of linear layer names, for ``target_modules="all-linear"``.
        """
        if self.exclude_modules:
            ex = self.exclude_modules
            if isinstance(ex, str):
                if re.fullmatch(ex, key):
                    return False
            elif key in ex or any(key.endswith(f".{e}") for e in ex):
                return False
        if any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in self.modules_to_save):
            return False
        tm = self.target_modules
        if tm is None:
            return False
        if isinstance(tm, str):
            if tm.lower() == "all-linear":
                return key in all_linear
            return re.fullmatch(tm, key) is not None
        if key in tm:
            return True
        if not any(key.endswith(f".{t}") for t in tm):
            return False
        if not self.layers_to_transform:  # None or [] both mean every layer, as in PEFT
            return True
        return _layer_index(key, self.layers_pattern) in self.layers_to_transform


def _pattern_key(patterns: Mapping[str, Any], key: str) -> str:
    for p in patterns:
        if re.match(rf"(.*\.)?({p})$", key):
            return p
    return key


def _layer_index(key: str, patterns: tuple[str, ...] | None) -> int | None:
    if not patterns:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        m = None
        for p in patterns:
            m = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key)
            if m:
                break
    return int(m.group("idx")) if m else None


def _tuple(value: Any, kind: type, name: str) -> Any:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, kind):
        return (value,)
    if isinstance(value, (list, tuple, set)):
        return tuple(value)
    raise AdapterError(f"adapter_config.json: {name} has an unexpected value {value!r}", name)


def read_config(path: str | Path) -> dict[str, Any]:
    """The raw ``adapter_config.json`` of the adapter directory ``path`` (a JSON object)."""
    if not isinstance(path, str | Path):
        raise AdapterError(f"path: expected a str or Path, got {type(path).__name__}", "path")
    file = Path(path) / CONFIG_FILE
    try:
        raw = read_json(file, CONFIG_FILE)
    except FileNotFoundError:
        raise AdapterError(f"{file}: no adapter_config.json (not a PEFT adapter directory)", "path") from None
    if not isinstance(raw, dict):
        raise AdapterError(f"{file}: expected a JSON object", "adapter_config.json")
    return raw


def read_settings(path: str | Path) -> LoraSettings:
    """Reads and checks ``adapter_config.json`` in the adapter directory ``path``."""
    return settings_from_dict(read_config(path), str(Path(path) / CONFIG_FILE))


def settings_from_dict(raw: Mapping[str, Any], where: str = CONFIG_FILE) -> LoraSettings:
    """Validates a PEFT LoRA config dict; refuses what chunkwise does not implement."""
    if raw.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{where}: peft_type {raw.get('peft_type')!r} is not LORA", "peft_type")
    if raw.get("use_dora"):
        raise AdapterError(
            f"{where}: use_dora=true: DoRA adapters are not supported (their magnitude vector does not "
            "decompose into rank prefixes); merge the adapter or train plain LoRA",
            "use_dora",
        )
    if raw.get("bias", "none") != "none":
        raise AdapterError(
            f"{where}: bias={raw.get('bias')!r}: adapters that train the base layers' biases are not "
            "supported (only bias='none')",
            "bias",
        )
    for key, value in raw.items():
        if key in _NEUTRAL or key in _SUPPORTED:
            continue
        if not _inactive(value):
            raise AdapterError(f"{where}: {key}={value!r} is not supported by chunkwise", key)
    try:
        r = int(raw["r"])
        alpha = float(raw.get("lora_alpha", 8))
    except (KeyError, TypeError, ValueError):
        raise AdapterError(f"{where}: r / lora_alpha missing or not numbers", "r") from None
    if r <= 0:
        raise AdapterError(f"{where}: r={r} must be positive", "r")
    rank_pattern = {str(k): int(v) for k, v in (raw.get("rank_pattern") or {}).items()}
    if any(v <= 0 for v in rank_pattern.values()):
        raise AdapterError(f"{where}: rank_pattern has a non-positive rank", "rank_pattern")
    ltt = raw.get("layers_to_transform")
    lp = raw.get("layers_pattern")
    layers_pattern = (lp,) if isinstance(lp, str) and lp else (tuple(lp) if lp else None)
    return LoraSettings(
        r=r,
        lora_alpha=alpha,
        use_rslora=bool(raw.get("use_rslora", False)),
        rank_pattern=rank_pattern,
        alpha_pattern={str(k): float(v) for k, v in (raw.get("alpha_pattern") or {}).items()},
        target_modules=_tuple(raw.get("target_modules"), str, "target_modules"),
        exclude_modules=_tuple(raw.get("exclude_modules"), str, "exclude_modules"),
        layers_to_transform=None
        if ltt is None
        else tuple(int(i) for i in _tuple(ltt, int, "layers_to_transform")),
        layers_pattern=layers_pattern,
        fan_in_fan_out=bool(raw.get("fan_in_fan_out", False)),
        lora_bias=bool(raw.get("lora_bias", False)),
        modules_to_save=tuple(raw.get("modules_to_save") or ()),
    )
