"""CuPy fast paths of the window ops: im2col, col2im and pooling as single CUDA kernels.

The standard path (``conv.py``, ``pool.py``) loops over the ``R*S`` kernel
taps in Python and launches several whole-array operations per tap; on a GPU
each of those is a kernel launch and a pass over memory, and col2im's
scatter-add needs a read-modify-write per tap. Here each op is one kernel,
called from the standard functions as an early return when the arrays are
CuPy's (float32 or float64)::

    im2col               one thread per element of cols (N*P*Q, C*R*S),
                         the layout of the standard path
    col2im               a gather: one thread per input element (n, c, h, w)
                         sums the cols entries that read it; no atomics, so
                         the result is deterministic (also in float64) and
                         adds in the standard path's tap order
    max_pool2d           one thread per output; the first maximum wins, as
                         in the standard path and PyTorch
    max_pool2d_backward  a gather like col2im (no atomics)
    avg_pool2d(_backward)  likewise, padding counted in the divisor
    relu(_backward)      one elementwise kernel each (three on the standard path)
    softmax_cross_entropy  one thread per row: softmax, log-sum-exp and the
                         label's -log p in one pass; the backward one kernel
    sgd_momentum_step    the whole SGD update of a parameter in one kernel

Inputs are read through their strides, so a channels-last view (what the
CuPy conv returns: an (N, K, P, Q) view of the GEMM's (N, P, Q, K) result)
needs no copy. Outputs that are (N, C, *, *) are written in the memory order
of the input (channels-last or not) and returned as (N, C, *, *) views, so
the threads of a warp write neighbouring addresses.

CuPy is imported only inside these functions (they run only when CuPy arrays
reached an op); the CUDA module is compiled once per device, on first use,
and cached (CuPy also keeps the compiled binary on disk).

The module also turns CuPy's out-of-memory error inside a convolution into a
:class:`MemoryError` that says what to change (:func:`explain_out_of_memory`).
"""

from __future__ import annotations

import functools
import inspect
import sys

import numpy as np

__all__ = [
    "supports",
    "im2col",
    "col2im",
    "max_pool2d",
    "max_pool2d_backward",
    "avg_pool2d",
    "avg_pool2d_backward",
    "relu",
    "relu_backward",
    "softmax_cross_entropy",
    "softmax_cross_entropy_backward",
    "sgd_momentum_step",
    "explain_out_of_memory",
]

# Kernel arguments: T is float or double; I, the type of the flat work index,
# is int when the work fits (32-bit division is several times cheaper than
# 64-bit on a GPU) and long long otherwise. Memory offsets are always 64-bit.
# Strides are in elements and may be negative or zero.
_SOURCE = r"""
#define GRID_LOOP(i, total) \
    for (I i = (I)blockIdx.x * (I)blockDim.x + (I)threadIdx.x; i < (total); i += (I)blockDim.x * (I)gridDim.x)

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
// (h, w): cols[(n, p, q), (c, r, s)] with p*u = h + a - r*dh, q*v = w + b - s*dw.
// Taps are added in row-major order, as the standard path adds them.
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
        T acc = (T)0;
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
                acc += cols[((n * P + p) * Q + q) * row + ((long long)c * R + r) * S + s];
            }
        }
        dx[i] = acc;
    }
}

// Split a flat index over an (N, C, Y, X) array, in channels-last (n, y, x, c)
// or channels-first (n, c, y, x) order.
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
        for (int r = 0; r < R; ++r) {
            const int hp = h + a - r;
            if (hp < 0) break;
            if (hp % u != 0) continue;
            const int p = hp / u;
            if (p >= P) continue;
            for (int s = 0; s < S; ++s) {
                const int wq = w + b - s;
                if (wq < 0) break;
                if (wq % v != 0) continue;
                const int q = wq / v;
                if (q >= Q) continue;
                if (argmax[n * kN + c * kC + p * kP + q * kQ] == (long long)(r * S + s)) {
                    acc += dy[n * gN + c * gC + p * gP + q * gQ];
                }
            }
        }
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
        for (int r = 0; r < R; ++r) {
            const int hp = h + a - r;
            if (hp < 0) break;
            if (hp % u != 0) continue;
            const int p = hp / u;
            if (p >= P) continue;
            for (int s = 0; s < S; ++s) {
                const int wq = w + b - s;
                if (wq < 0) break;
                if (wq % v != 0) continue;
                const int q = wq / v;
                if (q >= Q) continue;
                acc += dy[n * gN + c * gC + p * gP + q * gQ] / count;
            }
        }
        dx[i] = acc;
    }
}

// Per row n: logp = shifted - log(sum(exp(shifted))), shifted = logits - max (a NaN
// propagates, as max does); probs = exp(logp); nll[n] = -logp[label] (0 for a label
// outside [0, K), as the standard path's one-hot row of zeros gives).
template <typename T, typename I>
__global__ void softmax_cross_entropy_forward(const T* __restrict__ logits, const long long* __restrict__ labels,
                                              T* __restrict__ probs, T* __restrict__ nll, const I total, const int K,
                                              const long long sN, const long long sK) {
    GRID_LOOP(n, total) {
        const T* row = logits + (long long)n * sN;
        T m = row[0];
        for (int k = 1; k < K; ++k) {
            const T value = row[k * sK];
            if (value > m || (value != value && m == m)) m = value;
        }
        T sum = (T)0;
        for (int k = 0; k < K; ++k) sum += exp(row[k * sK] - m);
        const T log_sum = log(sum);
        T* out = probs + (long long)n * K;
        for (int k = 0; k < K; ++k) out[k] = exp((row[k * sK] - m) - log_sum);
        const long long label = labels[n];
        nll[n] = (label >= 0 && label < K) ? -((row[label * sK] - m) - log_sum) : (T)0;
    }
}
"""

