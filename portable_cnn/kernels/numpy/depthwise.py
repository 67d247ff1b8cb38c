"""NumPy depthwise convolution (``G = C``): tap-by-tap multiply-adds over channels-last memory.

A depthwise layer filters each input channel ``c`` on its own with ``M =
K/C`` kernels (the channel multiplier; MobileNet's is 1), output channel
``k = c*M + m``. As ``G`` GEMMs it would be ``C`` products of an ``(N*P*Q,
R*S)`` matrix by an ``(R*S, M)`` one, each after an im2col copy ``R*S``
times the input: BLAS calls far too thin to run at speed. Here each kernel
tap ``(r, s)`` is one strided ``(n, P, Q, C)`` view of the padded
channels-last input, and the sums of docs/derivation.md section 5a are
``R*S`` whole-block multiply-adds, vectorised along ``(q, c)``::

    y[n, p, q, c*M + m]                    = sum_{r,s} xpad[n, u*p + dh*r, v*q + dw*s, c] * w[c*M + m, 0, r, s]
    dxpad[n, u*p + dh*r, v*q + dw*s, c]   += sum_m    dy[n, p, q, c*M + m] * w[c*M + m, 0, r, s]
    dw[c*M + m, 0, r, s]                   = sum_{n,p,q} xpad[n, u*p + dh*r, v*q + dw*s, c] * dy[n, p, q, c*M + m]

The weight of each tap is tiled along the output columns ``q`` once, so a
stride-1 tap's ``(Q, C)`` plane is one contiguous run for the ufunc loop
instead of ``Q`` runs of ``C``. Threads take contiguous parts of the batch
(:func:`.parallel.batch_parallel`) and work a block of samples at a time, so
the accumulator and the tap product stay in cache. The input gradient
adds each tap into its own samples' rows of ``dxpad``; the weight and bias
gradients are per-thread partial sums (a GEMV with ones per tap) added at
the end. The memory layout is the caller's (:mod:`.conv`): ``xpad`` is the
zero-padded channels-last input, ``(N, H+2a, W+2b, C)``, contiguous.
"""

from __future__ import annotations

import numpy as np

from .parallel import batch_parallel

__all__ = ["forward", "backward"]

# One block's accumulator and tap product; 256 KB keeps both in a core's L2.
_BLOCK_BYTES = 256 << 10
# Elementwise multiply-adds run ~10x slower per flop than a GEMM: count them
# so for batch_parallel's threshold (worth a thread above ~20 us of work).
_FLOP_WEIGHT = 10


def _tap(a, g, r, s, i, j):
    """Tap ``(r, s)`` of the padded channels-last ``a[i:j]``: the ``(j-i, P, Q, C)`` view it reads or adds to."""
    h0, w0 = r * g.dh, s * g.dw
    return a[i:j, h0 : h0 + g.u * (g.P - 1) + 1 : g.u, w0 : w0 + g.v * (g.Q - 1) + 1 : g.v, :]


def _taps(g):
    """``(tap index, r, s)`` in row-major order, the reference's order."""
    return [(r * g.S + s, r, s) for r in range(g.R) for s in range(g.S)]


def _tiled_weight(weight, g):
    """``(K, 1, R, S)`` as ``(R*S, Q, C, M)``: each tap's weight repeated for every output column ``q``."""
    M = g.K // g.C
    w_taps = weight.reshape(g.C, M, g.R * g.S).transpose(2, 0, 1)  # (C, M, R*S) -> (R*S, C, M)
    return np.ascontiguousarray(np.broadcast_to(w_taps[:, None], (g.R * g.S, g.Q, g.C, M)))  # (R*S, Q, C, M)


