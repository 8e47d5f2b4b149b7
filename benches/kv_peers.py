"""chunkwise's KV policies beside NVIDIA's kvpress presses on one long-context QA task.

    python -m benches.kv_peers [--adapter adapters/smollm2-qa-r64] [--questions 24] \
        [--min-context 2048] [--json docs/kv_peers.json]

(from the repository root). The task: held-out squaddev questions (the evaluation side of the
article split every chunkwise result uses: ``split_by_article(..., 0.2, seed 0)``), each asked
after a long context made of its article's paragraphs — its own paragraph and the article's
others in order — until at least ``--min-context`` tokens, with the question at the end (the
chat prompt of :func:`chunkwise.eval.evaluation.squad_prompt`, the prompt the QA adapter was
trained on). Model: SmolLM2-135M-Instruct, fp32, with ``--adapter`` (a PEFT LoRA folder, e.g.
the one ``scripts/train_qa_adapter.py`` writes) merged into its weights, so that both sides run
the very same dense model and differ only in their KV caches. Measures: the greedy answer's
exact match and F1 (SQuAD v1.1, against every gold answer; at most ``--max-answer`` tokens) and
the gold answer's NLL per token, teacher-forced after the question (finer: it moves where EM
cannot; the base model without the adapter answers nothing exactly), each with its change
against the full cache (paired bootstrap 95 % CI over the questions), and the KV bytes held once
the context is cut.

Both sides run the same protocol, the one kvpress's pipeline uses: the context is prefilled in
one forward, then its KV cache is cut to the budget (25 % or 50 % of the context's tokens);
the question and the answer are then processed on top, uncompressed (the greedy answer; and,
unless it is the gold answer token for token, whose NLL the same pass gives, the gold answer
teacher-forced after a second, identical prefill). kvpress's presses
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
import functools
import json
import math
import subprocess
import sys
import tempfile
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


def load_model(model_dir: Path, threads: int) -> Any:
    """The dense fp32 model both sides run (base SmolLM2, or it with the adapter merged in)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def merged_model_dir(adapter: Path, out: Path) -> Path:
    """SmolLM2 with the PEFT LoRA in ``adapter`` merged into its weights, saved (model and
    tokenizer) to ``out``: a folder both environments load with ``from_pretrained``."""
    from chunkwise.assets.smollm2 import load_smollm2
    from chunkwise.errors import InputError
    from peft import PeftModel

    if not (adapter / "adapter_config.json").is_file():
        raise InputError(
            f"--adapter: {adapter} is not a PEFT adapter folder (no adapter_config.json)", "adapter"
        )
    base, tok = load_smollm2(progress=False)
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    merged.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def answer_slack(item: dict[str, Any], max_answer: int) -> int:
    """Tokens that follow the context in any forward of :func:`answer_pass` (never evicted)."""
    return len(item["ids"]) - item["context_len"] + max(len(item["answer_ids"]), max_answer) + 1


def run_chunkwise(
    items: list[dict[str, Any]], model_dir: Path, threads: int, max_answer: int
) -> list[dict[str, Any]]:
    """Every chunkwise policy at every budget (and the full cache) on every item."""
    import torch
    from chunkwise.kv import KvPolicy, track_attention

    model = load_model(model_dir, threads)
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
        slack = answer_slack(item, max_answer)  # nothing after the context is evicted
        configs: list[tuple[str, float | None, KvPolicy]] = [("full", None, KvPolicy.full())]
        for frac in BUDGETS:
            budget = max(8, round(frac * c))
            configs += [(kind, frac, policy_for(kind, budget, slack)) for kind in POLICIES]
        for kind, frac, policy in configs:
            prefilled = functools.partial(policy_prefill, model, ids[:, :c], policy)
            t0 = time.perf_counter()
            scores = track_attention(model) if policy.attention_weight > 0 else torch.no_grad()
            with torch.inference_mode(), scores:
                cache = prefilled()
                held = _held_after_cut(cache)
                answer = answer_pass(model, item, prefilled, cache, "cache", max_answer)
            rows.append(result_row("chunkwise", kind, frac, item, answer, held, t0))
    return rows


def policy_prefill(model: Any, context: Any, policy: Any) -> Any:
    """A PolicyCache holding ``context`` [1, c] after one forward (a difficulty-aware policy
    gets each token's difficulty: the entropy of the logits that predicted it)."""
    import chunkwise as cw
    import torch
    from chunkwise.kv import PolicyCache

    cache = PolicyCache(policy, model.config)
    logits = model(input_ids=context, cache=cache, use_cache=True).logits
    if policy.difficulty_weight > 0:
        ent, _ = cw.torch_entropy_surprisal(logits.float())
        cache.revise_difficulty(torch.cat([torch.zeros(1, 1), ent[:, :-1]], 1).numpy())
    return cache


