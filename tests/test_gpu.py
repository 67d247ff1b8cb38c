"""GPU tests: the CuPy kernels against the reference path, CuPy against NumPy, training that stays on the device.

Every test here is marked ``gpu`` and skipped, with the reason, where CuPy
cannot run (:func:`portable_cnn.backend.cupy_status`). On a GPU machine run
them with ``pytest -m gpu`` (``benchmarks/gpu_check.sh`` does that and the
rest of the GPU checks).

"The reference path" is what ``config_context(fast_paths=False)`` runs: the
standard-only kernels of ``portable_cnn/kernels/reference/`` on the same CuPy
arrays. What the tests prove:

* the dispatch hands CuPy arrays of float32 and float64 to the kernels of
  ``portable_cnn/kernels/cupy/`` and everything else (float16, or
  ``fast_paths=False``) to the reference;
* each CuPy kernel (im2col, col2im, max and average pooling forward and
  backward, ReLU, the softmax cross-entropy, the SGD update, the convolution
  with its GEMV bias gradient) gives what the reference gives on the same
  CuPy arrays, whatever the memory layout of its input, NaN and -0.0 included;
* under ``fast_paths=False`` every op, and two lenet and vgg-small training
  steps, give the fast paths' numbers in float64 (relative difference at
  most 1e-12);
* forward and every gradient of every op, and of ``lenet`` and ``vgg_small``,
  agree between CuPy and NumPy: float64 to the tight tolerance, float32 to the
  float32 row of ``tests/conftest.py``'s table (TF32 off);
* a training step keeps parameters, gradients and optimizer state on the
  device and does not wait for the GPU; the trainer reads the loss back only
  every ``log_every`` steps;
* a checkpoint written from the GPU loads on NumPy and the reverse, and
  training continues identically from it;
* a GPU out-of-memory error in a convolution becomes a ``MemoryError`` that
  suggests a smaller batch or a lower workspace limit, and the suggestion works.
"""

from __future__ import annotations

import contextlib
import time
from unittest import mock

import numpy as np
import pytest
from conftest import tol

from portable_cnn import backend as B
from portable_cnn import checkpoint, data, dispatch, models, nn, ops, optim, train
from portable_cnn.config import config_context, get_config, set_config
from portable_cnn.geometry import ConvGeometry
from portable_cnn.kernels import cupy as cupy_kernels
from portable_cnn.kernels.cupy import compile as cupy_compile
from portable_cnn.kernels.cupy import conv as cupy_conv
from portable_cnn.kernels.reference import KERNELS as REFERENCE
from portable_cnn.kernels.reference import conv as reference_conv
from portable_cnn.kernels.reference import optim as reference_optim

pytestmark = pytest.mark.gpu

DTYPES = ["float64", "float32"]
LAYOUTS = ["contiguous", "channels_last"]
# Reference path against fast paths, float64: max |a - b| / max |b| per array.
SAME_NUMBERS_RTOL = 1e-12

# (N, C, K, H, W, R, S, u, v, a, b, dh, dw)
CONV_CASES = [
    (2, 3, 4, 7, 6, 3, 3, 1, 1, 1, 1, 1, 1),  # 3x3, 'same' padding
    (2, 2, 3, 9, 8, 3, 2, 2, 1, 1, 0, 1, 2),  # stride, dilation, rectangular kernel
    (1, 4, 2, 5, 5, 1, 1, 1, 1, 0, 0, 1, 1),  # 1x1
    (3, 1, 2, 8, 7, 5, 5, 2, 3, 2, 2, 1, 1),  # LeNet-like 5x5 with padding
    (2, 3, 2, 10, 9, 2, 2, 3, 3, 1, 0, 1, 1),  # stride > kernel: some inputs are read by no window
]
# (N, C, H, W, R, S, u, v, a, b)
POOL_CASES = [
    (2, 3, 8, 8, 2, 2, 2, 2, 0, 0),  # the networks' 2x2/2
    (2, 2, 7, 9, 3, 3, 2, 2, 1, 1),  # overlapping windows, padding
    (1, 3, 6, 5, 3, 2, 1, 2, 1, 1),  # stride 1 in one direction
    (2, 2, 9, 7, 2, 3, 3, 1, 1, 0),  # stride > kernel rows
]


def _conv_id(case):
    return "N{}C{}K{}_{}x{}_k{}x{}_s{}{}_p{}{}_d{}{}".format(*case)


def _pool_id(case):
    return "N{}C{}_{}x{}_k{}x{}_s{}{}_p{}{}".format(*case)


# --------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def cp():
    """CuPy itself, with TF32 off; skips the module's tests where no CUDA device works."""
    ok, why = B.cupy_status()
    if not ok:
        pytest.skip(f"CuPy backend unavailable: {why}")
    import cupy

    set_config(tf32=False)  # the setting, which config_context(tf32=...) compares against
    B.set_tf32(False)  # and CuPy itself, whatever CUPY_TF32 said when the setting was read
    return cupy


@pytest.fixture(scope="module")
def xpc(cp):
    """The CuPy namespace as the library sees it."""
    return B.get_namespace("cupy")


def host(a) -> np.ndarray:
    return np.asarray(B.to_numpy(a))


def channels_last(cp, a):
    """The same (N, C, H, W) values as a view of (N, H, W, C) memory, as the CuPy conv returns them."""
    return cp.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)


@contextlib.contextmanager
def cupy_kernel_spies(*op_names, side_effect=None):
    """Mocks that call through to the CuPy kernels of ``op_names`` (or raise ``side_effect``); yields ``{op: mock}``.

    The dispatch hands out the functions that ``portable_cnn.kernels.cupy.KERNELS``
    holds, so the mocks go into that table, and the dispatch's cache of
    earlier choices is emptied for the block; both are restored after it.
    """
    table = cupy_kernels.KERNELS
    spies = {op: mock.Mock(wraps=table[op][1], side_effect=side_effect) for op in op_names}
    with mock.patch.dict(table, {op: (table[op][0], spy) for op, spy in spies.items()}), \
            mock.patch.dict(dispatch._chosen, clear=True):
        yield spies


def assert_close(got, expected, dtype, name=""):
    np.testing.assert_allclose(host(got), host(expected), err_msg=name, **tol(dtype))


def assert_same_numbers(got, expected, name=""):
    """``max |got - expected| <= SAME_NUMBERS_RTOL * max |expected|``, one bound per array; integers exactly."""
    a, b = host(got), host(expected)
    assert a.shape == b.shape, (name, a.shape, b.shape)
    if b.dtype.kind != "f":
        np.testing.assert_array_equal(a, b, err_msg=name)
        return
    difference, scale = float(np.max(np.abs(a - b), initial=0.0)), float(np.max(np.abs(b), initial=0.0))
    assert difference <= SAME_NUMBERS_RTOL * scale, (
        f"{name}: max |fast - reference| = {difference:.3e}, max |reference| = {scale:.3e}, "
        f"relative {difference / scale if scale else float('inf'):.3e} > {SAME_NUMBERS_RTOL:g}"
    )


# --------------------------------------------------------------------------- the dispatch


@pytest.mark.parametrize("dtype", DTYPES)
def test_dispatch_picks_the_cupy_kernels_and_the_reference_when_told(cp, xpc, dtype):
    """CuPy float32 and float64 arrays go to the kernels of ``kernels/cupy``; fast_paths=False to the reference."""
    assert set(cupy_kernels.KERNELS) <= set(REFERENCE)
    for op, (dtypes, kernel) in cupy_kernels.KERNELS.items():
        assert dtype in dtypes, op
        assert dispatch.kernel(op, xpc, np.dtype(dtype)) is kernel, op
        with config_context(fast_paths=False):
            assert dispatch.kernel(op, xpc, np.dtype(dtype)) is REFERENCE[op], op
        assert dispatch.kernel(op, xpc, np.dtype(dtype)) is kernel, f"{op}: the setting was not restored"


# --------------------------------------------------------------------------- the kernels against the reference path


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES, ids=_conv_id)
def test_im2col_kernel_matches_reference_path(cp, xpc, case, dtype, layout):
    """im2col is a copy: the kernel's (N*P*Q, C*R*S) matrix equals the reference path's exactly."""
    N, C, _, H, W, R, S, u, v, a, b, dh, dw = case
    opts = {"stride": (u, v), "padding": (a, b), "dilation": (dh, dw)}
    x_np = np.random.default_rng(0).standard_normal((N, C, H, W)).astype(dtype)
    x = B.asarray(x_np, xpc)
    if layout == "channels_last":
        x = channels_last(cp, x)
    with cupy_kernel_spies("im2col") as spies:
        got = ops.im2col(x, (R, S), **opts)
    assert spies["im2col"].call_count == 1, "the CuPy kernel was not used"
    with config_context(fast_paths=False):
        expected = ops.im2col(x, (R, S), **opts)
    assert B.backend_name(got) == "cupy" and B.dtype_name(got) == dtype
    assert B.device(got) == B.device(x)
    np.testing.assert_array_equal(host(got), host(expected))
    np.testing.assert_array_equal(host(got), ops.im2col(x_np, (R, S), **opts))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES, ids=_conv_id)
