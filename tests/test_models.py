"""Reference networks: shapes, seeding, initialisation, and equality with the same ``torch.nn.Sequential``.

The torch networks are written out here from the layer lists of issue 3, not
derived from ours, so a wrong layer order, size or padding in
``portable_cnn.models`` shows up as a key, shape or logit mismatch.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
from conftest import tol

from portable_cnn import backend as B
from portable_cnn import data, models, nn, optim

# (name, in_channels, num_classes, input_size, output features of the flatten)
CASES = [
    ("digits", 1, 10, 8, 512),
    ("digits", 2, 5, (8, 12), 32 * 4 * 6),
    ("lenet", 1, 10, 28, 400),
    ("lenet", 3, 7, 32, 16 * 6 * 6),
    ("vgg-small", 3, 10, 32, 4096),
    ("vgg-small", 1, 4, (16, 24), 64 * 4 * 6),
]


def _size(input_size):
    return (input_size, input_size) if isinstance(input_size, int) else input_size


def torch_reference(torch, name, in_channels, num_classes, flat):
    """The network as issue 3 lists it, layer for layer, in ``torch.nn``."""
    t = torch.nn
    if name == "digits":
        layers = [t.Conv2d(in_channels, 16, 3, padding=1), t.ReLU(), t.Conv2d(16, 32, 3, padding=1), t.ReLU(), t.MaxPool2d(2),
                  t.Flatten(), t.Linear(flat, 64), t.ReLU(), t.Linear(64, num_classes)]
    elif name == "lenet":
        layers = [t.Conv2d(in_channels, 6, 5, padding=2), t.ReLU(), t.MaxPool2d(2), t.Conv2d(6, 16, 5), t.ReLU(), t.MaxPool2d(2),
                  t.Flatten(), t.Linear(flat, 120), t.ReLU(), t.Linear(120, 84), t.ReLU(), t.Linear(84, num_classes)]
    else:
        layers = [t.Conv2d(in_channels, 32, 3, padding=1), t.ReLU(), t.Conv2d(32, 32, 3, padding=1), t.ReLU(), t.MaxPool2d(2),
                  t.Conv2d(32, 64, 3, padding=1), t.ReLU(), t.Conv2d(64, 64, 3, padding=1), t.ReLU(), t.MaxPool2d(2),
                  t.Flatten(), t.Linear(flat, 256), t.ReLU(), t.Linear(256, num_classes)]
    return t.Sequential(*layers).double()


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}x{c[3]}")
def test_model_shapes_and_backward(case):
    name, in_channels, num_classes, input_size, flat = case
    model = models.build_model(name, in_channels=in_channels, num_classes=num_classes, input_size=input_size)
    H, W = _size(input_size)
    x = np.random.default_rng(0).standard_normal((2, in_channels, H, W)).astype(np.float32)
    logits = model.forward(x)
    assert logits.shape == (2, num_classes) and logits.dtype == np.float32
    first_linear = next(layer for layer in model if isinstance(layer, nn.Linear))
    assert first_linear.in_features == flat
    assert isinstance(model[model.layers.index(first_linear) - 1], nn.Flatten)
    dx = model.backward(np.ones((2, num_classes), dtype=np.float32))
    assert dx.shape == x.shape
    for pname, layer, key in model.named_parameters():
        assert layer.grads[key].shape == layer.params[key].shape, pname


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}x{c[3]}")
def test_model_equals_torch_sequential(case, torch):
    """Same state_dict keys and shapes as the torch network; our weights loaded into it give our logits."""
    name, in_channels, num_classes, input_size, flat = case
    ours = models.build_model(name, in_channels=in_channels, num_classes=num_classes, input_size=input_size, seed=3)
    theirs = torch_reference(torch, name, in_channels, num_classes, flat)
    expected = theirs.state_dict()
    state = ours.state_dict()
    assert list(state) == list(expected)
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in expected.items()}
    # Non-zero biases, so a bias in the wrong place would show.
    rng = np.random.default_rng(1)
    state = {k: B.to_numpy(v).astype(np.float64) + (0.1 * rng.standard_normal(v.shape) if k.endswith("bias") else 0) for k, v in state.items()}
    ours.to("numpy", "float64").load_state_dict(state)
    theirs.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    x = rng.standard_normal((2, in_channels, *_size(input_size)))
    with torch.no_grad():
        expected_logits = theirs(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ours.forward(x), expected_logits, **tol("float64"))


def test_constructors_take_their_defaults():
    assert models.lenet().forward(np.zeros((1, 1, 28, 28), dtype=np.float32)).shape == (1, 10)
    assert models.digits_net().forward(np.zeros((1, 1, 8, 8), dtype=np.float32)).shape == (1, 10)
    assert models.vgg_small()[11].in_features == 4096
    assert models.MODELS == {"digits": models.digits_net, "lenet": models.lenet, "vgg-small": models.vgg_small}


def test_build_model_is_seeded():
    def weights(seed):
        model = models.build_model("lenet", in_channels=1, num_classes=10, input_size=28, seed=seed)
        return {k: B.to_numpy(v) for k, v in model.state_dict().items()}

    a, b, c = weights(0), weights(0), weights(1)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert not np.array_equal(a["0.weight"], c["0.weight"])
    # Each layer draws its own weights: no two layers share a stream.
    assert not np.array_equal(a["9.weight"][:10, :10], a["11.weight"][:10, :10])


def test_he_initialisation():
    """Weights N(0, 2 / fan_in), float32; biases zero."""
    model = models.vgg_small(rng=0)
    for pname, layer, key in model.named_parameters():
        value = B.to_numpy(layer.params[key])
        assert value.dtype == np.float32, pname
        if key == "bias":
            np.testing.assert_array_equal(value, 0.0, err_msg=pname)
            continue
        fan_in = int(np.prod(value.shape[1:]))
        if value.size >= 10_000:  # enough draws for a 3% check on the spread
            assert abs(value.std() / np.sqrt(2.0 / fan_in) - 1) < 0.03, pname
            assert abs(value.mean()) < 5 * np.sqrt(2.0 / fan_in / value.size), pname  # 5 standard errors


def test_build_model_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"unknown model 'resnet'; choose one of 'digits', 'lenet', 'vgg-small'"):
        models.build_model("resnet", in_channels=1, num_classes=10, input_size=8)
    with pytest.raises(ValueError, match=r"lenet: input_size \(4, 4\) is too small"):
        models.build_model("lenet", in_channels=1, num_classes=10, input_size=4)
    with pytest.raises(ValueError, match=r"digits_net: input_size \(1, 8\) is too small"):
        models.digits_net(input_size=(1, 8))
    with pytest.raises(TypeError, match=r"vgg_small: input_size must be an int or a pair \(H, W\)"):
        models.vgg_small(input_size=(32, 32, 3))
    with pytest.raises(TypeError, match=r"lenet: input_size must be an int or a pair"):
        models.lenet(input_size=28.0)
    with pytest.raises(ValueError, match="digits_net: num_classes must be a positive int, got 0"):
        models.digits_net(num_classes=0)
    with pytest.raises(TypeError, match="lenet: in_channels must be a positive int"):
        models.lenet(in_channels="1")
    assert models.digits_net(num_classes=np.int64(3))[-1].out_features == 3


def test_model_runs_on_each_backend(backend):
    model = models.build_model("digits", in_channels=1, num_classes=10, input_size=8).to(backend.xp)
    x = backend.asarray(np.random.default_rng(2).standard_normal((3, 1, 8, 8)), dtype="float32")
    logits = model.forward(x)
    assert tuple(logits.shape) == (3, 10) and B.backend_name(logits) == B.backend_name(x)
    reference = models.build_model("digits", in_channels=1, num_classes=10, input_size=8)
    np.testing.assert_allclose(
        backend.to_numpy(logits), reference.forward(backend.to_numpy(x)), **tol("float32")
    )


def _one_blas_thread():
    """One BLAS thread where threadpoolctl is installed.

    These GEMMs are tiny (32 x 512 x 64): OpenBLAS's spinning worker threads
    gain nothing on them and, on a busy 2-core machine (a parallel test run),
    made this test 30x slower.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl is in the test extra
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def test_digits_net_learns_the_digits():
    """The default net reaches the issue's 97% on scikit-learn's digits in a few seconds of NumPy training."""
    pytest.importorskip("sklearn", reason="scikit-learn not installed: no digits dataset")
    ds = data.load_digits(seed=0).normalized()
    model = models.build_model("digits", in_channels=1, num_classes=10, input_size=8, seed=0)
    loss_fn = nn.SoftmaxCrossEntropy()
    opt = optim.SGD(model, lr=0.02, momentum=0.9)
    epochs = 10
    schedule = optim.CosineAnnealingLR(opt, T_max=epochs)
    rng = np.random.default_rng(0)
    with _one_blas_thread():
        for _ in range(epochs):
            for xb, yb in data.iterate_minibatches(ds.x_train, ds.y_train, 32, rng=rng):
                loss_fn.forward(model.forward(xb), yb)
                model.backward(loss_fn.backward())
                opt.step()
            schedule.step()
    accuracy = float((model.eval().forward(ds.x_test).argmax(axis=1) == ds.y_test).mean())
    assert accuracy >= 0.97
