"""Activations, linear, flatten, softmax, log-softmax and the fused softmax cross-entropy.

Gradients against float64 central differences on every backend, parity with
NumPy in float64 and float32, the PyTorch oracle, read-only inputs, and
logits of magnitude 1e4 (docs/derivation.md sections 6, 8, 9, 10).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from conftest import make_backend, tol
from gradcheck import assert_grad_close, numerical_grad, projected_loss
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from portable_cnn import backend as B
from portable_cnn import config_context, nn, ops

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


# ---------------------------------------------------------------- section 6: cross-entropy with PyTorch's options

# Logits by case: unbatched (K,), a batch (N, K), and K-dimensional (N, K, d1), (N, K, d1, d2).
CE_SHAPES = {"unbatched": (5,), "batch": (6, 4), "1d": (3, 4, 5), "2d": (2, 3, 2, 3)}
REDUCTIONS = ["mean", "sum", "none"]


def _ce_inputs(shape, kind, ignore_index, seed, dtype="float64"):
    """Logits, a target and a class weight: class labels (about a third equal to ``ignore_index``, the first
    always counted) or unnormalised probabilities (PyTorch does not ask them to sum to 1)."""
    rng = np.random.default_rng(seed)
    axis = 0 if len(shape) == 1 else 1
    K = shape[axis]
    logits = (3 * rng.standard_normal(shape)).astype(dtype)
    weight = rng.uniform(0.2, 2.0, K).astype(dtype)
    if kind == "probabilities":
        return logits, rng.uniform(0.0, 1.0, shape).astype(dtype), weight
    label_shape = shape[:axis] + shape[axis + 1:]
    labels = np.where(rng.uniform(size=label_shape) < 0.3, ignore_index, rng.integers(0, K, label_shape))
    labels = np.asarray(labels, dtype=np.int64)
    labels.flat[0] = K - 1  # never 1 (K >= 3) nor -100: no case reduces to a mean over nothing
    return logits, labels, weight


def _ce_cotangent(loss_shape, reduction, seed):
    """``dloss``: a float for a 0-d loss, an array of the loss's shape for ``"none"``."""
    cotangent = np.random.default_rng(seed).standard_normal(loss_shape)
    return cotangent if reduction == "none" else float(cotangent)


def _torch_cross_entropy(torch, logits, target, dloss, weight=None, **options):
    """PyTorch's loss and dlogits (autograd) for the same float64 inputs."""
    zt = torch.tensor(logits, requires_grad=True)
    wt = None if weight is None else torch.tensor(weight)
    lt = torch.nn.functional.cross_entropy(zt, torch.tensor(target), weight=wt, **options)
    lt.backward(torch.tensor(dloss, dtype=lt.dtype))
    return lt.detach().numpy(), zt.grad.numpy()


def _ce_option_grid(kind):
    """(weighted, ignore_index, label_smoothing) combinations; ignore_index must be negative with probabilities."""
    ignores = (-100, 1) if kind == "labels" else (-100,)
    return list(itertools.product((False, True), ignores, (0.0, 0.3)))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", ["labels", "probabilities"])
@pytest.mark.parametrize("case", list(CE_SHAPES))
def test_cross_entropy_options_match_torch(torch, case, kind, reduction):
    """Section 6: loss and dlogits equal F.cross_entropy and autograd for every combination of weight,
    ignore_index (out of range with hits, and a class) and label_smoothing, for class labels and probabilities."""
    for seed, (weighted, ignore_index, smoothing) in enumerate(_ce_option_grid(kind)):
        logits, target, weight = _ce_inputs(CE_SHAPES[case], kind, ignore_index, seed)
        options = {"weight": weight if weighted else None, "ignore_index": ignore_index, "reduction": reduction,
                   "label_smoothing": smoothing}
        loss, probs = ops.softmax_cross_entropy(logits, target, **options)
        dloss = _ce_cotangent(loss.shape, reduction, seed)
        dz = ops.softmax_cross_entropy_backward(probs, target, dloss, **options)
        expected_loss, expected_dz = _torch_cross_entropy(torch, logits, target, dloss, **options)
        message = f"seed {seed}: {options}"
        assert loss.shape == expected_loss.shape, message
        np.testing.assert_allclose(loss, expected_loss, err_msg=message, **tol("float64"))
        np.testing.assert_allclose(dz, expected_dz, err_msg=message, **tol("float64"))


