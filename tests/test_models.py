"""Reference networks: shapes, seeding, initialisation, and equality with the same ``torch.nn`` network.

The torch networks are written out here from the layer lists of issues 3
and 10, not derived from ours, so a wrong layer order, size, stride or
padding in ``portable_cnn.models`` shows up as a key, shape or logit mismatch.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
from conftest import tol

from portable_cnn import backend as B
from portable_cnn import cli, data, models, nn, optim
from portable_cnn.checkpoint import load_checkpoint

# (name, in_channels, num_classes, input_size, output features of the flatten)
CASES = [
    ("digits", 1, 10, 8, 512),
    ("digits", 2, 5, (8, 12), 32 * 4 * 6),
    ("lenet", 1, 10, 28, 400),
    ("lenet", 3, 7, 32, 16 * 6 * 6),
    ("vgg-small", 3, 10, 32, 4096),
    ("vgg-small", 1, 4, (16, 24), 64 * 4 * 6),
    ("resnet20", 1, 10, 8, 64),
    ("resnet20", 3, 10, 32, 64),
    ("mobilenet-small", 3, 10, 32, 256),
    ("mobilenet-small", 1, 7, (8, 12), 256),
]


def _size(input_size):
    return (input_size, input_size) if isinstance(input_size, int) else input_size


def torch_resnet20(torch, in_channels, num_classes):
    """He et al.'s CIFAR ResNet-20 as issue 10 describes it, with projection shortcuts where the shape changes."""
    t = torch.nn

    class Residual(t.Module):
        def __init__(self, body, shortcut):
            super().__init__()
            self.body, self.shortcut = body, shortcut

        def forward(self, x):
            return self.body(x) + self.shortcut(x)

    def block(c_in, c_out, stride):
        body = t.Sequential(t.Conv2d(c_in, c_out, 3, stride, 1, bias=False), t.BatchNorm2d(c_out), t.ReLU(),
                            t.Conv2d(c_out, c_out, 3, 1, 1, bias=False), t.BatchNorm2d(c_out))
        if stride == 1 and c_in == c_out:
            shortcut = t.Identity()
        else:
            shortcut = t.Sequential(t.Conv2d(c_in, c_out, 1, stride, bias=False), t.BatchNorm2d(c_out))
        return t.Sequential(Residual(body, shortcut), t.ReLU())

    stages = [t.Sequential(block(c_in, c_out, stride), block(c_out, c_out, 1), block(c_out, c_out, 1))
              for c_in, c_out, stride in ((16, 16, 1), (16, 32, 2), (32, 64, 2))]
    return [t.Conv2d(in_channels, 16, 3, padding=1, bias=False), t.BatchNorm2d(16), t.ReLU(), *stages,
            t.AdaptiveAvgPool2d(1), t.Flatten(), t.Linear(64, num_classes)]


def torch_mobilenet_small(torch, in_channels, num_classes):
    """A 3x3 stem, five depthwise-separable blocks (32-64-128-128-256-256, strides 1 2 1 2 1), global pooling, linear."""
    t = torch.nn

    def separable(c_in, c_out, stride):
        return t.Sequential(t.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in, bias=False), t.BatchNorm2d(c_in), t.ReLU(),
                            t.Conv2d(c_in, c_out, 1, bias=False), t.BatchNorm2d(c_out), t.ReLU())

    return [t.Conv2d(in_channels, 32, 3, padding=1, bias=False), t.BatchNorm2d(32), t.ReLU(),
            separable(32, 64, 1), separable(64, 128, 2), separable(128, 128, 1), separable(128, 256, 2),
            separable(256, 256, 1), t.AdaptiveAvgPool2d(1), t.Flatten(), t.Linear(256, num_classes)]


def torch_reference(torch, name, in_channels, num_classes, flat):
    """The network as issues 3 and 10 list it, layer for layer, in ``torch.nn``."""
    t = torch.nn
    if name == "resnet20":
        return t.Sequential(*torch_resnet20(torch, in_channels, num_classes)).double()
    if name == "mobilenet-small":
        return t.Sequential(*torch_mobilenet_small(torch, in_channels, num_classes)).double()
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
    # asarray: a 0-d num_batches_tracked comes out of the sum as a NumPy scalar.
    theirs.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()})
    x = rng.standard_normal((2, in_channels, *_size(input_size)))
    with torch.no_grad():
        expected_logits = theirs(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ours.forward(x), expected_logits, **tol("float64"))