def test_col2im_gather_matches_reference_path_and_is_deterministic(cp, xpc, case, dtype):
    """col2im as a gather (no atomics) equals the reference scatter-add, and twice the same call gives the same bits."""
    N, C, _, H, W, R, S, u, v, a, b, dh, dw = case
    opts = {"stride": (u, v), "padding": (a, b), "dilation": (dh, dw)}
    P, Q = ops.out_size(H, R, u, a, dh), ops.out_size(W, S, v, b, dw)
    cols_np = np.random.default_rng(1).standard_normal((N * P * Q, C * R * S)).astype(dtype)
    cols = B.asarray(cols_np, xpc)
    with cupy_kernel_spies("col2im") as spies:
        got = ops.col2im(cols, (N, C, H, W), (R, S), **opts)
        again = ops.col2im(cols, (N, C, H, W), (R, S), **opts)
    assert spies["col2im"].call_count == 2, "the CuPy kernel was not used"
    with config_context(fast_paths=False):
        expected = ops.col2im(cols, (N, C, H, W), (R, S), **opts)
    assert tuple(got.shape) == (N, C, H, W) and B.dtype_name(got) == dtype
    np.testing.assert_array_equal(host(got), host(again))
    assert_close(got, expected, dtype)
    assert_close(got, ops.col2im(cols_np, (N, C, H, W), (R, S), **opts), dtype)


@pytest.mark.parametrize("case", CONV_CASES, ids=_conv_id)
def test_col2im_kernel_is_the_adjoint_of_im2col_kernel(cp, xpc, case):
    """<im2col(x), c> = <x, col2im(c)> in float64: the pair of kernels are transposes of each other."""
    N, C, _, H, W, R, S, u, v, a, b, dh, dw = case
    g = ConvGeometry.of((N, C, H, W), (1, C, R, S), (u, v), (a, b), (dh, dw))
    rng = np.random.default_rng(2)
    x = B.asarray(rng.standard_normal((N, C, H, W)), xpc)
    cols = cupy_conv.im2col(xpc, x, g)  # (N*P*Q, C*R*S)
    assert tuple(cols.shape) == g.cols_shape
    c = B.asarray(rng.standard_normal(g.cols_shape), xpc)
    lhs = float(host(xpc.sum(cols * c)))
    rhs = float(host(xpc.sum(x * cupy_conv.col2im(xpc, c, g))))
    assert lhs == pytest.approx(rhs, rel=1e-12, abs=1e-12)


POOL_OPS = ("max_pool2d_forward", "max_pool2d_backward", "avg_pool2d_forward", "avg_pool2d_backward")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", POOL_CASES, ids=_pool_id)
def test_pool_kernels_match_reference_path(cp, xpc, case, dtype, layout):
    """Max and average pooling, forward and backward: the kernels against the reference path and NumPy.

    The input has ties (rounded values), so the first-maximum rule is tested too.
    """
    N, C, H, W, R, S, u, v, a, b = case
    args = ((R, S), (u, v), (a, b))
    rng = np.random.default_rng(3)
    x_np = np.round(rng.standard_normal((N, C, H, W)) * 2).astype(dtype)  # ties within windows
    P, Q = ops.out_size(H, R, u, a), ops.out_size(W, S, v, b)
    dy_np = rng.standard_normal((N, C, P, Q)).astype(dtype)
    x, dy = B.asarray(x_np, xpc), B.asarray(dy_np, xpc)
    if layout == "channels_last":
        x, dy = channels_last(cp, x), channels_last(cp, dy)
    with cupy_kernel_spies(*POOL_OPS) as spies:
        y, argmax = ops.max_pool2d(x, *args)
        dx = ops.max_pool2d_backward(dy, argmax, x.shape, *args)
        avg = ops.avg_pool2d(x, *args)
        davg = ops.avg_pool2d_backward(dy, x.shape, *args)
    assert all(spies[op].call_count == 1 for op in POOL_OPS), {op: spies[op].call_count for op in POOL_OPS}
    with config_context(fast_paths=False):
        y_ref, argmax_ref = ops.max_pool2d(x, *args)
        dx_ref = ops.max_pool2d_backward(dy, argmax_ref, x.shape, *args)
        avg_ref = ops.avg_pool2d(x, *args)
        davg_ref = ops.avg_pool2d_backward(dy, x.shape, *args)
    np.testing.assert_array_equal(host(y), host(y_ref))
    np.testing.assert_array_equal(host(argmax), host(argmax_ref))
    assert_close(dx, dx_ref, dtype, "max_pool2d_backward")
    assert_close(avg, avg_ref, dtype, "avg_pool2d")
    assert_close(davg, davg_ref, dtype, "avg_pool2d_backward")
    y_np, argmax_np = ops.max_pool2d(x_np, *args)
    np.testing.assert_array_equal(host(y), y_np)
    np.testing.assert_array_equal(host(argmax), argmax_np)
    dx_np = ops.max_pool2d_backward(dy_np, argmax_np, x_np.shape, *args)
    assert_close(dx, dx_np, dtype, "max_pool2d_backward vs NumPy")
    assert_close(avg, ops.avg_pool2d(x_np, *args), dtype, "avg_pool2d vs NumPy")
    assert_close(davg, ops.avg_pool2d_backward(dy_np, x_np.shape, *args), dtype, "avg_pool2d_backward vs NumPy")
    for out in (y, dx, avg, davg):
        assert B.backend_name(out) == "cupy" and B.dtype_name(out) == dtype and B.device(out) == B.device(x)


def test_max_pool_kernel_propagates_nan_like_the_reference_path(cp, xpc):
    """A NaN in a window wins (the first one), as max/argmax of the reference path decide."""
    x_np = np.arange(32, dtype=np.float32).reshape(1, 2, 4, 4)
    x_np[0, 0, 1, 0] = np.nan
    x_np[0, 1, 2, 3] = np.nan
    x = B.asarray(x_np, xpc)
    with cupy_kernel_spies("max_pool2d_forward") as spies:
        y, argmax = ops.max_pool2d(x, 2)
    assert spies["max_pool2d_forward"].call_count == 1
    with config_context(fast_paths=False):
        y_ref, argmax_ref = ops.max_pool2d(x, 2)
    np.testing.assert_array_equal(host(y), host(y_ref))  # NaN == NaN for assert_array_equal
    np.testing.assert_array_equal(host(argmax), host(argmax_ref))


