"""Memory-bound NumPy work split over the CPU cores.

BLAS runs the GEMMs on every core, but a NumPy copy or ufunc runs on one;
im2col and padding are pure copies as large as the GEMMs' operands, and the
activations are one pass each over arrays as large. NumPy releases the GIL
while it copies or runs a ufunc loop, so a small thread pool working on
slices of the batch axis uses the other cores. ``PORTABLE_CNN_NUM_THREADS`` sets the pool size
(default: the cores this process may use; 1 turns it off).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

__all__ = ["parallel_copy", "parallel_apply", "num_threads"]

_MIN_BYTES_PER_THREAD = 1 << 20  # below ~1 MB a copy is over before a thread wakes
_pool: ThreadPoolExecutor | None = None
_pool_size = 0


def num_threads() -> int:
    """Threads used for large copies."""
    setting = os.environ.get("PORTABLE_CNN_NUM_THREADS")
    if setting:
        return max(1, int(setting))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def parallel_copy(dst: np.ndarray, src: np.ndarray) -> None:
    """``dst[...] = src``, split along axis 0 over the thread pool when large."""
    parallel_apply(np.copyto, dst, src)


def parallel_apply(func, out: np.ndarray, *inputs: np.ndarray) -> np.ndarray:
    """``func(out[i:j], *(a[i:j] for a in inputs))`` over slices of axis 0, on the thread pool.

    ``func`` writes its first argument (a ufunc called with ``out=``, or
    ``np.copyto``); every array must share the length of axis 0. Small arrays
    run in the calling thread. Returns ``out``.
    """
    global _pool, _pool_size
    threads = min(num_threads(), out.shape[0] if out.ndim else 1, max(1, out.nbytes // _MIN_BYTES_PER_THREAD))
    if threads <= 1:
        func(out, *inputs)
        return out
    if _pool is None or _pool_size < threads:
        _pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="portable_cnn")
        _pool_size = threads
    bounds = np.linspace(0, out.shape[0], threads + 1).astype(int)
    jobs = [
        _pool.submit(func, out[lo:hi], *(a[lo:hi] for a in inputs))
        for lo, hi in zip(bounds[:-1], bounds[1:])
        if hi > lo
    ]
    for job in jobs:
        job.result()
    return out
