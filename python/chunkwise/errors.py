"""The chunkwise exception hierarchy.

Every error raised on bad input is a :class:`ChunkwiseError`; the configuration and input
errors are also ``ValueError`` so generic handlers keep working. ``parameter`` names the
offending argument (the Rust core fills it in for errors it raises).
"""

from __future__ import annotations

__all__ = ["AdapterError", "ChunkwiseError", "ConfigError", "InputError", "StateError"]


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
