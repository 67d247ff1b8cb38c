"""Checkpoints: one ``safetensors`` file per training run, written atomically.

A checkpoint holds everything needed to evaluate a model or to continue its
training exactly where it stopped, and nothing that needs ``pickle`` to read:

Tensors (NumPy arrays on the host, whatever backend trained the model)
    * the model's ``state_dict`` under its own keys (``"0.weight"``,
      ``"1.running_mean"``, ...), the names ``torch.nn.Sequential`` uses, so
      ``torch_model.load_state_dict(...)`` takes them unchanged;
    * the optimizer's ``state_dict`` under ``"optimizer.<key>"``
      (``"optimizer.0.weight.momentum_buffer"``, ``"optimizer.step"``).

Metadata (string to string; every value is JSON)
    ``format`` (``"portable_cnn.checkpoint"``), ``format_version``,
    ``portable_cnn_version``, ``model`` (name and constructor arguments),
    ``data`` (dataset name, path, split and the normalisation mean/std),
    ``optimizer`` (its ``config()``), ``scheduler`` (its config and
    ``last_epoch``), ``train`` (batch size, seed, dtype, target epochs, ...),
    ``epoch`` (completed epochs), ``step`` (optimizer steps so far),
    ``batch_in_epoch`` (batches done in an interrupted epoch), ``epoch_sums``
    (the training loss and accuracy sums of those batches, so that the
    resumed epoch reports the metrics of the whole epoch; empty at an epoch
    boundary; older checkpoints lack it and still load),
    ``rng`` (NumPy bit-generator states: data shuffling, dropout) and
    ``metrics`` (the last evaluation).

The file is written to a temporary file in the target's directory, flushed
and ``fsync``-ed, then renamed over the target with :func:`os.replace`, so a
crash or Ctrl-C in the middle of a write leaves the previous checkpoint whole.

>>> import tempfile, os
>>> from portable_cnn import models
>>> model = models.build_model("digits", in_channels=1, num_classes=10, input_size=8)
>>> ckpt = Checkpoint.capture(model, model_config={"name": "digits", "in_channels": 1, "num_classes": 10, "input_size": [8, 8]})
>>> with tempfile.TemporaryDirectory() as tmp:
...     path = save_checkpoint(os.path.join(tmp, "digits.safetensors"), ckpt)
...     restored = load_checkpoint(path).build_model("numpy")
>>> bool((restored[0].params["weight"] == model[0].params["weight"]).all())
True
"""

from __future__ import annotations

import json
import os
import uuid
from glob import escape as glob_escape
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__, backend

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "OPTIMIZER_PREFIX",
    "Checkpoint",
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "generator_state",
    "generator_from_state",
]

FORMAT = "portable_cnn.checkpoint"
FORMAT_VERSION = 1
OPTIMIZER_PREFIX = "optimizer."

# Metadata entries every checkpoint has; load_checkpoint refuses a file without them.
_REQUIRED_META = ("format", "format_version", "model", "epoch", "step")


class CheckpointError(ValueError):
    """A checkpoint file cannot be read or does not fit the model asked of it."""


def generator_state(gen: np.random.Generator) -> dict:
    """The state of a NumPy generator as a JSON-serialisable dict (its bit generator's ``state``)."""
    return gen.bit_generator.state


def generator_from_state(state: dict) -> np.random.Generator:
    """A new NumPy generator continuing from ``state`` (see :func:`generator_state`)."""
    gen = np.random.Generator(getattr(np.random, state["bit_generator"])())
    gen.bit_generator.state = state
    return gen