@settings(max_examples=5, **FIXTURE_SETTINGS)
@given(
    case=st.sampled_from(list(CE_SHAPES)), kind=st.sampled_from(["labels", "probabilities"]),
    reduction=st.sampled_from(REDUCTIONS), weighted=st.booleans(), smoothing=st.sampled_from([0.0, 0.25]), seed=seeds,
)
def test_cross_entropy_options_gradients_match_central_differences(backend, case, kind, reduction, weighted, smoothing, seed):
    """Section 6: dL/dz = (p * sum_k c - c) * dloss / divisor against float64 differences, every option, every backend."""
    logits, target, weight = _ce_inputs(CE_SHAPES[case], kind, -100, seed)
    T = backend.asarray(target)
    options = {"weight": backend.asarray(weight) if weighted else None, "reduction": reduction, "label_smoothing": smoothing}
    loss, probs = ops.softmax_cross_entropy(backend.asarray(logits), T, **options)
    cotangent = _ce_cotangent(tuple(loss.shape), reduction, seed)
    dloss = backend.asarray(cotangent) if reduction == "none" else cotangent
    dz = backend.to_numpy(ops.softmax_cross_entropy_backward(probs, T, dloss, **options))
    projected = projected_loss(backend.to_numpy, np.asarray(cotangent))
    numeric = numerical_grad(lambda t: projected(ops.softmax_cross_entropy(backend.asarray(t), T, **options)[0]), logits)
    assert_grad_close(dz, numeric, "dlogits")


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_options_parity_across_backends(backend, dtype):
    """Section 6: every backend gives NumPy's loss and dlogits, in the logits' dtype, with the options set."""
    cases = [
        ("batch", "labels", {"weight": True, "ignore_index": -100, "reduction": "mean", "label_smoothing": 0.2}),
        ("batch", "labels", {"ignore_index": 1, "reduction": "none"}),
        ("2d", "labels", {"weight": True, "reduction": "sum", "label_smoothing": 0.1}),
        ("unbatched", "labels", {"reduction": "none", "label_smoothing": 0.3}),
        ("1d", "probabilities", {"weight": True, "reduction": "mean", "label_smoothing": 0.2}),
        ("unbatched", "probabilities", {"reduction": "sum"}),
    ]
    numpy = make_backend("numpy")
    for seed, (case, kind, options) in enumerate(cases):
        logits, target, weight = _ce_inputs(CE_SHAPES[case], kind, options.get("ignore_index", -100), seed, dtype)
        results = []
        for b in (numpy, backend):
            opts = {**options, "weight": b.asarray(weight) if options.get("weight") else None}
            T = b.asarray(target)
            loss, probs = ops.softmax_cross_entropy(b.asarray(logits), T, **opts)
            dloss = b.asarray(np.ones(tuple(loss.shape), dtype=dtype)) if options["reduction"] == "none" else 0.5
            dz = ops.softmax_cross_entropy_backward(probs, T, dloss, **opts)
            results.append({"loss": np.array(b.to_numpy(loss)), "dz": np.array(b.to_numpy(dz))})
        for key in ("loss", "dz"):
            assert results[1][key].dtype == np.dtype(dtype), (case, key)
            np.testing.assert_allclose(results[1][key], results[0][key], err_msg=f"{case} {options} {key}", **tol(dtype))


