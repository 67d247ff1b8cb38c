"""Elementwise activations, forward and backward.

Each backward takes what its forward cached: ``relu`` the input (its sign is
the mask), ``sigmoid`` and ``tanh`` their output, whose derivative is a
function of the output alone (docs/derivation.md, section 8).
"""

from __future__ import annotations

import numpy as np

from .. import backend
from . import _cupy
from ._checks import check_float, check_grad_shape, namespace_of
from ._parallel import parallel_apply

__all__ = ["relu", "relu_backward", "sigmoid", "sigmoid_backward", "tanh", "tanh_backward"]


def _float_namespace(x, where):
    xp = namespace_of(x, where=where)
    check_float(x, where)
    return xp


def relu(x, *, where="relu"):
    """``max(x, 0)`` elementwise.

    >>> import numpy as np
    >>> relu(np.array([-1.0, 0.0, 2.0]))
    array([0., 0., 2.])
    """
    xp = _float_namespace(x, where)
    if backend.is_numpy(xp):
        # One pass on every core; empty_like keeps x's memory layout.
        return parallel_apply(_relu_into, np.empty_like(x), x)
    if backend.is_cupy(xp) and _cupy.supports(x.dtype):
        return _cupy.relu(x)  # one kernel (the line below is three)
    return xp.where(x > 0, x, xp.zeros_like(x))


def relu_backward(dy, x, *, where="relu"):
    """``dy`` where ``x > 0``, else 0 (the subgradient at 0 is taken as 0, as PyTorch does)."""
    xp = namespace_of(dy, x, where=where)
    check_grad_shape(dy, x.shape, where)
    if backend.is_numpy(xp):
        # A product, not np.where: the same result for finite dy, several times faster.
        return parallel_apply(_relu_backward_into, np.empty_like(dy), dy, x)
    if backend.is_cupy(xp) and _cupy.supports(dy.dtype) and dy.dtype == x.dtype:
        return _cupy.relu_backward(dy, x)
    return xp.where(x > 0, dy, xp.zeros_like(dy))


def _relu_into(out, x):
    np.maximum(x, x.dtype.type(0), out=out)


def _relu_backward_into(out, dy, x):
    np.multiply(dy, x > 0, out=out)


def sigmoid(x, *, where="sigmoid"):
    """``1 / (1 + exp(-x))``, computed without overflow for any finite ``x``."""
    xp = _float_namespace(x, where)
    e = xp.exp(-xp.abs(x))  # in (0, 1]: never overflows
    return xp.where(x >= 0, 1 / (1 + e), e / (1 + e))


def sigmoid_backward(dy, y, *, where="sigmoid"):
    """``dy * y * (1 - y)`` with ``y`` the forward's output."""
    namespace_of(dy, y, where=where)
    check_grad_shape(dy, y.shape, where)
    return dy * y * (1 - y)


def tanh(x, *, where="tanh"):
    """Hyperbolic tangent."""
    xp = _float_namespace(x, where)
    return xp.tanh(x)


def tanh_backward(dy, y, *, where="tanh"):
    """``dy * (1 - y**2)`` with ``y`` the forward's output."""
    namespace_of(dy, y, where=where)
    check_grad_shape(dy, y.shape, where)
    return dy * (1 - y * y)
