"""PEFT LoRA adapters read exactly as PEFT would apply them, and the rank ladders built from them.

:mod:`.settings` (``adapter_config.json``, torch-free), :mod:`.weights` (the tensors),
:mod:`.ladder` (:class:`RankLadder`: nested SVD factors per module), :mod:`.files` (file names).
The torch-side modules are imported by name, so this package itself stays torch-free.
May import: ``chunkwise.errors``.
"""

from .files import CONFIG_FILE, LADDER_FILE, PICKLE_WEIGHTS_FILE, WEIGHTS_FILE
from .settings import LoraSettings, read_settings, settings_from_dict

__all__ = [
    "CONFIG_FILE",
    "LADDER_FILE",
    "PICKLE_WEIGHTS_FILE",
    "WEIGHTS_FILE",
    "LoraSettings",
    "read_settings",
    "settings_from_dict",
]
