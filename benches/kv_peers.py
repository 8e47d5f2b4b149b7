"""chunkwise's KV policies beside NVIDIA's kvpress presses on one long-context QA task.

    python -m benches.kv_peers [--questions 24] [--min-context 2048] [--json docs/kv_peers.json]

(from the repository root). The task: held-out squaddev questions (the evaluation side of the
article split every chunkwise result uses: ``split_by_article(..., 0.2, seed 0)``), each asked
after a long context made of its article's paragraphs — its own paragraph and the article's
others in order — until at least ``--min-context`` tokens, with the question at the end (the
chat prompt of :func:`chunkwise.eval.evaluation.squad_prompt`). Model: SmolLM2-135M-Instruct,
fp32, no adapter. Measure: the gold answer's NLL per token, teacher-forced after the question
(the base model's greedy EM is 0 on this task even with the full cache, so EM cannot tell the
caches apart; the answer NLL can), its change against the full cache with a paired bootstrap
95 % CI over the questions, and the KV bytes held once the context is cut.

Both sides run the same protocol, the one kvpress's pipeline uses: the context is prefilled in
one forward, then its KV cache is cut to the budget (25 % or 50 % of the context's tokens);
the question and the answer are then processed on top, uncompressed. kvpress's presses
(StreamingLLM, SnapKV, ExpectedAttention, Knorm) run in their own virtual environment, built
by this script on first use (kvpress pins ``transformers<5.3``; the venv reuses this
interpreter's torch through ``--system-site-packages`` and installs kvpress and its pinned
transformers on top); chunkwise's policies (sinks, H2O, difficulty, and the int8 sinks cache
at the same bytes) run here through :class:`chunkwise.kv.PolicyCache`. Both sides get the same
token ids. KV memory: the bytes of the keys and values held once the context is cut (both
precisions for int8).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
KVPRESS = "kvpress==0.5.5"
PRESSES = ("streaming_llm", "snapkv", "expected_attention", "knorm")
POLICIES = ("sinks", "h2o", "difficulty", "sinks-int8")
BUDGETS = (0.25, 0.5)


# -- the task (main environment) ---------------------------------------------------------------
def build_items(tok: Any, n: int, min_context: int, seed: int) -> list[dict[str, Any]]:
    """``n`` long-context questions (module docstring): prompt ids split at the context's end."""
    import numpy as np
    from chunkwise.assets.corpora import split_by_article, squad_examples
    from chunkwise.eval.evaluation import squad_prompt
    from chunkwise.eval.qa import end_of_turn_id

    _, held_out = split_by_article(squad_examples(), "title", eval_fraction=0.2, seed=0)
    paragraphs: dict[str, list[str]] = {}
    for ex in held_out:
        paras = paragraphs.setdefault(ex["title"], [])
        if ex["context"] not in paras:
            paras.append(ex["context"])
    order = np.random.default_rng(seed).permutation(len(held_out))
    items: list[dict[str, Any]] = []
    for i in order:
        ex = held_out[int(i)]
        others = [p for p in paragraphs[ex["title"]] if p != ex["context"]]
        parts = [ex["context"]]
        for p in others:
            if len(tok("\n\n".join(parts)).input_ids) >= min_context:
                break
            parts.append(p)
        context = "\n\n".join(parts)
        if len(tok(context).input_ids) < min_context:
            continue  # the article is too short for a long context
        prompt = squad_prompt(tok, context, ex["question"])
        ids = tok(prompt, add_special_tokens=False).input_ids
        head = tok(prompt[: prompt.index(context) + len(context)], add_special_tokens=False).input_ids
        cut = len(head)
        while ids[:cut] != head[:cut]:  # a token merged across the boundary: cut before it
            cut -= 1
        answer = tok(ex["answers"][0].strip(), add_special_tokens=False).input_ids + [end_of_turn_id(tok)]
        items.append(
            {"id": ex["id"], "ids": ids, "context_len": cut, "answers": ex["answers"], "answer_ids": answer}
        )
        if len(items) == n:
            break
    return items


def _held_after_cut(cache: Any) -> int:
    """Bytes a PolicyCache holds once the context is cut to its budget (the eviction the next
    forward starts with, run now)."""
    cache.prepare()
    return int(cache.nbytes)


