"""Pooling: gradients, ties, parity across backends, the PyTorch oracle.

The first part checks max_pool2d and avg_pool2d with their basic options;
besides PyTorch, an independent loop-per-window reference checks values and
gradients where PyTorch is not installed. The second part (from "PyTorch's
options" on) checks ``ceil_mode``, max pooling's ``dilation``, average
pooling's ``count_include_pad=False`` and ``divisor_override``, adaptive and
global average pooling, the layers, and the corners: unbatched, empty,
channels-last and strided inputs. docs/derivation.md section 7 names these
tests.
"""

from __future__ import annotations

from typing import NamedTuple
from unittest import mock

import numpy as np
import pytest
from conftest import make_backend, tol
from gradcheck import assert_grad_close, numerical_grad, projected_loss
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from portable_cnn import config_context, dispatch, nn
from portable_cnn.bench import torch_mirror
from portable_cnn.geometry import AdaptivePoolGeometry, PoolGeometry, pool_out_size
from portable_cnn.ops import (
    adaptive_avg_pool2d,
    adaptive_avg_pool2d_backward,
    avg_pool2d,
    avg_pool2d_backward,
    global_avg_pool2d,
    global_avg_pool2d_backward,
    max_pool2d,
    max_pool2d_backward,
    max_pool2d_relu,
    out_size,
    relu,
    relu_backward,
)


class PoolConfig(NamedTuple):
    """One pooling problem: ``R x S`` windows, strides ``(u, v)`` (None: the kernel), paddings ``(a, b)``."""

    N: int
    C: int
    H: int
    W: int
    R: int
    S: int
    u: int | None
    v: int | None
    a: int
    b: int
    ties: bool = False
    seed: int = 0

    @property
    def stride(self) -> tuple[int, int]:
        return (self.R, self.S) if self.u is None else (self.u, self.v)

    @property
    def options(self) -> dict:
        return {
            "kernel_size": (self.R, self.S),
            "stride": None if self.u is None else (self.u, self.v),
            "padding": (self.a, self.b),
        }

    @property
    def P(self) -> int:
        return out_size(self.H, self.R, self.stride[0], self.a)

    @property
    def Q(self) -> int:
        return out_size(self.W, self.S, self.stride[1], self.b)

    def arrays(self):
        """Float64 ``x, dy``. With ``ties`` x holds few distinct integers (constant regions)."""
        rng = np.random.default_rng(self.seed)
        shape = (self.N, self.C, self.H, self.W)
        if self.ties:
            x = rng.integers(0, 3, shape).astype(np.float64)
        else:
            x = rng.standard_normal(shape)
        return x, rng.standard_normal((self.N, self.C, self.P, self.Q))