def test_label_smoothing_is_a_probability_target():
    """Section 6: class labels smoothed by eps are the probability target onehot(y) smoothed by eps (no weight),
    and probability targets that are one-hot rows give the class labels' loss and gradient."""
    logits, labels, _ = _ce_inputs(CE_SHAPES["1d"], "labels", -100, seed=3)
    labels = np.where(labels < 0, 0, labels)  # every label counted: both means divide by the positions
    onehot = np.moveaxis(np.eye(4)[labels], -1, 1)  # (N, d1, K) -> (N, K, d1)
    for smoothing in (0.0, 0.4):
        for reduction in REDUCTIONS:
            options = {"reduction": reduction, "label_smoothing": smoothing}
            loss_labels, probs = ops.softmax_cross_entropy(logits, labels, **options)
            loss_soft, _ = ops.softmax_cross_entropy(logits, onehot, **options)
            np.testing.assert_allclose(loss_labels, loss_soft, **tol("float64"))
            dloss = _ce_cotangent(loss_labels.shape, reduction, seed=4)
            np.testing.assert_allclose(ops.softmax_cross_entropy_backward(probs, labels, dloss, **options),
                                       ops.softmax_cross_entropy_backward(probs, onehot, dloss, **options),
                                       **tol("float64"))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_over_nothing_matches_torch(torch, reduction):
    """Section 6: every label ignored, and an empty batch (labels and probabilities): the mean is NaN, the sum 0,
    "none" zeros or empty, and the gradient zero, as PyTorch gives (with smoothing and weight too)."""
    cases = [
        (np.zeros((3, 4)), np.full(3, -100)),
        (np.zeros((0, 4)), np.zeros(0, dtype=np.int64)),
        (np.zeros((0, 4, 2)), np.zeros((0, 4, 2))),
    ]
    for logits, target in cases:
        for options in ({}, {"weight": np.arange(1.0, 5.0), "label_smoothing": 0.2}):
            loss, probs = ops.softmax_cross_entropy(logits, target, reduction=reduction, **options)
            dloss = _ce_cotangent(loss.shape, reduction, seed=5)
            dz = ops.softmax_cross_entropy_backward(probs, target, dloss, reduction=reduction, **options)
            expected_loss, expected_dz = _torch_cross_entropy(torch, logits, target, dloss, reduction=reduction, **options)
            assert loss.shape == expected_loss.shape and dz.shape == logits.shape
            np.testing.assert_array_equal(loss, expected_loss)  # NaN where PyTorch gives NaN
            np.testing.assert_array_equal(dz, expected_dz)


