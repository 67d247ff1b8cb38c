"""A GPU out-of-memory error inside a convolution, turned into a :class:`MemoryError` that says what to change."""

from __future__ import annotations

import sys
from contextlib import contextmanager

from ...config import setting

__all__ = ["is_gpu_out_of_memory", "out_of_memory_explained"]


def is_gpu_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is CuPy's (or CUDA's, or cuBLAS's) report that device memory ran out."""
    cupy = sys.modules.get("cupy")
    if cupy is None:  # CuPy never imported: the error cannot be a GPU one
        return False
    if isinstance(exc, cupy.cuda.memory.OutOfMemoryError):
        return True
    text = str(exc)
    return (type(exc).__name__ == "CUDARuntimeError" and "MemoryAllocation" in text) or (
        type(exc).__name__ == "CUBLASError" and "ALLOC_FAILED" in text
    )


def _message(where: str, direction: str, x, exc) -> str:
    if x is not None and getattr(x, "ndim", 0) == 4:
        batch = f"input {tuple(x.shape)} {x.dtype}, batch size {x.shape[0]}"
    else:
        batch = "batch size unknown"
    pool = ""
    try:
        cupy = sys.modules["cupy"]
        free, total = cupy.cuda.runtime.memGetInfo()
        held = cupy.get_default_memory_pool().total_bytes()
        pool = (f"; device {free / 2**20:,.0f} of {total / 2**20:,.0f} MiB free, "
                f"CuPy's pool holds {held / 2**20:,.0f} MiB")
    except Exception:  # a report about memory must not fail for want of it
        pass
    return (
        f"{where}: the GPU ran out of memory in the convolution {direction} ({batch}; "
        f"im2col workspace limit {setting('workspace_mb'):g} MB{pool}). "
        "Use a smaller batch size, or lower the workspace limit so that the convolution runs on slices of "
        "the batch: portable_cnn.set_config(workspace_mb=...) or the PORTABLE_CNN_WORKSPACE_MB "
        f"environment variable. (CuPy said: {type(exc).__name__}: {exc})"
    )


@contextmanager
def out_of_memory_explained(where: str, direction: str, x):
    """Inside the block, a GPU out-of-memory error becomes a :class:`MemoryError` naming the layer and what to change.

    The message names the layer (``where``), the input and batch size and the
    im2col workspace limit, and suggests a smaller batch or a lower limit; the
    original CuPy error is chained as its cause. Other errors pass unchanged.
    """
    try:
        yield
    except Exception as exc:  # CuPy's OutOfMemoryError is a MemoryError: test for it by type, not by clause
        if not is_gpu_out_of_memory(exc):
            raise
        raise MemoryError(_message(where, direction, x, exc)) from exc