def test_dtypes_without_a_kernel_take_the_reference_path(cp, xpc):
    """float16 has no kernel here: the dispatch picks the reference, and the ops run it instead of failing."""
    x = B.asarray(np.random.default_rng(4).standard_normal((2, 3, 6, 6)), xpc, dtype="float16")
    for op in cupy_kernels.KERNELS:
        assert dispatch.kernel(op, xpc, x.dtype) is REFERENCE[op], op
    with cupy_kernel_spies(*cupy_kernels.KERNELS, side_effect=AssertionError("a CuPy kernel called for float16")):
        y, _ = ops.max_pool2d(x, 2)
        cols = ops.im2col(x, 3, padding=1)
    assert B.dtype_name(y) == "float16" and tuple(cols.shape) == (2 * 36, 27)


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_kernels_match_reference_path_including_nan_and_layout(cp, xpc, dtype):
    """The one-kernel ReLU and its backward equal the reference path bit for bit (NaN and -0.0 give 0, as
    ``where`` gives) and keep a channels-last input's memory layout."""
    rng = np.random.default_rng(19)
    x_np = rng.standard_normal((2, 3, 4, 5))
    x_np[0, 0, 0, :3] = [np.nan, -0.0, 0.0]
    x = channels_last(cp, B.asarray(x_np, xpc, dtype=dtype))
    dy = channels_last(cp, B.asarray(rng.standard_normal((2, 3, 4, 5)), xpc, dtype=dtype))
    with cupy_kernel_spies("relu_forward", "relu_backward") as spies:
        y, dx = ops.relu(x), ops.relu_backward(dy, x)
    assert spies["relu_forward"].call_count == 1 and spies["relu_backward"].call_count == 1
    with config_context(fast_paths=False):
        y_ref, dx_ref = ops.relu(x), ops.relu_backward(dy, x)
    np.testing.assert_array_equal(host(y), host(y_ref))
    np.testing.assert_array_equal(host(dx), host(dx_ref))
    assert not np.signbit(host(y)[0, 0, 0, 1]) and host(y)[0, 0, 0, 0] == 0
    assert cupy_compile.channels_last(y) and cupy_compile.channels_last(dx)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_kernels_match_reference_path(cp, xpc, dtype):
    """The one-kernel softmax cross-entropy and its backward against the reference path: strided logits, int32
    labels, a label outside [0, K) with validation off (counted as ignored, as the reference counts it) and large logits."""
    rng = np.random.default_rng(20)
    logits_np = rng.standard_normal((10, 7)) * 3
    logits_np[2] += 80.0  # exp would overflow without the shift by the maximum
    logits = B.asarray(logits_np.T.copy(), xpc, dtype=dtype).T  # (7, 10) memory, an (N, K) = (10, 7) view
    labels = B.asarray(np.array([0, 6, 3, 3, 1, 7, 2, 5, 4, 0], dtype=np.int32), xpc)  # 7 is out of range
    ops_used = ("softmax_cross_entropy_forward", "softmax_cross_entropy_backward")
    with cupy_kernel_spies(*ops_used) as spies:
        loss, probs = ops.softmax_cross_entropy(logits, labels, validate=False)
        dlogits = ops.softmax_cross_entropy_backward(probs, labels, 0.5)
    assert all(spies[op].call_count == 1 for op in ops_used), {op: spies[op].call_count for op in ops_used}
    with config_context(fast_paths=False):
        loss_ref, probs_ref = ops.softmax_cross_entropy(logits, labels, validate=False)
        dlogits_ref = ops.softmax_cross_entropy_backward(probs_ref, labels, 0.5)
    assert tuple(loss.shape) == () and tuple(probs.shape) == (10, 7)
    for name, got, expected in (("loss", loss, loss_ref), ("probs", probs, probs_ref),
                                ("dlogits", dlogits, dlogits_ref)):
        assert np.all(np.isfinite(host(got))), name
        assert_close(got, expected, dtype, name)
    np.testing.assert_array_equal(host(dlogits)[5], 0.0)  # the out-of-range label: ignored, no gradient


SGD_CASES = [
    {"momentum": 0.9},
    {"momentum": 0.9, "weight_decay": 5e-4},
    {"momentum": 0.5, "dampening": 0.3, "weight_decay": 1e-2},
    {"momentum": 0.9, "nesterov": True, "weight_decay": 1e-3},
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", SGD_CASES, ids=lambda c: "_".join(f"{k}{v}" for k, v in c.items()))
def test_sgd_kernel_matches_reference_path_and_numpy(cp, xpc, config, dtype):
    """Four SGD steps of lenet's parameters: the one-kernel CuPy update gives the reference path's parameters and
    momentum buffers on CuPy, and NumPy's; the kernel really ran for every step after the first."""
    rng = np.random.default_rng(18)
    grads = [{name: rng.standard_normal(tuple(layer.params[key].shape)) for name, layer, key in
              models.lenet(rng=0).named_parameters()} for _ in range(4)]

    def run(backend_name, reference=False):
        model = models.lenet(rng=0).to(backend_name, dtype)
        opt = optim.SGD(model, lr=0.1, **config)
        xp = B.get_namespace(backend_name)
        on_device = [{name: B.asarray(g, xp, dtype=dtype) for name, g in step.items()} for step in grads]
        with config_context(fast_paths=False) if reference else contextlib.nullcontext():
            for step in on_device:
                for name, layer, key in model.named_parameters():
                    layer.grads[key] = step[name]
                opt.step()
        return model.state_dict(), {k: v for k, v in opt.state_dict().items() if k != "step"}

    # The CuPy sgd_step hands a step without a momentum buffer (the first) to the
    # reference and does every later one in its own kernel.
    with cupy_kernel_spies("sgd_step") as spies, \
            mock.patch.object(reference_optim, "sgd_step", wraps=reference_optim.sgd_step) as handed_on:
        fast = run("cupy")
    parameters = len(grads[0])
    assert spies["sgd_step"].call_count == 4 * parameters, spies["sgd_step"].call_count
    assert handed_on.call_count == parameters, handed_on.call_count  # steps 2-4 ran in the kernel, every parameter
    reference, on_numpy = run("cupy", reference=True), run("numpy")
    for part, (got, ref, cpu) in enumerate(zip(fast, reference, on_numpy)):
        assert set(got) == set(cpu) and got, part
        for name in cpu:
            assert B.backend_name(got[name]) == "cupy", name
            assert_close(got[name], ref[name], dtype, f"{name} vs reference path")
            assert_close(got[name], cpu[name], dtype, f"{name} vs NumPy")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES, ids=_conv_id)
def test_conv2d_with_kernels_matches_reference_path_and_numpy(cp, xpc, case, dtype):
    """conv2d and conv2d_backward on CuPy (kernels in place) against the reference path on CuPy and against NumPy."""
    N, C, K, H, W, R, S, u, v, a, b, dh, dw = case
    opts = {"stride": (u, v), "padding": (a, b), "dilation": (dh, dw)}
    rng = np.random.default_rng(5)
    x_np = rng.standard_normal((N, C, H, W)).astype(dtype)
    w_np = rng.standard_normal((K, C, R, S)).astype(dtype)
    b_np = rng.standard_normal(K).astype(dtype)
    P, Q = ops.out_size(H, R, u, a, dh), ops.out_size(W, S, v, b, dw)
    dy_np = rng.standard_normal((N, K, P, Q)).astype(dtype)
    x, w, bias, dy = (B.asarray(t, xpc) for t in (x_np, w_np, b_np, dy_np))

    def run():
        y, cols = ops.conv2d(x, w, bias, return_cols=True, **opts)
        return (y, *ops.conv2d_backward(dy, x, w, cols=cols, **opts))

    with cupy_kernel_spies("conv2d_forward", "conv2d_backward") as spies:
        fast = run()
    assert spies["conv2d_forward"].call_count == 1 and spies["conv2d_backward"].call_count == 1
    with config_context(fast_paths=False):
        reference = run()
    y_np, cols_np = ops.conv2d(x_np, w_np, b_np, return_cols=True, **opts)
    on_numpy = (y_np, *ops.conv2d_backward(dy_np, x_np, w_np, cols=cols_np, **opts))
    for name, got, ref, cpu in zip(("y", "dx", "dw", "db"), fast, reference, on_numpy):
        assert B.backend_name(got) == "cupy", name
        assert_close(got, ref, dtype, name + " vs reference path")
        assert_close(got, cpu, dtype, name + " vs NumPy")


def test_conv2d_in_slices_under_a_small_workspace_limit_matches_whole_batch(cp, xpc):
    """Under a workspace limit smaller than one batch's im2col matrix the GPU convolves slices; same result."""
    rng = np.random.default_rng(6)
    x = B.asarray(rng.standard_normal((6, 4, 12, 12)), xpc)
    w = B.asarray(rng.standard_normal((5, 4, 3, 3)), xpc)
    bias = B.asarray(rng.standard_normal(5), xpc)
    dy = B.asarray(rng.standard_normal((6, 5, 12, 12)), xpc)
    whole = (ops.conv2d(x, w, bias, padding=1), *ops.conv2d_backward(dy, x, w, padding=1))
    two_samples_mb = 12 * 12 * 5 * 9 * 8 * 2 / 2**20  # the stride-1 input gradient's H*W x R*S*K, float64
    with config_context(workspace_mb=two_samples_mb):
        g = ConvGeometry.of(x.shape, w.shape, 1, 1, 1)
        assert g.samples_per_slice(8, get_config()["workspace_mb"] * 2**20) == 2
        with cupy_kernel_spies("conv2d_forward", "conv2d_backward") as spies:
            sliced = (ops.conv2d(x, w, bias, padding=1), *ops.conv2d_backward(dy, x, w, padding=1))
        assert spies["conv2d_forward"].call_count == 1 and spies["conv2d_backward"].call_count == 1
        with config_context(fast_paths=False):
            sliced_reference = (ops.conv2d(x, w, bias, padding=1), *ops.conv2d_backward(dy, x, w, padding=1))
    for name, got, ref, expected in zip(("y", "dx", "dw", "db"), sliced, sliced_reference, whole):
        assert_close(got, expected, "float64", name)
        assert_close(ref, expected, "float64", name + " (reference path)")


