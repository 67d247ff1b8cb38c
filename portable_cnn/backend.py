"""Everything portable_cnn knows about array libraries lives here.

The rest of the package works on raw arrays through the namespace that
:func:`namespace` returns for them; it never imports NumPy-compatible libraries
by name (NumPy itself aside, which holds the seeded initial weights and the
data). This is the only module that imports ``array_api_compat``, and CuPy and
PyTorch are imported only when a user asks for them by name or has already
handed us their arrays.

Backends by name:

``"numpy"``
    NumPy on the CPU (always available).
``"cupy"``
    CuPy on the current CUDA device; raises :class:`BackendUnavailableError`
    saying why when CuPy is not installed, no device is visible or the driver
    fails.
``"torch"``
    PyTorch CPU tensors through ``array_api_compat.torch``.
``"array_api_strict"``
    The reference implementation of the standard: slow, but it proves that the
    numeric core uses nothing outside the standard.
``"auto"``
    CuPy when a CUDA device actually works, else NumPy.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import array_api_compat
import numpy as np

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "namespace",
    "get_namespace",
    "resolve_backend",
    "backend_name",
    "library_name",
    "dtype_name",
    "dtype_name_of",
    "device",
    "to_numpy",
    "asarray",
    "is_numpy",
    "is_cupy",
    "is_torch",
    "synchronize",
    "cupy_status",
    "random_uniform",
    "set_tf32",
    "tf32_enabled",
]

BACKENDS = ("numpy", "cupy", "torch", "array_api_strict")


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name but cannot run on this machine."""


def _backend_of(x) -> str:
    if array_api_compat.is_numpy_array(x):
        return "numpy"
    if array_api_compat.is_cupy_array(x):
        return "cupy"
    if array_api_compat.is_torch_array(x):
        return "torch"
    if array_api_compat.is_array_api_strict_namespace(array_api_compat.array_namespace(x)):
        return "array_api_strict"
    return type(x).__module__.split(".")[0]


def namespace(*arrays, where: str = "portable_cnn") -> ModuleType:
    """Return the array-API namespace shared by ``arrays``.

    ``None`` entries are skipped. Arrays of two libraries or on two devices
    raise :class:`TypeError`/:class:`ValueError` naming ``where`` (the op or
    layer), never a silent copy.

    >>> import numpy as np
    >>> namespace(np.zeros(2)).__name__
    'array_api_compat.numpy'
    """
    present = [a for a in arrays if a is not None]
    if not present:
        raise TypeError(f"{where}: expected at least one array, got none")
    kinds = [_kind(a, where) for a in present]
    names = {name for name, _ in kinds}
    if len(names) > 1:
        raise TypeError(
            f"{where}: arrays from different libraries in one call ({', '.join(sorted(names))}); "
            "move them to one backend first (e.g. model.to(...)), no silent copy is made"
        )
    name, xp = kinds[0]
    if len(present) > 1 and name != "numpy":  # NumPy has one device
        devices = []
        for a in present:
            d = _device(a, name)
            if all(d != e for e in devices):
                devices.append(d)
        if len(devices) > 1:
            raise ValueError(
                f"{where}: arrays on different devices in one call ({', '.join(map(str, devices))}); "
                "move them to one device first, no silent copy is made"
            )
    return xp


# Array type -> (library name, namespace). Every op asks for the namespace of
# its arguments, several times per layer, and on a GPU these Python checks
# add up with the launch overhead; the answer only depends on the type.
_KINDS: dict[type, tuple[str, ModuleType]] = {}


def _kind(a, where: str) -> tuple[str, ModuleType]:
    """``(library name, namespace)`` of array ``a``, cached by type; TypeError naming ``where`` for a non-array."""
    kind = _KINDS.get(type(a))
    if kind is None:
        if isinstance(a, (bool, int, float, complex)) or not _is_array(a):
            raise TypeError(f"{where}: expected an array, got {type(a).__name__}")
        kind = (_backend_of(a), array_api_compat.array_namespace(a))
        _KINDS[type(a)] = kind
    return kind


def _is_array(x) -> bool:
    try:
        return array_api_compat.is_array_api_obj(x)
    except Exception:  # pragma: no cover - defensive
        return False


