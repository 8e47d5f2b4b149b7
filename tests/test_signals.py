"""Logit signals: entropy and surprisal from logits (numpy: ``entropy_from_logits``,
``surprisal_from_logits``; torch: ``torch_entropy_surprisal``) against a float64 reference, batch
shapes and half precision, and the errors naming the bad argument."""

from __future__ import annotations

import chunkwise
import numpy as np
import pytest
import torch
from chunkwise import InputError

from tests.support.logits import random_logits


def _ref_logp(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    lse = m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True))
    return x - lse


def test_entropy_and_surprisal_against_float64_reference():
    logits = random_logits()
    rows, vocab = logits.shape
    ids = np.random.default_rng(1).integers(0, vocab, size=rows, dtype=np.int64)
    ids[7] = int(np.flatnonzero(np.isinf(logits[7]))[0])  # a masked id: surprisal saturates at 1
    lp = _ref_logp(logits)
    p = np.exp(lp)
    with np.errstate(invalid="ignore"):
        h = -np.where(p > 0, p * lp, 0.0).sum(-1) / np.log(vocab)
    sur = np.clip(-lp[np.arange(rows), ids] / np.log(vocab), 0.0, 1.0)
    ent = chunkwise.entropy_from_logits(logits)
    got_sur = chunkwise.surprisal_from_logits(logits, ids)
    assert ent.dtype == np.float32 and ent.shape == (rows,)
    assert got_sur.dtype == np.float32 and got_sur.shape == (rows,)
    np.testing.assert_allclose(ent, h, atol=2e-6)
    np.testing.assert_allclose(got_sur, sur, atol=2e-6)
    assert ent[5] == pytest.approx(0.0, abs=1e-7)
    assert ent[6] == pytest.approx(1.0, abs=1e-6)
    assert got_sur[7] == 1.0
    assert np.all((ent >= 0) & (ent <= 1)) and np.all((got_sur >= 0) & (got_sur <= 1))

    t_ent, t_sur = chunkwise.torch_entropy_surprisal(torch.from_numpy(logits), torch.from_numpy(ids))
    assert t_ent.dtype == torch.float32 and t_sur.dtype == torch.float32
    np.testing.assert_allclose(t_ent.numpy(), ent, atol=2e-6)
    np.testing.assert_allclose(t_sur.numpy(), got_sur, atol=2e-6)
    t_ent_only, none = chunkwise.torch_entropy_surprisal(torch.from_numpy(logits))
    assert none is None
    np.testing.assert_allclose(t_ent_only.numpy(), ent, atol=2e-6)


def test_torch_signals_keep_batch_shape_and_accept_half_precision():
    logits = random_logits(rows=24, vocab=31, seed=4)
    ids = np.random.default_rng(5).integers(0, 31, size=24, dtype=np.int64)
    ent = chunkwise.entropy_from_logits(logits)
    sur = chunkwise.surprisal_from_logits(logits, ids)
    t_ent, t_sur = chunkwise.torch_entropy_surprisal(
        torch.from_numpy(logits).reshape(4, 6, 31), torch.from_numpy(ids).reshape(4, 6).int()
    )
    assert t_ent.shape == (4, 6) and t_sur.shape == (4, 6)
    np.testing.assert_allclose(t_ent.reshape(-1).numpy(), ent, atol=2e-6)
    np.testing.assert_allclose(t_sur.reshape(-1).numpy(), sur, atol=2e-6)
    h_ent, _ = chunkwise.torch_entropy_surprisal(torch.from_numpy(logits).to(torch.bfloat16))
    assert h_ent.dtype == torch.float32
    assert np.all((h_ent.numpy() >= 0) & (h_ent.numpy() <= 1))


@pytest.mark.parametrize(
    ("call", "param"),
    [
        (lambda: chunkwise.entropy_from_logits(np.zeros((2, 3))), "logits"),
        (lambda: chunkwise.entropy_from_logits(np.zeros(3, np.float32)), "logits"),
        (lambda: chunkwise.entropy_from_logits(np.zeros((4, 6), np.float32)[:, ::2]), "logits"),
        (lambda: chunkwise.entropy_from_logits(np.full((2, 3), np.nan, np.float32)), "logits"),
        (lambda: chunkwise.entropy_from_logits(np.full((2, 3), np.inf, np.float32)), "logits"),
        (lambda: chunkwise.entropy_from_logits(np.full((2, 3), -np.inf, np.float32)), "logits"),
        (lambda: chunkwise.entropy_from_logits(np.zeros((2, 1), np.float32)), "logits"),
        (lambda: chunkwise.entropy_from_logits(np.zeros((0, 4), np.float32)), "logits"),
        (
            lambda: chunkwise.surprisal_from_logits(np.zeros((2, 3), np.float32), np.array([0, 3])),
            "token_ids",
        ),
        (
            lambda: chunkwise.surprisal_from_logits(np.zeros((2, 3), np.float32), np.array([0, -1])),
            "token_ids",
        ),
        (lambda: chunkwise.surprisal_from_logits(np.zeros((2, 3), np.float32), np.array([0])), "token_ids"),
        (
            lambda: chunkwise.surprisal_from_logits(np.zeros((2, 3), np.float32), np.array([0, 1], np.int32)),
            "token_ids",
        ),
    ],
)
def test_logit_signal_errors(call, param):
    with pytest.raises(InputError) as info:
        call()
    assert info.value.parameter == param
    assert param in str(info.value)
