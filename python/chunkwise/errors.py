"""The chunkwise exception hierarchy: the one place every error class is defined.

Every error raised on bad input is a :class:`ChunkwiseError`; the configuration and input
errors are also ``ValueError`` so generic handlers keep working. ``parameter`` names the
offending argument (the Rust bindings fill it in for errors they raise). Imports nothing.
"""

from __future__ import annotations

__all__ = ["AdapterError", "ChunkwiseError", "ConfigError", "InputError", "KernelError", "StateError"]


class ChunkwiseError(Exception):
    """Base class of every error chunkwise raises on purpose."""

    def __init__(self, message: str, parameter: str | None = None) -> None:
        super().__init__(message)
        self.parameter = parameter


class ConfigError(ChunkwiseError, ValueError):
    """A scheduler, ladder or policy configuration value is invalid."""


class InputError(ChunkwiseError, ValueError):
    """An input array or value is invalid (dtype, shape, contiguity, NaN, range)."""


class StateError(ChunkwiseError, RuntimeError):
    """An object was used out of order."""


class AdapterError(ChunkwiseError, ValueError):
    """An adapter or ladder file is unreadable, inconsistent, unsupported or does not fit the model."""


class KernelError(ChunkwiseError, RuntimeError):
    """The CUDA kernels could not be compiled or loaded."""
