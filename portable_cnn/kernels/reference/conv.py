"""2-D convolution by im2col + GEMM in the array API standard: the reference, and the GEMMs the CuPy kernels share.

Column layout ``"reference"``: the im2col matrix is ``(N*P*Q, C*R*S)``, row
``(n, p, q)`` holding the padded input patch under output ``(p, q)`` ordered
``(c, r, s)``, like ``weight.reshape(K, C*R*S)``.

The forward is one GEMM, ``y = cols @ W2.T + bias`` with ``W2 =
W.reshape(K, C*R*S)``; the backward its two transposes, ``dW2 = dY2.T @
cols`` and ``dx = col2im(dY2 @ W2)``, and ``db`` the column sums of ``dY2``
(shapes in :mod:`portable_cnn.ops.conv`, derivation in docs/derivation.md,
sections 3-5).

With ``G`` groups the same three products run once per group, as one
matmul over a stack of ``G`` matrices (section 5a): group ``g`` owns the
columns ``g*C/G*R*S .. (g+1)*C/G*R*S - 1`` of ``cols`` (the ``(c, r, s)``
order puts each group's channels side by side) and the output channels
``g*K/G .. (g+1)*K/G - 1``::

    cols3 = cols as (G, N*P*Q, C/G*R*S)       W3  = W as (G, K/G, C/G*R*S)
    y3    = cols3 @ W3.mT                     # (G, N*P*Q, K/G)
    dW3   = dY3.mT @ cols3                    # (G, K/G, C/G*R*S)
    dcols = dY3 @ W3                          # (G, N*P*Q, C/G*R*S)

A batch whose im2col matrix would exceed ``config workspace_mb`` is
convolved in slices of the batch: the forward concatenates the slices'
outputs and keeps no columns, the backward adds the slices' weight and bias
gradients.
"""

from __future__ import annotations

from ... import backend
from ...config import setting
from ...geometry import ConvColumns
from .activation import relu_backward, relu_forward
from .windows import pad2d, scatter_add_taps, tap_slices

__all__ = ["COLUMN_LAYOUT", "im2col", "col2im", "conv2d_forward", "conv2d_backward", "gemm_forward", "gemm_backward",
           "add_bias_relu"]

COLUMN_LAYOUT = "reference"


def im2col(xp, x, g):
    """Unfold ``x`` ``(N, C, H, W)`` into the ``(N*P*Q, C*R*S)`` rows of the convolution GEMM."""
    xpad = pad2d(xp, x, g.a, g.b)  # (N, C, H+2a, W+2b)
    taps = [xpad[index] for index in tap_slices(g)]  # R*S x (N, C, P, Q)
    cols = xp.stack(taps, axis=-1)  # (N, C, P, Q, R*S)
    cols = xp.permute_dims(cols, (0, 2, 3, 1, 4))  # (N, P, Q, C, R*S)
    return xp.reshape(cols, (g.N * g.P * g.Q, g.C * g.R * g.S))


def col2im(xp, cols, g):
    """Fold ``(N*P*Q, C*R*S)`` rows back onto ``(N, C, H, W)``: the adjoint of :func:`im2col`."""
    cols = xp.reshape(cols, (g.N, g.P, g.Q, g.C, g.R * g.S))  # (N, P, Q, C, R*S)
    cols = xp.permute_dims(cols, (4, 0, 3, 1, 2))  # (R*S, N, C, P, Q)
    taps = (cols[k, ...] for k in range(g.R * g.S))
    return scatter_add_taps(xp, taps, g, dtype=cols.dtype, device=backend.device(cols))  # (N, C, H, W)


def column_sums(xp, a):
    """Sums of the columns of the 2-D ``a``: the bias gradient."""
    return xp.sum(a, axis=0)


