"""The training loop: exact resumption (epoch metrics included), Ctrl-C, non-finite losses, host reads, evaluation, metric values.

A tiny synthetic dataset and a small model with BatchNorm and Dropout keep
each run to a fraction of a second while still exercising every piece of
state a resumption has to carry: weights, running statistics, momentum, the
schedule, the shuffling generator and the dropout generator.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading

import numpy as np
import pytest

from portable_cnn import backend as B
from portable_cnn import nn, optim, train
from portable_cnn.callbacks import Callback, Checkpointing, ConsoleLines, JsonLog, ProgressBar
from portable_cnn.checkpoint import Checkpoint, load_checkpoint
from portable_cnn.data import Dataset
from portable_cnn.train import NonFiniteLossError, Trainer, TrainingInterrupted, evaluate

CONFIG = {"name": "custom"}


def tiny_dataset(n_train=40, n_test=12, seed=0):
    """Three classes of 8x8 images: a bright row in the top, middle or bottom, plus noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n_train + n_test)
    x = rng.normal(0.0, 0.3, (n_train + n_test, 1, 8, 8)).astype(np.float32)
    for i, label in enumerate(y):
        x[i, 0, 1 + 3 * label] += 1.0
    return Dataset(x[:n_train], y[:n_train], x[n_train:], y[n_train:], num_classes=3, name="tiny")


def tiny_model(seed=0, dropout=0.2):
    rng = np.random.default_rng(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, rng=rng), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Dropout(dropout, rng=rng), nn.Linear(4 * 4 * 4, 3, rng=rng),
    )


class AtStep(Callback):
    """Calls ``fn(trainer)`` after every optimizer step."""

    def __init__(self, fn):
        self.fn = fn

    def on_step_end(self, trainer):
        self.fn(trainer)


def make_trainer(tmp_path=None, *, epochs=2, name="run", dropout=0.2, backend="numpy", on_step=None, callbacks=(), **kw):
    """The tiny run; checkpoints to ``tmp_path/<name>.safetensors`` when ``tmp_path`` is given."""
    model = tiny_model(dropout=dropout).to(backend)
    opt = optim.SGD(model, lr=0.05, momentum=0.9, weight_decay=1e-3)
    sched_config = {"name": "cosine", "T_max": epochs}
    callbacks = [*callbacks]
    if tmp_path is not None:
        callbacks.insert(0, Checkpointing(tmp_path / f"{name}.safetensors"))
    if on_step is not None:
        callbacks.append(AtStep(on_step))
    kw.setdefault("log_every", 2)
    return Trainer(model, opt, tiny_dataset(), scheduler=optim.CosineAnnealingLR(opt, T_max=epochs),
                   scheduler_config=sched_config, batch_size=8, seed=1, model_config=CONFIG, callbacks=callbacks, **kw)


def assert_same_state(a: Trainer, b: Trainer):
    for name, value in a.model.state_dict().items():
        np.testing.assert_allclose(B.to_numpy(b.model.state_dict()[name]), B.to_numpy(value), rtol=1e-6, atol=1e-7, err_msg=name)
    sa, sb = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert sorted(sa) == sorted(sb)
    for name in sa:
        np.testing.assert_allclose(B.to_numpy(sb[name]), B.to_numpy(sa[name]), rtol=1e-6, atol=1e-7, err_msg=name)
    assert (a.epoch, a.step, a.optimizer.lr) == (b.epoch, b.step, b.optimizer.lr)


def resumed(tmp_path, path, epochs=2):
    """A fresh trainer (new model, optimizer, generators) continuing from ``path``."""
    fresh = make_trainer(tmp_path, epochs=epochs, name="resumed")
    fresh.restore(load_checkpoint(path))
    return fresh


# --------------------------------------------------------------------------- resumption


def test_two_epochs_equal_one_then_resume_for_one(tmp_path):
    straight = make_trainer()
    straight.fit(2)

    first = make_trainer(tmp_path)
    first.fit(1)
    ckpt = load_checkpoint(tmp_path / "run.safetensors")
    assert (ckpt.epoch, ckpt.step, ckpt.batch_in_epoch) == (1, 5, 0)
    assert set(ckpt.rng["layers"]) == {"5.rng"}  # the Dropout's generator, under its module name
    second = resumed(tmp_path, tmp_path / "run.safetensors")
    assert second.epoch == 1
    results = second.fit(2)
    assert [r.epoch for r in results] == [2]
    assert_same_state(straight, second)
    # The stream of dropout masks went on from where it stopped, too.
    assert straight.model[5].rng.random() == second.model[5].rng.random()


