"""The scheduler's logit signals computed by torch on the logits' device (no host copy of the
logits): what generation and the model-driven plan feed the scheduler. The numpy versions are
:func:`chunkwise.entropy_from_logits` / :func:`chunkwise.surprisal_from_logits`.

Memory: logits are turned into signals :data:`SIGNAL_ROWS` rows at a time, so a long prefill
chunk costs two slices of temporaries, not five copies of its logits; :func:`prefill_signals`
goes further and never holds a row's logits at all: it projects the last hidden states
:data:`VOCAB_BLOCK` vocabulary columns at a time with a running log-sum-exp, which is what keeps
chunkwise's prefill as lean as a stock ``generate``.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "SIGNAL_ROWS",
    "VOCAB_BLOCK",
    "SignalRequest",
    "head_signals",
    "logit_signals",
    "next_token_signals",
    "prefill_signals",
    "host_step",
    "torch_entropy_surprisal",
]

#: Rows of logits turned into signals at once (temporaries: 2 x rows x vocabulary floats).
SIGNAL_ROWS = 16
#: Vocabulary columns projected at once when the signals come from hidden states (temporaries:
#: 2 x rows x block floats, whatever the vocabulary).
VOCAB_BLOCK = 8192
#: Below exp(-200) a float32 probability is 0; clamping there keeps 0 x log 0 at 0, not NaN.
_FLOOR = -200.0


def _rows_signals(
    x: torch.Tensor, targets: torch.Tensor | None, owned: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(entropy in nats, -log p(target) in nats or None) of a [rows, V] slice; ``owned``: ``x``
    may be overwritten (it is a fresh projection, not the caller's logits)."""
    f = x.float()  # a copy unless x is float32 already
    m = f.amax(-1, keepdim=True)
    z = f.sub_(m) if owned or f is not x else f - m
    z.clamp_(min=_FLOOR)
    nll_at = None if targets is None else z.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    e = z.exp()
    s = e.sum(-1)
    log_s = s.log()
    ent = log_s - e.mul_(z).sum(-1) / s
    return ent, None if nll_at is None else log_s - nll_at


