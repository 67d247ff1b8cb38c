"""Every CUDA kernel of kernels/cupy, compiled with NVRTC and run on the CPU against the reference, without a GPU.

Two checks, on any machine:

* **NVRTC.** Every source of ``compile.SOURCES`` (with ``common.cuh``, all
  its template instantiations: float and double, int and long long
  indices) and every elementwise body of ``elementwise.ELEMENTWISE_SOURCES``
  is compiled by NVRTC (the ``cuda-bindings`` and ``nvidia-cuda-nvrtc``
  wheels of the ``cuda-compile`` extra, part of ``test``) for each architecture of
  :data:`ARCHITECTURES`: to PTX for the oldest, the front end only
  (``-fdevice-syntax-only``, about ten times faster) for the others, which
  sees every template instantiation and everything that depends on
  ``__CUDA_ARCH__``. Skipped, with the reason, where the wheels are absent.
* **The kernels on the CPU.** The same CUDA text is compiled as C++ (the
  C++ compiler ``$CXX``, else ``c++``, ``g++`` or ``clang++``) after
  :data:`PRELUDE`, which defines ``__global__`` and friends away and makes
  ``threadIdx``/``blockIdx``/``blockDim``/``gridDim`` variables. A
  launcher runs the kernel for every (block, thread) of a small grid, one
  after the other, so each grid-stride loop wraps around; the kernels share
  no memory between threads, so that order is as good as any. The
  arguments arrive as CUDA's ``void** kernelParams`` do, and are checked
  against the kernel's parameter types (an int32 where the kernel reads a
  64-bit stride would be garbage on a GPU too). Each case calls the op
  body of kernels/cupy (``im2col_on``, ``max_pool2d_forward_on``, ...) on a
  :class:`~portable_cnn.kernels.cupy.compile.KernelRunner` made of NumPy
  and these CPU kernels: the Python code that builds the argument lists
  is the GPU's own. Results are compared with kernels/reference on random
  problems: uneven strides, padding, dilation, channels-last, strided and
  negatively strided inputs, NaN and ties, float32 and float64, both index
  types. Elementwise bodies (``cupy.ElementwiseKernel``) are wrapped in a
  loop over ``i`` as CuPy does. Skipped, with the reason, where no C++
  compiler is found.

Where ``PORTABLE_CNN_REQUIRE_CUDA_CHECKS=1`` (CI sets it), a missing NVRTC
or C++ compiler fails these tests instead of skipping them.

The C++ build is done once per session (a module-scoped fixture, in a
temporary folder), two or three seconds on two cores.

Adding a CUDA kernel
--------------------
1. Put it in a source of ``kernels/cupy/cuda/`` listed in
   ``compile.SOURCES`` (a new file: a new entry). It is then compiled by
   NVRTC and as C++ with nothing more to do. Use only what :data:`PRELUDE`
   provides; add a CUDA built-in it lacks there (``__syncthreads`` and
   shared memory cannot be run thread after thread, so they are absent).
2. Write its CuPy op as a thin wrapper around an ``<op>_on(run, ...)`` body
   that allocates with ``run.lib`` and calls ``run.launch(...)`` (or
   ``run.elementwise(SOURCE)`` for an :class:`ElementwiseSource`, which
   also goes into ``ELEMENTWISE_SOURCES``), as ``conv.im2col_on`` does.
3. Add one :class:`Case` to :data:`CASES`: the kernels it launches, a
   ``draw(rng, dtype)`` of a random problem (reuse :func:`draw_conv` or
   :func:`draw_pool`), ``run(runner, problem)`` calling the ``_on`` body and
   ``reference(problem)`` calling kernels/reference, both returning dicts of
   arrays. ``test_every_cuda_kernel_has_a_case`` fails until every kernel
   has one.

A kernel that writes out of bounds may crash the interpreter instead of
failing a test; pytest's fault handler then prints the test that ran.
"""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
from conftest import tol

from portable_cnn import backend as B
from portable_cnn.geometry import AdaptivePoolGeometry, ConvGeometry, PoolGeometry
from portable_cnn.kernels.cupy import compile as cupy_compile
from portable_cnn.kernels.cupy import conv as cupy_conv
from portable_cnn.kernels.cupy import elementwise as cupy_elementwise
from portable_cnn.kernels.cupy import pool as cupy_pool
from portable_cnn.kernels.cupy.compile import ElementwiseSource, KernelRunner
from portable_cnn.kernels.reference import activation as reference_activation
from portable_cnn.kernels.reference import conv as reference_conv
from portable_cnn.kernels.reference import optim as reference_optim
from portable_cnn.kernels.reference import pool as reference_pool
from portable_cnn.kernels.reference import softmax as reference_softmax

XP = B.get_namespace("numpy")
REQUIRED = os.environ.get("PORTABLE_CNN_REQUIRE_CUDA_CHECKS") == "1"
DTYPES = ("float32", "float64")

# Compute capabilities compiled for: the oldest that CUDA 13 (CuPy 14's
# cupy-cuda13x) still supports, 7.5 (Turing: T4, RTX 20), then one of each
# later family: 8.0 (A100), 8.6 (RTX 30, A10), 8.9 (Ada: L4, RTX 40), 9.0
# (Hopper: H100, H200), 10.0 (Blackwell: B200) and 12.0 (RTX 50). CUDA 12
# builds (cupy-cuda12x) also run on 5.0-7.2, which NVRTC 13 no longer
# accepts; the kernels use nothing those lack (no atomics, no half types).
ARCHITECTURES = (75, 80, 86, 89, 90, 100, 120)
# Code generation takes most of NVRTC's time (seconds per architecture):
# done for the oldest, whose lack of an intrinsic would show first.
FULL_BUILD_ARCHITECTURES = (ARCHITECTURES[0],)

# --------------------------------------------------------------------------- the CUDA text


@dataclass(frozen=True)
class Unit:
    """One translation unit: CUDA text and the template instantiations (name expressions) to build."""

    name: str
    text: str
    expressions: tuple[str, ...]
    options: tuple[str, ...] = ()


_CUDA_TYPES = {"T": "T", "int32": "int", "int64": "long long", "float32": "float", "float64": "double", "bool": "bool"}
_NUMPY_TYPES = {"int32": np.dtype("int32"), "int64": np.dtype("int64"), "float32": np.dtype("float32"),
                "float64": np.dtype("float64"), "bool": np.dtype("bool")}


@dataclass(frozen=True)
class Param:
    """One parameter of a ``cupy.ElementwiseKernel``: ``[raw] type name``."""

    raw: bool
    type: str
    name: str


def parse_params(text: str) -> list[Param]:
    """``"T p, raw int64 labels"`` as :class:`Param` objects."""
    params = []
    for item in text.split(","):
        words = item.split()
        raw = words[0] == "raw"
        type_, name = words[1:] if raw else words
        params.append(Param(raw, type_, name))
    return params