def test_resume_does_not_restart_when_the_target_is_reached(tmp_path):
    first = make_trainer(tmp_path)
    first.fit(2)
    again = resumed(tmp_path, tmp_path / "run.safetensors")
    assert again.fit(2) == []
    assert again.step == first.step


def test_ctrl_c_mid_epoch_saves_and_resumes_the_same_run(tmp_path):
    straight = make_trainer()
    straight.fit(2)

    def interrupt_at_step_7(trainer):
        if trainer.step == 7:
            raise KeyboardInterrupt

    stopped = make_trainer(tmp_path, on_step=interrupt_at_step_7)
    with pytest.raises(TrainingInterrupted) as info:
        stopped.fit(2)
    assert isinstance(info.value, KeyboardInterrupt)
    assert info.value.checkpoint_path == tmp_path / "run.safetensors"
    assert "epoch 2, step 7" in str(info.value)
    ckpt = load_checkpoint(info.value.checkpoint_path)
    assert (ckpt.epoch, ckpt.step, ckpt.batch_in_epoch) == (1, 7, 2)

    again = resumed(tmp_path, info.value.checkpoint_path)
    again.fit(2)
    assert_same_state(straight, again)


@pytest.mark.skipif(not hasattr(signal, "SIGINT") or os.name == "nt", reason="needs POSIX signals")
def test_real_sigint_finishes_the_step_then_saves(tmp_path):
    assert threading.current_thread() is threading.main_thread()

    def press_ctrl_c(trainer):
        if trainer.step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    stopped = make_trainer(tmp_path, on_step=press_ctrl_c)
    with pytest.raises(TrainingInterrupted):
        stopped.fit(2)
    assert load_checkpoint(tmp_path / "run.safetensors").step == 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, "handler not restored"


def test_interrupt_without_a_path_saves_nothing_but_still_stops(tmp_path):
    def interrupt(trainer):
        raise KeyboardInterrupt

    stopped = make_trainer(None, on_step=interrupt)
    with pytest.raises(TrainingInterrupted, match="nothing saved") as info:
        stopped.fit(1)
    assert info.value.checkpoint_path is None
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- non-finite loss


def test_huge_learning_rate_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    trainer = make_trainer(tmp_path, epochs=3)
    trainer.fit(1)
    good = {k: B.to_numpy(v).copy() for k, v in trainer.model.state_dict().items()}
    trainer.optimizer.lr = 1e30
    trainer.scheduler = None
    with pytest.raises(NonFiniteLossError) as info:
        trainer.fit(3)
    err = info.value
    assert err.epoch >= 2 and err.step > 5
    assert f"epoch {err.epoch}, step {err.step}" in str(err)
    assert str(tmp_path / "run.safetensors") in str(err) and "after epoch 1" in str(err)
    ckpt = load_checkpoint(tmp_path / "run.safetensors")
    assert ckpt.epoch == 1
    for name, value in good.items():
        np.testing.assert_array_equal(ckpt.model_state[name], value, err_msg=name)


def test_the_first_non_finite_step_is_named_even_between_reads(tmp_path):
    """Losses are read back every few steps; the error still names the exact step that went bad."""

    def poison_after_step_3(trainer):
        if trainer.step == 3:
            layer = trainer.model[6]
            layer.params["weight"] = layer.params["weight"] * np.float32("nan")

    trainer = make_trainer(None, on_step=poison_after_step_3, log_every=5)
    with pytest.raises(NonFiniteLossError, match="no checkpoint had been written") as info:
        trainer.fit(1)
    assert (info.value.epoch, info.value.step) == (1, 4)
    assert "epoch 1, step 4 (batch 4 of the epoch" in str(info.value)


# --------------------------------------------------------------------------- device traffic