def head_signals(
    h: torch.Tensor, head: nn.Linear, targets: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(entropy, nll) in nats of hidden rows [R, H] under ``head``, projected
    :data:`VOCAB_BLOCK` vocabulary columns at a time with a running log-sum-exp: the head's
    weight is read once, and no [R, V] tensor exists. Per row, with m the running maximum,
    S = sum exp(x - m) and A = sum exp(x - m) (x - m): entropy = log S - A / S."""
    w, bias = head.weight, head.bias
    m = big_s = big_a = None
    for c in range(0, w.shape[0], VOCAB_BLOCK):
        cols = slice(c, c + VOCAB_BLOCK)
        x = F.linear(h, w[cols], None if bias is None else bias[cols]).float()
        bm = x.amax(-1)
        new_m = bm if m is None else torch.maximum(m, bm)
        x.sub_(new_m[:, None])
        e = x.exp()
        s_b = e.sum(-1)
        a_b = e.mul_(x).sum(-1)
        if m is None or big_s is None or big_a is None:
            big_s, big_a = s_b, a_b
        else:
            d = m - new_m  # <= 0: what the old sums shrink by
            shrink = d.exp()
            big_a = shrink * (big_a + d * big_s) + a_b
            big_s = shrink * big_s + s_b
        m = new_m
    assert m is not None and big_s is not None and big_a is not None  # the head has columns
    log_s = big_s.log()
    ent = log_s - big_a / big_s
    if targets is None:
        return ent, None
    t = targets.long()
    x_t = (h.float() * w[t].float()).sum(-1)
    if bias is not None:
        x_t = x_t + bias[t].float()
    return ent, m + log_s - x_t


def _sliced(
    rows: torch.Tensor, head: nn.Linear | None, targets: torch.Tensor | None, owned: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Signals of ``rows`` [N, X]: logits (``owned``: they may be overwritten), or hidden states
    that ``head`` projects block by block; :data:`SIGNAL_ROWS` rows at a time, targets [N]."""
    ent = torch.empty(rows.shape[0], dtype=torch.float32, device=rows.device)
    nll = None if targets is None else torch.empty_like(ent)
    for s in range(0, rows.shape[0], SIGNAL_ROWS):
        part = slice(s, s + SIGNAL_ROWS)
        tp = None if targets is None else targets[part]
        if head is not None:
            e, n = head_signals(rows[part], head, tp)
        else:
            e, n = _rows_signals(rows[part], tp, owned=owned)
        ent[part] = e
        if nll is not None and n is not None:
            nll[part] = n
    return ent, nll


def logit_signals(
    logits: torch.Tensor, targets: torch.Tensor | None = None, *, overwrite: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Entropy of every position's next-token distribution and the negative log-likelihood of
    ``targets`` under it, both in nats, float32, shaped ``logits.shape[:-1]``; computed
    :data:`SIGNAL_ROWS` rows at a time (no full-size temporaries). ``overwrite``: the logits
    are not needed afterwards and may be overwritten (one temporary less)."""
    shape = logits.shape[:-1]
    flat = logits.reshape(1, -1, logits.shape[-1])
    ent, nll = _signals_at(flat, None, _flat(targets), None, owned=overwrite)
    return ent.view(shape), None if nll is None else nll.view(shape)


def _flat(targets: torch.Tensor | None) -> torch.Tensor | None:
    return None if targets is None else targets.reshape(1, -1)


def torch_entropy_surprisal(
    logits: torch.Tensor, token_ids: torch.Tensor | None = None, *, overwrite: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The same two signals computed by torch on the logits' device (no host copy of logits).

    Returns ``(entropy, surprisal)`` as float32 tensors of shape ``logits.shape[:-1]``, both
    divided by ln(vocabulary) and clipped to [0, 1]; surprisal is ``None`` without ``token_ids``.
    ``overwrite``: float32 logits that are not needed afterwards are used as scratch space.
    """
    ln_v = math.log(logits.shape[-1])
    ent, nll = logit_signals(logits, token_ids, overwrite=overwrite)
    sur = None if nll is None else (nll / ln_v).clamp(0.0, 1.0)
    return (ent / ln_v).clamp(0.0, 1.0), sur


def host_step(
    entropy: torch.Tensor, surprisal: torch.Tensor, tokens: torch.Tensor, vocab: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A decode step's signals and tokens on the host in one copy (one synchronisation on a
    GPU): (entropy float32, surprisal float32, token ids int64). float32 holds every token id
    below 2^24 exactly; a larger vocabulary takes separate copies."""
    if vocab <= 1 << 24:
        host = torch.stack([entropy.float(), surprisal.float(), tokens.float()]).cpu().numpy()
        return host[0], host[1], host[2].astype(np.int64)
    return (
        entropy.float().cpu().numpy(),
        surprisal.float().cpu().numpy(),
        tokens.detach().cpu().numpy().astype(np.int64),
    )


# models whose logits are exactly lm_head(last hidden state): checked once per model
_PLAIN_HEAD: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def _head_parts(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """(decoder, output projection) of a transformers causal LM whose head is a plain linear
    layer, or None (then the full logits are used)."""
    get_decoder = getattr(model, "get_decoder", None)
    get_head = getattr(model, "get_output_embeddings", None)
    if get_decoder is None or get_head is None or _PLAIN_HEAD.get(model) is False:
        return None
    decoder, head = get_decoder(), get_head()
    if not isinstance(decoder, nn.Module) or type(head) is not nn.Linear:
        return None  # an adapted head (ChunkwiseLinear) needs its plan's rows: use the logits
    return decoder, head


#: What :func:`prefill_signals` computes: columns of the forward (1-D, the same for every row;
#: None: all of them) and the tokens that follow them ([B, P]; None: no likelihood).
SignalRequest = tuple[torch.Tensor | None, torch.Tensor | None]


def prefill_signals(
    model: nn.Module, requests: Sequence[SignalRequest], **inputs: Any
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor | None]]]:
    """One forward of ``model(**inputs)``; returns its last position's logits [B, V] and, per
    request ``(positions, targets)`` (positions: [P] columns, [B, P] columns per row, or None:
    every column), the entropy [B, P] at those columns and the NLL of
    ``targets`` [B, P] (None without targets), in nats. ``targets[:, p]`` is the token that
    follows column ``positions[p]`` (any id where there is none; mask it out). Each request is
    computed on its own, so its values do not depend on what else was asked.

    The model is asked for its last position's logits only (``logits_to_keep=1``, what a stock
    ``generate`` asks for); the signals come from the decoder's last hidden states at the
    requested columns, projected :data:`SIGNAL_ROWS` rows and :data:`VOCAB_BLOCK` vocabulary
    columns at a time, so no [B, T, V] (nor [rows, V]) tensor
    ever exists and the vocabulary projection costs only the columns asked for. The first call
    on a model checks that its logits are exactly that projection (no soft-capping or scaling
    after the head); a model where they are not, or that takes no ``logits_to_keep``, gets the
    full logits and the sliced signals of :func:`logit_signals`.
    """
    parts = _head_parts(model)
    if parts is not None:
        decoder, head = parts
        seen: list[torch.Tensor] = []

        def keep(_m: nn.Module, _a: Any, out: Any) -> None:
            seen.append(out[0] if isinstance(out, tuple) else out.last_hidden_state)

        handle = decoder.register_forward_hook(keep)
        try:
            last = model(**inputs, logits_to_keep=1).logits[:, -1]
        except TypeError:  # no logits_to_keep: remember, and take the full logits below
            _PLAIN_HEAD[model] = False
            seen.clear()
        finally:
            handle.remove()
        if seen:
            hidden = seen[-1]
            if model not in _PLAIN_HEAD:
                _PLAIN_HEAD[model] = _same_logits(head(hidden[:, -1]), last)
            if _PLAIN_HEAD[model]:
                return last, [_signals_at(hidden, pos, tgt, head) for pos, tgt in requests]
    logits = model(**inputs).logits
    return logits[:, -1], [_signals_at(logits, pos, tgt, None) for pos, tgt in requests]


def _signals_at(
    rows: torch.Tensor,
    positions: torch.Tensor | None,
    targets: torch.Tensor | None,
    head: nn.Linear | None,
    owned: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Signals of [B, T, X] logits (or hidden states ``head`` projects) at ``positions``: [P]
    columns of every row, or [B, P] columns per row."""
    if positions is None:
        picked = rows
    elif positions.ndim == 2:
        picked = rows[torch.arange(rows.shape[0], device=rows.device)[:, None], positions]
    else:
        picked = rows[:, positions]
    b, p, x = picked.shape
    flat_t = None if targets is None else targets.reshape(-1)
    ent, nll = _sliced(picked.reshape(-1, x), head, flat_t, owned=owned and positions is None)
    return ent.view(b, p), None if nll is None else nll.view(b, p)


def _same_logits(mine: torch.Tensor, theirs: torch.Tensor) -> bool:
    """The head's projection equals the model's logits up to the rounding of another matmul
    shape (a soft-capped or scaled head differs by far more)."""
    tol = max(1e-4, 16 * torch.finfo(theirs.dtype).eps) * float(theirs.abs().max().clamp(min=1.0))
    return mine.shape == theirs.shape and float((mine.float() - theirs.float()).abs().max()) <= tol


def next_token_signals(model: nn.Module, input_ids: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-token (entropy, surprisal) of one sequence under a causal LM, float32 numpy arrays:
    token t's signals come from the logits at t − 1 (what the model expected before seeing it);
    token 0 has none (0). ``input_ids``: [1, T] or [T]."""
    ids = torch.as_tensor(input_ids).reshape(1, -1)
    targets = torch.cat([ids[:, 1:], ids[:, :1]], 1)  # the last target is never read
    with torch.inference_mode():
        last, [(ent, nll)] = prefill_signals(model, [(None, targets)], input_ids=ids)
    assert nll is not None  # targets were given
    ln_v = math.log(last.shape[-1])
    zero = np.zeros(1, np.float32)
    ent_n = (ent[0, :-1] / ln_v).clamp(0.0, 1.0)
    sur_n = (nll[0, :-1] / ln_v).clamp(0.0, 1.0)
    return (
        np.concatenate([zero, ent_n.float().cpu().numpy()]).astype(np.float32),
        np.concatenate([zero, sur_n.float().cpu().numpy()]).astype(np.float32),
    )
