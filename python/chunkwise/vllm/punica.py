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
        self._slot_rank = torch.zeros(0, dtype=torch.long)

    def update_metadata(
        self, mapping: Any, lora_index_to_id: list[int | None], *args: Any, **kwargs: Any
    ) -> None:
        super().update_metadata(mapping, lora_index_to_id, *args, **kwargs)
        full = torch.iinfo(torch.long).max
        self._slot_rank = torch.tensor(
            [self._ranks.get(i, full) if i is not None else full for i in lora_index_to_id], dtype=torch.long
        )

    def _mask(self, x: torch.Tensor) -> torch.Tensor:
        slots = self._token_lora_indices[: x.shape[0]].to("cpu")
        rank = (
            self._slot_rank[slots.clamp_min(0)]
            if self._slot_rank.numel()
            else torch.full_like(slots, 1 << 62)
        )
        keep = torch.arange(x.shape[-1])[None, :] < rank[:, None]
        return x * keep.to(device=x.device, dtype=x.dtype)

    def add_expand(self, y: torch.Tensor, x: Any, *args: Any, **kwargs: Any) -> None:
        if isinstance(x, torch.Tensor):
            x = self._mask(x) if x.ndim == 2 else torch.stack([self._mask(s) for s in x])
        else:
            x = tuple(self._mask(s) for s in x)
        super().add_expand(y, x, *args, **kwargs)
