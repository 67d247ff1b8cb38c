"""Float64 central differences, the reference every hand-written backward is checked against.

The op under test may run on any backend: the function handed to
:func:`numerical_grad` takes NumPy arrays, converts them, runs the forward and
returns a Python float. The differences themselves are always taken here, in
NumPy float64, so a wrong backward cannot hide behind a wrong difference.

Tests import it as ``from gradcheck import numerical_grad`` (``tests/`` is on
``sys.path`` because it holds the rootdir ``conftest.py`` and no
``__init__.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from conftest import GRADCHECK

__all__ = ["numerical_grad", "assert_grad_close", "projected_loss"]


def numerical_grad(f: Callable[[np.ndarray], float], x: np.ndarray, eps: float | None = None) -> np.ndarray:
    """Central differences ``(f(x + eps e_i) - f(x - eps e_i)) / (2 eps)`` for every entry ``i``.

    Parameters
    ----------
    f : callable
        Scalar function of one float64 NumPy array of ``x``'s shape.
    x : numpy.ndarray
        The point; never modified (each evaluation gets a fresh copy, so ``f``
        may hand it to a backend that keeps or freezes it).
    eps : float, optional
        Step; ``GRADCHECK["eps"]`` from ``conftest.py`` by default.

    Returns
    -------
    numpy.ndarray, float64, shape of ``x``
    """
    eps = GRADCHECK["eps"] if eps is None else eps
    x = np.array(x, dtype=np.float64, copy=True)
    grad = np.zeros_like(x)
    for i in np.ndindex(*x.shape):
        plus = x.copy()
        plus[i] += eps
        minus = x.copy()
        minus[i] -= eps
        grad[i] = (float(f(plus)) - float(f(minus))) / (2 * eps)
    return grad


def assert_grad_close(analytic, numeric: np.ndarray, name: str = "gradient") -> None:
    """Compare a hand-written gradient (NumPy) with central differences, GRADCHECK tolerances."""
    np.testing.assert_allclose(
        np.asarray(analytic), numeric, rtol=GRADCHECK["rtol"], atol=GRADCHECK["atol"], err_msg=name
    )


def projected_loss(to_numpy: Callable, cotangent: np.ndarray) -> Callable:
    """``y -> sum(y * cotangent)`` in float64 NumPy: a scalar whose gradient in ``y`` is ``cotangent``."""

    def loss(y) -> float:
        return float(np.sum(np.asarray(to_numpy(y), dtype=np.float64) * cotangent))

    return loss