def elementwise_cuda(source: ElementwiseSource) -> str:
    """``source`` as a CUDA kernel template over ``T``, shaped as CuPy generates it.

    One thread per flat index ``i`` of the (broadcast, C-ordered) output;
    inputs are read at ``i`` into variables of their own name, outputs are
    references to element ``i``, raw inputs are pointers.
    """
    ins, outs = parse_params(source.in_params), parse_params(source.out_params)
    params, loads = ["const long long portable_cnn_size"], []
    for p in ins:
        ctype = _CUDA_TYPES[p.type]
        if p.raw:
            params.append(f"const {ctype}* __restrict__ {p.name}")
        else:
            params.append(f"const {ctype}* __restrict__ {p.name}_array")
            loads.append(f"const {ctype} {p.name} = {p.name}_array[i];")
    for p in outs:
        ctype = _CUDA_TYPES[p.type]
        params.append(f"{ctype}* __restrict__ {p.name}_array")
        loads.append(f"{ctype}& {p.name} = {p.name}_array[i];")
    body = "\n        ".join([*loads, source.body.strip().rstrip(";") + ";"])
    return (
        f"template <typename T>\n__global__ void portable_cnn_{source.name}({', '.join(params)}) {{\n"
        "    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < portable_cnn_size;\n"
        "         i += (long long)blockDim.x * gridDim.x) {\n"
        f"        {body}\n    }}\n}}\n"
    )


def elementwise_expressions(source: ElementwiseSource) -> tuple[str, ...]:
    return tuple(f"portable_cnn_{source.name}<{t}>" for t in cupy_compile.C_TYPES.values())


def units(*, elementwise_together: bool = False) -> list[Unit]:
    """Every CUDA source of kernels/cupy: the files of ``compile.SOURCES``, then the elementwise bodies.

    Each body is a unit of its own (with its options), or with
    ``elementwise_together`` all are one (for one C++ compiler run).
    """
    found = [Unit(name, cupy_compile.source(name), tuple(cupy_compile.name_expressions(name)))
             for name in cupy_compile.SOURCES]
    sources = cupy_elementwise.ELEMENTWISE_SOURCES
    if elementwise_together:
        return found + [Unit("elementwise.py", "\n".join(elementwise_cuda(s) for s in sources),
                             tuple(e for s in sources for e in elementwise_expressions(s)))]
    return found + [Unit(f"elementwise.py {s.name}", elementwise_cuda(s), elementwise_expressions(s), s.options)
                    for s in sources]


def in_parallel(function, items) -> list:
    """``[function(item) for item in items]`` on a thread per core (NVRTC and subprocesses release the GIL)."""
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return list(pool.map(function, items))


def every_kernel() -> set[str]:
    """Names of every CUDA kernel: those of ``compile.SOURCES`` and the elementwise sources'."""
    raw = {k for kernels in cupy_compile.SOURCES.values() for k in kernels}
    fused = {s.name for s in cupy_elementwise.ELEMENTWISE_SOURCES}
    assert not raw & fused, f"kernel names used twice: {sorted(raw & fused)}"
    return raw | fused


# --------------------------------------------------------------------------- NVRTC


