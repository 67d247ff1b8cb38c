"""The NumPy thread pool behind the fast paths: coverage, BLAS threads, error state."""

from __future__ import annotations

import threading
import warnings

import numpy as np
import pytest
from test_dispatch import OP_CASES, _assert_parity, _both_paths

from portable_cnn import config_context, ops
from portable_cnn.kernels.numpy import parallel as _parallel


@pytest.mark.parametrize("n", [1, 2, 7, 128])
def test_batch_parallel_covers_every_sample_once_in_disjoint_parts(n):
    seen = np.zeros(n, dtype=int)
    slots = []

    def work(lo, hi, slot):
        seen[lo:hi] += 1
        slots.append(slot)

    _parallel.batch_parallel(work, n)
    assert (seen == 1).all()
    assert sorted(slots) == list(range(len(slots)))
    assert len(slots) == min(_parallel.num_threads(), n)


def test_batch_parallel_runs_small_work_in_the_calling_thread():
    threads = []
    _parallel.batch_parallel(lambda lo, hi, slot: threads.append(threading.current_thread()), 64, flops=10)
    assert threads == [threading.current_thread()]


def test_batch_parallel_counts_a_memory_pass_by_its_bytes():
    """A pass over memory gets a thread per _MIN_BYTES_PER_THREAD it reads (pooling), the rest in the caller."""
    parts = {}
    with config_context(num_threads=3):
        for nbytes in (1000, 2 * _parallel._MIN_BYTES_PER_THREAD, 100 * _parallel._MIN_BYTES_PER_THREAD):
            slots = []
            _parallel.batch_parallel(lambda lo, hi, slot: slots.append(slot), 64, nbytes=nbytes)
            parts[nbytes] = len(slots)
    assert list(parts.values()) == [1, 2, 3]


def test_the_calling_thread_runs_the_first_part_and_the_pool_the_others():
    """The caller works on part 0 instead of sleeping while the pool runs all parts (docs/benchmarks.md)."""
    ran = {}
    with config_context(num_threads=3):
        _parallel.batch_parallel(lambda lo, hi, slot: ran.setdefault(slot, threading.current_thread()), 9)
    assert sorted(ran) == [0, 1, 2]
    assert ran[0] is threading.current_thread()
    assert {ran[1], ran[2]}.isdisjoint({threading.current_thread()})


def _numpy_blas_threads(threadpoolctl):
    """Thread counts of the BLAS that NumPy's matmul calls (SciPy may load another)."""
    return [
        row["num_threads"]
        for row in threadpoolctl.threadpool_info()
        if row["user_api"] == "blas" and "numpy" in row["filepath"]
    ]


def test_batch_parallel_gives_each_thread_single_threaded_blas():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    seen = []

    def work(lo, hi, slot):
        seen.extend(_numpy_blas_threads(threadpoolctl))

    before = _numpy_blas_threads(threadpoolctl)
    _parallel.batch_parallel(work, 8)
    assert seen and set(seen) == {1}
    assert _numpy_blas_threads(threadpoolctl) == before


def test_a_failing_part_still_gives_blas_its_threads_back():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    before = _numpy_blas_threads(threadpoolctl)

    def work(lo, hi, slot):
        raise ValueError("bad part")

    with pytest.raises(ValueError, match="bad part"):
        _parallel.batch_parallel(work, 1)
    assert _numpy_blas_threads(threadpoolctl) == before


def test_pool_threads_follow_the_callers_floating_point_error_settings():
    big = np.full((4, 1 << 18), 1e38, dtype=np.float32)  # 4 MB: split over the pool
    out = np.empty_like(big)
    with np.errstate(over="raise"), pytest.raises(FloatingPointError):
        _parallel.parallel_apply(lambda o, a: np.multiply(a, a, out=o), out, big)
    with np.errstate(over="ignore"):  # warnings are errors in this suite: none may escape
        _parallel.parallel_apply(lambda o, a: np.multiply(a, a, out=o), out, big)
        _parallel.batch_parallel(lambda lo, hi, slot: np.multiply(big[lo:hi], big[lo:hi]), 4)
    assert np.isinf(out).all()