@pytest.mark.parametrize("dtype", DTYPES)
def test_conv2d_bias_gradient_by_gemv_matches_numpy(cp, xpc, dtype):
    """The CuPy bias gradient (column sums as ones @ dy2) over a batch of 16 samples of 16x16: as on NumPy."""
    rng = np.random.default_rng(17)
    x_np, w_np = rng.standard_normal((16, 8, 16, 16)), rng.standard_normal((12, 8, 3, 3))
    dy_np = rng.standard_normal((16, 12, 16, 16))
    put = lambda a: B.asarray(a, xpc, dtype=dtype)  # noqa: E731
    _, dw, db = ops.conv2d_backward(put(dy_np), put(x_np), put(w_np), padding=1)
    _, dw_np, db_np = ops.conv2d_backward(dy_np.astype(dtype), x_np.astype(dtype), w_np.astype(dtype), padding=1)
    assert_close(dw, dw_np, dtype, "dw")
    assert_close(db, db_np, dtype, "db")
    dy2 = put(dy_np.transpose(0, 2, 3, 1).reshape(-1, 12))  # (N*P*Q, K)
    sums = cupy_conv.column_sums(xpc, dy2)  # (K,)
    assert B.backend_name(sums) == "cupy" and B.dtype_name(sums) == dtype
    assert_close(sums, dy_np.sum(axis=(0, 2, 3)), dtype, "column sums")
    assert_close(sums, reference_conv.column_sums(xpc, dy2), dtype, "column sums vs the reference's")


# --------------------------------------------------------------------------- every op, CuPy against NumPy


def _op_conv(put, rng, dtype):
    x, w, b = rng.standard_normal((3, 2, 9, 8)), rng.standard_normal((4, 2, 3, 3)), rng.standard_normal(4)
    opts = {"stride": (2, 1), "padding": 1, "dilation": (1, 2)}
    y, cols = ops.conv2d(put(x), put(w), put(b), return_cols=True, **opts)
    dy = put(rng.standard_normal(tuple(y.shape)))
    dx, dw, db = ops.conv2d_backward(dy, put(x), put(w), cols=cols, **opts)
    return {"y": y, "dx": dx, "dw": dw, "db": db}


def _op_max_pool(put, rng, dtype):
    x = put(rng.standard_normal((2, 3, 7, 9)))
    y, argmax = ops.max_pool2d(x, 3, 2, 1)
    dx = ops.max_pool2d_backward(put(rng.standard_normal(tuple(y.shape))), argmax, x.shape, 3, 2, 1)
    return {"y": y, "argmax": argmax, "dx": dx}


def _op_avg_pool(put, rng, dtype):
    x = put(rng.standard_normal((2, 3, 7, 9)))
    y = ops.avg_pool2d(x, 3, 2, 1)
    return {"y": y, "dx": ops.avg_pool2d_backward(put(rng.standard_normal(tuple(y.shape))), x.shape, 3, 2, 1)}


def _elementwise(forward, backward, uses_output):
    def run(put, rng, dtype):
        x = put(rng.standard_normal((3, 4, 5, 2)))
        y = forward(x)
        dx = backward(put(rng.standard_normal(tuple(y.shape))), y if uses_output else x)
        return {"y": y, "dx": dx}

    return run


def _op_linear(put, rng, dtype):
    x, w, b = put(rng.standard_normal((5, 7))), put(rng.standard_normal((3, 7))), put(rng.standard_normal(3))
    y = ops.linear(x, w, b)
    dx, dw, db = ops.linear_backward(put(rng.standard_normal((5, 3))), x, w)
    return {"y": y, "dx": dx, "dw": dw, "db": db}


def _op_flatten(put, rng, dtype):
    nhwc = put(rng.standard_normal((2, 4, 5, 3)))  # (N, H, W, C)
    x = B.namespace(nhwc).permute_dims(nhwc, (0, 3, 1, 2))  # (N, C, H, W) view: flatten must copy, not reinterpret
    y = ops.flatten(x)
    return {"y": y, "dx": ops.flatten_backward(put(rng.standard_normal(tuple(y.shape))), tuple(x.shape))}


def _op_softmax(put, rng, dtype):
    x = put(rng.standard_normal((4, 6)) * 3)
    y = ops.softmax(x, axis=1)
    logy = ops.log_softmax(x, axis=1)
    dy = put(rng.standard_normal((4, 6)))
    return {"y": y, "dx": ops.softmax_backward(dy, y, axis=1), "log_y": logy,
            "dlog": ops.log_softmax_backward(dy, logy, axis=1)}


def _op_cross_entropy(put, rng, dtype):
    logits = put(rng.standard_normal((6, 10)) * 2)
    labels = put(rng.integers(0, 10, 6))
    loss, probs = ops.softmax_cross_entropy(logits, labels)
    return {"loss": loss, "probs": probs, "dlogits": ops.softmax_cross_entropy_backward(probs, labels, 0.5)}


def _op_batch_norm(put, rng, dtype):
    x = put(rng.standard_normal((4, 3, 5, 5)) * 2 + 1)
    weight, bias = put(rng.standard_normal(3)), put(rng.standard_normal(3))
    mean, var = put(rng.standard_normal(3)), put(rng.random(3) + 0.5)
    out = {}
    for training in (True, False):
        y, cache, new_mean, new_var = ops.batch_norm2d(x, weight, bias, mean, var, training=training)
        dx, dw, db = ops.batch_norm2d_backward(put(rng.standard_normal(tuple(y.shape))), cache)
        tag = "train" if training else "eval"
        out.update({f"y_{tag}": y, f"dx_{tag}": dx, f"dw_{tag}": dw, f"db_{tag}": db,
                    f"mean_{tag}": new_mean, f"var_{tag}": new_var})
    return out


def _op_dropout(put, rng, dtype):
    x, uniform = put(rng.standard_normal((3, 4, 5))), put(rng.random((3, 4, 5)))
    y, mask = ops.dropout(x, 0.3, uniform)
    return {"y": y, "mask": mask, "dx": ops.dropout_backward(put(rng.standard_normal((3, 4, 5))), mask)}


OPS = {
    "conv2d": _op_conv,
    "max_pool2d": _op_max_pool,
    "avg_pool2d": _op_avg_pool,
    "relu": _elementwise(ops.relu, ops.relu_backward, uses_output=False),
    "sigmoid": _elementwise(ops.sigmoid, ops.sigmoid_backward, uses_output=True),
    "tanh": _elementwise(ops.tanh, ops.tanh_backward, uses_output=True),
    "linear": _op_linear,
    "flatten": _op_flatten,
    "softmax": _op_softmax,
    "softmax_cross_entropy": _op_cross_entropy,
    "batch_norm2d": _op_batch_norm,
    "dropout": _op_dropout,
}


def _putter(xp, dtype):
    """``put(a)``: NumPy data to an ``xp`` array, floats as ``dtype``, integers as they are."""

    def put(a):
        a = np.asarray(a)
        return B.asarray(a, xp, dtype=dtype if a.dtype.kind == "f" else None)

    return put


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(OPS))
def test_every_op_forward_and_gradients_match_numpy(cp, xpc, name, dtype):
    """Each op's outputs and gradients from CuPy equal NumPy's on the same data (same seeds)."""
    on_gpu = OPS[name](_putter(xpc, dtype), np.random.default_rng(7), dtype)
    on_cpu = OPS[name](_putter(B.get_namespace("numpy"), dtype), np.random.default_rng(7), dtype)
    assert set(on_gpu) == set(on_cpu)
    for key in on_cpu:
        if on_cpu[key] is None:
            assert on_gpu[key] is None, key
            continue
        assert B.backend_name(on_gpu[key]) == "cupy", f"{name}: {key} left the device"
        assert tuple(on_gpu[key].shape) == tuple(np.shape(on_cpu[key])), key
        assert_close(on_gpu[key], on_cpu[key], dtype, f"{name}: {key}")


@pytest.mark.parametrize("name", sorted(OPS))
def test_every_op_on_the_reference_path_gives_the_fast_paths_numbers_float64(cp, xpc, name):
    """Each op's outputs and gradients on CuPy, float64: under fast_paths=False as with the kernels (relative 1e-12)."""
    fast = OPS[name](_putter(xpc, "float64"), np.random.default_rng(7), "float64")
    with config_context(fast_paths=False):
        reference = OPS[name](_putter(xpc, "float64"), np.random.default_rng(7), "float64")
    assert set(fast) == set(reference)
    for key in reference:
        if reference[key] is None:
            assert fast[key] is None, key
            continue
        assert B.backend_name(fast[key]) == "cupy" and B.backend_name(reference[key]) == "cupy", key
        assert_same_numbers(fast[key], reference[key], f"{name}: {key}")


