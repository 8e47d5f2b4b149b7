"""Difficulty-aware generation: chunked prefill, streamed decode, a policy-driven KV cache.

With a :class:`~chunkwise.ChunkwiseModel`, every forward runs under a rank plan:

* prefill goes in chunks of ``prefill_chunk`` tokens (peak activation memory bounded by the
  chunk, not the prompt); each chunk is planned by the scheduler, with the previous chunk's
  mean predictive entropy as its entropy signal (what the logits said about how hard the text
  is, estimated at :data:`PRIOR_SAMPLES` evenly spaced columns of the chunk) — no extra
  forward pass, and the vocabulary is projected only at those columns and the last one (a
  stock ``generate`` projects the last one), unless every prompt token's signals are needed:
  ``score_prompt=True`` (the prompt's perplexity) or a plain model under a difficulty-ranking
  cache policy;
* decode feeds token t's signals (entropy of the logits that predicted it, its surprisal) to the
  scheduler's streaming mode, which picks the rung with hysteresis; the KV cache's difficulty-
  aware policy sees the same per-token difficulty and chunk ids.

A plain ``transformers`` model works too (no ranks; the cache sees the entropy as difficulty).
:func:`stream` yields one :class:`Step` per generated token; :func:`generate` collects them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from .errors import InputError, StateError
from .kv import KvPolicy, PolicyCache, left_padding, track_attention
from .nn import (
    ChunkwiseModel,
    DecodePlan,
    SignalRequest,
    TokenPlan,
    check_prompt,
    check_token_range,
    host_step,
    prefill_signals,
    torch_entropy_surprisal,
    vocab_size,
)

__all__ = ["PRIOR_SAMPLES", "Generation", "GenerationResult", "Step", "generate", "stream"]

#: Columns of a prefill chunk whose predictive entropy estimates its mean for the next chunk.
PRIOR_SAMPLES = 4


@dataclasses.dataclass
class Step:
    """One generated token per sequence."""

    #: int64 [batch] token ids (``pad_token_id`` for finished sequences).
    tokens: torch.Tensor
    #: int32 [batch] rank the token is processed at (-1 for a plain model).
    rank: np.ndarray
    #: float32 [batch] the token's difficulty (from the logits that predicted it).
    difficulty: np.ndarray
    #: bool [batch] sequences finished (EOS produced at or before this step).
    done: np.ndarray


@dataclasses.dataclass
class GenerationResult:
    """What :func:`generate` returns."""

    #: [batch, prompt + new] prompt (as given, left-padded) followed by the generated tokens.
    sequences: torch.Tensor
    #: [batch, new] rank of each generated token (-1: plain model).
    ranks: np.ndarray
    #: [batch, new] difficulty of each generated token.
    difficulty: np.ndarray
    #: Mean rank each prefill chunk ran at, per chunk (empty for a plain model).
    prefill_ranks: list[float]
    #: Rank of every real prompt token (empty for a plain model).
    prefill_token_ranks: np.ndarray
    #: The cache after generation (its ledger says which columns each sequence still holds).
    cache: PolicyCache
    prefill_seconds: float
    decode_seconds: float
    #: With ``score_prompt=True``: summed negative log-likelihood (nats) of the prompt tokens
    #: after the first real one of each row, as the model predicted them during prefill:
    #: through its ranks and what the cache policy kept (0 otherwise).
    prompt_nll: float = 0.0
    #: Prompt tokens in :attr:`prompt_nll`.
    prompt_scored: int = 0

    @property
    def prompt_perplexity(self) -> float:
        """Perplexity of the prompt under the model as it ran (ranks, cache policy, chunks);
        NaN unless generated with ``score_prompt=True``."""
        return math.exp(self.prompt_nll / self.prompt_scored) if self.prompt_scored else float("nan")

    @property
    def new_tokens(self) -> torch.Tensor:
        """[batch, new] the generated tokens."""
        return self.sequences[:, self.sequences.shape[1] - self.ranks.shape[1] :]


def _int_option(name: str, value: Any, lo: int, hi: int, optional: bool = False) -> None:
    """An int option in [lo, hi] (None allowed when ``optional``), else an InputError naming it."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or not lo <= value <= hi:
        allowed = f"an int in [{lo}, {hi}]" + (" or None" if optional else "")
        raise InputError(f"{name}: must be {allowed}, got {value!r}", name)


