"""The punica wrapper of :mod:`chunkwise.vllm`: vLLM's CPU wrapper with chunkwise's LoRA
arithmetic (:mod:`chunkwise.vllm.lora_ops`), and the model-runner hook that hands it the
scheduler's per-token ranks (:mod:`chunkwise.vllm.steps`). Imported by vLLM (the wrapper by
qualname) and by :func:`chunkwise.vllm.register` inside vLLM only."""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np
import torch
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

from ..schedule import gate_matrix
from . import ranks_from_env
from .lora_ops import TokenGroup, expand, group_tokens, live_rank, pack, shrink, uniform
from .steps import StepRanks, shared

__all__ = ["RankPrefixPunicaCPU", "hook_model_runner"]

#: The wrappers of this process (one per LoRA model manager), told each step's scheduler ranks.
_WRAPPERS: weakref.WeakSet[RankPrefixPunicaCPU] = weakref.WeakSet()


class RankPrefixPunicaCPU(PunicaWrapperCPU):
    """``PunicaWrapperCPU`` whose linear LoRA runs each token at its rank (``CHUNKWISE_VLLM_RANKS``
    by the token's LoRA id; LoRAs not named run at their full rank), reading only that rank
    prefix of each LoRA's weights, one pair of matmuls per group of tokens.

    The tokens are grouped once per step in :meth:`update_metadata`; ``add_shrink`` and
    ``add_expand`` (which ``add_lora_linear`` and every tensor-parallel layer call, see
    docs/architecture.md) then work group by group. Each LoRA's live rank per layer (vLLM pads
    every LoRA to ``max_lora_rank`` with zeros) is found once per layer and LoRA and capped at.
    Embedding and logits LoRA stay vLLM's own.

    With the scheduler on (``CHUNKWISE_VLLM_SCHEDULER``), :func:`hook_model_runner` hands each
    step's per-token ranks, gates and scales to :meth:`set_step`; a token then runs at the smaller
    of its scheduler rank and its LoRA's rank in ``CHUNKWISE_VLLM_RANKS``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._ranks = ranks_from_env()
        self._groups: list[TokenGroup] = []  # packed (lora_ops.pack) when _perm is set
        self._perm: torch.Tensor | None = None
        self._gates: torch.Tensor | None = None  # in _perm's row order when _perm is set
        self._caps_of: dict[int, dict[int, int]] = {}  # weight data_ptr -> this step's caps
        self._slot_ids: list[int | None] = []
        self._n_tokens = 0
        #: (weight data_ptr, slot) -> (lora id, live rank): the zero padding skipped, per layer
        self._live: dict[tuple[int, int], tuple[int | None, int]] = {}
        _WRAPPERS.add(self)

    def update_metadata(
        self, mapping: Any, lora_index_to_id: list[int | None], *args: Any, **kwargs: Any
    ) -> None:
        """vLLM's metadata, then this step's token groups (once per step, not per layer)."""
        super().update_metadata(mapping, lora_index_to_id, *args, **kwargs)
        self._slot_ids = list(lora_index_to_id)
        self._n_tokens = len(mapping.index_mapping)
        self._regroup(None)

    def set_step(self, step: StepRanks) -> None:
        """This step's scheduler decisions (one per token of the step, in vLLM's order); a step
        that does not cover this wrapper's tokens (a warm-up) is ignored."""
        if step.n_tokens == self._n_tokens:
            self._regroup(step)

    def _regroup(self, step: StepRanks | None) -> None:
        n = self._n_tokens
        slots = self._token_lora_indices[:n].to("cpu")
        full = torch.iinfo(torch.int32).max  # clamped to each layer's rank
        slot_rank = torch.tensor(
            [self._ranks.get(i, full) if i is not None else 0 for i in self._slot_ids] or [0]
        )
        ranks = slot_rank[slots.clamp_min(0)]
        self._gates = None
        if step is not None:
            ranks = torch.minimum(ranks, torch.from_numpy(step.rank.astype(np.int64)))
        groups = group_tokens(slots, ranks)
        if step is not None:
            if step.gated() or not uniform(groups, ranks):
                rank = ranks.numpy().astype(np.int32)
                width = max(int(rank.max()), 1)
                lo = np.minimum(step.lo, rank)
                g = gate_matrix(rank, lo, step.gate_lo, step.gate_hi, step.scale, width)
                self._gates = torch.from_numpy(g)
        self._perm, self._groups = pack(groups)
        if self._perm is not None and self._gates is not None:
            self._gates = self._gates.index_select(0, self._perm)
        self._caps_of = {}

    def _caps(self, stacked: torch.Tensor, rank_dim: int) -> dict[int, int]:
        """Each group's LoRA's live rank in this layer's ``stacked`` weight (once per step)."""
        caps = self._caps_of.get(stacked.data_ptr())
        if caps is not None:
            return caps
        caps = self._caps_of[stacked.data_ptr()] = {}
        for g in self._groups:
            if g.slot in caps:
                continue
            lora_id = self._slot_ids[g.slot] if g.slot < len(self._slot_ids) else None
            key = (stacked.data_ptr(), g.slot)
            hit = self._live.get(key)
            if hit is None or hit[0] != lora_id:
                hit = self._live[key] = (lora_id, live_rank(stacked, g.slot, rank_dim))
            caps[g.slot] = hit[1]
        return caps

    def add_shrink(
        self,
        y: tuple[torch.Tensor, ...] | torch.Tensor,
        x: torch.Tensor,
        lora_a_stacked: tuple[torch.Tensor, ...],
        scale: float,
        **kwargs: Any,
    ) -> None:
        x = x.view(-1, x.shape[-1])
        for i, a in enumerate(lora_a_stacked):
            out = y[i]
            gates = self._gates
            if gates is not None and gates.dtype != out.dtype:
                gates = gates.to(out.dtype)
            caps = self._caps(a, 0)
            shrink(out.view(-1, out.shape[-1]), x, a, self._groups, scale, caps, gates, self._perm)

    def add_expand(
        self,
        y: torch.Tensor,
        x: tuple[torch.Tensor, ...] | torch.Tensor,
        lora_b_stacked: tuple[torch.Tensor, ...],
        output_slices: tuple[int, ...],
        offset_start: int = 0,
        add_inputs: bool = True,
        **kwargs: Any,
    ) -> None:
        y2 = y.view(-1, y.shape[-1])
        offset = offset_start
        for i, (b, size) in enumerate(zip(lora_b_stacked, output_slices, strict=True)):
            expand(y2, x[i], b, self._groups, offset, size, add_inputs, self._caps(b, 1), self._perm)
            offset += size


