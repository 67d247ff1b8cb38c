"""NumPy convolution: channels-last, data-parallel over the batch, cache-blocked.

Column layout ``"numpy-nhwc"``: im2col rows ``(n, p, q)`` with columns
ordered ``(g, r, s, c)`` over channels-last input (``c`` the channel within
group ``g``; ``(r, s, c)`` for one group), kept (when kept at all) as one
``(N, P, Q, G, R, S, C/G)`` buffer; with one input channel, ``(R*S, N*P*Q)``,
a tap per row (see :class:`_Unfolder`). Group ``g``'s columns are one run
of ``R*S*C/G`` per row, so its GEMM reads them in place (a matrix with
leading dimension ``G*R*S*C/G``), and ``G`` groups are one ``np.matmul``
over a stack of ``G`` such views (docs/derivation.md, section 5a).

A depthwise convolution (``G = C``) does not come here as ``C`` GEMMs of
one column each: :mod:`.depthwise` multiplies and adds it tap by tap. A
stride-1 layer of few input and output channels (lenet's two), whose im2col
GEMMs would be thin, runs :mod:`.banded`: unfolded along the kernel's rows
only, with a banded weight along its columns.

Three choices make NumPy convolutions fast here:

* Channels-last memory. The forward returns an (N, K, P, Q) *view* of an
  (N, P, Q, K) GEMM result, and reads its input through
  ``x.transpose(0, 2, 3, 1)``, which is then contiguous. In that layout an
  im2col row is R runs of S*C contiguous floats (not C*R runs of S), and
  the GEMM output needs no transpose copy. The small weight is reordered
  to match the (R, S, C) columns.
* Data parallelism over the batch (:func:`.parallel.batch_parallel`): each
  core unfolds and multiplies its own part of the batch with
  single-threaded BLAS, so both cores copy and multiply at once instead of
  taking turns.
* Cache blocking: each core works a few samples at a time, so a block's
  im2col matrix (a few MB) is written and read back by the GEMM in cache;
  the whole batch's would be 150 MB for vgg-small. The backward recomputes
  the blocks rather than keeping them, which also bounds memory; a small
  layer (whole matrix at most ``_KEEP_BYTES``) keeps its matrix instead.
Together about 1.5-2x faster than one whole-batch im2col and one GEMM on
both cores (vgg-small layers, 2 cores; benchmarks/README.md).
"""

from __future__ import annotations

import numpy as np

from ...config import setting
from ...geometry import ConvColumns
from . import banded, depthwise
from .activation import relu_backward, relu_in_place
from .parallel import batch_parallel, parallel_copy

__all__ = ["COLUMN_LAYOUT", "conv2d_forward", "conv2d_backward"]

COLUMN_LAYOUT = "numpy-nhwc"

_BLOCK_BYTES = 4 << 20  # one block's im2col matrix; 1-8 MB measured alike here
# A convolution whose whole im2col matrix is at most this large keeps it from
# the forward for the backward (lenet's: 10 and 8 MB) instead of unfolding
# twice; larger ones (vgg-small's: up to 150 MB) recompute blocks in cache.
_KEEP_BYTES = 16 << 20
# With one input channel both products read the transpose of a taps-first
# buffer (R*S rows, each a long run): the weight gradient's (K, rows) @
# (rows, R*S) and the forward's (rows, R*S) @ (R*S, K). OpenBLAS takes them
# faster in slices of at most this many rows (lenet's first layer, 1 thread:
# the weight gradient 0.45 against 1.13 ms per 64 samples, the forward's
# product 0.55 against 0.92 ms per 128; 8192 rows and more as slow as one
# product). docs/benchmarks.md, "Issue 15, first step" and "third step".
_TAPS_FIRST_ROWS = 4096
# For the thread pool's size threshold (FLOPs): unfolding one byte of im2col
# matrix takes about as long as 10 GEMM FLOPs (copies at ~10 GB/s, GEMMs at
# ~100 GFLOP/s a core), so a layer that unfolds is worth more threads than its
# FLOPs alone say (lenet's first layer: 30 MFLOP and 10 MB of columns).
_UNFOLD_FLOPS_PER_BYTE = 10