# --------------------------------------------------------------------------- whole networks, CuPy against NumPy


NETS = {"lenet": (models.lenet, (1, 28, 28)), "vgg_small": (models.vgg_small, (3, 32, 32))}


def _net_pass(model, xp, x_np, labels_np, dtype):
    """Forward, loss and backward (with the input gradient) of ``model`` on backend ``xp``; results as a dict."""
    loss_fn = nn.SoftmaxCrossEntropy()
    x = B.asarray(x_np, xp, dtype=dtype)
    logits = model.forward(x)
    loss = loss_fn.forward(logits, B.asarray(labels_np, xp))
    dx = model.backward(loss_fn.backward())
    out = {"logits": logits, "loss": loss, "dx": dx}
    out.update({f"grad {name}": layer.grads[key] for name, layer, key in model.named_parameters()})
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("net", sorted(NETS))
def test_network_forward_and_all_gradients_match_numpy(cp, xpc, net, dtype):
    """lenet / vgg_small: logits, loss, input gradient and every parameter gradient, CuPy against NumPy."""
    build, shape = NETS[net]
    rng = np.random.default_rng(8)
    x_np = rng.standard_normal((4, *shape))
    labels = rng.integers(0, 10, 4)
    on_cpu = _net_pass(build(rng=0).to("numpy", dtype), B.get_namespace("numpy"), x_np, labels, dtype)
    on_gpu = _net_pass(build(rng=0).to("cupy", dtype), xpc, x_np, labels, dtype)
    assert set(on_gpu) == set(on_cpu) and len(on_cpu) > 3
    for key in on_cpu:
        assert B.backend_name(on_gpu[key]) == "cupy", key
        assert np.any(host(on_cpu[key]) != 0), f"{key} is all zeros: the comparison would prove nothing"
        assert_close(on_gpu[key], on_cpu[key], dtype, f"{net} {dtype}: {key}")


# build_model name -> (in_channels, input_size)
TRAINED_NETS = {"lenet": (1, (28, 28)), "vgg-small": (3, (32, 32))}


def _two_training_steps(name, xp, x_np, labels_np):
    """Two SGD steps with momentum (the second runs the momentum kernel) in float64; losses, gradients and state."""
    in_channels, input_size = TRAINED_NETS[name]
    model = models.build_model(name, in_channels=in_channels, num_classes=10, input_size=input_size, seed=0)
    model.to(xp, "float64")
    opt = optim.SGD(model, lr=0.01, momentum=0.9)
    loss_fn = nn.SoftmaxCrossEntropy()
    x, labels = B.asarray(x_np, xp, dtype="float64"), B.asarray(labels_np, xp)
    out = {}
    for step in (1, 2):
        out[f"step {step} loss"] = loss_fn.forward(model.forward(x), labels)
        out[f"step {step} dx"] = model.backward(loss_fn.backward())
        out.update({f"step {step} grad {p}": layer.grads[key] for p, layer, key in model.named_parameters()})
        opt.step()
    out.update({f"param {p}": value for p, value in model.state_dict().items()})
    out.update({f"optimizer {k}": value for k, value in opt.state_dict().items() if k != "step"})
    return out


@pytest.mark.parametrize("net", sorted(TRAINED_NETS))
def test_training_steps_on_the_reference_path_give_the_fast_paths_numbers_float64(cp, xpc, net):
    """lenet / vgg-small, two SGD steps with momentum on CuPy in float64: losses, input and parameter gradients of
    both steps, parameters and momentum buffers after them are the same under fast_paths=False (relative 1e-12)."""
    in_channels, (H, W) = TRAINED_NETS[net]
    rng = np.random.default_rng(21)
    x_np, labels = rng.standard_normal((8, in_channels, H, W)), rng.integers(0, 10, 8)
    fast = _two_training_steps(net, xpc, x_np, labels)
    with config_context(fast_paths=False):
        reference = _two_training_steps(net, xpc, x_np, labels)
    assert set(fast) == set(reference)
    assert any(k.startswith("optimizer") for k in reference) and any(k.startswith("step 2 grad") for k in reference)
    for key in reference:
        assert B.backend_name(fast[key]) == "cupy" and B.backend_name(reference[key]) == "cupy", key
        assert np.any(host(reference[key]) != 0), f"{key} is all zeros: the comparison would prove nothing"
        assert_same_numbers(fast[key], reference[key], f"{net}: {key}")


# --------------------------------------------------------------------------- training stays on the device

# One thread that spins on the GPU's nanosecond clock: work queued behind it
# cannot start, so a host call that returns while it still runs did not wait.
_SPIN = r"""
extern "C" __global__ void spin(const long long nanoseconds) {
    unsigned long long start, now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
    do {
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    } while (now - start < (unsigned long long)nanoseconds);
}
"""


def _device_arrays(model, optimizer):
    arrays = {}
    for name, layer, key in model.named_parameters():
        arrays[f"param {name}"] = layer.params[key]
        arrays[f"grad {name}"] = layer.grads[key]
    for name, value in optimizer.state_dict().items():
        if name != "step":
            arrays[f"optimizer {name}"] = value
    return arrays


def test_training_step_stays_on_the_device_and_does_not_wait_for_it(cp, xpc):
    """Forward, loss, backward and SGD step enqueue GPU work and return without a host synchronisation.

    A 2 s spin kernel goes first on the stream; if anything in the step read a
    value back (or synchronised otherwise), the host would block behind it.
    """
    model = models.vgg_small(rng=0).to("cupy", "float32")
    opt = optim.SGD(model, lr=0.01, momentum=0.9)
    loss_fn = nn.SoftmaxCrossEntropy(validate=False)
    rng = np.random.default_rng(9)
    x = B.asarray(rng.standard_normal((64, 3, 32, 32)), xpc, dtype="float32")  # the batch is on the device already
    labels = B.asarray(rng.integers(0, 10, 64), xpc)

    def step():
        loss = loss_fn.forward(model.forward(x), labels)
        model.backward(loss_fn.backward(), need_input_grad=False)
        opt.step()
        return loss

    for _ in range(2):  # compile the kernels, fill the memory pool, create the cuBLAS handle
        step()
    stream = cp.cuda.get_current_stream()
    stream.synchronize()
    spin = cp.RawKernel(_SPIN, "spin")
    spin((1,), (1,), (np.int64(2 * 10**9),))  # compile and run once, so the timed launch is only a launch
    stream.synchronize()

    t0 = time.perf_counter()
    spin((1,), (1,), (np.int64(2 * 10**9),))
    loss = step()
    host_seconds = time.perf_counter() - t0
    still_queued = not stream.done
    stream.synchronize()
    total_seconds = time.perf_counter() - t0
    assert total_seconds >= 1.9, f"the spin kernel took {total_seconds:.2f} s, not 2 s: the check proves nothing"
    assert host_seconds < 1.0 and still_queued, (
        f"the training step returned after {host_seconds:.2f} s with the GPU busy for 2 s: something in "
        "forward/backward/step synchronised with the host"
    )
    assert B.backend_name(loss) == "cupy" and np.isfinite(float(host(loss)))
    arrays = _device_arrays(model, opt)
    assert any(k.startswith("optimizer") for k in arrays) and any(k.startswith("grad") for k in arrays)
    for name, value in arrays.items():
        assert B.backend_name(value) == "cupy", f"{name} is not on the GPU"
        assert B.device(value) == B.device(x), f"{name} is on another device"
        assert B.dtype_name(value) == "float32", name


def test_trainer_on_cupy_matches_numpy_and_reads_back_every_log_every_steps(cp, xpc):
    """Trainer.fit on CuPy follows the NumPy run (float64) and copies to the host only every ``log_every`` steps."""
    rng = np.random.default_rng(10)
    ds = data.Dataset(
        x_train=rng.standard_normal((128, 1, 8, 8)).astype(np.float32), y_train=rng.integers(0, 10, 128),
        x_test=rng.standard_normal((32, 1, 8, 8)).astype(np.float32), y_test=rng.integers(0, 10, 32),
        num_classes=10, name="synthetic",
    )

    def fit(backend_name):
        model = models.digits_net(rng=0).to(backend_name, "float64")
        trainer = train.Trainer(model, optim.SGD(model, lr=0.05, momentum=0.9), ds, batch_size=8, log_every=4)
        with mock.patch.object(B, "to_numpy", wraps=B.to_numpy) as to_host:
            history = trainer.fit(epochs=1)
        return model, history[-1], to_host.call_count

    gpu_model, gpu_result, gpu_reads = fit("cupy")
    cpu_model, cpu_result, _ = fit("numpy")
    steps = 128 // 8
    assert gpu_reads <= steps // 4 + 3, f"{gpu_reads} copies to the host in {steps} steps with log_every=4"
    assert gpu_result.train_loss == pytest.approx(cpu_result.train_loss, rel=1e-9)
    assert gpu_result.test_loss == pytest.approx(cpu_result.test_loss, rel=1e-9)
    for name, value in cpu_model.state_dict().items():
        assert B.backend_name(gpu_model.state_dict()[name]) == "cupy", name
        assert_close(gpu_model.state_dict()[name], value, "float64", name)