@pytest.mark.parametrize("fast_paths", [True, False], ids=["kernels", "reference"])
@pytest.mark.parametrize("name", ["digits", "lenet", "vgg-small"])
def test_pooling_before_relu_is_the_documented_network_bit_for_bit(name, fast_paths):
    """Section 7.4: MaxPool2d before ReLU gives the documented ReLU-then-pool network's logits and gradients exactly.

    Integer weights and inputs make the convolutions' outputs integers (exact
    in float64), so windows tie often, at zero and above.
    """
    from portable_cnn import config_context

    shape = {"digits": (4, 1, 8, 8), "lenet": (4, 1, 28, 28), "vgg-small": (2, 3, 32, 32)}[name]
    ours = models.build_model(name, in_channels=shape[1], num_classes=10, input_size=shape[2], seed=0)
    ours.to("numpy", "float64")
    rng = np.random.default_rng(5)
    ours.load_state_dict({k: rng.integers(-1, 2, v.shape).astype(np.float64) for k, v in ours.state_dict().items()})
    layers = list(ours.layers)
    swapped = [i for i in range(len(layers) - 1) if isinstance(layers[i], nn.MaxPool2d) and isinstance(layers[i + 1], nn.ReLU)]
    assert swapped, "no MaxPool2d followed by ReLU"
    documented = list(layers)
    for i in swapped:
        documented[i], documented[i + 1] = documented[i + 1], documented[i]
    x = rng.integers(-2, 3, shape).astype(np.float64)
    dy = rng.integers(-3, 4, (shape[0], 10)).astype(np.float64)

    def run(order):  # the same layer objects in either order, one network at a time
        net = nn.Sequential(*order)
        logits = net.forward(x)
        dx = net.backward(dy)
        return [logits, dx] + [layer.grads[key].copy() for _, layer, key in net.named_parameters()]

    with config_context(fast_paths=fast_paths):
        got, expected = run(layers), run(documented)
    assert np.count_nonzero(got[1]) > 0
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ["resnet20", "mobilenet-small"])
def test_batchnorm_models_equal_torch_in_both_modes(name, torch):
    """Every parameter and running statistic moved off its initial value; eval logits, then train-mode gradients."""
    ours = models.build_model(name, in_channels=2, num_classes=5, input_size=(8, 6), seed=4).to("numpy", "float64")
    theirs = torch_reference(torch, name, 2, 5, None)
    rng = np.random.default_rng(5)
    state = {}
    for key, value in ours.state_dict().items():
        value = B.to_numpy(value)
        if key.endswith("num_batches_tracked"):
            state[key] = value
        elif key.endswith("running_var"):
            state[key] = rng.uniform(0.5, 2.0, value.shape)
        else:
            state[key] = value + 0.1 * rng.standard_normal(value.shape)
    ours.load_state_dict(state)
    theirs.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})
    x = rng.standard_normal((3, 2, 8, 6))
    with torch.no_grad():
        expected = theirs.eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ours.eval().forward(x), expected, **tol("float64"))

    dlogits = rng.standard_normal((3, 5))
    ours.train().forward(x)
    ours.backward(dlogits)
    x_t = torch.from_numpy(x)
    (theirs.train()(x_t) * torch.from_numpy(dlogits)).sum().backward()
    grads = dict(theirs.named_parameters())
    for pname, layer, key in ours.named_parameters():
        np.testing.assert_allclose(layer.grads[key], grads[pname].grad.numpy(), **tol("float64"), err_msg=pname)


def test_constructors_take_their_defaults():
    assert models.lenet().forward(np.zeros((1, 1, 28, 28), dtype=np.float32)).shape == (1, 10)
    assert models.digits_net().forward(np.zeros((1, 1, 8, 8), dtype=np.float32)).shape == (1, 10)
    assert models.vgg_small()[11].in_features == 4096
    assert models.resnet20().forward(np.zeros((2, 3, 32, 32), dtype=np.float32)).shape == (2, 10)
    assert models.mobilenet_small()[-1].in_features == 256
    assert models.MODELS == {"digits": models.digits_net, "lenet": models.lenet, "vgg-small": models.vgg_small,
                             "resnet20": models.resnet20, "mobilenet-small": models.mobilenet_small}


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


