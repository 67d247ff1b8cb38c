"""Max and average pooling over ``(N, C, H, W)``, forward and backward.

Windows are ``R x S`` with strides ``(u, v)`` and paddings ``(a, b)``; output
``(N, C, P, Q)`` with ``P = out_size(H, R, u, a)`` (docs/derivation.md,
section 7). As in PyTorch:

* max pooling pads with ``-inf`` and routes each output gradient to the
  *first* maximum of its window (row-major order);
* average pooling pads with zeros and divides by ``R*S`` whether or not the
  window covers padding (``count_include_pad=True``);
* padding may be at most half the kernel, so no window lies wholly in padding.
"""

from __future__ import annotations

import math

import numpy as np

from .. import backend
from . import _cupy
from ._checks import check_float, check_ndim, namespace_of, out_size, pair
from ._parallel import batch_parallel
from ._windows import pad2d, scatter_add_taps, tap_slices

__all__ = ["max_pool2d", "max_pool2d_backward", "avg_pool2d", "avg_pool2d_backward", "pool2d_geometry"]


def pool2d_geometry(x_shape, kernel_size, stride, padding, where):
    """Validate options; return ``(N, C, H, W, R, S, u, v, a, b, P, Q)``."""
    R, S = pair(kernel_size, "kernel_size", where, minimum=1)
    u, v = pair(stride if stride is not None else (R, S), "stride", where, minimum=1)
    a, b = pair(padding, "padding", where, minimum=0)
    if 2 * a > R or 2 * b > S:
        raise ValueError(f"{where}: padding must be at most half the kernel size {(R, S)}, got padding {(a, b)}")
    N, C, H, W = x_shape
    P, Q = out_size(H, R, u, a), out_size(W, S, v, b)
    if P < 1 or Q < 1:
        raise ValueError(
            f"{where}: kernel {R}x{S} is larger than the padded input {H + 2 * a}x{W + 2 * b} "
            f"(input {H}x{W}, padding {(a, b)})"
        )
    return N, C, H, W, R, S, u, v, a, b, P, Q


def _check_input(x, where):
    xp = namespace_of(x, where=where)
    check_ndim(x, 4, "(N, C, H, W)", where)
    check_float(x, where)
    return xp


def max_pool2d(x, kernel_size, stride=None, padding=0, *, where="max_pool2d"):
    """Max pooling, as ``torch.nn.functional.max_pool2d``.

    Parameters
    ----------
    x : array, shape (N, C, H, W)
    kernel_size, stride, padding : int or pair of ints
        ``stride`` defaults to ``kernel_size``.

    Returns
    -------
    y : array, shape (N, C, P, Q)
    argmax : integer array, shape (N, C, P, Q)
        Row-major index ``r*S + s`` of the first maximum in each window; the
        backward needs it.

    Examples
    --------
    >>> import numpy as np
    >>> y, _ = max_pool2d(np.arange(16.0).reshape(1, 1, 4, 4), 2)
    >>> y[0, 0]
    array([[ 5.,  7.],
           [13., 15.]])
    """
    xp = _check_input(x, where)
    N, C, H, W, R, S, u, v, a, b, P, Q = pool2d_geometry(x.shape, kernel_size, stride, padding, where)
    if backend.is_numpy(xp):
        return _max_pool2d_numpy(x, R, S, u, v, a, b, P, Q)
    if backend.is_cupy(xp) and _cupy.supports(x.dtype):
        return _cupy.max_pool2d(x, R, S, u, v, a, b, P, Q)  # one kernel
    xpad = pad2d(x, a, b, value=-math.inf)  # (N, C, H+2a, W+2b)
    windows = xp.stack(
        [xpad[index] for index in tap_slices(R, S, u, v, 1, 1, P, Q)], axis=-1
    )  # (N, C, P, Q, R*S)
    # argmax returns the first occurrence (the standard says so), which is PyTorch's choice.
    argmax = xp.argmax(windows, axis=-1)  # (N, C, P, Q)
    y = xp.max(windows, axis=-1)  # (N, C, P, Q)
    return y, argmax


def max_pool2d_backward(dy, argmax, x_shape, kernel_size, stride=None, padding=0, *, where="max_pool2d"):
    """Gradient of :func:`max_pool2d`: ``dy`` goes to the first maximum of each window.

    Returns
    -------
    dx : array, shape (N, C, H, W) = ``x_shape``
    """
    xp = namespace_of(dy, argmax, where=where)
    N, C, H, W, R, S, u, v, a, b, P, Q = pool2d_geometry(x_shape, kernel_size, stride, padding, where)
    if tuple(dy.shape) != (N, C, P, Q):
        raise ValueError(f"{where}: expected output gradient of shape {(N, C, P, Q)}, got {tuple(dy.shape)}")
    if backend.is_numpy(xp):
        return _max_pool2d_backward_numpy(dy, argmax, x_shape, R, S, u, v, a, b, P, Q)
    if backend.is_cupy(xp) and _cupy.supports(dy.dtype):
        return _cupy.max_pool2d_backward(dy, argmax, x_shape, R, S, u, v, a, b, P, Q)  # a gather, no atomics
    dxpad = scatter_add_taps(
        xp,
        (xp.where(argmax == k, dy, xp.zeros_like(dy)) for k in range(R * S)),
        (N, C, H + 2 * a, W + 2 * b),
        list(tap_slices(R, S, u, v, 1, 1, P, Q)),
        dtype=dy.dtype,
        device=backend.device(dy),
    )  # (N, C, H+2a, W+2b)
    return dxpad[:, :, a : a + H, b : b + W]