def _buffer(workspace, tag, shape, dtype, *, zeroed=False):
    """An array of ``shape`` kept in ``workspace`` (a dict a layer owns) and reused across calls.

    Fresh memory costs a page fault per 4 KiB on first touch, which here
    takes as long as the copy into it. Only arrays that never leave the op
    live in the workspace (padded inputs, im2col blocks).
    """
    if workspace is None:
        return np.zeros(shape, dtype=dtype) if zeroed else np.empty(shape, dtype=dtype)
    buf = workspace.get(tag)
    if buf is None or buf.shape != shape or buf.dtype != dtype:
        buf = np.zeros(shape, dtype=dtype) if zeroed else np.empty(shape, dtype=dtype)
        workspace[tag] = buf
    return buf


def _padded_nhwc(x, a, b, workspace=None, tag="pad", *, contiguous=False):
    """``x`` as channels-last ``(N, H+2a, W+2b, C)``, zero-padded (a view when unpadded).

    ``contiguous``: copy an unpadded input whose memory is not channels-last
    too, for code that reads it tap by tap rather than through one copy.
    """
    xt = x.transpose(0, 2, 3, 1)  # (N, H, W, C)
    if a == 0 and b == 0 and (not contiguous or xt.flags.c_contiguous):
        return xt
    N, H, W, C = xt.shape
    # Zeroed once; later calls overwrite only the interior, so the border stays zero.
    xpad = _buffer(workspace, tag, (N, H + 2 * a, W + 2 * b, C), x.dtype, zeroed=True)
    parallel_copy(xpad[:, a : a + H, b : b + W, :], xt)
    return xpad


def _windows_nhwc(x, R, S, u, v, a, b, dh, dw, P, Q, G, workspace=None, tag="x"):
    """A read-only ``(N, P, Q, G, R, S, C/G)`` strided view: ``[n, p, q]`` is im2col row ``(n, p, q)``."""
    return _windows_of(_padded_nhwc(x, a, b, workspace, tag + ".pad"), R, S, u, v, dh, dw, P, Q, G)


