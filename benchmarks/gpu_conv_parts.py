"""Where a CuPy convolution's time goes: each part of conv2d and conv2d_backward, timed on its own.

    python benchmarks/gpu_conv_parts.py        # on a machine with CuPy and a GPU

For each convolution of lenet and vgg-small at batch 256 (float32, TF32 off,
activations channels-last as they flow through the networks) it times, with
CUDA events, the median and min-max of 20 calls after 3 warm-ups:

    im2col          the kernel, x -> cols (N*P*Q, C*R*S)
    fwd GEMM        cols @ w2.T
    dW GEMM         dy2.T @ cols
    db sum          xp.sum(dy2, axis=0), CuPy's reduction over the rows
    db GEMV         ones @ dy2, what conv2d_backward uses on CuPy
    dcols GEMM      dy2 @ w2
    col2im          the gather kernel, dcols -> dx
    conv2d          the whole forward (return_cols)
    backward        the whole conv2d_backward (cols given; dx too)

benchmarks/gpu_check.sh runs it; the figures are in docs/benchmarks.md.
"""

from __future__ import annotations

import numpy as np

from portable_cnn import backend
from portable_cnn.ops import conv

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
    for net, layer, C, K, RS, pad, H in LAYERS:
        P = H + 2 * pad - RS + 1
        x = _channels_last(cupy, cupy.asarray(rng.standard_normal((BATCH, C, H, H), dtype=np.float32)))
        w = cupy.asarray(rng.standard_normal((K, C, RS, RS), dtype=np.float32))
        b = cupy.asarray(rng.standard_normal(K, dtype=np.float32))
        dy = _channels_last(cupy, cupy.asarray(rng.standard_normal((BATCH, K, P, P), dtype=np.float32)))
        opts = {"stride": 1, "padding": pad}
        cols = conv.im2col(x, RS, **opts)  # (N*P*Q, C*R*S)
        w2 = w.reshape(K, C * RS * RS)  # (K, C*R*S)
        dy2 = xp.reshape(xp.permute_dims(dy, (0, 2, 3, 1)), (BATCH * P * P, K))  # (N*P*Q, K), a view here
        dcols = dy2 @ w2
        ones = xp.ones_like(dy2[:, 0])
        parts = {
            "im2col": lambda: conv.im2col(x, RS, **opts),
            "fwd GEMM": lambda: cols @ w2.T,
            "dW GEMM": lambda: dy2.T @ cols,
            "db sum": lambda: xp.sum(dy2, axis=0),
            "db GEMV": lambda: ones @ dy2,
            "dcols GEMM": lambda: dy2 @ w2,
            "col2im": lambda: conv.col2im(dcols, x.shape, RS, **opts),
            "conv2d": lambda: conv.conv2d(x, w, b, return_cols=True, **opts),
            "backward": lambda: conv.conv2d_backward(dy, x, w, cols=cols, **opts),
        }
        timed = {part: _time(cupy, fn) for part, fn in parts.items()}
        np.testing.assert_allclose(cupy.asnumpy(ones @ dy2), cupy.asnumpy(xp.sum(dy2, axis=0)), rtol=1e-4, atol=1e-2)
        print(f"\n{net} {layer}: N*P*Q = {BATCH * P * P}, C*R*S = {C * RS * RS}, K = {K}")
        for part, (median, low, high) in timed.items():
            print(f"  {part:<11} {median:8.3f} ({low:.3f}-{high:.3f})")


if __name__ == "__main__":
    main()