def avg_pool2d(x, kernel_size, stride=None, padding=0, *, where="avg_pool2d"):
    """Average pooling, as ``torch.nn.functional.avg_pool2d`` (``count_include_pad=True``).

    Parameters
    ----------
    x : array, shape (N, C, H, W)
    kernel_size, stride, padding : int or pair of ints

    Returns
    -------
    y : array, shape (N, C, P, Q)
    """
    xp = _check_input(x, where)
    N, C, H, W, R, S, u, v, a, b, P, Q = pool2d_geometry(x.shape, kernel_size, stride, padding, where)
    if backend.is_cupy(xp) and _cupy.supports(x.dtype):
        return _cupy.avg_pool2d(x, R, S, u, v, a, b, P, Q)  # one kernel
    xpad = pad2d(x, a, b)  # (N, C, H+2a, W+2b)
    total = xp.zeros((N, C, P, Q), dtype=x.dtype, device=backend.device(x))
    for index in tap_slices(R, S, u, v, 1, 1, P, Q):
        total = total + xpad[index]  # (N, C, P, Q)
    return total / (R * S)


def avg_pool2d_backward(dy, x_shape, kernel_size, stride=None, padding=0, *, where="avg_pool2d"):
    """Gradient of :func:`avg_pool2d`: each window spreads ``dy / (R*S)`` evenly.

    Returns
    -------
    dx : array, shape (N, C, H, W) = ``x_shape``
    """
    xp = namespace_of(dy, where=where)
    N, C, H, W, R, S, u, v, a, b, P, Q = pool2d_geometry(x_shape, kernel_size, stride, padding, where)
    if tuple(dy.shape) != (N, C, P, Q):
        raise ValueError(f"{where}: expected output gradient of shape {(N, C, P, Q)}, got {tuple(dy.shape)}")
    if backend.is_cupy(xp) and _cupy.supports(dy.dtype):
        return _cupy.avg_pool2d_backward(dy, x_shape, R, S, u, v, a, b, P, Q)  # a gather, no atomics
    share = dy / (R * S)  # (N, C, P, Q)
    dxpad = scatter_add_taps(
        xp,
        (share for _ in range(R * S)),
        (N, C, H + 2 * a, W + 2 * b),
        list(tap_slices(R, S, u, v, 1, 1, P, Q)),
        dtype=dy.dtype,
        device=backend.device(dy),
    )  # (N, C, H+2a, W+2b)
    return dxpad[:, :, a : a + H, b : b + W]


# --- NumPy fast path ------------------------------------------------------
# Same taps, read channels-last (see conv.py: activations are (N, C, H, W)
# views of (N, H, W, C) memory), a running maximum updated in place instead of
# a stacked (N, C, P, Q, R*S) copy, and ``>`` so the first maximum wins.


def _nhwc_taps(R, S, u, v, P, Q):
    for r in range(R):
        for s in range(S):
            yield slice(None), slice(r, r + u * (P - 1) + 1, u), slice(s, s + v * (Q - 1) + 1, v), slice(None)


def _max_pool2d_numpy(x, R, S, u, v, a, b, P, Q):
    xt = x.transpose(0, 2, 3, 1)  # (N, H, W, C)
    N, H, W, C = xt.shape
    if a or b:
        xpad = np.full((N, H + 2 * a, W + 2 * b, C), -np.inf, dtype=x.dtype)
        xpad[:, a : a + H, b : b + W, :] = xt
        xt = xpad  # (N, H+2a, W+2b, C)
    best = np.empty((N, P, Q, C), dtype=x.dtype)  # (N, P, Q, C)
    # One byte per output is enough for windows of up to 127 taps, and it is
    # written once and read R*S times.
    index_dtype = np.int8 if R * S <= 127 else np.int64
    argmax = np.zeros((N, P, Q, C), dtype=index_dtype)  # (N, P, Q, C)

    def work(lo, hi, slot):  # each thread pools its own samples
        taps = _nhwc_taps(R, S, u, v, P, Q)
        np.copyto(best[lo:hi], xt[lo:hi][next(taps)])
        for k, index in enumerate(taps, start=1):
            tap = xt[lo:hi][index]
            # Taps come in increasing k, so "set k where this tap is strictly
            # greater" is a maximum with k * mask: elementwise ufuncs only,
            # several times faster than boolean-mask assignment or np.where.
            np.maximum(argmax[lo:hi], np.multiply(tap > best[lo:hi], k, dtype=index_dtype), out=argmax[lo:hi])
            np.maximum(best[lo:hi], tap, out=best[lo:hi])

    batch_parallel(work, N)
    return best.transpose(0, 3, 1, 2), argmax.transpose(0, 3, 1, 2)  # (N, C, P, Q) views


def _max_pool2d_backward_numpy(dy, argmax, x_shape, R, S, u, v, a, b, P, Q):
    N, C, H, W = x_shape
    dyt, argt = dy.transpose(0, 2, 3, 1), argmax.transpose(0, 2, 3, 1)  # (N, P, Q, C)
    dxpad = np.zeros((N, H + 2 * a, W + 2 * b, C), dtype=dy.dtype)  # (N, H+2a, W+2b, C)
    disjoint = u >= R and v >= S  # windows do not overlap: each tap writes its own elements

    def work(lo, hi, slot):  # each thread routes its own samples' gradients
        for k, index in enumerate(_nhwc_taps(R, S, u, v, P, Q)):
            # A product, not np.where: the same result, several times faster.
            if disjoint:
                np.multiply(dyt[lo:hi], argt[lo:hi] == k, out=dxpad[lo:hi][index])
            else:
                dxpad[lo:hi][index] += dyt[lo:hi] * (argt[lo:hi] == k)

    batch_parallel(work, N)
    return dxpad[:, a : a + H, b : b + W, :].transpose(0, 3, 1, 2)  # (N, C, H, W) view
