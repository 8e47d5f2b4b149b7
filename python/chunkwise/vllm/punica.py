"""The punica wrapper of :mod:`chunkwise.vllm`: vLLM's own CPU wrapper with a rank-prefix mask
between shrink and expand. Imported by vLLM (by qualname) only, never by chunkwise itself."""

from __future__ import annotations

from typing import Any

import torch
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

from . import ranks_from_env

__all__ = ["RankMaskPunicaCPU"]


class RankMaskPunicaCPU(PunicaWrapperCPU):
    """``PunicaWrapperCPU`` whose expand sees only the first ``rank`` shrink columns of each token
    (rank from ``CHUNKWISE_VLLM_RANKS`` by the token's LoRA id; LoRAs not named run whole).

    ``add_lora_linear`` is ``self.add_shrink`` then ``self.add_expand``, and every tensor-parallel
    layout hands ``add_expand`` all r columns of a token (docs/architecture.md), so the mask is
    applied there, once per layer and slice."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._ranks = ranks_from_env()
        self._token_rank: torch.Tensor | None = None  # [tokens] of this step; None: no mask
        self._keep: dict[tuple[int, torch.dtype], torch.Tensor] = {}  # (r, dtype) -> [tokens, r]

    def update_metadata(
        self, mapping: Any, lora_index_to_id: list[int | None], *args: Any, **kwargs: Any
    ) -> None:
        """vLLM's metadata, then this step's rank per token (once per step, not per layer)."""
        super().update_metadata(mapping, lora_index_to_id, *args, **kwargs)
        full = torch.iinfo(torch.long).max  # a LoRA without a rank, or no LoRA: nothing masked
        slot_rank = torch.tensor(
            [self._ranks.get(i, full) if i is not None else full for i in lora_index_to_id]
        )
        slots = self._token_lora_indices[: len(mapping.index_mapping)].to("cpu")
        self._token_rank = slot_rank[slots.clamp_min(0)] if len(slot_rank) else None
        self._keep.clear()

    def _mask(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [tokens, r] (the shrink's fp32 scratch buffer) with the columns at or above each
        token's rank zeroed, in place; the 0/1 mask is built once per step, rank width and dtype."""
        if self._token_rank is None:
            return x
        n, r = x.shape
        keep = self._keep.get((r, x.dtype))
        if keep is None:
            keep = torch.arange(r)[None, :] < self._token_rank[:, None]
            keep = self._keep[(r, x.dtype)] = keep.to(device=x.device, dtype=x.dtype)
        m = min(n, keep.shape[0])  # rows past the step's tokens (padding) are left as they are
        x[:m].mul_(keep[:m])
        return x

    def add_expand(self, y: torch.Tensor, x: Any, *args: Any, **kwargs: Any) -> None:
        if isinstance(x, torch.Tensor):
            for s in x if x.ndim == 3 else (x,):
                self._mask(s)
        else:
            for s in x:
                self._mask(s)
        super().add_expand(y, x, *args, **kwargs)
