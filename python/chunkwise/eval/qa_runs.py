"""Forwards of an injected model over whole sequences under chosen ranks: what the rank-quality
curves measure with.

* :func:`token_nll`: teacher-forced NLL of every token of a batch of sequences, each under its
  own plan (or all at one rank), batched with right padding.
* :func:`base_signals`: one forward of the base model (the adapter off) that yields the
  entropy and surprisal of every token *and* the adapter's energy at its first adapted layer:
  that layer's input does not depend on the adapter, so the full-rank shrink ``A' x`` of it
  tells, before any adapted layer has run, how much of the update each token loses when the
  ladder is truncated (``tail[r] = sum_{j >= r} sigma_j (A'_j x)^2 / sigma_j``-weighted: the
  squared norm of ``(dW - dW_r) x``).
* :func:`greedy_with_plan`: greedy decoding in which position p runs at the plan's rank for p
  (a plan made over the prompt plus a reference answer; positions past it keep the last rank).

Position p of a sequence predicts token p + 1: signals of token t come from the logits at
t - 1, as everywhere in chunkwise.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from ..errors import InputError
from ..nn.injection import ChunkwiseModel
from ..nn.linear import ChunkwiseLinear
from ..nn.signals import logit_signals
from ..nn.token_plan import TokenPlan
from ..schedule.plan import Plan

__all__ = [
    "BaseSignals",
    "base_signals",
    "first_adapted_layer",
    "greedy_with_plan",
    "token_nll",
]


def _padded(seqs: Sequence[np.ndarray], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    t = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), t), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.from_numpy(np.asarray(s, dtype=np.int64))
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def _row_nll(logits: torch.Tensor, ids: torch.Tensor, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(nll, entropy) in nats of one row: entry t is about token t (0 for t = 0)."""
    nll = np.zeros(n, np.float64)
    ent = np.zeros(n, np.float64)
    if n > 1:
        e, s = logit_signals(logits[: n - 1], ids[1:n])
        assert s is not None
        ent[1:], nll[1:] = e.float().cpu().numpy(), s.float().cpu().numpy()
    return nll, ent


@torch.inference_mode()
def token_nll(
    cwm: ChunkwiseModel,
    seqs: Sequence[np.ndarray],
    plans: Sequence[Plan] | None = None,
    rank: int | None = None,
    pad: int = 0,
) -> list[np.ndarray]:
    """Per-token NLL (nats; entry 0 is 0) of each sequence in one batched forward, under its own
    one-sequence plan from ``plans``, or every token at ``rank`` (0: the base model)."""
    if (plans is None) == (rank is None):
        raise InputError("token_nll: give either plans or rank", "plans")
    device, dtype = cwm.device_dtype()
    ids, mask = _padded(seqs, pad, device)
    tp: TokenPlan | None = None
    if plans is not None:
        if len(plans) != len(seqs):
            raise InputError(f"plans: need one per sequence ({len(seqs)}), got {len(plans)}", "plans")
        parts = [(p, np.array([i])) for i, p in enumerate(plans)]
        tp = TokenPlan.from_plans(parts, mask, (ids.shape[0], ids.shape[1]), None, device, dtype)
    elif rank:
        tp = TokenPlan.uniform(ids.numel(), int(rank), np.zeros(ids.numel(), np.int32), device, dtype)
    with cwm.use(tp):
        logits = cwm.model(input_ids=ids, attention_mask=mask).logits
    return [_row_nll(logits[i], ids[i], len(s))[0] for i, s in enumerate(seqs)]


def first_adapted_layer(cwm: ChunkwiseModel, adapter: int = 0) -> tuple[str, ChunkwiseLinear]:
    """The first module (in the model's module order: the input side) adapter ``adapter``
    adapts."""
    ladder = cwm.ladders[adapter].modules
    for name, module in cwm.model.named_modules():
        if isinstance(module, ChunkwiseLinear) and name in ladder:
            return name, module
    raise InputError(f"adapter {adapter}: adapts no module of the model", "adapter")