# --------------------------------------------------------------------------- checkpoints across devices


def _one_step(model, opt, x_np, labels_np):
    xp = B.namespace(next(iter(model.state_dict().values())))
    loss_fn = nn.SoftmaxCrossEntropy()
    loss_fn.forward(model.forward(B.asarray(x_np, xp, dtype="float64")), B.asarray(labels_np, xp))
    model.backward(loss_fn.backward())
    opt.step()


@pytest.mark.parametrize("direction", ["gpu_to_numpy", "numpy_to_gpu"])
def test_checkpoint_moves_between_gpu_and_numpy(cp, xpc, tmp_path, direction):
    """A checkpoint saved from one backend loads on the other exactly, and training continues identically."""
    source, target = ("cupy", "numpy") if direction == "gpu_to_numpy" else ("numpy", "cupy")
    config = {"name": "lenet", "in_channels": 1, "num_classes": 10, "input_size": [28, 28], "seed": 0}
    rng = np.random.default_rng(11)
    x_np, labels = rng.standard_normal((4, 1, 28, 28)), rng.integers(0, 10, 4)

    model = models.build_model("lenet", in_channels=1, num_classes=10, input_size=28).to(source, "float64")
    opt = optim.SGD(model, lr=0.05, momentum=0.9)
    _one_step(model, opt, x_np, labels)
    path = checkpoint.save_checkpoint(
        tmp_path / "run.safetensors",
        checkpoint.Checkpoint.capture(model, model_config=config, optimizer=opt, step=1, train={"dtype": "float64"}),
    )
    loaded = checkpoint.load_checkpoint(path)
    restored = loaded.build_model(target)
    restored_opt = optim.SGD(restored, lr=0.05, momentum=0.9)
    loaded.load_into(restored, restored_opt)

    for name, value in model.state_dict().items():
        assert B.backend_name(restored.state_dict()[name]) == target, name
        np.testing.assert_array_equal(host(restored.state_dict()[name]), host(value), err_msg=name)
    for name, value in opt.state_dict().items():
        assert name == "step" or B.backend_name(restored_opt.state_dict()[name]) == target, name
        np.testing.assert_array_equal(host(restored_opt.state_dict()[name]), host(value), err_msg=name)

    _one_step(model, opt, x_np, labels)
    _one_step(restored, restored_opt, x_np, labels)
    for name, value in model.state_dict().items():
        assert_close(restored.state_dict()[name], value, "float64", f"after one more step: {name}")


# --------------------------------------------------------------------------- out of memory, TF32


def test_gpu_out_of_memory_in_a_conv_says_what_to_change(cp, xpc):
    """Capping CuPy's memory pool below one im2col matrix: the layer raises MemoryError naming itself, the batch
    and the workspace limit, suggesting a smaller batch or a lower limit; with a lower limit the batch then fits."""
    layer = nn.Conv2d(16, 16, 3, padding=1, rng=0).to("cupy", "float32")
    x = B.asarray(np.random.default_rng(12).standard_normal((64, 16, 64, 64)), xpc, dtype="float32")  # 16 MiB
    pool = cp.get_default_memory_pool()
    cp.cuda.get_current_stream().synchronize()
    pool.free_all_blocks()
    previous_pool_limit, workspace_mb = pool.get_limit(), get_config()["workspace_mb"]
    # The whole batch's im2col matrix is 64*64*64 x 144 floats = 151 MiB; the cap leaves 96 MiB.
    pool.set_limit(size=pool.used_bytes() + 96 * 2**20)
    try:
        with pytest.raises(MemoryError) as info:
            layer.forward(x)
        message = str(info.value)
        assert type(info.value) is MemoryError
        assert isinstance(info.value.__cause__, cp.cuda.memory.OutOfMemoryError)
        assert message.startswith(repr(layer)), message
        for part in ("ran out of memory", "batch size 64", f"workspace limit {workspace_mb:g} MB",
                     "smaller batch", "set_config(workspace_mb=", "PORTABLE_CNN_WORKSPACE_MB"):
            assert part in message, (part, message)
        with config_context(workspace_mb=8):  # slices of 3 samples: about 7 MiB of columns at a time
            g = ConvGeometry.of(x.shape, layer.params["weight"].shape, 1, 1, 1)
            assert g.samples_per_slice(4, 8 * 2**20) == 3
            y = layer.forward(x)
        assert tuple(y.shape) == (64, 16, 64, 64)
        assert get_config()["workspace_mb"] == workspace_mb
    finally:
        pool.set_limit(size=previous_pool_limit)


def test_tf32_is_off_by_default_and_float32_gemms_are_exact(cp, xpc):
    """With TF32 off a float32 product keeps all 24 bits: (1 + 2**-12) summed 1024 times is exact.

    TF32 would round 1 + 2**-12 to 1 (10 mantissa bits) and give 1024.
    """
    assert not B.tf32_enabled() and not get_config()["tf32"]
    a = cp.full((256, 1024), 1 + 2.0**-12, dtype=cp.float32)
    b = cp.ones((1024, 256), dtype=cp.float32)
    assert float((a @ b)[0, 0]) == 1024 * (1 + 2.0**-12)
    try:
        B.set_tf32(True)
        assert B.tf32_enabled()
        product = float((a @ b)[0, 0])  # cuBLAS may now use TF32; any answer near 1024 is allowed
        assert abs(product - 1024.25) <= 0.5
    finally:
        B.set_tf32(False)
    assert not B.tf32_enabled()
    assert float((a @ b)[0, 0]) == 1024 * (1 + 2.0**-12)
    with config_context(tf32=True):  # the setting reaches CuPy, and is taken back after the block
        assert B.tf32_enabled()
        assert abs(float((a @ b)[0, 0]) - 1024.25) <= 0.5
    assert not B.tf32_enabled()
    assert float((a @ b)[0, 0]) == 1024 * (1 + 2.0**-12)


# ------------------------------------------------------- cross-entropy options, 0-d and empty inputs


# (logits shape, options, whether the fused kernels run): the fused case is (N, K) logits, class labels, no weight
# nor smoothing and an ignore_index outside [0, K); everything else runs the reference inside the CuPy kernel.
CE_GPU_CASES = [
    ((9, 6), {"reduction": "mean"}, True),
    ((9, 6), {"reduction": "sum"}, True),
    ((9, 6), {"reduction": "none"}, True),
    ((9, 6), {"reduction": "mean", "ignore_index": 2}, False),
    ((9, 6), {"reduction": "mean", "weight": True}, False),
    ((9, 6), {"reduction": "none", "label_smoothing": 0.2}, False),
    ((3, 6, 4), {"reduction": "mean"}, False),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "options", "fused"), CE_GPU_CASES, ids=[str(c[:2]) for c in CE_GPU_CASES])
def test_cross_entropy_options_on_cupy_match_reference_path(cp, xpc, shape, options, fused, dtype):
    """The CuPy cross-entropy with PyTorch's options against the reference path: ignored labels (-100) among the
    labels, a device dloss (0-d, or one per position), and the fused kernels only where they apply."""
    from portable_cnn.kernels.reference import softmax as reference_softmax

    rng = np.random.default_rng(21)
    K = shape[1]
    labels_np = rng.integers(0, K, shape[:1] + shape[2:])
    labels_np.flat[::4] = options.get("ignore_index", -100)  # hits of ignore_index
    put = _putter(xpc, dtype)
    logits, labels = put(rng.standard_normal(shape) * 3), put(labels_np)
    opts = {**options, "weight": put(rng.uniform(0.5, 2.0, K)) if options.get("weight") else None}
    loss_shape = labels_np.shape if options["reduction"] == "none" else ()
    dloss = put(rng.standard_normal(loss_shape))

    def run():
        loss, probs = ops.softmax_cross_entropy(logits, labels, **opts)
        return {"loss": loss, "probs": probs, "dlogits": ops.softmax_cross_entropy_backward(probs, labels, dloss, **opts),
                "dlogits float": ops.softmax_cross_entropy_backward(probs, labels, 0.5, **opts)}

    with mock.patch.object(reference_softmax, "softmax_cross_entropy_forward",
                           wraps=reference_softmax.softmax_cross_entropy_forward) as reference_forward:
        got = run()
    assert reference_forward.call_count == (0 if fused else 1)
    with config_context(fast_paths=False):
        expected = run()
    for name in got:
        assert tuple(got[name].shape) == tuple(expected[name].shape), name
        assert_close(got[name], expected[name], dtype, name)


