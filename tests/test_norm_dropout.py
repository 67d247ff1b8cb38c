"""BatchNorm1d, BatchNorm2d and Dropout: ops and layers, on every backend.

BatchNorm is checked against float64 central differences (training mode,
where the gradient runs through the batch statistics, and evaluation mode) on
``(N, C)``, ``(N, C, L)`` and ``(N, C, H, W)`` input with and without the
affine parameters and the running statistics, and against
``torch.nn.BatchNorm1d``/``2d`` built with the same options: outputs,
gradients and the running statistics over several training steps (the
cumulative average of ``momentum=None`` too), then evaluation; its
``state_dict`` keys, shapes and dtypes are torch's for every option; the
corners (one value per channel, an empty batch, channels-last and strided
input) behave as torch's. Dropout is random, so it is checked by its mask:
the kept values are scaled by ``1 / (1 - p)``, the gradient is the same mask,
``p = 0`` and evaluation are the identity, the drop rate is ``p`` on a large
array, and one seed gives one mask.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from conftest import tol
from gradcheck import assert_grad_close, numerical_grad, projected_loss

from portable_cnn import backend as B
from portable_cnn import nn, ops

X_SHAPE = (3, 2, 2, 3)  # (N, C, H, W): M = 18 values per channel


def bn_inputs(seed=0):
    """``x`` far from zero mean and unit variance, a non-trivial affine and running statistics."""
    rng = np.random.default_rng(seed)
    x = rng.normal(1.5, 2.0, X_SHAPE)
    weight, bias = rng.normal(1.0, 0.5, 2), rng.normal(0.0, 0.5, 2)
    running_mean, running_var = rng.normal(0.0, 1.0, 2), rng.uniform(0.5, 2.0, 2)
    return x, weight, bias, running_mean, running_var


# --------------------------------------------------------------------------- batch norm: op


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batch_norm2d_gradients_match_central_differences(backend, training):
    x, weight, bias, rm, rv = bn_inputs()
    cotangent = np.random.default_rng(1).standard_normal(X_SHAPE)
    loss = projected_loss(backend.to_numpy, cotangent)
    to = backend.asarray

    def forward(x=x, weight=weight, bias=bias):
        return ops.batch_norm2d(to(x), to(weight), to(bias), to(rm), to(rv), training=training, momentum=0.1, eps=1e-5)[0]

    _, cache, _, _ = ops.batch_norm2d(to(x), to(weight), to(bias), to(rm), to(rv), training=training, momentum=0.1, eps=1e-5)
    dx, dweight, dbias = ops.batch_norm2d_backward(to(cotangent), cache)
    assert_grad_close(backend.to_numpy(dx), numerical_grad(lambda v: loss(forward(x=v)), x), "x")
    assert_grad_close(backend.to_numpy(dweight), numerical_grad(lambda v: loss(forward(weight=v)), weight), "weight")
    assert_grad_close(backend.to_numpy(dbias), numerical_grad(lambda v: loss(forward(bias=v)), bias), "bias")


def test_batch_norm2d_without_affine_or_running_stats(backend):
    """``weight``/``bias`` None: no affine and no gradient for it; running stats None: batch statistics in both modes."""
    x = bn_inputs()[0]
    y, cache, rm, rv = ops.batch_norm2d(backend.asarray(x), None, None, None, None, training=False, eps=0.0)
    assert rm is None and rv is None
    expected = (x - x.mean(axis=(0, 2, 3), keepdims=True)) / x.std(axis=(0, 2, 3), keepdims=True)
    np.testing.assert_allclose(backend.to_numpy(y), expected, **tol("float64"))
    dx, dweight, dbias = ops.batch_norm2d_backward(backend.asarray(np.ones(X_SHAPE)), cache)
    assert dweight is None and dbias is None
    # A constant shift of the output is removed by the mean: the gradient of sum(y) is zero.
    np.testing.assert_allclose(backend.to_numpy(dx), 0.0, atol=1e-12)


def test_batch_norm2d_running_statistics_formula(backend):
    """Training normalises with the biased variance and keeps the unbiased one (PyTorch semantics)."""
    x, weight, bias, rm, rv = bn_inputs()
    y, _, new_rm, new_rv = ops.batch_norm2d(
        *(backend.asarray(a) for a in (x, weight, bias, rm, rv)), training=True, momentum=0.3, eps=1e-3
    )
    mean, var = x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3))
    M = X_SHAPE[0] * X_SHAPE[2] * X_SHAPE[3]
    np.testing.assert_allclose(backend.to_numpy(new_rm), 0.7 * rm + 0.3 * mean, **tol("float64"))
    np.testing.assert_allclose(backend.to_numpy(new_rv), 0.7 * rv + 0.3 * var * M / (M - 1), **tol("float64"))
    expected = (x - mean[:, None, None]) / np.sqrt(var[:, None, None] + 1e-3) * weight[:, None, None] + bias[:, None, None]
    np.testing.assert_allclose(backend.to_numpy(y), expected, **tol("float64"))
    # Evaluation uses the running statistics and returns them unchanged.
    y_eval, _, same_rm, same_rv = ops.batch_norm2d(
        *(backend.asarray(a) for a in (x, weight, bias, rm, rv)), training=False, momentum=0.3, eps=1e-3
    )
    expected = (x - rm[:, None, None]) / np.sqrt(rv[:, None, None] + 1e-3) * weight[:, None, None] + bias[:, None, None]
    np.testing.assert_allclose(backend.to_numpy(y_eval), expected, **tol("float64"))
    np.testing.assert_array_equal(backend.to_numpy(same_rm), rm)
    np.testing.assert_array_equal(backend.to_numpy(same_rv), rv)


def test_batch_norm2d_rejects_bad_input():
    x, weight, bias, rm, rv = bn_inputs()
    with pytest.raises(ValueError, match=r"bn here: expected running_var of shape \(2,\) for an input with 2 channels, got \(3,\)"):
        ops.batch_norm2d(x, weight, bias, rm, np.ones(3), training=True, where="bn here")
    with pytest.raises(ValueError, match=r"4 dimensions \(N, C, H, W\), got shape \(3, 2\)"):
        ops.batch_norm2d(np.ones((3, 2)), weight, bias, rm, rv, training=True)
    with pytest.raises(TypeError, match="running_var dtype float32 does not match input dtype float64"):
        ops.batch_norm2d(x, weight, bias, rm, rv.astype(np.float32), training=True)
    with pytest.raises(ValueError, match=r"more than 1 value per channel.*\(1, 2, 1, 1\)"):
        ops.batch_norm2d(np.ones((1, 2, 1, 1)), weight, bias, rm, rv, training=True)
    with pytest.raises(ValueError, match="both running_mean and running_var"):
        ops.batch_norm2d(x, weight, bias, rm, None, training=True)
    with pytest.raises(TypeError, match="different libraries"):
        ops.batch_norm2d(x, weight, bias, rm, B.asarray(rv, B.get_namespace("array_api_strict")), training=True)
    # One value per channel is fine in evaluation (running statistics).
    ops.batch_norm2d(np.ones((1, 2, 1, 1)), weight, bias, rm, rv, training=False)


# --------------------------------------------------------------------------- batch norm: layer vs torch


def test_batch_norm_layer_matches_torch(backend, torch):
    rng = np.random.default_rng(4)
    ours = nn.BatchNorm2d(3, eps=1e-3, momentum=0.2).to(backend.xp, "float64")
    theirs = torch.nn.BatchNorm2d(3, eps=1e-3, momentum=0.2).double()
    affine = {"weight": rng.normal(1.0, 0.3, 3), "bias": rng.normal(0.0, 0.3, 3)}
    for key, value in affine.items():
        ours.params[key] = backend.asarray(value, dtype="float64")
        getattr(theirs, key).data = torch.from_numpy(value.copy())

    def step(x_np, dy_np):
        x_t = torch.from_numpy(x_np.copy()).requires_grad_(True)
        y_t = theirs(x_t)
        y_t.backward(torch.from_numpy(dy_np))
        y = ours.forward(backend.asarray(x_np))
        dx = ours.backward(backend.asarray(dy_np))
        f64 = tol("float64")
        np.testing.assert_allclose(backend.to_numpy(y), y_t.detach().numpy(), **f64)
        np.testing.assert_allclose(backend.to_numpy(dx), x_t.grad.numpy(), **f64)
        for key in ("weight", "bias"):
            torch_grad = getattr(theirs, key).grad
            np.testing.assert_allclose(backend.to_numpy(ours.grads[key]), torch_grad.numpy(), **f64, err_msg=key)
            torch_grad.zero_()
        for key in ("running_mean", "running_var"):
            np.testing.assert_allclose(
                backend.to_numpy(ours.buffers[key]), getattr(theirs, key).numpy(), **f64, err_msg=key
            )
        assert int(backend.to_numpy(ours.buffers["num_batches_tracked"])) == int(theirs.num_batches_tracked)

    for _ in range(3):  # the running statistics accumulate over steps
        step(rng.normal(2.0, 3.0, (4, 3, 3, 2)), rng.standard_normal((4, 3, 3, 2)))
    ours.eval()
    theirs.eval()
    step(rng.normal(2.0, 3.0, (2, 3, 3, 2)), rng.standard_normal((2, 3, 3, 2)))
    assert int(theirs.num_batches_tracked) == 3  # evaluation does not count
    nbt = ours.buffers["num_batches_tracked"]
    assert tuple(nbt.shape) == () and B.dtype_name(nbt) == "int64" and B.backend_name(nbt) == B.backend_name(ours.params["weight"])


def test_batch_norm_state_dict_loads_into_torch(torch):
    """Buffer names, shapes and dtypes are torch's: ``load_state_dict`` of our state works unchanged."""
    ours = nn.Sequential(nn.Conv2d(1, 2, 3, rng=0), nn.BatchNorm2d(2), nn.ReLU(), nn.Dropout(0.3, rng=0))
    ours.forward(np.random.default_rng(0).standard_normal((4, 1, 5, 5)).astype(np.float32))
    theirs = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.ReLU(), torch.nn.Dropout(0.3))
    expected = theirs.state_dict()
    state = ours.state_dict()
    assert list(state) == list(expected)
    assert list(state)[2:] == ["1.weight", "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked"]
    for key, value in state.items():
        assert tuple(value.shape) == tuple(expected[key].shape), key
    theirs.load_state_dict({key: torch.from_numpy(np.asarray(value)) for key, value in state.items()})
    assert int(theirs[1].num_batches_tracked) == 1
    np.testing.assert_allclose(theirs[1].running_var.numpy(), B.to_numpy(state["1.running_var"]))


