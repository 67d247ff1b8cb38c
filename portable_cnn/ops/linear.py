"""Fully connected layer and flattening, forward and backward.

``y = x @ W.T + b`` with ``W`` of shape ``(out, in)`` as in PyTorch; the
backward is the two transposed GEMMs (docs/derivation.md, section 9)::

    dx = dy @ W        # (N, in)
    dW = dy.T @ x      # (out, in)
    db = sum_n dy      # (out,)
"""

from __future__ import annotations

import numpy as np

from .. import backend
from ._checks import check_float, check_grad_shape, check_ndim, namespace_of
from ._parallel import batch_parallel

__all__ = ["linear", "linear_backward", "flatten", "flatten_backward"]


def _check(x, weight, bias, where):
    xp = namespace_of(x, weight, bias, where=where)
    check_ndim(x, 2, "(N, in_features)", where)
    check_ndim(weight, 2, "(out_features, in_features)", where, "weight")
    check_float(x, where)
    if x.shape[1] != weight.shape[1]:
        raise ValueError(
            f"{where}: expected input with {weight.shape[1]} features (weight shape {tuple(weight.shape)}), "
            f"got {x.shape[1]} features (input shape {tuple(x.shape)})"
        )
    if x.dtype != weight.dtype:
        raise TypeError(f"{where}: input dtype {backend.dtype_name(x)} does not match weight dtype {backend.dtype_name(weight)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{where}: expected bias of shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if bias is not None and bias.dtype != weight.dtype:
        # Else NumPy would promote y to the bias dtype behind the user's back.
        raise TypeError(f"{where}: bias dtype {backend.dtype_name(bias)} does not match weight dtype {backend.dtype_name(weight)}")
    return xp


def linear(x, weight, bias=None, *, where="linear"):
    """``x @ weight.T + bias``, as ``torch.nn.functional.linear``.

    Parameters
    ----------
    x : array, shape (N, in_features)
    weight : array, shape (out_features, in_features)
    bias : array, shape (out_features,), optional

    Returns
    -------
    array, shape (N, out_features)

    >>> import numpy as np
    >>> linear(np.ones((1, 3)), np.arange(6.0).reshape(2, 3), np.array([0.5, -0.5]))
    array([[ 3.5, 11.5]])
    """
    xp = _check(x, weight, bias, where)
    if backend.is_numpy(xp):
        return _linear_numpy(x, weight, bias)
    y = x @ weight.T  # (N, out)
    return y if bias is None else y + bias


def linear_backward(dy, x, weight, *, has_bias=True, need_input_grad=True, where="linear"):
    """Gradients of :func:`linear`: ``(dx, dweight, dbias)``.

    ``dbias`` is None without bias, ``dx`` None with ``need_input_grad=False``.
    """
    xp = _check(x, weight, None, where)
    namespace_of(dy, x, where=where)
    if tuple(dy.shape) != (x.shape[0], weight.shape[0]):
        raise ValueError(f"{where}: expected output gradient of shape {(x.shape[0], weight.shape[0])}, got {tuple(dy.shape)}")
    if backend.is_numpy(xp):
        return _linear_backward_numpy(dy, x, weight, has_bias, need_input_grad)
    dx = dy @ weight if need_input_grad else None  # (N, in)
    dweight = dy.T @ x  # (out, in)
    dbias = xp.sum(dy, axis=0) if has_bias else None  # (out,)
    return dx, dweight, dbias


# --- NumPy fast path ------------------------------------------------------
# The same GEMMs, split over the batch on portable_cnn's own threads with
# single-threaded BLAS, as the convolutions are (conv.py). Then no GEMM of a
# training step wakes OpenBLAS's own worker threads, which would spin for
# ~0.1 s after each call and take a core from the next convolution.


def _linear_numpy(x, weight, bias):
    N, out_features = x.shape[0], weight.shape[0]
    y = np.empty((N, out_features), dtype=x.dtype)  # (N, out)

    def work(lo, hi, slot):
        np.matmul(x[lo:hi], weight.T, out=y[lo:hi])
        if bias is not None:
            y[lo:hi] += bias

    batch_parallel(work, N, flops=2 * N * out_features * x.shape[1])
    return y


def _linear_backward_numpy(dy, x, weight, has_bias, need_input_grad):
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


def flatten(x, *, where="flatten"):
    """``(N, ...)`` to ``(N, prod(...))`` in row-major order, as ``torch.flatten(x, 1)``."""
    xp = namespace_of(x, where=where)
    if x.ndim < 1:
        raise ValueError(f"{where}: expected an input with a batch axis, got shape {tuple(x.shape)}")
    features = 1
    for n in x.shape[1:]:
        features *= n
    return xp.reshape(x, (x.shape[0], features))


def flatten_backward(dy, x_shape, *, where="flatten"):
    """Reshape ``dy`` back to the forward's input shape."""
    xp = namespace_of(dy, where=where)
    features = 1
    for n in x_shape[1:]:
        features *= n
    check_grad_shape(dy, (x_shape[0], features), where)
    return xp.reshape(dy, tuple(x_shape))
