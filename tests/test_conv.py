"""conv2d, im2col and col2im: gradients, cross-backend parity, the PyTorch oracle.

Every formula of docs/derivation.md sections 1-5 is checked here; each test's
docstring names the formula it proves.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import pytest
from conftest import make_backend, tol
from gradcheck import assert_grad_close, numerical_grad, projected_loss
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from portable_cnn import config_context, dispatch, nn, ops
from portable_cnn.geometry import ConvGeometry
from portable_cnn.kernels.numpy import banded as numpy_banded
from portable_cnn.kernels.numpy import conv as numpy_conv
from portable_cnn.kernels.numpy import depthwise as numpy_depthwise
from portable_cnn.kernels.numpy import parallel as numpy_parallel
from portable_cnn.kernels.reference import conv as reference_conv
from portable_cnn.ops import col2im, conv2d, conv2d_backward, im2col, out_size


class ConvConfig(NamedTuple):
    """One convolution problem in the seed's notation (plus N, C, K, dilation and the groups G)."""

    N: int
    C: int
    K: int
    H: int
    W: int
    R: int
    S: int
    u: int
    v: int
    a: int
    b: int
    dh: int
    dw: int
    seed: int = 0
    G: int = 1

    @property
    def options(self) -> dict:
        """The window options (what im2col takes too)."""
        return {"stride": (self.u, self.v), "padding": (self.a, self.b), "dilation": (self.dh, self.dw)}

    @property
    def conv_options(self) -> dict:
        """The options of conv2d, torch's F.conv2d and their backwards: the window options and ``groups``."""
        return {**self.options, "groups": self.G}

    @property
    def P(self) -> int:
        return out_size(self.H, self.R, self.u, self.a, self.dh)

    @property
    def Q(self) -> int:
        return out_size(self.W, self.S, self.v, self.b, self.dw)

    def arrays(self):
        """Float64 ``x, w, b, dy`` drawn from this config's seed."""
        rng = np.random.default_rng(self.seed)
        x = rng.standard_normal((self.N, self.C, self.H, self.W))
        w = rng.standard_normal((self.K, self.C // self.G, self.R, self.S))
        b = rng.standard_normal(self.K)
        dy = rng.standard_normal((self.N, self.K, self.P, self.Q))
        return x, w, b, dy


@st.composite
def conv_configs(draw, max_hw: int = 5, max_kernel: int = 4, max_nck: int = 2) -> ConvConfig:
    """Random conv problems: uneven strides/paddings/dilations, any kernel that fits the padded input."""
    N, C, K = (draw(st.integers(1, max_nck)) for _ in range(3))
    H, W = draw(st.integers(1, max_hw)), draw(st.integers(1, max_hw))
    u, v = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    a, b = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    dh, dw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    # The dilated kernel d(R-1)+1 must fit in the padded input H+2a.
    R = draw(st.integers(1, min(max_kernel, (H + 2 * a - 1) // dh + 1)))
    S = draw(st.integers(1, min(max_kernel, (W + 2 * b - 1) // dw + 1)))
    seed = draw(st.integers(0, 2**32 - 1))
    return ConvConfig(N, C, K, H, W, R, S, u, v, a, b, dh, dw, seed)


# Named corner cases, run before the random draws of the tests that take them.
# Kernel as large as the padded input (output 1x1), batch 1 and one channel:
KERNEL_FILLS_PADDED_INPUT = ConvConfig(1, 1, 2, 3, 2, 5, 4, 2, 3, 1, 1, 1, 1, seed=1)
# Non-square everything; H + 2a - d(R-1) - 1 = 4 is not a multiple of u = 3 and
# W + 2b - d(S-1) - 1 = 7 not one of v = 2 (remainder rows and columns):
UNEVEN = ConvConfig(2, 3, 2, 7, 5, 3, 2, 3, 2, 1, 2, 2, 1, seed=2)
# Padding larger than the dilated kernel extent minus one (a > d(R-1)):
WIDE_PADDING = ConvConfig(1, 2, 1, 4, 3, 1, 2, 2, 1, 2, 2, 1, 1, seed=3)

FIXTURE_SETTINGS = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
}


def _corner_cases(test):
    for cfg in (KERNEL_FILLS_PADDED_INPUT, UNEVEN, WIDE_PADDING):
        test = example(cfg=cfg)(test)
    return test


def test_corner_cases_are_what_their_names_say():
    """The named configurations really are the corner cases the tests rely on."""
    c = KERNEL_FILLS_PADDED_INPUT
    assert (c.R, c.S) == (c.H + 2 * c.a, c.W + 2 * c.b) and (c.P, c.Q) == (1, 1) and (c.N, c.C) == (1, 1)
    c = UNEVEN
    assert (c.H + 2 * c.a - c.dh * (c.R - 1) - 1) % c.u != 0 and c.H != c.W and c.R != c.S
    c = WIDE_PADDING
    assert c.a > c.dh * (c.R - 1)


# ---------------------------------------------------------------- section 1: output size


@settings(max_examples=200, deadline=None)
@given(
    H=st.integers(1, 30),
    R=st.integers(1, 12),
    u=st.integers(1, 6),
    a=st.integers(0, 5),
    d=st.integers(1, 3),
)
def test_out_size_seed_ceiling_form_equals_floor_form(H, R, u, a, d):
    """Section 1: ceil((H - R + 1 + 2a)/u) == floor((H + 2a - R)/u) + 1, and the dilated form counts windows."""
    padded = H + 2 * a
    if d * (R - 1) + 1 > padded:
        return  # no window fits: the ops reject this (see test_conv2d_rejects_kernel_larger_than_padded_input)
    if d == 1:
        seed_ceiling = -((-(H - R + 1 + 2 * a)) // u)  # exact integer ceil
        assert seed_ceiling == (H + 2 * a - R) // u + 1 == out_size(H, R, u, a)
    # Brute force: the window at output p covers rows u*p + d*r, r < R; it must end inside the padded input.
    windows = sum(1 for p in range(padded) if u * p + d * (R - 1) <= padded - 1)
    assert out_size(H, R, u, a, d) == windows == (H + 2 * a - d * (R - 1) - 1) // u + 1


def test_conv2d_rejects_kernel_larger_than_padded_input():
    """Section 1: no output when d(R-1)+1 > H+2a; the error names the op and both sizes."""
    x = np.zeros((1, 1, 3, 3))
    with pytest.raises(ValueError, match=r"conv2d: kernel 5x5 .* larger than the padded input 3x3"):
        conv2d(x, np.zeros((1, 1, 3, 3)), dilation=2)


# ---------------------------------------------------------------- section 2: cross-correlation


def test_conv2d_is_cross_correlation_and_rotation_gives_convolution():
    """Section 2: conv2d is the seed's cross-correlation; the 180-degree-rotated kernel gives true convolution."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((1, 1, 5, 6))
    k = rng.standard_normal((1, 1, 2, 3))
    H, W, R, S = 5, 6, 2, 3
    correlation = np.array(
        [[sum(x[0, 0, i + m, j + n] * k[0, 0, m, n] for m in range(R) for n in range(S)) for j in range(W - S + 1)]
         for i in range(H - R + 1)]
    )
    np.testing.assert_allclose(conv2d(x, k)[0, 0], correlation, **tol("float64"))
    # Convolution (I * K)_ij = sum_mn I(i - m, j - n) K(m, n), output anchored at the kernel's far corner.
    convolution = np.array(
        [[sum(x[0, 0, i - m, j - n] * k[0, 0, m, n] for m in range(R) for n in range(S)) for j in range(S - 1, W)]
         for i in range(R - 1, H)]
    )
    np.testing.assert_allclose(conv2d(x, k[:, :, ::-1, ::-1])[0, 0], convolution, **tol("float64"))


# ---------------------------------------------------------------- sections 3-5: forward and gradients


def channels_last(a: np.ndarray) -> np.ndarray:
    """The (N, C, H, W) array ``a`` as a view of channels-last (N, H, W, C) memory, as our layers pass activations."""
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)


def _run(backend, cfg: ConvConfig, dtype: str, layout: str = "contiguous"):
    """Forward and backward of ``cfg`` on ``backend`` in ``dtype``; everything returned as NumPy.

    ``layout="channels_last"`` hands x and dy over as views of channels-last memory.
    """
    x, w, b, dy = (np.asarray(t, dtype=dtype) for t in cfg.arrays())
    if layout == "channels_last":
        x, dy = channels_last(x), channels_last(dy)
    X, Wt, Bt, DY = (backend.asarray(t) for t in (x, w, b, dy))
    y, cols = conv2d(X, Wt, Bt, return_cols=True, **cfg.conv_options)
    dx, dw, db = conv2d_backward(DY, X, Wt, cols=cols, **cfg.conv_options)
    dx_recomputed, _, no_db = conv2d_backward(DY, X, Wt, has_bias=False, **cfg.conv_options)
    assert no_db is None
    np.testing.assert_array_equal(backend.to_numpy(dx_recomputed), backend.to_numpy(dx))
    for name, t in {"y": y, "dx": dx, "dw": dw, "db": db}.items():
        assert backend.to_numpy(t).dtype == np.dtype(dtype), name
    return {k: np.array(backend.to_numpy(t)) for k, t in {"y": y, "dx": dx, "dw": dw, "db": db}.items()}


def test_conv2d_forward_is_im2col_gemm():
    """Section 3: y[n, k, p, q] = cols[(n, p, q), :] @ W2[k, :] + b[k] with W2 = W.reshape(K, C*R*S)."""
    cfg = UNEVEN
    x, w, b, _ = cfg.arrays()
    cols = im2col(x, (cfg.R, cfg.S), **cfg.options)
    assert cols.shape == (cfg.N * cfg.P * cfg.Q, cfg.C * cfg.R * cfg.S)
    gemm = (cols @ w.reshape(cfg.K, -1).T + b).reshape(cfg.N, cfg.P, cfg.Q, cfg.K).transpose(0, 3, 1, 2)
    # The definition, term by term, on the zero-padded input.
    xpad = np.pad(x, ((0, 0), (0, 0), (cfg.a, cfg.a), (cfg.b, cfg.b)))
    direct = np.zeros((cfg.N, cfg.K, cfg.P, cfg.Q))
    for p in range(cfg.P):
        for q in range(cfg.Q):
            for r in range(cfg.R):
                for s in range(cfg.S):
                    patch = xpad[:, :, cfg.u * p + cfg.dh * r, cfg.v * q + cfg.dw * s]  # (N, C)
                    direct[:, :, p, q] += patch @ w[:, :, r, s].T
    direct += b[None, :, None, None]
    np.testing.assert_allclose(gemm, direct, **tol("float64"))
    np.testing.assert_allclose(conv2d(x, w, b, **cfg.options), direct, **tol("float64"))


@settings(max_examples=15, **FIXTURE_SETTINGS)
@given(cfg=conv_configs(max_hw=4, max_kernel=3))
@_corner_cases
def test_conv2d_gradients_match_central_differences(backend, cfg):
    """Sections 4-5: dW = dY2.T @ cols, db = sum dY2, dX = col2im(dY2 @ W2), against float64 differences."""
    _check_central_differences(backend, cfg)


def _check_central_differences(backend, cfg: ConvConfig):
    x, w, b, dy = cfg.arrays()
    got = _run(backend, cfg, "float64")

    def loss_of(x_, w_, b_):
        y = conv2d(backend.asarray(x_), backend.asarray(w_), backend.asarray(b_), **cfg.conv_options)
        return projected_loss(backend.to_numpy, dy)(y)

    assert_grad_close(got["dx"], numerical_grad(lambda t: loss_of(t, w, b), x), "dx")
    assert_grad_close(got["dw"], numerical_grad(lambda t: loss_of(x, t, b), w), "dw")
    assert_grad_close(got["db"], numerical_grad(lambda t: loss_of(x, w, t), b), "db")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@settings(max_examples=10, **FIXTURE_SETTINGS)
@given(cfg=conv_configs())
@_corner_cases
def test_conv2d_parity_across_backends(backend, dtype, cfg):
    """Sections 3-5: every backend gives NumPy's y, dx, dW and db in float64 and float32."""
    _check_parity(backend, dtype, cfg)


def _check_parity(backend, dtype, cfg: ConvConfig):
    reference = _run(make_backend("numpy"), cfg, dtype)
    got = _run(backend, cfg, dtype)
    for name in reference:
        np.testing.assert_allclose(got[name], reference[name], err_msg=name, **tol(dtype))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cfg=conv_configs(max_hw=7, max_kernel=5, max_nck=3))
@_corner_cases
def test_conv2d_matches_torch(torch, dtype, cfg):
    """Sections 3-5: y, dx, dW, db equal torch.nn.functional.conv2d and its autograd."""
    _check_against_torch(torch, dtype, cfg)


def _check_against_torch(torch, dtype, cfg: ConvConfig, layout="contiguous"):
    F = torch.nn.functional
    got = _run(make_backend("numpy"), cfg, dtype, layout)
    x, w, b, dy = (torch.tensor(np.asarray(t, dtype=dtype), requires_grad=True) for t in cfg.arrays())
    y = F.conv2d(x, w, b, **cfg.conv_options)
    y.backward(dy.detach())
    expected = {"y": y, "dx": x.grad, "dw": w.grad, "db": b.grad}
    for name, t in expected.items():
        np.testing.assert_allclose(got[name], t.detach().numpy(), err_msg=name, **tol(dtype))


@settings(max_examples=5, **FIXTURE_SETTINGS)
@given(cfg=conv_configs())
@_corner_cases
def test_conv2d_does_not_modify_inputs(backend, cfg):
    """Forward + backward leave x, W, b and dy as they were (numpy-readonly also forbids any write)."""
    _check_inputs_unmodified(backend, cfg)


def _check_inputs_unmodified(backend, cfg: ConvConfig):
    originals = cfg.arrays()
    X, Wt, Bt, DY = (backend.asarray(t) for t in originals)
    y, cols = conv2d(X, Wt, Bt, return_cols=True, **cfg.conv_options)
    conv2d_backward(DY, X, Wt, cols=cols, **cfg.conv_options)
    conv2d_backward(DY, X, Wt, **cfg.conv_options)
    for name, before, after in zip(("x", "w", "b", "dy"), originals, (X, Wt, Bt, DY)):
        np.testing.assert_array_equal(backend.to_numpy(after), before, err_msg=name)


# ---------------------------------------------------------------- im2col / col2im


@settings(max_examples=30, deadline=None)
@given(cfg=conv_configs(max_hw=6))
@_corner_cases
def test_public_im2col_col2im_are_the_reference_on_every_backend(cfg):
    """The public im2col/col2im run the reference kernels (NCHW, (c, r, s) columns) on NumPy and array_api_strict alike."""
    x, *_ = cfg.arrays()
    ksize, shape = (cfg.R, cfg.S), x.shape
    rng = np.random.default_rng(cfg.seed + 1)
    c = rng.standard_normal((cfg.N * cfg.P * cfg.Q, cfg.C * cfg.R * cfg.S))
    g = ConvGeometry.of(shape, (1, cfg.C, cfg.R, cfg.S), (cfg.u, cfg.v), (cfg.a, cfg.b), (cfg.dh, cfg.dw))
    xp = make_backend("numpy").xp
    cols = im2col(x, ksize, **cfg.options)
    folded = col2im(c, shape, ksize, **cfg.options)
    np.testing.assert_array_equal(cols, reference_conv.im2col(xp, x, g))
    np.testing.assert_array_equal(folded, reference_conv.col2im(xp, c, g))
    strict = make_backend("array_api_strict")
    np.testing.assert_array_equal(strict.to_numpy(im2col(strict.asarray(x), ksize, **cfg.options)), cols)
    np.testing.assert_array_equal(strict.to_numpy(col2im(strict.asarray(c), shape, ksize, **cfg.options)), folded)


def _conv_all_paths(cfg: ConvConfig) -> dict:
    """y and every gradient through each entry point: cached or recomputed cols, with and without dx/db."""
    x, w, b, dy = cfg.arrays()
    y, cols = conv2d(x, w, b, return_cols=True, **cfg.conv_options)
    dx, dw, db = conv2d_backward(dy, x, w, cols=cols, **cfg.conv_options)
    dx2, dw2, db2 = conv2d_backward(dy, x, w, **cfg.conv_options)
    none_dx, dw3, none_db = conv2d_backward(dy, x, w, has_bias=False, need_input_grad=False, **cfg.conv_options)
    assert none_dx is None and none_db is None
    return {"y": y, "dx": dx, "dw": dw, "db": db, "dx2": dx2, "dw2": dw2, "db2": db2, "dw3": dw3}


@settings(max_examples=30, deadline=None)
@given(cfg=conv_configs(max_hw=7, max_kernel=4, max_nck=3))
@_corner_cases
def test_conv2d_numpy_fast_path_matches_standard_path(cfg):
    """Sections 3-5: NumPy's channels-last conv2d/conv2d_backward kernels agree with the reference."""
    _check_fast_path_against_reference(cfg)


def _check_fast_path_against_reference(cfg: ConvConfig):
    xp = make_backend("numpy").xp
    assert dispatch.kernel("conv2d_forward", xp, np.dtype("float64")) is numpy_conv.conv2d_forward
    fast = _conv_all_paths(cfg)
    with config_context(fast_paths=False):
        assert dispatch.kernel("conv2d_forward", xp, np.dtype("float64")) is reference_conv.conv2d_forward
        standard = _conv_all_paths(cfg)
    for name in fast:
        np.testing.assert_allclose(fast[name], standard[name], err_msg=name, **tol("float64"))


@settings(max_examples=10, deadline=None)
@given(cfg=conv_configs(max_hw=6, max_nck=3))
@_corner_cases
def test_conv2d_batch_chunks_match_one_gemm(cfg):
    """Sections 3-5: a workspace limit that forces one sample per im2col matrix changes no result."""
    whole = _conv_all_paths(cfg)
    with config_context(workspace_mb=1e-9):  # below one sample: every call is split into N slices
        chunked = _conv_all_paths(cfg)
        g = ConvGeometry.of((cfg.N, cfg.C, cfg.H, cfg.W), (cfg.K, cfg.C, cfg.R, cfg.S), (cfg.u, cfg.v), (cfg.a, cfg.b),
                            (cfg.dh, cfg.dw))
        assert g.samples_per_slice(8, 1e-9 * 2**20) == 1
        with config_context(fast_paths=False):
            chunked_reference = _conv_all_paths(cfg)
    for name in whole:
        np.testing.assert_allclose(chunked_reference[name], whole[name], err_msg=name, **tol("float64"))
        np.testing.assert_allclose(chunked[name], whole[name], err_msg=name, **tol("float64"))


@settings(max_examples=10, **FIXTURE_SETTINGS)
@given(cfg=conv_configs(max_hw=6))
@_corner_cases
def test_col2im_is_adjoint_of_im2col(backend, cfg):
    """Section 5: <im2col(x), c> == <x, col2im(c)> for every x and c."""
    x, *_ = cfg.arrays()
    rng = np.random.default_rng(cfg.seed + 2)
    c = rng.standard_normal((cfg.N * cfg.P * cfg.Q, cfg.C * cfg.R * cfg.S))
    ksize = (cfg.R, cfg.S)
    cols = backend.to_numpy(im2col(backend.asarray(x), ksize, **cfg.options))
    folded = backend.to_numpy(col2im(backend.asarray(c), x.shape, ksize, **cfg.options))
    assert folded.shape == x.shape
    np.testing.assert_allclose(np.sum(cols * c), np.sum(x * folded), **tol("float64"))


# ---------------------------------------------------------------- section 5: dX as a convolution


def rotated_kernel_convolution_dx(dy, w, cfg: ConvConfig) -> np.ndarray:
    """dX built from the public conv2d alone (section 5, second form).

    1. Dilate dy by the stride: ``u - 1`` zero rows (``v - 1`` columns) between
       entries, plus the remainder rows/columns that the forward's floor drops,
       so the result has ``H + 2a - d(R-1)`` rows.
    2. Pad it by the dilated kernel extent ``d(R-1)`` on every side.
    3. Correlate with the kernel rotated 180 degrees and its channel axes
       swapped, ``(K, C, R, S) -> (C, K, R, S)``, same dilation, stride 1:
       that is the gradient of the *padded* input.
    4. Crop the forward's padding ``a`` (``b``) away.

    Steps 2 and 4 partly cancel: pad by ``d(R-1) - a`` when that is not
    negative, else pad by 0 and crop the rest.
    """
    N, K, P, Q = dy.shape
    rows = cfg.H + 2 * cfg.a - cfg.dh * (cfg.R - 1)  # = u(P-1) + 1 + remainder
    cols_ = cfg.W + 2 * cfg.b - cfg.dw * (cfg.S - 1)
    dilated = np.zeros((N, K, rows, cols_), dtype=dy.dtype)
    dilated[:, :, : cfg.u * (P - 1) + 1 : cfg.u, : cfg.v * (Q - 1) + 1 : cfg.v] = dy
    rotated = np.ascontiguousarray(w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))  # (C, K, R, S)
    pad_h, pad_w = cfg.dh * (cfg.R - 1) - cfg.a, cfg.dw * (cfg.S - 1) - cfg.b
    dx = conv2d(dilated, rotated, padding=(max(pad_h, 0), max(pad_w, 0)), dilation=(cfg.dh, cfg.dw))
    crop_h, crop_w = max(-pad_h, 0), max(-pad_w, 0)
    return dx[:, :, crop_h : crop_h + cfg.H, crop_w : crop_w + cfg.W]


@settings(max_examples=60, deadline=None)
@given(cfg=conv_configs(max_hw=7, max_kernel=4, max_nck=3))
@_corner_cases
def test_dx_equals_rotated_kernel_convolution(cfg):
    """Section 5: col2im(dY2 @ W2) == full convolution of the stride-dilated, padded dY with the rotated kernel."""
    x, w, _, dy = cfg.arrays()
    dx, _, _ = conv2d_backward(dy, x, w, **cfg.options)
    by_convolution = rotated_kernel_convolution_dx(dy, w, cfg)
    assert by_convolution.shape == x.shape
    np.testing.assert_allclose(dx, by_convolution, **tol("float64"))


def test_dx_by_convolution_covers_the_remainder_and_wide_padding_cases():
    """The rotated-kernel construction itself, on the cases that need its remainder and crop branches."""
    for cfg in (UNEVEN, WIDE_PADDING):
        x, w, _, dy = cfg.arrays()
        # An independent dX: the definition, accumulated entry by entry on the padded input.
        dxpad = np.zeros((cfg.N, cfg.C, cfg.H + 2 * cfg.a, cfg.W + 2 * cfg.b))
        for p, q, r, s in np.ndindex(cfg.P, cfg.Q, cfg.R, cfg.S):
            dxpad[:, :, cfg.u * p + cfg.dh * r, cfg.v * q + cfg.dw * s] += dy[:, :, p, q] @ w[:, :, r, s]
        expected = dxpad[:, :, cfg.a : cfg.a + cfg.H, cfg.b : cfg.b + cfg.W]
        np.testing.assert_allclose(rotated_kernel_convolution_dx(dy, w, cfg), expected, **tol("float64"))
        assert math.prod(expected.shape) == x.size


# ---------------------------------------------------------------- section 4: dW as a correlation


@settings(max_examples=40, deadline=None)
@given(cfg=conv_configs(max_hw=7, max_kernel=4, max_nck=3))
@_corner_cases
def test_dw_equals_input_correlated_with_dy(cfg):
    """Section 4: dW[k, c] = correlation of the padded x (batch as channels) with dY, dilation (u, v), stride (d_h, d_w)."""
    x, w, _, dy = cfg.arrays()
    _, dw, db = conv2d_backward(dy, x, w, **cfg.options)
    correlated = conv2d(
        x.transpose(1, 0, 2, 3),  # (C, N, H, W): channels become the batch, the batch the channels
        dy.transpose(1, 0, 2, 3),  # (K, N, P, Q): dY is the kernel
        stride=(cfg.dh, cfg.dw),
        padding=(cfg.a, cfg.b),
        dilation=(cfg.u, cfg.v),
    )  # (C, K, R', S') with R' >= R: the extra taps would read rows the forward never used
    expected = correlated[:, :, : cfg.R, : cfg.S].transpose(1, 0, 2, 3)  # (K, C, R, S)
    np.testing.assert_allclose(dw, expected, **tol("float64"))
    np.testing.assert_allclose(db, dy.sum(axis=(0, 2, 3)), **tol("float64"))


@settings(max_examples=10, deadline=None)
@given(cfg=conv_configs(max_hw=6, max_nck=3))
@_corner_cases
def test_conv2d_workspace_reuse_changes_no_result(cfg):
    """Sections 3-5: buffers reused from call to call (a layer's workspace) give fresh-buffer results.

    The second call sees buffers the first call filled (a zero border that
    must stay zero, columns that must be overwritten), with other inputs.
    """
    workspace = {}
    for seed_offset in (0, 7):
        x, w, b, dy = cfg._replace(seed=cfg.seed + seed_offset).arrays()
        y, cols = conv2d(x, w, b, return_cols=True, workspace=workspace, **cfg.options)
        dx, dw, db = conv2d_backward(dy, x, w, cols=cols, workspace=workspace, **cfg.options)
        y_ref = conv2d(x, w, b, **cfg.options)
        dx_ref, dw_ref, db_ref = conv2d_backward(dy, x, w, **cfg.options)
        for got, want in ((y, y_ref), (dx, dx_ref), (dw, dw_ref), (db, db_ref)):
            np.testing.assert_allclose(got, want, **tol("float64"))
    if cfg.a or cfg.b:
        assert any(key.endswith(".pad") for key in workspace), "the padded input should live in the workspace"


@pytest.mark.parametrize("samples_per_block", [1, 2])
@pytest.mark.parametrize("cfg", [UNEVEN._replace(N=5), UNEVEN._replace(N=5, C=1), WIDE_PADDING._replace(N=5)])
def test_conv2d_numpy_blocks_of_samples_match_standard_path(cfg, samples_per_block, monkeypatch):
    """Sections 3-5: NumPy's blocked path with several blocks per thread and a short last block."""
    per_sample = cfg.P * cfg.Q * cfg.R * cfg.S * max(cfg.C, cfg.K) * 8
    monkeypatch.setattr(numpy_conv, "_BLOCK_BYTES", samples_per_block * per_sample)
    fast = _conv_all_paths(cfg)
    with config_context(fast_paths=False):
        standard = _conv_all_paths(cfg)
    for name in fast:
        np.testing.assert_allclose(fast[name], standard[name], err_msg=name, **tol("float64"))


# ---------------------------------------------------------------- section 5b: the banded product


def _geometry(cfg: ConvConfig) -> ConvGeometry:
    return ConvGeometry.of((cfg.N, cfg.C, cfg.H, cfg.W), (cfg.K, cfg.C // cfg.G, cfg.R, cfg.S), (cfg.u, cfg.v),
                           (cfg.a, cfg.b), (cfg.dh, cfg.dw), groups=cfg.G)


# Stride 1, few channels, so NumPy runs them banded (T the tile width):
BANDED_CASES = {
    # lenet's first layer in small: one channel, 5x5, padding 2; T = 6 of Q = 12, two tiles.
    "lenet-first": ConvConfig(3, 1, 6, 12, 12, 5, 5, 1, 1, 2, 2, 1, 1, seed=11),
    # lenet's second layer as it is: T = 5 of Q = 10.
    "lenet-second": ConvConfig(4, 6, 16, 14, 14, 5, 5, 1, 1, 0, 0, 1, 1, seed=12),
    # Non-square everything, padding a != b: Q = 10, T = 2, five tiles.
    "uneven": ConvConfig(5, 3, 4, 6, 10, 2, 3, 1, 1, 2, 1, 1, 1, seed=13),
    # T = 4 = S - 1: a tile's overlap with the next is the whole next tile.
    "overlap-a-whole-tile": ConvConfig(3, 2, 3, 8, 8, 3, 5, 1, 1, 1, 2, 1, 1, seed=14),
}


@pytest.fixture
def banded_at_any_batch(monkeypatch):
    """The banded product for BANDED_CASES' small batches too (it starts at 3 MB of im2col columns)."""
    monkeypatch.setattr(numpy_banded, "_MIN_COLUMN_BYTES", 0)


def test_banded_cases_are_what_their_names_say(banded_at_any_batch):
    """Every BANDED_CASE runs banded on NumPy, with the tile widths the comments give."""
    widths = {name: numpy_banded.tile_width(_geometry(cfg)) for name, cfg in BANDED_CASES.items()}
    assert all(numpy_banded.use(_geometry(cfg), 8) for cfg in BANDED_CASES.values())
    assert widths == {"lenet-first": 6, "lenet-second": 5, "uneven": 2, "overlap-a-whole-tile": 4}
    assert (BANDED_CASES["uneven"].Q, BANDED_CASES["overlap-a-whole-tile"].S) == (10, 5)


@pytest.mark.parametrize(
    "x_shape, w_shape, options, banded",
    [
        ((128, 1, 28, 28), (6, 1, 5, 5), {"padding": 2}, True),  # lenet's first layer
        ((32, 1, 28, 28), (6, 1, 5, 5), {"padding": 2}, False),  # at batch 32: 2.5 MB of columns
        ((64, 6, 14, 14), (16, 6, 5, 5), {}, True),  # lenet's second at batch 64: 3.8 MB
        ((128, 6, 14, 14), (16, 6, 5, 5), {}, True),  # lenet's second
        ((128, 3, 32, 32), (16, 3, 3, 3), {"padding": 1}, True),  # resnet20's first
        ((128, 16, 32, 32), (16, 16, 3, 3), {"padding": 1}, False),  # resnet20's 16 -> 16: C > 8
        ((128, 3, 32, 32), (32, 3, 3, 3), {"padding": 1}, False),  # vgg-small's first: K > 16
        ((128, 1, 8, 8), (16, 1, 3, 3), {"padding": 1}, False),  # the digits net's: C*S < 4
        ((128, 6, 14, 14), (16, 6, 5, 5), {"stride": 2}, False),
        ((128, 6, 14, 14), (16, 6, 5, 5), {"dilation": 2}, False),
        ((128, 6, 14, 14), (16, 3, 5, 5), {"groups": 2}, False),
        ((128, 6, 14, 17), (16, 6, 5, 5), {}, False),  # Q = 13: no tile of at least S - 1 = 4 divides it
        ((128, 6, 14, 14), (16, 6, 5, 1), {}, False),  # S = 1: nothing to band
    ],
)
def test_banded_product_runs_the_thin_stride_one_layers(x_shape, w_shape, options, banded):
    """Which convolutions NumPy runs banded (the thresholds of portable_cnn/kernels/numpy/banded.py)."""
    g = ConvGeometry.of(x_shape, w_shape, options.get("stride", 1), options.get("padding", 0),
                        options.get("dilation", 1), groups=options.get("groups", 1))
    assert numpy_banded.use(g, 4) is banded


def test_banded_product_is_reached_by_conv2d_on_numpy(monkeypatch, banded_at_any_batch):
    """conv2d and conv2d_backward on NumPy go to the banded kernels when use() says so, and only then."""
    calls = []
    real_forward, real_backward = numpy_banded.forward, numpy_banded.backward
    monkeypatch.setattr(numpy_banded, "forward", lambda *a: calls.append("forward") or real_forward(*a))
    monkeypatch.setattr(numpy_banded, "backward", lambda *a: calls.append("backward") or real_backward(*a))
    x, w, b, dy = BANDED_CASES["lenet-second"].arrays()
    conv2d_backward(dy, x, w, cols=conv2d(x, w, b, return_cols=True)[1])
    assert calls == ["forward", "backward"]
    calls.clear()
    conv2d(x, w, b, stride=2)
    assert calls == []


def test_band_is_the_weight_along_its_diagonals():
    """Section 5b: B[r, t+s, c, t, k] = w[k, c, r, s] and zero off the band, entry by entry."""
    cfg = BANDED_CASES["uneven"]
    g = _geometry(cfg)
    T = numpy_banded.tile_width(g)
    _, w, _, _ = cfg.arrays()
    band = numpy_banded._band(w, g, T).reshape(cfg.R, T + cfg.S - 1, cfg.C, T, cfg.K)
    want = np.zeros_like(band)
    for r, wcol, c, t, k in np.ndindex(*band.shape):
        if 0 <= wcol - t < cfg.S:
            want[r, wcol, c, t, k] = w[k, c, r, wcol - t]
    np.testing.assert_array_equal(band, want)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", list(BANDED_CASES))
def test_banded_conv2d_matches_standard_path(name, dtype, banded_at_any_batch):
    """Section 5b: y, dx, dW, db of the banded product equal the reference im2col + GEMM's, through every entry."""
    cfg = BANDED_CASES[name]
    fast, standard = {}, {}
    for out, fast_paths in ((fast, True), (standard, False)):
        x, w, b, dy = (a.astype(dtype) for a in cfg.arrays())
        with config_context(fast_paths=fast_paths):
            y = conv2d(x, w, b, **cfg.options)
            out["y"] = y
            out["dx"], out["dw"], out["db"] = conv2d_backward(dy, x, w, **cfg.options)
            none_dx, out["dw_alone"], none_db = conv2d_backward(dy, x, w, has_bias=False, need_input_grad=False,
                                                                **cfg.options)
            assert none_dx is None and none_db is None
    for key in fast:
        assert fast[key].dtype == np.dtype(dtype), key
        np.testing.assert_allclose(fast[key], standard[key], err_msg=key, **tol(dtype))


@pytest.mark.parametrize("name", ["lenet-second", "uneven", "overlap-a-whole-tile"])
def test_banded_conv2d_blocks_threads_and_reused_buffers_match_standard_path(name, monkeypatch,
                                                                             banded_at_any_batch):
    """Section 5b: one sample per block on two threads, buffers reused across calls with other inputs."""
    monkeypatch.setattr(numpy_banded, "_BLOCK_BYTES", 1)
    monkeypatch.setattr(numpy_parallel, "_MIN_FLOPS_PER_THREAD", 1)  # threads even for these small problems
    workspace = {}
    for seed_offset in (0, 7):
        cfg = BANDED_CASES[name]._replace(seed=BANDED_CASES[name].seed + seed_offset)
        x, w, b, dy = cfg.arrays()
        with config_context(num_threads=2):
            y = conv2d(x, w, b, workspace=workspace, **cfg.options)
            dx, dw, db = conv2d_backward(dy, x, w, workspace=workspace, **cfg.options)
        with config_context(fast_paths=False):
            want = (conv2d(x, w, b, **cfg.options), *conv2d_backward(dy, x, w, **cfg.options))
        for got, expected in zip((y, dx, dw, db), want):
            np.testing.assert_allclose(got, expected, **tol("float64"))
    assert any(key.startswith("banded.") for key in workspace), "the unfolded rows should live in the workspace"


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", list(BANDED_CASES))
def test_banded_conv2d_matches_torch(torch, name, dtype, layout, banded_at_any_batch):
    """Section 5b: the banded y, dx, dW, db equal torch.nn.functional.conv2d and its autograd."""
    _check_against_torch(torch, dtype, BANDED_CASES[name], layout)


@pytest.mark.parametrize("name", ["lenet-first", "uneven"])
def test_banded_conv2d_does_not_modify_inputs(backend, name, banded_at_any_batch):
    """Forward + backward of the banded cases leave x, W, b and dy as they were."""
    _check_inputs_unmodified(backend, BANDED_CASES[name])


@pytest.mark.parametrize("name", ["lenet-first", "uneven"])
def test_banded_conv2d_gradients_match_central_differences(name, banded_at_any_batch):
    """Section 5b: the banded gradients against float64 central differences (NumPy)."""
    _check_central_differences(make_backend("numpy"), BANDED_CASES[name]._replace(N=2))


# ---------------------------------------------------------------- section 5a: groups and depthwise


@st.composite
def grouped_conv_configs(draw, max_hw: int = 5, max_kernel: int = 3, max_groups: int = 3) -> ConvConfig:
    """:func:`conv_configs` with ``G`` groups: ordinary (G = 1), grouped (C/G = 2) and depthwise (C/G = 1).

    ``K/G``, the channel multiplier of a depthwise convolution, is 1 or 2.
    """
    cfg = draw(conv_configs(max_hw=max_hw, max_kernel=max_kernel))
    G = draw(st.integers(1, max_groups))
    in_per_group, out_per_group = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    return cfg._replace(C=G * in_per_group, K=G * out_per_group, G=G)


# MobileNet's layer in small: depthwise (G = C), multiplier 1, 3x3, stride 2, padding 1.
DEPTHWISE = ConvConfig(2, 4, 4, 7, 6, 3, 3, 2, 2, 1, 1, 1, 1, seed=5, G=4)
# Depthwise, stride 1 (most of MobileNet's), uneven padding and dilation:
DEPTHWISE_STRIDE_1 = ConvConfig(2, 4, 4, 6, 5, 3, 3, 1, 1, 1, 0, 1, 2, seed=10, G=4)
# Depthwise with channel multiplier 2, dilation, uneven strides and paddings, rectangular kernel:
DEPTHWISE_MULTIPLIER_2 = ConvConfig(2, 3, 6, 6, 7, 3, 2, 1, 2, 2, 0, 2, 1, seed=6, G=3)
# Two groups of 3 input and 2 output channels, stride 1 (NumPy's dx as a convolution):
GROUPED = ConvConfig(2, 6, 4, 5, 5, 2, 3, 1, 1, 1, 1, 1, 1, seed=7, G=2)
# Two groups, strided with remainder rows (NumPy's dx by col2im):
GROUPED_STRIDED = ConvConfig(2, 4, 6, 7, 5, 3, 2, 3, 2, 1, 2, 2, 1, seed=8, G=2)
# An empty batch, depthwise:
EMPTY_BATCH = ConvConfig(0, 4, 8, 5, 5, 3, 3, 1, 1, 1, 1, 1, 1, seed=9, G=4)
GROUP_CASES = (DEPTHWISE, DEPTHWISE_STRIDE_1, DEPTHWISE_MULTIPLIER_2, GROUPED, GROUPED_STRIDED, EMPTY_BATCH)


def _group_cases(test=None, *, one_sample=False, **others):
    """The named group cases as hypothesis examples (with ``others``, the test's other arguments).

    ``one_sample``: cut their batches to one sample, for tests that pay per input entry.
    """
    if test is None:
        return lambda t: _group_cases(t, one_sample=one_sample, **others)
    for cfg in GROUP_CASES:
        test = example(cfg=cfg._replace(N=min(cfg.N, 1)) if one_sample else cfg, **others)(test)
    return test


def test_group_cases_are_what_their_names_say():
    for cfg in (DEPTHWISE, DEPTHWISE_STRIDE_1, DEPTHWISE_MULTIPLIER_2, EMPTY_BATCH):
        assert cfg.G == cfg.C > 1 and cfg.K % cfg.C == 0
    assert (DEPTHWISE.K // DEPTHWISE.C, DEPTHWISE.u) == (1, 2)
    c = DEPTHWISE_STRIDE_1
    assert c.K == c.C and c.u == c.v == 1 and (c.a, c.dh) != (c.b, c.dw)
    assert DEPTHWISE_MULTIPLIER_2.K // DEPTHWISE_MULTIPLIER_2.C == 2
    for cfg in (GROUPED, GROUPED_STRIDED):
        assert cfg.G > 1 and cfg.C // cfg.G > 1 and cfg.K % cfg.G == 0
    assert GROUPED.u == GROUPED.v == 1 and GROUPED_STRIDED.u > 1 and EMPTY_BATCH.N == 0


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cfg=grouped_conv_configs(max_hw=7, max_kernel=4), layout=st.sampled_from(["contiguous", "channels_last"]))
@_group_cases(layout="contiguous")
@_group_cases(layout="channels_last")
def test_grouped_conv2d_matches_torch(torch, dtype, cfg, layout):
    """Section 5a: y, dx, dW, db of grouped and depthwise convolutions equal F.conv2d(groups=G) and its autograd."""
    _check_against_torch(torch, dtype, cfg, layout)


@settings(max_examples=4, **FIXTURE_SETTINGS)
@given(cfg=grouped_conv_configs(max_hw=4))
@_group_cases(one_sample=True)
def test_grouped_conv2d_gradients_match_central_differences(backend, cfg):
    """Section 5a: the per-group dW, db and dX against float64 central differences, on every backend."""
    _check_central_differences(backend, cfg)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@settings(max_examples=6, **FIXTURE_SETTINGS)
@given(cfg=grouped_conv_configs())
@_group_cases
def test_grouped_conv2d_parity_across_backends(backend, dtype, cfg):
    """Section 5a: every backend gives NumPy's grouped and depthwise y, dx, dW and db, and none writes its inputs."""
    _check_parity(backend, dtype, cfg)
    _check_inputs_unmodified(backend, cfg)


@settings(max_examples=20, deadline=None)
@given(cfg=grouped_conv_configs(max_hw=7, max_kernel=4))
@_group_cases
def test_grouped_conv2d_is_the_dense_convolution_with_a_block_diagonal_weight(cfg):
    """Section 5a: groups are the dense convolution whose weight is zero between groups; dW is its diagonal blocks.

    Built from the ungrouped conv2d alone: ``w`` scattered into the
    ``(K, C, R, S)`` weight that is zero outside the ``G`` diagonal blocks,
    and, independently, the concatenation of ``G`` convolutions of the
    groups' channel slices.
    """
    x, w, b, dy = cfg.arrays()
    G, Cg, Kg = cfg.G, cfg.C // cfg.G, cfg.K // cfg.G
    dense = np.zeros((cfg.K, cfg.C, cfg.R, cfg.S))
    for g in range(G):
        dense[g * Kg : (g + 1) * Kg, g * Cg : (g + 1) * Cg] = w[g * Kg : (g + 1) * Kg]
    y, dx, dw, db = _forward_backward(x, w, b, dy, cfg.conv_options)
    y_dense, dx_dense, dw_dense, db_dense = _forward_backward(x, dense, b, dy, cfg.options)
    dw_blocks = np.concatenate([dw_dense[g * Kg : (g + 1) * Kg, g * Cg : (g + 1) * Cg] for g in range(G)])
    for got, want in ((y, y_dense), (dx, dx_dense), (dw, dw_blocks), (db, db_dense)):
        np.testing.assert_allclose(got, want, **tol("float64"))
    parts = [_forward_backward(x[:, g * Cg : (g + 1) * Cg], w[g * Kg : (g + 1) * Kg], b[g * Kg : (g + 1) * Kg],
                               dy[:, g * Kg : (g + 1) * Kg], cfg.options) for g in range(G)]
    for i, got in enumerate((y, dx, dw, db)):
        np.testing.assert_allclose(got, np.concatenate([part[i] for part in parts], axis=1 if i < 2 else 0),
                                   **tol("float64"))


def _forward_backward(x, w, b, dy, options):
    y = conv2d(x, w, b, **options)
    return (y, *conv2d_backward(dy, x, w, **options))


@settings(max_examples=20, deadline=None)
@given(cfg=grouped_conv_configs(max_hw=7, max_kernel=4, max_groups=4))
@_group_cases
def test_grouped_conv2d_numpy_fast_path_matches_standard_path(cfg):
    """Section 5a: NumPy's grouped GEMMs and its depthwise kernel agree with the reference's batched GEMMs."""
    _check_fast_path_against_reference(cfg)


@pytest.mark.parametrize("cfg", [c._replace(N=5) for c in GROUP_CASES[:5]],
                         ids=["depthwise", "depthwise-stride-1", "multiplier-2", "grouped", "strided"])
def test_grouped_conv2d_numpy_blocks_threads_and_slices_match_standard_path(cfg, monkeypatch):
    """Section 5a: NumPy with one sample per block on two threads, and batches in slices, against the reference."""
    monkeypatch.setattr(numpy_conv, "_BLOCK_BYTES", 1)
    monkeypatch.setattr(numpy_depthwise, "_BLOCK_BYTES", 1)
    monkeypatch.setattr(numpy_parallel, "_MIN_FLOPS_PER_THREAD", 1)  # threads even for these small problems
    with config_context(num_threads=2):
        fast = _conv_all_paths(cfg)
    with config_context(workspace_mb=1e-9):  # below one sample: the reference convolves N slices
        sliced = _conv_all_paths(cfg)
        with config_context(fast_paths=False):
            standard = _conv_all_paths(cfg)
    for name in fast:
        np.testing.assert_allclose(fast[name], standard[name], err_msg=name, **tol("float64"))
        np.testing.assert_allclose(sliced[name], standard[name], err_msg=name, **tol("float64"))


def test_depthwise_conv2d_does_not_run_as_gemms_on_numpy(monkeypatch):
    """groups == C reaches NumPy's depthwise kernel (no im2col); groups == C == 1 stays an ordinary convolution."""
    calls = []
    monkeypatch.setattr(numpy_depthwise, "forward", lambda *args: calls.append("forward") or np.zeros((2, 3, 3, 8)))
    conv2d(np.zeros((2, 4, 5, 5)), np.zeros((8, 1, 3, 3)), groups=4)
    conv2d(np.zeros((2, 1, 5, 5)), np.zeros((8, 1, 3, 3)), groups=1)
    assert calls == ["forward"]


@pytest.mark.parametrize(
    ("x_shape", "w_shape", "groups", "error", "message"),
    [
        ((1, 4, 5, 5), (4, 2, 3, 3), 0, ValueError, "conv2d: groups must be a positive integer, got 0"),
        ((1, 4, 5, 5), (4, 2, 3, 3), 2.0, TypeError, "conv2d: groups must be a positive integer, got 2.0"),
        ((1, 4, 5, 5), (4, 2, 3, 3), True, TypeError, "conv2d: groups must be a positive integer, got True"),
        ((1, 4, 5, 5), (3, 2, 3, 3), 2, ValueError,
         r"conv2d: expected weight with out channels divisible by groups=2, got weight shape \(3, 2, 3, 3\)"),
        ((1, 4, 5, 5), (4, 1, 3, 3), 2, ValueError,
         r"conv2d: expected input with 2 = 2 groups x 1 channels \(weight shape \(4, 1, 3, 3\)\), "
         r"got 4 channels \(input shape \(1, 4, 5, 5\)\)"),
        ((1, 6, 5, 5), (4, 1, 3, 3), 4, ValueError,  # 6 input channels do not split into 4 groups
         r"conv2d: expected input with 4 = 4 groups x 1 channels \(weight shape \(4, 1, 3, 3\)\), "
         r"got 6 channels \(input shape \(1, 6, 5, 5\)\)"),
    ],
)
def test_conv2d_rejects_bad_groups_in_one_line(x_shape, w_shape, groups, error, message):
    """A bad ``groups``: one line naming the argument, what was expected and what was given (forward and backward)."""
    x, w = np.zeros(x_shape), np.zeros(w_shape)
    with pytest.raises(error, match=f"^{message}$"):
        conv2d(x, w, groups=groups)
    with pytest.raises(error, match=f"^{message}$"):
        conv2d_backward(np.zeros((1, w_shape[0], 3, 3)), x, w, groups=groups)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((6, 4, 3, 1, 0, 1, 4), "Conv2d: in_channels must be divisible by groups, got in_channels=6, groups=4"),
        ((4, 6, 3, 1, 0, 1, 4), "Conv2d: out_channels must be divisible by groups, got out_channels=6, groups=4"),
        ((4, 4, 3, 1, 0, 1, -1), "Conv2d: groups must be a positive integer, got -1"),
    ],
)
def test_conv2d_layer_rejects_bad_groups_in_one_line(args, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        nn.Conv2d(*args)


def test_grouped_conv2d_layer_shapes_init_repr_and_gradients():
    """The layer: weight (K, C/G, R, S), He init over one output's C/G*R*S inputs, torch's repr, the op's numbers."""
    layer = nn.Conv2d(64, 128, 3, padding=1, groups=32, rng=0)
    weight = layer.params["weight"]
    assert weight.shape == (128, 2, 3, 3)
    assert np.std(weight) == pytest.approx(np.sqrt(2 / (2 * 3 * 3)), rel=0.1)
    assert repr(layer) == ("Conv2d(64, 128, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1), "
                           "groups=32, bias=True)")
    assert "groups" not in repr(nn.Conv2d(4, 4, 3))
    depthwise = nn.Conv2d(4, 8, 3, stride=2, groups=4, bias=False, rng=1).to("numpy", "float64")
    x = np.random.default_rng(2).standard_normal((2, 4, 7, 7))
    y = depthwise.forward(x)
    dy = np.cos(np.arange(y.size)).reshape(y.shape)
    dx = depthwise.backward(dy)
    want_dx, want_dw, _ = conv2d_backward(dy, x, depthwise.params["weight"], stride=2, groups=4, has_bias=False)
    np.testing.assert_array_equal(y, conv2d(x, depthwise.params["weight"], stride=2, groups=4))
    np.testing.assert_array_equal(dx, want_dx)
    np.testing.assert_array_equal(depthwise.grads["weight"], want_dw)


# ---------------------------------------------------------------- batch slices on backends without kernels


@pytest.mark.parametrize("name", ["array_api_strict", "torch"])
def test_conv2d_batch_slices_on_backends_without_kernels_match_one_gemm(name, monkeypatch):
    """Sections 3-5: under the workspace limit the reference convolves one sample at a time on array_api_strict and PyTorch.

    Those backends have no kernels of their own, so the reference's sliced
    path (outputs concatenated, weight and bias gradients added over the
    slices) is what runs there, as on any backend without a fast path.
    """
    backend = make_backend(name)
    rng = np.random.default_rng(11)
    x, w, b = rng.standard_normal((5, 3, 7, 6)), rng.standard_normal((4, 3, 3, 2)), rng.standard_normal(4)
    options = {"stride": (2, 1), "padding": (1, 2), "dilation": (1, 2)}

    def run() -> dict:
        X, Wt, Bt = (backend.asarray(t) for t in (x, w, b))
        y = conv2d(X, Wt, Bt, **options)
        dy = backend.asarray(np.cos(np.arange(math.prod(y.shape), dtype=np.float64)).reshape(tuple(y.shape)))
        dx, dw, db = conv2d_backward(dy, X, Wt, **options)
        return {key: backend.to_numpy(value) for key, value in {"y": y, "dx": dx, "dw": dw, "db": db}.items()}

    unfolded = []  # the batch size of every im2col: one per slice
    im2col_reference = reference_conv.im2col
    monkeypatch.setattr(reference_conv, "im2col", lambda xp, x, g: unfolded.append(g.N) or im2col_reference(xp, x, g))
    whole = run()
    assert unfolded == [5, 5]
    unfolded.clear()
    with config_context(workspace_mb=1e-9):  # below one sample: slices of one
        sliced = run()
    assert unfolded == [1] * 10
    for key in whole:
        np.testing.assert_allclose(sliced[key], whole[key], err_msg=key, **tol("float64"))


def test_a_backward_takes_the_kept_columns_and_frees_them_before_the_input_gradients():
    """Memory: the reference backward (the CuPy one runs the same GEMM code) lets the forward's columns go after dW."""
    import weakref

    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((2, 3, 6, 6)), rng.standard_normal((4, 3, 3, 3))
    g = ConvGeometry.of(x.shape, w.shape, 1, 1, 1)
    dy = rng.standard_normal(g.y_shape)
    _, saved = reference_conv.conv2d_forward(np, x, w, None, g, keep_cols=True)
    columns = weakref.ref(saved.cols)
    alive_at_fold = []

    def fold(xp, dcols, g):  # runs once dcols exists
        alive_at_fold.append(columns() is not None)
        return reference_conv.col2im(xp, dcols, g)

    got = reference_conv.gemm_backward(np, dy, x, w, g, cols=saved.take(reference_conv.COLUMN_LAYOUT),
                                       has_bias=False, need_input_grad=True, unfold=reference_conv.im2col,
                                       fold=fold, sums=reference_conv.column_sums)
    assert alive_at_fold == [False] and saved.cols is None
    # Given the emptied ConvColumns again, the backward unfolds x again: the same gradients.
    again = reference_conv.conv2d_backward(np, dy, x, w, g, saved=saved, has_bias=False)
    for a, b in zip(got[:2], again[:2]):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    assert saved.take("another layout") is None


# ---------------------------------------------------------------- section 5c: the ReLU fused into the convolution


def _halves(cfg: ConvConfig, dtype: str):
    """``cfg.arrays()`` in ``dtype`` with x, W and b in halves: every sum exact, so y has exact zeros (ties)."""
    x, w, b, dy = cfg.arrays()
    x, w, b = (np.round(t * 2) / 2 for t in (x, w, b))
    return tuple(np.asarray(t, dtype=dtype) for t in (x, w, b, dy))


def _relu_fused_and_apart(backend, cfg: ConvConfig, dtype: str, layout="contiguous", workspace=None):
    """``(fused, apart)``: dicts of y, dx, dW, db (and dW, db without the input gradient) as NumPy.

    Fused: ``conv2d(relu=True)`` and ``conv2d_backward(relu_output=y)``, the
    forward's columns passed on. Apart: ``relu(conv2d)`` and the ReLU's
    backward, then the convolution's.
    """
    x, w, b, dy = _halves(cfg, dtype)
    if layout == "channels_last":
        x, dy = channels_last(x), channels_last(dy)
    X, Wt, Bt, DY = (backend.asarray(t) for t in (x, w, b, dy))
    opts = cfg.conv_options
    y, cols = conv2d(X, Wt, Bt, relu=True, return_cols=True, workspace=workspace, **opts)
    dx, dw, db = conv2d_backward(DY, X, Wt, cols=cols, relu_output=y, workspace=workspace, **opts)
    _, dw_alone, db_alone = conv2d_backward(DY, X, Wt, need_input_grad=False, relu_output=y, workspace=workspace,
                                            **opts)
    fused = {"y": y, "dx": dx, "dw": dw, "db": db, "dw_alone": dw_alone, "db_alone": db_alone}
    z = conv2d(X, Wt, Bt, **opts)
    dz = ops.relu_backward(DY, z)
    dx, dw, db = conv2d_backward(dz, X, Wt, **opts)
    _, dw_alone, db_alone = conv2d_backward(dz, X, Wt, need_input_grad=False, **opts)
    apart = {"y": ops.relu(z), "dx": dx, "dw": dw, "db": db, "dw_alone": dw_alone, "db_alone": db_alone}
    return ({k: np.array(backend.to_numpy(t)) for k, t in fused.items()},
            {k: np.array(backend.to_numpy(t)) for k, t in apart.items()})


def _assert_relu_fusion_exact(backend, cfg, dtype, layout="contiguous", workspace=None):
    """y bit for bit; the gradients too for channels-last dy (as layers pass it), else to rounding.

    NumPy masks a contiguous copy of each block of dy; from an NCHW dy the
    composition's sums read a strided matrix, which BLAS may add in another order.
    """
    fused, apart = _relu_fused_and_apart(backend, cfg, dtype, layout, workspace)
    for name in apart:
        assert fused[name].dtype == np.dtype(dtype), name
        if name == "y" or layout == "channels_last":
            np.testing.assert_array_equal(fused[name], apart[name], err_msg=name)
        else:
            np.testing.assert_allclose(fused[name], apart[name], err_msg=name, **tol(dtype))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@settings(max_examples=10, **FIXTURE_SETTINGS)
@given(cfg=grouped_conv_configs(max_hw=6, max_kernel=3), layout=st.sampled_from(["contiguous", "channels_last"]))
@example(cfg=UNEVEN, layout="contiguous")
@example(cfg=WIDE_PADDING, layout="channels_last")
@_group_cases(layout="channels_last")
def test_conv2d_relu_is_the_relu_of_conv2d_bit_for_bit(backend, dtype, cfg, layout):
    """Section 5c: conv2d(relu=True) is relu(conv2d), and conv2d_backward(relu_output=y) is the ReLU's backward
    then the convolution's, on every backend (ties at zero included: y is exact in halves)."""
    _assert_relu_fusion_exact(backend, cfg, dtype, layout)


# NumPy's paths for a fused ReLU: dx as a convolution (the masked dy written into the padded buffer block by
# block), dx by col2im, one input channel (taps-first columns), the banded product, depthwise.
RELU_PATHS = {
    "dx-as-convolution": ConvConfig(5, 9, 4, 6, 5, 3, 3, 1, 1, 1, 1, 1, 1, seed=21),  # C = 9: not banded
    "dx-as-convolution-unpadded": ConvConfig(5, 9, 4, 6, 5, 3, 2, 1, 1, 0, 0, 1, 1, seed=22),
    "dx-by-col2im": UNEVEN._replace(N=5),
    "one-channel": UNEVEN._replace(N=5, C=1),
    "banded": BANDED_CASES["lenet-second"],
    "depthwise": DEPTHWISE._replace(N=5),
}


@pytest.mark.parametrize("name", list(RELU_PATHS))
def test_conv2d_relu_on_every_numpy_path_in_blocks_threads_and_reused_buffers(name, monkeypatch,
                                                                              banded_at_any_batch):
    """Section 5c: NumPy's fused ReLU with one sample per block on two threads, and buffers reused across
    calls, fused or not, with other inputs: the composition's numbers, bit for bit."""
    monkeypatch.setattr(numpy_conv, "_BLOCK_BYTES", 1)
    monkeypatch.setattr(numpy_banded, "_BLOCK_BYTES", 1)
    monkeypatch.setattr(numpy_depthwise, "_BLOCK_BYTES", 1)
    monkeypatch.setattr(numpy_parallel, "_MIN_FLOPS_PER_THREAD", 1)  # threads even for these small problems
    cfg = RELU_PATHS[name]
    g = _geometry(cfg)
    assert numpy_banded.use(g, 8) == (name == "banded") and g.depthwise == (name == "depthwise")
    numpy = make_backend("numpy")
    workspace = {}
    with config_context(num_threads=2):
        for seed_offset in (0, 7):
            case = cfg._replace(seed=cfg.seed + seed_offset)
            _assert_relu_fusion_exact(numpy, case, "float64", "channels_last", workspace)
            y = conv2d(*_halves(case, "float64")[:3], **case.conv_options)
            assert (y == 0).any() and (y < 0).any() and (y > 0).any(), "the ReLU should stop some outputs, ties too"
            x, w, b, dy = _halves(case, "float64")
            conv2d_backward(dy, x, w, workspace=workspace, **case.conv_options)  # the buffers written unfused too


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", list(RELU_PATHS))
def test_conv2d_relu_matches_torch(torch, name, dtype, banded_at_any_batch):
    """Section 5c: y, dx, dW, db of the fused pair equal torch's relu(conv2d) and its autograd."""
    cfg = RELU_PATHS[name]
    fused, _ = _relu_fused_and_apart(make_backend("numpy"), cfg, dtype, "channels_last")
    x, w, b, dy = (torch.tensor(t, requires_grad=True) for t in _halves(cfg, dtype))
    y = torch.relu(torch.nn.functional.conv2d(x, w, b, **cfg.conv_options))
    y.backward(dy.detach())
    for key, t in {"y": y, "dx": x.grad, "dw": w.grad, "db": b.grad}.items():
        np.testing.assert_allclose(fused[key], t.detach().numpy(), err_msg=key, **tol(dtype))


def test_conv2d_backward_rejects_a_bad_relu_output_in_one_line():
    x, w = np.zeros((2, 3, 5, 5)), np.zeros((4, 3, 3, 3))
    dy = np.zeros((2, 4, 3, 3))
    with pytest.raises(ValueError, match=r"^conv2d: expected relu_output of shape \(2, 4, 3, 3\) \(the forward's "
                                         r"output\), got \(2, 4, 3, 2\)$"):
        conv2d_backward(dy, x, w, relu_output=np.zeros((2, 4, 3, 2)))
    with pytest.raises(TypeError, match=r"^conv2d: relu_output dtype float32 does not match input dtype float64$"):
        conv2d_backward(dy, x, w, relu_output=np.zeros((2, 4, 3, 3), dtype=np.float32))


def test_conv2d_relu_with_nan_and_infinite_inputs_is_the_composition(backend):
    """Section 5c: a NaN output fails ``> 0`` whatever the backend's ReLU makes of it, so the fused pair still
    equals the composition (NaN where each backend's ReLU keeps it), infinities in x included."""
    cfg = RELU_PATHS["dx-as-convolution"]
    x, w, b, dy = _halves(cfg, "float64")
    x[0, 0, 2, 2], x[1, 3, 0, 4], x[2, 5, 4, 1] = np.nan, np.inf, -np.inf
    x, dy = channels_last(x), channels_last(dy)
    X, Wt, Bt, DY = (backend.asarray(t) for t in (x, w, b, dy))
    with np.errstate(invalid="ignore"):  # inf - inf in the products: NaN, as meant
        y = conv2d(X, Wt, Bt, relu=True, **cfg.conv_options)
        fused = (y, *conv2d_backward(DY, X, Wt, relu_output=y, **cfg.conv_options))
        z = conv2d(X, Wt, Bt, **cfg.conv_options)
        apart = (ops.relu(z), *conv2d_backward(ops.relu_backward(DY, z), X, Wt, **cfg.conv_options))
    assert np.isnan(backend.to_numpy(z)).any()
    for name, got, want in zip(("y", "dx", "dw", "db"), fused, apart):
        np.testing.assert_array_equal(backend.to_numpy(got), backend.to_numpy(want), err_msg=name)
