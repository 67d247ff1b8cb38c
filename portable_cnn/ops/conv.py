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

import os

import numpy as np

from .. import backend
from . import _cupy
from ._checks import check_float, check_ndim, namespace_of, out_size, pair
from ._parallel import batch_parallel, parallel_copy
from ._windows import pad2d, scatter_add_taps, tap_slices

__all__ = [
    "conv2d",
    "conv2d_backward",
    "im2col",
    "col2im",
    "conv2d_geometry",
    "set_workspace_limit",
    "get_workspace_limit",
]


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
    if backend.is_cupy(xp) and _cupy.supports(x.dtype):
        return _cupy.im2col(x, R, S, u, v, a, b, dh, dw, P, Q)  # one kernel, same layout
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
    if backend.is_cupy(xp) and _cupy.supports(cols.dtype):
        return _cupy.col2im(cols, x_shape, R, S, u, v, a, b, dh, dw, P, Q)  # a gather: no atomics, deterministic
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


_workspace_limit = int(float(os.environ.get("PORTABLE_CNN_WORKSPACE_MB", "1024")) * 2**20)


def set_workspace_limit(megabytes: float) -> None:
    """Bound the im2col matrix of one convolution call to ``megabytes``.

    A batch whose matrix would be larger is convolved in slices of the batch
    (the result is the same), so a large batch does not run out of memory.
    The default is 1024 MB, or the ``PORTABLE_CNN_WORKSPACE_MB`` environment
    variable. At least one sample is always processed at a time.
    """
    global _workspace_limit
    if not megabytes > 0:
        raise ValueError(f"set_workspace_limit: expected a positive number of megabytes, got {megabytes!r}")
    _workspace_limit = int(megabytes * 2**20)


def get_workspace_limit() -> float:
    """The current im2col workspace limit in megabytes."""
    return _workspace_limit / 2**20


