"""chunkwise.vllm.steps: the scheduler over vLLM-style steps (requests that come, go, are
prefilled in chunks and decode one token a step) gives each request the decisions the scheduler
gives it alone: its prompt's plan, then a one-sequence decoder fed the entropy and surprisal of
the logits that predicted each token. vLLM itself runs it in scripts/vllm_export_check.py."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from chunkwise import ConfigError, Scheduler, SchedulerConfig
from chunkwise.schedule import entropy_from_logits, surprisal_from_logits
from chunkwise.vllm.steps import SCHEDULER_ENV, RequestRanks, scheduler_from_env

VOCAB = 50
FIELDS = ("rank", "lo", "gate_lo", "gate_hi", "scale")


def _scheduler() -> Scheduler:
    # short chunks on a 1-token grid, so decode ranks follow the logits within a few tokens
    return Scheduler(SchedulerConfig(rungs=(0, 2, 4, 8), min_len=2, max_len=16, granularity=1, crossfade=2))


class Request:
    """One request's tokens and the logits each token was sampled from (random, seeded)."""

    def __init__(self, seed: int, prompt: int, new: int) -> None:
        g = np.random.default_rng(seed)
        self.ids = g.integers(0, VOCAB, prompt + new).astype(np.int64)
        self.prompt = prompt
        # logits[k] predicted token prompt + k; sharp or flat rows so the ranks move, mostly
        # sharp for even seeds and mostly flat for odd ones, so requests differ
        sharp = g.random(new) < (0.8 if seed % 2 == 0 else 0.2)
        spread = np.where(sharp, 8.0, 0.3)[:, None]
        self.logits = (g.standard_normal((new, VOCAB)) * spread).astype(np.float32)

    def alone(self, sched: Scheduler) -> dict[str, np.ndarray]:
        """The decisions of the scheduler for this request alone (the oracle)."""
        plan = sched.plan([self.ids[: self.prompt]])
        out = {
            "rank": [plan.token_rank],
            "lo": [plan.token_lo],
            "gate_lo": [plan.gate_lo],
            "gate_hi": [plan.gate_hi],
            "scale": [np.repeat(plan.seg_scale, np.diff(plan.seg_offsets))],
        }
        dec = sched.decoder(1, plan.thresholds)
        for k in range(len(self.logits)):
            tok = self.ids[self.prompt + k : self.prompt + k + 1]
            row = self.logits[k : k + 1]
            dec.step(tok, entropy=entropy_from_logits(row), surprisal=surprisal_from_logits(row, tok))
            for f in FIELDS:
                out[f].append(getattr(dec, f).copy())
        return {f: np.concatenate(v) for f, v in out.items()}


def _drive(ranks: RequestRanks, reqs: dict[str, Request], schedule: list[list[tuple[str, int]]]) -> dict:
    """Runs vLLM-style steps: each step a list of (request, tokens scheduled); a request's
    position advances by what it ran. Returns each request's decisions in position order."""
    pos = dict.fromkeys(reqs, 0)
    got: dict[str, dict[str, list]] = {r: {f: [] for f in FIELDS} for r in reqs}
    width = max(len(r.ids) for r in reqs.values())
    for step in schedule:
        names = [name for name, _ in step]
        table = np.zeros((len(names), width), np.int32)  # vLLM's token_ids_cpu holds int32
        for i, name in enumerate(names):
            table[i, : len(reqs[name].ids)] = reqs[name].ids
        counts = np.array([c for _, c in step])
        starts = np.array([pos[n] for n in names])
        prompts = np.array([reqs[n].prompt for n in names])
        out = ranks.step(names, table, starts, counts, prompts)
        offsets = np.concatenate([[0], np.cumsum(counts)])
        for i, name in enumerate(names):
            for f in FIELDS:
                got[name][f].append(getattr(out, f)[offsets[i] : offsets[i + 1]])
            pos[name] += counts[i]
        # the logits each request samples its next token from (its last scheduled position)
        rows = []
        for name in names:
            k = pos[name] - reqs[name].prompt  # index of the token these logits predict
            inside = 0 <= k < len(reqs[name].logits)
            rows.append(reqs[name].logits[k] if inside else np.zeros(VOCAB, np.float32))
        ranks.record_logits(np.stack(rows))
    return {n: {f: np.concatenate(v) for f, v in d.items()} for n, d in got.items()}


def _check(got: dict, reqs: dict[str, Request], sched: Scheduler) -> None:
    for name, req in reqs.items():
        want = req.alone(sched)
        n = len(got[name]["rank"])
        for f in FIELDS:
            np.testing.assert_allclose(got[name][f], want[f][:n], rtol=0, atol=1e-7, err_msg=f"{name}.{f}")


def test_one_request_prefill_then_decode_equals_the_scheduler_alone():
    reqs = {"a": Request(0, 40, 24)}
    schedule = [[("a", 40)]] + [[("a", 1)]] * 24
    got = _drive(RequestRanks(_scheduler()), reqs, schedule)
    _check(got, reqs, _scheduler())
    assert len(set(got["a"]["rank"][40:].tolist())) > 1, "the decode ranks should move on these logits"


