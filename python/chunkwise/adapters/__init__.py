"""Reading PEFT LoRA adapters (config and tensors) exactly as PEFT would apply them."""

from .settings import LoraSettings, read_settings, settings_from_dict
from .weights import AdapterWeights, LoraModuleWeights, read_weights

__all__ = [
    "AdapterWeights",
    "LoraModuleWeights",
    "LoraSettings",
    "read_settings",
    "read_weights",
    "settings_from_dict",
]
