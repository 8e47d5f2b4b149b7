"""The :class:`Scheduler`: plans prefill batches and creates decode state, via the Rust core."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from . import _core
from .config import SchedulerConfig
from .errors import InputError
from .plan import Plan

__all__ = ["Scheduler", "DecodeBatch"]

DecodeBatch = _core.DecodeBatch


def _as_numpy(x: Any) -> Any:
    """Torch tensors become numpy views (CPU only); everything else passes through."""
    if type(x).__module__.startswith("torch"):
        if x.device.type != "cpu":
            raise InputError("arrays must live on the CPU for the scheduler; call .cpu() first")
        return x.detach().numpy()
    return x


def _flat(name: str, value: Any, dtype: type, lengths: np.ndarray | None) -> tuple[np.ndarray, Any]:
    """Flattens one per-token input. Returns (flat array, lengths or None if not inferable).

    numpy arrays (and tensors) must already have ``dtype``: they are used without copying when
    1-D or C-contiguous 2-D. Python lists of numbers are converted. A list of per-sequence
    arrays is concatenated (one copy: a ragged batch cannot be a view).
    """
    value = _as_numpy(value)
    want = np.dtype(dtype)
    if isinstance(value, np.ndarray):
        if value.dtype != want:
            raise InputError(f"{name}: must have dtype {want}, got {value.dtype}", name)
        if value.ndim == 1:
            return value, None
        if value.ndim == 2:
            if not value.flags.c_contiguous:
                raise InputError(f"{name}: must be C-contiguous (use numpy.ascontiguousarray)", name)
            b, t = value.shape
            return value.reshape(-1), np.full(b, t, dtype=np.int64)
        raise InputError(f"{name}: must be 1-d or 2-d, got {value.ndim}-d", name)
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        if len(value) == 0:
            raise InputError(f"{name}: the batch has no sequences", name)
        if all(np.isscalar(v) for v in value):
            return _checked_array(name, value, want), None
        parts = []
        for i, part in enumerate(value):
            part = _as_numpy(part)
            if isinstance(part, np.ndarray) and part.dtype != want:
                raise InputError(f"{name}[{i}]: must have dtype {want}, got {part.dtype}", name)
            arr = _checked_array(f"{name}[{i}]", part, want, param=name)
            if arr.ndim != 1:
                raise InputError(f"{name}[{i}]: must be 1-d, got {arr.ndim}-d", name)
            parts.append(arr)
        return np.concatenate(parts), np.array([len(p) for p in parts], dtype=np.int64)
    raise InputError(f"{name}: expected an array or a list of arrays, got {type(value).__name__}", name)


def _checked_array(label: str, value: Any, dtype: np.dtype, param: str | None = None) -> np.ndarray:
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError) as e:
        raise InputError(f"{label}: not an array of numbers ({e})", param or label) from None
    if arr.dtype.kind not in "iuf b" or (dtype.kind in "iu" and arr.dtype.kind == "f"):
        raise InputError(f"{label}: must hold {dtype} values, got {arr.dtype}", param or label)
    return arr.astype(dtype, copy=False)


class Scheduler:
    """Turns token ids (and optional difficulty signals) into a :class:`Plan`.

    Thread-safe: planning releases the GIL and shares no mutable state, so several threads can
    plan at once. ``unigram_counts`` (one count per vocabulary id) enables the rarity signal.
    """

    def __init__(self, config: SchedulerConfig | None = None, unigram_counts: Any | None = None) -> None:
        self.config = config if config is not None else SchedulerConfig()
        counts = None
        if unigram_counts is not None:
            counts = _checked_array("unigram_counts", _as_numpy(unigram_counts), np.dtype(np.float64))
            counts = np.ascontiguousarray(counts.reshape(-1))
        self._core = _core.Scheduler(self.config.core, counts)

    def plan(
        self,
        token_ids: Any,
        *,
        seq_lengths: Any | None = None,
        entropy: Any | None = None,
        surprisal: Any | None = None,
        probe: Any | None = None,
        difficulty: Any | None = None,
        adapters: Any | None = None,
    ) -> Plan:
        """Plans a batch for prefill.

        Args:
            token_ids: int64 ids: a list of 1-D arrays (ragged batch), a 2-D array [B, T], or
                one flat 1-D array with ``seq_lengths``.
            seq_lengths: lengths of the sequences in a flat ``token_ids`` (default: one
                sequence).
            entropy, surprisal: float32 per-token signals in [0, 1], laid out like
                ``token_ids`` (see :func:`chunkwise.entropy_from_logits`).
            probe: float32 per-token non-negative probe values (e.g. ``||A x||``).
            difficulty: float32 per-token difficulty in [0, 1]; replaces all signals.
            adapters: int32 adapter id per sequence (default 0 for all).
        """
        ids, inferred = _flat("token_ids", token_ids, np.int64, None)
        if seq_lengths is not None:
            lens = _checked_array("seq_lengths", _as_numpy(seq_lengths), np.dtype(np.int64))
            lens = np.ascontiguousarray(lens.reshape(-1))
        elif inferred is not None:
            lens = inferred
        else:
            lens = np.array([len(ids)], dtype=np.int64)
        kwargs: dict[str, Any] = {}
        for name, value in (
            ("entropy", entropy),
            ("surprisal", surprisal),
            ("probe", probe),
            ("difficulty", difficulty),
        ):
            if value is not None:
                kwargs[name] = _flat(name, value, np.float32, None)[0]
        if adapters is not None:
            kwargs["adapters"] = np.ascontiguousarray(
                _checked_array("adapters", _as_numpy(adapters), np.dtype(np.int32)).reshape(-1)
            )
        arrays = self._core.plan(ids, lens, **kwargs)
        return Plan.from_core(arrays, tuple(self.config.rungs))

    def decoder(self, batch_size: int = 1, thresholds: Any | None = None) -> _core.DecodeBatch:
        """Streaming decode state for ``batch_size`` sequences.

        ``thresholds`` default to the config's; pass ``plan.thresholds`` to decode with the
        thresholds a quantile / target plan resolved.
        """
        th = None if thresholds is None else [float(t) for t in np.asarray(thresholds).reshape(-1)]
        return _core.DecodeBatch(self._core, batch_size, th)
