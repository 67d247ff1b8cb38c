"""CuPy convolution: the reference's GEMMs (cuBLAS through CuPy) with im2col and col2im as single CUDA kernels.

Two column layouts, chosen by the input's memory:

* ``"cupy"`` for an input whose channels are not its fastest axis (the
  first layer's NCHW images): the reference layout, ``(N*P*Q, C*R*S)`` with
  columns ``(c, r, s)``.
* ``"cupy-rsc"`` for channels-last input (every activation our layers
  pass on): columns ``(g, r, s, c')``, the channel within its group fastest
  (``(r, s, c)`` for one group), so the threads of a warp read
  neighbouring channels, neighbouring addresses, in im2col, and neighbouring
  columns in col2im; the weight is reordered to match (issue 15).

Both are written by one kernel (``cuda/conv.cu``, the order set by its run
width ``Cg``) from an input read through its strides (a channels-last view
needs no copy), and gathered back by another. col2im
is a gather, one thread per input element ``(n, h, w, c)`` summing the
entries that read it: no atomics, so the result is deterministic and adds
in the reference's tap order; it returns an ``(N, C, H, W)`` view of
channels-last memory. Each kernel's work, and the whole forward and
backward, is a function of a :class:`~.compile.KernelRunner`
(``im2col_on``, ``col2im_on``, ``conv2d_forward_on``, ...), which
tests/test_cuda_kernels.py also runs on the CPU. A forward with ``relu`` adds the bias and
applies the ReLU in one elementwise kernel (``bias_relu``) instead of two. The bias gradient
is a GEMV (``ones @ dY2``): CuPy's
``sum(axis=0)`` of vgg-small's (262144, 32) output gradients took about
4 ms per layer on an H200, the GEMV 0.04 ms (docs/benchmarks.md).

Grouped convolutions run the reference's grouped GEMMs: one batched
``matmul`` over the ``G`` groups (cuBLAS's strided batched GEMM; CuPy copies
the group-strided column blocks into one contiguous stack first). A
depthwise convolution (``G = C``) runs the kernels of ``cuda/depthwise.cu``
instead (``depthwise_forward_on``, ``depthwise_backward_on``): the forward
one thread per output, the input gradient a gather like col2im, and the
weight gradient two deterministic passes, partial sums over chunks of the
``N*P*Q`` positions and then their sum in chunk order. No atomics: the same
numbers on every run.
"""

from __future__ import annotations

from ..reference import conv as reference
from .compile import channels_last, cupy_runner, nchw_output, strides
from .elementwise import bias_relu_on, relu_backward_on
from .memory import out_of_memory_explained

__all__ = [
    "COLUMN_LAYOUT", "RSC_LAYOUT", "im2col", "col2im", "conv2d_forward", "conv2d_backward", "im2col_on", "col2im_on",
    "conv2d_forward_on", "conv2d_backward_on", "depthwise_forward_on", "depthwise_backward_on",
]

COLUMN_LAYOUT = "cupy"
RSC_LAYOUT = "cupy-rsc"
#: Channel-fastest columns over channels-last input. Checked for its numbers
#: on the CPU (tests/test_cuda_kernels.py), not yet timed on a GPU:
#: benchmarks/gpu_conv_parts.py times both orders, the whole ops too, by
#: switching this (docs/benchmarks.md, issue 15).
CHANNEL_FASTEST_COLUMNS = True
# The depthwise weight gradient's first pass runs one thread per (chunk, tap,
# output channel): about this many threads fill a large GPU (an H200 keeps
# ~270K resident), and each sums at least _MIN_CHUNK positions, so the
# partial sums stay a small fraction of the work.
_WEIGHT_THREADS = 1 << 17
_MIN_CHUNK = 32


def _geometry_ints(g) -> tuple:
    return (g.C, g.H, g.W, g.R, g.S, g.P, g.Q, g.u, g.v, g.a, g.b, g.dh, g.dw)


def im2col(xp, x, g):
    """``(N, C, H, W)`` to ``(N*P*Q, C*R*S)`` in one kernel."""
    with x.device:
        return im2col_on(cupy_runner(), x, g)