def test_loss_is_read_back_every_log_every_steps_and_batches_move_once(monkeypatch):
    trainer = make_trainer(None, log_every=2)
    reads, moves = [], []
    to_numpy, asarray = B.to_numpy, B.asarray
    monkeypatch.setattr(B, "to_numpy", lambda a: reads.append(tuple(a.shape)) or to_numpy(a))
    monkeypatch.setattr(B, "asarray", lambda a, *args, **kw: moves.append(tuple(np.shape(a))) or asarray(a, *args, **kw))
    trainer.fit(1)
    # 40 samples in batches of 8: 5 steps, read after steps 2 and 4 and at the end of the epoch;
    # then one read for the evaluation of the 12 test images.
    assert reads == [(2, 2), (2, 2), (2, 1), (2,)]
    # Each batch goes over once as a whole: images and labels, 5 training and 1 evaluation batch.
    assert moves == [(8, 1, 8, 8), (8,)] * 5 + [(12, 1, 8, 8), (12,)]


def test_labels_are_checked_once_up_front():
    ds = tiny_dataset()
    ds.y_train[3] = 3  # num_classes is 3
    model = tiny_model()
    with pytest.raises(ValueError, match=r"y_train: expected integer class labels in \[0, 3\), got values from 0 to 3"):
        Trainer(model, optim.SGD(model, lr=0.1), ds)


def test_model_width_must_match_the_classes():
    ds = tiny_dataset()
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 5, rng=0))
    with pytest.raises(ValueError, match="5 logits per sample but dataset 'tiny' has 3 classes"):
        Trainer(model, optim.SGD(model, lr=0.1), ds).fit(1)


def test_saving_needs_a_model_config(tmp_path):
    """Refused before any training, not after an epoch."""
    model = tiny_model()
    steps = []
    trainer = Trainer(model, optim.SGD(model, lr=0.1), tiny_dataset(),
                      callbacks=[Checkpointing(tmp_path / "c.safetensors"), AtStep(steps.append)])
    with pytest.raises(ValueError, match="model_config"):
        trainer.fit(1)
    assert steps == [] and list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="model_config"):
        trainer.save(tmp_path / "c.safetensors")


# --------------------------------------------------------------------------- evaluation and logs


def test_evaluate_matches_a_direct_computation_and_restores_the_mode():
    ds = tiny_dataset()
    model = tiny_model()
    model.train()
    result = evaluate(model, ds.x_test, ds.y_test, batch_size=5)
    assert model.training and model[5].training
    model.eval()
    logits = model.forward(ds.x_test).astype(np.float64)
    expected_acc = float(np.mean(np.argmax(logits, axis=1) == ds.y_test))
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    expected_loss = float(-log_probs[np.arange(len(ds.y_test)), ds.y_test].mean())
    assert result.accuracy == pytest.approx(expected_acc)
    assert result.correct == round(expected_acc * 12) and result.total == 12
    assert result.loss == pytest.approx(expected_loss, rel=1e-5)


@pytest.mark.parametrize("name", ["torch", "array_api_strict"])
def test_training_runs_on_other_backends(name):
    """The same run on another backend gives the same weights (no dropout: its random streams differ by backend)."""
    pytest.importorskip(name)
    trainer = make_trainer(None, dropout=0.0, backend=name)
    reference = make_trainer(None, dropout=0.0)
    assert B.backend_name(trainer.model[0].params["weight"]) == name
    trainer.fit(1)
    reference.fit(1)
    for key, value in reference.model.state_dict().items():
        np.testing.assert_allclose(B.to_numpy(trainer.model.state_dict()[key]), B.to_numpy(value), rtol=2e-4, atol=2e-5, err_msg=key)


def test_history_and_json_log(tmp_path):
    log = tmp_path / "log.jsonl"
    lines = []
    trainer = make_trainer(None, callbacks=[JsonLog(log), ConsoleLines(lines.append)])
    results = trainer.fit(2)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    for record, result in zip(records, results):
        assert {"epoch", "train_loss", "test_accuracy", "images_per_s"} <= set(record)
        assert record == result.as_dict()
        assert 0.0 <= record["test_accuracy"] <= 1.0 and record["images_per_s"] > 0
        assert math.isfinite(record["train_loss"])
    assert records[0]["lr"] == 0.05 and records[1]["lr"] == pytest.approx(0.025)
    assert len(lines) == 2 and lines[1].startswith("epoch 2/2")


def test_learning_does_happen():
    """Not a hard-coded result: the tiny problem is learnable, the untrained model is at chance."""
    trainer = make_trainer(None, epochs=8)
    before = evaluate(trainer.model, trainer.dataset.x_test, trainer.dataset.y_test).loss
    results = trainer.fit(8)
    assert results[-1].test_loss < before / 2
    assert results[-1].train_accuracy > 0.9


