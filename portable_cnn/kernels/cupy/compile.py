"""Compiling and launching the CUDA sources of ``cuda/``: the compile cache, the launch, memory layouts.

The op bodies of this package run on a :class:`KernelRunner`: an array
module that allocates and two ways to start a kernel. :func:`cupy_runner` is
the GPU's; tests/test_cuda_kernels.py builds one from NumPy and the same CUDA
compiled as C++ for the CPU, so every body, with the argument lists it
builds, runs against the reference without a GPU.

Each source file (``conv.cu``, ``depthwise.cu``, ``pool.cu``, ``loss.cu``) is compiled with
``common.cuh`` prepended, as one ``cupy.RawModule`` per device, on first use
of any of its kernels; CuPy also keeps the compiled binary on disk. Kernels
are templates over ``T`` (float, double) and ``I`` (the flat index type), all
instantiated at once by name expression.

CuPy is imported only inside these functions: they run only once CuPy arrays
have reached an op.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np

__all__ = [
    "SOURCES", "source", "name_expressions", "kernel_arguments", "launch", "ElementwiseSource", "elementwise_kernel",
    "KernelRunner", "cupy_runner", "strides", "channels_last", "nchw_output", "cupy_module", "C_TYPES",
]

#: source file -> the kernel templates it defines
SOURCES = {
    "conv.cu": ("im2col", "col2im"),
    "depthwise.cu": ("depthwise_conv2d_forward", "depthwise_conv2d_backward_input", "depthwise_conv2d_weight_partial",
                     "depthwise_conv2d_weight_sum"),
    "pool.cu": ("max_pool2d_forward", "max_pool2d_backward", "avg_pool2d_forward", "avg_pool2d_backward",
                "global_avg_pool2d_forward", "global_avg_pool2d_backward"),
    "loss.cu": ("softmax_cross_entropy_forward",),
}
C_TYPES = {"float32": "float", "float64": "double"}
INDEX_TYPES = {"int": np.int32, "long long": np.int64}
_THREADS = 256
# Grid-stride loops: enough blocks to fill any current GPU many times over,
# and few enough that ``i + stride`` cannot overflow a 32-bit index below 2**30.
_MAX_BLOCKS = 65536
_INT_INDEX_LIMIT = 2**30

_KERNEL_FILES = {kernel: name for name, kernels in SOURCES.items() for kernel in kernels}
_modules: dict = {}    # (device id, source file) -> cupy.RawModule
_functions: dict = {}  # (device id, kernel, C type, index type) -> cupy.RawKernel
_elementwise: dict = {}  # ElementwiseSource name -> cupy.ElementwiseKernel
_cupy_runner = None


def source(name: str) -> str:
    """The CUDA text compiled for source file ``name``: ``common.cuh`` followed by the file."""
    folder = resources.files(__package__).joinpath("cuda")
    return folder.joinpath("common.cuh").read_text() + "\n" + folder.joinpath(name).read_text()


def name_expressions(name: str) -> list[str]:
    """Every template instantiation of source file ``name``'s kernels (``im2col<float, int>``, ...)."""
    return [f"{k}<{t}, {i}>" for k in SOURCES[name] for t in C_TYPES.values() for i in INDEX_TYPES]


def cupy_module():
    """CuPy itself; only reached with CuPy arrays in hand."""
    import cupy

    return cupy


def _function(cupy, kernel: str, dtype, index_type: str):
    """The compiled ``kernel<T, I>`` for the current device, compiling its source file on first use."""
    device = cupy.cuda.Device().id
    key = (device, kernel, C_TYPES[str(dtype)], index_type)
    function = _functions.get(key)
    if function is None:
        file = _KERNEL_FILES[kernel]
        module = _modules.get((device, file))
        if module is None:
            module = cupy.RawModule(code=source(file), name_expressions=name_expressions(file))
            _modules[(device, file)] = module
        function = module.get_function(f"{kernel}<{key[2]}, {index_type}>")
        _functions[key] = function
    return function


