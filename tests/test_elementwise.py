"""Activations, linear, flatten, softmax, log-softmax and the fused softmax cross-entropy.

Gradients against float64 central differences on every backend, parity with
NumPy in float64 and float32, the PyTorch oracle, read-only inputs, and
logits of magnitude 1e4 (docs/derivation.md sections 6, 8, 9, 10).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_backend, tol
from gradcheck import assert_grad_close, numerical_grad, projected_loss
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from portable_cnn import ops

FIXTURE_SETTINGS = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
}
shapes = st.lists(st.integers(1, 4), min_size=1, max_size=4).map(tuple)
seeds = st.integers(0, 2**32 - 1)
DTYPES = ["float64", "float32"]

# name -> (forward, backward(dy, x, y), PyTorch function name). The backward
# takes what the forward cached: relu its input, sigmoid and tanh their output.
ACTIVATIONS = {
    "relu": (ops.relu, lambda dy, x, y: ops.relu_backward(dy, x), "relu"),
    "sigmoid": (ops.sigmoid, lambda dy, x, y: ops.sigmoid_backward(dy, y), "sigmoid"),
    "tanh": (ops.tanh, lambda dy, x, y: ops.tanh_backward(dy, y), "tanh"),
}


def _away_from_zero(x):
    """Keep entries at least 1e-2 from 0, where relu has its kink."""
    return np.where(x >= 0, x + 1e-2, x - 1e-2)


def _extremes(dtype):
    """Large, small and exactly-zero inputs, with random ones."""
    rng = np.random.default_rng(7)
    special = np.array([0.0, -0.0, 1e4, -1e4, 40.0, -40.0, 1e-8, -1e-8])
    return np.concatenate([special, 3 * rng.standard_normal(16)]).reshape(2, 3, 4).astype(dtype)


def _activation(backend, name, x, dy):
    forward, backward, _ = ACTIVATIONS[name]
    X, DY = backend.asarray(x), backend.asarray(dy)
    y = forward(X)
    dx = backward(DY, X, y)
    return {"y": np.array(backend.to_numpy(y)), "dx": np.array(backend.to_numpy(dx))}


# ---------------------------------------------------------------- section 8: activations


@pytest.mark.parametrize("name", list(ACTIVATIONS))
@settings(max_examples=8, **FIXTURE_SETTINGS)
@given(shape=shapes, seed=seeds)
def test_activation_gradients_match_central_differences(backend, name, shape, seed):
    """Section 8: relu' = [x > 0], sigmoid' = y(1 - y), tanh' = 1 - y^2, against float64 differences."""
    rng = np.random.default_rng(seed)
    x, dy = _away_from_zero(2 * rng.standard_normal(shape)), rng.standard_normal(shape)
    forward = ACTIVATIONS[name][0]
    got = _activation(backend, name, x, dy)
    loss = projected_loss(backend.to_numpy, dy)
    assert_grad_close(got["dx"], numerical_grad(lambda t: loss(forward(backend.asarray(t))), x), name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_activation_parity_across_backends(backend, name, dtype):
    """Section 8: every backend gives NumPy's y and dx, at 0 and at magnitudes up to 1e4 too."""
    x = _extremes(dtype)
    dy = np.random.default_rng(8).standard_normal(x.shape).astype(dtype)
    reference = _activation(make_backend("numpy"), name, x, dy)
    got = _activation(backend, name, x, dy)
    for key in reference:
        assert got[key].dtype == np.dtype(dtype)
        assert np.all(np.isfinite(got[key])), key
        np.testing.assert_allclose(got[key], reference[key], err_msg=key, **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_activation_matches_torch(torch, name, dtype):
    """Section 8: y and dx equal torch.relu/sigmoid/tanh and autograd (relu'(0) = 0, as PyTorch)."""
    x = _extremes(dtype)
    dy = np.random.default_rng(9).standard_normal(x.shape).astype(dtype)
    got = _activation(make_backend("numpy"), name, x, dy)
    xt = torch.tensor(x, requires_grad=True)
    yt = getattr(torch, ACTIVATIONS[name][2])(xt)
    yt.backward(torch.tensor(dy))
    np.testing.assert_allclose(got["y"], yt.detach().numpy(), **tol(dtype))
    np.testing.assert_allclose(got["dx"], xt.grad.numpy(), **tol(dtype))


def test_sigmoid_saturates_without_overflow():
    """Section 8: sigmoid(+-1e4) is exactly 1 and 0, its gradient 0 (warnings are errors here)."""
    x = np.array([-1e4, -800.0, 0.0, 800.0, 1e4])
    y = ops.sigmoid(x)
    np.testing.assert_array_equal(y, [0.0, 0.0, 0.5, 1.0, 1.0])
    np.testing.assert_array_equal(ops.sigmoid_backward(np.ones(5), y), [0.0, 0.0, 0.25, 0.0, 0.0])


# ---------------------------------------------------------------- section 9: linear


def _linear_arrays(N, n_in, n_out, seed, dtype="float64"):
    rng = np.random.default_rng(seed)
    x, w, b = rng.standard_normal((N, n_in)), rng.standard_normal((n_out, n_in)), rng.standard_normal(n_out)
    dy = rng.standard_normal((N, n_out))
    return tuple(np.asarray(t, dtype=dtype) for t in (x, w, b, dy))


def _linear(backend, x, w, b, dy):
    X, Wt, Bt, DY = (backend.asarray(t) for t in (x, w, b, dy))
    y = ops.linear(X, Wt, Bt)
    dx, dw, db = ops.linear_backward(DY, X, Wt)
    _, _, no_db = ops.linear_backward(DY, X, Wt, has_bias=False)
    assert no_db is None
    return {k: np.array(backend.to_numpy(t)) for k, t in {"y": y, "dx": dx, "dw": dw, "db": db}.items()}


linear_sizes = st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 4), seeds)


