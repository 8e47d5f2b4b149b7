"""The ``chunkwise`` command line: one module per command, each with ``add_parser`` and ``run``.

``demo`` runs SmolLM2 with a small adapter on its bundled default (``--no-model`` only plans the
sample text); ``plan`` plans any text; ``generate``, ``eval``, ``convert`` and ``bench`` work on
a model and an adapter. Exit codes: 0 success, 2 bad arguments or input (a
:class:`chunkwise.ChunkwiseError`) or a missing optional package (the message names the extra).

The top of the package: it may import every other part of chunkwise, and nothing imports it.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import ChunkwiseError
from . import bench, convert, demo, evaluate, generate, plan

__all__ = ["main"]

# optional packages and the extra that installs each
_EXTRAS = {"transformers": "hf", "peft": "hf", "gguf": "hf", "tqdm": "hf", "matplotlib": "plot"}

# command name -> its module (add_parser(sub) defines the name; run(args) runs it)
_COMMANDS = {
    "demo": demo,
    "plan": plan,
    "generate": generate,
    "eval": evaluate,
    "convert": convert,
    "bench": bench,
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="chunkwise",
        description="ChunkWise LoRA: run LoRA adapters with a rank that changes chunk by chunk.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in _COMMANDS.values():
        module.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``chunkwise`` console script."""
    args = _parser().parse_args(argv)
    try:
        return _COMMANDS[args.command].run(args)
    except ChunkwiseError as e:
        print(f"chunkwise: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        root = (e.name or "").split(".")[0]
        if root not in _EXTRAS:
            raise
        print(
            f"chunkwise {args.command}: needs {e.name}: pip install 'chunkwise[{_EXTRAS[root]}]'",
            file=sys.stderr,
        )
        return 2