def unavailable(reason: str):
    """Skip with ``reason``; fail instead where the checks are required (:data:`REQUIRED`)."""
    if REQUIRED:
        pytest.fail(f"{reason} (PORTABLE_CNN_REQUIRE_CUDA_CHECKS=1)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def nvrtc():
    """NVRTC from the cuda-bindings and nvidia-cuda-nvrtc wheels; skips where they are absent."""
    try:
        from cuda.bindings import nvrtc as module
    except ImportError as exc:
        unavailable(f"cuda-bindings not installed ({exc}): pip install -e '.[cuda-compile]'")
    try:
        module.nvrtcVersion()
    except Exception as exc:  # the bindings load libnvrtc on first call: the nvidia-cuda-nvrtc wheel may be missing
        unavailable(f"NVRTC library not loadable ({type(exc).__name__}: {exc}): pip install nvidia-cuda-nvrtc")
    return module


def nvrtc_build(nvrtc, unit: Unit, arch: int, full: bool) -> str | None:
    """Compile ``unit`` for ``compute_<arch>``; the error log, or None when it compiled (and, ``full``, lowered every name)."""

    def check(result):
        err, *rest = result if isinstance(result, tuple) else (result,)
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise RuntimeError(f"NVRTC call failed: {err}")
        return rest[0] if rest else None

    program = check(nvrtc.nvrtcCreateProgram(unit.text.encode(), unit.name.encode(), 0, [], []))
    try:
        for expression in unit.expressions:
            check(nvrtc.nvrtcAddNameExpression(program, expression.encode()))
        options = [f"--gpu-architecture=compute_{arch}", *unit.options, *([] if full else ["-fdevice-syntax-only"])]
        status = nvrtc.nvrtcCompileProgram(program, len(options), [o.encode() for o in options])[0]
        log = b" " * check(nvrtc.nvrtcGetProgramLogSize(program))
        check(nvrtc.nvrtcGetProgramLog(program, log))
        if status != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            return log.decode(errors="replace").strip("\0 \n")
        if full:
            missing = [e for e in unit.expressions
                       if nvrtc.nvrtcGetLoweredName(program, e.encode())[0] != nvrtc.nvrtcResult.NVRTC_SUCCESS]
            if missing:
                return f"compiled, but without the instantiations {missing}"
        return None
    finally:
        nvrtc.nvrtcDestroyProgram(program)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_cuda_source_compiles_with_nvrtc(nvrtc, arch):
    """Every source and elementwise body, every instantiation, for ``compute_<arch>``: no compile error."""
    supported = nvrtc.nvrtcGetSupportedArchs()[1]
    if arch not in supported:
        pytest.skip(f"this NVRTC ({nvrtc.nvrtcVersion()[1:]}) does not compile for compute_{arch}")
    full = arch in FULL_BUILD_ARCHITECTURES
    all_units = units()
    logs = in_parallel(lambda unit: nvrtc_build(nvrtc, unit, arch, full), all_units)
    failures = {unit.name: log for unit, log in zip(all_units, logs) if log is not None}
    assert not failures, "\n\n".join(f"{name} (compute_{arch}):\n{log}" for name, log in failures.items())


def test_nvrtc_reports_a_broken_kernel(nvrtc):
    """The check itself: a kernel with a type error in one instantiation fails, front end alone or full."""
    text = "template <typename T>\n__global__ void broken(T* x) { x[0] = x[0].field; }\n"
    unit = Unit("broken.cu", text, ("broken<float>",))
    for full in (False, True):
        log = nvrtc_build(nvrtc, unit, ARCHITECTURES[0], full)
        assert log is not None and "class type" in log, log


# --------------------------------------------------------------------------- the kernels as C++ on the CPU

# CUDA's kernel dialect as plain C++: qualifiers defined away, the thread
# coordinates as variables the launcher sets, CUDA's math functions.
PRELUDE = r"""
#include <cmath>
#include <cstddef>
#include <type_traits>
#include <utility>
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
struct portable_cnn_dim3 { unsigned x, y, z; };
static portable_cnn_dim3 threadIdx = {0, 0, 0}, blockIdx = {0, 0, 0}, blockDim = {1, 1, 1}, gridDim = {1, 1, 1};
using std::exp;
using std::log;
using std::sqrt;
using std::fabs;
// CUDA's min and max: overloads for every pair of arithmetic types, fminf/fmaxf for floating ones.
template <typename A, typename B>
inline typename std::common_type<A, B>::type min(A a, B b) {
    using C = typename std::common_type<A, B>::type;
    if constexpr (std::is_floating_point<C>::value) return std::fmin((C)a, (C)b);
    else return (C)a < (C)b ? (C)a : (C)b;
}
template <typename A, typename B>
inline typename std::common_type<A, B>::type max(A a, B b) {
    using C = typename std::common_type<A, B>::type;
    if constexpr (std::is_floating_point<C>::value) return std::fmax((C)a, (C)b);
    else return (C)a > (C)b ? (C)a : (C)b;
}
"""

# Runs a kernel for every (block, thread) in turn, its arguments unpacked
# from void** as cuLaunchKernel does; reports each parameter's kind ('i'
# integer, 'f' floating, 'I'/'F' pointers to them) and size (the pointee's).
LAUNCHER = r"""
template <typename... A, std::size_t... K>
static void portable_cnn_run(void (*kernel)(A...), void** args, unsigned grid, unsigned block, std::index_sequence<K...>) {
    gridDim = {grid, 1, 1};
    blockDim = {block, 1, 1};
    for (unsigned b = 0; b < grid; ++b) {
        for (unsigned t = 0; t < block; ++t) {
            blockIdx = {b, 0, 0};
            threadIdx = {t, 0, 0};
            kernel(*static_cast<std::remove_cv_t<A>*>(args[K])...);
        }
    }
}

template <typename... A>
static void portable_cnn_run(void (*kernel)(A...), void** args, unsigned grid, unsigned block) {
    portable_cnn_run(kernel, args, grid, block, std::index_sequence_for<A...>{});
}

template <typename A>
static constexpr char portable_cnn_kind() {
    using P = std::remove_cv_t<std::remove_pointer_t<A>>;
    return std::is_pointer<A>::value ? (std::is_floating_point<P>::value ? 'F' : 'I')
                                     : (std::is_floating_point<P>::value ? 'f' : 'i');
}

template <typename... A>
static int portable_cnn_signature(void (*)(A...), char* kinds, int* sizes) {
    const char k[] = {portable_cnn_kind<A>()..., '\0'};
    const int s[] = {(int)sizeof(std::remove_pointer_t<A>)..., 0};
    for (std::size_t i = 0; i < sizeof...(A); ++i) {
        kinds[i] = k[i];
        sizes[i] = s[i];
    }
    return (int)sizeof...(A);
}
"""

# A small grid, so the grid-stride loops wrap around: several blocks of a few threads.
CPU_BLOCKS, CPU_THREADS = 3, 8


def cpp_text(unit: Unit, symbols: dict[str, str]) -> str:
    """``unit`` as C++: the prelude, the CUDA text, the launcher and a run/signature pair per instantiation."""
    wrappers = [
        f'extern "C" void {symbol}(void** args, unsigned grid, unsigned block) '
        f"{{ portable_cnn_run(&{expression}, args, grid, block); }}\n"
        f'extern "C" int {symbol}_signature(char* kinds, int* sizes) '
        f"{{ return portable_cnn_signature(&{expression}, kinds, sizes); }}\n"
        for expression, symbol in symbols.items()
    ]
    return "\n".join([PRELUDE, unit.text, LAUNCHER, *wrappers])


def find_cxx() -> str | None:
    """The C++ compiler: ``$CXX``, else the first of c++, g++ and clang++ on the PATH."""
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


# -O0: the problems are small, so the compiler's time is what counts.
# -ffp-contract=off: no fused multiply-adds, which the reference's separately
# rounded operations lack (the SGD body is built with --fmad=false for that).
CXX_FLAGS = ("-std=c++17", "-O0", "-shared", "-fPIC", "-ffp-contract=off")


def _describe(kind: str, size: int) -> str:
    what = {"i": "integer", "f": "float", "I": "integer", "F": "float"}[kind]
    return f"a pointer to {size}-byte {what}s" if kind.isupper() else f"a {size}-byte {what}"


class CpuKernels:
    """Every :func:`units` translation unit built as a C++ shared library; kernels called by name expression."""

    def __init__(self, folder, cxx: str):
        self.functions: dict[str, tuple] = {}  # name expression -> (run, parameter kinds, parameter sizes)
        self.failures: dict[str, str] = {}  # unit name -> compiler output
        jobs = []
        for k, unit in enumerate(units(elementwise_together=True)):
            symbols = {e: f"portable_cnn_cpu_{k}_{j}" for j, e in enumerate(unit.expressions)}
            source, library = folder / f"unit{k}.cpp", folder / f"unit{k}.so"
            source.write_text(cpp_text(unit, symbols))
            jobs.append((unit, symbols, library, [cxx, *CXX_FLAGS, "-o", str(library), str(source)]))
        done = in_parallel(lambda job: subprocess.run(job[3], capture_output=True, text=True), jobs)
        for (unit, symbols, library, _), result in zip(jobs, done):
            if result.returncode != 0:
                self.failures[unit.name] = result.stdout + result.stderr
                continue
            loaded = ctypes.CDLL(str(library))
            for expression, symbol in symbols.items():
                run = loaded[symbol]
                run.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_uint, ctypes.c_uint]
                run.restype = None
                kinds, sizes = ctypes.create_string_buffer(64), (ctypes.c_int * 64)()
                count = loaded[f"{symbol}_signature"](kinds, sizes)
                self.functions[expression] = (run, kinds.raw[:count].decode(), list(sizes[:count]))

    def call(self, expression: str, args: tuple) -> None:
        """Run kernel ``expression`` (``"im2col<float, int>"``) over the CPU grid with CuPy-style ``args``."""
        if expression not in self.functions:
            raise AssertionError(f"no CPU build of {expression}; compiler output: {self.failures or 'none'}")
        run, kinds, sizes = self.functions[expression]
        if len(args) != len(kinds):
            raise AssertionError(f"{expression} takes {len(kinds)} arguments, the launcher passed {len(args)}")
        slots, held = (ctypes.c_void_p * len(args))(), []
        for k, arg in enumerate(args):
            if isinstance(arg, np.ndarray):
                kind, value = ("F" if arg.dtype.kind == "f" else "I"), ctypes.c_void_p(arg.ctypes.data)
                address = ctypes.addressof(value)
            elif isinstance(arg, np.generic):
                kind, value = ("f" if arg.dtype.kind == "f" else "i"), np.array(arg)
                address = value.ctypes.data
            else:
                raise AssertionError(f"{expression} argument {k}: a {type(arg).__name__}; the launch passes NumPy "
                                     "scalars and arrays, whose sizes are explicit")
            if (kind, arg.dtype.itemsize) != (kinds[k], sizes[k]):
                raise AssertionError(f"{expression} argument {k}: the kernel reads {_describe(kinds[k], sizes[k])}, "
                                     f"the launch passed {_describe(kind, arg.dtype.itemsize)} ({arg.dtype})")
            held.append(value)
            slots[k] = address
        run(slots, CPU_BLOCKS, CPU_THREADS)


