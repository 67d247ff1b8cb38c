"""Layers and Sequential: the public contract of issue 2, gradients and the whole-model oracle.

The model used throughout touches every layer: conv (uneven stride, padding
and dilation, non-square kernel) -> relu -> overlapping max pool -> padded
average pool -> flatten -> linear -> sigmoid -> linear -> tanh -> linear, with
the softmax cross-entropy on top. Its hand-written gradients are checked
against float64 central differences (taken once, on NumPy) on every backend,
and against PyTorch autograd on an equivalent ``torch.nn.Sequential`` into
which our ``state_dict`` is loaded unchanged.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import tol
from gradcheck import assert_grad_close, numerical_grad

from portable_cnn import backend as B
from portable_cnn import nn, ops

X_SHAPE = (2, 2, 7, 8)  # (N, C, H, W)
NUM_CLASSES = 3
LABELS = np.array([2, 0])


def make_model(seed=0) -> nn.Sequential:
    """The test model for inputs of ``X_SHAPE``; shapes in the comments."""
    nn.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 3, (3, 2), stride=(1, 2), padding=(1, 0), dilation=(2, 1)),  # (2, 3, 5, 4)
        nn.ReLU(),
        nn.MaxPool2d(2, stride=1),  # (2, 3, 4, 3)
        nn.AvgPool2d((2, 1), padding=(1, 0)),  # (2, 3, 3, 3)
        nn.Flatten(),  # (2, 27)
        nn.Linear(27, 5),
        nn.Sigmoid(),
        nn.Linear(5, 4),
        nn.Tanh(),
        nn.Linear(4, NUM_CLASSES),  # (2, 3)
    )


def torch_model(torch):
    """The same architecture in ``torch.nn``, layer for layer (so the state_dict keys match), torch's initial weights."""
    from portable_cnn.bench import torch_mirror

    return torch_mirror.torch_model(torch, make_model())


def random_state(seed=1) -> dict:
    """Float64 parameters for ``make_model`` with non-zero biases and weights large enough to matter."""
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(tuple(value.shape)) for name, value in make_model().state_dict().items()}


def model_input(seed=2) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(X_SHAPE)


def loss_and_grads(model, x, labels):
    """Forward, loss, backward; return ``(loss, dx, {name: grad})`` as NumPy."""
    loss_fn = nn.SoftmaxCrossEntropy()
    loss = loss_fn.forward(model.forward(x), labels)
    dx = model.backward(loss_fn.backward())
    grads = {name: B.to_numpy(layer.grads[key]) for name, layer, key in model.named_parameters()}
    return float(B.to_numpy(loss)), B.to_numpy(dx), grads


# --------------------------------------------------------------------------- gradients


def central_differences(model, x) -> dict:
    """Central differences of the loss w.r.t. the input ``x`` and every parameter of ``model`` (float64)."""
    loss_fn = nn.SoftmaxCrossEntropy()

    def loss_at(x_value):
        return float(loss_fn.forward(model.forward(x_value), LABELS))

    grads = {"input": numerical_grad(loss_at, x)}
    for name, layer, key in model.named_parameters():
        original = layer.params[key]

        def loss_of_param(value, layer=layer, key=key):
            layer.params[key] = value
            return loss_at(x)

        grads[name] = numerical_grad(loss_of_param, original)
        layer.params[key] = original
    return grads


@pytest.fixture(scope="module")
def numeric_gradients():
    """Central differences of the loss w.r.t. the input and every parameter (NumPy, float64)."""
    state, x = random_state(), model_input()
    model = make_model().to("numpy", "float64")
    model.load_state_dict(state)
    return central_differences(model, x)


def test_model_gradients_match_central_differences(backend, numeric_gradients):
    model = make_model().to(backend.xp, "float64")
    model.load_state_dict(random_state())
    _, dx, grads = loss_and_grads(model, backend.asarray(model_input()), backend.asarray(LABELS))
    assert set(grads) == set(numeric_gradients) - {"input"}
    assert_grad_close(dx, numeric_gradients["input"], "input")
    for name, grad in grads.items():
        assert grad.shape == numeric_gradients[name].shape, name
        assert_grad_close(grad, numeric_gradients[name], name)


def test_grads_are_overwritten_not_accumulated(backend):
    model = make_model().to(backend.xp, "float64")
    x, labels = backend.asarray(model_input()), backend.asarray(LABELS)
    _, dx1, first = loss_and_grads(model, x, labels)
    _, dx2, second = loss_and_grads(model, x, labels)
    np.testing.assert_array_equal(dx1, dx2)
    for name in first:
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)


def test_eval_mode_backward_equals_train_mode(backend):
    """Evaluation drops the cached im2col matrix; the backward recomputes it and agrees."""
    x, labels = backend.asarray(model_input()), backend.asarray(LABELS)
    train = make_model().to(backend.xp, "float64")
    _, dx_train, g_train = loss_and_grads(train, x, labels)
    evaluation = make_model().to(backend.xp, "float64").eval()
    assert evaluation[0].training is False
    _, dx_eval, g_eval = loss_and_grads(evaluation, x, labels)
    np.testing.assert_allclose(dx_eval, dx_train, **tol("float64"))
    for name in g_train:
        np.testing.assert_allclose(g_eval[name], g_train[name], **tol("float64"), err_msg=name)


