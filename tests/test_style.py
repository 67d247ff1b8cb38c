"""Guards for the rules in STYLE.md that a machine can check.

* Only ``portable_cnn/backend.py`` imports ``array_api_compat``.
* Nothing imports ``cupy`` at module level (a function-level lazy import is
  fine): importing the package on a machine without a GPU must not touch CuPy.
  The same goes for ``torch``, which is never a runtime dependency.
* The numeric core runs on ``array_api_strict``, the standard and nothing else.

The import scans read the source with :mod:`ast`, so they see imports inside
``if``/``try`` blocks at module level, and ``importlib.import_module("...")``
calls, not just plain ``import`` lines. The scanners are themselves tested on
small sources, so a scanner that finds nothing cannot pass unnoticed.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import tol

from portable_cnn import backend as B
from portable_cnn import nn

PACKAGE = Path(__file__).resolve().parent.parent / "portable_cnn"
SOURCES = sorted(PACKAGE.rglob("*.py"))


def _imported(node) -> list[str]:
    """Module names that one AST node imports (``import a.b``, ``from a import b``, ``import_module("a")``)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        return [node.module or ""] if node.level == 0 else []
    if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
            return [node.args[0].value]
    return []


def imports_anywhere(source: str) -> set[str]:
    """Top-level package of every import in ``source``, at any depth."""
    return {name.split(".")[0] for node in ast.walk(ast.parse(source)) for name in _imported(node)}


def imports_at_import_time(source: str) -> set[str]:
    """Top-level package of every import that runs when the module is imported.

    That is everything outside function bodies: module level, including
    ``if``/``try``/``with`` blocks and class bodies. Decorators and default
    arguments also run at import time, so only the function *body* is skipped.
    """
    found: set[str] = set()

    def visit(node):
        found.update(name.split(".")[0] for name in _imported(node))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            children = [*node.decorator_list, node.args, *([node.returns] if node.returns else [])]
        elif isinstance(node, ast.Lambda):
            children = [node.args]
        else:
            children = list(ast.iter_child_nodes(node))
        for child in children:
            visit(child)

    visit(ast.parse(source))
    return found


def _relative(path: Path) -> str:
    return path.relative_to(PACKAGE.parent).as_posix()


# --------------------------------------------------------------------------- the scanners themselves


def test_scanner_finds_module_level_imports():
    source = """
import os
try:
    import cupy as cp
except ImportError:
    cp = None
if os.environ:
    from torch import nn
class Holder:
    import array_api_compat.numpy
def lazy(x=__import__("json")):
    import cupy  # fine: runs only when called
    importlib.import_module("torch")
importlib.import_module("array_api_strict")
f = lambda: __import__("sklearn")
"""
    assert imports_at_import_time(source) == {"os", "cupy", "torch", "array_api_compat", "json", "array_api_strict"}
    assert imports_anywhere(source) == {"os", "cupy", "torch", "array_api_compat", "json", "array_api_strict", "sklearn"}


def test_scanner_leaves_function_level_imports():
    source = "def f():\n    import cupy\n    from array_api_compat import numpy\n"
    assert imports_at_import_time(source) == set()
    assert imports_anywhere(source) == {"cupy", "array_api_compat"}


def test_package_sources_are_found():
    names = {_relative(path) for path in SOURCES}
    assert {"portable_cnn/backend.py", "portable_cnn/nn.py", "portable_cnn/ops/conv.py"} <= names


# --------------------------------------------------------------------------- the rules


@pytest.mark.parametrize("path", SOURCES, ids=_relative)
def test_only_backend_imports_array_api_compat(path):
    if _relative(path) == "portable_cnn/backend.py":
        assert "array_api_compat" in imports_anywhere(path.read_text())
        return
    assert "array_api_compat" not in imports_anywhere(path.read_text()), (
        f"{_relative(path)} imports array_api_compat: go through portable_cnn.backend"
    )


@pytest.mark.parametrize("path", SOURCES, ids=_relative)
def test_no_module_level_cupy_or_torch(path):
    found = imports_at_import_time(path.read_text()) & {"cupy", "cupyx", "torch"}
    assert not found, f"{_relative(path)} imports {sorted(found)} at module level; import it lazily inside a function"


