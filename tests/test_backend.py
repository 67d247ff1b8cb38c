"""The backend module: namespaces, names, conversions, CuPy diagnosis, and no silent mixing.

The CuPy diagnosis is tested everywhere by planting fake ``cupy`` modules in
``sys.modules`` (import failure, broken driver, no device, failing kernel,
working device), so the error paths are exercised on machines without a GPU.
"""

from __future__ import annotations

import importlib.abc
import re
import sys
import types

import numpy as np
import pytest
from conftest import make_backend

from portable_cnn import backend as B
from portable_cnn import nn, ops

OTHER_LIBRARIES = ["torch", "array_api_strict"]


def _library(backend_fixture) -> str:
    """The library name behind a fixture name (``numpy-readonly`` is NumPy)."""
    return backend_fixture.name.replace("-readonly", "")


# --------------------------------------------------------------------------- namespaces


def test_namespace_of_each_backend(backend):
    x = backend.asarray(np.ones((2, 3)), dtype="float32")
    assert B.namespace(x) is backend.xp
    assert B.namespace(x) is B.get_namespace(_library(backend))
    assert B.backend_name(x) == _library(backend)
    assert B.dtype_name(x) == "float32"
    # None entries (an absent bias) are skipped.
    assert B.namespace(None, x, None) is backend.xp


def test_get_namespace_each_name():
    assert B.is_numpy(B.get_namespace("numpy"))
    assert not B.is_torch(B.get_namespace("numpy"))
    assert B.get_namespace("array_api_strict").__name__ == "array_api_strict"
    assert not B.is_numpy(B.get_namespace("array_api_strict"))


def test_get_namespace_torch(torch):
    xp = B.get_namespace("torch")
    assert B.is_torch(xp) and not B.is_numpy(xp) and not B.is_cupy(xp)
    assert B.namespace(torch.zeros(2)) is xp


@pytest.mark.parametrize("call", [B.get_namespace, B.resolve_backend, lambda name: nn.Linear(2, 2).to(name)])
def test_unknown_backend_name_lists_choices(call):
    with pytest.raises(ValueError, match=r"unknown backend 'jax'") as info:
        call("jax")
    for choice in ("auto", "numpy", "cupy", "torch", "array_api_strict"):
        assert repr(choice) in str(info.value)


def test_namespace_needs_arrays():
    with pytest.raises(TypeError, match=r"^myop: expected at least one array, got none"):
        B.namespace(None, where="myop")
    with pytest.raises(TypeError, match=r"^myop: expected an array, got float"):
        B.namespace(np.ones(2), 1.5, where="myop")
    with pytest.raises(TypeError, match=r"^myop: expected an array, got list"):
        B.namespace([1.0, 2.0], where="myop")


# --------------------------------------------------------------------------- no silent mixing


@pytest.fixture(params=OTHER_LIBRARIES)
def other(request):
    """A non-NumPy backend to mix with NumPy arrays."""
    return make_backend(request.param)


def test_namespace_refuses_mixed_libraries(other):
    with pytest.raises(TypeError, match=rf"^myop: arrays from different libraries in one call \(.*{other.name}.*\)") as info:
        B.namespace(np.ones(2), other.asarray(np.ones(2)), where="myop")
    assert "numpy" in str(info.value) and "no silent copy" in str(info.value)


