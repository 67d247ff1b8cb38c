"""2-D convolution (cross-correlation) by im2col + GEMM, forward and backward.

Notation follows docs/derivation.md and the seed: input ``(N, C, H, W)``,
weight ``(K, C, R, S)``, strides ``(u, v)``, paddings ``(a, b)``, dilations
``(d_h, d_w)``, output ``(N, K, P, Q)`` with ``P = out_size(H, R, u, a, d_h)``.

Forward (one GEMM)::

    cols = im2col(x)                    # (N*P*Q, C*R*S)
    y    = cols @ W2.T + bias           # (N*P*Q, K),  W2 = W.reshape(K, C*R*S)

Backward (the two transposed GEMMs of the forward)::

    dY2   = dy as (N*P*Q, K)
    dW2   = dY2.T @ cols                # (K, C*R*S)
    db    = sum of dY2 over rows        # (K,)
    dcols = dY2 @ W2                    # (N*P*Q, C*R*S)
    dx    = col2im(dcols)               # (N, C, H, W)

col2im of ``dY2 @ W2`` equals the convolution of the stride-dilated, padded
``dy`` with the kernel rotated by 180 degrees and its channel axes swapped
(docs/derivation.md, section 5; test_dx_equals_rotated_kernel_convolution).
"""

from __future__ import annotations

import numpy as np

from .. import backend
from ._checks import check_float, check_ndim, namespace_of, out_size, pair
from ._windows import pad2d, scatter_add_taps, tap_slices

__all__ = ["conv2d", "conv2d_backward", "im2col", "col2im", "conv2d_geometry"]


def conv2d_geometry(x_shape, w_shape, stride, padding, dilation, where="conv2d"):
    """Validate shapes and options; return ``(N, C, H, W, K, R, S, u, v, a, b, dh, dw, P, Q)``."""
    u, v = pair(stride, "stride", where, minimum=1)
    a, b = pair(padding, "padding", where, minimum=0)
    dh, dw = pair(dilation, "dilation", where, minimum=1)
    N, C, H, W = x_shape
    K, Cw, R, S = w_shape
    if Cw != C:
        raise ValueError(
            f"{where}: expected input with {Cw} channels (weight shape {tuple(w_shape)}), "
            f"got {C} channels (input shape {tuple(x_shape)})"
        )
    if R < 1 or S < 1:
        raise ValueError(f"{where}: kernel must be at least 1x1, got weight shape {tuple(w_shape)}")
    P = out_size(H, R, u, a, dh)
    Q = out_size(W, S, v, b, dw)
    if P < 1 or Q < 1:
        raise ValueError(
            f"{where}: kernel {dh * (R - 1) + 1}x{dw * (S - 1) + 1} (with dilation) is larger than the "
            f"padded input {H + 2 * a}x{W + 2 * b} (input {H}x{W}, padding {(a, b)})"
        )
    return N, C, H, W, K, R, S, u, v, a, b, dh, dw, P, Q


def im2col(x, kernel_size, stride=1, padding=0, dilation=1):
    """Unfold ``x`` into the rows of the convolution GEMM.

    Parameters
    ----------
    x : array, shape (N, C, H, W)
    kernel_size, stride, padding, dilation : int or pair of ints
        ``(R, S)``, ``(u, v)``, ``(a, b)``, ``(d_h, d_w)``.

    Returns
    -------
    cols : array, shape (N*P*Q, C*R*S)
        Row ``(n, p, q)`` holds the padded input patch under output ``(p, q)``,
        ordered ``(c, r, s)`` like ``weight.reshape(K, C*R*S)``.
    """
    R, S = pair(kernel_size, "kernel_size", "im2col", minimum=1)
    N, C, H, W = x.shape
    geometry = conv2d_geometry(x.shape, (1, C, R, S), stride, padding, dilation, "im2col")
    u, v, a, b, dh, dw, P, Q = geometry[7:]
    xp = backend.namespace(x)
    if backend.is_numpy(xp):
        return _im2col_numpy(x, R, S, u, v, a, b, dh, dw, P, Q)
    xpad = pad2d(x, a, b)  # (N, C, H+2a, W+2b)
    taps = [xpad[index] for index in tap_slices(R, S, u, v, dh, dw, P, Q)]  # R*S x (N, C, P, Q)
    cols = xp.stack(taps, axis=-1)  # (N, C, P, Q, R*S)
    cols = xp.permute_dims(cols, (0, 2, 3, 1, 4))  # (N, P, Q, C, R*S)
    return xp.reshape(cols, (N * P * Q, C * R * S))