def test_build_optimizer_and_scheduler_from_configs():
    """The registries live in optim; train re-exports the names it always had."""
    assert train.build_optimizer is optim.build_optimizer and train.build_scheduler is optim.build_scheduler
    assert train.OPTIMIZERS is optim.OPTIMIZERS and train.SCHEDULES is optim.SCHEDULES
    model = tiny_model()
    opt = train.build_optimizer(model, {"name": "adam", "lr": 0.01, "betas": [0.8, 0.9], "eps": 1e-7, "weight_decay": 0.0})
    assert opt.config() == {"name": "adam", "lr": 0.01, "betas": [0.8, 0.9], "eps": 1e-7, "weight_decay": 0.0}
    sched = train.build_scheduler(opt, {"name": "step", "step_size": 1, "gamma": 0.5, "last_epoch": 3})
    sched.step()
    assert opt.lr == pytest.approx(0.005)
    assert train.build_scheduler(opt, {"name": "none"}) is None
    with pytest.raises(ValueError, match="unknown optimizer 'rmsprop'"):
        train.build_optimizer(model, {"name": "rmsprop", "lr": 0.1})
    with pytest.raises(ValueError, match="unknown schedule 'linear'"):
        train.build_scheduler(opt, {"name": "linear"})


def test_dropout_on_the_default_generator_resumes_too(tmp_path, monkeypatch):
    """A Dropout built without rng= draws from nn's default generator; the checkpoint carries its state."""
    monkeypatch.setattr(nn, "_default_rng", nn._default_rng)  # put the global generator back afterwards

    def model_with_default_dropout():
        rng = np.random.default_rng(0)
        return nn.Sequential(nn.Flatten(), nn.Dropout(0.3), nn.Linear(64, 3, rng=rng))

    def trainer(path=None):
        model = model_with_default_dropout()
        return Trainer(model, optim.SGD(model, lr=0.1, momentum=0.5), tiny_dataset(), batch_size=8, seed=2,
                       model_config=CONFIG, callbacks=[Checkpointing(path)] if path is not None else [])

    nn.manual_seed(123)
    straight = trainer()
    straight.fit(2)

    nn.manual_seed(123)
    first = trainer(tmp_path / "d.safetensors")
    first.fit(1)
    assert "nn_default" in load_checkpoint(tmp_path / "d.safetensors").rng
    nn.manual_seed(999)  # another stream in between: the checkpoint must put the old one back
    again = trainer(tmp_path / "d.safetensors")
    again.restore(load_checkpoint(tmp_path / "d.safetensors"))
    again.fit(2)
    for name, value in straight.model.state_dict().items():
        np.testing.assert_array_equal(again.model.state_dict()[name], value, err_msg=name)


def test_a_nested_dropout_generator_is_found_by_its_dotted_name(tmp_path):
    """Generators are found by walking the modules, so a Dropout inside a block resumes too."""

    def trainer(path=None):
        model = nn.Sequential(nn.Flatten(), nn.Sequential(nn.Dropout(0.3, rng=1), nn.Linear(64, 3, rng=0)))
        return Trainer(model, optim.SGD(model, lr=0.1, momentum=0.5), tiny_dataset(), batch_size=8, seed=2,
                       model_config=CONFIG, callbacks=[Checkpointing(path)] if path is not None else [])

    straight = trainer()
    straight.fit(2)
    first = trainer(tmp_path / "n.safetensors")
    first.fit(1)
    ckpt = load_checkpoint(tmp_path / "n.safetensors")
    assert set(ckpt.rng["layers"]) == {"1.0.rng"}
    again = trainer()
    again.restore(ckpt)
    again.fit(2)
    for name, value in straight.model.state_dict().items():
        np.testing.assert_array_equal(again.model.state_dict()[name], value, err_msg=name)


# --------------------------------------------------------------------------- callbacks


class Recorder(Callback):
    """Writes down every hook call as ``(hook, epoch, step)``."""

    def __init__(self):
        self.calls = []

    def _record(self, hook, trainer):
        self.calls.append((hook, trainer.epoch, trainer.step))

    def on_fit_start(self, trainer):
        self._record("fit_start", trainer)

    def on_epoch_start(self, trainer):
        self._record("epoch_start", trainer)

    def on_step_end(self, trainer):
        self._record("step_end", trainer)

    def on_epoch_end(self, trainer, result):
        assert result is trainer.history[-1] and result.epoch == trainer.epoch
        self._record("epoch_end", trainer)

    def on_interrupt(self, trainer):
        self._record("interrupt", trainer)

    def on_fit_end(self, trainer):
        self._record("fit_end", trainer)


