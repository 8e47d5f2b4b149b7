"""A ``transformers`` :class:`~transformers.Cache` that evicts by a :class:`KvPolicy`.

Keys are cached after the rotary embedding, so evicting a token never changes the others'
positions; position ids come from the 2-D attention mask (``generate`` and
:func:`chunkwise.generate` both derive them from it), not from the cache length.

Masks stay right without custom mask code: every sequence holds the same number of slots
``S``, kept in column order, and a sequence keeps padding slots only while it has fewer than
``S`` real tokens (then exactly ``S - real`` of them, in front). So the slots line up with the
last ``S`` columns of the 2-D padding mask, which is what ``get_mask_sizes`` reports
(docs/architecture.md §6). Works with ``model.generate(..., past_key_values=cache)`` and in
hand-written loops; batches must be left-padded (pass ``attention_mask`` to the constructor
when they are padded).
"""

from __future__ import annotations

import threading
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .. import _core
from ..errors import ConfigError, InputError, StateError
from .int8 import MixedStore, full_slots, int8_bytes_per_token
from .policy import KvPolicy

__all__ = ["PolicyCache", "active_cache", "left_padding"]

_ACTIVE = threading.local()

#: Slots a layer's key / value buffer grows by beyond what a forward needs. A decode step then
#: writes its token into free room instead of copying every held slot into a new tensor (what
#: ``torch.cat`` does, and DynamicCache): at 2048 held slots of SmolLM2 that copy was ~94 MB
#: read and written per step. The room costs at most this many slots per layer.
GROW_SLOTS = 256


def active_cache() -> tuple[PolicyCache, int] | None:
    """The policy cache (and layer) whose ``update`` ran last on this thread, for attention
    functions that report scores to it (see :mod:`chunkwise.kv.attention`)."""
    return getattr(_ACTIVE, "entry", None)


def left_padding(attention_mask: torch.Tensor) -> list[int]:
    """Left padding per row of a 2-D 0/1 mask; raises :class:`InputError` for anything but
    left padding (``tokenizer.padding_side = "left"``)."""
    if not isinstance(attention_mask, torch.Tensor):
        raise InputError(
            f"attention_mask: must be a torch.Tensor [batch, seq], got {type(attention_mask).__name__}",
            "attention_mask",
        )
    if attention_mask.ndim != 2:
        raise InputError(
            f"attention_mask: must be 2-d [batch, seq], got {tuple(attention_mask.shape)}", "attention_mask"
        )
    raw = attention_mask.detach().to("cpu")
    if bool(((raw != 0) & (raw != 1)).any()):
        raise InputError("attention_mask: only 0 (padding) and 1 (token) mean anything", "attention_mask")
    mask = raw.numpy().astype(bool)
    pads = []
    for b, row in enumerate(mask):
        n_pad = int(np.argmax(row)) if row.any() else len(row)
        if not row[n_pad:].all():
            raise InputError(
                f"attention_mask: row {b} is not left-padded (padding after a real token); "
                "use tokenizer.padding_side = 'left'",
                "attention_mask",
            )
        pads.append(n_pad)
    return pads


