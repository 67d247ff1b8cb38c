"""NumPy batch normalisation: a sample per row, per-channel vectors tiled along the row, blocks in cache, on every core.

Layout: an ``(N, C, *spatial)`` array is handled as ``(N, F)`` rows, one
sample each, ``F = C * S`` (``S`` the spatial size) in the input's memory
order: ``(S, C)`` for a view of channels-last memory (what a NumPy
convolution returns: :mod:`.conv`), ``(C, S)`` otherwise (an array in
neither layout is copied into the second). Outputs come back as views of the
same layout, so a channels-last network stays channels-last.

Three things make it faster than the reference here:

* No broadcast over a short axis. In channels-last memory a per-channel
  vector broadcast against ``(N, H, W, C)`` runs NumPy's inner loop over only
  ``C`` values (16 in ResNet-20's first stage), about 8x slower than a copy.
  Each per-channel vector is instead tiled to the row's length ``F`` once,
  so every elementwise pass is ``(n, F) op (F,)`` with a long inner loop.
* Per-channel sums as GEMVs over the long axis: ``ones(n*S) @ (n*S, C)`` or
  ``(n*C, S) @ ones(S)``; ``x.sum(axis=(0, 2, 3))`` over channels-last
  memory is about 20x slower.
* Cache blocking, and data parallelism for large arrays
  (:func:`.parallel.batch_parallel`): each core sweeps its own samples a
  block at a time, so a block's temporaries (``x - K``, ``dy * xhat``) stay
  in its cache.

The forward takes one sweep over ``x`` for the statistics (shifted sums, see
:func:`batch_norm_forward`) and one to normalise; the backward one for its two
sums and one for ``dx`` (docs/derivation.md, section 12).
"""

from __future__ import annotations

import math

import numpy as np

from ..reference.norm import running_statistics
from .parallel import _MIN_FLOPS_PER_THREAD, batch_parallel

__all__ = ["batch_norm_forward", "batch_norm_backward"]

_BLOCK_BYTES = 1 << 19  # a block of rows and its temporary stay in a core's L2 cache
# A thread per 8 MB of rows: on the 2-core VM, at 2-8 MB (ResNet-20's float32 activations) two threads
# were slower than one (medians and minima of repeats), one core running these passes from cache at
# several GB/s. Larger arrays (float64, bigger batches) are split.
_BYTES_PER_THREAD = 8 << 20


class _Rows:
    """``(N, C, *spatial)`` arrays as ``(N, F)`` rows in the memory order of the first one seen."""

    def __init__(self, a):
        self.shape = tuple(a.shape)
        self.C, self.S = a.shape[1], math.prod(a.shape[2:])
        # A channels-last view is not C-contiguous, but its channel-last transpose is.
        self.channels_last = not a.flags.c_contiguous and np.moveaxis(a, 1, -1).flags.c_contiguous
        self._ones = np.ones(self.S * (self.shape[0] if self.channels_last else 1), dtype=a.dtype)

    def rows(self, a):
        """``a`` as ``(N, F)`` in this layout: a view when its memory is already so, else a copy."""
        ordered = np.moveaxis(a, 1, -1) if self.channels_last else a  # (N, *spatial, C) or (N, C, *spatial)
        return np.ascontiguousarray(ordered).reshape(self.shape[0], -1)  # (N, F)

    def unrows(self, r):
        """``(N, F)`` rows as an ``(N, C, *spatial)`` view."""
        if self.channels_last:
            N, C, *spatial = self.shape
            return np.moveaxis(r.reshape(N, *spatial, C), -1, 1)  # (N, C, *spatial) view
        return r.reshape(self.shape)

    def tile(self, v):
        """A per-channel ``(C,)`` vector as the ``(F,)`` pattern of one row."""
        return np.tile(v, self.S) if self.channels_last else np.repeat(v, self.S)

    def channel_sums(self, block):
        """Per-channel sums ``(C,)`` of an ``(n, F)`` block of rows, as one GEMV over its long axis."""
        n = block.shape[0]
        if self.channels_last:
            return self._ones[: n * self.S] @ block.reshape(n * self.S, self.C)  # (n*S, C) -> (C,)
        return (block.reshape(n * self.C, self.S) @ self._ones).reshape(n, self.C).sum(axis=0)  # (n*C,) -> (C,)


