"""Fully connected layer and flattening, forward and backward: validation and dispatch.

``y = x @ W.T + b`` with ``W`` of shape ``(out, in)`` as in PyTorch, over the
last axis of ``x``: ``(N, *, in)`` gives ``(N, *, out)``, and an unbatched
``(in,)`` gives ``(out,)``. The op flattens the leading axes into rows, so
the kernels see only 2-D GEMMs; the backward is the two transposed GEMMs
(docs/derivation.md, section 9)::

    dx = dy @ W        # (rows, in)
    dW = dy.T @ x      # (out, in): a sum over every row, batch and * axes alike
    db = sum_n dy      # (out,)

The arithmetic is in ``kernels/reference/linear.py`` and the NumPy kernel.
"""

from __future__ import annotations

import math

from .. import dispatch
from ._checks import check_float, check_grad_shape, check_ndim, check_same_dtype, namespace_of

__all__ = ["linear", "linear_backward", "flatten", "flatten_backward"]


def _check(x, weight, bias, where):
    xp = namespace_of(x, weight, bias, where=where)
    if x.ndim < 1:
        raise ValueError(f"{where}: expected input of at least 1 dimension (*, in_features), got shape {tuple(x.shape)}")
    check_ndim(weight, 2, "(out_features, in_features)", where, "weight")
    check_float(x, where)
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{where}: expected input with {weight.shape[1]} features in its last axis (weight shape {tuple(weight.shape)}), "
            f"got {x.shape[-1]} features (input shape {tuple(x.shape)})"
        )
    check_same_dtype(x, weight, where, "input", "weight")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{where}: expected bias of shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if bias is not None:
        check_same_dtype(bias, weight, where, "bias", "weight")
    return xp


def _rows(xp, a):
    """``(*, features)`` as ``(rows, features)``: every leading axis is a batch axis (a view where the layout allows)."""
    return xp.reshape(a, (math.prod(a.shape[:-1]), a.shape[-1]))  # (rows, features)


def linear(x, weight, bias=None, *, where="linear"):
    """``x @ weight.T + bias`` over the last axis, as ``torch.nn.functional.linear``.

    Parameters
    ----------
    x : array, shape (N, *, in_features) or (in_features,)
    weight : array, shape (out_features, in_features)
    bias : array, shape (out_features,), optional

    Returns
    -------
    array, shape (N, *, out_features) or (out_features,)

    >>> import numpy as np
    >>> linear(np.ones((1, 3)), np.arange(6.0).reshape(2, 3), np.array([0.5, -0.5]))
    array([[ 3.5, 11.5]])
    >>> linear(np.ones(3), np.arange(6.0).reshape(2, 3)), linear(np.ones((4, 5, 3)), np.ones((2, 3))).shape
    (array([ 3., 12.]), (4, 5, 2))
    """
    xp = _check(x, weight, bias, where)
    y = dispatch.kernel("linear_forward", xp, x.dtype)(xp, _rows(xp, x), weight, bias)  # (rows, out)
    return xp.reshape(y, (*x.shape[:-1], weight.shape[0]))  # (N, *, out)


def linear_backward(dy, x, weight, *, has_bias=True, need_input_grad=True, where="linear"):
    """Gradients of :func:`linear`: ``(dx, dweight, dbias)``, ``dx`` of ``x``'s shape.

    ``dbias`` is None without bias, ``dx`` None with ``need_input_grad=False``.
    """
    xp = _check(x, weight, None, where)
    namespace_of(dy, x, where=where)
    check_grad_shape(dy, (*x.shape[:-1], weight.shape[0]), where)
    backward = dispatch.kernel("linear_backward", xp, x.dtype)
    dx, dweight, dbias = backward(xp, _rows(xp, dy), _rows(xp, x), weight, has_bias=has_bias, need_input_grad=need_input_grad)
    return (None if dx is None else xp.reshape(dx, tuple(x.shape))), dweight, dbias  # dx: (rows, in) -> (N, *, in)


def _features(shape) -> int:
    features = 1
    for n in shape[1:]:
        features *= n
    return features


def flatten(x, *, where="flatten"):
    """``(N, ...)`` to ``(N, prod(...))`` in row-major order, as ``torch.flatten(x, 1)``."""
    xp = namespace_of(x, where=where)
    if x.ndim < 1:
        raise ValueError(f"{where}: expected an input with a batch axis, got shape {tuple(x.shape)}")
    return dispatch.kernel("flatten_forward", xp, x.dtype)(xp, x, _features(x.shape))


def flatten_backward(dy, x_shape, *, where="flatten"):
    """Reshape ``dy`` back to the forward's input shape."""
    xp = namespace_of(dy, where=where)
    check_grad_shape(dy, (x_shape[0], _features(x_shape)), where)
    return dispatch.kernel("flatten_backward", xp, dy.dtype)(xp, dy, x_shape)