def _im2col_numpy(x, R, S, u, v, a, b, dh, dw, P, Q):
    """NumPy fast path: one strided view, one copy (no per-tap temporaries)."""
    N, C = x.shape[:2]
    xpad = pad2d(x, a, b)
    sN, sC, sH, sW = xpad.strides
    view = np.lib.stride_tricks.as_strided(
        xpad,
        shape=(N, P, Q, C, R, S),
        strides=(sN, u * sH, v * sW, sC, dh * sH, dw * sW),
        writeable=False,
    )  # (N, P, Q, C, R, S)
    return view.reshape(N * P * Q, C * R * S)


def col2im(cols, x_shape, kernel_size, stride=1, padding=0, dilation=1):
    """Fold GEMM rows back onto the input: the adjoint of :func:`im2col`.

    Parameters
    ----------
    cols : array, shape (N*P*Q, C*R*S)
    x_shape : tuple (N, C, H, W)

    Returns
    -------
    array, shape (N, C, H, W)
        Overlapping windows add up; padding is cropped away.
    """
    R, S = pair(kernel_size, "kernel_size", "col2im", minimum=1)
    N, C, H, W = x_shape
    geometry = conv2d_geometry(x_shape, (1, C, R, S), stride, padding, dilation, "col2im")
    u, v, a, b, dh, dw, P, Q = geometry[7:]
    xp = backend.namespace(cols)
    cols = xp.reshape(cols, (N, P, Q, C, R * S))  # (N, P, Q, C, R*S)
    if backend.is_numpy(xp):
        return _col2im_numpy(cols, x_shape, R, S, u, v, a, b, dh, dw, P, Q)
    cols = xp.permute_dims(cols, (4, 0, 3, 1, 2))  # (R*S, N, C, P, Q)
    taps = list(tap_slices(R, S, u, v, dh, dw, P, Q))
    dxpad = scatter_add_taps(
        xp,
        (cols[k, ...] for k in range(R * S)),
        (N, C, H + 2 * a, W + 2 * b),
        taps,
        dtype=cols.dtype,
        device=backend.device(cols),
    )  # (N, C, H+2a, W+2b)
    return dxpad[:, :, a : a + H, b : b + W]


def _col2im_numpy(cols, x_shape, R, S, u, v, a, b, dh, dw, P, Q):
    """NumPy fast path: in-place adds into strided views, no per-tap temporaries."""
    N, C, H, W = x_shape
    dxpad = np.zeros((N, C, H + 2 * a, W + 2 * b), dtype=cols.dtype)
    cols = cols.transpose(0, 3, 4, 1, 2)  # (N, C, R*S, P, Q), a view
    for k, index in enumerate(tap_slices(R, S, u, v, dh, dw, P, Q)):
        dxpad[index] += cols[:, :, k]
    return dxpad[:, :, a : a + H, b : b + W]


def _check_conv_args(x, weight, bias, where):
    xp = namespace_of(x, weight, bias, where=where)
    check_ndim(x, 4, "(N, C, H, W)", where)
    check_ndim(weight, 4, "(K, C, R, S)", where, "weight")
    check_float(x, where)
    check_float(weight, where, "weight")
    if x.dtype != weight.dtype:
        raise TypeError(f"{where}: input dtype {backend.dtype_name(x)} does not match weight dtype {backend.dtype_name(weight)}")
    if bias is not None:
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{where}: expected bias of shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != weight.dtype:
            raise TypeError(f"{where}: bias dtype {backend.dtype_name(bias)} does not match weight dtype {backend.dtype_name(weight)}")
    return xp