def backend_name(x) -> str:
    """Name of the library that owns array ``x`` (``"numpy"``, ``"cupy"``, ...)."""
    return _backend_of(x)


def device(x):
    """The device array ``x`` lives on."""
    kind = _KINDS.get(type(x))
    return _device(x, kind[0]) if kind is not None else array_api_compat.device(x)


def _device(x, name: str):
    """``array_api_compat.device(x)`` without its chain of type tests, for the libraries named here."""
    if name == "numpy":
        return "cpu"
    if name in ("cupy", "torch", "array_api_strict"):
        return x.device  # what array_api_compat.device returns for them
    return array_api_compat.device(x)


def is_numpy(xp: ModuleType) -> bool:
    """True when ``xp`` is NumPy's namespace (plain or array-api-compat wrapped)."""
    return array_api_compat.is_numpy_namespace(xp)


def is_cupy(xp: ModuleType) -> bool:
    """True when ``xp`` is CuPy's namespace."""
    return array_api_compat.is_cupy_namespace(xp)


def is_torch(xp: ModuleType) -> bool:
    """True when ``xp`` is PyTorch's namespace."""
    return array_api_compat.is_torch_namespace(xp)


def cupy_status() -> tuple[bool, str]:
    """Whether CuPy can run here, and why not when it cannot.

    Imports CuPy only when called and runs one tiny kernel, so a broken driver
    is found here and not in the middle of training.
    """
    try:
        cupy = importlib.import_module("cupy")
    except ImportError as exc:
        return False, f"CuPy not installed ({exc.__class__.__name__}: {exc})"
    except Exception as exc:  # a CuPy build for the wrong CUDA raises at import
        return False, f"CuPy failed to import ({exc.__class__.__name__}: {exc})"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return False, f"CUDA driver error ({exc.__class__.__name__}: {exc})"
    if n < 1:
        return False, "no CUDA device visible"
    try:
        (cupy.arange(4, dtype=cupy.float32) * 2).sum().item()
    except Exception as exc:
        return False, f"CUDA device failed a test kernel ({exc.__class__.__name__}: {exc})"
    name = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"]
    if isinstance(name, bytes):
        name = name.decode()
    return True, f"CUDA device {cupy.cuda.Device().id}: {name}"


def resolve_backend(name: str = "auto") -> tuple[str, str]:
    """Resolve a backend name to a concrete one, with the reason for the choice.

    Returns ``(name, reason)``; ``"auto"`` becomes ``"cupy"`` when a CUDA device
    works, else ``"numpy"``. An explicit ``"cupy"`` that cannot run raises
    :class:`BackendUnavailableError`.
    """
    if name == "auto":
        ok, why = cupy_status()
        if ok:
            return "cupy", f"using CuPy on {why}"
        return "numpy", f"{why}; using NumPy on the CPU"
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of 'auto', {', '.join(map(repr, BACKENDS))}")
    get_namespace(name)
    if name == "cupy":
        return name, f"using CuPy on {cupy_status()[1]}"
    return name, f"using {name} on the CPU (asked for)"


def get_namespace(name: str) -> ModuleType:
    """The array-API namespace for a backend name (see the module docstring)."""
    if name == "auto":
        name = resolve_backend("auto")[0]
    if name == "numpy":
        import array_api_compat.numpy as xp

        return xp
    if name == "cupy":
        ok, why = cupy_status()
        if not ok:
            raise BackendUnavailableError(f"backend 'cupy' cannot run here: {why}")
        import array_api_compat.cupy as xp

        return xp
    if name == "torch":
        try:
            import array_api_compat.torch as xp
        except ImportError as exc:
            raise BackendUnavailableError(f"backend 'torch' cannot run here: PyTorch not installed ({exc})") from None
        return xp
    if name == "array_api_strict":
        try:
            import array_api_strict as xp
        except ImportError as exc:
            raise BackendUnavailableError(
                f"backend 'array_api_strict' cannot run here: not installed ({exc})"
            ) from None
        return xp
    raise ValueError(f"unknown backend {name!r}; expected one of 'auto', {', '.join(map(repr, BACKENDS))}")


def _default_device(xp: ModuleType):
    if is_torch(xp):
        return "cpu"
    if is_cupy(xp):
        return None  # the current CUDA device
    if is_numpy(xp):
        return "cpu"
    return None


