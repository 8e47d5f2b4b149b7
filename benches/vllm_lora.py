"""vLLM's own LoRA path beside chunkwise's vLLM plugin, on vLLM's CPU build (issue 14, part 4).

    bash scripts/vllm_env.sh .venv-vllm                      # once, ~1.5 min
    python -m benches.vllm_lora --vllm-python .venv-vllm/bin/python [--rounds 3] [--json out.json]

SmolLM2-135M-Instruct (fp32, ``enforce_eager``, no prefix caching), eight random r=64 all-linear
LoRAs written as PEFT folders by ``RankLadder.to_peft`` (so a rank-k prefix is the best rank-k
truncation), 16 concurrent requests of 64 prompt tokens and ``--new-tokens`` greedy tokens each,
one ``LLM.generate`` call per measurement. Three vLLM processes, each timing its own base model
(no LoRA request) interleaved with its LoRA rows, so each row's overhead is over the base of the
same process:

- ``vllm``: vLLM's own CPU LoRA path (no plugin);
- ``chunkwise_full``: the plugin with every LoRA at its full rank (``CHUNKWISE_VLLM_RANKS='{}'``):
  the same arithmetic as vLLM's, grouped by LoRA instead of token by token;
- ``chunkwise_half``: the plugin at rank 32 of 64 (mean rank 50 %) for every token;
- ``chunkwise_sched``: the plugin with the chunkwise scheduler choosing each token's rank
  (``CHUNKWISE_VLLM_SCHEDULER``, target mean rank 32 per prompt, decode by the logits' entropy
  and surprisal); the mean ranks it ran are read back from its trace.

Rows: one adapter (all 16 requests on LoRA 1) and eight (request i on LoRA 1 + i % 8). Per row:
prefill (a 1-token generation), decode ms per step (the rest of a full generation over its
steps) and output tokens per second; next to it, how many greedy tokens each row shares with
vLLM's own (the adapters are random, for timing: the rank-32 cut's agreement says what the cut
changes, not what a trained adapter loses). The prompts are the bundled sample text, not held-out
data: a timing run, not a quality figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# chunkwise.vllm's variables (not imported: the driver stays light, the worker runs in vLLM's env)
RANKS_ENV, SCHEDULER_ENV, TRACE_ENV = (
    "CHUNKWISE_VLLM_RANKS",
    "CHUNKWISE_VLLM_SCHEDULER",
    "CHUNKWISE_VLLM_TRACE",
)
N_ADAPTERS, REQUESTS, PROMPT_TOKENS, TOP_RANK = 8, 16, 64, 64

#: process -> the plugin's settings it runs with (none: vLLM alone)
PROCESSES: dict[str, dict[str, str]] = {
    "vllm": {},
    "chunkwise_full": {RANKS_ENV: "{}"},
    "chunkwise_half": {RANKS_ENV: json.dumps({str(i): TOP_RANK // 2 for i in range(1, N_ADAPTERS + 1)})},
    "chunkwise_sched": {SCHEDULER_ENV: json.dumps({"mode": "target", "target_mean_rank": TOP_RANK // 2})},
}
#: row -> the LoRA id of each request (0: none)
ROWS = {
    "base": [0] * REQUESTS,
    "lora_1": [1] * REQUESTS,
    "lora_8": [1 + i % N_ADAPTERS for i in range(REQUESTS)],
}


def build(work: Path) -> None:
    """The adapters (PEFT exports of random ladders) and the prompts' token ids, under ``work``."""
    import chunkwise as cw
    from chunkwise.assets import sample_text
    from chunkwise.assets.smollm2 import load_smollm2, smollm2_dir
    from chunkwise.eval.benchmarking import random_adapter

    model, tok = load_smollm2()
    for i in range(N_ADAPTERS):
        src = random_adapter(model, TOP_RANK, work / f"peft-{i}", seed=i)
        cw.RankLadder.from_peft(src).to_peft(work / f"lora-{i + 1}")
    ids = tok(sample_text() * 4, return_tensors="pt").input_ids[0]
    prompts = [ids[i * 11 : i * 11 + PROMPT_TOKENS].tolist() for i in range(REQUESTS)]
    (work / "setup.json").write_text(json.dumps({"model": str(smollm2_dir()), "prompts": prompts}))