def im2col_on(run, x, g, order="crs"):
    """:func:`im2col` on the :class:`~.compile.KernelRunner` ``run``; ``order="rsc"``: columns ``(g, r, s, c')``."""
    cols = run.lib.empty(g.cols_shape, dtype=x.dtype)  # (N*P*Q, C*R*S)
    run.launch("im2col", x.dtype, cols.size, (x, cols), (*_geometry_ints(g), _run_width(g, order)), strides(x))
    return cols


def col2im(xp, cols, g):
    """``(N*P*Q, C*R*S)`` back onto ``(N, C, H, W)`` by a deterministic gather; a view of channels-last memory."""
    with cols.device:
        return col2im_on(cupy_runner(), cols, g)


def col2im_on(run, cols, g, order="crs"):
    """:func:`col2im` on the :class:`~.compile.KernelRunner` ``run``; ``order`` as for :func:`im2col_on`."""
    cols = run.lib.ascontiguousarray(cols)  # the kernel indexes rows directly; a no-op for a GEMM result
    dx, flat = nchw_output(run.lib, g.N, g.C, g.H, g.W, cols.dtype, last=True)
    run.launch("col2im", cols.dtype, flat.size, (cols, flat), (*_geometry_ints(g), _run_width(g, order)))
    return dx


def _run_width(g, order):
    """The kernels' ``Cg``: channels per run of channel-fastest columns; 1 gives the reference's ``(c, r, s)``."""
    return g.Cg if order == "rsc" else 1


def _columns(run, x):
    """``(layout, order, unfold, fold)`` for input ``x``: channel-fastest columns over channels-last memory."""
    layout, order = (RSC_LAYOUT, "rsc") if CHANNEL_FASTEST_COLUMNS and channels_last(x) else (COLUMN_LAYOUT, "crs")
    return (layout, order, lambda xp, a, g: im2col_on(run, a, g, order),
            lambda xp, cols, g: col2im_on(run, cols, g, order))


def conv2d_forward_on(run, xp, x, weight, bias, g, keep_cols=False, relu=False):
    """The non-depthwise forward on ``run``: im2col in the layout :func:`_columns` picks, then the reference's GEMM.

    With ``relu`` the bias and the ReLU are one kernel (:func:`.elementwise.bias_relu_on`).
    """
    layout, order, unfold, _ = _columns(run, x)

    def epilogue(xp, y, bias, relu):
        return bias_relu_on(run, y, bias) if relu else reference.add_bias_relu(xp, y, bias, False)

    return reference.gemm_forward(xp, x, weight, bias, g, keep_cols=keep_cols, unfold=unfold, layout=layout,
                                  order=order, relu=relu, epilogue=epilogue)


def conv2d_backward_on(run, xp, dy, x, weight, g, saved=None, has_bias=True, need_input_grad=True, relu_output=None):
    """The non-depthwise backward on ``run``: the forward's columns where ``saved`` holds them in its layout.

    ``relu_output``: the output of a forward with ``relu``; ``dy`` goes through the ReLU's backward kernel first.
    """
    if relu_output is not None:
        dy = relu_backward_on(run, dy, relu_output)  # (N, K, P, Q)
    layout, order, unfold, fold = _columns(run, x)
    # Taken and passed on unnamed: the GEMM code frees them before the input gradient's columns (ConvColumns.take).
    return reference.gemm_backward(xp, dy, x, weight, g, cols=None if saved is None else saved.take(layout),
                                   has_bias=has_bias, need_input_grad=need_input_grad, unfold=unfold, fold=fold,
                                   sums=column_sums, order=order)


def column_sums(xp, a):
    """Column sums of the tall ``a`` as a GEMV, ``ones @ a`` (see the module docstring)."""
    ones = xp.ones_like(a[:, 0])  # (rows,), a's dtype and device
    return ones @ a  # (rows,) @ (rows, K) -> (K,)