def asarray(a, xp: ModuleType, *, dtype=None, device=None):
    """Convert ``a`` (NumPy or any array) to an array of namespace ``xp``.

    ``dtype`` is a dtype name (``"float32"``), a NumPy dtype or an ``xp``
    dtype. Goes through the host when the libraries differ: an explicit
    conversion the caller asked for (moving a model or a batch), never one made
    behind a user's back inside an op.
    """
    dtype = _as_xp_dtype(xp, dtype)
    if _is_array(a) and not isinstance(a, np.ndarray):
        if _backend_of(a) == library_name(xp):
            out = a if dtype is None else xp.astype(a, dtype)
            return out if device is None else array_api_compat.to_device(out, device)
        a = to_numpy(a)
    a = np.asarray(a)
    if is_numpy(xp):
        return np.array(a, dtype=dtype, copy=True)
    if device is None:
        device = _default_device(xp)
    if device is None:
        return xp.asarray(a, dtype=dtype, copy=True)
    return xp.asarray(a, dtype=dtype, device=device, copy=True)


_LIBRARIES: dict = {}  # namespace -> library name


def library_name(xp: ModuleType) -> str:
    """The library behind namespace ``xp``: ``"numpy"``, ``"cupy"``, ``"torch"`` or ``"array_api_strict"``.

    What :mod:`portable_cnn.dispatch` keys its kernels by. Cached per
    namespace: it is asked on every op call.

    >>> library_name(get_namespace("numpy"))
    'numpy'
    """
    name = _LIBRARIES.get(xp)
    if name is None:
        if is_numpy(xp):
            name = "numpy"
        elif is_cupy(xp):
            name = "cupy"
        elif is_torch(xp):
            name = "torch"
        else:  # array_api_strict, or another library of the standard
            name = xp.__name__.split(".")[0]
        _LIBRARIES[xp] = name
    return name


def _as_xp_dtype(xp: ModuleType, dtype):
    """Map a dtype name or NumPy dtype to ``xp``'s dtype object."""
    if dtype is None:
        return None
    if isinstance(dtype, (str, np.dtype)) or (isinstance(dtype, type) and issubclass(dtype, np.generic)):
        return getattr(xp, np.dtype(dtype).name)
    return dtype


def to_numpy(x) -> np.ndarray:
    """Copy an array of any backend to a NumPy array on the host."""
    if isinstance(x, np.ndarray):
        return x
    if array_api_compat.is_cupy_array(x):
        return x.get()
    if array_api_compat.is_torch_array(x):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def synchronize(x_or_xp: Any) -> None:
    """Wait for the device of an array (or namespace) to finish its queued work.

    A no-op on the CPU; benchmarks call it before every clock read.
    """
    xp = x_or_xp if isinstance(x_or_xp, ModuleType) else namespace(x_or_xp)
    if is_cupy(xp):
        importlib.import_module("cupy").cuda.get_current_stream().synchronize()
    elif is_torch(xp):
        torch = importlib.import_module("torch")
        if torch.cuda.is_available():
            torch.cuda.synchronize()


def is_floating(xp: ModuleType, x) -> bool:
    """True for a real floating-point array."""
    return xp.isdtype(x.dtype, "real floating")


def dtype_name(x) -> str:
    """A short dtype name for error messages (``"float32"``)."""
    return dtype_name_of(x.dtype)


def dtype_name_of(dtype) -> str:
    """The short name of a dtype object of any library (``"float32"``)."""
    # torch says "torch.float32", array_api_strict "array_api_strict.float32".
    return str(dtype).rsplit(".", 1)[-1]


