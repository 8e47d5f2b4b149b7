"""Keys and values of one cache layer held at two precisions: full, and int8 with a scale per
token and head.

A :class:`MixedStore` keeps the slots of a [batch, heads, slots, head_dim] cache layer in two
tensors: ``full`` (the model's dtype) and ``q`` (int8, symmetric, ``scale = max|x| / 127`` per
token and head, float32 scales). ``where`` says, per row and slot, which store holds the slot
and at which index, so each row may hold a different mix; rows with fewer entries in a store
are padded there (counted in :attr:`nbytes`). :meth:`read` returns the slots in slot order with
the int8 ones dequantized: what attention reads (a transient of one layer).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["INT8_SCALE_BYTES", "MixedStore", "dequantize", "full_slots", "int8_bytes_per_token", "quantize"]

#: Bytes of one scale (float32) per token and head, for each of keys and values.
INT8_SCALE_BYTES = 4
#: Runs of slots of one precision up to which a read copies slice by slice (beyond: index copies).
MAX_RUNS = 32


def int8_bytes_per_token(layers: int, kv_heads: int, head_dim: int) -> int:
    """Bytes of one token's keys + values over all layers in int8, scales included."""
    return 2 * layers * kv_heads * (head_dim + INT8_SCALE_BYTES)


def full_slots(budget_bytes: int, slots: int, bytes_per_token: int, int8_bytes: int) -> int:
    """How many of ``slots`` held tokens fit at full precision (``bytes_per_token`` each) in
    ``budget_bytes`` when the others are int8 (``int8_bytes`` each)."""
    room = budget_bytes - slots * int8_bytes
    return max(0, min(slots, room // max(1, bytes_per_token - int8_bytes)))


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 of ``x`` [..., d] with one float32 scale per vector: ``(q, scale)``,
    ``x ≈ q * scale``."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(xf / scale).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``q * scale`` in ``dtype``."""
    return (q.float() * scale).to(dtype)


def _expand(index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[batch, n] slot indices as a gather index over ``like`` [batch, heads, *, d]."""
    b, h, _, d = like.shape
    return index[:, None, :, None].expand(b, h, index.shape[1], d)


def _compact(used: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Per row the store entries still used, in the order of the slots using them: a
    [batch, width] gather index of them (so the store ends up in slot order), padded with each
    row's last (or 0), and per row the map old -> new."""
    width = max((len(u) for u in used), default=0)
    index = np.zeros((len(used), width), np.int64)
    remap = []
    for b, u in enumerate(used):
        index[b, : len(u)] = u
        if len(u):
            index[b, len(u) :] = u[-1]
        m = np.full(int(u.max()) + 1 if len(u) else 0, -1, np.int64)
        m[u] = np.arange(len(u))
        remap.append(m)
    return index, remap


class MixedStore:
    """One layer's keys and values, each slot at full precision or in int8 (module docs)."""

    def __init__(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        self.dtype = key_states.dtype
        self.full_k = key_states[..., :0, :]
        self.full_v = value_states[..., :0, :]
        dev = key_states.device
        self.q_k = torch.zeros((b, h, 0, d), dtype=torch.int8, device=dev)
        self.q_v = torch.zeros((b, h, 0, value_states.shape[-1]), dtype=torch.int8, device=dev)
        self.s_k = torch.zeros((b, h, 0, 1), dtype=torch.float32, device=dev)
        self.s_v = torch.zeros((b, h, 0, 1), dtype=torch.float32, device=dev)
        #: Per row and slot: held in int8 (else full), and the index in that store.
        self.is_q = np.zeros((b, 0), bool)
        self.index = np.zeros((b, 0), np.int64)

    @property
    def slots(self) -> int:
        return int(self.is_q.shape[1])

    @property
    def int8_slots(self) -> np.ndarray:
        """Slots held in int8, per row."""
        return self.is_q.sum(axis=1)

    @property
    def nbytes(self) -> int:
        """Bytes the stores hold (both precisions, scales and row padding included)."""
        parts = (self.full_k, self.full_v, self.q_k, self.q_v, self.s_k, self.s_v)
        return sum(t.numel() * t.element_size() for t in parts)

    def append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """New slots at the end, at full precision."""
        n, width = key_states.shape[-2], self.full_k.shape[-2]
        self.full_k = torch.cat([self.full_k, key_states], dim=-2)
        self.full_v = torch.cat([self.full_v, value_states], dim=-2)
        batch = self.is_q.shape[0]
        self.is_q = np.concatenate([self.is_q, np.zeros((batch, n), bool)], axis=1)
        new = np.broadcast_to(np.arange(width, width + n), (batch, n))
        self.index = np.concatenate([self.index, new], axis=1)

    def _in_slot_order(self) -> bool:
        """Whether every row holds the same layout with both stores unpadded and in slot order
        (one sequence, or rows that moved alike): then a read is two index copies."""
        is_q, index = self.is_q, self.index
        if not (is_q == is_q[:1]).all() or not (index == index[:1]).all():
            return False
        q_row = is_q[0]
        n_q = int(q_row.sum())
        return (
            n_q == self.q_k.shape[-2]
            and len(q_row) - n_q == self.full_k.shape[-2]
            and np.array_equal(index[0][q_row], np.arange(n_q))
            and np.array_equal(index[0][~q_row], np.arange(len(q_row) - n_q))
        )

    def read(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of every slot in slot order, int8 slots dequantized."""
        if not self.is_q.any():
            return self._full_read()
        if self._in_slot_order():
            return self._read_in_order(self.full_k, self.q_k, self.s_k), self._read_in_order(
                self.full_v, self.q_v, self.s_v
            )
        width = self.full_k.shape[-2]
        flat = torch.from_numpy(self.index + width * self.is_q).to(self.full_k.device)
        keys = torch.cat([self.full_k, dequantize(self.q_k, self.s_k, self.dtype)], dim=-2)
        values = torch.cat([self.full_v, dequantize(self.q_v, self.s_v, self.dtype)], dim=-2)
        return torch.gather(keys, 2, _expand(flat, keys)), torch.gather(values, 2, _expand(flat, values))

    def _read_in_order(self, full: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """One of keys / values when the stores are in slot order (see :meth:`_in_slot_order`):
        each run of consecutive slots of one precision is one slice copy (or one
        dequantizing multiply into place), or, when the runs are many, two index copies."""
        b, h, _, d = full.shape
        out = torch.empty((b, h, self.slots, d), dtype=self.dtype, device=full.device)
        is_q = self.is_q[0]
        edges = np.flatnonzero(np.diff(is_q.astype(np.int8))) + 1
        starts = np.concatenate([[0], edges])
        if len(starts) > MAX_RUNS:
            q_pos = torch.from_numpy(np.flatnonzero(is_q)).to(full.device)
            f_pos = torch.from_numpy(np.flatnonzero(~is_q)).to(full.device)
            out.index_copy_(2, f_pos, full)
            out.index_copy_(2, q_pos, dequantize(q, scale, self.dtype))
            return out
        stops = np.concatenate([edges, [self.slots]])
        n_q = n_f = 0
        for start, stop in zip(starts.tolist(), stops.tolist(), strict=True):
            n = stop - start
            if is_q[start]:
                torch.mul(q[..., n_q : n_q + n, :], scale[..., n_q : n_q + n, :], out=out[..., start:stop, :])
                n_q += n
            else:
                out[..., start:stop, :] = full[..., n_f : n_f + n, :]
                n_f += n
        return out

    def _full_read(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every slot at full precision: the store itself when it is already in slot order."""
        contiguous = np.array_equal(self.index, np.broadcast_to(np.arange(self.slots), self.index.shape))
        if contiguous and self.full_k.shape[-2] == self.slots:
            return self.full_k, self.full_v
        flat = torch.from_numpy(self.index).to(self.full_k.device)
        return (
            torch.gather(self.full_k, 2, _expand(flat, self.full_k)),
            torch.gather(self.full_v, 2, _expand(flat, self.full_v)),
        )

    def keep(self, keep: np.ndarray) -> None:
        """Keeps slots ``keep`` [batch, S'] (per row, ascending) and drops the entries no
        slot uses any more."""
        rows = np.arange(keep.shape[0])[:, None]
        self.is_q, self.index = self.is_q[rows, keep], self.index[rows, keep]
        self._compact()

    def demote(self, to_int8: np.ndarray) -> int:
        """Moves the full-precision slots marked in ``to_int8`` [batch, S] to int8; returns how
        many moved (all rows)."""
        move = to_int8 & ~self.is_q
        n = int(move.sum())
        if n == 0:
            return 0
        counts = move.sum(axis=1)
        width = int(counts.max())
        src = np.zeros((move.shape[0], width), np.int64)
        for b in range(move.shape[0]):
            cols = np.flatnonzero(move[b])
            src[b, : len(cols)] = self.index[b, cols]
            if len(cols):
                src[b, len(cols) :] = self.index[b, cols[-1]]
        idx = torch.from_numpy(src).to(self.full_k.device)
        qk, sk = quantize(torch.gather(self.full_k, 2, _expand(idx, self.full_k)))
        qv, sv = quantize(torch.gather(self.full_v, 2, _expand(idx, self.full_v)))
        base = self.q_k.shape[-2]
        self.q_k, self.s_k = torch.cat([self.q_k, qk], dim=-2), torch.cat([self.s_k, sk], dim=-2)
        self.q_v, self.s_v = torch.cat([self.q_v, qv], dim=-2), torch.cat([self.s_v, sv], dim=-2)
        for b in range(move.shape[0]):
            cols = np.flatnonzero(move[b])
            self.index[b, cols] = base + np.arange(len(cols))
        self.is_q = self.is_q | move
        self._compact()
        return n

    def _compact(self) -> None:
        """Drops store entries no slot uses (evicted slots, demoted full entries, padding)."""
        for in_q in (False, True):
            used = [self.index[b][self.is_q[b] == in_q] for b in range(self.is_q.shape[0])]
            index, remap = _compact(used)
            store_len = (self.q_k if in_q else self.full_k).shape[-2]
            if index.shape[1] == store_len and all(
                np.array_equal(index[b, : len(u)], np.arange(len(u))) for b, u in enumerate(used)
            ):
                continue  # nothing to drop
            idx = torch.from_numpy(index).to(self.full_k.device)
            if in_q:
                self.q_k = torch.gather(self.q_k, 2, _expand(idx, self.q_k))
                self.q_v = torch.gather(self.q_v, 2, _expand(idx, self.q_v))
                self.s_k = torch.gather(self.s_k, 2, _expand(idx, self.s_k))
                self.s_v = torch.gather(self.s_v, 2, _expand(idx, self.s_v))
            else:
                self.full_k = torch.gather(self.full_k, 2, _expand(idx, self.full_k))
                self.full_v = torch.gather(self.full_v, 2, _expand(idx, self.full_v))
            for b in range(self.is_q.shape[0]):
                sel = self.is_q[b] == in_q
                self.index[b, sel] = remap[b][self.index[b, sel]]