def test_conv_backward_drops_its_columns_and_a_second_backward_agrees(backend):
    """Training keeps the im2col matrix for one backward only; a second backward unfolds x again and agrees."""
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1).to(backend.xp, "float64")  # stride 2: im2col on NumPy too
    x = backend.asarray(model_input())
    y = conv.forward(x)
    dy = backend.asarray(np.random.default_rng(3).standard_normal(tuple(y.shape)))
    kept = conv._cache[1]
    dx1 = B.to_numpy(conv.backward(dy))
    dw1 = B.to_numpy(conv.grads["weight"])
    assert conv._cache[0] is x and conv._cache[1] is None
    dx2 = B.to_numpy(conv.backward(dy))
    np.testing.assert_allclose(dx2, dx1, **tol("float64"))
    np.testing.assert_allclose(B.to_numpy(conv.grads["weight"]), dw1, **tol("float64"))
    assert kept is not None  # the first backward had the forward's columns to drop


def test_train_and_eval_switch_every_layer():
    model = make_model()
    assert model.eval() is model
    assert not model.training and not any(layer.training for layer in model)
    assert model.train() is model
    assert model.training and all(layer.training for layer in model)


# --------------------------------------------------------------------------- layers = ops


def _layer_cases(rng):
    """(layer, op call given the layer and x, input) for every layer, with non-default options."""
    conv = nn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2), rng=rng)
    conv.params["bias"] = rng.standard_normal(3).astype(np.float32)
    linear = nn.Linear(6, 4, rng=rng)
    linear.params["bias"] = rng.standard_normal(4).astype(np.float32)
    image = rng.standard_normal((2, 2, 6, 7)).astype(np.float32)
    flat = rng.standard_normal((3, 6)).astype(np.float32)
    return [
        (conv, lambda x: ops.conv2d(x, conv.params["weight"], conv.params["bias"], (2, 1), (1, 2), (1, 2)), image),
        (nn.Conv2d(2, 3, 3, bias=False, rng=rng), None, image),
        (nn.MaxPool2d((3, 2), stride=(2, 1), padding=(1, 1)), lambda x: ops.max_pool2d(x, (3, 2), (2, 1), (1, 1))[0], image),
        (nn.AvgPool2d((3, 2), stride=(2, 1), padding=(1, 1)), lambda x: ops.avg_pool2d(x, (3, 2), (2, 1), (1, 1)), image),
        (nn.MaxPool2d(3), lambda x: ops.max_pool2d(x, 3, 3, 0)[0], image),
        (linear, lambda x: ops.linear(x, linear.params["weight"], linear.params["bias"]), flat),
        (nn.ReLU(), ops.relu, image),
        (nn.Sigmoid(), ops.sigmoid, image),
        (nn.Tanh(), ops.tanh, image),
        (nn.Flatten(), ops.flatten, image),
    ]


@pytest.mark.parametrize("index", range(10))
def test_layer_forward_is_its_op(backend, index):
    layer, op, x_np = _layer_cases(np.random.default_rng(3))[index]
    layer.to(backend.xp)
    x = backend.asarray(x_np)
    y = layer.forward(x)
    if op is None:  # bias=False: the op without a bias
        assert "bias" not in layer.params
        op = lambda x: ops.conv2d(x, layer.params["weight"])  # noqa: E731
    np.testing.assert_array_equal(B.to_numpy(y), B.to_numpy(op(x)))
    dx = layer.backward(backend.asarray(np.ones(tuple(y.shape), dtype=np.float32)))
    assert tuple(dx.shape) == tuple(x.shape)
    for key, value in layer.params.items():
        assert tuple(layer.grads[key].shape) == tuple(value.shape), key


# --------------------------------------------------------------------------- the public contract


def test_parameter_layout_is_torch_layout():
    conv = nn.Conv2d(3, 8, (5, 2), stride=2, padding=1, dilation=2)
    assert tuple(conv.params["weight"].shape) == (8, 3, 5, 2)
    assert tuple(conv.params["bias"].shape) == (8,)
    linear = nn.Linear(7, 4)
    assert tuple(linear.params["weight"].shape) == (4, 7)
    assert tuple(linear.params["bias"].shape) == (4,)
    assert set(nn.Conv2d(1, 1, 1, bias=False).params) == {"weight"}
    assert set(nn.Linear(1, 1, bias=False).params) == {"weight"}


def test_parameter_layout_matches_torch(torch):
    ours, theirs = make_model().state_dict(), torch_model(torch).state_dict()
    assert list(ours) == list(theirs)
    for name in ours:
        assert tuple(ours[name].shape) == tuple(theirs[name].shape), name


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_output_same_library_device_dtype_as_input(backend, dtype):
    model = make_model().to(backend.xp, dtype)
    for name, layer, key in model.named_parameters():
        value = layer.params[key]
        assert B.backend_name(value) == B.backend_name(backend.asarray(np.ones(1))), name
        assert B.dtype_name(value) == dtype, name
    x = backend.asarray(model_input(), dtype=dtype)
    loss_fn = nn.SoftmaxCrossEntropy()
    y = model.forward(x)
    loss = loss_fn.forward(y, backend.asarray(LABELS))
    dx = model.backward(loss_fn.backward())
    for out in [y, loss, dx] + [layer.grads[key] for _, layer, key in model.named_parameters()]:
        assert B.namespace(out) is backend.xp
        assert B.device(out) == B.device(x)
        assert out.dtype == x.dtype
    assert tuple(y.shape) == (2, NUM_CLASSES) and tuple(loss.shape) == ()
    assert tuple(dx.shape) == X_SHAPE


