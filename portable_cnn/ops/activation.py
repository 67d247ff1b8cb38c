"""Elementwise activations, forward and backward: validation and dispatch.

Each backward takes what its forward cached: ``relu`` the input (its sign is
the mask), ``sigmoid`` and ``tanh`` their output, whose derivative is a
function of the output alone (docs/derivation.md, section 8). The arithmetic
is in ``kernels/reference/activation.py`` (and the NumPy and CuPy kernels
for ReLU).
"""

from __future__ import annotations

from .. import dispatch
from ._checks import check_float, check_grad_shape, namespace_of

__all__ = ["relu", "relu_backward", "sigmoid", "sigmoid_backward", "tanh", "tanh_backward"]


def _forward(op, x, where):
    xp = namespace_of(x, where=where)
    check_float(x, where)
    return dispatch.kernel(op, xp, x.dtype)(xp, x)


def _backward(op, dy, saved, where):
    xp = namespace_of(dy, saved, where=where)
    check_grad_shape(dy, saved.shape, where)
    return dispatch.kernel(op, xp, dy.dtype)(xp, dy, saved)


def relu(x, *, where="relu"):
    """``max(x, 0)`` elementwise.

    >>> import numpy as np
    >>> relu(np.array([-1.0, 0.0, 2.0]))
    array([0., 0., 2.])
    """
    return _forward("relu_forward", x, where)


def relu_backward(dy, x, *, where="relu"):
    """``dy`` where ``x > 0``, else 0 (the subgradient at 0 is taken as 0, as PyTorch does)."""
    return _backward("relu_backward", dy, x, where)


def sigmoid(x, *, where="sigmoid"):
    """``1 / (1 + exp(-x))``, computed without overflow for any finite ``x``."""
    return _forward("sigmoid_forward", x, where)


def sigmoid_backward(dy, y, *, where="sigmoid"):
    """``dy * y * (1 - y)`` with ``y`` the forward's output."""
    return _backward("sigmoid_backward", dy, y, where)


def tanh(x, *, where="tanh"):
    """Hyperbolic tangent."""
    return _forward("tanh_forward", x, where)


def tanh_backward(dy, y, *, where="tanh"):
    """``dy * (1 - y**2)`` with ``y`` the forward's output."""
    return _backward("tanh_backward", dy, y, where)
