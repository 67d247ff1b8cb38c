"""CuPy convolution: the reference's GEMMs (cuBLAS through CuPy) with im2col and col2im as single CUDA kernels.

Column layout ``"cupy"``: the reference layout, ``(N*P*Q, C*R*S)`` with
columns ``(c, r, s)``, written by one kernel (``cuda/conv.cu``) from an
input read through its strides (a channels-last view needs no copy). col2im
is a gather, one thread per input element ``(n, h, w, c)`` summing the
entries that read it: no atomics, so the result is deterministic and adds
in the reference's tap order; it returns an ``(N, C, H, W)`` view of
channels-last memory. The bias gradient is a GEMV (``ones @ dY2``): CuPy's
``sum(axis=0)`` of vgg-small's (262144, 32) output gradients took about
4 ms per layer on an H200, the GEMV 0.04 ms (docs/benchmarks.md).
"""

from __future__ import annotations

from ..reference import conv as reference
from .compile import cupy_module, launch, nchw_output, strides
from .memory import out_of_memory_explained

__all__ = ["COLUMN_LAYOUT", "im2col", "col2im", "conv2d_forward", "conv2d_backward"]

COLUMN_LAYOUT = "cupy"


def _geometry_ints(g) -> tuple:
    return (g.C, g.H, g.W, g.R, g.S, g.P, g.Q, g.u, g.v, g.a, g.b, g.dh, g.dw)


def im2col(xp, x, g):
    """``(N, C, H, W)`` to ``(N*P*Q, C*R*S)`` in one kernel."""
    cupy = cupy_module()
    with x.device:
        cols = cupy.empty(g.cols_shape, dtype=x.dtype)  # (N*P*Q, C*R*S)
        launch(cupy, "im2col", x.dtype, cols.size, (x, cols), _geometry_ints(g), strides(x))
    return cols


def col2im(xp, cols, g):
    """``(N*P*Q, C*R*S)`` back onto ``(N, C, H, W)`` by a deterministic gather; a view of channels-last memory."""
    cupy = cupy_module()
    with cols.device:
        cols = cupy.ascontiguousarray(cols)  # the kernel indexes rows directly; a no-op for a GEMM result
        dx, flat = nchw_output(cupy, g.N, g.C, g.H, g.W, cols.dtype, last=True)
        launch(cupy, "col2im", cols.dtype, flat.size, (cols, flat), _geometry_ints(g))
    return dx


def column_sums(xp, a):
    """Column sums of the tall ``a`` as a GEMV, ``ones @ a`` (see the module docstring)."""
    ones = xp.ones_like(a[:, 0])  # (rows,), a's dtype and device
    return ones @ a  # (rows,) @ (rows, K) -> (K,)


def conv2d_forward(xp, x, weight, bias, g, *, keep_cols=False, workspace=None, where="conv2d"):
    """Forward as the reference's, with the im2col kernel; returns ``(y, ConvColumns or None)``."""
    with out_of_memory_explained(where, "forward", x):
        return reference.gemm_forward(xp, x, weight, bias, g, keep_cols=keep_cols, unfold=im2col, layout=COLUMN_LAYOUT)


def conv2d_backward(xp, dy, x, weight, g, *, saved=None, has_bias=True, need_input_grad=True, workspace=None,
                    where="conv2d"):
    """Backward as the reference's, with the im2col and col2im kernels and the GEMV bias gradient."""
    cols = saved.cols if saved is not None and saved.layout == COLUMN_LAYOUT else None
    with out_of_memory_explained(where, "backward", x):
        return reference.gemm_backward(xp, dy, x, weight, g, cols=cols, has_bias=has_bias,
                                       need_input_grad=need_input_grad, unfold=im2col, fold=col2im, sums=column_sums)
