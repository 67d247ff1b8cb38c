"""Window geometry of convolution and pooling, as small immutable objects of plain integers.

Notation of docs/derivation.md and the seed: input ``(N, C, H, W)``, kernel
``R x S``, strides ``(u, v)``, paddings ``(a, b)``, dilations ``(d_h, d_w)``,
output ``(N, K, P, Q)`` (``K = C`` for pooling). An op validates its
arguments into one of these once; every kernel reads the same fields, so no
kernel takes more than a handful of arguments.

This module imports nothing of the package: ops, kernels and layers all use it.
"""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass

__all__ = [
    "pair", "check_groups", "out_size", "pool_out_size",
    "ConvGeometry", "PoolGeometry", "AdaptivePoolGeometry", "ConvColumns",
]


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


def check_groups(groups, where: str) -> int:
    """``groups`` as a positive int; ``TypeError`` for a non-integer, ``ValueError`` below 1.

    >>> check_groups(4, "Conv2d")
    4
    """
    if isinstance(groups, bool):
        raise TypeError(f"{where}: groups must be a positive integer, got {groups!r}")
    try:
        G = operator.index(groups)
    except TypeError:
        raise TypeError(f"{where}: groups must be a positive integer, got {groups!r}") from None
    if G < 1:
        raise ValueError(f"{where}: groups must be a positive integer, got {groups!r}")
    return G


