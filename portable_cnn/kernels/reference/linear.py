"""Fully connected layer and flattening in the array API standard (the reference).

``y = x @ W.T + b`` with ``W`` of shape ``(out, in)``; the backward is the two
transposed GEMMs (docs/derivation.md, section 9)::

    dx = dy @ W        # (N, in)
    dW = dy.T @ x      # (out, in)
    db = sum_n dy      # (out,)

``N`` counts rows: the op (:mod:`portable_cnn.ops.linear`) hands over an
``(N, *, in)`` or ``(in,)`` input with its leading axes flattened into rows.
"""

from __future__ import annotations

__all__ = ["linear_forward", "linear_backward", "flatten_forward", "flatten_backward"]


def linear_forward(xp, x, weight, bias):
    """``x @ weight.T + bias``: ``(N, in) -> (N, out)``."""
    y = x @ weight.T  # (N, out)
    return y if bias is None else y + bias


def linear_backward(xp, dy, x, weight, *, has_bias=True, need_input_grad=True):
    """``(dx or None, dW, db or None)``."""
    dx = dy @ weight if need_input_grad else None  # (N, in)
    dweight = dy.T @ x  # (out, in)
    dbias = xp.sum(dy, axis=0) if has_bias else None  # (out,)
    return dx, dweight, dbias


def flatten_forward(xp, x, features):
    """``(N, ...) -> (N, features)`` in row-major order."""
    return xp.reshape(x, (x.shape[0], features))


def flatten_backward(xp, dy, x_shape):
    """``dy`` back to the forward's input shape."""
    return xp.reshape(dy, tuple(x_shape))
