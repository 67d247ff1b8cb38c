"""Sliding windows over ``(N, C, H, W)`` arrays, in the array API standard only.

Convolution (im2col/col2im) and pooling both read an input through the same
windows: for kernel offset ``(r, s)`` the strided slice

    xpad[:, :, r*d_h : r*d_h + u*(P-1) + 1 : u,  s*d_w : s*d_w + v*(Q-1) + 1 : v]

is ``(N, C, P, Q)`` and holds, at ``(p, q)``, the input element that kernel tap
``(r, s)`` sees for output ``(p, q)``. Looping over the ``R*S`` taps (small)
instead of the ``P*Q`` outputs (large) keeps every operation a whole-array
slice, which every array library runs fast.
"""

from __future__ import annotations

from ... import backend

__all__ = ["pad2d", "tap_slices", "scatter_add_taps"]


def pad2d(xp, x, a: int, b: int, value: float = 0.0):
    """Pad the last two axes of ``x`` by ``a`` rows and ``b`` columns on each side."""
    if a == 0 and b == 0:
        return x
    N, C, H, W = x.shape
    out = xp.full((N, C, H + 2 * a, W + 2 * b), value, dtype=x.dtype, device=backend.device(x))
    out[:, :, a : a + H, b : b + W] = x
    return out


def tap_slices(g):
    """Index tuples, one per kernel tap ``(r, s)`` in row-major order, for geometry ``g``.

    ``g`` is a :class:`~portable_cnn.geometry.ConvGeometry` (pooling passes
    its ``as_conv``).
    """
    for r in range(g.R):
        for s in range(g.S):
            h0, w0 = r * g.dh, s * g.dw
            yield (
                slice(None),
                slice(None),
                slice(h0, h0 + g.u * (g.P - 1) + 1, g.u),
                slice(w0, w0 + g.v * (g.Q - 1) + 1, g.v),
            )


def scatter_add_taps(xp, values, g, *, dtype, device):
    """Sum per-tap ``(N, C, P, Q)`` arrays back onto the input and crop the padding: ``(N, C, H, W)``.

    ``values`` yields the contribution of each tap in the order of
    :func:`tap_slices`. This is the adjoint of reading the taps: where windows
    overlap the contributions add up, which is what col2im and the pooling
    backward need.
    """
    out = xp.zeros((g.N, g.C, g.H + 2 * g.a, g.W + 2 * g.b), dtype=dtype, device=device)  # (N, C, H+2a, W+2b)
    for index, value in zip(tap_slices(g), values):
        out[index] = out[index] + value
    return out[:, :, g.a : g.a + g.H, g.b : g.b + g.W]
