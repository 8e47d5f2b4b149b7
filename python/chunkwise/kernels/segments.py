"""Kernel metadata: the segment arrays the LoRA kernels read, built on the host and moved to the
device once per forward (prefill) or written in place every step (decode)."""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import torch

from ..errors import InputError

__all__ = [
    "SEGMENT_ARRAYS",
    "DecodeSegments",
    "KernelSegments",
    "SegmentArrays",
    "StepDecisions",
    "TokenArrays",
    "check_segments",
]

#: The arrays of :class:`SegmentArrays`, by name, in the kernels' argument order.
SEGMENT_ARRAYS: tuple[str, ...] = (
    "seg_offsets",
    "seg_rank",
    "seg_scale",
    "seg_adapter",
    "token_lo",
    "gate_lo",
    "gate_hi",
    "rows",
)
_INT = ("seg_offsets", "seg_rank", "seg_adapter", "token_lo")
_FLOAT = ("seg_scale", "gate_lo", "gate_hi")


def _host(name: str, value: Any, dtype: type) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().to("cpu").numpy()
    arr = np.asarray(value)
    if arr.dtype != np.dtype(dtype) or arr.ndim != 1:
        raise InputError(f"{name}: must be a 1-d {np.dtype(dtype)} array, got {arr.dtype} {arr.shape}", name)
    return arr


class SegmentArrays(Protocol):
    """The metadata the kernels read, by the kernels' argument names (tensors or arrays):
    :class:`KernelSegments` (a prefill forward) and :class:`DecodeSegments` (a decode step).

    Per segment s: ``seg_offsets`` [S+1] (int32 token offsets), ``seg_rank``, ``seg_adapter``
    (int32; adapter < 0: none), ``seg_scale`` (float32). Per planned token t: ``token_lo``
    (int32), ``gate_lo``, ``gate_hi`` (float32), and ``rows`` (int32 row of x2 / y2, or None:
    row t).
    """

    @property
    def seg_offsets(self) -> Any: ...
    @property
    def seg_rank(self) -> Any: ...
    @property
    def seg_scale(self) -> Any: ...
    @property
    def seg_adapter(self) -> Any: ...
    @property
    def token_lo(self) -> Any: ...
    @property
    def gate_lo(self) -> Any: ...
    @property
    def gate_hi(self) -> Any: ...
    @property
    def rows(self) -> Any | None: ...


def check_segments(
    segments: SegmentArrays, *, n_adapters: int, n_rows: int | None = None
) -> dict[str, np.ndarray]:
    """Validates kernel metadata (tensors or arrays, on any device) and returns it as numpy.

    Raises :class:`~chunkwise.InputError` naming the array: wrong dtype (int32 / float32) or
    length, offsets that decrease or leave [0, N], a negative rank, an adapter id >= n_adapters
    (negative ids mean "no adapter"), non-finite gates or scales, rows outside [0, n_rows) or
    repeated. This synchronises with the device; the CUDA path never calls it by itself.
    """
    out = {n: _host(n, getattr(segments, n), np.int32) for n in _INT}
    out |= {n: _host(n, getattr(segments, n), np.float32) for n in _FLOAT}
    rows = segments.rows
    n_seg, n_tok = len(out["seg_rank"]), len(out["token_lo"])
    for name, length in (("seg_offsets", n_seg + 1), ("seg_scale", n_seg), ("seg_adapter", n_seg)):
        if len(out[name]) != length:
            raise InputError(f"{name}: has {len(out[name])} entries, expected {length}", name)
    for name in ("gate_lo", "gate_hi"):
        if len(out[name]) != n_tok:
            raise InputError(f"{name}: has {len(out[name])} entries, token_lo {n_tok}", name)
    off = out["seg_offsets"]
    if off[0] < 0 or off[-1] > n_tok or np.any(np.diff(off) < 0):
        raise InputError(f"seg_offsets: must be non-decreasing within [0, {n_tok}]", "seg_offsets")
    if np.any(out["seg_rank"] < 0):
        raise InputError("seg_rank: ranks must be >= 0", "seg_rank")
    if n_seg and int(out["seg_adapter"].max()) >= n_adapters:
        raise InputError(
            f"seg_adapter: id {int(out['seg_adapter'].max())} but only {n_adapters} adapters", "seg_adapter"
        )
    for name in _FLOAT:
        if not np.all(np.isfinite(out[name])):
            raise InputError(f"{name}: must be finite", name)
    if rows is not None:
        r = _host("rows", rows, np.int32)
        if len(r) != n_tok:
            raise InputError(f"rows: has {len(r)} entries, token_lo {n_tok}", "rows")
        limit = n_rows if n_rows is not None else n_tok
        if len(r) and (r.min() < 0 or r.max() >= limit or len(np.unique(r)) != len(r)):
            raise InputError(f"rows: must be distinct rows in [0, {limit})", "rows")
        out["rows"] = r
    return out


