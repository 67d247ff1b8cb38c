"""CuPy pooling: each op one CUDA kernel (``cuda/pool.cu``), the backwards gathers without atomics.

Inputs are read through their strides; outputs are written in the memory
order of the input (channels-last or not) and returned as (N, C, *, *)
views, so the threads of a warp write neighbouring addresses. The argmax is
int64, ``r*S + s`` as the reference's. Global average pooling is one thread
per ``(n, c)`` summing ``H*W`` elements; its backward writes channels-last,
the layout of the convolutions' outputs. Each op's work is a function of a
:class:`~.compile.KernelRunner` (``<op>_on``), which tests/test_cuda_kernels.py
also runs on the CPU.
"""

from __future__ import annotations

import numpy as np

from .compile import channels_last, cupy_runner, nchw_output, strides

__all__ = [
    "max_pool2d_forward",
    "max_pool2d_relu_forward",
    "max_pool2d_backward",
    "avg_pool2d_forward",
    "avg_pool2d_backward",
    "global_avg_pool2d_forward",
    "global_avg_pool2d_backward",
    "max_pool2d_forward_on",
    "max_pool2d_backward_on",
    "avg_pool2d_forward_on",
    "avg_pool2d_backward_on",
    "global_avg_pool2d_forward_on",
    "global_avg_pool2d_backward_on",
]


def _window_ints(g) -> tuple:
    return (g.C, g.H, g.W, g.R, g.S, g.P, g.Q, g.u, g.v, g.a, g.b)


def _max_ints(g) -> tuple:
    return (*_window_ints(g), g.dh, g.dw)


def _avg_ints(g) -> tuple:
    """The window and PyTorch's divisor options (``divisor_override`` 0: none; the geometry refuses 0 itself)."""
    return (*_window_ints(g), int(g.count_include_pad), g.divisor_override or 0)


def max_pool2d_forward(xp, x, g):
    """``(y, argmax)``: the first maximum of each window (padding is -inf)."""
    with x.device:
        return max_pool2d_forward_on(cupy_runner(), x, g)


def max_pool2d_relu_forward(xp, x, g):
    """``(relu(y), argmax)``, argmax ``-1`` where the ReLU stops the gradient: the same kernel, one launch."""
    with x.device:
        return max_pool2d_forward_on(cupy_runner(), x, g, relu=True)


def max_pool2d_forward_on(run, x, g, relu=False):
    """:func:`max_pool2d_forward` (with ``relu``, :func:`max_pool2d_relu_forward`) on the runner ``run``."""
    last = channels_last(x)
    y, y_flat = nchw_output(run.lib, g.N, g.C, g.P, g.Q, x.dtype, last)
    argmax, argmax_flat = nchw_output(run.lib, g.N, g.C, g.P, g.Q, np.int64, last)
    lowest = np.array(-np.inf, dtype=x.dtype)[()]  # the kernel's T
    run.launch("max_pool2d_forward", x.dtype, y_flat.size, (x, y_flat, argmax_flat), _max_ints(g),
               (*strides(x), np.int32(last), lowest, np.int32(relu)))
    return y, argmax


def max_pool2d_backward(xp, dy, argmax, g):
    """``dx``: each input element gathers the ``dy`` of the windows whose first maximum it is."""
    with dy.device:
        return max_pool2d_backward_on(cupy_runner(), dy, argmax, g)


def max_pool2d_backward_on(run, dy, argmax, g):
    """:func:`max_pool2d_backward` on the :class:`~.compile.KernelRunner` ``run``."""
    last = channels_last(dy)
    if argmax.dtype != np.int64:  # the reference's or NumPy's argmax, after a switch of fast_paths
        argmax = argmax.astype(np.int64)
    dx, flat = nchw_output(run.lib, g.N, g.C, g.H, g.W, dy.dtype, last)
    run.launch("max_pool2d_backward", dy.dtype, flat.size, (dy, argmax, flat), _max_ints(g),
               (*strides(dy), *strides(argmax), np.int32(last)))
    return dx


def avg_pool2d_forward(xp, x, g):
    """``y``: window sums over PyTorch's divisor (``count_include_pad``, ``divisor_override``, ``ceil_mode``)."""
    with x.device:
        return avg_pool2d_forward_on(cupy_runner(), x, g)


def avg_pool2d_forward_on(run, x, g):
    """:func:`avg_pool2d_forward` on the :class:`~.compile.KernelRunner` ``run``."""
    last = channels_last(x)
    y, flat = nchw_output(run.lib, g.N, g.C, g.P, g.Q, x.dtype, last)
    run.launch("avg_pool2d_forward", x.dtype, flat.size, (x, flat), _avg_ints(g), (*strides(x), np.int32(last)))
    return y


def avg_pool2d_backward(xp, dy, g):
    """``dx``: each input element gathers ``dy`` over the divisor of every window covering it."""
    with dy.device:
        return avg_pool2d_backward_on(cupy_runner(), dy, g)


def avg_pool2d_backward_on(run, dy, g):
    """:func:`avg_pool2d_backward` on the :class:`~.compile.KernelRunner` ``run``."""
    last = channels_last(dy)
    dx, flat = nchw_output(run.lib, g.N, g.C, g.H, g.W, dy.dtype, last)
    run.launch("avg_pool2d_backward", dy.dtype, flat.size, (dy, flat), _avg_ints(g), (*strides(dy), np.int32(last)))
    return dx


def global_avg_pool2d_forward(xp, x, g):
    """``y`` (N, C, 1, 1): the mean over ``H, W``, one thread per ``(n, c)``."""
    with x.device:
        return global_avg_pool2d_forward_on(cupy_runner(), x, g)


def global_avg_pool2d_forward_on(run, x, g):
    """:func:`global_avg_pool2d_forward` on the :class:`~.compile.KernelRunner` ``run``."""
    y = run.lib.empty((g.N, g.C, 1, 1), dtype=x.dtype)  # (N, C, 1, 1): one memory order for both layouts
    run.launch("global_avg_pool2d_forward", x.dtype, g.N * g.C, (x, y), (g.C, g.H, g.W), strides(x))
    return y


def global_avg_pool2d_backward(xp, dy, g):
    """``dx`` (N, C, H, W), a view of channels-last memory: ``dy / (H*W)`` everywhere."""
    with dy.device:
        return global_avg_pool2d_backward_on(cupy_runner(), dy, g)


def global_avg_pool2d_backward_on(run, dy, g):
    """:func:`global_avg_pool2d_backward` on the :class:`~.compile.KernelRunner` ``run``."""
    dx, flat = nchw_output(run.lib, g.N, g.C, g.H, g.W, dy.dtype, last=True)
    gN, gC, _, _ = strides(dy)
    run.launch("global_avg_pool2d_backward", dy.dtype, flat.size, (dy, flat), (g.C, g.H, g.W), (gN, gC, np.int32(1)))
    return dx