@settings(max_examples=8, **FIXTURE_SETTINGS)
@given(sizes=linear_sizes)
def test_linear_gradients_match_central_differences(backend, sizes):
    """Section 9: dx = dy W, dW = dy^T x, db = sum_n dy, against float64 differences."""
    x, w, b, dy = _linear_arrays(*sizes)
    got = _linear(backend, x, w, b, dy)

    def loss_of(x_, w_, b_):
        y = ops.linear(backend.asarray(x_), backend.asarray(w_), backend.asarray(b_))
        return projected_loss(backend.to_numpy, dy)(y)

    assert_grad_close(got["dx"], numerical_grad(lambda t: loss_of(t, w, b), x), "dx")
    assert_grad_close(got["dw"], numerical_grad(lambda t: loss_of(x, t, b), w), "dw")
    assert_grad_close(got["db"], numerical_grad(lambda t: loss_of(x, w, t), b), "db")


@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=5, **FIXTURE_SETTINGS)
@given(sizes=linear_sizes)
def test_linear_parity_across_backends(backend, dtype, sizes):
    """Section 9: every backend gives NumPy's y, dx, dW and db in float64 and float32."""
    arrays = _linear_arrays(*sizes, dtype=dtype)
    reference, got = _linear(make_backend("numpy"), *arrays), _linear(backend, *arrays)
    for key in reference:
        assert got[key].dtype == np.dtype(dtype)
        np.testing.assert_allclose(got[key], reference[key], err_msg=key, **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=st.tuples(st.integers(1, 5), st.integers(1, 9), st.integers(1, 9), seeds))
def test_linear_matches_torch(torch, dtype, sizes):
    """Section 9: y, dx, dW, db equal torch.nn.functional.linear and autograd (weight (out, in))."""
    x, w, b, dy = _linear_arrays(*sizes, dtype=dtype)
    got = _linear(make_backend("numpy"), x, w, b, dy)
    xt, wt, bt = (torch.tensor(t, requires_grad=True) for t in (x, w, b))
    y = torch.nn.functional.linear(xt, wt, bt)
    y.backward(torch.tensor(dy))
    for key, t in {"y": y, "dx": xt.grad, "dw": wt.grad, "db": bt.grad}.items():
        np.testing.assert_allclose(got[key], t.detach().numpy(), err_msg=key, **tol(dtype))