def test_to_moves_and_casts_parameters(backend):
    model = make_model()
    reference = {name: B.to_numpy(value).copy() for name, value in model.state_dict().items()}
    assert all(value.dtype == np.float32 for value in reference.values())  # initial weights are float32
    model.forward(np.ones(X_SHAPE, dtype=np.float32))
    model.backward(np.ones((2, NUM_CLASSES), dtype=np.float32))
    assert model.to(backend.xp, "float64") is model
    assert all(layer.grads == {} for layer in model)  # stale gradients of the old backend are dropped
    for name, value in model.state_dict().items():
        assert B.namespace(value) is backend.xp, name
        assert B.dtype_name(value) == "float64", name
        np.testing.assert_array_equal(B.to_numpy(value), reference[name], err_msg=name)
    # Back to NumPy by name, keeping the dtype when none is given.
    model.to("numpy")
    for name, value in model.state_dict().items():
        assert isinstance(value, np.ndarray) and value.dtype == np.float64, name
        np.testing.assert_array_equal(value, reference[name], err_msg=name)


def test_to_by_name(torch):
    model = make_model().to("torch", "float64")
    assert all(isinstance(value, torch.Tensor) and value.dtype == torch.float64 for value in model.state_dict().values())
    model.to("array_api_strict", "float32")
    assert all(B.backend_name(value) == "array_api_strict" for value in model.state_dict().values())
    assert all(B.dtype_name(value) == "float32" for value in model.state_dict().values())


def test_state_dict_keys_follow_torch_sequential():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 1, bias=False), nn.Flatten(), nn.Linear(8, 2))
    assert list(model.state_dict()) == ["0.weight", "0.bias", "2.weight", "4.weight", "4.bias"]
    assert [name for name, _, _ in model.named_parameters()] == list(model.state_dict())
    assert model.state_dict()["4.weight"] is model[4].params["weight"]


def test_sequential_rejects_non_layers():
    with pytest.raises(TypeError, match=r"^Sequential: layer 1 must be a portable_cnn.nn.Module, got function"):
        nn.Sequential(nn.ReLU(), lambda x: x)


def test_load_state_dict_round_trip(backend):
    """A state from one backend loads onto a model of another, taking that model's backend and dtype."""
    source = make_model(seed=5).to("numpy", "float32")
    target = make_model(seed=6).to(backend.xp, "float64")
    assert any(not np.array_equal(B.to_numpy(a), B.to_numpy(b)) for a, b in zip(source.state_dict().values(), target.state_dict().values()))
    target.load_state_dict(source.state_dict())
    for name, value in target.state_dict().items():
        assert B.namespace(value) is backend.xp and B.dtype_name(value) == "float64", name
        np.testing.assert_array_equal(B.to_numpy(value), source.state_dict()[name], err_msg=name)
    # And back: the target's state reloaded into a fresh NumPy model gives the same logits.
    again = make_model(seed=7).to("numpy", "float64")
    again.load_state_dict(target.state_dict())
    x = model_input()
    np.testing.assert_allclose(B.to_numpy(target.forward(backend.asarray(x))), again.forward(x), **tol("float64"))


def test_load_state_dict_copies_the_source():
    model = make_model().to("numpy", "float64")
    state = random_state()
    model.load_state_dict(state)
    state["0.weight"][...] = 0.0
    assert np.all(model[0].params["weight"] != 0.0)


def _snapshot(model):
    return {name: B.to_numpy(value).copy() for name, value in model.state_dict().items()}


def _assert_unchanged(model, before):
    after = _snapshot(model)
    assert list(after) == list(before)
    for name in before:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)


def test_load_state_dict_missing_key_changes_nothing():
    model = make_model()
    before = _snapshot(model)
    state = random_state()
    del state["7.bias"]
    with pytest.raises(KeyError, match=r"missing keys \['7.bias'\], unexpected keys \[\]"):
        model.load_state_dict(state)
    _assert_unchanged(model, before)


def test_load_state_dict_unexpected_key_changes_nothing():
    model = make_model()
    before = _snapshot(model)
    state = random_state()
    state["10.weight"] = np.ones((2, 2))
    with pytest.raises(KeyError, match=r"missing keys \[\], unexpected keys \['10.weight'\]"):
        model.load_state_dict(state)
    _assert_unchanged(model, before)


def test_load_state_dict_wrong_shape_changes_nothing():
    """The bad key comes last: every earlier key was valid, and still none was loaded."""
    model = make_model()
    before = _snapshot(model)
    state = random_state()
    state["9.bias"] = np.zeros(4)
    with pytest.raises(ValueError, match=r"9\.bias \(Linear\(in_features=4, out_features=3.*\)\) expected shape \(3,\), got \(4,\)"):
        model.load_state_dict(state)
    _assert_unchanged(model, before)


# --------------------------------------------------------------------------- seeding