def run_chunkwise(items: list[dict[str, Any]], threads: int) -> list[dict[str, Any]]:
    """Every chunkwise policy at every budget (and the full cache) on every item."""
    import chunkwise as cw
    import torch
    from chunkwise.assets.smollm2 import load_smollm2
    from chunkwise.kv import KvPolicy, PolicyCache, track_attention

    torch.set_num_threads(threads)
    model, _ = load_smollm2(progress=False)
    rows = []

    def policy_for(kind: str, budget: int, slack: int) -> KvPolicy:
        name = kind.removesuffix("-int8")
        policy = KvPolicy.named(name, budget, sinks=4, slack=slack)
        if kind.endswith("-int8"):  # the same bytes; a full window of half the budget, older in int8
            policy = dataclasses.replace(policy, int8=True, window=(budget - 4) // 2)
        return policy

    for item in items:
        ids = torch.tensor(item["ids"])[None]
        c = item["context_len"]
        slack = ids.shape[1] - c + len(item["answer_ids"]) + 1  # nothing after the context is evicted
        configs: list[tuple[str, float | None, KvPolicy]] = [("full", None, KvPolicy.full())]
        for frac in BUDGETS:
            budget = max(8, round(frac * c))
            configs += [(kind, frac, policy_for(kind, budget, slack)) for kind in POLICIES]
        for kind, frac, policy in configs:
            t0 = time.perf_counter()
            cache = PolicyCache(policy, model.config)
            scores = track_attention(model) if policy.attention_weight > 0 else torch.no_grad()
            with torch.inference_mode(), scores:
                logits = model(input_ids=ids[:, :c], cache=cache, use_cache=True).logits
                if policy.difficulty_weight > 0:  # a token's difficulty: the entropy that predicted it
                    ent, _ = cw.torch_entropy_surprisal(logits.float())
                    cache.revise_difficulty(torch.cat([torch.zeros(1, 1), ent[:, :-1]], 1).numpy())
                held = _held_after_cut(cache)
                nll, n = answer_nll(model, item, cache, "cache")
            rows.append(result_row("chunkwise", kind, frac, item, (nll, n), held, t0))
    return rows


def result_row(
    side: str,
    method: str,
    budget: float | None,
    item: dict[str, Any],
    nll: tuple[float, int],
    held: int,
    t0: float,
) -> dict[str, Any]:
    """One (question, cache) result: the answer's summed NLL and token count, KV MB, seconds."""
    return {
        "side": side,
        "method": method,
        "budget": budget,
        "id": item["id"],
        "nll": nll[0],
        "n": nll[1],
        "kv_mb": held / 2**20,
        "seconds": time.perf_counter() - t0,
    }


def answer_nll(model: Any, item: dict[str, Any], cache: Any, cache_kw: str) -> tuple[float, int]:
    """The question and the gold answer teacher-forced on top of a prefilled (and cut) context:
    summed NLL (nats) of the answer's tokens and their count. Positions are counted in the full
    prompt, whatever the cache kept. ``cache_kw``: ``cache`` (transformers >= 5.3) or
    ``past_key_values``."""
    import torch

    c, ids = item["context_len"], item["ids"]
    rest = torch.tensor(ids[c:] + item["answer_ids"])[None]
    pos = torch.arange(c, c + rest.shape[1])[None]
    logits = model(input_ids=rest, position_ids=pos, use_cache=True, **{cache_kw: cache}).logits[0].float()
    n_q, n_a = len(ids) - c, len(item["answer_ids"])
    logp = torch.log_softmax(logits[n_q - 1 : n_q - 1 + n_a], -1)
    target = torch.tensor(item["answer_ids"])
    return float(-logp.gather(-1, target[:, None]).sum()), n_a


# -- kvpress (its own environment) -------------------------------------------------------------
def press_worker(items_path: Path, model_dir: Path, threads: int) -> list[dict[str, Any]]:
    """Runs inside the kvpress venv: every press at every budget on every item."""
    import torch
    from kvpress import ExpectedAttentionPress, KnormPress, SnapKVPress, StreamingLLMPress
    from transformers import AutoModelForCausalLM, DynamicCache

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    make = {
        "streaming_llm": lambda r: StreamingLLMPress(compression_ratio=r, n_sink=4),
        "snapkv": lambda r: SnapKVPress(compression_ratio=r),
        "expected_attention": lambda r: ExpectedAttentionPress(compression_ratio=r),
        "knorm": lambda r: KnormPress(compression_ratio=r),
    }
    rows = []
    for item in json.loads(items_path.read_text()):
        ids = torch.tensor(item["ids"])[None]
        c = item["context_len"]
        for name in PRESSES:
            for frac in BUDGETS:
                t0 = time.perf_counter()
                cache = DynamicCache()
                with torch.inference_mode():
                    with make[name](1.0 - frac)(model):
                        model(input_ids=ids[:, :c], past_key_values=cache, use_cache=True)
                    held = sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)
                    nll, n = answer_nll(model, item, cache, "past_key_values")
                rows.append(result_row("kvpress", name, frac, item, (nll, n), held, t0))
    return rows