def test_linear_without_bias():
    """Section 9: no bias means y = x W^T exactly."""
    x, w, _, _ = _linear_arrays(3, 4, 2, seed=10)
    np.testing.assert_allclose(ops.linear(x, w), x @ w.T, **tol("float64"))


@settings(max_examples=10, deadline=None)
@given(sizes=linear_sizes)
def test_linear_is_conv2d_on_1x1_images(sizes):
    """Section 9: linear is conv2d with P = Q = R = S = 1; forward and all gradients agree."""
    x, w, b, dy = _linear_arrays(*sizes)
    as_image = (slice(None), slice(None), None, None)  # (N, F) -> (N, F, 1, 1)
    y = ops.conv2d(x[as_image], w[as_image], b)[:, :, 0, 0]
    dx, dw, db = ops.conv2d_backward(dy[as_image], x[as_image], w[as_image])
    got = _linear(make_backend("numpy"), x, w, b, dy)
    for key, value in {"y": y, "dx": dx[:, :, 0, 0], "dw": dw[:, :, 0, 0], "db": db}.items():
        np.testing.assert_allclose(got[key], value, err_msg=key, **tol("float64"))


# ---------------------------------------------------------------- section 10: flatten


@settings(max_examples=6, **FIXTURE_SETTINGS)
@given(shape=st.lists(st.integers(1, 3), min_size=2, max_size=4).map(tuple), seed=seeds)
def test_flatten_round_trip_and_gradient(backend, shape, seed):
    """Section 10: flatten is the row-major reshape (N, ...) -> (N, prod ...); its backward reshapes back."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    dy = rng.standard_normal((shape[0], int(np.prod(shape[1:]))))
    X = backend.asarray(x)
    y = backend.to_numpy(ops.flatten(X))
    np.testing.assert_array_equal(y, x.reshape(shape[0], -1))
    dx = backend.to_numpy(ops.flatten_backward(backend.asarray(dy), X.shape))
    np.testing.assert_array_equal(dx, dy.reshape(shape))
    loss = projected_loss(backend.to_numpy, dy)
    assert_grad_close(dx, numerical_grad(lambda t: loss(ops.flatten(backend.asarray(t))), x), "dx")
    np.testing.assert_array_equal(backend.to_numpy(X), x)


def test_flatten_matches_torch(torch):
    """Section 10: the same order as torch.flatten(x, 1)."""
    x = np.arange(2 * 3 * 4 * 5, dtype=np.float64).reshape(2, 3, 4, 5)
    np.testing.assert_array_equal(ops.flatten(x), torch.flatten(torch.tensor(x), 1).numpy())


# ---------------------------------------------------------------- section 6: softmax and log-softmax

SOFTMAXES = {
    "softmax": (ops.softmax, ops.softmax_backward, "softmax"),
    "log_softmax": (ops.log_softmax, ops.log_softmax_backward, "log_softmax"),
}


def _softmax(backend, name, x, dy, axis):
    forward, backward, _ = SOFTMAXES[name]
    y = forward(backend.asarray(x), axis=axis)
    dx = backward(backend.asarray(dy), y, axis=axis)
    return {"y": np.array(backend.to_numpy(y)), "dx": np.array(backend.to_numpy(dx))}


def _large_logits(dtype, seed=11):
    """Logits of magnitude up to 1e4, where a naive exp overflows."""
    rng = np.random.default_rng(seed)
    return (1e4 * rng.uniform(-1, 1, (4, 5))).astype(dtype)


@pytest.mark.parametrize("axis", [-1, 0])
@pytest.mark.parametrize("name", list(SOFTMAXES))
@settings(max_examples=6, **FIXTURE_SETTINGS)
@given(shape=st.tuples(st.integers(1, 4), st.integers(1, 5)), seed=seeds)
def test_softmax_gradients_match_central_differences(backend, name, axis, shape, seed):
    """Section 6: softmax' = y (dy - sum(dy y)), log_softmax' = dy - exp(y) sum(dy), against differences."""
    rng = np.random.default_rng(seed)
    x, dy = 3 * rng.standard_normal(shape), rng.standard_normal(shape)
    forward = SOFTMAXES[name][0]
    got = _softmax(backend, name, x, dy, axis)
    loss = projected_loss(backend.to_numpy, dy)
    assert_grad_close(got["dx"], numerical_grad(lambda t: loss(forward(backend.asarray(t), axis=axis)), x), name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(SOFTMAXES))
def test_softmax_parity_across_backends(backend, name, dtype):
    """Section 6: every backend gives NumPy's y and dx, for logits of magnitude 1e4 too."""
    for x in (_large_logits(dtype), np.random.default_rng(12).standard_normal((3, 6)).astype(dtype)):
        dy = np.random.default_rng(13).standard_normal(x.shape).astype(dtype)
        reference, got = _softmax(make_backend("numpy"), name, x, dy, 1), _softmax(backend, name, x, dy, 1)
        for key in reference:
            assert np.all(np.isfinite(got[key])), key
            np.testing.assert_allclose(got[key], reference[key], err_msg=key, **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(SOFTMAXES))
