"""Max and average pooling in the array API standard (the reference), forward and backward.

As in PyTorch: max pooling pads with ``-inf`` and routes each output
gradient to the *first* maximum of its window (row-major order; the
standard's ``argmax`` returns the first occurrence); average pooling pads
with zeros and divides by ``R*S`` whether or not the window covers padding.
The argmax is the tap index ``r*S + s`` within the window.
"""

from __future__ import annotations

import math

from ... import backend
from .windows import pad2d, scatter_add_taps, tap_slices

__all__ = ["max_pool2d_forward", "max_pool2d_backward", "avg_pool2d_forward", "avg_pool2d_backward"]


def max_pool2d_forward(xp, x, g):
    """``(y, argmax)``, both ``(N, C, P, Q)``; ``g`` a :class:`~portable_cnn.geometry.PoolGeometry`."""
    xpad = pad2d(xp, x, g.a, g.b, value=-math.inf)  # (N, C, H+2a, W+2b)
    windows = xp.stack([xpad[index] for index in tap_slices(g.as_conv)], axis=-1)  # (N, C, P, Q, R*S)
    return xp.max(windows, axis=-1), xp.argmax(windows, axis=-1)  # (N, C, P, Q) each


def max_pool2d_backward(xp, dy, argmax, g):
    """``dx`` ``(N, C, H, W)``: each ``dy`` goes to its window's first maximum."""
    zeros = xp.zeros_like(dy)
    taps = (xp.where(argmax == k, dy, zeros) for k in range(g.taps))  # R*S x (N, C, P, Q)
    return scatter_add_taps(xp, taps, g.as_conv, dtype=dy.dtype, device=backend.device(dy))


def avg_pool2d_forward(xp, x, g):
    """``y`` ``(N, C, P, Q)``: window sums over ``R*S``, padding counted."""
    xpad = pad2d(xp, x, g.a, g.b)  # (N, C, H+2a, W+2b)
    total = xp.zeros(g.y_shape, dtype=x.dtype, device=backend.device(x))
    for index in tap_slices(g.as_conv):
        total = total + xpad[index]  # (N, C, P, Q)
    return total / g.taps


def avg_pool2d_backward(xp, dy, g):
    """``dx`` ``(N, C, H, W)``: each window spreads ``dy / (R*S)`` evenly."""
    share = dy / g.taps  # (N, C, P, Q)
    return scatter_add_taps(xp, (share for _ in range(g.taps)), g.as_conv, dtype=dy.dtype, device=backend.device(dy))