def _windows_of(xpad, R, S, u, v, dh, dw, P, Q, G):
    """:func:`_windows_nhwc` of the already padded channels-last ``xpad`` ``(N, H+2a, W+2b, C)``."""
    N, C = xpad.shape[0], xpad.shape[3]
    sN, sH, sW, sC = xpad.strides
    return np.lib.stride_tricks.as_strided(
        xpad, shape=(N, P, Q, G, R, S, C // G), strides=(sN, u * sH, v * sW, C // G * sC, dh * sH, dw * sW, sC),
        writeable=False,
    )  # (N, P, Q, G, R, S, C/G)


class _Unfolder:
    """im2col of sample blocks ``i:j``, into one thread's reused buffer or into a whole-batch one.

    With several channels a block is ``(rows, R*S*C)``. With one channel a
    channels-last row would be runs of S floats, so the buffer holds a tap per
    row instead, ``(R*S, rows)``, filled a whole (n, P, Q) slice at a time
    (runs of Q floats), and the block is its transpose: the same matrix to the
    GEMM, about 2.5x faster to fill for lenet's first layer.

    ``whole`` is a buffer for all N samples (the layout of :meth:`whole_shape`):
    blocks are then written at their samples' place, so the forward can hand
    the whole matrix to the backward, or, with ``filled``, are read from it
    without copying.
    """

    def __init__(self, windows, block, workspace, tag, *, whole=None, filled=False):
        self.windows, self.filled = windows, filled
        self.taps_first = windows.shape[3] == windows.shape[-1] == 1  # one group of one channel
        if whole is not None:
            self.buf, self.offset = whole, True
        else:
            self.buf, self.offset = _buffer(workspace, tag, self.whole_shape(windows, block), windows.dtype), False

    @staticmethod
    def whole_shape(windows, n):
        """Buffer shape for ``n`` samples."""
        N, P, Q, G, R, S, Cg = windows.shape
        return (R * S, n * P * Q) if G == Cg == 1 else (n, P, Q, G, R, S, Cg)

    def __call__(self, i, j):
        """The im2col block of samples ``i:j``: ``(rows, G*R*S*C/G)``, columns ``(g, r, s, c)``."""
        N, P, Q, G, R, S, Cg = self.windows.shape
        start, stop = (i, j) if self.offset else (0, j - i)  # samples' place in the buffer
        rows = slice(start * P * Q, stop * P * Q)
        if self.taps_first:
            if not self.filled:
                for r in range(R):
                    for s in range(S):
                        np.copyto(self.buf[r * S + s, rows].reshape(j - i, P, Q), self.windows[i:j, :, :, 0, r, s, 0])
            return self.buf[:, rows].T  # (rows, R*S)
        block = self.buf[start:stop]  # (j-i, P, Q, G, R, S, C/G)
        if not self.filled:
            np.copyto(block, self.windows[i:j])
        return block.reshape((j - i) * P * Q, G * R * S * Cg)


def _by_group(a, G):
    """The ``(rows, G*m)`` matrix ``a`` as a stack of ``G`` matrices ``(G, rows, m)`` (a view).

    Each is a run of ``m`` columns with leading dimension ``G*m``, which
    ``np.matmul`` hands to BLAS in place, as input or as ``out``.
    """
    rows, width = a.shape
    return a.reshape(rows, G, width // G).transpose(1, 0, 2)  # (rows, G, m) -> (G, rows, m)


def _limit_samples(g, itemsize):
    return g.samples_per_slice(itemsize, setting("workspace_mb") * 2**20)


def _samples_per_block(per_sample_bytes, limit_samples):
    return max(1, min(limit_samples, _BLOCK_BYTES // max(1, per_sample_bytes)))


def _weight_columns(weight, g):
    """``(K, C/G, R, S)`` as ``(G, R*S*C/G, K/G)``: each group's ``W2.T`` with rows ``(r, s, c)``."""
    w5 = weight.reshape(g.G, g.Kg, g.Cg, g.R, g.S)  # (G, K/G, C/G, R, S)
    return w5.transpose(0, 3, 4, 2, 1).reshape(g.G, g.R * g.S * g.Cg, g.Kg)  # (G, R, S, C/G, K/G) -> (G, R*S*C/G, K/G)


def _workspace_buffer(workspace):
    """``buffer(shape, dtype, tag)`` for :mod:`.banded`: arrays of ``workspace`` (see :func:`_buffer`)."""
    return lambda shape, dtype, tag: _buffer(workspace, tag, shape, dtype)


def conv2d_forward(xp, x, weight, bias, g, *, relu=False, keep_cols=False, workspace=None, where="conv2d"):
    """Forward; returns ``(y, ConvColumns or None)``: the columns only for a small layer (``_KEEP_BYTES``).

    With ``relu``, ``y`` is ``relu(conv + bias)``, applied to each block of
    the GEMM's output while it is in cache. A depthwise convolution
    (``g.depthwise``) runs :mod:`.depthwise`, a thin one (:func:`.banded.use`)
    :mod:`.banded`; neither keeps columns, and their ReLU is a pass of its own.
    """
    if g.depthwise or banded.use(g, x.itemsize):
        xpad = _padded_nhwc(x, g.a, g.b, workspace, "x.pad", contiguous=True)  # (N, H+2a, W+2b, C)
        if g.depthwise:
            y = depthwise.forward(xpad, weight, bias, g)  # (N, P, Q, K)
        else:
            y = banded.forward(xpad, weight, bias, g, _workspace_buffer(workspace))  # (N, P, Q, K)
        if relu:
            relu_in_place(y)
        return y.transpose(0, 3, 1, 2), None  # (N, K, P, Q) view of (N, P, Q, K)
    N, C, P, Q, K, R, S, G = g.N, g.C, g.P, g.Q, g.K, g.R, g.S, g.G
    w3t = _weight_columns(weight, g)  # (G, R*S*C/G, K/G)
    windows = _windows_nhwc(x, R, S, g.u, g.v, g.a, g.b, g.dh, g.dw, P, Q, G, workspace)  # (N, P, Q, G, R, S, C/G)
    y = np.empty((N, P, Q, K), dtype=x.dtype)  # (N, P, Q, K)
    block = _samples_per_block(P * Q * R * S * C * x.itemsize, _limit_samples(g, x.itemsize))
    keep = N * P * Q * R * S * C * x.itemsize <= _KEEP_BYTES
    whole = _buffer(workspace, "cols.whole", _Unfolder.whole_shape(windows, N), x.dtype) if keep else None
    # The bias repeated along an output row, (Q*K,): added to (rows/Q, Q*K) runs, not to (rows, K) rows, it
    # is one NumPy inner loop per output row instead of one per pixel (lenet's first layer, K = 6: 8x faster).
    bias_row = None if bias is None else np.tile(bias, Q)  # (Q*K,)

    def work(lo, hi, slot):
        unfold = _Unfolder(windows, block, workspace, f"cols.{slot}", whole=whole)
        for i in range(lo, hi, block):
            j = min(hi, i + block)
            out = y[i:j].reshape((j - i) * P * Q, K)  # (rows, K)
            cols_block = unfold(i, j)  # (rows, G*R*S*C/G)
            if unfold.taps_first:  # G = C = 1: slices of rows (see _TAPS_FIRST_ROWS)
                for k in range(0, out.shape[0], _TAPS_FIRST_ROWS):
                    part = slice(k, k + _TAPS_FIRST_ROWS)
                    np.matmul(cols_block[part], w3t[0], out=out[part])  # (rows, K)
            else:
                np.matmul(_by_group(cols_block, G), w3t, out=_by_group(out, G))  # (G, rows, K/G)
            if bias_row is not None:
                y_rows = y[i:j].reshape((j - i) * P, Q * K)  # (rows/Q, Q*K)
                y_rows += bias_row
            if relu:
                np.maximum(out, out.dtype.type(0), out=out)  # the block's ReLU, in cache (NaN stays, as relu's)

    batch_parallel(work, N, flops=g.flops + _UNFOLD_FLOPS_PER_BYTE * N * P * Q * R * S * C * x.itemsize)
    saved = ConvColumns(COLUMN_LAYOUT, whole) if keep_cols and whole is not None else None
    return y.transpose(0, 3, 1, 2), saved  # (N, K, P, Q) view of (N, P, Q, K)


def conv2d_backward(xp, dy, x, weight, g, *, saved=None, has_bias=True, need_input_grad=True, relu_output=None,
                    workspace=None, where="conv2d"):
    """Backward: ``(dx or None, dW, db or None)``; ``saved`` the forward's columns in this layout, or recompute.

    Per block of samples and per group: ``dW += dY2.T @ cols`` and ``db +=
    1 @ dY2`` into the thread's own partial sums, and ``dx`` for those
    samples, either as a convolution of dy (stride 1, docs/derivation.md
    section 5) or by col2im tap by tap. ``relu_output``: the forward ran
    with ``relu`` and gave this ``y``; each block of ``dY2`` is first masked
    by ``y > 0``, in cache. A depthwise convolution runs :mod:`.depthwise`,
    a thin one :mod:`.banded`, after a ReLU backward pass of its own.
    """
    N, C, H, W, K, R, S, P, Q, G = g.N, g.C, g.H, g.W, g.K, g.R, g.S, g.P, g.Q, g.G
    u, v, a, b, dh, dw = g.u, g.v, g.a, g.b, g.dh, g.dw
    own_kernel = g.depthwise or banded.use(g, x.itemsize)
    if relu_output is not None and own_kernel:
        dy, relu_output = relu_backward(xp, dy, relu_output), None  # (N, K, P, Q), x's layout
    dyt = dy.transpose(0, 2, 3, 1)  # (N, P, Q, K), contiguous when dy is channels-last
    yt = None if relu_output is None else relu_output.transpose(0, 2, 3, 1)  # (N, P, Q, K)
    if own_kernel:
        xpad = _padded_nhwc(x, a, b, workspace, "x.pad", contiguous=True)  # (N, H+2a, W+2b, C)
        if g.depthwise:
            dxpad, dweight, dbias = depthwise.backward(dyt, xpad, weight, g, has_bias, need_input_grad)
        else:
            dxpad, dweight, dbias = banded.backward(
                dyt, xpad, weight, g, has_bias, need_input_grad, _workspace_buffer(workspace)
            )
        dx = None if dxpad is None else dxpad[:, a : a + H, b : b + W, :].transpose(0, 3, 1, 2)  # (N, C, H, W) view
        return dx, dweight, dbias
    limit = _limit_samples(g, x.itemsize)
    windows = _windows_nhwc(x, R, S, u, v, a, b, dh, dw, P, Q, G, workspace)  # (N, P, Q, G, R, S, C/G)
    cols = saved.cols if saved is not None and saved.layout == COLUMN_LAYOUT else None
    if cols is not None and cols.shape != _Unfolder.whole_shape(windows, N):
        cols = None  # kept for another batch: unfold again
    block = _samples_per_block(P * Q * R * S * C * x.itemsize, limit)
    # Stride 1: dx as a convolution of dy, unless dy's columns (H*W*K per
    # tap) outweigh col2im's write and scatter-add of P*Q*C per tap (lenet's
    # 6->16 layer: 3136 against 2 x 600).
    as_convolution = u == 1 and v == 1 and a <= dh * (R - 1) and b <= dw * (S - 1) and H * W * K <= 2 * P * Q * C
    if need_input_grad and as_convolution:
        # dx = conv(dy padded by d(R-1)-a, rot180(W) with K and C swapped), group by group: docs/derivation.md,
        # sections 5 and 5a.
        pa, pb = dh * (R - 1) - a, dw * (S - 1) - b
        if yt is None:
            dypad = _padded_nhwc(dy, pa, pb, workspace, "dy.pad")  # (N, P+2pa, Q+2pb, K)
        else:  # each block writes its masked dy into the interior (the border stays zero)
            dypad = _buffer(workspace, "dy.pad", (N, P + 2 * pa, Q + 2 * pb, K), dy.dtype, zeroed=True)
        dy_windows = _windows_of(dypad, R, S, 1, 1, dh, dw, H, W, G)  # (N, H, W, G, R, S, K/G)
        w_rot = weight[:, :, ::-1, ::-1].reshape(G, g.Kg, g.Cg, R, S)  # (G, K/G, C/G, R, S)
        w_rot_t = w_rot.transpose(0, 3, 4, 1, 2).reshape(G, R * S * g.Kg, g.Cg)  # (G, R*S*K/G, C/G)
        dx = np.empty((N, H, W, C), dtype=dy.dtype)  # (N, H, W, C)
        block = min(block, _samples_per_block(H * W * R * S * K * dy.itemsize, limit))
    elif need_input_grad:
        # col2im tap by tap: one GEMM per tap (and group) gives its (rows, C)
        # block contiguous, so each scatter-add moves runs of Q*C floats.
        w_taps = weight.reshape(G, g.Kg, g.Cg, R, S).transpose(3, 4, 0, 1, 2)  # (R, S, G, K/G, C/G)
        w_taps = w_taps.reshape(R * S, G, g.Kg, g.Cg)  # (R*S, G, K/G, C/G)
        dxpad = np.zeros((N, H + 2 * a, W + 2 * b, C), dtype=dy.dtype)  # (N, H+2a, W+2b, C)
    partial_dw, partial_db = {}, {}

    def work(lo, hi, slot):
        unfold = _Unfolder(windows, block, workspace, f"cols.{slot}", whole=cols, filled=cols is not None)
        unfold_dy = None
        if need_input_grad and as_convolution:
            unfold_dy = _Unfolder(dy_windows, block, workspace, f"dy_cols.{slot}")
        dw3 = np.zeros((G, g.Kg, R * S * g.Cg), dtype=x.dtype)  # (G, K/G, R*S*C/G)
        db = np.zeros(K, dtype=x.dtype)  # (K,)
        ones = np.ones(block * P * Q, dtype=x.dtype)
        masked_rows = None if yt is None else _buffer(workspace, f"dy.relu.{slot}", (block * P * Q, K), dy.dtype)
        for i in range(lo, hi, block):
            j = min(hi, i + block)
            rows = (j - i) * P * Q
            dy2 = dyt[i:j].reshape(rows, K)  # (rows, K)
            if yt is not None:  # the ReLU's backward for this block: dy where y > 0 (relu_backward's product)
                dy2 = np.multiply(dy2, yt[i:j].reshape(rows, K) > 0, out=masked_rows[:rows])  # (rows, K)
                if unfold_dy is not None:
                    dypad[i:j, pa : pa + P, pb : pb + Q, :] = dy2.reshape(j - i, P, Q, K)
            dy3 = _by_group(dy2, G)  # (G, rows, K/G)
            cols_block = unfold(i, j)  # (rows, G*R*S*C/G)
            if unfold.taps_first:  # G = C = 1: slices of rows (see _TAPS_FIRST_ROWS)
                for k in range(0, rows, _TAPS_FIRST_ROWS):
                    part = slice(k, k + _TAPS_FIRST_ROWS)
                    dw3[0] += dy2[part].T @ cols_block[part]  # (K, R*S)
            else:
                dw3 += dy3.transpose(0, 2, 1) @ _by_group(cols_block, G)  # (G, K/G, R*S*C/G)
            db += ones[:rows] @ dy2  # a GEMV: NumPy's column sum of a narrow matrix is ~10x slower
            if unfold_dy is not None:
                out = _by_group(dx[i:j].reshape((j - i) * H * W, C), G)  # (G, (j-i)*H*W, C/G)
                np.matmul(_by_group(unfold_dy(i, j), G), w_rot_t, out=out)
            elif need_input_grad:
                dcols = np.empty((R * S, rows, C), dtype=dy.dtype)  # (R*S, rows, C)
                out = dcols.reshape(R * S, rows, G, g.Cg).transpose(0, 2, 1, 3)  # (R*S, G, rows, C/G)
                np.matmul(dy3[None], w_taps, out=out)
                dcols = dcols.reshape(R * S, j - i, P, Q, C)  # (R*S, j-i, P, Q, C)
                for r in range(R):
                    for s in range(S):
                        h0, w0 = r * dh, s * dw
                        dxpad[i:j, h0 : h0 + u * (P - 1) + 1 : u, w0 : w0 + v * (Q - 1) + 1 : v, :] += dcols[r * S + s]
        partial_dw[slot], partial_db[slot] = dw3, db

    unfold_bytes = 0 if cols is not None else N * P * Q * R * S * C * x.itemsize
    batch_parallel(work, N, flops=(2 if need_input_grad else 1) * g.flops + _UNFOLD_FLOPS_PER_BYTE * unfold_bytes)
    dw3, db = partial_dw.pop(0), partial_db.pop(0)
    for slot in partial_dw:
        dw3 += partial_dw[slot]
        db += partial_db[slot]
    dw5 = dw3.reshape(G, g.Kg, R, S, g.Cg).transpose(0, 1, 4, 2, 3)  # (G, K/G, C/G, R, S)
    dweight = np.ascontiguousarray(dw5).reshape(g.w_shape)  # (K, C/G, R, S)
    dbias = db if has_bias else None
    if not need_input_grad:
        return None, dweight, dbias
    if as_convolution:
        return dx.transpose(0, 3, 1, 2), dweight, dbias  # (N, C, H, W) view of (N, H, W, C)
    return dxpad[:, a : a + H, b : b + W, :].transpose(0, 3, 1, 2), dweight, dbias  # (N, C, H, W) view