def _check_options(
    max_new_tokens: Any,
    prefill_chunk: Any,
    temperature: Any,
    top_k: Any,
    seed: Any,
    score_prompt: Any,
    policy: Any,
) -> None:
    """Refuses a generation option of the wrong type or range with an InputError naming it."""
    _int_option("max_new_tokens", max_new_tokens, 1, 2**31 - 1)
    _int_option("prefill_chunk", prefill_chunk, 1, 2**31 - 1, optional=True)
    try:
        t = float(temperature) if not isinstance(temperature, bool | str | bytes) else math.nan
    except (TypeError, ValueError, OverflowError):
        t = math.nan
    if not (math.isfinite(t) and t >= 0):
        raise InputError(f"temperature: must be a finite number >= 0, got {temperature!r}", "temperature")
    _int_option("top_k", top_k, 1, 2**63 - 1, optional=True)
    _int_option("seed", seed, 0, 2**63 - 1, optional=True)
    if not isinstance(score_prompt, bool | np.bool_):
        raise InputError(f"score_prompt: must be True or False, got {score_prompt!r}", "score_prompt")
    if policy is not None and not isinstance(policy, KvPolicy):
        hint = (
            f" (for a named policy use KvPolicy.named({policy!r}, budget))" if isinstance(policy, str) else ""
        )
        raise InputError(f"policy: must be a chunkwise.kv.KvPolicy or None, got {policy!r}{hint}", "policy")


def _scatter(mask: np.ndarray, values: np.ndarray, dtype: type) -> np.ndarray:
    """``values`` (one per True of ``mask``, row-major) laid onto a grid shaped like ``mask``."""
    grid: np.ndarray = np.zeros(mask.shape, dtype)
    grid[mask] = values
    return grid


def _pick(
    logits: torch.Tensor, temperature: float, top_k: int | None, gen: torch.Generator | None
) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    # shifted by the row max first: a tiny temperature then sends the others to -inf, not inf
    shifted = logits.float() - logits.float().amax(-1, keepdim=True)
    scaled = shifted / temperature
    if top_k is not None and top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, top_k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=gen).squeeze(-1).to(logits.device)