def _depthwise_ints(g) -> tuple:
    return (g.C, g.H, g.W, g.K // g.C, g.R, g.S, g.P, g.Q, g.u, g.v, g.a, g.b, g.dh, g.dw)


def weight_chunks(g) -> tuple[int, int]:
    """``(chunks, chunk_len)``: how the depthwise weight gradient splits the ``N*P*Q`` positions (none empty)."""
    positions = g.N * g.P * g.Q
    chunks = max(1, min(-(-_WEIGHT_THREADS // (g.K * g.R * g.S)), -(-positions // _MIN_CHUNK)))
    chunk_len = max(1, -(-positions // chunks))
    return max(1, -(-positions // chunk_len)), chunk_len


def depthwise_forward_on(run, x, weight, bias, g):
    """Depthwise ``y`` (a channels-last ``(N, K, P, Q)`` view) on the :class:`~.compile.KernelRunner` ``run``."""
    weight = run.lib.ascontiguousarray(weight)  # (K, 1, R, S), read as (K, R*S)
    has_bias = bias is not None
    bias = run.lib.ascontiguousarray(bias) if has_bias else weight  # a pointer the kernel never reads
    y, flat = nchw_output(run.lib, g.N, g.K, g.P, g.Q, x.dtype, last=True)
    run.launch("depthwise_conv2d_forward", x.dtype, flat.size, (x, weight, bias, flat),
               (*_depthwise_ints(g), int(has_bias)), strides(x))
    return y


def depthwise_backward_on(run, dy, x, weight, g, need_input_grad=True):
    """Depthwise ``(dx or None, dW)`` on the :class:`~.compile.KernelRunner` ``run``; ``dy`` and ``x`` of one dtype.

    ``dx`` is an ``(N, C, H, W)`` view of channels-last memory; ``dW`` is
    ``(K, 1, R, S)``, summed over the positions in chunks (:func:`weight_chunks`).
    """
    weight = run.lib.ascontiguousarray(weight)  # (K, 1, R, S), read as (K, R*S)
    dx = None
    if need_input_grad:
        dx, flat = nchw_output(run.lib, g.N, g.C, g.H, g.W, dy.dtype, last=True)
        run.launch("depthwise_conv2d_backward_input", dy.dtype, flat.size, (dy, weight, flat), _depthwise_ints(g),
                   strides(dy))
    chunks, chunk_len = weight_chunks(g)
    taps = g.R * g.S
    partial = run.lib.empty((chunks, taps, g.K), dtype=dy.dtype)  # (chunks, R*S, K)
    run.launch("depthwise_conv2d_weight_partial", dy.dtype, partial.size, (x, dy, partial),
               (g.N, *_depthwise_ints(g), chunk_len), (*strides(x), *strides(dy)))
    dweight = run.lib.empty(g.w_shape, dtype=dy.dtype)  # (K, 1, R, S)
    run.launch("depthwise_conv2d_weight_sum", dy.dtype, g.K * taps, (partial, dweight), (g.K, taps, chunks))
    return dx, dweight


def conv2d_forward(xp, x, weight, bias, g, *, relu=False, keep_cols=False, workspace=None, where="conv2d"):
    """Forward as the reference's with the im2col kernel, or depthwise; returns ``(y, ConvColumns or None)``."""
    with out_of_memory_explained(where, "forward", x):
        if g.depthwise:
            with x.device:
                y = depthwise_forward_on(cupy_runner(), x, weight, bias, g)
                return (bias_relu_on(cupy_runner(), y, None) if relu else y), None
        with x.device:
            return conv2d_forward_on(cupy_runner(), xp, x, weight, bias, g, keep_cols, relu)


def conv2d_backward(xp, dy, x, weight, g, *, saved=None, has_bias=True, need_input_grad=True, relu_output=None,
                    workspace=None, where="conv2d"):
    """Backward as the reference's, with the im2col and col2im kernels and the GEMV bias gradient, or depthwise."""
    with out_of_memory_explained(where, "backward", x):
        if g.depthwise and relu_output is not None:
            with x.device:
                dy, relu_output = relu_backward_on(cupy_runner(), dy, relu_output), None
        if g.depthwise and dy.dtype == x.dtype:  # the CUDA templates have one T
            with x.device:
                dx, dweight = depthwise_backward_on(cupy_runner(), dy, x, weight, g, need_input_grad)
                dy2 = xp.reshape(xp.permute_dims(dy, (0, 2, 3, 1)), (g.N * g.P * g.Q, g.K))  # (N*P*Q, K)
                return dx, dweight, column_sums(xp, dy2) if has_bias else None
        with x.device:
            return conv2d_backward_on(cupy_runner(), xp, dy, x, weight, g, saved, has_bias, need_input_grad,
                                      relu_output)