def test_set_num_threads_overrides_and_restores():
    default = _parallel.num_threads()
    try:
        _parallel.set_num_threads(1)
        slots = []
        _parallel.batch_parallel(lambda lo, hi, slot: slots.append((lo, hi)), 100)
        assert slots == [(0, 100)]
    finally:
        _parallel.set_num_threads(None)
    assert _parallel.num_threads() == default
    with pytest.raises(ValueError, match="positive integer"):
        _parallel.set_num_threads(0)


def test_parallel_copy_matches_copyto():
    src = np.arange(3 * 512 * 1024, dtype=np.float32).reshape(3, 512, 1024)[:, ::2]
    dst = np.empty(src.shape, dtype=src.dtype)
    _parallel.parallel_copy(dst, src)
    np.testing.assert_array_equal(dst, src)


def test_a_failing_part_is_raised_after_every_part_has_finished():
    finished = []

    def work(lo, hi, slot):
        if slot == 0:
            raise RuntimeError("part 0 failed")
        import time

        time.sleep(0.05)
        finished.append(slot)

    if _parallel.num_threads() < 2:
        pytest.skip("one thread: nothing runs beside the failing part")
    with pytest.raises(RuntimeError, match="part 0 failed"):
        _parallel.batch_parallel(work, 8)
    assert finished == list(range(1, min(_parallel.num_threads(), 8)))


def test_a_forked_child_gets_a_working_pool():
    import multiprocessing

    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork on this platform")
    big = np.ones((4, 1 << 18), dtype=np.float32)
    _parallel.parallel_copy(np.empty_like(big), big)  # the parent's pool exists now
    ctx = multiprocessing.get_context("fork")
    child = ctx.Process(target=_copy_in_child)
    with warnings.catch_warnings():  # Python 3.12+ warns that forking a threaded process is risky: that is the point
        warnings.simplefilter("ignore", DeprecationWarning)
        child.start()
    child.join(timeout=30)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child hung on the inherited thread pool")
    assert child.exitcode == 0


def _copy_in_child():
    big = np.ones((4, 1 << 18), dtype=np.float32)
    out = np.empty_like(big)
    _parallel.parallel_copy(out, big)
    assert (out == 1).all()


# --------------------------------------------------------------------------- reductions over threads


@pytest.mark.parametrize("case", sorted(OP_CASES))
def test_every_numpy_kernel_on_three_threads_gives_the_reference_numbers(case, monkeypatch):
    """Each op of test_dispatch's OP_CASES, with the pool forced onto three threads even for tiny work.

    The cases are too small to be worth a thread, so a machine with any
    number of cores runs them in one thread: the partial sums each thread
    adds (weight and bias gradients) would go unchecked. Here the
    thresholds are 1 FLOP and 1 byte a thread.
    """
    monkeypatch.setattr(_parallel, "_MIN_FLOPS_PER_THREAD", 1)
    monkeypatch.setattr(_parallel, "_MIN_BYTES_PER_THREAD", 1)
    with config_context(num_threads=3):
        fast, slow = _both_paths(OP_CASES[case](np.random.default_rng(7)))
    _assert_parity(fast, slow)


def test_conv2d_weight_gradient_adds_every_threads_part(monkeypatch):
    """Five samples on three threads: dW and db are the sums of the three parts, and three parts ran."""
    monkeypatch.setattr(_parallel, "_MIN_FLOPS_PER_THREAD", 1)
    parts = []
    run_parts = _parallel._run_parts
    monkeypatch.setattr(_parallel, "_run_parts", lambda run, ps, threads: parts.append(len(ps)) or run_parts(run, ps, threads))
    rng = np.random.default_rng(3)
    x, w, dy = rng.standard_normal((5, 3, 6, 5)), rng.standard_normal((4, 3, 3, 3)), rng.standard_normal((5, 4, 4, 3))
    with config_context(num_threads=3):
        _, dw, db = ops.conv2d_backward(dy, x, w, need_input_grad=False)
    assert parts == [3]
    with config_context(fast_paths=False):
        _, dw_reference, db_reference = ops.conv2d_backward(dy, x, w, need_input_grad=False)
    np.testing.assert_allclose(dw, dw_reference, rtol=1e-12, atol=0)
    np.testing.assert_allclose(db, db_reference, rtol=1e-12, atol=0)
