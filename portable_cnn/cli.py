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
``add_bench_parser(subparsers)`` (see :data:`EXTENSIONS`).

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
from contextlib import contextmanager
from pathlib import Path

from . import __version__

__all__ = ["main", "build_parser", "DEFAULT_MODEL", "TRAIN_DEFAULTS", "EXTENSIONS"]

#: The model each dataset trains by default.
DEFAULT_MODEL = {"digits": "digits", "mnist": "lenet", "cifar10": "vgg-small"}

#: Defaults of ``train`` options that depend on the optimizer. Chosen so that
#: the default run (the digits net on scikit-learn's digits, seed 0) reaches
#: about 98% test accuracy in 10 epochs; see README.
TRAIN_DEFAULTS = {
    "epochs": 10,
    "batch_size": 32,
    "optimizer": "sgd",
    "lr": {"sgd": 0.05, "adam": 1e-3},
    "momentum": 0.9,
    "weight_decay": {"sgd": 5e-4, "adam": 0.0},
    "schedule": "cosine",
    "seed": 0,
    "dtype": "float32",
    "log_every": 10,
}

#: Modules that may add a subcommand: (module, function that adds its parser).
EXTENSIONS = (("portable_cnn.bench", "add_bench_parser"),)

# The split of datasets that ship without one (digits, a plain .npz): fixed,
# so that the test set is the same for every --seed and for `eval`.
SPLIT = {"test_fraction": 0.2, "seed": 0}

PROG = "portable-cnn"


class CommandError(Exception):
    """A problem with the user's input that ends the command with a message and exit status 2."""


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
                   help="digits: scikit-learn's 8x8 digits (no download); mnist: a directory of IDX files; "
                        "cifar10: the cifar-10-batches-bin directory; npz: a .npz with x and y "
                        f"(default: digits, or npz when --data ends in .npz{help_suffix})")
    p.add_argument("--data", metavar="PATH", default=None, help="where the mnist, cifar10 or npz data is")


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``train`` subcommand."""
    from .models import MODELS
    from .train import OPTIMIZERS, SCHEDULES

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
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=None, help=f"default: {d['optimizer']}")
    p.add_argument("--lr", type=_positive_float, default=None,
                   help=f"initial learning rate (default: {d['lr']['sgd']} for sgd, {d['lr']['adam']} for adam)")
    p.add_argument("--momentum", type=_momentum, default=None, help=f"SGD momentum (default: {d['momentum']})")
    p.add_argument("--weight-decay", type=_non_negative_float, default=None,
                   help=f"L2 penalty (default: {d['weight_decay']['sgd']} for sgd, {d['weight_decay']['adam']} for adam)")
    p.add_argument("--schedule", choices=SCHEDULES, default=None,
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


def build_parser() -> argparse.ArgumentParser:
    """The ``portable-cnn`` argument parser with every available subcommand."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Train and evaluate CNNs with portable_cnn: NumPy on the CPU, CuPy on the GPU.",
        epilog="Run 'portable-cnn COMMAND -h' for a command's options; with no command, 'train' runs.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_train_parser(subparsers)
    add_eval_parser(subparsers)
    for module_name, function in EXTENSIONS:
        # find_spec first: a missing optional module is fine, but an error
        # inside one that exists must surface.
        if importlib.util.find_spec(module_name) is not None:
            getattr(importlib.import_module(module_name), function)(subparsers)
    return parser


# ------------------------------------------------------------------- helpers


def _say(args, text: str) -> None:
    if not getattr(args, "quiet", False):
        print(text, flush=True)


def _resolve_backend(name: str) -> tuple[str, str]:
    from .backend import BackendUnavailableError, resolve_backend

    try:
        return resolve_backend(name)
    except BackendUnavailableError as exc:
        raise CommandError(str(exc)) from None


def _set_tf32(args, backend_name: str) -> None:
    from .backend import set_tf32

    set_tf32(args.tf32)
    if args.tf32:
        _say(args, "TF32 on for float32 matrix products" + ("" if backend_name == "cupy" else " (no effect on the CPU)"))


