"""The conv weight gradient's GEMM on the GPU: one GEMM against the split-K form CuPy uses (ops/conv.py).

    python benchmarks/gpu_weight_grad.py        # on a machine with CuPy and a GPU

For each convolution of lenet and vgg-small at batch 256 (float32, TF32 off)
it times dW = dy2.T @ cols as one GEMM and as G batched slices summed
(``conv._weight_grad`` with ``splits`` 1 and ``conv._weight_grad_splits``),
with CUDA events, median and min-max of 20 timed calls after 3 warm-ups, and
checks that both give the same matrix. benchmarks/gpu_check.sh runs it.
"""

from __future__ import annotations

import numpy as np

from portable_cnn import backend
from portable_cnn.ops import conv

# (net, layer, C, K, R*S, P*Q) of each convolution, at the nets' input sizes
LAYERS = [
    ("lenet", "conv1 1->6 5x5", 1, 6, 25, 28 * 28),
    ("lenet", "conv2 6->16 5x5", 6, 16, 25, 10 * 10),
    ("vgg-small", "conv1 3->32 3x3", 3, 32, 9, 32 * 32),
    ("vgg-small", "conv2 32->32 3x3", 32, 32, 9, 32 * 32),
    ("vgg-small", "conv3 32->64 3x3", 32, 64, 9, 16 * 16),
    ("vgg-small", "conv4 64->64 3x3", 64, 64, 9, 16 * 16),
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
    return np.median(times), min(times), max(times)


def main() -> None:
    import cupy

    backend.set_tf32(False)
    xp = backend.get_namespace("cupy")
    rng = np.random.default_rng(0)
    print(f"dW = dy2.T @ cols, float32, batch {BATCH}, TF32 off, {cupy.cuda.runtime.getDeviceProperties(0)['name']}")
    print(f"{'net':<10} {'layer':<18} {'rows':>7} {'G':>3} {'one GEMM ms':>20} {'split-K ms':>20} {'speed-up':>8} "
          f"{'TFLOP/s':>8}")
    for net, name, C, K, RS, PQ in LAYERS:
        rows = BATCH * PQ
        dy2 = xp.asarray(rng.standard_normal((rows, K), dtype=np.float32))  # (N*P*Q, K)
        cols = xp.asarray(rng.standard_normal((rows, C * RS), dtype=np.float32))  # (N*P*Q, C*R*S)
        G = conv._weight_grad_splits(BATCH, PQ)
        one = _time(cupy, lambda: conv._weight_grad(xp, dy2, cols, 1))
        split = _time(cupy, lambda: conv._weight_grad(xp, dy2, cols, G))
        diff = float(cupy.max(cupy.abs(conv._weight_grad(xp, dy2, cols, 1) - conv._weight_grad(xp, dy2, cols, G))))
        scale = float(cupy.max(cupy.abs(conv._weight_grad(xp, dy2, cols, 1))))
        assert diff <= 1e-4 * scale, (name, diff, scale)
        tflops = 2 * rows * K * C * RS / (split[0] * 1e-3) / 1e12
        print(f"{net:<10} {name:<18} {rows:>7} {G:>3} {one[0]:>8.3f} ({one[1]:.3f}-{one[2]:.3f}) "
              f"{split[0]:>8.3f} ({split[1]:.3f}-{split[2]:.3f}) {one[0] / split[0]:>7.1f}x {tflops:>8.2f}")


if __name__ == "__main__":
    main()
