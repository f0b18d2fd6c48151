"""The layers of lit_rlhf only point down: a module never imports from a layer above its own.

    errors, imports, checkpointing, outputs  <  loggers  <  rlhf  <  hf  <  datamodules  <  models  <  callbacks
    <  applications

Imports inside functions count too: a lazy import hides a dependency, it does not remove it.
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
