"""The ``bench`` command line: its options, and :func:`run_bench`, which runs what they describe."""

from __future__ import annotations

import argparse
import importlib
import sys
import time

from .. import backend
from ..paths import OutputPathError, check_outputs
from . import report
from .breakdown import run_breakdown
from .environment import configure_tf32, describe, torch_installed
from .protocol import DTYPES, MODES, NETS, OUR_BACKENDS
from .runners import run_config

DESCRIPTION = (
    "Training-step and inference images/s of lenet, vgg-small, resnet20 and mobilenet-small on our backends, "
    "beside native PyTorch in the same run (same net, weights and batch), with the ratio, the spread and a "
    "result check. "
    "See benchmarks/README.md."
)


def _csv(kind, choices=None):
    """An argparse type: a comma-separated list of ``choices``, or of positive ints for ``kind="batch sizes"``."""

    def parse(text):
        items = [item.strip() for item in text.split(",") if item.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind}, got {text!r}")
        if kind == "batch sizes":
            try:
                values = [int(item) for item in items]
            except ValueError:
                raise argparse.ArgumentTypeError(f"batch sizes must be integers, got {text!r}") from None
            if any(v < 1 for v in values):
                raise argparse.ArgumentTypeError(f"batch sizes must be positive, got {text!r}")
            return values
        unknown = [item for item in items if item not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {kind} {', '.join(unknown)}; choose from {', '.join(choices)}")
        return items

    return parse


def configure_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``bench`` options to ``parser``; returns it."""
    parser.add_argument("--nets", type=_csv("nets", tuple(NETS)),
                        default=["lenet", "vgg-small", "resnet20", "mobilenet-small"],
                        help="comma-separated networks (default: lenet,vgg-small,resnet20,mobilenet-small; "
                             "also: digits)")
    parser.add_argument("--batch-sizes", type=_csv("batch sizes"), default=[32, 128, 256],
                        help="comma-separated batch sizes (default: 32,128,256)")
    parser.add_argument("--backends", type=_csv("backends", OUR_BACKENDS), default=None,
                        help="comma-separated backends of ours: numpy, torch (our code on torch tensors), cupy, "
                             "array_api_strict (default: every available among numpy, torch, cupy)")
    parser.add_argument("--modes", type=_csv("modes", MODES), default=list(MODES),
                        help="train, infer or both (default: train,infer)")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="the floating-point type of every runner, ours and PyTorch's (default: float32)")
    parser.add_argument("--dtypes", type=_csv("dtypes", DTYPES), default=None,
                        help="comma-separated dtypes to measure in one run, a row each (e.g. float32,float64); "
                             "the same as --dtype for one")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats at least (default 7)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps per runner (default 2)")
    parser.add_argument("--repeat-seconds", type=float, default=1.0,
                        help="target duration of one repeat; sets the steps per repeat (default 1.0; at 0.2 a "
                             "vgg-small repeat on 2 cores was a single step)")
    parser.add_argument("--max-seconds", type=float, default=30.0,
                        help="time cap per configuration (net, batch, mode): past it no new round of repeats "
                             "starts once every runner has min(--repeats, 3) (default 30)")
    parser.add_argument("--stable-tol", type=float, default=0.02,
                        help="stop once each median moves less than this fraction over the last two repeats "
                             "(default 0.02)")
    parser.add_argument("--gap-seconds", type=float, default=0.15,
                        help="idle pause before each repeat, outside the clock, so that the previous runner's "
                             "worker threads stop spinning (default 0.15; OpenBLAS's spin about 0.1 s)")
    parser.add_argument("--quick", action="store_true",
                        help="a short run: 3 repeats, 1 warm-up step, 0.05 s repeats, 3 s cap")
    parser.add_argument("--no-reference", action="store_true",
                        help="skip native PyTorch even where it is installed (no ratios)")
    parser.add_argument("--tf32", action="store_true",
                        help="allow TF32 on the GPU for both CuPy and PyTorch (default: off on both sides)")
    parser.add_argument("--breakdown", action="store_true",
                        help="also time each layer type: conv forward, backward-data, backward-weights, pooling, "
                             "elementwise, linear, loss, optimizer, with GFLOP/s")
    parser.add_argument("--breakdown-steps", type=int, default=5, help="timed steps of the breakdown (default 5)")
    parser.add_argument("--breakdown-backends", type=_csv("backends", OUR_BACKENDS), default=None,
                        help="backends to break down (default: numpy and cupy among those measured)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the batch (default 0)")
    parser.add_argument("--json", dest="json_path", default="bench-results/bench.json",
                        help="where to write the results as JSON (default bench-results/bench.json; '' to skip)")
    parser.add_argument("--plot", dest="plot_path", default="bench-results/bench.png",
                        help="where to write the PNG plot (default bench-results/bench.png; '' to skip)")
    parser.add_argument("--markdown", dest="markdown_path", default="",
                        help="also write the results table in Markdown to this path")
    parser.add_argument("--quiet", action="store_true", help="no progress lines, only the report")
    return parser


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``bench`` subcommand to an ``argparse`` subparsers object.

    Parameters
    ----------
    subparsers : argparse._SubParsersAction
        What ``ArgumentParser.add_subparsers()`` returned.

    Returns
    -------
    argparse.ArgumentParser
        The subcommand's parser; its default ``func`` is :func:`run_bench`.
    """
    parser = subparsers.add_parser(
        "bench",
        help="training/inference images/s beside native PyTorch",
        description=DESCRIPTION,
    )
    configure_parser(parser)
    parser.set_defaults(func=run_bench)
    return parser


def main(argv=None) -> int:
    """``python -m portable_cnn.bench [options]``: the same as ``portable-cnn bench``; returns the exit status."""
    parser = configure_parser(argparse.ArgumentParser(prog="portable-cnn bench", description=DESCRIPTION))
    return run_bench(parser.parse_args(argv))


def _log(args, message):
    """A progress line on stderr, unless ``--quiet``."""
    if not args.quiet:
        print(message, file=sys.stderr, flush=True)


def _resolve_backends(args):
    """Backends of ours to measure; ``(names, note)`` or raise BackendUnavailableError."""
    if args.backends is None:
        names = ["numpy"]
        if torch_installed():
            names.append("torch")
        ok, why = backend.cupy_status()
        if ok:
            names.append("cupy")
        return names, (None if ok else f"cupy not measured: {why}")
    for name in args.backends:
        backend.get_namespace(name)  # raises BackendUnavailableError with the reason
    return list(dict.fromkeys(args.backends)), None


def _references(args, backends, torch_mod):
    """Devices of the native PyTorch references, ``(devices, note)``: the CPU for CPU backends, CUDA for CuPy."""
    if args.no_reference:
        return [], "native PyTorch reference skipped (--no-reference): no ratios"
    if torch_mod is None:
        return [], ("PyTorch not installed: no native reference and no ratios; first-step results are "
                    "checked against our NumPy code in float64")
    devices, note = [], None
    if any(b != "cupy" for b in backends):
        devices.append("cpu")
    if "cupy" in backends:
        if torch_mod.cuda.is_available():
            devices.append("cuda")
            torch_mod.backends.cudnn.benchmark = True
        else:
            note = "PyTorch has no CUDA here: no GPU reference for cupy"
    return devices, note


def _resolve_dtypes(args):
    """The dtypes to measure from ``--dtype`` and ``--dtypes``; ``(dtypes, None)``, or ``(None, error line)``."""
    if args.dtypes is None:
        return [args.dtype or "float32"], None
    dtypes = list(dict.fromkeys(args.dtypes))
    if args.dtype is not None and dtypes != [args.dtype]:
        return None, (f"portable-cnn bench: --dtypes must equal --dtype ({args.dtype}) when both are given, "
                      f"got {','.join(args.dtypes)}")
    return dtypes, None


def run_bench(args) -> int:
    """Run the benchmark that parsed ``bench`` options describe, print the report and write its files.

    Parameters
    ----------
    args : argparse.Namespace
        From the parser of :func:`add_bench_parser` or :func:`main`.

    Returns
    -------
    int
        The exit status: 0, 1 when a result check failed, 2 for bad options
        or an unavailable backend (a one-line message on stderr).
    """
    if args.quick:
        args.repeats = min(args.repeats, 3)
        args.warmup = min(args.warmup, 1)
        args.repeat_seconds = min(args.repeat_seconds, 0.05)
        args.max_seconds = min(args.max_seconds, 3.0)
    for name in ("repeats", "warmup", "breakdown_steps"):
        if getattr(args, name) < (0 if name == "warmup" else 1):
            print(f"portable-cnn bench: --{name.replace('_', '-')} must be positive, got {getattr(args, name)}",
                  file=sys.stderr)
            return 2
    # Checked before minutes of measuring; an empty path skips that output.
    try:
        check_outputs({f"--{option}": getattr(args, f"{option}_path") or None for option in ("json", "markdown", "plot")})
    except OutputPathError as exc:
        print(f"portable-cnn bench: {exc}", file=sys.stderr)
        return 2
    args.dtypes, error = _resolve_dtypes(args)
    if error:
        print(error, file=sys.stderr)
        return 2
    # Before CuPy's first GEMM (cupy_status below runs only an elementwise kernel).
    backend.set_tf32(args.tf32)
    try:
        backends, backend_note = _resolve_backends(args)
        for name in (args.breakdown_backends or []) if args.breakdown else []:
            backend.get_namespace(name)
    except backend.BackendUnavailableError as exc:
        print(f"portable-cnn bench: {exc}", file=sys.stderr)
        return 2

    torch_mod = importlib.import_module("torch") if torch_installed() else None
    references, reference_note = _references(args, backends, torch_mod)
    cupy_info = backend.cupy_status()[1] if "cupy" in backends else None
    tf32 = configure_tf32(args.tf32, "cupy" in backends, torch_mod if "cuda" in references else None)

    env = describe(args, backends, torch_mod, cupy_info)
    env["references"] = [f"pytorch-{d}" for d in references]
    env["tf32"] = tf32
    if "cuda" in references:
        env["torch"]["cudnn_benchmark"] = True
    env["notes"] = [n for n in (backend_note, reference_note) if n]
    report.print_environment(env)

    records = []
    for net in args.nets:
        for batch in args.batch_sizes:
            for mode in args.modes:
                # The dtypes innermost: their rows of one configuration stand together in the table.
                for dtype in args.dtypes:
                    t0 = time.perf_counter()
                    recs = run_config(args, net, batch, mode, dtype, backends, torch_mod, references)
                    records.extend(recs)
                    summary = ", ".join(f"{r['backend']} {report.format_ips(r['images_per_s']['median'])}/s"
                                        for r in recs)
                    _log(args, f"  {net} {mode} batch {batch} {dtype}: {summary} ({time.perf_counter() - t0:.1f} s)")

    failed = report.print_results(records)
    gpu_rows, overtakes = report.gpu_comparison(records)
    report.print_gpu_comparison(gpu_rows, overtakes)
    report.print_memory()

    breakdowns = []
    if args.breakdown:
        chosen = args.breakdown_backends or [b for b in backends if b in ("numpy", "cupy")]
        for b in chosen:
            for dtype in args.dtypes:
                for net in args.nets:
                    for batch in args.batch_sizes:
                        breakdowns.append(run_breakdown(args, net, batch, b, dtype))
                        report.print_breakdown(breakdowns[-1])

    # Schema 2: the environment's "dtype" became "dtypes" (a list), and every record carries its "dtype".
    output = {"schema": "portable-cnn-bench/2", "environment": env, "results": records,
              "gpu_vs_cpu": {"speedups": gpu_rows, "overtakes": overtakes}, "breakdown": breakdowns}
    report.write_outputs(output, args.json_path, args.markdown_path, args.plot_path)
    return 1 if failed else 0
