"""CuPy pooling: each op one CUDA kernel (``cuda/pool.cu``), the backward a gather without atomics.

Inputs are read through their strides; outputs are written in the memory
order of the input (channels-last or not) and returned as (N, C, *, *)
views, so the threads of a warp write neighbouring addresses. The argmax is
int64, ``r*S + s`` as the reference's.
"""

from __future__ import annotations

import numpy as np

from .compile import channels_last, cupy_module, launch, nchw_output, strides

__all__ = ["max_pool2d_forward", "max_pool2d_backward", "avg_pool2d_forward", "avg_pool2d_backward"]


def _ints(g) -> tuple:
    return (g.C, g.H, g.W, g.R, g.S, g.P, g.Q, g.u, g.v, g.a, g.b)


def max_pool2d_forward(xp, x, g):
    """``(y, argmax)``: the first maximum of each window (padding is -inf)."""
    cupy = cupy_module()
    last = channels_last(x)
    with x.device:
        y, y_flat = nchw_output(cupy, g.N, g.C, g.P, g.Q, x.dtype, last)
        argmax, argmax_flat = nchw_output(cupy, g.N, g.C, g.P, g.Q, np.int64, last)
        lowest = np.array(-np.inf, dtype=x.dtype)[()]  # the kernel's T
        launch(cupy, "max_pool2d_forward", x.dtype, y_flat.size, (x, y_flat, argmax_flat), _ints(g),
               (*strides(x), np.int32(last), lowest))
    return y, argmax


def max_pool2d_backward(xp, dy, argmax, g):
    """``dx``: each input element gathers the ``dy`` of the windows whose first maximum it is."""
    cupy = cupy_module()
    last = channels_last(dy)
    with dy.device:
        if argmax.dtype != np.int64:  # the reference's or NumPy's argmax, after a switch of fast_paths
            argmax = argmax.astype(np.int64)
        dx, flat = nchw_output(cupy, g.N, g.C, g.H, g.W, dy.dtype, last)
        launch(cupy, "max_pool2d_backward", dy.dtype, flat.size, (dy, argmax, flat), _ints(g),
               (*strides(dy), *strides(argmax), np.int32(last)))
    return dx


def avg_pool2d_forward(xp, x, g):
    """``y``: window sums over ``R*S``, padding counted."""
    cupy = cupy_module()
    last = channels_last(x)
    with x.device:
        y, flat = nchw_output(cupy, g.N, g.C, g.P, g.Q, x.dtype, last)
        launch(cupy, "avg_pool2d_forward", x.dtype, flat.size, (x, flat), _ints(g), (*strides(x), np.int32(last)))
    return y


def avg_pool2d_backward(xp, dy, g):
    """``dx``: each input element gathers ``dy / (R*S)`` of the windows covering it."""
    cupy = cupy_module()
    last = channels_last(dy)
    with dy.device:
        dx, flat = nchw_output(cupy, g.N, g.C, g.H, g.W, dy.dtype, last)
        launch(cupy, "avg_pool2d_backward", dy.dtype, flat.size, (dy, flat), _ints(g), (*strides(dy), np.int32(last)))
    return dx
