"""docs/derivation.md names the test that checks each formula: every such test exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_test_named_in_the_derivation_exists():
    text = (ROOT / "docs" / "derivation.md").read_text(encoding="utf-8")
    named = set(re.findall(r"tests/(test_\w+\.py)::(\w+)", text))
    assert len(named) >= 40, "the derivation should tie its formulas to tests"
    missing = []
    for filename, name in sorted(named):
        tree = ast.parse((ROOT / "tests" / filename).read_text(encoding="utf-8"))
        defined = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
        if name not in defined:
            missing.append(f"{filename}::{name}")
    assert not missing, f"docs/derivation.md names tests that do not exist: {missing}"


def test_the_readme_example_runs():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README.md should show a Python example"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md example", "exec"), namespace)  # noqa: S102 - our own README
    model = namespace["model"]
    assert str(model[0].params["weight"].dtype) == "float64"
    assert float(namespace["loss"]) > 0
