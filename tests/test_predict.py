"""``portable-cnn predict`` (:mod:`portable_cnn.predict`): a checkpoint classifies npz data and PNG files.

The predictions are the model's own (softmax of ``model.forward`` on the
inputs normalised with the checkpoint's statistics), the same on every
backend and for any batch size; the accuracy on a dataset is what ``eval``
reports; CSV and JSON files hold one row per input; bad requests are one
error line.
"""

from __future__ import annotations

import csv
import json
import re
import sys

import numpy as np
import pytest

from portable_cnn import cli, models
from portable_cnn.checkpoint import Checkpoint, save_checkpoint
from portable_cnn.data import apply_normalization
from portable_cnn.predict import load_images, predict

MEAN, STD = [0.3], [0.35]


@pytest.fixture
def checkpoint(tmp_path):
    """A digits net (1x8x8, 10 classes) with the normalisation of its data: ``(path, model)``."""
    model = models.build_model("digits", in_channels=1, num_classes=10, input_size=8, seed=5)
    ckpt = Checkpoint.capture(
        model, model_config={"name": "digits", "in_channels": 1, "num_classes": 10, "input_size": [8, 8], "seed": 5},
        data={"name": "digits", "mean": MEAN, "std": STD}, epoch=1,
    )
    return save_checkpoint(tmp_path / "digits.safetensors", ckpt), model


def _expected(model, pixels):
    """Class and probability of each image of ``pixels`` (uint8, (N, 8, 8)), computed here step by step."""
    x = apply_normalization(pixels[:, None].astype(np.float32) / np.float32(255), MEAN, STD)
    logits = np.asarray(model.eval().forward(x), dtype=np.float64)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    classes = probs.argmax(axis=1)
    return classes, probs[np.arange(len(classes)), classes]