_KERNELS = (
    "im2col", "col2im", "max_pool2d_forward", "max_pool2d_backward", "avg_pool2d_forward", "avg_pool2d_backward",
    "softmax_cross_entropy_forward",
)
_C_TYPES = {"float32": "float", "float64": "double"}
_INDEX_TYPES = {"int": np.int32, "long long": np.int64}
_THREADS = 256
# Grid-stride loops: enough blocks to fill any current GPU many times over,
# and few enough that ``i + stride`` cannot overflow a 32-bit index below 2**30.
_MAX_BLOCKS = 65536
_INT_INDEX_LIMIT = 2**30

_modules: dict = {}    # device id -> cupy.RawModule
_functions: dict = {}  # (device id, kernel, C type, index type) -> cupy.RawKernel


def supports(dtype) -> bool:
    """Whether the kernels here handle arrays of ``dtype`` (float32 and float64)."""
    return str(dtype) in _C_TYPES


def _function(cupy, name: str, dtype, index_type: str):
    """The compiled kernel ``name<T, I>`` for the current device, compiling the module on first use."""
    device = cupy.cuda.Device().id
    key = (device, name, _C_TYPES[str(dtype)], index_type)
    function = _functions.get(key)
    if function is None:
        module = _modules.get(device)
        if module is None:
            expressions = [f"{k}<{t}, {i}>" for k in _KERNELS for t in _C_TYPES.values() for i in _INDEX_TYPES]
            module = cupy.RawModule(code=_SOURCE, name_expressions=expressions)
            _modules[device] = module
        function = module.get_function(f"{name}<{key[2]}, {index_type}>")
        _functions[key] = function
    return function


