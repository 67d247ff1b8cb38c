"""2-D convolution (cross-correlation) by im2col + GEMM: validation, geometry, dispatch.

Notation follows docs/derivation.md and the seed: input ``(N, C, H, W)``,
weight ``(K, C/G, R, S)`` for ``G`` groups (``G = 1`` unless said),
strides ``(u, v)``, paddings ``(a, b)``, dilations ``(d_h, d_w)``, output
``(N, K, P, Q)`` with ``P = out_size(H, R, u, a, d_h)``.

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

With ``G`` groups every product above is ``G`` products, one per group of
``C/G`` input and ``K/G`` output channels (docs/derivation.md, section 5a);
a depthwise convolution (``G = C``) has NumPy and CuPy kernels of its own,
which multiply and add tap by tap instead of running ``C`` GEMMs of one column.

The arithmetic lives in the kernels (:mod:`portable_cnn.kernels`): the
reference in ``kernels/reference/conv.py``, NumPy's channels-last blocked
version in ``kernels/numpy/conv.py``, CuPy's in ``kernels/cupy/conv.py``;
:mod:`portable_cnn.dispatch` picks one.
"""

from __future__ import annotations

from .. import dispatch
from ..config import get_config, set_config
from ..geometry import ConvGeometry
from ._checks import check_float, check_ndim, check_same_dtype, namespace_of, pair

__all__ = [
    "conv2d",
    "conv2d_backward",
    "im2col",
    "col2im",
    "conv2d_geometry",
    "set_workspace_limit",
    "get_workspace_limit",
]


def conv2d_geometry(x_shape, w_shape, stride, padding, dilation, where="conv2d", groups=1) -> ConvGeometry:
    """Validate shapes and options into a :class:`~portable_cnn.geometry.ConvGeometry`."""
    return ConvGeometry.of(x_shape, w_shape, stride, padding, dilation, where, groups)


def _window_geometry(x_shape, kernel_size, stride, padding, dilation, where):
    R, S = pair(kernel_size, "kernel_size", where, minimum=1)
    C = x_shape[1]
    return ConvGeometry.of(x_shape, (1, C, R, S), stride, padding, dilation, where)


def im2col(x, kernel_size, stride=1, padding=0, dilation=1):
    """Unfold ``x`` into the rows of the convolution GEMM (the reference layout).

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

    >>> import numpy as np
    >>> im2col(np.arange(9.0).reshape(1, 1, 3, 3), 2)
    array([[0., 1., 3., 4.],
           [1., 2., 4., 5.],
           [3., 4., 6., 7.],
           [4., 5., 7., 8.]])
    """
    xp = namespace_of(x, where="im2col")
    check_ndim(x, 4, "(N, C, H, W)", "im2col")
    g = _window_geometry(x.shape, kernel_size, stride, padding, dilation, "im2col")
    return dispatch.kernel("im2col", xp, x.dtype)(xp, x, g)


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
    xp = namespace_of(cols, where="col2im")
    g = _window_geometry(tuple(x_shape), kernel_size, stride, padding, dilation, "col2im")
    if tuple(cols.shape) != g.cols_shape:
        raise ValueError(f"col2im: expected cols of shape {g.cols_shape} for input shape {tuple(x_shape)}, got {tuple(cols.shape)}")
    return dispatch.kernel("col2im", xp, cols.dtype)(xp, cols, g)


def set_workspace_limit(megabytes: float) -> None:
    """Bound the im2col matrix of one convolution call to ``megabytes``: ``set_config(workspace_mb=...)``.

    A batch whose matrix would be larger is convolved in slices of the batch
    (the result is the same), so a large batch does not run out of memory.
    The default is 1024 MB, or the ``PORTABLE_CNN_WORKSPACE_MB`` environment
    variable. At least one sample is always processed at a time.
    """
    if isinstance(megabytes, bool) or not isinstance(megabytes, (int, float)) or not megabytes > 0:
        raise ValueError(f"set_workspace_limit: expected a positive number of megabytes, got {megabytes!r}")
    set_config(workspace_mb=megabytes)


def get_workspace_limit() -> float:
    """The current im2col workspace limit in megabytes."""
    return get_config()["workspace_mb"]


def _check_conv_args(x, weight, bias, where):
    xp = namespace_of(x, weight, bias, where=where)
    check_ndim(x, 4, "(N, C, H, W)", where)
    check_ndim(weight, 4, "(K, C/groups, R, S)", where, "weight")
    check_float(x, where)
    check_float(weight, where, "weight")
    check_same_dtype(x, weight, where, "input", "weight")
    if bias is not None:
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{where}: expected bias of shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        check_same_dtype(bias, weight, where, "bias", "weight")
    return xp


