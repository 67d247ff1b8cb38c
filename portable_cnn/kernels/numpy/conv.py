"""NumPy convolution: channels-last, data-parallel over the batch, cache-blocked.

Column layout ``"numpy-nhwc"``: im2col rows ``(n, p, q)`` with columns
ordered ``(r, s, c)`` over channels-last input, kept (when kept at all) as one
``(N, P, Q, R, S, C)`` buffer; with one input channel, ``(R*S, N*P*Q)``, a tap
per row (see :class:`_Unfolder`).

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
from .parallel import batch_parallel, parallel_copy

__all__ = ["COLUMN_LAYOUT", "conv2d_forward", "conv2d_backward"]

COLUMN_LAYOUT = "numpy-nhwc"

_BLOCK_BYTES = 4 << 20  # one block's im2col matrix; 1-8 MB measured alike here
# A convolution whose whole im2col matrix is at most this large keeps it from
# the forward for the backward (lenet's: 10 and 8 MB) instead of unfolding
# twice; larger ones (vgg-small's: up to 150 MB) recompute blocks in cache.
_KEEP_BYTES = 16 << 20


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


def _padded_nhwc(x, a, b, workspace=None, tag="pad"):
    """``x`` as channels-last ``(N, H+2a, W+2b, C)``, zero-padded (a view when unpadded)."""
    xt = x.transpose(0, 2, 3, 1)  # (N, H, W, C)
    if a == 0 and b == 0:
        return xt
    N, H, W, C = xt.shape
    # Zeroed once; later calls overwrite only the interior, so the border stays zero.
    xpad = _buffer(workspace, tag, (N, H + 2 * a, W + 2 * b, C), x.dtype, zeroed=True)
    parallel_copy(xpad[:, a : a + H, b : b + W, :], xt)
    return xpad


def _windows_nhwc(x, R, S, u, v, a, b, dh, dw, P, Q, workspace=None, tag="x"):
    """A read-only ``(N, P, Q, R, S, C)`` strided view: ``[n, p, q]`` is im2col row ``(n, p, q)``."""
    xpad = _padded_nhwc(x, a, b, workspace, tag + ".pad")  # (N, H+2a, W+2b, C)
    N, C = x.shape[:2]
    sN, sH, sW, sC = xpad.strides
    return np.lib.stride_tricks.as_strided(
        xpad, shape=(N, P, Q, R, S, C), strides=(sN, u * sH, v * sW, dh * sH, dw * sW, sC), writeable=False
    )  # (N, P, Q, R, S, C)


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
        self.windows, self.taps_first, self.filled = windows, windows.shape[-1] == 1, filled
        if whole is not None:
            self.buf, self.offset = whole, True
        else:
            self.buf, self.offset = _buffer(workspace, tag, self.whole_shape(windows, block), windows.dtype), False

    @staticmethod
    def whole_shape(windows, n):
        """Buffer shape for ``n`` samples."""
        N, P, Q, R, S, C = windows.shape
        return (R * S, n * P * Q) if C == 1 else (n, P, Q, R, S, C)

    def __call__(self, i, j):
        N, P, Q, R, S, C = self.windows.shape
        start, stop = (i, j) if self.offset else (0, j - i)  # samples' place in the buffer
        rows = slice(start * P * Q, stop * P * Q)
        if self.taps_first:
            if not self.filled:
                for r in range(R):
                    for s in range(S):
                        np.copyto(self.buf[r * S + s, rows].reshape(j - i, P, Q), self.windows[i:j, :, :, r, s, 0])
            return self.buf[:, rows].T  # (rows, R*S)
        block = self.buf[start:stop]  # (j-i, P, Q, R, S, C)
        if not self.filled:
            np.copyto(block, self.windows[i:j])
        return block.reshape((j - i) * P * Q, R * S * C)


def _limit_samples(g, itemsize):
    return g.samples_per_slice(itemsize, setting("workspace_mb") * 2**20)


def _samples_per_block(per_sample_bytes, limit_samples):
    return max(1, min(limit_samples, _BLOCK_BYTES // max(1, per_sample_bytes)))


def conv2d_forward(xp, x, weight, bias, g, *, keep_cols=False, workspace=None, where="conv2d"):
    """Forward; returns ``(y, ConvColumns or None)``: the columns only for a small layer (``_KEEP_BYTES``)."""
    N, C, P, Q, K, R, S = g.N, g.C, g.P, g.Q, g.K, g.R, g.S
    w2t = weight.transpose(2, 3, 1, 0).reshape(R * S * C, K)  # (R*S*C, K)
    windows = _windows_nhwc(x, R, S, g.u, g.v, g.a, g.b, g.dh, g.dw, P, Q, workspace)  # (N, P, Q, R, S, C)
    y = np.empty((N, P, Q, K), dtype=x.dtype)  # (N, P, Q, K)
    block = _samples_per_block(P * Q * R * S * C * x.itemsize, _limit_samples(g, x.itemsize))
    keep = N * P * Q * R * S * C * x.itemsize <= _KEEP_BYTES
    whole = _buffer(workspace, "cols.whole", _Unfolder.whole_shape(windows, N), x.dtype) if keep else None

    def work(lo, hi, slot):
        unfold = _Unfolder(windows, block, workspace, f"cols.{slot}", whole=whole)
        for i in range(lo, hi, block):
            j = min(hi, i + block)
            out = y[i:j].reshape((j - i) * P * Q, K)  # (rows, K)
            np.matmul(unfold(i, j), w2t, out=out)
            if bias is not None:
                out += bias

    batch_parallel(work, N, flops=g.flops)
    saved = ConvColumns(COLUMN_LAYOUT, whole) if keep_cols and whole is not None else None
    return y.transpose(0, 3, 1, 2), saved  # (N, K, P, Q) view of (N, P, Q, K)


def conv2d_backward(xp, dy, x, weight, g, *, saved=None, has_bias=True, need_input_grad=True, workspace=None,
                    where="conv2d"):
    """Backward: ``(dx or None, dW, db or None)``; ``saved`` the forward's columns in this layout, or recompute.

    Per block of samples: ``dW += dY2.T @ cols`` and ``db += 1 @ dY2`` into
    the thread's own partial sums, and ``dx`` for those samples, either as a
    convolution of dy (stride 1, docs/derivation.md section 5) or by col2im
    tap by tap.
    """
    N, C, H, W, K, R, S, P, Q = g.N, g.C, g.H, g.W, g.K, g.R, g.S, g.P, g.Q
    u, v, a, b, dh, dw = g.u, g.v, g.a, g.b, g.dh, g.dw
    dyt = dy.transpose(0, 2, 3, 1)  # (N, P, Q, K), contiguous when dy is channels-last
    limit = _limit_samples(g, x.itemsize)
    windows = _windows_nhwc(x, R, S, u, v, a, b, dh, dw, P, Q, workspace)  # (N, P, Q, R, S, C)
    cols = saved.cols if saved is not None and saved.layout == COLUMN_LAYOUT else None
    if cols is not None and cols.shape != _Unfolder.whole_shape(windows, N):
        cols = None  # kept for another batch: unfold again
    block = _samples_per_block(P * Q * R * S * C * x.itemsize, limit)
    # Stride 1: dx as a convolution of dy, unless dy's columns (H*W*K per
    # tap) outweigh col2im's write and scatter-add of P*Q*C per tap (lenet's
    # 6->16 layer: 3136 against 2 x 600).
    as_convolution = u == 1 and v == 1 and a <= dh * (R - 1) and b <= dw * (S - 1) and H * W * K <= 2 * P * Q * C
    if need_input_grad and as_convolution:
        # dx = conv(dy padded by d(R-1)-a, rot180(W) with K and C swapped): docs/derivation.md, section 5.
        dy_windows = _windows_nhwc(
            dy, R, S, 1, 1, dh * (R - 1) - a, dw * (S - 1) - b, dh, dw, H, W, workspace, "dy"
        )  # (N, H, W, R, S, K)
        w_rot_t = weight[:, :, ::-1, ::-1].transpose(2, 3, 0, 1).reshape(R * S * K, C)  # (R*S*K, C)
        dx = np.empty((N, H, W, C), dtype=dy.dtype)  # (N, H, W, C)
        block = min(block, _samples_per_block(H * W * R * S * K * dy.itemsize, limit))
    elif need_input_grad:
        # col2im tap by tap: one GEMM per tap gives its (rows, C) block
        # contiguous, so each scatter-add moves runs of Q*C floats.
        w_taps = weight.transpose(2, 3, 0, 1).reshape(R * S, K, C)  # (R*S, K, C)
        dxpad = np.zeros((N, H + 2 * a, W + 2 * b, C), dtype=dy.dtype)  # (N, H+2a, W+2b, C)
    partial_dw, partial_db = {}, {}

    def work(lo, hi, slot):
        unfold = _Unfolder(windows, block, workspace, f"cols.{slot}", whole=cols, filled=cols is not None)
        unfold_dy = None
        if need_input_grad and as_convolution:
            unfold_dy = _Unfolder(dy_windows, block, workspace, f"dy_cols.{slot}")
        dw2 = np.zeros((K, R * S * C), dtype=x.dtype)  # (K, R*S*C)
        db = np.zeros(K, dtype=x.dtype)  # (K,)
        ones = np.ones(block * P * Q, dtype=x.dtype)
        for i in range(lo, hi, block):
            j = min(hi, i + block)
            rows = (j - i) * P * Q
            dy2 = dyt[i:j].reshape(rows, K)  # (rows, K)
            dw2 += dy2.T @ unfold(i, j)  # (K, R*S*C)
            db += ones[:rows] @ dy2  # a GEMV: NumPy's column sum of a narrow matrix is ~10x slower
            if unfold_dy is not None:
                np.matmul(unfold_dy(i, j), w_rot_t, out=dx[i:j].reshape((j - i) * H * W, C))  # (rows, C)
            elif need_input_grad:
                dcols = np.matmul(dy2[None], w_taps).reshape(R * S, j - i, P, Q, C)  # (R*S, j-i, P, Q, C)
                for r in range(R):
                    for s in range(S):
                        h0, w0 = r * dh, s * dw
                        dxpad[i:j, h0 : h0 + u * (P - 1) + 1 : u, w0 : w0 + v * (Q - 1) + 1 : v, :] += dcols[r * S + s]
        partial_dw[slot], partial_db[slot] = dw2, db

    batch_parallel(work, N, flops=(2 if need_input_grad else 1) * g.flops)
    dw2, db = partial_dw.pop(0), partial_db.pop(0)
    for slot in partial_dw:
        dw2 += partial_dw[slot]
        db += partial_db[slot]
    dweight = np.ascontiguousarray(dw2.reshape(K, R, S, C).transpose(0, 3, 1, 2))  # (K, C, R, S)
    dbias = db if has_bias else None
    if not need_input_grad:
        return None, dweight, dbias
    if as_convolution:
        return dx.transpose(0, 3, 1, 2), dweight, dbias  # (N, C, H, W) view of (N, H, W, C)
    return dxpad[:, a : a + H, b : b + W, :].transpose(0, 3, 1, 2), dweight, dbias  # (N, C, H, W) view