def test_softmax_matches_torch(torch, name, dtype):
    """Section 6: y and dx equal torch.nn.functional.softmax/log_softmax and autograd, at 1e4 too."""
    for axis, x in ((1, _large_logits(dtype)), (0, np.random.default_rng(14).standard_normal((3, 6)).astype(dtype))):
        dy = np.random.default_rng(15).standard_normal(x.shape).astype(dtype)
        got = _softmax(make_backend("numpy"), name, x, dy, axis)
        xt = torch.tensor(x, requires_grad=True)
        yt = getattr(torch.nn.functional, SOFTMAXES[name][2])(xt, dim=axis)
        yt.backward(torch.tensor(dy))
        np.testing.assert_allclose(got["y"], yt.detach().numpy(), **tol(dtype))
        np.testing.assert_allclose(got["dx"], xt.grad.numpy(), **tol(dtype))


# ---------------------------------------------------------------- section 6: softmax cross-entropy


def _stable_reference(logits, labels):
    """Float64 loss and gradient from the formulas, with NumPy's own logsumexp."""
    z = np.asarray(logits, dtype=np.float64)
    N, K = z.shape
    lse = np.logaddexp.reduce(z, axis=1)  # (N,)
    loss = np.mean(lse - z[np.arange(N), labels])
    probs = np.exp(z - lse[:, None])
    onehot = np.eye(K)[labels]
    return loss, (probs - onehot) / N


def _cross_entropy(backend, logits, labels, dloss=1.0):
    Z, Y = backend.asarray(logits), backend.asarray(labels)
    loss, probs = ops.softmax_cross_entropy(Z, Y)
    dz = ops.softmax_cross_entropy_backward(probs, Y, dloss)
    return float(backend.to_numpy(loss)), np.array(backend.to_numpy(dz))


@settings(max_examples=8, **FIXTURE_SETTINGS)
@given(N=st.integers(1, 4), K=st.integers(1, 5), seed=seeds)
def test_cross_entropy_gradient_matches_central_differences(backend, N, K, seed):
    """Section 6: d(mean CE)/dz = (softmax(z) - onehot(y)) / N, against float64 differences."""
    rng = np.random.default_rng(seed)
    logits, labels = 3 * rng.standard_normal((N, K)), rng.integers(0, K, N)
    _, dz = _cross_entropy(backend, logits, labels)

    def loss(t):
        return float(backend.to_numpy(ops.softmax_cross_entropy(backend.asarray(t), backend.asarray(labels))[0]))

    assert_grad_close(dz, numerical_grad(loss, logits), "dlogits")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("magnitude", [1.0, 1e4])
