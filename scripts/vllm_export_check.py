#!/usr/bin/env python3
"""vLLM loads a chunkwise ladder written as a PEFT folder (``RankLadder.to_peft``) and runs it as
PEFT does: end to end on vLLM's CPU build, with a tiny random Llama (no download).

    bash scripts/vllm_env.sh .venv-vllm                          # once, ~1.5 min
    python scripts/vllm_export_check.py --vllm-python .venv-vllm/bin/python [--tp 2] [--json out.json]

The chunkwise side (this interpreter) builds the model and a PEFT adapter with mixed ranks
(rank_pattern, alpha_pattern, rsLoRA), converts it to a ladder, writes the ladder as a PEFT
folder in full and cut to rank 2, and runs PEFT's own greedy decode on each folder (the
oracle). The vLLM side (``--vllm-python``, its own environment: vLLM pins transformers < 5.20)
generates greedily with a ``LoRARequest`` per folder. Checks, fp32: vLLM on the original
adapter, on the full export and on the rank-2 export gives PEFT's tokens for each; the full
export's log-probabilities match the original adapter's, under PEFT and under vLLM, within 1e-4
(absolute); the rank-2 cut really changes the output. Then once more with chunkwise's vLLM
plugin (``CHUNKWISE_VLLM_RANKS``, :mod:`chunkwise.vllm`): the full export at plugin rank 2 gives
vLLM's output on the rank-2 export, at rank 0 the base model's, and with no rank given vLLM's
own; and one batch mixing those LoRAs, ranks and no LoRA gives each request what it gave alone
(plugin checks: equal tokens, log-probabilities as close to PEFT's as vLLM's own, see
:func:`compare_plugin`). PEFT, the oracle, runs in float64. Then with the plugin's scheduler
(``CHUNKWISE_VLLM_SCHEDULER`` = :data:`SCHEDULER`, ranks traced): the three prompts in one vLLM
batch give ``chunkwise.generate``'s greedy tokens for each prompt alone and the same rank for every
token run. With ``--tp 2`` the plugin and scheduler runs are repeated at tensor-parallel size 2
(one core per rank) and must give the single-process tokens (log-probabilities within 1e-4 of the
step's scale) and the same ranks in every worker. Exit 0 when all hold, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from chunkwise.vllm import RANKS_ENV, SCHEDULER_ENV, TRACE_ENV

PROMPTS = ["The quick brown fox jumps over", "Hello, my name is", "Rome was founded in"]
N_TOKENS = 16
N_LOGPROBS = 5
FOLDERS = ("original", "export_full", "export_r2")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def build(work: Path) -> None:
    """The tiny model (SmolLM2's tokenizer), the adapter and its two exports under ``work``."""
    import chunkwise
    import torch
    from chunkwise.assets.smollm2 import smollm2_dir
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    src = smollm2_dir()
    model_dir = work / "model"
    model_dir.mkdir()
    for f in TOKENIZER_FILES:
        shutil.copy(src / f, model_dir / f)
    tok = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,  # vLLM's CPU attention takes head sizes 32, 64, 80, ... (not 16)
        intermediate_size=128,
        vocab_size=len(tok),
        max_position_embeddings=512,
        tie_word_embeddings=False,
        initializer_range=0.2,  # clear margins between the top two logits
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    LlamaForCausalLM(cfg).eval().save_pretrained(model_dir, safe_serialization=True)
    tok.save_pretrained(model_dir)
    lora = LoraConfig(
        r=8,
        lora_alpha=12,
        use_rslora=True,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
        rank_pattern={"v_proj": 4, r"layers\.1\.mlp\.down_proj": 2},
        alpha_pattern={"o_proj": 20.0},
        task_type="CAUSAL_LM",
    )
    pm = get_peft_model(LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32), lora)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 if "lora_B" in name else 0.2))
    pm.peft_config["default"].base_model_name_or_path = str(model_dir)
    pm.save_pretrained(work / "original")
    ladder = chunkwise.RankLadder.from_peft(work / "original")
    ladder.to_peft(work / "export_full")
    ladder.to_peft(work / "export_r2", rank=2)