@dataclass(eq=False)
class Checkpoint:
    """The contents of a checkpoint file, arrays on the host.

    Parameters
    ----------
    model_state : dict of str to numpy.ndarray
        The model's ``state_dict`` (parameters and buffers).
    model : dict
        ``{"name": ..., "in_channels": ..., "num_classes": ..., "input_size": [H, W], "seed": ...}``:
        enough for :func:`portable_cnn.models.build_model` to rebuild it.
    optimizer_state : dict of str to numpy.ndarray
        The optimizer's ``state_dict``, keys without the ``"optimizer."`` prefix.
    optimizer, scheduler, data, train, rng, metrics : dict or None
        Configuration and state described in the module docstring.
    epoch, step, batch_in_epoch : int
        Completed epochs, optimizer steps so far, batches done in the epoch
        that was interrupted (0 at an epoch boundary).
    epoch_sums : dict
        For an interrupted epoch, ``{"loss": sum of loss * batch size,
        "correct": correct predictions, "seen": samples}`` over its
        ``batch_in_epoch`` batches; empty otherwise, and in older checkpoints
        (a run resumed from one reports that epoch's training metrics over
        the batches after the resumption only).
    version : str
        The portable_cnn version that wrote it.
    path : pathlib.Path or None
        Where it was loaded from (for messages).
    """

    model_state: dict
    model: dict
    optimizer_state: dict = field(default_factory=dict)
    optimizer: dict | None = None
    scheduler: dict | None = None
    data: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    rng: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    epoch: int = 0
    step: int = 0
    batch_in_epoch: int = 0
    epoch_sums: dict = field(default_factory=dict)
    version: str = __version__
    path: Path | None = None

    @classmethod
    def capture(cls, model, *, model_config: dict, optimizer=None, **fields) -> Checkpoint:
        """Snapshot a live model (and optimizer) to host arrays.

        Each array is copied to NumPy once (:func:`portable_cnn.backend.to_numpy`);
        ``fields`` fill the other attributes.
        """
        model_state = {k: _host(v) for k, v in model.state_dict().items()}
        optimizer_state = {} if optimizer is None else {k: _host(v) for k, v in optimizer.state_dict().items()}
        opt_config = fields.pop("optimizer", None)
        if opt_config is None and optimizer is not None:
            opt_config = optimizer.config()
        return cls(model_state=model_state, model=dict(model_config), optimizer_state=optimizer_state,
                   optimizer=opt_config, **fields)

    @property
    def dtype(self) -> str:
        """The floating dtype the model was trained in (``"float32"``)."""
        if "dtype" in self.train:
            return self.train["dtype"]
        floats = [v.dtype.name for v in self.model_state.values() if v.dtype.kind == "f"]
        return floats[0] if floats else "float32"

    def _where(self) -> str:
        return str(self.path) if self.path is not None else "checkpoint"

    def build_model(self, backend_name="numpy", dtype=None):
        """Rebuild the model on a backend with this checkpoint's weights.

        Parameters
        ----------
        backend_name : str or module
            ``"numpy"``, ``"cupy"``, ``"torch"``, ``"array_api_strict"`` or a namespace.
        dtype : str, optional
            Floating dtype; defaults to the one it was saved in.

        Raises
        ------
        CheckpointError
            If the model name is unknown or the tensors do not fit the model
            (missing or unexpected keys, wrong shapes).
        """
        from . import models

        cfg = self.model
        try:
            model = models.build_model(
                cfg["name"], in_channels=cfg["in_channels"], num_classes=cfg["num_classes"],
                input_size=tuple(cfg["input_size"]), seed=cfg.get("seed", 0),
            )
        except KeyError as exc:
            raise CheckpointError(f"{self._where()}: model config {cfg} lacks {exc}") from None
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{self._where()}: cannot rebuild model from {cfg}: {exc}") from None
        model.to(backend_name, dtype or self.dtype)
        self.load_into(model)
        return model

    def load_into(self, model, optimizer=None) -> None:
        """Copy the weights (and optimizer state) into live objects on any backend.

        Raises :class:`CheckpointError` naming the file when keys or shapes do not match.
        """
        try:
            model.load_state_dict(self.model_state)
        except (KeyError, ValueError) as exc:
            msg = exc.args[0] if exc.args else str(exc)
            raise CheckpointError(
                f"{self._where()}: tensors do not fit model {self.model.get('name')!r}: {msg}"
            ) from None
        if optimizer is not None:
            if self.optimizer is not None and self.optimizer.get("name") != optimizer.config().get("name"):
                raise CheckpointError(
                    f"{self._where()}: optimizer state is for {self.optimizer.get('name')!r}, "
                    f"not {optimizer.config().get('name')!r}"
                )
            try:
                optimizer.load_state_dict(self.optimizer_state)
            except (KeyError, ValueError) as exc:
                msg = exc.args[0] if exc.args else str(exc)
                raise CheckpointError(f"{self._where()}: optimizer state does not fit the model: {msg}") from None

    def to_safetensors(self) -> tuple[dict, dict]:
        """``(tensors, metadata)`` as :func:`safetensors.numpy.save` takes them."""
        tensors = {k: _c_contiguous(v) for k, v in self.model_state.items()}
        for k, v in self.optimizer_state.items():
            tensors[OPTIMIZER_PREFIX + k] = _c_contiguous(v)
        fields = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "portable_cnn_version": self.version,
            "model": self.model,
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
            "data": self.data,
            "train": self.train,
            "rng": self.rng,
            "metrics": self.metrics,
            "epoch": int(self.epoch),
            "step": int(self.step),
            "batch_in_epoch": int(self.batch_in_epoch),
            "epoch_sums": self.epoch_sums,
        }
        metadata = {k: json.dumps(_jsonable(v)) for k, v in fields.items()}
        return tensors, metadata

    @classmethod
    def from_safetensors(cls, tensors: dict, metadata: dict | None, path=None) -> Checkpoint:
        """Inverse of :meth:`to_safetensors`; :class:`CheckpointError` for a foreign or incomplete file."""
        where = str(path) if path is not None else "checkpoint"
        metadata = metadata or {}
        missing = [k for k in _REQUIRED_META if k not in metadata]
        if "format" in missing:
            raise CheckpointError(
                f"{where}: a safetensors file but not a portable_cnn checkpoint "
                f"(its metadata has no 'format' entry; found {sorted(metadata) or 'no metadata'})"
            )
        meta = {}
        for k, v in metadata.items():
            try:
                meta[k] = json.loads(v)
            except json.JSONDecodeError as exc:
                raise CheckpointError(f"{where}: metadata entry {k!r} is not valid JSON ({exc})") from None
        if meta["format"] != FORMAT:
            raise CheckpointError(f"{where}: metadata format is {meta['format']!r}, expected {FORMAT!r}")
        if missing:
            raise CheckpointError(f"{where}: checkpoint metadata lacks {', '.join(map(repr, missing))}")
        _check_metadata(meta, where)
        if meta["format_version"] > FORMAT_VERSION:
            raise CheckpointError(
                f"{where}: checkpoint format version {meta['format_version']} is newer than this "
                f"portable_cnn ({__version__}) reads (<= {FORMAT_VERSION}); upgrade portable_cnn"
            )
        model_state = {k: v for k, v in tensors.items() if not k.startswith(OPTIMIZER_PREFIX)}
        optimizer_state = {k[len(OPTIMIZER_PREFIX):]: v for k, v in tensors.items() if k.startswith(OPTIMIZER_PREFIX)}
        if not model_state:
            raise CheckpointError(f"{where}: checkpoint holds no model tensors")
        for name, value in tensors.items():
            if np.asarray(value).dtype.kind not in "biuf":
                raise CheckpointError(f"{where}: tensor {name!r} has dtype {value.dtype}; expected real numbers")
            if np.asarray(value).dtype.kind == "f" and not np.isfinite(value).all():
                raise CheckpointError(f"{where}: tensor {name!r} holds NaN or infinite values; the run that wrote "
                                      f"it diverged, or the file is damaged")
        return cls(
            model_state=model_state, model=meta["model"], optimizer_state=optimizer_state,
            optimizer=meta.get("optimizer"), scheduler=meta.get("scheduler"), data=meta.get("data") or {},
            train=meta.get("train") or {}, rng=meta.get("rng") or {}, metrics=meta.get("metrics") or {},
            epoch=int(meta["epoch"]), step=int(meta["step"]), batch_in_epoch=int(meta.get("batch_in_epoch", 0)),
            epoch_sums=meta.get("epoch_sums") or {},
            version=meta.get("portable_cnn_version", "unknown"), path=Path(path) if path is not None else None,
        )


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# The type each metadata entry must have once parsed (None is allowed for the optional dict entries).
_META_DICTS = ("optimizer", "scheduler", "data", "train", "rng", "metrics", "epoch_sums")


