"""Memory-bound NumPy work split over the CPU cores.

BLAS runs the GEMMs on every core, but a NumPy copy or ufunc runs on one;
im2col and padding are pure copies as large as the GEMMs' operands, and the
activations are one pass each over arrays as large. NumPy releases the GIL
while it copies or runs a ufunc loop, so a small thread pool working on
slices of the batch axis uses the other cores. The ``num_threads`` setting
(:mod:`portable_cnn.config`, or ``PORTABLE_CNN_NUM_THREADS``) sets the pool
size (default: the cores this process may use; 1 turns it off).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ...config import set_config, setting

__all__ = ["parallel_copy", "parallel_apply", "batch_parallel", "num_threads", "set_num_threads"]

_MIN_BYTES_PER_THREAD = 1 << 20  # below ~1 MB a copy is over before a thread wakes
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_blas_controller = None  # the BLAS libraries' threadpoolctl controllers, once found


def set_num_threads(threads: int | None) -> None:
    """Use ``threads`` threads for the NumPy kernels (``None``: the cores); the same as ``set_config(num_threads=...)``."""
    set_config(num_threads=threads)


def num_threads() -> int:
    """Threads used by the NumPy kernels: the ``num_threads`` setting, else the cores this process may use."""
    threads = setting("num_threads")
    if threads is not None:
        return threads
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _forget_pool_in_child() -> None:
    # A forked child has none of the parent's threads: a pool inherited from
    # the parent would queue work that nobody runs. Start a new one there.
    global _pool, _pool_size
    _pool, _pool_size = None, 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_in_child)


def _wait_all(jobs) -> None:
    """Wait for every job, then raise the first failure: none may still write when the caller goes on."""
    for job in jobs:
        job.exception()
    for job in jobs:
        job.result()


def _executor(threads: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    if _pool is None or _pool_size < threads:
        _pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="portable_cnn")
        _pool_size = threads
    return _pool


def _with_callers_errstate(func):
    """``func`` to run on a pool thread under the caller's ``np.errstate``.

    NumPy keeps the floating-point error settings per thread (per context),
    so a caller's ``np.errstate(over="ignore")`` would not reach the pool.
    """
    settings = np.geterr()

    def run(*args):
        with np.errstate(**settings):
            return func(*args)

    return run


class _OneBlasThread:
    """Each loaded BLAS set to one thread inside the block, and back to its own count after.

    Through threadpoolctl's controller of each library (its ``get_num_threads``
    and ``set_num_threads``), found once: about 1.5 us a block, against 8 for
    ``ThreadpoolController.limit``, which takes stock of every library each
    time. Every parallel op enters one, about 15 a lenet step.
    """

    def __init__(self, libraries):
        self.libraries, self.restore = libraries, []

    def __enter__(self):
        self.restore = []
        for library in self.libraries:
            threads = library.get_num_threads()
            if threads is not None and threads != 1:  # None: a library that cannot say, so cannot be restored
                library.set_num_threads(1)
                self.restore.append((library, threads))

    def __exit__(self, *exc):
        for library, threads in self.restore:
            library.set_num_threads(threads)


def _single_threaded_blas() -> _OneBlasThread:
    """BLAS limited to one thread while the block runs (threadpoolctl); a no-op without threadpoolctl."""
    global _blas_controller
    if _blas_controller is None:
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:  # pragma: no cover - a base dependency
            _blas_controller = ()
        else:  # scans the loaded libraries once
            _blas_controller = tuple(ThreadpoolController().select(user_api="blas").lib_controllers)
    return _OneBlasThread(_blas_controller)


# ~0.2 ms of single-threaded GEMM (about 100 GFLOP/s a core). Waking a pool
# thread and waiting for it cost about 0.08 ms on the 2-core VM, so a job
# below this ran slower on two threads: lenet's linear layers (12-25 MFLOP)
# took 1.5-3x as long on two as on one (docs/benchmarks.md, issue 15).
_MIN_FLOPS_PER_THREAD = 20_000_000


def batch_parallel(work, n: int, *, flops: float | None = None, nbytes: int | None = None) -> None:
    """Run ``work(lo, hi, slot)`` on one contiguous part of ``range(n)`` per thread.

    Data parallelism over the batch: each thread unfolds and multiplies its
    own samples with single-threaded BLAS, so both cores do copies and GEMMs
    at once instead of taking turns (a GEMM on both cores, then a copy on
    one), and each core's blocks stay in its own cache. ``slot`` numbers the
    parts (0, 1, ...) for per-thread buffers. ``work`` must not use this pool
    itself. Outputs written for samples ``lo:hi`` need no locks. With
    ``flops`` (the work's size), or ``nbytes`` for a pass over memory (the
    bytes it reads), small jobs run in the calling thread.
    """
    threads = min(num_threads(), n)
    if flops is not None:
        threads = min(threads, max(1, int(flops // _MIN_FLOPS_PER_THREAD)))
    if nbytes is not None:
        threads = min(threads, max(1, int(nbytes // _MIN_BYTES_PER_THREAD)))
    if threads <= 1:
        with _single_threaded_blas():
            work(0, n, 0)
        return
    bounds = np.linspace(0, n, threads + 1).astype(int)
    parts = list(enumerate(zip(bounds[:-1], bounds[1:])))
    with _single_threaded_blas():
        _run_parts(lambda slot, lo, hi: work(lo, hi, slot), parts, threads)


def parallel_copy(dst: np.ndarray, src: np.ndarray) -> None:
    """``dst[...] = src``, split along axis 0 over the thread pool when large."""
    parallel_apply(np.copyto, dst, src)


def parallel_apply(func, out: np.ndarray, *inputs: np.ndarray) -> np.ndarray:
    """``func(out[i:j], *(a[i:j] for a in inputs))`` over slices of axis 0, on the thread pool.

    ``func`` writes its first argument (a ufunc called with ``out=``, or
    ``np.copyto``); every array must share the length of axis 0. Small arrays
    run in the calling thread. Returns ``out``.
    """
    threads = min(num_threads(), out.shape[0] if out.ndim else 1, max(1, out.nbytes // _MIN_BYTES_PER_THREAD))
    if threads <= 1:
        func(out, *inputs)
        return out
    bounds = np.linspace(0, out.shape[0], threads + 1).astype(int)
    parts = [(slot, (lo, hi)) for slot, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])) if hi > lo]
    _run_parts(lambda slot, lo, hi: func(out[lo:hi], *(a[lo:hi] for a in inputs)), parts, threads)
    return out


def _run_parts(run, parts, threads: int) -> None:
    """``run(slot, lo, hi)`` for every part: the first in the calling thread, the others on the pool.

    The caller works instead of sleeping until the pool is done: on a virtual
    machine waking an idle core takes tens of microseconds, so a job the
    caller hands off and then waits for pays that twice (the worker's wake
    and its own).
    """
    pool = _executor(threads - 1)
    run_here = _with_callers_errstate(run)  # the pool's threads get the caller's np.errstate too
    jobs = [pool.submit(run_here, slot, lo, hi) for slot, (lo, hi) in parts[1:]]
    try:
        slot, (lo, hi) = parts[0]
        run(slot, lo, hi)
    finally:
        _wait_all(jobs)