@dataclasses.dataclass(frozen=True)
class TokenArrays:
    """Per planned token of one forward (host arrays, one entry per token): the rank it runs at,
    its cross-fade band (``lo``, ``gate_lo``, ``gate_hi``), its rung ``scale``, its ``adapter``
    and its row of the flattened forward input of ``n_rows`` rows. What both the torch path
    (:class:`chunkwise.nn.TokenPlan`) and the kernels (:class:`KernelSegments`) are built from.
    """

    rank: np.ndarray
    lo: np.ndarray
    gate_lo: np.ndarray
    gate_hi: np.ndarray
    scale: np.ndarray
    adapter: np.ndarray
    rows: np.ndarray
    n_rows: int

    def __post_init__(self) -> None:
        n = len(self.rank)
        names = ("lo", "gate_lo", "gate_hi", "scale", "adapter", "rows")
        bad = [name for name in names if len(getattr(self, name)) != n]
        if bad:
            raise InputError(f"{bad[0]}: must have one entry per planned token ({n})", bad[0])


class StepDecisions(Protocol):
    """What a decode step decided per sequence (a :class:`chunkwise.DecodeBatch` has these)."""

    rank: np.ndarray
    lo: np.ndarray
    gate_lo: np.ndarray
    gate_hi: np.ndarray
    scale: np.ndarray


@dataclasses.dataclass(frozen=True)
class KernelSegments:
    """The metadata of one forward on one device, named like the kernels' arguments.

    ``lora_delta_cuda(x2, y2, factors, segments)`` (or ``lora_delta_reference``).
    ``rows`` maps planned token t to its row of the flattened forward (None: row t).
    """

    seg_offsets: torch.Tensor
    seg_rank: torch.Tensor
    seg_scale: torch.Tensor
    seg_adapter: torch.Tensor
    token_lo: torch.Tensor
    gate_lo: torch.Tensor
    gate_hi: torch.Tensor
    rows: torch.Tensor | None
    n_rows: int

    @property
    def n_segments(self) -> int:
        return int(self.seg_rank.numel())

    @property
    def n_tokens(self) -> int:
        return int(self.token_lo.numel())

    @classmethod
    def from_arrays(
        cls,
        *,
        seg_offsets: np.ndarray,
        seg_rank: np.ndarray,
        seg_scale: np.ndarray,
        seg_adapter: np.ndarray,
        token_lo: np.ndarray,
        gate_lo: np.ndarray,
        gate_hi: np.ndarray,
        rows: np.ndarray | None,
        n_rows: int,
        device: Any = "cpu",
    ) -> KernelSegments:
        """Moves host arrays to ``device`` (two copies: the int32 and the float32 arrays packed)."""
        n_tok = len(token_lo)
        identity = rows is None or (n_tok == n_rows and np.array_equal(rows, np.arange(n_rows)))
        ints = [seg_offsets, seg_rank, seg_adapter, token_lo] + ([] if identity else [rows])
        floats = [seg_scale, gate_lo, gate_hi]
        int_dev = torch.from_numpy(np.concatenate([np.asarray(a, np.int32).reshape(-1) for a in ints])).to(
            device
        )
        flt_dev = torch.from_numpy(
            np.concatenate([np.asarray(a, np.float32).reshape(-1) for a in floats])
        ).to(device)
        iv = int_dev.split([len(np.asarray(a).reshape(-1)) for a in ints])
        fv = flt_dev.split([len(np.asarray(a).reshape(-1)) for a in floats])
        return cls(iv[0], iv[1], fv[0], iv[2], iv[3], fv[1], fv[2], None if identity else iv[4], int(n_rows))

    @classmethod
    def from_token_arrays(cls, tokens: TokenArrays, device: Any = "cpu") -> KernelSegments:
        """Segments from per-token arrays: maximal runs of tokens with equal rank, adapter and
        scale. Token i sits at row ``tokens.rows[i]``."""
        rank = np.asarray(tokens.rank, np.int32).reshape(-1)
        adapter = np.asarray(tokens.adapter, np.int32).reshape(-1)
        sc = np.asarray(tokens.scale, np.float32).reshape(-1)
        n = len(rank)
        change = (
            np.flatnonzero((rank[1:] != rank[:-1]) | (adapter[1:] != adapter[:-1]) | (sc[1:] != sc[:-1])) + 1
        )
        offsets = np.concatenate([[0], change, [n]]).astype(np.int32) if n else np.zeros(1, np.int32)
        starts = offsets[:-1]
        return cls.from_arrays(
            seg_offsets=offsets,
            seg_rank=rank[starts],
            seg_scale=sc[starts],
            seg_adapter=adapter[starts],
            token_lo=np.asarray(tokens.lo, np.int32),
            gate_lo=np.asarray(tokens.gate_lo, np.float32),
            gate_hi=np.asarray(tokens.gate_hi, np.float32),
            rows=np.asarray(tokens.rows),
            n_rows=tokens.n_rows,
            device=device,
        )

    @classmethod
    def from_plan(
        cls,
        plan: Any,
        *,
        adapters: Any | None = None,
        rows: np.ndarray | None = None,
        n_rows: int | None = None,
        device: Any = "cpu",
    ) -> KernelSegments:
        """The plan's own segments; ``adapters`` (one id per sequence) replaces ``seg_adapter``."""
        seg_adapter = np.asarray(plan.seg_adapter, np.int32)
        if adapters is not None:
            per_seq = np.asarray(adapters, np.int32).reshape(-1)
            if len(per_seq) != plan.n_seqs:
                raise InputError(f"adapters: {len(per_seq)} ids for {plan.n_seqs} sequences", "adapters")
            seq_of_seg = np.searchsorted(plan.seq_offsets, plan.seg_offsets[:-1], side="right") - 1
            seg_adapter = per_seq[seq_of_seg]
        return cls.from_arrays(
            seg_offsets=plan.seg_offsets,
            seg_rank=plan.seg_rank,
            seg_scale=plan.seg_scale,
            seg_adapter=seg_adapter,
            token_lo=plan.token_lo,
            gate_lo=plan.gate_lo,
            gate_hi=plan.gate_hi,
            rows=rows,
            n_rows=plan.n_tokens if n_rows is None else n_rows,
            device=device,
        )


