"""The rank program of tests/test_distributed.py: ``mpiexec -n N python tests/mpi_worker.py SCENARIO OUT_DIR``.

Scenarios (rank 0 writes the results into ``OUT_DIR``):

``exact``
    Trains every run of :data:`RUNS` data-parallel and saves its final
    state and history as ``<run>.npz``; ``identical.json`` records whether
    the parameters came out bitwise equal on every rank.
``stop``
    Rank 1 sends itself SIGTERM after step 3; every rank records the step
    it stopped at (``stop-<rank>.json``) and rank 0 the checkpoint.
``nan``
    A learning rate that makes the loss overflow; every rank records the
    step its ``NonFiniteLossError`` names (``nan-<rank>.json``).
``fail``
    Rank 1 raises after step 2 while the other ranks go on training: the
    job must end (MPI_Abort from :func:`portable_cnn.distributed.init`'s
    exception hook) instead of leaving them in an Allreduce.

The test computes the one-process reference of each run with :func:`train`
in its own process.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from portable_cnn import data, distributed, models, nn, optim
from portable_cnn.callbacks import Callback, Checkpointing
from portable_cnn.config import config_context
from portable_cnn.train import NonFiniteLossError, Trainer, TrainingInterrupted

#: name -> (model, optimizer, training samples, global batch size, epochs). The sample counts
#: leave a short last batch, and with 2 or 3 ranks uneven and empty shards (batch 2: the third rank's
#: shard is always empty; 41 % 2 = 1: the last batch has one row).
RUNS = {
    "digits": ("digits", "sgd", 150, 7, 2),
    "digits-empty-shards": ("digits", "sgd", 41, 2, 1),
    "batchnorm-dropout": ("bn-dropout", "adam", 44, 7, 2),
    "resnet20": ("resnet20", "sgd", 46, 9, 1),
}


def digits_subset(n_train: int, n_test: int = 37) -> data.Dataset:
    """The first samples of scikit-learn's digits, normalised."""
    ds = data.load_digits().normalized()
    return replace(ds, x_train=ds.x_train[:n_train], y_train=ds.y_train[:n_train],
                   x_test=ds.x_test[:n_test], y_test=ds.y_test[:n_test])


def bn_dropout_net(rng) -> nn.Sequential:
    """BatchNorm2d, BatchNorm1d and Dropout; no bias before a BatchNorm (its gradient would be rounding noise)."""
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1, bias=False, rng=rng), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(96, 24, bias=False, rng=rng), nn.BatchNorm1d(24), nn.ReLU(),
        nn.Dropout(0.25, rng=7), nn.Linear(24, 10, rng=rng),
    )


def build(name: str, comm=None, *, lr=None, callbacks=(), sync_batchnorm=True) -> Trainer:
    """The float64 trainer of run ``name`` (a key of :data:`RUNS`), data-parallel with ``comm``."""
    model_name, optimizer, n_train, batch_size, _ = RUNS[name]
    if model_name == "bn-dropout":
        model = bn_dropout_net(np.random.default_rng(3))
    else:
        model = models.build_model(model_name, in_channels=1, num_classes=10, input_size=8, seed=0)
    model.to("numpy", "float64")
    if optimizer == "sgd":
        opt = optim.SGD(model, lr=0.05 if lr is None else lr, momentum=0.9, weight_decay=5e-4)
    else:
        opt = optim.Adam(model, lr=3e-3 if lr is None else lr)
    model_config = {"name": model_name, "in_channels": 1, "num_classes": 10, "input_size": [8, 8], "seed": 0}
    schedule = {"name": "step", "step_size": 1, "gamma": 0.5}
    return Trainer(model, opt, digits_subset(n_train), scheduler=optim.build_scheduler(opt, schedule),
                   scheduler_config=schedule, batch_size=batch_size, seed=0, log_every=4, model_config=model_config, callbacks=callbacks,
                   comm=comm, sync_batchnorm=sync_batchnorm)


def train(name: str, comm=None) -> dict:
    """Train run ``name``; its final state, and its history as a ``(epochs, 4)`` array."""
    trainer = build(name, comm)
    with config_context(num_threads=1):
        history = trainer.fit(RUNS[name][4])
    state = {k: np.asarray(v) for k, v in trainer.model.state_dict().items()}
    state["history"] = np.array([[h.train_loss, h.train_accuracy, h.test_loss, h.test_accuracy] for h in history])
    return state


class AtStep(Callback):
    """Calls ``fn(trainer)`` after step ``step`` on every rank (``fn`` decides what each rank does)."""

    every_rank = True

    def __init__(self, step, fn):
        self.step, self.fn = step, fn

    def on_step_end(self, trainer):
        if trainer.step == self.step:
            self.fn(trainer)


def _write(path: Path, value) -> None:
    path.write_text(json.dumps(value))


def exact(comm, out: Path) -> None:
    digests = {}
    for name in RUNS:
        state = train(name, comm)
        digests[name] = hashlib.sha256(b"".join(v.tobytes() for k, v in sorted(state.items()) if k != "history")).hexdigest()
        if comm.rank == 0:
            np.savez(out / f"{name}.npz", **state)
    every = comm.allgather_object(digests)
    if comm.rank == 0:
        _write(out / "identical.json", all(d == every[0] for d in every))


def stop(comm, out: Path) -> None:
    def terminate(trainer):
        if trainer.rank == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    checkpoint = out / "stopped.safetensors"
    trainer = build("digits", comm, callbacks=[Checkpointing(interrupt_path=checkpoint), AtStep(3, terminate)])
    try:
        trainer.fit(2)
        stopped = None
    except TrainingInterrupted as exc:
        stopped = {"step": exc.step, "trainer_step": trainer.step, "path": str(exc.checkpoint_path)}
    _write(out / f"stop-{comm.rank}.json", stopped)


def nan(comm, out: Path) -> None:
    trainer = build("digits", comm, lr=1e6)
    try:
        trainer.fit(1)
        found = None
    except NonFiniteLossError as exc:
        found = {"step": exc.step, "trainer_step": trainer.step}
    _write(out / f"nan-{comm.rank}.json", found)


def fail(comm, out: Path) -> None:
    def explode(trainer):
        if trainer.rank == 1:
            raise RuntimeError("rank 1 fails on purpose")

    build("digits", comm, callbacks=[AtStep(2, explode)]).fit(50)
    _write(out / f"finished-{comm.rank}.json", True)  # never reached: the job is aborted


SCENARIOS = {"exact": exact, "stop": stop, "nan": nan, "fail": fail}

if __name__ == "__main__":
    scenario, out_dir = sys.argv[1], Path(sys.argv[2])
    communicator = distributed.init()
    for part in scenario.split(","):
        SCENARIOS[part](communicator, out_dir)
