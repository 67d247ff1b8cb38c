"""Images/s of data-parallel training on 1 and 2 ranks, and the all-reduce time per step.

    python benchmarks/distributed_scaling.py                        # lenet, NumPy, float32
    python benchmarks/distributed_scaling.py --model vgg-small --repeats 7
    python benchmarks/distributed_scaling.py --backend cupy         # on a GPU machine

Each configuration is its own ``mpiexec`` launch (``mpiexec`` beside this
interpreter, as ``pip install 'portable-cnn[mpi]'`` puts it, else on PATH):

* ``1 process``: the plain trainer (no MPI), with ``--threads`` BLAS threads
  (default: all cores), what one would run without ``--distributed``;
* ``1 rank``: ``--distributed`` on one rank with one thread (the cost of the
  data-parallel path itself);
* ``2 ranks`` ... ``N ranks`` (``--ranks``): one thread each; or, with
  ``--rank-layouts`` (e.g. ``16x1,4x4``), the listed rank counts with the
  listed threads per rank;
* ``native PyTorch``: the :mod:`portable_cnn.bench.torch_mirror` of the
  same model (our initial weights), ``cross_entropy`` and ``torch.optim.SGD``
  on ``--threads`` threads, fed the same batches the same way (NumPy
  indexing, then ``torch.from_numpy``), when torch is installed and the
  backend is NumPy (``--no-torch`` leaves it out). Each configuration's
  images/s are then also a ratio to PyTorch's.

``--rounds`` launches every configuration that many times, in turn, so that
the machine's drift falls on all of them alike; a ratio is the median of
the per-round ratios (each round's medians), with their min-max.

A launch trains ``--warmup`` steps, then ``--steps`` timed steps, ``--repeats``
times (the same processes, so start-up is not timed); the figure is the
median over the repeats of the global images/s (global batch times steps
over the time of those steps, on rank 0), with the spread (min-max). The
all-reduce time is rank 0's :attr:`Communicator.allreduce_seconds` per step
(the gradient buffer's Allreduce and BatchNorm's small ones; host copies
included on a GPU without NCCL), which includes waiting for the slowest rank
to arrive; the bare all-reduce is the median of 20 Allreduces of a buffer of
the gradients' size after a barrier (the transfer alone). On CuPy the device is synchronised before
each clock read. Synthetic data (seeded normal images, random labels); the
losses are checked to be finite.

On one GPU, ``--backend cupy --ranks 2`` runs two ranks sharing it, which
NCCL refuses: the all-reduce then goes through host memory over MPI (the
run's notes say so); ``1 rank`` covers NCCL's world size 1.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _mpiexec() -> str:
    beside = Path(sys.executable).parent / "mpiexec"
    found = str(beside) if beside.exists() else shutil.which("mpiexec")
    if found is None:
        sys.exit("distributed_scaling: no mpiexec found; pip install 'portable-cnn[mpi]'")
    return found


# --------------------------------------------------------------------------- one launch (every rank)


def _synthetic(args):
    """``(x, y, channels, size)``: seeded normal images and random labels for warm-up and timed steps."""
    import numpy as np

    channels, size = (1, 28) if args.model in ("lenet", "digits") else (3, 32)
    size = 8 if args.model == "digits" else size
    n = args.batch_size * (args.warmup + args.steps)  # one epoch: warm-up and timed steps
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, channels, size, size)).astype(np.float32)
    return x, rng.integers(0, 10, n), channels, size


def torch_main(args) -> None:
    """Native PyTorch on ``args.threads`` threads, timed as :func:`rank_main` times ours; prints one JSON line."""
    import numpy as np
    import torch

    from portable_cnn import models
    from portable_cnn.bench.torch_mirror import torch_model

    torch.set_num_threads(args.threads)
    x, y, channels, size = _synthetic(args)
    model = models.build_model(args.model, in_channels=channels, num_classes=10, input_size=size)
    net = torch_model(torch, model, model.state_dict(), "cpu", args.dtype)
    results, loss = [], None
    for repeat in range(args.repeats):
        order = np.random.default_rng(repeat).permutation(len(x))  # a shuffled epoch, as the Trainer's
        optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
        times = []
        for step in range(args.warmup + args.steps):
            batch = order[step * args.batch_size:(step + 1) * args.batch_size]
            xb = torch.from_numpy(x[batch]).to(getattr(torch, args.dtype))
            yb = torch.from_numpy(y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(net(xb), yb)
            loss.backward()
            optimizer.step()
            if step % 10 == 0:  # the Trainer reads the loss back every log_every (10) steps
                loss.item()
            times.append(time.perf_counter())
        timed = times[args.warmup - 1:]
        results.append({"images_per_s": args.batch_size * args.steps / (timed[-1] - timed[0]),
                        "allreduce_ms_per_step": 0.0})
    if not math.isfinite(loss.item()):
        raise FloatingPointError(f"non-finite loss {loss.item()}")
    n_gradients = sum(p.numel() for p in net.parameters())
    print(json.dumps({"results": results, "notes": [], "transport": None,
                      "gradient_mb": n_gradients * np.dtype(args.dtype).itemsize / 1e6, "bare_allreduce_ms": None}))


def rank_main(args) -> None:
    """Time ``args.repeats`` x ``args.steps`` training steps; rank 0 prints one JSON line."""
    import numpy as np

    from portable_cnn import backend, distributed, models, optim
    from portable_cnn.callbacks import Callback
    from portable_cnn.data import Dataset
    from portable_cnn.run import cpu_threads
    from portable_cnn.train import Trainer

    comm = distributed.init(args.backend) if args.distributed else None
    backend_name = comm.backend if comm is not None else backend.resolve_backend(args.backend)[0]
    x, y, channels, size = _synthetic(args)
    ds = Dataset(x, y, x[:8], y[:8], num_classes=10, name="synthetic")
    model = models.build_model(args.model, in_channels=channels, num_classes=10, input_size=size).to(backend_name, args.dtype)

    class Clock(Callback):
        """Step times on rank 0, the device synchronised first."""

        def __init__(self):
            self.times = []

        def on_step_end(self, trainer):
            backend.synchronize(trainer.xp)
            self.times.append(time.perf_counter())
            if len(self.times) == args.warmup and comm is not None:
                comm.allreduce_seconds, comm.allreduce_calls = 0.0, 0

    results = []
    threads = args.rank_threads if args.distributed else args.threads
    for repeat in range(args.repeats):
        clock = Clock()
        opt = optim.SGD(model, lr=0.01, momentum=0.9)
        trainer = Trainer(model, opt, ds, batch_size=args.batch_size, seed=repeat, log_every=10, callbacks=[clock],
                          comm=comm)
        with cpu_threads(threads, args.model, backend_name):
            history = trainer.fit(1)
        if not np.isfinite(history[-1].train_loss):
            raise FloatingPointError(f"non-finite loss {history[-1].train_loss}")
        if trainer.rank == 0:
            timed = clock.times[args.warmup - 1:]
            seconds = timed[-1] - timed[0]
            allreduce_ms = 1e3 * comm.allreduce_seconds / args.steps if comm is not None else 0.0
            results.append({"images_per_s": args.batch_size * args.steps / seconds, "allreduce_ms_per_step": allreduce_ms})
    n_gradients = sum(int(np.prod(layer.params[k].shape)) for _, layer, k in model.named_parameters())
    bare = []
    if comm is not None and comm.size > 1:
        # The gradient buffer's Allreduce alone, every rank arriving together (a barrier first):
        # what the step's all-reduce time costs beyond waiting for the slowest rank.
        xp = backend.get_namespace(backend_name)
        buffer = xp.ones(n_gradients + 4, dtype=getattr(xp, args.dtype))
        for _ in range(25):
            comm.barrier()
            began = time.perf_counter()
            buffer = comm.allreduce(buffer)
            backend.synchronize(buffer)
            bare.append(1e3 * (time.perf_counter() - began))
    if comm is None or comm.rank == 0:
        print(json.dumps({"results": results, "notes": comm.notes if comm is not None else [],
                          "transport": comm.transport if comm is not None else None,
                          "gradient_mb": n_gradients * np.dtype(args.dtype).itemsize / 1e6,
                          "bare_allreduce_ms": statistics.median(bare[5:]) if bare else None}))


# --------------------------------------------------------------------------- the driver


def launch(args, ranks: int, distributed: bool, native_torch: bool = False, rank_threads: int = 1) -> dict:
    """One configuration in fresh processes; rank 0's JSON (``native_torch``: PyTorch's run instead of ours)."""
    worker = [sys.executable, __file__, "--rank-main", "--model", args.model, "--backend", args.backend,
              "--dtype", args.dtype, "--batch-size", str(args.batch_size), "--steps", str(args.steps),
              "--warmup", str(args.warmup), "--repeats", str(args.repeats), "--threads", str(args.threads)]
    worker += ["--torch-main"] if native_torch else []
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    if distributed:
        command = [_mpiexec(), "-n", str(ranks), *worker, "--distributed", "--rank-threads", str(rank_threads)]
        env.update(OMP_NUM_THREADS=str(rank_threads), OPENBLAS_NUM_THREADS=str(rank_threads),
                   MKL_NUM_THREADS=str(rank_threads))
    else:
        command = worker
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        sys.exit(f"distributed_scaling: {' '.join(command[:4])} ... failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _summary(values):
    return statistics.median(values), min(values), max(values)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="lenet", help="a name of portable_cnn.models.MODELS (default: lenet)")
    p.add_argument("--backend", default="numpy", help="numpy (default), cupy, torch or auto")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--batch-size", type=int, default=64, help="the global batch (default: 64)")
    p.add_argument("--steps", type=int, default=30, help="timed steps per repeat (default: 30)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (default: 5)")
    p.add_argument("--repeats", type=int, default=5, help="repeats per configuration (default: 5)")
    p.add_argument("--ranks", type=int, default=2, help="up to this many ranks (default: 2)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="BLAS threads of the one-process baseline (default: all cores)")
    p.add_argument("--rank-layouts", default=None,
                   help="comma-separated rank counts, each optionally x threads per rank (e.g. 16x1,4x4); "
                        "default: 1 to --ranks ranks of one thread")
    p.add_argument("--rank-threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--rounds", type=int, default=1,
                   help="launches of every configuration, in turn (default: 1)")
    p.add_argument("--no-torch", action="store_true", help="leave native PyTorch out")
    p.add_argument("--rank-main", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--torch-main", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--distributed", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rank_main:
        (torch_main if args.torch_main else rank_main)(args)
        return
    configs = [(f"1 process, {args.threads} thread(s)", 1, False, False, 1)]
    for ranks, rank_threads in _rank_layouts(args):
        label = f"{ranks} rank{'s' if ranks > 1 else ''}, {rank_threads} thread{'s' if rank_threads > 1 else ''} each"
        configs.append((label, ranks, True, False, rank_threads))
    with_torch = not args.no_torch and args.backend == "numpy" and importlib.util.find_spec("torch") is not None
    if with_torch:
        configs.append((f"native PyTorch, {args.threads} thread(s)", 1, False, True, 1))
    runs = {label: [] for label, *_ in configs}  # per configuration, one launch's output per round
    for _ in range(args.rounds):
        for label, ranks, distributed, native_torch, rank_threads in configs:
            runs[label].append(launch(args, ranks, distributed, native_torch, rank_threads))
    print(f"{args.model}, {args.backend}, {args.dtype}, global batch {args.batch_size}, {args.steps} timed steps "
          f"after {args.warmup}, median (min-max) of {args.repeats} repeats x {args.rounds} round(s)")
    print("| configuration | images/s | / PyTorch | all-reduce ms/step | bare all-reduce ms | transport |")
    print("| --- | --- | --- | --- | --- | --- |")
    torch_label = configs[-1][0] if with_torch else None
    notes = []
    for label, ranks, distributed, native_torch, _ in configs:
        outs = runs[label]
        rows = [r for out in outs for r in out["results"]]
        speed = _summary([r["images_per_s"] for r in rows])
        reduce_ms = _summary([r["allreduce_ms_per_step"] for r in rows])
        reduce_text = f"{reduce_ms[0]:.2f} ({reduce_ms[1]:.2f}-{reduce_ms[2]:.2f})" if distributed else "-"
        bare_values = [out["bare_allreduce_ms"] for out in outs if out["bare_allreduce_ms"] is not None]
        bare = f"{statistics.median(bare_values):.2f}" if bare_values else "-"
        ratio_text = "-"
        if torch_label is not None and not native_torch:
            ratio = _summary([_round_speed(out) / _round_speed(ref) for out, ref in zip(outs, runs[torch_label])])
            ratio_text = f"{ratio[0]:.2f}x ({ratio[1]:.2f}-{ratio[2]:.2f})"
        elif native_torch:
            ratio_text = "reference"
        print(f"| {label} | {speed[0]:,.0f} ({speed[1]:,.0f}-{speed[2]:,.0f}) | {ratio_text} | {reduce_text} "
              f"| {bare} | {outs[0]['transport'] or '-'} |", flush=True)
        notes += [n for out in outs for n in out["notes"] if n not in notes]
    print(f"gradient buffer: {runs[configs[0][0]][0]['gradient_mb']:.2f} MB")
    for note in notes:
        print(f"note: {note}")


def _rank_layouts(args) -> list[tuple[int, int]]:
    """``(ranks, threads per rank)`` of each distributed configuration: ``--rank-layouts``, else 1..--ranks x 1."""
    if args.rank_layouts is None:
        return [(k, 1) for k in range(1, args.ranks + 1)]
    layouts = []
    for item in args.rank_layouts.split(","):
        ranks, _, threads = item.strip().partition("x")
        try:
            layouts.append((int(ranks), int(threads or 1)))
        except ValueError:
            sys.exit(f"distributed_scaling: --rank-layouts: expected items like 16 or 4x4, got {item!r}")
    return layouts


def _round_speed(out: dict) -> float:
    """One launch's median images/s over its repeats."""
    return statistics.median(r["images_per_s"] for r in out["results"])


if __name__ == "__main__":
    main()
