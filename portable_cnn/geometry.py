"""Window geometry of convolution and pooling, as small immutable objects of plain integers.

Notation of docs/derivation.md and the seed: input ``(N, C, H, W)``, kernel
``R x S``, strides ``(u, v)``, paddings ``(a, b)``, dilations ``(d_h, d_w)``,
output ``(N, K, P, Q)`` (``K = C`` for pooling). An op validates its
arguments into one of these once; every kernel reads the same fields, so no
kernel takes more than a handful of arguments.

This module imports nothing of the package: ops, kernels and layers all use it.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

__all__ = ["pair", "out_size", "pool_out_size", "ConvGeometry", "PoolGeometry", "ConvColumns"]


def pair(value, name: str, where: str, *, minimum: int) -> tuple[int, int]:
    """Normalise an int or a pair of ints to ``(vertical, horizontal)``.

    Raises ``TypeError`` for a non-integer and ``ValueError`` below ``minimum``.

    >>> pair(3, "kernel_size", "Conv2d", minimum=1), pair((2, 1), "stride", "Conv2d", minimum=1)
    ((3, 3), (2, 1))
    """
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{where}: {name} must be an int or a pair of ints, got {value!r}")
        items = tuple(value)
    else:
        items = (value, value)
    out = []
    for v in items:
        if isinstance(v, bool):
            raise TypeError(f"{where}: {name} must be an int or a pair of ints, got {value!r}")
        try:
            out.append(operator.index(v))
        except TypeError:
            raise TypeError(f"{where}: {name} must be an int or a pair of ints, got {value!r}") from None
    if min(out) < minimum:
        bound = "positive" if minimum == 1 else "non-negative"
        raise ValueError(f"{where}: {name} must be {bound}, got {value!r}")
    return out[0], out[1]


def out_size(size: int, kernel: int, stride: int, padding: int, dilation: int = 1) -> int:
    """Output length of a sliding window: ``(H + 2a - d(R - 1) - 1) // u + 1``.

    With ``d = 1`` this is ``floor((H + 2a - R) / u) + 1``, which equals the
    seed's ``ceil((H - R + 1 + 2a) / u)`` (docs/derivation.md, section 1).

    >>> out_size(28, 5, 1, 2), out_size(7, 3, 2, 0), out_size(7, 3, 2, 1, dilation=2)
    (28, 3, 3)
    """
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def pool_out_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Output length of a pooling window (no dilation); see :func:`out_size`."""
    return out_size(size, kernel, stride, padding)


