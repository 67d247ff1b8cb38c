"""Fault injection: what a user types, and what the machine does to a run, never costs a file or shows a traceback.

Every case is one row of a table and one *kind* of bad input or fault (the
module's ``KINDS`` counts them; ``test_kind_count`` keeps it at 150 or more).
A command-line case runs ``portable_cnn.cli.main`` in-process in a fresh
workspace (a small .npz dataset, a checkpoint trained on it, a foreign
safetensors file, ...) and asserts

* the exit status;
* no traceback, and exactly one ``error:`` line, which matches the row's pattern;
* every file of the workspace still there, byte for byte (nothing lost or changed).

An API case asserts the exception type and its one-line message naming
the bad argument. A few cases need a real process: SIGINT and SIGTERM during
training, kill -9 during a checkpoint write, a full disk on a small tmpfs
(skipped where mounting is not allowed; the same fault is also injected by
making the write fail with ENOSPC, EIO, EDQUOT, EROFS).
"""

from __future__ import annotations

import errno
import hashlib
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from portable_cnn import checkpoint, nn, optim
from portable_cnn.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from portable_cnn.cli import main
from portable_cnn.data import Dataset, check_classes
from portable_cnn.run import RunConfig, RunError, start

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["train", "--backend", "numpy", "--epochs", "1", "--quiet"]
TRAIN_NPZ = [*TRAIN, "--data", "{ws}/data.npz"]
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


# ------------------------------------------------------------------ the workspace