class DecodeSegments:
    """Fixed-size metadata of a decode step: sequence i is token i and segment i.

    The device buffers are allocated once; :meth:`update` writes a step's decisions into them
    with one host-to-device copy on the current stream (no synchronisation), so a captured CUDA
    graph that reads them replays with the new values. ``adapters`` (one id per sequence, < 0:
    none) may be changed with :meth:`update` too.
    """

    def __init__(self, batch_size: int, adapters: Any | None = None, device: Any = "cuda") -> None:
        b = int(batch_size)
        if b < 1:
            raise InputError(f"batch_size: must be >= 1, got {batch_size}", "batch_size")
        self.batch_size = b
        # rows: rank, lo, adapter, gate_lo, gate_hi, scale (the last three as float32 bits)
        self._host = np.zeros((6, b), np.int32)
        self._host[3:].view(np.float32)[:] = 1.0
        self._host[2] = 0 if adapters is None else self._adapters(adapters)
        self._dev = torch.from_numpy(self._host.copy()).to(device)
        self.seg_offsets = torch.arange(b + 1, dtype=torch.int32).to(device)
        self.seg_rank, self.token_lo, self.seg_adapter = self._dev[0], self._dev[1], self._dev[2]
        self.gate_lo = self._dev[3].view(torch.float32)
        self.gate_hi = self._dev[4].view(torch.float32)
        self.seg_scale = self._dev[5].view(torch.float32)
        self.rows: torch.Tensor | None = None  # x2's row i is sequence i

    def _adapters(self, adapters: Any) -> np.ndarray:
        a = np.asarray(adapters).reshape(-1)
        if len(a) != self.batch_size or a.dtype.kind not in "iu":
            raise InputError(f"adapters: need {self.batch_size} integer ids", "adapters")
        return a.astype(np.int32)

    def update(self, decoder: StepDecisions, adapters: npt.ArrayLike | None = None) -> None:
        """Copies a step's ``rank, lo, gate_lo, gate_hi, scale`` (a ``DecodeBatch`` or anything
        with those arrays) to the device."""
        for i, name in ((0, "rank"), (1, "lo")):
            self._host[i] = np.asarray(getattr(decoder, name), np.int32).reshape(-1)
        for i, name in ((3, "gate_lo"), (4, "gate_hi"), (5, "scale")):
            self._host[i].view(np.float32)[:] = np.asarray(getattr(decoder, name), np.float32).reshape(-1)
        if adapters is not None:
            self._host[2] = self._adapters(adapters)
        self._dev.copy_(torch.from_numpy(self._host), non_blocking=self._dev.is_cuda)
