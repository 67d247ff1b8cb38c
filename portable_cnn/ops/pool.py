"""Max, average, adaptive and global average pooling over ``(N, C, H, W)``: validation, geometry, dispatch.

Windows are ``R x S`` with strides ``(u, v)``, paddings ``(a, b)`` and (max
pooling) dilations ``(d_h, d_w)``; output ``(N, C, P, Q)`` with
``P = pool_out_size(H, R, u, a, d_h, ceil_mode)`` (docs/derivation.md,
section 7). As in PyTorch:

* max pooling pads with ``-inf`` and routes each output gradient to the
  *first* maximum of its window (row-major order);
* average pooling pads with zeros and divides by ``R*S``, by the window
  clipped to the input (``count_include_pad=False``), or by
  ``divisor_override``; under ``ceil_mode`` a last window that reaches past
  the padding counts only the padded input it covers;
* padding may be at most half the (dilated) kernel, and under ``ceil_mode``
  the last window starts inside the input or its left padding; so without
  dilation no window lies wholly in padding (with dilation one may: its
  output is ``-inf`` and its gradient goes nowhere, as PyTorch's);
* adaptive average pooling averages the bins ``floor(p*H/P) <= h <
  ceil((p+1)*H/P)``; ``output_size`` ``(1, 1)`` is global average pooling,
  which has kernels of its own (:func:`global_avg_pool2d`).

Every op also takes an unbatched ``(C, H, W)`` input, as PyTorch does, and
returns unbatched results. The arithmetic lives in the kernels (reference,
NumPy, CuPy); see :mod:`portable_cnn.dispatch`.
"""

from __future__ import annotations

from .. import dispatch
from ..geometry import AdaptivePoolGeometry, PoolGeometry
from ._checks import check_float, namespace_of

__all__ = [
    "max_pool2d",
    "max_pool2d_relu",
    "max_pool2d_backward",
    "avg_pool2d",
    "avg_pool2d_backward",
    "adaptive_avg_pool2d",
    "adaptive_avg_pool2d_backward",
    "global_avg_pool2d",
    "global_avg_pool2d_backward",
    "pool2d_geometry",
]


def pool2d_geometry(x_shape, kernel_size, stride, padding, where, **options) -> PoolGeometry:
    """Validate options into a :class:`~portable_cnn.geometry.PoolGeometry` (``options``: its keywords)."""
    return PoolGeometry.of(x_shape, kernel_size, stride, padding, where, **options)


def _batch_shape(x_shape, where) -> tuple[tuple, bool]:
    """``(N, C, H, W)`` for a 4-d shape or an unbatched ``(C, H, W)`` (as ``N = 1``), and whether it was unbatched."""
    shape = tuple(int(n) for n in x_shape)
    if len(shape) not in (3, 4):
        raise ValueError(f"{where}: expected input of 4 dimensions (N, C, H, W), got shape {shape} "
                         f"(or of 3, (C, H, W), for one sample)")
    return ((1, *shape), True) if len(shape) == 3 else (shape, False)


def _input(x, where):
    """``(xp, x as (N, C, H, W), unbatched)`` after the checks every forward makes."""
    xp = namespace_of(x, where=where)
    _, unbatched = _batch_shape(x.shape, where)
    check_float(x, where)
    return xp, (xp.expand_dims(x, axis=0) if unbatched else x), unbatched  # (N, C, H, W)


def _output_grad(xp, dy, y_shape, unbatched, where, name="output gradient"):
    """``dy`` checked against the forward's output shape (unbatched if the input was), as ``(N, C, P, Q)``."""
    expected = y_shape[1:] if unbatched else y_shape
    if tuple(dy.shape) != tuple(expected):
        raise ValueError(f"{where}: expected {name} of shape {tuple(expected)}, got {tuple(dy.shape)}")
    return xp.expand_dims(dy, axis=0) if unbatched else dy  # (N, C, P, Q)


def _unbatch(a, unbatched):
    """The one sample of an unbatched call, ``(C, *, *)``; a batch as it is."""
    return a[0, ...] if unbatched else a


# ------------------------------------------------------------------------------------------ max pooling


