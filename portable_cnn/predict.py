"""``portable-cnn predict``: classify image files or a dataset with a trained checkpoint, batch by batch, on any backend.

Image files (PNG, JPEG, ... anything Pillow reads; the ``[images]`` extra)
are converted to the model's channels (grayscale ``L`` for 1, ``RGB`` for
3), resized to its input size (bilinear), scaled to ``[0, 1]`` as the
dataset loaders scale 8-bit pixels, and normalised with the checkpoint's
mean and std, exactly as the training images were. A dataset (``--data`` /
``--dataset``, any format ``train`` reads) is loaded as ``eval`` loads it:
the checkpoint's split and normalisation; ``--split`` picks its test
(default) or training part.

From Python::

    from portable_cnn.checkpoint import load_checkpoint
    from portable_cnn.data import apply_normalization
    from portable_cnn.predict import load_images, predict

    ckpt = load_checkpoint("digits.safetensors")
    model = ckpt.build_model("numpy")
    x = load_images(["seven.png"], ckpt.model["in_channels"], ckpt.model["input_size"])
    result = predict(model, apply_normalization(x, ckpt.data["mean"], ckpt.data["std"]))
    result.classes[0], result.confidence[0]
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import backend, ops

__all__ = ["IMAGE_MODES", "Predictions", "load_images", "predict", "add_predict_parser", "run_predict"]

#: Pillow's mode for a model's input channels.
IMAGE_MODES = {1: "L", 3: "RGB"}

#: The file formats ``--output`` writes, by suffix.
OUTPUT_FORMATS = (".csv", ".json")

_INSTALL = "pip install 'portable-cnn[images]'"


def load_images(paths, channels: int, size) -> np.ndarray:
    """Read image files as one batch shaped for a model: ``(N, channels, H, W)`` float32 in ``[0, 1]``.

    Parameters
    ----------
    paths : sequence of str or os.PathLike
        Any format Pillow reads.
    channels : int
        1 (each image converted to grayscale) or 3 (to RGB); an alpha
        channel is dropped.
    size : int or (H, W)
        The model's input size; other sizes are resized (bilinear).

    Returns
    -------
    numpy.ndarray
        8-bit pixels divided by 255, as the dataset loaders scale them; not
        normalised yet (:func:`portable_cnn.data.apply_normalization`).

    Raises
    ------
    ImportError
        Pillow is not installed.
    ValueError
        A file cannot be read as an image, or ``channels`` is not 1 or 3.
    """
    try:
        Image = importlib.import_module("PIL.Image")
    except ImportError:
        raise ImportError(f"reading image files needs Pillow, which is not installed: {_INSTALL}") from None
    if channels not in IMAGE_MODES:
        raise ValueError(f"load_images: the model takes {channels} input channels; image files give 1 (grayscale) "
                         f"or 3 (RGB)")
    H, W = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    out = np.empty((len(paths), channels, H, W), dtype=np.float32)
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as image:
                if image.mode == "P" or "transparency" in image.info:
                    image = image.convert("RGBA")  # Pillow's path for palettes with transparency, without a warning
                image = image.convert(IMAGE_MODES[channels])  # palette, alpha, 16-bit: all 8-bit L or RGB now
                if image.size != (W, H):
                    image = image.resize((W, H), Image.Resampling.BILINEAR)
                pixels = np.asarray(image, dtype=np.uint8).reshape(H, W, channels)  # (H, W, C)
        except (OSError, ValueError) as exc:  # PIL.UnidentifiedImageError is an OSError
            raise ValueError(f"{path}: cannot read as an image ({exc})") from None
        out[i] = pixels.transpose(2, 0, 1)  # (C, H, W)
    out /= np.float32(255.0)
    return out


@dataclass(eq=False)
class Predictions:
    """What :func:`predict` found, on the host.

    Attributes
    ----------
    probabilities : numpy.ndarray, shape (N, num_classes)
        The softmax of the logits.
    classes : numpy.ndarray, shape (N,)
        The most probable class of each input (int64).
    """

    probabilities: np.ndarray
    classes: np.ndarray

    @property
    def confidence(self) -> np.ndarray:
        """``(N,)``: the probability of each predicted class."""
        return self.probabilities[np.arange(len(self.classes)), self.classes]


def predict(model, x: np.ndarray, *, batch_size: int = 256) -> Predictions:
    """Class probabilities of ``model`` for host inputs, in evaluation mode, batch by batch on the model's backend.

    Each batch goes to the model's device once and its probabilities come
    back once. The model's mode is restored.

    Parameters
    ----------
    model : portable_cnn.nn.Module
        Maps ``(N, *input)`` to logits ``(N, num_classes)``; any backend and dtype.
    x : numpy.ndarray, shape (N, *input)
        Already normalised as for training.
    batch_size : int, default 256

    Returns
    -------
    Predictions

    >>> import numpy as np
    >>> from portable_cnn import nn
    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3, rng=0))
    >>> result = predict(model, np.ones((5, 1, 2, 2), dtype=np.float32), batch_size=2)
    >>> result.probabilities.shape, result.classes.shape, bool(np.allclose(result.probabilities.sum(axis=1), 1))
    ((5, 3), (5,), True)
    """
    if len(x) == 0:
        raise ValueError("predict: no inputs")
    if batch_size < 1:
        raise ValueError(f"predict: batch_size must be positive, got {batch_size}")
    param = next(iter(model.state_dict().values()))
    xp, device, dtype = backend.namespace(param), backend.device(param), backend.dtype_name(param)
    chunks = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(x), batch_size):
            batch = backend.asarray(x[start:start + batch_size], xp, dtype=dtype, device=device)
            chunks.append(backend.to_numpy(ops.softmax(model.forward(batch), axis=1)))
    finally:
        model.train(was_training)
    probabilities = np.concatenate(chunks).astype(np.float64)  # (N, num_classes)
    return Predictions(probabilities, np.argmax(probabilities, axis=1))


# ------------------------------------------------------------------------- command line


def add_predict_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``predict`` subcommand (:data:`portable_cnn.cli.EXTENSIONS` imports this module only to run it)."""
    from .cli import _add_backend_options, _positive_int
    from .data import DATASETS

    p = subparsers.add_parser(
        "predict", help="classify images or a dataset with a checkpoint",
        description="Print the predicted class and its probability for each input, or write them to a CSV or JSON "
                    "file. Inputs are image files (resized to the model's input, converted to its channels, "
                    "normalised like the training data; needs Pillow: " + _INSTALL + ") or a dataset's test "
                    "(or training) split, loaded as eval loads it.",
    )
    p.add_argument("--checkpoint", metavar="PATH", required=True, help="a file written by portable-cnn train")
    p.add_argument("images", nargs="*", metavar="IMAGE", help="image files to classify (PNG, JPEG, ...)")
    p.add_argument("--dataset", choices=DATASETS, default=None,
                   help="classify a dataset instead of image files (default with --data: npz when it ends in .npz)")
    p.add_argument("--data", metavar="PATH", default=None, help="where the mnist, cifar10 or npz data is")
    p.add_argument("--split", choices=("test", "train"), default="test",
                   help="which part of the dataset, with the checkpoint's split (default: test, what eval scores)")
    p.add_argument("--output", metavar="PATH", default=None,
                   help="write the predictions to this .csv or .json file instead of printing them")
    _add_backend_options(p)
    p.add_argument("--batch-size", type=_positive_int, default=256, help="default: 256")
    p.add_argument("--quiet", action="store_true", help="no backend and checkpoint lines")
    p.set_defaults(func=run_predict)
    return p