def test_same_seed_same_initial_model_on_every_backend(backend):
    reference = _snapshot(make_model(seed=11))
    moved = make_model(seed=11).to(backend.xp)
    for name, value in moved.state_dict().items():
        np.testing.assert_array_equal(B.to_numpy(value), reference[name], err_msg=name)
    different = _snapshot(make_model(seed=12))
    assert not np.array_equal(different["0.weight"], reference["0.weight"])


def test_rng_argument_seeds_a_layer_and_leaves_the_default_alone():
    a = nn.Conv2d(2, 4, 3, rng=7).params["weight"]
    b = nn.Conv2d(2, 4, 3, rng=np.random.default_rng(7)).params["weight"]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, nn.Conv2d(2, 4, 3, rng=8).params["weight"])
    nn.manual_seed(3)
    first = nn.Linear(5, 5).params["weight"]
    nn.manual_seed(3)
    nn.Linear(5, 5, rng=1)  # draws from its own generator...
    np.testing.assert_array_equal(nn.Linear(5, 5).params["weight"], first)  # ...not from the default one


def test_initial_weights_are_he_normal_and_biases_zero():
    conv = nn.Conv2d(16, 64, 3, rng=0)
    w = conv.params["weight"]
    assert w.dtype == np.float32
    assert abs(float(np.std(w)) - np.sqrt(2.0 / (16 * 9))) < 0.1 * np.sqrt(2.0 / (16 * 9))
    assert abs(float(np.mean(w))) < 0.01
    np.testing.assert_array_equal(conv.params["bias"], np.zeros(64, dtype=np.float32))


# --------------------------------------------------------------------------- weights set by hand


@pytest.mark.parametrize(
    "layer, key, shape, x_shape, message",
    [
        (lambda: nn.Conv2d(2, 3, (3, 2)), "weight", (3, 2, 2, 3), (1, 2, 5, 5), r"expected params\['weight'\] of shape \(3, 2, 3, 2\), got \(3, 2, 2, 3\)"),
        (lambda: nn.Conv2d(2, 3, 3), "bias", (4,), (1, 2, 5, 5), r"expected params\['bias'\] of shape \(3,\), got \(4,\)"),
        (lambda: nn.Linear(4, 3), "weight", (4, 3), (2, 4), r"expected params\['weight'\] of shape \(3, 4\), got \(4, 3\)"),
        (lambda: nn.Linear(4, 3), "bias", (3, 1), (2, 4), r"expected params\['bias'\] of shape \(3,\), got \(3, 1\)"),
    ],
)
def test_wrong_shaped_parameter_is_named_at_forward(layer, key, shape, x_shape, message):
    layer = layer()
    layer.params[key] = np.zeros(shape, dtype=np.float32)
    with pytest.raises(ValueError, match=r"^" + type(layer).__name__ + r"\(.*: " + message):
        layer.forward(np.ones(x_shape, dtype=np.float32))


def test_setting_right_shaped_weights_loads_them():
    conv = nn.Conv2d(1, 1, 2)
    conv.params["weight"] = np.ones((1, 1, 2, 2), dtype=np.float32)
    conv.params["bias"] = np.full(1, 0.5, dtype=np.float32)
    y = conv.forward(np.arange(9, dtype=np.float32).reshape(1, 1, 3, 3))
    np.testing.assert_array_equal(y[0, 0], [[8.5, 12.5], [20.5, 24.5]])


# --------------------------------------------------------------------------- the whole-model oracle


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_whole_model_against_torch(backend, torch, dtype):
    """Our state_dict loads unchanged into torch.nn.Sequential; logits and every gradient agree."""
    model = make_model().to("numpy", "float64")
    model.load_state_dict(random_state())
    model.to(backend.xp, dtype)
    reference = torch_model(torch).to(getattr(torch, dtype))
    reference.load_state_dict({name: torch.from_numpy(B.to_numpy(value)) for name, value in model.state_dict().items()})

    x_np = model_input().astype(dtype)
    x_t = torch.from_numpy(x_np.copy()).requires_grad_(True)
    logits_t = reference(x_t)
    loss_t = torch.nn.functional.cross_entropy(logits_t, torch.from_numpy(LABELS))
    loss_t.backward()

    loss_fn = nn.SoftmaxCrossEntropy()
    logits = model.forward(backend.asarray(x_np))
    loss = loss_fn.forward(logits, backend.asarray(LABELS))
    dx = model.backward(loss_fn.backward())

    tolerance = tol(dtype)
    np.testing.assert_allclose(B.to_numpy(logits), logits_t.detach().numpy(), **tolerance)
    np.testing.assert_allclose(float(B.to_numpy(loss)), loss_t.item(), **tolerance)
    np.testing.assert_allclose(B.to_numpy(dx), x_t.grad.numpy(), **tolerance)
    torch_grads = {name: p.grad.numpy() for name, p in reference.named_parameters()}
    assert set(torch_grads) == {name for name, _, _ in model.named_parameters()}
    for name, layer, key in model.named_parameters():
        np.testing.assert_allclose(B.to_numpy(layer.grads[key]), torch_grads[name], **tolerance, err_msg=name)