def peft_greedy(work: Path) -> dict:
    """PEFT's greedy tokens and log-probabilities per folder and prompt, in float64 (no cache, no
    EOS stop)."""
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(work / "model")
    out: dict = {}
    for folder in FOLDERS:
        base = LlamaForCausalLM.from_pretrained(work / "model", dtype=torch.float64)
        m = PeftModel.from_pretrained(base, str(work / folder)).eval().double()
        out[folder] = []
        for prompt in PROMPTS:
            ids = tok(prompt)["input_ids"]
            tokens, logprobs = [], []
            with torch.no_grad():
                for _ in range(N_TOKENS):
                    lp = torch.log_softmax(m(input_ids=torch.tensor([ids])).logits[0, -1].double(), -1)
                    t = int(lp.argmax())
                    tokens.append(t)
                    logprobs.append(lp)
                    ids = [*ids, t]
            out[folder].append({"tokens": tokens, "logprobs": logprobs})
    return out


def chunkwise_scheduled(work: Path) -> list[dict]:
    """chunkwise.generate on the full export's ladder under :data:`SCHEDULER`, each prompt alone:
    greedy tokens, the prompt's ranks and the rank of each generated token that is run."""
    import chunkwise as cw
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(work / "model")
    model = LlamaForCausalLM.from_pretrained(work / "model", dtype=torch.float32).eval()
    sched = cw.Scheduler(
        cw.SchedulerConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in SCHEDULER.items()})
    )
    cwm = cw.inject(model, cw.RankLadder.from_peft(work / "export_full"), sched)
    out = []
    for prompt in PROMPTS:
        ids = torch.tensor([tok(prompt)["input_ids"]])
        res = cw.generate(cwm, ids, torch.ones_like(ids), max_new_tokens=N_TOKENS, prefill_chunk=None)
        out.append(
            {
                "ids": ids[0].tolist(),
                "tokens": res.new_tokens[0].tolist(),
                # the last token is sampled, never run
                "ranks": res.prefill_token_ranks.reshape(-1).tolist() + res.ranks[0, :-1].tolist(),
            }
        )
    return out


#: internal: the tensor-parallel size the vLLM side runs at (``--tp``)
TP_ENV = "CHUNKWISE_CHECK_TP"


def _tp() -> int:
    return int(os.environ.get(TP_ENV, "1"))


def _suffix() -> str:
    """The result files of a tensor-parallel run get their own names."""
    return "" if _tp() == 1 else f"_tp{_tp()}"


def _llm(work: Path, max_loras: int) -> Any:
    """vLLM on the tiny model, fp32, eager, at the tensor-parallel size of :func:`_tp`."""
    from vllm import LLM

    tp = {} if _tp() == 1 else {"tensor_parallel_size": _tp(), "distributed_executor_backend": "mp"}
    return LLM(
        model=str(work / "model"),
        enable_lora=True,
        max_lora_rank=64,
        max_loras=max_loras,
        enforce_eager=True,
        dtype="float32",
        max_model_len=256,
        max_num_seqs=4,
        **tp,
    )