def test_cross_entropy_equals_formula_on_every_backend(backend, dtype, magnitude):
    """Section 6: loss = mean(logsumexp(z) - z_y), gradient (softmax - onehot)/N, finite at |z| = 1e4."""
    rng = np.random.default_rng(16)
    logits = (magnitude * rng.uniform(-1, 1, (6, 5))).astype(dtype)
    labels = rng.integers(0, 5, 6)
    loss, dz = _cross_entropy(backend, logits, labels)
    expected_loss, expected_dz = _stable_reference(logits, labels)
    assert np.isfinite(loss) and np.all(np.isfinite(dz))
    assert dz.dtype == np.dtype(dtype)
    np.testing.assert_allclose(loss, expected_loss, **tol(dtype))
    np.testing.assert_allclose(dz, expected_dz, **tol(dtype))
    # The loss gradient times an upstream factor (the chain rule's dloss).
    _, dz_scaled = _cross_entropy(backend, logits, labels, dloss=2.5)
    np.testing.assert_allclose(dz_scaled, 2.5 * expected_dz, **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_exact_values_at_1e4(backend, dtype):
    """Section 6: rows with a dominant logit of 1e4: the loss and gradient come out exactly."""
    logits = np.array([[1e4, 0.0, -1e4], [0.0, 1e4, 0.0]], dtype=dtype)
    labels = np.array([1, 1])
    loss, dz = _cross_entropy(backend, logits, labels)
    # Row 0: logsumexp = 1e4, z_y = 0 -> 1e4. Row 1: logsumexp = 1e4 = z_y -> 0. Mean 5000.
    assert loss == 5000.0
    np.testing.assert_array_equal(dz, np.array([[0.5, -0.5, 0.0], [0.0, 0.0, 0.0]], dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("magnitude", [1.0, 1e4])
def test_cross_entropy_matches_torch(torch, dtype, magnitude):
    """Section 6: loss and dlogits equal torch.nn.functional.cross_entropy (mean) and autograd."""
    rng = np.random.default_rng(17)
    logits = (magnitude * rng.uniform(-1, 1, (7, 4))).astype(dtype)
    labels = rng.integers(0, 4, 7)
    loss, dz = _cross_entropy(make_backend("numpy"), logits, labels, dloss=0.5)
    zt = torch.tensor(logits, requires_grad=True)
    lt = torch.nn.functional.cross_entropy(zt, torch.tensor(labels))
    (0.5 * lt).backward()
    np.testing.assert_allclose(loss, lt.item(), **tol(dtype))
    np.testing.assert_allclose(dz, zt.grad.numpy(), **tol(dtype))


# ---------------------------------------------------------------- read-only inputs


def test_elementwise_ops_do_not_modify_inputs(backend):
    """Forward + backward of every op here leave their inputs as they were (numpy-readonly forbids writes)."""
    rng = np.random.default_rng(18)
    x, dy = rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    w, b, dyl = rng.standard_normal((2, 4)), rng.standard_normal(2), rng.standard_normal((3, 2))
    labels = np.array([0, 3, 1])
    originals = {"x": x, "dy": dy, "w": w, "b": b, "dyl": dyl, "labels": labels}
    A = {k: backend.asarray(v) for k, v in originals.items()}
    for name in ACTIVATIONS:
        forward, backward, _ = ACTIVATIONS[name]
        backward(A["dy"], A["x"], forward(A["x"]))
    ops.linear_backward(A["dyl"], A["x"], A["w"])
    ops.linear(A["x"], A["w"], A["b"])
    ops.flatten_backward(A["dy"], ops.flatten(A["x"]).shape)
    for forward, backward, _ in SOFTMAXES.values():
        backward(A["dy"], forward(A["x"]))
    _, probs = ops.softmax_cross_entropy(A["x"], A["labels"])
    probs_before = np.array(backend.to_numpy(probs))
    ops.softmax_cross_entropy_backward(probs, A["labels"], 3.0)
    np.testing.assert_array_equal(backend.to_numpy(probs), probs_before)
    for key, value in originals.items():
        np.testing.assert_array_equal(backend.to_numpy(A[key]), value, err_msg=key)
