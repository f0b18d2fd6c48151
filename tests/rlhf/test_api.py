import ast
import inspect
from pathlib import Path

import lit_rlhf.rlhf as rlhf

PACKAGE_DIR = Path(rlhf.__file__).parent
FORBIDDEN = ("lightning", "pytorch_lightning", "transformers")


def test_rlhf_layer_is_pure_torch():
    """The math layer must stay importable without Lightning or transformers."""
    for path in sorted(PACKAGE_DIR.rglob("*.py")):  # the algorithms package too
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [node.module or ""]
            else:
                continue
            for module in modules:
                assert module.split(".")[0] not in FORBIDDEN, f"{path.name} imports {module}"


def test_public_api_is_exported_and_documented():
    assert sorted(rlhf.__all__) == rlhf.__all__
    for name in rlhf.__all__:
        obj = getattr(rlhf, name)
        if inspect.isfunction(obj):
            doc = inspect.getdoc(obj)
            assert doc and "Returns:" in doc, f"{name} needs a Google-style docstring with Returns"
