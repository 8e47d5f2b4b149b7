"""Logit-derived difficulty signals on numpy arrays (Rust), normalised to [0, 1] as the scheduler
expects. The torch versions, computed on the logits' device, are in :mod:`chunkwise.nn.signals`."""

from __future__ import annotations

import numpy as np

from .. import _core

__all__ = ["entropy_from_logits", "surprisal_from_logits"]


def entropy_from_logits(logits: np.ndarray) -> np.ndarray:
    """``H(softmax(row)) / ln V`` for each row of float32 ``logits`` [rows, vocab] (Rust)."""
    return _core.entropy_from_logits(logits)


def surprisal_from_logits(logits: np.ndarray, token_ids: np.ndarray) -> np.ndarray:
    """``min(1, -ln softmax(row)[id] / ln V)``: row r must be the distribution that predicted
    ``token_ids[r]`` (int64)."""
    return _core.surprisal_from_logits(logits, token_ids)