def _check_metadata(meta: dict, where: str) -> None:
    """Refuse metadata of the wrong type (a hand-edited or foreign file) with one line naming the entry."""

    def bad(key, expected):
        raise CheckpointError(f"{where}: metadata entry {key!r} must be {expected}, got {meta[key]!r:.80}")

    if not _is_int(meta["format_version"]) or meta["format_version"] < 1:
        bad("format_version", "a positive integer")
    for key in ("epoch", "step", "batch_in_epoch"):
        if key in meta and (not _is_int(meta[key]) or meta[key] < 0):
            bad(key, "an integer >= 0")
    for key in _META_DICTS:
        if meta.get(key) is not None and not isinstance(meta[key], dict):
            bad(key, "a JSON object")
    if "portable_cnn_version" in meta and not isinstance(meta["portable_cnn_version"], str):
        bad("portable_cnn_version", "a string")
    model = meta["model"]
    if not isinstance(model, dict):
        bad("model", "a JSON object")
    if "name" in model and not isinstance(model["name"], str):
        raise CheckpointError(f"{where}: model name must be a string, got {model['name']!r:.80}")
    for key in ("in_channels", "num_classes"):
        if key in model and (not _is_int(model[key]) or model[key] < 1):
            raise CheckpointError(f"{where}: model {key} must be a positive integer, got {model[key]!r:.80}")
    size = model.get("input_size")
    if size is not None and not (isinstance(size, list) and len(size) == 2 and all(_is_int(v) and v >= 1 for v in size)):
        raise CheckpointError(f"{where}: model input_size must be [H, W] of positive integers, got {size!r:.80}")


