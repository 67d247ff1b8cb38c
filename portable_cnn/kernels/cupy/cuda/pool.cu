// Max, average and global average pooling over (N, C, H, W) arrays read through their strides;
// outputs are written in the memory order of the input (channels-last or not).
//
// Window (p, q) reads rows p*u - a + r*dh and columns q*v - b + s*dw (dh = dw = 1 for
// average pooling); positions outside the input are padding. Under ceil_mode a last window may
// reach past the padding: the bound checks treat it as padding too (docs/derivation.md, section 7).

// y = the largest of the window (padding is -inf), argmax = r*S + s of its
// first occurrence; a NaN wins over numbers and the first NaN is kept, as
// max/argmax do. A dilated window wholly in padding gives -inf and argmax 0.
// With relu set, the ReLU that follows is applied too: a y that is not
// positive (NaN included, as the ReLU kernel) becomes 0 and its argmax -1,
// which the backward matches to no tap (docs/derivation.md, section 7.4).
template <typename T, typename I>
__global__ void max_pool2d_forward(const T* __restrict__ x, T* __restrict__ y, long long* __restrict__ argmax,
                                   const I total, const int C, const int H, const int W, const int R, const int S,
                                   const int P, const int Q, const int u, const int v, const int a, const int b,
                                   const int dh, const int dw,
                                   const long long sN, const long long sC, const long long sH, const long long sW,
                                   const int channels_last, const T lowest, const int relu) {
    GRID_LOOP(i, total) {
        int c, p, q;
        const long long n = split_index<I>(i, C, P, Q, channels_last, c, p, q);
        const T* base = x + n * sN + c * sC;
        T best = lowest;
        long long best_k = 0;
        for (int r = 0; r < R; ++r) {
            const int h = p * u - a + r * dh;
            for (int s = 0; s < S; ++s) {
                const int w = q * v - b + s * dw;
                const T value = (h >= 0 && h < H && w >= 0 && w < W) ? base[h * sH + w * sW] : lowest;
                if (value > best || (value != value && best == best)) {
                    best = value;
                    best_k = r * S + s;
                }
            }
        }
        if (relu && !(best > (T)0)) {
            best = (T)0;
            best_k = -1;
        }
        y[i] = best;
        argmax[i] = best_k;
    }
}

// dx[n, c, h, w] = sum of dy[n, c, p, q] over the windows (p, q) whose first
// maximum is (h, w), in tap order.
template <typename T, typename I>
__global__ void max_pool2d_backward(const T* __restrict__ dy, const long long* __restrict__ argmax,
                                    T* __restrict__ dx, const I total, const int C, const int H, const int W,
                                    const int R, const int S, const int P, const int Q, const int u, const int v,
                                    const int a, const int b, const int dh, const int dw,
                                    const long long gN, const long long gC, const long long gP, const long long gQ,
                                    const long long kN, const long long kC, const long long kP, const long long kQ,
                                    const int channels_last) {
    GRID_LOOP(i, total) {
        int c, h, w;
        const long long n = split_index<I>(i, C, H, W, channels_last, c, h, w);
        T acc = (T)0;
        for_each_window(h, w, R, S, P, Q, u, v, a, b, dh, dw, [&](const int p, const int q, const int tap) {
            if (argmax[n * kN + c * kC + p * kP + q * kQ] == (long long)tap) {
                acc += dy[n * gN + c * gC + p * gP + q * gQ];
            }
        });
        dx[i] = acc;
    }
}

// The divisor of average window (p, q), PyTorch's rule: divisor_override when
// non-zero; else the window clipped to the padded input (count_include_pad;
// R*S unless a ceil_mode window reaches past the padding) or to the input.
__device__ __forceinline__ int avg_divisor(const int p, const int q, const int H, const int W, const int R,
                                           const int S, const int u, const int v, const int a, const int b,
                                           const int count_include_pad, const int divisor_override) {
    if (divisor_override != 0) return divisor_override;
    int h0 = p * u - a, w0 = q * v - b;
    int h1 = min(h0 + R, H + a), w1 = min(w0 + S, W + b);
    if (!count_include_pad) {
        h0 = max(h0, 0);
        w0 = max(w0, 0);
        h1 = min(h1, H);
        w1 = min(w1, W);
    }
    return (h1 - h0) * (w1 - w0);
}

