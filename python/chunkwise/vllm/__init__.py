"""chunkwise inside vLLM: a ``vllm.general_plugins`` entry point (issue 14's plugin).

vLLM calls :func:`register` in every one of its processes before it builds its LoRA punica
wrapper. When ``CHUNKWISE_VLLM_RANKS`` is set (a JSON object: vLLM ``lora_int_id`` → rank; ``{}``
runs every LoRA at its full rank), :func:`register` points the CPU platform's punica wrapper at
:class:`chunkwise.vllm.punica.RankPrefixPunicaCPU`: the tokens of a step are grouped by LoRA and
rank once, and each group runs two matmuls on its LoRA's rank prefix
(:mod:`chunkwise.vllm.lora_ops`) instead of vLLM's CPU ops, which copy every token's whole
weight. On a folder written by ``RankLadder.to_peft`` the rank-k prefix is the best rank-k
truncation. Without the variable, or with a vLLM built for another platform, vLLM behaves
exactly as without the plugin.

With ``CHUNKWISE_VLLM_SCHEDULER`` set too (a JSON object of ``chunkwise.SchedulerConfig`` fields,
``{}`` for the defaults) every token's rank comes from the chunkwise scheduler, per request, as
``chunkwise.generate`` picks it (:mod:`chunkwise.vllm.steps`): the prompt planned from its ids,
each decode token from the entropy and surprisal of the logits that predicted it (read by the
logits processor :class:`chunkwise.vllm.logits.EntropyLogitsProcessor`, entry point
``vllm.logits_processors``), cross-fade gates and rung scales included; ``CHUNKWISE_VLLM_RANKS``
then caps each LoRA. ``CHUNKWISE_VLLM_TRACE=FILE`` appends each step's ranks to FILE (JSON lines).
See docs/architecture.md, "The vLLM plugin".

May import: ``chunkwise.errors``; vLLM and torch, inside functions (vLLM is not a dependency).
"""

from __future__ import annotations

import json
import os

from ..errors import ConfigError
from .steps import SCHEDULER_ENV, TRACE_ENV, scheduler_from_env

__all__ = ["RANKS_ENV", "SCHEDULER_ENV", "TRACE_ENV", "ranks_from_env", "register"]

#: The environment variable holding the rank of each LoRA (JSON: {"<lora_int_id>": rank}).
RANKS_ENV = "CHUNKWISE_VLLM_RANKS"

_WRAPPER = "chunkwise.vllm.punica.RankPrefixPunicaCPU"


def ranks_from_env() -> dict[int, int]:
    """The ranks of ``CHUNKWISE_VLLM_RANKS`` by LoRA id ({} when unset); a malformed value is a
    :class:`ConfigError` naming it."""
    raw = os.environ.get(RANKS_ENV)
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError as e:
        raise ConfigError(f"{RANKS_ENV}: not JSON ({e}): {raw[:80]!r}", RANKS_ENV) from None
    if not isinstance(value, dict):
        raise ConfigError(
            f"{RANKS_ENV}: expected a JSON object of lora_int_id -> rank, got {raw[:80]!r}", RANKS_ENV
        )
    out = {}
    for k, v in value.items():
        if not (isinstance(k, str) and k.isdigit()) or isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ConfigError(f"{RANKS_ENV}: entry {k!r}: {v!r} is not a lora_int_id -> rank >= 0", RANKS_ENV)
        out[int(k)] = v
    return out


def register() -> None:
    """The entry point: installs the rank-prefix wrapper on vLLM's CPU platform when
    ``CHUNKWISE_VLLM_RANKS`` or ``CHUNKWISE_VLLM_SCHEDULER`` is set, ``{}`` included, and with the
    scheduler the model runner's hook (both checked here, so a bad value fails vLLM's start)."""
    scheduled = bool(os.environ.get(SCHEDULER_ENV))
    if not os.environ.get(RANKS_ENV) and not scheduled:
        return
    ranks_from_env()
    scheduler_from_env()
    from vllm.platforms.cpu import CpuPlatform

    CpuPlatform.get_punica_wrapper = classmethod(lambda cls: _WRAPPER)
    if scheduled:
        from .punica import hook_model_runner

        hook_model_runner()