def _samples_per_block(g, itemsize):
    return max(1, _BLOCK_BYTES // max(1, 2 * g.P * g.Q * g.K * itemsize))


def _flops(g):
    return _FLOP_WEIGHT * g.flops


def forward(xpad, weight, bias, g):
    """``y`` as channels-last ``(N, P, Q, K)`` from the padded ``xpad`` ``(N, H+2a, W+2b, C)``."""
    N, P, Q, C, K = g.N, g.P, g.Q, g.C, g.K
    M = K // C
    w_tiled = _tiled_weight(weight, g)  # (R*S, Q, C, M)
    y = np.empty((N, P, Q, K), dtype=xpad.dtype)  # (N, P, Q, K)
    y5 = y.reshape(N, P, Q, C, M)  # (N, P, Q, C, M): k = c*M + m
    block = _samples_per_block(g, xpad.itemsize)

    def work(lo, hi, slot):
        product = np.empty((2, min(block, hi - lo), P, Q, C), dtype=xpad.dtype)  # (2, block, P, Q, C)
        for i in range(lo, hi, block):
            j = min(hi, i + block)
            term = product[0, : j - i]  # (j-i, P, Q, C)
            # One multiplier at a time, summed in contiguous memory (y itself when M = 1) and then
            # copied to its strided place: broadcasting over m, or adding into y's every M-th float,
            # would make the ufuncs' inner loops M long or strided.
            for m in range(M):
                acc = y5[i:j, :, :, :, 0] if M == 1 else product[1, : j - i]  # (j-i, P, Q, C)
                for tap, r, s in _taps(g):
                    x_tap = _tap(xpad, g, r, s, i, j)  # (j-i, P, Q, C)
                    if tap == 0:
                        np.multiply(x_tap, w_tiled[tap, :, :, m], out=acc)
                    else:
                        np.multiply(x_tap, w_tiled[tap, :, :, m], out=term)
                        acc += term
                if M > 1:
                    y5[i:j, :, :, :, m] = acc  # output channels c*M + m
            if bias is not None:
                y[i:j] += bias

    batch_parallel(work, N, flops=_flops(g))
    return y


def backward(dyt, xpad, weight, g, has_bias, need_input_grad):
    """``(dxpad or None, dW, db or None)``: dxpad ``(N, H+2a, W+2b, C)`` channels-last, dW ``(K, 1, R, S)``.

    ``dyt`` is the output gradient as ``(N, P, Q, K)`` (any strides),
    ``xpad`` the padded input as for :func:`forward`.
    """
    N, P, Q, C, K, R, S = g.N, g.P, g.Q, g.C, g.K, g.R, g.S
    M = K // C
    w_tiled = _tiled_weight(weight, g)  # (R*S, Q, C, M)
    dxpad = np.zeros(xpad.shape, dtype=xpad.dtype) if need_input_grad else None  # (N, H+2a, W+2b, C)
    block = _samples_per_block(g, xpad.itemsize)
    partial_dw, partial_db = {}, {}

    def work(lo, hi, slot):
        product = np.empty((min(block, hi - lo), P, Q, C), dtype=xpad.dtype)  # (block, P, Q, C)
        ones = np.ones(block * P * Q, dtype=xpad.dtype)
        dw_taps = np.zeros((R * S, C, M), dtype=xpad.dtype)  # (R*S, C, M)
        db = np.zeros(K, dtype=xpad.dtype)  # (K,)
        for i in range(lo, hi, block):
            j = min(hi, i + block)
            rows = (j - i) * P * Q
            dy5 = np.ascontiguousarray(dyt[i:j]).reshape(j - i, P, Q, C, M)  # (j-i, P, Q, C, M)
            term = product[: j - i]  # (j-i, P, Q, C)
            for m in range(M):
                dy_m = np.ascontiguousarray(dy5[..., m])  # (j-i, P, Q, C), read R*S times: copied once
                for tap, r, s in _taps(g):
                    np.multiply(_tap(xpad, g, r, s, i, j), dy_m, out=term)
                    dw_taps[tap, :, m] += ones[:rows] @ term.reshape(rows, C)  # a GEMV: sum over (n, p, q)
                    if need_input_grad:
                        np.multiply(dy_m, w_tiled[tap, :, :, m], out=term)
                        dx_tap = _tap(dxpad, g, r, s, i, j)  # (j-i, P, Q, C) view of this thread's samples
                        dx_tap += term
            if has_bias:
                db += ones[:rows] @ dy5.reshape(rows, K)
        partial_dw[slot], partial_db[slot] = dw_taps, db

    batch_parallel(work, N, flops=_flops(g) * (2 if need_input_grad else 1))
    dw_taps, db = partial_dw.pop(0), partial_db.pop(0)
    for slot in partial_dw:
        dw_taps += partial_dw[slot]
        db += partial_db[slot]
    dweight = np.ascontiguousarray(dw_taps.transpose(1, 2, 0)).reshape(K, 1, R, S)  # (C, M, R*S) -> (K, 1, R, S)
    return dxpad, dweight, db if has_bias else None
