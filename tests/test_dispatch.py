"""The dispatch, the settings, and the reference path against the fast paths.

* :func:`portable_cnn.dispatch.kernel` picks the backend kernel where one is
  registered and ``fast_paths`` is on, else the reference; every op has a
  reference, and backend kernel packages are loaded only for their library.
* :mod:`portable_cnn.config`: scoped settings, checked values, environment
  variables read once and named in errors.
* Under ``config_context(fast_paths=False)`` every op with a backend kernel,
  and whole lenet and vgg-small training steps, give the fast paths' numbers
  in float64 to a relative 1e-12 (the issue's bar), on every backend with
  kernels that is installed (NumPy here; CuPy on a GPU, in test_gpu.py).
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from conftest import make_backend

import portable_cnn
from portable_cnn import config, config_context, dispatch, get_config, models, nn, ops, optim, set_config
from portable_cnn import backend as B
from portable_cnn.kernels import PACKAGES
from portable_cnn.kernels import numpy as numpy_kernels
from portable_cnn.kernels import reference

PARITY = 1e-12  # float64, fast path against reference: max |a - b| / max |b|


def relative_difference(got, want) -> float:
    """``max |got - want| / max |want|`` (0 for two all-zero arrays)."""
    got, want = np.asarray(B.to_numpy(got), dtype=np.float64), np.asarray(B.to_numpy(want), dtype=np.float64)
    assert got.shape == want.shape
    scale = np.max(np.abs(want)) if want.size else 0.0
    diff = np.max(np.abs(got - want)) if want.size else 0.0
    return 0.0 if diff == 0 else diff / scale


def test_relative_difference_sees_a_difference():
    assert relative_difference(np.array([1.0, 2.0]), np.array([1.0, 2.0])) == 0.0
    assert relative_difference(np.array([1.0, 2.0 + 1e-9]), np.array([1.0, 2.0])) > PARITY


# ----------------------------------------------------------------------- the dispatch


def test_numpy_gets_its_kernels_and_the_reference_elsewhere():
    xp = B.get_namespace("numpy")
    f64 = np.dtype("float64")
    for op, (_, implementation) in numpy_kernels.KERNELS.items():
        assert dispatch.kernel(op, xp, f64) is implementation, op
    for op in set(reference.KERNELS) - set(numpy_kernels.KERNELS):
        assert dispatch.kernel(op, xp, f64) is reference.KERNELS[op], op


def test_fast_paths_false_runs_the_reference_and_is_restored():
    xp = B.get_namespace("numpy")
    f64 = np.dtype("float64")
    with config_context(fast_paths=False):
        for op in reference.KERNELS:
            assert dispatch.kernel(op, xp, f64) is reference.KERNELS[op], op
    assert dispatch.kernel("conv2d_forward", xp, f64) is numpy_kernels.KERNELS["conv2d_forward"][1]


def test_array_api_strict_runs_the_reference():
    strict = make_backend("array_api_strict")
    for op in reference.KERNELS:
        assert dispatch.kernel(op, strict.xp, strict.xp.float64) is reference.KERNELS[op], op


def test_every_backend_kernel_has_a_reference_and_the_same_signature():
    import inspect

    for library, package in PACKAGES.items():
        table = __import__(package, fromlist=["KERNELS"]).KERNELS
        for op, (dtypes, implementation) in table.items():
            assert op in reference.KERNELS, f"{library} registers {op!r}, which has no reference"
            assert dtypes is None or set(dtypes) <= {"float16", "float32", "float64"}
            ours = inspect.signature(implementation).parameters
            theirs = inspect.signature(reference.KERNELS[op]).parameters
            assert list(ours) == list(theirs), f"{library} {op}: {list(ours)} != reference {list(theirs)}"


def test_an_unknown_op_is_named():
    with pytest.raises(KeyError, match="no op named 'conv3d'"):
        dispatch.kernel("conv3d", B.get_namespace("numpy"), np.dtype("float32"))


def test_numpy_work_loads_no_cupy_kernels():
    """The CuPy kernel package is imported only when CuPy arrays reach an op."""
    script = (
        "import sys, numpy as np\n"
        "from portable_cnn import models\n"
        "m = models.build_model('lenet', in_channels=1, num_classes=10, input_size=28)\n"
        "m.backward(m.forward(np.zeros((2, 1, 28, 28), np.float32)))\n"
        "print(sorted(k for k in sys.modules if k.startswith('portable_cnn.kernels.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120).stdout
    assert "portable_cnn.kernels.numpy" in out and "portable_cnn.kernels.cupy" not in out


# ----------------------------------------------------------------------- the settings


def test_config_context_scopes_and_validates():
    before = get_config()
    with config_context(fast_paths=False, workspace_mb=2.5, num_threads=1) as inside:
        assert inside == {**before, "fast_paths": False, "workspace_mb": 2.5, "num_threads": 1}
        assert portable_cnn.get_config() == inside
    assert get_config() == before
    with pytest.raises(ValueError, match="workspace_mb: expected a positive number of megabytes, got -1"):
        set_config(workspace_mb=-1)
    with pytest.raises(ValueError, match="num_threads: expected a positive integer or None, got 0"):
        set_config(num_threads=0)
    with pytest.raises(ValueError, match="fast_paths: expected True or False, got 'no'"):
        set_config(fast_paths="no")
    assert get_config() == before, "a refused value changes nothing"


def test_config_context_restores_after_an_error():
    before = get_config()
    with pytest.raises(RuntimeError), config_context(workspace_mb=1):
        raise RuntimeError
    assert get_config() == before


def test_workspace_limit_functions_are_the_setting():
    with config_context():
        ops.conv.set_workspace_limit(3)
        assert get_config()["workspace_mb"] == 3.0 == ops.conv.get_workspace_limit()


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("PORTABLE_CNN_WORKSPACE_MB", "abc", "a positive number of megabytes"),
        ("PORTABLE_CNN_WORKSPACE_MB", "-5", "a positive number of megabytes"),
        ("PORTABLE_CNN_NUM_THREADS", "two", "a positive integer"),
        ("PORTABLE_CNN_NUM_THREADS", "0", "a positive integer"),
        ("PORTABLE_CNN_FAST_PATHS", "maybe", "0 or 1"),
    ],
)
def test_a_bad_environment_value_is_named(monkeypatch, variable, value, expected):
    monkeypatch.setenv(variable, value)
    monkeypatch.setattr(config, "_config", None)  # read the environment again, as a new process would
    with pytest.raises(config.ConfigError) as info:
        get_config()
    assert str(info.value) == f"environment variable {variable}: expected {expected}, got {value!r}"


def test_environment_values_are_read(monkeypatch):
    monkeypatch.setenv("PORTABLE_CNN_WORKSPACE_MB", "64")
    monkeypatch.setenv("PORTABLE_CNN_NUM_THREADS", "3")
    monkeypatch.setenv("PORTABLE_CNN_FAST_PATHS", "0")
    monkeypatch.setattr(config, "_config", None)
    assert get_config() == {"fast_paths": False, "workspace_mb": 64.0, "num_threads": 3, "tf32": False}


def test_importing_the_package_reads_no_environment():
    """A bad value must not break ``import portable_cnn`` (nor ``--help``): it is read on first use."""
    script = "import portable_cnn, portable_cnn.cli\nprint('imported')\n"
    env = {"PORTABLE_CNN_WORKSPACE_MB": "abc", "PATH": ""}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "imported"


# ------------------------------------------------------- the reference against the fast paths


def _both_paths(compute):
    """``compute()`` with the fast paths, then under ``fast_paths=False``: two dicts of arrays."""
    fast = compute()
    with config_context(fast_paths=False):
        slow = compute()
    assert fast.keys() == slow.keys()
    return fast, slow


def _assert_parity(fast, slow):
    for name in fast:
        if fast[name] is None:
            assert slow[name] is None, name
            continue
        assert relative_difference(fast[name], slow[name]) <= PARITY, name


OP_CASES = {
    "conv2d": lambda rng: _conv_case(rng, (3, 4, 9, 8), (5, 4, 3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2)),
    "conv2d one channel": lambda rng: _conv_case(rng, (4, 1, 12, 12), (6, 1, 5, 5), stride=1, padding=2, dilation=1),
    # 4900 rows a sample: the products in two slices of rows (kernels/numpy/conv.py, _TAPS_FIRST_ROWS)
    "conv2d one channel, over 4096 rows": lambda rng: _conv_case(rng, (2, 1, 70, 70), (3, 1, 3, 3), stride=1,
                                                                 padding=1, dilation=1),
    "conv2d stride 1 as convolution": lambda rng: _conv_case(rng, (2, 8, 7, 7), (4, 8, 3, 3), stride=1, padding=1, dilation=1),
    "conv2d grouped": lambda rng: _conv_case(rng, (3, 6, 9, 8), (4, 3, 3, 2), stride=(2, 1), padding=(1, 2),
                                             dilation=(1, 2), groups=2),
    "conv2d grouped stride 1 as convolution": lambda rng: _conv_case(rng, (2, 8, 7, 7), (8, 2, 3, 3), stride=1,
                                                                     padding=1, dilation=1, groups=4),
    "conv2d depthwise": lambda rng: _conv_case(rng, (4, 16, 9, 9), (16, 1, 3, 3), stride=2, padding=1, dilation=1,
                                               groups=16),
    "conv2d depthwise stride 1": lambda rng: _conv_case(rng, (3, 8, 7, 6), (8, 1, 3, 3), stride=1, padding=(1, 0),
                                                        dilation=1, groups=8),
    "conv2d depthwise multiplier 2": lambda rng: _conv_case(rng, (3, 5, 8, 7), (10, 1, 3, 2), stride=(1, 2),
                                                            padding=(2, 0), dilation=(2, 1), groups=5),
    "max_pool2d": lambda rng: _pool_case(rng, "max", (2, 3, 9, 7), 3, 2, 1),
    "max_pool2d disjoint": lambda rng: _pool_case(rng, "max", (2, 3, 8, 8), 2, 2, 0),
    "avg_pool2d": lambda rng: _pool_case(rng, "avg", (2, 3, 9, 7), 3, 2, 1),
    "max_pool2d ceil_mode dilation": lambda rng: _pool_case(rng, "max", (2, 3, 10, 9), 3, 2, 1, dilation=(2, 1),
                                                            ceil_mode=True),
    "max_pool2d ceil_mode disjoint channels-last": lambda rng: _pool_case(rng, "max", (2, 3, 9, 9), 2, 2, 0,
                                                                          ceil_mode=True, channels_last=True),
    "avg_pool2d ceil_mode count_include_pad=False channels-last": lambda rng: _pool_case(
        rng, "avg", (2, 3, 9, 8), 3, 2, 1, ceil_mode=True, count_include_pad=False, channels_last=True),
    "avg_pool2d divisor_override disjoint": lambda rng: _pool_case(rng, "avg", (2, 3, 8, 7), 2, 2, 0, ceil_mode=True,
                                                                   divisor_override=3),
    "global_avg_pool2d": lambda rng: _global_pool_case(rng, (3, 5, 6, 7), channels_last=False),
    "global_avg_pool2d channels-last": lambda rng: _global_pool_case(rng, (3, 5, 6, 7), channels_last=True),
    "relu": lambda rng: _relu_case(rng),
    "relu 0-d": lambda rng: _relu_case(rng, ()),
    "relu empty batch": lambda rng: _relu_case(rng, (0, 3, 5, 5)),
    "linear": lambda rng: _linear_case(rng),
    "softmax_cross_entropy": lambda rng: _loss_case(rng),
    "batch_norm channels-last, dy contiguous": lambda rng: _batch_norm_case(rng, (4, 6, 5, 7), channels_last=True),
    "batch_norm eval": lambda rng: _batch_norm_case(rng, (3, 5, 4, 4), training=False),
    "batch_norm (N, C) without affine or statistics": lambda rng: _batch_norm_case(rng, (9, 4), affine=False, tracking=False),
    "batch_norm (N, C, L) in blocks of rows": lambda rng: _batch_norm_case(rng, (64, 8, 512)),
}


def _conv_case(rng, x_shape, w_shape, **options):
    x, w = rng.standard_normal(x_shape), rng.standard_normal(w_shape)
    b = rng.standard_normal(w_shape[0])

    def compute():
        y, saved = ops.conv2d(x, w, b, return_cols=True, **options)
        dy = np.cos(np.arange(y.size, dtype=np.float64)).reshape(y.shape)
        dx, dw, db = ops.conv2d_backward(dy, x, w, cols=saved, **options)
        _, dw2, _ = ops.conv2d_backward(dy, x, w, has_bias=False, need_input_grad=False, **options)
        return {"y": y, "dx": dx, "dw": dw, "db": db, "dw recomputed": dw2}

    return compute


def _channels_last(x):
    """The same (N, C, H, W) values as a view of (N, H, W, C) memory, the NumPy kernels' layout."""
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)


