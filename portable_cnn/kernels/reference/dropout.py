"""Inverted dropout in the array API standard (the reference); formulas in :mod:`portable_cnn.ops.dropout`.

``xp.asarray`` keeps a 0-d result an array: NumPy's operators give a scalar there.
"""

from __future__ import annotations

__all__ = ["dropout_forward", "dropout_backward"]


def dropout_forward(xp, x, p, mask_uniform):
    """``(x * mask, mask)`` with ``mask = (mask_uniform >= p) / (1 - p)`` (all zeros for ``p = 1``)."""
    if p == 1.0:
        # 1 / (1 - p) is infinite: everything is dropped (0 * inf would be NaN).
        mask = xp.zeros_like(x)
    else:
        mask = xp.asarray(xp.astype(mask_uniform >= p, x.dtype) * (1.0 / (1.0 - p)))
    return xp.asarray(x * mask), mask


def dropout_backward(xp, dy, mask):
    """``dy * mask``."""
    return xp.asarray(dy * mask)