def test_torch_trained_weights_load_into_ours(torch):
    """The other direction: a torch state_dict (via NumPy) loads into our model and gives torch's logits."""
    torch.manual_seed(0)
    reference = torch_model(torch).double()
    model = make_model().to("numpy", "float64")
    model.load_state_dict({name: value.detach().numpy() for name, value in reference.state_dict().items()})
    x = model_input()
    np.testing.assert_allclose(model.forward(x), reference(torch.from_numpy(x)).detach().numpy(), **tol("float64"))


# ----------------------------------------------------------------------- modules nest


def _flat_and_nested(seed=5):
    """The same network twice: flat, and with its middle in a nested Sequential (same weights)."""
    def layers():
        rng = np.random.default_rng(seed)
        return [nn.Conv2d(2, 3, 3, padding=1, rng=rng), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(48, 4, rng=rng)]

    flat = nn.Sequential(*layers())
    a, b, c, d, e = layers()
    nested = nn.Sequential(a, nn.Sequential(b, nn.Sequential(c, d)), e)
    return flat.to("numpy", "float64"), nested.to("numpy", "float64")


def test_nested_sequential_names_state_like_torch():
    _, nested = _flat_and_nested()
    assert [name for name, _ in nested.named_modules()] == ["", "0", "1", "1.0", "1.1", "1.1.0", "1.1.1", "2"]
    assert list(nested.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    deeper = nn.Sequential(nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 3))))
    assert list(deeper.state_dict()) == ["0.0.weight", "0.0.bias", "0.1.0.weight", "0.1.0.bias"]
    assert [type(m).__name__ for m in deeper.children()] == ["Sequential"]


def test_nested_sequential_trains_like_the_flat_one():
    """Forward, backward (dx too) and every gradient of the nested model equal the flat model's."""
    flat, nested = _flat_and_nested()
    x = np.random.default_rng(0).standard_normal((3, 2, 8, 8))
    dy = np.random.default_rng(1).standard_normal((3, 4))
    np.testing.assert_array_equal(nested.forward(x), flat.forward(x))
    np.testing.assert_array_equal(nested.backward(dy), flat.backward(dy))
    pairs = list(zip(nested.named_parameters(), flat.named_parameters()))
    assert [(a[0], b[0]) for a, b in pairs] == [("0.weight", "0.weight"), ("0.bias", "0.bias"), ("2.weight", "4.weight"),
                                                ("2.bias", "4.bias")]
    for (name, layer, key), (_, flat_layer, flat_key) in pairs:
        np.testing.assert_array_equal(layer.grads[key], flat_layer.grads[flat_key], err_msg=name)
    assert nested.backward(dy, need_input_grad=False) is None


def test_nested_modes_moves_and_state_reach_every_level():
    _, nested = _flat_and_nested()
    nested.eval()
    assert all(not m.training for _, m in nested.named_modules())
    nested.train()
    assert all(m.training for _, m in nested.named_modules())
    nested.to("numpy", "float32")
    assert {str(v.dtype) for v in nested.state_dict().values()} == {"float32"}
    source, target = _flat_and_nested(seed=9)[1], _flat_and_nested(seed=2)[1]
    target.load_state_dict(source.state_dict())
    for key, value in source.state_dict().items():
        np.testing.assert_array_equal(target.state_dict()[key], value)
    with pytest.raises(KeyError, match=r"missing keys \['2.bias'\]"):
        target.load_state_dict({k: v for k, v in source.state_dict().items() if k != "2.bias"})


def test_every_module_backward_accepts_need_input_grad():
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 4))
    for layer in [nn.ReLU(), nn.Sigmoid(), nn.Tanh(), nn.Flatten(), nn.MaxPool2d(2), nn.AvgPool2d(2),
                  nn.BatchNorm2d(3).to("numpy", "float64"), nn.Dropout(0.5, rng=0),
                  nn.Conv2d(3, 2, 1).to("numpy", "float64"), nn.Sequential(nn.ReLU())]:
        y = layer.forward(x)
        assert layer.backward(np.ones_like(y), need_input_grad=False) is None, layer
        assert layer.backward(np.ones_like(y)).shape == x.shape, layer


def test_layer_hook_sees_every_call_in_order_and_is_removed():
    _, nested = _flat_and_nested()
    calls = []

    def hook(layer, direction, call):
        calls.append((type(layer).__name__, direction))
        return call()

    x = np.zeros((1, 2, 8, 8))
    with nn.layer_hook(hook):
        nested.backward(nested.forward(x))
    forward = [c for c, d in calls if d == "forward"]
    assert forward == ["Conv2d", "Sequential", "ReLU", "Sequential", "MaxPool2d", "Flatten", "Linear"]
    assert [c for c, d in calls if d == "backward"] == ["Linear", "Sequential", "Sequential", "Flatten", "MaxPool2d", "ReLU", "Conv2d"]
    calls.clear()
    nested.forward(x)
    assert calls == []


def _fused_relu_model() -> nn.Sequential:
    """MaxPool2d -> ReLU twice and Conv2d -> ReLU (fused), beside Conv2d -> MaxPool2d and AvgPool2d -> ReLU (not)."""
    nn.manual_seed(4)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),  # (2, 4, 7, 8)
        nn.MaxPool2d(2, stride=1), nn.ReLU(),  # (2, 4, 6, 7): fused
        nn.AvgPool2d(2, stride=1), nn.ReLU(),  # (2, 4, 5, 6)
        nn.Conv2d(4, 3, 2),  # (2, 3, 4, 5)
        nn.ReLU(), nn.MaxPool2d((2, 3), padding=1, ceil_mode=True), nn.ReLU(),  # (2, 3, 3, 2): both pairs fused
        nn.Flatten(),
        nn.Linear(18, NUM_CLASSES),
    )


