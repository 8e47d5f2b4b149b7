"""Terminal output shared by the commands: when to colour, one colour per rung, and text shown
chunk by chunk in its rung's colour."""

from __future__ import annotations

import argparse
import os
from typing import TextIO

from ..schedule import Plan

__all__ = ["add_color_option", "legend", "paint", "render_chunks", "render_plan", "rung_colour", "use_color"]

# Background colours from cool (low rank) to hot (high rank), 256-colour ANSI.
_PALETTE = (238, 24, 30, 64, 136, 166, 160, 125)


def add_color_option(parser: argparse.ArgumentParser, what: str) -> None:
    """``--color auto|always|never`` on ``parser`` (``what``: what gets coloured)."""
    parser.add_argument(
        "--color",
        choices=("auto", "always", "never"),
        default="auto",
        help=f"colour {what} by rung (default: auto, off when not a terminal or NO_COLOR is set)",
    )


def use_color(choice: str, stream: TextIO) -> bool:
    """``always`` / ``never`` / ``auto`` (a terminal, and NO_COLOR unset)."""
    if choice == "always":
        return True
    if choice == "never" or os.environ.get("NO_COLOR"):
        return False
    return stream.isatty()


def rung_colour(rung: int, n_rungs: int) -> int:
    """The palette colour of rung ``rung`` of ``n_rungs``."""
    return _PALETTE[min(rung * len(_PALETTE) // max(n_rungs, 1), len(_PALETTE) - 1)]


def paint(text: str, rung: int, n_rungs: int) -> str:
    """``text`` on its rung's background colour."""
    return f"\x1b[48;5;{rung_colour(rung, n_rungs)}m\x1b[97m{text}\x1b[0m"


def render_chunks(texts: list[str], plan: Plan, color: bool, sep: str = " ") -> str:
    """Each chunk's text (``texts[c]``) in its rung's colour, or bracketed with its rank."""
    out: list[str] = []
    for c, text in enumerate(texts):
        rung, rank = int(plan.chunk_rung[c]), int(plan.chunk_rank[c])
        out.append(paint(text, rung, len(plan.rungs)) if color else f"[r{rank}|{sep}{text}{sep}]")
    return sep.join(out)


def render_plan(words: list[str], plan: Plan, color: bool) -> str:
    """The words with each chunk shown in its rung's colour (or bracketed with its rank)."""
    bounds = plan.chunk_offsets.tolist()
    return render_chunks(
        [" ".join(words[lo:hi]) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)], plan, color
    )


def legend(plan: Plan, color: bool) -> str:
    """``tokens per rung: r0: n ...``, each label in its rung's colour when ``color``."""
    parts = []
    for i, (rank, n) in enumerate(zip(plan.rungs, plan.rung_histogram(), strict=True)):
        label = f" r{rank}: {n} "
        parts.append(paint(label, i, len(plan.rungs)) if color else label)
    return "tokens per rung: " + " ".join(parts)
