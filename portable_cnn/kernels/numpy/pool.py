"""NumPy max pooling: channels-last taps, a running maximum, data-parallel over the batch.

The same taps as the reference, read channels-last (activations are
(N, C, H, W) views of (N, H, W, C) memory, see :mod:`.conv`), a running
maximum updated in place instead of a stacked (N, C, P, Q, R*S) copy, and
``>`` so the first maximum wins. The argmax is the tap index ``r*S + s``, as
the reference's, in int8 for windows of up to 127 taps (written once, read
``R*S`` times) and int64 above.
"""

from __future__ import annotations

import numpy as np

from .parallel import batch_parallel

__all__ = ["max_pool2d_forward", "max_pool2d_backward"]


def _nhwc_taps(g):
    for r in range(g.R):
        for s in range(g.S):
            yield slice(None), slice(r, r + g.u * (g.P - 1) + 1, g.u), slice(s, s + g.v * (g.Q - 1) + 1, g.v), slice(None)


def max_pool2d_forward(xp, x, g):
    """``(y, argmax)`` as (N, C, P, Q) views of channels-last memory."""
    xt = x.transpose(0, 2, 3, 1)  # (N, H, W, C)
    N, H, W, C = xt.shape
    a, b = g.a, g.b
    if a or b:
        xpad = np.full((N, H + 2 * a, W + 2 * b, C), -np.inf, dtype=x.dtype)
        xpad[:, a : a + H, b : b + W, :] = xt
        xt = xpad  # (N, H+2a, W+2b, C)
    best = np.empty((N, g.P, g.Q, C), dtype=x.dtype)  # (N, P, Q, C)
    index_dtype = np.int8 if g.taps <= 127 else np.int64
    argmax = np.zeros((N, g.P, g.Q, C), dtype=index_dtype)  # (N, P, Q, C)

    def work(lo, hi, slot):  # each thread pools its own samples
        taps = _nhwc_taps(g)
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


def max_pool2d_backward(xp, dy, argmax, g):
    """``dx`` (N, C, H, W), a view of channels-last memory."""
    N, C, H, W = g.x_shape
    a, b = g.a, g.b
    dyt, argt = dy.transpose(0, 2, 3, 1), argmax.transpose(0, 2, 3, 1)  # (N, P, Q, C)
    dxpad = np.zeros((N, H + 2 * a, W + 2 * b, C), dtype=dy.dtype)  # (N, H+2a, W+2b, C)
    disjoint = g.u >= g.R and g.v >= g.S  # windows do not overlap: each tap writes its own elements

    def work(lo, hi, slot):  # each thread routes its own samples' gradients
        for k, index in enumerate(_nhwc_taps(g)):
            # A product, not np.where: the same result, several times faster.
            if disjoint:
                np.multiply(dyt[lo:hi], argt[lo:hi] == k, out=dxpad[lo:hi][index])
            else:
                dxpad[lo:hi][index] += dyt[lo:hi] * (argt[lo:hi] == k)

    batch_parallel(work, N)
    return dxpad[:, a : a + H, b : b + W, :].transpose(0, 3, 1, 2)  # (N, C, H, W) view
