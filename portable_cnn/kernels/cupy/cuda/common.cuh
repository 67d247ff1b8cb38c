// Shared by every CUDA source of portable_cnn (prepended by compile.py).
//
// Kernel arguments: T is float or double; I, the type of the flat work index,
// is int when the work fits (32-bit division is several times cheaper than
// 64-bit on a GPU) and long long otherwise. Memory offsets are always 64-bit.
// Strides are in elements and may be negative or zero.

#define GRID_LOOP(i, total) \
    for (I i = (I)blockIdx.x * (I)blockDim.x + (I)threadIdx.x; i < (total); i += (I)blockDim.x * (I)gridDim.x)

// Split a flat index over an (N, C, Y, X) array, in channels-last (n, y, x, c)
// or channels-first (n, c, y, x) order; returns n.
template <typename I>
__device__ __forceinline__ long long split_index(I t, const int C, const int Y, const int X, const int channels_last,
                                                 int& c, int& y, int& x) {
    if (channels_last) {
        c = (int)(t % C); t /= C;
        x = (int)(t % X); t /= X;
        y = (int)(t % Y); t /= Y;
    } else {
        x = (int)(t % X); t /= X;
        y = (int)(t % Y); t /= Y;
        c = (int)(t % C); t /= C;
    }
    return (long long)t;
}

// The window gather: the adjoint of reading windows, without atomics.
// Calls visit(p, q, tap) for every output position (p, q) whose window reads
// input element (h, w), with tap = r*S + s the kernel offset that reads it,
// in row-major tap order (the order the reference adds them in). Windows
// start at (p*u - a, q*v - b) and step by the dilation (dh, dw).
template <typename F>
__device__ __forceinline__ void for_each_window(const int h, const int w, const int R, const int S, const int P,
                                                const int Q, const int u, const int v, const int a, const int b,
                                                const int dh, const int dw, F visit) {
    for (int r = 0; r < R; ++r) {
        const int hp = h + a - r * dh;  // decreases with r
        if (hp < 0) break;
        if (hp % u != 0) continue;
        const int p = hp / u;
        if (p >= P) continue;
        for (int s = 0; s < S; ++s) {
            const int wq = w + b - s * dw;
            if (wq < 0) break;
            if (wq % v != 0) continue;
            const int q = wq / v;
            if (q >= Q) continue;
            visit(p, q, r * S + s);
        }
    }
}