def test_cross_entropy_over_nothing_on_cupy_is_nan_with_a_zero_gradient(cp, xpc):
    """Every label ignored, or an empty batch, in the fused kernels: a NaN mean, a zero sum, a zero gradient."""
    for logits_np, labels_np in ((np.zeros((3, 4)), np.full(3, -100)), (np.zeros((0, 4)), np.zeros(0, dtype=np.int64))):
        logits, labels = B.asarray(logits_np, xpc), B.asarray(labels_np, xpc)
        loss, probs = ops.softmax_cross_entropy(logits, labels)
        assert np.isnan(host(loss))
        np.testing.assert_array_equal(host(ops.softmax_cross_entropy_backward(probs, labels)), np.zeros(logits_np.shape))
        assert float(host(ops.softmax_cross_entropy(logits, labels, reduction="sum")[0])) == 0.0


@pytest.mark.parametrize("shape", [(), (0, 3), (3, 0)], ids=str)
def test_zero_d_and_empty_inputs_on_cupy_match_numpy(cp, xpc, shape):
    """0-d and empty inputs through the CuPy ReLU kernels and the reference's activations and softmaxes on CuPy:
    CuPy arrays of the input's shape with NumPy's values."""
    rng = np.random.default_rng(22)
    x, dy = rng.standard_normal(shape), rng.standard_normal(shape)
    pairs = {
        "relu": (ops.relu, lambda d, x_, y: ops.relu_backward(d, x_)),
        "sigmoid": (ops.sigmoid, lambda d, x_, y: ops.sigmoid_backward(d, y)),
        "tanh": (ops.tanh, lambda d, x_, y: ops.tanh_backward(d, y)),
        "softmax": (ops.softmax, lambda d, x_, y: ops.softmax_backward(d, y)),
        "log_softmax": (ops.log_softmax, lambda d, x_, y: ops.log_softmax_backward(d, y)),
    }
    for name, (forward, backward) in pairs.items():
        results = {}
        for library, xp_ in (("cupy", xpc), ("numpy", B.get_namespace("numpy"))):
            X = B.asarray(x, xp_)
            y = forward(X)
            dx = backward(B.asarray(dy, xp_), X, y)
            assert B.namespace(y) is xp_ and B.namespace(dx) is xp_, name  # arrays, never scalars
            results[library] = (host(y), host(dx))
        for got, expected in zip(results["cupy"], results["numpy"]):
            assert got.shape == shape, name
            np.testing.assert_allclose(got, expected, err_msg=name, **tol("float64"))


# (N, C), (N, C, L), channels-last (N, C, H, W), an empty batch: CuPy runs the reference (no CuPy kernel).
BN_GPU_SHAPES = [(6, 3), (4, 3, 5), (3, 3, 4, 5), (0, 3, 2, 2)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("affine", "tracking"), [(True, True), (False, False)], ids=["affine-tracked", "plain-untracked"])
@pytest.mark.parametrize("shape", BN_GPU_SHAPES, ids=str)
def test_batch_norm_every_shape_and_option_on_cupy_matches_numpy(cp, xpc, shape, affine, tracking, dtype):
    """ops.batch_norm in training and evaluation on CuPy (channels-last 4-D input) against NumPy's kernel."""
    rng = np.random.default_rng(23)
    C = shape[1]
    x, dy = rng.normal(2.0, 1.5, shape), rng.standard_normal(shape)
    weight, bias = (rng.normal(1.0, 0.3, C), rng.normal(0.0, 0.3, C)) if affine else (None, None)
    stats = (rng.standard_normal(C), rng.uniform(0.5, 2.0, C)) if tracking else (None, None)
    results = {}
    for library, xp_ in (("cupy", xpc), ("numpy", B.get_namespace("numpy"))):
        put = _putter(xp_, dtype)
        x_ = put(x)
        if len(shape) == 4 and library == "cupy":
            x_ = channels_last(cp, x_)
        out = {}
        for training in (True, False):
            y, cache, mean, var = ops.batch_norm(x_, *(None if a is None else put(a) for a in (weight, bias, *stats)),
                                                 training=training, momentum=0.3)
            dx, dweight, dbias = ops.batch_norm_backward(put(dy), cache)
            out.update({f"{k} {training}": v for k, v in
                        {"y": y, "dx": dx, "dweight": dweight, "dbias": dbias, "mean": mean, "var": var}.items()})
        results[library] = out
    for key, expected in results["numpy"].items():
        got = results["cupy"][key]
        if expected is None:
            assert got is None, key
            continue
        assert B.backend_name(got) == "cupy", key
        assert_close(got, expected, dtype, key)


def test_residual_network_on_cupy_matches_numpy(cp, xpc):
    """A residual model (projection and identity shortcuts, BatchNorm) on CuPy: logits, dL/dx and every gradient, float64."""
    from test_nn import LABELS, RES_X_SHAPE, loss_and_grads, make_residual_model, residual_state

    x = np.random.default_rng(24).standard_normal(RES_X_SHAPE)
    results = {}
    for library in ("cupy", "numpy"):
        model = make_residual_model().to("numpy", "float64")
        model.load_state_dict(residual_state())
        model.to(library)
        results[library] = loss_and_grads(model, B.asarray(x, B.get_namespace(library)), B.asarray(LABELS, B.get_namespace(library)))
    (loss_gpu, dx_gpu, grads_gpu), (loss_cpu, dx_cpu, grads_cpu) = results["cupy"], results["numpy"]
    np.testing.assert_allclose(loss_gpu, loss_cpu, **tol("float64"))
    assert_close(dx_gpu, dx_cpu, "float64", "input")
    for name in grads_cpu:
        assert_close(grads_gpu[name], grads_cpu[name], "float64", name)


# --------------------------------------------------------------------------- grouped and depthwise convolution

# (N, C, K, H, W, R, S, u, v, a, b, dh, dw, groups)
GROUPED_CONV_CASES = [
    (2, 6, 4, 7, 6, 3, 3, 1, 1, 1, 1, 1, 1, 2),  # two groups: the reference's batched GEMMs
    (2, 8, 12, 9, 8, 3, 2, 2, 1, 1, 0, 1, 2, 4),  # four groups, strided, dilated
    (4, 16, 16, 9, 9, 3, 3, 2, 2, 1, 1, 1, 1, 16),  # depthwise, MobileNet's 3x3 stride 2
    (3, 5, 10, 8, 7, 3, 2, 1, 2, 2, 0, 2, 1, 5),  # depthwise, channel multiplier 2, dilation
    (0, 4, 4, 5, 5, 3, 3, 1, 1, 1, 1, 1, 1, 4),  # depthwise, empty batch
]


def _grouped_id(case):
    return _conv_id(case[:13]) + f"_g{case[13]}"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", GROUPED_CONV_CASES, ids=_grouped_id)
