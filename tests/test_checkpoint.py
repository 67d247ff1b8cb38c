"""Checkpoints: the safetensors layout, atomic writes, clear errors, and moving between backends.

The layout is read back with ``safetensors`` itself (and loaded into a real
``torch.nn.Sequential``), not only with our own loader, so a loader that
merely inverts a wrong writer cannot pass.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import safetensors
import safetensors.numpy

from portable_cnn import __version__, checkpoint, models, nn, optim
from portable_cnn import backend as B
from portable_cnn.checkpoint import (
    Checkpoint,
    CheckpointError,
    generator_from_state,
    generator_state,
    load_checkpoint,
    save_checkpoint,
)

DIGITS = {"name": "digits", "in_channels": 1, "num_classes": 10, "input_size": [8, 8], "seed": 3}


def digits_model():
    return models.build_model("digits", in_channels=1, num_classes=10, input_size=8, seed=3)


def batch(n=6, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 1, 8, 8)).astype(np.float32), rng.integers(0, 10, n)


def sgd_steps(model, opt, steps, xp=None):
    """``steps`` SGD steps on fixed batches, on whatever backend the model is on."""
    loss_fn = nn.SoftmaxCrossEntropy()
    param = next(iter(model.state_dict().values()))
    xp = B.namespace(param)
    for i in range(steps):
        x, y = batch(seed=i)
        logits = model.forward(B.asarray(x, xp, dtype=B.dtype_name(param)))
        loss_fn.forward(logits, B.asarray(y, xp))
        model.backward(loss_fn.backward())
        opt.step()


def bn_model(rng=0):
    """A small model with BatchNorm buffers and a Dropout generator."""
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1, rng=rng), nn.BatchNorm2d(3), nn.ReLU(), nn.Dropout(0.25, rng=rng),
        nn.Flatten(), nn.Linear(3 * 8 * 8, 4, rng=rng),
    )


# --------------------------------------------------------------------------- layout


def test_file_layout_read_with_safetensors_itself(tmp_path):
    model = bn_model()
    opt = optim.SGD(model, lr=0.1, momentum=0.9)
    x = np.random.default_rng(1).standard_normal((5, 1, 8, 8)).astype(np.float32)
    loss_fn = nn.SoftmaxCrossEntropy()
    loss_fn.forward(model.forward(x), np.array([0, 1, 2, 3, 0]))
    model.backward(loss_fn.backward())
    opt.step()
    ckpt = Checkpoint.capture(model, model_config={"name": "custom"}, optimizer=opt, epoch=4, step=17,
                              rng={"shuffle": generator_state(np.random.default_rng(5))})
    path = save_checkpoint(tmp_path / "run.safetensors", ckpt)

    with safetensors.safe_open(str(path), framework="np") as f:
        keys = set(f.keys())
        meta = f.metadata()
        running_mean = f.get_tensor("1.running_mean")
        tracked = f.get_tensor("1.num_batches_tracked")
        step = f.get_tensor("optimizer.step")
    assert {"0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var",
            "1.num_batches_tracked", "5.weight", "5.bias"} <= keys
    assert {"optimizer.0.weight.momentum_buffer", "optimizer.1.running_mean"} & keys == {"optimizer.0.weight.momentum_buffer"}
    assert "optimizer.step" in keys
    np.testing.assert_array_equal(running_mean, B.to_numpy(model[1].buffers["running_mean"]))
    assert tracked.dtype == np.int64 and tracked.shape == () and int(tracked) == 1
    assert step.shape == () and int(step) == 1
    assert all(isinstance(v, str) for v in meta.values())
    assert json.loads(meta["format"]) == checkpoint.FORMAT
    assert json.loads(meta["portable_cnn_version"]) == __version__
    assert json.loads(meta["epoch"]) == 4 and json.loads(meta["step"]) == 17
    assert json.loads(meta["optimizer"])["name"] == "sgd"
    # The generator state survives JSON exactly: the restored stream continues identically.
    gen = generator_from_state(json.loads(meta["rng"])["shuffle"])
    np.testing.assert_array_equal(gen.random(4), np.random.default_rng(5).random(4))


def test_round_trip_restores_model_optimizer_and_fields(tmp_path):
    model = bn_model()
    opt = optim.Adam(model, lr=1e-2)
    x = np.random.default_rng(1).standard_normal((5, 1, 8, 8)).astype(np.float32)
    loss_fn = nn.SoftmaxCrossEntropy()
    for _ in range(2):
        loss_fn.forward(model.forward(x), np.array([0, 1, 2, 3, 0]))
        model.backward(loss_fn.backward())
        opt.step()
    data = {"name": "digits", "mean": np.array([0.25], np.float32), "std": np.array([0.5], np.float32)}
    ckpt = Checkpoint.capture(model, model_config={"name": "custom"}, optimizer=opt, data=data, epoch=2, step=2,
                              batch_in_epoch=1, train={"batch_size": 5})
    loaded = load_checkpoint(save_checkpoint(tmp_path / "c.safetensors", ckpt))
    assert (loaded.epoch, loaded.step, loaded.batch_in_epoch) == (2, 2, 1)
    assert loaded.data["mean"] == [0.25] and loaded.train == {"batch_size": 5}
    assert loaded.optimizer == opt.config() and loaded.version == __version__

    fresh = bn_model(rng=9)
    fresh_opt = optim.Adam(fresh, lr=1e-2)
    loaded.load_into(fresh, fresh_opt)
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(B.to_numpy(fresh.state_dict()[name]), B.to_numpy(value), err_msg=name)
    assert fresh_opt.steps == 2
    for name, value in opt.state_dict().items():
        np.testing.assert_array_equal(B.to_numpy(fresh_opt.state_dict()[name]), B.to_numpy(value), err_msg=name)


def test_capture_copies_so_later_training_does_not_change_the_snapshot():
    model = digits_model()
    opt = optim.SGD(model, lr=0.1, momentum=0.9)
    ckpt = Checkpoint.capture(model, model_config=DIGITS, optimizer=opt)
    before = ckpt.model_state["0.weight"].copy()
    model[0].params["weight"][...] = 7.0  # an in-place update, as a NumPy fast path may do
    np.testing.assert_array_equal(ckpt.model_state["0.weight"], before)


# --------------------------------------------------------------------------- torch


def test_checkpoint_loads_into_the_equivalent_torch_sequential(tmp_path, torch):
    import safetensors.torch

    from portable_cnn.bench import torch_mirror

    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, rng=0), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(4 * 4 * 4, 10, rng=0),
    )
    opt = optim.SGD(model, lr=0.1, momentum=0.9)
    sgd_steps(model, opt, 3)  # non-trivial weights and running statistics
    path = save_checkpoint(tmp_path / "t.safetensors", Checkpoint.capture(model, model_config={"name": "custom"}, optimizer=opt))

    reference = torch_mirror.torch_model(torch, model)  # torch's own initial weights: the file's must replace them
    tensors = safetensors.torch.load_file(str(path))
    state = {k: v for k, v in tensors.items() if not k.startswith("optimizer.")}
    reference.load_state_dict(state, strict=True)
    reference.eval()
    model.eval()
    x, _ = batch(n=5, seed=11)
    with torch.no_grad():
        expected = reference(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(model.forward(x), expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- backends

CPU_PAIRS = [("numpy", "torch"), ("torch", "numpy"), ("numpy", "array_api_strict"), ("array_api_strict", "numpy")]
GPU_PAIRS = [("cupy", "numpy"), ("numpy", "cupy")]


def _available(name):
    if name == "cupy":
        ok, why = B.cupy_status()
        if not ok:
            pytest.skip(f"CuPy backend unavailable: {why}")
    elif name == "torch":
        pytest.importorskip("torch", reason="PyTorch not installed")
    elif name == "array_api_strict":
        pytest.importorskip("array_api_strict")


@pytest.mark.parametrize(
    "src,dst", CPU_PAIRS + [pytest.param(*p, marks=pytest.mark.gpu) for p in GPU_PAIRS],
    ids=[f"{a}-to-{b}" for a, b in CPU_PAIRS + GPU_PAIRS],
)
def test_checkpoint_moves_between_backends_and_training_continues_alike(tmp_path, src, dst):
    """Written from one backend, loaded on another: same weights, and the next step agrees too."""
    _available(src)
    _available(dst)
    model = digits_model().to(src)
    opt = optim.SGD(model, lr=0.05, momentum=0.9, weight_decay=1e-3)
    sgd_steps(model, opt, 2)
    path = save_checkpoint(tmp_path / "x.safetensors", Checkpoint.capture(model, model_config=DIGITS, optimizer=opt))

    loaded = load_checkpoint(path)
    moved = loaded.build_model(dst)
    assert B.backend_name(moved[0].params["weight"]) == dst
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(B.to_numpy(moved.state_dict()[name]), B.to_numpy(value), err_msg=name)
    moved_opt = optim.SGD(moved, lr=0.05, momentum=0.9, weight_decay=1e-3)
    loaded.load_into(moved, moved_opt)
    assert B.backend_name(moved_opt.state_dict()["0.weight.momentum_buffer"]) == dst

    # One more step on each side from the same batch: momentum came across too.
    sgd_steps(model, opt, 1)
    sgd_steps(moved, moved_opt, 1)
    for name, value in model.state_dict().items():
        np.testing.assert_allclose(B.to_numpy(moved.state_dict()[name]), B.to_numpy(value), rtol=1e-5, atol=1e-6, err_msg=name)


def test_build_model_keeps_float64_and_can_cast(tmp_path):
    model = digits_model().to("numpy", "float64")
    path = save_checkpoint(tmp_path / "d.safetensors", Checkpoint.capture(model, model_config=DIGITS, train={"dtype": "float64"}))
    loaded = load_checkpoint(path)
    assert loaded.model_state["0.weight"].dtype == np.float64
    assert loaded.build_model("numpy")[0].params["weight"].dtype == np.float64
    assert loaded.build_model("numpy", "float32")[0].params["weight"].dtype == np.float32


# --------------------------------------------------------------------------- atomic writes


def test_crash_mid_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "run.safetensors"
    model = digits_model()
    save_checkpoint(path, Checkpoint.capture(model, model_config=DIGITS, epoch=1))
    original = path.read_bytes()

    model[0].params["weight"] = model[0].params["weight"] + 1.0
    written = []

    def crash_midway(f, payload, chunk=1 << 20):
        f.write(payload[: len(payload) // 2])
        written.append(len(payload) // 2)
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(checkpoint, "_write_all", crash_midway)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(path, Checkpoint.capture(model, model_config=DIGITS, epoch=2))
    assert written, "the patched writer was not used"
    assert path.read_bytes() == original
    assert load_checkpoint(path).epoch == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.safetensors"], "temporary file left behind"

    # Ctrl-C during the write is cleaned up the same way.
    def interrupt(f, payload, chunk=1 << 20):
        f.write(payload[:10])
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "_write_all", interrupt)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, Checkpoint.capture(model, model_config=DIGITS, epoch=3))
    assert load_checkpoint(path).epoch == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.safetensors"]


def test_save_replaces_an_existing_checkpoint(tmp_path):
    path = tmp_path / "run.safetensors"
    model = digits_model()
    save_checkpoint(path, Checkpoint.capture(model, model_config=DIGITS, epoch=1))
    save_checkpoint(path, Checkpoint.capture(model, model_config=DIGITS, epoch=2))
    assert load_checkpoint(path).epoch == 2
    # The umask decides the mode, as for any file the user creates (not mkstemp's 0600).
    reference = tmp_path / "reference"
    reference.write_bytes(b"")
    assert path.stat().st_mode & 0o777 == reference.stat().st_mode & 0o777


def test_save_into_a_missing_directory_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        save_checkpoint(tmp_path / "nope" / "c.safetensors", Checkpoint.capture(digits_model(), model_config=DIGITS))


# --------------------------------------------------------------------------- errors


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.safetensors does not exist"):
        load_checkpoint(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("content", [b"", b"not a safetensors file at all", b"\xff" * 64], ids=["empty", "text", "bytes"])
def test_garbage_file(tmp_path, content):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="bad.safetensors: not a readable safetensors checkpoint"):
        load_checkpoint(path)


def test_truncated_file(tmp_path):
    path = save_checkpoint(tmp_path / "t.safetensors", Checkpoint.capture(digits_model(), model_config=DIGITS))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="not a readable safetensors checkpoint"):
        load_checkpoint(path)


def test_plain_safetensors_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "plain.safetensors"
    safetensors.numpy.save_file({"0.weight": np.zeros((2, 2), np.float32)}, str(path))
    with pytest.raises(CheckpointError, match="not a portable_cnn checkpoint"):
        load_checkpoint(path)


def _rewrite(path, drop_tensor=None, drop_meta=None, change=None):
    with safetensors.safe_open(str(path), framework="np") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != drop_tensor}
    meta.pop(drop_meta, None)
    tensors.update(change or {})
    safetensors.numpy.save_file(tensors, str(path), metadata=meta)


def test_missing_metadata_entry(tmp_path):
    path = save_checkpoint(tmp_path / "m.safetensors", Checkpoint.capture(digits_model(), model_config=DIGITS))
    _rewrite(path, drop_meta="epoch")
    with pytest.raises(CheckpointError, match="lacks 'epoch'"):
        load_checkpoint(path)


def test_missing_tensor_is_named(tmp_path):
    path = save_checkpoint(tmp_path / "k.safetensors", Checkpoint.capture(digits_model(), model_config=DIGITS))
    _rewrite(path, drop_tensor="6.weight")
    loaded = load_checkpoint(path)
    with pytest.raises(CheckpointError, match=r"k.safetensors: tensors do not fit model 'digits'.*6\.weight"):
        loaded.build_model("numpy")


def test_wrong_shape_is_named(tmp_path):
    path = save_checkpoint(tmp_path / "s.safetensors", Checkpoint.capture(digits_model(), model_config=DIGITS))
    _rewrite(path, change={"8.bias": np.zeros(3, np.float32)})
    with pytest.raises(CheckpointError, match=r"8\.bias.*\(10,\).*\(3,\)"):
        load_checkpoint(path).build_model("numpy")


def test_optimizer_of_another_kind_is_refused(tmp_path):
    model = digits_model()
    opt = optim.SGD(model, lr=0.1, momentum=0.9)
    sgd_steps(model, opt, 1)
    loaded = load_checkpoint(save_checkpoint(tmp_path / "o.safetensors", Checkpoint.capture(model, model_config=DIGITS, optimizer=opt)))
    with pytest.raises(CheckpointError, match="optimizer state is for 'sgd', not 'adam'"):
        loaded.load_into(digits_model(), optim.Adam(digits_model()))


def test_unknown_model_name(tmp_path):
    path = save_checkpoint(tmp_path / "u.safetensors", Checkpoint.capture(digits_model(), model_config=dict(DIGITS, name="resnet")))
    with pytest.raises(CheckpointError, match="cannot rebuild model.*resnet"):
        load_checkpoint(path).build_model()