// y = (sum of the window, padding as 0) / avg_divisor.
template <typename T, typename I>
__global__ void avg_pool2d_forward(const T* __restrict__ x, T* __restrict__ y, const I total,
                                   const int C, const int H, const int W, const int R, const int S,
                                   const int P, const int Q, const int u, const int v, const int a, const int b,
                                   const int count_include_pad, const int divisor_override,
                                   const long long sN, const long long sC, const long long sH, const long long sW,
                                   const int channels_last) {
    GRID_LOOP(i, total) {
        int c, p, q;
        const long long n = split_index<I>(i, C, P, Q, channels_last, c, p, q);
        const T* base = x + n * sN + c * sC;
        T acc = (T)0;
        for (int r = 0; r < R; ++r) {
            const int h = p * u - a + r;
            if (h < 0 || h >= H) continue;
            for (int s = 0; s < S; ++s) {
                const int w = q * v - b + s;
                if (w < 0 || w >= W) continue;
                acc += base[h * sH + w * sW];
            }
        }
        y[i] = acc / (T)avg_divisor(p, q, H, W, R, S, u, v, a, b, count_include_pad, divisor_override);
    }
}

// dx[n, c, h, w] = sum of dy[n, c, p, q] / avg_divisor(p, q) over the windows covering (h, w), in tap order.
template <typename T, typename I>
__global__ void avg_pool2d_backward(const T* __restrict__ dy, T* __restrict__ dx, const I total,
                                    const int C, const int H, const int W, const int R, const int S,
                                    const int P, const int Q, const int u, const int v, const int a, const int b,
                                    const int count_include_pad, const int divisor_override,
                                    const long long gN, const long long gC, const long long gP, const long long gQ,
                                    const int channels_last) {
    GRID_LOOP(i, total) {
        int c, h, w;
        const long long n = split_index<I>(i, C, H, W, channels_last, c, h, w);
        T acc = (T)0;
        for_each_window(h, w, R, S, P, Q, u, v, a, b, 1, 1, [&](const int p, const int q, const int tap) {
            const int divisor = avg_divisor(p, q, H, W, R, S, u, v, a, b, count_include_pad, divisor_override);
            acc += dy[n * gN + c * gC + p * gP + q * gQ] / (T)divisor;
        });
        dx[i] = acc;
    }
}

// y[n, c] = mean of x[n, c, :, :]: one thread per (n, c), c fastest, so on
// channels-last input the threads of a warp read neighbouring addresses at
// every step. y is (N, C, 1, 1), the same memory in either layout.
template <typename T, typename I>
__global__ void global_avg_pool2d_forward(const T* __restrict__ x, T* __restrict__ y, const I total,
                                          const int C, const int H, const int W,
                                          const long long sN, const long long sC, const long long sH,
                                          const long long sW) {
    GRID_LOOP(i, total) {
        const int c = (int)(i % C);
        const long long n = (long long)(i / C);
        const T* base = x + n * sN + c * sC;
        T acc = (T)0;
        for (int h = 0; h < H; ++h) {
            for (int w = 0; w < W; ++w) {
                acc += base[h * sH + w * sW];
            }
        }
        y[i] = acc / (T)(H * W);
    }
}

// dx[n, c, h, w] = dy[n, c] / (H*W).
template <typename T, typename I>
__global__ void global_avg_pool2d_backward(const T* __restrict__ dy, T* __restrict__ dx, const I total,
                                           const int C, const int H, const int W,
                                           const long long gN, const long long gC, const int channels_last) {
    const T count = (T)(H * W);
    GRID_LOOP(i, total) {
        int c, h, w;
        const long long n = split_index<I>(i, C, H, W, channels_last, c, h, w);
        dx[i] = dy[n * gN + c * gC] / count;
    }
}
