"""A training run as a value: start or resume one from Python exactly as ``portable-cnn train`` does.

:class:`RunConfig` holds every setting of a run. Built from keyword
settings, a ``None`` means "the default" (:data:`TRAIN_DEFAULTS`, and
:data:`DEFAULT_MODEL` for the model); built with :meth:`RunConfig.resume`
from a checkpoint, a ``None`` means "the saved run's", and a setting that
would change the saved run is refused. :class:`Run` turns a configuration
into a dataset, model, optimizer, schedule and
:class:`~portable_cnn.train.Trainer` (restored from the checkpoint when
resuming); :meth:`Run.fit` trains with the run's thread policy. The command
line only turns its options into a :class:`RunConfig` and adds presentation
callbacks (:mod:`portable_cnn.callbacks`)::

    from portable_cnn.callbacks import ConsoleLines
    from portable_cnn.run import RunConfig, start

    start(RunConfig(epochs=5, checkpoint="digits.safetensors"))        # portable-cnn train --epochs 5 --checkpoint ...
    run = start(RunConfig.resume("digits.safetensors", epochs=10),     # portable-cnn train --resume ... --epochs 10
                callbacks=[ConsoleLines()])
    run.history[-1].test_accuracy

A user error (a conflicting setting, unreadable data or checkpoint, a model
that does not fit the data, an unavailable backend) raises :class:`RunError`,
a ``ValueError`` with a one-line message.

>>> config = RunConfig(backend="numpy")
>>> config.model, config.optimizer, config.lr, config.schedule, config.epochs
('digits', 'sgd', 0.05, 'cosine', 10)
>>> adam = RunConfig(optimizer="adam")
>>> adam.lr, adam.weight_decay, adam.momentum
(0.001, 0.0, None)
>>> adam.optimizer_config()
{'name': 'adam', 'lr': 0.001, 'weight_decay': 0.0}
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .backend import BACKENDS, BackendUnavailableError, device, resolve_backend
from .callbacks import Checkpointing
from .checkpoint import Checkpoint, CheckpointError, load_checkpoint
from .config import config_context
from .data import DATASETS, apply_normalization, check_classes, load_dataset, normalize
from .models import MODELS, build_model
from .optim import OPTIMIZERS, SCHEDULES, build_optimizer, build_scheduler
from .paths import OutputPathError, check_outputs
from .train import Trainer

__all__ = [
    "DEFAULT_MODEL",
    "SPLIT",
    "TRAIN_DEFAULTS",
    "Run",
    "RunConfig",
    "RunError",
    "cpu_threads",
    "join_job",
    "load_data",
    "read_checkpoint",
    "select_backend",
    "start",
]

#: The model each dataset trains by default (an ``npz`` dataset: by image size, see :class:`Run`).
DEFAULT_MODEL = {"digits": "digits", "mnist5k": "lenet", "mnist": "lenet", "cifar10": "vgg-small"}

#: Defaults of a run's settings; ``lr`` and ``weight_decay`` depend on the
#: optimizer. Chosen so that the default run (the digits net on
#: scikit-learn's digits, seed 0) reaches about 98% test accuracy in 10
#: epochs; see README.
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

#: The split of datasets that ship without one (digits, mnist5k, a plain
#: .npz): fixed, so that the test set is the same for every seed and for ``eval``.
SPLIT = {"test_fraction": 0.2, "seed": 0}

# The datasets that take SPLIT.
_SPLIT_DATASETS = ("digits", "mnist5k", "npz")

DTYPES = ("float32", "float64")

# The settings a checkpoint fixes: resuming refuses to change them.
_FIXED_BY_CHECKPOINT = ("model", "dataset", "data", "batch_size", "optimizer", "lr", "momentum", "weight_decay",
                        "schedule", "seed", "dtype")


class RunError(ValueError):
    """A setting, the data or the checkpoint of a run cannot be used (a one-line message)."""


# ------------------------------------------------------------------ building blocks


def _infer_dataset(data) -> str:
    if data is None:
        return "digits"
    if str(data).lower().endswith(".npz"):
        return "npz"
    raise RunError(f"--data {data}: say which format it is with --dataset mnist, cifar10 or npz")


def join_job(backend_name: str = "auto"):
    """:func:`portable_cnn.distributed.init` for a run on ``backend_name``, its errors as a :class:`RunError`."""
    from . import distributed

    try:
        return distributed.init(backend_name)
    except (distributed.DistributedError, BackendUnavailableError, ValueError) as exc:
        raise RunError(str(exc)) from None


def read_checkpoint(path) -> Checkpoint:
    """:func:`portable_cnn.checkpoint.load_checkpoint`, with a missing or unreadable file as a :class:`RunError`."""
    try:
        return load_checkpoint(path)
    except (OSError, CheckpointError) as exc:
        raise RunError(str(exc)) from None


def select_backend(name: str = "auto") -> tuple[str, str]:
    """``(backend, reason)`` as :func:`portable_cnn.backend.resolve_backend` gives, an unusable one as a :class:`RunError`."""
    try:
        return resolve_backend(name)
    except (BackendUnavailableError, ValueError) as exc:
        raise RunError(str(exc)) from None


def load_data(dataset: str | None = None, data=None, checkpoint: Checkpoint | None = None):
    """A dataset loaded and normalised, with the checkpoint's split and statistics when one is given.

    Parameters
    ----------
    dataset : str, optional
        A name of :data:`portable_cnn.data.DATASETS`; default: ``digits``,
        or ``npz`` when ``data`` ends in ``.npz``.
    data : path, optional
        Where its files are (not for ``digits``).
    checkpoint : Checkpoint, optional
        Its per-channel mean and std normalise the images (those the model
        was trained with, not new ones), and its split is used when it was
        trained on the same dataset. Without one: the training split's
        statistics, and the fixed :data:`SPLIT` for ``digits``, ``mnist5k`` and ``npz``.

    Returns
    -------
    portable_cnn.data.Dataset
        Images ``(N, C, H, W)`` float32, standardised per channel.

    Raises
    ------
    RunError
        The data cannot be read, or does not fit the checkpoint's statistics.
    """
    if dataset is None:
        dataset = _infer_dataset(data)
    saved = checkpoint.data if checkpoint is not None else {}
    split = (saved.get("split") if saved.get("name") == dataset else None) or SPLIT
    kwargs = dict(split) if dataset in _SPLIT_DATASETS else {}
    try:
        ds = load_dataset(dataset, data, **kwargs)
    except (OSError, ValueError, ImportError, TypeError) as exc:
        raise RunError(f"cannot load dataset {dataset!r}: {exc}") from None
    if saved.get("mean") is None:
        return normalize(ds)
    try:
        mean, std = np.asarray(saved["mean"], dtype=np.float32), np.asarray(saved["std"], dtype=np.float32)
        return replace(ds, x_train=apply_normalization(ds.x_train, mean, std),
                       x_test=apply_normalization(ds.x_test, mean, std), mean=mean, std=std)
    except ValueError as exc:
        raise RunError(f"dataset {ds.name!r} does not fit the checkpoint's normalisation: {exc}") from None


@contextmanager
def cpu_threads(threads: int | None, model_name: str, backend_name: str):
    """Limit the BLAS threads and portable_cnn's own CPU threads for the duration of a block.

    ``threads``: a count, ``0`` for the libraries' defaults, ``None`` for the
    policy: one thread for the digits net, whose matrix products are so
    small that splitting them costs more than it gains (on a busy 2-core
    machine OpenBLAS's spinning threads made the default run 10x slower),
    the defaults for the others. Nothing changes on CuPy. The limit goes
    through :func:`portable_cnn.config_context` (``num_threads``) and
    threadpoolctl's BLAS limit, both undone afterwards.

    >>> from portable_cnn import get_config
    >>> with cpu_threads(None, "digits", "numpy"):
    ...     get_config()["num_threads"]
    1
    """
    if threads is None:
        threads = 1 if model_name == "digits" else 0
    if threads == 0 or backend_name == "cupy":
        yield
        return
    from threadpoolctl import threadpool_limits

    with config_context(num_threads=threads), threadpool_limits(limits=threads, user_api="blas"):
        yield


def _saved_settings(ckpt: Checkpoint) -> dict:
    """The settings a checkpoint's run was started with (``None`` where it does not say)."""
    optimizer, train = ckpt.optimizer or {}, ckpt.train
    return {
        "model": ckpt.model.get("name"), "dataset": ckpt.data.get("name"), "data": ckpt.data.get("path"),
        "batch_size": train.get("batch_size"), "optimizer": optimizer.get("name"), "lr": train.get("base_lr"),
        "momentum": optimizer.get("momentum"), "weight_decay": optimizer.get("weight_decay"),
        "schedule": (ckpt.scheduler or {}).get("name", "none"), "seed": train.get("seed"), "dtype": ckpt.dtype,
        "epochs": train.get("epochs"), "log_every": train.get("log_every"),
    }


def _same_setting(key: str, value, saved) -> bool:
    if key == "data":  # the same file, however the path is written
        return Path(value).resolve() == Path(saved).resolve()
    return value == saved


# ------------------------------------------------------------------ configuration


@dataclass(frozen=True)
class RunConfig:
    """Every setting of a training run; ``None`` means the default (see the module docstring).

    The fields are those of ``portable-cnn train`` (``--batch-size`` is
    ``batch_size``); after construction they hold the resolved values.

    Parameters
    ----------
    model : str, optional
        A name of :data:`portable_cnn.models.MODELS`; default: the dataset's
        (:data:`DEFAULT_MODEL`), for ``npz`` chosen by image size when the
        data is loaded (``None`` until then).
    dataset : str, optional
        Default: ``digits``, or ``npz`` when ``data`` ends in ``.npz``.
    data : path, optional
    epochs : int, optional
        The total, counting the epochs before a resumption.
    batch_size, log_every, seed : int, optional
    optimizer : str, optional
        A name of :data:`portable_cnn.optim.OPTIMIZERS`.
    lr, momentum, weight_decay : float, optional
        ``momentum`` applies to SGD only (``None`` for the others).
    schedule : str, optional
        A name of :data:`portable_cnn.optim.SCHEDULES`; see :meth:`scheduler_config`.
    dtype : {"float32", "float64"}, optional
    backend : str, optional
        ``"auto"`` (the default: CuPy when a CUDA device works, else NumPy)
        or a name of :data:`portable_cnn.backend.BACKENDS`.
    threads : int, optional
        CPU threads while training (see :func:`cpu_threads`).
    tf32 : bool, optional
        Allow TF32 in CuPy's float32 GEMMs while training; ``None`` keeps
        the current setting (:func:`portable_cnn.get_config`).
    checkpoint : path, optional
        Written after every epoch; a resumed run defaults to the file it
        resumes. Ctrl-C saves here, or to ``./<model>-interrupted.safetensors``.
    distributed : bool, default False
        Train data-parallel over the ranks of the MPI job this process runs
        in (``mpiexec -n N``; :mod:`portable_cnn.distributed`): the same
        result as one process with the same (global) ``batch_size``. Free on
        resume: a run resumes with any number of ranks.
    sync_batchnorm : bool, default True
        With ``distributed``: BatchNorm statistics over the global batch;
        ``False``: each rank's own.
    resume_from : Checkpoint, optional
        The run to continue; see :meth:`resume`.
    """

    model: str | None = None
    dataset: str | None = None
    data: str | os.PathLike | None = None
    epochs: int | None = None
    batch_size: int | None = None
    optimizer: str | None = None
    lr: float | None = None
    momentum: float | None = None
    weight_decay: float | None = None
    schedule: str | None = None
    seed: int | None = None
    dtype: str | None = None
    log_every: int | None = None
    backend: str | None = None
    threads: int | None = None
    tf32: bool | None = None
    checkpoint: str | os.PathLike | None = None
    distributed: bool = False
    sync_batchnorm: bool = True
    resume_from: Checkpoint | None = field(default=None, repr=False)

    @classmethod
    def resume(cls, path_or_checkpoint, **settings) -> RunConfig:
        """The configuration that continues a saved run, up to ``epochs`` in total.

        Settings left out (or ``None``) are the saved run's; the ones the
        checkpoint fixes (model, data, batch size, optimizer and its
        hyperparameters, schedule, seed, dtype) may be repeated but not
        changed. ``epochs``, ``log_every``, ``backend``, ``threads``, ``tf32``
        ``checkpoint`` (default: the resumed file), ``distributed`` and
        ``sync_batchnorm`` are free: a run resumes with any number of ranks.

        Raises
        ------
        RunError
            The file cannot be read, holds no run record, or a setting
            conflicts with it (all conflicts are named).
        """
        ckpt = path_or_checkpoint if isinstance(path_or_checkpoint, Checkpoint) else read_checkpoint(path_or_checkpoint)
        return cls(resume_from=ckpt, **settings)

    def __post_init__(self):
        if self.resume_from is not None:
            self._merge(self.resume_from)
        for key, allowed in (("model", MODELS), ("dataset", DATASETS), ("optimizer", OPTIMIZERS),
                             ("schedule", SCHEDULES), ("dtype", DTYPES), ("backend", ("auto", *BACKENDS))):
            value = getattr(self, key)
            if value is not None and value not in allowed:
                raise RunError(f"{key} {value!r}: choose one of {', '.join(map(repr, allowed))}")
        self._fill_defaults()
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise RunError(f"epochs must be a positive int, got {self.epochs!r}")

    def _set(self, key: str, value) -> None:
        object.__setattr__(self, key, value)  # resolving, inside construction, of a frozen dataclass

    def _merge(self, ckpt: Checkpoint) -> None:
        """Take the checkpoint's settings where none is given; refuse the given ones that differ."""
        if not ckpt.optimizer or not ckpt.data.get("name"):
            raise RunError(f"--resume {ckpt._where()}: the checkpoint holds no optimizer or dataset record, so it "
                           f"cannot continue a run (portable-cnn eval can still use it)")
        saved = _saved_settings(ckpt)
        conflicts = [
            f"--{key.replace('_', '-')} {getattr(self, key)} (the checkpoint has {saved[key]})"
            for key in _FIXED_BY_CHECKPOINT
            if getattr(self, key) is not None and saved[key] is not None
            and not _same_setting(key, getattr(self, key), saved[key])
        ]
        if conflicts:
            raise RunError(
                f"--resume {ckpt._where()} continues the saved run, whose settings cannot change: "
                + "; ".join(conflicts) + ". Drop these options, or start a new run without --resume."
            )
        for key, value in saved.items():
            if getattr(self, key) is None and value is not None:
                self._set(key, value)
        if self.checkpoint is None:
            self._set("checkpoint", ckpt.path)

    def _fill_defaults(self) -> None:
        d = TRAIN_DEFAULTS
        if self.dataset is None:
            self._set("dataset", _infer_dataset(self.data))
        if self.optimizer is None:
            self._set("optimizer", d["optimizer"])
        for key in ("epochs", "batch_size", "schedule", "seed", "dtype", "log_every"):
            if getattr(self, key) is None:
                self._set(key, d[key])
        for key in ("lr", "weight_decay"):
            if getattr(self, key) is None:
                self._set(key, d[key][self.optimizer])
        if self.optimizer == "sgd":
            if self.momentum is None:
                self._set("momentum", d["momentum"])
        elif self.momentum is not None:
            raise RunError(f"--momentum applies to --optimizer sgd, not {self.optimizer}")
        if self.model is None:
            self._set("model", DEFAULT_MODEL.get(self.dataset))
        if self.backend is None:
            self._set("backend", "auto")

    def optimizer_config(self) -> dict:
        """The config :func:`portable_cnn.optim.build_optimizer` takes.

        A resumed run rebuilds its optimizer from the saved config, at the
        initial learning rate the schedule starts from (restoring the
        checkpoint then sets the current one).
        """
        if self.resume_from is not None:
            return dict(self.resume_from.optimizer, lr=self.lr)
        config = {"name": self.optimizer, "lr": self.lr, "weight_decay": self.weight_decay}
        if self.optimizer == "sgd":
            config["momentum"] = self.momentum
        return config

    def scheduler_config(self) -> dict:
        """The schedule for ``epochs`` epochs, the config :func:`portable_cnn.optim.build_scheduler` takes.

        ``cosine`` decays to 0 at the last epoch: a resumed run given a new
        total re-aims at it. ``step`` multiplies the rate by 0.1 every third
        of the run: a resumed one keeps its saved ``step_size``.

        >>> RunConfig(schedule="step", epochs=9).scheduler_config()
        {'name': 'step', 'step_size': 3, 'gamma': 0.1}
        """
        if self.schedule == "cosine":
            return {"name": "cosine", "T_max": self.epochs, "eta_min": 0.0}
        if self.schedule == "step":
            saved = (self.resume_from.scheduler or {}) if self.resume_from is not None else {}
            if saved.get("name") == "step":
                return {"name": "step", "step_size": saved["step_size"], "gamma": saved["gamma"]}
            return {"name": "step", "step_size": max(1, self.epochs // 3), "gamma": 0.1}
        return {"name": "none"}


# ------------------------------------------------------------------ execution


def _default_model(input_shape) -> str:
    """The model for data that does not name one (an npz): by image size and channels."""
    c, h, w = input_shape
    if max(h, w) <= 16:
        return "digits"
    return "lenet" if c == 1 else "vgg-small"


class Run:
    """A configured run, ready to train: backend, data, model, optimizer, schedule and trainer.

    Building it loads the data (normalised with the checkpoint's statistics
    when resuming), builds the model on its backend and dtype, the optimizer
    and schedule (:meth:`RunConfig.optimizer_config`,
    :meth:`RunConfig.scheduler_config`) and the
    :class:`~portable_cnn.train.Trainer`, and restores the checkpoint when
    resuming. A :class:`~portable_cnn.callbacks.Checkpointing` comes first
    among the callbacks: it writes ``config.checkpoint`` after every epoch
    (if set) and, on Ctrl-C, that file or ``<model>-interrupted.safetensors``.

    Parameters
    ----------
    config : RunConfig
    callbacks : sequence of portable_cnn.callbacks.Callback, optional
        Added after the checkpointing: ``ProgressBar()``, ``JsonLog(path)``,
        ``ConsoleLines()``, ... (with ``comm``, run on rank 0 only).
    comm : portable_cnn.distributed.Communicator, optional
        Train data-parallel over its ranks; default: :func:`join_job` when
        ``config.distributed``, else none.

    Attributes
    ----------
    backend, backend_reason : str
        The backend the run uses and why (``"numpy"``, ``"... using NumPy on the CPU"``).
    dataset : portable_cnn.data.Dataset
        The normalised host data.
    model_name : str
    model : portable_cnn.nn.Module
    optimizer_config, scheduler_config : dict
    optimizer, scheduler
    trainer : portable_cnn.train.Trainer

    Raises
    ------
    RunError
        The backend, the data, the model or the checkpoint cannot be used.
    """

    def __init__(self, config: RunConfig, *, callbacks=(), comm=None):
        self.config = cfg = config
        ckpt = cfg.resume_from
        # Joined first: with GPUs, each rank picks its own before anything touches one.
        self.comm = comm if comm is not None or not cfg.distributed else join_job(cfg.backend)
        self.backend, self.backend_reason = select_backend(getattr(self.comm, "backend", None) or cfg.backend)
        try:  # before any work: not after an epoch, and never over the data
            check_outputs({"checkpoint": cfg.checkpoint}, inputs={"data": cfg.data, "resume": getattr(ckpt, "path", None)},
                          may_replace={"checkpoint": "resume"})
        except OutputPathError as exc:
            raise RunError(str(exc)) from None
        self.dataset = ds = load_data(cfg.dataset, cfg.data, ckpt)
        try:
            notes = check_classes(ds)
        except ValueError as exc:
            raise RunError(str(exc)) from None
        for note in notes:
            warnings.warn(note, UserWarning, stacklevel=2)
        c, h, w = ds.input_shape
        self.model_name = cfg.model or _default_model(ds.input_shape)
        model_config = {"name": self.model_name, "in_channels": c, "num_classes": ds.num_classes,
                        "input_size": [h, w], "seed": cfg.seed}
        if ckpt is not None:
            expected = {k: ckpt.model.get(k) for k in ("in_channels", "num_classes", "input_size")}
            actual = {k: model_config[k] for k in expected}
            if expected != actual:
                raise RunError(f"--resume {ckpt._where()}: the dataset gives {actual} but the checkpoint's model has {expected}")
            model_config = dict(ckpt.model)
        try:
            self.model = build_model(self.model_name, in_channels=c, num_classes=ds.num_classes, input_size=(h, w),
                                     seed=cfg.seed)
        except (TypeError, ValueError) as exc:
            raise RunError(f"model {self.model_name!r} does not fit dataset {ds.name!r} ({c}x{h}x{w}): {exc}") from None
        self.model.to(self.backend, cfg.dtype)
        self.optimizer_config, self.scheduler_config = cfg.optimizer_config(), cfg.scheduler_config()
        data_config = {"name": cfg.dataset, "path": str(Path(cfg.data).resolve()) if cfg.data is not None else None,
                       "split": SPLIT if cfg.dataset in _SPLIT_DATASETS else None,
                       "mean": ds.mean, "std": ds.std, "input_shape": list(ds.input_shape)}
        train_config = {"epochs": cfg.epochs, "base_lr": cfg.lr, "backend": self.backend}
        checkpointing = Checkpointing(cfg.checkpoint,
                                      interrupt_path=cfg.checkpoint or f"{self.model_name}-interrupted.safetensors")
        try:
            self.optimizer = build_optimizer(self.model, self.optimizer_config)
            self.scheduler = build_scheduler(self.optimizer, self.scheduler_config)
            self.trainer = Trainer(
                self.model, self.optimizer, ds, scheduler=self.scheduler, scheduler_config=self.scheduler_config,
                batch_size=cfg.batch_size, seed=cfg.seed, log_every=cfg.log_every, model_config=model_config,
                data_config=data_config, train_config=train_config, callbacks=[checkpointing, *callbacks],
                comm=self.comm, sync_batchnorm=cfg.sync_batchnorm,
            )
            if ckpt is not None:
                self.trainer.restore(ckpt)
        except (TypeError, ValueError) as exc:  # bad hyperparameters, labels that do not fit, a checkpoint that does not
            raise RunError(str(exc)) from None

    @property
    def history(self) -> list:
        """The :class:`~portable_cnn.train.EpochResult` of every epoch so far (the last saved one on resuming)."""
        return self.trainer.history

    def describe(self) -> list[str]:
        """The run in the lines ``portable-cnn train`` prints before training: backend, data, model, position."""
        cfg, ds, trainer = self.config, self.dataset, self.trainer
        c, h, w = ds.input_shape
        on_device = device(next(iter(self.model.state_dict().values())))
        n_params = sum(int(np.prod(layer.params[key].shape)) for _, layer, key in self.model.named_parameters())
        opt_text = ", ".join(f"{k}={v}" for k, v in self.optimizer_config.items() if k != "name")
        lines = [
            f"backend: {self.backend} on device {on_device} ({self.backend_reason})",
            f"dataset: {ds.name}, {len(ds.y_train)} train / {len(ds.y_test)} test images of {c}x{h}x{w}, "
            f"{ds.num_classes} classes",
            f"model: {self.model_name} ({n_params:,} parameters, {cfg.dtype}); {cfg.optimizer} ({opt_text}), "
            f"schedule {self.scheduler_config['name']}, batch size {cfg.batch_size}, {cfg.epochs} epochs, seed {cfg.seed}",
        ]
        if self.comm is not None:
            comm = self.comm
            statistics = "global" if cfg.sync_batchnorm else "per-rank"
            ranks = f"{comm.size} rank" + ("s" if comm.size != 1 else "")
            lines.append(f"distributed: {ranks}, all-reduce over {comm.transport}, global batch {cfg.batch_size} "
                         f"(about {cfg.batch_size / comm.size:g} per rank), {statistics} BatchNorm statistics")
            lines.extend(f"distributed: {note}" for note in comm.notes)
        ckpt = cfg.resume_from
        if ckpt is not None:
            at = f"epoch {ckpt.epoch}" + (f", batch {ckpt.batch_in_epoch}" if ckpt.batch_in_epoch else "")
            lines.append(f"resumed from {ckpt._where()} at {at} (step {ckpt.step})")
            if trainer.epoch >= cfg.epochs and not trainer.batch_in_epoch:
                lines.append(f"the checkpoint is already at epoch {trainer.epoch} of --epochs {cfg.epochs}: nothing to train")
        return lines

    def fit(self) -> list:
        """Train up to ``config.epochs`` epochs in total under the run's thread and TF32 settings.

        Returns the :class:`~portable_cnn.train.EpochResult` of each epoch
        trained; raises what :meth:`portable_cnn.train.Trainer.fit` raises
        (``NonFiniteLossError``, ``TrainingInterrupted``).
        """
        with cpu_threads(self.config.threads, self.model_name, self.backend), config_context(tf32=self.config.tf32):
            return self.trainer.fit(self.config.epochs)


def start(config: RunConfig, *, callbacks=()) -> Run:
    """Build a :class:`Run` from ``config`` and train it; returns the run (``run.history``, ``run.model``).

    ``start(RunConfig.resume(path, epochs=n))`` continues a saved run as
    ``portable-cnn train --resume path --epochs n`` does.
    """
    run = Run(config, callbacks=callbacks)
    run.fit()
    return run