@contextlib.contextmanager
def _captured_input(module: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    seen: list[torch.Tensor] = []
    handle = module.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    try:
        yield seen
    finally:
        handle.remove()


@dataclasses.dataclass
class BaseSignals:
    """What one base forward says about each token of one sequence (entry t: token t)."""

    #: entropy of the distribution that predicted token t, divided by ln V (0 for t = 0)
    entropy: np.ndarray
    #: -ln p(token t), divided by ln V and clipped to [0, 1] (0 for t = 0)
    surprisal: np.ndarray
    #: NLL (nats) of token t under the base model (0 for t = 0)
    nll: np.ndarray
    #: [T, R + 1]: tail[t, r] = squared norm of the part of position t's update at the first
    #: adapted layer that rank r leaves out (tail[:, 0] is the whole update, tail[:, R] = 0)
    tail: np.ndarray

    def energy(self, rank: int) -> np.ndarray:
        """The truncation cost of rank ``rank`` for the token each position predicts (entry t:
        position t - 1, 0 for t = 0), relative to its median over the sequence: the ``probe``
        the scheduler saturates as ``x / (x + probe_scale)``."""
        r = min(max(int(rank), 0), self.tail.shape[1] - 1)
        lost = np.zeros(len(self.tail))
        lost[1:] = self.tail[:-1, r]
        med = float(np.median(lost[1:])) if len(lost) > 1 else 0.0
        return (lost / med if med > 0 else lost).astype(np.float32)


@torch.inference_mode()
def base_signals(cwm: ChunkwiseModel, seqs: Sequence[np.ndarray], pad: int = 0) -> list[BaseSignals]:
    """:class:`BaseSignals` of each sequence from one batched forward with the adapter off."""
    device, _ = cwm.device_dtype()
    ids, mask = _padded(seqs, pad, device)
    name, layer = first_adapted_layer(cwm)
    factors = cwm.ladders[0].modules[name]
    a = factors.a.to(device=device, dtype=torch.float32)
    sigma = (factors.b.to(device=device, dtype=torch.float32) ** 2).sum(0)  # ||B'_j||^2 = sigma_j
    with _captured_input(layer) as seen, cwm.use(None):
        logits = cwm.model(input_ids=ids, attention_mask=mask).logits
    x = seen[0].reshape(ids.shape[0], ids.shape[1], -1)
    ln_v = math.log(logits.shape[-1])
    out = []
    for i, s in enumerate(seqs):
        n = len(s)
        nll, ent = _row_nll(logits[i], ids[i], n)
        w = (x[i, :n].float() @ a.T) ** 2 * sigma  # [n, R] energy per direction
        tail = torch.flip(torch.cumsum(torch.flip(w, [1]), 1), [1])  # tail[:, r] = sum_{j>=r}
        tail = torch.cat([tail, torch.zeros_like(tail[:, :1])], 1)
        out.append(
            BaseSignals(
                entropy=(ent / ln_v).clip(0, 1).astype(np.float32),
                surprisal=(nll / ln_v).clip(0, 1).astype(np.float32),
                nll=nll,
                tail=tail.double().cpu().numpy(),
            )
        )
    return out


@torch.inference_mode()
def greedy_with_plan(
    cwm: ChunkwiseModel,
    prompt: Sequence[int],
    plan: Plan | None,
    max_new_tokens: int,
    eos: int | None,
    rank: int | None = None,
) -> tuple[list[int], np.ndarray]:
    """Greedy answer to ``prompt``: (new token ids, the rank each forward position ran at).

    Position p (prompt or generated) runs at ``plan``'s token p (its last token for positions
    past the plan), or every position at ``rank`` (0 or None with no plan: the base model).
    """
    from transformers import DynamicCache

    device, dtype = cwm.device_dtype()
    n = len(prompt)
    planned = 0 if plan is None else int(plan.seq_offsets[-1])
    if plan is not None and planned < n:
        raise InputError(f"plan: covers {planned} tokens, fewer than the prompt's {n}", "plan")

    def plan_of(start: int, stop: int) -> tuple[TokenPlan | None, np.ndarray]:
        if plan is None:
            k = stop - start
            tp = None if not rank else TokenPlan.uniform(k, int(rank), np.zeros(k, np.int32), device, dtype)
            return tp, np.full(stop - start, int(rank or 0), np.int32)
        s, e = min(start, planned - 1), min(stop, planned)
        if e <= s:
            e = s + 1
        return TokenPlan.from_plan_slice(plan, s, e, device, dtype), np.asarray(plan.token_rank[s:e])

    cache = DynamicCache(config=getattr(cwm.model, "config", None))
    ids = torch.tensor([list(prompt)], dtype=torch.long, device=device)
    tp, used = plan_of(0, n)
    with cwm.use(tp):
        logits = cwm.model(input_ids=ids, cache=cache, use_cache=True).logits[0, -1]
    ranks = [used]
    new: list[int] = []
    for step in range(max_new_tokens):
        tok = int(torch.argmax(logits.float()))
        new.append(tok)
        if tok == eos or step == max_new_tokens - 1:
            break
        pos = n + step
        tp, used = plan_of(pos, pos + 1)
        with cwm.use(tp):
            logits = cwm.model(
                input_ids=torch.tensor([[tok]], device=device),
                position_ids=torch.tensor([[pos]], device=device),
                cache=cache,
                use_cache=True,
            ).logits[0, -1]
        ranks.append(used)
    return new, np.concatenate(ranks)