def test_sequential_fuses_a_relu_into_the_convolution_or_max_pooling_before_it(backend):
    """Sections 5c and 7.4: Conv2d then ReLU run as conv2d(relu=True), MaxPool2d then ReLU as max_pool2d_relu,
    with the same loss, input and parameter gradients.

    Under layer_hook every layer runs on its own (the reference run here);
    the fused run must agree with it bit for bit.
    """
    model = _fused_relu_model().to(backend.xp, "float64")
    x = backend.asarray(np.round(model_input(5) * 2))  # rounded: ties and zeros in the pooled windows
    labels = backend.asarray(LABELS)
    with nn.layer_hook(lambda layer, direction, call: call()):
        loss, dx, grads = loss_and_grads(model, x, labels)
        assert model._fused_relus == frozenset()
    fused_loss, fused_dx, fused_grads = loss_and_grads(model, x, labels)
    assert model._fused_relus == {2, 6, 8}
    assert fused_loss == loss
    np.testing.assert_array_equal(fused_dx, dx)
    for name in grads:
        np.testing.assert_array_equal(fused_grads[name], grads[name], err_msg=name)


@pytest.mark.parametrize("before", ["pool", "conv"])
def test_a_fused_relu_keeps_what_its_own_backward_needs(backend, before):
    """After a fused forward the ReLU holds its output, so calling its backward directly still masks right."""
    nn.manual_seed(1)
    layer = nn.MaxPool2d(2) if before == "pool" else nn.Conv2d(3, 3, 3, stride=2, padding=1)
    act = nn.ReLU()
    model = nn.Sequential(layer, act).to(backend.xp, "float64")
    x = backend.asarray(np.random.default_rng(0).standard_normal((2, 3, 4, 4)))
    y = model.forward(x)
    assert model._fused_relus == {1}
    assert (B.to_numpy(y) == 0).any() and (B.to_numpy(y) > 0).any()
    dy = backend.asarray(np.ones((2, 3, 2, 2)))
    np.testing.assert_array_equal(B.to_numpy(act.backward(dy)), (B.to_numpy(y) > 0).astype(float))
    # Through the model, the layer before applies the ReLU: the same input gradient as the two backwards in turn,
    # and again on a second backward of the same forward.
    first = B.to_numpy(model.backward(dy))
    np.testing.assert_array_equal(B.to_numpy(model.backward(dy)), first)
    np.testing.assert_array_equal(first, B.to_numpy(layer.backward(act.backward(dy))))


def test_layer_hook_sees_a_pooled_relu_as_its_own_layer():
    model = nn.Sequential(nn.MaxPool2d(2), nn.ReLU())
    calls = []

    def hook(layer, direction, call):
        calls.append((type(layer).__name__, direction))
        return call()

    with nn.layer_hook(hook):
        model.backward(model.forward(np.zeros((1, 1, 4, 4))))
    assert calls == [("MaxPool2d", "forward"), ("ReLU", "forward"), ("ReLU", "backward"), ("MaxPool2d", "backward")]


def test_error_names_are_formatted_once():
    layer = nn.Linear(3, 2)
    assert layer.where == repr(layer) == "Linear(in_features=3, out_features=2, bias=True)"
    assert layer.where is layer.where
    with pytest.raises(ValueError, match=r"^Linear\(in_features=3, out_features=2, bias=True\): expected input with 3"):
        layer.forward(np.zeros((1, 4), dtype=np.float32))


# ----------------------------------------------------------------------- residual blocks, Identity, Linear on more axes

RES_X_SHAPE = (2, 2, 5, 5)  # (N, C, H, W)


def make_residual_model(seed=0) -> nn.Sequential:
    """ResNet's two basic blocks, the input feeding the first: a projection shortcut (stride 2, 1x1 conv + BN), then the identity."""
    rng = np.random.default_rng(seed)
    return nn.Sequential(
        nn.Sequential(
            nn.Residual(
                nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1, bias=False, rng=rng), nn.BatchNorm2d(3), nn.ReLU(),
                              nn.Conv2d(3, 3, 3, padding=1, bias=False, rng=rng), nn.BatchNorm2d(3)),
                shortcut=nn.Sequential(nn.Conv2d(2, 3, 1, stride=2, bias=False, rng=rng), nn.BatchNorm2d(3)),
            ),  # (2, 3, 3, 3)
            nn.ReLU(),
        ),
        nn.Sequential(nn.Residual(nn.Sequential(nn.Conv2d(3, 3, 1, rng=rng), nn.BatchNorm2d(3))), nn.ReLU()),
        nn.Flatten(),  # (2, 27)
        nn.Linear(27, NUM_CLASSES, rng=rng),
    )