def test_grouped_and_depthwise_conv2d_match_reference_path_and_numpy(cp, xpc, case, dtype, layout):
    """Grouped conv (reference GEMMs batched over groups) and depthwise conv (cuda/depthwise.cu) on CuPy.

    Against the reference path on the same CuPy arrays (float64: relative
    1e-12) and against NumPy; a depthwise convolution runs no im2col.
    """
    N, C, K, H, W, R, S, u, v, a, b, dh, dw, G = case
    opts = {"stride": (u, v), "padding": (a, b), "dilation": (dh, dw), "groups": G}
    rng = np.random.default_rng(25)
    x_np, w_np = rng.standard_normal((N, C, H, W)).astype(dtype), rng.standard_normal((K, C // G, R, S)).astype(dtype)
    b_np = rng.standard_normal(K).astype(dtype)
    P, Q = ops.out_size(H, R, u, a, dh), ops.out_size(W, S, v, b, dw)
    dy_np = rng.standard_normal((N, K, P, Q)).astype(dtype)
    x, w, bias, dy = (B.asarray(t, xpc) for t in (x_np, w_np, b_np, dy_np))
    if layout == "channels_last" and N:
        x, dy = channels_last(cp, x), channels_last(cp, dy)

    def run():
        y, cols = ops.conv2d(x, w, bias, return_cols=True, **opts)
        dx, dweight, dbias = ops.conv2d_backward(dy, x, w, cols=cols, **opts)
        _, dweight_only, _ = ops.conv2d_backward(dy, x, w, has_bias=False, need_input_grad=False, **opts)
        return {"y": y, "dx": dx, "dw": dweight, "db": dbias, "dw only": dweight_only}

    no_im2col = mock.patch.object(cupy_conv, "im2col", side_effect=AssertionError("depthwise ran im2col"))
    with no_im2col if G == C else contextlib.nullcontext():
        fast = run()
    with config_context(fast_paths=False):
        reference = run()
    y_np = ops.conv2d(x_np, w_np, b_np, **opts)
    on_numpy = dict(zip(("dx", "dw", "db"), ops.conv2d_backward(dy_np, x_np, w_np, **opts)), y=y_np)
    for name, got in fast.items():
        assert B.backend_name(got) == "cupy", name
        if dtype == "float64":
            assert_same_numbers(got, reference[name], name + " vs reference path")
        assert_close(got, reference[name], dtype, name + " vs reference path")
        assert_close(got, on_numpy[name.replace(" only", "")], dtype, name + " vs NumPy")


def test_depthwise_conv2d_on_cupy_is_deterministic(cp, xpc):
    """No atomics: the depthwise kernels give the same bits on every run (a MobileNet-sized layer, float32)."""
    rng = np.random.default_rng(26)
    put = lambda shape: channels_last(cp, B.asarray(rng.standard_normal(shape), xpc, dtype="float32"))  # noqa: E731
    x, dy = put((32, 64, 16, 16)), put((32, 64, 16, 16))
    w = B.asarray(rng.standard_normal((64, 1, 3, 3)), xpc, dtype="float32")
    runs = [(ops.conv2d(x, w, padding=1, groups=64), *ops.conv2d_backward(dy, x, w, padding=1, groups=64))
            for _ in range(3)]
    for name, first, *others in zip(("y", "dx", "dw", "db"), *runs):
        for other in others:
            np.testing.assert_array_equal(host(other), host(first), err_msg=name)


# --------------------------------------------------------------------------- pooling options, adaptive and global

# (N, C, H, W, R, S, u, v, a, b, dh, dw, ceil_mode, count_include_pad, divisor_override); dh, dw: max pooling only
POOL_OPTION_CASES = [
    (2, 3, 6, 7, 3, 3, 2, 2, 1, 1, 1, 1, True, False, None),  # a ceil_mode window past the padding, border divisors
    (2, 2, 6, 6, 2, 3, 2, 1, 1, 1, 2, 2, True, True, None),  # dilated windows past the padding
    (1, 3, 5, 7, 2, 2, 3, 3, 1, 0, 1, 1, True, True, 3),  # divisor_override, strides larger than the kernel
    (2, 4, 2, 2, 2, 2, 2, 2, 1, 1, 3, 3, False, True, -2),  # dilated windows wholly in padding: -inf, no gradient
]
GLOBAL_POOL_OPS = ("global_avg_pool2d_forward", "global_avg_pool2d_backward")


def _pool_option_id(case):
    return "N{}C{}_{}x{}_k{}x{}_s{}{}_p{}{}_d{}{}_ceil{}_pad{}_div{}".format(*case)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", POOL_OPTION_CASES, ids=_pool_option_id)
def test_pool_option_kernels_match_reference_path(cp, xpc, case, dtype, layout):
    """ceil_mode, dilation, count_include_pad=False, divisor_override: the CUDA kernels against the reference path
    on the same CuPy arrays and against NumPy (ties included)."""
    N, C, H, W, R, S, u, v, a, b, dh, dw, ceil_mode, count_include_pad, divisor_override = case
    common = {"kernel_size": (R, S), "stride": (u, v), "padding": (a, b), "ceil_mode": ceil_mode}
    max_options = {**common, "dilation": (dh, dw)}
    avg_options = {**common, "count_include_pad": count_include_pad, "divisor_override": divisor_override}
    rng = np.random.default_rng(27)
    x_np = np.round(rng.standard_normal((N, C, H, W)) * 2).astype(dtype)  # ties within windows
    x = B.asarray(x_np, xpc)
    if layout == "channels_last":
        x = channels_last(cp, x)

    def run(x, dy_of):
        y, argmax = ops.max_pool2d(x, **max_options)
        avg = ops.avg_pool2d(x, **avg_options)
        return {"y": y, "argmax": argmax, "dx": ops.max_pool2d_backward(dy_of(y), argmax, x.shape, **max_options),
                "avg": avg, "davg": ops.avg_pool2d_backward(dy_of(avg), x.shape, **avg_options)}

    def dy_of(y):
        dy = B.asarray(np.cos(np.arange(np.prod(y.shape))).reshape(tuple(y.shape)), xpc, dtype=dtype)
        return channels_last(cp, dy) if layout == "channels_last" else dy

    with cupy_kernel_spies(*POOL_OPS) as spies:
        fast = run(x, dy_of)
    assert all(spies[op].call_count == 1 for op in POOL_OPS), {op: spies[op].call_count for op in POOL_OPS}
    with config_context(fast_paths=False):
        reference = run(x, dy_of)
    on_numpy = run(x_np, lambda y: np.cos(np.arange(y.size)).reshape(y.shape).astype(dtype))
    for name in ("y", "argmax"):
        np.testing.assert_array_equal(host(fast[name]), host(reference[name]), err_msg=name)  # -inf included
        np.testing.assert_array_equal(host(fast[name]), on_numpy[name], err_msg=name + " vs NumPy")
    for name in ("dx", "avg", "davg"):
        assert_close(fast[name], reference[name], dtype, name)
        assert_close(fast[name], on_numpy[name], dtype, name + " vs NumPy")
        assert B.backend_name(fast[name]) == "cupy" and B.dtype_name(fast[name]) == dtype


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 5, 4, 6), (2, 1, 1, 1), (0, 3, 2, 2)], ids=["3x5x4x6", "1x1", "empty"])
def test_global_avg_pool_kernels_match_reference_path(cp, xpc, shape, dtype, layout):
    """Global average pooling (adaptive_avg_pool2d to 1x1): one thread per (n, c); the backward channels-last."""
    rng = np.random.default_rng(28)
    x_np, dy_np = rng.standard_normal(shape).astype(dtype), rng.standard_normal((*shape[:2], 1, 1)).astype(dtype)
    x, dy = B.asarray(x_np, xpc), B.asarray(dy_np, xpc)
    if layout == "channels_last":
        x = channels_last(cp, x)

    def run(x, dy):
        return {"y": ops.adaptive_avg_pool2d(x, 1), "dx": ops.adaptive_avg_pool2d_backward(dy, x.shape, (1, 1)),
                "global y": ops.global_avg_pool2d(x), "global dx": ops.global_avg_pool2d_backward(dy, x.shape)}

    with cupy_kernel_spies(*GLOBAL_POOL_OPS) as spies:
        fast = run(x, dy)
    counts = {op: spies[op].call_count for op in GLOBAL_POOL_OPS}
    assert counts == dict.fromkeys(GLOBAL_POOL_OPS, 2), counts
    with config_context(fast_paths=False):
        reference = run(x, dy)
    on_numpy = run(x_np, dy_np)
    for name, got in fast.items():
        assert_close(got, reference[name], dtype, name)
        assert_close(got, on_numpy[name], dtype, name + " vs NumPy")
        assert B.backend_name(got) == "cupy" and B.dtype_name(got) == dtype and tuple(got.shape) == on_numpy[name].shape
    if x_np.size and shape[1] > 1 and shape[2] * shape[3] > 1:
        assert fast["dx"].strides[1] == fast["dx"].itemsize  # channels-last, as the convolutions write


def test_adaptive_avg_pool2d_on_cupy_stays_on_the_device(cp, xpc):
    """General adaptive bins (overlapping, upsampling, None) run the reference's bin products on the device."""
    rng = np.random.default_rng(29)
    x_np = rng.standard_normal((2, 3, 5, 3))
    x = channels_last(cp, B.asarray(x_np, xpc))
    for output_size in ((3, 5), (2, None)):
        y = ops.adaptive_avg_pool2d(x, output_size)
        dy_np = rng.standard_normal(tuple(y.shape))
        dx = ops.adaptive_avg_pool2d_backward(B.asarray(dy_np, xpc), x.shape, output_size)
        assert B.backend_name(y) == B.backend_name(dx) == "cupy" and B.device(dx) == B.device(x)
        assert_close(y, ops.adaptive_avg_pool2d(x_np, output_size), "float64", f"{output_size} y")
        dx_np = ops.adaptive_avg_pool2d_backward(dy_np, x_np.shape, output_size)
        assert_close(dx, dx_np, "float64", f"{output_size} dx")