def vllm_scheduler_side(work: Path) -> int:
    """Runs in vLLM's environment with the plugin's scheduler on (``CHUNKWISE_VLLM_SCHEDULER``,
    ranks traced to ``CHUNKWISE_VLLM_TRACE``): the prompts of work/scheduled.json in one batch on
    the full export, greedy, written to work/vllm_scheduler.json."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    ref = json.loads((work / "scheduled.json").read_text())
    llm = _llm(work, 1)
    sp = SamplingParams(temperature=0.0, max_tokens=N_TOKENS, ignore_eos=True, logprobs=N_LOGPROBS)
    request = LoRARequest("export_full", 1, str(work / "export_full"))
    prompts = [TokensPrompt(prompt_token_ids=r["ids"]) for r in ref]
    outs = llm.generate(prompts, sp, lora_request=request)
    (work / f"vllm_scheduler{_suffix()}.json").write_text(
        json.dumps([list(o.outputs[0].token_ids) for o in outs])
    )
    return 0


def compare_scheduler(ref: list[dict], tokens: list[list[int]], trace: list[dict]) -> dict:
    """vLLM with the plugin's scheduler against chunkwise.generate: each prompt's greedy tokens
    and the rank of every token run (the prompt's, then each generated one), from the trace."""
    # each worker process writes its own lines (one per tensor-parallel rank): they must agree
    steps: dict[tuple[str, int], list[list[int]]] = {}
    for line in trace:
        steps.setdefault((line["req"], line["start"]), []).append(line["rank"])
    agree = all(all(r == seen[0] for r in seen) for seen in steps.values())
    runs: dict[str, list[int]] = {}
    for (req, _), seen in sorted(steps.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        runs.setdefault(req, []).extend(seen[0])
    # a request's trace ends with the prompt and N_TOKENS - 1 generated tokens; warm-up
    # requests (vLLM's own) have other lengths
    ours = [r for r in runs.values() if len(r) in {len(x["ids"]) + N_TOKENS - 1 for x in ref}]
    summary: dict = {"tokens_match": [a == b["tokens"] for a, b in zip(tokens, ref, strict=True)]}
    summary["ranks_match"] = [any(r == x["ranks"] for r in ours) for x in ref]
    summary["ranks_used"] = sorted({v for x in ref for v in x["ranks"]})
    summary["workers_agree"] = agree
    summary["ok"] = (
        all(summary["tokens_match"])
        and all(summary["ranks_match"])
        and len(summary["ranks_used"]) > 2
        and agree
    )
    return summary


#: the plugin run: LoRA id -> (folder, rank the plugin gives it; None: not in its table)
PLUGIN_RUNS = {2: ("export_full", None), 4: ("export_full", 2), 5: ("export_full", 0)}
#: the scheduler run: short chunks on a 1-token grid and thresholds where this random model's
#: difficulty lies, so ranks 8, 2 and 0 and cross-fades between them all occur within 16 tokens;
#: rungs above a module's rank (v_proj 4, one down_proj 2) are clamped to it, as chunkwise does
SCHEDULER = {
    "rungs": [0, 2, 4, 8],
    "thresholds": [0.74, 0.78, 0.82],
    "hysteresis": 0.01,
    "min_len": 2,
    "max_len": 16,
    "granularity": 1,
    "crossfade": 2,
}
#: the plugin's mixed batch: (prompt index, LoRA id or 0 for none) per request, in one generate
MIXED = [(0, 2), (1, 4), (2, 5), (0, 0), (1, 2), (2, 4), (0, 5), (1, 0)]


def vllm_side(work: Path, plugin: bool) -> int:
    """Runs in vLLM's environment: greedy generation without LoRA and per LoRA, written to
    work/vllm.json, or with the chunkwise plugin's rank table (:data:`PLUGIN_RUNS`) to
    work/vllm_plugin.json."""
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    runs = {i: (folder, None) for i, folder in enumerate(FOLDERS, start=1)} if not plugin else PLUGIN_RUNS
    t0 = time.perf_counter()
    llm = _llm(work, len(runs))
    load_s = time.perf_counter() - t0
    sp = SamplingParams(temperature=0.0, max_tokens=N_TOKENS, ignore_eos=True, logprobs=N_LOGPROBS)
    result: dict = {"load_s": load_s}
    for lora_id, (folder, _) in [(0, ("base", None)), *runs.items()]:
        request = None if lora_id == 0 else LoRARequest(f"{folder}-{lora_id}", lora_id, str(work / folder))
        outs = llm.generate(PROMPTS, sp, lora_request=request)
        result[str(lora_id) if plugin else folder] = [
            {
                "tokens": list(o.outputs[0].token_ids),
                "logprobs": [{str(t): lp.logprob for t, lp in d.items()} for d in o.outputs[0].logprobs],
            }
            for o in outs
        ]
    if plugin:  # every LoRA and rank of the table, and no LoRA, in one call: vLLM batches them together
        requests = [
            None if i == 0 else LoRARequest(f"{runs[i][0]}-{i}", i, str(work / runs[i][0])) for _, i in MIXED
        ]
        outs = llm.generate([PROMPTS[k] for k, _ in MIXED], sp, lora_request=requests)
        result["mixed"] = [
            {
                "tokens": list(o.outputs[0].token_ids),
                "logprobs": [{str(t): lp.logprob for t, lp in d.items()} for d in o.outputs[0].logprobs],
            }
            for o in outs
        ]
    (work / (f"vllm_plugin{_suffix()}.json" if plugin else "vllm.json")).write_text(json.dumps(result))
    return 0


def relative_gap(a: list[dict], b: list[dict]) -> float:
    """The largest |difference| of two vLLM runs' log-probabilities relative to the largest
    |log-probability| listed at that step (the scale of that step's logits): what the plugin's own
    arithmetic (matmuls per group instead of vLLM's einsum per token) may move, < 1e-5 in fp32."""
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        for d, e in zip(x["logprobs"], y["logprobs"], strict=True):
            scale = max(abs(v) for v in (*d.values(), *e.values()))
            for t in d.keys() & e.keys():
                worst = max(worst, abs(d[t] - e[t]) / scale)
    return worst


def peft_gap(run: list[dict], ref: list[dict]) -> float:
    """The largest |difference| of a vLLM run's log-probabilities from PEFT's float64 ones."""
    worst = 0.0
    for g, r in zip(run, ref, strict=True):
        for step, d in enumerate(g["logprobs"]):
            for t, lp in d.items():
                worst = max(worst, abs(lp - float(r["logprobs"][step][int(t)])))
    return worst


def logprob_gap(a: list[dict], b: list[dict]) -> float:
    """The largest |difference| of two vLLM runs' log-probabilities over the tokens both list."""
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        for d, e in zip(x["logprobs"], y["logprobs"], strict=True):
            for t in d.keys() & e.keys():
                worst = max(worst, abs(d[t] - e[t]))
    return worst


def compare_plugin(got: dict, plug: dict, ref: dict) -> dict:
    """With the plugin: a LoRA it gives no rank runs as without it, rank 2 on the full export
    as vLLM on the rank-2 export, rank 0 as no LoRA. "As": the same greedy tokens, and
    log-probabilities within fp32 rounding of PEFT's float64 ones, where the rounding scale is
    vLLM's own largest error over the three folders and "within" is 4x that: the plugin
    multiplies group by group (MKL's GEMM), vLLM token by token (einsum), so their roundings
    differ, and this small random model amplifies them (vLLM's own: ~3e-5 to ~1e-4)."""
    summary: dict = {}
    ok = True
    rounding = max(peft_gap(got[folder], ref[folder]) for folder in FOLDERS)
    summary["vllm_own_max_abs_logprob_diff_vs_peft_f64"] = rounding
    for key, lora_id, want in (
        ("plugin_no_rank_equals_vllm", "2", "export_full"),
        ("plugin_rank2_equals_vllm_rank2_export", "4", "export_r2"),
    ):
        match = [g["tokens"] == w["tokens"] for g, w in zip(plug[lora_id], got[want], strict=True)]
        ours = peft_gap(plug[lora_id], ref[want])
        summary[key] = {
            "tokens_match": match,
            "max_abs_logprob_diff_vs_vllm": logprob_gap(plug[lora_id], got[want]),
            "max_abs_logprob_diff_vs_peft_f64": ours,
        }
        ok &= all(match) and ours <= 4 * rounding
    match = [g["tokens"] == w["tokens"] for g, w in zip(plug["5"], got["base"], strict=True)]
    gap = logprob_gap(plug["5"], got["base"])
    summary["plugin_rank0_equals_vllm_base"] = {"tokens_match": match, "max_abs_logprob_diff": gap}
    ok &= all(match) and gap == 0.0
    # the mixed batch: each request as it ran alone (same LoRA and rank, same prompt)
    alone = [plug[str(i)][k] for k, i in MIXED]
    match = [g["tokens"] == w["tokens"] for g, w in zip(plug["mixed"], alone, strict=True)]
    gap, rel = logprob_gap(plug["mixed"], alone), relative_gap(plug["mixed"], alone)
    summary["plugin_mixed_batch_equals_each_alone"] = {
        "tokens_match": match,
        "max_abs_logprob_diff": gap,
        "max_rel_logprob_diff": rel,
    }
    ok &= all(match) and rel < 1e-4
    summary["plugin_base_equals_vllm_base"] = [
        g["tokens"] == w["tokens"] for g, w in zip(plug["0"], got["base"], strict=True)
    ]
    ok &= all(summary["plugin_base_equals_vllm_base"])
    summary["ok"] = bool(ok)
    return summary


def compare(ref: dict, got: dict) -> dict:
    """The checks of the module docstring, as a JSON-able summary with ``ok``."""
    summary: dict = {"vllm_load_s": round(got["load_s"], 1)}
    ok = True
    for folder in FOLDERS:
        match = [g["tokens"] == r["tokens"] for g, r in zip(got[folder], ref[folder], strict=True)]
        summary[f"{folder}_tokens_match_peft"] = match
        ok &= all(match)
    # the full export under vLLM against the ORIGINAL adapter under PEFT, every top-5 logprob
    worst = peft_gap(got["export_full"], ref["original"])
    summary["export_full_max_abs_logprob_diff_vs_original_peft"] = worst
    ok &= worst < 1e-4
    # the same, both under vLLM (one engine, one kernel path): what the export alone changes
    same_engine = logprob_gap(got["export_full"], got["original"])
    summary["export_full_max_abs_logprob_diff_vs_original_vllm"] = same_engine
    ok &= same_engine < 1e-4
    cut_differs = [a["tokens"] != b["tokens"] for a, b in zip(ref["export_r2"], ref["original"], strict=True)]
    summary["rank2_cut_changes_tokens"] = cut_differs
    ok &= any(cut_differs)
    summary["ok"] = bool(ok)
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vllm-python", type=Path, help="vLLM environment's python (scripts/vllm_env.sh)")
    p.add_argument("--json", type=Path, help="write the summary here too")
    p.add_argument(
        "--tp",
        type=int,
        default=1,
        help="also run the plugin's checks at this tensor-parallel size (vLLM's mp executor, one "
        "core per rank) against its own single-process results (default: 1, not run)",
    )
    p.add_argument("--vllm-side", type=Path, help=argparse.SUPPRESS)  # internal: run the vLLM half
    args = p.parse_args(argv)
    if args.vllm_side is not None:
        if os.environ.get(SCHEDULER_ENV):
            return vllm_scheduler_side(args.vllm_side)
        return vllm_side(args.vllm_side, plugin=bool(os.environ.get(RANKS_ENV)))
    if args.vllm_python is None or not args.vllm_python.exists():
        p.error(f"--vllm-python: {args.vllm_python} does not exist (build it with scripts/vllm_env.sh)")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        build(work)
        ref = peft_greedy(work)
        side = [str(args.vllm_python), __file__, "--vllm-side", str(work)]
        ours = (RANKS_ENV, SCHEDULER_ENV, TRACE_ENV)
        env = {k: v for k, v in os.environ.items() if k not in ours} | {"VLLM_CPU_KVCACHE_SPACE": "1"}
        subprocess.run(side, check=True, env=env)
        got = json.loads((work / "vllm.json").read_text())
        summary = compare(ref, got)
        ranks = {str(i): r for i, (_, r) in PLUGIN_RUNS.items() if r is not None}
        subprocess.run(side, check=True, env=env | {RANKS_ENV: json.dumps(ranks)})
        plugin = compare_plugin(got, json.loads((work / "vllm_plugin.json").read_text()), ref)
        summary["ok"] = summary["ok"] and plugin.pop("ok")
        summary["plugin"] = plugin
        scheduled = chunkwise_scheduled(work)
        (work / "scheduled.json").write_text(json.dumps(scheduled))
        trace = work / "trace.jsonl"
        on = {SCHEDULER_ENV: json.dumps(SCHEDULER), TRACE_ENV: str(trace)}
        subprocess.run(side, check=True, env=env | on)
        sched = compare_scheduler(
            scheduled,
            json.loads((work / "vllm_scheduler.json").read_text()),
            [json.loads(x) for x in trace.read_text().splitlines()],
        )
        summary["ok"] = summary["ok"] and sched.pop("ok")
        summary["plugin_scheduler_equals_chunkwise_generate"] = sched
        if args.tp > 1:
            cores = "|".join(str(i % (os.cpu_count() or 1)) for i in range(args.tp))  # a core per rank
            tp_env = env | {TP_ENV: str(args.tp), "VLLM_CPU_OMP_THREADS_BIND": cores}
            subprocess.run(side, check=True, env=tp_env | {RANKS_ENV: json.dumps(ranks)})
            subprocess.run(side, check=True, env=tp_env | on | {TRACE_ENV: str(work / "trace_tp.jsonl")})
            one = json.loads((work / "vllm_plugin.json").read_text())
            many = json.loads((work / f"vllm_plugin_tp{args.tp}.json").read_text())
            tp_sum: dict = {}
            for key in [*(str(i) for i in PLUGIN_RUNS), "mixed"]:
                match = [a["tokens"] == b["tokens"] for a, b in zip(many[key], one[key], strict=True)]
                tp_sum[key] = {
                    "tokens_match": match,
                    "max_rel_logprob_diff": relative_gap(many[key], one[key]),
                }
                summary["ok"] = summary["ok"] and all(match) and tp_sum[key]["max_rel_logprob_diff"] < 1e-4
            tp_sched = compare_scheduler(
                scheduled,
                json.loads((work / f"vllm_scheduler_tp{args.tp}.json").read_text()),
                [json.loads(x) for x in (work / "trace_tp.jsonl").read_text().splitlines()],
            )
            summary["ok"] = summary["ok"] and tp_sched.pop("ok")
            tp_sum["scheduler_equals_chunkwise_generate"] = tp_sched
            summary[f"plugin_tp{args.tp}_equals_tp1"] = tp_sum
    print(json.dumps(summary, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
