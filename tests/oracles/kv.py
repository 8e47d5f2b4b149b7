"""Oracle for evicting KV caches: replays a cached decode as one full forward whose 4-D mask
lets each decode query see exactly the columns the cache held for it.

A plain module (not a conftest): the KV tests import it as ``tests.oracles.kv``.
"""

from __future__ import annotations

import chunkwise as cw
import numpy as np
import torch
from torch import nn


def cached_decode(
    model: nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    policy: cw.kv.KvPolicy,
    steps: int,
    difficulty_seed: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[np.ndarray], list[torch.Tensor], cw.kv.PolicyCache]:
    """Greedy decode through a :class:`PolicyCache` in a hand-written loop. Returns the full
    sequence, its 2-D mask, the columns held after each decode forward, each decode forward's
    last logits, and the cache."""
    cache = cw.kv.PolicyCache(policy, model.config, mask)
    rng = np.random.default_rng(difficulty_seed)
    seq, m = ids.clone(), mask.clone()
    held, step_logits = [], []
    tracking = cw.kv.track_attention(model) if policy.attention_weight > 0 else torch.no_grad()
    with torch.no_grad(), tracking:
        pos = (m.cumsum(-1) - 1).clamp(min=0)
        if difficulty_seed is not None:
            cache.set_difficulty(rng.random(ids.shape, dtype=np.float32))
        out = model(input_ids=seq, attention_mask=m, position_ids=pos, cache=cache)
        for _ in range(steps):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            seq, m = torch.cat([seq, nxt], 1), torch.cat([m, torch.ones_like(nxt)], 1)
            pos = (m.cumsum(-1) - 1).clamp(min=0)
            if difficulty_seed is not None:
                cache.set_difficulty(rng.random((ids.shape[0], 1), dtype=np.float32))
            out = model(input_ids=nxt, attention_mask=m, position_ids=pos[:, -1:], cache=cache)
            held.append(cache.ledger.columns().copy())
            step_logits.append(out.logits[:, -1])
    return seq, m, held, step_logits, cache


def masked_replay(
    model: nn.Module, seq: torch.Tensor, m: torch.Tensor, prompt_len: int, held: list[np.ndarray]
) -> torch.Tensor:
    """Logits of one full forward over ``seq`` where prompt queries attend causally and decode
    query i attends to ``held[i]`` (minus padding)."""
    b, t = seq.shape
    real = m.bool()
    vis = torch.ones(t, t, dtype=torch.bool).tril()[None].repeat(b, 1, 1) & real[:, None, :]
    for i, cols in enumerate(held):
        row = torch.zeros(b, t, dtype=torch.bool)
        for r in range(b):
            row[r, torch.from_numpy(cols[r])] = True
        vis[:, prompt_len + i] = row & real
    vis |= torch.eye(t, dtype=torch.bool)[None]  # padding queries see themselves (no NaN rows)
    bias = torch.where(vis[:, None], 0.0, float("-inf"))
    pos = (m.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids=seq, attention_mask=bias, position_ids=pos).logits