@pytest.fixture(scope="module")
def cpu_kernels(tmp_path_factory):
    """The CUDA kernels built for the CPU, once per session; skips where no C++ compiler is found."""
    cxx = find_cxx()
    if cxx is None:
        unavailable("no C++ compiler found (set CXX, or install g++ or clang++): the CUDA kernels cannot run on the CPU")
    return CpuKernels(tmp_path_factory.mktemp("cuda_on_cpu"), cxx)


class CpuRunner:
    """A :class:`KernelRunner` of NumPy and :class:`CpuKernels` (``.runner``) that writes down what it launched."""

    def __init__(self, kernels: CpuKernels):
        self.kernels = kernels
        self.launched: list[str] = []
        self.runner = KernelRunner(np, self.launch, self.elementwise)

    def launch(self, kernel, dtype, total, arrays, ints, tail=()):
        """As ``compile.launch``: the same arguments, built by the same function."""
        self.launched.append(kernel)
        if total == 0:
            return
        index_type, args = cupy_compile.kernel_arguments(total, arrays, ints, tail)
        self.kernels.call(f"{kernel}<{cupy_compile.C_TYPES[str(dtype)]}, {index_type}>", args)

    def elementwise(self, source: ElementwiseSource) -> Callable:
        """``source`` called as a ``cupy.ElementwiseKernel``: inputs, then optional outputs; returns the outputs."""
        ins, outs = parse_params(source.in_params), parse_params(source.out_params)

        def kernel(*args):
            if len(args) not in (len(ins), len(ins) + len(outs)):
                raise TypeError(f"{source.name}: takes {len(ins)} inputs and optionally {len(outs)} outputs, got {len(args)}")
            for p, arg in zip(ins + outs, args):
                if not isinstance(arg, (np.ndarray, np.generic)):
                    raise AssertionError(f"{source.name}: {p.name} is a {type(arg).__name__}, not a NumPy array or scalar")
            # T is the dtype of the first argument declared T, as in CuPy; every other must match it exactly.
            T = next(arg.dtype for p, arg in zip(ins + outs, args) if p.type == "T")
            for p, arg in zip(ins + outs, args):
                expected = T if p.type == "T" else _NUMPY_TYPES[p.type]
                if arg.dtype != expected:
                    raise AssertionError(f"{source.name}: {p.name} is {p.type} ({expected}), the launch passed {arg.dtype}")
            shape = np.broadcast_shapes(*(np.shape(arg) for p, arg in zip(ins + outs, args) if not p.raw))
            inputs = [np.ascontiguousarray(arg if p.raw else np.broadcast_to(arg, shape)) for p, arg in zip(ins, args)]
            results = [np.empty(shape, dtype=T if p.type == "T" else _NUMPY_TYPES[p.type]) for p in outs]
            self.launched.append(source.name)
            size = int(np.prod(shape))
            if size:
                expression = f"portable_cnn_{source.name}<{cupy_compile.C_TYPES[str(T)]}>"
                self.kernels.call(expression, (np.int64(size), *inputs, *results))
            given = args[len(ins):]
            for out, result in zip(given, results):
                out[...] = result
            returned = given or results
            return returned[0] if len(outs) == 1 else tuple(returned)

        return kernel


# --------------------------------------------------------------------------- random problems

LAYOUTS = ("c", "last", "fortran", "strided", "flipped")


def laid_out(a: np.ndarray, layout: str) -> np.ndarray:
    """The values of ``a`` in memory order ``layout``.

    ``"c"``: C order; ``"last"``: axis 1 fastest (channels-last for 4-D);
    ``"fortran"``: Fortran order; ``"strided"``: every other element of a
    wider last axis; ``"flipped"``: the last axis stored backwards
    (negative strides).
    """
    if layout == "c" or (layout == "last" and a.ndim < 2):
        return np.ascontiguousarray(a)
    if layout == "last":
        order = (0, *range(2, a.ndim), 1)
        return np.ascontiguousarray(a.transpose(order)).transpose(np.argsort(order))  # a's shape, axis 1 fastest
    if layout == "fortran":
        return np.asfortranarray(a)
    if layout == "strided":
        wide = np.zeros((*a.shape[:-1], 2 * a.shape[-1]), dtype=a.dtype)
        wide[..., ::2] = a
        return wide[..., ::2]
    if layout == "flipped":
        return np.ascontiguousarray(a[..., ::-1])[..., ::-1]
    raise ValueError(f"unknown layout {layout!r}")