def _infer_dataset(dataset: str | None, data_path: str | None) -> str:
    if dataset is not None:
        return dataset
    if data_path is None:
        return "digits"
    if str(data_path).lower().endswith(".npz"):
        return "npz"
    raise CommandError(f"--data {data_path}: say which format it is with --dataset mnist, cifar10 or npz")


def _load_data(dataset: str, data_path: str | None, split: dict | None = None):
    """Load a dataset, turning every loader error into a one-line :class:`CommandError`."""
    from .data import load_dataset

    kwargs = dict(SPLIT if split is None else split) if dataset in ("digits", "npz") else {}
    try:
        return load_dataset(dataset, data_path, **kwargs)
    except (OSError, ValueError, ImportError, TypeError) as exc:
        raise CommandError(f"cannot load dataset {dataset!r}: {exc}") from None


def _default_model(dataset: str, input_shape) -> str:
    if dataset in DEFAULT_MODEL:
        return DEFAULT_MODEL[dataset]
    c, h, w = input_shape
    if max(h, w) <= 16:
        return "digits"
    return "lenet" if c == 1 else "vgg-small"


def _load_checkpoint(path):
    from .checkpoint import CheckpointError, load_checkpoint

    try:
        return load_checkpoint(path)
    except (OSError, CheckpointError) as exc:
        raise CommandError(str(exc)) from None


@contextmanager
def _cpu_threads(args, model_name: str, backend_name: str):
    """Limit the BLAS threads and portable_cnn's own CPU threads for the duration of a command.

    The digits net's matrix products are so small that splitting them over
    threads costs more than it gains; on a busy 2-core machine OpenBLAS's
    spinning threads made the default run 10x slower than one thread.
    """
    threads = args.threads if args.threads is not None else (1 if model_name == "digits" else 0)
    if threads == 0 or backend_name == "cupy":
        yield
        return
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # a dependency of scikit-learn, so normally present
        _say(args, "note: threadpoolctl is not installed; --threads has no effect")
        yield
        return
    from .ops import _parallel

    previous = _parallel.num_threads() if _parallel._threads_override is not None else None
    _parallel.set_num_threads(threads)  # the NumPy fast paths' own thread pool follows --threads too
    try:
        with threadpool_limits(limits=threads, user_api="blas"):
            yield
    finally:
        _parallel.set_num_threads(previous)


def _count_parameters(model) -> int:
    total = 0
    for _, layer, key in model.named_parameters():
        n = 1
        for d in layer.params[key].shape:
            n *= int(d)
        total += n
    return total


def _device_text(model) -> str:
    from . import backend

    for _, layer, key in model.named_parameters():
        return str(backend.device(layer.params[key]))
    return "?"


# --------------------------------------------------------------------- train


