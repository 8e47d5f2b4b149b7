"""The chunkwise scheduler over vLLM's batches: each token's rank, cross-fade gates and rung
scale, per request, as ``chunkwise.generate`` would choose them (no vLLM import here).

vLLM's batches come and go by request: a request is planned when it is first seen (its prompt,
ids-only signals: ``Scheduler.plan``, as chunkwise plans a prompt with no earlier chunk), its
prefill chunks are slices of that plan, and each decode step feeds its own one-sequence
``DecodeBatch`` with the token and the entropy and surprisal of the logits that predicted it
(recorded by the logits processor, :meth:`RequestRanks.record_logits`), thresholds from its
prompt's plan. A request that leaves the batch is forgotten; one seen again beyond its plan
(preempted and recomputed) is planned again over all its tokens so far.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import TextIO

import numpy as np

from ..errors import ConfigError, InputError
from ..schedule import (
    DecodeBatch,
    Scheduler,
    SchedulerConfig,
    entropy_from_logits,
    gates_one,
    surprisal_from_logits,
)

__all__ = ["SCHEDULER_ENV", "TRACE_ENV", "RequestRanks", "StepRanks", "scheduler_from_env", "shared"]

#: The environment variable that turns the scheduler on: a JSON object of
#: ``chunkwise.SchedulerConfig`` fields (``{}``: the defaults).
SCHEDULER_ENV = "CHUNKWISE_VLLM_SCHEDULER"
#: A file that each step's ranks are appended to as JSON lines (for checks; unset: none).
TRACE_ENV = "CHUNKWISE_VLLM_TRACE"

_FIELDS = ("rank", "lo", "gate_lo", "gate_hi", "scale")


@dataclasses.dataclass
class StepRanks:
    """One step's decisions per token, in vLLM's token order (requests in batch order, each
    request's scheduled tokens in position order)."""

    rank: np.ndarray  # int32
    lo: np.ndarray  # int32
    gate_lo: np.ndarray  # float32
    gate_hi: np.ndarray  # float32
    scale: np.ndarray  # float32

    @property
    def n_tokens(self) -> int:
        return len(self.rank)

    def gated(self) -> bool:
        """Whether any token's gates or scale differ from 1 (else a rank prefix says it all)."""
        ones = gates_one(self.rank, self.lo, self.gate_lo, self.gate_hi)
        return not bool(ones.all() and (self.scale == 1.0).all())


class _Request:
    """What is kept of one request between steps."""

    __slots__ = ("arrays", "decoder", "pending", "thresholds")

    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}  # per planned position
        self.thresholds: list[float] = []
        self.decoder: DecodeBatch | None = None  # a one-sequence decoder once decoding
        self.pending: tuple[float, np.ndarray] | None = None  # (entropy, logits row) of the last step