def _by_group(xp, a, G):
    """``(rows, G*m)`` as ``G`` matrices ``(G, rows, m)``, group ``g`` its ``g``-th run of ``m`` columns.

    With one group it is ``a`` itself: a plain 2-D GEMM, which CuPy runs on
    transposed operands without the copies its batched matmul makes.
    """
    if G == 1:
        return a
    rows, width = a.shape
    return xp.permute_dims(xp.reshape(a, (rows, G, width // G)), (1, 0, 2))  # (rows, G, m) -> (G, rows, m)


def _ungroup(xp, a):
    """The inverse of :func:`_by_group`: ``(G, rows, m)`` back to ``(rows, G*m)``."""
    if a.ndim == 2:
        return a
    G, rows, m = a.shape
    return xp.reshape(xp.permute_dims(a, (1, 0, 2)), (rows, G * m))  # (rows, G, m) -> (rows, G*m)


def _weight_by_group(xp, weight, g, order="crs"):
    """``(K, C/G, R, S)`` as ``(G, K/G, C/G*R*S)``, or ``W2 = (K, C*R*S)`` with one group.

    ``order``: the order of a group's columns, ``"crs"`` (the reference's
    im2col) or ``"rsc"`` (channel fastest, the CuPy kernels' over
    channels-last input).
    """
    if order == "rsc":
        weight = xp.permute_dims(weight, (0, 2, 3, 1))  # (K, R, S, C/G)
    shape = (g.K, g.Cg * g.R * g.S) if g.G == 1 else (g.G, g.Kg, g.Cg * g.R * g.S)
    return xp.reshape(weight, shape)


def _weight_from_groups(xp, dw3, g, order="crs"):
    """The inverse of :func:`_weight_by_group`: ``(G, K/G, C/G*R*S)`` (or ``(K, C*R*S)``) to ``(K, C/G, R, S)``."""
    if order == "rsc":
        return xp.permute_dims(xp.reshape(dw3, (g.K, g.R, g.S, g.Cg)), (0, 3, 1, 2))  # (K, R, S, C/G) -> (K, C/G, R, S)
    return xp.reshape(dw3, g.w_shape)


def _samples_per_slice(xp, x, g) -> int:
    itemsize = xp.finfo(x.dtype).bits // 8
    return g.samples_per_slice(itemsize, setting("workspace_mb") * 2**20)


def add_bias_relu(xp, y, bias, relu):
    """The forward's epilogue on the fresh product ``y`` (N*P*Q, K): ``y += bias``, then its ReLU if ``relu``."""
    if bias is not None:
        y += bias  # in place: y is the product's own fresh array, and a second one would double the peak here
    return relu_forward(xp, y) if relu else y


def gemm_forward(xp, x, weight, bias, g, *, keep_cols, unfold, layout, order="crs", relu=False,
                 epilogue=add_bias_relu):
    """The forward GEMM with ``unfold`` as im2col; returns ``(y, ConvColumns or None)``.

    ``order``: the column order ``unfold`` writes within a group (see
    :func:`_weight_by_group`); ``epilogue(xp, y, bias, relu)``: the bias and
    the ReLU on the product (:func:`add_bias_relu`; CuPy's is one kernel).
    """
    n = _samples_per_slice(xp, x, g)
    if n < g.N:
        parts = [
            gemm_forward(xp, x[i : i + n, ...], weight, bias, g.with_batch(min(n, g.N - i)), keep_cols=False,
                         unfold=unfold, layout=layout, order=order, relu=relu, epilogue=epilogue)[0]
            for i in range(0, g.N, n)
        ]
        return xp.concat(parts, axis=0), None  # (N, K, P, Q); the backward unfolds its slices again
    cols = unfold(xp, x, g)  # (N*P*Q, C*R*S)
    w3 = _weight_by_group(xp, weight, g, order)  # (G, K/G, C/G*R*S)
    y = _ungroup(xp, _by_group(xp, cols, g.G) @ xp.matrix_transpose(w3))  # (G, N*P*Q, K/G) -> (N*P*Q, K)
    y = epilogue(xp, y, bias, relu)  # (N*P*Q, K)
    y = xp.permute_dims(xp.reshape(y, (g.N, g.P, g.Q, g.K)), (0, 3, 1, 2))  # (N, K, P, Q)
    return y, (ConvColumns(layout, cols) if keep_cols else None)


def gemm_backward(xp, dy, x, weight, g, *, cols, has_bias, need_input_grad, unfold, fold, sums, order="crs"):
    """The two transposed GEMMs; ``cols`` the forward's columns or None; returns ``(dx, dW, db)``.

    ``order``: the column order of ``unfold``, ``fold`` and ``cols`` within a group (see :func:`_weight_by_group`).
    """
    if cols is None:
        n = _samples_per_slice(xp, x, g)
        if n < g.N:
            return _sliced_backward(xp, dy, x, weight, g, n, has_bias, need_input_grad, unfold, fold, sums, order)
        cols = unfold(xp, x, g)  # (N*P*Q, C*R*S)
    dy2 = xp.reshape(xp.permute_dims(dy, (0, 2, 3, 1)), (g.N * g.P * g.Q, g.K))  # (N*P*Q, K)
    dy3 = _by_group(xp, dy2, g.G)  # (G, N*P*Q, K/G)
    dw3 = xp.matrix_transpose(dy3) @ _by_group(xp, cols, g.G)  # (G, K/G, C/G*R*S)
    # Done with the columns: when this is their last reference (a caller that took them, ConvColumns.take),
    # they are freed before dcols, as large, is allocated.
    cols = None
    dweight = _weight_from_groups(xp, dw3, g, order)  # (K, C/G, R, S)
    dbias = sums(xp, dy2) if has_bias else None  # (K,)
    if not need_input_grad:
        return None, dweight, dbias
    dcols = _ungroup(xp, dy3 @ _weight_by_group(xp, weight, g, order))  # (G, N*P*Q, C/G*R*S) -> (N*P*Q, C*R*S)
    dx = fold(xp, dcols, g)  # (N, C, H, W)
    return dx, dweight, dbias


def _sliced_backward(xp, dy, x, weight, g, n, has_bias, need_input_grad, unfold, fold, sums, order):
    """:func:`gemm_backward` over slices of ``n`` samples: input gradients concatenated, the others added."""
    dx_parts, dweight, dbias = [], None, None
    for i in range(0, g.N, n):
        gi = g.with_batch(min(n, g.N - i))
        dx_i, dw_i, db_i = gemm_backward(xp, dy[i : i + n, ...], x[i : i + n, ...], weight, gi, cols=None,
                                         has_bias=has_bias, need_input_grad=need_input_grad, unfold=unfold,
                                         fold=fold, sums=sums, order=order)
        dx_parts.append(dx_i)
        dweight = dw_i if dweight is None else dweight + dw_i
        dbias = db_i if dbias is None else dbias + db_i
    dx = xp.concat(dx_parts, axis=0) if need_input_grad else None  # (N, C, H, W)
    return dx, dweight, dbias


def conv2d_forward(xp, x, weight, bias, g, *, relu=False, keep_cols=False, workspace=None, where="conv2d"):
    """Convolution ``(N, C, H, W) -> (N, K, P, Q)``, its ReLU with ``relu``; returns ``(y, ConvColumns or None)``.

    ``workspace`` (a layer's scratch dict) and ``where`` are part of every
    convolution kernel's signature; the reference needs neither.
    """
    return gemm_forward(xp, x, weight, bias, g, keep_cols=keep_cols, unfold=im2col, layout=COLUMN_LAYOUT, relu=relu)


def conv2d_backward(xp, dy, x, weight, g, *, saved=None, has_bias=True, need_input_grad=True, relu_output=None,
                    workspace=None, where="conv2d"):
    """Gradients ``(dx or None, dW, db or None)``; ``saved`` is the forward's :class:`ConvColumns` or None.

    ``relu_output``: the output of a forward with ``relu``; ``dy`` goes through the ReLU's backward first.
    """
    if relu_output is not None:
        dy = relu_backward(xp, dy, relu_output)  # (N, K, P, Q)
    # Taken, not read, and passed on unnamed: gemm_backward holds the columns' only reference (ConvColumns.take).
    return gemm_backward(xp, dy, x, weight, g, cols=None if saved is None else saved.take(COLUMN_LAYOUT),
                         has_bias=has_bias, need_input_grad=need_input_grad, unfold=im2col, fold=col2im,
                         sums=column_sums)