def test_cross_entropy_counts_an_ignore_index_inside_the_classes_and_validates_the_rest():
    """ignore_index may be a class (its labels are then ignored); with validation a label is in [0, K) or
    ignore_index, without it a label outside counts as ignored (the gradient of what the forward computed)."""
    logits = np.random.default_rng(6).standard_normal((4, 3))
    loss, _ = ops.softmax_cross_entropy(logits, np.array([0, 2, 2, 1]), ignore_index=2)
    kept, _ = ops.softmax_cross_entropy(logits[[0, 3]], np.array([0, 1]))
    np.testing.assert_allclose(loss, kept, **tol("float64"))
    with pytest.raises(ValueError, match=r"^softmax_cross_entropy: expected labels in \[0, 2\], got labels in \[0, 5\]$"):
        ops.softmax_cross_entropy(logits, np.array([0, -100, 5, 1]))
    with pytest.raises(ValueError, match=r"^softmax_cross_entropy: expected labels in \[0, 2\], got labels in \[-100, 1\]$"):
        ops.softmax_cross_entropy(logits, np.array([0, -100, -7, 1]), ignore_index=-7)
    unvalidated, probs = ops.softmax_cross_entropy(logits, np.array([0, 7, -3, 1]), validate=False)
    np.testing.assert_allclose(unvalidated, kept, **tol("float64"))
    dz = ops.softmax_cross_entropy_backward(probs, np.array([0, 7, -3, 1]))
    np.testing.assert_array_equal(dz[1:3], 0.0)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda z, y: ops.softmax_cross_entropy(z, y, reduction="average"), ValueError,
         r"expected reduction 'mean', 'sum' or 'none', got 'average'"),
        (lambda z, y: ops.softmax_cross_entropy(z, y, label_smoothing=1.5), ValueError,
         r"expected label_smoothing in \[0, 1\], got 1.5"),
        (lambda z, y: ops.softmax_cross_entropy(z, y, ignore_index=1.0), TypeError, r"expected an integer ignore_index, got 1.0"),
        (lambda z, y: ops.softmax_cross_entropy(z, y, weight=np.ones(4)), ValueError,
         r"expected weight of shape \(3,\) \(one per class\), got \(4,\)"),
        (lambda z, y: ops.softmax_cross_entropy(z, y, weight=np.ones(3, dtype=np.float32)), TypeError,
         r"weight dtype float32 does not match logits dtype float64"),
        (lambda z, y: ops.softmax_cross_entropy(z, np.ones((2, 3), dtype=np.float32)), TypeError,
         r"target dtype float32 does not match logits dtype float64"),
        (lambda z, y: ops.softmax_cross_entropy(z, np.ones((2, 3), dtype=np.int64)), TypeError,
         r"expected probability targets \(target of the logits' shape \(2, 3\)\) of a real floating dtype, got int64"),
        (lambda z, y: ops.softmax_cross_entropy(z, np.ones((2, 3)), ignore_index=0), ValueError,
         r"ignore_index applies to class labels only; expected a negative one with probability targets, got 0"),
        (lambda z, y: ops.softmax_cross_entropy(np.zeros((2, 3, 4)), np.zeros((2, 3), dtype=np.int64)), ValueError,
         r"expected labels of shape \(2, 4\) \(the logits' \(2, 3, 4\) without the class axis\), got \(2, 3\)"),
        (lambda z, y: ops.softmax_cross_entropy(np.zeros(3), np.zeros(1, dtype=np.int64)), ValueError,
         r"expected labels of 0 dimensions \(\), got shape \(1,\)"),
        (lambda z, y: ops.softmax_cross_entropy(np.asarray(1.0), np.asarray(0)), ValueError,
         r"expected logits of shape \(K,\), \(N, K\) or \(N, K, d1, \.\.\.\), got shape \(\)"),
        (lambda z, y: ops.softmax_cross_entropy(np.zeros((2, 0)), y), ValueError,
         r"expected at least one class, got logits of shape \(2, 0\) \(class axis 1\)"),
        (lambda z, y: ops.softmax_cross_entropy_backward(z, y, np.ones(3), reduction="none"), ValueError,
         r"expected dloss of the loss's shape \(2,\) \(reduction='none'\), got \(3,\)"),
        (lambda z, y: ops.softmax_cross_entropy_backward(z, y, np.ones(2)), ValueError,
         r"expected dloss of the loss's shape \(\) \(reduction='mean'\), got \(2,\)"),
    ],
)
def test_cross_entropy_rejects_bad_arguments(call, error, message):
    """One error line naming the op, the expected and the actual, for each bad option or shape."""
    with pytest.raises(error, match=r"^softmax_cross_entropy: " + message + "$"):
        call(np.zeros((2, 3)), np.array([0, 2]))


def test_cross_entropy_layer_takes_the_options_and_keeps_weight_as_a_buffer(backend):
    """nn.CrossEntropyLoss is nn.SoftmaxCrossEntropy; its weight is a buffer (in its state_dict, moved by .to) and
    its forward and backward are the op's with its options; a model's state_dict does not hold the loss."""
    assert nn.CrossEntropyLoss is nn.SoftmaxCrossEntropy
    logits, labels, weight = _ce_inputs(CE_SHAPES["batch"], "labels", -100, seed=7)
    loss_fn = nn.CrossEntropyLoss(weight, reduction="none", label_smoothing=0.1).to(backend.xp)
    assert repr(loss_fn) == "SoftmaxCrossEntropy(weight=(4,), reduction='none', label_smoothing=0.1)"
    assert list(loss_fn.state_dict()) == ["weight"] and B.namespace(loss_fn.state_dict()["weight"]) is backend.xp
    Z, Y = backend.asarray(logits), backend.asarray(labels)
    dloss = backend.asarray(np.arange(6.0))
    loss, dz = loss_fn.forward(Z, Y), loss_fn.backward(dloss)
    options = {"weight": backend.asarray(weight), "reduction": "none", "label_smoothing": 0.1}
    expected, probs = ops.softmax_cross_entropy(Z, Y, **options)
    np.testing.assert_array_equal(backend.to_numpy(loss), backend.to_numpy(expected))
    expected_dz = ops.softmax_cross_entropy_backward(probs, Y, dloss, **options)
    np.testing.assert_array_equal(backend.to_numpy(dz), backend.to_numpy(expected_dz))
    model = nn.Sequential(nn.Linear(3, 4, rng=0))
    assert list(model.state_dict()) == ["0.weight", "0.bias"]
    with pytest.raises(ValueError, match=r"^SoftmaxCrossEntropy: expected reduction 'mean', 'sum' or 'none', got 'max'$"):
        nn.SoftmaxCrossEntropy(reduction="max")