def test_importing_the_package_loads_no_gpu_or_torch_library():
    """The same rule at run time, in a fresh interpreter: every submodule imported, cupy and torch untouched."""
    script = (
        "import importlib, pkgutil, sys, portable_cnn\n"
        "for m in pkgutil.walk_packages(portable_cnn.__path__, 'portable_cnn.'):\n"
        "    importlib.import_module(m.name)\n"
        "print(sorted({k.split('.')[0] for k in sys.modules} & {'cupy', 'cupyx', 'torch'}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=PACKAGE.parent, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# --------------------------------------------------------------------------- the core on the standard alone


def test_conv_net_runs_end_to_end_on_array_api_strict():
    """Forward and backward of a conv net on array_api_strict arrays agrees with NumPy."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 2, 9, 7))
    labels = np.array([0, 3, 1])

    def run(xp_name):
        nn.manual_seed(4)
        model = nn.Sequential(
            nn.Conv2d(2, 4, (3, 2), stride=(2, 1), padding=1, dilation=(1, 2)),  # (3, 4, 5, 7)
            nn.ReLU(),
            nn.MaxPool2d(2, stride=1, padding=1),  # (3, 4, 6, 8)
            nn.Conv2d(4, 3, 3, padding=(0, 1)),  # (3, 3, 4, 8)
            nn.Tanh(),
            nn.AvgPool2d(2),  # (3, 3, 2, 4)
            nn.Flatten(),
            nn.Linear(24, 6),
            nn.Sigmoid(),
            nn.Linear(6, 4),
        ).to(xp_name, "float64")
        xp = B.get_namespace(xp_name)
        loss_fn = nn.SoftmaxCrossEntropy()
        xb = B.asarray(x, xp)
        loss = loss_fn.forward(model.forward(xb), B.asarray(labels, xp))
        dx = model.backward(loss_fn.backward())
        for out in [loss, dx] + [layer.grads[key] for _, layer, key in model.named_parameters()]:
            assert B.backend_name(out) == xp_name
        grads = {name: B.to_numpy(layer.grads[key]) for name, layer, key in model.named_parameters()}
        return float(B.to_numpy(loss)), B.to_numpy(dx), grads

    loss_strict, dx_strict, grads_strict = run("array_api_strict")
    loss_np, dx_np, grads_np = run("numpy")
    assert np.isfinite(loss_strict) and loss_strict > 0
    np.testing.assert_allclose(loss_strict, loss_np, **tol("float64"))
    np.testing.assert_allclose(dx_strict, dx_np, **tol("float64"))
    assert set(grads_strict) == {"0.weight", "0.bias", "3.weight", "3.bias", "7.weight", "7.bias", "9.weight", "9.bias"}
    for name in grads_np:
        assert np.any(grads_strict[name] != 0), name
        np.testing.assert_allclose(grads_strict[name], grads_np[name], **tol("float64"), err_msg=name)


# --------------------------------------------------------------------------- one dispatch, no cycles

# Functions that ask which array library an array or namespace belongs to.
LIBRARY_TESTS = {"is_numpy", "is_cupy", "is_torch", "library_name", "backend_name", "is_numpy_array", "is_cupy_array",
                 "is_torch_array", "is_numpy_namespace", "is_cupy_namespace", "is_torch_namespace"}


def library_tests(source: str) -> set[str]:
    """Names from :data:`LIBRARY_TESTS` that ``source`` calls, reads as an attribute or imports (``backend.is_cupy(xp)``)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute):
            names = [node.attr]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            names = [node.func.id]
        elif isinstance(node, ast.ImportFrom):
            names = [alias.name for alias in node.names]
        else:
            names = []
        found.update(name for name in names if name in LIBRARY_TESTS)
    return found


def test_library_test_scanner_finds_calls_and_references():
    assert library_tests("if backend.is_cupy(xp): pass\nf = B.is_numpy\n") == {"is_cupy", "is_numpy"}
    assert library_tests("x = is_torch_namespace(xp)\nfrom .backend import library_name\n") == {"is_torch_namespace", "library_name"}
    assert library_tests("def f(backend_name): return backend_name\n") == set()


def _in_kernels(path: Path) -> bool:
    return _relative(path).startswith("portable_cnn/kernels/")


@pytest.mark.parametrize("path", SOURCES, ids=_relative)
def test_only_backend_kernels_and_the_dispatch_ask_which_library(path):
    """Nothing outside backend.py and kernels/ tests the array library, but the dispatch's one question."""
    relative = _relative(path)
    found = library_tests(path.read_text())
    if relative == "portable_cnn/backend.py" or _in_kernels(path):
        return
    if relative == "portable_cnn/dispatch.py":
        assert found == {"library_name"}, f"the dispatch asks only backend.library_name, found {sorted(found)}"
        return
    assert not found, f"{relative} tests the array library ({sorted(found)}): ask portable_cnn.dispatch for a kernel"


@pytest.mark.parametrize("path", SOURCES, ids=_relative)
def test_the_cupy_kernels_are_named_only_in_kernels(path):
    source = path.read_text()
    if _in_kernels(path):
        return
    assert "kernels.cupy" not in source and "kernels import cupy" not in source, (
        f"{_relative(path)} refers to the CuPy kernels; only the dispatch (through kernels.PACKAGES) reaches them"
    )


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in SOURCES}


def import_edges(module: str, source: str, is_package: bool, known: set[str]) -> set[str]:
    """Modules of ``known`` that ``module`` imports anywhere in ``source`` (function level too).

    ``from X import name`` counts as importing ``X.name`` where that is a
    module, else ``X``. A module's own parent packages are left out: Python
    imports them first, and they may import the module back.
    """
    package = module if is_package else module.rpartition(".")[0]
    edges = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            targets = [name for name in _imported(node)]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != module and not module.startswith(target + "."):
                edges.add(target)
    return edges


def _cycle(graph: dict) -> list[str] | None:
    """One import cycle of ``graph`` (module -> imported modules), or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_cycle_finder_finds_a_function_level_cycle():
    known = {"pkg", "pkg.a", "pkg.b"}
    graph = {
        "pkg.a": import_edges("pkg.a", "from . import b\n", False, known),
        "pkg.b": import_edges("pkg.b", "def f():\n    from .a import thing\n", False, known),
    }
    assert graph == {"pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a"}}
    assert _cycle(graph) == ["pkg.a", "pkg.b", "pkg.a"]
    assert _cycle({"pkg.a": {"pkg.b"}, "pkg.b": set()}) is None


def test_no_import_cycle_in_the_package():
    """No module imports, at any level, a module that imports it back (directly or through others)."""
    known = set(MODULES)
    graph = {name: import_edges(name, path.read_text(), path.name == "__init__.py", known) for name, path in MODULES.items()}
    assert graph["portable_cnn.ops.conv"] >= {"portable_cnn.dispatch", "portable_cnn.geometry"}
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