def _output_format(path) -> str | None:
    if path is None:
        return None
    suffix = Path(path).suffix.lower()
    if suffix not in OUTPUT_FORMATS:
        from .run import RunError

        raise RunError(f"--output {path}: expected a file ending in {' or '.join(OUTPUT_FORMATS)}")
    return suffix


def _dataset_inputs(args, ckpt):
    """``(x, labels, names)`` of the asked split of a dataset, loaded as ``eval`` loads it."""
    from .run import RunError, load_data

    dataset = load_data(args.dataset, args.data, ckpt)
    want = (ckpt.model.get("in_channels"), *ckpt.model.get("input_size", (None, None)))
    if dataset.input_shape != tuple(want):
        raise RunError(f"dataset {dataset.name!r} has {'x'.join(map(str, dataset.input_shape))} images but the "
                       f"checkpoint's model takes {'x'.join(map(str, want))}")
    x, labels = (dataset.x_test, dataset.y_test) if args.split == "test" else (dataset.x_train, dataset.y_train)
    return x, labels, [f"{dataset.name}:{args.split}[{i}]" for i in range(len(x))]


def _image_inputs(args, ckpt):
    """``(x, None, names)`` of the image files, shaped and normalised for the checkpoint's model."""
    from .data import apply_normalization
    from .run import RunError

    try:
        x = load_images(args.images, ckpt.model["in_channels"], ckpt.model["input_size"])
    except (ImportError, ValueError) as exc:
        raise RunError(str(exc)) from None
    if ckpt.data.get("mean") is not None:
        x = apply_normalization(x, ckpt.data["mean"], ckpt.data["std"])
    return x, None, [str(path) for path in args.images]