class RequestRanks:
    """Per-request scheduler state for a stream of vLLM steps (see the module docstring)."""

    def __init__(self, scheduler: Scheduler, trace: TextIO | None = None) -> None:
        self.scheduler = scheduler
        self.trace = trace
        self._requests: dict[str, _Request] = {}
        self._order: list[str] = []  # the request of each logits row of the last step

    def _plan(self, state: _Request, ids: np.ndarray) -> None:
        plan = self.scheduler.plan([np.ascontiguousarray(ids, dtype=np.int64)])
        scale = np.repeat(plan.seg_scale, np.diff(plan.seg_offsets)).astype(np.float32)
        state.arrays = {
            "rank": plan.token_rank,
            "lo": plan.token_lo,
            "gate_lo": plan.gate_lo,
            "gate_hi": plan.gate_hi,
            "scale": scale,
        }
        state.thresholds = [float(t) for t in plan.thresholds]
        state.decoder = None

    def _decode(self, state: _Request, token: int) -> dict[str, np.ndarray]:
        if state.decoder is None:
            state.decoder = self.scheduler.decoder(1, state.thresholds)
        ids = np.array([token], np.int64)
        entropy = surprisal = None
        if state.pending is not None:
            entropy = np.array([state.pending[0]], np.float32)
            surprisal = surprisal_from_logits(state.pending[1][None, :], ids).astype(np.float32)
        dec = state.decoder
        assert dec is not None
        dec.step(ids, entropy=entropy, surprisal=surprisal)
        return {k: getattr(dec, k).copy() for k in _FIELDS}

    def step(
        self,
        req_ids: list[str],
        token_ids: np.ndarray,
        starts: np.ndarray,
        counts: np.ndarray,
        prompt_lens: np.ndarray,
        active: np.ndarray | None = None,
    ) -> StepRanks:
        """The decisions for one step: request ``req_ids[i]`` (row i of ``token_ids``, all its
        tokens so far) runs its ``counts[i]`` tokens from position ``starts[i]``; its prompt is
        ``prompt_lens[i]`` tokens long. ``active[i]`` false (a request without a LoRA): not
        planned nor tracked, its tokens get rank 0 (default: every request active)."""
        n = len(req_ids)
        if not (len(starts) >= n and len(counts) >= n and len(prompt_lens) >= n and len(token_ids) >= n):
            raise InputError(f"req_ids: {n} requests but shorter per-request arrays", "req_ids")
        parts: dict[str, list[np.ndarray]] = {k: [] for k in _FIELDS}
        live: dict[str, _Request] = {}
        lines = []
        for i, rid in enumerate(req_ids):
            s, c, p = int(starts[i]), int(counts[i]), int(prompt_lens[i])
            if active is not None and not active[i]:
                for k in _FIELDS:  # rank 0, gates and scale 1: nothing to weigh
                    parts[k].append(np.zeros(c) if k in ("rank", "lo") else np.ones(c))
                continue
            state = self._requests.get(rid) or _Request()
            live[rid] = state
            planned = len(state.arrays.get("rank", ()))
            if c == 1 and s >= p and planned >= p > 0 and s >= planned:  # a decode step
                got = self._decode(state, int(token_ids[i, s]))
            else:
                if s + c > planned:  # first seen, or recomputed beyond its plan
                    self._plan(state, token_ids[i, : max(p, s + c)])
                got = {k: v[s : s + c] for k, v in state.arrays.items()}
            state.pending = None
            for k in _FIELDS:
                parts[k].append(got[k])
            if self.trace is not None:
                lines.append(json.dumps({"req": rid, "start": s, "rank": got["rank"].tolist()}))
        self._requests = live
        self._order = list(req_ids)
        if self.trace is not None and lines:
            self.trace.write("\n".join(lines) + "\n")
            self.trace.flush()
        out = {k: np.concatenate(v) if v else np.zeros(0) for k, v in parts.items()}
        return StepRanks(
            out["rank"].astype(np.int32),
            out["lo"].astype(np.int32),
            out["gate_lo"].astype(np.float32),
            out["gate_hi"].astype(np.float32),
            out["scale"].astype(np.float32),
        )

    def record_logits(self, logits: np.ndarray) -> None:
        """The logits the last step sampled from, one float32 row per request of that step (in
        its order): each row's entropy, and the row itself for the surprisal of the token it
        picks, wait for that request's next step. Rows that do not line up with the last step's
        requests (a warm-up, speculative rows) are ignored."""
        if logits.ndim != 2 or logits.shape[0] != len(self._order) or not self._requests:
            return
        mine = [(i, self._requests[rid]) for i, rid in enumerate(self._order) if rid in self._requests]
        rows = np.ascontiguousarray(logits[[i for i, _ in mine]], dtype=np.float32)
        entropy = entropy_from_logits(rows)
        for k, (_, state) in enumerate(mine):
            state.pending = (float(entropy[k]), rows[k])


def scheduler_from_env() -> Scheduler | None:
    """The scheduler of ``CHUNKWISE_VLLM_SCHEDULER`` (None when unset); a malformed value is a
    :class:`ConfigError` naming the variable."""
    raw = os.environ.get(SCHEDULER_ENV)
    if not raw:
        return None
    try:
        fields = json.loads(raw)
    except ValueError as e:
        raise ConfigError(f"{SCHEDULER_ENV}: not JSON ({e}): {raw[:80]!r}", SCHEDULER_ENV) from None
    if not isinstance(fields, dict):
        raise ConfigError(f"{SCHEDULER_ENV}: expected a JSON object of SchedulerConfig fields", SCHEDULER_ENV)
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    try:
        config = SchedulerConfig(**fields)
    except TypeError as e:
        raise ConfigError(f"{SCHEDULER_ENV}: {e}", SCHEDULER_ENV) from None
    except ConfigError as e:
        raise ConfigError(f"{SCHEDULER_ENV}: {e}", SCHEDULER_ENV) from None
    return Scheduler(config)


_SHARED: list[RequestRanks | None] = []


def shared() -> RequestRanks | None:
    """This process's :class:`RequestRanks` (made on first use from the environment), shared by
    the model runner's hook and the logits processor; None when the scheduler is off."""
    if not _SHARED:
        scheduler = scheduler_from_env()
        trace_path = os.environ.get(TRACE_ENV)
        trace = open(trace_path, "a", encoding="utf-8") if scheduler is not None and trace_path else None
        _SHARED.append(None if scheduler is None else RequestRanks(scheduler, trace))
    return _SHARED[0]
