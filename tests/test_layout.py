"""The package's layout rules (docs/architecture.md, "Layout"), checked by reading the imports.

Each folder of ``python/chunkwise`` may import only the parts named in ``ALLOWED``; no module
imports a private name of another; nothing imports ``chunkwise.cli``; the old flat module paths
are not used inside the package; ``import chunkwise`` and planning do not import torch.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import warnings
from pathlib import Path

import chunkwise
import numpy as np
import pytest
from chunkwise.compat import MOVED

PACKAGE = Path(chunkwise.__file__).parent

# part -> the parts it may import (besides itself and the standard / third-party libraries).
# "errors" and "_core" are the bottom: every part may use them.
BOTTOM = {"errors", "_core"}
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "compat": set(),
    "schedule": BOTTOM,
    "adapters": BOTTOM,
    "kernels": BOTTOM,
    "kv": BOTTOM,
    "vllm": BOTTOM | {"schedule"},
    "assets": BOTTOM | {"adapters"},
    "nn": BOTTOM | {"schedule", "adapters", "kernels", "kv"},
    "generation": BOTTOM | {"schedule", "nn", "kv"},
    "eval": BOTTOM | {"schedule", "adapters", "nn", "kv", "generation", "assets"},
    "cli": BOTTOM | {"schedule", "adapters", "nn", "kernels", "kv", "generation", "eval", "assets"},
    "__init__": BOTTOM | {"schedule", "compat", "adapters", "nn", "kv", "generation"},
}
# modules that must not import torch at module level (import chunkwise, planning, the CLI parser)
TORCH_FREE = {"errors", "compat", "schedule", "__init__", "cli"}


def modules() -> list[tuple[str, Path]]:
    """(dotted name, path) of every module of the package."""
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out.append((".".join(parts), path))
    return out


def part_of(module: str) -> str:
    """The folder (or top-level module) a dotted chunkwise module belongs to."""
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def imports(module: str, path: Path) -> list[tuple[str, list[str], int, bool]]:
    """(absolute module, imported names, line, at module level) of every chunkwise import."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_pkg = path.name == "__init__.py"
    package = module.split(".") if is_pkg else module.split(".")[:-1]
    top_level = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            target, names = "", [a.name for a in node.names]
        else:
            continue
        if isinstance(node, ast.Import):
            for name in names:
                found.append((name, [], node.lineno, id(node) in top_level))
        else:
            found.append((target, names, node.lineno, id(node) in top_level))
    return [f for f in found if f[0] == "chunkwise" or f[0].startswith("chunkwise.") or f[0] == "torch"]


def _resolve(target: str, names: list[str]) -> list[str]:
    """``from chunkwise import errors`` names the module chunkwise.errors; else the target."""
    if target == "chunkwise":
        return [f"chunkwise.{n}" for n in names]
    return [target]


def test_every_part_imports_only_what_its_rule_allows():
    bad = []
    for module, path in modules():
        mine = part_of(module)
        assert mine in ALLOWED, f"{module}: part {mine!r} has no import rule in ALLOWED (and in the docs)"
        for target, names, line, _ in imports(module, path):
            if target == "torch":
                continue
            for dep in _resolve(target, names):
                theirs = part_of(dep)
                if theirs != mine and theirs not in ALLOWED[mine]:
                    bad.append(f"{path.relative_to(PACKAGE)}:{line} imports {dep} ({mine} -> {theirs})")
    assert not bad, "imports against the layout rules:\n" + "\n".join(bad)


def test_no_module_imports_a_private_name_of_another():
    bad = []
    for module, path in modules():
        for target, names, line, _ in imports(module, path):
            private = [n for n in names if n.startswith("_") and n != "_core"]
            if private or any(p.startswith("_") and p != "_core" for p in target.split(".")[1:]):
                bad.append(f"{path.relative_to(PACKAGE)}:{line} from {target} import {', '.join(names)}")
    assert not bad, "private names imported across modules:\n" + "\n".join(bad)


def test_no_private_attribute_of_another_chunkwise_object_is_used():
    """``other._name`` where ``other`` is not ``self`` / ``cls``: reaching into another object."""
    bad = []
    for _, path in modules():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and node.attr != "_core"
                and not (isinstance(node.value, ast.Name) and node.value.id in {"self", "cls"})
                and not (  # super()._method: the object's own inherited implementation
                    isinstance(node.value, ast.Call)
                    and isinstance(node.value.func, ast.Name)
                    and node.value.func.id == "super"
                )
            ):
                bad.append(f"{path.relative_to(PACKAGE)}:{node.lineno} .{node.attr}")
    # transformers' own config attribute, read the way transformers documents it
    bad = [b for b in bad if not b.endswith("._attn_implementation")]
    assert not bad, "private attributes used across objects:\n" + "\n".join(bad)


