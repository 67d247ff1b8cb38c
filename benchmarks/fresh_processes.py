"""Ours against native PyTorch, each step timed in a fresh process of its own, the processes alternating.

``portable-cnn bench`` runs our step and PyTorch's side by side in one
process, where they share the allocator, caches and thread pools; a user
runs one or the other. This script times each in a process of its own,
built with the benchmark's own runners (the same network, weights, batch,
loss and SGD with momentum), and alternates the two in rounds, so drift on a
shared machine hits both alike; our process never imports torch::

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE \\
        python benchmarks/fresh_processes.py --nets vgg-small,lenet --batch-size 128 --rounds 6

Each process runs ``--warmup`` untimed steps, then ``--steps`` steps timed
one by one, and reports their median. A round's ratio is PyTorch's median
over ours (above 1: ours is faster); the table gives the median of the
rounds' ratios with their min-max, each side's median step, and our
process's page faults per step (``ru_minflt``).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SEED = 0


def child(runner: str, net: str, batch: int, dtype: str, steps: int, warmup: int) -> dict:
    """One runner's ``steps`` training steps in this process: median ms and page faults per step."""
    from portable_cnn.bench.protocol import build_model, make_batch
    from portable_cnn.bench.runners import OursRunner, TorchRunner

    x_np, y_np = make_batch(net, batch, dtype, SEED)
    model_np = build_model(net, SEED)
    state = {k: v.copy() for k, v in model_np.state_dict().items()}
    if runner == "ours":
        r = OursRunner("numpy", net, state, x_np, y_np, "train", dtype, SEED)
    else:
        import torch

        r = TorchRunner(torch, "cpu", model_np, state, x_np, y_np, "train", dtype)
    for _ in range(warmup):
        r.step()
    times, faults = [], []
    for _ in range(steps):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        r.step()
        r.sync()
        times.append(time.perf_counter() - start)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return {"ms": 1e3 * statistics.median(times), "faults": statistics.median(faults),
            "torch_loaded": "torch" in sys.modules}


def _run_child(runner, net, args) -> dict:
    command = [sys.executable, __file__, "--child", runner, "--nets", net, "--batch-size", str(args.batch_size),
               "--dtype", args.dtype, "--steps", str(args.steps), "--warmup", str(args.warmup)]
    done = subprocess.run(command, check=True, capture_output=True, text=True, cwd=REPO)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nets", default="vgg-small,lenet", help="comma-separated networks (default vgg-small,lenet)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--rounds", type=int, default=6, help="alternating rounds (default 6)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per process (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per process (default 3)")
    parser.add_argument("--child", choices=("ours", "pytorch"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.nets, args.batch_size, args.dtype, args.steps, args.warmup)))
        return 0
    print(f"fresh processes, {args.dtype}, batch {args.batch_size}, {args.rounds} rounds of "
          f"{args.warmup} + {args.steps} steps per process")
    print("| net | ours ms/step (min-max) | PyTorch ms/step (min-max) | ours / PyTorch (min-max) "
          "| our faults/step |")
    print("| --- | --- | --- | --- | --- |")
    for net in args.nets.split(","):
        ours, theirs, ratios, faults = [], [], [], []
        for round_ in range(args.rounds):
            order = ("ours", "pytorch") if round_ % 2 == 0 else ("pytorch", "ours")
            got = {runner: _run_child(runner, net, args) for runner in order}
            if got["ours"]["torch_loaded"]:
                raise SystemExit("fresh_processes: our process imported torch; it must not")
            ours.append(got["ours"]["ms"])
            theirs.append(got["pytorch"]["ms"])
            faults.append(got["ours"]["faults"])
            ratios.append(got["pytorch"]["ms"] / got["ours"]["ms"])

        def spread(values, fmt):
            return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"

        print(f"| {net} | {spread(ours, '{:.2f}')} | {spread(theirs, '{:.2f}')} | {spread(ratios, '{:.2f}x')} "
              f"| {statistics.median(faults):.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
