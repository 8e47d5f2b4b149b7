"""Lean prefill signals: entropy and next-token NLL sliced over rows (float64 reference),
``prefill_signals`` against the full logits' signals (and its fallback for a head that is not a
plain projection), the prompt perplexity of ``generate`` against a teacher-forced forward (plain
model and PEFT at the top rung), and no full-chunk projection of the vocabulary in prefill."""

from __future__ import annotations

import copy
import math

import chunkwise as cw
import numpy as np
import pytest
import torch
from chunkwise.generation import PRIOR_SAMPLES
from chunkwise.nn import SIGNAL_ROWS, logit_signals, prefill_signals
from chunkwise.nn import signals as S
from transformers import LlamaForCausalLM

from tests.support.peft_helpers import (
    VOCAB,
    all_top_scheduler,
    make_adapter,
    ragged_prompt,
    tiny_model,
)


def _reference(logits: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(entropy, nll) in nats, float64."""
    x = logits.astype(np.float64)
    m = x.max(-1, keepdims=True)
    lp = x - (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))
    p = np.exp(lp)
    with np.errstate(invalid="ignore"):
        ent = -np.where(p > 0, p * lp, 0.0).sum(-1)
    nll = -np.take_along_axis(lp, targets[..., None], -1)[..., 0]
    return ent, nll


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logit_signals_in_slices_match_float64(dtype):
    rows = 3 * SIGNAL_ROWS + 5  # several slices and a short last one
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(rows, 50, generator=gen) * 4).to(dtype)
    logits[3, 10:] = float("-inf")  # masked vocabulary entries
    logits[4] = 0.0  # uniform
    targets = torch.randint(0, 10, (rows,), generator=gen)
    ent, nll = logit_signals(logits.reshape(1, rows, 50), targets.reshape(1, rows))
    assert ent.shape == (1, rows) and nll is not None and nll.shape == (1, rows)
    ref_e, ref_n = _reference(logits.float().numpy(), targets.numpy())
    np.testing.assert_allclose(ent[0].numpy(), ref_e, atol=2e-5)
    np.testing.assert_allclose(nll[0].numpy(), ref_n, atol=2e-5, rtol=1e-5)
    assert ent[0, 4] == pytest.approx(math.log(50), abs=1e-5)
    assert torch.isfinite(ent).all() and torch.isfinite(nll).all()


def test_overwriting_the_logits_gives_the_same_signals():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, SIGNAL_ROWS + 3, 40, generator=gen) * 3
    targets = torch.randint(0, 40, (2, SIGNAL_ROWS + 3), generator=gen)
    want = cw.torch_entropy_surprisal(logits.clone(), targets)
    half = logits.bfloat16()
    kept = half.clone()
    got = cw.torch_entropy_surprisal(logits, targets, overwrite=True)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
    cw.torch_entropy_surprisal(half, targets, overwrite=True)
    assert torch.equal(half, kept)  # another dtype is converted first: the caller's tensor is left alone


def _full_signals(model, ids, targets):
    with torch.inference_mode():
        logits = model(input_ids=ids).logits
    ent, nll = logit_signals(logits, targets)
    return logits[:, -1], ent, nll


class _Rows:
    """Counts the rows every call of a linear layer projects."""

    def __init__(self, layer):
        self.rows: list[int] = []
        self.handle = layer.register_forward_pre_hook(self._count)

    def _count(self, _module, args):
        self.rows.append(args[0].numel() // args[0].shape[-1])

    def close(self):
        self.handle.remove()


@pytest.fixture
def projected(monkeypatch):
    """Rows of every projection of hidden states into vocabulary signals."""
    rows: list[int] = []
    real = S.head_signals

    def counting(h, head, targets):
        rows.append(h.shape[0])
        return real(h, head, targets)

    monkeypatch.setattr(S, "head_signals", counting)
    return rows


@pytest.mark.parametrize("block", [S.VOCAB_BLOCK, 7])  # one block; several, the last one short
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_prefill_signals_equal_the_full_logits_signals(arch, block, projected, monkeypatch):
    monkeypatch.setattr(S, "VOCAB_BLOCK", block)
    model = tiny_model(arch)
    ids = torch.randint(1, VOCAB, (2, 3 * SIGNAL_ROWS + 3), generator=torch.Generator().manual_seed(1))
    ids = ids[:, : model.config.max_position_embeddings if arch != "gpt2" else 60]
    targets = torch.roll(ids, -1, 1)
    own = _Rows(model.get_output_embeddings())
    with torch.inference_mode():
        last, [(ent, nll), (ent_at, none)] = prefill_signals(
            model, [(None, targets), (torch.tensor([0, 5, 7]), None)], input_ids=ids
        )
    own.close()
    want_last, want_ent, want_nll = _full_signals(model, ids, targets)
    torch.testing.assert_close(last, want_last, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, want_ent, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(nll, want_nll, rtol=1e-5, atol=1e-5)
    assert none is None
    torch.testing.assert_close(ent_at, want_ent[:, [0, 5, 7]], rtol=1e-5, atol=1e-5)
    # the model itself projected one row per sequence (and once more for the head check)
    assert own.rows == [2, 2]
    assert max(projected) <= SIGNAL_ROWS and sum(projected) == ids.numel() + 2 * 3


class _ScaledHead(LlamaForCausalLM):
    """A model whose logits are not the head's projection (like soft-capped or scaled heads)."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 0.5
        return out


def test_prefill_signals_fall_back_to_the_logits_when_the_head_is_not_the_last_step():
    plain = tiny_model("llama")
    model = _ScaledHead(plain.config).eval()
    model.load_state_dict(plain.state_dict())
    ids = torch.randint(1, VOCAB, (1, 40), generator=torch.Generator().manual_seed(2))
    targets = torch.roll(ids, -1, 1)
    for _ in range(2):  # the second call takes the fallback straight away
        with torch.inference_mode():
            last, [(ent, nll)] = prefill_signals(model, [(None, targets)], input_ids=ids)
        want_last, want_ent, want_nll = _full_signals(model, ids, targets)
        torch.testing.assert_close(last, want_last)
        torch.testing.assert_close(ent, want_ent, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(nll, want_nll, rtol=1e-5, atol=1e-5)


def _teacher_forced(model, ids, mask):
    """(summed NLL in nats, tokens scored) of each row's real tokens after its first one."""
    total, n = 0.0, 0
    with torch.inference_mode():
        for row, real in zip(ids, mask.bool(), strict=True):
            seq = row[real][None]
            logp = torch.log_softmax(model(input_ids=seq).logits.double(), -1)
            total -= float(logp[0, :-1].gather(-1, seq[0, 1:, None]).sum())
            n += seq.shape[1] - 1
    return total, n


@pytest.mark.parametrize("chunk", [None, 1, 5])
def test_prompt_perplexity_is_the_teacher_forced_perplexity(chunk):
    model = tiny_model("llama", max_position_embeddings=256)
    ids, mask = ragged_prompt(seq=19)
    out = cw.generate(model, ids, mask, max_new_tokens=2, prefill_chunk=chunk, score_prompt=True)
    want, n = _teacher_forced(model, ids, mask)
    assert out.prompt_scored == n
    assert out.prompt_nll == pytest.approx(want, rel=1e-5)
    assert out.prompt_perplexity == pytest.approx(math.exp(want / n), rel=1e-5)


def test_prompt_perplexity_at_the_top_rung_is_pefts(tmp_path):
    base = tiny_model("llama", max_position_embeddings=256)
    peft = make_adapter(base, tmp_path / "a", r=8, target_modules=["q_proj", "v_proj", "down_proj"])
    cwm = cw.inject(copy.deepcopy(base), cw.RankLadder.from_peft(tmp_path / "a"), all_top_scheduler(8))
    ids, mask = ragged_prompt(seq=17)
    out = cw.generate(cwm, ids, mask, max_new_tokens=2, prefill_chunk=6, score_prompt=True)
    unscored = cw.generate(cwm, ids, mask, max_new_tokens=2, prefill_chunk=6)
    assert torch.equal(unscored.sequences, out.sequences)  # scoring changes nothing else
    assert unscored.prompt_scored == 0 and math.isnan(unscored.prompt_perplexity)
    want, n = _teacher_forced(peft, ids, mask)
    base_nll, _ = _teacher_forced(base, ids, mask)
    assert out.prompt_scored == n
    assert out.prompt_nll == pytest.approx(want, rel=1e-5)
    assert abs(want - base_nll) > 1e-3 * abs(want)  # the adapter changes what is measured


@pytest.mark.parametrize("adapted", [False, True])
@pytest.mark.parametrize("score", [False, True])
def test_generation_projects_the_vocabulary_only_where_it_is_read(score, adapted, projected, tmp_path):
    """Unscored: the last column of each chunk, like a stock generate, and with a scheduler the
    sampled columns of every chunk but the last (the next chunk's entropy prior: a plain model,
    or the last chunk, has no use for them); scored: every column too, never more than a slice
    at once."""
    model = tiny_model("llama", max_position_embeddings=256)
    run = model
    if adapted:
        make_adapter(model, tmp_path / "a", r=8, target_modules=["q_proj", "v_proj"])
        run = cw.inject(copy.deepcopy(model), cw.RankLadder.from_peft(tmp_path / "a"), all_top_scheduler(8))
        model = run.model
    batch, seq, chunk, new = 2, 4 * SIGNAL_ROWS, 2 * SIGNAL_ROWS, 3
    ids, mask = ragged_prompt(batch=batch, seq=seq)
    own = _Rows(model.get_output_embeddings())
    cw.generate(run, ids, mask, max_new_tokens=new, prefill_chunk=chunk, score_prompt=score)
    own.close()
    assert max(projected, default=0) <= SIGNAL_ROWS and max(own.rows) == batch
    pad = int((mask == 0).sum(-1).max())
    chunks = 1 + -(-(seq - pad - chunk) // chunk)  # the first one covers the padding too
    assert chunks > 1
    assert sum(own.rows) == chunks * batch + (new - 1) * batch + batch  # logits_to_keep=1, decode, check
    sampled = (chunks - 1) * batch * PRIOR_SAMPLES if adapted else 0
    assert sum(projected) == sampled + (seq * batch if score else 0)