def _run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_predict_on_npz_data_writes_csv_and_matches_eval(checkpoint, tmp_path, capsys):
    path, model = checkpoint
    rng = np.random.default_rng(0)
    x_test, y_test = rng.integers(0, 256, (13, 8, 8), dtype=np.uint8), rng.integers(0, 10, 13)
    data = tmp_path / "new.npz"
    np.savez(data, x=rng.integers(0, 256, (20, 8, 8), dtype=np.uint8), y=rng.integers(0, 10, 20), x_test=x_test,
             y_test=y_test)
    out_csv = tmp_path / "predictions.csv"
    code, out, err = _run(capsys, "predict", "--checkpoint", str(path), "--data", str(data), "--output", str(out_csv),
                          "--batch-size", "4", "--quiet")
    assert code == 0, err
    with open(out_csv, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    classes, confidence = _expected(model, x_test)
    assert [row["input"] for row in rows] == [f"new:test[{i}]" for i in range(13)]
    assert [int(row["predicted"]) for row in rows] == classes.tolist()
    np.testing.assert_allclose([float(row["probability"]) for row in rows], confidence, rtol=1e-5)
    assert [int(row["label"]) for row in rows] == y_test.tolist()
    correct = int(np.sum(classes == y_test))
    assert out == f"wrote 13 predictions to {out_csv}\naccuracy: {correct / 13:.2%} ({correct}/13)\n"
    code, eval_out, _ = _run(capsys, "eval", "--checkpoint", str(path), "--data", str(data), "--quiet")
    assert code == 0 and f"({correct}/13)" in eval_out

    code, out, _ = _run(capsys, "predict", "--checkpoint", str(path), "--data", str(data), "--split", "train", "--quiet")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 21 and lines[-1].startswith("accuracy: ")
    assert re.fullmatch(r"new:train\[0\]: \d \(\d+\.\d%\), label \d", lines[0])


def test_predict_on_png_files_prints_and_writes_json(checkpoint, tmp_path, capsys):
    Image = pytest.importorskip("PIL.Image", reason="Pillow not installed: pip install 'portable-cnn[images]'")
    path, model = checkpoint
    pixels = np.random.default_rng(1).integers(0, 256, (3, 8, 8), dtype=np.uint8)
    files = []
    for i, image in enumerate(pixels):
        files.append(str(tmp_path / f"digit{i}.png"))
        Image.fromarray(image, mode="L").save(files[-1])
    classes, confidence = _expected(model, pixels)
    code, out, err = _run(capsys, "predict", "--checkpoint", str(path), *files)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("backend: numpy on device cpu") and lines[1].startswith("checkpoint: ")
    assert lines[2:] == [f"{name}: {c} ({p:.1%})" for name, c, p in zip(files, classes, confidence)]

    out_json = tmp_path / "p.json"
    code, out, _ = _run(capsys, "predict", "--checkpoint", str(path), *files, "--output", str(out_json), "--quiet")
    rows = json.loads(out_json.read_text())
    assert code == 0 and out == f"wrote 3 predictions to {out_json}\n"
    assert [row["input"] for row in rows] == files and [row["predicted"] for row in rows] == classes.tolist()
    np.testing.assert_allclose([row["probability"] for row in rows], confidence, rtol=1e-5)
    assert all(set(row) == {"input", "predicted", "probability"} for row in rows), "no labels for image files"


def test_images_are_converted_to_the_models_channels_and_size(tmp_path):
    Image = pytest.importorskip("PIL.Image", reason="Pillow not installed")
    rgb = tmp_path / "gray.png"
    Image.new("RGB", (20, 14), (128, 128, 128)).save(rgb)
    palette = tmp_path / "palette.png"
    Image.new("RGBA", (8, 8), (10, 20, 30, 0)).convert("P").save(palette)
    x = load_images([rgb, palette], 1, 8)
    assert x.shape == (2, 1, 8, 8) and x.dtype == np.float32
    np.testing.assert_allclose(x[0], 128 / 255, rtol=1e-6)  # a flat image stays flat when resized
    color = load_images([rgb], 3, (6, 10))
    assert color.shape == (1, 3, 6, 10) and np.allclose(color, 128 / 255)


def test_predictions_are_the_same_on_every_backend_and_batch_size(backend, checkpoint):
    _, model = checkpoint
    x = np.random.default_rng(2).standard_normal((10, 1, 8, 8)).astype(np.float32)
    want = predict(model, x)
    model.to(backend.xp, "float64")
    calls = []
    forward = model.forward
    model.forward = lambda batch: calls.append(batch.shape[0]) or forward(batch)
    got = predict(model, x, batch_size=4)
    assert calls == [4, 4, 2], "batch by batch"
    assert model.training, "the mode is restored"
    np.testing.assert_array_equal(got.classes, want.classes)
    np.testing.assert_allclose(got.probabilities, want.probabilities, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "nothing to classify: give image files, or --data/--dataset"),
        (["a.png", "--dataset", "digits"], "give image files or --data/--dataset, not both"),
        (["--dataset", "digits", "--output", "p.txt"], "--output p.txt: expected a file ending in .csv or .json"),
        (["--dataset", "cifar10", "--data", "missing-dir"], "cannot load dataset 'cifar10'"),
    ],
)
def test_bad_requests_are_one_error_line(checkpoint, capsys, extra, message):
    path, _ = checkpoint
    code, out, err = _run(capsys, "predict", "--checkpoint", str(path), *extra)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith(f"portable-cnn predict: error: {message}"), err


def test_unreadable_images_and_missing_pillow_are_one_error_line(checkpoint, tmp_path, capsys, monkeypatch):
    path, _ = checkpoint
    not_image = tmp_path / "notes.png"
    not_image.write_text("not a picture")
    code, _, err = _run(capsys, "predict", "--checkpoint", str(path), str(not_image))
    assert code == 2 and err.startswith(f"portable-cnn predict: error: {not_image}: cannot read as an image")
    monkeypatch.setitem(sys.modules, "PIL.Image", None)  # as if Pillow were not installed
    code, _, err = _run(capsys, "predict", "--checkpoint", str(path), str(not_image))
    assert code == 2 and err == ("portable-cnn predict: error: reading image files needs Pillow, which is not "
                                 "installed: pip install 'portable-cnn[images]'\n")


def test_a_dataset_that_does_not_fit_the_model_is_refused(checkpoint, tmp_path, capsys):
    path, _ = checkpoint
    data = tmp_path / "big.npz"
    np.savez(data, x=np.zeros((10, 12, 12), dtype=np.uint8), y=np.arange(10) % 2)
    code, _, err = _run(capsys, "predict", "--checkpoint", str(path), "--data", str(data))
    assert code == 2 and "dataset 'big' has 1x12x12 images but the checkpoint's model takes 1x8x8" in err