def ensure_venv(path: Path) -> Path:
    """The kvpress virtual environment (built once): its python."""
    python = path / "bin" / "python"
    if python.exists():
        return python
    print(f"building the kvpress environment in {path} (once) ...", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(path)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", KVPRESS], check=True)
    return python


# -- the table ---------------------------------------------------------------------------------
def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (side, method, budget): the answer NLL per token, its change against the full cache
    with a paired bootstrap CI over questions, and the mean KV MB."""
    import numpy as np
    from chunkwise.eval.stats import paired_difference

    full = {r["id"]: r["nll"] / r["n"] for r in rows if r["method"] == "full"}
    groups: dict[tuple[str, str, Any], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["side"], r["method"], r["budget"]), []).append(r)
    table = []
    for (side, method, budget), rs in groups.items():
        mine = np.array([r["nll"] / r["n"] for r in rs])
        ref = np.array([full[r["id"]] for r in rs])
        delta, low, high = paired_difference(mine, ref)
        table.append(
            {"side": side, "method": method, "budget": budget, "n": len(rs),
             "answer_nll": float(mine.mean()), "delta_nll": delta, "delta_low": low,
             "delta_high": high, "kv_mb": sum(r["kv_mb"] for r in rs) / len(rs),
             "seconds": sum(r["seconds"] for r in rs) / len(rs)}
        )  # fmt: skip
    return sorted(table, key=lambda t: (t["budget"] or 1.0, t["side"], t["method"]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--questions", type=int, default=24, help="held-out questions (default: 24)")
    p.add_argument("--min-context", type=int, default=2048, help="context tokens at least (default: 2048)")
    p.add_argument("--seed", type=int, default=0, help="seed of the question sample")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--venv", type=Path, default=ROOT / ".venv-kvpress", help="kvpress environment")
    p.add_argument("--json", type=Path, help="write rows and table here")
    p.add_argument("--press-worker", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.press_worker:
        print(json.dumps(press_worker(args.press_worker[0], args.press_worker[1], args.threads)))
        return 0
    from chunkwise.assets.smollm2 import load_smollm2, smollm2_dir

    _, tok = load_smollm2(progress=False)
    items = build_items(tok, args.questions, args.min_context, args.seed)
    print(f"{len(items)} questions, contexts of {min(i['context_len'] for i in items)}-"
          f"{max(i['context_len'] for i in items)} tokens", file=sys.stderr)  # fmt: skip
    items_path = (args.json or Path("kv_peers.json")).with_suffix(".items.json")
    items_path.write_text(json.dumps(items))
    python = ensure_venv(args.venv)
    worker = subprocess.run(
        [str(python), "-m", "benches.kv_peers", "--press-worker", str(items_path), str(smollm2_dir()),
         "--threads", str(args.threads)],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    if worker.returncode != 0:
        print(worker.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"the kvpress worker failed (exit {worker.returncode})")
    rows = json.loads(worker.stdout.strip().splitlines()[-1])
    rows += run_chunkwise(items, args.threads)
    table = summarize(rows)
    print(f"{'side':<10}{'method':<20}{'budget':>7}{'NLL':>8}{'Δ NLL [95% CI]':>26}{'KV MB':>8}{'s/q':>7}")
    for t in table:
        b = "full" if t["budget"] is None else f"{100 * t['budget']:.0f}%"
        ci = f"{t['delta_nll']:+.4f} [{t['delta_low']:+.4f}, {t['delta_high']:+.4f}]"
        print(f"{t['side']:<10}{t['method']:<20}{b:>7}{t['answer_nll']:>8.4f}{ci:>26}{t['kv_mb']:>8.1f}"
              f"{t['seconds']:>7.1f}")  # fmt: skip
    if args.json is not None:
        args.json.write_text(json.dumps({"table": table, "rows": rows, "n": len(items)}, indent=1))
    items_path.unlink(missing_ok=True)
    return 0 if all(math.isfinite(t["answer_nll"]) for t in table) else 1


if __name__ == "__main__":
    sys.exit(main())
