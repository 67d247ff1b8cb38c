"""BatchNorm2d and Dropout: ops and layers, on every backend.

BatchNorm is checked against float64 central differences (training mode,
where the gradient runs through the batch statistics, and evaluation mode)
and against ``torch.nn.BatchNorm2d``: outputs, gradients and the running
statistics over several training steps, then evaluation. Dropout is random,
so it is checked by its mask: the kept values are scaled by ``1 / (1 - p)``,
the gradient is the same mask, ``p = 0`` and evaluation are the identity, the
drop rate is ``p`` on a large array, and one seed gives one mask.
"""

from __future__ import annotations

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