def max_pool2d(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, *, where="max_pool2d"):
    """Max pooling, as ``torch.nn.functional.max_pool2d``.

    Parameters
    ----------
    x : array, shape (N, C, H, W) or (C, H, W)
    kernel_size, stride, padding, dilation : int or pair of ints
        ``(R, S)``, ``(u, v)`` (default: the kernel size), ``(a, b)``, ``(d_h, d_w)``.
    ceil_mode : bool
        Round the output size up: a last, partial window covers the rest of
        the input (PyTorch's rule, :func:`~portable_cnn.geometry.pool_out_size`).

    Returns
    -------
    y : array, shape (N, C, P, Q) or (C, P, Q)
    argmax : integer array, shape of ``y``
        Row-major index ``r*S + s`` of the first maximum in each window; the
        backward needs it.

    Examples
    --------
    >>> import numpy as np
    >>> y, _ = max_pool2d(np.arange(16.0).reshape(1, 1, 4, 4), 2)
    >>> y[0, 0]
    array([[ 5.,  7.],
           [13., 15.]])
    >>> max_pool2d(np.arange(25.0).reshape(1, 5, 5), 2, ceil_mode=True)[0].shape
    (1, 3, 3)
    """
    return _max_pool("max_pool2d_forward", x, kernel_size, stride, padding, dilation, ceil_mode, where)


def max_pool2d_relu(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, *, where="max_pool2d"):
    """``relu(max_pool2d(x))`` in one pass, for a ReLU that follows a max pooling (``nn.Sequential`` fuses them).

    The options are :func:`max_pool2d`'s. ``argmax`` is ``-1`` where the
    output is not positive: there the ReLU stops the gradient, and
    :func:`max_pool2d_backward` sends nothing from a ``-1``, so it gives the
    gradient of the pair (docs/derivation.md, section 7.4).

    >>> import numpy as np
    >>> y, argmax = max_pool2d_relu(np.array([[[[-1.0, -2.0], [3.0, 4.0]], [[-1.0, -2.0], [-3.0, 0.0]]]]), 2)
    >>> y.ravel(), argmax.ravel()
    (array([4., 0.]), array([ 3, -1], dtype=int8))
    """
    return _max_pool("max_pool2d_relu_forward", x, kernel_size, stride, padding, dilation, ceil_mode, where)


def _max_pool(op, x, kernel_size, stride, padding, dilation, ceil_mode, where):
    """``(y, argmax)`` of the forward kernel ``op`` (plain or with the ReLU), batched or not as ``x``."""
    xp, xb, unbatched = _input(x, where)
    g = PoolGeometry.of(xb.shape, kernel_size, stride, padding, where, dilation=dilation, ceil_mode=ceil_mode)
    y, argmax = dispatch.kernel(op, xp, x.dtype)(xp, xb, g)
    return _unbatch(y, unbatched), _unbatch(argmax, unbatched)


def max_pool2d_backward(dy, argmax, x_shape, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, *,
                        where="max_pool2d"):
    """Gradient of :func:`max_pool2d`, with its options: ``dy`` goes to the first maximum of each window.

    An ``argmax`` of ``-1`` (from :func:`max_pool2d_relu`) sends nothing.

    Returns
    -------
    dx : array, shape ``x_shape``
    """
    xp = namespace_of(dy, argmax, where=where)
    shape, unbatched = _batch_shape(x_shape, where)
    g = PoolGeometry.of(shape, kernel_size, stride, padding, where, dilation=dilation, ceil_mode=ceil_mode)
    dy = _output_grad(xp, dy, g.y_shape, unbatched, where)
    argmax = _output_grad(xp, argmax, g.y_shape, unbatched, where, name="argmax")
    return _unbatch(dispatch.kernel("max_pool2d_backward", xp, dy.dtype)(xp, dy, argmax, g), unbatched)


# -------------------------------------------------------------------------------------- average pooling


def avg_pool2d(x, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
               divisor_override=None, *, where="avg_pool2d"):
    """Average pooling, as ``torch.nn.functional.avg_pool2d``.

    Parameters
    ----------
    x : array, shape (N, C, H, W) or (C, H, W)
    kernel_size, stride, padding : int or pair of ints
    ceil_mode : bool
        As :func:`max_pool2d`'s.
    count_include_pad : bool
        Divide by the window including its padding (``R*S``, less only for a
        ``ceil_mode`` window past the padding), else by the input elements it covers.
    divisor_override : int, optional
        A non-zero divisor for every window instead.

    Returns
    -------
    y : array, shape (N, C, P, Q) or (C, P, Q)

    Examples
    --------
    >>> import numpy as np
    >>> avg_pool2d(np.ones((1, 1, 3, 3)), 2, padding=1, count_include_pad=False)[0, 0]
    array([[1., 1.],
           [1., 1.]])
    """
    xp, xb, unbatched = _input(x, where)
    g = PoolGeometry.of(xb.shape, kernel_size, stride, padding, where, ceil_mode=ceil_mode,
                        count_include_pad=count_include_pad, divisor_override=divisor_override)
    return _unbatch(dispatch.kernel("avg_pool2d_forward", xp, x.dtype)(xp, xb, g), unbatched)