def test_callbacks_are_called_at_each_point_of_the_loop():
    recorder = Recorder()
    make_trainer(None, callbacks=[recorder]).fit(2)
    steps = lambda epoch, first: [("step_end", epoch, s) for s in range(first, first + 5)]  # noqa: E731
    assert recorder.calls == [
        ("fit_start", 0, 0),
        ("epoch_start", 0, 0), *steps(0, 1), ("epoch_end", 1, 5),
        ("epoch_start", 1, 5), *steps(1, 6), ("epoch_end", 2, 10),
        ("fit_end", 2, 10),
    ]


def test_ctrl_c_calls_on_interrupt_then_on_fit_end_and_an_error_calls_on_fit_end(tmp_path):
    def interrupt_at_step_2(trainer):
        if trainer.step == 2:
            raise KeyboardInterrupt

    recorder = Recorder()
    with pytest.raises(TrainingInterrupted, match="nothing saved"):
        make_trainer(None, on_step=interrupt_at_step_2, callbacks=[recorder]).fit(1)
    assert recorder.calls[-3:] == [("step_end", 0, 2), ("interrupt", 0, 2), ("fit_end", 0, 2)]

    def poison(trainer):
        layer = trainer.model[6]
        layer.params["weight"] = layer.params["weight"] * np.float32("nan")

    recorder = Recorder()
    with pytest.raises(NonFiniteLossError):
        make_trainer(None, on_step=poison, callbacks=[recorder]).fit(1)
    assert [c[0] for c in recorder.calls if c[0] != "step_end"] == ["fit_start", "epoch_start", "fit_end"]


def test_checkpointing_only_on_ctrl_c_writes_nothing_per_epoch(tmp_path):
    path = tmp_path / "stopped.safetensors"

    def interrupt_at_step_7(trainer):
        if trainer.step == 7:
            raise KeyboardInterrupt

    trainer = make_trainer(None, on_step=interrupt_at_step_7, callbacks=[Checkpointing(interrupt_path=path)])
    with pytest.raises(TrainingInterrupted) as info:
        trainer.fit(2)
    assert info.value.checkpoint_path == path and f"checkpoint saved to {path}" in str(info.value)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    assert load_checkpoint(path).step == 7
    with pytest.raises(ValueError, match="give a path"):
        Checkpointing()


def test_progress_bar_shows_the_epoch_and_the_numbers_read_back():
    import io

    out = io.StringIO()
    trainer = make_trainer(None, callbacks=[ProgressBar(file=out, disable=False, mininterval=0, leave=True)])
    trainer.fit(1)
    text = out.getvalue()
    assert "epoch 1/1" in text and "5/5" in text
    assert "loss=" in text and "acc=" in text and "img/s=" in text
    metrics = trainer.running_metrics()
    assert metrics["seen"] == 40 and 0 <= metrics["accuracy"] <= 1 and math.isfinite(metrics["loss"])


# --------------------------------------------------------------------------- the values of the epoch metrics


def _mean_loss_and_accuracy(weight, bias, x, y):
    """Cross-entropy and accuracy of the linear model ``x.reshape(N, -1) @ weight.T + bias``, in float64, by hand."""
    logits = x.reshape(len(x), -1).astype(np.float64) @ weight.T.astype(np.float64) + bias.astype(np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(len(y)), y].mean()), float(np.mean(logits.argmax(axis=1) == y))


