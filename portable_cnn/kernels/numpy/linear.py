"""NumPy fully connected layer: the reference's GEMMs split over the batch on our own threads.

Each thread runs single-threaded BLAS on its part of the batch, as the
convolutions do (:mod:`.conv`). Then no GEMM of a training step wakes
OpenBLAS's own worker threads, which would spin for ~0.1 s after each call
and take a core from the next convolution.
"""

from __future__ import annotations

import numpy as np

from .parallel import batch_parallel

__all__ = ["linear_forward", "linear_backward"]


def linear_forward(xp, x, weight, bias):
    """``x @ weight.T + bias``: ``(N, in) -> (N, out)``."""
    N, out_features = x.shape[0], weight.shape[0]
    y = np.empty((N, out_features), dtype=x.dtype)  # (N, out)

    def work(lo, hi, slot):
        np.matmul(x[lo:hi], weight.T, out=y[lo:hi])
        if bias is not None:
            y[lo:hi] += bias

    batch_parallel(work, N, flops=2 * N * out_features * x.shape[1])
    return y


def linear_backward(xp, dy, x, weight, *, has_bias=True, need_input_grad=True):
    """``(dx or None, dW, db or None)``, the weight and bias gradients summed over the threads' parts."""
    N, (out_features, in_features) = x.shape[0], weight.shape
    dx = np.empty((N, in_features), dtype=dy.dtype) if need_input_grad else None  # (N, in)
    partial = {}

    def work(lo, hi, slot):
        if need_input_grad:
            np.matmul(dy[lo:hi], weight, out=dx[lo:hi])
        partial[slot] = (dy[lo:hi].T @ x[lo:hi], np.ones(hi - lo, dtype=dy.dtype) @ dy[lo:hi])  # (out, in), (out,)

    batch_parallel(work, N, flops=(4 if need_input_grad else 2) * N * out_features * in_features)
    dweight, dbias = partial.pop(0)
    for dw_part, db_part in partial.values():
        dweight += dw_part
        dbias += db_part
    return dx, dweight, dbias if has_bias else None
