"""Elementwise activations in the array API standard (the reference), forward and backward.

Each backward takes what its forward cached: ``relu`` the input (its sign is
the mask), ``sigmoid`` and ``tanh`` their output, whose derivative is a
function of the output alone (docs/derivation.md, section 8). Every
function returns an array, a 0-d one for a 0-d input: NumPy's operators and
ufuncs give a scalar there, which ``xp.asarray`` turns back into an array.
"""

from __future__ import annotations

__all__ = ["relu_forward", "relu_backward", "sigmoid_forward", "sigmoid_backward", "tanh_forward", "tanh_backward"]


def relu_forward(xp, x):
    """``max(x, 0)``; NaN gives 0."""
    return xp.where(x > 0, x, xp.zeros_like(x))


def relu_backward(xp, dy, x):
    """``dy`` where ``x > 0``, else 0 (the subgradient at 0 is 0, as in PyTorch)."""
    return xp.where(x > 0, dy, xp.zeros_like(dy))


def sigmoid_forward(xp, x):
    """``1 / (1 + exp(-x))`` without overflow for any finite ``x``."""
    e = xp.exp(-xp.abs(x))  # in (0, 1]: never overflows
    return xp.where(x >= 0, 1 / (1 + e), e / (1 + e))


def sigmoid_backward(xp, dy, y):
    """``dy * y * (1 - y)``."""
    return xp.asarray(dy * y * (1 - y))


def tanh_forward(xp, x):
    """Hyperbolic tangent."""
    return xp.asarray(xp.tanh(x))


def tanh_backward(xp, dy, y):
    """``dy * (1 - y**2)``."""
    return xp.asarray(dy * (1 - y * y))
