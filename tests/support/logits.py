"""Random logits for the signal tests and for plans fed from signals."""

from __future__ import annotations

import numpy as np


def random_logits(rows: int = 64, vocab: int = 97, seed: int = 0) -> np.ndarray:
    """[rows, vocab] float32 logits of random scales with ~20 % masked to -inf (never a whole row);
    row 5 is one-hot (entropy 0) and row 6 uniform (entropy 1)."""
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((rows, vocab)) * rng.uniform(0.1, 8.0, size=(rows, 1))).astype(np.float32)
    mask = rng.random((rows, vocab)) < 0.2
    mask[:, 0] = False  # keep at least one finite logit per row
    logits[mask] = -np.inf
    logits[5, 1:] = -np.inf  # a one-hot row: entropy 0
    logits[6, :] = 0.0  # uniform: entropy 1
    return logits