def random_array(rng, shape, dtype, *, ties=False, nan=False, zeros=False):
    """Normal values (or few distinct integers, ``ties``), with a NaN (``nan``) and zeros (``zeros``) put in."""
    a = rng.integers(0, 3, shape).astype(dtype) if ties else rng.standard_normal(shape).astype(dtype)
    if nan and a.size:
        a.flat[rng.integers(a.size)] = np.nan
    if zeros and a.size:
        a.flat[rng.integers(a.size, size=max(1, a.size // 8))] = 0
    return a


def _layout(rng) -> str:
    return str(rng.choice(LAYOUTS))


def draw_conv(rng, dtype):
    """A convolution with any strides, padding and dilation that fit: ``g``, ``x`` and columns ``cols``."""
    while True:
        N, C, K, R, S, u, v = (int(n) for n in rng.integers(1, 4, 7))
        dh, dw, H, W = (int(n) for n in rng.integers(1, [3, 3, 10, 10]))
        a, b = (int(n) for n in rng.integers(0, 3, 2))
        try:
            g = ConvGeometry.of((N, C, H, W), (K, C, R, S), (u, v), (a, b), (dh, dw))
        except ValueError:  # the dilated kernel does not fit the padded input: draw again
            continue
        x_layout, cols_layout = _layout(rng), _layout(rng)
        x = laid_out(random_array(rng, g.x_shape, dtype), x_layout)
        cols = laid_out(random_array(rng, g.cols_shape, dtype), cols_layout)
        return SimpleNamespace(g=g, x=x, cols=cols, label=f"{g}, x {x_layout}, cols {cols_layout}")


def draw_grouped_conv(rng, dtype):
    """A convolution of 1-3 groups, any strides, padding and dilation, for the channel-fastest columns and whole GEMMs.

    ``x`` is channels-last half of the time (the columns in ``(g, r, s, c')``
    order), else in another layout; ``w``, ``bias`` (or none), ``dy``, and
    ``cols_rsc``, columns in that order; ``keep`` and ``need_input_grad`` for
    the forward-backward case.
    """
    while True:
        N, G, Cg, Kg, R, S, u, v = (int(n) for n in rng.integers(1, 4, 8))
        dh, dw, H, W = (int(n) for n in rng.integers(1, [3, 3, 10, 10]))
        a, b = (int(n) for n in rng.integers(0, 3, 2))
        try:
            g = ConvGeometry.of((N, G * Cg, H, W), (G * Kg, Cg, R, S), (u, v), (a, b), (dh, dw), groups=G)
        except ValueError:  # the dilated kernel does not fit the padded input: draw again
            continue
        x_layout = "last" if rng.random() < 0.5 else _layout(rng)
        x = laid_out(random_array(rng, g.x_shape, dtype), x_layout)
        w, dy = random_array(rng, g.w_shape, dtype), laid_out(random_array(rng, g.y_shape, dtype), _layout(rng))
        bias = random_array(rng, (g.K,), dtype) if rng.random() < 0.7 else None
        cols_rsc = laid_out(random_array(rng, g.cols_shape, dtype), _layout(rng))
        keep, need_input_grad = bool(rng.random() < 0.5), bool(rng.random() < 0.8)
        label = f"{g}, x {x_layout}, bias {bias is not None}, keep {keep}, input grad {need_input_grad}"
        return SimpleNamespace(g=g, x=x, w=w, bias=bias, dy=dy, cols_rsc=cols_rsc, keep=keep,
                               need_input_grad=need_input_grad, label=label)


def draw_conv_relu(rng, dtype):
    """:func:`draw_grouped_conv` with ``x``, ``w`` and ``bias`` in halves: every sum exact in any order, zeros in ``y``.

    The ReLU's mask is then the same for the kernels and the reference (no
    rounding puts an output on the other side of zero), ties at zero included.
    """
    p = draw_grouped_conv(rng, dtype)
    for a in (p.x, p.w, p.bias):
        if a is not None:
            a[...] = np.round(a * 2) / 2
    return p


def rsc_from_crs(cols, g):
    """Reference columns ``(c, r, s)`` reordered to ``(g, r, s, c')``, the channel within its group fastest."""
    rows = cols.shape[0]
    return np.reshape(np.transpose(np.reshape(cols, (rows, g.G, g.Cg, g.R, g.S)), (0, 1, 3, 4, 2)), (rows, -1))


def crs_from_rsc(cols, g):
    """The inverse of :func:`rsc_from_crs`."""
    rows = cols.shape[0]
    return np.reshape(np.transpose(np.reshape(cols, (rows, g.G, g.R, g.S, g.Cg)), (0, 1, 4, 2, 3)), (rows, -1))


def draw_depthwise(rng, dtype):
    """A depthwise convolution (``groups == C``, multiplier ``K/C`` of 1 to 3), any strides, padding and dilation.

    ``x``, ``w``, ``dy`` in random layouts, a bias or none, an empty batch at
    times, and ``min_chunk``: how few positions a weight-gradient chunk may
    hold (small values make many chunks and a short last one).
    """
    while True:
        N = 0 if rng.random() < 0.1 else int(rng.integers(1, 4))
        C, M, R, S, u, v = (int(n) for n in rng.integers(1, 4, 6))
        dh, dw, H, W = (int(n) for n in rng.integers(1, [3, 3, 10, 10]))
        a, b = (int(n) for n in rng.integers(0, 3, 2))
        try:
            g = ConvGeometry.of((N, C, H, W), (C * M, 1, R, S), (u, v), (a, b), (dh, dw), groups=C)
        except ValueError:  # the dilated kernel does not fit the padded input: draw again
            continue
        layouts = {name: _layout(rng) for name in ("x", "w", "dy")}
        x, w, dy = (laid_out(random_array(rng, shape, dtype), layouts[name])
                    for name, shape in (("x", g.x_shape), ("w", g.w_shape), ("dy", g.y_shape)))
        bias = random_array(rng, (g.K,), dtype) if rng.random() < 0.7 else None
        min_chunk = int(rng.choice([1, 3, 32]))
        label = f"{g}, {layouts}, bias {bias is not None}, min_chunk {min_chunk}"
        return SimpleNamespace(g=g, x=x, w=w, bias=bias, dy=dy, min_chunk=min_chunk, label=label)


def draw_pool(rng, dtype, kind):
    """A ``kind`` ("max", "avg") pooling problem with any of PyTorch's options: ``g``, ``x``, ``dy``, an ``argmax``.

    ``x`` has ties or a NaN at times; ``argmax`` is the reference's, as the
    backward may get it (int8 from NumPy's fast path, any layout). One
    problem in six has windows of more than 127 taps (NumPy's int64 argmax;
    long loops here).
    """
    large = rng.random() < 1 / 6
    while True:
        R, S = (int(n) for n in rng.integers(*((11, 14) if large else (1, 5)), 2))
        u, v = (int(n) for n in rng.integers(1, 4, 2))
        a, b = int(rng.integers(0, R // 2 + 1)), int(rng.integers(0, S // 2 + 1))
        N, C = (int(n) for n in rng.integers(1, 4, 2))
        H, W = (int(n) for n in rng.integers(*((9, 16) if large else (1, 10)), 2))
        options = {"ceil_mode": bool(rng.random() < 0.3)}
        if kind == "max" and not large:
            options["dilation"] = tuple(int(n) for n in rng.integers(1, 3, 2))
        if kind == "avg":
            options["count_include_pad"] = bool(rng.random() < 0.5)
            options["divisor_override"] = int(rng.integers(1, 10)) if rng.random() < 0.2 else None
        try:
            g = PoolGeometry.of((N, C, H, W), (R, S), (u, v), (a, b), **options)
        except ValueError:  # the window does not fit the padded input: draw again
            continue
        x_layout, dy_layout, argmax_layout = _layout(rng), _layout(rng), _layout(rng)
        x = random_array(rng, g.x_shape, dtype, ties=rng.random() < 0.3, nan=rng.random() < 0.2)
        argmax = np.asarray(reference_pool.max_pool2d_forward(XP, x, g)[1])
        narrow = g.taps <= 127 and rng.random() < 0.5
        argmax = laid_out(argmax.astype(np.int8) if narrow else argmax, argmax_layout)
        dy = laid_out(random_array(rng, g.y_shape, dtype), dy_layout)
        label = f"{g}, x {x_layout}, dy {dy_layout}, argmax {argmax.dtype} {argmax_layout}"
        return SimpleNamespace(g=g, x=laid_out(x, x_layout), dy=dy, argmax=argmax, label=label)


def draw_global_pool(rng, dtype):
    """Global average pooling: ``g`` (an adaptive geometry to 1x1), ``x`` and ``dy`` in any layout, batches from 0."""
    N, C, H, W = (int(n) for n in rng.integers([0, 1, 1, 1], [4, 5, 10, 10]))
    g = AdaptivePoolGeometry.of((N, C, H, W), 1)
    x_layout, dy_layout = _layout(rng), _layout(rng)
    x = laid_out(random_array(rng, g.x_shape, dtype, nan=rng.random() < 0.1), x_layout)
    dy = laid_out(random_array(rng, g.y_shape, dtype), dy_layout)
    return SimpleNamespace(g=g, x=x, dy=dy, label=f"{g}, x {x_layout}, dy {dy_layout}")


def draw_logits(rng, dtype):
    """``(N, K)`` logits (at times large) in any layout, labels (int64 or int32, some ignored), a reduction, ``dloss``.

    The fused kernels take class labels, no weights or smoothing, and an
    ``ignore_index`` outside ``[0, K)``; other cases run the reference.
    """
    N, K = int(rng.integers(1, 10)), int(rng.integers(1, 8))
    scale = 30.0 if rng.random() < 0.3 else 1.0
    layout = str(rng.choice(("c", "fortran", "strided", "flipped")))
    logits = laid_out(random_array(rng, (N, K), dtype) * np.asarray(scale, dtype=dtype), layout)
    ignore_index = int(rng.choice([-100, K, K + 3]))
    labels = rng.integers(0, K, N)
    labels[rng.random(N) < 0.2] = ignore_index
    labels = labels.astype(rng.choice([np.int64, np.int32]))
    reduction = str(rng.choice(["mean", "sum", "none"]))
    probs = np.asarray(reference_softmax.softmax_forward(XP, random_array(rng, (N, K), dtype), 1))
    # A float, or the loss's shape on the device: 0-d, or (N,) for "none".
    dloss = float(rng.uniform(0.1, 3.0)) if rng.random() < 0.5 else \
        random_array(rng, (N,) if reduction == "none" else (), dtype)
    label = f"N={N} K={K} logits x{scale} {layout}, labels {labels.dtype}, ignore {ignore_index}, {reduction}"
    return SimpleNamespace(logits=logits, labels=labels, probs=probs, dloss=dloss, ignore_index=ignore_index,
                           reduction=reduction, label=label)


def draw_elementwise(rng, dtype):
    """Arrays ``x``, ``dy`` of one random shape and layout (zeros and a NaN in ``x``), and SGD settings."""
    shape = tuple(int(n) for n in rng.integers(1, 6, int(rng.integers(1, 5))))
    layout = _layout(rng)
    x = laid_out(random_array(rng, shape, dtype, zeros=True, nan=rng.random() < 0.3), layout)
    dy, grad, buf = (laid_out(random_array(rng, shape, dtype), _layout(rng)) for _ in range(3))
    sgd = {"lr": float(rng.uniform(0.01, 0.5)), "momentum": float(rng.uniform(0.1, 0.99)),
           "dampening": float(rng.choice([0.0, rng.uniform(0, 0.5)])),
           "weight_decay": float(rng.choice([0.0, rng.uniform(0, 0.1)])), "nesterov": bool(rng.random() < 0.5)}
    return SimpleNamespace(x=x, dy=dy, grad=grad, buf=buf, sgd=sgd, label=f"shape {shape} x {layout}, {sgd}")


# --------------------------------------------------------------------------- the cases


@dataclass(frozen=True)
class Case:
    """One op body of kernels/cupy on the CPU against the reference.

    ``kernels``: the CUDA kernels it launches; ``draw(rng, dtype)``: a random
    problem with a ``label``; ``run(runner, problem)`` and
    ``reference(problem)``: dicts of the same arrays; ``exact``: the keys
    compared bit for bit (the rest to ``conftest.tol``).
    """

    kernels: tuple[str, ...]
    draw: Callable
    run: Callable
    reference: Callable
    exact: tuple[str, ...] = ()


def _depthwise_backward(run, p):
    with mock.patch.object(cupy_conv, "_MIN_CHUNK", p.min_chunk):
        dx, dw = cupy_conv.depthwise_backward_on(run, p.dy, p.x, p.w, p.g)
    return {"dx": dx, "dw": dw}


def _depthwise_backward_reference(p):
    dx, dw, _ = reference_conv.conv2d_backward(XP, p.dy, p.x, p.w, p.g, has_bias=False)
    return {"dx": dx, "dw": dw}


def _conv_gemm(run, p):
    """The whole non-depthwise forward and backward bodies: columns kept or not, in the layout x's memory picks."""
    y, saved = cupy_conv.conv2d_forward_on(run, XP, p.x, p.w, p.bias, p.g, keep_cols=p.keep)
    assert (saved is not None) == p.keep
    if saved is not None:
        assert saved.layout == (cupy_conv.RSC_LAYOUT if cupy_compile.channels_last(p.x) else cupy_conv.COLUMN_LAYOUT)
    dx, dw, db = cupy_conv.conv2d_backward_on(run, XP, p.dy, p.x, p.w, p.g, saved, has_bias=p.bias is not None,
                                              need_input_grad=p.need_input_grad)
    out = {"y": y, "dw": dw, **({"db": db} if p.bias is not None else {})}
    return {**out, "dx": dx} if p.need_input_grad else out


def _conv_gemm_reference(p):
    y, _ = reference_conv.conv2d_forward(XP, p.x, p.w, p.bias, p.g)
    dx, dw, db = reference_conv.conv2d_backward(XP, p.dy, p.x, p.w, p.g, has_bias=p.bias is not None)
    out = {"y": y, "dw": dw, **({"db": db} if p.bias is not None else {})}
    return {**out, "dx": dx} if p.need_input_grad else out


def _conv_relu(run, p):
    """The forward with ``relu`` (bias and ReLU in one kernel), then the backward through that ReLU."""
    y, _ = cupy_conv.conv2d_forward_on(run, XP, p.x, p.w, p.bias, p.g, relu=True)
    dx, dw, db = cupy_conv.conv2d_backward_on(run, XP, p.dy, p.x, p.w, p.g, has_bias=p.bias is not None,
                                              need_input_grad=p.need_input_grad, relu_output=y)
    out = {"y": y, "dw": dw, **({"db": db} if p.bias is not None else {})}
    return {**out, "dx": dx} if p.need_input_grad else out


def _conv_relu_reference(p):
    """The reference's convolution, then its ReLU; backward, the ReLU's and then the convolution's."""
    z, _ = reference_conv.conv2d_forward(XP, p.x, p.w, p.bias, p.g)
    dz = reference_activation.relu_backward(XP, p.dy, z)
    dx, dw, db = reference_conv.conv2d_backward(XP, dz, p.x, p.w, p.g, has_bias=p.bias is not None)
    out = {"y": reference_activation.relu_forward(XP, z), "dw": dw, **({"db": db} if p.bias is not None else {})}
    return {**out, "dx": dx} if p.need_input_grad else out


def _max_pool_forward(run, p):
    y, argmax = cupy_pool.max_pool2d_forward_on(run, p.x, p.g)
    return {"y": y, "argmax": argmax}


def _max_pool_forward_reference(p):
    y, argmax = reference_pool.max_pool2d_forward(XP, p.x, p.g)
    return {"y": y, "argmax": argmax}


def _max_pool_relu(run, p):
    """relu(max pool) in the forward kernel, and the backward of its argmax (-1 where the ReLU stops)."""
    y, argmax = cupy_pool.max_pool2d_forward_on(run, p.x, p.g, relu=True)
    return {"y": y, "argmax": argmax, "dx": cupy_pool.max_pool2d_backward_on(run, p.dy, argmax, p.g)}


def _max_pool_relu_reference(p):
    y, argmax = reference_pool.max_pool2d_relu_forward(XP, p.x, p.g)
    return {"y": y, "argmax": argmax, "dx": reference_pool.max_pool2d_backward(XP, p.dy, argmax, p.g)}


def _loss_forward(run, p):
    loss, probs = cupy_elementwise.softmax_cross_entropy_forward_on(run, p.logits, p.labels, p.ignore_index,
                                                                    p.reduction)
    return {"loss": loss, "probs": probs}


def _loss_forward_reference(p):
    loss, probs = reference_softmax.softmax_cross_entropy_forward(
        XP, p.logits, p.labels, weight=None, ignore_index=p.ignore_index, reduction=p.reduction, label_smoothing=0.0)
    return {"loss": loss, "probs": probs}


def _loss_backward(run, p):
    dlogits = cupy_elementwise.softmax_cross_entropy_backward_on(run, p.probs, p.labels, p.dloss, p.ignore_index,
                                                                 p.reduction)
    return {"dlogits": dlogits}


def _loss_backward_reference(p):
    dlogits = reference_softmax.softmax_cross_entropy_backward(
        XP, p.probs, p.labels, p.dloss, weight=None, ignore_index=p.ignore_index, reduction=p.reduction,
        label_smoothing=0.0)
    return {"dlogits": dlogits}


def _sgd(run, p):
    param, buf = cupy_elementwise.sgd_step_on(run, p.x, p.grad, p.buf, **p.sgd)
    return {"param": param, "buf": buf}


def _sgd_reference(p):
    param, buf = reference_optim.sgd_step(XP, p.x, p.grad, p.buf, **p.sgd)
    return {"param": param, "buf": buf}


CASES = {
    "im2col": Case(
        ("im2col",), draw_conv,
        lambda run, p: {"cols": cupy_conv.im2col_on(run, p.x, p.g)},
        lambda p: {"cols": reference_conv.im2col(XP, p.x, p.g)}, exact=("cols",)),
    "col2im": Case(
        ("col2im",), draw_conv,
        lambda run, p: {"dx": cupy_conv.col2im_on(run, p.cols, p.g)},
        lambda p: {"dx": reference_conv.col2im(XP, p.cols, p.g)}),
    "im2col_rsc": Case(
        ("im2col",), draw_grouped_conv,
        lambda run, p: {"cols": cupy_conv.im2col_on(run, p.x, p.g, "rsc")},
        lambda p: {"cols": rsc_from_crs(reference_conv.im2col(XP, p.x, p.g), p.g)}, exact=("cols",)),
    "col2im_rsc": Case(
        ("col2im",), draw_grouped_conv,
        lambda run, p: {"dx": cupy_conv.col2im_on(run, p.cols_rsc, p.g, "rsc")},
        lambda p: {"dx": reference_conv.col2im(XP, crs_from_rsc(p.cols_rsc, p.g), p.g)}),
    "conv2d_gemm": Case(
        ("im2col", "col2im"), draw_grouped_conv, _conv_gemm, _conv_gemm_reference),
    "conv2d_relu": Case(
        ("im2col", "col2im", "bias_relu", "relu", "relu_backward"), draw_conv_relu, _conv_relu, _conv_relu_reference,
        exact=("y",)),
    "depthwise_conv2d_forward": Case(
        ("depthwise_conv2d_forward",), draw_depthwise,
        lambda run, p: {"y": cupy_conv.depthwise_forward_on(run, p.x, p.w, p.bias, p.g)},
        lambda p: {"y": reference_conv.conv2d_forward(XP, p.x, p.w, p.bias, p.g)[0]}),
    "depthwise_conv2d_backward": Case(
        ("depthwise_conv2d_backward_input", "depthwise_conv2d_weight_partial", "depthwise_conv2d_weight_sum"),
        draw_depthwise, _depthwise_backward, _depthwise_backward_reference),
    "max_pool2d_forward": Case(
        ("max_pool2d_forward",), functools.partial(draw_pool, kind="max"), _max_pool_forward, _max_pool_forward_reference, exact=("y", "argmax")),
    "max_pool2d_relu": Case(
        ("max_pool2d_forward", "max_pool2d_backward"), functools.partial(draw_pool, kind="max"), _max_pool_relu,
        _max_pool_relu_reference, exact=("y", "argmax")),
    "max_pool2d_backward": Case(
        ("max_pool2d_backward",), functools.partial(draw_pool, kind="max"),
        lambda run, p: {"dx": cupy_pool.max_pool2d_backward_on(run, p.dy, p.argmax, p.g)},
        lambda p: {"dx": reference_pool.max_pool2d_backward(XP, p.dy, p.argmax, p.g)}),
    "avg_pool2d_forward": Case(
        ("avg_pool2d_forward",), functools.partial(draw_pool, kind="avg"),
        lambda run, p: {"y": cupy_pool.avg_pool2d_forward_on(run, p.x, p.g)},
        lambda p: {"y": reference_pool.avg_pool2d_forward(XP, p.x, p.g)}),
    "avg_pool2d_backward": Case(
        ("avg_pool2d_backward",), functools.partial(draw_pool, kind="avg"),
        lambda run, p: {"dx": cupy_pool.avg_pool2d_backward_on(run, p.dy, p.g)},
        lambda p: {"dx": reference_pool.avg_pool2d_backward(XP, p.dy, p.g)}),
    "global_avg_pool2d_forward": Case(
        ("global_avg_pool2d_forward",), draw_global_pool,
        lambda run, p: {"y": cupy_pool.global_avg_pool2d_forward_on(run, p.x, p.g)},
        lambda p: {"y": reference_pool.global_avg_pool2d_forward(XP, p.x, p.g)}),
    "global_avg_pool2d_backward": Case(
        ("global_avg_pool2d_backward",), draw_global_pool,
        lambda run, p: {"dx": cupy_pool.global_avg_pool2d_backward_on(run, p.dy, p.g)},
        lambda p: {"dx": reference_pool.global_avg_pool2d_backward(XP, p.dy, p.g)}, exact=("dx",)),
    "softmax_cross_entropy_forward": Case(
        ("softmax_cross_entropy_forward", "counted_labels"), draw_logits, _loss_forward, _loss_forward_reference),
    "softmax_cross_entropy_backward": Case(
        ("softmax_cross_entropy_backward", "counted_labels"), draw_logits, _loss_backward, _loss_backward_reference),
    "relu_forward": Case(
        ("relu",), draw_elementwise,
        lambda run, p: {"y": cupy_elementwise.relu_forward_on(run, p.x)},
        lambda p: {"y": reference_activation.relu_forward(XP, p.x)}, exact=("y",)),
    "relu_backward": Case(
        ("relu_backward",), draw_elementwise,
        lambda run, p: {"dx": cupy_elementwise.relu_backward_on(run, p.dy, p.x)},
        lambda p: {"dx": reference_activation.relu_backward(XP, p.dy, p.x)}, exact=("dx",)),
    "sgd_step": Case(("sgd_momentum", "sgd_nesterov"), draw_elementwise, _sgd, _sgd_reference),
}

# Random problems per case and dtype; the 64-bit index instantiations get fewer.
TRIALS = {"int": 40, "long long": 8}
_RAW_KERNELS = {k for kernels in cupy_compile.SOURCES.values() for k in kernels}
RUNS = [
    pytest.param(name, dtype, index_type, id=f"{name}-{dtype}-{index_type.replace(' ', '')}")
    for name, case in sorted(CASES.items())
    for dtype in DTYPES
    # Elementwise kernels index with long long only; the CUDA sources have both instantiations.
    for index_type in (("int", "long long") if set(case.kernels) & _RAW_KERNELS else ("int",))
]


def test_every_cuda_kernel_has_a_case():
    """Each kernel of compile.SOURCES and each elementwise source is run by some case (see the module docstring)."""
    covered = {k for case in CASES.values() for k in case.kernels}
    assert covered == every_kernel(), f"without a case: {sorted(every_kernel() - covered)}"


def test_every_cuda_source_builds_as_cpp(cpu_kernels):
    """The CUDA sources compile as C++ after the prelude (a missing CUDA built-in goes into PRELUDE)."""
    assert not cpu_kernels.failures, "\n\n".join(f"{name}:\n{out}" for name, out in cpu_kernels.failures.items())


@pytest.mark.parametrize(("name", "dtype", "index_type"), RUNS)
def test_cuda_kernel_on_the_cpu_matches_the_reference(cpu_kernels, name, dtype, index_type, monkeypatch):
    """The op body of kernels/cupy with its CUDA kernels run on the CPU gives the reference's results."""
    case = CASES[name]
    if index_type == "long long":
        # Every launch takes the 64-bit index instantiation, as beyond 2**30 items.
        monkeypatch.setattr(cupy_compile, "_INT_INDEX_LIMIT", 0)
    cpu = CpuRunner(cpu_kernels)
    rng = np.random.default_rng([sorted(CASES).index(name), DTYPES.index(dtype)])
    for trial in range(TRIALS[index_type]):
        problem = case.draw(rng, np.dtype(dtype))
        with np.errstate(all="ignore"):  # CuPy does not warn of an inf it was meant to make (a mean over no labels)
            got = case.run(cpu.runner, problem)
        want = case.reference(problem)
        assert got.keys() == want.keys()
        for key in want:
            message = f"{name} {key}, trial {trial}: {problem.label}"
            got_k, want_k = np.asarray(got[key]), np.asarray(want[key])
            assert got_k.shape == want_k.shape, message
            if key in case.exact:
                np.testing.assert_array_equal(got_k, want_k, err_msg=message)
            else:
                np.testing.assert_allclose(got_k, want_k, err_msg=message, **tol(dtype))
    assert set(cpu.launched) == set(case.kernels)


def test_the_cpu_kernels_see_strides_passed_as_v_u(cpu_kernels):
    """The harness itself: col2im launched with (v, u) for (u, v) gives other numbers than the reference."""
    cpu = CpuRunner(cpu_kernels)

    def swapped(kernel, dtype, total, arrays, ints, tail=()):
        ints = list(ints)
        ints[7], ints[8] = ints[8], ints[7]  # (C, H, W, R, S, P, Q, u, v, ...)
        cpu.launch(kernel, dtype, total, arrays, ints, tail)

    g = ConvGeometry.of((2, 3, 9, 8), (2, 3, 3, 2), (2, 1), (1, 0), (1, 1))
    cols = np.random.default_rng(0).standard_normal(g.cols_shape)
    expected = reference_conv.col2im(XP, cols, g)
    np.testing.assert_allclose(cupy_conv.col2im_on(cpu.runner, cols, g), expected, **tol("float64"))
    wrong = cupy_conv.col2im_on(KernelRunner(np, swapped, cpu.elementwise), cols, g)
    assert not np.allclose(wrong, expected)


def test_the_cpu_kernels_check_argument_types(cpu_kernels):
    """The harness itself: an int32 stride where the kernel reads a 64-bit one is refused, as the GPU would misread it."""
    g = ConvGeometry.of((1, 2, 4, 4), (1, 2, 2, 2), 1, 0, 1)
    x, cols = np.ones(g.x_shape), np.empty(g.cols_shape)
    index_type, args = cupy_compile.kernel_arguments(cols.size, (x, cols), (g.C, g.H, g.W, g.R, g.S, g.P, g.Q, g.u,
                                                                            g.v, g.a, g.b, g.dh, g.dw, 1),
                                                     tuple(np.int32(s) for s in (32, 16, 4, 1)))
    with pytest.raises(AssertionError, match=r"argument 17: the kernel reads a 8-byte integer, the launch passed a 4-byte"):
        cpu_kernels.call(f"im2col<double, {index_type}>", args)
    with pytest.raises(AssertionError, match="takes 21 arguments, the launcher passed 20"):
        cpu_kernels.call(f"im2col<double, {index_type}>", args[:-1])
