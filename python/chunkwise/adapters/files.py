"""The file names of an adapter folder: PEFT's own and the ladder chunkwise writes beside them.

One place for them, torch-free, so the command line can name them without importing torch.
"""

from __future__ import annotations

__all__ = ["CONFIG_FILE", "LADDER_FILE", "PICKLE_WEIGHTS_FILE", "WEIGHTS_FILE"]

#: PEFT's adapter configuration (JSON).
CONFIG_FILE = "adapter_config.json"
#: PEFT's adapter tensors (safetensors), preferred over :data:`PICKLE_WEIGHTS_FILE`.
WEIGHTS_FILE = "adapter_model.safetensors"
#: PEFT's older tensor file (a torch pickle, read with ``weights_only=True`` only).
PICKLE_WEIGHTS_FILE = "adapter_model.bin"
#: The rank ladder chunkwise writes beside a PEFT adapter (PEFT ignores it).
LADDER_FILE = "chunkwise_ladder.safetensors"
