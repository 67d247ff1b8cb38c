"""The ``portable-cnn`` command: train, eval, resume, errors, and both ways of starting it.

Most runs call :func:`portable_cnn.cli.main` in-process (cheap); subprocess
tests check ``python -m portable_cnn``, the declared console script entry
point and what ``train --help`` imports, in fresh interpreters.
"""

from __future__ import annotations

import importlib.machinery
import json
import os
import subprocess
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from portable_cnn import backend as B
from portable_cnn import cli
from portable_cnn.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--epochs", "1", "--backend", "numpy"]


def run(capsys, *argv):
    """``main(argv)`` -> (exit status, stdout, stderr)."""
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def tiny_npz(tmp_path):
    """A 2-class .npz of 6x6 images (bright left or right half), 60 samples, no test split."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 60)
    x = rng.integers(0, 60, (60, 6, 6)).astype(np.uint8)
    for i, label in enumerate(y):
        x[i, :, 3 * label:3 * label + 3] += 150
    path = tmp_path / "tiny.npz"
    np.savez(path, x=x, y=y)
    return path


# --------------------------------------------------------------------------- train / eval


def test_train_then_eval_on_other_backends(tmp_path, capsys):
    ckpt, log = tmp_path / "d.safetensors", tmp_path / "log.jsonl"
    code, out, err = run(capsys, *FAST, "--checkpoint", str(ckpt), "--log-json", str(log), "--log-every", "7")
    assert code == 0, err
    assert "backend: numpy on device cpu (using numpy on the CPU (asked for))" in out
    assert "model: digits" in out and "epoch 1/1" in out
    accuracy_line = [line for line in out.splitlines() if line.startswith("test accuracy:")]
    assert len(accuracy_line) == 1 and "/360) after 1 epochs on numpy" in accuracy_line[0]
    (record,) = [json.loads(line) for line in log.read_text().splitlines()]
    assert {"epoch", "train_loss", "test_accuracy", "images_per_s"} <= set(record)
    assert record["epoch"] == 1 and 0.5 < record["test_accuracy"] <= 1.0 and record["images_per_s"] > 0
    saved = load_checkpoint(ckpt)
    assert saved.train["log_every"] == 7 and saved.data["name"] == "digits" and len(saved.data["mean"]) == 1
    percent = accuracy_line[0].split()[2]

    for backend in ("numpy", "torch", "array_api_strict"):
        if backend != "numpy":
            pytest.importorskip(backend)
        code, out, err = run(capsys, "eval", "--checkpoint", str(ckpt), "--backend", backend)
        assert code == 0, err
        assert f"test accuracy: {percent}" in out, (backend, out)
        assert f"backend: {backend}" in out and "epoch 1, step 45" in out


def test_resume_continues_the_same_run(tmp_path, capsys):
    straight, split = tmp_path / "straight.safetensors", tmp_path / "split.safetensors"
    args = ["--backend", "numpy", "--quiet", "--batch-size", "64", "--schedule", "step"]
    assert run(capsys, *args, "--epochs", "2", "--checkpoint", str(straight))[0] == 0
    assert run(capsys, *args, "--epochs", "1", "--checkpoint", str(split))[0] == 0
    # Repeating the original options is fine; --epochs is the new total.
    code, out, err = run(capsys, "train", "--resume", str(split), "--epochs", "2", "--batch-size", "64", "--quiet")
    assert code == 0, err
    assert "after 2 epochs" in out
    a, b = load_checkpoint(straight), load_checkpoint(split)
    assert (a.epoch, a.step) == (b.epoch, b.step) == (2, 46)
    for name, value in a.model_state.items():
        np.testing.assert_allclose(b.model_state[name], value, rtol=1e-6, atol=1e-7, err_msg=name)
    for name, value in a.optimizer_state.items():
        np.testing.assert_allclose(b.optimizer_state[name], value, rtol=1e-6, atol=1e-7, err_msg=name)


def test_resume_refuses_to_change_the_run(tmp_path, capsys):
    ckpt = tmp_path / "c.safetensors"
    assert run(capsys, *FAST, "--quiet", "--checkpoint", str(ckpt))[0] == 0
    code, out, err = run(capsys, "--resume", str(ckpt), "--epochs", "2", "--lr", "0.3", "--optimizer", "adam")
    assert code == 2
    assert "settings cannot change" in err and "--lr 0.3 (the checkpoint has 0.05)" in err
    assert "--optimizer adam (the checkpoint has sgd)" in err and "Traceback" not in err
    assert load_checkpoint(ckpt).epoch == 1


def test_npz_dataset_picks_a_model_and_eval_takes_other_data(tmp_path, capsys, tiny_npz):
    ckpt = tmp_path / "n.safetensors"
    code, out, err = run(capsys, "--data", str(tiny_npz), "--epochs", "3", "--checkpoint", str(ckpt),
                         "--optimizer", "adam", "--dtype", "float64", "--backend", "numpy")
    assert code == 0, err
    assert "dataset: tiny, 48 train / 12 test images of 1x6x6, 2 classes" in out
    assert "model: digits" in out and "float64" in out and "adam (lr=0.001" in out
    saved = load_checkpoint(ckpt)
    assert saved.model_state["0.weight"].dtype == np.float64
    assert saved.data["path"] == str(tiny_npz.resolve())
    code, out, err = run(capsys, "eval", "--checkpoint", str(ckpt), "--dataset", "digits")
    assert code == 2 and "has 1x8x8 images but the checkpoint's model takes 1x6x6" in err


def test_non_finite_loss_exits_1_naming_the_step(tmp_path, capsys):
    code, out, err = run(capsys, *FAST, "--lr", "1e30", "--quiet", "--checkpoint", str(tmp_path / "x.safetensors"))
    assert code == 1
    assert "non-finite training loss" in err and "epoch 1, step " in err and "no checkpoint had been written" in err
    assert "Traceback" not in err and not (tmp_path / "x.safetensors").exists()


@pytest.mark.skipif(os.name == "nt", reason="needs POSIX signals")
def test_ctrl_c_saves_a_checkpoint_and_exits_130(tmp_path, capsys, monkeypatch):
    """A real SIGINT in the middle of the fifth optimizer step: the step completes, then the run is saved."""
    import signal

    from portable_cnn import optim

    monkeypatch.chdir(tmp_path)
    step = optim.SGD.step
    calls = []

    def step_with_ctrl_c(self):
        calls.append(1)
        if len(calls) == 5:
            os.kill(os.getpid(), signal.SIGINT)
        step(self)

    monkeypatch.setattr(optim.SGD, "step", step_with_ctrl_c)
    code, out, err = run(capsys, *FAST)
    assert code == 130
    saved = tmp_path / "digits-interrupted.safetensors"
    assert f"checkpoint saved to {saved.name}" in err and f"--resume {saved.name}" in err
    ckpt = load_checkpoint(saved)
    assert (ckpt.epoch, ckpt.step, ckpt.batch_in_epoch) == (0, 5, 5)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--epochs", "0"], "--epochs: expected a positive integer, got '0'"),
        (["--lr", "-1"], "--lr: expected a positive number"),
        (["--momentum", "1.5"], "--momentum: expected a momentum in [0, 1)"),
        (["--backend", "tpu"], "invalid choice: 'tpu'"),
        (["--model", "resnet"], "invalid choice: 'resnet'"),
        (["eval"], "the following arguments are required: --checkpoint"),
        (["trian"], "invalid choice: 'trian'"),
    ],
)
def test_bad_arguments_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--dataset", "mnist", "--data", "{tmp}/nowhere"], "cannot load dataset 'mnist'"),
        (["--dataset", "mnist"], "dataset 'mnist' needs a path"),
        (["--data", "{tmp}/corrupt.npz"], "corrupt.npz: cannot read as .npz"),
        (["--data", "{tmp}/somedir"], "say which format it is with --dataset"),
        (["--resume", "{tmp}/missing.safetensors"], "missing.safetensors does not exist"),
        (["eval", "--checkpoint", "{tmp}/corrupt.npz"], "not a readable safetensors checkpoint"),
        (["--optimizer", "adam", "--momentum", "0.5"], "--momentum applies to --optimizer sgd, not adam"),
    ],
)
def test_data_and_checkpoint_errors_exit_2_without_traceback(tmp_path, capsys, argv, message):
    (tmp_path / "corrupt.npz").write_bytes(b"definitely not an npz archive")
    (tmp_path / "somedir").mkdir()
    extra = [] if argv[0] == "eval" else FAST
    code, out, err = run(capsys, *[a.replace("{tmp}", str(tmp_path)) for a in argv], *extra)
    assert code == 2
    assert message in err and "Traceback" not in err
    assert err.startswith("portable-cnn ")


def test_a_run_that_cannot_start_leaves_an_old_log_alone(tmp_path, capsys):
    log = tmp_path / "log.jsonl"
    log.write_text("the last run\n")
    code, out, err = run(capsys, *FAST, "--data", str(tmp_path / "missing.npz"), "--log-json", str(log))
    assert code == 2 and "cannot load dataset 'npz'" in err
    assert log.read_text() == "the last run\n"


def test_explicit_cupy_without_a_gpu_is_a_clear_error(capsys):
    ok, why = B.cupy_status()
    if ok:
        pytest.skip("a CUDA device works here")
    code, out, err = run(capsys, "--backend", "cupy", "--epochs", "1")
    assert code == 2 and "backend 'cupy' cannot run here" in err


def test_an_extension_module_adds_a_subcommand_and_is_imported_only_to_run_it(monkeypatch, capsys):
    """The slot ``portable-cnn bench`` uses: a module with ``add_<name>_parser(subparsers)``, loaded on demand."""
    module = types.ModuleType("fake_extension")
    module.__spec__ = importlib.machinery.ModuleSpec("fake_extension", None)
    added = []

    def add_parser(subparsers):
        added.append(1)
        p = subparsers.add_parser("hello", help="say hello")
        p.add_argument("--name", default="world")
        p.set_defaults(func=lambda args: print(f"hello {args.name}") or 0)

    module.add_fake_parser = add_parser
    monkeypatch.setitem(sys.modules, "fake_extension", module)
    monkeypatch.setattr(cli, "EXTENSIONS", cli.EXTENSIONS + (("hello", "fake_extension", "add_fake_parser", "say hello"),))
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0 and added == []
    assert re.search(r"^\s+hello\s+say hello$", capsys.readouterr().out, re.M)
    assert run(capsys, "hello", "--name", "cnn")[:2] == (0, "hello cnn\n")
    assert added == [1]


def test_train_help_lists_the_registered_optimizers_and_schedules(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0 and "--optimizer {sgd,adam}" in out and "--schedule {none,step,cosine}" in out


def test_a_bad_environment_variable_is_one_line_and_help_still_works(monkeypatch, capsys, tmp_path):
    """The settings are read on first use: --help reads nothing, a command reports the variable before any work."""
    from portable_cnn import config

    monkeypatch.setattr(config, "_config", None)  # as in a fresh process: the environment not read yet
    monkeypatch.setenv("PORTABLE_CNN_WORKSPACE_MB", "abc")
    for argv in (["--help"], ["train", "--help"], ["eval", "--help"]):
        with pytest.raises(SystemExit) as info:
            cli.main(argv)
        assert info.value.code == 0, argv
    capsys.readouterr()
    ckpt = tmp_path / "never.safetensors"
    expected = "environment variable PORTABLE_CNN_WORKSPACE_MB: expected a positive number of megabytes, got 'abc'\n"
    code, out, err = run(capsys, *FAST, "--checkpoint", str(ckpt))
    assert (code, out, err) == (2, "", "portable-cnn train: error: " + expected)
    assert not ckpt.exists()
    code, out, err = run(capsys, "eval", "--checkpoint", str(ckpt))
    assert (code, out, err) == (2, "", "portable-cnn eval: error: " + expected)


# --------------------------------------------------------------------------- processes


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def test_python_dash_m_runs_the_command(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "portable_cnn", "--epochs", "1", "--quiet", "--backend", "numpy", "--checkpoint", "m.safetensors"],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("test accuracy: ") and proc.stderr == ""
    assert load_checkpoint(tmp_path / "m.safetensors").epoch == 1


def test_train_help_imports_no_optional_subcommand_module(tmp_path):
    """bench, export, check and predict (and onnx, onnxruntime, Pillow) load only when they run; --help lists them."""
    code = (
        "import sys\n"
        "from portable_cnn.cli import main\n"
        "for argv in (['train', '--help'], ['--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "names = ('portable_cnn.onnx', 'portable_cnn.check', 'portable_cnn.predict', 'onnx', 'onnxruntime', 'PIL')\n"
        "print(sorted(m for m in sys.modules if m.startswith('portable_cnn.bench') or m.split('.')[0] in names or m in names))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "[]"
    for command in ("bench", "check", "predict", "export"):
        assert re.search(rf"^\s+{command}\s+\S", proc.stdout, re.M), proc.stdout


def test_console_script_entry_point(tmp_path):
    """Run what the declared ``portable-cnn`` script runs (the installed script where there is one)."""
    scripts = re.search(r"^\[project\.scripts\]\n(.*?)(?:^\[|\Z)", (ROOT / "pyproject.toml").read_text(), re.M | re.S)
    target = re.search(r'^portable-cnn\s*=\s*"([^"]+)"', scripts.group(1), re.M).group(1)
    module, function = target.split(":")
    code = f"import sys; from {module} import {function}; sys.exit({function}())"
    proc = subprocess.run(
        [sys.executable, "-c", code, "eval", "--checkpoint", "missing.safetensors"],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr == "portable-cnn eval: error: checkpoint missing.safetensors does not exist\n"
    proc = subprocess.run([sys.executable, "-c", code, "--help"], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "train" in proc.stdout and "eval" in proc.stdout


@pytest.mark.slow
def test_default_run_reaches_97_percent(tmp_path, capsys):
    """The README's claim: no options, NumPy, seed 0, at least 97% on the digits."""
    code, out, err = run(capsys, "--backend", "numpy", "--quiet")
    assert code == 0, err
    percent = float(out.split()[2].rstrip("%"))
    assert percent >= 97.0, out