def _launch(cupy, name: str, dtype, total: int, arrays: tuple, ints: tuple, tail: tuple = ()) -> None:
    """Run kernel ``name`` over ``total`` items; arguments: ``arrays``, ``total``, ``ints`` (as int), ``tail``."""
    if total == 0:
        return
    index_type = "int" if total < _INT_INDEX_LIMIT else "long long"
    function = _function(cupy, name, dtype, index_type)
    blocks = min(-(-total // _THREADS), _MAX_BLOCKS)
    args = (*arrays, _INDEX_TYPES[index_type](total), *(np.int32(n) for n in ints), *tail)
    function((blocks,), (_THREADS,), args)


def _strides(a) -> tuple:
    """Strides of ``a`` in elements, as the kernels' 64-bit arguments."""
    return tuple(np.int64(s // a.itemsize) for s in a.strides)


def _channels_last(a) -> bool:
    """True when the channel axis of the (N, C, Y, X) array ``a`` is the fastest in memory."""
    _, C, Y, X = a.shape
    return C > 1 and Y * X > 1 and abs(a.strides[1]) == a.itemsize


def _nchw_output(cupy, N, C, Y, X, dtype, channels_last: bool):
    """A new (N, C, Y, X) array laid out channels-last or not, and the flat buffer the kernels write."""
    if channels_last:
        flat = cupy.empty((N, Y, X, C), dtype=dtype)  # (N, Y, X, C)
        return flat.transpose(0, 3, 1, 2), flat  # (N, C, Y, X) view
    flat = cupy.empty((N, C, Y, X), dtype=dtype)  # (N, C, Y, X)
    return flat, flat


def _cupy_module():
    import cupy  # only reached with CuPy arrays in hand

    return cupy


def im2col(x, R, S, u, v, a, b, dh, dw, P, Q):
    """CuPy im2col: ``(N, C, H, W)`` to ``(N*P*Q, C*R*S)``, the standard path's layout, in one kernel."""
    cupy = _cupy_module()
    N, C, H, W = x.shape
    with x.device:
        cols = cupy.empty((N * P * Q, C * R * S), dtype=x.dtype)  # (N*P*Q, C*R*S)
        _launch(cupy, "im2col", x.dtype, cols.size, (x, cols), (C, H, W, R, S, P, Q, u, v, a, b, dh, dw), _strides(x))
    return cols


def col2im(cols, x_shape, R, S, u, v, a, b, dh, dw, P, Q):
    """CuPy col2im: ``(N*P*Q, C*R*S)`` back onto ``(N, C, H, W)`` by a deterministic gather.

    Returns an ``(N, C, H, W)`` view of channels-last memory: a thread per
    ``(n, h, w, c)`` reads ``C*R*S``-wide rows of ``cols`` at neighbouring
    columns, which the caches serve well.
    """
    cupy = _cupy_module()
    N, C, H, W = x_shape
    if tuple(cols.shape) != (N * P * Q, C * R * S):
        raise ValueError(f"col2im: expected cols of shape {(N * P * Q, C * R * S)} for input shape {tuple(x_shape)}, "
                         f"got {tuple(cols.shape)}")
    with cols.device:
        cols = cupy.ascontiguousarray(cols)  # the kernel indexes rows directly; a no-op for a GEMM result
        dx, flat = _nchw_output(cupy, N, C, H, W, cols.dtype, channels_last=True)
        _launch(cupy, "col2im", cols.dtype, flat.size, (cols, flat), (C, H, W, R, S, P, Q, u, v, a, b, dh, dw))
    return dx


def max_pool2d(x, R, S, u, v, a, b, P, Q):
    """CuPy max pooling in one kernel: ``(y, argmax)`` as the standard path returns them (argmax int64)."""
    cupy = _cupy_module()
    N, C, H, W = x.shape
    channels_last = _channels_last(x)
    with x.device:
        y, y_flat = _nchw_output(cupy, N, C, P, Q, x.dtype, channels_last)
        argmax, argmax_flat = _nchw_output(cupy, N, C, P, Q, np.int64, channels_last)
        lowest = np.array(-np.inf, dtype=x.dtype)[()]  # the kernel's T
        _launch(cupy, "max_pool2d_forward", x.dtype, y_flat.size, (x, y_flat, argmax_flat),
                (C, H, W, R, S, P, Q, u, v, a, b), (*_strides(x), np.int32(channels_last), lowest))
    return y, argmax


def max_pool2d_backward(dy, argmax, x_shape, R, S, u, v, a, b, P, Q):
    """CuPy gradient of max pooling: a gather over the windows covering each input element, no atomics."""
    cupy = _cupy_module()
    N, C, H, W = x_shape
    channels_last = _channels_last(dy)
    with dy.device:
        if argmax.dtype != np.int64:
            argmax = argmax.astype(np.int64)
        dx, flat = _nchw_output(cupy, N, C, H, W, dy.dtype, channels_last)
        _launch(cupy, "max_pool2d_backward", dy.dtype, flat.size, (dy, argmax, flat),
                (C, H, W, R, S, P, Q, u, v, a, b), (*_strides(dy), *_strides(argmax), np.int32(channels_last)))
    return dx


def avg_pool2d(x, R, S, u, v, a, b, P, Q):
    """CuPy average pooling in one kernel (padding counts in the divisor)."""
    cupy = _cupy_module()
    N, C, H, W = x.shape
    channels_last = _channels_last(x)
    with x.device:
        y, flat = _nchw_output(cupy, N, C, P, Q, x.dtype, channels_last)
        _launch(cupy, "avg_pool2d_forward", x.dtype, flat.size, (x, flat),
                (C, H, W, R, S, P, Q, u, v, a, b), (*_strides(x), np.int32(channels_last)))
    return y


def avg_pool2d_backward(dy, x_shape, R, S, u, v, a, b, P, Q):
    """CuPy gradient of average pooling: a gather, no atomics."""
    cupy = _cupy_module()
    N, C, H, W = x_shape
    channels_last = _channels_last(dy)
    with dy.device:
        dx, flat = _nchw_output(cupy, N, C, H, W, dy.dtype, channels_last)
        _launch(cupy, "avg_pool2d_backward", dy.dtype, flat.size, (dy, flat),
                (C, H, W, R, S, P, Q, u, v, a, b), (*_strides(dy), np.int32(channels_last)))
    return dx


# --- elementwise work, fused ----------------------------------------------------
# The standard path spends three kernels on a ReLU (compare, zeros, where) and
# about fifteen on the loss; on a GPU each is a launch that costs more than
# the arithmetic of a small network. One kernel each here.
_elementwise: dict = {}  # name -> cupy.ElementwiseKernel


def _elementwise_kernel(cupy, name, in_params, out_params, body):
    kernel = _elementwise.get(name)
    if kernel is None:
        kernel = cupy.ElementwiseKernel(in_params, out_params, body, f"portable_cnn_{name}")
        _elementwise[name] = kernel
    return kernel


def relu(x):
    """CuPy ``x > 0 ? x : 0`` in one kernel (NaN gives 0, as the standard path's ``where``), x's memory layout."""
    cupy = _cupy_module()
    kernel = _elementwise_kernel(cupy, "relu", "T x", "T y", "y = x > (T)0 ? x : (T)0")
    with x.device:
        return kernel(x, cupy.empty_like(x))


def relu_backward(dy, x):
    """CuPy ``x > 0 ? dy : 0`` in one kernel, dy's memory layout."""
    cupy = _cupy_module()
    kernel = _elementwise_kernel(cupy, "relu_backward", "T dy, T x", "T dx", "dx = x > (T)0 ? dy : (T)0")
    with dy.device:
        return kernel(dy, x, cupy.empty_like(dy))


def softmax_cross_entropy(logits, labels):
    """CuPy mean cross-entropy and softmax of ``(N, K)`` logits in one kernel (plus the mean): ``(loss, probs)``."""
    cupy = _cupy_module()
    N, K = logits.shape
    with logits.device:
        labels = cupy.ascontiguousarray(labels.astype(np.int64, copy=False))  # (N,)
        probs = cupy.empty((N, K), dtype=logits.dtype)  # (N, K)
        nll = cupy.empty((N,), dtype=logits.dtype)  # (N,) -log p(label)
        sN, sK = _strides(logits)
        _launch(cupy, "softmax_cross_entropy_forward", logits.dtype, N, (logits, labels, probs, nll), (K,), (sN, sK))
        return cupy.sum(nll) / N, probs  # 0-d, (N, K)


def softmax_cross_entropy_backward(probs, labels, scale):
    """CuPy ``(probs - onehot(labels)) * scale`` in one kernel; ``scale`` is ``dloss / N``."""
    cupy = _cupy_module()
    N, K = probs.shape
    kernel = _elementwise_kernel(
        cupy, "softmax_cross_entropy_backward", "T p, raw int64 labels, int32 K, T scale", "T dlogits",
        "dlogits = (p - ((long long)(i % K) == labels[i / K] ? (T)1 : (T)0)) * scale",
    )
    with probs.device:
        labels = cupy.ascontiguousarray(labels.astype(np.int64, copy=False))  # (N,)
        return kernel(probs, labels, np.int32(K), probs.dtype.type(scale), cupy.empty((N, K), dtype=probs.dtype))


# --- the SGD update ---------------------------------------------------------
# SGD with momentum is five whole-array operations per parameter on the
# standard path (weight decay, two scalings, a sum, the step), each a kernel
# launch; for a small network the optimizer was a fifth of a CuPy training
# step, all launch overhead. One elementwise kernel per parameter does the
# same arithmetic, operation by operation: --fmad=false keeps every product
# and sum rounded on its own, as the separate kernels round them.
_SGD_BODY = """
T d = weight_decay != (T)0 ? g + weight_decay * p : g;
T b = momentum * buf + one_minus_dampening * d;
buf_out = b;
p_out = p - lr * ({step});
"""
_sgd_kernels: dict = {}  # nesterov -> cupy.ElementwiseKernel


def sgd_momentum_step(param, grad, buf, lr, momentum, dampening, weight_decay, nesterov):
    """One SGD step with momentum, in one kernel: returns new ``(param, momentum_buffer)`` arrays.

    The update of :class:`portable_cnn.optim.SGD` after its first step (the
    buffer exists): ``d = g + weight_decay * p``, ``buf = momentum * buf +
    (1 - dampening) * d``, ``p = p - lr * (d + momentum * buf if nesterov
    else buf)``, with the Python numbers cast to the parameter's dtype as the
    standard path's operations cast them. The inputs are not written.
    """
    cupy = _cupy_module()
    kernel = _sgd_kernels.get(bool(nesterov))
    if kernel is None:
        kernel = cupy.ElementwiseKernel(
            "T p, T g, T buf, T lr, T momentum, T one_minus_dampening, T weight_decay",
            "T p_out, T buf_out",
            _SGD_BODY.format(step="d + momentum * b" if nesterov else "b"),
            "portable_cnn_sgd_nesterov" if nesterov else "portable_cnn_sgd_momentum",
            options=("--fmad=false",),
        )
        _sgd_kernels[bool(nesterov)] = kernel
    scalar = param.dtype.type
    with param.device:
        return kernel(param, grad, buf, scalar(lr), scalar(momentum), scalar(1 - dampening), scalar(weight_decay))


# --- GPU out of memory ------------------------------------------------------


def _is_gpu_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is CuPy's (or CUDA's, or cuBLAS's) report that device memory ran out."""
    cupy = sys.modules.get("cupy")
    if cupy is None:  # CuPy never imported: the error cannot be a GPU one
        return False
    if isinstance(exc, cupy.cuda.memory.OutOfMemoryError):
        return True
    text = str(exc)
    return (type(exc).__name__ == "CUDARuntimeError" and "MemoryAllocation" in text) or (
        type(exc).__name__ == "CUBLASError" and "ALLOC_FAILED" in text
    )


def _out_of_memory_message(func, args, kwargs, exc) -> str:
    from . import conv  # at call time: conv imports this module

    bound = inspect.signature(func).bind_partial(*args, **kwargs).arguments
    x = bound.get("x")
    where = bound.get("where") or func.__name__
    direction = "backward" if func.__name__.endswith("backward") else "forward"
    if x is not None and getattr(x, "ndim", 0) == 4:
        batch = f"input {tuple(x.shape)} {x.dtype}, batch size {x.shape[0]}"
    else:
        batch = "batch size unknown"
    pool = ""
    try:
        cupy = sys.modules["cupy"]
        free, total = cupy.cuda.runtime.memGetInfo()
        held = cupy.get_default_memory_pool().total_bytes()
        pool = (f"; device {free / 2**20:,.0f} of {total / 2**20:,.0f} MiB free, "
                f"CuPy's pool holds {held / 2**20:,.0f} MiB")
    except Exception:  # a report about memory must not fail for want of it
        pass
    return (
        f"{where}: the GPU ran out of memory in the convolution {direction} ({batch}; "
        f"im2col workspace limit {conv.get_workspace_limit():g} MB{pool}). "
        "Use a smaller batch size, or lower the workspace limit so that the convolution runs on slices of "
        "the batch: portable_cnn.ops.conv.set_workspace_limit(megabytes) or the PORTABLE_CNN_WORKSPACE_MB "
        f"environment variable. (CuPy said: {type(exc).__name__}: {exc})"
    )


def explain_out_of_memory(func):
    """Decorator for the convolution: a GPU out-of-memory error becomes a :class:`MemoryError` saying what to change.

    The message names the layer (``where``), the input and batch size and the
    im2col workspace limit, and suggests a smaller batch or a lower limit; the
    original CuPy error is chained as its cause. Other errors, and the
    ``MemoryError`` of a nested call (a slice of the batch), pass unchanged.
    """

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except Exception as exc:
            if not _is_gpu_out_of_memory(exc):
                raise
            raise MemoryError(_out_of_memory_message(func, args, kwargs, exc)) from exc

    return wrapper