def _mixed_op_calls(other):
    """(op name, call) pairs, each handing one op NumPy arrays and one array of ``other``."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 2, 5, 5))
    w = rng.standard_normal((3, 2, 3, 3))
    dy = rng.standard_normal((1, 3, 3, 3))
    logits, labels = rng.standard_normal((4, 3)), np.array([0, 1, 2, 1])
    y_pool, argmax = ops.max_pool2d(x, 2)
    o = other.asarray
    return [
        ("conv2d", lambda: ops.conv2d(x, o(w))),
        ("conv2d", lambda: ops.conv2d(x, w, o(np.zeros(3)))),
        ("conv2d", lambda: ops.conv2d_backward(o(dy), x, w)),
        ("linear", lambda: ops.linear(x[:, :, 0, 0], o(w[:, :, 0, 0]))),
        ("linear", lambda: ops.linear_backward(o(np.ones((1, 3))), x[:, :, 0, 0], w[:, :, 0, 0])),
        ("max_pool2d", lambda: ops.max_pool2d_backward(o(np.ones(y_pool.shape)), argmax, x.shape, 2)),
        ("relu", lambda: ops.relu_backward(o(x), x)),
        ("sigmoid", lambda: ops.sigmoid_backward(o(x), x)),
        ("tanh", lambda: ops.tanh_backward(o(x), x)),
        ("softmax_cross_entropy", lambda: ops.softmax_cross_entropy(logits, o(labels))),
        ("softmax_cross_entropy", lambda: ops.softmax_cross_entropy_backward(logits, o(labels))),
    ]


def test_ops_refuse_mixed_libraries(other):
    for name, call in _mixed_op_calls(other):
        with pytest.raises(TypeError, match=rf"^{name}: arrays from different libraries"):
            call()


def _conv_net(rng=0):
    return nn.Sequential(nn.Conv2d(2, 3, 3, rng=rng), nn.ReLU(), nn.Flatten(), nn.Linear(27, 4, rng=rng))


def test_layers_refuse_mixed_libraries(other):
    """A NumPy model fed another library's batch names the layer, never copies."""
    x_np = np.random.default_rng(1).standard_normal((2, 2, 5, 5)).astype(np.float32)
    model = _conv_net()
    with pytest.raises(TypeError, match=r"^Conv2d\(2, 3, .*arrays from different libraries"):
        model.forward(other.asarray(x_np))
    linear = nn.Linear(3, 2)
    with pytest.raises(TypeError, match=r"^Linear\(in_features=3, .*arrays from different libraries"):
        linear.forward(other.asarray(np.ones((2, 3), dtype=np.float32)))
    loss = nn.SoftmaxCrossEntropy()
    with pytest.raises(TypeError, match=r"^SoftmaxCrossEntropy\(\): arrays from different libraries"):
        loss.forward(np.zeros((2, 3), dtype=np.float32), other.asarray(np.array([0, 1])))
    # One parameter moved alone: the layer notices at its next forward.
    conv = nn.Conv2d(2, 3, 3)
    conv.params["bias"] = other.asarray(conv.params["bias"])
    with pytest.raises(TypeError, match=r"^Conv2d\(2, 3, .*arrays from different libraries"):
        conv.forward(x_np)
    # A backward handed another library's gradient.
    logits = model.forward(x_np)
    with pytest.raises(TypeError, match=r"^Linear\(in_features=27, .*arrays from different libraries"):
        model.backward(other.asarray(np.ones(logits.shape, dtype=np.float32)))


def test_mixed_devices_are_refused():
    """array_api_strict has several devices: an op or layer given two of them refuses."""
    xps = B.get_namespace("array_api_strict")
    device1 = xps.Device("device1")
    x = B.asarray(np.ones((1, 1, 4, 4)), xps, dtype="float64", device=device1)
    assert B.device(x) == device1
    w = B.asarray(np.ones((1, 1, 3, 3)), xps, dtype="float64")
    assert B.device(w) != device1
    with pytest.raises(ValueError, match=r"^conv2d: arrays on different devices in one call .*device1"):
        ops.conv2d(x, w)
    conv = nn.Conv2d(1, 1, 3).to("array_api_strict", "float64")
    with pytest.raises(ValueError, match=r"^Conv2d\(1, 1, .*arrays on different devices"):
        conv.forward(x)


# --------------------------------------------------------------------------- conversions


@pytest.mark.parametrize("src_dtype", ["float32", "float64", "int64"])
@pytest.mark.parametrize("dst_dtype", [None, "float32", "float64"])
def test_asarray_to_numpy_round_trip(backend, src_dtype, dst_dtype):
    data = (np.arange(12).reshape(3, 4) - 5).astype(src_dtype)
    x = B.asarray(data, backend.xp, dtype=dst_dtype)
    assert B.backend_name(x) == _library(backend)
    assert B.dtype_name(x) == (dst_dtype or src_dtype)
    back = B.to_numpy(x)
    assert isinstance(back, np.ndarray)
    assert back.dtype == np.dtype(dst_dtype or src_dtype)
    np.testing.assert_array_equal(back, data)


@pytest.mark.parametrize("dtype", [np.float32, np.dtype("float32"), "float32"])
def test_asarray_accepts_numpy_dtypes_and_names(backend, dtype):
    x = B.asarray(np.ones(3), backend.xp, dtype=dtype)
    assert x.dtype == backend.xp.float32


def test_asarray_accepts_namespace_dtype(backend):
    x = B.asarray(np.ones(3), backend.xp, dtype=backend.xp.float64)
    assert x.dtype == backend.xp.float64


def test_asarray_casts_fractions_towards_zero(backend):
    x = B.asarray(np.array([1.7, -2.7]), backend.xp, dtype="int64")
    np.testing.assert_array_equal(B.to_numpy(x), [1, -2])


