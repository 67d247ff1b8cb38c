"""NumPy convolution of few input channels: unfolded along the kernel's rows only, a banded weight along its columns.

im2col copies each input value ``R*S`` times, and for a layer of few input
channels its GEMM is thin: lenet's first layer multiplies an ``(N*P*Q, 25)``
matrix by a ``(25, 6)`` one, at about an eighth of a core's GEMM speed. Here
the output row is cut into tiles of ``T`` columns, and each tile is one
product of an ``(R, T+S-1, C)`` window of the padded channels-last input,
``R`` contiguous runs of ``(T+S-1)*C`` floats, with a banded weight
``B`` of shape ``(R*(T+S-1)*C, T*K)`` (stride 1, no dilation, one group)::

    B[r, t + s, c, t, k] = w[k, c, r, s]          (zero off the band)
    y[n, p, q0 + t, k]   = sum_{r, w', c} xpad[n, p + r, q0 + w', c] * B[r, w', c, t, k]

so the input is copied ``R*(T+S-1)/T`` times instead of ``R*S``, with ``S``
folded into the band, and the GEMMs are ``T*K`` wide (lenet's first layer:
7 x 6 = 42 instead of 6).
The band costs ``(T+S-1)/S`` times the multiply-adds of im2col: worth it
only where the thin GEMM runs far slower than that (``use``). The
backward is the same band transposed: ``dY @ B.T`` gives each tile's input
gradient window, added back tile by tile; the weight gradient is ``X.T @
dY`` summed along the band's diagonals (``t + s`` fixed). The
derivation, in the blog's notation, is docs/derivation.md section 5b.

Threads take contiguous parts of the batch (:func:`.parallel.batch_parallel`)
and unfold a block of samples at a time into their own buffer. The memory
layout is the caller's (:mod:`.conv`): ``xpad`` is the zero-padded
channels-last input, ``(N, H+2a, W+2b, C)``.
"""

from __future__ import annotations

import numpy as np

from .parallel import batch_parallel

__all__ = ["use", "tile_width", "forward", "backward"]

# One block's unfolded input (R rows of every tile); a few MB stays in L2/L3 here.
_BLOCK_BYTES = 2 << 20
# Layers of at most this many input and output channels run here (2 threads,
# batch 128, forward and backward: lenet's 1->6 and 6->16 5x5 layers 1.5x
# and 1.4x, resnet20's 3->16 3x3 input layer 1.3x as fast as im2col; not
# resnet20's 16->16, 0.88x, nor vgg-small's 3->32 forward, 0.72x).
_MAX_C = 8
_MAX_K = 16
# ... and whose kernel rows are at least this many floats (C*S): im2col's
# one-channel 3x3 layers are fast enough (the digits net's 1->16 on 8x8
# images: banded 0.72x at batch 128, 0.91x at 2048).
_MIN_CS = 4
# ... and whose im2col matrix would be at least this large: on smaller
# batches the band's extra multiply-adds are not made up for (lenet's
# training step at batch 32, both layers banded: 0.95x; at 128: 1.20x).
_MIN_COLUMN_BYTES = 3 << 20
# As in .conv: copying a byte takes about as long as 10 GEMM FLOPs, so the unfolding counts for threads too.
_UNFOLD_FLOPS_PER_BYTE = 10
# The band's width T: a divisor of Q, the widest whose multiply-adds stay within this factor of im2col's
# (2 threads: lenet's first layer fastest at T = 4-14 of 28, its second at T = 5 of 10).
_MAX_OVERHEAD = 2.2


def use(g, itemsize: int) -> bool:
    """Whether the banded product runs this convolution: stride 1, no dilation, one group, thin GEMMs, a large batch.

    Also a tile at least ``S-1`` wide must divide ``Q``: narrower tiles make
    GEMMs as thin as im2col's (lenet's second layer, 2 threads: tiles of 2
    no faster than im2col, of 5 1.4x as fast).
    """
    return (
        g.G == 1 and g.u == g.v == 1 and g.dh == g.dw == 1 and g.S > 1
        and g.C <= _MAX_C and g.K <= _MAX_K and g.C * g.S >= _MIN_CS and tile_width(g) >= g.S - 1
        and g.N * g.P * g.Q * g.C * g.R * g.S * itemsize >= _MIN_COLUMN_BYTES
    )


def tile_width(g) -> int:
    """``T``: the largest divisor of ``Q`` with ``(T+S-1)/S <= _MAX_OVERHEAD``, or 1."""
    return max(t for t in range(1, g.Q + 1) if g.Q % t == 0 and (t + g.S - 1 <= _MAX_OVERHEAD * g.S or t == 1))


def _band(weight, g, T, bias=None):
    """``(K, C, R, S)`` as the banded ``(R*(T+S-1)*C, T*K)``: ``B[r, t+s, c, t, k] = w[k, c, r, s]``.

    With ``bias``, one more row, the bias of each ``(t, k)``, for the unfolded rows' ones column.
    """
    R, S, C, K = g.R, g.S, g.C, g.K
    inner = R * (T + S - 1) * C
    out = np.zeros((inner + (bias is not None), T * K), dtype=weight.dtype)
    band = out[:inner].reshape(R, T + S - 1, C, T, K)  # (R, T+S-1, C, T, K)
    w_rsck = weight.transpose(2, 3, 1, 0)  # (R, S, C, K)
    for t in range(T):
        band[:, t : t + S, :, t, :] = w_rsck
    if bias is not None:
        out[inner] = np.tile(bias, T)
    return out