def _images(n=90, size=8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((n, 1, size, size), dtype=np.float32), np.arange(n) % 3


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A dataset, a checkpoint trained on it for one epoch, and files that are not what they claim to be."""
    import safetensors.numpy

    ws = tmp_path_factory.mktemp("faults-base")
    x, y = _images()
    np.savez(ws / "data.npz", x=x, y=y)
    start(RunConfig(data=ws / "data.npz", epochs=1, backend="numpy", checkpoint=ws / "run.safetensors"))
    safetensors.numpy.save_file({"weight": np.zeros((2, 2), np.float32)}, str(ws / "foreign.safetensors"),
                                metadata={"framework": "someone-else"})
    (ws / "random.bin").write_bytes(np.random.default_rng(1).bytes(4096))
    (ws / "notes.txt").write_text("not a directory\n")
    (ws / "adir").mkdir()
    return ws


@pytest.fixture
def ws(base, tmp_path, monkeypatch):
    """A fresh copy of the base workspace, the current directory during the case."""
    work = tmp_path / "ws"
    shutil.copytree(base, work)
    monkeypatch.chdir(work)
    return work


def _snapshot(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _assert_intact(before: dict, root: Path) -> None:
    after = _snapshot(root)
    lost = sorted(set(before) - set(after))
    changed = sorted(k for k in before if k in after and before[k] != after[k])
    assert not lost and not changed, f"lost {lost}, changed {changed}"
    assert not list(root.rglob("*.tmp")), "a temporary file was left behind"


def _run_cli(argv, capsys):
    try:
        status = main(argv)
    except SystemExit as exc:  # argparse
        status = exc.code
    out, err = capsys.readouterr()
    return status, out, err


def _assert_one_error_line(out: str, err: str, pattern: str) -> None:
    assert "Traceback" not in out + err, err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    assert errors[0].startswith("portable-cnn"), err
    assert re.search(pattern, errors[0]), f"{pattern!r} not in {errors[0]!r}"


# ------------------------------------------------------------------ setups: files a case adds


def npz(name, **arrays):
    """Write ``name`` (.npz) into the workspace with the base x/y replaced by ``arrays`` (``None`` drops a key)."""

    def setup(ws):
        x, y = _images()
        content = {k: v for k, v in ({"x": x, "y": y} | arrays).items() if v is not None}
        np.savez(ws / name, **content)

    return setup


def raw(name, data: bytes):
    def setup(ws):
        (ws / name).write_bytes(data)

    return setup


def ckpt_variant(name, *, tensors=None, meta=None):
    """A copy of the base checkpoint with its tensors and/or metadata (parsed JSON) edited."""

    def setup(ws):
        import json

        import safetensors
        import safetensors.numpy

        with safetensors.safe_open(str(ws / "run.safetensors"), framework="np") as f:
            md = {k: json.loads(v) for k, v in f.metadata().items()}
            ts = {k: f.get_tensor(k) for k in f.keys()}
        if tensors:
            tensors(ts)
        if meta:
            meta(md)
        safetensors.numpy.save_file(ts, str(ws / name), metadata={k: json.dumps(v) for k, v in md.items()})

    return setup


def raw_meta(name, key, text):
    """A copy of the base checkpoint whose metadata entry ``key`` is the raw string ``text`` (not JSON-encoded)."""

    def setup(ws):
        import safetensors
        import safetensors.numpy

        with safetensors.safe_open(str(ws / "run.safetensors"), framework="np") as f:
            md = dict(f.metadata())
            ts = {k: f.get_tensor(k) for k in f.keys()}
        md[key] = text
        safetensors.numpy.save_file(ts, str(ws / name), metadata=md)

    return setup


def _set(key, value):
    return lambda d: d.__setitem__(key, value)


def _first_tensor(value_fn):
    def edit(ts):
        key = sorted(k for k in ts if not k.startswith("optimizer."))[0]
        ts[key] = value_fn(ts[key])

    return edit


def _drop(key):
    return lambda d: d.pop(key)


def _model(**changes):
    return lambda d: d["model"].update(changes)


def mkdirs(*names):
    def setup(ws):
        for name in names:
            (ws / name).mkdir(parents=True)

    return setup


def both(*setups):
    def setup(ws):
        for s in setups:
            s(ws)

    return setup


# ------------------------------------------------------------------ the command-line table

# (kind, setup or None, argv ("{ws}" is the workspace), exit status, pattern of the error line)
CLI_CASES = [
    # --- options refused by the parser
    ("epochs zero", None, [*TRAIN_NPZ, "--epochs", "0"], 2, r"--epochs: expected a positive integer, got '0'"),
    ("epochs negative", None, [*TRAIN_NPZ, "--epochs", "-3"], 2, r"--epochs"),
    ("epochs not a number", None, [*TRAIN_NPZ, "--epochs", "ten"], 2, r"expected a positive integer, got 'ten'"),
    ("epochs fractional", None, [*TRAIN_NPZ, "--epochs", "1.5"], 2, r"got '1.5'"),
    ("batch size zero", None, [*TRAIN_NPZ, "--batch-size", "0"], 2, r"--batch-size"),
    ("batch size text", None, [*TRAIN_NPZ, "--batch-size", "big"], 2, r"--batch-size"),
    ("lr zero", None, [*TRAIN_NPZ, "--lr", "0"], 2, r"--lr: expected a positive number"),
    ("lr negative", None, [*TRAIN_NPZ, "--lr", "-0.1"], 2, r"--lr"),
    ("lr nan", None, [*TRAIN_NPZ, "--lr", "nan"], 2, r"--lr: expected a positive number, got 'nan'"),
    ("lr inf", None, [*TRAIN_NPZ, "--lr", "inf"], 2, r"--lr: expected a positive number, got 'inf'"),
    ("lr text", None, [*TRAIN_NPZ, "--lr", "fast"], 2, r"--lr"),
    ("momentum one", None, [*TRAIN_NPZ, "--momentum", "1"], 2, r"--momentum: expected a momentum in \[0, 1\)"),
    ("momentum negative", None, [*TRAIN_NPZ, "--momentum", "-0.5"], 2, r"--momentum"),
    ("weight decay negative", None, [*TRAIN_NPZ, "--weight-decay", "-1"], 2, r"--weight-decay"),
    ("weight decay nan", None, [*TRAIN_NPZ, "--weight-decay", "nan"], 2, r"--weight-decay"),
    ("log every zero", None, [*TRAIN_NPZ, "--log-every", "0"], 2, r"--log-every"),
    ("threads negative", None, [*TRAIN_NPZ, "--threads", "-1"], 2, r"--threads"),
    ("seed text", None, [*TRAIN_NPZ, "--seed", "abc"], 2, r"--seed"),
    ("unknown model", None, [*TRAIN_NPZ, "--model", "resnet9000"], 2, r"--model: invalid choice"),
    ("unknown dataset", None, [*TRAIN, "--dataset", "imagenet"], 2, r"--dataset: invalid choice"),
    ("unknown optimizer", None, [*TRAIN_NPZ, "--optimizer", "lbfgs"], 2, r"--optimizer: invalid choice"),
    ("unknown schedule", None, [*TRAIN_NPZ, "--schedule", "linear"], 2, r"--schedule: invalid choice"),
    ("unsupported dtype", None, [*TRAIN_NPZ, "--dtype", "float16"], 2, r"--dtype: invalid choice"),
    ("unknown backend", None, [*TRAIN_NPZ, "--backend", "tpu"], 2, r"--backend: invalid choice"),
    ("unknown option", None, [*TRAIN_NPZ, "--learning-rate", "0.1"], 2, r"unrecognized arguments: --learning-rate"),
    ("unknown subcommand", None, ["frobnicate"], 2, r"invalid choice: 'frobnicate'"),
    ("option without value", None, [*TRAIN, "--data"], 2, r"--data: expected one argument"),
    ("eval without checkpoint", None, ["eval"], 2, r"--checkpoint"),
    ("eval batch size zero", None, ["eval", "--checkpoint", "{ws}/run.safetensors", "--batch-size", "0"], 2,
     r"--batch-size"),
    ("predict without checkpoint", None, ["predict", "x.png"], 2, r"--checkpoint"),
    ("predict unknown split", None, ["predict", "--checkpoint", "{ws}/run.safetensors", "--split", "val"], 2,
     r"--split: invalid choice"),
    ("export without output", None, ["export", "--checkpoint", "{ws}/run.safetensors"], 2, r"--onnx"),
    # --- settings that conflict
    ("momentum with adam", None, [*TRAIN_NPZ, "--optimizer", "adam", "--momentum", "0.9"], 2,
     r"--momentum applies to --optimizer sgd"),
    ("data format unknown", None, [*TRAIN, "--data", "{ws}/random.bin"], 2, r"say which format it is"),
    ("digits given a path", None, [*TRAIN, "--dataset", "digits", "--data", "{ws}/data.npz"], 2, r"takes no path"),
    ("mnist without a path", None, [*TRAIN, "--dataset", "mnist"], 2, r"needs a path"),
    ("resume changes lr", None, [*TRAIN, "--resume", "{ws}/run.safetensors", "--epochs", "2", "--lr", "0.5"], 2,
     r"cannot change: --lr 0.5"),
    ("resume changes batch size", None, [*TRAIN, "--resume", "{ws}/run.safetensors", "--epochs", "2",
                                         "--batch-size", "7"], 2, r"--batch-size 7"),
    ("resume changes data", None, [*TRAIN, "--resume", "{ws}/run.safetensors", "--epochs", "2",
                                   "--data", "{ws}/other.npz"], 2, r"cannot change"),
    ("resume changes dtype", None, [*TRAIN, "--resume", "{ws}/run.safetensors", "--epochs", "2", "--dtype", "float64"],
     2, r"--dtype float64 \(the checkpoint has float32\)"),
    # --- data that cannot be used
    ("npz missing", None, [*TRAIN, "--data", "{ws}/absent.npz"], 2, r"absent.npz does not exist"),
    ("npz is a directory", mkdirs("dir.npz"), [*TRAIN, "--data", "{ws}/dir.npz"], 2, r"is a directory, not a .npz file"),
    ("npz of random bytes", raw("noise.npz", np.random.default_rng(2).bytes(2048)), [*TRAIN, "--data", "{ws}/noise.npz"],
     2, r"not a .npz archive"),
    ("npz empty file", raw("empty.npz", b""), [*TRAIN, "--data", "{ws}/empty.npz"], 2, r"empty.npz: cannot read"),
    ("npz truncated zip", raw("trunc.npz", b"PK\x03\x04" + b"\0" * 40), [*TRAIN, "--data", "{ws}/trunc.npz"], 2,
     r"trunc.npz: cannot read"),
    ("npz is a .npy", lambda ws: np.save(ws / "single.npy", np.zeros(3)) or os.rename(ws / "single.npy", ws / "one.npz"),
     [*TRAIN, "--data", "{ws}/one.npz"], 2, r"single .npy array"),
    ("npz without y", npz("noy.npz", y=None), [*TRAIN, "--data", "{ws}/noy.npz"], 2, r"missing key\(s\) y"),
    ("npz without x", npz("nox.npz", x=None), [*TRAIN, "--data", "{ws}/nox.npz"], 2, r"missing key\(s\) x"),
    ("npz images 2-D", npz("flat.npz", x=np.zeros((90, 64), np.float32)), [*TRAIN, "--data", "{ws}/flat.npz"], 2,
     r"flat.npz: 'x'"),
    ("npz images with NaN", npz("nan.npz", x=np.full((90, 1, 8, 8), np.nan, np.float32)),
     [*TRAIN, "--data", "{ws}/nan.npz"], 2, r"NaN or infinite"),
    ("npz images of strings", npz("str.npz", x=np.full((90, 1, 8, 8), "a")), [*TRAIN, "--data", "{ws}/str.npz"], 2,
     r"'x' must be an integer or float array"),
    ("npz float labels", npz("fl.npz", y=np.linspace(0, 2, 90)), [*TRAIN, "--data", "{ws}/fl.npz"], 2,
     r"integer class labels"),
    ("npz negative labels", npz("neg.npz", y=np.arange(90) % 3 - 1), [*TRAIN, "--data", "{ws}/neg.npz"], 2,
     r"negative label -1"),
    ("npz labels 2-D", npz("y2.npz", y=np.zeros((90, 2), np.int64)), [*TRAIN, "--data", "{ws}/y2.npz"], 2,
     r"'y' must be 1-D"),
    ("npz label count differs", npz("cnt.npz", y=np.arange(80) % 3), [*TRAIN, "--data", "{ws}/cnt.npz"], 2, r"cnt.npz"),
    ("npz no samples", npz("none.npz", x=np.zeros((0, 1, 8, 8), np.float32), y=np.zeros(0, np.int64)),
     [*TRAIN, "--data", "{ws}/none.npz"], 2, r"none.npz"),
    ("npz x_test without y_test", npz("half.npz", x_test=np.zeros((4, 1, 8, 8), np.float32)),
     [*TRAIN, "--data", "{ws}/half.npz"], 2, r"has x_test without y_test"),
    ("npz test images of another size", npz("sz.npz", x_test=np.zeros((4, 1, 9, 9), np.float32),
                                            y_test=np.zeros(4, np.int64)), [*TRAIN, "--data", "{ws}/sz.npz"], 2,
     r"per sample but 'x_test' is"),
    ("labels all one class", npz("one.npz", y=np.zeros(90, np.int64)), [*TRAIN, "--data", "{ws}/one.npz"], 2,
     r"training labels hold only class 0; a classifier needs at least 2 classes"),
    ("labels imply absurd class count", npz("huge.npz", y=np.where(np.arange(90) == 0, 10**9, np.arange(90) % 3)),
     [*TRAIN, "--data", "{ws}/huge.npz"], 2, r"imply 1,000,000,001 classes"),
    ("mnist path is a file", None, [*TRAIN, "--dataset", "mnist", "--data", "{ws}/notes.txt"], 2,
     r"is a file, not a directory"),
    ("mnist directory missing", None, [*TRAIN, "--dataset", "mnist", "--data", "{ws}/nowhere"], 2,
     r"MNIST directory .* does not exist"),
    ("mnist directory empty", None, [*TRAIN, "--dataset", "mnist", "--data", "{ws}/adir"], 2, r"train-images"),
    ("mnist corrupt idx", both(mkdirs("m"), *[raw(f"m/{n}", b"\0\0\x08\x03garbage") for n in (
        "train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")]),
     [*TRAIN, "--dataset", "mnist", "--data", "{ws}/m"], 2, r"train-images-idx3-ubyte"),
    ("cifar path is a file", None, [*TRAIN, "--dataset", "cifar10", "--data", "{ws}/notes.txt"], 2,
     r"is a file, not a directory"),
    ("cifar directory empty", None, [*TRAIN, "--dataset", "cifar10", "--data", "{ws}/adir"], 2, r"test_batch.bin not found"),
    ("cifar batch of wrong size", both(mkdirs("c"), raw("c/test_batch.bin", b"\1" * 100), raw("c/data_batch_1.bin", b"\1" * 100)),
     [*TRAIN, "--dataset", "cifar10", "--data", "{ws}/c"], 2, r"3073"),
    ("cifar empty batch", both(mkdirs("e"), raw("e/test_batch.bin", b""), raw("e/data_batch_1.bin", b"")),
     [*TRAIN, "--dataset", "cifar10", "--data", "{ws}/e"], 2, r"file is empty"),
    # --- checkpoints that cannot be used (resume, eval, predict, export)
    ("resume missing", None, [*TRAIN, "--resume", "{ws}/gone.safetensors"], 2, r"gone.safetensors does not exist"),
    ("resume a directory", None, [*TRAIN, "--resume", "{ws}/adir"], 2, r"adir: is a directory"),
    ("eval a directory", None, ["eval", "--checkpoint", "{ws}/adir"], 2, r"adir is not a file"),
    ("resume random bytes", None, [*TRAIN, "--resume", "{ws}/random.bin"], 2, r"not a readable safetensors"),
    ("resume empty file", raw("e.safetensors", b""), [*TRAIN, "--resume", "{ws}/e.safetensors"], 2,
     r"not a readable safetensors"),
    ("resume truncated", lambda ws: (ws / "t.safetensors").write_bytes((ws / "run.safetensors").read_bytes()[:200]),
     [*TRAIN, "--resume", "{ws}/t.safetensors"], 2, r"truncated or corrupt"),
    ("resume foreign safetensors", None, [*TRAIN, "--resume", "{ws}/foreign.safetensors"], 2,
     r"a safetensors file but not a portable_cnn checkpoint"),
    ("eval foreign safetensors", None, ["eval", "--checkpoint", "{ws}/foreign.safetensors"], 2,
     r"not a portable_cnn checkpoint"),
    ("eval missing", None, ["eval", "--checkpoint", "{ws}/gone.safetensors"], 2, r"does not exist"),
    ("eval random bytes", None, ["eval", "--checkpoint", "{ws}/random.bin"], 2, r"not a readable safetensors"),
    ("eval NaN weights", ckpt_variant("nan.safetensors", tensors=_first_tensor(lambda v: np.full_like(v, np.nan))),
     ["eval", "--checkpoint", "{ws}/nan.safetensors"], 2, r"tensor '.*' holds NaN or infinite values"),
    ("eval infinite weights", ckpt_variant("inf.safetensors", tensors=_first_tensor(lambda v: np.full_like(v, np.inf))),
     ["eval", "--checkpoint", "{ws}/inf.safetensors"], 2, r"holds NaN or infinite"),
    ("resume NaN optimizer state", ckpt_variant("nopt.safetensors", tensors=lambda ts: ts.update(
        {k: np.full_like(v, np.nan) for k, v in ts.items() if k.startswith("optimizer.") and v.dtype.kind == "f"})),
     [*TRAIN, "--resume", "{ws}/nopt.safetensors", "--epochs", "2"], 2, r"tensor 'optimizer\..*' holds NaN"),
    ("eval wrong tensor shape", ckpt_variant("shape.safetensors", tensors=_first_tensor(lambda v: v[..., :1])),
     ["eval", "--checkpoint", "{ws}/shape.safetensors"], 2, r"tensors do not fit model"),
    ("eval missing tensor", ckpt_variant("miss.safetensors", tensors=lambda ts: ts.pop(sorted(ts)[0])),
     ["eval", "--checkpoint", "{ws}/miss.safetensors"], 2, r"missing keys|do not fit"),
    ("eval complex tensor", ckpt_variant("cplx.safetensors", tensors=_first_tensor(lambda v: v.astype(np.complex64))),
     ["eval", "--checkpoint", "{ws}/cplx.safetensors"], 2, r"tensor .* has dtype complex64; expected real numbers"),
    ("eval unknown model name", ckpt_variant("name.safetensors", meta=_model(name="resnet9000")),
     ["eval", "--checkpoint", "{ws}/name.safetensors"], 2, r"cannot rebuild model|resnet9000"),
    ("metadata epoch a string", ckpt_variant("ep.safetensors", meta=_set("epoch", "three")),
     ["eval", "--checkpoint", "{ws}/ep.safetensors"], 2, r"metadata entry 'epoch' must be an integer >= 0"),
    ("metadata step negative", ckpt_variant("st.safetensors", meta=_set("step", -5)),
     ["eval", "--checkpoint", "{ws}/st.safetensors"], 2, r"'step' must be an integer >= 0"),
    ("metadata epoch boolean", ckpt_variant("eb.safetensors", meta=_set("epoch", True)),
     ["eval", "--checkpoint", "{ws}/eb.safetensors"], 2, r"'epoch' must be an integer"),
    ("metadata model a list", ckpt_variant("ml.safetensors", meta=_set("model", [1, 2])),
     ["eval", "--checkpoint", "{ws}/ml.safetensors"], 2, r"'model' must be a JSON object"),
    ("metadata data a string", ckpt_variant("ds.safetensors", meta=_set("data", "digits")),
     ["eval", "--checkpoint", "{ws}/ds.safetensors"], 2, r"'data' must be a JSON object"),
    ("metadata optimizer a number", ckpt_variant("op.safetensors", meta=_set("optimizer", 3)),
     [*TRAIN, "--resume", "{ws}/op.safetensors", "--epochs", "2"], 2, r"'optimizer' must be a JSON object"),
    ("metadata format version a string", ckpt_variant("fv.safetensors", meta=_set("format_version", "1")),
     ["eval", "--checkpoint", "{ws}/fv.safetensors"], 2, r"'format_version' must be a positive integer"),
    ("metadata format version newer", ckpt_variant("fn.safetensors", meta=_set("format_version", 99)),
     ["eval", "--checkpoint", "{ws}/fn.safetensors"], 2, r"newer than this"),
    ("metadata format of another tool", ckpt_variant("fo.safetensors", meta=_set("format", "other.checkpoint")),
     ["eval", "--checkpoint", "{ws}/fo.safetensors"], 2, r"metadata format is 'other.checkpoint'"),
    ("metadata lacks model", ckpt_variant("nm.safetensors", meta=_drop("model")),
     ["eval", "--checkpoint", "{ws}/nm.safetensors"], 2, r"lacks 'model'"),
    ("metadata not JSON", raw_meta("nj.safetensors", "epoch", "{not json"),
     ["eval", "--checkpoint", "{ws}/nj.safetensors"], 2, r"metadata entry 'epoch' is not valid JSON"),
    ("model in_channels zero", ckpt_variant("ic.safetensors", meta=_model(in_channels=0)),
     ["eval", "--checkpoint", "{ws}/ic.safetensors"], 2, r"model in_channels must be a positive integer"),
    ("model num_classes a string", ckpt_variant("nc.safetensors", meta=_model(num_classes="ten")),
     ["eval", "--checkpoint", "{ws}/nc.safetensors"], 2, r"model num_classes must be a positive integer"),
    ("model input_size of three", ckpt_variant("is.safetensors", meta=_model(input_size=[8, 8, 8])),
     ["eval", "--checkpoint", "{ws}/is.safetensors"], 2, r"input_size must be \[H, W\]"),
    ("model name a number", ckpt_variant("mn.safetensors", meta=_model(name=7)),
     ["eval", "--checkpoint", "{ws}/mn.safetensors"], 2, r"model name must be a string"),
    ("resume checkpoint without run record", ckpt_variant("nr.safetensors", meta=_set("optimizer", None)),
     [*TRAIN, "--resume", "{ws}/nr.safetensors", "--epochs", "2"], 2, r"holds no optimizer or dataset record"),
    ("eval dataset of another image size", npz("big.npz", x=_images(size=9)[0]),
     ["eval", "--checkpoint", "{ws}/run.safetensors", "--data", "{ws}/big.npz"], 2, r"9x9 images but the checkpoint"),
    ("eval dataset with more classes", npz("more.npz", y=np.arange(90) % 5),
     ["eval", "--checkpoint", "{ws}/run.safetensors", "--data", "{ws}/more.npz"], 2, r"5 classes but the checkpoint"),
    ("eval checkpoint data moved away", ckpt_variant("moved.safetensors", meta=lambda d: d["data"].update(path="/nowhere/d.npz")),
     ["eval", "--checkpoint", "{ws}/moved.safetensors"], 2, r"/nowhere/d.npz does not exist"),
    ("predict nothing to classify", None, ["predict", "--checkpoint", "{ws}/run.safetensors"], 2, r"nothing to classify"),
    ("predict images and data", None, ["predict", "--checkpoint", "{ws}/run.safetensors", "x.png",
                                       "--data", "{ws}/data.npz"], 2, r"not both"),
    ("predict image missing", None, ["predict", "--checkpoint", "{ws}/run.safetensors", "{ws}/absent.png"], 2,
     r"absent.png"),
    ("predict image of random bytes", None, ["predict", "--checkpoint", "{ws}/run.safetensors", "{ws}/random.bin"], 2,
     r"random.bin"),
    ("predict foreign checkpoint", None, ["predict", "--checkpoint", "{ws}/foreign.safetensors", "--data",
                                          "{ws}/data.npz"], 2, r"not a portable_cnn checkpoint"),
    ("export foreign checkpoint", None, ["export", "--checkpoint", "{ws}/foreign.safetensors", "--onnx", "{ws}/m.onnx"], 2,
     r"not a portable_cnn checkpoint"),
    # --- outputs checked before any work
    ("checkpoint empty path", None, [*TRAIN_NPZ, "--checkpoint", ""], 2, r"--checkpoint: empty path"),
    ("checkpoint is a directory", None, [*TRAIN_NPZ, "--checkpoint", "{ws}/adir"], 2, r"--checkpoint .*adir: is a directory"),
    ("checkpoint is the data file", None, [*TRAIN_NPZ, "--checkpoint", "{ws}/data.npz"], 2,
     r"--checkpoint .*data.npz is the same file as --data"),
    ("checkpoint is the data file by another name", None,
     [*TRAIN_NPZ, "--checkpoint", "{ws}/adir/../data.npz"], 2, r"is the same file as --data"),
    ("checkpoint under a file", None, [*TRAIN_NPZ, "--checkpoint", "{ws}/notes.txt/c.safetensors"], 2,
     r"notes.txt is a file, not a directory"),
    ("log is the data file", None, [*TRAIN_NPZ, "--log-json", "{ws}/data.npz"], 2, r"--log-json .* is the same file as --data"),
    ("log is the checkpoint", None, [*TRAIN_NPZ, "--checkpoint", "{ws}/c.safetensors", "--log-json", "{ws}/c.safetensors"],
     2, r"--log-json .* is the same file as --checkpoint"),
    ("log is the resumed checkpoint", None, [*TRAIN, "--resume", "{ws}/run.safetensors", "--epochs", "2",
                                             "--log-json", "{ws}/run.safetensors"], 2, r"same file as"),
    ("checkpoint is the resumed run's data", lambda ws: ckpt_variant("here.safetensors", meta=lambda d: d["data"].update(
        path=str(ws / "data.npz")))(ws), [*TRAIN, "--resume", "{ws}/here.safetensors", "--epochs", "2", "--checkpoint",
                                          "{ws}/data.npz"], 2, r"checkpoint .*data.npz is the same file as data"),
    ("log is a directory", None, [*TRAIN_NPZ, "--log-json", "{ws}/adir"], 2, r"--log-json .*adir: is a directory"),
    ("log empty path", None, [*TRAIN_NPZ, "--log-json", ""], 2, r"--log-json: empty path"),
    ("log under a file", None, [*TRAIN_NPZ, "--log-json", "{ws}/notes.txt/log.json"], 2, r"is a file, not a directory"),
    ("predict output is the checkpoint", None, ["predict", "--checkpoint", "{ws}/run.safetensors", "--data",
                                                "{ws}/data.npz", "--output", "{ws}/run.safetensors"], 2,
     r"--output .* is the same file as --checkpoint"),
    ("predict output is the data", None, ["predict", "--checkpoint", "{ws}/run.safetensors", "--data",
                                          "{ws}/data.npz", "--output", "{ws}/data.npz"], 2, r"same file as --data"),
    ("predict output is an input image", None, ["predict", "--checkpoint", "{ws}/run.safetensors", "{ws}/notes.txt",
                                                "--output", "{ws}/notes.txt"], 2, r"same file as image"),
    ("predict output is a directory", None, ["predict", "--checkpoint", "{ws}/run.safetensors", "--data",
                                             "{ws}/data.npz", "--output", "{ws}/adir"], 2, r"is a directory"),
    ("predict output empty path", None, ["predict", "--checkpoint", "{ws}/run.safetensors", "--data",
                                         "{ws}/data.npz", "--output", ""], 2, r"empty path"),
    ("predict output of unknown format", None, ["predict", "--checkpoint", "{ws}/run.safetensors", "--data",
                                                "{ws}/data.npz", "--output", "{ws}/p.xlsx"], 2, r"expected a file ending in"),
    ("export output is the checkpoint", None, ["export", "--checkpoint", "{ws}/run.safetensors", "--onnx",
                                               "{ws}/run.safetensors"], 2, r"--onnx .* is the same file as --checkpoint"),
    ("export output is a directory", None, ["export", "--checkpoint", "{ws}/run.safetensors", "--onnx", "{ws}/adir"], 2,
     r"is a directory"),
    ("export output empty path", None, ["export", "--checkpoint", "{ws}/run.safetensors", "--onnx", ""], 2,
     r"--onnx: empty path"),
    ("export output under a file", None, ["export", "--checkpoint", "{ws}/run.safetensors", "--onnx",
                                          "{ws}/notes.txt/m.onnx"], 2, r"is a file, not a directory"),
]

# Environment variables (portable_cnn.config reads them once per process: the cache is reset for each case).
ENV_CASES = [  # (kind, variable, value, argv)
    ("env fast paths not boolean", "PORTABLE_CNN_FAST_PATHS", "maybe", TRAIN_NPZ),
    ("env workspace negative", "PORTABLE_CNN_WORKSPACE_MB", "-5", TRAIN_NPZ),
    ("env workspace text", "PORTABLE_CNN_WORKSPACE_MB", "lots", ["eval", "--checkpoint", "{ws}/run.safetensors"]),
    ("env threads text", "PORTABLE_CNN_NUM_THREADS", "many", ["eval", "--checkpoint", "{ws}/run.safetensors"]),
    ("env threads zero", "PORTABLE_CNN_NUM_THREADS", "0", ["predict", "--checkpoint", "{ws}/run.safetensors",
                                                           "--data", "{ws}/data.npz"]),
]

if not IS_ROOT:  # permissions do not bind root
    CLI_CASES += [
        ("checkpoint read-only file", lambda ws: (ws / "ro.safetensors").write_bytes(b"x") or os.chmod(ws / "ro.safetensors", 0o444),
         [*TRAIN_NPZ, "--checkpoint", "{ws}/ro.safetensors"], 2, r"cannot be written"),
        ("checkpoint in read-only directory", lambda ws: (ws / "rod").mkdir() or os.chmod(ws / "rod", 0o555),
         [*TRAIN_NPZ, "--checkpoint", "{ws}/rod/c.safetensors"], 2, r"cannot be written"),
    ]

# Bench: importing it costs about a second; three kinds.
BENCH_CASES = [
    ("bench json is the markdown", ["bench", "--json", "{ws}/b.json", "--markdown", "{ws}/b.json"], r"--markdown .* same file as --json"),
    ("bench json is a directory", ["bench", "--json", "{ws}/adir"], r"--json .*adir: is a directory"),
    ("bench plot under a file", ["bench", "--plot", "{ws}/notes.txt/p.png"], r"is a file, not a directory"),
]


@pytest.mark.parametrize("kind, setup, argv, status, pattern", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_fault(kind, setup, argv, status, pattern, ws, capsys):
    if setup is not None:
        setup(ws)
    before = _snapshot(ws)
    got, out, err = _run_cli([a.format(ws=ws) for a in argv], capsys)
    assert got == status, err
    _assert_one_error_line(out, err, pattern)
    _assert_intact(before, ws)


@pytest.mark.parametrize("kind, variable, value, argv", ENV_CASES, ids=[c[0] for c in ENV_CASES])
def test_environment_fault(kind, variable, value, argv, ws, capsys, monkeypatch):
    from portable_cnn import config

    monkeypatch.setattr(config, "_config", None)
    monkeypatch.setenv(variable, value)
    before = _snapshot(ws)
    got, out, err = _run_cli([a.format(ws=ws) for a in argv], capsys)
    assert got == 2, err
    _assert_one_error_line(out, err, rf"environment variable {variable}: expected .*, got '{value}'$")
    _assert_intact(before, ws)


@pytest.mark.parametrize("kind, argv, pattern", BENCH_CASES, ids=[c[0] for c in BENCH_CASES])
def test_bench_output_fault(kind, argv, pattern, ws, capsys):
    pytest.importorskip("portable_cnn.bench")
    before = _snapshot(ws)
    got, out, err = _run_cli([a.format(ws=ws) for a in argv] + ["--quick", "--nets", "digits"], capsys)
    assert got == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert re.search(pattern, err), err
    _assert_intact(before, ws)


def test_help_works_with_a_bad_environment(monkeypatch, capsys):
    from portable_cnn import config

    monkeypatch.setattr(config, "_config", None)
    monkeypatch.setenv("PORTABLE_CNN_FAST_PATHS", "maybe")
    status, out, err = _run_cli(["train", "--help"], capsys)
    assert status == 0 and "usage:" in out and not err


def test_missing_parent_directories_are_created(ws, capsys):
    status, out, err = _run_cli([a.format(ws=ws) for a in TRAIN_NPZ] + ["--checkpoint", f"{ws}/new/deep/c.safetensors",
                                                                       "--log-json", f"{ws}/logs/run.jsonl"], capsys)
    assert status == 0, err
    assert load_checkpoint(ws / "new" / "deep" / "c.safetensors").epoch == 1
    assert (ws / "logs" / "run.jsonl").read_text().count("\n") == 1


def test_unseen_test_class_is_one_warning_line(ws, capsys):
    x, y = _images()
    np.savez(ws / "unseen.npz", x=x, y=y, x_test=x[:6], y_test=np.array([0, 1, 2, 3, 3, 0]))
    status, out, err = _run_cli([*TRAIN, "--data", str(ws / "unseen.npz")], capsys)
    assert status == 0, err
    assert err.splitlines() == ["portable-cnn train: warning: dataset 'unseen': test class 3 never occurs in the "
                                "training labels (the network cannot learn it)"]


# ------------------------------------------------------------------ write failures


def _failing_write(code):
    def write(f, payload, chunk=1 << 20):
        f.write(payload[:100])  # part of the file is on disk when the device gives up
        raise OSError(code, os.strerror(code))

    return write


WRITE_FAULTS = [  # (kind, what to patch, errno)
    ("disk full while writing", "write", errno.ENOSPC),
    ("I/O error while writing", "write", errno.EIO),
    ("quota exceeded while writing", "write", errno.EDQUOT),
    ("read-only filesystem while writing", "write", errno.EROFS),
    ("I/O error at fsync", "fsync", errno.EIO),
    ("rename refused", "replace", errno.EACCES),
]


@pytest.mark.parametrize("kind, where, code", WRITE_FAULTS, ids=[c[0] for c in WRITE_FAULTS])
def test_write_failure_keeps_the_previous_checkpoint(kind, where, code, ws, capsys, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    if where == "write":
        monkeypatch.setattr(checkpoint, "_write_all", _failing_write(code))
    else:
        monkeypatch.setattr(checkpoint.os, where, fail)
    before = _snapshot(ws)
    status, out, err = _run_cli([*TRAIN, "--resume", str(ws / "run.safetensors"), "--epochs", "2"], capsys)
    monkeypatch.undo()
    assert status == 2, err
    _assert_one_error_line(out, err, rf"cannot write checkpoint .*run.safetensors: {os.strerror(code)} "
                                     r"\(the previous checkpoint there is unchanged\)")
    _assert_intact(before, ws)
    assert load_checkpoint(ws / "run.safetensors").epoch == 1


def test_disk_full_on_ctrl_c_save(ws, capsys, monkeypatch):
    from portable_cnn import train

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(train.Trainer, "_run_epoch", interrupted)
    monkeypatch.setattr(checkpoint, "_write_all", _failing_write(errno.ENOSPC))
    before = _snapshot(ws)
    status, out, err = _run_cli([a.format(ws=ws) for a in TRAIN_NPZ], capsys)
    assert status == 2, err
    _assert_one_error_line(out, err, r"cannot write checkpoint .*digits-interrupted.safetensors: No space left on device "
                                     r"\(nothing was written\)")
    _assert_intact(before, ws)


def test_ctrl_c_never_replaces_another_runs_checkpoint(ws, capsys, monkeypatch):
    from portable_cnn import train

    def interrupted(self):
        raise KeyboardInterrupt

    shutil.copy(ws / "run.safetensors", ws / "digits-interrupted.safetensors")
    monkeypatch.setattr(train.Trainer, "_run_epoch", interrupted)
    before = _snapshot(ws)
    status, out, err = _run_cli([a.format(ws=ws) for a in TRAIN_NPZ], capsys)
    assert status == 130
    assert "checkpoint saved to digits-interrupted-2.safetensors" in err and "Traceback" not in err
    _assert_intact(before, ws)
    assert load_checkpoint(ws / "digits-interrupted-2.safetensors").epoch == 0


def test_full_tmpfs(ws, capsys):
    """A real full disk: the checkpoint on a small tmpfs, the rest of it filled."""
    mount = ws / "small"
    mount.mkdir()
    size = (ws / "run.safetensors").stat().st_size
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={(size // 4096 + 1) * 4096 * 2 + 65536}", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root, or no CAP_SYS_ADMIN)")
    try:
        shutil.copy(ws / "run.safetensors", mount / "run.safetensors")
        with open(mount / "filler", "wb", buffering=0) as f:  # take the rest of the space
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError:
                pass
        before = _snapshot(mount)
        status, out, err = _run_cli([*TRAIN, "--resume", str(mount / "run.safetensors"), "--epochs", "2"], capsys)
        assert status == 2, err
        _assert_one_error_line(out, err, r"cannot write checkpoint .*: No space left on device \(the previous")
        _assert_intact(before, mount)
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_stale_temporaries_of_a_dead_process_are_removed(ws):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = ws / f".run.safetensors.{dead.stdout.strip()}.deadbeef.tmp"
    stale.write_bytes(b"half a checkpoint")
    live = ws / f".run.safetensors.{os.getppid()}.cafecafe.tmp"  # a live process's save in progress
    live.write_bytes(b"being written")
    save_checkpoint(ws / "run.safetensors", load_checkpoint(ws / "run.safetensors"))
    assert not stale.exists() and live.exists()


KILL_WRITER = """
import sys, time
from portable_cnn import checkpoint
def slow(f, payload, chunk=1 << 20):
    f.write(payload[:64]); f.flush(); print("writing", flush=True); time.sleep(60)
checkpoint._write_all = slow
ckpt = checkpoint.load_checkpoint(sys.argv[1])
checkpoint.save_checkpoint(sys.argv[1], ckpt)
"""


def _python(args, cwd, **kwargs):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, *args], cwd=cwd, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, **kwargs)


def test_kill_9_during_a_checkpoint_write(ws):
    before = _snapshot(ws)
    proc = _python(["-c", KILL_WRITER, str(ws / "run.safetensors")], ws)
    assert proc.stdout.readline().strip() == "writing"
    proc.kill()
    proc.communicate()
    leftovers = list(ws.glob(".run.safetensors.*.tmp"))
    assert len(leftovers) == 1
    assert _snapshot(ws) == before | {leftovers[0].name: _snapshot(ws)[leftovers[0].name]}
    save_checkpoint(ws / "run.safetensors", load_checkpoint(ws / "run.safetensors"))  # the next save cleans up
    assert not list(ws.glob("*.tmp"))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_during_training_saves_and_exits_130(signum, ws):
    x, y = _images(n=3000)
    np.savez(ws / "big.npz", x=x, y=y)
    before = _snapshot(ws)
    proc = _python(["-m", "portable_cnn", "train", "--backend", "numpy", "--data", "big.npz", "--epochs", "50",
                    "--batch-size", "8"], ws)
    for line in proc.stdout:  # the run is described just before training starts
        if line.startswith("model:"):
            break
    time.sleep(0.3)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "checkpoint saved to digits-interrupted.safetensors" in err
    _assert_intact(before, ws)
    assert load_checkpoint(ws / "digits-interrupted.safetensors").step > 0


# ------------------------------------------------------------------ the Python API

API_CASES = [  # (kind, call, exception, pattern)
    ("Conv2d in_channels zero", lambda: nn.Conv2d(0, 4, 3), ValueError, r"^Conv2d: in_channels must be positive, got 0$"),
    ("Conv2d out_channels negative", lambda: nn.Conv2d(1, -4, 3), ValueError, r"^Conv2d: out_channels must be positive"),
    ("Conv2d channels fractional", lambda: nn.Conv2d(1.5, 4, 3), TypeError, r"^Conv2d: in_channels must be a positive integer, got 1.5$"),
    ("Conv2d channels text", lambda: nn.Conv2d("3", 4, 3), TypeError, r"^Conv2d: in_channels must be a positive integer"),
    ("Conv2d channels boolean", lambda: nn.Conv2d(True, 4, 3), TypeError, r"in_channels"),
    ("Conv2d kernel zero", lambda: nn.Conv2d(1, 4, 0), ValueError, r"kernel_size must be positive"),
    ("Conv2d kernel fractional", lambda: nn.Conv2d(1, 4, 2.5), TypeError, r"kernel_size"),
    ("Conv2d stride zero", lambda: nn.Conv2d(1, 4, 3, stride=0), ValueError, r"stride must be positive"),
    ("Conv2d padding negative", lambda: nn.Conv2d(1, 4, 3, padding=-1), ValueError, r"padding must be non-negative"),
    ("Conv2d groups not dividing", lambda: nn.Conv2d(3, 4, 3, groups=2), ValueError, r"divisible by groups"),
    ("Linear in_features zero", lambda: nn.Linear(0, 3), ValueError, r"^Linear: in_features must be positive, got 0$"),
    ("Linear out_features text", lambda: nn.Linear(3, "ten"), TypeError, r"^Linear: out_features must be a positive integer"),
    ("Linear features float", lambda: nn.Linear(3.0, 2), TypeError, r"in_features"),
    ("MaxPool2d kernel zero", lambda: nn.MaxPool2d(0), ValueError, r"kernel_size must be positive"),
    ("AvgPool2d stride negative", lambda: nn.AvgPool2d(2, stride=-1), ValueError, r"stride must be positive"),
    ("BatchNorm2d num_features zero", lambda: nn.BatchNorm2d(0), ValueError, r"num_features must be positive"),
    ("BatchNorm2d num_features text", lambda: nn.BatchNorm2d("8"), TypeError, r"num_features must be a positive integer"),
    ("BatchNorm eps zero", lambda: nn.BatchNorm2d(4, eps=0), ValueError, r"^BatchNorm2d: eps must be a positive number, got 0$"),
    ("BatchNorm eps negative", lambda: nn.BatchNorm1d(4, eps=-1e-5), ValueError, r"eps must be a positive number"),
    ("BatchNorm eps nan", lambda: nn.BatchNorm2d(4, eps=math.nan), ValueError, r"eps must be a positive number"),
    ("BatchNorm eps text", lambda: nn.BatchNorm2d(4, eps="small"), TypeError, r"eps must be a real number"),
    ("BatchNorm momentum above one", lambda: nn.BatchNorm2d(4, momentum=1.5), ValueError, r"momentum must be in \[0, 1\]"),
    ("BatchNorm momentum negative", lambda: nn.BatchNorm2d(4, momentum=-0.1), ValueError, r"momentum must be in"),
    ("Dropout p above one", lambda: nn.Dropout(1.5), ValueError, r"dropout probability must be in \[0, 1\]"),
    ("Dropout p negative", lambda: nn.Dropout(-0.1), ValueError, r"dropout probability"),
    ("Dropout p text", lambda: nn.Dropout("half"), TypeError, r"dropout probability"),
    ("SGD lr negative", lambda: optim.SGD(nn.Linear(2, 2), lr=-0.1), ValueError, r"lr must be"),
    ("SGD lr nan", lambda: optim.SGD(nn.Linear(2, 2), lr=math.nan), ValueError, r"lr must be"),
    ("SGD lr text", lambda: optim.SGD(nn.Linear(2, 2), lr="fast"), TypeError, r"lr must be a real number"),
    ("SGD momentum negative", lambda: optim.SGD(nn.Linear(2, 2), lr=0.1, momentum=-1), ValueError, r"momentum must be"),
    ("Adam lr negative", lambda: optim.Adam(nn.Linear(2, 2), lr=-1), ValueError, r"lr must be"),
    ("Adam betas wrong", lambda: optim.Adam(nn.Linear(2, 2), betas=0.9), ValueError, r"betas"),
    ("Conv2d backward before forward", lambda: nn.Conv2d(1, 2, 3).backward(np.ones((1, 2, 1, 1), np.float32)),
     RuntimeError, r"backward called before forward"),
    ("Linear backward before forward", lambda: nn.Linear(2, 3).backward(np.ones((1, 3), np.float32)), RuntimeError,
     r"^Linear\(.*\): backward called before forward"),
    ("ReLU backward before forward", lambda: nn.ReLU().backward(np.ones(3, np.float32)), RuntimeError,
     r"backward called before forward"),
    ("MaxPool2d backward before forward", lambda: nn.MaxPool2d(2).backward(np.ones((1, 1, 1, 1), np.float32)),
     RuntimeError, r"backward called before forward"),
    ("BatchNorm backward before forward", lambda: nn.BatchNorm2d(2).backward(np.ones((2, 2, 1, 1), np.float32)),
     RuntimeError, r"backward called before forward"),
    ("loss backward before forward", lambda: nn.SoftmaxCrossEntropy().backward(), RuntimeError,
     r"backward called before forward"),
    ("Sequential backward before forward", lambda: nn.Sequential(nn.Linear(2, 2), nn.ReLU()).backward(np.ones((1, 2), np.float32)),
     RuntimeError, r"backward called before forward"),
    ("to integer dtype", lambda: nn.Linear(2, 2).to("numpy", "int32"), TypeError, r"dtype must be a floating type.*'int32'"),
    ("to complex dtype", lambda: nn.Linear(2, 2).to("numpy", np.complex64), TypeError, r"dtype must be a floating type"),
    ("to boolean dtype", lambda: nn.Linear(2, 2).to("numpy", "bool"), TypeError, r"dtype must be a floating type"),
    ("load_state_dict list", lambda: nn.Linear(2, 2).load_state_dict({"weight": [[1, 0], [0, 1]], "bias": np.zeros(2)}),
     TypeError, r"weight must be an array, got list"),
    ("load_state_dict scalar", lambda: nn.Linear(2, 2).load_state_dict({"weight": np.eye(2), "bias": 0.0}),
     TypeError, r"bias must be an array, got float"),
    ("load_state_dict complex", lambda: nn.Linear(2, 2).load_state_dict({"weight": np.eye(2, dtype=complex), "bias": np.zeros(2)}),
     TypeError, r"weight must hold real numbers, got dtype complex128"),
    ("load_state_dict missing key", lambda: nn.Linear(2, 2).load_state_dict({"weight": np.eye(2)}), KeyError, r"missing keys \['bias'\]"),
    ("load_state_dict wrong shape", lambda: nn.Linear(2, 2).load_state_dict({"weight": np.eye(3), "bias": np.zeros(2)}),
     ValueError, r"expected shape \(2, 2\), got \(3, 3\)"),
    ("RunConfig epochs zero", lambda: RunConfig(epochs=0), RunError, r"epochs must be a positive int"),
    ("RunConfig unknown model", lambda: RunConfig(model="resnet9000"), RunError, r"model 'resnet9000': choose one of"),
    ("single class through the API", lambda: check_classes(Dataset(np.zeros((4, 1, 2, 2), np.float32), np.zeros(4, int),
                                                                   np.zeros((2, 1, 2, 2), np.float32), np.zeros(2, int),
                                                                   num_classes=1, name="one")),
     ValueError, r"training labels hold only class 0"),
    ("load a foreign safetensors", None, CheckpointError, r"not a portable_cnn checkpoint"),
    ("Run checkpoint over its data", None, RunError, r"checkpoint .*data.npz is the same file as data"),
]


@pytest.mark.parametrize("kind, call, exc, pattern", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_fault(kind, call, exc, pattern, ws):
    if kind == "load a foreign safetensors":
        call = lambda: load_checkpoint(ws / "foreign.safetensors")  # noqa: E731
    elif kind == "Run checkpoint over its data":
        call = lambda: start(RunConfig(data=ws / "data.npz", checkpoint=ws / "data.npz", backend="numpy"))  # noqa: E731
    before = _snapshot(ws)
    with pytest.raises(exc) as info:
        call()
    message = info.value.args[0] if info.value.args else ""
    assert "\n" not in message and re.search(pattern, message), message
    _assert_intact(before, ws)


# ------------------------------------------------------------------ the count

#: Every kind of bad input or fault this module injects.
KINDS = ([c[0] for c in CLI_CASES] + [c[0] for c in ENV_CASES] + [c[0] for c in BENCH_CASES] + [c[0] for c in WRITE_FAULTS] + [c[0] for c in API_CASES]
         + ["help with a bad environment", "missing parent directories", "test class never trained",
            "disk full on the Ctrl-C save", "Ctrl-C name clash", "full tmpfs", "stale temporary of a dead save",
            "kill -9 during a checkpoint write", "SIGINT during training", "SIGTERM during training"])


def test_kind_count():
    assert len(set(KINDS)) == len(KINDS) >= 150, len(KINDS)