def worker(work: Path, name: str, rounds: int, new: int) -> int:
    """Runs in vLLM's environment: every row of :data:`ROWS`, interleaved, ``rounds`` times."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    setup = json.loads((work / "setup.json").read_text())
    t0 = time.perf_counter()
    llm = LLM(
        model=setup["model"],
        enable_lora=True,
        max_loras=N_ADAPTERS,
        max_cpu_loras=N_ADAPTERS,
        max_lora_rank=TOP_RANK,
        enforce_eager=True,
        dtype="float32",
        max_model_len=PROMPT_TOKENS + new + 8,
        max_num_seqs=REQUESTS,
        max_num_batched_tokens=REQUESTS * PROMPT_TOKENS,
        enable_prefix_caching=False,
    )
    load_s = time.perf_counter() - t0
    prompts = [TokensPrompt(prompt_token_ids=p) for p in setup["prompts"]]

    def requests(ids: list[int]) -> list:
        return [None if i == 0 else LoRARequest(f"lora-{i}", i, str(work / f"lora-{i}")) for i in ids]

    def timed(ids: list[int], tokens: int) -> tuple[float, list]:
        sp = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
        t = time.perf_counter()
        outs = llm.generate(prompts, sp, lora_request=requests(ids), use_tqdm=False)
        return time.perf_counter() - t, [list(o.outputs[0].token_ids) for o in outs]

    trace = os.environ.get(TRACE_ENV)
    times: dict[str, dict[str, list[float]]] = {r: {"prefill": [], "generate": []} for r in ROWS}
    tokens: dict[str, list] = {}
    mean_rank: dict[str, dict[str, float]] = {}
    for row, ids in ROWS.items():  # warm-up (loads every LoRA into its slot)
        start = os.path.getsize(trace) if trace and os.path.exists(trace) else 0
        tokens[row] = timed(ids, new)[1]
        if trace and row != "base":
            mean_rank[row] = _mean_ranks(Path(trace), start)
    for _ in range(rounds):
        for row, ids in ROWS.items():
            times[row]["prefill"].append(timed(ids, 1)[0])
            times[row]["generate"].append(timed(ids, new)[0])
    result = {"load_s": load_s, "rows": {}}
    for row in ROWS:
        p, g = statistics.median(times[row]["prefill"]), statistics.median(times[row]["generate"])
        result["rows"][row] = {
            "prefill_ms": 1e3 * p,
            "decode_ms_per_step": 1e3 * (g - p) / max(new - 1, 1),
            "tokens_per_s": REQUESTS * new / g,
            "tokens": tokens[row],
        }
        if row in mean_rank:
            result["rows"][row]["mean_rank"] = mean_rank[row]
    (work / f"{name}.json").write_text(json.dumps(result))
    return 0


def _mean_ranks(trace: Path, start: int) -> dict[str, float]:
    """Mean scheduler rank of the prompt tokens and of the generated tokens run, from the trace
    lines written after byte ``start`` (one generation's steps)."""
    with trace.open("rb") as f:
        f.seek(start)
        lines = [json.loads(x) for x in f.read().decode().splitlines() if x.strip()]
    prompt = [r for x in lines if x["start"] < PROMPT_TOKENS for r in x["rank"]]
    decode = [r for x in lines if x["start"] >= PROMPT_TOKENS for r in x["rank"]]
    return {
        "prefill": round(sum(prompt) / max(len(prompt), 1), 2),
        "decode": round(sum(decode) / max(len(decode), 1), 2),
    }


def _agreement(a: list, b: list) -> float:
    pairs = [(x, y) for s, t in zip(a, b, strict=True) for x, y in zip(s, t, strict=True)]
    return sum(x == y for x, y in pairs) / len(pairs)


def summarise(runs: dict[str, dict]) -> dict:
    """Each row's overhead over its own process's base, its ratio to vLLM's own overhead, and
    its greedy agreement with vLLM's own tokens."""
    out: dict = {}
    for name, run in runs.items():
        base = run["rows"]["base"]
        rows = {}
        for row, r in run["rows"].items():
            rows[row] = {k: round(v, 2) if isinstance(v, float) else v for k, v in r.items() if k != "tokens"}
            if row != "base":
                rows[row]["prefill_x_base"] = round(r["prefill_ms"] / base["prefill_ms"], 3)
                rows[row]["decode_x_base"] = round(r["decode_ms_per_step"] / base["decode_ms_per_step"], 3)
                rows[row]["greedy_agreement_with_vllm"] = round(
                    _agreement(r["tokens"], runs["vllm"]["rows"][row]["tokens"]), 3
                )
        out[name] = {"load_s": round(run["load_s"], 1), "rows": rows}
    for name in runs:
        if name == "vllm":
            continue
        for row in ROWS:
            if row == "base":
                continue
            for phase in ("prefill", "decode"):
                ours = out[name]["rows"][row][f"{phase}_x_base"] - 1
                theirs = out["vllm"]["rows"][row][f"{phase}_x_base"] - 1
                ratio = round(ours / theirs, 3) if theirs > 0 else None
                out[f"{name}_{row}_{phase}_overhead_vs_vllm"] = ratio
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vllm-python", type=Path, help="vLLM environment's python (scripts/vllm_env.sh)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds per process (default: 3)")
    p.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per request (default: 32)")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--worker", nargs=2, metavar=("WORK", "NAME"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is not None:
        return worker(Path(args.worker[0]), args.worker[1], args.rounds, args.new_tokens)
    if args.vllm_python is None or not args.vllm_python.exists():
        p.error(f"--vllm-python: {args.vllm_python} does not exist (build it with scripts/vllm_env.sh)")
    if args.rounds < 1 or args.new_tokens < 2:
        p.error("--rounds must be >= 1 and --new-tokens >= 2")
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        build(work)
        ours = (RANKS_ENV, SCHEDULER_ENV, TRACE_ENV)
        env = {k: v for k, v in os.environ.items() if k not in ours} | {"VLLM_CPU_KVCACHE_SPACE": "2"}
        for name, settings in PROCESSES.items():
            print(f"== {name}: vLLM{' + chunkwise plugin ' + json.dumps(settings) if settings else ''}")
            cmd = [str(args.vllm_python), "-m", "benches.vllm_lora", "--worker", str(work), name]
            cmd += ["--rounds", str(args.rounds), "--new-tokens", str(args.new_tokens)]
            extra = settings | ({TRACE_ENV: str(work / f"{name}.trace")} if SCHEDULER_ENV in settings else {})
            subprocess.run(cmd, check=True, env=env | extra, cwd=Path(__file__).resolve().parent.parent)
            runs[name] = json.loads((work / f"{name}.json").read_text())
    summary = summarise(runs)
    print(json.dumps(summary, indent=1))
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