@st.composite
def pool_configs(draw, max_hw: int = 6, max_kernel: int = 4) -> PoolConfig:
    """Random pooling problems: overlapping or gapped windows, padding up to half the kernel."""
    N, C = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    R, S = draw(st.integers(1, max_kernel)), draw(st.integers(1, max_kernel))
    a, b = draw(st.integers(0, R // 2)), draw(st.integers(0, S // 2))
    H = draw(st.integers(max(1, R - 2 * a), max_hw))
    W = draw(st.integers(max(1, S - 2 * b), max_hw))
    if draw(st.booleans()):
        u, v = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    else:
        u = v = None
    return PoolConfig(N, C, H, W, R, S, u, v, a, b, draw(st.booleans()), draw(st.integers(0, 2**32 - 1)))


# Overlapping windows (stride < kernel), padding, remainder rows, ties:
OVERLAP_PADDED_TIES = PoolConfig(2, 2, 7, 6, 3, 2, 2, 1, 1, 1, ties=True, seed=1)
# Window as large as the padded input (output 1x1), batch 1, one channel:
WINDOW_FILLS_PADDED_INPUT = PoolConfig(1, 1, 2, 1, 4, 3, None, None, 1, 1, seed=2)
# Default stride (= kernel) that does not divide the input (trailing rows unused):
DEFAULT_STRIDE = PoolConfig(1, 3, 5, 7, 2, 3, None, None, 0, 1, seed=3)
CORNER_CASES = (OVERLAP_PADDED_TIES, WINDOW_FILLS_PADDED_INPUT, DEFAULT_STRIDE)

FIXTURE_SETTINGS = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
}


def _corner_cases(test):
    for cfg in CORNER_CASES:
        test = example(cfg=cfg)(test)
    return test


def test_corner_cases_are_what_their_names_say():
    """The named configurations really are the corner cases the tests rely on."""
    c = OVERLAP_PADDED_TIES
    assert c.u < c.R and c.a > 0 and c.ties
    c = WINDOW_FILLS_PADDED_INPUT
    assert (c.R, c.S) == (c.H + 2 * c.a, c.W + 2 * c.b) and (c.P, c.Q) == (1, 1) and (c.N, c.C) == (1, 1)
    c = DEFAULT_STRIDE
    assert c.u is None and (c.H - c.R) % c.R != 0


def reference_pool(x, dy, cfg: PoolConfig, kind: str):
    """Loop over every window: ``(y, dx)``; max takes the first maximum in row-major order."""
    (u, v), (R, S), (a, b) = cfg.stride, (cfg.R, cfg.S), (cfg.a, cfg.b)
    fill = -np.inf if kind == "max" else 0.0
    xpad = np.pad(x, ((0, 0), (0, 0), (a, a), (b, b)), constant_values=fill)
    dxpad = np.zeros_like(xpad)
    y = np.zeros(dy.shape)
    for n, c, p, q in np.ndindex(*dy.shape):
        window = xpad[n, c, u * p : u * p + R, v * q : v * q + S]
        if kind == "max":
            first = int(np.argmax(window))  # NumPy documents: first occurrence
            y[n, c, p, q] = window.flat[first]
            dxpad[n, c, u * p + first // S, v * q + first % S] += dy[n, c, p, q]
        else:
            y[n, c, p, q] = window.sum() / (R * S)  # count_include_pad: the divisor is always R*S
            dxpad[n, c, u * p : u * p + R, v * q : v * q + S] += dy[n, c, p, q] / (R * S)
    return y, dxpad[:, :, a : a + cfg.H, b : b + cfg.W]


def _run(backend, cfg: PoolConfig, kind: str, dtype: str):
    """Forward and backward on ``backend`` in ``dtype``, as NumPy: ``y``, ``dx`` (and ``argmax`` for max)."""
    x, dy = (np.asarray(t, dtype=dtype) for t in cfg.arrays())
    X, DY = backend.asarray(x), backend.asarray(dy)
    if kind == "max":
        y, argmax = max_pool2d(X, **cfg.options)
        dx = max_pool2d_backward(DY, argmax, X.shape, **cfg.options)
        out = {"y": y, "dx": dx, "argmax": argmax}
    else:
        y = avg_pool2d(X, **cfg.options)
        dx = avg_pool2d_backward(DY, X.shape, **cfg.options)
        out = {"y": y, "dx": dx}
    out = {k: np.array(backend.to_numpy(t)) for k, t in out.items()}
    assert out["y"].shape == (cfg.N, cfg.C, cfg.P, cfg.Q) and out["dx"].shape == x.shape
    assert out["y"].dtype == out["dx"].dtype == np.dtype(dtype)
    return out


@pytest.mark.parametrize("kind", ["max", "avg"])
@settings(max_examples=30, deadline=None)
@given(cfg=pool_configs())
@_corner_cases
def test_pool2d_matches_loop_reference(kind, cfg):
    """Section 7: values and gradients (first maximum; average over R*S with padding) against a loop per window."""
    x, dy = cfg.arrays()
    got = _run(make_backend("numpy"), cfg, kind, "float64")
    y, dx = reference_pool(x, dy, cfg, kind)
    np.testing.assert_allclose(got["y"], y, **tol("float64"))
    np.testing.assert_allclose(got["dx"], dx, **tol("float64"))


@pytest.mark.parametrize("kind", ["max", "avg"])
@settings(max_examples=30, deadline=None)
@given(cfg=pool_configs())
@_corner_cases
def test_pool2d_numpy_kernels_match_the_reference(kind, cfg):
    """Section 7: NumPy's kernels (running maximum, channels-last) give exactly the reference's results."""
    fast = _run(make_backend("numpy"), cfg, kind, "float64")
    with config_context(fast_paths=False):
        standard = _run(make_backend("numpy"), cfg, kind, "float64")
    for name in fast:
        np.testing.assert_array_equal(fast[name], standard[name], err_msg=name)


# Windows that tile the input (stride = kernel, no padding or dilation), with ties, on channels-last memory
# as a convolution leaves it: the NumPy kernel's rows-first maximum and its first-maximum search.
TILED = [
    PoolConfig(2, 3, 8, 6, 2, 2, None, None, 0, 0, ties=True, seed=4),
    PoolConfig(1, 2, 7, 8, 3, 3, None, None, 0, 0, ties=True, seed=5),  # remainder rows and columns
    PoolConfig(2, 1, 6, 6, 2, 3, None, None, 0, 0, ties=True, seed=6),
    PoolConfig(1, 2, 5, 6, 1, 2, None, None, 0, 0, ties=True, seed=7),
]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("cfg", TILED, ids=lambda c: f"{c.R}x{c.S}-on-{c.H}x{c.W}")
def test_tiled_max_pool_on_channels_last_memory_equals_the_reference(cfg, dtype):
    """Section 7: tiling windows take NumPy's rows-first path (spied) and give the reference's y, argmax and dx."""
    from portable_cnn.kernels.numpy import pool as numpy_pool

    x, dy = (t.astype(dtype) for t in cfg.arrays())
    x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)  # (N, C, H, W) view of (N, H, W, C)

    def run():
        y, argmax = max_pool2d(x, **cfg.options)
        return y, argmax, max_pool2d_backward(dy, argmax, x.shape, **cfg.options)

    with mock.patch.object(numpy_pool, "_tiled_max", wraps=numpy_pool._tiled_max) as spy:
        fast = run()
    assert spy.called
    with config_context(fast_paths=False):
        standard = run()
    for name, got, expected in zip(("y", "argmax", "dx"), fast, standard):
        np.testing.assert_array_equal(got, expected, err_msg=name)


def test_max_pool2d_constant_input_sends_gradient_to_each_window_first_element():
    """Section 7: on a constant input every window's gradient goes to its first (top-left, unpadded) element."""
    x = np.full((1, 1, 4, 5), 2.0)
    y, argmax = max_pool2d(x, 3, stride=1, padding=1)
    dx = max_pool2d_backward(np.ones(y.shape), argmax, x.shape, 3, stride=1, padding=1)
    # Window (p, q) starts at padded (p, q); its first real element is input (max(p-1, 0), max(q-1, 0)).
    expected = np.zeros((4, 5))
    for p, q in np.ndindex(4, 5):
        expected[max(p - 1, 0), max(q - 1, 0)] += 1
    np.testing.assert_array_equal(dx[0, 0], expected)
    np.testing.assert_array_equal(y, x)


@pytest.mark.parametrize("kind", ["max", "avg"])
@settings(max_examples=12, **FIXTURE_SETTINGS)
@given(cfg=pool_configs(max_hw=5, max_kernel=3))
@example(cfg=WINDOW_FILLS_PADDED_INPUT)
@example(cfg=OVERLAP_PADDED_TIES._replace(ties=False))
def test_pool2d_gradients_match_central_differences(backend, kind, cfg):
    """Section 7: the hand-written backward against float64 differences of the backend's forward."""
    x, dy = cfg.arrays()
    if kind == "max":
        # Distinct values 0.1 apart: no step of size eps can change which element is the maximum.
        x = np.random.default_rng(cfg.seed).permutation(x.size).reshape(x.shape) * 0.1
    X, DY = backend.asarray(x), backend.asarray(dy)
    if kind == "max":
        _, argmax = max_pool2d(X, **cfg.options)
        dx = max_pool2d_backward(DY, argmax, X.shape, **cfg.options)

        def forward(t):
            return max_pool2d(backend.asarray(t), **cfg.options)[0]
    else:
        dx = avg_pool2d_backward(DY, X.shape, **cfg.options)

        def forward(t):
            return avg_pool2d(backend.asarray(t), **cfg.options)

    loss = projected_loss(backend.to_numpy, dy)
    assert_grad_close(backend.to_numpy(dx), numerical_grad(lambda t: loss(forward(t)), x), "dx")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("kind", ["max", "avg"])
@settings(max_examples=8, **FIXTURE_SETTINGS)
@given(cfg=pool_configs())
@_corner_cases
def test_pool2d_parity_across_backends(backend, kind, dtype, cfg):
    """Section 7: every backend gives NumPy's y, dx (and argmax, ties included) in float64 and float32."""
    reference = _run(make_backend("numpy"), cfg, kind, dtype)
    got = _run(backend, cfg, kind, dtype)
    for name in reference:
        np.testing.assert_allclose(got[name], reference[name], err_msg=name, **tol(dtype))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("kind", ["max", "avg"])
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cfg=pool_configs(max_hw=7, max_kernel=5))
@_corner_cases
def test_pool2d_matches_torch(torch, kind, dtype, cfg):
    """Section 7: y and dx equal torch.nn.functional.max_pool2d / avg_pool2d and autograd (ties, overlap, padding)."""
    F = torch.nn.functional
    got = _run(make_backend("numpy"), cfg, kind, dtype)
    x, dy = (np.asarray(t, dtype=dtype) for t in cfg.arrays())
    xt = torch.tensor(x, requires_grad=True)
    if kind == "max":
        y = F.max_pool2d(xt, **cfg.options)
    else:
        y = F.avg_pool2d(xt, **cfg.options, count_include_pad=True)
    y.backward(torch.tensor(dy))
    np.testing.assert_allclose(got["y"], y.detach().numpy(), **tol(dtype))
    np.testing.assert_allclose(got["dx"], xt.grad.numpy(), **tol(dtype))


def test_max_pool2d_ties_match_torch_on_constant_regions(torch):
    """Section 7: a piecewise-constant image with overlapping padded windows routes gradients as PyTorch does."""
    x = np.kron(np.array([[1.0, 3.0], [3.0, 2.0]]), np.ones((3, 4)))[None, None]  # (1, 1, 6, 8) constant blocks
    dy_shape = (1, 1, out_size(6, 3, 1, 1), out_size(8, 3, 2, 1))
    dy = np.random.default_rng(5).standard_normal(dy_shape)
    y, argmax = max_pool2d(x, 3, stride=(1, 2), padding=1)
    dx = max_pool2d_backward(dy, argmax, x.shape, 3, stride=(1, 2), padding=1)
    xt = torch.tensor(x, requires_grad=True)
    yt = torch.nn.functional.max_pool2d(xt, 3, stride=(1, 2), padding=1)
    yt.backward(torch.tensor(dy))
    np.testing.assert_allclose(y, yt.detach().numpy(), **tol("float64"))
    np.testing.assert_allclose(dx, xt.grad.numpy(), **tol("float64"))
    assert np.count_nonzero(dx) < np.count_nonzero(x)  # ties really occurred: gradients went to few elements


