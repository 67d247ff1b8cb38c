"""What happens around the training loop: progress bar, JSON log, checkpoints, console lines.

:class:`portable_cnn.train.Trainer` runs the loop and calls each of its
callbacks at fixed points, as Keras and Lightning do; everything that is
presentation or persistence lives here instead of in the loop. A callback
subclasses :class:`Callback` and overrides the hooks it needs:

=====================================  ===========================================================
hook                                   called
=====================================  ===========================================================
``on_fit_start(trainer)``              when :meth:`~portable_cnn.train.Trainer.fit` begins
``on_epoch_start(trainer)``            before the first batch of an epoch (or of its rest, when
                                       a run resumes inside one)
``on_step_end(trainer)``               after every optimizer step
``on_epoch_end(trainer, result)``      after an epoch was evaluated (``result`` is its
                                       :class:`~portable_cnn.train.EpochResult`) and counted
``on_interrupt(trainer)``              on Ctrl-C, at a step boundary; returns the path of a
                                       checkpoint it wrote, or ``None``
``on_fit_end(trainer)``                when ``fit`` ends, also when it ends by an exception
=====================================  ===========================================================

During ``fit`` the trainer's ``target_epochs`` is the epoch count it trains
towards, ``epoch`` the completed epochs, ``step`` the optimizer steps and
``batch_in_epoch`` the batches done in the current epoch.

In data-parallel training (a trainer given ``comm=``, :mod:`portable_cnn.distributed`)
callbacks run on rank 0 only, so that the bar, the lines, the log and the
checkpoint come once; a callback whose ``every_rank`` attribute is true runs
on every rank (``trainer.rank`` says which). Every rank sees the same
metrics: they are summed over the ranks.

>>> from portable_cnn import data, models, optim
>>> from portable_cnn.train import Trainer
>>> class AccuracyPrinter(Callback):
...     def on_epoch_end(self, trainer, result):
...         print(f"epoch {result.epoch}/{trainer.target_epochs}: above 80%: {result.test_accuracy > 0.8}")
>>> ds = data.load_digits().normalized()
>>> model = models.build_model("digits", in_channels=1, num_classes=10, input_size=8)
>>> trainer = Trainer(model, optim.SGD(model, lr=0.05, momentum=0.9), ds, callbacks=[AccuracyPrinter()])
>>> _ = trainer.fit(epochs=1)
epoch 1/1: above 80%: True
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

__all__ = ["Callback", "Checkpointing", "ConsoleLines", "JsonLog", "ProgressBar"]


class Callback:
    """Base class: every hook does nothing (see the module docstring for when each is called)."""

    #: In data-parallel training, run on every rank instead of rank 0 only.
    every_rank = False

    def on_fit_start(self, trainer) -> None:
        """``fit`` begins."""

    def on_epoch_start(self, trainer) -> None:
        """The batches of an epoch are about to run."""

    def on_step_end(self, trainer) -> None:
        """An optimizer step is done."""

    def on_epoch_end(self, trainer, result) -> None:
        """An epoch is done, evaluated and counted (``trainer.epoch == result.epoch``)."""

    def on_interrupt(self, trainer) -> Path | None:
        """Ctrl-C stopped the run at a step boundary; return the path of a checkpoint written, if any."""
        return None

    def on_fit_end(self, trainer) -> None:
        """``fit`` ends, normally or by an exception (as a ``finally`` block)."""


class ProgressBar(Callback):
    """A ``tqdm`` bar per epoch with the running loss, accuracy and images/s.

    The loss and accuracy shown are those already read back from the device
    (every ``log_every`` steps): the bar causes no device synchronisation.

    Parameters
    ----------
    **options
        Passed to ``tqdm`` over the defaults: ``file=sys.stderr``,
        ``leave=False``, ``dynamic_ncols=True`` and ``disable=None`` (no bar
        when the output is not a terminal).
    """

    def __init__(self, **options):
        self.options = options
        self._bar = None
        self._seen = 0

    def on_epoch_start(self, trainer) -> None:
        from tqdm.auto import tqdm

        options = dict(leave=False, dynamic_ncols=True, file=sys.stderr, disable=None) | self.options
        self._bar = tqdm(total=trainer.batches_per_epoch, initial=trainer.batch_in_epoch,
                         desc=f"epoch {trainer.epoch + 1}/{trainer.target_epochs}", unit="batch", **options)
        self._seen = 0

    def on_step_end(self, trainer) -> None:
        metrics = trainer.running_metrics()
        if metrics["seen"] != self._seen:  # a read-back happened: new numbers to show
            self._seen = metrics["seen"]
            self._bar.set_postfix({
                "loss": f"{metrics['loss']:.4f}",
                "acc": f"{metrics['accuracy']:.1%}",
                "img/s": f"{metrics['images_per_s']:.0f}",
            }, refresh=False)
        self._bar.update(1)

    def on_epoch_end(self, trainer, result) -> None:
        self._close()

    def on_fit_end(self, trainer) -> None:
        self._close()  # an error or Ctrl-C left the bar open: clear it before the message

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class JsonLog(Callback):
    """One JSON line per epoch (:meth:`portable_cnn.train.EpochResult.as_dict`, with the ``world_size`` that trained it).

    Parameters
    ----------
    path_or_file : path or file
        A path is opened in append mode for each line; an open file is
        written and flushed (its owner closes it).
    """

    def __init__(self, path_or_file):
        self.target = path_or_file

    def on_epoch_end(self, trainer, result) -> None:
        line = json.dumps(result.as_dict()) + "\n"
        if hasattr(self.target, "write"):
            self.target.write(line)
            self.target.flush()
        else:
            with open(self.target, "a", encoding="utf-8") as f:
                f.write(line)


class Checkpointing(Callback):
    """Write a checkpoint after every epoch and, on Ctrl-C, one of the exact position.

    The trainer needs a ``model_config`` to save. After a non-finite loss
    nothing is written, so the last good checkpoint stays (the error names it).

    Parameters
    ----------
    path : path, optional
        Written after every epoch (atomically); ``None``: only on Ctrl-C.
    interrupt_path : path, optional
        Where Ctrl-C saves (default: ``path``). Resuming from it continues
        the run down to the batch within the epoch. Without ``path``, an
        existing file there is not replaced: the next free ``<stem>-2``,
        ``-3``, ... name is used.
    """

    def __init__(self, path=None, *, interrupt_path=None):
        if path is None and interrupt_path is None:
            raise ValueError("Checkpointing: give a path, an interrupt_path or both")
        self.path = Path(path) if path is not None else None
        self.interrupt_path = Path(interrupt_path) if interrupt_path is not None else self.path

    def on_fit_start(self, trainer) -> None:
        # Refused now rather than after an epoch of training.
        if trainer.model_config is None:
            raise ValueError("Checkpointing: saving checkpoints needs the Trainer's model_config "
                             "(the model's name and constructor arguments)")

    def on_epoch_end(self, trainer, result) -> None:
        if self.path is not None:
            _save(trainer, self.path)

    def on_interrupt(self, trainer) -> Path:
        return _save(trainer, self.interrupt_path if self.path is not None else _free_name(self.interrupt_path))


def _save(trainer, path: Path) -> Path:
    """``trainer.save(path)``; a full disk or an I/O error as a one-line :class:`~portable_cnn.checkpoint.CheckpointError`.

    The write is atomic, so whatever was at ``path`` before is still there, whole.
    """
    from .checkpoint import CheckpointError

    try:
        return trainer.save(path)
    except OSError as exc:
        kept = "the previous checkpoint there is unchanged" if path.exists() else "nothing was written"
        # An OS error carries its reason in strerror; one of ours (a vanished directory) is already a sentence.
        message = f"cannot write checkpoint {path}: {exc.strerror} ({kept})" if exc.strerror else f"{exc} ({kept})"
        comm = getattr(trainer, "comm", None)
        if comm is not None and comm.size > 1:
            # Only rank 0 writes: the others would wait for it in the next all-reduce for ever.
            print(f"portable-cnn: error: {message}", file=sys.stderr, flush=True)
            comm.abort(2)
        raise CheckpointError(message) from None


def _free_name(path: Path) -> Path:
    """``path``, or ``<stem>-2<suffix>``, ``-3``, ...: the first that does not exist.

    Without ``path`` set, the Ctrl-C file is not this run's own: it must not
    replace the one another interrupted run left (the message names the file written).
    """
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate


class ConsoleLines(Callback):
    """A one-line summary after every epoch: loss, accuracies, images/s, seconds.

    >>> from portable_cnn.train import EpochResult
    >>> class Run:
    ...     target_epochs = 10
    >>> ConsoleLines().on_epoch_end(Run(), EpochResult(3, 135, 0.25, 0.9, 0.3, 0.875, 5000.0, 0.05, 0.3))
    epoch 3/10  loss 0.2500  train acc 90.00%  test loss 0.3000  test acc 87.50%  5,000 img/s  0.3 s

    Parameters
    ----------
    print_fn : callable, default print (flushed)
        Called with each line.
    """

    def __init__(self, print_fn=None):
        self.print_fn = print_fn if print_fn is not None else (lambda line: print(line, flush=True))

    def on_epoch_end(self, trainer, result) -> None:
        self.print_fn(
            f"epoch {result.epoch}/{trainer.target_epochs}  loss {result.train_loss:.4f}  "
            f"train acc {result.train_accuracy:.2%}  test loss {result.test_loss:.4f}  "
            f"test acc {result.test_accuracy:.2%}  {result.images_per_s:,.0f} img/s  {result.seconds:.1f} s"
        )