def greedy_answer(
    model: Any, item: dict[str, Any], cache: Any, cache_kw: str, max_answer: int
) -> tuple[list[int], float | None]:
    """The greedy answer after the question, on a prefilled (and cut) context: its ids, ending
    with the end-of-turn id unless ``max_answer`` ran out first; and, when they are the gold
    answer's ids token for token, the gold answer's summed NLL, which this same pass computed
    (else None). Positions are counted in the full prompt, whatever the cache kept."""
    import torch

    c, ids, gold = item["context_len"], item["ids"], item["answer_ids"]
    step, pos = torch.tensor(ids[c:])[None], c
    out: list[int] = []
    nll = 0.0
    while len(out) < max_answer:
        positions = torch.arange(pos, pos + step.shape[1])[None]
        logits = model(input_ids=step, position_ids=positions, use_cache=True, **{cache_kw: cache}).logits
        logits = logits[0, -1].float()
        pos += step.shape[1]
        k = len(out)
        if k < len(gold) and out == gold[:k]:
            nll -= float(torch.log_softmax(logits, -1)[gold[k]])
        out.append(int(logits.argmax()))
        if out[-1] == gold[-1]:  # the end-of-turn id
            break
        step = torch.tensor([[out[-1]]])
    return out, (nll if out == gold else None)


def answer_pass(
    model: Any, item: dict[str, Any], prefilled: Any, cache: Any, cache_kw: str, max_answer: int
) -> dict[str, Any]:
    """The greedy answer on ``cache`` and the gold answer's NLL (from the same pass when the
    greedy answer is the gold one, else teacher-forced on a second cache from ``prefilled()``)."""
    pred, nll = greedy_answer(model, item, cache, cache_kw, max_answer)
    if nll is None:
        nll, _ = answer_nll(model, item, prefilled(), cache_kw)
    return {"pred": pred, "nll": nll, "n": len(item["answer_ids"])}


def result_row(
    side: str,
    method: str,
    budget: float | None,
    item: dict[str, Any],
    answer: dict[str, Any],
    held: int,
    t0: float,
) -> dict[str, Any]:
    """One (question, cache) result: the greedy answer's ids (``pred``), the gold answer's summed
    NLL and token count, KV MB, seconds."""
    return {
        "side": side,
        "method": method,
        "budget": budget,
        "id": item["id"],
        **answer,
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
def press_worker(items_path: Path, model_dir: Path, threads: int, max_answer: int) -> list[dict[str, Any]]:
    """Runs inside the kvpress venv: every press at every budget on every item."""
    import torch
    from kvpress import ExpectedAttentionPress, KnormPress, SnapKVPress, StreamingLLMPress

    model = load_model(model_dir, threads)
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
                prefilled = functools.partial(press_prefill, model, ids[:, :c], make[name](1.0 - frac))
                t0 = time.perf_counter()
                with torch.inference_mode():
                    cache = prefilled()
                    held = sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)
                    answer = answer_pass(model, item, prefilled, cache, "past_key_values", max_answer)
                rows.append(result_row("kvpress", name, frac, item, answer, held, t0))
    return rows