def kernel_arguments(total: int, arrays: tuple, ints: tuple, tail: tuple = ()) -> tuple[str, tuple]:
    """``(index type, arguments)`` of a kernel over ``total`` items: ``arrays``, ``total``, ``ints`` (as int), ``tail``.

    The index type, ``"int"`` or ``"long long"`` (common.cuh), picks the
    template instantiation; ``total`` is passed as it.
    """
    index_type = "int" if total < _INT_INDEX_LIMIT else "long long"
    return index_type, (*arrays, INDEX_TYPES[index_type](total), *(np.int32(n) for n in ints), *tail)


def launch(cupy, kernel: str, dtype, total: int, arrays: tuple, ints: tuple, tail: tuple = ()) -> None:
    """Run ``kernel`` over ``total`` items with the arguments of :func:`kernel_arguments`."""
    if total == 0:
        return
    index_type, args = kernel_arguments(total, arrays, ints, tail)
    function = _function(cupy, kernel, dtype, index_type)
    blocks = min(-(-total // _THREADS), _MAX_BLOCKS)
    function((blocks,), (_THREADS,), args)


@dataclass(frozen=True)
class ElementwiseSource:
    """A fused elementwise kernel as ``cupy.ElementwiseKernel`` takes it: parameters, body, compile options."""

    name: str
    in_params: str
    out_params: str
    body: str
    options: tuple = ()


def elementwise_kernel(cupy, source: ElementwiseSource):
    """The ``cupy.ElementwiseKernel`` of ``source``, built on first use."""
    kernel = _elementwise.get(source.name)
    if kernel is None:
        kernel = cupy.ElementwiseKernel(source.in_params, source.out_params, source.body,
                                        f"portable_cnn_{source.name}", options=source.options)
        _elementwise[source.name] = kernel
    return kernel


@dataclass(frozen=True)
class KernelRunner:
    """What an op body needs of a device (see the module docstring).

    ``lib`` is the array module the body allocates and reduces with
    (``empty``, ``full``, ``ascontiguousarray``, ``sum``, ...): CuPy, or NumPy
    in tests; ``launch(kernel, dtype, total, arrays, ints, tail=())`` runs a
    kernel of ``cuda/`` as :func:`launch` does; ``elementwise(source)``
    returns the kernel of an :class:`ElementwiseSource`, called as a
    ``cupy.ElementwiseKernel`` is.
    """

    lib: Any
    launch: Callable[..., None]
    elementwise: Callable[[ElementwiseSource], Callable]


def cupy_runner() -> KernelRunner:
    """The GPU's :class:`KernelRunner`: CuPy, :func:`launch` and :func:`elementwise_kernel`."""
    global _cupy_runner
    if _cupy_runner is None:
        cupy = cupy_module()
        _cupy_runner = KernelRunner(cupy, functools.partial(launch, cupy), functools.partial(elementwise_kernel, cupy))
    return _cupy_runner


def strides(a) -> tuple:
    """Strides of ``a`` in elements, as the kernels' 64-bit arguments."""
    return tuple(np.int64(s // a.itemsize) for s in a.strides)


def channels_last(a) -> bool:
    """True when the channel axis of the (N, C, Y, X) array ``a`` is the fastest in memory."""
    _, C, Y, X = a.shape
    return C > 1 and Y * X > 1 and abs(a.strides[1]) == a.itemsize


def nchw_output(lib, N, C, Y, X, dtype, last: bool):
    """A new (N, C, Y, X) array of ``lib`` laid out channels-last (``last``) or not, and the flat buffer the kernels write."""
    if last:
        flat = lib.empty((N, Y, X, C), dtype=dtype)  # (N, Y, X, C)
        return flat.transpose(0, 3, 1, 2), flat  # (N, C, Y, X) view
    flat = lib.empty((N, C, Y, X), dtype=dtype)  # (N, C, Y, X)
    return flat, flat