def test_nothing_imports_the_command_line():
    bad = [
        f"{path.relative_to(PACKAGE)}:{line}"
        for module, path in modules()
        if part_of(module) != "cli"
        for target, names, line, _ in imports(module, path)
        for dep in _resolve(target, names)
        if part_of(dep) == "cli"
    ]
    assert not bad, f"chunkwise.cli is the top: nothing may import it ({bad})"


def test_the_package_never_uses_an_old_module_path():
    bad = [
        f"{path.relative_to(PACKAGE)}:{line} {dep}"
        for module, path in modules()
        for target, names, line, _ in imports(module, path)
        for dep in _resolve(target, names)
        if dep in MOVED
    ]
    assert not bad, f"old module paths used inside the package: {bad}"


def test_torch_free_parts_do_not_import_torch_at_module_level():
    bad = [
        f"{path.relative_to(PACKAGE)}:{line}"
        for module, path in modules()
        if part_of(module) in TORCH_FREE
        for target, _, line, top in imports(module, path)
        if target == "torch" and top
    ]
    assert not bad, f"module-level torch imports in torch-free parts: {bad}"


def test_import_chunkwise_and_plan_without_torch():
    code = (
        "import sys, numpy as np, chunkwise as cw\n"
        "plan = cw.Scheduler(cw.SchedulerConfig()).plan([np.arange(300, dtype=np.int64)])\n"
        "assert plan.n_tokens == 300\n"
        "from chunkwise.cli import main\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'peft'})\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr + proc.stdout


def test_lazy_public_names_resolve_to_their_modules():
    from chunkwise.adapters.ladder import RankLadder
    from chunkwise.nn import ChunkwiseModel, inject

    assert chunkwise.RankLadder is RankLadder
    assert chunkwise.inject is inject and chunkwise.ChunkwiseModel is ChunkwiseModel
    assert set(chunkwise.__all__) <= set(dir(chunkwise))
    for name in chunkwise.__all__:
        assert getattr(chunkwise, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = chunkwise.nope


@pytest.mark.parametrize(("old", "new"), sorted(MOVED.items()))
def test_old_module_paths_still_import_with_a_deprecation_warning(old, new):
    import importlib

    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)
    assert any(issubclass(w.category, DeprecationWarning) and new in str(w.message) for w in caught)


def test_plan_fields_are_the_cores_plan_arrays():
    """The Plan repeats the core's array names with their types: the two must agree, in order."""
    import dataclasses

    from chunkwise import _core
    from chunkwise.schedule import PLAN_ARRAYS, Plan

    fields = [f.name for f in dataclasses.fields(Plan) if f.name != "rungs"]
    assert tuple(fields) == PLAN_ARRAYS == tuple(_core.PLAN_ARRAYS)
    plan = chunkwise.Scheduler().plan([np.arange(40, dtype=np.int64)])
    assert all(isinstance(getattr(plan, name), np.ndarray) for name in PLAN_ARRAYS)


def test_scheduler_config_defaults_are_the_cores():
    """Every default of SchedulerConfig is read from the Rust core's own defaults."""
    import dataclasses

    from chunkwise import _core

    core = _core.Config.default()
    cfg = chunkwise.SchedulerConfig()
    for f in dataclasses.fields(cfg):
        if f.default is None:
            continue
        want = getattr(core, f.name)
        assert getattr(cfg, f.name) == (tuple(want) if isinstance(want, list) else want), f.name
    assert cfg.core.weights == core.weights
    assert chunkwise.DEFAULT_RUNGS == tuple(_core.DEFAULT_RUNGS) == cfg.rungs


def test_module_level_imports_have_no_cycle():
    """The graph of module-level imports between chunkwise modules is acyclic (lazy imports inside
    functions are how a lower part may reach a higher one at run time, never at import)."""
    names = {module for module, _ in modules()}
    graph: dict[str, set[str]] = {module: set() for module in names}
    for module, path in modules():
        for target, imported, _, top in imports(module, path):
            if not top or target == "torch":
                continue
            for dep in _resolve(target, imported):
                dep = dep if dep in names else target  # `from pkg import name` of a non-module
                if dep in names and dep != module and not module.startswith(dep + "."):
                    graph[module].add(dep)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*stack[stack.index(dep) :], dep]))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
