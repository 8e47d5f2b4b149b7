"""Logit-derived difficulty signals, normalised to [0, 1] as the scheduler expects."""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _core

__all__ = ["entropy_from_logits", "next_token_signals", "surprisal_from_logits", "torch_entropy_surprisal"]


def entropy_from_logits(logits: np.ndarray) -> np.ndarray:
    """``H(softmax(row)) / ln V`` for each row of float32 ``logits`` [rows, vocab] (Rust)."""
    return _core.entropy_from_logits(logits)


def surprisal_from_logits(logits: np.ndarray, token_ids: np.ndarray) -> np.ndarray:
    """``min(1, -ln softmax(row)[id] / ln V)``: row r must be the distribution that predicted
    ``token_ids[r]`` (int64)."""
    return _core.surprisal_from_logits(logits, token_ids)


def torch_entropy_surprisal(logits: Any, token_ids: Any | None = None) -> tuple[Any, Any]:
    """The same two signals computed by torch on the logits' device (no host copy of logits).

    Returns ``(entropy, surprisal)`` as float32 tensors of shape ``logits.shape[:-1]``;
    surprisal is ``None`` without ``token_ids``.
    """
    import torch

    ln_v = float(np.log(logits.shape[-1]))
    logp = torch.log_softmax(logits.float(), dim=-1)
    ent = -(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(-1) / ln_v
    sur = None
    if token_ids is not None:
        sur = (-logp.gather(-1, token_ids.long().unsqueeze(-1)).squeeze(-1) / ln_v).clamp(0.0, 1.0)
    return ent.clamp(0.0, 1.0), sur


def next_token_signals(model: Any, input_ids: Any) -> tuple[np.ndarray, np.ndarray]:
    """Per-token (entropy, surprisal) of one sequence under a causal LM, float32 numpy arrays:
    token t's signals come from the logits at t − 1 (what the model expected before seeing it);
    token 0 has none (0). ``input_ids``: [1, T] or [T]."""
    import torch

    ids = torch.as_tensor(input_ids).reshape(1, -1)
    with torch.inference_mode():
        logits = model(input_ids=ids).logits
    ent, sur = torch_entropy_surprisal(logits[:, :-1], ids[:, 1:])
    zero = np.zeros(1, np.float32)
    return (
        np.concatenate([zero, ent[0].float().cpu().numpy()]).astype(np.float32),
        np.concatenate([zero, sur[0].float().cpu().numpy()]).astype(np.float32),
    )