def test_chunked_prefill_and_a_changing_batch_give_each_request_its_own_decisions():
    reqs = {"a": Request(1, 40, 20), "b": Request(2, 25, 20), "c": Request(3, 33, 8)}
    schedule = (
        [[("a", 16)], [("a", 16), ("b", 10)], [("a", 8), ("b", 15)]]  # chunked prefills
        + [[("a", 1), ("b", 1)]] * 3
        + [[("b", 1), ("c", 20), ("a", 1)], [("c", 13), ("a", 1), ("b", 1)]]  # c arrives, order changes
        + [[("c", 1), ("a", 1), ("b", 1)]] * 8
        + [[("a", 1), ("b", 1)]] * 5  # c finished
    )
    got = _drive(RequestRanks(_scheduler()), reqs, schedule)
    _check(got, reqs, _scheduler())
    decode = {n: got[n]["rank"][reqs[n].prompt :] for n in ("a", "b")}
    assert not np.array_equal(decode["a"], decode["b"]), "the requests should decode at other ranks"


def test_requests_without_a_lora_are_not_planned_and_do_not_disturb_the_others():
    reqs = {"a": Request(7, 24, 10), "b": Request(8, 16, 10)}
    ranks = RequestRanks(_scheduler())
    width = 40
    table = np.zeros((2, width), np.int32)
    table[0, :34], table[1, :26] = reqs["a"].ids, reqs["b"].ids
    active = np.array([True, False])
    out = ranks.step(["a", "b"], table, np.array([0, 0]), np.array([24, 16]), np.array([24, 16]), active)
    assert out.rank[24:].tolist() == [0] * 16  # b: no LoRA, nothing planned, nothing to weigh
    assert (out.scale[24:] == 1).all() and (out.gate_lo[24:] == 1).all() and (out.gate_hi[24:] == 1).all()
    got = [out.rank[:24]]
    for k in range(10):
        ranks.record_logits(np.stack([reqs["a"].logits[k], reqs["b"].logits[k]]))
        out = ranks.step(
            ["a", "b"], table, np.array([24 + k, 16 + k]), np.array([1, 1]), np.array([24, 16]), active
        )
        assert out.rank[1] == 0
        got.append(out.rank[:1])
    np.testing.assert_array_equal(np.concatenate(got), reqs["a"].alone(_scheduler())["rank"][:34])


def test_a_request_seen_again_beyond_its_plan_is_planned_over_its_tokens():
    """A preempted request recomputed as one chunk (prompt and outputs) is planned over them all
    (ids only), then decodes on."""
    reqs = {"a": Request(4, 24, 12)}
    ranks = RequestRanks(_scheduler())
    _drive(ranks, reqs, [[("a", 24)], [("a", 1)], [("a", 1)]])
    ranks.step(["other"], np.zeros((1, 64), np.int32), np.array([0]), np.array([8]), np.array([8]))  # a left
    table = reqs["a"].ids[None, :].astype(np.int32)
    out = ranks.step(["a"], table, np.array([0]), np.array([27]), np.array([24]))
    want = _scheduler().plan([reqs["a"].ids[:27]])
    np.testing.assert_array_equal(out.rank, want.token_rank)
    nxt = ranks.step(["a"], table, np.array([27]), np.array([1]), np.array([24]))
    assert nxt.n_tokens == 1


def test_trace_lines_name_each_request_and_its_ranks():
    trace = io.StringIO()
    ranks = RequestRanks(_scheduler(), trace)
    reqs = {"a": Request(5, 16, 2)}
    _drive(ranks, reqs, [[("a", 16)], [("a", 1)]])
    lines = [json.loads(x) for x in trace.getvalue().splitlines()]
    assert [(x["req"], x["start"], len(x["rank"])) for x in lines] == [("a", 0, 16), ("a", 16, 1)]


def test_logits_that_do_not_line_up_are_ignored():
    ranks = RequestRanks(_scheduler())
    reqs = {"a": Request(6, 16, 4)}
    _drive(ranks, reqs, [[("a", 16)]])
    ranks.record_logits(np.zeros((3, VOCAB), np.float32))  # 3 rows for a 1-request step: ignored
    table = reqs["a"].ids[None, :].astype(np.int32)
    out = ranks.step(["a"], table, np.array([16]), np.array([1]), np.array([16]))
    assert out.n_tokens == 1


def test_gated_tells_whether_a_rank_prefix_is_enough():
    reqs = {"a": Request(0, 40, 24)}
    out = RequestRanks(_scheduler()).step(
        ["a"], reqs["a"].ids[None, :].astype(np.int32), np.array([0]), np.array([40]), np.array([40])
    )
    ramps = (out.gate_lo != 1) | (out.gate_hi != 1)
    assert out.gated() == bool((ramps & (out.lo < out.rank) & (out.lo > 0)).any() or (out.scale != 1).any())


def test_the_scheduler_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(SCHEDULER_ENV, raising=False)
    assert scheduler_from_env() is None
    monkeypatch.setenv(SCHEDULER_ENV, '{"rungs": [0, 4, 8], "mode": "target", "target_mean_rank": 4}')
    s = scheduler_from_env()
    assert s is not None and s.config.rungs == (0, 4, 8) and s.config.mode == "target"


@pytest.mark.parametrize("raw", ["{", "[1]", '{"no_such_field": 1}', '{"rungs": [8, 4]}'])
def test_a_bad_scheduler_setting_is_refused_by_name(monkeypatch, raw):
    monkeypatch.setenv(SCHEDULER_ENV, raw)
    with pytest.raises(ConfigError, match=SCHEDULER_ENV) as e:
        scheduler_from_env()
    assert e.value.parameter == SCHEDULER_ENV