@pytest.mark.parametrize("kind", ["max", "avg"])
@settings(max_examples=5, **FIXTURE_SETTINGS)
@given(cfg=pool_configs())
@_corner_cases
def test_pool2d_does_not_modify_inputs(backend, kind, cfg):
    """Forward + backward leave x and dy as they were (numpy-readonly also forbids any write)."""
    x, dy = cfg.arrays()
    X, DY = backend.asarray(x), backend.asarray(dy)
    if kind == "max":
        _, argmax = max_pool2d(X, **cfg.options)
        max_pool2d_backward(DY, argmax, X.shape, **cfg.options)
    else:
        avg_pool2d(X, **cfg.options)
        avg_pool2d_backward(DY, X.shape, **cfg.options)
    np.testing.assert_array_equal(backend.to_numpy(X), x)
    np.testing.assert_array_equal(backend.to_numpy(DY), dy)


@pytest.mark.parametrize("op", [max_pool2d, avg_pool2d])
def test_pool2d_rejects_padding_over_half_the_kernel(op):
    """Section 7: padding above half the kernel would allow windows wholly in padding; refused by name."""
    with pytest.raises(ValueError, match=rf"{op.__name__}: padding must be at most half the kernel size \(3, 3\)"):
        op(np.zeros((1, 1, 5, 5)), 3, padding=2)


@settings(max_examples=30, deadline=None)
@given(cfg=pool_configs())
@_corner_cases
def test_avg_pool2d_is_depthwise_convolution_with_constant_kernel(cfg):
    """Section 7: average pooling is conv2d of each channel with the constant kernel 1/(RS); so is its backward."""
    from portable_cnn.ops import conv2d, conv2d_backward

    x, dy = cfg.arrays()
    NC = cfg.N * cfg.C
    kernel = np.full((1, 1, cfg.R, cfg.S), 1.0 / (cfg.R * cfg.S))
    geometry = {"stride": cfg.stride, "padding": (cfg.a, cfg.b)}
    x1 = x.reshape(NC, 1, cfg.H, cfg.W)  # (N*C, 1, H, W): every channel its own image
    dy1 = dy.reshape(NC, 1, cfg.P, cfg.Q)  # (N*C, 1, P, Q)
    y_conv = conv2d(x1, kernel, **geometry).reshape(dy.shape)
    dx_conv = conv2d_backward(dy1, x1, kernel, has_bias=False, **geometry)[0].reshape(x.shape)
    np.testing.assert_allclose(avg_pool2d(x, **cfg.options), y_conv, **tol("float64"))
    np.testing.assert_allclose(avg_pool2d_backward(dy, x.shape, **cfg.options), dx_conv, **tol("float64"))


# =========================================================================================== PyTorch's options
# ceil_mode, dilation (max pooling), count_include_pad=False and divisor_override (average pooling), and the
# memory layouts and shapes an op may be handed: "unbatched" is one (C, H, W) sample, "strided" a view that
# skips every other column, "channels_last" an (N, C, H, W) view of (N, H, W, C) memory (the NumPy kernels').

LAYOUTS = ("contiguous", "channels_last", "strided", "unbatched")


def lay_out(a: np.ndarray, layout: str) -> np.ndarray:
    """The values of the (N, C, H, W) array ``a`` in ``layout`` (``unbatched``: its first sample)."""
    if layout == "channels_last":
        return np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)  # (N, C, H, W) view
    if layout == "strided":
        return np.repeat(a, 2, axis=3)[:, :, :, ::2]  # (N, C, H, W) view, column stride 2
    if layout == "unbatched":
        return a[0]  # (C, H, W)
    return a


class OptionConfig(NamedTuple):
    """One pooling problem with PyTorch's options: dilation for max pooling, the divisor options for average."""

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
    dh: int = 1
    dw: int = 1
    ceil_mode: bool = False
    count_include_pad: bool = True
    divisor_override: int | None = None
    layout: str = "contiguous"
    seed: int = 0

    def options(self, kind: str) -> dict:
        common = {"kernel_size": (self.R, self.S), "stride": (self.u, self.v), "padding": (self.a, self.b),
                  "ceil_mode": self.ceil_mode}
        if kind == "max":
            return {**common, "dilation": (self.dh, self.dw)}
        return {**common, "count_include_pad": self.count_include_pad, "divisor_override": self.divisor_override}

    def geometry(self, kind: str) -> PoolGeometry:
        return PoolGeometry.of((self.N, self.C, self.H, self.W), where=kind, **self.options(kind))

    def arrays(self, kind: str):
        """Float64 ``x, dy`` in the configuration's layout; max pooling's x has ties one time in three."""
        rng = np.random.default_rng(self.seed)
        x = rng.standard_normal((self.N, self.C, self.H, self.W))
        if kind == "max" and self.seed % 3 == 0:
            x = np.round(x)
        dy = rng.standard_normal(self.geometry(kind).y_shape)
        return lay_out(x, self.layout), lay_out(dy, self.layout)