def test_batch_norm_layer_moves_and_keeps_integer_counter(backend):
    bn = nn.BatchNorm2d(2).to(backend.xp, "float64")
    assert B.dtype_name(bn.buffers["running_var"]) == "float64"
    assert B.dtype_name(bn.buffers["num_batches_tracked"]) == "int64"
    np.testing.assert_array_equal(backend.to_numpy(bn.params["weight"]), [1.0, 1.0])
    np.testing.assert_array_equal(backend.to_numpy(bn.params["bias"]), [0.0, 0.0])
    with pytest.raises(ValueError, match=r"BatchNorm2d\(2.*expected input with 2 channels \(weight shape \(2,\)\), got 3 channels \(input shape \(2, 3, 2, 2\)\)"):
        bn.forward(backend.asarray(np.ones((2, 3, 2, 2))))


# --------------------------------------------------------------------------- dropout: op


def test_dropout_scales_kept_elements_and_gradient_is_the_mask(backend):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 5))
    uniform = rng.random((4, 5))
    p = 0.3
    y, mask = ops.dropout(backend.asarray(x), p, backend.asarray(uniform))
    keep = uniform >= p
    assert 0 < keep.sum() < keep.size
    np.testing.assert_allclose(backend.to_numpy(y), np.where(keep, x / (1 - p), 0.0), **tol("float64"))
    dy = rng.standard_normal((4, 5))
    dx = ops.dropout_backward(backend.asarray(dy), mask)
    np.testing.assert_allclose(backend.to_numpy(dx), np.where(keep, dy / (1 - p), 0.0), **tol("float64"))
    # The same against central differences, like every other op.
    loss = projected_loss(backend.to_numpy, dy)
    numeric = numerical_grad(lambda v: loss(ops.dropout(backend.asarray(v), p, backend.asarray(uniform))[0]), x)
    assert_grad_close(backend.to_numpy(dx), numeric, "x")


