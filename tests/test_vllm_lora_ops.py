"""chunkwise.vllm.lora_ops (the arithmetic of the vLLM wrapper) against a float64 per-token
reference of what vLLM's LoRA computes, rank-prefix mask included. vLLM itself is not needed:
scripts/vllm_export_check.py runs the wrapper inside vLLM."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from chunkwise.schedule import gate_matrix
from chunkwise.vllm.lora_ops import expand, group_tokens, live_rank, pack, shrink, uniform

MAX_LORAS, R, IN, OUTS = 3, 8, 12, (5, 7)


def _weights(four_d: bool, live: tuple[int, ...] = (8, 5, 8)) -> tuple[list, list]:
    """vLLM-style stacked A [max_loras, 1, R, in] and B [max_loras, 1, out, R] per slice, each
    slot's LoRA zero-padded beyond its live rank."""
    g = torch.Generator().manual_seed(0)
    a_all, b_all = [], []
    for out in OUTS:
        a = torch.randn(MAX_LORAS, 1, R, IN, generator=g)
        b = torch.randn(MAX_LORAS, 1, out, R, generator=g)
        for slot, r in enumerate(live):
            a[slot, :, r:] = 0
            b[slot, :, :, r:] = 0
        a_all.append(a if four_d else a[:, 0])
        b_all.append(b if four_d else b[:, 0])
    return a_all, b_all


def _reference(x, a_all, b_all, slots, ranks, scale, y0):
    """y0 + per token, per slice: B[slot][:, :rank] (scale · A[slot][:rank] x), float64."""
    y = y0.double().clone()
    offset = 0
    for a, b, out in zip(a_all, b_all, OUTS, strict=True):
        for t in range(x.shape[0]):
            s, r = int(slots[t]), int(ranks[t])
            if s < 0 or r == 0:
                continue
            aa = (a[s, 0] if a.ndim == 4 else a[s]).double()[:r]
            bb = (b[s, 0] if b.ndim == 4 else b[s]).double()[:, :r]
            y[t, offset : offset + out] += bb @ (scale * (aa @ x[t].double()))
        offset += out
    return y


def _rank_gates(ranks) -> torch.Tensor:
    """The gate matrix of per-token ranks alone (no cross-fade, scale 1)."""
    r = np.asarray(ranks, np.int32)
    one = np.ones(len(r), np.float32)
    return torch.from_numpy(gate_matrix(r, r, one, one, one, R))


def _run(x, a_all, b_all, groups, scale, y0, caps=None, add_inputs=True, packed=False, gates=None):
    """Shrink then expand of every slice, as vLLM's add_lora_linear; ``packed``: through
    lora_ops.pack (one gather and one scatter per layer)."""
    perm = None
    if packed:
        perm, groups = pack(groups)
        if perm is not None and gates is not None:
            gates = gates.index_select(0, perm)
    y = y0.clone()
    offset = 0
    for a, b, out in zip(a_all, b_all, OUTS, strict=True):
        h = torch.full((x.shape[0], R), float("nan"))  # shrink must overwrite every row
        shrink(h, x, a, groups, scale, caps, gates, perm)
        expand(y, h, b, groups, offset, out, add_inputs, caps, perm)
        offset += out
    return y


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("four_d", [True, False])
@pytest.mark.parametrize(
    "slots, ranks",
    [
        ([0, 0, 0, 1, 1, -1, 2, 2], [8, 8, 8, 3, 3, 8, 0, 0]),  # consecutive groups, no LoRA, rank 0
        ([1, 0, 1, 0, -1, 1, 2, 0], [4, 8, 4, 2, 8, 4, 6, 8]),  # scattered rows, per-token ranks
        ([2] * 8, [1, 2, 3, 4, 5, 6, 7, 8]),  # one LoRA, every rank
        ([-1] * 8, [8] * 8),  # no LoRA at all
    ],
)
def test_groups_match_the_per_token_reference(four_d, slots, ranks, packed):
    a_all, b_all = _weights(four_d)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(len(slots), IN, generator=g)
    y0 = torch.randn(len(slots), sum(OUTS), generator=g)
    slots_t, ranks_t = torch.tensor(slots), torch.tensor(ranks)
    groups = group_tokens(slots_t, ranks_t)
    # tokens below their LoRA group's rank: zero past their own (the wrapper's job)
    gates = None if uniform(groups, ranks_t) else _rank_gates(ranks)
    want = _reference(x, a_all, b_all, slots_t, ranks_t, 0.7, y0)
    got = _run(x, a_all, b_all, groups, 0.7, y0, packed=packed, gates=gates)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    # capped at each LoRA's live rank (the zero padding skipped): the same output
    caps = {s: live_rank(a_all[0], s, 0) for s in range(MAX_LORAS)}
    assert caps == {0: 8, 1: 5, 2: 8}
    capped = _run(x, a_all, b_all, groups, 0.7, y0, caps, packed=packed, gates=gates)
    torch.testing.assert_close(capped.double(), want, rtol=1e-5, atol=1e-5)


