"""The one place that decides which implementation of an op runs.

A public op (:mod:`portable_cnn.ops`) validates its arguments, builds its
geometry and asks :func:`kernel` for the implementation registered for
``(op, array library, dtype)``. The answer is the backend kernel where one
is registered (the package :data:`portable_cnn.kernels.PACKAGES` names, its ``KERNELS``) and the
``fast_paths`` setting is on, else the standard-only reference
(``portable_cnn/kernels/reference/``), which every op has. Nothing else in
the package asks which array library it holds; kernels never do.

Backend kernel packages are imported on first use for their library, so
CuPy's are imported only once CuPy arrays have reached an op.

>>> import numpy as np
>>> from portable_cnn import backend, config_context
>>> xp = backend.get_namespace("numpy")
>>> kernel("relu_forward", xp, np.dtype("float64")).__module__
'portable_cnn.kernels.numpy.activation'
>>> with config_context(fast_paths=False):
...     kernel("relu_forward", xp, np.dtype("float64")).__module__
'portable_cnn.kernels.reference.activation'
"""

from __future__ import annotations

import importlib

from . import backend
from .config import setting
from .kernels import PACKAGES
from .kernels.reference import KERNELS as REFERENCE

__all__ = ["REFERENCE", "kernel", "backend_kernels", "implementation_name", "clear_cache"]

_tables: dict = {}  # library name -> its KERNELS table
_chosen: dict = {}  # (op, namespace, dtype, fast_paths) -> implementation


def backend_kernels(library: str) -> dict:
    """The ``KERNELS`` table of ``library``'s package (``{}`` for a library without one), imported on first use."""
    table = _tables.get(library)
    if table is None:
        package = PACKAGES.get(library)
        table = importlib.import_module(package).KERNELS if package is not None else {}
        _tables[library] = table
    return table


def kernel(op: str, xp, dtype):
    """The implementation of ``op`` for arrays of namespace ``xp`` and ``dtype``.

    The backend kernel when ``fast_paths`` is on and one is registered for
    that dtype, else the reference. Every implementation of one op takes the
    same arguments, the namespace first.
    """
    fast = setting("fast_paths")
    key = (op, xp, dtype, fast)
    try:
        return _chosen[key]
    except KeyError:
        pass
    except TypeError:  # an unhashable dtype object: decide without caching
        return _choose(op, xp, dtype, fast)
    chosen = _chosen[key] = _choose(op, xp, dtype, fast)
    return chosen


def _choose(op, xp, dtype, fast):
    if op not in REFERENCE:
        raise KeyError(f"dispatch: no op named {op!r}; known ops: {', '.join(sorted(REFERENCE))}")
    if fast:
        entry = backend_kernels(backend.library_name(xp)).get(op)
        if entry is not None:
            dtypes, implementation = entry
            if dtypes is None or backend.dtype_name_of(dtype) in dtypes:
                return implementation
    return REFERENCE[op]


def implementation_name(op: str, xp, dtype) -> str:
    """``"module.function"`` of what :func:`kernel` picks: for reports and tests."""
    chosen = kernel(op, xp, dtype)
    return f"{chosen.__module__}.{chosen.__qualname__}"


def clear_cache() -> None:
    """Forget the choices :func:`kernel` has made (after a ``KERNELS`` table was changed, e.g. by a test)."""
    _chosen.clear()
