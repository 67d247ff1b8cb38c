"""NumPy pooling on channels-last memory: max and average pooling tap by tap, global average pooling as a GEMV.

Activations are (N, C, H, W) views of (N, H, W, C) memory (see :mod:`.conv`),
and every output here is one too. Max and average pooling read the same
taps as the reference from the channels-last *frame* (the input padded by
``a, b`` and, under ``ceil_mode``, grown to hold the last window; see
:class:`~portable_cnn.geometry.PoolGeometry`), accumulate in place instead
of stacking an (N, C, P, Q, R*S) copy, and split the batch over the thread
pool. Max pooling keeps a running maximum updated where a tap is strictly
greater, so the first maximum wins; its argmax is the tap index ``r*S + s``,
as the reference's, in int8 for windows of up to 127 taps (written once,
read ``R*S`` times) and int64 above. Global average pooling sums each
sample's ``H*W`` rows of ``C`` channels with one BLAS product.
"""

from __future__ import annotations

import numpy as np

from .parallel import batch_parallel, parallel_copy

__all__ = [
    "max_pool2d_forward",
    "max_pool2d_relu_forward",
    "max_pool2d_backward",
    "avg_pool2d_forward",
    "avg_pool2d_backward",
    "global_avg_pool2d_forward",
    "global_avg_pool2d_backward",
]


def _nhwc_taps(g):
    """Index tuples into the (N, frame_height, frame_width, C) frame, one (N, P, Q, C) tap per ``(r, s)``, row-major."""
    for r in range(g.R):
        for s in range(g.S):
            h0, w0 = r * g.dh, s * g.dw
            rows, cols = slice(h0, h0 + g.u * (g.P - 1) + 1, g.u), slice(w0, w0 + g.v * (g.Q - 1) + 1, g.v)
            yield slice(None), rows, cols, slice(None)


def _nhwc_frame(x, g, fill: float):
    """``x`` as (N, frame_height, frame_width, C): a view when there is no padding to add, else a filled copy."""
    xt = x.transpose(0, 2, 3, 1)  # (N, H, W, C)
    if (g.frame_height, g.frame_width) == (g.H, g.W):
        return xt
    frame = np.full((g.N, g.frame_height, g.frame_width, g.C), fill, dtype=x.dtype)
    frame[:, g.a : g.a + g.H, g.b : g.b + g.W, :] = xt
    return frame  # (N, frame_height, frame_width, C)


def _crop(frame, g):
    """The input's part of a (N, frame_height, frame_width, C) frame, as an (N, C, H, W) view."""
    return frame[:, g.a : g.a + g.H, g.b : g.b + g.W, :].transpose(0, 3, 1, 2)  # (N, C, H, W)


def _frame_bytes(g, dtype) -> int:
    """The bytes of the (N, frame_height, frame_width, C) frame a pooling reads or writes: its size for the thread pool.

    Below about 1 MB a thread is not worth waking: in a training step,
    lenet's second pooling (0.8 MB of input at batch 128) took 0.37 ms on one
    thread and 0.40 on two, its first (2.4 MB) 1.50 against 0.78; at batch 8
    every pooling of lenet now stays on one thread.
    """
    return g.N * g.frame_height * g.frame_width * g.C * np.dtype(dtype).itemsize


def _windows_disjoint(g) -> bool:
    """No two windows share an element (stride at least the dilated kernel): each tap writes elements of its own."""
    return g.u >= g.dh * (g.R - 1) + 1 and g.v >= g.dw * (g.S - 1) + 1


def _tiles(g) -> bool:
    """Windows that tile the input's top-left ``P*R x Q*S`` corner: stride = kernel, no dilation, padding or ceil frame.

    Then each output is the maximum of an ``R x S`` block of ``x``, and
    :func:`_tiled_max` takes it a row of blocks at a time.
    """
    return ((g.u, g.v) == (g.R, g.S) and (g.dh, g.dw) == (1, 1)
            and (g.frame_height, g.frame_width) == (g.H, g.W))


