"""Module paths of chunkwise 0.1's flat layout, kept importable with a ``DeprecationWarning``.

``import chunkwise.models`` (and every other module that moved into a folder) still works and
gives the module at its new place, so user code keeps running; the warning names the new path.
Nothing inside chunkwise imports an old path (a test checks it).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType

__all__ = ["MOVED", "install"]

#: old module -> new module
MOVED: dict[str, str] = {
    "chunkwise.config": "chunkwise.schedule.config",
    "chunkwise.scheduler": "chunkwise.schedule.scheduler",
    "chunkwise.plan": "chunkwise.schedule.plan",
    "chunkwise.signals": "chunkwise.schedule.signals",
    "chunkwise.ladder": "chunkwise.adapters.ladder",
    "chunkwise.token_plan": "chunkwise.nn.token_plan",
    "chunkwise.layers": "chunkwise.nn.linear",
    "chunkwise.injection": "chunkwise.nn.injection",
    "chunkwise.metrics": "chunkwise.eval.metrics",
    "chunkwise.evaluation": "chunkwise.eval.evaluation",
    "chunkwise.benchmarking": "chunkwise.eval.benchmarking",
    "chunkwise.plotting": "chunkwise.eval.plotting",
    "chunkwise.models": "chunkwise.assets.smollm2",
    "chunkwise.corpora": "chunkwise.assets.corpora",
    "chunkwise.demo_adapter": "chunkwise.assets.demo_adapter",
    "chunkwise.terminal": "chunkwise.cli.render",
    "chunkwise.commands": "chunkwise.cli",
    "chunkwise.commands.bench": "chunkwise.cli.bench",
    "chunkwise.commands.convert": "chunkwise.cli.convert",
    "chunkwise.commands.demo": "chunkwise.cli.demo",
    "chunkwise.commands.evaluate": "chunkwise.cli.evaluate",
    "chunkwise.commands.generate": "chunkwise.cli.generate",
    "chunkwise.commands.models": "chunkwise.cli.loading",
}


class _Alias(importlib.abc.Loader):
    """Loads an old name as the module at its new place (the same module object)."""

    def __init__(self, new: str) -> None:
        self.new = new

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        warnings.warn(
            f"{spec.name} moved to {self.new}; import it from there (the old path will be removed)",
            DeprecationWarning,
            stacklevel=2,
        )
        return importlib.import_module(self.new)

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the new module was executed when it was imported."""


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        new = MOVED.get(fullname)
        if new is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _Alias(new), is_package=new == "chunkwise.cli")


def install() -> None:
    """Puts the finder on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())  # before the path finder, which would load a copy
