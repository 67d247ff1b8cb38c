"""Output paths checked before any work: a bad one is one line before training, not a traceback after it.

Every command that writes files (``train``: ``--checkpoint``, ``--log-json``;
``predict --output``; ``export --onnx``; ``bench``'s ``--json``,
``--markdown``, ``--plot``) passes its outputs and inputs to
:func:`check_outputs` first. The rules, the same for every output:

* an empty path is refused;
* a directory is refused, and so is an existing file that cannot be written;
* an output may not be the same file as an input (``--checkpoint`` on the
  ``--data`` file would replace the dataset) or as another output;
* a missing parent directory is created (as ``bench`` always did), unless a
  part of it is a file; a parent that cannot be written is refused.

>>> import tempfile, os
>>> with tempfile.TemporaryDirectory() as tmp:
...     data = os.path.join(tmp, "data.npz")
...     open(data, "wb").close()
...     check_outputs({"--checkpoint": data}, inputs={"--data": data})
Traceback (most recent call last):
...
portable_cnn.paths.OutputPathError: --checkpoint ... is the same file as --data: it would be overwritten
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["OutputPathError", "check_outputs", "same_file"]


class OutputPathError(ValueError):
    """An output path cannot be written, or would overwrite an input or another output (a one-line message)."""


def same_file(a, b) -> bool:
    """Whether two paths name one file: the same inode when both exist, else the same absolute path."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).resolve() == Path(b).resolve()


def _check_one(option: str, path) -> Path:
    if path is None or str(path) == "":
        raise OutputPathError(f"{option}: empty path; give a file name")
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"{option} {path}: is a directory; give a file name inside it")
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputPathError(f"{option} {path}: the file exists and cannot be written (permission denied)")
    parent = path.parent if str(path.parent) else Path(".")
    existing = next((p for p in (parent, *parent.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        raise OutputPathError(f"{option} {path}: {existing} is a file, not a directory")
    if not parent.exists():
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputPathError(f"{option} {path}: cannot create directory {parent}: {exc.strerror or exc}") from None
    # Checkpoints are written to a temporary file beside the target and renamed: the directory must be writable.
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"{option} {path}: directory {parent} cannot be written (permission denied)")
    return path


def check_outputs(outputs: dict, inputs: dict | None = None, *, may_replace: dict | None = None) -> None:
    """Refuse output paths that cannot be written or that name an input or another output.

    Parameters
    ----------
    outputs : dict of str to path or None
        Option name (for the message) to path; ``None`` values are skipped
        (an unset option), an empty string is refused.
    inputs : dict of str to path or None, optional
        Option name to an input path (``None`` skipped): no output may be one of them.
    may_replace : dict of str to str, optional
        Output option to the input option it is allowed to be (``train
        --checkpoint`` may be the ``--resume`` file: the run goes on in it).

    Raises
    ------
    OutputPathError
        Naming the option, the path and what is wrong. Missing parent
        directories are created first.
    """
    inputs = {k: v for k, v in (inputs or {}).items() if v is not None and str(v) != ""}
    may_replace = may_replace or {}
    seen = {}
    for option, path in outputs.items():
        if path is None:
            continue
        path = _check_one(option, path)
        for other, input_path in inputs.items():
            if may_replace.get(option) != other and same_file(path, input_path):
                raise OutputPathError(f"{option} {path} is the same file as {other}: it would be overwritten")
        for other, other_path in seen.items():
            if same_file(path, other_path):
                raise OutputPathError(f"{option} {path} is the same file as {other}: one would overwrite the other")
        seen[option] = path