def _windows(xpad, g, T):
    """A read-only ``(N, P, Q/T, R, T+S-1, C)`` view: ``[n, p, i]`` is the rows tile ``i`` of row ``p`` reads."""
    sN, sH, sW, sC = xpad.strides
    return np.lib.stride_tricks.as_strided(
        xpad, shape=(g.N, g.P, g.Q // T, g.R, T + g.S - 1, g.C), strides=(sN, sH, T * sW, sH, sW, sC),
        writeable=False,
    )


def _samples_per_block(g, T, itemsize):
    per_sample = g.P * (g.Q // T) * g.R * (T + g.S - 1) * g.C * itemsize
    return max(1, _BLOCK_BYTES // max(1, per_sample))


def _flops(g, T, itemsize):
    """One banded product's FLOPs and its unfolding's weight (for the thread pool's threshold)."""
    unfolded = g.N * g.P * (g.Q // T) * g.R * (T + g.S - 1) * g.C  # elements
    return 2 * unfolded * T * g.K + _UNFOLD_FLOPS_PER_BYTE * unfolded * itemsize


def _scratch(shape, dtype, tag):
    return np.empty(shape, dtype=dtype)


def forward(xpad, weight, bias, g, buffer=_scratch):
    """``y`` as channels-last ``(N, P, Q, K)`` from the padded channels-last ``xpad``.

    ``buffer(shape, dtype, tag)`` gives the unfolding threads' scratch arrays
    (:mod:`.conv` passes its workspace's, reused across calls).
    """
    N, P, Q, K = g.N, g.P, g.Q, g.K
    T = tile_width(g)
    band = _band(weight, g, T, bias)  # (R*(T+S-1)*C [+ 1], T*K)
    windows = _windows(xpad, g, T)  # (N, P, Q/T, R, T+S-1, C)
    y = np.empty((N, P, Q, K), dtype=xpad.dtype)  # (N, P, Q, K)
    block = _samples_per_block(g, T, xpad.itemsize)

    def work(lo, hi, slot):
        unfold = _unfolder(buffer, windows, block, lo, hi, slot, ones=bias is not None)
        for i in range(lo, hi, block):
            j = min(hi, i + block)
            rows = (j - i) * P * (Q // T)
            np.matmul(unfold(i, j), band, out=y[i:j].reshape(rows, T * K))  # (rows, T*K)

    batch_parallel(work, N, flops=_flops(g, T, xpad.itemsize))
    return y


def _unfolder(buffer, windows, block, lo, hi, slot, *, ones):
    """``unfold(i, j)``: samples ``i:j``'s rows ``(rows, R*(T+S-1)*C [+ 1])`` in this thread's buffer.

    With ``ones`` each row ends in a 1, which meets the band's bias row: the
    forward adds the bias in its GEMM and the backward's ``X.T @ dY`` sums
    the bias gradient, with no pass of their own over the output.
    """
    inner = windows.shape[3] * windows.shape[4] * windows.shape[5]  # R*(T+S-1)*C
    buf = buffer((min(block, hi - lo),) + windows.shape[1:3] + (inner + ones,), windows.dtype, f"banded.{slot}")
    if ones:
        buf[..., inner] = 1

    def unfold(i, j):
        x_block = buf[: j - i]
        np.copyto(x_block[..., :inner].reshape((j - i,) + windows.shape[1:]), windows[i:j])
        return x_block.reshape(-1, inner + ones)

    return unfold


def backward(dyt, xpad, weight, g, has_bias, need_input_grad, buffer=_scratch):
    """``(dxpad or None, dW, db or None)`` from channels-last ``dyt`` ``(N, P, Q, K)`` and the padded ``xpad``."""
    N, P, Q, K, R, S, C = g.N, g.P, g.Q, g.K, g.R, g.S, g.C
    T = tile_width(g)
    Tw, tiles = T + S - 1, Q // T
    band = _band(weight, g, T)  # (R*Tw*C, T*K)
    windows = _windows(xpad, g, T)  # (N, P, Q/T, R, Tw, C)
    block = _samples_per_block(g, T, xpad.itemsize)
    dxpad = np.zeros(xpad.shape, dtype=dyt.dtype) if need_input_grad else None  # (N, H+2a, W+2b, C)
    partial = {}

    def work(lo, hi, slot):
        unfold = _unfolder(buffer, windows, block, lo, hi, slot, ones=has_bias)
        dband = np.zeros((band.shape[0] + has_bias, T * K), dtype=xpad.dtype)  # (R*Tw*C [+ 1], T*K)
        for i in range(lo, hi, block):
            j = min(hi, i + block)
            rows = (j - i) * P * tiles
            dy2 = dyt[i:j].reshape(rows, T * K)  # (rows, T*K)
            dband += unfold(i, j).T @ dy2  # with has_bias, its last row the sums of dy2's columns
            if dxpad is not None:
                dwin = (dy2 @ band.T).reshape(j - i, P, tiles, R, Tw, C)  # each tile's window gradient
                for r in range(R):
                    for t in range(tiles):  # in turn: a tile's last S-1 columns are the next one's first
                        dxpad[i:j, r : r + P, t * T : t * T + Tw, :] += dwin[:, :, t, r]
        partial[slot] = dband

    batch_parallel(work, N, flops=(3 if need_input_grad else 2) * _flops(g, T, xpad.itemsize))
    dband = partial.pop(0)
    for slot in partial:
        dband += partial[slot]
    dband5 = dband[: band.shape[0]].reshape(R, Tw, C, T, K)
    dw_rsck = np.zeros((R, S, C, K), dtype=dband.dtype)
    for t in range(T):  # the band's diagonals: w' = t + s
        dw_rsck += dband5[:, t : t + S, :, t, :]
    dweight = np.ascontiguousarray(dw_rsck.transpose(3, 2, 0, 1))  # (K, C, R, S)
    dbias = dband[-1].reshape(T, K).sum(axis=0) if has_bias else None
    return dxpad, dweight, dbias