def test_threads_limit_the_blas_pool_during_training(monkeypatch, capsys):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from portable_cnn import train

    seen = []

    def recording_fit(self, epochs):  # records the pool instead of training (the point is the limit)
        seen.append({row["num_threads"] for row in threadpoolctl.threadpool_info() if row["user_api"] == "blas"})
        return []

    monkeypatch.setattr(train.Trainer, "fit", recording_fit)
    outside = {row["num_threads"] for row in threadpoolctl.threadpool_info() if row["user_api"] == "blas"}
    assert run(capsys, *FAST, "--quiet")[0] == 0  # the digits net: one thread by default
    assert run(capsys, *FAST, "--quiet", "--threads", "0")[0] == 0  # the library's own default
    assert seen == [{1}, outside]
    assert {row["num_threads"] for row in threadpoolctl.threadpool_info() if row["user_api"] == "blas"} == outside


def test_a_checkpoint_without_a_run_record_cannot_be_resumed(tmp_path, capsys):
    from portable_cnn import models
    from portable_cnn.checkpoint import Checkpoint, save_checkpoint

    model = models.build_model("digits", in_channels=1, num_classes=10, input_size=8)
    path = save_checkpoint(tmp_path / "bare.safetensors", Checkpoint.capture(
        model, model_config={"name": "digits", "in_channels": 1, "num_classes": 10, "input_size": [8, 8]}))
    code, out, err = run(capsys, "--resume", str(path), "--backend", "numpy")
    assert code == 2 and "cannot continue a run" in err


def test_tf32_flag_switches_tf32_on_and_its_absence_keeps_it_off(monkeypatch, capsys):
    monkeypatch.setenv("CUPY_TF32", "0")
    code, out, _ = run(capsys, *FAST, "--tf32")
    assert code == 0 and "TF32 on" in out and "no effect on the CPU" in out
    assert B.tf32_enabled()
    assert run(capsys, *FAST, "--quiet")[0] == 0
    assert not B.tf32_enabled()