def out_size(size: int, kernel: int, stride: int, padding: int, dilation: int = 1) -> int:
    """Output length of a sliding window: ``(H + 2a - d(R - 1) - 1) // u + 1``.

    With ``d = 1`` this is ``floor((H + 2a - R) / u) + 1``, which equals the
    seed's ``ceil((H - R + 1 + 2a) / u)`` (docs/derivation.md, section 1).

    >>> out_size(28, 5, 1, 2), out_size(7, 3, 2, 0), out_size(7, 3, 2, 1, dilation=2)
    (28, 3, 3)
    """
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def pool_out_size(size: int, kernel: int, stride: int, padding: int, dilation: int = 1,
                  ceil_mode: bool = False) -> int:
    """Output length of a pooling window, PyTorch's rule.

    Floor mode is :func:`out_size`. ``ceil_mode`` rounds the division up, so
    a last, partial window covers the remainder, but drops that window when
    it would start at or past the end of the input:
    ``if (P - 1) * u >= H + a: P -= 1``; the last window then starts inside
    the input or its left padding (docs/derivation.md, section 7).

    >>> pool_out_size(5, 2, 2, 0), pool_out_size(5, 2, 2, 0, ceil_mode=True), pool_out_size(5, 2, 2, 1, ceil_mode=True)
    (2, 3, 3)
    """
    span = size + 2 * padding - dilation * (kernel - 1) - 1
    if not ceil_mode:
        return span // stride + 1
    count = -(-span // stride) + 1
    if (count - 1) * stride >= size + padding:
        count -= 1
    return count


@dataclass(frozen=True)
class ConvGeometry:
    """Shapes and options of one convolution call; build it with :meth:`of`.

    ``G`` counts the groups (``groups`` of ``torch.nn.Conv2d``): input
    channels ``g*C/G .. (g+1)*C/G - 1`` feed only output channels
    ``g*K/G .. (g+1)*K/G - 1``, and the weight is ``(K, C/G, R, S)``
    (docs/derivation.md, section 5a). ``G = 1`` is the ordinary convolution.

    >>> g = ConvGeometry.of((2, 3, 8, 8), (4, 3, 3, 3), stride=2, padding=1, dilation=1)
    >>> (g.P, g.Q), g.y_shape, g.cols_shape
    ((4, 4), (2, 4, 4, 4), (32, 27))
    >>> d = ConvGeometry.of((2, 6, 8, 8), (12, 1, 3, 3), stride=1, padding=1, dilation=1, groups=6)
    >>> d.G, (d.Cg, d.Kg), d.w_shape, d.depthwise
    (6, (1, 2), (12, 1, 3, 3), True)
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
    G: int = 1

    @classmethod
    def of(cls, x_shape, w_shape, stride, padding, dilation, where: str = "conv2d", groups=1) -> "ConvGeometry":
        """Validate ``(N, C, H, W)``, ``(K, C/G, R, S)`` and the options; raise naming ``where``."""
        u, v = pair(stride, "stride", where, minimum=1)
        a, b = pair(padding, "padding", where, minimum=0)
        dh, dw = pair(dilation, "dilation", where, minimum=1)
        G = check_groups(groups, where)
        N, C, H, W = (int(n) for n in x_shape)
        K, Cw, R, S = (int(n) for n in w_shape)
        if K % G != 0:
            raise ValueError(
                f"{where}: expected weight with out channels divisible by groups={G}, got weight shape {tuple(w_shape)}"
            )
        if Cw * G != C:
            grouping = f" = {G} groups x {Cw}" if G != 1 else ""
            raise ValueError(
                f"{where}: expected input with {Cw * G}{grouping} channels (weight shape {tuple(w_shape)}), "
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
        return cls(N, C, H, W, K, R, S, u, v, a, b, dh, dw, P, Q, G)

    @property
    def Cg(self) -> int:
        """Input channels per group, ``C/G``."""
        return self.C // self.G

    @property
    def Kg(self) -> int:
        """Output channels per group, ``K/G``."""
        return self.K // self.G

    @property
    def depthwise(self) -> bool:
        """One input channel per group (``G = C > 1``): each channel filtered on its own by ``K/C`` filters.

        ``G = C = 1`` is excluded: that is an ordinary one-channel convolution.
        """
        return self.G == self.C > 1

    @property
    def x_shape(self) -> tuple:
        return (self.N, self.C, self.H, self.W)

    @property
    def w_shape(self) -> tuple:
        return (self.K, self.Cg, self.R, self.S)

    @property
    def y_shape(self) -> tuple:
        return (self.N, self.K, self.P, self.Q)

    @property
    def cols_shape(self) -> tuple:
        """The im2col matrix of the reference layout: ``(N*P*Q, C*R*S)``."""
        return (self.N * self.P * self.Q, self.C * self.R * self.S)

    @property
    def flops(self) -> int:
        """Multiply-adds of the forward (the ``G`` GEMMs), times 2."""
        return 2 * self.N * self.P * self.Q * self.K * self.Cg * self.R * self.S

    def with_batch(self, n: int) -> "ConvGeometry":
        """The same convolution on ``n`` samples (a slice of the batch)."""
        return dataclasses.replace(self, N=n)

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
    kernel (PyTorch's rule). The options of ``torch.nn.MaxPool2d``
    (``dilation``, ``ceil_mode``) and ``torch.nn.AvgPool2d`` (``ceil_mode``,
    ``count_include_pad``, ``divisor_override``) ride along; ``ceil_mode`` is
    already in ``P, Q`` (:func:`pool_out_size`) and the kernels read only
    these and :meth:`avg_divisors` (docs/derivation.md, section 7).

    >>> g = PoolGeometry.of((1, 2, 7, 7), 3, None, 1)
    >>> (g.u, g.v), (g.P, g.Q), g.taps
    ((3, 3), (3, 3), 9)
    >>> c = PoolGeometry.of((1, 1, 5, 5), 2, 2, 0, ceil_mode=True, count_include_pad=False)
    >>> (c.P, c.Q), (c.frame_height, c.frame_width), c.avg_divisors(), c.uniform_divisor
    ((3, 3), (6, 6), ((2, 2, 1), (2, 2, 1)), None)
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
    dh: int = 1
    dw: int = 1
    ceil_mode: bool = False
    count_include_pad: bool = True
    divisor_override: int | None = None

    @classmethod
    def of(cls, x_shape, kernel_size, stride, padding, where: str = "pool2d", *, dilation=1, ceil_mode=False,
           count_include_pad=True, divisor_override=None) -> "PoolGeometry":
        """Validate ``(N, C, H, W)`` and the options; raise naming ``where``.

        ``divisor_override``: ``None`` or a non-zero int, as PyTorch accepts it.
        """
        R, S = pair(kernel_size, "kernel_size", where, minimum=1)
        u, v = pair(stride if stride is not None else (R, S), "stride", where, minimum=1)
        a, b = pair(padding, "padding", where, minimum=0)
        dh, dw = pair(dilation, "dilation", where, minimum=1)
        # PyTorch's rule for pooling with indices (the one its autograd runs), dilation or not.
        if 2 * a > R or 2 * b > S:
            raise ValueError(f"{where}: padding must be at most half the kernel size {(R, S)}, got padding {(a, b)}")
        if divisor_override is not None:
            message = f"{where}: divisor_override must be None or a non-zero int, got {divisor_override!r}"
            if isinstance(divisor_override, bool):
                raise TypeError(message)
            try:
                divisor_override = operator.index(divisor_override)
            except TypeError:
                raise TypeError(message) from None
            if divisor_override == 0:
                raise ValueError(message)
        N, C, H, W = (int(n) for n in x_shape)
        if H < 1 or W < 1:
            raise ValueError(f"{where}: expected input of non-zero height and width, got shape {tuple(x_shape)}")
        P, Q = pool_out_size(H, R, u, a, dh, bool(ceil_mode)), pool_out_size(W, S, v, b, dw, bool(ceil_mode))
        if P < 1 or Q < 1:
            raise ValueError(
                f"{where}: kernel {dh * (R - 1) + 1}x{dw * (S - 1) + 1} is larger than the padded input "
                f"{H + 2 * a}x{W + 2 * b} "
                f"(input {H}x{W}, padding {(a, b)})"
            )
        return cls(N, C, H, W, R, S, u, v, a, b, P, Q, dh, dw, bool(ceil_mode), bool(count_include_pad),
                   divisor_override)

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
    def frame_height(self) -> int:
        """Rows of the padded input grown to hold every window: ``H + 2a``, or more for ``ceil_mode``."""
        return max(self.H + 2 * self.a, (self.P - 1) * self.u + self.dh * (self.R - 1) + 1)

    @property
    def frame_width(self) -> int:
        """Columns of that frame: ``W + 2b``, or more (see :attr:`frame_height`)."""
        return max(self.W + 2 * self.b, (self.Q - 1) * self.v + self.dw * (self.S - 1) + 1)

    @property
    def as_conv(self) -> ConvGeometry:
        """The same windows as a convolution geometry over the frame (``frame_height x frame_width``, ``a = b = 0``).

        Only its windows are read: reading the taps of the padded frame, or
        adding them back onto it, then cropping ``a, b`` away.
        """
        return ConvGeometry(N=self.N, C=self.C, H=self.frame_height, W=self.frame_width, K=self.C, R=self.R,
                            S=self.S, u=self.u, v=self.v, a=0, b=0, dh=self.dh, dw=self.dw, P=self.P, Q=self.Q)

    def avg_divisors(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(rows, cols)``: average pooling divides window ``(p, q)`` by ``rows[p] * cols[q]``.

        As PyTorch: ``divisor_override`` if given; else the window clipped to
        the padded input (``count_include_pad``, which differs from ``R*S``
        only for a ``ceil_mode`` window past the padding) or to the input.
        """
        if self.divisor_override is not None:
            return (self.divisor_override,) * self.P, (1,) * self.Q
        return (_window_counts(self.H, self.R, self.u, self.a, self.P, self.count_include_pad),
                _window_counts(self.W, self.S, self.v, self.b, self.Q, self.count_include_pad))

    @property
    def uniform_divisor(self) -> int | None:
        """The divisor when every window has the same (the common case), else ``None``."""
        rows, cols = self.avg_divisors()
        if len(set(rows)) == 1 and len(set(cols)) == 1:
            return rows[0] * cols[0]
        return None


def _window_counts(size: int, kernel: int, stride: int, padding: int, count: int, include_pad: bool) -> tuple:
    """Per output index, the length of its window clipped to the padded input (``include_pad``) or to the input."""
    out = []
    for p in range(count):
        start = p * stride - padding
        end = min(start + kernel, size + padding)
        if not include_pad:
            start, end = max(start, 0), min(end, size)
        out.append(end - start)
    return tuple(out)


@dataclass(frozen=True)
class AdaptivePoolGeometry:
    """Shapes of one adaptive average pooling call; build it with :meth:`of`.

    Output row ``p`` averages input rows ``floor(p*H/P) <= h < ceil((p+1)*H/P)``
    (PyTorch's bins, which overlap when ``P`` does not divide ``H``), columns
    likewise; ``P = Q = 1`` is global average pooling.

    >>> g = AdaptivePoolGeometry.of((2, 3, 5, 7), (3, None))
    >>> (g.P, g.Q), g.row_bins
    ((3, 7), ((0, 2), (1, 4), (3, 5)))
    """

    N: int
    C: int
    H: int
    W: int
    P: int
    Q: int

    @classmethod
    def of(cls, x_shape, output_size, where: str = "adaptive_avg_pool2d") -> "AdaptivePoolGeometry":
        """Validate ``(N, C, H, W)`` and ``output_size`` (int, or pair whose ``None`` keeps the input size)."""
        N, C, H, W = (int(n) for n in x_shape)
        if H < 1 or W < 1:
            raise ValueError(f"{where}: expected input of non-zero height and width, got shape {tuple(x_shape)}")
        message = f"{where}: output_size must be a non-negative int, None, or a pair of them, got {output_size!r}"
        items = tuple(output_size) if isinstance(output_size, (tuple, list)) else (output_size, output_size)
        if len(items) != 2:
            raise ValueError(message)
        sizes = []
        for item, size in zip(items, (H, W)):
            if item is None:  # keep the input's size
                sizes.append(size)
                continue
            if isinstance(item, bool):
                raise TypeError(message)
            try:
                sizes.append(operator.index(item))
            except TypeError:
                raise TypeError(message) from None
            if sizes[-1] < 0:
                raise ValueError(message)
        return cls(N, C, H, W, *sizes)

    @staticmethod
    def bins(size: int, count: int) -> tuple:
        """``(start, end)`` of each of ``count`` bins over ``size``: ``floor(i*size/count), ceil((i+1)*size/count)``."""
        return tuple((i * size // count, -(-(i + 1) * size // count)) for i in range(count))

    @property
    def row_bins(self) -> tuple:
        return self.bins(self.H, self.P)

    @property
    def col_bins(self) -> tuple:
        return self.bins(self.W, self.Q)

    @property
    def x_shape(self) -> tuple:
        return (self.N, self.C, self.H, self.W)

    @property
    def y_shape(self) -> tuple:
        return (self.N, self.C, self.P, self.Q)


@dataclass
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

    def take(self, layout: str):
        """``cols`` if written in ``layout`` (else None), handed over: this object no longer holds them.

        A backward that takes the columns holds their only reference, so it
        can let them go once the weight gradient is computed and the input
        gradient's columns, as large, take their place in memory. A later
        backward given this object unfolds ``x`` again.
        """
        if self.layout != layout:
            return None
        cols, self.cols = self.cols, None
        return cols