def avg_pool2d_backward(dy, x_shape, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
                        divisor_override=None, *, where="avg_pool2d"):
    """Gradient of :func:`avg_pool2d`, with its options: each window spreads ``dy`` over its divisor evenly.

    Returns
    -------
    dx : array, shape ``x_shape``
    """
    xp = namespace_of(dy, where=where)
    shape, unbatched = _batch_shape(x_shape, where)
    g = PoolGeometry.of(shape, kernel_size, stride, padding, where, ceil_mode=ceil_mode,
                        count_include_pad=count_include_pad, divisor_override=divisor_override)
    dy = _output_grad(xp, dy, g.y_shape, unbatched, where)
    return _unbatch(dispatch.kernel("avg_pool2d_backward", xp, dy.dtype)(xp, dy, g), unbatched)


# ----------------------------------------------------------------------- adaptive and global average


def _adaptive_op(g) -> str:
    """Output ``(1, 1)`` is global average pooling, which has cheaper kernels than the general bins."""
    return "global_avg_pool2d" if (g.P, g.Q) == (1, 1) else "adaptive_avg_pool2d"


def adaptive_avg_pool2d(x, output_size, *, where="adaptive_avg_pool2d"):
    """Adaptive average pooling, as ``torch.nn.functional.adaptive_avg_pool2d``.

    Parameters
    ----------
    x : array, shape (N, C, H, W) or (C, H, W)
    output_size : int or pair of (int or None)
        ``(P, Q)``; ``None`` keeps that input size. Output row ``p`` averages
        input rows ``floor(p*H/P) <= h < ceil((p+1)*H/P)`` (bins overlap when
        ``P`` does not divide ``H``; ``P > H`` repeats rows); ``(1, 1)`` runs
        :func:`global_avg_pool2d`'s kernels.

    Returns
    -------
    y : array, shape (N, C, P, Q) or (C, P, Q)

    Examples
    --------
    >>> import numpy as np
    >>> adaptive_avg_pool2d(np.arange(5.0).reshape(1, 1, 1, 5), (None, 2))  # bins [0, 3) and [2, 5) share 2
    array([[[[1., 3.]]]])
    """
    xp, xb, unbatched = _input(x, where)
    g = AdaptivePoolGeometry.of(xb.shape, output_size, where)
    return _unbatch(dispatch.kernel(f"{_adaptive_op(g)}_forward", xp, x.dtype)(xp, xb, g), unbatched)


def adaptive_avg_pool2d_backward(dy, x_shape, output_size, *, where="adaptive_avg_pool2d"):
    """Gradient of :func:`adaptive_avg_pool2d`: each bin spreads ``dy`` over its size evenly.

    Returns
    -------
    dx : array, shape ``x_shape``
    """
    xp = namespace_of(dy, where=where)
    shape, unbatched = _batch_shape(x_shape, where)
    g = AdaptivePoolGeometry.of(shape, output_size, where)
    dy = _output_grad(xp, dy, g.y_shape, unbatched, where)
    return _unbatch(dispatch.kernel(f"{_adaptive_op(g)}_backward", xp, dy.dtype)(xp, dy, g), unbatched)


def global_avg_pool2d(x, *, where="global_avg_pool2d"):
    """Global average pooling: the mean over ``H, W``, as ``adaptive_avg_pool2d(x, 1)``.

    Parameters
    ----------
    x : array, shape (N, C, H, W) or (C, H, W)

    Returns
    -------
    y : array, shape (N, C, 1, 1) or (C, 1, 1)

    Examples
    --------
    >>> import numpy as np
    >>> global_avg_pool2d(np.arange(8.0).reshape(1, 2, 2, 2))[:, :, 0, 0]
    array([[1.5, 5.5]])
    """
    return adaptive_avg_pool2d(x, 1, where=where)


def global_avg_pool2d_backward(dy, x_shape, *, where="global_avg_pool2d"):
    """Gradient of :func:`global_avg_pool2d`: ``dy / (H*W)`` at every input position.

    Returns
    -------
    dx : array, shape ``x_shape``
    """
    return adaptive_avg_pool2d_backward(dy, x_shape, 1, where=where)
