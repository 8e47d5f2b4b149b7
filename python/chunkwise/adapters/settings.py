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

from .. import _core
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
    if "r" not in raw:
        raise AdapterError(f"{where}: r is missing", "r")
    r = _rank(raw["r"], "r", where)
    alpha = _number(raw.get("lora_alpha", 8), "lora_alpha", where)
    rank_pattern = {
        k: _rank(v, "rank_pattern", where) for k, v in _patterns(raw, "rank_pattern", where).items()
    }
    alpha_pattern = {
        k: _number(v, "alpha_pattern", where) for k, v in _patterns(raw, "alpha_pattern", where).items()
    }
    ltt = raw.get("layers_to_transform")
    lp = raw.get("layers_pattern")
    layers_pattern = _strings(lp, "layers_pattern", where, regex=True) if lp else None
    target_modules = raw.get("target_modules")
    exclude_modules = raw.get("exclude_modules")
    return LoraSettings(
        r=r,
        lora_alpha=alpha,
        use_rslora=_flag(raw, "use_rslora", where),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        target_modules=None if target_modules is None else _names(target_modules, "target_modules", where),
        exclude_modules=None
        if exclude_modules is None
        else _names(exclude_modules, "exclude_modules", where),
        layers_to_transform=None if ltt is None else _layers(ltt, where),
        layers_pattern=None if layers_pattern is None else tuple(layers_pattern),
        fan_in_fan_out=_flag(raw, "fan_in_fan_out", where),
        lora_bias=_flag(raw, "lora_bias", where),
        modules_to_save=tuple(
            _strings(raw.get("modules_to_save") or (), "modules_to_save", where, regex=True)
        ),
    )


#: Largest LoRA rank read (the scheduler's largest rung, ``chunkwise._core.MAX_RANK``).
MAX_RANK: int = int(_core.MAX_RANK)


def _rank(value: Any, name: str, where: str) -> int:
    """A positive int rank (an integral float such as 8.0 too, as JSON may write it)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_RANK:
        raise AdapterError(f"{where}: {name} must be an int rank in [1, {MAX_RANK}], got {value!r}", name)
    return value


def _number(value: Any, name: str, where: str) -> float:
    """A finite number (lora_alpha and alpha_pattern values)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise AdapterError(f"{where}: {name} must be a finite number, got {value!r}", name)
    return float(value)


def _flag(raw: Mapping[str, Any], name: str, where: str) -> bool:
    value = raw.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise AdapterError(f"{where}: {name} must be true or false, got {value!r}", name)
    return value


def _regex(pattern: str, name: str, where: str) -> str:
    try:
        re.compile(pattern)
    except re.error as e:
        raise AdapterError(
            f"{where}: {name} {pattern!r} is not a valid regular expression ({e})", name
        ) from None
    return pattern


def _strings(value: Any, name: str, where: str, regex: bool = False) -> list[str]:
    """A string or a list of strings (each a valid regular expression with ``regex``)."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(v, str) for v in items):
        raise AdapterError(f"{where}: {name} must be a string or a list of strings, got {value!r}", name)
    return [_regex(v, name, where) if regex else v for v in items]


def _names(value: Any, name: str, where: str) -> tuple[str, ...] | str:
    """target_modules / exclude_modules: a regex string (PEFT full-matches it) or module names."""
    if isinstance(value, str):
        return _regex(value, name, where)
    return tuple(_strings(value, name, where))


def _patterns(raw: Mapping[str, Any], name: str, where: str) -> dict[str, Any]:
    """rank_pattern / alpha_pattern: an object whose keys are regular expressions."""
    value = raw.get(name) or {}
    if not isinstance(value, dict):
        raise AdapterError(f"{where}: {name} must be an object of pattern: value, got {value!r}", name)
    return {_regex(str(k), name, where): v for k, v in value.items()}


def _layers(value: Any, where: str) -> tuple[int, ...]:
    items = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(items, list | tuple) or not all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items
    ):
        raise AdapterError(
            f"{where}: layers_to_transform must be a layer index or a list of them, got {value!r}",
            "layers_to_transform",
        )
    return tuple(items)