@dataclass(frozen=True)
class ConvGeometry:
    """Shapes and options of one convolution call; build it with :meth:`of`.

    >>> g = ConvGeometry.of((2, 3, 8, 8), (4, 3, 3, 3), stride=2, padding=1, dilation=1)
    >>> (g.P, g.Q), g.y_shape, g.cols_shape
    ((4, 4), (2, 4, 4, 4), (32, 27))
    """

    N: int
    C: int
    H: int
    W: int
    K: int
    R: int
    S: int
    u: int
    v: int
    a: int
    b: int
    dh: int
    dw: int
    P: int
    Q: int

    @classmethod
    def of(cls, x_shape, w_shape, stride, padding, dilation, where: str = "conv2d") -> "ConvGeometry":
        """Validate ``(N, C, H, W)``, ``(K, C, R, S)`` and the options; raise naming ``where``."""
        u, v = pair(stride, "stride", where, minimum=1)
        a, b = pair(padding, "padding", where, minimum=0)
        dh, dw = pair(dilation, "dilation", where, minimum=1)
        N, C, H, W = (int(n) for n in x_shape)
        K, Cw, R, S = (int(n) for n in w_shape)
        if Cw != C:
            raise ValueError(
                f"{where}: expected input with {Cw} channels (weight shape {tuple(w_shape)}), "
                f"got {C} channels (input shape {tuple(x_shape)})"
            )
        if R < 1 or S < 1:
            raise ValueError(f"{where}: kernel must be at least 1x1, got weight shape {tuple(w_shape)}")
        P, Q = out_size(H, R, u, a, dh), out_size(W, S, v, b, dw)
        if P < 1 or Q < 1:
            raise ValueError(
                f"{where}: kernel {dh * (R - 1) + 1}x{dw * (S - 1) + 1} (with dilation) is larger than the "
                f"padded input {H + 2 * a}x{W + 2 * b} (input {H}x{W}, padding {(a, b)})"
            )
        return cls(N, C, H, W, K, R, S, u, v, a, b, dh, dw, P, Q)

    @property
    def x_shape(self) -> tuple:
        return (self.N, self.C, self.H, self.W)

    @property
    def w_shape(self) -> tuple:
        return (self.K, self.C, self.R, self.S)

    @property
    def y_shape(self) -> tuple:
        return (self.N, self.K, self.P, self.Q)

    @property
    def cols_shape(self) -> tuple:
        """The im2col matrix of the reference layout: ``(N*P*Q, C*R*S)``."""
        return (self.N * self.P * self.Q, self.C * self.R * self.S)

    @property
    def flops(self) -> int:
        """Multiply-adds of the forward GEMM, times 2."""
        return 2 * self.N * self.P * self.Q * self.K * self.C * self.R * self.S

    def with_batch(self, n: int) -> "ConvGeometry":
        """The same convolution on ``n`` samples (a slice of the batch)."""
        return ConvGeometry(n, *(getattr(self, f) for f in ("C", "H", "W", "K", "R", "S", "u", "v", "a", "b", "dh", "dw", "P", "Q")))

    def samples_per_slice(self, itemsize: int, workspace_bytes: float) -> int:
        """How many samples' unfolded matrices fit in ``workspace_bytes`` (at least one).

        The largest per-sample matrix is the forward's ``P*Q x C*R*S`` or, for
        the stride-1 input gradient computed as a convolution of ``dy``,
        ``H*W x R*S*K``.
        """
        per_sample = max(self.P * self.Q * self.C, self.H * self.W * self.K) * self.R * self.S * itemsize
        return max(1, min(self.N, int(workspace_bytes // per_sample)))


@dataclass(frozen=True)
class PoolGeometry:
    """Shapes and options of one pooling call; build it with :meth:`of`.

    ``stride`` defaults to the kernel size; padding may be at most half the
    kernel, so no window lies wholly in padding (PyTorch's rule).

    >>> g = PoolGeometry.of((1, 2, 7, 7), 3, None, 1)
    >>> (g.u, g.v), (g.P, g.Q), g.taps
    ((3, 3), (3, 3), 9)
    """

    N: int
    C: int
    H: int
    W: int
    R: int
    S: int
    u: int
    v: int
    a: int
    b: int
    P: int
    Q: int

    @classmethod
    def of(cls, x_shape, kernel_size, stride, padding, where: str = "pool2d") -> "PoolGeometry":
        """Validate ``(N, C, H, W)`` and the options; raise naming ``where``."""
        R, S = pair(kernel_size, "kernel_size", where, minimum=1)
        u, v = pair(stride if stride is not None else (R, S), "stride", where, minimum=1)
        a, b = pair(padding, "padding", where, minimum=0)
        if 2 * a > R or 2 * b > S:
            raise ValueError(f"{where}: padding must be at most half the kernel size {(R, S)}, got padding {(a, b)}")
        N, C, H, W = (int(n) for n in x_shape)
        P, Q = pool_out_size(H, R, u, a), pool_out_size(W, S, v, b)
        if P < 1 or Q < 1:
            raise ValueError(
                f"{where}: kernel {R}x{S} is larger than the padded input {H + 2 * a}x{W + 2 * b} "
                f"(input {H}x{W}, padding {(a, b)})"
            )
        return cls(N, C, H, W, R, S, u, v, a, b, P, Q)

    @property
    def x_shape(self) -> tuple:
        return (self.N, self.C, self.H, self.W)

    @property
    def y_shape(self) -> tuple:
        return (self.N, self.C, self.P, self.Q)

    @property
    def taps(self) -> int:
        """Window size ``R*S``."""
        return self.R * self.S

    @property
    def as_conv(self) -> ConvGeometry:
        """The same windows as a depthwise convolution geometry (``K = C``, no dilation)."""
        return ConvGeometry(self.N, self.C, self.H, self.W, self.C, self.R, self.S, self.u, self.v, self.a, self.b,
                            1, 1, self.P, self.Q)


@dataclass(frozen=True)
class ConvColumns:
    """What a convolution forward keeps for its backward: the unfolded input in one kernel's layout.

    ``layout`` names the column layout of the kernel that wrote ``cols``
    (each kernel module documents its own as ``COLUMN_LAYOUT``); a backward
    uses the columns only when the layout is its own, else it unfolds ``x``
    again. ``cols`` is ``None`` when the forward kept none (a large batch,
    or evaluation mode).
    """

    layout: str
    cols: object = None

