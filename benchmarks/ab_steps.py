"""Before and after a change: whole training steps of two revisions of portable_cnn, interleaved in one process.

The "A/B" figures of docs/benchmarks.md (issue 15) come from this script. It
exports the package of a git revision (``--base``, default ``HEAD``) into a
temporary folder under another name, imports it beside the package of this
checkout, builds the same network with the same seed, input and labels in
each, and times training steps (forward, softmax cross-entropy, backward
without the input gradient, SGD with momentum) in rounds that alternate
which of the two goes first, so that drift and noise on a shared machine hit
both alike. Each round times ``--steps`` steps of each after one untimed
step; a round's ratio is base time over new time, and the table gives the
median of the rounds' ratios with their quartiles (above 1: the checkout is
faster)::

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE \\
        python benchmarks/ab_steps.py --base a614e69 --nets lenet --batch-sizes 64,128 --rounds 30

Run it from the repository root (it needs ``git``). Unset the machine's
``OPENBLAS_*`` variables for a timing run, as above: they are read when NumPy
loads, before this script could change them.
"""

from __future__ import annotations

import argparse
import importlib
import io
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BASE_NAME = "pcnn_base"
# (input channels, input size) of each network's dataset.
INPUTS = {"digits": (1, 8), "lenet": (1, 28), "vgg-small": (3, 32), "resnet20": (3, 32), "mobilenet-small": (3, 32)}
SMALL_NETS = ("digits", "lenet")  # several steps per round; one for the others


def export_base(revision: str, into: Path) -> None:
    """``portable_cnn`` of ``revision`` as the package ``pcnn_base`` in ``into``; ``ValueError`` if git cannot."""
    try:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", revision, "portable_cnn"],
                                 check=True, capture_output=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", b"") or str(exc).encode()
        raise ValueError(f"ab_steps: --base {revision!r}: git archive failed: {detail.decode().strip()}") from None
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    (into / "portable_cnn").rename(into / BASE_NAME)
    for path in (into / BASE_NAME).rglob("*.py"):  # absolute imports and names of the package
        path.write_text(path.read_text().replace("portable_cnn", BASE_NAME))


def training_step(package, net: str, batch: int, dtype: str):
    """A function running one training step of ``net`` in ``package`` on a fixed batch (seed 0)."""
    import numpy as np

    channels, size = INPUTS[net]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, channels, size, size)).astype(dtype)
    labels = rng.integers(0, 10, batch)
    model = package.models.build_model(net, in_channels=channels, num_classes=10, input_size=size, seed=0)
    model.to("numpy", dtype)
    loss_fn = package.nn.SoftmaxCrossEntropy(validate=False)
    optimizer = package.optim.SGD(model, lr=0.01, momentum=0.9)

    def step():
        loss_fn.forward(model.forward(x), labels)
        model.backward(loss_fn.backward(), need_input_grad=False)
        optimizer.step()

    return step


def compare(packages: dict, net: str, batch: int, dtype: str, rounds: int, steps: int) -> dict:
    """Interleaved rounds of ``steps`` timed steps of each package; ms per step and per-round ratios."""
    runs = {name: training_step(package, net, batch, dtype) for name, package in packages.items()}
    for run in runs.values():  # warm-up: buffers, the thread pool, BLAS
        run()
        run()
    times = {name: [] for name in runs}
    for r in range(rounds):
        for name in (list(runs) if r % 2 else list(runs)[::-1]):
            runs[name]()
            start = time.perf_counter()
            for _ in range(steps):
                runs[name]()
            times[name].append((time.perf_counter() - start) / steps * 1e3)
    ratios = [b / n for b, n in zip(times["base"], times["new"])]
    return {"times": times, "ratios": ratios}


def _quartiles(values) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4)
    return q1, statistics.median(values), q3


def _parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="HEAD", help="git revision to compare this checkout with (default HEAD)")
    parser.add_argument("--nets", default="lenet", help=f"comma-separated, of {', '.join(INPUTS)} (default lenet)")
    parser.add_argument("--batch-sizes", default="128", help="comma-separated (default 128)")
    parser.add_argument("--rounds", type=int, default=20, help="interleaved rounds (default 20)")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per round and side (default 5 for digits and lenet, else 1)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--threads", type=int, default=None, help="the NumPy kernels' threads (default: the cores)")
    args = parser.parse_args(argv)
    nets = [n for n in args.nets.split(",") if n]
    unknown = [n for n in nets if n not in INPUTS]
    if unknown:
        parser.error(f"--nets: expected names from {', '.join(INPUTS)}, got {', '.join(unknown)}")
    try:
        args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    except ValueError:
        parser.error(f"--batch-sizes: expected comma-separated positive ints, got {args.batch_sizes!r}")
    if not args.batch_sizes or min(args.batch_sizes) < 1:
        parser.error(f"--batch-sizes: expected comma-separated positive ints, got {args.batch_sizes}")
    if args.rounds < 1 or (args.steps is not None and args.steps < 1):
        parser.error(f"--rounds and --steps must be at least 1, got {args.rounds} and {args.steps}")
    args.nets = nets
    return args


def main(argv=None) -> int:
    args = _parse_args(argv)
    if any(os.environ.get(name) for name in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")):
        print("note: OPENBLAS_CORETYPE or OPENBLAS_L2_SIZE is set; unset both for timing figures", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="ab_steps-") as folder:
        try:
            export_base(args.base, Path(folder))
        except ValueError as exc:
            print(exc, file=sys.stderr)
            return 2
        sys.path[:0] = [str(REPO), folder]
        packages = {"base": importlib.import_module(BASE_NAME), "new": importlib.import_module("portable_cnn")}
        if args.threads is not None:
            for package in packages.values():
                package.set_config(num_threads=args.threads)
        revision = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", args.base],
                                  capture_output=True, text=True).stdout.strip()
        print(f"base {args.base} ({revision}) against this checkout, {args.dtype}, "
              f"{'all cores' if args.threads is None else f'{args.threads} thread(s)'}")
        print("| net | batch | base ms/step (q1-q3) | new ms/step (q1-q3) | speed-up, median of rounds (q1-q3) | rounds x steps |")
        print("| --- | --- | --- | --- | --- | --- |")
        for net in args.nets:
            for batch in args.batch_sizes:
                steps = args.steps or (5 if net in SMALL_NETS else 1)
                result = compare(packages, net, batch, args.dtype, args.rounds, steps)
                (b1, b, b3), (n1, n, n3) = (_quartiles(result["times"][k]) for k in ("base", "new"))
                r1, r, r3 = _quartiles(result["ratios"])
                print(f"| {net} | {batch} | {b:.2f} ({b1:.2f}-{b3:.2f}) | {n:.2f} ({n1:.2f}-{n3:.2f}) | "
                      f"**{r:.3f}x** ({r1:.3f}-{r3:.3f}) | {args.rounds} x {steps} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
