"""Max and average pooling over ``(N, C, H, W)``: validation, geometry, dispatch.

Windows are ``R x S`` with strides ``(u, v)`` and paddings ``(a, b)``; output
``(N, C, P, Q)`` with ``P = out_size(H, R, u, a)`` (docs/derivation.md,
section 7). As in PyTorch:

* max pooling pads with ``-inf`` and routes each output gradient to the
  *first* maximum of its window (row-major order);
* average pooling pads with zeros and divides by ``R*S`` whether or not the
  window covers padding (``count_include_pad=True``);
* padding may be at most half the kernel, so no window lies wholly in padding.

The arithmetic lives in the kernels (reference, NumPy, CuPy); see
:mod:`portable_cnn.dispatch`.
"""

from __future__ import annotations

from .. import dispatch
from ..geometry import PoolGeometry
from ._checks import check_float, check_ndim, namespace_of

__all__ = ["max_pool2d", "max_pool2d_backward", "avg_pool2d", "avg_pool2d_backward", "pool2d_geometry"]


def pool2d_geometry(x_shape, kernel_size, stride, padding, where) -> PoolGeometry:
    """Validate options into a :class:`~portable_cnn.geometry.PoolGeometry`."""
    return PoolGeometry.of(x_shape, kernel_size, stride, padding, where)


def _check_input(x, where):
    xp = namespace_of(x, where=where)
    check_ndim(x, 4, "(N, C, H, W)", where)
    check_float(x, where)
    return xp


def _backward_geometry(dy, x_shape, kernel_size, stride, padding, where):
    g = PoolGeometry.of(tuple(x_shape), kernel_size, stride, padding, where)
    if tuple(dy.shape) != g.y_shape:
        raise ValueError(f"{where}: expected output gradient of shape {g.y_shape}, got {tuple(dy.shape)}")
    return g


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
    g = PoolGeometry.of(x.shape, kernel_size, stride, padding, where)
    return dispatch.kernel("max_pool2d_forward", xp, x.dtype)(xp, x, g)


def max_pool2d_backward(dy, argmax, x_shape, kernel_size, stride=None, padding=0, *, where="max_pool2d"):
    """Gradient of :func:`max_pool2d`: ``dy`` goes to the first maximum of each window.

    Returns
    -------
    dx : array, shape (N, C, H, W) = ``x_shape``
    """
    xp = namespace_of(dy, argmax, where=where)
    g = _backward_geometry(dy, x_shape, kernel_size, stride, padding, where)
    return dispatch.kernel("max_pool2d_backward", xp, dy.dtype)(xp, dy, argmax, g)


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
    g = PoolGeometry.of(x.shape, kernel_size, stride, padding, where)
    return dispatch.kernel("avg_pool2d_forward", xp, x.dtype)(xp, x, g)


def avg_pool2d_backward(dy, x_shape, kernel_size, stride=None, padding=0, *, where="avg_pool2d"):
    """Gradient of :func:`avg_pool2d`: each window spreads ``dy / (R*S)`` evenly.

    Returns
    -------
    dx : array, shape (N, C, H, W) = ``x_shape``
    """
    xp = namespace_of(dy, where=where)
    g = _backward_geometry(dy, x_shape, kernel_size, stride, padding, where)
    return dispatch.kernel("avg_pool2d_backward", xp, dy.dtype)(xp, dy, g)
