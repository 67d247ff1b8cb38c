"""The training loop: mini-batches in, evaluated epochs and checkpoints out.

:class:`Trainer` runs epochs of SGD-style training on any backend. Data stays
on the host (NumPy) and each mini-batch goes to the device in one transfer
(:func:`portable_cnn.backend.asarray` of the whole batch). The loss stays on
the device too: it is read back only every ``log_every`` steps and at the end
of an epoch, because on a GPU every read is a synchronisation that stalls the
queue of kernels. The labels are checked once, on the host, before training,
so the loss runs with ``validate=False`` and costs no read-back of its own.

Training can stop three ways, each leaving a usable checkpoint when
:class:`~portable_cnn.callbacks.Checkpointing` is among the callbacks:

* it reaches the target epoch (a checkpoint after every epoch);
* Ctrl-C: the step in progress finishes, the callbacks' ``on_interrupt``
  runs (:class:`~portable_cnn.callbacks.Checkpointing` writes a checkpoint
  of the exact position, down to the batch within the epoch) and
  :class:`TrainingInterrupted` (a ``KeyboardInterrupt``) is raised; resuming
  from that checkpoint continues the same run;
* a non-finite loss: :class:`NonFiniteLossError` names the epoch and step,
  and no checkpoint is written over the last good one.

Presentation and persistence (progress bar, JSON log, checkpoints, console
lines) are callbacks (:mod:`portable_cnn.callbacks`); the loop only calls
them. Optimizer and schedule registries live in :mod:`portable_cnn.optim`
(re-exported here: ``OPTIMIZERS``, ``SCHEDULES``, ``build_optimizer``,
``build_scheduler``).

>>> from portable_cnn import data, models, optim
>>> ds = data.load_digits().normalized()
>>> model = models.build_model("digits", in_channels=1, num_classes=10, input_size=8)
>>> trainer = Trainer(model, optim.SGD(model, lr=0.05, momentum=0.9), ds, batch_size=32)
>>> history = trainer.fit(epochs=1)
>>> history[-1].test_accuracy > 0.8
True
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import MISSING, asdict, dataclass, fields
from itertools import islice
from pathlib import Path

import numpy as np

from . import backend, distributed, nn, ops
from .checkpoint import Checkpoint, generator_state, save_checkpoint
from .data import iterate_minibatches
from .optim import OPTIMIZERS, SCHEDULES, build_optimizer, build_scheduler

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "EpochResult",
    "EvalResult",
    "NonFiniteLossError",
    "Trainer",
    "TrainingInterrupted",
    "build_optimizer",
    "build_scheduler",
    "check_labels",
    "evaluate",
]

class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; ``epoch`` and ``step`` say where (1-based)."""

    def __init__(self, message: str, *, epoch: int, step: int, checkpoint_path: Path | None):
        super().__init__(message)
        self.epoch, self.step, self.checkpoint_path = epoch, step, checkpoint_path


class _StopRequested(KeyboardInterrupt):
    """Raised by the loop itself after a deferred Ctrl-C, at a step boundary."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped training; ``checkpoint_path`` holds the position to resume from (or is ``None``)."""

    def __init__(self, message: str, *, epoch: int, step: int, checkpoint_path: Path | None):
        super().__init__(message)
        self.epoch, self.step, self.checkpoint_path = epoch, step, checkpoint_path


def check_labels(y: np.ndarray, num_classes: int, where: str = "labels") -> None:
    """Refuse labels outside ``[0, num_classes)`` on the host, once, before any device work.

    >>> check_labels(np.array([0, 3, 10]), 10, "test labels")
    Traceback (most recent call last):
    ...
    ValueError: test labels: expected integer class labels in [0, 10), got values from 0 to 10
    """
    y = np.asarray(y)
    if y.dtype.kind not in "iu":
        raise TypeError(f"{where}: expected integer class labels, got {y.dtype}")
    if y.size and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(
            f"{where}: expected integer class labels in [0, {num_classes}), got values from {int(y.min())} to {int(y.max())}"
        )


def _model_array(model):
    """One parameter of ``model``: its namespace, device and dtype are the model's."""
    for _, layer, key in model.named_parameters():
        return layer.params[key]
    raise ValueError(f"{type(model).__name__}: the model has no parameters to train")