def test_cross_entropy_on_strided_and_channels_last_logits_matches_torch(torch):
    """Section 6: logits given as a transposed view, and K-dimensional logits as an (N, K, H, W) view of
    channels-last memory (what the NumPy conv kernels return), give PyTorch's loss and gradient."""
    rng = np.random.default_rng(8)
    strided = (3 * rng.standard_normal((5, 6))).T  # (6, 5) view of (5, 6) memory
    nhwc = 3 * rng.standard_normal((2, 3, 4, 5))  # (N, H, W, K)
    channels_last = nhwc.transpose(0, 3, 1, 2)  # (N, K, H, W) view
    for logits, labels in ((strided, rng.integers(0, 5, 6)), (channels_last, rng.integers(0, 5, (2, 3, 4)))):
        options = {"weight": rng.uniform(0.5, 1.5, 5), "label_smoothing": 0.1}
        loss, probs = ops.softmax_cross_entropy(logits, labels, **options)
        dz = ops.softmax_cross_entropy_backward(probs, labels, 0.5, **options)
        expected_loss, expected_dz = _torch_cross_entropy(torch, np.ascontiguousarray(logits), labels, 0.5, **options)
        np.testing.assert_allclose(loss, expected_loss, **tol("float64"))
        np.testing.assert_allclose(dz, expected_dz, **tol("float64"))


# ---------------------------------------------------------------- 0-d and empty inputs (sections 6 and 8)

# name -> (our forward, our backward(dy, x, y), PyTorch's function of (tensor, axis)).
CORNER_OPS = {
    "relu": (lambda x: ops.relu(x), lambda dy, x, y: ops.relu_backward(dy, x), lambda torch, t: torch.relu(t)),
    "sigmoid": (lambda x: ops.sigmoid(x), lambda dy, x, y: ops.sigmoid_backward(dy, y), lambda torch, t: torch.sigmoid(t)),
    "tanh": (lambda x: ops.tanh(x), lambda dy, x, y: ops.tanh_backward(dy, y), lambda torch, t: torch.tanh(t)),
    "softmax": (lambda x: ops.softmax(x, axis=-1), lambda dy, x, y: ops.softmax_backward(dy, y, axis=-1),
                lambda torch, t: torch.nn.functional.softmax(t, dim=-1)),
    "log_softmax": (lambda x: ops.log_softmax(x, axis=0), lambda dy, x, y: ops.log_softmax_backward(dy, y, axis=0),
                    lambda torch, t: torch.nn.functional.log_softmax(t, dim=0)),
}
# 0-d, an empty batch, an empty last axis.
CORNER_SHAPES = [(), (0, 3), (3, 0)]