def test_epoch_metrics_are_sample_means_with_a_partial_last_batch(tmp_path):
    """train_loss and train_accuracy average over samples, not batches: 43 samples in batches of 8 (the last of 3).

    With ``lr=0`` the weights never change, so every metric is the model's
    mean over its split, computed here by hand; the JSON log holds the same
    numbers as the history.
    """
    ds = tiny_dataset(n_train=43)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 3, rng=0))
    log = tmp_path / "log.jsonl"
    trainer = Trainer(model, optim.SGD(model, lr=0.0), ds, batch_size=8, seed=1, log_every=3, callbacks=[JsonLog(log)])
    results = trainer.fit(2)
    weight, bias = model[1].params["weight"], model[1].params["bias"]
    train_loss, train_accuracy = _mean_loss_and_accuracy(weight, bias, ds.x_train, ds.y_train)
    test_loss, test_accuracy = _mean_loss_and_accuracy(weight, bias, ds.x_test, ds.y_test)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r.as_dict() for r in results] == records
    for epoch, record in enumerate(records, start=1):
        assert (record["epoch"], record["step"], record["lr"]) == (epoch, 6 * epoch, 0.0)
        assert record["train_loss"] == pytest.approx(train_loss, rel=1e-6)
        assert record["train_accuracy"] == pytest.approx(train_accuracy, abs=1e-12)
        assert record["test_loss"] == pytest.approx(test_loss, rel=1e-6)
        assert record["test_accuracy"] == pytest.approx(test_accuracy, abs=1e-12)
        assert record["images_per_s"] > 0 and record["seconds"] > 0
    # The test can tell: a mean of six batch means (the last of 3 samples) is another number.
    batch_means = [_mean_loss_and_accuracy(weight, bias, ds.x_train[i:i + 8], ds.y_train[i:i + 8])[0]
                   for i in range(0, 43, 8)]
    assert abs(np.mean(batch_means) - train_loss) > 1e-3


def _interrupt_at(step):
    def interrupt(trainer):
        if trainer.step == step:
            raise KeyboardInterrupt

    return interrupt


def test_a_resumed_epoch_reports_the_metrics_of_an_uninterrupted_one(tmp_path):
    """Ctrl-C inside epoch 2, then resume: that epoch's train_loss and train_accuracy are the straight run's.

    The checkpoint holds the epoch's sums so far (``epoch_sums``); without
    them the resumed epoch averaged only its last batches.
    """
    straight_log, resumed_log = tmp_path / "straight.jsonl", tmp_path / "resumed.jsonl"
    straight = make_trainer(callbacks=[JsonLog(straight_log)])
    straight.fit(2)
    stopped = make_trainer(tmp_path, on_step=_interrupt_at(8))
    with pytest.raises(TrainingInterrupted):
        stopped.fit(2)
    ckpt = load_checkpoint(tmp_path / "run.safetensors")
    assert ckpt.batch_in_epoch == 3 and ckpt.epoch_sums["seen"] == 24
    again = make_trainer(tmp_path, name="resumed", callbacks=[JsonLog(resumed_log)])
    again.restore(ckpt)
    again.fit(2)
    want = json.loads(straight_log.read_text().splitlines()[1])
    got = json.loads(resumed_log.read_text().splitlines()[0])
    assert got["epoch"] == want["epoch"] == 2 and got["step"] == want["step"] == 10
    for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy"):
        assert got[key] == pytest.approx(want[key], rel=1e-12), key  # the read-backs group the sums differently
    assert again.history[-1].train_loss == got["train_loss"]


def test_a_checkpoint_without_epoch_sums_still_resumes(tmp_path):
    """Checkpoints written before the sums were kept load and resume; that epoch's metrics cover the batches after it."""
    stopped = make_trainer(tmp_path, on_step=_interrupt_at(8))
    with pytest.raises(TrainingInterrupted):
        stopped.fit(2)
    tensors, metadata = load_checkpoint(tmp_path / "run.safetensors").to_safetensors()
    del metadata["epoch_sums"]  # the file as an older version wrote it
    ckpt = Checkpoint.from_safetensors(tensors, metadata, tmp_path / "old.safetensors")
    assert ckpt.epoch_sums == {} and ckpt.batch_in_epoch == 3
    again = make_trainer(tmp_path, name="resumed")
    again.restore(ckpt)
    (result,) = again.fit(2)
    assert again.running_metrics()["seen"] == 16  # the two batches after the resumption
    assert math.isfinite(result.train_loss) and 0 <= result.train_accuracy <= 1


def test_a_checkpoint_saved_between_read_backs_holds_every_batch_so_far(tmp_path):
    """A callback saving mid-epoch, with losses not read back yet, still stores the sums of every batch done."""
    saved = []

    def save_at_step_3(trainer):
        if trainer.step == 3:
            saved.append(load_checkpoint(trainer.save(tmp_path / "mid.safetensors")))

    make_trainer(None, on_step=save_at_step_3, log_every=5).fit(1)
    (ckpt,) = saved
    assert ckpt.batch_in_epoch == 3 and ckpt.epoch_sums["seen"] == 24
    assert 0 < ckpt.epoch_sums["loss"] and 0 <= ckpt.epoch_sums["correct"] <= 24
