"""Does Winograd F(2x2, 3x3) pay in NumPy? A measured prototype against the NumPy convolution kernel (issue 15).

Not part of the library: a forward of a 3x3, stride-1, padding-1 convolution
by Winograd's minimal filtering (Lavin and Gray, 2015), written as fast as
NumPy allows, timed against ``portable_cnn.kernels.numpy.conv.conv2d_forward``
(im2col + GEMM) at vgg-small's layer shapes, one thread each, the same
64 samples, medians of interleaved repeats. docs/benchmarks.md records the
result and why the library keeps im2col.

Per 4x4 input tile ``d`` (stride 2) and filter ``g``: ``U = G g G^T``,
``V = B^T d B``, the 16 products ``M[xi, nu] = V[xi, nu] @ U[xi, nu]`` summed
over channels (16 GEMMs, ``(tiles, C) @ (C, K)``, 2.25x fewer multiplies than
im2col's), and ``Y = A^T M A`` the 2x2 outputs. The transforms run as
whole-row NumPy passes: ``B^T`` over rows on the padded input, then ``B``
over columns as differences of shifted rows (every column, the odd ones
wasted, so that each pass is one contiguous loop), read by the GEMMs in place
through a leading dimension of ``2C``.

    python benchmarks/winograd_f2x3.py          # OPENBLAS_* variables unset for timing
"""

from __future__ import annotations

import statistics
import time

import numpy as np
from threadpoolctl import threadpool_limits

from portable_cnn import config_context
from portable_cnn.kernels.numpy import conv as numpy_conv
from portable_cnn.ops.conv import conv2d_geometry

# F(2x2, 3x3): Y = A^T [(G g G^T) * (B^T d B)] A (Lavin and Gray, eq. 8).
G_MATRIX = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]])


def winograd_weight(w):
    """``(K, C, 3, 3)`` to the 16 transformed filters ``(16, C, K)``, computed in float64."""
    U = np.einsum("ai,kcij,bj->abck", G_MATRIX, w.astype(np.float64), G_MATRIX)  # (4, 4, C, K)
    return np.ascontiguousarray(U.reshape(16, w.shape[1], w.shape[0]).astype(w.dtype))  # (16, C, K)


def _block(xpad, U, y, t, D, M):
    """One block of samples: ``xpad`` (n, H+2, W+4, C) zero-bordered, into ``y`` (n, H, W, K)."""
    n, Hp, Wp, C = xpad.shape
    H, W, K = Hp - 2, Wp - 4, U.shape[2]
    TH, TW = H // 2, W // 2
    r = [xpad[:, k : k + 2 * TH : 2] for k in range(4)]  # 4 x (n, TH, W+4, C): tile rows k
    # B^T over rows: (d0 - d2, d1 + d2, d2 - d1, d1 - d3).
    np.subtract(r[0], r[2], out=t[0])
    np.add(r[1], r[2], out=t[1])
    np.subtract(r[2], r[1], out=t[2])
    np.subtract(r[1], r[3], out=t[3])
    for a in range(4):  # B over columns, at every column; the GEMMs read the even ones
        ta = t[a]
        np.subtract(ta[:, :, 0:W], ta[:, :, 2 : W + 2], out=D[a, 0])
        np.add(ta[:, :, 1 : W + 1], ta[:, :, 2 : W + 2], out=D[a, 1])
        np.subtract(ta[:, :, 2 : W + 2], ta[:, :, 1 : W + 1], out=D[a, 2])
        np.subtract(ta[:, :, 1 : W + 1], ta[:, :, 3 : W + 3], out=D[a, 3])
    V = D.reshape(16, n * TH * TW, 2 * C)[:, :, :C]  # (16, tiles, C), leading dimension 2C
    np.matmul(V, U, out=M)  # (16, tiles, K)
    M6 = M.reshape(4, 4, n, TH, TW, K)  # (xi, nu, n, TH, TW, K)
    s0 = M6[0] + M6[1]  # A^T over xi: rows (m0 + m1 + m2, m1 - m2 - m3)
    s0 += M6[2]
    s1 = M6[1] - M6[2]
    s1 -= M6[3]
    y6 = y.reshape(n, TH, 2, TW, 2, K)  # (n, TH, i, TW, j, K)
    for i, s in enumerate((s0, s1)):  # A over nu
        out = y6[:, :, i, :, 0]
        np.add(s[0], s[1], out=out)
        out += s[2]
        out = y6[:, :, i, :, 1]
        np.subtract(s[1], s[2], out=out)
        out -= s[3]


def winograd_forward(xt, U, bias, block):
    """``y`` (N, H, W, K) from channels-last ``xt`` (N, H, W, C), H and W even, ``block`` samples at a time."""
    N, H, W, C = xt.shape
    K, TH, TW = U.shape[2], H // 2, W // 2
    y = np.empty((N, H, W, K), xt.dtype)
    xpad = np.zeros((block, H + 2, W + 4, C), xt.dtype)  # borders stay zero
    t = np.empty((4, block, TH, W + 4, C), xt.dtype)
    D = np.empty((4, 4, block, TH, W, C), xt.dtype)
    M = np.empty((16, block * TH * TW, K), xt.dtype)
    for i in range(0, N, block):
        b = min(N, i + block) - i
        xpad[:b, 1 : H + 1, 1 : W + 1] = xt[i : i + b]
        _block(xpad[:b], U, y[i : i + b], t[:, :b], D[:, :, :b], M[:, : b * TH * TW])
    if bias is not None:
        y += bias
    return y


def _median_ms(fn, rounds):
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main(samples=64, rounds=15):
    rng = np.random.default_rng(0)
    print(f"{samples} samples, float32, one thread; ms are medians of {rounds} interleaved repeats")
    print("| layer (C->K, HxW) | im2col + GEMM ms | Winograd ms (best block) | speed-up | max rel. difference |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for C, K, HW in ((32, 32, 32), (32, 64, 16), (64, 64, 16)):
        x = rng.standard_normal((samples, HW, HW, C)).astype(np.float32)  # (N, H, W, C)
        w = (rng.standard_normal((K, C, 3, 3)) / np.sqrt(9 * C)).astype(np.float32)
        bias = rng.standard_normal(K).astype(np.float32)
        xn = x.transpose(0, 3, 1, 2)  # (N, C, H, W) view of channels-last memory, as layers pass it
        g = conv2d_geometry(xn.shape, w.shape, 1, 1, 1)
        U = winograd_weight(w)
        expected = numpy_conv.conv2d_forward(np, xn, w, bias, g)[0].transpose(0, 2, 3, 1)  # (N, H, W, K)
        with config_context(num_threads=1), threadpool_limits(1):
            best = None
            for block in (1, 2, 4, 8):
                got = winograd_forward(x, U, bias, block)
                error = float(np.abs(got - expected).max() / np.abs(expected).max())
                im2col_ms, wino_ms = [], []
                for _ in range(rounds):  # interleaved
                    im2col_ms.append(_median_ms(lambda: numpy_conv.conv2d_forward(np, xn, w, bias, g), 1))
                    wino_ms.append(_median_ms(lambda: winograd_forward(x, U, bias, block), 1))
                row = (statistics.median(wino_ms), block, statistics.median(im2col_ms), error)
                best = row if best is None or row[0] < best[0] else best
        wino, block, im2col, error = best
        print(f"| {C}->{K}, {HW}x{HW} | {im2col:.2f} | {wino:.2f} (block {block}) | {im2col / wino:.2f}x | {error:.1e} |")


if __name__ == "__main__":
    main()