def random_uniform(xp: ModuleType, shape, rng, *, dtype=None, device=None):
    """Uniform random numbers in ``[0, 1)`` as an ``xp`` array, drawn from a seeded NumPy generator.

    Parameters
    ----------
    xp : namespace
        The array library of the result (from :func:`namespace`).
    shape : tuple of int
    rng : numpy.random.Generator or int
        The source of randomness. NumPy and ``array_api_strict`` draw from it
        directly; CuPy and PyTorch draw one 63-bit seed from it and generate
        the numbers on their own device, so no large host-to-device copy is
        made. One seed therefore gives the same sequence of draws on one
        backend, not the same numbers on two.
    dtype : dtype or dtype name, optional
        A real floating dtype; float64 when omitted.
    device : optional
        The device of the result; the library's default when omitted.

    Returns
    -------
    array of ``shape``

    >>> import numpy as np
    >>> u = random_uniform(get_namespace("numpy"), (2, 3), np.random.default_rng(0), dtype="float32")
    >>> u.shape, u.dtype.name, bool(((0 <= u) & (u < 1)).all())
    ((2, 3), 'float32', True)
    """
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    shape = tuple(int(n) for n in shape)
    name = "float64" if dtype is None else str(dtype).rsplit(".", 1)[-1]
    if name not in ("float32", "float64"):
        raise TypeError(f"random_uniform: expected dtype float32 or float64, got {name}")
    if is_numpy(xp):
        return rng.random(shape, dtype=np.dtype(name))
    if is_cupy(xp):
        cupy = importlib.import_module("cupy")
        # A NumPy uint64: CuPy checks the seed with a "safe" cast to uint64, which
        # NumPy 2 refuses for a Python int (int64).
        seed = np.uint64(rng.integers(2**63))
        # Philox is counter based: seeding it per call costs nothing, unlike XORWOW.
        method = cupy.cuda.curand.CURAND_RNG_PSEUDO_PHILOX4_32_10
        if device is None:
            return cupy.random.RandomState(seed, method=method).random_sample(shape, dtype=np.dtype(name))
        with device:
            return cupy.random.RandomState(seed, method=method).random_sample(shape, dtype=np.dtype(name))
    if is_torch(xp):
        torch = importlib.import_module("torch")
        device = torch.device("cpu" if device is None else device)
        generator = torch.Generator(device=device)
        generator.manual_seed(int(rng.integers(2**63)))
        return torch.rand(shape, generator=generator, dtype=getattr(torch, name), device=device)
    out = rng.random(shape, dtype=np.dtype(name))
    return xp.asarray(out) if device is None else xp.asarray(out, device=device)


# COMPUTE_TYPE_DEFAULT and COMPUTE_TYPE_TF32 of cupy._core._routines_linalg (private), if it stops exporting them.
_CUPY_DEFAULT_COMPUTE, _CUPY_TF32 = 1, 7


def set_tf32(enabled: bool) -> None:
    """Allow (``True``) or forbid (``False``) TF32 in CuPy's float32 matrix products.

    TF32 tensor cores round the GEMM inputs to 10 mantissa bits: several times
    faster on Ampere and later GPUs, but results then differ from the CPU's by
    about 1e-3 relative instead of float32's 1e-6. It is off unless asked for
    (CuPy's default, unless ``CUPY_TF32=1`` is set in the environment), so GPU
    results agree with NumPy within the float32 tolerances.

    CuPy reads the ``CUPY_TF32`` environment variable at its first float32
    GEMM; this sets the variable and, when CuPy is already imported, its
    compute type for float32 directly, so it takes effect either way. It does
    not import CuPy, and it does not touch PyTorch (whose switch is
    ``torch.backends.cuda.matmul``). Float64 is never affected.

    >>> import os
    >>> set_tf32(False); os.environ["CUPY_TF32"], tf32_enabled()
    ('0', False)
    """
    import os
    import sys

    os.environ["CUPY_TF32"] = "1" if enabled else "0"
    if sys.modules.get("cupy") is not None:  # imported (None marks an import that failed)
        linalg = importlib.import_module("cupy._core._routines_linalg")
        tf32 = getattr(linalg, "COMPUTE_TYPE_TF32", _CUPY_TF32)
        default = getattr(linalg, "COMPUTE_TYPE_DEFAULT", _CUPY_DEFAULT_COMPUTE)
        linalg.set_compute_type(np.float32, tf32 if enabled else default)


def tf32_enabled() -> bool:
    """Whether CuPy's float32 matrix products may use TF32 (see :func:`set_tf32`)."""
    import os
    import sys

    if sys.modules.get("cupy") is not None:  # imported (None marks an import that failed)
        linalg = importlib.import_module("cupy._core._routines_linalg")
        return linalg.get_compute_type(np.float32) == getattr(linalg, "COMPUTE_TYPE_TF32", _CUPY_TF32)
    try:
        return int(os.environ.get("CUPY_TF32", "0")) > 0  # as CuPy reads it
    except ValueError:
        return False