def _pool_case(rng, kind, x_shape, kernel, stride, padding, channels_last=False, **options):
    x = rng.standard_normal(x_shape)
    if channels_last:
        x = _channels_last(x)
    args = (kernel, stride, padding)

    def compute():
        if kind == "max":
            y, argmax = ops.max_pool2d(x, *args, **options)
            dy = np.sin(np.arange(y.size, dtype=np.float64)).reshape(y.shape)
            return {"y": y, "argmax": argmax, "dx": ops.max_pool2d_backward(dy, argmax, x.shape, *args, **options)}
        y = ops.avg_pool2d(x, *args, **options)
        dy = np.sin(np.arange(y.size, dtype=np.float64)).reshape(y.shape)
        return {"y": y, "dx": ops.avg_pool2d_backward(dy, x.shape, *args, **options)}

    return compute


def _global_pool_case(rng, x_shape, channels_last):
    x = rng.standard_normal(x_shape)
    if channels_last:
        x = _channels_last(x)
    dy = rng.standard_normal((*x_shape[:2], 1, 1))
    return lambda: {"y": ops.global_avg_pool2d(x), "dx": ops.global_avg_pool2d_backward(dy, x.shape)}


def _relu_case(rng, shape=(4, 3, 5, 5)):
    x = np.asarray(rng.standard_normal(shape))  # an array also for shape (), where NumPy draws a float
    dy = np.asarray(rng.standard_normal(shape))
    return lambda: {"y": ops.relu(x), "dx": ops.relu_backward(dy, x)}


