"""The scheduler's logit signals computed by torch on the logits' device (no host copy of the
logits): what generation and the model-driven plan feed the scheduler. The numpy versions are
:func:`chunkwise.entropy_from_logits` / :func:`chunkwise.surprisal_from_logits`."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

__all__ = ["next_token_signals", "torch_entropy_surprisal"]


def torch_entropy_surprisal(
    logits: torch.Tensor, token_ids: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The same two signals computed by torch on the logits' device (no host copy of logits).

    Returns ``(entropy, surprisal)`` as float32 tensors of shape ``logits.shape[:-1]``;
    surprisal is ``None`` without ``token_ids``.
    """
    ln_v = math.log(logits.shape[-1])
    logp = torch.log_softmax(logits.float(), dim=-1)
    ent = -(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(-1) / ln_v
    sur = None
    if token_ids is not None:
        sur = (-logp.gather(-1, token_ids.long().unsqueeze(-1)).squeeze(-1) / ln_v).clamp(0.0, 1.0)
    return ent.clamp(0.0, 1.0), sur


def next_token_signals(model: nn.Module, input_ids: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-token (entropy, surprisal) of one sequence under a causal LM, float32 numpy arrays:
    token t's signals come from the logits at t − 1 (what the model expected before seeing it);
    token 0 has none (0). ``input_ids``: [1, T] or [T]."""
    ids = torch.as_tensor(input_ids).reshape(1, -1)
    with torch.inference_mode():
        logits = model(input_ids=ids).logits
    ent, sur = torch_entropy_surprisal(logits[:, :-1], ids[:, 1:])
    assert sur is not None  # token ids were given
    zero = np.zeros(1, np.float32)
    return (
        np.concatenate([zero, ent[0].float().cpu().numpy()]).astype(np.float32),
        np.concatenate([zero, sur[0].float().cpu().numpy()]).astype(np.float32),
    )
