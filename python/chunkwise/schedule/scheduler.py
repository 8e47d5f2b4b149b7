"""The :class:`Scheduler`: plans prefill batches and creates decode state, via the Rust core."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from .. import _core
from ..errors import ConfigError, InputError
from .config import SchedulerConfig
from .plan import Plan

__all__ = ["Scheduler", "DecodeBatch"]

DecodeBatch = _core.DecodeBatch


def _as_numpy(x: Any, name: str) -> Any:
    """Torch tensors become numpy views (CPU only); everything else passes through."""
    if type(x).__module__.startswith("torch"):
        if x.device.type != "cpu":
            raise InputError(
                f"{name}: tensor is on {x.device}; the scheduler reads CPU arrays (call .cpu() first)", name
            )
        try:
            return x.detach().numpy()
        except TypeError as e:  # e.g. bfloat16 has no numpy dtype
            raise InputError(f"{name}: tensor of {x.dtype} has no numpy view ({e})", name) from None
    return x


def _flat(name: str, value: Any, dtype: type, lengths: np.ndarray | None) -> tuple[np.ndarray, Any]:
    """Flattens one per-token input. Returns (flat array, lengths or None if not inferable).

    numpy arrays (and tensors) must already have ``dtype``: they are used without copying when
    1-D or C-contiguous 2-D. Python lists of numbers are converted. A list of per-sequence
    arrays is concatenated (one copy: a ragged batch cannot be a view).
    """
    value = _as_numpy(value, name)
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
            part = _as_numpy(part, name)
            if isinstance(part, np.ndarray):
                if part.dtype != want:
                    raise InputError(f"{name}[{i}]: must have dtype {want}, got {part.dtype}", name)
                arr = part  # already the dtype: every value fits, nothing to check or convert
            else:
                arr = _checked_array(f"{name}[{i}]", part, want, param=name)
            if arr.ndim != 1:
                raise InputError(f"{name}[{i}]: must be 1-d, got {arr.ndim}-d", name)
            parts.append(arr)
        return np.concatenate(parts), np.array([len(p) for p in parts], dtype=np.int64)
    raise InputError(f"{name}: expected an array or a list of arrays, got {type(value).__name__}", name)


def _checked_array(label: str, value: Any, dtype: np.dtype, param: str | None = None) -> np.ndarray:
    """Converts numbers to ``dtype``, refusing anything lossy (floats to ints, ints that wrap)."""
    param = param or label
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError, OverflowError) as e:
        raise InputError(f"{label}: not an array of numbers ({e})", param) from None
    if arr.dtype.kind not in "iufb" or (dtype.kind in "iu" and arr.dtype.kind == "f"):
        raise InputError(f"{label}: must hold {dtype} values, got {arr.dtype}", param)
    if dtype.kind in "iu" and arr.size:
        info = np.iinfo(dtype)
        lo, hi = int(arr.min()), int(arr.max())
        if lo < info.min or hi > info.max:
            raise InputError(f"{label}: values [{lo}, {hi}] do not fit {dtype}", param)
    return arr.astype(dtype, copy=False)


class Scheduler:
    """Turns token ids (and optional difficulty signals) into a :class:`Plan`.

    Thread-safe: planning releases the GIL and shares no mutable state, so several threads can
    plan at once. ``unigram_counts`` (one count per vocabulary id) enables the rarity signal.
    """

    def __init__(self, config: SchedulerConfig | None = None, unigram_counts: Any | None = None) -> None:
        if config is not None and not isinstance(config, SchedulerConfig):
            raise ConfigError(
                f"config: expected a chunkwise.SchedulerConfig, got {type(config).__name__} "
                "(build one with SchedulerConfig(**fields))",
                "config",
            )
        self.config = config if config is not None else SchedulerConfig()
        counts = None
        if unigram_counts is not None:
            counts = _checked_array(
                "unigram_counts", _as_numpy(unigram_counts, "unigram_counts"), np.dtype(np.float64)
            )
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
            if inferred is not None:
                raise InputError(
                    "seq_lengths: only for a flat token_ids array (a list or 2-d array has its own)",
                    "seq_lengths",
                )
            lens = _checked_array("seq_lengths", _as_numpy(seq_lengths, "seq_lengths"), np.dtype(np.int64))
            lens = np.ascontiguousarray(lens.reshape(-1))
        elif inferred is not None:
            lens = inferred
        else:
            lens = np.array([len(ids)], dtype=np.int64)
        signals = {"entropy": entropy, "surprisal": surprisal, "probe": probe}
        if difficulty is not None and any(v is not None for v in signals.values()):
            raise InputError(
                "difficulty: replaces the signals; pass either difficulty or signals", "difficulty"
            )
        kwargs: dict[str, Any] = {}
        for name, value in (*signals.items(), ("difficulty", difficulty)):
            if value is not None:
                flat, per_seq = _flat(name, value, np.float32, None)
                if per_seq is not None and not np.array_equal(per_seq, lens):
                    raise InputError(
                        f"{name}: per-sequence lengths {per_seq.tolist()} differ from the token_ids' "
                        f"{lens.tolist()}",
                        name,
                    )
                kwargs[name] = flat
        if adapters is not None:
            adapter_ids = _checked_array("adapters", _as_numpy(adapters, "adapters"), np.dtype(np.int32))
            kwargs["adapters"] = np.ascontiguousarray(adapter_ids.reshape(-1))
        arrays = self._core.plan(ids, lens, **kwargs)
        return Plan.from_core(arrays, tuple(self.config.rungs))

    def decoder(self, batch_size: int = 1, thresholds: npt.ArrayLike | None = None) -> _core.DecodeBatch:
        """Streaming decode state for ``batch_size`` sequences.

        ``thresholds`` default to the config's; pass ``plan.thresholds`` to decode with the
        thresholds a quantile / target plan resolved.
        """
        th = None
        if thresholds is not None:
            arr = _checked_array("thresholds", _as_numpy(thresholds, "thresholds"), np.dtype(np.float64))
            th = [float(t) for t in arr.reshape(-1)]
        return _core.DecodeBatch(self._core, batch_size, th)  # the core checks batch_size
