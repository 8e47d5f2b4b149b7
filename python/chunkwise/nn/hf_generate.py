""":meth:`ChunkwiseModel.generate`: transformers' own ``generate``, each token at the rank the
scheduler picks for it.

transformers' ``generate`` owns the loop (sampling, logits processors, stopping criteria,
streamers, ``return_dict_in_generate``, left-padded batches); chunkwise only decides, before
each forward of the model, which plan it runs under. Two forward hooks on the transformers
model do it, installed for the call and removed afterwards:

* the first forward (the prefill) is planned by the scheduler from its token ids, as
  :func:`chunkwise.generate` plans a prompt that fits one prefill chunk
  (``prefill_chunk=None``), and starts the scheduler's streaming decoder with that plan's
  thresholds;
* every later forward processes one new token per sequence: the decoder is stepped with that
  token, the entropy of the raw logits that predicted it (kept by the post-hook from the
  previous forward, before any logits processor) and its surprisal — exactly what
  :func:`chunkwise.generate` feeds it — and the forward runs under the resulting rank.

With a :class:`~chunkwise.kv.PolicyCache` (``cache=`` / ``past_key_values=``, or built from
``policy=``), the hooks also book each token's difficulty and chunk in it and replace the
attention mask by the cache's own (a cache that evicts holds fewer columns than transformers'
growing mask). So greedy tokens and ranks equal :func:`chunkwise.generate`'s for the same
model, scheduler, prompt and policy; :attr:`ChunkwiseModel.last_trace` holds the ranks.

What cannot follow a per-sequence decoder is refused up front with an :class:`InputError`:
beam search (it reorders sequences), assisted / prompt-lookup decoding and chunked prefill
(forwards of several tokens after the prefill), ``inputs_embeds`` (the scheduler plans from
token ids), ``use_cache=False`` and a cache that already holds tokens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..errors import InputError, StateError
from ..kv import KvPolicy, PolicyCache, left_padding, track_attention
from .prompt import check_prompt, check_token_range, vocab_size
from .signals import host_step, torch_entropy_surprisal
from .token_plan import DecodePlan

if TYPE_CHECKING:
    from .injection import ChunkwiseModel

__all__ = ["REFUSED_OPTIONS", "RankTrace", "generate"]

#: generate options chunkwise cannot honour, and why (checked against the effective
#: generation config: the model's, a ``generation_config`` given, then the keyword arguments).
REFUSED_OPTIONS: dict[str, str] = {
    "num_beams": "beam search reorders sequences; the rank decoder and the KV books are per sequence",
    "num_beam_groups": "beam search reorders sequences; the rank decoder and the KV books are per sequence",
    "assistant_model": "assisted decoding forwards several candidate tokens per step",
    "prompt_lookup_num_tokens": "prompt-lookup decoding forwards several candidate tokens per step",
    "assistant_early_exit": "self-speculative decoding forwards several candidate tokens per step",
    "prefill_chunk_size": "transformers' chunked prefill would be planned chunk by chunk without a signal; "
    "use chunkwise.generate(prefill_chunk=...)",
    "custom_generate": "a custom decoding loop is not driven by chunkwise's hooks",
    "penalty_alpha": "contrastive search re-runs candidate tokens",
}


@dataclasses.dataclass
class RankTrace:
    """The ranks of one :meth:`ChunkwiseModel.generate` call (rows as in its output)."""

    #: int32 [batch, new]: the rank each generated token was (or, for the last, would be)
    #: processed at, as in :attr:`chunkwise.GenerationResult.ranks`.
    ranks: np.ndarray
    #: float32 [batch, new]: each generated token's difficulty (from the logits that predicted it).
    difficulty: np.ndarray
    #: int32: the rank of every real prompt token, row by row.
    prefill_token_ranks: np.ndarray
    #: The KV cache the generation ran with (a PolicyCache, a transformers cache, or None).
    cache: Any = None
    #: Seconds spent in chunkwise's hooks (planning, decoder steps, plan updates, cache books):
    #: what ChunkwiseModel.generate adds to transformers' loop, besides the LoRA work itself.
    hook_seconds: float = 0.0
    #: Forwards the hooks planned (the prefill, then one per decode step).
    forwards: int = 0

    @property
    def prefill_rank(self) -> float:
        """Mean rank of the real prompt tokens."""
        return float(self.prefill_token_ranks.mean()) if self.prefill_token_ranks.size else 0.0


def _effective(name: str, kwargs: dict[str, Any], config: Any) -> Any:
    """An option as generate would read it: keyword, else the generation config given, else
    the model's own generation config."""
    if name in kwargs:
        return kwargs[name]
    for gc in (kwargs.get("generation_config"), config):
        if gc is not None and hasattr(gc, name):
            return getattr(gc, name)
    return None