def _batch_chunk(x_shape, w_shape, P, Q, dtype) -> int:
    """How many samples fit one im2col matrix under the workspace limit."""
    N, C, H, W = x_shape
    K, _, R, S = w_shape
    itemsize = 8 if "64" in str(dtype) else 4
    # The stride-1 input gradient unfolds dy, (H*W, R*S*K) per sample.
    per_sample = max(P * Q * C, H * W * K) * R * S * itemsize
    return max(1, min(N, _workspace_limit // per_sample))


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


@_cupy.explain_out_of_memory
def conv2d(
    x, weight, bias=None, stride=1, padding=0, dilation=1, *, return_cols=False, workspace=None, where="conv2d"
):
    """2-D cross-correlation, as ``torch.nn.functional.conv2d``.

    Parameters
    ----------
    x : array, shape (N, C, H, W), real floating
    weight : array, shape (K, C, R, S)
    bias : array, shape (K,), optional
    stride, padding, dilation : int or pair of ints
    return_cols : bool
        Also return the im2col matrix so the backward can reuse it.
    workspace : dict, optional
        Scratch buffers reused from call to call (a layer passes its own).
        The returned ``cols`` then lives in it and is overwritten by the next
        call with the same workspace.
    where : str
        Name used in error messages (layers pass their own).

    Returns
    -------
    y : array, shape (N, K, P, Q)
    cols : array, only with ``return_cols``
        The im2col matrix ``(N*P*Q, C*R*S)``, opaque: pass it to
        :func:`conv2d_backward` of the same backend. ``None`` where the
        columns are not kept: NumPy's cache-blocked fast path recomputes
        them block by block, and a batch split by the workspace limit too.

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
    chunk = _batch_chunk(x.shape, weight.shape, P, Q, x.dtype)
    if chunk < N and not backend.is_numpy(xp):  # NumPy's fast path blocks the batch itself
        # The whole batch's im2col matrix would exceed the workspace limit:
        # convolve slices of the batch; the backward recomputes their columns.
        y = xp.concat(
            [
                conv2d(x[i : i + chunk, ...], weight, bias, stride, padding, dilation, workspace=workspace, where=where)
                for i in range(0, N, chunk)
            ],
            axis=0,
        )  # (N, K, P, Q)
        return (y, None) if return_cols else y
    if backend.is_numpy(xp):
        y, cols = _conv2d_numpy(x, weight, bias, (u, v), (a, b), (dh, dw), P, Q, workspace)
        return (y, cols) if return_cols else y
    cols = im2col(x, (R, S), (u, v), (a, b), (dh, dw))  # (N*P*Q, C*R*S)
    w2 = xp.reshape(weight, (K, C * R * S))  # (K, C*R*S)
    y = cols @ w2.T  # (N*P*Q, K)
    if bias is not None:
        y = y + bias
    y = xp.permute_dims(xp.reshape(y, (N, P, Q, K)), (0, 3, 1, 2))  # (N, K, P, Q)
    return (y, cols) if return_cols else y


@_cupy.explain_out_of_memory
def conv2d_backward(
    dy, x, weight, stride=1, padding=0, dilation=1, *, cols=None, has_bias=True, need_input_grad=True,
    workspace=None, where="conv2d",
):
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
    need_input_grad : bool
        Whether to compute ``dx`` (else ``None``): the first layer of a
        network needs no gradient for its input, which saves a GEMM and col2im.
    workspace : dict, optional
        Scratch buffers, as for :func:`conv2d` (use the same dict).

    Returns
    -------
    dx : array, shape (N, C, H, W), or None
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
    chunk = _batch_chunk(x.shape, weight.shape, P, Q, x.dtype)
    if cols is None and chunk < N and not backend.is_numpy(xp):
        parts = [
            conv2d_backward(
                dy[i : i + chunk, ...], x[i : i + chunk, ...], weight, stride, padding, dilation,
                has_bias=has_bias, need_input_grad=need_input_grad, workspace=workspace, where=where,
            )
            for i in range(0, N, chunk)
        ]
        dx = xp.concat([part[0] for part in parts], axis=0) if need_input_grad else None  # (N, C, H, W)
        _, dweight, dbias = parts[0]  # (K, C, R, S), (K,)
        for _, dw_part, db_part in parts[1:]:
            dweight = dweight + dw_part
            dbias = dbias + db_part if has_bias else None
        return dx, dweight, dbias
    if backend.is_numpy(xp):
        return _conv2d_backward_numpy(
            dy, x, weight, (u, v), (a, b), (dh, dw), P, Q, cols, has_bias, need_input_grad, workspace
        )
    if cols is None:
        cols = im2col(x, (R, S), (u, v), (a, b), (dh, dw))  # (N*P*Q, C*R*S)
    dy2 = xp.reshape(xp.permute_dims(dy, (0, 2, 3, 1)), (N * P * Q, K))  # (N*P*Q, K)
    w2 = xp.reshape(weight, (K, C * R * S))  # (K, C*R*S)
    dweight = xp.reshape(dy2.T @ cols, (K, C, R, S))  # (K, C*R*S) -> (K, C, R, S)
    dbias = _column_sums(xp, dy2) if has_bias else None  # (K,)
    if not need_input_grad:
        return None, dweight, dbias
    dcols = dy2 @ w2  # (N*P*Q, C*R*S)
    dx = col2im(dcols, (N, C, H, W), (R, S), (u, v), (a, b), (dh, dw))  # (N, C, H, W)
    return dx, dweight, dbias


def _column_sums(xp, a):
    """Sums of the columns of the tall 2-D ``a`` (the bias gradient): on CuPy a GEMV, ``ones @ a``, else ``sum``.

    CuPy's ``sum(axis=0)`` of vgg-small's (262144, 32) output gradients took
    about 4 ms per layer on an H200, the GEMV 0.04 ms
    (``benchmarks/gpu_conv_parts.py``, docs/benchmarks.md).
    """
    if backend.is_cupy(xp):
        ones = xp.ones_like(a[:, 0])  # (N*P*Q,), a's dtype and device
        return ones @ a  # (N*P*Q,) @ (N*P*Q, K) -> (K,)
    return xp.sum(a, axis=0)


# --- NumPy fast path ------------------------------------------------------
# Three choices make NumPy convolutions fast here:
#
# * Channels-last memory. conv2d returns an (N, K, P, Q) *view* of an
#   (N, P, Q, K) GEMM result, and the fast paths read their input through
#   ``x.transpose(0, 2, 3, 1)``, which is then contiguous. In that layout an
#   im2col row is R runs of S*C contiguous floats (not C*R runs of S), and
#   the GEMM output needs no transpose copy. Columns are ordered (R, S, C);
#   the small weight is reordered to match.
# * Data parallelism over the batch (``batch_parallel``): each core unfolds
#   and multiplies its own half of the batch with single-threaded BLAS, so
#   both cores copy and multiply at once instead of taking turns.
# * Cache blocking: each core works a few samples at a time, so a block's
#   im2col matrix (a few MB) is written and read back by the GEMM in cache;
#   the whole batch's would be 150 MB for vgg-small. The backward recomputes
#   the blocks rather than keeping them, which also bounds memory.
# Together about 1.5-2x faster than one whole-batch im2col and one GEMM on
# both cores (vgg-small layers, 2 cores; benchmarks/README.md).

_BLOCK_BYTES = 4 << 20  # one block's im2col matrix; 1-8 MB measured alike here


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
        N, P, Q, R, S, C = windows.shape
        self.windows, self.taps_first, self.filled = windows, C == 1, filled
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


# A convolution whose whole im2col matrix is at most this large keeps it from
# the forward for the backward (lenet's: 10 and 8 MB) instead of unfolding
# twice; larger ones (vgg-small's: up to 150 MB) recompute blocks in cache.
_KEEP_BYTES = 16 << 20


def _samples_per_block(per_sample_bytes, limit_chunk):
    return max(1, min(limit_chunk, _BLOCK_BYTES // max(1, per_sample_bytes)))


def _conv2d_numpy(x, weight, bias, stride, padding, dilation, P, Q, workspace=None):
    """Forward: channels-last, data-parallel, cache-blocked; returns ``(y, cols)``, ``cols`` None when large."""
    (u, v), (a, b), (dh, dw) = stride, padding, dilation
    N, C = x.shape[:2]
    K, _, R, S = weight.shape
    w2t = weight.transpose(2, 3, 1, 0).reshape(R * S * C, K)  # (R*S*C, K)
    windows = _windows_nhwc(x, R, S, u, v, a, b, dh, dw, P, Q, workspace)  # (N, P, Q, R, S, C)
    y = np.empty((N, P, Q, K), dtype=x.dtype)  # (N, P, Q, K)
    block = _samples_per_block(P * Q * R * S * C * x.itemsize, _batch_chunk(x.shape, weight.shape, P, Q, x.dtype))
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

    batch_parallel(work, N, flops=2 * N * P * Q * K * R * S * C)
    return y.transpose(0, 3, 1, 2), whole  # (N, K, P, Q) view of (N, P, Q, K); the columns or None


def _conv2d_backward_numpy(
    dy, x, weight, stride, padding, dilation, P, Q, cols, has_bias, need_input_grad, workspace=None
):
    """Backward: channels-last, data-parallel, cache-blocked; ``cols`` from the forward, or None to recompute.

    Per block of samples: ``dW += dY2.T @ cols`` and ``db += 1 @ dY2`` into
    the thread's own partial sums, and ``dx`` for those samples, either as a
    convolution of dy (stride 1, see :func:`conv2d_backward`) or by col2im.
    """
    (u, v), (a, b), (dh, dw) = stride, padding, dilation
    N, C, H, W = x.shape
    K, _, R, S = weight.shape
    dyt = dy.transpose(0, 2, 3, 1)  # (N, P, Q, K), contiguous when dy is channels-last
    limit_chunk = _batch_chunk(x.shape, weight.shape, P, Q, x.dtype)
    windows = _windows_nhwc(x, R, S, u, v, a, b, dh, dw, P, Q, workspace)  # (N, P, Q, R, S, C)
    block = _samples_per_block(P * Q * R * S * C * x.itemsize, limit_chunk)
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
        block = min(block, _samples_per_block(H * W * R * S * K * dy.itemsize, limit_chunk))
    elif need_input_grad:
        # col2im tap by tap: one GEMM per tap gives its (rows, C) block
        # contiguous, so each scatter-add moves runs of Q*C floats.
        w_taps = weight.transpose(2, 3, 0, 1).reshape(R * S, K, C)  # (R*S, K, C)
        dxpad = np.zeros((N, H + 2 * a, W + 2 * b, C), dtype=dy.dtype)  # (N, H+2a, W+2b, C)
    partial_dw, partial_db = {}, {}

    if cols is not None and tuple(cols.shape) != _Unfolder.whole_shape(windows, N):
        cols = None  # not this path's layout (an array from another backend's forward): recompute

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

    batch_parallel(work, N, flops=(4 if need_input_grad else 2) * N * P * Q * K * R * S * C)
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