def _write(path: str, fmt: str, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:
        if fmt == ".json":
            json.dump(rows, f, indent=1)
            f.write("\n")
        else:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


def run_predict(args) -> int:
    """``portable-cnn predict``."""
    from .checkpoint import CheckpointError
    from .cli import _apply_settings, _check_outputs, _say, _tf32_line
    from .run import RunError, cpu_threads, read_checkpoint, select_backend

    _apply_settings(args)
    from_dataset = args.dataset is not None or args.data is not None
    if from_dataset == bool(args.images):
        raise RunError("give image files or --data/--dataset, not both" if from_dataset
                       else "nothing to classify: give image files, or --data/--dataset")
    _check_outputs({"--output": args.output}, inputs={"--checkpoint": args.checkpoint, "--data": args.data,
                                                     **{f"image {p}": p for p in args.images}})
    fmt = _output_format(args.output)
    ckpt = read_checkpoint(args.checkpoint)
    backend_name, why = select_backend(args.backend)
    _tf32_line(args, backend_name)
    x, labels, names = (_dataset_inputs if from_dataset else _image_inputs)(args, ckpt)
    if len(x) == 0:
        raise RunError(f"the {args.split} split holds no images")
    try:
        model = ckpt.build_model(backend_name, args.dtype)
    except CheckpointError as exc:
        raise RunError(str(exc)) from None
    _say(args, f"backend: {backend_name} on device {backend.device(next(iter(model.state_dict().values())))} ({why})")
    _say(args, f"checkpoint: {ckpt.path}: model {ckpt.model.get('name')}, epoch {ckpt.epoch}")
    if not from_dataset and ckpt.data.get("mean") is None:
        _say(args, "the checkpoint holds no normalisation: images are used as pixels / 255")
    with cpu_threads(args.threads, ckpt.model.get("name"), backend_name):
        result = predict(model, x, batch_size=args.batch_size)
    rows = [{"input": name, "predicted": int(c), "probability": float(p)}
            for name, c, p in zip(names, result.classes, result.confidence)]
    if labels is not None:
        for row, label in zip(rows, labels):
            row["label"] = int(label)
    if fmt is None:
        for row in rows:
            label = f", label {row['label']}" if "label" in row else ""
            print(f"{row['input']}: {row['predicted']} ({row['probability']:.1%}){label}")
    else:
        try:
            _write(args.output, fmt, rows)
        except OSError as exc:
            raise RunError(f"--output {args.output}: {exc}") from None
        print(f"wrote {len(rows)} predictions to {args.output}")
    if labels is not None:
        correct = int(np.sum(result.classes == labels))
        print(f"accuracy: {correct / len(rows):.2%} ({correct}/{len(rows)})")
    return 0
