"""The punica wrapper of :mod:`chunkwise.vllm`: vLLM's CPU wrapper with chunkwise's LoRA
arithmetic (:mod:`chunkwise.vllm.lora_ops`). Imported by vLLM (by qualname) only, never by
chunkwise itself."""

from __future__ import annotations

from typing import Any

import torch
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

from . import ranks_from_env
from .lora_ops import TokenGroup, expand, group_tokens, live_rank, shrink

__all__ = ["RankPrefixPunicaCPU"]


class RankPrefixPunicaCPU(PunicaWrapperCPU):
    """``PunicaWrapperCPU`` whose linear LoRA runs each token at its rank (``CHUNKWISE_VLLM_RANKS``
    by the token's LoRA id; LoRAs not named run at their full rank), reading only that rank
    prefix of each LoRA's weights, one pair of matmuls per group of tokens.

    The tokens are grouped once per step in :meth:`update_metadata`; ``add_shrink`` and
    ``add_expand`` (which ``add_lora_linear`` and every tensor-parallel layer call, see
    docs/architecture.md) then work group by group. Each LoRA's live rank per layer (vLLM pads
    every LoRA to ``max_lora_rank`` with zeros) is found once per layer and LoRA and capped at.
    Embedding and logits LoRA stay vLLM's own."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._ranks = ranks_from_env()
        self._groups: list[TokenGroup] = []
        self._slot_ids: list[int | None] = []
        #: (weight data_ptr, slot) -> (lora id, live rank): the zero padding skipped, per layer
        self._live: dict[tuple[int, int], tuple[int | None, int]] = {}

    def update_metadata(
        self, mapping: Any, lora_index_to_id: list[int | None], *args: Any, **kwargs: Any
    ) -> None:
        """vLLM's metadata, then this step's token groups (once per step, not per layer)."""
        super().update_metadata(mapping, lora_index_to_id, *args, **kwargs)
        self._slot_ids = list(lora_index_to_id)
        n = len(mapping.index_mapping)
        slots = self._token_lora_indices[:n].to("cpu")
        full = torch.iinfo(torch.int32).max  # clamped to each layer's rank
        slot_rank = torch.tensor(
            [self._ranks.get(i, full) if i is not None else 0 for i in lora_index_to_id] or [0]
        )
        ranks = slot_rank[slots.clamp_min(0)]
        self._groups = group_tokens(slots, ranks)

    def _caps(self, stacked: torch.Tensor, rank_dim: int) -> dict[int, int]:
        """Each group's LoRA's live rank in this layer's ``stacked`` weight."""
        caps = {}
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
            shrink(out.view(-1, out.shape[-1]), x, a, self._groups, scale, self._caps(a, 0))

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
            expand(y2, x[i], b, self._groups, offset, size, add_inputs, self._caps(b, 1))
            offset += size
