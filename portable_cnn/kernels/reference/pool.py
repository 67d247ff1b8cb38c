"""Pooling in the array API standard (the reference): max, average, adaptive and global average, forward and backward.

As PyTorch (docs/derivation.md, section 7): every window is read from the
*frame*, the input padded by ``a, b`` and, under ``ceil_mode``, extended to
hold a last window that reaches past the padding. Max pooling fills the frame
with ``-inf`` and routes each output gradient to the *first* maximum of its
window (row-major order; the standard's ``argmax`` returns the first
occurrence); the argmax is the tap index ``r*S + s``. Average pooling fills
the frame with zeros and divides window ``(p, q)`` by the geometry's
``avg_divisors`` (``R*S``, the window clipped to the padded input or to the
input, or ``divisor_override``). Adaptive average pooling is two matrix
products with bin-indicator matrices, its gradient their transposes.
"""

from __future__ import annotations

import math

from ... import backend
from .windows import scatter_add_taps, tap_slices

__all__ = [
    "max_pool2d_forward",
    "max_pool2d_relu_forward",
    "max_pool2d_backward",
    "avg_pool2d_forward",
    "avg_pool2d_backward",
    "adaptive_avg_pool2d_forward",
    "adaptive_avg_pool2d_backward",
    "global_avg_pool2d_forward",
    "global_avg_pool2d_backward",
]


def _frame(xp, x, g, value: float):
    """``x`` inside a ``(N, C, frame_height, frame_width)`` frame filled with ``value``, at offset ``(a, b)``."""
    if (g.frame_height, g.frame_width) == (g.H, g.W):
        return x
    frame = xp.full((g.N, g.C, g.frame_height, g.frame_width), value, dtype=x.dtype, device=backend.device(x))
    frame[:, :, g.a : g.a + g.H, g.b : g.b + g.W] = x
    return frame


def _scatter_taps(xp, values, g, like):
    """Add per-tap ``(N, C, P, Q)`` values onto the frame and crop it to the input: ``(N, C, H, W)``."""
    frame = scatter_add_taps(xp, values, g.as_conv, dtype=like.dtype, device=backend.device(like))
    return frame[:, :, g.a : g.a + g.H, g.b : g.b + g.W]


def max_pool2d_forward(xp, x, g):
    """``(y, argmax)``, both ``(N, C, P, Q)``; ``g`` a :class:`~portable_cnn.geometry.PoolGeometry`."""
    frame = _frame(xp, x, g, -math.inf)  # (N, C, frame_height, frame_width)
    windows = xp.stack([frame[index] for index in tap_slices(g.as_conv)], axis=-1)  # (N, C, P, Q, R*S)
    return xp.max(windows, axis=-1), xp.argmax(windows, axis=-1)  # (N, C, P, Q) each


def max_pool2d_relu_forward(xp, x, g):
    """``(relu(y), argmax)`` of :func:`max_pool2d_forward`, argmax ``-1`` where the ReLU stops the gradient.

    ``-1`` matches no tap, so :func:`max_pool2d_backward` sends nothing from
    a window whose maximum is not positive: the gradient of relu after max
    pooling (docs/derivation.md, section 7.4).
    """
    y, argmax = max_pool2d_forward(xp, x, g)
    passes = y > 0
    return xp.where(passes, y, xp.zeros_like(y)), xp.where(passes, argmax, xp.full_like(argmax, -1))


def max_pool2d_backward(xp, dy, argmax, g):
    """``dx`` ``(N, C, H, W)``: each ``dy`` goes to its window's first maximum (nowhere for argmax ``-1``)."""
    zeros = xp.zeros_like(dy)
    taps = (xp.where(argmax == k, dy, zeros) for k in range(g.taps))  # R*S x (N, C, P, Q)
    return _scatter_taps(xp, taps, g, dy)


def _divisor(xp, g, like):
    """The average's divisor: a Python int when every window shares it, else a ``(P, Q)`` array."""
    uniform = g.uniform_divisor
    if uniform is not None:
        return uniform
    rows, cols = g.avg_divisors()
    device = backend.device(like)
    rows = xp.reshape(xp.asarray(rows, dtype=like.dtype, device=device), (g.P, 1))  # (P, 1)
    cols = xp.reshape(xp.asarray(cols, dtype=like.dtype, device=device), (1, g.Q))  # (1, Q)
    return rows * cols  # (P, Q)


def avg_pool2d_forward(xp, x, g):
    """``y`` ``(N, C, P, Q)``: window sums (padding as zeros) over the window's divisor."""
    frame = _frame(xp, x, g, 0.0)  # (N, C, frame_height, frame_width)
    total = xp.zeros(g.y_shape, dtype=x.dtype, device=backend.device(x))
    for index in tap_slices(g.as_conv):
        total = total + frame[index]  # (N, C, P, Q)
    return total / _divisor(xp, g, x)


def avg_pool2d_backward(xp, dy, g):
    """``dx`` ``(N, C, H, W)``: each window spreads ``dy`` over its divisor evenly onto its taps."""
    share = dy / _divisor(xp, g, dy)  # (N, C, P, Q)
    return _scatter_taps(xp, (share for _ in range(g.taps)), g, dy)


def _bin_matrices(xp, g, like):
    """Bin indicators ``(P, H)``, ``(Q, W)`` and the ``(P, Q)`` bin sizes, in ``like``'s dtype and device."""
    device = backend.device(like)

    def indicator(bins, size):
        starts = xp.asarray([start for start, _ in bins], device=device)[:, None]  # (count, 1)
        ends = xp.asarray([end for _, end in bins], device=device)[:, None]  # (count, 1)
        index = xp.arange(size, device=device)[None, :]  # (1, size)
        return xp.astype((index >= starts) & (index < ends), like.dtype)  # (count, size)

    rows, cols = indicator(g.row_bins, g.H), indicator(g.col_bins, g.W)  # (P, H), (Q, W)
    counts = xp.sum(rows, axis=1)[:, None] * xp.sum(cols, axis=1)[None, :]  # (P, Q)
    return rows, cols, counts


def adaptive_avg_pool2d_forward(xp, x, g):
    """``y`` (N, C, P, Q) = ``A_h x A_w^T / counts``; ``g`` an :class:`~portable_cnn.geometry.AdaptivePoolGeometry`."""
    rows, cols, counts = _bin_matrices(xp, g, x)
    return xp.matmul(xp.matmul(rows, x), xp.matrix_transpose(cols)) / counts  # (P, H) @ (N, C, H, W) @ (W, Q)


def adaptive_avg_pool2d_backward(xp, dy, g):
    """``dx`` ``(N, C, H, W)`` = ``A_h^T (dy / counts) A_w``: the forward's products transposed."""
    rows, cols, counts = _bin_matrices(xp, g, dy)
    return xp.matmul(xp.matmul(xp.matrix_transpose(rows), dy / counts), cols)  # (H, P) @ (N, C, P, Q) @ (Q, W)


def global_avg_pool2d_forward(xp, x, g):
    """``y`` ``(N, C, 1, 1)``: the mean over ``H, W``; ``g`` an adaptive geometry with ``P = Q = 1``."""
    return xp.mean(x, axis=(2, 3), keepdims=True)


def global_avg_pool2d_backward(xp, dy, g):
    """``dx`` ``(N, C, H, W)``: ``dy / (H*W)`` at every position."""
    return xp.zeros(g.x_shape, dtype=dy.dtype, device=backend.device(dy)) + dy / (g.H * g.W)