class Generation:
    """One generation in progress: iterate it for :class:`Step` s (see :func:`stream`). Once
    iterated, :attr:`cache`, :attr:`prefill_ranks` and the timings describe the run."""

    def __init__(
        self,
        model: Any,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        *,
        max_new_tokens: int,
        policy: KvPolicy | None,
        prefill_chunk: int | None,
        adapters: npt.ArrayLike | None,
        eos_token_id: int | None,
        pad_token_id: int,
        temperature: float,
        top_k: int | None,
        seed: int | None,
        score_prompt: bool = False,
    ) -> None:
        self.ids, self.mask = check_prompt(input_ids, attention_mask)
        _check_options(max_new_tokens, prefill_chunk, temperature, top_k, seed, score_prompt, policy)
        if self.mask.sum(-1).min().item() == 0:
            raise InputError("attention_mask: a sequence has no real token", "attention_mask")
        self.cwm = model if isinstance(model, ChunkwiseModel) else None
        self.hf = model.model if self.cwm is not None else model
        if not isinstance(self.hf, torch.nn.Module) or not hasattr(self.hf, "config"):
            raise InputError(
                f"model: expected a ChunkwiseModel or a transformers causal LM, got {type(model).__name__}",
                "model",
            )
        if self.cwm is None and adapters is not None:
            raise InputError(
                "adapters: only a ChunkwiseModel (several ladders) takes adapter ids", "adapters"
            )
        vocab = vocab_size(self.hf)
        _int_option("eos_token_id", eos_token_id, 0, vocab - 1, optional=True)
        _int_option("pad_token_id", pad_token_id, 0, vocab - 1)
        check_token_range(self.ids, vocab)
        self.batch = self.ids.shape[0]
        self.adapters = adapters
        self.ad = self.cwm.adapter_ids(adapters, self.batch) if self.cwm is not None else None
        # per row: each sequence evicts when it would alone (batch-invariant tokens); every
        # forward then passes the cache's own mask of the slots it holds
        self.cache = PolicyCache(policy, self.hf.config, self.mask, per_row=True)
        #: Left padding per row (one host copy of the mask, here, not per prefill chunk).
        self.pads = np.asarray(left_padding(self.mask), np.int64)
        self.score_prompt = bool(score_prompt)
        # every prompt position's signals: for the perplexity, or for a plain model's cache
        # difficulty when the policy ranks by it (a ChunkwiseModel books its plan's difficulty)
        self.every_column = self.score_prompt or (
            self.cwm is None and self.cache.policy.difficulty_weight > 0
        )
        self.max_new_tokens, self.prefill_chunk = max_new_tokens, prefill_chunk or self.ids.shape[1]
        self.eos, self.pad = eos_token_id, pad_token_id
        self.temperature, self.top_k = float(temperature), top_k
        self.gen = torch.Generator().manual_seed(seed) if seed is not None else None
        self.positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
        self.thresholds: Any = None
        #: Mean rank each prefill chunk ran at (empty for a plain model).
        self.prefill_ranks: list[float] = []
        self._prefill_token_ranks: list[np.ndarray] = []
        self.prefill_seconds = 0.0
        self.decode_seconds = 0.0
        #: Summed NLL (nats) of the prompt tokens predicted during prefill, and their count.
        self.prompt_nll = 0.0
        self.prompt_scored = 0
        self._started = False

    @property
    def prefill_token_ranks(self) -> np.ndarray:
        """Rank of every real prompt token (all rows, chunk by chunk; empty for a plain model)."""
        parts = self._prefill_token_ranks
        return np.concatenate(parts) if parts else np.zeros(0, np.int32)

    def __iter__(self) -> Iterator[Step]:
        if self._started:
            raise StateError(
                "Generation: already iterated (its cache holds that run); call chunkwise.stream again",
                "generation",
            )
        self._started = True
        scores = (
            track_attention(self.hf) if self.cache.policy.attention_weight > 0 else contextlib.nullcontext()
        )
        with torch.inference_mode(), scores:
            t0 = time.perf_counter()
            logits = self._prefill()
            self.prefill_seconds = time.perf_counter() - t0
            t0 = time.perf_counter()
            for step in self._decode(logits):
                self.decode_seconds += time.perf_counter() - t0
                yield step
                t0 = time.perf_counter()

    def _forward(
        self, ids: torch.Tensor, upto: torch.Tensor, pos: torch.Tensor, tp: TokenPlan | None
    ) -> torch.Tensor:
        ctx = self.cwm.use(tp) if self.cwm is not None else contextlib.nullcontext()
        with ctx:
            out = self.hf(
                input_ids=ids, attention_mask=upto, position_ids=pos, cache=self.cache, use_cache=True
            )
        return out.logits

    def _sample_columns(self, s: int, e: int) -> tuple[torch.Tensor, np.ndarray]:
        """Per row, :data:`PRIOR_SAMPLES` evenly spaced real columns of chunk [s, e) (counted
        from the row's first real column in it, so a row samples what it samples alone), as
        [batch, PRIOR_SAMPLES] offsets into the chunk, and which of them count (a row with fewer
        real columns repeats its last one; a row with none has no valid sample)."""
        cols = np.zeros((self.batch, PRIOR_SAMPLES), np.int64)
        valid = np.zeros((self.batch, PRIOR_SAMPLES), bool)
        for b, pad in enumerate(self.pads):
            start = max(s, int(pad))
            n = e - start
            if n <= 0:
                continue
            offs = np.unique(np.linspace(0, n - 1, num=min(PRIOR_SAMPLES, n)).round().astype(np.int64))
            cols[b, : len(offs)], cols[b, len(offs) :] = start - s + offs, start - s + offs[-1]
            valid[b, : len(offs)] = True
        return torch.from_numpy(cols).to(self.ids.device), valid

    def _prefill_forward(
        self, s: int, e: int, tp: TokenPlan | None, sample: bool
    ) -> tuple[torch.Tensor, np.ndarray, Any]:
        """Prompt columns [s, e): (last logits, each row's mean entropy (nats) over its sampled
        columns, NaN for a row with no real token in the chunk or when not ``sample``d; entropy
        at every column or None); scores the prompt tokens if asked. Not sampling saves a pass
        over the LM head's weight (~24 ms for SmolLM2 on 2 CPU cores)."""
        requests: list[SignalRequest] = []
        if sample:
            sample_cols, sample_valid = self._sample_columns(s, e)
            requests.append((sample_cols, None))
        if self.every_column:
            nxt, nxt_real = self.ids[:, s + 1 : e + 1], self.mask[:, s + 1 : e + 1]
            if nxt.shape[1] < e - s:  # the prompt's last position has no next prompt token
                none = torch.zeros_like(self.ids[:, :1])
                nxt, nxt_real = torch.cat([nxt, none], 1), torch.cat([nxt_real, none], 1)
            requests.append((None, nxt if self.score_prompt else None))
        ctx = self.cwm.use(tp) if self.cwm is not None else contextlib.nullcontext()
        with ctx:
            last, signals = prefill_signals(
                self.hf,
                requests,
                input_ids=self.ids[:, s:e],
                attention_mask=self.cache.forward_mask(self.mask[:, s:e]),
                position_ids=self.positions[:, s:e],
                cache=self.cache,
                use_cache=True,
            )
        every = signals[-1] if self.every_column else (None, None)
        if every[1] is not None:
            scored = self.mask[:, s:e].bool() & nxt_real.bool()
            self.prompt_nll += float((every[1] * scored).sum())
            self.prompt_scored += int(scored.sum())
        mean = np.full(self.batch, np.nan)
        if sample:
            sampled = signals[0][0].float().cpu().numpy()
            with np.errstate(invalid="ignore", divide="ignore"):
                mean = (sampled * sample_valid).sum(-1) / sample_valid.sum(-1)  # NaN: no real token
        return last, mean, every[0]

    def _prefill(self) -> torch.Tensor:
        """Runs the prompt in chunks of ``prefill_chunk`` columns counted back from its end, so
        every row is cut where it would be alone (its first chunk is the remainder); returns the
        last position's logits."""
        t, chunk = self.ids.shape[1], self.prefill_chunk
        longest = t - int(self.pads.min())
        n = -(-longest // chunk)
        bounds = [0, *(t - k * chunk for k in range(n - 1, 0, -1)), t]
        prior = np.full(self.batch, np.nan)  # a row's previous chunk's mean entropy (NaN: none)
        last_ent: torch.Tensor | None = None
        logits = None
        for s, e in zip(bounds[:-1], bounds[1:], strict=True):
            m_c = self.mask[:, s:e]
            tp = self._plan_chunk(self.ids[:, s:e], m_c, prior) if self.cwm is not None else None
            # a chunk's sampled entropy is the next chunk's prior: the last chunk needs none
            logits, sampled, every = self._prefill_forward(s, e, tp, sample=self.cwm is not None and e < t)
            ln_v = math.log(logits.shape[-1])
            if self.cwm is None and every is not None:
                # token i's difficulty is the entropy of the logits that predicted it
                ent = (every / ln_v).clamp(0.0, 1.0)
                first = torch.zeros_like(ent[:, :1]) if last_ent is None else last_ent
                shifted = torch.cat([first, ent[:, :-1]], 1)
                self.cache.revise_difficulty((shifted * m_c.bool()).cpu().numpy())
                last_ent = ent[:, -1:]
            real = ~np.isnan(sampled)
            prior[real] = np.clip(sampled[real] / ln_v, 0.0, 1.0)
        assert logits is not None
        return logits

    def _plan_chunk(self, ids_c: torch.Tensor, m_c: torch.Tensor, prior: np.ndarray) -> TokenPlan:
        """Plans one prefill chunk; books its difficulty in the cache. A row's entropy signal is
        its previous chunk's mean entropy; a row starting in this chunk has none, as alone, so
        when some rows start here they are planned apart from the others (in threshold mode
        each sequence's plan is its own either way)."""
        assert self.cwm is not None
        n_real = m_c.sum(-1).cpu().numpy()
        starts = np.isnan(prior) & (n_real > 0)
        # rows with no token here (all padding) are not planned: nothing of theirs runs
        groups = [g for g in (np.flatnonzero(~starts & (n_real > 0)), np.flatnonzero(starts)) if len(g)]
        mask_np = m_c.cpu().numpy().astype(bool)
        grid = np.zeros(mask_np.shape, np.float32)
        ranks = np.zeros(mask_np.shape, np.int32)
        parts = []
        ad = self.cwm.adapter_ids(self.adapters, self.batch)
        for rows in groups:
            signals: dict[str, Any] = {}
            if not np.isnan(prior[rows]).all():
                p = np.nan_to_num(prior[rows])  # a row without tokens here reads no value
                signals["entropy"] = [
                    np.full(int(k), v, np.float32) for k, v in zip(n_real[rows], p, strict=True)
                ]
            idx = torch.from_numpy(rows).to(ids_c.device)
            plan = self.cwm.plan_inputs(
                ids_c.index_select(0, idx), m_c.index_select(0, idx), ad[rows], **signals
            )
            self.thresholds = plan.thresholds
            grid[rows] = _scatter(mask_np[rows], plan.difficulty, np.float32)
            ranks[rows] = _scatter(mask_np[rows], plan.token_rank, np.int32)
            parts.append((plan, rows))
        device, dtype = self.cwm.device_dtype()
        shape = (int(ids_c.shape[0]), int(ids_c.shape[1]))
        tp = TokenPlan.from_plans(parts, m_c, shape, ad, device, dtype)
        self.cache.set_difficulty(grid)
        token_ranks = ranks[mask_np]  # row by row, as one plan of the batch would list them
        self.prefill_ranks.append(float(token_ranks.mean()) if token_ranks.size else 0.0)
        self._prefill_token_ranks.append(token_ranks)
        return tp

    def _decode(self, logits: torch.Tensor) -> Iterator[Step]:
        decoder = self.cwm.scheduler.decoder(self.batch, self.thresholds) if self.cwm is not None else None
        dplan = None
        if self.cwm is not None and self.ad is not None:
            device, dtype = self.cwm.device_dtype()
            top = max(lad.max_rank for lad in self.cwm.ladders)
            dplan = DecodePlan(self.ad, top, device, dtype)  # buffers allocated once
        done = np.zeros(self.batch, bool)
        chunk_id = np.zeros(self.batch, np.uint64)
        one, pos = torch.ones_like(self.mask[:, :1]), self.positions[:, -1:]
        for step in range(self.max_new_tokens):
            tok = _pick(logits, self.temperature, self.top_k, self.gen)
            tok = torch.where(torch.from_numpy(done).to(tok.device), torch.full_like(tok, self.pad), tok)
            ent, sur = torch_entropy_surprisal(logits, tok, overwrite=True)  # logits: read for the last time
            assert sur is not None  # token ids were given
            ent_np, sur_np, tok_np = host_step(ent, sur, tok, logits.shape[-1])
            tp = None
            if decoder is not None:
                decoder.step(tok_np, entropy=ent_np, surprisal=sur_np)
                chunk_id += decoder.new_chunk.astype(np.uint64)
                rank, difficulty = decoder.rank.copy(), decoder.difficulty.copy()
                assert dplan is not None
                tp = dplan.update(decoder)
            else:
                rank, difficulty = np.full(self.batch, -1, np.int32), ent_np.astype(np.float32)
            if self.eos is not None:
                done = done | (tok_np == self.eos)
            yield Step(tok, rank, difficulty, done.copy())
            if done.all() or step == self.max_new_tokens - 1:
                return
            self.cache.set_difficulty(difficulty, chunk_id)
            pos = pos + 1
            logits = self._forward(tok[:, None], self.cache.forward_mask(one), pos, tp)[:, -1]


def stream(
    model: ChunkwiseModel | Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int = 64,
    policy: KvPolicy | None = None,
    prefill_chunk: int | None = 512,
    adapters: npt.ArrayLike | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int | None = None,
    score_prompt: bool = False,
) -> Generation:
    """A :class:`Generation` to iterate: each :class:`Step` is yielded as soon as its tokens
    are chosen (before the forward that processes them).

    Args:
        model: a :class:`ChunkwiseModel` (ranks chosen by its scheduler) or a plain causal LM.
        input_ids, attention_mask: the prompt, [batch, seq], left-padded.
        max_new_tokens: tokens to generate per sequence (fewer if all hit ``eos_token_id``).
        policy: what the KV cache keeps (default: everything).
        prefill_chunk: prompt tokens per prefill forward (None: the whole prompt at once).
        adapters: adapter id per sequence (multi-adapter models).
        eos_token_id, pad_token_id: a sequence stops at EOS and is padded afterwards.
        temperature, top_k, seed: sampling (temperature 0: greedy).
        score_prompt: also score every prompt token (the prompt's perplexity as the model ran
            it: :attr:`GenerationResult.prompt_perplexity`); costs the vocabulary projection
            of every prompt position, which is skipped otherwise.
    """
    return Generation(
        model,
        input_ids,
        attention_mask,
        max_new_tokens=max_new_tokens,
        policy=policy,
        prefill_chunk=prefill_chunk,
        adapters=adapters,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        temperature=temperature,
        top_k=top_k,
        seed=seed,
        score_prompt=score_prompt,
    )


def generate(
    model: ChunkwiseModel | Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    streamer: Callable[[Step], None] | None = None,
    **options: Any,
) -> GenerationResult:
    """Generates with per-token ranks (for a :class:`ChunkwiseModel`) and a policy KV cache;
    ``streamer`` is called with each :class:`Step` as it is produced. Options as in
    :func:`stream`."""
    unknown = sorted(set(options) - set(inspect.signature(stream).parameters))
    if unknown:
        raise InputError(
            f"{unknown[0]}: not an option of chunkwise.generate (see chunkwise.stream)", unknown[0]
        )
    run = stream(model, input_ids, attention_mask, **options)
    steps: list[Step] = []
    for step in run:
        steps.append(step)
        if streamer is not None:
            streamer(step)
    new = torch.stack([s.tokens for s in steps], dim=1)
    return GenerationResult(
        sequences=torch.cat([run.ids, new.to(run.ids.device)], dim=1),
        ranks=np.stack([s.rank for s in steps], axis=1),
        difficulty=np.stack([s.difficulty for s in steps], axis=1),
        prefill_ranks=run.prefill_ranks,
        prefill_token_ranks=run.prefill_token_ranks,
        cache=run.cache,
        prefill_seconds=run.prefill_seconds,
        decode_seconds=run.decode_seconds,
        prompt_nll=run.prompt_nll,
        prompt_scored=run.prompt_scored,
    )