def test_dropout_edge_probabilities(backend):
    x = np.random.default_rng(6).standard_normal((3, 4))
    uniform = backend.asarray(np.random.default_rng(7).random((3, 4)))
    y, _ = ops.dropout(backend.asarray(x), 0.0, uniform)
    np.testing.assert_array_equal(backend.to_numpy(y), x)
    y, mask = ops.dropout(backend.asarray(x), 1.0, uniform)
    np.testing.assert_array_equal(backend.to_numpy(y), 0.0)
    assert not np.isnan(backend.to_numpy(mask)).any()


def test_dropout_rejects_bad_input():
    x = np.ones((2, 3))
    for p in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"drop here: dropout probability must be in \[0, 1\]"):
            ops.dropout(x, p, np.zeros((2, 3)), where="drop here")
    with pytest.raises(TypeError, match="dropout probability must be a number"):
        ops.dropout(x, "half", np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"mask_uniform of the input's shape \(2, 3\), got \(3, 2\)"):
        ops.dropout(x, 0.5, np.zeros((3, 2)))
    with pytest.raises(TypeError, match="mask_uniform dtype float32 does not match input dtype float64"):
        ops.dropout(x, 0.5, np.zeros((2, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"Dropout: dropout probability must be in \[0, 1\], got 2"):
        nn.Dropout(2)


# --------------------------------------------------------------------------- dropout: layer and random numbers


def test_dropout_layer_mask_rate_and_gradient(backend):
    p = 0.3
    layer = nn.Dropout(p, rng=11)
    x = backend.asarray(np.random.default_rng(8).uniform(1.0, 2.0, (200, 1000)), dtype="float32")
    y = backend.to_numpy(layer.forward(x))
    assert y.dtype == np.float32
    mask = y / backend.to_numpy(x)
    kept = mask != 0
    np.testing.assert_allclose(mask[kept], 1 / (1 - p), rtol=1e-6)
    # 200,000 draws: the dropped fraction has standard deviation ~0.001.
    assert abs(1 - kept.mean() - p) < 0.005
    dy = np.random.default_rng(9).standard_normal((200, 1000)).astype(np.float32)
    dx = backend.to_numpy(layer.backward(backend.asarray(dy)))
    np.testing.assert_allclose(dx, dy * mask, rtol=1e-6)


def test_dropout_layer_is_identity_in_eval_and_for_p_zero(backend):
    x = backend.asarray(np.random.default_rng(10).standard_normal((3, 4)))
    dy = backend.asarray(np.random.default_rng(11).standard_normal((3, 4)))
    for layer in (nn.Dropout(0.5, rng=0).eval(), nn.Dropout(0.0, rng=0)):
        np.testing.assert_array_equal(backend.to_numpy(layer.forward(x)), backend.to_numpy(x))
        np.testing.assert_array_equal(backend.to_numpy(layer.backward(dy)), backend.to_numpy(dy))
    model = nn.Sequential(nn.Linear(4, 4, rng=0), nn.Dropout(0.5, rng=0), nn.BatchNorm2d(1))
    model.eval()
    assert not model[1].training and not model[2].training
    model.train()
    assert model[1].training and model[2].training


def test_dropout_masks_are_seeded(backend, monkeypatch):
    x = backend.asarray(np.ones((64, 64)))

    def masks(layer, n=2):
        return [backend.to_numpy(layer.forward(x)) for _ in range(n)]

    first, second = masks(nn.Dropout(0.5, rng=3))
    assert not np.array_equal(first, second)  # a fresh mask per call
    again = masks(nn.Dropout(0.5, rng=3))
    np.testing.assert_array_equal(again[0], first)
    np.testing.assert_array_equal(again[1], second)
    assert not np.array_equal(masks(nn.Dropout(0.5, rng=4), 1)[0], first)
    # Without rng= the layer draws from the generator nn.manual_seed seeds, at call time.
    monkeypatch.setattr(nn, "_default_rng", nn._default_rng)  # restored after the test
    layer = nn.Dropout(0.5)
    nn.manual_seed(7)
    a = backend.to_numpy(layer.forward(x))
    nn.manual_seed(7)
    np.testing.assert_array_equal(backend.to_numpy(layer.forward(x)), a)


def test_random_uniform_on_each_backend(backend):
    xp = backend.xp
    like = backend.asarray(np.zeros(1), dtype="float32")
    u = B.random_uniform(xp, (50, 40), np.random.default_rng(0), dtype=like.dtype, device=B.device(like))
    assert B.backend_name(u) == B.backend_name(like)
    assert B.device(u) == B.device(like)
    assert B.dtype_name(u) == "float32" and tuple(u.shape) == (50, 40)
    values = backend.to_numpy(u)
    assert values.min() >= 0 and values.max() < 1 and 0.45 < values.mean() < 0.55
    v = B.random_uniform(xp, (50, 40), np.random.default_rng(0), dtype=like.dtype, device=B.device(like))
    np.testing.assert_array_equal(backend.to_numpy(v), values)
    # NumPy and array_api_strict draw the very same numbers from one seed.
    if backend.name in ("numpy", "array_api_strict"):
        np.testing.assert_array_equal(values, np.random.default_rng(0).random((50, 40), dtype=np.float32))
    assert B.dtype_name(B.random_uniform(xp, (2,), 0)) == "float64"
    with pytest.raises(TypeError, match="random_uniform: expected dtype float32 or float64, got int64"):
        B.random_uniform(xp, (2,), 0, dtype="int64")


# --------------------------------------------------------------------------- batch norm: every shape and option

BN_SHAPES = [(5, 3), (3, 3, 4), (2, 3, 2, 3)]  # (N, C), (N, C, L), (N, C, H, W)
BN_OPTIONS = [(True, True), (False, True), (True, False), (False, False)]  # (affine, track_running_stats)
BN_OPTION_IDS = ["affine-tracked", "plain-tracked", "affine-untracked", "plain-untracked"]


def _bn_op_inputs(shape, affine, tracking, seed=0):
    """``x`` off zero mean and unit variance; weight/bias and running statistics, or None where the option drops them."""
    rng = np.random.default_rng(seed)
    C = shape[1]
    x = rng.normal(1.5, 2.0, shape)
    weight, bias = (rng.normal(1.0, 0.5, C), rng.normal(0.0, 0.5, C)) if affine else (None, None)
    stats = (rng.normal(0.0, 1.0, C), rng.uniform(0.5, 2.0, C)) if tracking else (None, None)
    return x, weight, bias, *stats


@pytest.mark.parametrize(("affine", "tracking"), BN_OPTIONS, ids=BN_OPTION_IDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", BN_SHAPES, ids=["NC", "NCL", "NCHW"])
def test_batch_norm_gradients_match_central_differences_every_shape_and_option(backend, shape, training, affine, tracking):
    """``dx`` (through the batch statistics wherever they are used), ``dweight`` and ``dbias`` for 2-, 3- and 4-D input."""
    x, weight, bias, rm, rv = _bn_op_inputs(shape, affine, tracking)
    cotangent = np.random.default_rng(1).standard_normal(shape)
    loss = projected_loss(backend.to_numpy, cotangent)

    def to(a):
        return None if a is None else backend.asarray(a)

    def forward(x=x, weight=weight, bias=bias):
        return ops.batch_norm(to(x), to(weight), to(bias), to(rm), to(rv), training=training, momentum=0.1, eps=1e-5)

    y, cache, new_rm, new_rv = forward()
    dx, dweight, dbias = ops.batch_norm_backward(to(cotangent), cache)
    assert tuple(y.shape) == shape and (new_rm is None) == (not tracking)
    assert_grad_close(backend.to_numpy(dx), numerical_grad(lambda v: loss(forward(x=v)[0]), x), "x")
    if not affine:
        assert dweight is None and dbias is None
        return
    assert_grad_close(backend.to_numpy(dweight), numerical_grad(lambda v: loss(forward(weight=v)[0]), weight), "weight")
    assert_grad_close(backend.to_numpy(dbias), numerical_grad(lambda v: loss(forward(bias=v)[0]), bias), "bias")


def test_batch_norm_reduces_over_every_axis_but_the_channel(backend):
    """(N, C, L) is (N*L, C) with the channel last, and 2-D batch_norm2d is refused: one op, one meaning of 'per channel'."""
    x, weight, bias, rm, rv = _bn_op_inputs((3, 2, 5), True, True)
    y3, _, rm3, rv3 = ops.batch_norm(*(backend.asarray(a) for a in (x, weight, bias, rm, rv)), training=True)
    x2 = np.moveaxis(x, 1, -1).reshape(-1, 2)  # (N*L, C)
    y2, _, rm2, rv2 = ops.batch_norm(*(backend.asarray(a) for a in (x2, weight, bias, rm, rv)), training=True)
    f64 = tol("float64")
    np.testing.assert_allclose(np.moveaxis(backend.to_numpy(y3), 1, -1).reshape(-1, 2), backend.to_numpy(y2), **f64)
    np.testing.assert_allclose(backend.to_numpy(rm3), backend.to_numpy(rm2), **f64)
    np.testing.assert_allclose(backend.to_numpy(rv3), backend.to_numpy(rv2), **f64)
    # The 4-D entry point still refuses other shapes; ops.batch_norm takes any (N, C, *spatial).
    with pytest.raises(ValueError, match=r"4 dimensions \(N, C, H, W\), got shape \(3, 2, 5\)"):
        ops.batch_norm2d(backend.asarray(x), None, None, None, None, training=True)
    with pytest.raises(ValueError, match=r"bn: expected input of at least 2 dimensions \(N, C, \*spatial\), got shape \(3,\)"):
        ops.batch_norm(backend.asarray(np.ones(3)), None, None, None, None, training=True, where="bn")


def test_batch_norm_channels_last_and_strided_inputs_give_the_contiguous_numbers(backend):
    """A channels-last view (a NumPy conv's output), a strided slice, and a ``dy`` of another layout than ``x``."""
    rng = np.random.default_rng(3)
    x = rng.normal(1.0, 2.0, (3, 4, 5, 6))
    dy = rng.standard_normal(x.shape)
    weight, bias = rng.normal(1.0, 0.3, 4), rng.normal(0.0, 0.3, 4)
    xp = backend.xp

    def run(x_b, dy_b, training):
        y, cache, rm, rv = ops.batch_norm(x_b, backend.asarray(weight), backend.asarray(bias), backend.asarray(np.zeros(4)),
                                          backend.asarray(np.ones(4)), training=training)
        return [backend.to_numpy(a) for a in (y, *ops.batch_norm_backward(dy_b, cache), rm, rv)]

    channels_last = xp.permute_dims(backend.asarray(np.ascontiguousarray(np.moveaxis(x, 1, -1))), (0, 3, 1, 2))  # (N, C, H, W) view
    wide = backend.asarray(np.repeat(x, 2, axis=3))  # (N, C, H, 2W)
    strided = wide[:, :, :, ::2]  # (N, C, H, W), every other column
    for training in (True, False):
        expected = run(backend.asarray(x), backend.asarray(dy), training)
        for name, x_b in (("channels-last", channels_last), ("strided", strided)):
            got = run(x_b, backend.asarray(dy), training)
            for a, b, what in zip(got, expected, ("y", "dx", "dweight", "dbias", "running_mean", "running_var")):
                np.testing.assert_allclose(a, b, **tol("float64"), err_msg=f"{name} {what} training={training}")


# (layer, input shape, momentum, affine, track_running_stats): every option on each layer; momentum
# only matters where statistics are tracked (None: their cumulative average).
BN_TORCH_CASES = [
    ("BatchNorm1d", (6, 3), 0.2, True, True),
    ("BatchNorm1d", (6, 3), None, False, True),
    ("BatchNorm1d", (6, 3), 0.2, True, False),
    ("BatchNorm1d", (4, 3, 5), 0.2, True, True),
    ("BatchNorm1d", (4, 3, 5), None, True, True),
    ("BatchNorm1d", (4, 3, 5), 0.2, False, False),
    ("BatchNorm2d", (3, 3, 2, 2), None, True, True),
    ("BatchNorm2d", (3, 3, 2, 2), 0.2, False, True),
    ("BatchNorm2d", (3, 3, 2, 2), 0.2, True, False),
]


@pytest.mark.parametrize(("name", "shape", "momentum", "affine", "tracking"), BN_TORCH_CASES,
                         ids=[f"{n}-{len(s)}d-m{m}-affine{a}-tracked{t}" for n, s, m, a, t in BN_TORCH_CASES])
def test_batch_norm_layers_match_torch_with_every_option(backend, torch, name, shape, momentum, affine, tracking):
    """Outputs, input and parameter gradients, running statistics and the batch counter over training steps, then evaluation."""
    rng = np.random.default_rng(12)
    options = {"eps": 1e-3, "momentum": momentum, "affine": affine, "track_running_stats": tracking}
    ours = getattr(nn, name)(3, **options).to(backend.xp, "float64")
    theirs = getattr(torch.nn, name)(3, **options).double()
    if affine:
        for key in ("weight", "bias"):
            value = rng.normal(1.0 if key == "weight" else 0.0, 0.3, 3)
            ours.params[key] = backend.asarray(value)
            getattr(theirs, key).data = torch.from_numpy(value.copy())
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
    f64 = tol("float64")

    def step(scale):
        x_np, dy_np = rng.normal(2.0, scale, shape), rng.standard_normal(shape)
        x_t = torch.from_numpy(x_np.copy()).requires_grad_(True)
        y_t = theirs(x_t)
        y_t.backward(torch.from_numpy(dy_np))
        y = ours.forward(backend.asarray(x_np))
        dx = ours.backward(backend.asarray(dy_np))
        np.testing.assert_allclose(backend.to_numpy(y), y_t.detach().numpy(), **f64)
        np.testing.assert_allclose(backend.to_numpy(dx), x_t.grad.numpy(), **f64)
        assert set(ours.grads) == ({"weight", "bias"} if affine else set())
        for key in ours.grads:
            np.testing.assert_allclose(backend.to_numpy(ours.grads[key]), getattr(theirs, key).grad.numpy(), **f64, err_msg=key)
            getattr(theirs, key).grad = None
        for key, value in theirs.named_buffers():
            np.testing.assert_allclose(backend.to_numpy(ours.buffers[key]), value.numpy(), **f64, err_msg=key)

    for scale in (3.0, 1.0, 0.5):  # the running statistics accumulate over steps
        step(scale)
    ours.eval()
    theirs.eval()
    step(2.0)


@pytest.mark.parametrize(("affine", "tracking"), BN_OPTIONS, ids=BN_OPTION_IDS)
@pytest.mark.parametrize("name", ["BatchNorm1d", "BatchNorm2d"])
def test_batch_norm_state_dict_keys_shapes_and_repr_are_torchs(torch, name, affine, tracking):
    """No weight/bias without affine, no buffers (not even the counter) without tracking; the state loads into torch."""
    ours = getattr(nn, name)(4, momentum=None, affine=affine, track_running_stats=tracking)
    theirs = getattr(torch.nn, name)(4, momentum=None, affine=affine, track_running_stats=tracking)
    expected = theirs.state_dict()
    state = ours.state_dict()
    assert list(state) == list(expected)
    for key, value in state.items():
        assert tuple(value.shape) == tuple(expected[key].shape), key
        assert B.dtype_name(value) == str(expected[key].dtype).replace("torch.", ""), key
    theirs.load_state_dict({key: torch.from_numpy(np.array(value)) for key, value in state.items()})
    assert set(ours.params) == ({"weight", "bias"} if affine else set())
    assert repr(ours) == f"{name}(4, eps=1e-05, momentum=None, affine={affine}, track_running_stats={tracking})"


def test_batch_norm_one_value_per_channel_raises_like_torch(torch):
    """PyTorch's check and wording: training (or no running statistics) needs more than one value per channel."""
    for shape in [(1, 3), (1, 3, 1)]:
        with pytest.raises(ValueError, match=r"Expected more than 1 value per channel when training"):
            torch.nn.BatchNorm1d(3)(torch.zeros(shape))
        layer = nn.BatchNorm1d(3)
        message = r"^BatchNorm1d\(3, .*\): expected more than 1 value per channel when training, got input shape " + re.escape(str(shape))
        with pytest.raises(ValueError, match=message):
            layer.forward(np.zeros(shape, dtype=np.float32))
        assert int(layer.buffers["num_batches_tracked"]) == 0  # a refused batch is not counted
        # Evaluation with running statistics normalises one value fine; without them it cannot.
        assert tuple(layer.eval().forward(np.zeros(shape, dtype=np.float32)).shape) == shape
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            nn.BatchNorm1d(3, track_running_stats=False).eval().forward(np.zeros(shape, dtype=np.float32))
    # One sample with L > 1 values per channel is a batch of L.
    assert tuple(nn.BatchNorm1d(3).forward(np.ones((1, 3, 2), dtype=np.float32)).shape) == (1, 3, 2)


@pytest.mark.parametrize(("name", "shape"), [("BatchNorm1d", (0, 3)), ("BatchNorm1d", (0, 3, 4)), ("BatchNorm2d", (0, 3, 2, 2))])
def test_batch_norm_empty_batch_like_torch(backend, torch, name, shape):
    """An empty batch: empty output and input gradient, zero parameter gradients, statistics unchanged, counted."""
    ours = getattr(nn, name)(3).to(backend.xp, "float64")
    theirs = getattr(torch.nn, name)(3).double()
    x_t = torch.zeros(shape, dtype=torch.float64, requires_grad=True)
    theirs(x_t).sum().backward()
    y = ours.forward(backend.asarray(np.zeros(shape)))
    dx = ours.backward(backend.asarray(np.zeros(shape)))
    assert tuple(y.shape) == tuple(dx.shape) == shape
    for key in ("weight", "bias"):
        np.testing.assert_array_equal(backend.to_numpy(ours.grads[key]), getattr(theirs, key).grad.numpy())
    for key, value in theirs.named_buffers():
        np.testing.assert_array_equal(backend.to_numpy(ours.buffers[key]), value.numpy(), err_msg=key)
    assert int(backend.to_numpy(ours.buffers["num_batches_tracked"])) == 1


def test_batch_norm_layers_refuse_the_other_layers_shapes():
    with pytest.raises(ValueError, match=r"^BatchNorm1d\(3, .*\): expected input of 2 or 3 dimensions \(N, C\) or \(N, C, L\), got shape \(2, 3, 4, 5\)$"):
        nn.BatchNorm1d(3).forward(np.ones((2, 3, 4, 5), dtype=np.float32))
    with pytest.raises(ValueError, match=r"^BatchNorm2d\(3, .*\): expected input of 4 dimensions \(N, C, H, W\), got shape \(2, 3, 4\)$"):
        nn.BatchNorm2d(3).forward(np.ones((2, 3, 4), dtype=np.float32))
    with pytest.raises(ValueError, match=r"^BatchNorm1d: num_features must be positive, got 0$"):
        nn.BatchNorm1d(0)


def test_batch_norm_numpy_kernel_on_two_threads_gives_the_reference_numbers(monkeypatch):
    """The NumPy kernel's per-thread and per-block partial sums, forced onto two threads, against the reference (float64)."""
    from portable_cnn import config_context
    from portable_cnn.kernels.numpy import norm as numpy_norm

    monkeypatch.setattr(numpy_norm, "_BYTES_PER_THREAD", 1 << 12)  # two threads for these 48 KB
    monkeypatch.setattr(numpy_norm, "_BLOCK_BYTES", 1 << 13)  # blocks of 2 samples: 4 blocks a thread
    rng = np.random.default_rng(13)
    x = np.ascontiguousarray(rng.normal(3.0, 2.0, (16, 6, 7, 9)).transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)  # channels-last
    dy, weight, bias = rng.standard_normal(x.shape), rng.normal(1.0, 0.3, 6), rng.normal(0.0, 0.3, 6)

    def run():
        y, cache, mean, var = ops.batch_norm(x, weight, bias, np.zeros(6), np.ones(6), training=True)
        return [y, *ops.batch_norm_backward(dy, cache), mean, var]

    with config_context(num_threads=2):
        fast = run()
        with config_context(fast_paths=False):
            reference = run()
    for got, expected in zip(fast, reference):
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-13)
