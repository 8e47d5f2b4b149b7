"""Checks of a generation's prompt, shared by :func:`chunkwise.generate` and
:meth:`chunkwise.ChunkwiseModel.generate` (one source for what a valid prompt is)."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import InputError

__all__ = ["check_prompt", "check_token_range", "vocab_size"]


def check_prompt(input_ids: Any, attention_mask: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` an integer [batch, seq] tensor with at least one row and column, and
    ``attention_mask`` (default: all ones) a real 0/1 tensor of the same shape; returns both,
    the mask as int64 on the ids' device. Raises :class:`InputError` naming the bad one."""
    if (
        not isinstance(input_ids, torch.Tensor)
        or input_ids.ndim != 2
        or input_ids.dtype.is_floating_point
        or input_ids.dtype.is_complex
        or input_ids.dtype == torch.bool
    ):
        what = (
            f"a {input_ids.dtype} tensor of {input_ids.ndim} dims"
            if isinstance(input_ids, torch.Tensor)
            else None
        )
        raise InputError(
            f"input_ids: must be an integer tensor [batch, seq], got {what or type(input_ids).__name__}",
            "input_ids",
        )
    if input_ids.shape[0] == 0:
        raise InputError("input_ids: the batch is empty", "input_ids")
    if input_ids.shape[1] == 0:
        raise InputError("input_ids: the prompt is empty", "input_ids")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        raise InputError(
            f"attention_mask: must be a tensor shaped like input_ids {tuple(input_ids.shape)}",
            "attention_mask",
        )
    if attention_mask.dtype.is_complex:
        raise InputError(f"attention_mask: must be real, got {attention_mask.dtype}", "attention_mask")
    if bool(((attention_mask != 0) & (attention_mask != 1)).any()):  # 2s used to shift positions
        bad = sorted({float(v) for v in attention_mask.unique().tolist()} - {0.0, 1.0})[:3]
        raise InputError(
            f"attention_mask: holds {bad}; only 0 (padding) and 1 (token) mean anything", "attention_mask"
        )
    return input_ids, attention_mask.to(input_ids.device).long()


def vocab_size(model: Any) -> int:
    """Rows of the model's input embedding (the ids it can read), else ``config.vocab_size``."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if isinstance(emb, torch.nn.Embedding):
        return int(emb.num_embeddings)
    return int(model.config.vocab_size)


def check_token_range(input_ids: torch.Tensor, vocab: int) -> None:
    """Every id of ``input_ids`` (padding columns included: they are embedded too) in
    [0, vocab), else an :class:`InputError` naming the range found."""
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= vocab:
        raise InputError(
            f"input_ids: token ids (padding included) must be in [0, {vocab}), the model's "
            f"vocabulary; got [{lo}, {hi}]",
            "input_ids",
        )
