"""max_pool2d and avg_pool2d: gradients, ties, parity across backends, the PyTorch oracle.

docs/derivation.md section 7 names these tests. Besides PyTorch, an
independent loop-per-window reference below checks values and gradients
where PyTorch is not installed.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pytest
from conftest import make_backend, tol
from gradcheck import assert_grad_close, numerical_grad, projected_loss
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from portable_cnn import config_context
from portable_cnn.ops import avg_pool2d, avg_pool2d_backward, max_pool2d, max_pool2d_backward, out_size


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