def hook_model_runner() -> None:
    """Wraps vLLM's ``LoRAModelRunnerMixin.set_active_loras`` (called once per step, after the
    batch's tokens are laid out): after vLLM sets its LoRA mapping, the step's requests go through
    the scheduler (:func:`chunkwise.vllm.steps.shared`) and every wrapper gets the decisions."""
    from vllm.v1.worker.lora_model_runner_mixin import LoRAModelRunnerMixin

    original = LoRAModelRunnerMixin.set_active_loras
    if getattr(original, "chunkwise", False):
        return

    def set_active_loras(
        self: Any, input_batch: Any, num_scheduled_tokens: np.ndarray, *args: Any, **kwargs: Any
    ) -> Any:
        out = original(self, input_batch, num_scheduled_tokens, *args, **kwargs)
        ranks = shared()
        n = input_batch.num_reqs
        if ranks is None or n == 0:
            return out
        with_lora = input_batch.request_lora_mapping[:n] > 0  # the others pay nothing
        step = ranks.step(
            list(input_batch.req_ids[:n]),
            input_batch.token_ids_cpu,
            input_batch.num_computed_tokens_cpu[:n],
            np.asarray(num_scheduled_tokens)[:n],
            input_batch.num_prompt_tokens[:n],
            with_lora,
        )
        for wrapper in list(_WRAPPERS):
            wrapper.set_step(step)
        return out

    set_active_loras.chunkwise = True  # type: ignore[attr-defined]
    LoRAModelRunnerMixin.set_active_loras = set_active_loras