@dataclass
class EvalResult:
    """Mean loss and accuracy (a fraction) over ``total`` samples."""

    loss: float
    accuracy: float
    correct: int
    total: int


def evaluate(model, x: np.ndarray, y: np.ndarray, *, batch_size: int = 256) -> EvalResult:
    """Loss and accuracy of ``model`` on host data, in evaluation mode, batch by batch.

    Each batch goes to the model's device once; the sums stay on the device
    and come back in one read at the end. The model's mode is restored.

    Parameters
    ----------
    model : portable_cnn.nn.Sequential
        Maps ``(N, C, H, W)`` to logits ``(N, num_classes)``.
    x : numpy.ndarray
        Images ``(N, C, H, W)`` (already normalised as for training).
    y : numpy.ndarray
        Integer labels ``(N,)``.
    batch_size : int, default 256
    """
    if len(y) == 0:
        raise ValueError("evaluate: no samples to evaluate")
    param = _model_array(model)
    xp, dev, dtype = backend.namespace(param), backend.device(param), backend.dtype_name(param)
    was_training = model.training
    model.eval()
    total_loss = correct = None
    try:
        for xb, yb in iterate_minibatches(x, y, batch_size, shuffle=False):
            xd = backend.asarray(xb, xp, dtype=dtype, device=dev)
            yd = backend.asarray(yb, xp, device=dev)
            logits = model.forward(xd)
            if total_loss is None:
                check_labels(y, int(logits.shape[1]), "evaluate: labels")
            loss, _ = ops.softmax_cross_entropy(logits, yd, validate=False, where="evaluate")
            batch_loss = loss * float(len(yb))
            batch_correct = xp.sum(xp.astype(xp.argmax(logits, axis=1) == yd, xp.int64))
            total_loss = batch_loss if total_loss is None else total_loss + batch_loss
            correct = batch_correct if correct is None else correct + batch_correct
        # One read-back for both sums.
        sums = backend.to_numpy(xp.stack([total_loss, xp.astype(correct, total_loss.dtype)]))
    finally:
        model.train(was_training)
    n = len(y)
    return EvalResult(loss=float(sums[0]) / n, accuracy=float(sums[1]) / n, correct=int(round(float(sums[1]))), total=n)


@dataclass
class EpochResult:
    """What one epoch did; :meth:`as_dict` is the ``--log-json`` line."""

    epoch: int
    step: int
    train_loss: float
    train_accuracy: float
    test_loss: float
    test_accuracy: float
    images_per_s: float
    lr: float
    seconds: float
    world_size: int = 1  # ranks that trained it (portable_cnn.distributed)

    def as_dict(self) -> dict:
        return asdict(self)


