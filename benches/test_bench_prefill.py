"""CPU prefill of SmolLM2-135M with an r=64 all-linear LoRA (pytest-benchmark).

base, merged, PEFT unmerged, chunkwise at mean rank ~50 % (target mode) and chunkwise at the top
rung, on the same 512 held-out tokens, in one session. Ratios against PEFT land in the summary
(target: chunkwise <= 0.85x PEFT, reported, not asserted). `python -m benches.prefill_cpu` runs
the same comparison interleaved and adds perplexity; use it for the figures in notes.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any

import chunkwise as cw
import pytest
import torch

VARIANTS = ("base", "merged", "peft", "chunkwise_half", "chunkwise_top")


@pytest.fixture(scope="module")
def prefill() -> dict[str, Any]:
    from chunkwise.assets.smollm2 import load_smollm2
    from chunkwise.eval.benchmarking import random_adapter
    from peft import PeftModel

    from benches.prefill_cpu import held_out_ids

    base, tok = load_smollm2()
    adapter = random_adapter(base, 64, Path(tempfile.mkdtemp()))
    peft = PeftModel.from_pretrained(copy.deepcopy(base), str(adapter)).eval()
    merged = PeftModel.from_pretrained(copy.deepcopy(base), str(adapter)).merge_and_unload().eval()
    ladder = cw.RankLadder.from_peft(adapter)
    sched = cw.Scheduler(cw.SchedulerConfig(rungs=(0, 4, 8, 16, 32, 64), mode="target", target_mean_rank=32))
    cwm = cw.inject(copy.deepcopy(base), ladder, sched)
    batch = held_out_ids(tok, 512, allow_sample=True)[None]
    plan = cwm.plan_inputs(batch)
    half = cwm.token_plan(plan, batch)
    top = cwm.top_rung(batch)

    def under(tp: Any):
        def call() -> torch.Tensor:
            with cwm.use(tp):
                return cwm.model(input_ids=batch).logits

        return call

    calls = {
        "base": lambda: base(input_ids=batch).logits,
        "merged": lambda: merged(input_ids=batch).logits,
        "peft": lambda: peft(input_ids=batch).logits,
        "chunkwise_half": under(half),
        "chunkwise_top": under(top),
    }
    return {"calls": calls, "plan": plan, "tokens": batch.numel(), "vocab": base.config.vocab_size}


@pytest.mark.realmodel
@pytest.mark.parametrize("variant", VARIANTS)
def test_prefill(benchmark: Any, prefill: dict[str, Any], timings: Any, variant: str) -> None:
    benchmark.group = "SmolLM2-135M CPU prefill, 512 tokens, r=64 all-linear"
    call = prefill["calls"][variant]
    with torch.no_grad():
        out = benchmark.pedantic(call, rounds=5, warmup_rounds=1)
    assert out.shape == (1, prefill["tokens"], prefill["vocab"]) and torch.isfinite(out).all()
    if variant == "chunkwise_half":
        benchmark.extra_info["mean_rank"] = prefill["plan"].mean_rank()
        benchmark.extra_info["rung_histogram"] = prefill["plan"].rung_histogram().tolist()
    med = timings.record(f"prefill_{variant}", benchmark)
    peft = timings.median.get("prefill_peft")
    if med is not None and peft and variant.startswith("chunkwise"):
        timings.add_speedup(f"peft/{variant}", benchmark, peft, med, 1 / 0.85)
