"""The backend fixture every test runs through, and the tolerance table.

``backend`` is parametrised over NumPy, read-only NumPy (catches ops that
write into their inputs), ``array_api_strict`` (proves the core uses only the
standard), PyTorch CPU tensors (where torch is installed) and CuPy (where a
CUDA device works). Absent ones skip with the reason; they never fail.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from types import ModuleType

import numpy as np
import pytest

from portable_cnn import backend as B

# Tolerances per dtype, in one place: the package's table, which
# `portable-cnn check` applies too; the gradient checks, the cross-backend
# parity tests and the PyTorch oracle all read it through tol().
from portable_cnn.check import TOLERANCES

# Central differences in float64: step and the agreement expected of them.
GRADCHECK = {"eps": 1e-6, "rtol": 1e-5, "atol": 1e-7}


def tol(dtype) -> dict:
    """``rtol``/``atol`` for comparing results of ``dtype`` (a name like ``"float32"`` or any dtype)."""
    return TOLERANCES[B.dtype_name(np.empty(0)) if dtype is None else str(dtype).replace("torch.", "")]


@dataclass
class Backend:
    """One array library under test, with conversions from and to NumPy."""

    name: str
    xp: ModuleType
    readonly: bool = False

    def asarray(self, a, dtype=None):
        """A backend array from NumPy data (read-only for ``numpy-readonly``)."""
        out = B.asarray(np.asarray(a), self.xp, dtype=dtype)
        if self.readonly:
            out.flags.writeable = False
        return out

    def to_numpy(self, a) -> np.ndarray:
        return np.asarray(B.to_numpy(a))

    def __repr__(self):
        return f"Backend({self.name})"


def _torch_missing():
    return importlib.util.find_spec("torch") is None


BACKEND_NAMES = ["numpy", "numpy-readonly", "array_api_strict", "torch", "cupy"]


def make_backend(name: str) -> Backend:
    """Build a :class:`Backend` or skip the test with the reason it cannot run."""
    if name in ("numpy", "numpy-readonly"):
        return Backend(name, B.get_namespace("numpy"), readonly=name == "numpy-readonly")
    if name == "torch" and _torch_missing():
        pytest.skip("PyTorch not installed")
    if name == "cupy":
        ok, why = B.cupy_status()
        if not ok:
            pytest.skip(f"CuPy backend unavailable: {why}")
    if name == "array_api_strict" and importlib.util.find_spec("array_api_strict") is None:
        pytest.skip("array_api_strict not installed")
    return Backend(name, B.get_namespace(name))


@pytest.fixture(params=BACKEND_NAMES)
def backend(request) -> Backend:
    """Every installed backend (see the module docstring)."""
    if request.param == "cupy":
        request.applymarker(pytest.mark.gpu)
    return make_backend(request.param)


@pytest.fixture
def torch():
    """PyTorch, the independent oracle; skips where it is not installed."""
    return pytest.importorskip("torch", reason="PyTorch not installed: oracle tests skipped")