class Trainer:
    """Train a model on a :class:`portable_cnn.data.Dataset`; callbacks do the rest.

    Parameters
    ----------
    model : portable_cnn.nn.Module
        Already on its backend and dtype (``model.to(...)``); batches follow it.
    optimizer : portable_cnn.optim.SGD or portable_cnn.optim.Adam
    dataset : portable_cnn.data.Dataset
        Host data, normalised by the caller (:func:`portable_cnn.data.normalize`).
    scheduler : optional
        Stepped once at the end of every epoch; ``scheduler_config`` (the dict
        :func:`build_scheduler` takes) is stored in checkpoints.
    batch_size : int, default 32
    seed : int, default 0
        Seeds the shuffling generator (its own stream, independent of the
        weight initialisation).
    log_every : int, default 10
        Read the loss back to the host (and check it is finite) every this
        many steps, and at the end of each epoch.
    eval_batch_size : int, default 256
    model_config, data_config, train_config : dict, optional
        Stored in checkpoints (see :mod:`portable_cnn.checkpoint`);
        ``model_config`` is needed to save one.
    callbacks : sequence of portable_cnn.callbacks.Callback, optional
        Called in order at each hook (:mod:`portable_cnn.callbacks`):
        ``ProgressBar()``, ``JsonLog(path)``, ``Checkpointing(path)``,
        ``ConsoleLines()`` or your own. Kept as the list :attr:`callbacks`,
        which may be extended before :meth:`fit`. With ``comm``, they run on
        rank 0 only, except those whose ``every_rank`` attribute is true.
    comm : portable_cnn.distributed.Communicator, optional
        Train data-parallel over its ranks (:mod:`portable_cnn.distributed`;
        every rank builds the same Trainer). ``batch_size`` is the global
        batch, and the run does not depend on the number of ranks: every
        rank draws the same permutation, takes its rows of each batch and
        backpropagates its loss sum over the global batch size; one
        Allreduce per step sums the gradients, the loss, the correct count,
        the sample count and the stop flag. Parameters are broadcast from
        rank 0 when :meth:`fit` starts (so on resume too); rank 0 writes the
        checkpoints; a Ctrl-C or SIGTERM on any rank stops every rank at the
        same step (at the next read-back, ``log_every``); test evaluation is
        split across the ranks.
    sync_batchnorm : bool, default True
        With ``comm``: BatchNorm uses the statistics of the global batch;
        ``False`` keeps each rank's own (rank 0's running statistics are
        then given to every rank before each evaluation).
    """

    def __init__(self, model, optimizer, dataset, *, scheduler=None, scheduler_config=None, batch_size=32, seed=0,
                 log_every=10, eval_batch_size=256, model_config=None, data_config=None, train_config=None,
                 callbacks=(), comm=None, sync_batchnorm=True):
        for name, value in (("batch_size", batch_size), ("log_every", log_every), ("eval_batch_size", eval_batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Trainer: {name} must be a positive int, got {value!r}")
        self.model, self.optimizer, self.dataset = model, optimizer, dataset
        self.scheduler = scheduler
        self.scheduler_config = scheduler_config if scheduler is not None else {"name": "none"}
        self.batch_size, self.log_every, self.eval_batch_size = batch_size, log_every, eval_batch_size
        self.seed = seed
        self.model_config, self.data_config = model_config, dict(data_config or {})
        self.train_config = dict(train_config or {})
        self.callbacks = list(callbacks)

        param = _model_array(model)
        self.xp, self.device, self.dtype = backend.namespace(param), backend.device(param), backend.dtype_name(param)
        self.loss_fn = nn.SoftmaxCrossEntropy(validate=False)
        # The shuffling stream: spawned from the seed so that it differs from
        # the stream the weights were initialised from with the same seed.
        self.shuffle_rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(1)[0])
        self.epoch = 0            # completed epochs
        self.step = 0             # optimizer steps so far
        self.batch_in_epoch = 0   # batches done in the current epoch
        self.target_epochs = 0    # what the running fit() trains towards
        self._epoch_start_state = None  # shuffle_rng state before this epoch's permutation
        self._pending = []        # (loss, correct, batch size, step, stop flag) not yet read back
        self._sums = [0.0, 0.0, 0]  # this epoch's read-back loss*n, correct, n
        self._images, self._clock = 0, 0.0  # images and start time of this fit's part of the epoch
        self._stop_requested = False  # a Ctrl-C or SIGTERM here
        self._stop_agreed = False     # ... read back from the ranks' summed stop flags (with comm)
        self.last_saved: tuple[Path, int] | None = None
        self.history: list[EpochResult] = []
        self.comm = comm
        self.rank, self.world_size = (0, 1) if comm is None else (comm.rank, comm.size)
        self.sync_batchnorm = bool(sync_batchnorm)
        if comm is not None:
            self._split = distributed.attach(model, comm, sync_batchnorm=self.sync_batchnorm)
            self._distributed_optimizer = distributed.DistributedOptimizer(optimizer, comm)
            # Each rank's loss is its samples' sum over the global batch size (module docstring of distributed).
            self._sum_loss = nn.SoftmaxCrossEntropy(reduction="sum", validate=False)

        check_labels(dataset.y_train, dataset.num_classes, f"dataset {dataset.name!r}: y_train")
        check_labels(dataset.y_test, dataset.num_classes, f"dataset {dataset.name!r}: y_test")
        if len(dataset.y_train) == 0:
            raise ValueError(f"dataset {dataset.name!r} has no training samples")

    @property
    def batches_per_epoch(self) -> int:
        """Mini-batches in one epoch (the last one may be smaller)."""
        return -(-len(self.dataset.y_train) // self.batch_size)

    def running_metrics(self) -> dict:
        """The current epoch so far, from what was already read back (no device read).

        ``loss`` and ``accuracy`` are means over the ``seen`` samples read back
        (NaN before the first read), ``images_per_s`` counts every step this
        ``fit`` ran in the epoch.
        """
        loss_sum, correct_sum, seen = self._sums
        elapsed = time.perf_counter() - self._clock
        return {
            "loss": loss_sum / seen if seen else math.nan,
            "accuracy": correct_sum / seen if seen else math.nan,
            "seen": seen,
            "images_per_s": self._images / elapsed if elapsed > 0 and self._images else math.nan,
        }

    def _notify(self, hook: str, *args) -> list:
        """Call ``hook`` on every callback, in order (on ranks other than 0, those marked ``every_rank`` only); their return values."""
        callbacks = self.callbacks if self.rank == 0 else [c for c in self.callbacks if getattr(c, "every_rank", False)]
        return [getattr(callback, hook)(self, *args) for callback in callbacks]

    # ------------------------------------------------------------------ state

    def _generators(self) -> dict:
        """Generators the model draws from (Dropout), by ``"<module name>.<attribute>"`` (``"3.rng"``)."""
        found = {}
        for name, module in self.model.named_modules():
            for attr, value in vars(module).items():
                if isinstance(value, np.random.Generator):
                    found[f"{name}.{attr}" if name else attr] = value
        return found

    def _uses_default_generator(self) -> bool:
        """True when a module (a Dropout built without ``rng=``) draws from nn's default generator."""
        return any(hasattr(module, "rng") and module.rng is None for _, module in self.model.named_modules())

    def checkpoint(self) -> Checkpoint:
        """A snapshot of the run as it stands (arrays copied to the host); needs ``model_config``.

        Inside an epoch it holds the epoch's loss and accuracy sums so far, so
        a run resumed from it reports the same epoch metrics as one that
        never stopped; the losses not yet read back are read first.
        """
        if self.model_config is None:
            raise ValueError("Trainer: saving a checkpoint needs model_config (the model's name and constructor arguments)")
        self._read_back()
        rng = {
            "shuffle": generator_state(self.shuffle_rng),
            "layers": {k: generator_state(g) for k, g in self._generators().items()},
        }
        if self._uses_default_generator():
            rng["nn_default"] = generator_state(nn._generator(None))
        if self._epoch_start_state is not None:
            rng["shuffle_epoch_start"] = self._epoch_start_state
        scheduler = dict(self.scheduler_config)
        if self.scheduler is not None:
            scheduler.update(self.scheduler.state_dict())
        train = dict(self.train_config, batch_size=self.batch_size, seed=self.seed, dtype=self.dtype,
                     log_every=self.log_every, lr=float(self.optimizer.lr), world_size=self.world_size)
        metrics = self.history[-1].as_dict() if self.history else {}
        loss_sum, correct_sum, seen = self._sums
        epoch_sums = {"loss": loss_sum, "correct": correct_sum, "seen": seen} if self.batch_in_epoch else {}
        return Checkpoint.capture(
            self.model, model_config=self.model_config, optimizer=self.optimizer, scheduler=scheduler,
            data=self.data_config, train=train, rng=rng, metrics=metrics,
            epoch=self.epoch, step=self.step, batch_in_epoch=self.batch_in_epoch, epoch_sums=epoch_sums,
        )

    def save(self, path) -> Path:
        """Write a checkpoint (atomically) to ``path``; returns it as a :class:`~pathlib.Path`. With ``comm``, rank 0 writes."""
        path = Path(path)
        if self.rank == 0:
            save_checkpoint(path, self.checkpoint())
        self.last_saved = (path, self.epoch)
        return path
    def restore(self, ckpt: Checkpoint) -> None:
        """Continue the run saved in ``ckpt``: weights, optimizer, schedule, position and generators.

        The optimizer and scheduler must have been built with the run's
        initial settings (the learning rate the schedule starts from); the
        current learning rate comes from the checkpoint.
        """
        ckpt.load_into(self.model, self.optimizer)
        self.epoch, self.step, self.batch_in_epoch = ckpt.epoch, ckpt.step, ckpt.batch_in_epoch
        rng = ckpt.rng
        if "shuffle" in rng:
            self.shuffle_rng.bit_generator.state = rng["shuffle"]
        self._epoch_start_state = rng.get("shuffle_epoch_start") if self.batch_in_epoch else None
        if self.batch_in_epoch and self._epoch_start_state is None:
            raise ValueError(f"{ckpt._where()}: stopped inside epoch {ckpt.epoch + 1} but holds no shuffle state to resume it")
        # The interrupted epoch's sums so far; a checkpoint from before they
        # were kept has none, and that epoch's metrics then cover the rest of it.
        sums = ckpt.epoch_sums if self.batch_in_epoch else {}
        self._sums = [float(sums.get("loss", 0.0)), float(sums.get("correct", 0.0)), int(sums.get("seen", 0))]
        generators = self._generators()
        for name, state in rng.get("layers", {}).items():
            if name in generators:
                generators[name].bit_generator.state = state
        if "nn_default" in rng and self._uses_default_generator():
            nn._generator(None).bit_generator.state = rng["nn_default"]
        if self.scheduler is not None and ckpt.scheduler and "last_epoch" in ckpt.scheduler:
            # Sets the learning rate for that epoch too (a resumed cosine run
            # given a new total follows the new curve from here).
            self.scheduler.load_state_dict({"last_epoch": ckpt.scheduler["last_epoch"]})
        elif "lr" in ckpt.train:
            self.optimizer.lr = ckpt.train["lr"]
        required = [f.name for f in fields(EpochResult) if f.default is MISSING]  # world_size came later
        if ckpt.metrics and all(k in ckpt.metrics for k in required):
            self.history.append(EpochResult(**{k: ckpt.metrics[k] for k in EpochResult.__dataclass_fields__ if k in ckpt.metrics}))
        self.last_saved = (ckpt.path, ckpt.epoch) if ckpt.path is not None else None

    # --------------------------------------------------------------- training

    def fit(self, epochs: int) -> list[EpochResult]:
        """Train until ``epochs`` epochs in total are done (a resumed run counts its earlier ones).

        Returns the results of the epochs run by this call. NumPy's overflow
        and invalid-value warnings are silenced meanwhile: the loop checks
        the loss itself and stops with a message naming the step.

        Raises
        ------
        NonFiniteLossError
            The loss became NaN or infinite (no callback sees an epoch end,
            so no checkpoint is written over the last good one).
        TrainingInterrupted
            Ctrl-C or SIGTERM; the callbacks'
            ``on_interrupt`` ran first (a
            :class:`~portable_cnn.callbacks.Checkpointing` saved the position).
        """
        self.target_epochs = epochs
        results = []
        if self.comm is not None:
            distributed.broadcast_state(self.comm, self.model, self.optimizer)
        try:
            self._notify("on_fit_start")
            with self._sigint_deferred(), np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                try:
                    while self.epoch < epochs:
                        results.append(self._run_epoch())
                except KeyboardInterrupt as exc:
                    if self._stop_requested and not isinstance(exc, _StopRequested):
                        raise  # a second Ctrl-C: abort now, without saving
                    self._read_back()  # a non-finite loss wins over the interrupt: nothing to save then
                    path = next((p for p in self._notify("on_interrupt") if p is not None), None)
                    if self.comm is not None and isinstance(exc, _StopRequested):  # every rank is here: say where rank 0 saved
                        path = self.comm.broadcast_object(path)
                    where = f"epoch {self.epoch + 1}, step {self.step} (batch {self.batch_in_epoch} of the epoch)"
                    saved = f"checkpoint saved to {path}" if path is not None else "no checkpoint path was set, nothing saved"
                    raise TrainingInterrupted(f"interrupted at {where}; {saved}", epoch=self.epoch + 1, step=self.step,
                                              checkpoint_path=path) from None
        finally:
            self._notify("on_fit_end")
        return results

    @contextmanager
    def _sigint_deferred(self):
        """Turn the first Ctrl-C into a request to stop after the current step (a second one aborts at once).

        Stopping between steps keeps the parameters and the optimizer state
        consistent for the checkpoint. The first SIGTERM (what ``kill`` and
        Slurm send) does the same; with ``comm`` the request travels in the
        step's Allreduce, so every rank stops after the same step.
        """
        self._stop_requested = self._stop_agreed = False
        if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
            yield
            return
        defaults = {signal.SIGINT: signal.default_int_handler}
        # SIGTERM (``kill``, Slurm before it kills a job) as Ctrl-C, unless someone else handles it.
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            defaults[signal.SIGTERM] = signal.SIG_DFL

        def request_stop(signum, frame):
            self._stop_requested = True
            signal.signal(signum, defaults[signum])
            if self.rank == 0:
                again = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
                print(f"\nstopping after this step ({again} again to abort without saving)", file=sys.stderr)

        for signum in defaults:
            signal.signal(signum, request_stop)
        try:
            yield
        finally:
            for signum, handler in defaults.items():
                signal.signal(signum, handler)

    def _train_step(self, xd, yd, total):
        """Forward, loss, backward and update on one device batch of a global batch of ``total``.

        Returns ``(mean loss, correct count, stop flag)`` of the global batch
        on the device; the stop flag (the number of ranks asking to stop) is
        ``None`` without ``comm``.
        """
        ds, xp = self.dataset, self.xp
        logits = self.model.forward(xd)
        if logits.shape[1] != ds.num_classes:
            raise ValueError(
                f"Trainer: the model gives {logits.shape[1]} logits per sample but dataset "
                f"{ds.name!r} has {ds.num_classes} classes"
            )
        correct = xp.sum(xp.astype(xp.argmax(logits, axis=1) == yd, xp.int64))
        if self.comm is None:
            loss = self.loss_fn.forward(logits, yd)
            self.model.backward(self.loss_fn.backward(), need_input_grad=False)  # nobody reads d(loss)/d(images)
            self.optimizer.step()
            return loss, correct, None
        # This rank's share of the global mean: its loss sum over the global count,
        # so that uneven (or empty) shards add up to the same gradient.
        loss_sum = self._sum_loss.forward(logits, yd)
        self.model.backward(self._sum_loss.backward(1.0 / total), need_input_grad=False)
        stop = 1.0 if self._stop_requested else 0.0
        sums = self._distributed_optimizer.step([loss_sum, correct, float(yd.shape[0]), stop])  # (4,) over the ranks
        return sums[0] / sums[2], sums[1], sums[3]

    def _epoch_batches(self):
        """This epoch's batches as ``(images, labels, global batch size)``; with ``comm``, this rank's rows of each."""
        ds = self.dataset
        if self.comm is not None:
            return distributed.shard_minibatches(ds.x_train, ds.y_train, self.batch_size, self.shuffle_rng, self._split)
        batches = iterate_minibatches(ds.x_train, ds.y_train, self.batch_size, shuffle=True, rng=self.shuffle_rng)
        return ((xb, yb, len(yb)) for xb, yb in batches)

    def _stopping(self) -> bool:
        """Stop now: a Ctrl-C here, or with ``comm`` a stop flag of any rank read back (the same step on every rank)."""
        return self._stop_requested if self.comm is None else self._stop_agreed

    def _evaluate(self) -> EvalResult:
        """The test split's loss and accuracy; with ``comm``, each rank evaluates its slice and the sums are added."""
        ds = self.dataset
        if self.comm is None:
            return evaluate(self.model, ds.x_test, ds.y_test, batch_size=self.eval_batch_size)
        if not self.sync_batchnorm:  # per-rank running statistics differ: evaluate rank 0's everywhere
            distributed.broadcast_state(self.comm, self.model, parameters=False)
        start, stop = distributed.shard_range(len(ds.y_test), self.rank, self.world_size)
        sums = np.zeros(3)  # loss * n, correct, n
        if stop > start:
            part = evaluate(self.model, ds.x_test[start:stop], ds.y_test[start:stop], batch_size=self.eval_batch_size)
            sums[:] = part.loss * part.total, part.correct, part.total
        loss_sum, correct, n = self.comm.sum_host(sums)
        return EvalResult(loss=loss_sum / n, accuracy=correct / n, correct=int(round(correct)), total=int(n))

    def _run_epoch(self) -> EpochResult:
        xp, dev = self.xp, self.device
        skip = self.batch_in_epoch
        if skip:
            # Resuming inside an epoch: redraw the same permutation and skip what was done.
            self.shuffle_rng.bit_generator.state = self._epoch_start_state
        else:
            self._epoch_start_state = generator_state(self.shuffle_rng)
            self._sums = [0.0, 0.0, 0]
        batches = self._epoch_batches()
        lr = float(self.optimizer.lr)
        self._images, self._clock = 0, time.perf_counter()
        self._notify("on_epoch_start")
        for xb, yb, total in islice(batches, skip, None):
            xd = backend.asarray(xb, xp, dtype=self.dtype, device=dev)  # one transfer per batch
            yd = backend.asarray(yb, xp, device=dev)
            loss, correct, stop = self._train_step(xd, yd, total)
            self.step += 1
            self.batch_in_epoch += 1
            self._images += total
            self._pending.append((loss, correct, total, self.step, stop))
            # With comm, every step: the ranks then meet a non-finite loss or
            # a stop flag at the same step, whatever a callback reads back.
            if len(self._pending) >= self.log_every or self.comm is not None:
                self._read_back()
            self._notify("on_step_end")
            if self._stopping():
                raise _StopRequested
        self._read_back()  # also waits for the device, so the clock below is honest
        seconds = time.perf_counter() - self._clock
        running = self.running_metrics()
        test = self._evaluate()
        result = EpochResult(
            epoch=self.epoch + 1, step=self.step, train_loss=running["loss"], train_accuracy=running["accuracy"],
            test_loss=test.loss, test_accuracy=test.accuracy,
            images_per_s=self._images / seconds if seconds > 0 and self._images else math.nan,
            lr=lr, seconds=seconds, world_size=self.world_size,
        )
        if self._stopping():
            raise _StopRequested
        if self.scheduler is not None:
            self.scheduler.step()
        self.epoch += 1
        self.batch_in_epoch = 0
        self._epoch_start_state = None
        self.history.append(result)
        self._notify("on_epoch_end", result)
        return result

    def _read_back(self) -> None:
        """Bring the pending losses to the host in one transfer and stop on the first non-finite one.

        With ``comm`` the ranks' summed stop flags come along; any of them
        set makes :meth:`_stopping` true.
        """
        if not self._pending:
            return
        xp = self.xp
        losses = xp.stack([p[0] for p in self._pending])  # (k,)
        rows = [losses, xp.astype(xp.stack([p[1] for p in self._pending]), losses.dtype)]  # loss, correct: (k,) each
        if self.comm is not None:
            rows.append(xp.astype(xp.stack([p[4] for p in self._pending]), losses.dtype))  # stop flags (k,)
        host = backend.to_numpy(xp.stack(rows))  # (2 or 3, k)
        pending, self._pending = self._pending, []
        finite = np.isfinite(host[0])
        if not finite.all():
            i = int(np.argmin(finite))
            step = pending[i][3]
            batch = self.batch_in_epoch - (len(pending) - 1 - i)
            if self.last_saved is not None:
                kept = f"the last good checkpoint, {self.last_saved[0]} (after epoch {self.last_saved[1]}), is kept"
            else:
                kept = "no checkpoint had been written yet"
            raise NonFiniteLossError(
                f"non-finite training loss ({host[0][i]}) at epoch {self.epoch + 1}, step {step} "
                f"(batch {batch} of the epoch, learning rate {self.optimizer.lr:g}); training stopped and "
                f"{kept}. A lower learning rate usually helps.",
                epoch=self.epoch + 1, step=step, checkpoint_path=self.last_saved[0] if self.last_saved else None,
            )
        if self.comm is not None and host[2].any():
            self._stop_agreed = True
        sizes = np.array([p[2] for p in pending], dtype=np.float64)
        self._sums[0] += float(np.dot(host[0].astype(np.float64), sizes))
        self._sums[1] += float(host[1].sum())
        self._sums[2] += int(sizes.sum())