def test_he_initialisation_of_the_digits_net():
    """Weights N(0, 2 / fan_in), float32; biases zero."""
    model = models.digits_net(input_size=32, rng=0)
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


@pytest.mark.parametrize("name", [name for name in models.MODELS if name != "digits"])
def test_torch_default_initialisation(name):
    """The other nets start as torch.nn does: weights and biases U(-1/sqrt(fan_in), 1/sqrt(fan_in)); BatchNorm 1 and 0."""
    model = models.build_model(name, in_channels=3, num_classes=10, input_size=32)
    for pname, layer, key in model.named_parameters():
        value = B.to_numpy(layer.params[key])
        assert value.dtype == np.float32, pname
        if isinstance(layer, nn.BatchNorm2d):
            np.testing.assert_array_equal(value, 1.0 if key == "weight" else 0.0, err_msg=pname)
            continue
        # fan_in: what one output sees; a depthwise kernel sees 3x3 inputs of one channel, 9.
        bound = 1 / np.sqrt(np.prod(layer.params["weight"].shape[1:]))
        assert np.abs(value).max() <= bound, pname
        if value.size >= 2_000:
            # Uniform on [-b, b]: standard deviation b / sqrt(3), within 3%; both ends reached.
            assert abs(value.std() / (bound / np.sqrt(3)) - 1) < 0.03, pname
            assert value.min() < -0.95 * bound and value.max() > 0.95 * bound, pname
    assert np.abs(B.to_numpy(model[-1].params["bias"])).min() > 0  # torch draws biases too


def test_torch_default_init_matches_torchs_spread(torch):
    """The same bounds as torch.nn's own Conv2d and Linear (grouped too), checked on the largest draw of each."""
    torch.manual_seed(0)
    for ours, theirs in [(nn.Conv2d(256, 256, 3, groups=8), torch.nn.Conv2d(256, 256, 3, groups=8)),
                         (nn.Linear(300, 200), torch.nn.Linear(300, 200))]:
        models.torch_default_init(ours, rng=0)
        for key in ("weight", "bias"):
            # 200 or more draws each: the largest lies within 3% of the bound.
            expected = getattr(theirs, key).detach().abs().max().item()
            assert abs(np.abs(ours.params[key]).max() / expected - 1) < 0.03, (ours, key)


def test_build_model_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"unknown model 'resnet'; choose one of 'digits', 'lenet', 'vgg-small', "
                                         r"'resnet20', 'mobilenet-small'"):
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


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)], ids=["mnist", "cifar10"])
@pytest.mark.parametrize("name", ["resnet20", "mobilenet-small"])
def test_batchnorm_models_train_from_the_command_line_in_float64(name, shape, tmp_path, capsys):
    """MNIST- and CIFAR-10-shaped images (as an .npz), float64: one epoch, BatchNorm statistics saved."""
    rng = np.random.default_rng(0)
    path, ckpt = tmp_path / "images.npz", tmp_path / "run.safetensors"
    np.savez(path, x=rng.integers(0, 256, (20, *shape), dtype=np.uint8), y=np.arange(20) % 4)
    code = cli.main(["train", "--data", str(path), "--model", name, "--epochs", "1", "--batch-size", "8",
                     "--dtype", "float64", "--backend", "numpy", "--quiet", "--checkpoint", str(ckpt)])
    out, err = capsys.readouterr()
    assert code == 0, err
    state = load_checkpoint(ckpt).model_state
    assert state["0.weight"].dtype == np.float64 and state["1.num_batches_tracked"] == 2  # 16 train images, batches of 8
    assert np.all(np.isfinite(state["1.running_var"])) and not np.allclose(state["1.running_mean"], 0)


@pytest.mark.slow
def test_resnet20_learns_the_digits_in_one_epoch(capsys):
    """The default recipe cut to one epoch learns (chance is 10%); ten reach 97% (docs/benchmarks.md, "Default recipes")."""
    pytest.importorskip("sklearn", reason="scikit-learn not installed: no digits dataset")
    code = cli.main(["train", "--model", "resnet20", "--epochs", "1", "--backend", "numpy", "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert float(out.split()[2].rstrip("%")) >= 50.0, out  # 69.4% when measured
