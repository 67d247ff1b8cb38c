// im2col and col2im: cols is (N*P*Q, C*R*S), row (n, p, q), column
// (g, r, s, c') for channel c = g*Cg + c'.
//
// Cg is the width of the channel-fastest runs. With Cg = C/G (G groups; for
// one group columns (r, s, c)), the order the CuPy convolution uses over a
// channels-last input: the threads of a warp read neighbouring channels,
// neighbouring addresses. With Cg = 1 every channel is its own run and the
// columns are (c, r, s): the reference's order, for an input whose channels
// are not its fastest axis, and for the public im2col/col2im.

// cols[(n, p, q), (g, r, s, c')] = x[n, g*Cg + c', p*u - a + r*dh, q*v - b + s*dw], 0 in the padding.
template <typename T, typename I>
__global__ void im2col(const T* __restrict__ x, T* __restrict__ cols, const I total,
                       const int C, const int H, const int W, const int R, const int S, const int P, const int Q,
                       const int u, const int v, const int a, const int b, const int dh, const int dw,
                       const int Cg,
                       const long long sN, const long long sC, const long long sH, const long long sW) {
    const int G = C / Cg;
    GRID_LOOP(i, total) {
        I t = i;
        const int cg = (int)(t % Cg); t /= Cg;
        const int s = (int)(t % S); t /= S;
        const int r = (int)(t % R); t /= R;
        const int g = (int)(t % G); t /= G;
        const int q = (int)(t % Q); t /= Q;
        const int p = (int)(t % P); t /= P;
        const long long n = (long long)t;
        const int h = p * u - a + r * dh;
        const int w = q * v - b + s * dw;
        T value = (T)0;
        if (h >= 0 && h < H && w >= 0 && w < W) {
            value = x[n * sN + (long long)(g * Cg + cg) * sC + h * sH + w * sW];
        }
        cols[i] = value;
    }
}

// dx[n, h, w, c] (channels-last memory) = sum over the taps (r, s) that read
// (h, w) of cols[(n, p, q), (g, r, s, c')]: a gather, deterministic, adding in
// the reference's tap order. With Cg > 1 neighbouring channels read
// neighbouring columns.
template <typename T, typename I>
__global__ void col2im(const T* __restrict__ cols, T* __restrict__ dx, const I total,
                       const int C, const int H, const int W, const int R, const int S, const int P, const int Q,
                       const int u, const int v, const int a, const int b, const int dh, const int dw,
                       const int Cg) {
    const long long row = (long long)C * R * S;
    GRID_LOOP(i, total) {
        I t = i;
        const int c = (int)(t % C); t /= C;
        const int w = (int)(t % W); t /= W;
        const int h = (int)(t % H); t /= H;
        const long long n = (long long)t;
        const int g = c / Cg;
        const T* base = cols + (long long)g * R * S * Cg + (c - g * Cg);
        T acc = (T)0;
        for_each_window(h, w, R, S, P, Q, u, v, a, b, dh, dw, [&](const int p, const int q, const int tap) {
            acc += base[((n * P + p) * Q + q) * row + (long long)tap * Cg];
        });
        dx[i] = acc;
    }
}