def _refuse_options(kwargs: dict[str, Any], model_config: Any) -> None:
    for name, why in REFUSED_OPTIONS.items():
        value = _effective(name, kwargs, model_config)
        unset = value is None or value is False or (name in ("num_beams", "num_beam_groups") and value == 1)
        if not unset:
            raise InputError(f"{name}: not supported by ChunkwiseModel.generate ({why}), got {value!r}", name)
    if _effective("use_cache", kwargs, model_config) is False:
        raise InputError(
            "use_cache: ChunkwiseModel.generate needs the KV cache (each forward after the prefill must "
            "process only the new token)",
            "use_cache",
        )
    if "inputs_embeds" in kwargs:
        raise InputError(NO_EMBEDS, "inputs_embeds")


NO_EMBEDS = "inputs_embeds: the scheduler plans from token ids; pass input_ids"


class _Driver:
    """The state of one generate call, advanced by the model's forward hooks."""

    def __init__(self, cwm: ChunkwiseModel, adapters: np.ndarray, cache: PolicyCache | None) -> None:
        self.cwm = cwm
        self.adapters = adapters
        self.policy_cache = cache
        self.decoder: Any = None
        self.dplan: DecodePlan | None = None
        self.logits: torch.Tensor | None = None
        self.plan_ctx = contextlib.ExitStack()
        self.prefill_ranks = np.zeros(0, np.int32)
        self.ranks: list[np.ndarray] = []
        self.difficulty: list[np.ndarray] = []
        self.chunk_id = np.zeros(0, np.uint64)
        self.hook_seconds = 0.0
        self.forwards = 0

    # -- hooks -----------------------------------------------------------------------------
    def pre(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        t0 = time.perf_counter()
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise InputError(
                "inputs_embeds: the scheduler plans from token ids; pass input_ids", "inputs_embeds"
            )
        mask = kwargs.get("attention_mask")
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.ndim != 2):
            raise InputError(
                "attention_mask: ChunkwiseModel.generate needs a 2-D padding mask", "attention_mask"
            )
        if self.decoder is None:
            tp, new_mask = self._prefill(ids, mask)
        else:
            tp, new_mask = self._step(ids)
        if self.policy_cache is not None:
            kwargs["attention_mask"] = self.policy_cache.forward_mask(new_mask)
        self.plan_ctx.enter_context(self.cwm.use(tp))
        self.forwards += 1
        self.hook_seconds += time.perf_counter() - t0
        return args, kwargs

    def post(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        t0 = time.perf_counter()
        self.plan_ctx.close()
        logits = output.logits if hasattr(output, "logits") else output[0]
        self.logits = logits[:, -1]
        self.hook_seconds += time.perf_counter() - t0

    # -- steps -----------------------------------------------------------------------------
    def _prefill(self, ids: torch.Tensor, mask: torch.Tensor | None) -> tuple[Any, torch.Tensor]:
        batch = int(ids.shape[0])
        m = torch.ones_like(ids) if mask is None else mask.long()
        if len(self.adapters) != batch:  # num_return_sequences: generate repeats each row in place
            self.adapters = np.repeat(self.adapters, batch // len(self.adapters))
        ad = self.adapters
        plan = self.cwm.plan_inputs(ids, m, ad)
        tp = self.cwm.token_plan(plan, ids, m, ad)
        self.decoder = self.cwm.scheduler.decoder(batch, plan.thresholds)
        device, dtype = self.cwm.device_dtype()
        self.dplan = DecodePlan(ad, max(lad.max_rank for lad in self.cwm.ladders), device, dtype)
        self.chunk_id = np.zeros(batch, np.uint64)
        self.prefill_ranks = np.asarray(plan.token_rank, np.int32).copy()
        if self.policy_cache is not None:
            real = m.detach().cpu().numpy().astype(bool)
            if self.policy_cache.padding is not None and list(self.policy_cache.padding) != left_padding(m):
                raise InputError(
                    "cache: its attention_mask (padding per row) differs from generate's attention_mask",
                    "cache",
                )
            if self.policy_cache.padding is None and not real.all():
                raise InputError(
                    "cache: the prompt is padded; build the PolicyCache with its attention_mask", "cache"
                )
            grid = np.zeros(real.shape, np.float32)
            grid[real] = plan.difficulty
            self.policy_cache.set_difficulty(grid)
        return tp, m

    def _decide(self, tokens: torch.Tensor) -> None:
        """Steps the decoder with each row's newest token (predicted by :attr:`logits`)."""
        assert self.logits is not None and self.decoder is not None
        ent, sur = torch_entropy_surprisal(self.logits, tokens)
        assert sur is not None  # token ids were given
        ent_np, sur_np, tok_np = host_step(ent, sur, tokens, self.logits.shape[-1])
        self.decoder.step(tok_np, entropy=ent_np, surprisal=sur_np)
        self.chunk_id += self.decoder.new_chunk.astype(np.uint64)
        self.ranks.append(self.decoder.rank.copy())
        self.difficulty.append(self.decoder.difficulty.copy())

    def _step(self, ids: torch.Tensor) -> tuple[Any, torch.Tensor]:
        if ids.shape[1] != 1:
            raise StateError(
                f"ChunkwiseModel.generate: a forward of {ids.shape[1]} tokens after the prefill; only "
                "one new token per sequence and step can be planned",
                "input_ids",
            )
        self._decide(ids[:, 0])
        assert self.dplan is not None
        tp = self.dplan.update(self.decoder)
        if self.policy_cache is not None:
            self.policy_cache.set_difficulty(self.difficulty[-1], self.chunk_id)
        return tp, torch.ones_like(ids)

    def trace(self, sequences: torch.Tensor, prompt_len: int, cache: Any) -> RankTrace:
        """The trace once generate returned ``sequences``; the last token, which no forward
        processed, gets the rank the decoder gives it."""
        new = sequences[:, prompt_len:]
        if self.decoder is not None and len(self.ranks) < new.shape[1]:
            self._decide(
                new[:, len(self.ranks)].to(self.logits.device if self.logits is not None else new.device)
            )
        n = new.shape[1]
        batch = sequences.shape[0]
        ranks = np.stack(self.ranks[:n], 1) if n else np.zeros((batch, 0), np.int32)
        diff = np.stack(self.difficulty[:n], 1) if n else np.zeros((batch, 0), np.float32)
        return RankTrace(
            ranks.astype(np.int32),
            diff.astype(np.float32),
            self.prefill_ranks,
            cache,
            hook_seconds=self.hook_seconds,
            forwards=self.forwards,
        )


def _cache_option(kwargs: dict[str, Any], model: Any, mask: torch.Tensor) -> PolicyCache | None:
    """The PolicyCache of the call (given, or built from ``policy=``), put under ``cache``."""
    policy = kwargs.pop("policy", None)
    given = [k for k in ("cache", "past_key_values") if kwargs.get(k) is not None]
    if len(given) == 2:
        raise InputError("cache: give cache= or past_key_values= (the same thing), not both", "cache")
    cache = kwargs.pop(given[0]) if given else None
    kwargs.pop("past_key_values", None)
    if policy is not None:
        if not isinstance(policy, KvPolicy):
            raise InputError(f"policy: must be a chunkwise.kv.KvPolicy or None, got {policy!r}", "policy")
        if cache is not None:
            raise InputError("policy: give a policy or a cache, not both", "policy")
        cache = PolicyCache(policy, model.config, mask, per_row=True)
    if cache is not None:
        if cache.get_seq_length() > 0:
            raise InputError(
                "cache: already holds tokens; ChunkwiseModel.generate plans a fresh prompt, pass a new cache",
                "cache",
            )
        kwargs["cache"] = cache
    return cache if isinstance(cache, PolicyCache) else None


def generate(
    cwm: ChunkwiseModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    adapters: Any = None,
    **kwargs: Any,
) -> tuple[Any, RankTrace]:
    """Runs ``cwm.model.generate`` under the scheduler's ranks; returns what it returns and the
    :class:`RankTrace` (see :meth:`ChunkwiseModel.generate`)."""
    ids, mask = check_prompt(input_ids, attention_mask)
    check_token_range(ids, vocab_size(cwm.model))
    left_padding(mask)  # right padding would be planned as text
    model: Any = cwm.model  # a transformers model (generate, generation_config)
    _refuse_options(kwargs, getattr(model, "generation_config", None))
    ad = cwm.adapter_ids(adapters, int(ids.shape[0]))
    policy_cache = _cache_option(kwargs, model, mask)
    driver = _Driver(cwm, ad, policy_cache)
    scores = (
        track_attention(model)
        if policy_cache is not None and policy_cache.policy.attention_weight > 0
        else contextlib.nullcontext()
    )
    pre = model.register_forward_pre_hook(driver.pre, with_kwargs=True)
    post = model.register_forward_hook(driver.post, with_kwargs=True)
    try:
        with scores, torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    finally:
        pre.remove()
        post.remove()
        driver.plan_ctx.close()
    sequences = out if isinstance(out, torch.Tensor) else out.sequences
    cache = kwargs.get("cache", getattr(out, "past_key_values", None))
    return out, driver.trace(sequences, int(ids.shape[1]), cache)