def _tiled_max(xt, g, out):
    """The maximum of each ``R x S`` block of ``xt`` (N, H, W, C) into ``out`` (N, P, Q, C).

    Rows first: the maximum over the ``R`` rows of a block is an elementwise
    maximum of whole image rows (runs of ``W*C`` contiguous floats, one
    NumPy inner loop each), which leaves ``S`` taps of ``C`` floats to
    combine per output instead of ``R*S``. The maximum alone of lenet's
    first pooling (64 samples of 28x28x6, one thread): 0.25 ms against 0.38
    tap by tap.
    """
    n, (P, Q, R, S) = xt.shape[0], (g.P, g.Q, g.R, g.S)
    rows = xt[:, : P * R].reshape(n, P, R, g.W * g.C)  # (n, P, R, W*C)
    if R == 1:
        by_row = rows[:, :, 0]
    else:
        by_row = np.maximum(rows[:, :, 0], rows[:, :, 1])  # (n, P, W*C)
        for r in range(2, R):
            np.maximum(by_row, rows[:, :, r], out=by_row)
    blocks = by_row.reshape(n, P, g.W, g.C)[:, :, : Q * S].reshape(n, P, Q, S, g.C)  # (n, P, Q, S, C)
    np.copyto(out, blocks[:, :, :, 0])
    for s in range(1, S):
        np.maximum(out, blocks[:, :, :, s], out=out)


def max_pool2d_forward(xp, x, g):
    """``(y, argmax)`` as (N, C, P, Q) views of channels-last memory."""
    return _max_pool(x, g, relu=False)


def max_pool2d_relu_forward(xp, x, g):
    """``(relu(y), argmax)``, argmax ``-1`` where ``y`` is not positive; each thread's block while it is in cache.

    The ReLU that follows a max pooling in lenet and vgg-small (section 7.4
    of docs/derivation.md), fused: no pass of its own over the output
    forward, and none backward, where :func:`max_pool2d_backward` sends
    nothing from argmax ``-1``.
    """
    return _max_pool(x, g, relu=True)


def _relu_in_place(best, argmax):
    """``best = max(best, 0)`` (NaN stays NaN, as :mod:`.activation`); ``argmax = -1`` where ``best`` is not positive.

    The argmax as ``(argmax + 1) * passes - 1`` in place: three integer
    ufuncs, about 10x faster than ``np.copyto(where=)`` on int8 here.
    """
    passes = np.greater(best, 0)
    np.add(argmax, 1, out=argmax)
    np.multiply(argmax, passes, out=argmax)
    np.subtract(argmax, 1, out=argmax)
    np.maximum(best, best.dtype.type(0), out=best)


def _max_pool(x, g, relu):
    frame = _nhwc_frame(x, g, -np.inf)  # (N, frame_height, frame_width, C)
    best = np.empty((g.N, g.P, g.Q, g.C), dtype=x.dtype)  # (N, P, Q, C)
    index_dtype = np.int8 if g.taps <= 127 else np.int64
    argmax = np.zeros((g.N, g.P, g.Q, g.C), dtype=index_dtype)  # (N, P, Q, C)
    # Rows of W*C contiguous floats only in channels-last memory (any stride goes with one channel).
    tiles = _tiles(g) and (g.C == 1 or frame.strides[2] == g.C * frame.strides[3])

    def work(lo, hi, slot):  # each thread pools its own samples
        taps = list(_nhwc_taps(g))
        if tiles:
            _tiled_max(frame[lo:hi], g, best[lo:hi])
            # The first tap equal to the maximum, found from the last tap
            # back: index k + (0 if tap k is the maximum else the index
            # found for taps after k), as "k + below * (1 + later)" in int8.
            # A window holding NaN has a NaN maximum and sends its
            # gradient to its first tap.
            later = argmax[lo:hi]  # zeros: the last tap's offset
            for k in range(g.taps - 2, -1, -1):
                below = np.less(frame[lo:hi][taps[k]], best[lo:hi])
                np.add(later, 1, out=later)
                np.multiply(later, below, out=later)
        else:
            np.copyto(best[lo:hi], frame[lo:hi][taps[0]])
            for k in range(1, len(taps)):
                tap = frame[lo:hi][taps[k]]
                # Taps come in increasing k, so "set k where this tap is strictly
                # greater" is a maximum with k * mask: elementwise ufuncs only,
                # several times faster than boolean-mask assignment or np.where.
                np.maximum(argmax[lo:hi], np.multiply(tap > best[lo:hi], k, dtype=index_dtype), out=argmax[lo:hi])
                np.maximum(best[lo:hi], tap, out=best[lo:hi])
        if relu:
            _relu_in_place(best[lo:hi], argmax[lo:hi])

    batch_parallel(work, g.N, nbytes=_frame_bytes(g, x.dtype))
    return best.transpose(0, 3, 1, 2), argmax.transpose(0, 3, 1, 2)  # (N, C, P, Q) views


