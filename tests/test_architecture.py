"""The layers of lit_rlhf only point down: a module never imports from a layer above its own.

    errors, imports, checkpointing, outputs  <  loggers  <  rlhf  <  hf  <  datamodules  <  models  <  callbacks
    <  applications

Imports inside functions count too: a lazy import hides a dependency, it does not remove it. Within a layer,
modules import each other without a circle, and a ``_private`` name stays in the module that defines it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import lit_rlhf

PACKAGE_DIR = Path(lit_rlhf.__file__).parent
LAYERS = {
    "lit_rlhf.errors": 0,
    "lit_rlhf.imports": 0,
    "lit_rlhf.checkpointing": 0,
    "lit_rlhf.outputs": 0,
    "lit_rlhf.loggers": 0.5,  # keeps earlier logs with lit_rlhf.outputs
    "lit_rlhf.rlhf": 1,
    "lit_rlhf.hf": 2,
    "lit_rlhf.datamodules": 3,
    "lit_rlhf.models": 4,
    "lit_rlhf.callbacks": 5,
}
APPLICATIONS = 6  # cli, evaluation, labelling, iterate, quickstart, the package's own __init__


def layer_of(module: str) -> int:
    for prefix, layer in LAYERS.items():
        if module == prefix or module.startswith(prefix + "."):
            return layer
    return APPLICATIONS


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def lit_rlhf_imports(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every lit_rlhf module that ``path`` imports, at any depth of the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return [(line, name) for line, name in found if name == "lit_rlhf" or name.startswith("lit_rlhf.")]


MODULES = sorted(PACKAGE_DIR.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE_DIR)))
def test_imports_point_down(path):
    own = layer_of(module_name(path))
    upward = [
        f"{path.relative_to(PACKAGE_DIR.parent)}:{line} imports {target} (layer {layer_of(target)} > {own})"
        for line, target in lit_rlhf_imports(path)
        if layer_of(target) > own
    ]
    assert not upward, "\n".join(upward)


def test_the_bottom_layer_imports_nothing_of_lit_rlhf():
    for prefix, layer in LAYERS.items():
        if layer == 0:
            path = PACKAGE_DIR.parent / (prefix.replace(".", "/") + ".py")
            assert lit_rlhf_imports(path) == [], path


def test_the_checker_sees_an_upward_import(tmp_path):
    """The rule must be able to fail: a lazy import of a callback inside a model function is caught."""
    source = tmp_path / "lit_rlhf" / "models" / "bad.py"
    source.parent.mkdir(parents=True)
    source.write_text("def f():\n    from lit_rlhf.callbacks import HFExport\n")
    assert lit_rlhf_imports(source) == [(2, "lit_rlhf.callbacks")]
    assert layer_of("lit_rlhf.callbacks") > layer_of("lit_rlhf.models.bad")


def private_imports(path: Path) -> list[tuple[int, str]]:
    """``(line, "module.name")`` of every ``_private`` name that ``path`` imports from another lit_rlhf module."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("lit_rlhf"):
            found += [
                (node.lineno, f"{node.module}.{alias.name}")
                for alias in node.names
                if alias.name.startswith("_") and not alias.name.startswith("__")
            ]
    return found


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE_DIR)))
def test_no_private_name_is_imported_across_modules(path):
    """A helper another module needs is public and documented, or it moves to where it is used."""
    found = [f"{path.relative_to(PACKAGE_DIR.parent)}:{line} imports {name}" for line, name in private_imports(path)]
    assert not found, "\n".join(found)


def test_the_checker_sees_a_private_import(tmp_path):
    source = tmp_path / "bad.py"
    source.write_text("def f():\n    from lit_rlhf.hf.loading import __all__, _DTYPES, load_model\n")
    assert private_imports(source) == [(2, "lit_rlhf.hf.loading._DTYPES")]


def import_graph() -> dict[str, set[str]]:
    """lit_rlhf module → the lit_rlhf modules it imports (at any depth, ``TYPE_CHECKING`` blocks included)."""
    names = {module_name(path): path for path in MODULES}

    def owner(name: str) -> str:  # `from lit_rlhf.hf.loading import load_model` → lit_rlhf.hf.loading
        while name not in names:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for name, path in names.items():
        targets = {owner(target) for _, target in lit_rlhf_imports(path)}
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):  # `from lit_rlhf.hf import loading`
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in names:
                targets |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in names}
        graph[name] = targets - {name}
    return graph


def import_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (``[a, b, …, a]``), or ``None`` when it has none."""
    done: set[str] = set()
    for start in sorted(graph):
        stack, path = [(start, iter(sorted(graph[start])))], [start]
        while stack:
            node, targets = stack[-1]
            target = next(targets, None)
            if target is None:
                done.add(node)
                stack.pop()
                path.pop()
            elif target in path:
                return [*path[path.index(target) :], target]
            elif target not in done:
                stack.append((target, iter(sorted(graph.get(target, ())))))
                path.append(target)
    return None


def test_no_two_modules_import_each_other():
    """No import circle, even through a ``TYPE_CHECKING`` block or a lazy import (the two configs once had one)."""
    cycle = import_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_checker_sees_an_import_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"b"}, "d": set()}
    assert import_cycle(graph) == ["b", "c", "b"]
    assert import_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