def residual_state(seed=1) -> dict:
    """Float64 parameters (BatchNorm's away from 1 and 0) and the initial buffers of ``make_residual_model``."""
    rng = np.random.default_rng(seed)
    state = {}
    for name, value in make_residual_model().state_dict().items():
        shape = tuple(value.shape)
        if name.endswith(("running_mean", "running_var", "num_batches_tracked")):
            state[name] = np.array(value)
        elif len(shape) == 1:  # biases, and BatchNorm's scale and shift
            state[name] = rng.normal(1.0 if name.endswith("weight") else 0.0, 0.3, shape)
        else:
            state[name] = rng.standard_normal(shape) * 0.5
    return state


@pytest.fixture(scope="module")
def residual_numeric_gradients():
    """Central differences of the loss w.r.t. the input and every parameter of the residual model (NumPy, float64)."""
    model = make_residual_model().to("numpy", "float64")
    model.load_state_dict(residual_state())
    x = np.random.default_rng(2).standard_normal(RES_X_SHAPE)
    return x, central_differences(model, x)


def test_residual_gradients_match_central_differences(backend, residual_numeric_gradients):
    """The fan-out's sum: dL/dx and every parameter's gradient (both branches, BatchNorm in training) on every backend."""
    x, numeric = residual_numeric_gradients
    model = make_residual_model().to(backend.xp, "float64")
    model.load_state_dict(residual_state())
    _, dx, grads = loss_and_grads(model, backend.asarray(x), backend.asarray(LABELS))
    assert set(grads) == set(numeric) - {"input"}
    assert any(".shortcut." in name for name in grads) and any(".body." in name for name in grads)
    assert_grad_close(dx, numeric["input"], "input")
    for name, grad in grads.items():
        assert_grad_close(grad, numeric[name], name)


def test_residual_model_matches_torch_through_the_mirror(backend, torch):
    """Our residual model and the mirror's with our weights: logits, loss, dL/dx, every gradient and BatchNorm's buffers over two steps."""
    from portable_cnn.bench import torch_mirror

    model = make_residual_model().to("numpy", "float64")
    model.load_state_dict(residual_state())
    reference = torch_mirror.torch_model(torch, model, model.state_dict(), dtype="float64")
    model.to(backend.xp)
    assert list(reference.state_dict()) == list(model.state_dict())
    f64 = tol("float64")
    for seed in (3, 4):
        x_np = np.random.default_rng(seed).standard_normal(RES_X_SHAPE)
        x_t = torch.from_numpy(x_np.copy()).requires_grad_(True)
        logits_t = reference(x_t)
        loss_t = torch.nn.functional.cross_entropy(logits_t, torch.from_numpy(LABELS))
        reference.zero_grad()
        loss_t.backward()
        loss, dx, grads = loss_and_grads(model, backend.asarray(x_np), backend.asarray(LABELS))
        np.testing.assert_allclose(loss, loss_t.item(), **f64)
        np.testing.assert_allclose(dx, x_t.grad.numpy(), **f64)
        for name, p in reference.named_parameters():
            np.testing.assert_allclose(grads[name], p.grad.numpy(), **f64, err_msg=name)
        for name, value in reference.named_buffers():
            np.testing.assert_allclose(B.to_numpy(model.state_dict()[name]), value.numpy(), **f64, err_msg=name)


def test_residual_without_input_gradient_still_trains_both_branches(backend):
    """need_input_grad=False reaches the first Conv2d of each branch, which still computes its weight gradient; None comes back."""
    model = make_residual_model().to(backend.xp, "float64")
    block = model[0][0]
    x, dy = backend.asarray(np.random.default_rng(5).standard_normal(RES_X_SHAPE)), backend.asarray(np.ones((2, 3, 3, 3)))
    told = []
    for branch in (block.body[0], block.shortcut[0]):
        original = branch.backward

        def spy(dy, need_input_grad=True, original=original):
            told.append(need_input_grad)
            return original(dy, need_input_grad=need_input_grad)

        branch.backward = spy
    block.forward(x)
    dx = block.backward(dy)
    with_input = {name: B.to_numpy(layer.grads[key]).copy() for name, layer, key in block.named_parameters()}
    block.forward(x)
    assert block.backward(dy, need_input_grad=False) is None
    assert told == [True, True, False, False]
    assert tuple(dx.shape) == RES_X_SHAPE
    for name, layer, key in block.named_parameters():
        np.testing.assert_array_equal(B.to_numpy(layer.grads[key]), with_input[name], err_msg=name)


def test_residual_state_dict_names_and_identity_shortcut():
    model = make_residual_model()
    names = list(model.state_dict())
    assert names[:3] == ["0.0.body.0.weight", "0.0.body.1.weight", "0.0.body.1.bias"]
    assert "0.0.shortcut.0.weight" in names and "0.0.shortcut.1.num_batches_tracked" in names
    assert not any(name.startswith("1.0.shortcut") for name in names)  # an Identity has no state
    block = model[1][0]
    assert isinstance(block.shortcut, nn.Identity)
    assert [name for name, _ in block.named_modules()] == ["", "body", "body.0", "body.1", "shortcut"]
    assert repr(block).startswith("Residual(\n  (body): Sequential(\n    (0): Conv2d(3, 3") and repr(block).endswith("(shortcut): Identity()\n)")