def max_pool2d_backward(xp, dy, argmax, g):
    """``dx`` (N, C, H, W), a view of channels-last memory; argmax ``-1`` sends nothing."""
    dyt, argt = dy.transpose(0, 2, 3, 1), argmax.transpose(0, 2, 3, 1)  # (N, P, Q, C)
    disjoint = _windows_disjoint(g)
    # Windows that tile the whole input write every element below: no zeroing pass.
    covered = _tiles(g) and (g.P * g.R, g.Q * g.S) == (g.H, g.W)
    frame = (np.empty if covered else np.zeros)((g.N, g.frame_height, g.frame_width, g.C), dtype=dy.dtype)

    def work(lo, hi, slot):  # each thread routes its own samples' gradients
        for k, index in enumerate(_nhwc_taps(g)):
            # A product, not np.where: the same result, several times faster.
            if disjoint:
                np.multiply(dyt[lo:hi], argt[lo:hi] == k, out=frame[lo:hi][index])
            else:
                frame[lo:hi][index] += dyt[lo:hi] * (argt[lo:hi] == k)

    batch_parallel(work, g.N, nbytes=_frame_bytes(g, dy.dtype))
    return _crop(frame, g)


def _nhwc_divisor(g, dtype):
    """The average's divisor: a Python int when every window shares it, else a (P, Q, 1) array for (N, P, Q, C)."""
    uniform = g.uniform_divisor
    if uniform is not None:
        return uniform
    rows, cols = g.avg_divisors()
    return np.asarray(rows, dtype=dtype)[:, None, None] * np.asarray(cols, dtype=dtype)[None, :, None]  # (P, Q, 1)


def avg_pool2d_forward(xp, x, g):
    """``y`` (N, C, P, Q), a view of channels-last memory: the window sums (padding as 0) over their divisors."""
    frame = _nhwc_frame(x, g, 0.0)  # (N, frame_height, frame_width, C)
    total = np.empty((g.N, g.P, g.Q, g.C), dtype=x.dtype)  # (N, P, Q, C)
    divisor = _nhwc_divisor(g, x.dtype)

    def work(lo, hi, slot):  # each thread pools its own samples
        taps = _nhwc_taps(g)
        np.copyto(total[lo:hi], frame[lo:hi][next(taps)])
        for index in taps:
            total[lo:hi] += frame[lo:hi][index]
        np.divide(total[lo:hi], divisor, out=total[lo:hi])

    batch_parallel(work, g.N, nbytes=_frame_bytes(g, x.dtype))
    return total.transpose(0, 3, 1, 2)  # (N, C, P, Q) view


def avg_pool2d_backward(xp, dy, g):
    """``dx`` (N, C, H, W), a view of channels-last memory: each window's ``dy`` over its divisor, on each tap."""
    dyt = dy.transpose(0, 2, 3, 1)  # (N, P, Q, C)
    frame = np.zeros((g.N, g.frame_height, g.frame_width, g.C), dtype=dy.dtype)  # (N, frame_height, frame_width, C)
    divisor = _nhwc_divisor(g, dy.dtype)
    disjoint = _windows_disjoint(g)

    def work(lo, hi, slot):  # each thread spreads its own samples' gradients
        share = dyt[lo:hi] / divisor  # (n, P, Q, C)
        for index in _nhwc_taps(g):
            if disjoint:
                np.copyto(frame[lo:hi][index], share)
            else:
                frame[lo:hi][index] += share

    batch_parallel(work, g.N, nbytes=_frame_bytes(g, dy.dtype))
    return _crop(frame, g)


def global_avg_pool2d_forward(xp, x, g):
    """``y`` (N, C, 1, 1): each sample's mean over ``H, W``, as a GEMV on channels-last memory."""
    N, C, H, W = g.x_shape
    xt = x.transpose(0, 2, 3, 1)  # (N, H, W, C)
    if not xt.flags.c_contiguous:  # not channels-last: NumPy's reduction reads that layout well enough
        return np.mean(x, axis=(2, 3), keepdims=True)
    # One (1, H*W) @ (H*W, C) product per sample: BLAS sums the rows of C
    # channels 3-6x faster than np.mean over the two strided axes for
    # CIFAR-sized layers, as fast where both wait on memory (7x7x1024).
    ones = np.ones((1, H * W), dtype=x.dtype)
    total = np.matmul(ones, xt.reshape(N, H * W, C))  # (N, 1, C)
    return (total / (H * W)).reshape(N, C, 1, 1)  # (N, C, 1, 1)


def global_avg_pool2d_backward(xp, dy, g):
    """``dx`` (N, C, H, W), a view of channels-last memory: ``dy / (H*W)`` at every position."""
    N, C, H, W = g.x_shape
    dx = np.empty((N, H, W, C), dtype=dy.dtype)  # (N, H, W, C)
    parallel_copy(dx, dy.reshape(N, 1, 1, C) / (H * W))  # (N, C, 1, 1) read as (N, 1, 1, C): the same order
    return dx.transpose(0, 3, 1, 2)  # (N, C, H, W) view