def _linear_case(rng):
    x, w, b, dy = rng.standard_normal((9, 7)), rng.standard_normal((5, 7)), rng.standard_normal(5), rng.standard_normal((9, 5))

    def compute():
        dx, dw, db = ops.linear_backward(dy, x, w)
        return {"y": ops.linear(x, w, b), "dx": dx, "dw": dw, "db": db}

    return compute


def _loss_case(rng):
    logits, labels = rng.standard_normal((6, 4)) * 5, rng.integers(0, 4, 6)

    def compute():
        loss, probs = ops.softmax_cross_entropy(logits, labels)
        return {"loss": loss, "probs": probs, "dlogits": ops.softmax_cross_entropy_backward(probs, labels)}

    return compute


def _batch_norm_case(rng, shape, *, channels_last=False, training=True, affine=True, tracking=True):
    C = shape[1]
    x = rng.normal(3.0, 2.0, shape)  # a mean well off zero: the statistics must not lose it
    if channels_last:
        x = np.ascontiguousarray(np.moveaxis(x, 1, -1)).transpose(0, 3, 1, 2)  # (N, C, H, W) view of (N, H, W, C)
    dy = rng.standard_normal(shape)
    weight, bias = (rng.normal(1.0, 0.3, C), rng.normal(0.0, 0.3, C)) if affine else (None, None)
    stats = (rng.standard_normal(C), rng.uniform(0.5, 2.0, C)) if tracking else (None, None)

    def compute():
        y, cache, mean, var = ops.batch_norm(x, weight, bias, *stats, training=training, momentum=0.3)
        dx, dweight, dbias = ops.batch_norm_backward(dy, cache)
        return {"y": y, "dx": dx, "dweight": dweight, "dbias": dbias, "running_mean": mean, "running_var": var}

    return compute


