"""Attention that reports its probabilities to the active :class:`PolicyCache` (for H2O).

``sdpa`` and flash kernels never materialise attention probabilities, so heavy-hitter scores
need an attention that does. :func:`track_attention` switches a model to ``chunkwise_scores``
— the eager computation (GQA-aware, float32 softmax), which also adds each slot's received
probability to the cache's books — and back afterwards. Costs what eager attention costs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from .cache import PolicyCache, active_cache

__all__ = ["SCORING_ATTENTION", "track_attention"]

#: The attention implementation name :func:`track_attention` registers and switches to.
SCORING_ATTENTION = "chunkwise_scores"


def scoring_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention ([batch, heads, q, d] query; keys/values may have fewer heads) that
    reports the probabilities to the cache whose ``update`` just ran."""
    groups = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(groups, dim=1) if groups > 1 else key
    v = value.repeat_interleave(groups, dim=1) if groups > 1 else value
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    weights = torch.matmul(query, k.transpose(2, 3)) * scale
    if attention_mask is not None:
        weights = weights + attention_mask[..., : k.shape[-2]]
    probs = torch.softmax(weights, dim=-1, dtype=torch.float32)
    entry = active_cache()
    if entry is not None and isinstance(entry[0], PolicyCache):
        entry[0].add_scores(probs)
    probs = torch.nn.functional.dropout(probs.to(query.dtype), p=dropout, training=module.training)
    out = torch.matmul(probs, v).transpose(1, 2).contiguous()
    return out, probs


AttentionInterface.register(SCORING_ATTENTION, scoring_attention)
AttentionMaskInterface.register(SCORING_ATTENTION, eager_mask)


@contextlib.contextmanager
def track_attention(model: PreTrainedModel) -> Iterator[None]:
    """Runs ``model`` with :func:`scoring_attention` inside the block (restored afterwards)."""
    previous = model.config._attn_implementation
    model.set_attn_implementation(SCORING_ATTENTION)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)