def test_residual_rejects_branches_of_different_shapes_and_non_modules():
    block = nn.Residual(nn.Conv2d(2, 3, 1, rng=0))  # the identity gives 2 channels, the body 3
    with pytest.raises(ValueError, match=r"^Residual: body output shape \(1, 3, 4, 4\) does not match shortcut output shape "
                                         r"\(1, 2, 4, 4\) \(input shape \(1, 2, 4, 4\)\)$"):
        block.forward(np.ones((1, 2, 4, 4), dtype=np.float32))
    with pytest.raises(TypeError, match=r"^Residual: body must be a portable_cnn.nn.Module, got function$"):
        nn.Residual(lambda x: x)
    with pytest.raises(TypeError, match=r"^Residual: shortcut must be a portable_cnn.nn.Module or None, got int$"):
        nn.Residual(nn.ReLU(), 3)


def test_layer_hook_sees_both_branches_of_a_residual():
    block = nn.Residual(nn.Sequential(nn.Linear(3, 3, rng=0), nn.ReLU()))
    calls = []

    def hook(layer, direction, call):
        calls.append((type(layer).__name__, direction))
        return call()

    with nn.layer_hook(hook):
        block.backward(block.forward(np.ones((2, 3), dtype=np.float32)))
    assert [c for c, d in calls if d == "forward"] == ["Sequential", "Linear", "ReLU", "Identity"]
    assert [c for c, d in calls if d == "backward"] == ["Sequential", "ReLU", "Linear", "Identity"]


def test_identity_passes_values_and_gradients_through(backend, torch):
    from portable_cnn.bench import torch_mirror

    layer = nn.Identity()
    x, dy = backend.asarray(np.arange(6.0).reshape(2, 3)), backend.asarray(np.ones((2, 3)))
    assert layer.forward(x) is x and layer.backward(dy) is dy
    assert layer.backward(dy, need_input_grad=False) is None
    assert layer.state_dict() == {} and repr(layer) == "Identity()"
    assert isinstance(torch_mirror.torch_layer(torch, layer), torch.nn.Identity)


LINEAR_INPUTS = {
    "(N, *, in)": lambda rng: rng.standard_normal((2, 3, 5)),
    "(N, *, *, in)": lambda rng: rng.standard_normal((2, 1, 4, 5)),
    "unbatched (in,)": lambda rng: rng.standard_normal(5),
    "empty batch": lambda rng: rng.standard_normal((0, 3, 5)),
    "strided last axis": lambda rng: rng.standard_normal((3, 4, 10))[:, :, ::2],
}


@pytest.mark.parametrize("case", sorted(LINEAR_INPUTS))
def test_linear_on_leading_axes_and_unbatched_matches_torch(backend, torch, case):
    """torch.nn.Linear's shapes: the last axis is the features, every other a batch axis; gradients sum over all of them."""
    rng = np.random.default_rng(6)
    x_np = LINEAR_INPUTS[case](rng)
    layer = nn.Linear(5, 4, rng=rng).to(backend.xp, "float64")
    layer.params["bias"] = backend.asarray(rng.standard_normal(4))
    reference = torch.nn.Linear(5, 4).double()
    reference.load_state_dict({k: torch.from_numpy(B.to_numpy(v).copy()) for k, v in layer.state_dict().items()})
    x_t = torch.from_numpy(x_np.copy()).requires_grad_(True)
    y_t = reference(x_t)
    dy_np = rng.standard_normal(tuple(y_t.shape))
    y_t.backward(torch.from_numpy(dy_np))
    y = layer.forward(backend.asarray(x_np))
    dx = layer.backward(backend.asarray(dy_np))
    f64 = tol("float64")
    assert tuple(y.shape) == tuple(y_t.shape) and tuple(dx.shape) == x_np.shape
    np.testing.assert_allclose(B.to_numpy(y), y_t.detach().numpy(), **f64)
    np.testing.assert_allclose(B.to_numpy(dx), x_t.grad.numpy(), **f64)
    for key in ("weight", "bias"):
        np.testing.assert_allclose(B.to_numpy(layer.grads[key]), getattr(reference, key).grad.numpy(), **f64, err_msg=key)


def test_linear_gradients_on_leading_axes_match_central_differences(backend):
    rng = np.random.default_rng(7)
    x, w, b = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 4)), rng.standard_normal(2)
    dy = rng.standard_normal((2, 3, 2))

    def loss(x=x, w=w, b=b):
        return float(np.sum(B.to_numpy(ops.linear(backend.asarray(x), backend.asarray(w), backend.asarray(b))) * dy))

    dx, dw, db = ops.linear_backward(backend.asarray(dy), backend.asarray(x), backend.asarray(w))
    assert_grad_close(B.to_numpy(dx), numerical_grad(lambda v: loss(x=v), x), "x")
    assert_grad_close(B.to_numpy(dw), numerical_grad(lambda v: loss(w=v), w), "weight")
    assert_grad_close(B.to_numpy(db), numerical_grad(lambda v: loss(b=v), b), "bias")
    with pytest.raises(ValueError, match=r"^Linear\(in_features=4, .*\): expected input of at least 1 dimension \(\*, in_features\), got shape \(\)$"):
        nn.Linear(4, 2).forward(np.float32(1.0).reshape(()))
    with pytest.raises(ValueError, match=r"expected output gradient of shape \(2, 3, 2\), got \(6, 2\)"):
        ops.linear_backward(backend.asarray(dy.reshape(6, 2)), backend.asarray(x), backend.asarray(w))
