"""Where a CuPy convolution's time goes: each part of conv2d and conv2d_backward, timed on its own.

    python benchmarks/gpu_conv_parts.py        # on a machine with CuPy and a GPU

For each convolution of lenet and vgg-small at batch 256 (float32, TF32 off,
activations channels-last as they flow through the networks) it times, with
CUDA events, the median and min-max of 20 calls after 3 warm-ups:

    im2col          the kernel (kernels/cupy/conv.py), x -> cols (N*P*Q, C*R*S), columns (c, r, s)
    im2col rsc      the same kernel in the channel-fastest order the CuPy conv uses on channels-last input,
                    columns (r, s, c)
    fwd GEMM        cols @ w2.T
    dW GEMM         dy2.T @ cols
    db sum          the reference's column sums, xp.sum(dy2, axis=0): CuPy's reduction over the rows
    db GEMV         the CuPy kernel's column sums, ones @ dy2: what conv2d_backward uses on CuPy
    dcols GEMM      dy2 @ w2
    col2im          the gather kernel, dcols -> dx
    col2im rsc      the gather over channel-fastest columns
    conv2d          the whole forward through ops.conv2d (return_cols; validation and dispatch included)
    backward        the whole ops.conv2d_backward (the forward's columns given; dx too)
    conv2d crs, backward crs
                    the same two with CHANNEL_FASTEST_COLUMNS off: the reference column order everywhere
                    (issue 15's A/B of the column order)
    conv+relu, conv relu
                    ops.conv2d(relu=True) (bias and ReLU in one kernel) against ops.relu(ops.conv2d(...))
    bwd+relu, bwd relu
                    ops.conv2d_backward(relu_output=y) against ops.relu_backward, then ops.conv2d_backward

The parts are the kernel functions called with a ConvGeometry, as the
dispatch calls them; the whole ops are checked to dispatch to the CuPy
kernels, and the kernels' results against the reference's.

benchmarks/gpu_check.sh runs it; the figures are in docs/benchmarks.md.
"""

from __future__ import annotations

import numpy as np

from portable_cnn import backend, dispatch, ops
from portable_cnn.geometry import ConvGeometry
from portable_cnn.kernels.cupy import compile as cupy_compile
from portable_cnn.kernels.cupy import conv as cupy_conv
from portable_cnn.kernels.reference import conv as reference_conv

# (net, layer, C, K, kernel, padding, H = W of the input)
LAYERS = [
    ("lenet", "conv1 1->6 5x5", 1, 6, 5, 2, 28),
    ("lenet", "conv2 6->16 5x5", 6, 16, 5, 0, 14),
    ("vgg-small", "conv1 3->32 3x3", 3, 32, 3, 1, 32),
    ("vgg-small", "conv2 32->32 3x3", 32, 32, 3, 1, 32),
    ("vgg-small", "conv3 32->64 3x3", 32, 64, 3, 1, 16),
    ("vgg-small", "conv4 64->64 3x3", 64, 64, 3, 1, 16),
]
BATCH = 256


def _time(cupy, fn, repeats=20, warmup=3):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop))  # ms
    return float(np.median(times)), min(times), max(times)


def _channels_last(cupy, a):
    """The (N, C, H, W) values as a view of (N, H, W, C) memory, as the networks pass activations."""
    return cupy.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)