def _sweep(work, N, row_bytes):
    """``work(i, j)`` over blocks of rows ``i:j``, each core its own part of the batch; returns the sum of the results."""
    block = max(1, _BLOCK_BYTES // max(1, row_bytes))
    partial = {}

    def part(lo, hi, slot):
        for i in range(lo, hi, block):
            result = work(i, min(i + block, hi))
            if result is not None:
                partial[slot] = partial[slot] + result if slot in partial else result

    # batch_parallel starts a thread per _MIN_FLOPS_PER_THREAD; these passes count bytes instead.
    batch_parallel(part, N, flops=_MIN_FLOPS_PER_THREAD * N * row_bytes / _BYTES_PER_THREAD)
    # In slot order, so that a result does not depend on which thread finished first.
    return sum(partial[slot] for slot in sorted(partial))


def batch_norm_forward(xp, x, weight, bias, running_mean, running_var, *, training, momentum, eps):
    """``(y, xhat, inv_std, use_batch, new_running_mean, new_running_var)``; ``y`` and ``xhat`` in ``x``'s layout.

    The batch statistics take one sweep over ``x``, by shifted sums: with
    ``K`` the first sample's per-channel mean, ``s1 = sum(x - K)`` and
    ``s2 = sum((x - K)**2)`` give ``mean = K + s1 / M`` and
    ``var = (s2 - s1**2 / M) / M``. ``K`` lies within the data, so unlike
    ``E[x^2] - E[x]^2`` the subtraction loses no digits to a large mean.
    """
    layout = _Rows(x)
    X = layout.rows(x)  # (N, F)
    N, F = X.shape
    M = N * layout.S
    use_batch = training or running_mean is None
    if use_batch:
        shift = layout.channel_sums(X[:1]) / layout.S  # (C,)
        shift_row = layout.tile(shift)

        def shifted_sums(i, j):
            d = X[i:j] - shift_row  # (j - i, F), in cache
            s1 = layout.channel_sums(d)
            return np.stack([s1, layout.channel_sums(np.multiply(d, d, out=d))])  # (2, C)

        s1, s2 = _sweep(shifted_sums, N, F * X.itemsize)
        mean = shift + s1 / M  # (C,)
        var = (s2 - s1 * s1 / M) / M  # (C,) biased
    else:
        mean, var = running_mean, running_var
    inv_std = 1.0 / np.sqrt(var + eps)  # (C,)
    mean_row, inv_row = layout.tile(mean), layout.tile(inv_std)
    weight_row = None if weight is None else layout.tile(weight)
    bias_row = None if bias is None else layout.tile(bias)
    xhat = np.empty_like(X)  # (N, F)
    y = xhat if weight is None and bias is None else np.empty_like(X)

    def normalise(i, j):
        xh, out = xhat[i:j], y[i:j]
        np.subtract(X[i:j], mean_row, out=xh)
        np.multiply(xh, inv_row, out=xh)
        if weight_row is not None:
            np.multiply(xh, weight_row, out=out)
        if bias_row is not None:
            np.add(out if weight_row is not None else xh, bias_row, out=out)

    _sweep(normalise, N, F * X.itemsize)
    new_mean, new_var = running_mean, running_var
    if training and running_mean is not None:
        new_mean, new_var = running_statistics(running_mean, running_var, mean, var, M, momentum)
    return layout.unrows(y), layout.unrows(xhat), inv_std, use_batch, new_mean, new_var


def batch_norm_backward(xp, dy, xhat, inv_std, weight, *, has_bias, use_batch):
    """``(dx, dweight or None, dbias or None)``; ``dx`` in ``xhat``'s layout.

    With ``g = dy * weight``, ``mean(g) = weight * sum(dy) / M`` and
    ``mean(g * xhat) = weight * sum(dy * xhat) / M``, so the training formula
    is ``dx = dy * a - xhat * b - c`` with per-channel ``a = weight * inv_std``,
    ``b = a * sum(dy * xhat) / M`` and ``c = a * sum(dy) / M``: one sweep for
    the two sums, one for ``dx``.
    """
    layout = _Rows(xhat)
    Xh, dY = layout.rows(xhat), layout.rows(dy)  # (N, F) each
    N, F = Xh.shape
    M = N * layout.S

    def sums(i, j):
        return np.stack([layout.channel_sums(dY[i:j]), layout.channel_sums(dY[i:j] * Xh[i:j])])  # (2, C)

    dy_sum, dy_xhat_sum = _sweep(sums, N, F * dY.itemsize)  # sum(dy), sum(dy * xhat): (C,) each
    a = inv_std if weight is None else weight * inv_std  # (C,)
    a_row = layout.tile(a)
    if use_batch:
        b_row, c_row = layout.tile(a * dy_xhat_sum / M), layout.tile(a * dy_sum / M)
    dx = np.empty_like(dY)  # (N, F)

    def gradient(i, j):
        out = dx[i:j]
        np.multiply(dY[i:j], a_row, out=out)
        if use_batch:
            out -= Xh[i:j] * b_row
            out -= c_row

    _sweep(gradient, N, F * dY.itemsize)
    return layout.unrows(dx), dy_xhat_sum if weight is not None else None, dy_sum if has_bias else None
