"""Fully connected layer and flattening, forward and backward: validation and dispatch.

``y = x @ W.T + b`` with ``W`` of shape ``(out, in)`` as in PyTorch; the
backward is the two transposed GEMMs (docs/derivation.md, section 9)::

    dx = dy @ W        # (N, in)
    dW = dy.T @ x      # (out, in)
    db = sum_n dy      # (out,)

The arithmetic is in ``kernels/reference/linear.py`` and the NumPy kernel.
"""

from __future__ import annotations

from .. import dispatch
from ._checks import check_float, check_grad_shape, check_ndim, check_same_dtype, namespace_of

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
    check_same_dtype(x, weight, where, "input", "weight")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{where}: expected bias of shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if bias is not None:
        check_same_dtype(bias, weight, where, "bias", "weight")
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
    return dispatch.kernel("linear_forward", xp, x.dtype)(xp, x, weight, bias)


def linear_backward(dy, x, weight, *, has_bias=True, need_input_grad=True, where="linear"):
    """Gradients of :func:`linear`: ``(dx, dweight, dbias)``.

    ``dbias`` is None without bias, ``dx`` None with ``need_input_grad=False``.
    """
    xp = _check(x, weight, None, where)
    namespace_of(dy, x, where=where)
    check_grad_shape(dy, (x.shape[0], weight.shape[0]), where)
    backward = dispatch.kernel("linear_backward", xp, x.dtype)
    return backward(xp, dy, x, weight, has_bias=has_bias, need_input_grad=need_input_grad)


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