def main() -> None:
    import cupy

    backend.set_tf32(False)
    xp = backend.get_namespace("cupy")
    rng = np.random.default_rng(0)
    name = cupy.cuda.runtime.getDeviceProperties(0)["name"]
    print(f"conv parts, float32, batch {BATCH}, TF32 off, channels-last activations, "
          f"{name.decode() if isinstance(name, bytes) else name}; ms, median (min-max) of 20 calls")
    float32 = np.dtype(np.float32)
    for op in ("conv2d_forward", "conv2d_backward"):  # the whole ops' times are the CuPy kernels'
        assert dispatch.kernel(op, xp, float32) is getattr(cupy_conv, op), dispatch.implementation_name(op, xp, float32)
    for net, layer, C, K, RS, pad, H in LAYERS:
        x = _channels_last(cupy, cupy.asarray(rng.standard_normal((BATCH, C, H, H), dtype=np.float32)))
        w = cupy.asarray(rng.standard_normal((K, C, RS, RS), dtype=np.float32))
        b = cupy.asarray(rng.standard_normal(K, dtype=np.float32))
        g = ConvGeometry.of(x.shape, w.shape, stride=1, padding=pad, dilation=1)
        P = g.P  # = Q: square inputs and kernels
        dy = _channels_last(cupy, cupy.asarray(rng.standard_normal(g.y_shape, dtype=np.float32)))
        opts = {"stride": 1, "padding": pad}
        cols = cupy_conv.im2col(xp, x, g)  # (N*P*Q, C*R*S)
        w2 = w.reshape(K, C * RS * RS)  # (K, C*R*S)
        dy2 = xp.reshape(xp.permute_dims(dy, (0, 2, 3, 1)), (BATCH * P * P, K))  # (N*P*Q, K), a view here
        dcols = dy2 @ w2  # (N*P*Q, C*R*S)
        _, saved = ops.conv2d(x, w, b, return_cols=True, **opts)
        runner = cupy_compile.cupy_runner()
        dcols_rsc = cupy_conv.im2col_on(runner, x, g, "rsc")  # any values of the right shape

        def reference_order(fn):
            def run():
                cupy_conv.CHANNEL_FASTEST_COLUMNS = False
                try:
                    return fn()
                finally:
                    cupy_conv.CHANNEL_FASTEST_COLUMNS = True
            return run

        z = ops.conv2d(x, w, b, **opts)
        y_relu = ops.conv2d(x, w, b, relu=True, **opts)
        with_crs = reference_order(lambda: ops.conv2d(x, w, b, return_cols=True, **opts))
        saved_crs = with_crs()[1]
        parts = {
            "im2col": lambda: cupy_conv.im2col(xp, x, g),
            "im2col rsc": lambda: cupy_conv.im2col_on(runner, x, g, "rsc"),
            "fwd GEMM": lambda: cols @ w2.T,
            "dW GEMM": lambda: dy2.T @ cols,
            "db sum": lambda: reference_conv.column_sums(xp, dy2),
            "db GEMV": lambda: cupy_conv.column_sums(xp, dy2),
            "dcols GEMM": lambda: dy2 @ w2,
            "col2im": lambda: cupy_conv.col2im(xp, dcols, g),
            "col2im rsc": lambda: cupy_conv.col2im_on(runner, dcols_rsc, g, "rsc"),
            "conv2d": lambda: ops.conv2d(x, w, b, return_cols=True, **opts),
            "backward": lambda: ops.conv2d_backward(dy, x, w, cols=saved, **opts),
            "conv2d crs": with_crs,
            "backward crs": reference_order(lambda: ops.conv2d_backward(dy, x, w, cols=saved_crs, **opts)),
            "conv+relu": lambda: ops.conv2d(x, w, b, relu=True, **opts),
            "conv relu": lambda: ops.relu(ops.conv2d(x, w, b, **opts)),
            "bwd+relu": lambda: ops.conv2d_backward(dy, x, w, relu_output=y_relu, **opts),
            "bwd relu": lambda: ops.conv2d_backward(ops.relu_backward(dy, z), x, w, **opts),
        }
        timed = {part: _time(cupy, fn) for part, fn in parts.items()}
        np.testing.assert_array_equal(cupy.asnumpy(cols), cupy.asnumpy(reference_conv.im2col(xp, x, g)))
        np.testing.assert_allclose(cupy.asnumpy(cupy_conv.col2im(xp, dcols, g)),
                                   cupy.asnumpy(reference_conv.col2im(xp, dcols, g)), rtol=1e-4, atol=1e-3)
        rsc = reference_conv.im2col(xp, x, g).reshape(-1, C, RS * RS).transpose(0, 2, 1).reshape(cols.shape)
        np.testing.assert_array_equal(cupy.asnumpy(cupy_conv.im2col_on(runner, x, g, "rsc")), cupy.asnumpy(rsc))
        np.testing.assert_allclose(cupy.asnumpy(ops.conv2d(x, w, b, **opts)), cupy.asnumpy(with_crs()[0]),
                                   rtol=1e-4, atol=1e-3)
        np.testing.assert_array_equal(cupy.asnumpy(y_relu), cupy.asnumpy(ops.relu(z)))
        np.testing.assert_allclose(cupy.asnumpy(cupy_conv.column_sums(xp, dy2)),
                                   cupy.asnumpy(reference_conv.column_sums(xp, dy2)), rtol=1e-4, atol=1e-2)
        print(f"\n{net} {layer}: N*P*Q = {BATCH * P * P}, C*R*S = {C * RS * RS}, K = {K}")
        for part, (median, low, high) in timed.items():
            print(f"  {part:<11} {median:8.3f} ({low:.3f}-{high:.3f})")


if __name__ == "__main__":
    main()