def test_groups_are_slices_when_consecutive_and_skip_idle_tokens():
    ranks = torch.tensor([4, 4, 8, 8, 2, 8, 0])
    groups = group_tokens(torch.tensor([0, 0, 1, 1, 0, -1, 2]), ranks)
    by_key = {(g.slot, g.rank): g.rows for g in groups}
    assert set(by_key) == {(0, 4), (1, 8)}  # one group per LoRA at its largest rank; slot -1
    assert by_key[(1, 8)] == slice(2, 4)  # and rank 0 are nobody's
    assert torch.equal(by_key[(0, 4)], torch.tensor([0, 1, 4]))
    assert not uniform(groups, ranks)  # token 4 runs at 2 in a rank-4 group: it needs gates
    assert uniform(groups, torch.tensor([4, 4, 8, 8, 4, 8, 0]))
    assert group_tokens(torch.tensor([-1, -1]), torch.tensor([8, 8])) == []


@pytest.mark.parametrize("packed", [False, True])
def test_gates_weigh_each_token_and_direction(packed):
    """The cross-fade gates (chunkwise.schedule.gate_matrix) against the float64 reference with
    the gate applied per token and direction."""
    from chunkwise.schedule import gate_matrix

    a_all, b_all = _weights(True)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, IN, generator=g)
    y0 = torch.randn(6, sum(OUTS), generator=g)
    slots = torch.tensor([0, 1, 0, 1, 2, 0])
    rank = np.array([8, 6, 8, 4, 5, 2], np.int32)
    lo = np.array([4, 6, 2, 4, 3, 2], np.int32)
    g_lo = np.array([0.5, 1.0, 0.25, 1.0, 0.8, 1.0], np.float32)
    g_hi = np.array([0.3, 1.0, 0.75, 1.0, 0.1, 1.0], np.float32)
    scale = np.array([1.0, 2.0, 1.0, 1.0, 0.5, 1.0], np.float32)
    gates = torch.from_numpy(gate_matrix(rank, lo, g_lo, g_hi, scale, R))
    groups = group_tokens(slots, torch.from_numpy(rank.astype(np.int64)))
    got = _run(x, a_all, b_all, groups, 1.0, y0, packed=packed, gates=gates)
    want = y0.double().clone()
    offset = 0
    for a, b, out in zip(a_all, b_all, OUTS, strict=True):
        for t in range(6):
            s = int(slots[t])
            h = gates[t].double() * (a[s, 0].double() @ x[t].double())
            want[t, offset : offset + out] += b[s, 0].double() @ h
        offset += out
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_pack_lays_groups_end_to_end():
    groups = group_tokens(torch.tensor([0, 1, 0, 1, -1, 2, 2]), torch.tensor([4, 8, 4, 8, 8, 2, 1]))
    perm, packed = pack(groups)
    assert perm is not None
    assert sorted(perm.tolist()) == [0, 1, 2, 3, 5, 6]  # every grouped row once, no idle row
    for g, p in zip(groups, packed, strict=True):
        rows = g.rows if isinstance(g.rows, torch.Tensor) else torch.arange(g.rows.start, g.rows.stop)
        assert (p.slot, p.rank) == (g.slot, g.rank)
        assert torch.equal(perm[p.rows], rows)
    consecutive = group_tokens(torch.tensor([0, 0, 1]), torch.tensor([4, 4, 4]))
    assert pack(consecutive) == (None, consecutive)


def test_expand_without_add_inputs_overwrites_its_block():
    a_all, b_all = _weights(True)
    x = torch.randn(4, IN)
    y0 = torch.randn(4, sum(OUTS))
    slots, ranks = torch.tensor([0, 0, -1, 1]), torch.tensor([8, 8, 8, 5])
    groups = group_tokens(slots, ranks)
    got = _run(x, a_all, b_all, groups, 1.0, y0, add_inputs=False)
    want = _reference(x, a_all, b_all, slots, ranks, 1.0, torch.zeros_like(y0))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_live_rank_finds_the_zero_padding():
    a = torch.zeros(2, 1, 8, 4)
    a[0, 0, :3] = 1.0
    a[0, 0, 1] = 0.0  # a zero row inside the live part does not end it
    assert live_rank(a, 0, 0) == 3
    assert live_rank(a, 1, 0) == 0
    b = torch.zeros(2, 1, 6, 8)
    b[1, 0, 2, 6] = -1.0
    assert live_rank(b, 1, 1) == 7


def test_group_order_does_not_change_a_token():
    """A token's output depends only on its own slot and rank, not on its batch-mates."""
    a_all, b_all = _weights(True)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, IN, generator=g)
    y0 = torch.zeros(6, sum(OUTS))
    slots, ranks = torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([8, 3, 5, 2, 5, 8])
    batch = _run(x, a_all, b_all, group_tokens(slots, ranks), 1.0, y0, gates=_rank_gates(ranks))
    for t in range(6):
        one = group_tokens(slots[t : t + 1], ranks[t : t + 1])
        alone = _run(x[t : t + 1], a_all, b_all, one, 1.0, y0[:1])
        torch.testing.assert_close(batch[t : t + 1], alone, rtol=1e-5, atol=1e-6)