@pytest.mark.parametrize("target", ["numpy", "torch", "array_api_strict"])
def test_asarray_between_libraries(backend, target):
    """An explicit conversion between any two libraries keeps values and the asked dtype."""
    dst = make_backend(target)
    data = np.random.default_rng(2).standard_normal((2, 3))
    y = B.asarray(backend.asarray(data, dtype="float64"), dst.xp, dtype="float32")
    assert B.backend_name(y) == target
    assert B.dtype_name(y) == "float32"
    np.testing.assert_array_equal(B.to_numpy(y), data.astype(np.float32))


def test_asarray_copies_numpy_input():
    """Converting a user's array never aliases it: later writes to either stay apart."""
    data = np.zeros(3)
    x = B.asarray(data, B.get_namespace("numpy"))
    x[0] = 5.0
    assert data[0] == 0.0


def test_synchronize_is_a_noop_on_cpu(backend):
    x = backend.asarray(np.ones(2))
    assert B.synchronize(x) is None
    assert B.synchronize(backend.xp) is None


# --------------------------------------------------------------------------- CuPy diagnosis


def _fake_cupy(*, count=1, count_error=None, kernel_error=None, name=b"Fake GPU 9000"):
    """A stand-in ``cupy`` module with just what :func:`cupy_status` touches."""

    def get_device_count():
        if count_error is not None:
            raise count_error
        return count

    def arange(n, dtype=None):
        if kernel_error is not None:
            raise kernel_error
        return np.arange(n, dtype=dtype)

    runtime = types.SimpleNamespace(
        getDeviceCount=get_device_count, getDeviceProperties=lambda i: {"name": name}
    )
    cuda = types.SimpleNamespace(runtime=runtime, Device=lambda: types.SimpleNamespace(id=0))
    module = types.ModuleType("cupy")
    module.cuda = cuda
    module.arange = arange
    module.float32 = np.float32
    return module


def test_cupy_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # makes `import cupy` fail here
    ok, why = B.cupy_status()
    assert not ok and why.startswith("CuPy not installed")
    with pytest.raises(B.BackendUnavailableError, match=r"backend 'cupy' cannot run here: CuPy not installed"):
        B.get_namespace("cupy")
    with pytest.raises(B.BackendUnavailableError, match="CuPy not installed"):
        B.resolve_backend("cupy")
    name, reason = B.resolve_backend("auto")
    assert name == "numpy"
    assert "CuPy not installed" in reason and "NumPy" in reason
    assert B.is_numpy(B.get_namespace("auto"))


def test_cupy_real_status_here():
    """On this machine (whatever it is) "auto" and "cupy" agree with cupy_status."""
    ok, why = B.cupy_status()
    name, reason = B.resolve_backend("auto")
    if ok:  # pragma: no cover - GPU machines
        assert name == "cupy" and why in reason
        assert B.is_cupy(B.get_namespace("cupy"))
    else:
        assert name == "numpy"
        assert why in reason and "CuPy" in reason
        with pytest.raises(B.BackendUnavailableError, match=re.escape(why)):
            B.get_namespace("cupy")
        assert issubclass(B.BackendUnavailableError, RuntimeError)


class _ExplodingImport(importlib.abc.MetaPathFinder):
    """Finder whose ``cupy`` raises at import, as a CuPy built for another CUDA does."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "cupy":
            raise OSError("libcublas.so.12: cannot open shared object file")
        return None


def test_cupy_failing_import(monkeypatch):
    monkeypatch.delitem(sys.modules, "cupy", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_ExplodingImport(), *sys.meta_path])
    ok, why = B.cupy_status()
    assert not ok
    assert why.startswith("CuPy failed to import") and "libcublas.so.12" in why


@pytest.mark.parametrize(
    "fake, expected",
    [
        (dict(count_error=RuntimeError("cudaErrorInsufficientDriver: driver too old")), r"^CUDA driver error .*driver too old"),
        (dict(count=0), r"^no CUDA device visible$"),
        (dict(kernel_error=RuntimeError("cudaErrorNoKernelImageForDevice")), r"^CUDA device failed a test kernel .*NoKernelImage"),
    ],
    ids=["driver-error", "no-device", "kernel-fails"],
)
def test_cupy_unusable_reasons(monkeypatch, fake, expected):
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(**fake))
    ok, why = B.cupy_status()
    assert not ok
    assert re.search(expected, why), why
    with pytest.raises(B.BackendUnavailableError, match=r"^backend 'cupy' cannot run here: " + expected.lstrip("^")):
        B.get_namespace("cupy")
    name, reason = B.resolve_backend("auto")
    assert name == "numpy" and why in reason


def test_cupy_working_device_is_chosen_by_auto(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(name=b"Fake GPU 9000"))
    assert B.cupy_status() == (True, "CUDA device 0: Fake GPU 9000")
    assert B.resolve_backend("auto") == ("cupy", "using CuPy on CUDA device 0: Fake GPU 9000")