def press_prefill(model: Any, context: Any, press: Any) -> Any:
    """A DynamicCache holding ``context`` [1, c] after one forward under ``press`` (kvpress
    compresses each layer's keys and values as the forward writes them)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    with press(model):
        model(input_ids=context, past_key_values=cache, use_cache=True)
    return cache


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
def score_rows(rows: list[dict[str, Any]], items: list[dict[str, Any]], tok: Any) -> None:
    """Adds each row's greedy answer as text and its EM and F1 (percent) against every gold answer."""
    from chunkwise.eval.metrics import exact_match, f1

    answers = {i["id"]: i["answers"] for i in items}
    eot = {i["id"]: i["answer_ids"][-1] for i in items}
    for r in rows:
        pred = r["pred"][:-1] if r["pred"] and r["pred"][-1] == eot[r["id"]] else r["pred"]
        r["answer"] = tok.decode(pred, skip_special_tokens=True).strip()
        r["em"] = 100 * exact_match(r["answer"], answers[r["id"]])
        r["f1"] = 100 * f1(r["answer"], answers[r["id"]])


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (side, method, budget): mean EM and F1 and the answer NLL per token, each with its
    change against the full cache (paired bootstrap 95 % CI over questions), and the mean KV MB."""
    import numpy as np
    from chunkwise.eval.stats import paired_difference

    metrics = {"nll": lambda r: r["nll"] / r["n"], "em": lambda r: r["em"], "f1": lambda r: r["f1"]}
    full = {m: {r["id"]: f(r) for r in rows if r["method"] == "full"} for m, f in metrics.items()}
    groups: dict[tuple[str, str, Any], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["side"], r["method"], r["budget"]), []).append(r)
    table = []
    for (side, method, budget), rs in groups.items():
        t: dict[str, Any] = {"side": side, "method": method, "budget": budget, "n": len(rs)}
        for m, f in metrics.items():
            mine = np.array([f(r) for r in rs])
            delta, low, high = paired_difference(mine, np.array([full[m][r["id"]] for r in rs]))
            name = "answer_nll" if m == "nll" else m
            t.update(
                {
                    name: float(mine.mean()),
                    f"delta_{m}": delta,
                    f"delta_{m}_low": low,
                    f"delta_{m}_high": high,
                }
            )
        t["kv_mb"] = sum(r["kv_mb"] for r in rs) / len(rs)
        t["seconds"] = sum(r["seconds"] for r in rs) / len(rs)
        table.append(t)
    return sorted(table, key=lambda t: (t["budget"] or 1.0, t["side"], t["method"]))


def print_table(table: list[dict[str, Any]]) -> None:
    print(f"{'side':<10}{'method':<20}{'budget':>7}{'EM':>7}{'Δ EM [95% CI]':>24}{'F1':>7}{'NLL':>8}"
          f"{'Δ NLL [95% CI]':>28}{'KV MB':>8}{'s/q':>7}")  # fmt: skip
    for t in table:
        b = "full" if t["budget"] is None else f"{100 * t['budget']:.0f}%"
        em = f"{t['delta_em']:+.1f} [{t['delta_em_low']:+.1f}, {t['delta_em_high']:+.1f}]"
        nll = f"{t['delta_nll']:+.4f} [{t['delta_nll_low']:+.4f}, {t['delta_nll_high']:+.4f}]"
        print(f"{t['side']:<10}{t['method']:<20}{b:>7}{t['em']:>7.1f}{em:>24}{t['f1']:>7.1f}"
              f"{t['answer_nll']:>8.4f}{nll:>28}{t['kv_mb']:>8.1f}{t['seconds']:>7.1f}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--adapter", type=Path, help="PEFT LoRA folder merged into the model (default: none)")
    p.add_argument("--questions", type=int, default=24, help="held-out questions (default: 24)")
    p.add_argument("--min-context", type=int, default=2048, help="context tokens at least (default: 2048)")
    p.add_argument("--max-answer", type=int, default=24, help="greedy answer tokens at most (default: 24)")
    p.add_argument("--seed", type=int, default=0, help="seed of the question sample")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--venv", type=Path, default=ROOT / ".venv-kvpress", help="kvpress environment")
    p.add_argument("--json", type=Path, help="write rows and table here")
    p.add_argument("--press-worker", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.press_worker:
        rows = press_worker(args.press_worker[0], args.press_worker[1], args.threads, args.max_answer)
        print(json.dumps(rows))
        return 0
    from chunkwise.assets.smollm2 import load_smollm2, smollm2_dir

    _, tok = load_smollm2(progress=False)
    items = build_items(tok, args.questions, args.min_context, args.seed)
    print(f"{len(items)} questions, contexts of {min(i['context_len'] for i in items)}-"
          f"{max(i['context_len'] for i in items)} tokens", file=sys.stderr)  # fmt: skip
    python = ensure_venv(args.venv)
    with tempfile.TemporaryDirectory(prefix="kv_peers_") as tmp:
        items_path = Path(tmp) / "items.json"
        items_path.write_text(json.dumps(items))
        model_dir = (
            smollm2_dir() if args.adapter is None else merged_model_dir(args.adapter, Path(tmp) / "merged")
        )
        worker = subprocess.run(
            [str(python), "-m", "benches.kv_peers", "--press-worker", str(items_path), str(model_dir),
             "--threads", str(args.threads), "--max-answer", str(args.max_answer)],
            capture_output=True, text=True, cwd=ROOT,
        )  # fmt: skip
        if worker.returncode != 0:
            print(worker.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"the kvpress worker failed (exit {worker.returncode})")
        rows = json.loads(worker.stdout.strip().splitlines()[-1])
        rows += run_chunkwise(items, model_dir, args.threads, args.max_answer)
    score_rows(rows, items, tok)
    table = summarize(rows)
    print_table(table)
    if args.json is not None:
        meta = {"n": len(items), "adapter": None if args.adapter is None else args.adapter.name,
                "max_answer": args.max_answer, "min_context": args.min_context}  # fmt: skip
        args.json.write_text(json.dumps({"table": table, "rows": rows, **meta}, indent=1))
    return 0 if all(math.isfinite(t["answer_nll"]) for t in table) else 1


if __name__ == "__main__":
    sys.exit(main())