def _host(a) -> np.ndarray:
    """A NumPy copy of an array of any backend (a copy even for NumPy: the training goes on mutating)."""
    return np.array(backend.to_numpy(a), copy=True)


def _c_contiguous(a) -> np.ndarray:
    """``a`` as a C-contiguous NumPy array, keeping 0-d arrays 0-d (``np.ascontiguousarray`` makes them 1-d)."""
    a = np.asarray(a)
    return a if a.flags.c_contiguous else np.array(a, order="C")


def _jsonable(value: Any):
    """NumPy scalars and arrays inside metadata as plain JSON types."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


def save_checkpoint(path, checkpoint: Checkpoint) -> Path:
    """Write ``checkpoint`` to ``path`` atomically; returns the path.

    The bytes go to a temporary file beside ``path``, which is flushed,
    ``fsync``-ed and renamed over ``path``; on any error (or Ctrl-C) the
    temporary file is removed and an existing ``path`` is left as it was.
    """
    import safetensors.numpy

    path = Path(path)
    tensors, metadata = checkpoint.to_safetensors()
    payload = safetensors.numpy.save(tensors, metadata=metadata)
    _atomic_write(path, payload)
    return path


def _write_all(f, payload: bytes, chunk: int = 1 << 20) -> None:
    """Write ``payload`` in chunks (a separate function so tests can make it fail midway)."""
    view = memoryview(payload)
    for start in range(0, len(view), chunk):
        f.write(view[start:start + chunk])


def _atomic_write(path: Path, payload: bytes) -> None:
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise FileNotFoundError(f"cannot write checkpoint {path}: directory {directory} does not exist")
    _remove_stale_temporaries(directory, path.name)
    tmp = directory / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    # os.open with 0o666 lets the umask pick the mode, as for any new file
    # (tempfile.mkstemp would leave it 0600).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            _write_all(f, payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_directory(directory)


def _remove_stale_temporaries(directory: Path, name: str) -> None:
    """Delete the temporary files of earlier saves of ``name`` whose process is gone (killed mid-write).

    The temporary name carries the writing process's id, so a save still in
    progress in a live process (another rank, another run) is left alone.
    """
    for tmp in directory.glob(f".{glob_escape(name)}.*.tmp"):
        pid = tmp.name[len(name) + 2:].split(".")[0]
        if not pid.isdigit() or (int(pid) != os.getpid() and _process_alive(int(pid))):
            continue
        try:
            tmp.unlink()
        except OSError:
            pass  # another save removed it first, or it is not ours to remove


def _process_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process there: assume it lives
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by another user
        return True
    return True


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`; arrays come back as NumPy.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    CheckpointError
        If the file is not safetensors (or is truncated or corrupt), or is a
        safetensors file without portable_cnn's metadata, or lacks entries.
    """
    import safetensors

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a file")
    try:
        with safetensors.safe_open(str(path), framework="np") as f:
            metadata = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own SafetensorError (and OSError, ValueError)
        raise CheckpointError(
            f"{path}: not a readable safetensors checkpoint (truncated or corrupt?): {exc}"
        ) from None
    return Checkpoint.from_safetensors(tensors, metadata, path)
