"""Terminal output shared by the commands: when to colour, and one colour per rung."""

from __future__ import annotations

import os
from typing import Any, TextIO

__all__ = ["add_color_option", "paint", "rung_colour", "use_color"]

# Background colours from cool (low rank) to hot (high rank), 256-colour ANSI.
_PALETTE = (238, 24, 30, 64, 136, 166, 160, 125)


def add_color_option(parser: Any, what: str) -> None:
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