@pytest.mark.parametrize("shape", CORNER_SHAPES, ids=str)
@pytest.mark.parametrize("name", list(CORNER_OPS))
def test_zero_d_and_empty_inputs_match_torch(backend, torch, name, shape):
    """A 0-d input gives a 0-d array of the backend (never a NumPy scalar), softmax 1 and log_softmax 0 with a
    zero gradient; empty inputs, an empty softmax axis too, give empty arrays: PyTorch's values and gradients."""
    forward, backward, torch_forward = CORNER_OPS[name]
    rng = np.random.default_rng(9)
    x, dy = rng.standard_normal(shape), rng.standard_normal(shape)
    X = backend.asarray(x)
    y = forward(X)
    dx = backward(backend.asarray(dy), X, y)
    xt = torch.tensor(x, requires_grad=True)
    yt = torch_forward(torch, xt)
    yt.backward(torch.tensor(dy))
    for got, expected in ((y, yt.detach().numpy()), (dx, xt.grad.numpy())):
        assert B.namespace(got) is B.namespace(X)  # an array of the backend: B.namespace refuses a NumPy scalar
        assert tuple(got.shape) == shape
        np.testing.assert_allclose(backend.to_numpy(got), expected, **tol("float64"))


@pytest.mark.parametrize("shape", CORNER_SHAPES, ids=str)
def test_dropout_of_zero_d_and_empty_inputs(backend, shape):
    """Section 8's dropout on 0-d and empty inputs: arrays of the input's shape and backend, y = x * mask, dx = dy * mask."""
    rng = np.random.default_rng(10)
    x, dy, uniform = rng.standard_normal(shape), rng.standard_normal(shape), rng.uniform(size=shape)
    y, mask = ops.dropout(backend.asarray(x), 0.5, backend.asarray(uniform))
    dx = ops.dropout_backward(backend.asarray(dy), mask)
    expected_mask = (uniform >= 0.5) * 2.0
    for got, expected in ((y, x * expected_mask), (mask, expected_mask), (dx, dy * expected_mask)):
        assert B.namespace(got) is backend.xp and tuple(got.shape) == shape  # an array, not a NumPy scalar
        np.testing.assert_array_equal(backend.to_numpy(got), expected)


def test_softmax_axis_out_of_range_is_a_clear_error():
    """An axis outside [-ndim, ndim) names the op, the range and the shape; a 0-d input has the axes -1 and 0, as in PyTorch."""
    with pytest.raises(ValueError, match=r"^softmax: expected axis in \[-1, 0\] for input of shape \(\), got 1$"):
        ops.softmax(np.asarray(1.0), axis=1)
    with pytest.raises(ValueError, match=r"^log_softmax: expected axis in \[-2, 1\] for input of shape \(2, 3\), got -3$"):
        ops.log_softmax(np.zeros((2, 3)), axis=-3)
    with pytest.raises(ValueError, match=r"^softmax: expected output gradient of shape \(2, 3\), got \(3,\)$"):
        ops.softmax_backward(np.zeros(3), np.zeros((2, 3)))


@pytest.mark.parametrize("fast_paths", [True, False], ids=["fast", "reference"])
def test_empty_batch_through_every_layer_matches_torch(backend, torch, fast_paths):
    """N = 0 through conv2d, max and average pooling, ReLU, flatten and linear, forward and backward: empty outputs
    and input gradients of PyTorch's shapes and zero weight and bias gradients, on the kernels and the reference."""
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, rng=0), nn.ReLU(), nn.MaxPool2d(2), nn.AvgPool2d(2, padding=1),
                          nn.Flatten(), nn.Linear(27, 5, rng=0)).to(backend.xp, "float64")
    x = backend.asarray(np.zeros((0, 2, 8, 8)))
    with config_context(fast_paths=fast_paths):
        y = model.forward(x)
        dx = model.backward(backend.asarray(np.zeros((0, 5))))
    mirror = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                                 torch.nn.AvgPool2d(2, padding=1), torch.nn.Flatten(), torch.nn.Linear(27, 5)).double()
    xt = torch.zeros((0, 2, 8, 8), dtype=torch.float64, requires_grad=True)
    yt = mirror(xt)
    yt.backward(torch.zeros_like(yt))
    assert tuple(y.shape) == tuple(yt.shape) and tuple(dx.shape) == tuple(xt.grad.shape)
    for name, layer, key in model.named_parameters():
        grad = backend.to_numpy(layer.grads[key])
        assert grad.shape == tuple(layer.params[key].shape) and not grad.any(), name