def _train_settings(args, ckpt) -> dict:
    """The run's settings: the options given, else the checkpoint's (on --resume), else the defaults.

    A resumed run keeps its settings; an option that would change one is refused.
    """
    d = TRAIN_DEFAULTS
    given = {
        "model": args.model, "dataset": args.dataset, "data": args.data, "batch_size": args.batch_size,
        "optimizer": args.optimizer, "lr": args.lr, "momentum": args.momentum,
        "weight_decay": args.weight_decay, "schedule": args.schedule, "seed": args.seed, "dtype": args.dtype,
    }
    if ckpt is not None:
        train = ckpt.train
        saved = {
            "model": ckpt.model.get("name"), "dataset": ckpt.data.get("name"), "data": ckpt.data.get("path"),
            "batch_size": train.get("batch_size"), "optimizer": (ckpt.optimizer or {}).get("name"),
            "lr": train.get("base_lr"), "momentum": (ckpt.optimizer or {}).get("momentum"),
            "weight_decay": (ckpt.optimizer or {}).get("weight_decay"),
            "schedule": (ckpt.scheduler or {}).get("name", "none"), "seed": train.get("seed"), "dtype": ckpt.dtype,
        }
        conflicts = []
        for key, value in given.items():
            if value is None or saved.get(key) is None:
                continue
            same = (str(Path(value).resolve()) == str(Path(saved[key]).resolve())) if key == "data" else value == saved[key]
            if not same:
                conflicts.append(f"--{key.replace('_', '-')} {value} (the checkpoint has {saved[key]})")
        if conflicts:
            raise CommandError(
                f"--resume {ckpt.path} continues the saved run, whose settings cannot change: "
                + "; ".join(conflicts) + ". Drop these options, or start a new run without --resume."
            )
        settings = {k: (saved[k] if saved.get(k) is not None else given[k]) for k in given}
        settings["epochs"] = args.epochs or train.get("epochs") or d["epochs"]
        settings["log_every"] = args.log_every or train.get("log_every") or d["log_every"]
        settings["scheduler_config"] = ckpt.scheduler
        return settings
    settings = dict(given)
    settings["dataset"] = _infer_dataset(args.dataset, args.data)
    settings["optimizer"] = args.optimizer or d["optimizer"]
    opt = settings["optimizer"]
    if opt != "sgd" and args.momentum is not None:
        raise CommandError(f"--momentum applies to --optimizer sgd, not {opt}")
    for key in ("batch_size", "seed", "dtype", "schedule", "epochs", "log_every"):
        value = getattr(args, key)
        settings[key] = value if value is not None else d[key]
    settings["lr"] = args.lr if args.lr is not None else d["lr"][opt]
    settings["weight_decay"] = args.weight_decay if args.weight_decay is not None else d["weight_decay"][opt]
    settings["momentum"] = (args.momentum if args.momentum is not None else d["momentum"]) if opt == "sgd" else None
    settings["scheduler_config"] = None
    return settings


def _optimizer_config(s: dict) -> dict:
    config = {"name": s["optimizer"], "lr": s["lr"], "weight_decay": s["weight_decay"]}
    if s["optimizer"] == "sgd":
        config["momentum"] = s["momentum"]
    return config


