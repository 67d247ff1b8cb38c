"""The timing protocol of ``portable-cnn bench`` (docs/benchmarks.md says the same in prose).

1. Every runner gets the same NumPy weights and the same batch
   (:func:`build_model`, :func:`make_batch`), moved to its device once,
   outside the clock.
2. The first step of each runner is checked: its loss (training) or logits
   (inference) must equal the reference's within the dtype's tolerance
   (:data:`CHECK_TOLERANCES`). Without PyTorch the reference for the check is
   our NumPy code in float64.
3. Warm-up steps are excluded. A calibration step sets the steps per repeat
   so that one repeat lasts about ``--repeat-seconds`` (:func:`calibrate`).
4. A repeat restores the initial weights and a fresh optimizer and takes one
   untimed step that creates the optimizer state (:func:`prepare`: every
   repeat measures the same steady-state computation, and a long run cannot
   drift into memorised, denormal territory), synchronises the device, reads
   the clock, runs the steps, synchronises, reads the clock again, and then
   checks that the last loss is finite.
5. Runners of one configuration are interleaved, one repeat each per round in
   alternating order, so a load change on the machine hits ours and the
   reference alike; ratios are the median of the per-round ratios, with their
   min-max. An idle pause before each repeat lets the previous runner's worker
   threads (OpenBLAS spins about 0.1 s) go to sleep
   (:func:`interleaved_repeats`).
6. Repeats continue past ``--repeats`` until every runner's median moves less
   than ``--stable-tol`` over its last two repeats (:func:`stable`), or
   ``--max-seconds`` pass.

A runner is anything with ``name``, ``mode`` (``"train"`` or ``"infer"``),
``reset()`` (initial weights, fresh optimizer), ``step()``, ``run(steps)``,
``sync()`` (wait for the device) and ``result()`` (the last loss or logits as
a float64 NumPy array); :mod:`portable_cnn.bench.runners` has ours and
PyTorch's.
"""

from __future__ import annotations

import math
import statistics
import time

import numpy as np

from .. import models

#: Input shape ``(C, H, W)`` of each network the benchmark knows.
NETS = {"lenet": (1, 28, 28), "vgg-small": (3, 32, 32), "resnet20": (3, 32, 32), "mobilenet-small": (3, 32, 32),
        "digits": (1, 8, 8)}
NUM_CLASSES = 10
#: Backends of ours that ``--backends`` accepts.
OUR_BACKENDS = ("numpy", "torch", "cupy", "array_api_strict")
MODES = ("train", "infer")
#: Dtypes that ``--dtype``/``--dtypes`` accept; each has its first-step tolerance in :data:`CHECK_TOLERANCES`.
DTYPES = ("float32", "float64")
LEARNING_RATE = 0.01
MOMENTUM = 0.9
#: The first-step check: our loss/logits against the reference's, same weights, same batch.
CHECK_TOLERANCES = {
    "float32": {"rtol": 1e-4, "atol": 1e-4},
    "float64": {"rtol": 1e-9, "atol": 1e-10},
    # TF32 keeps 10 mantissa bits in the GEMMs: about 1e-3 relative per product.
    "tf32": {"rtol": 2e-2, "atol": 2e-2},
}
MAX_STEPS_PER_REPEAT = {"train": 50, "infer": 200}


def build_model(net: str, seed: int):
    """The network ``net`` of :data:`NETS` with 10 classes, float32 on NumPy, weights from ``seed``."""
    C, H, W = NETS[net]
    return models.build_model(net, in_channels=C, num_classes=NUM_CLASSES, input_size=(H, W), seed=seed)


def make_batch(net: str, batch: int, dtype: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The benchmark's batch for ``net``: standard-normal images ``(batch, C, H, W)`` and int64 labels ``(batch,)``."""
    C, H, W = NETS[net]
    rng = np.random.default_rng(seed + batch)
    x = rng.standard_normal((batch, C, H, W)).astype(dtype)
    y = rng.integers(0, NUM_CLASSES, size=batch).astype(np.int64)
    return x, y


def summary(values) -> dict:
    """Median and min-max of ``values``.

    >>> summary([3.0, 1.0, 2.0])
    {'median': 2.0, 'min': 1.0, 'max': 3.0}
    """
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def stable(samples, repeats: int, tol: float) -> bool:
    """Whether a runner's timing has settled (protocol step 6).

    Parameters
    ----------
    samples : list of float
        Seconds per step, one per repeat, in order.
    repeats : int
        Repeats wanted at least (``--repeats``); never fewer than 3 count.
    tol : float
        Largest relative move of the median over the last two repeats (``--stable-tol``).

    >>> stable([1.0, 1.0, 1.0, 1.0], repeats=3, tol=0.02), stable([1.0, 2.0, 3.0, 4.0], repeats=3, tol=0.02)
    (True, False)
    """
    if len(samples) < max(repeats, 3):
        return False
    now = statistics.median(samples)
    before = statistics.median(samples[:-2])
    return abs(now - before) <= tol * now


def prepare(runner) -> None:
    """Restore the initial weights and a fresh optimizer, then take one untimed step.

    The untimed step creates the optimizer state (momentum buffers), so the
    timed steps that follow are steady-state steps, as in a long training run.
    """
    runner.reset()
    if runner.mode == "train":
        runner.step()
    runner.sync()


def calibrate(runner, warmup: int, repeat_seconds: float) -> int:
    """Run ``warmup`` untimed steps, then time one step; return the steps per repeat (protocol step 3)."""
    # In training, prepare()'s untimed step is the last warm-up step.
    runner.run(max(warmup - 1, 0))
    prepare(runner)
    t0 = time.perf_counter()
    runner.step()
    runner.sync()
    elapsed = max(time.perf_counter() - t0, 1e-7)
    return int(min(max(math.ceil(repeat_seconds / elapsed), 1), MAX_STEPS_PER_REPEAT[runner.mode]))


def interleaved_repeats(runners, steps: dict, args) -> tuple[dict, dict]:
    """Time the runners of one configuration in interleaved rounds until stable (protocol steps 4-6).

    Parameters
    ----------
    runners : list of runners
    steps : dict
        Steps per repeat by runner name (from :func:`calibrate`).
    args : argparse.Namespace
        The ``bench`` options; reads ``repeats``, ``stable_tol``,
        ``max_seconds`` and ``gap_seconds``.

    Returns
    -------
    samples : dict
        Runner name to its seconds per step, one per repeat.
    finite : dict
        Runner name to whether its result was finite after every repeat.
    """
    samples = {r.name: [] for r in runners}
    finite = {r.name: True for r in runners}
    start = time.perf_counter()
    rounds = 0
    floor = min(args.repeats, 3)
    while True:
        # Alternate the order each round, and pause before each repeat (outside
        # the clock): OpenBLAS's idle worker threads spin for about 0.1 s after
        # a call before they sleep, and on 2 cores that halved the speed of a
        # PyTorch convolution that ran right after a NumPy GEMM.
        for r in (runners if rounds % 2 == 0 else runners[::-1]):
            if args.gap_seconds > 0:
                time.sleep(args.gap_seconds)
            prepare(r)
            t0 = time.perf_counter()
            r.run(steps[r.name])
            r.sync()
            samples[r.name].append((time.perf_counter() - t0) / steps[r.name])
            finite[r.name] &= bool(np.all(np.isfinite(r.result())))
        rounds += 1
        elapsed = time.perf_counter() - start
        all_stable = all(stable(samples[r.name], args.repeats, args.stable_tol) for r in runners)
        if all_stable or (elapsed > args.max_seconds and rounds >= floor) or rounds >= 1000:
            return samples, finite
