"""PNG plots for the commands and the results page (matplotlib, the ``plot`` extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ChunkwiseError
from ..schedule import Plan

__all__ = ["plot_bars", "plot_curves", "plot_plan"]


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise ChunkwiseError("plots need matplotlib: pip install 'chunkwise[plot]'", "png") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_plan(plan: Plan, path: Path, title: str = "") -> Path:
    """Difficulty per token (line) and the rank each token runs at (steps), one sequence."""
    plt = _pyplot()
    n = int(plan.seq_offsets[1])
    x = np.arange(n)
    fig, ax = plt.subplots(figsize=(9, 3.2), dpi=120)
    ax.plot(x, plan.difficulty[:n], color="#4c72b0", lw=0.8, label="difficulty")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("token")
    ax.set_ylabel("difficulty", color="#4c72b0")
    ranks = ax.twinx()
    ranks.step(x, plan.token_rank[:n], where="post", color="#dd8452", lw=1.2, label="rank")
    ranks.set_ylabel("LoRA rank", color="#dd8452")
    ranks.set_ylim(0, max(plan.rungs) * 1.1 or 1)
    for b in plan.chunk_offsets[1:-1]:
        if b < n:
            ax.axvline(b, color="#cccccc", lw=0.5, zorder=0)
    ax.set_title(title or f"{n} tokens, {plan.n_chunks} chunks, mean rank {plan.mean_rank():.1f}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_bars(results: dict[str, dict], title: str, path: Path) -> Path:
    """A PNG with one bar per variant (milliseconds), peak memory written above each bar."""
    plt = _pyplot()
    names = list(results)
    ms = [results[n]["ms"] for n in names]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    bars = ax.bar(names, ms, color=["#888888", "#4c72b0", "#dd8452", "#55a868"][: len(names)])
    for bar, n in zip(bars, names, strict=True):
        peak = results[n].get("peak_mb")
        label = f"{results[n]['ms']:.0f} ms" + (f"\n{peak:.0f} MB" if peak is not None else "")
        ax.annotate(
            label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8
        )
    ax.set_ylabel("milliseconds per prefill")
    ax.set_title(title, fontsize=9)
    ax.set_ylim(0, max(ms) * 1.25)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_curves(rows: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Rank-quality curves from the ``"qa"`` rows of docs/results.json: answer NLL (left) and
    EM (right, where generated; no panel when nothing was) against the mean rank, one line per
    mode / signal, the base and full adapter as horizontal references, 95 % intervals as error
    bars."""
    plt = _pyplot()
    generated = any(r.get("em") is not None for r in rows)
    fig, axes = plt.subplots(
        1, 2 if generated else 1, figsize=(10 if generated else 6, 3.8), dpi=120, squeeze=False
    )
    axes = axes[0]
    panels = [(axes[0], "answer_nll", "answer NLL (nats / token)")]
    if generated:
        panels.append((axes[1], "em", "EM (%)"))
    for ax, metric, label in panels:
        series: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            if r.get(metric) is None:
                continue
            if r["mode"] in ("base", "full"):
                ax.axhline(r[metric], color="#888888" if r["mode"] == "base" else "#222222", lw=0.8, ls="--")
                ax.annotate(r["mode"], (0, r[metric]), fontsize=7, va="bottom")
                continue
            name = r["mode"] + (f" ({r['signal']})" if r.get("signal") else "")
            series.setdefault(name, []).append(r)
        for name, pts in sorted(series.items()):
            pts = sorted(pts, key=lambda r: r["budget"])
            x = [r["budget"] for r in pts]
            y = np.array([r[metric] for r in pts])
            ci = np.array([r.get(metric + "_ci95") or [v, v] for r, v in zip(pts, y, strict=True)])
            style = {"uniform": "-k", "oracle": "-g", "random": ":r"}.get(pts[0]["mode"], "-")
            ax.errorbar(x, y, yerr=[y - ci[:, 0], ci[:, 1] - y], fmt=style, lw=1, ms=3, capsize=2, label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("mean-rank budget")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=6, ncol=2)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