@pytest.mark.parametrize("case", sorted(OP_CASES))
def test_every_op_gives_the_reference_numbers_in_float64(case):
    """Each NumPy kernel against the reference on the same float64 inputs: relative difference at most 1e-12."""
    fast, slow = _both_paths(OP_CASES[case](np.random.default_rng(7)))
    _assert_parity(fast, slow)


@pytest.mark.parametrize(("name", "shape"), [("lenet", (1, 28, 28)), ("vgg-small", (3, 32, 32))])
def test_training_steps_give_the_reference_numbers_in_float64(name, shape):
    """Two SGD steps with momentum of lenet and vgg-small: loss, gradients and weights agree to 1e-12."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((6, *shape))
    y = rng.integers(0, 10, 6)

    def compute():
        model = models.build_model(name, in_channels=shape[0], num_classes=10, input_size=shape[1:], seed=1).to("numpy", "float64")
        opt = optim.SGD(model, lr=0.05, momentum=0.9, weight_decay=1e-4)
        loss_fn = nn.SoftmaxCrossEntropy()
        out = {}
        for step in range(2):
            out[f"loss {step}"] = loss_fn.forward(model.forward(x), y)
            model.backward(loss_fn.backward(), need_input_grad=False)
            out.update({f"grad {k} {step}": layer.grads[key] for k, layer, key in model.named_parameters()})
            opt.step()
        out.update({f"param {k}": v for k, v in model.state_dict().items()})
        return out

    fast, slow = _both_paths(compute)
    _assert_parity(fast, slow)