class PolicyLayer(CacheLayerMixin):
    """One layer's keys and values; sizes and positions come from the owning cache's ledger."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, owner: PolicyCache) -> None:
        super().__init__()
        self.owner = owner
        self.mixed: MixedStore | None = None
        #: [batch, heads, capacity, dim] buffers whose first slots ``keys`` / ``values`` view.
        self.key_buffer: torch.Tensor | None = None
        self.value_buffer: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.keys = key_states[..., :0, :]
        self.values = value_states[..., :0, :]
        #: With an int8 policy, the slots at both precisions (``keys`` / ``values`` stay empty).
        self.mixed = MixedStore(key_states, value_states) if self.owner.policy.int8 else None
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.mixed is not None:
            self.mixed.append(key_states, value_states)
            return self.mixed.read()
        assert self.keys is not None and self.values is not None  # set by lazy_initialization
        n, q = self.keys.shape[-2], key_states.shape[-2]
        if not self._views_buffers(n + q, key_states):
            self._regrow(n + q, key_states, value_states)
        kb, vb = self.key_buffer, self.value_buffer
        assert kb is not None and vb is not None  # _regrow made them
        kb[..., n : n + q, :].copy_(key_states)
        vb[..., n : n + q, :].copy_(value_states)
        self.keys, self.values = kb[..., : n + q, :], vb[..., : n + q, :]
        return self.keys, self.values

    def _views_buffers(self, needed: int, like: torch.Tensor) -> bool:
        """Whether ``keys`` / ``values`` are still the leading slots of the buffers and these
        have room for ``needed`` slots of tensors like ``like`` (something else, e.g.
        transformers' offloading, may have replaced them)."""
        kb, vb, k, v = self.key_buffer, self.value_buffer, self.keys, self.values
        return (
            kb is not None
            and vb is not None
            and k is not None
            and v is not None
            and kb.shape[-2] >= needed
            and kb.shape[:2] == like.shape[:2]
            and kb.dtype == like.dtype
            and kb.device == like.device
            and k.data_ptr() == kb.data_ptr()
            and v.data_ptr() == vb.data_ptr()
        )

    def _regrow(self, needed: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """New buffers with room for ``needed`` + :data:`GROW_SLOTS` slots, the held ones copied."""
        assert self.keys is not None and self.values is not None
        n = self.keys.shape[-2]
        b, h, _, dk = key_states.shape
        dv = value_states.shape[-1]
        kb = key_states.new_empty((b, h, needed + GROW_SLOTS, dk))
        vb = value_states.new_empty((b, h, needed + GROW_SLOTS, dv))
        kb[..., :n, :].copy_(self.keys)
        vb[..., :n, :].copy_(self.values)
        self.key_buffer, self.value_buffer = kb, vb
        self.keys, self.values = kb[..., :n, :], vb[..., :n, :]

    @property
    def nbytes(self) -> int:
        """Bytes this layer's keys and values hold."""
        if self.mixed is not None:
            return self.mixed.nbytes
        if self.keys is None or self.values is None:
            return 0
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()

    def gather(self, index: torch.Tensor | None, keep: slice | None) -> None:
        """Keeps slots ``index`` ([batch, S] per row) or the contiguous ``keep`` for all rows."""
        if not self.is_initialized:
            return
        if self.mixed is not None:
            if index is None:
                assert keep is not None  # one of index / keep is given
                index = torch.arange(self.mixed.slots)[keep].expand(self.mixed.is_q.shape[0], -1)
            self.mixed.keep(index.cpu().numpy())
            return
        assert self.keys is not None and self.values is not None  # set by lazy_initialization
        if keep is not None:
            kept_k, kept_v = self.keys[..., keep, :].clone(), self.values[..., keep, :].clone()
        else:
            assert index is not None  # one of index / keep is given
            b, h, _, d = self.keys.shape
            idx = index.to(self.keys.device)[:, None, :, None].expand(b, h, index.shape[1], d)
            kept_k = torch.gather(self.keys, 2, idx)
            kept_v = torch.gather(self.values, 2, idx)
        n = kept_k.shape[-2]
        if self._views_buffers(n, kept_k):  # the kept slots move to the front of the buffers
            kb, vb = self.key_buffer, self.value_buffer
            assert kb is not None and vb is not None
            kb[..., :n, :].copy_(kept_k)
            vb[..., :n, :].copy_(kept_v)
            self.keys, self.values = kb[..., :n, :], vb[..., :n, :]
        else:
            self.keys, self.values = kept_k, kept_v

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.mask_sizes(query_length)

    def get_seq_length(self) -> int:
        return self.owner.seen

    def get_max_length(self) -> int:
        return -1

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise StateError("PolicyCache: beam search is not supported (the books are per sequence)", "cache")

    def crop(self, tokens_to_remove: int) -> None:
        raise StateError("PolicyCache: cannot crop (assisted decoding is not supported)", "cache")


class PolicyCache(Cache):
    """A KV cache that keeps what ``policy`` says (full, window, sinks, H2O, difficulty-aware).

    Args:
        policy: what to keep (default: everything).
        config: the model's config (its number of layers; also resolves a byte budget).
        attention_mask: the prompt's 2-D mask, for left-padded batches (default: no padding).

    Before a forward, :meth:`set_difficulty` may give each new token's difficulty in [0, 1]
    (and its chunk id) for difficulty-aware policies. After eviction, :attr:`ledger` tells
    which columns each sequence holds.
    """

    def __init__(
        self,
        policy: KvPolicy | None = None,
        config: Any = None,
        attention_mask: torch.Tensor | None = None,
        per_row: bool = False,
    ) -> None:
        if config is None:
            raise InputError("config: PolicyCache needs the model's config (model.config)", "config")
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        n_layers = getattr(text, "num_hidden_layers", None)
        if not isinstance(n_layers, int) or n_layers < 1:
            raise InputError(f"config: has no usable num_hidden_layers ({n_layers!r})", "config")
        super().__init__(layers=[PolicyLayer(self) for _ in range(n_layers)])
        if policy is not None and not isinstance(policy, KvPolicy):
            raise ConfigError(f"policy: expected a chunkwise.kv.KvPolicy or None, got {policy!r}", "policy")
        self.policy = policy if policy is not None else KvPolicy.full()
        self.per_row = bool(per_row)
        self.padding = left_padding(attention_mask) if attention_mask is not None else None
        self.ledger: _core.KvLedger | None = None
        self.evictions = 0
        self.peak_int8_bytes = 0
        #: With an int8 policy: the byte budget, the bytes of a token at full precision and in
        #: int8, and how many slots have been moved to int8 so far (all rows).
        self.byte_budget: int | None = None
        self.full_bytes = 0
        self.int8_bytes = 0
        self.quantized = 0
        self.peak_slots = 0
        self._pending: tuple[np.ndarray | None, np.ndarray | None] = (None, None)
        self._scores_seen = True
        self._score_acc: torch.Tensor | None = None

    # -- what transformers asks ------------------------------------------------------------
    @property
    def seen(self) -> int:
        """Tokens (columns, padding included) processed so far per sequence."""
        return 0 if self.ledger is None else self.ledger.seen

    def mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(kv_length, kv_offset) of the next forward: the slots left after its eviction map to
        the columns just before the query."""
        if self.ledger is None:
            return query_length, 0
        held = self.ledger.pending_len
        return held + query_length, self.ledger.seen - held

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx == 0:
            self._begin_forward(key_states)
        keys, values = self.policy_layer(layer_idx).update(key_states, value_states)
        _ACTIVE.entry = (self, layer_idx)
        if layer_idx == len(self.layers) - 1:
            self.peak_slots = max(self.peak_slots, keys.shape[-2])
            if self.byte_budget is not None:  # two precisions: count them (else derived from slots)
                self.peak_int8_bytes = max(self.peak_int8_bytes, self.nbytes)
        return keys, values

    # -- what a generation loop tells it ---------------------------------------------------
    def set_difficulty(self, difficulty: npt.ArrayLike, chunk: npt.ArrayLike | None = None) -> None:
        """Difficulty in [0, 1] (and optional chunk ids) of the tokens of the next forward,
        [batch, n] or flat row-major."""
        try:
            d = np.ascontiguousarray(np.asarray(difficulty, dtype=np.float32).reshape(-1))
            c = (
                None
                if chunk is None
                else np.ascontiguousarray(np.asarray(chunk, dtype=np.uint64).reshape(-1))
            )
        except (TypeError, ValueError, OverflowError) as e:
            raise InputError(f"difficulty: not numbers ({e})", "difficulty") from None
        self._pending = (d, c)

    def revise_difficulty(self, difficulty: npt.ArrayLike) -> None:
        """Overwrites the difficulty of each sequence's newest ``n`` slots ([batch, n] in
        [0, 1]): a prefill chunk learns its tokens' difficulty only from its own logits."""
        if self.ledger is None:
            raise StateError("PolicyCache: nothing cached yet to revise", "difficulty")
        self.ledger.revise_difficulty(
            np.ascontiguousarray(np.asarray(difficulty, dtype=np.float32).reshape(-1))
        )

    def add_scores(self, probs: torch.Tensor) -> None:
        """Adds attention probabilities [batch, heads, q, slots] to each slot's score (summed on
        the device over layers, handed to the books once per forward)."""
        if self.ledger is None or probs.shape[-1] != len(self.ledger):
            return
        s = probs.detach().float().sum(dim=(1, 2))
        self._score_acc = s if self._score_acc is None else self._score_acc + s
        self._scores_seen = True

    def _flush_scores(self) -> None:
        if self._score_acc is not None and self.ledger is not None:
            scores = self._score_acc.to("cpu").numpy().reshape(-1)
            self.ledger.add_scores(np.ascontiguousarray(scores, dtype=np.float32))
            self._score_acc = None

    def policy_layer(self, index: int) -> PolicyLayer:
        """Layer ``index`` (every layer of this cache is a :class:`PolicyLayer`)."""
        return cast(PolicyLayer, self.layers[index])

    # -- internals -------------------------------------------------------------------------
    def _bytes_per_token(self, key_states: torch.Tensor) -> int:
        _, h, _, d = key_states.shape
        return 2 * len(self.layers) * h * d * key_states.element_size()

    @property
    def bytes_per_token(self) -> int:
        """Bytes of keys + values one token takes over all layers (0 before the first forward)."""
        keys = self.policy_layer(0).keys
        return 0 if keys is None else self._bytes_per_token(keys)

    def _begin_forward(self, key_states: torch.Tensor) -> None:
        batch, q = key_states.shape[0], key_states.shape[-2]
        if self.ledger is None:
            pad = self.padding if self.padding is not None else [0] * batch
            if len(pad) != batch:
                raise InputError(
                    f"attention_mask: has {len(pad)} rows for a batch of {batch}", "attention_mask"
                )
            self.full_bytes = self._bytes_per_token(key_states)
            if self.policy.int8:
                _, h, _, d = key_states.shape
                self.int8_bytes = int8_bytes_per_token(len(self.layers), h, d)
                self.byte_budget = self.policy.budget_in_bytes(self.full_bytes)
            self.policy = self.policy.tokens(self.full_bytes, self.int8_bytes or None)
            self.ledger = self.policy.ledger(pad, per_row=self.per_row)
        elif self.policy.attention_weight > 0 and not self._scores_seen:
            raise StateError(
                "PolicyCache: this policy ranks tokens by attention but no scores arrived; run the "
                "model inside chunkwise.kv.track_attention(model)",
                "attention_weight",
            )
        self.prepare()
        diff, chunk = self._pending
        self._pending = (None, None)
        self.ledger.append(q, diff, chunk)
        self._scores_seen = self.policy.attention_weight == 0

    def prepare(self) -> None:
        """Runs the eviction the next forward starts with, now (a second call does nothing), so
        that :meth:`forward_mask` can describe the slots that forward attends to."""
        if self.ledger is None:
            return
        self._flush_scores()
        keep = self.ledger.evict()
        if keep is not None:
            self._apply_eviction(keep)
        if self.byte_budget is not None:
            self._quantize_over_budget()

    def _quantize_over_budget(self) -> None:
        """With an int8 policy: once more than ``slack`` slots are at full precision beyond
        what the byte budget allows, the lowest-ranked of them go to int8."""
        assert self.ledger is not None and self.byte_budget is not None
        first = self.policy_layer(0).mixed
        if first is None:
            return
        held = len(self.ledger)
        protected = min(held, self.policy.sinks + self.policy.window)  # never int8
        n_full = max(protected, full_slots(self.byte_budget, held, self.full_bytes, self.int8_bytes))
        held_full = first.slots - first.int8_slots
        if held_full.max(initial=0) <= n_full + self.policy.slack:
            return
        to_int8 = ~self.ledger.full_precision(n_full)
        for i in range(len(self.layers)):
            mixed = self.policy_layer(i).mixed
            assert mixed is not None  # every layer of an int8 cache is mixed
            moved = mixed.demote(to_int8)
        self.quantized += moved

    @property
    def peak_bytes(self) -> int:
        """Largest :attr:`nbytes` right after a forward's keys and values were added."""
        if self.byte_budget is not None:
            return self.peak_int8_bytes
        return self.peak_slots * self.full_bytes * (0 if self.ledger is None else len(self.ledger.padding))

    @property
    def nbytes(self) -> int:
        """Bytes the cached keys and values hold now (all layers, both precisions)."""
        return sum(self.policy_layer(i).nbytes for i in range(len(self.layers)))

    def _apply_eviction(self, keep: np.ndarray) -> None:
        self.evictions += 1
        index = torch.from_numpy(keep)
        first = keep[0]
        same = bool((keep == first).all()) and first[-1] - first[0] + 1 == len(first)
        contiguous = slice(int(first[0]), int(first[-1]) + 1) if same else None
        for i in range(len(self.layers)):
            self.policy_layer(i).gather(None if same else index, contiguous)

    def forward_mask(self, new: torch.Tensor) -> torch.Tensor:
        """The 2-D attention mask of the next forward, whose own tokens have the 0/1 mask
        ``new`` [batch, q]: ``seen + q`` columns, the held slots' validity (padding and dead
        slots 0) just before ``new``. A per-row cache needs it (its rows hold different numbers
        of real slots); for the other it equals the padding mask so far."""
        if self.ledger is None:
            return new
        self.prepare()
        valid = torch.from_numpy(self.ledger.valid()).to(device=new.device, dtype=new.dtype)
        before = new.new_zeros((new.shape[0], self.ledger.seen - valid.shape[1]))
        return torch.cat([before, valid, new], dim=1)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if repeats != 1:
            raise StateError("PolicyCache: num_return_sequences > 1 is not supported", "cache")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise StateError("PolicyCache: batch selection is not supported", "cache")