def _scheduler_config(s: dict) -> dict:
    """The schedule for ``s["epochs"]`` epochs; a resumed cosine run re-aims at the new total."""
    saved = s.get("scheduler_config")
    name = s["schedule"]
    if name == "cosine":
        return {"name": "cosine", "T_max": s["epochs"], "eta_min": 0.0}
    if name == "step":
        if saved and saved.get("name") == "step":
            return {"name": "step", "step_size": saved["step_size"], "gamma": saved["gamma"]}
        return {"name": "step", "step_size": max(1, s["epochs"] // 3), "gamma": 0.1}
    return {"name": "none"}


def run_train(args) -> int:
    """``portable-cnn train``."""
    from . import data as data_mod
    from .models import build_model
    from .train import NonFiniteLossError, Trainer, TrainingInterrupted, build_optimizer, build_scheduler

    ckpt = _load_checkpoint(args.resume) if args.resume else None
    if ckpt is not None and (not ckpt.optimizer or not ckpt.data.get("name")):
        raise CommandError(f"--resume {ckpt.path}: the checkpoint holds no optimizer or dataset record, so it "
                           f"cannot continue a run (portable-cnn eval can still use it)")
    s = _train_settings(args, ckpt)
    backend_name, why = _resolve_backend(args.backend)
    _set_tf32(args, backend_name)

    dataset = _load_data(s["dataset"], s["data"], (ckpt.data.get("split") if ckpt else None))
    if ckpt is not None and ckpt.data.get("mean") is not None:
        # The statistics the run started with, not new ones.
        dataset = _renormalized(dataset, ckpt.data["mean"], ckpt.data["std"])
    else:
        dataset = data_mod.normalize(dataset)
    c, h, w = dataset.input_shape
    model_name = s["model"] or _default_model(s["dataset"], dataset.input_shape)
    model_config = {"name": model_name, "in_channels": c, "num_classes": dataset.num_classes,
                    "input_size": [h, w], "seed": s["seed"]}
    if ckpt is not None:
        expected = {k: ckpt.model.get(k) for k in ("in_channels", "num_classes", "input_size")}
        actual = {k: model_config[k] for k in expected}
        if expected != actual:
            raise CommandError(f"--resume {ckpt.path}: the dataset gives {actual} but the checkpoint's model has {expected}")
        model_config = dict(ckpt.model)
    try:
        model = build_model(model_name, in_channels=c, num_classes=dataset.num_classes, input_size=(h, w),
                            seed=s["seed"])
    except (TypeError, ValueError) as exc:
        raise CommandError(f"model {model_name!r} does not fit dataset {dataset.name!r} ({c}x{h}x{w}): {exc}") from None
    model.to(backend_name, s["dtype"])
    # A resumed run rebuilds its optimizer from the saved config, at the
    # initial learning rate the schedule starts from (restore sets the current one).
    opt_config = dict(ckpt.optimizer, lr=s["lr"]) if ckpt is not None and ckpt.optimizer else _optimizer_config(s)
    optimizer = build_optimizer(model, opt_config)
    sched_config = _scheduler_config(s)
    scheduler = build_scheduler(optimizer, sched_config)

    data_path = str(Path(s["data"]).resolve()) if s["data"] is not None else None
    data_config = {"name": s["dataset"], "path": data_path, "split": SPLIT if s["dataset"] in ("digits", "npz") else None,
                   "mean": dataset.mean, "std": dataset.std, "input_shape": list(dataset.input_shape)}
    train_config = {"epochs": s["epochs"], "base_lr": s["lr"], "backend": backend_name}
    checkpoint_path = args.checkpoint or args.resume
    interrupt_path = checkpoint_path or f"{model_name}-interrupted.safetensors"

    _say(args, f"backend: {backend_name} on device {_device_text(model)} ({why})")
    _say(args, f"dataset: {dataset.name}, {len(dataset.y_train)} train / {len(dataset.y_test)} test images "
               f"of {c}x{h}x{w}, {dataset.num_classes} classes")
    opt_text = ", ".join(f"{k}={v}" for k, v in opt_config.items() if k != "name")
    _say(args, f"model: {model_name} ({_count_parameters(model):,} parameters, {s['dtype']}); "
               f"{s['optimizer']} ({opt_text}), schedule {sched_config['name']}, batch size {s['batch_size']}, "
               f"{s['epochs']} epochs, seed {s['seed']}")

    log_file = None
    if args.log_json:
        try:
            log_file = open(args.log_json, "a" if ckpt is not None else "w", encoding="utf-8")
        except OSError as exc:
            raise CommandError(f"--log-json {args.log_json}: {exc}") from None
    try:
        try:
            trainer = Trainer(
                model, optimizer, dataset, scheduler=scheduler, scheduler_config=sched_config,
                batch_size=s["batch_size"], seed=s["seed"], log_every=s["log_every"],
                checkpoint_path=checkpoint_path, interrupt_path=interrupt_path, model_config=model_config,
                data_config=data_config, train_config=train_config, progress=not args.quiet,
                log_json=log_file, echo=None if args.quiet else (lambda line: print(line, flush=True)),
            )
        except ValueError as exc:  # labels that do not fit the classes, bad sizes
            raise CommandError(str(exc)) from None
        if ckpt is not None:
            from .checkpoint import CheckpointError

            try:
                trainer.restore(ckpt)
            except (CheckpointError, ValueError) as exc:
                raise CommandError(str(exc)) from None
            at = f"epoch {ckpt.epoch}" + (f", batch {ckpt.batch_in_epoch}" if ckpt.batch_in_epoch else "")
            _say(args, f"resumed from {ckpt.path} at {at} (step {ckpt.step})")
        if trainer.epoch >= s["epochs"] and not trainer.batch_in_epoch:
            _say(args, f"the checkpoint is already at epoch {trainer.epoch} of --epochs {s['epochs']}: nothing to train")
        start = time.perf_counter()
        try:
            with _cpu_threads(args, model_name, backend_name):
                trainer.fit(s["epochs"])
        except NonFiniteLossError as exc:
            print(f"{PROG}: error: {exc}", file=sys.stderr)
            return 1
        except TrainingInterrupted as exc:
            print(f"\n{PROG}: {exc}", file=sys.stderr)
            if exc.checkpoint_path is not None:
                print(f"{PROG}: resume with: {PROG} train --resume {exc.checkpoint_path}", file=sys.stderr)
            return 130
        elapsed = time.perf_counter() - start
    finally:
        if log_file is not None:
            log_file.close()

    if trainer.history:
        accuracy = trainer.history[-1].test_accuracy
    else:  # a checkpoint from before this version's metrics, already done
        from .train import evaluate

        accuracy = evaluate(model, dataset.x_test, dataset.y_test).accuracy
    n = len(dataset.y_test)
    print(f"test accuracy: {accuracy:.2%} ({round(accuracy * n)}/{n}) after {trainer.epoch} epochs "
          f"on {backend_name}, {elapsed:.1f} s training")
    if checkpoint_path is not None:
        _say(args, f"checkpoint: {checkpoint_path}")
    return 0


def _renormalized(dataset, mean, std):
    """``dataset`` standardised with given per-channel statistics (those saved in a checkpoint)."""
    from dataclasses import replace

    import numpy as np

    from .data import apply_normalization

    try:
        mean, std = np.asarray(mean, dtype=np.float32), np.asarray(std, dtype=np.float32)
        return replace(dataset, x_train=apply_normalization(dataset.x_train, mean, std),
                       x_test=apply_normalization(dataset.x_test, mean, std), mean=mean, std=std)
    except ValueError as exc:
        raise CommandError(f"dataset {dataset.name!r} does not fit the checkpoint's normalisation: {exc}") from None


# ---------------------------------------------------------------------- eval


def run_eval(args) -> int:
    """``portable-cnn eval``."""
    from .checkpoint import CheckpointError
    from .data import normalize
    from .train import evaluate

    ckpt = _load_checkpoint(args.checkpoint)
    backend_name, why = _resolve_backend(args.backend)
    _set_tf32(args, backend_name)
    if args.dataset is None and args.data is None:
        name, path = ckpt.data.get("name"), ckpt.data.get("path")
        if name is None:
            raise CommandError(f"{ckpt.path} does not say which dataset it was trained on; give --dataset/--data")
    else:
        name, path = _infer_dataset(args.dataset, args.data), args.data
    same_source = name == ckpt.data.get("name")
    dataset = _load_data(name, path, ckpt.data.get("split") if same_source else None)
    if ckpt.data.get("mean") is not None:
        dataset = _renormalized(dataset, ckpt.data["mean"], ckpt.data["std"])
    else:
        dataset = normalize(dataset)
    c, h, w = dataset.input_shape
    want = (ckpt.model.get("in_channels"), *ckpt.model.get("input_size", (None, None)))
    if (c, h, w) != tuple(want):
        raise CommandError(f"dataset {dataset.name!r} has {c}x{h}x{w} images but the checkpoint's model "
                           f"takes {want[0]}x{want[1]}x{want[2]}")
    if dataset.num_classes > ckpt.model.get("num_classes", 0):
        raise CommandError(f"dataset {dataset.name!r} has {dataset.num_classes} classes but the checkpoint's "
                           f"model predicts {ckpt.model.get('num_classes')}")
    try:
        model = ckpt.build_model(backend_name, args.dtype)
    except CheckpointError as exc:
        raise CommandError(str(exc)) from None
    _say(args, f"backend: {backend_name} on device {_device_text(model)} ({why})")
    _say(args, f"checkpoint: {ckpt.path}: model {ckpt.model.get('name')}, epoch {ckpt.epoch}, step {ckpt.step}, "
               f"written by portable_cnn {ckpt.version}")
    start = time.perf_counter()
    with _cpu_threads(args, ckpt.model.get("name"), backend_name):
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
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(_with_default_command(argv))
    try:
        return args.func(args)
    except CommandError as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 2
