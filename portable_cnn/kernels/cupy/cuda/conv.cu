// im2col and col2im in the reference column layout: cols is (N*P*Q, C*R*S),
// row (n, p, q), column (c, r, s).

// cols[(n, p, q), (c, r, s)] = x[n, c, p*u - a + r*dh, q*v - b + s*dw], 0 in the padding.
template <typename T, typename I>
__global__ void im2col(const T* __restrict__ x, T* __restrict__ cols, const I total,
                       const int C, const int H, const int W, const int R, const int S, const int P, const int Q,
                       const int u, const int v, const int a, const int b, const int dh, const int dw,
                       const long long sN, const long long sC, const long long sH, const long long sW) {
    GRID_LOOP(i, total) {
        I t = i;
        const int s = (int)(t % S); t /= S;
        const int r = (int)(t % R); t /= R;
        const int c = (int)(t % C); t /= C;
        const int q = (int)(t % Q); t /= Q;
        const int p = (int)(t % P); t /= P;
        const long long n = (long long)t;
        const int h = p * u - a + r * dh;
        const int w = q * v - b + s * dw;
        T value = (T)0;
        if (h >= 0 && h < H && w >= 0 && w < W) {
            value = x[n * sN + c * sC + h * sH + w * sW];
        }
        cols[i] = value;
    }
}

// dx[n, h, w, c] (channels-last memory) = sum over the taps (r, s) that read
// (h, w) of cols[(n, p, q), (c, r, s)]: a gather, deterministic.
template <typename T, typename I>
__global__ void col2im(const T* __restrict__ cols, T* __restrict__ dx, const I total,
                       const int C, const int H, const int W, const int R, const int S, const int P, const int Q,
                       const int u, const int v, const int a, const int b, const int dh, const int dw) {
    const long long row = (long long)C * R * S;
    GRID_LOOP(i, total) {
        I t = i;
        const int c = (int)(t % C); t /= C;
        const int w = (int)(t % W); t /= W;
        const int h = (int)(t % H); t /= H;
        const long long n = (long long)t;
        const T* base = cols + (long long)c * R * S;
        T acc = (T)0;
        for_each_window(h, w, R, S, P, Q, u, v, a, b, dh, dw, [&](const int p, const int q, const int tap) {
            acc += base[((n * P + p) * Q + q) * row + tap];
        });
        dx[i] = acc;
    }
}