def conv2d(
    x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, relu=False, return_cols=False, workspace=None,
    where="conv2d",
):
    """2-D cross-correlation, as ``torch.nn.functional.conv2d``.

    Parameters
    ----------
    x : array, shape (N, C, H, W), real floating
    weight : array, shape (K, C/groups, R, S)
    bias : array, shape (K,), optional
    stride, padding, dilation : int or pair of ints
    groups : int
        ``G``: input channels ``g*C/G .. (g+1)*C/G - 1`` feed only output
        channels ``g*K/G .. (g+1)*K/G - 1``; ``G`` must divide ``C`` and ``K``.
        ``groups == C`` is a depthwise convolution (``K/C`` filters per channel).
    relu : bool
        Return ``relu(conv2d(x) + bias)``, the ReLU applied as each part of
        the output is written (NumPy: to each block of the GEMM's output
        while it is in cache; CuPy: with the bias, in one kernel). Its
        backward is :func:`conv2d_backward` with ``relu_output=y``
        (docs/derivation.md, section 5c).
    return_cols : bool
        Also return what the backward can reuse (the unfolded input).
    workspace : dict, optional
        Scratch buffers reused from call to call (a layer passes its own).
        The returned columns may live in it and are then overwritten by the
        next call with the same workspace.
    where : str
        Name used in error messages (layers pass their own).

    Returns
    -------
    y : array, shape (N, K, P, Q)
    saved : :class:`~portable_cnn.geometry.ConvColumns` or None, only with ``return_cols``
        The unfolded input in the layout of the kernel that ran; pass it to
        :func:`conv2d_backward` as ``cols``. ``None`` where the columns are
        not kept (a batch split by the workspace limit, NumPy's large layers).

    Examples
    --------
    >>> import numpy as np
    >>> x = np.arange(16.0).reshape(1, 1, 4, 4)
    >>> conv2d(x, np.ones((1, 1, 2, 2)), stride=2)[0, 0]
    array([[10., 18.],
           [42., 50.]])
    >>> conv2d(np.ones((1, 2, 3, 3)), np.stack([np.ones((1, 2, 2)), -np.ones((1, 2, 2))]), groups=2)[0, :, 0, 0]
    array([ 4., -4.])
    """
    xp = _check_conv_args(x, weight, bias, where)
    g = ConvGeometry.of(x.shape, weight.shape, stride, padding, dilation, where, groups)
    forward = dispatch.kernel("conv2d_forward", xp, x.dtype)
    y, saved = forward(xp, x, weight, bias, g, relu=bool(relu), keep_cols=return_cols, workspace=workspace,
                       where=where)
    return (y, saved) if return_cols else y


def conv2d_backward(
    dy, x, weight, stride=1, padding=0, dilation=1, groups=1, *, cols=None, has_bias=True, need_input_grad=True,
    relu_output=None, workspace=None, where="conv2d",
):
    """Gradients of :func:`conv2d`.

    Parameters
    ----------
    dy : array, shape (N, K, P, Q)
        dL/dy.
    x, weight, stride, padding, dilation, groups
        As given to the forward.
    cols : ConvColumns, optional
        What the forward returned with ``return_cols``; the input is unfolded
        again when omitted or written by another kernel. The reference and
        CuPy backwards take the columns out of it
        (:meth:`~portable_cnn.geometry.ConvColumns.take`) and free them before
        the input gradient's columns are allocated; given it again, they
        unfold the input again.
    has_bias : bool
        Whether to return ``db`` (else ``None``).
    need_input_grad : bool
        Whether to compute ``dx`` (else ``None``): the first layer of a
        network needs no gradient for its input, which saves a GEMM and col2im.
    relu_output : array, shape (N, K, P, Q), optional
        The output of a forward run with ``relu=True``: ``dy`` is then the
        gradient of that output, and goes through the ReLU first (``dy``
        where ``relu_output > 0``; NumPy masks each block as it reads it).
    workspace : dict, optional
        Scratch buffers, as for :func:`conv2d` (use the same dict).

    Returns
    -------
    dx : array, shape (N, C, H, W), or None
    dw : array, shape (K, C/groups, R, S)
    db : array, shape (K,) or None
    """
    xp = _check_conv_args(x, weight, None, where)
    namespace_of(dy, x, where=where)
    g = ConvGeometry.of(x.shape, weight.shape, stride, padding, dilation, where, groups)
    if tuple(dy.shape) != g.y_shape:
        raise ValueError(f"{where}: expected output gradient of shape {g.y_shape}, got {tuple(dy.shape)}")
    if relu_output is not None:
        namespace_of(relu_output, x, where=where)
        check_same_dtype(relu_output, x, where, "relu_output", "input")
        if tuple(relu_output.shape) != g.y_shape:
            raise ValueError(f"{where}: expected relu_output of shape {g.y_shape} (the forward's output), "
                             f"got {tuple(relu_output.shape)}")
    backward = dispatch.kernel("conv2d_backward", xp, x.dtype)
    return backward(xp, dy, x, weight, g, saved=cols, has_bias=has_bias, need_input_grad=need_input_grad,
                    relu_output=relu_output, workspace=workspace, where=where)
