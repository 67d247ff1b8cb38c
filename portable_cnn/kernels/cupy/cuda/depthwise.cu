// Depthwise convolution (groups == C): output channel k = c*M + m filters input channel c = k / M
// alone (M = K/C, the channel multiplier), with the weight w[k, 0, r, s] read as a contiguous (K, R*S)
// array. x and dy are read through their strides; y and dx are written channels-last, (n, y, x, channel)
// with the channel fastest, so the threads of a warp write neighbouring addresses. No atomics anywhere:
// every result is a sum in a fixed order, the same from run to run.

// y[n, p, q, k] = sum over the taps (r, s), in row-major order, of
// x[n, k/M, p*u - a + r*dh, q*v - b + s*dw] * w[k, r, s] (0 in the padding), then + bias[k].
template <typename T, typename I>
__global__ void depthwise_conv2d_forward(const T* __restrict__ x, const T* __restrict__ w,
                                         const T* __restrict__ bias, T* __restrict__ y, const I total,
                                         const int C, const int H, const int W, const int M, const int R,
                                         const int S, const int P, const int Q, const int u, const int v,
                                         const int a, const int b, const int dh, const int dw, const int has_bias,
                                         const long long sN, const long long sC, const long long sH,
                                         const long long sW) {
    GRID_LOOP(i, total) {
        int k, p, q;
        const long long n = split_index<I>(i, C * M, P, Q, 1, k, p, q);
        const T* xc = x + n * sN + (long long)(k / M) * sC;
        const T* wk = w + (long long)k * R * S;
        T acc = (T)0;
        for (int r = 0; r < R; ++r) {
            const int h = p * u - a + r * dh;
            if (h < 0 || h >= H) continue;
            for (int s = 0; s < S; ++s) {
                const int col = q * v - b + s * dw;
                if (col < 0 || col >= W) continue;
                acc += xc[h * sH + col * sW] * wk[r * S + s];
            }
        }
        if (has_bias) acc += bias[k];
        y[i] = acc;
    }
}

// dx[n, h, w, c] = sum over the windows (p, q) and taps that read (h, w), in tap order, and over the
// multipliers m of dy[n, c*M + m, p, q] * w[c*M + m, tap]: a gather, one thread per input element.
template <typename T, typename I>
__global__ void depthwise_conv2d_backward_input(const T* __restrict__ dy, const T* __restrict__ w,
                                                T* __restrict__ dx, const I total, const int C, const int H,
                                                const int W, const int M, const int R, const int S, const int P,
                                                const int Q, const int u, const int v, const int a, const int b,
                                                const int dh, const int dw, const long long gN, const long long gK,
                                                const long long gP, const long long gQ) {
    GRID_LOOP(i, total) {
        int c, h, col;
        const long long n = split_index<I>(i, C, H, W, 1, c, h, col);
        const T* dyc = dy + n * gN + (long long)c * M * gK;
        const T* wc = w + (long long)c * M * R * S;
        T acc = (T)0;
        for_each_window(h, col, R, S, P, Q, u, v, a, b, dh, dw, [&](const int p, const int q, const int tap) {
            for (int m = 0; m < M; ++m) {
                acc += dyc[m * gK + p * gP + q * gQ] * wc[m * R * S + tap];
            }
        });
        dx[i] = acc;
    }
}

// The weight gradient dw[k, 0, r, s] = sum over the N*P*Q positions (n, p, q) of
// dy[n, k, p, q] * x[n, k/M, p*u - a + r*dh, q*v - b + s*dw], in two passes: a block reduction would
// need shared memory and barriers, two plain passes need neither and add in an order fixed by the shapes.
//
// Pass 1: partial[chunk, tap, k] sums the positions chunk*chunk_len .. (chunk+1)*chunk_len - 1 (row-major
// (n, p, q)), one thread each; k is the fastest index, so a warp reads neighbouring channels of
// channels-last x and dy.
template <typename T, typename I>
__global__ void depthwise_conv2d_weight_partial(const T* __restrict__ x, const T* __restrict__ dy,
                                                T* __restrict__ partial, const I total, const int N, const int C,
                                                const int H, const int W, const int M, const int R, const int S,
                                                const int P, const int Q, const int u, const int v, const int a,
                                                const int b, const int dh, const int dw, const int chunk_len,
                                                const long long sN, const long long sC, const long long sH,
                                                const long long sW, const long long gN, const long long gK,
                                                const long long gP, const long long gQ) {
    const int K = C * M;
    const long long positions = (long long)N * P * Q;
    GRID_LOOP(i, total) {
        I t = i;
        const int k = (int)(t % K); t /= K;
        const int tap = (int)(t % (R * S)); t /= (R * S);
        const long long start = (long long)t * chunk_len;
        const long long stop = start + chunk_len < positions ? start + chunk_len : positions;
        const int r = tap / S, s = tap % S;
        const T* xc = x + (long long)(k / M) * sC;
        const T* dyk = dy + (long long)k * gK;
        // The position (n, p, q) of `start`, then stepped along without a division per position.
        int q = (int)(start % Q), p = (int)((start / Q) % P);
        long long n = start / ((long long)P * Q);
        T acc = (T)0;
        for (long long j = start; j < stop; ++j) {
            const int h = p * u - a + r * dh;
            const int col = q * v - b + s * dw;
            if (h >= 0 && h < H && col >= 0 && col < W) {
                acc += dyk[n * gN + p * gP + q * gQ] * xc[n * sN + h * sH + col * sW];
            }
            if (++q == Q) {
                q = 0;
                if (++p == P) {
                    p = 0;
                    ++n;
                }
            }
        }
        partial[i] = acc;
    }
}

// Pass 2: dw[k, tap] = sum over the chunks, in order, of partial[chunk, tap, k]; k is the fastest thread
// index, so a warp reads a contiguous run of partial.
template <typename T, typename I>
__global__ void depthwise_conv2d_weight_sum(const T* __restrict__ partial, T* __restrict__ dw, const I total,
                                            const int K, const int taps, const int chunks) {
    GRID_LOOP(i, total) {
        const int k = (int)(i % K);
        const int tap = (int)(i / K);
        T acc = (T)0;
        for (int chunk = 0; chunk < chunks; ++chunk) {
            acc += partial[((long long)chunk * taps + tap) * K + k];
        }
        dw[(long long)k * taps + tap] = acc;
    }
}