@st.composite
def option_configs(draw, kind: str, max_hw: int = 7) -> OptionConfig:
    """Random valid problems of ``kind``: every option and layout, windows that overlap or skip, batches 0 to 2."""
    layout = draw(st.sampled_from(LAYOUTS))
    N = 1 if layout == "unbatched" else draw(st.integers(0, 2))
    C = draw(st.integers(1, 2))
    R, S, u, v = (draw(st.integers(1, 3)) for _ in range(4))
    dh, dw = (draw(st.integers(1, 2)), draw(st.integers(1, 2))) if kind == "max" else (1, 1)
    a, b = draw(st.integers(0, R // 2)), draw(st.integers(0, S // 2))
    # At least the dilated kernel less the padding: every output size is >= 1.
    min_h, min_w = max(1, dh * (R - 1) + 1 - 2 * a), max(1, dw * (S - 1) + 1 - 2 * b)
    H, W = draw(st.integers(min_h, max(min_h, max_hw))), draw(st.integers(min_w, max(min_w, max_hw)))
    ceil_mode, count_include_pad = draw(st.booleans()), draw(st.booleans())
    divisor_override = draw(st.sampled_from([None, None, 1, 3, -2]))
    return OptionConfig(N, C, H, W, R, S, u, v, a, b, dh, dw, ceil_mode, count_include_pad, divisor_override, layout,
                        draw(st.integers(0, 2**32 - 1)))


# A last window past the padding (ceil_mode) and divisors that differ at every border:
CEIL_PARTIAL_WINDOW = OptionConfig(2, 2, 6, 7, 3, 3, 2, 2, 1, 1, ceil_mode=True, count_include_pad=False, seed=4)
# Channels-last memory, a ceil_mode window past the padding in one direction, ties:
CEIL_CHANNELS_LAST = OptionConfig(2, 3, 6, 6, 3, 3, 2, 1, 1, 1, ceil_mode=True, layout="channels_last", seed=3)
# One sample without its batch axis, divisor_override, strides larger than the kernel:
UNBATCHED_OVERRIDE = OptionConfig(1, 2, 5, 7, 2, 2, 3, 3, 1, 0, ceil_mode=True, divisor_override=3,
                                  layout="unbatched", seed=6)
# An empty batch:
EMPTY_BATCH = OptionConfig(0, 2, 5, 5, 3, 3, 2, 2, 1, 1, ceil_mode=True, seed=7)
# A view that skips every other column:
STRIDED_VIEW = OptionConfig(2, 2, 5, 6, 3, 3, 2, 2, 1, 1, count_include_pad=False, layout="strided", seed=8)
OPTION_CORNERS = (CEIL_PARTIAL_WINDOW, CEIL_CHANNELS_LAST, UNBATCHED_OVERRIDE, EMPTY_BATCH, STRIDED_VIEW)
# Dilated max pooling, channels-last, and a window past the padding (ceil_mode):
DILATED_CEIL = OptionConfig(2, 2, 6, 6, 2, 3, 2, 1, 1, 1, dh=2, dw=2, ceil_mode=True, layout="channels_last", seed=5)
OPTION_CORNER_CASES = [(kind, cfg) for kind in ("max", "avg") for cfg in OPTION_CORNERS] + [("max", DILATED_CEIL)]
OPTION_CORNER_IDS = [f"{kind}-{cfg.layout}-{cfg.seed}" for kind, cfg in OPTION_CORNER_CASES]


# Small problems for the central differences: a ceil_mode window past the padding with divisors that differ
# at the borders, and dilated windows past the padding on channels-last memory.
SMALL_CEIL_PARTIAL_WINDOW = OptionConfig(1, 2, 4, 5, 3, 3, 2, 2, 1, 1, ceil_mode=True, count_include_pad=False, seed=9)
SMALL_DILATED_CEIL = OptionConfig(1, 2, 6, 4, 2, 2, 2, 1, 1, 1, dh=2, dw=2, ceil_mode=True, layout="channels_last",
                                  seed=10)


def test_option_corner_cases_are_what_their_names_say():
    """The named configurations really hold the corners the option tests rely on."""
    for cfg, kind in ((CEIL_PARTIAL_WINDOW, "avg"), (CEIL_CHANNELS_LAST, "avg"), (DILATED_CEIL, "max"),
                      (SMALL_CEIL_PARTIAL_WINDOW, "avg"), (SMALL_DILATED_CEIL, "max")):
        g = cfg.geometry(kind)
        assert (g.frame_height, g.frame_width) != (g.H + 2 * g.a, g.W + 2 * g.b), cfg  # a window past the padding
    assert CEIL_PARTIAL_WINDOW.geometry("avg").uniform_divisor is None
    assert CEIL_CHANNELS_LAST.arrays("max")[0].strides[1] == 8 and CEIL_CHANNELS_LAST.seed % 3 == 0
    assert UNBATCHED_OVERRIDE.arrays("avg")[0].ndim == 3 and UNBATCHED_OVERRIDE.u > UNBATCHED_OVERRIDE.R
    assert EMPTY_BATCH.arrays("max")[0].shape[0] == 0
    x, _ = STRIDED_VIEW.arrays("max")
    assert x.strides[3] == 2 * x.itemsize


def _pool_options(backend, kind: str, cfg: OptionConfig, x, dy) -> dict:
    """Forward and backward of ``kind`` with ``cfg``'s options on ``backend``, as NumPy arrays."""
    X, DY = backend.asarray(x), backend.asarray(dy)
    options = cfg.options(kind)
    if kind == "max":
        y, argmax = max_pool2d(X, **options)
        out = {"y": y, "argmax": argmax, "dx": max_pool2d_backward(DY, argmax, X.shape, **options)}
    else:
        y = avg_pool2d(X, **options)
        out = {"y": y, "dx": avg_pool2d_backward(DY, X.shape, **options)}
    out = {name: np.array(backend.to_numpy(value)) for name, value in out.items()}
    assert out["y"].shape == tuple(dy.shape) and out["dx"].shape == tuple(x.shape)
    assert out["y"].dtype == out["dx"].dtype == x.dtype
    return out


def _torch_pool(torch, kind: str, cfg: OptionConfig, x, dy):
    """``(y, dx)`` of torch.nn.functional's pooling and autograd; ``dx`` None where a window is wholly padding.

    PyTorch gives such a (dilated) window -inf, as we do, but an index outside the input, so its backward
    is not called then.
    """
    xt = torch.tensor(np.ascontiguousarray(x), requires_grad=True)
    pool = torch.nn.functional.max_pool2d if kind == "max" else torch.nn.functional.avg_pool2d
    y = pool(xt, **cfg.options(kind))
    if torch.isinf(y).any():
        return y.detach().numpy(), None
    y.backward(torch.tensor(np.ascontiguousarray(dy)))
    return y.detach().numpy(), xt.grad.numpy()


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("kind", ["max", "avg"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_pool2d_options_match_torch(torch, kind, dtype, data):
    """Section 7.1: every option and combination, ties, every layout: y and dx are torch's and autograd's."""
    cfg = data.draw(option_configs(kind), label="cfg")
    x, dy = (t.astype(dtype) for t in cfg.arrays(kind))
    got = _pool_options(make_backend("numpy"), kind, cfg, x, dy)
    y, dx = _torch_pool(torch, kind, cfg, x, dy)
    np.testing.assert_allclose(got["y"], y, **tol(dtype))
    if dx is not None:
        np.testing.assert_allclose(got["dx"], dx, **tol(dtype))


@pytest.mark.parametrize(("kind", "cfg"), OPTION_CORNER_CASES, ids=OPTION_CORNER_IDS)
def test_pool2d_option_corners_match_torch(torch, kind, cfg):
    """Section 7.1: the named corners (partial ceil_mode window, dilation, unbatched, empty batch) against torch."""
    x, dy = cfg.arrays(kind)
    got = _pool_options(make_backend("numpy"), kind, cfg, x, dy)
    y, dx = _torch_pool(torch, kind, cfg, x, dy)
    np.testing.assert_allclose(got["y"], y, **tol("float64"))
    np.testing.assert_allclose(got["dx"], dx, **tol("float64"))


def _finite_loss(backend, forward, dy: np.ndarray):
    """``t -> sum(y * dy)`` over the finite outputs of ``forward(t)``: a dilated window wholly in padding is -inf."""

    def loss(t) -> float:
        y = np.asarray(backend.to_numpy(forward(t)), dtype=np.float64)
        return float(np.sum(np.where(np.isfinite(y), y, 0.0) * dy))

    return loss


def _central_differences_case(backend, kind, cfg):
    x, dy = cfg.arrays(kind)
    if kind == "max":
        # Distinct values 0.1 apart: no step of size eps can change which element is the maximum.
        x = lay_out(np.random.default_rng(cfg.seed).permutation(x.size).reshape(cfg.N, cfg.C, cfg.H, cfg.W) * 0.1,
                    cfg.layout)
    got = _pool_options(backend, kind, cfg, x, dy)

    def forward(t):
        if kind == "max":
            return max_pool2d(backend.asarray(t), **cfg.options(kind))[0]
        return avg_pool2d(backend.asarray(t), **cfg.options(kind))

    assert_grad_close(got["dx"], numerical_grad(_finite_loss(backend, forward, np.asarray(dy)), x), "dx")


@settings(max_examples=4, **FIXTURE_SETTINGS)
@given(cfg=option_configs("max", max_hw=4))
@example(cfg=SMALL_DILATED_CEIL)
@example(cfg=SMALL_CEIL_PARTIAL_WINDOW)
def test_max_pool2d_options_gradients_match_central_differences(backend, cfg):
    """Section 7.1: max pooling's backward with every option against float64 differences of the backend's forward."""
    _central_differences_case(backend, "max", cfg)


@settings(max_examples=4, **FIXTURE_SETTINGS)
@given(cfg=option_configs("avg", max_hw=4))
@example(cfg=SMALL_CEIL_PARTIAL_WINDOW)
@example(cfg=SMALL_CEIL_PARTIAL_WINDOW._replace(divisor_override=-2, layout="unbatched"))
def test_avg_pool2d_options_gradients_match_central_differences(backend, cfg):
    """Section 7.1: the average's backward with every divisor rule against float64 differences of the forward."""
    _central_differences_case(backend, "avg", cfg)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("kind", ["max", "avg"])
@settings(max_examples=6, **FIXTURE_SETTINGS)
@given(data=st.data())
def test_pool2d_options_parity_across_backends(backend, kind, dtype, data):
    """Section 7.1: every backend gives NumPy's y, dx and argmax with every option and layout."""
    cfg = data.draw(option_configs(kind), label="cfg")
    x, dy = (t.astype(dtype) for t in cfg.arrays(kind))
    reference = _pool_options(make_backend("numpy"), kind, cfg, x, dy)
    got = _pool_options(backend, kind, cfg, x, dy)
    for name in reference:
        np.testing.assert_allclose(got[name], reference[name], err_msg=name, **tol(dtype))


@pytest.mark.parametrize(("kind", "cfg"), OPTION_CORNER_CASES, ids=OPTION_CORNER_IDS)
def test_pool2d_option_corners_parity_across_backends(backend, kind, cfg):
    """Section 7.1: on the named corners every backend (NumPy's kernels included) gives the reference's numbers."""
    x, dy = cfg.arrays(kind)
    with config_context(fast_paths=False):
        reference = _pool_options(make_backend("numpy"), kind, cfg, x, dy)
    got = _pool_options(backend, kind, cfg, x, dy)
    for name in reference:
        np.testing.assert_allclose(got[name], reference[name], err_msg=name, **tol("float64"))


@pytest.mark.parametrize("kind", ["max", "avg"])
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_pool2d_options_numpy_kernels_match_the_reference(kind, data):
    """Section 7.1: NumPy's kernels (the frame, channels-last taps) give exactly the reference's numbers."""
    cfg = data.draw(option_configs(kind), label="cfg")
    x, dy = cfg.arrays(kind)
    fast = _pool_options(make_backend("numpy"), kind, cfg, x, dy)
    with config_context(fast_paths=False):
        standard = _pool_options(make_backend("numpy"), kind, cfg, x, dy)
    for name in fast:
        np.testing.assert_array_equal(fast[name], standard[name], err_msg=name)


def test_pool_out_size_is_torch_output_size(torch):
    """Section 7.1: the output size, ceil_mode's rule and the refusals are torch's over a grid of sizes and options."""
    x = torch.zeros((1, 1, 1, 1), requires_grad=True)  # requires_grad: the checks of the path autograd runs
    for H, R, u, a, d, ceil_mode in np.ndindex(8, 5, 4, 3, 3, 2):
        if 0 in (H, R, u, d):
            continue
        options = {"kernel_size": (R, 1), "stride": (u, 1), "padding": (a, 0), "dilation": (d, 1),
                   "ceil_mode": bool(ceil_mode)}
        try:
            expected = torch.nn.functional.max_pool2d(x.expand(1, 1, H, 1), **options).shape[2]
        except RuntimeError:
            expected = None
        try:
            got = PoolGeometry.of((1, 1, H, 1), **options).P
        except ValueError:
            got = None
        assert got == expected, (H, options)
        if got is not None:
            assert got == pool_out_size(H, R, u, a, d, bool(ceil_mode))


def test_ceil_mode_keeps_a_partial_last_window_and_its_divisor_is_torchs(torch):
    """Section 7.1: W = 6, kernel 3, stride 2, padding 1: ceil_mode adds a 4th window, [5, 8), past the padding.

    Its divisor is 2 (clipped to the padded input [-1, 7)) with count_include_pad, 1 (x[5] alone) without.
    """
    x = np.arange(6.0).reshape(1, 1, 1, 6)
    options = {"kernel_size": (1, 3), "stride": (1, 2), "padding": (0, 1), "ceil_mode": True}
    np.testing.assert_array_equal(max_pool2d(x, **options)[0][0, 0, 0], [1, 3, 5, 5])
    np.testing.assert_allclose(avg_pool2d(x, **options)[0, 0, 0], [1 / 3, 2, 4, 5 / 2])
    np.testing.assert_allclose(avg_pool2d(x, **options, count_include_pad=False)[0, 0, 0], [1 / 2, 2, 4, 5])
    xt = torch.tensor(x)
    np.testing.assert_allclose(torch.nn.functional.avg_pool2d(xt, **options).numpy()[0, 0, 0], [1 / 3, 2, 4, 5 / 2])


def test_ceil_mode_drops_a_window_that_would_start_in_the_right_padding(torch):
    """Section 7.1: W = 5, kernel 2, stride 2, padding 1: rounding up gives 4 windows, but the 4th would start at 5,
    in the right padding, so there are 3, as in torch."""
    x = np.arange(5.0).reshape(1, 1, 1, 5)
    options = {"kernel_size": (1, 2), "stride": (1, 2), "padding": (0, 1), "ceil_mode": True}
    assert pool_out_size(5, 2, 2, 1) == 3 and -(-(5 + 2 - 2) // 2) + 1 == 4
    y, _ = max_pool2d(x, **options)
    np.testing.assert_array_equal(y[0, 0, 0], [0, 2, 4])
    assert tuple(torch.nn.functional.max_pool2d(torch.tensor(x), **options).shape) == y.shape


def test_count_include_pad_false_divides_by_the_input_elements_at_borders():
    """Section 7.1: on ones, 3x3 windows with padding 1 average 4/9 at corners and 6/9 at edges counting the
    padding, and exactly 1 everywhere without it."""
    x = np.ones((1, 1, 4, 4))
    counted = avg_pool2d(x, 3, 1, 1)[0, 0]
    np.testing.assert_allclose(counted[[0, 0, 3, 3], [0, 3, 0, 3]], 4 / 9)
    np.testing.assert_allclose(counted[0, 1:3], 6 / 9)
    np.testing.assert_allclose(counted[1:3, 1:3], 1.0)
    np.testing.assert_allclose(avg_pool2d(x, 3, 1, 1, count_include_pad=False), 1.0)


@settings(max_examples=15, deadline=None)
@given(cfg=pool_configs())
@_corner_cases
def test_divisor_override_replaces_every_divisor(cfg):
    """Section 7.1: with divisor_override d the outputs are window sums over d, and so are the gradients."""
    x, dy = cfg.arrays()
    sums, dx_sums = reference_pool(x, dy, cfg, "avg")
    sums, dx_sums = sums * cfg.R * cfg.S, dx_sums * cfg.R * cfg.S  # the loop reference divides by R*S
    for d in (1, 3, -2):
        np.testing.assert_allclose(avg_pool2d(x, **cfg.options, divisor_override=d), sums / d, **tol("float64"))
        np.testing.assert_allclose(avg_pool2d_backward(dy, x.shape, **cfg.options, divisor_override=d), dx_sums / d,
                                   **tol("float64"))


def test_dilated_window_wholly_in_padding_is_minus_inf_and_passes_no_gradient(backend):
    """Section 7.1: a 2x2 input, kernel 2 with dilation 3 and padding 1: both taps of each axis are padding.

    PyTorch allows it and gives -inf too; the window's gradient goes nowhere."""
    x = backend.asarray(np.arange(4.0).reshape(1, 1, 2, 2))
    y, argmax = max_pool2d(x, 2, padding=1, dilation=3)
    assert backend.to_numpy(y).tolist() == [[[[-np.inf]]]]
    dx = max_pool2d_backward(backend.asarray(np.ones((1, 1, 1, 1))), argmax, x.shape, 2, padding=1, dilation=3)
    np.testing.assert_array_equal(backend.to_numpy(dx), np.zeros((1, 1, 2, 2)))


# ------------------------------------------------------------------------------ max pooling fused with a ReLU


def _pool_then_relu_unfused_and_fused(backend, cfg, x, dy):
    """relu(max_pool2d(x)) and its backward, as two ops and as :func:`max_pool2d_relu`, on ``backend``."""
    X, DY = backend.asarray(x), backend.asarray(dy)
    options = cfg.options("max")
    pooled, argmax = max_pool2d(X, **options)
    y = relu(pooled)
    dx = max_pool2d_backward(relu_backward(DY, pooled), argmax, X.shape, **options)
    y_fused, argmax_fused = max_pool2d_relu(X, **options)
    dx_fused = max_pool2d_backward(DY, argmax_fused, X.shape, **options)
    as_np = backend.to_numpy
    return ({"y": as_np(y), "dx": as_np(dx), "argmax": np.where(as_np(pooled) > 0, as_np(argmax), -1)},
            {"y": as_np(y_fused), "dx": as_np(dx_fused), "argmax": as_np(argmax_fused)})


@pytest.mark.parametrize("fast_paths", [True, False])
@pytest.mark.parametrize(("kind", "cfg"), [c for c in OPTION_CORNER_CASES if c[0] == "max"],
                         ids=[i for c, i in zip(OPTION_CORNER_CASES, OPTION_CORNER_IDS) if c[0] == "max"])
def test_max_pool2d_relu_is_relu_after_max_pool2d_bit_for_bit(backend, kind, cfg, fast_paths):
    """Section 7.4: the fused op's output, argmax (-1 where the ReLU stops) and gradient equal the two ops'.

    The input is rounded (ties, zeros, windows whose maximum is 0 or negative)
    and holds a NaN, -inf and +inf; every option and layout of the corners.
    """
    x, dy = cfg.arrays(kind)
    x = np.round(x)
    flat = x.reshape(-1)  # a view for every layout but "strided" (a copy there: values then unchanged)
    if flat.size >= 3 and np.shares_memory(flat, x):
        flat[:3] = [np.nan, -np.inf, np.inf]
    with config_context(fast_paths=fast_paths):
        unfused, fused = _pool_then_relu_unfused_and_fused(backend, cfg, x, dy)
    for name in unfused:
        np.testing.assert_array_equal(fused[name], unfused[name], err_msg=name)
    assert cfg.N == 0 or (fused["argmax"] == -1).any()


@settings(max_examples=20, **FIXTURE_SETTINGS)
@given(cfg=option_configs("max"))
def test_max_pool2d_relu_is_relu_after_max_pool2d_for_random_options(cfg):
    """Section 7.4: on NumPy's kernels and on the reference, the fused op equals the two ops for any options."""
    x, dy = cfg.arrays("max")
    for fast_paths in (True, False):
        with config_context(fast_paths=fast_paths):
            unfused, fused = _pool_then_relu_unfused_and_fused(make_backend("numpy"), cfg, x, dy)
        for name in unfused:
            np.testing.assert_array_equal(fused[name], unfused[name], err_msg=name)


def test_max_pool2d_relu_is_numpys_own_kernel_and_the_references_composition():
    """NumPy registers a fused kernel for max_pool2d_relu; the reference composes the two ops."""
    xp = make_backend("numpy").xp
    assert dispatch.kernel("max_pool2d_relu_forward", xp, np.dtype("float32")).__module__ == \
        "portable_cnn.kernels.numpy.pool"
    with config_context(fast_paths=False):
        assert dispatch.kernel("max_pool2d_relu_forward", xp, np.dtype("float32")).__module__ == \
            "portable_cnn.kernels.reference.pool"


# ------------------------------------------------------------------------------ adaptive and global pooling


class AdaptiveConfig(NamedTuple):
    """One adaptive pooling problem: input (N, C, H, W), ``output_size`` as the op takes it (None: keep)."""

    N: int
    C: int
    H: int
    W: int
    output_size: tuple
    layout: str = "contiguous"
    seed: int = 0

    @property
    def y_shape(self) -> tuple:
        return AdaptivePoolGeometry.of((self.N, self.C, self.H, self.W), self.output_size).y_shape

    def arrays(self):
        rng = np.random.default_rng(self.seed)
        x, dy = rng.standard_normal((self.N, self.C, self.H, self.W)), rng.standard_normal(self.y_shape)
        return lay_out(x, self.layout), lay_out(dy, self.layout)


@st.composite
def adaptive_configs(draw, max_hw: int = 9) -> AdaptiveConfig:
    """Random problems: bins that overlap, outputs larger than the input, None entries, (1, 1), every layout."""
    layout = draw(st.sampled_from(LAYOUTS))
    N = 1 if layout == "unbatched" else draw(st.integers(0, 2))
    size = st.one_of(st.none(), st.integers(1, max_hw + 2))
    return AdaptiveConfig(N, draw(st.integers(1, 2)), draw(st.integers(1, max_hw)), draw(st.integers(1, max_hw)),
                          (draw(size), draw(size)), layout, draw(st.integers(0, 2**32 - 1)))


# Bins that overlap (5 rows into 3), more outputs than inputs (3 columns into 5):
OVERLAP_AND_UPSAMPLE = AdaptiveConfig(2, 2, 5, 3, (3, 5), seed=1)
# A None entry (keep the width) and an unbatched input:
NONE_ENTRY_UNBATCHED = AdaptiveConfig(1, 3, 7, 4, (2, None), layout="unbatched", seed=2)
# Global average pooling on channels-last memory (NumPy's GEMV) and on a strided view (its fallback):
GLOBAL_CHANNELS_LAST = AdaptiveConfig(3, 4, 5, 6, (1, 1), layout="channels_last", seed=3)
GLOBAL_STRIDED = AdaptiveConfig(2, 3, 4, 3, (1, 1), layout="strided", seed=4)
ADAPTIVE_CORNERS = (OVERLAP_AND_UPSAMPLE, NONE_ENTRY_UNBATCHED, GLOBAL_CHANNELS_LAST, GLOBAL_STRIDED)


def _adaptive_corners(test):
    for cfg in ADAPTIVE_CORNERS:
        test = example(cfg=cfg)(test)
    return test


def _adaptive(backend, cfg: AdaptiveConfig, x, dy) -> dict:
    X, DY = backend.asarray(x), backend.asarray(dy)
    out = {"y": adaptive_avg_pool2d(X, cfg.output_size),
           "dx": adaptive_avg_pool2d_backward(DY, X.shape, cfg.output_size)}
    out = {name: np.array(backend.to_numpy(value)) for name, value in out.items()}
    assert out["y"].shape == tuple(dy.shape) and out["dx"].shape == tuple(x.shape)
    return out


def test_adaptive_bins_are_torchs():
    """Section 7.2: bins [floor(pH/P), ceil((p+1)H/P)): they overlap where P does not divide H and repeat rows
    where P > H; together they cover every row."""
    assert AdaptivePoolGeometry.bins(5, 3) == ((0, 2), (1, 4), (3, 5))
    assert AdaptivePoolGeometry.bins(3, 5) == ((0, 1), (0, 2), (1, 2), (1, 3), (2, 3))
    assert AdaptivePoolGeometry.bins(6, 3) == ((0, 2), (2, 4), (4, 6))
    assert AdaptivePoolGeometry.bins(7, 1) == ((0, 7),)
    for size, count in np.ndindex(9, 9):
        if size and count:
            bins = AdaptivePoolGeometry.bins(size, count)
            assert bins[0][0] == 0 and bins[-1][1] == size and all(start < end for start, end in bins)
            assert all(bins[i][0] <= bins[i + 1][0] <= bins[i][1] for i in range(count - 1))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cfg=adaptive_configs())
@_adaptive_corners
def test_adaptive_avg_pool2d_matches_torch(torch, dtype, cfg):
    """Section 7.2: y and dx equal torch's adaptive_avg_pool2d and autograd (overlap, upsampling, None, (1, 1))."""
    x, dy = (t.astype(dtype) for t in cfg.arrays())
    got = _adaptive(make_backend("numpy"), cfg, x, dy)
    xt = torch.tensor(np.ascontiguousarray(x), requires_grad=True)
    y = torch.nn.functional.adaptive_avg_pool2d(xt, cfg.output_size)
    y.backward(torch.tensor(np.ascontiguousarray(dy)))
    np.testing.assert_allclose(got["y"], y.detach().numpy(), **tol(dtype))
    np.testing.assert_allclose(got["dx"], xt.grad.numpy(), **tol(dtype))


@settings(max_examples=4, **FIXTURE_SETTINGS)
@given(cfg=adaptive_configs(max_hw=5))
@example(cfg=OVERLAP_AND_UPSAMPLE)
@example(cfg=GLOBAL_STRIDED)
def test_adaptive_avg_pool2d_gradients_match_central_differences(backend, cfg):
    """Section 7.2: the transposed bin products against float64 differences of the backend's forward."""
    x, dy = cfg.arrays()
    got = _adaptive(backend, cfg, x, dy)
    loss = projected_loss(backend.to_numpy, dy)
    numeric = numerical_grad(lambda t: loss(adaptive_avg_pool2d(backend.asarray(t), cfg.output_size)), x)
    assert_grad_close(got["dx"], numeric, "dx")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@settings(max_examples=6, **FIXTURE_SETTINGS)
@given(cfg=adaptive_configs())
@_adaptive_corners
def test_adaptive_avg_pool2d_parity_across_backends(backend, dtype, cfg):
    """Section 7.2: every backend gives NumPy's y and dx (the global kernels included)."""
    x, dy = (t.astype(dtype) for t in cfg.arrays())
    reference = _adaptive(make_backend("numpy"), cfg, x, dy)
    got = _adaptive(backend, cfg, x, dy)
    for name in reference:
        np.testing.assert_allclose(got[name], reference[name], err_msg=name, **tol(dtype))


@pytest.mark.parametrize("cfg", [GLOBAL_CHANNELS_LAST, GLOBAL_STRIDED, OVERLAP_AND_UPSAMPLE], ids=lambda c: c.layout)
def test_adaptive_avg_pool2d_numpy_kernels_match_the_reference(cfg):
    """Section 7.3: NumPy's global average pooling (a GEMV on channels-last memory) gives the reference's numbers."""
    x, dy = cfg.arrays()
    fast = _adaptive(make_backend("numpy"), cfg, x, dy)
    with config_context(fast_paths=False):
        standard = _adaptive(make_backend("numpy"), cfg, x, dy)
    for name in fast:
        np.testing.assert_allclose(fast[name], standard[name], rtol=1e-12, atol=0, err_msg=name)


def test_output_size_one_runs_the_global_kernels_and_is_the_mean():
    """Section 7.3: adaptive_avg_pool2d(x, 1) and global_avg_pool2d ask the dispatch for the global kernels;
    the forward is the mean over H, W and the backward spreads dy / (H*W)."""
    x = lay_out(np.random.default_rng(8).standard_normal((3, 4, 5, 6)), "channels_last")
    dy = np.random.default_rng(9).standard_normal((3, 4, 1, 1))
    with mock.patch.object(dispatch, "kernel", wraps=dispatch.kernel) as kernel:
        y = adaptive_avg_pool2d(x, (1, 1))
        dx = adaptive_avg_pool2d_backward(dy, x.shape, 1)
        y_global, dx_global = global_avg_pool2d(x), global_avg_pool2d_backward(dy, x.shape)
    assert [call.args[0] for call in kernel.call_args_list] == ["global_avg_pool2d_forward",
                                                                 "global_avg_pool2d_backward"] * 2
    np.testing.assert_allclose(y, x.mean(axis=(2, 3), keepdims=True), **tol("float64"))
    np.testing.assert_allclose(dx, np.broadcast_to(dy / 30, x.shape), **tol("float64"))
    np.testing.assert_array_equal(y_global, y)
    np.testing.assert_array_equal(dx_global, dx)


def test_adaptive_zero_output_size_is_empty_as_torchs(torch):
    """Section 7.2: output_size 0 gives an empty output, as torch's forward does; its gradient is zero."""
    x = np.random.default_rng(10).standard_normal((2, 3, 4, 5))
    y = adaptive_avg_pool2d(x, (0, 2))
    assert y.shape == tuple(torch.nn.functional.adaptive_avg_pool2d(torch.tensor(x), (0, 2)).shape) == (2, 3, 0, 2)
    np.testing.assert_array_equal(adaptive_avg_pool2d_backward(y, x.shape, (0, 2)), np.zeros(x.shape))


# ------------------------------------------------------------------------------------ shapes, errors, layers


def _every_pool_op(x, dy_of):
    """``{op: (y, dx)}`` for each pooling op on ``x``; ``dy_of(y)`` gives the output gradient."""
    out = {}
    y, argmax = max_pool2d(x, 2, ceil_mode=True)
    out["max"] = (y, max_pool2d_backward(dy_of(y), argmax, x.shape, 2, ceil_mode=True))
    y = avg_pool2d(x, 3, 2, 1, ceil_mode=True, count_include_pad=False)
    out["avg"] = (y, avg_pool2d_backward(dy_of(y), x.shape, 3, 2, 1, ceil_mode=True, count_include_pad=False))
    y = adaptive_avg_pool2d(x, (2, None))
    out["adaptive"] = (y, adaptive_avg_pool2d_backward(dy_of(y), x.shape, (2, None)))
    y = global_avg_pool2d(x)
    out["global"] = (y, global_avg_pool2d_backward(dy_of(y), x.shape))
    return out


def test_unbatched_input_is_one_sample(backend):
    """Every pooling op takes a (C, H, W) input, as torch does, and gives what the batch of one gives, unbatched."""
    x = np.random.default_rng(11).standard_normal((1, 2, 5, 4))

    def dy_of(y):
        return backend.asarray(np.cos(np.arange(np.prod(y.shape))).reshape(tuple(y.shape)))

    batched = _every_pool_op(backend.asarray(x), dy_of)
    single = _every_pool_op(backend.asarray(x[0]), dy_of)
    for op, (y, dx) in single.items():
        assert tuple(y.shape) == tuple(batched[op][0].shape)[1:] and tuple(dx.shape) == x.shape[1:], op
        np.testing.assert_allclose(backend.to_numpy(y), backend.to_numpy(batched[op][0])[0], err_msg=op,
                                   **tol("float64"))
        np.testing.assert_allclose(backend.to_numpy(dx), backend.to_numpy(batched[op][1])[0], err_msg=op,
                                   **tol("float64"))


@pytest.mark.parametrize("shape", [(0, 2, 5, 4), (2, 0, 5, 4)], ids=["empty batch", "no channels"])
def test_empty_batch_or_channels_give_empty_results(backend, shape):
    """N = 0 (torch allows it) and C = 0 give empty outputs and gradients of the right shapes."""
    x = backend.asarray(np.zeros(shape))
    for op, (y, dx) in _every_pool_op(x, lambda y: backend.asarray(np.zeros(tuple(y.shape)))).items():
        assert tuple(dx.shape) == shape and tuple(y.shape)[:2] == shape[:2], op


BAD_POOL_CALLS = [
    (lambda: max_pool2d(np.zeros(3), 2), ValueError,
     r"^max_pool2d: expected input of 4 dimensions \(N, C, H, W\), got shape \(3,\) \(or of 3, \(C, H, W\), "),
    (lambda: avg_pool2d(np.zeros(()), 2), ValueError,
     r"^avg_pool2d: expected input of 4 dimensions .* got shape \(\) "),
    (lambda: max_pool2d(np.zeros((1, 1, 0, 4)), 1), ValueError,
     r"^max_pool2d: expected input of non-zero height and width, got shape \(1, 1, 0, 4\)$"),
    (lambda: avg_pool2d(np.zeros((1, 1, 4, 4)), 2, divisor_override=0), ValueError,
     r"^avg_pool2d: divisor_override must be None or a non-zero int, got 0$"),
    (lambda: avg_pool2d(np.zeros((1, 1, 4, 4)), 2, divisor_override=1.5), TypeError,
     r"^avg_pool2d: divisor_override must be None or a non-zero int, got 1.5$"),
    (lambda: avg_pool2d(np.zeros((1, 1, 4, 4)), 2, divisor_override=True), TypeError,
     r"^avg_pool2d: divisor_override must be None or a non-zero int, got True$"),
    (lambda: max_pool2d(np.zeros((1, 1, 4, 4)), 2, dilation=0), ValueError, r"^max_pool2d: dilation must be positive"),
    (lambda: max_pool2d(np.zeros((1, 1, 6, 6)), 3, padding=2, dilation=2), ValueError,  # torch: the kernel's half
     r"^max_pool2d: padding must be at most half the kernel size \(3, 3\), got padding \(2, 2\)$"),
    (lambda: adaptive_avg_pool2d(np.zeros((1, 1, 4, 4)), (2, -1)), ValueError,
     r"^adaptive_avg_pool2d: output_size must be a non-negative int, None, or a pair of them, got \(2, -1\)$"),
    (lambda: adaptive_avg_pool2d(np.zeros((1, 1, 4, 4)), (1, 2, 3)), ValueError, r"got \(1, 2, 3\)$"),
    (lambda: adaptive_avg_pool2d(np.zeros((1, 1, 4, 4)), "1"), TypeError, r"got '1'$"),
    (lambda: global_avg_pool2d(np.zeros((1, 1, 4, 0))), ValueError,
     r"^global_avg_pool2d: expected input of non-zero height and width, got shape \(1, 1, 4, 0\)$"),
    (lambda: global_avg_pool2d_backward(np.zeros((1, 2, 1, 1)), (2, 4, 4)), ValueError,
     r"^global_avg_pool2d: expected output gradient of shape \(2, 1, 1\), got \(1, 2, 1, 1\)$"),
    (lambda: max_pool2d_backward(np.zeros((1, 2, 2)), np.zeros((1, 2, 1), dtype=np.int64), (1, 4, 4), 2), ValueError,
     r"^max_pool2d: expected argmax of shape \(1, 2, 2\), got \(1, 2, 1\)$"),
]


@pytest.mark.parametrize(("call", "exc", "message"), BAD_POOL_CALLS, ids=range(len(BAD_POOL_CALLS)))
def test_pool_ops_refuse_bad_arguments_naming_them(call, exc, message):
    """One error line naming the op, the argument, what was expected and what was given."""
    with pytest.raises(exc, match=message):
        call()


POOL_LAYERS = [
    lambda: nn.MaxPool2d((3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), ceil_mode=True),
    lambda: nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False),
    lambda: nn.AvgPool2d((2, 3), ceil_mode=True, divisor_override=4),
    lambda: nn.AdaptiveAvgPool2d((3, None)),
    lambda: nn.AdaptiveAvgPool2d(1),
]


@pytest.mark.parametrize("make", POOL_LAYERS, ids=lambda make: repr(make()))
def test_pool_layers_match_their_torch_mirror(torch, make):
    """Section 7: each layer with options, forward and backward, batched and unbatched, against its torch.nn mirror."""
    layer = make()
    mirror = torch_mirror.torch_layer(torch, layer)
    x = lay_out(np.random.default_rng(12).standard_normal((2, 3, 9, 8)), "channels_last")
    for sample in (x, x[0]):
        y = layer.forward(sample)
        dy = np.sin(np.arange(y.size, dtype=np.float64)).reshape(y.shape)
        dx = layer.backward(dy)
        xt = torch.tensor(np.ascontiguousarray(sample), requires_grad=True)
        yt = mirror(xt)
        yt.backward(torch.tensor(dy))
        np.testing.assert_allclose(y, yt.detach().numpy(), **tol("float64"))
        np.testing.assert_allclose(dx, xt.grad.numpy(), **tol("float64"))
    assert layer.backward(dy, need_input_grad=False) is None


def test_pool_layer_reprs_are_torchs():
    """Reprs in torch's format, with our pairs: MaxPool2d shows dilation and ceil_mode, AvgPool2d what torch shows."""
    assert repr(nn.MaxPool2d(2)) == ("MaxPool2d(kernel_size=(2, 2), stride=(2, 2), padding=(0, 0), dilation=(1, 1), "
                                     "ceil_mode=False)")
    assert repr(nn.AvgPool2d(3, 2, 1, ceil_mode=True)) == "AvgPool2d(kernel_size=(3, 3), stride=(2, 2), padding=(1, 1))"
    assert repr(nn.AdaptiveAvgPool2d(1)) == "AdaptiveAvgPool2d(output_size=(1, 1))"
    assert repr(nn.AdaptiveAvgPool2d([4, None])) == "AdaptiveAvgPool2d(output_size=(4, None))"
    with pytest.raises(ValueError, match=r"^AdaptiveAvgPool2d: output_size must be a non-negative int, None, or a "
                                         r"pair of them, got -1$"):
        nn.AdaptiveAvgPool2d(-1)


# ---------------------------------------------------------------- windows of more than 127 taps


@pytest.mark.parametrize("cfg", [
    PoolConfig(2, 3, 14, 13, 12, 11, 1, 2, 0, 1, seed=5),  # 132 taps, overlapping windows, padding
    PoolConfig(2, 2, 33, 32, 16, 16, None, None, 0, 0, seed=6),  # 256 taps, a trailing row unused
])
def test_max_pool2d_windows_of_more_than_127_taps(cfg):
    """Section 7: the NumPy kernel's int64 argmax (int8 holds only 127 taps) against the loop reference and the reference path."""
    x, dy = cfg.arrays()
    fast = _run(make_backend("numpy"), cfg, "max", "float64")
    with config_context(fast_paths=False):
        standard = _run(make_backend("numpy"), cfg, "max", "float64")
    y, dx = reference_pool(x, dy, cfg, "max")
    assert fast["argmax"].dtype == np.int64 and fast["argmax"].max() > 127  # the wide branch, used beyond int8
    for name in fast:
        np.testing.assert_array_equal(fast[name], standard[name], err_msg=name)
    np.testing.assert_array_equal(fast["y"], y)
    np.testing.assert_allclose(fast["dx"], dx, **tol("float64"))