def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, *, return_cols=False, where="conv2d"):
    """2-D cross-correlation, as ``torch.nn.functional.conv2d``.

    Parameters
    ----------
    x : array, shape (N, C, H, W), real floating
    weight : array, shape (K, C, R, S)
    bias : array, shape (K,), optional
    stride, padding, dilation : int or pair of ints
    return_cols : bool
        Also return the im2col matrix so the backward can reuse it.
    where : str
        Name used in error messages (layers pass their own).

    Returns
    -------
    y : array, shape (N, K, P, Q)
    cols : array, shape (N*P*Q, C*R*S), only with ``return_cols``

    Examples
    --------
    >>> import numpy as np
    >>> x = np.arange(16.0).reshape(1, 1, 4, 4)
    >>> conv2d(x, np.ones((1, 1, 2, 2)), stride=2)[0, 0]
    array([[10., 18.],
           [42., 50.]])
    """
    xp = _check_conv_args(x, weight, bias, where)
    N, C, H, W, K, R, S, u, v, a, b, dh, dw, P, Q = conv2d_geometry(
        x.shape, weight.shape, stride, padding, dilation, where
    )
    cols = im2col(x, (R, S), (u, v), (a, b), (dh, dw))  # (N*P*Q, C*R*S)
    w2 = xp.reshape(weight, (K, C * R * S))  # (K, C*R*S)
    y = cols @ w2.T  # (N*P*Q, K)
    if bias is not None:
        y = y + bias
    y = xp.permute_dims(xp.reshape(y, (N, P, Q, K)), (0, 3, 1, 2))  # (N, K, P, Q)
    return (y, cols) if return_cols else y


def conv2d_backward(dy, x, weight, stride=1, padding=0, dilation=1, *, cols=None, has_bias=True, where="conv2d"):
    """Gradients of :func:`conv2d`.

    Parameters
    ----------
    dy : array, shape (N, K, P, Q)
        dL/dy.
    x, weight, stride, padding, dilation
        As given to the forward.
    cols : array, shape (N*P*Q, C*R*S), optional
        The forward's im2col matrix; recomputed from ``x`` when omitted.
    has_bias : bool
        Whether to return ``db`` (else ``None``).

    Returns
    -------
    dx : array, shape (N, C, H, W)
    dw : array, shape (K, C, R, S)
    db : array, shape (K,) or None
    """
    xp = _check_conv_args(x, weight, None, where)
    namespace_of(dy, x, where=where)
    N, C, H, W, K, R, S, u, v, a, b, dh, dw, P, Q = conv2d_geometry(
        x.shape, weight.shape, stride, padding, dilation, where
    )
    if tuple(dy.shape) != (N, K, P, Q):
        raise ValueError(f"{where}: expected output gradient of shape {(N, K, P, Q)}, got {tuple(dy.shape)}")
    if cols is None:
        cols = im2col(x, (R, S), (u, v), (a, b), (dh, dw))  # (N*P*Q, C*R*S)
    dy2 = xp.reshape(xp.permute_dims(dy, (0, 2, 3, 1)), (N * P * Q, K))  # (N*P*Q, K)
    w2 = xp.reshape(weight, (K, C * R * S))  # (K, C*R*S)
    dweight = xp.reshape(dy2.T @ cols, (K, C, R, S))  # (K, C*R*S) -> (K, C, R, S)
    dbias = xp.sum(dy2, axis=0) if has_bias else None  # (K,)
    dcols = dy2 @ w2  # (N*P*Q, C*R*S)
    dx = col2im(dcols, (N, C, H, W), (R, S), (u, v), (a, b), (dh, dw))  # (N, C, H, W)
    return dx, dweight, dbias
