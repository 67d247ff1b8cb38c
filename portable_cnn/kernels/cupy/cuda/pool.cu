// Max and average pooling over (N, C, H, W) arrays read through their strides;
// outputs are written in the memory order of the input (channels-last or not).

// y = the largest of the window (padding is -inf), argmax = r*S + s of its
// first occurrence; a NaN wins over numbers and the first NaN is kept, as
// max/argmax do.
template <typename T, typename I>
__global__ void max_pool2d_forward(const T* __restrict__ x, T* __restrict__ y, long long* __restrict__ argmax,
                                   const I total, const int C, const int H, const int W, const int R, const int S,
                                   const int P, const int Q, const int u, const int v, const int a, const int b,
                                   const long long sN, const long long sC, const long long sH, const long long sW,
                                   const int channels_last, const T lowest) {
    GRID_LOOP(i, total) {
        int c, p, q;
        const long long n = split_index<I>(i, C, P, Q, channels_last, c, p, q);
        const T* base = x + n * sN + c * sC;
        T best = lowest;
        long long best_k = 0;
        for (int r = 0; r < R; ++r) {
            const int h = p * u - a + r;
            for (int s = 0; s < S; ++s) {
                const int w = q * v - b + s;
                const T value = (h >= 0 && h < H && w >= 0 && w < W) ? base[h * sH + w * sW] : lowest;
                if (value > best || (value != value && best == best)) {
                    best = value;
                    best_k = r * S + s;
                }
            }
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
                                    const int a, const int b,
                                    const long long gN, const long long gC, const long long gP, const long long gQ,
                                    const long long kN, const long long kC, const long long kP, const long long kQ,
                                    const int channels_last) {
    GRID_LOOP(i, total) {
        int c, h, w;
        const long long n = split_index<I>(i, C, H, W, channels_last, c, h, w);
        T acc = (T)0;
        for_each_window(h, w, R, S, P, Q, u, v, a, b, 1, 1, [&](const int p, const int q, const int tap) {
            if (argmax[n * kN + c * kC + p * kP + q * kQ] == (long long)tap) {
                acc += dy[n * gN + c * gC + p * gP + q * gQ];
            }
        });
        dx[i] = acc;
    }
}

// y = (sum of the window, padding as 0) / (R*S).
template <typename T, typename I>
__global__ void avg_pool2d_forward(const T* __restrict__ x, T* __restrict__ y, const I total,
                                   const int C, const int H, const int W, const int R, const int S,
                                   const int P, const int Q, const int u, const int v, const int a, const int b,
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
        y[i] = acc / (T)(R * S);
    }
}

// dx[n, c, h, w] = sum of dy[n, c, p, q] / (R*S) over the windows covering (h, w), in tap order.
template <typename T, typename I>
__global__ void avg_pool2d_backward(const T* __restrict__ dy, T* __restrict__ dx, const I total,
                                    const int C, const int H, const int W, const int R, const int S,
                                    const int P, const int Q, const int u, const int v, const int a, const int b,
                                    const long long gN, const long long gC, const long long gP, const long long gQ,
                                    const int channels_last) {
    const T count = (T)(R * S);
    GRID_LOOP(i, total) {
        int c, h, w;
        const long long n = split_index<I>(i, C, H, W, channels_last, c, h, w);
        T acc = (T)0;
        for_each_window(h, w, R, S, P, Q, u, v, a, b, 1, 1, [&](const int p, const int q, const int tap) {
            acc += dy[n * gN + c * gC + p * gP + q * gQ] / count;
        });
        dx[i] = acc;
    }
}
