"""Settings in one place, scikit-learn style: :func:`get_config`, :func:`set_config`, :func:`config_context`.

=============  =========================================  ==============================
setting        meaning                                    environment variable (default)
=============  =========================================  ==============================
fast_paths     run the backend kernels registered in      ``PORTABLE_CNN_FAST_PATHS``
               :mod:`portable_cnn.dispatch`; ``False``    (``1``)
               runs the standard-only reference path on
               every backend
workspace_mb   bound on one convolution's im2col matrix;  ``PORTABLE_CNN_WORKSPACE_MB``
               a larger batch is convolved in slices      (``1024``)
num_threads    threads of the NumPy kernels' own pool     ``PORTABLE_CNN_NUM_THREADS``
               (``None``: the cores this process may use) (the cores)
tf32           allow TF32 in CuPy's float32 GEMMs         ``CUPY_TF32`` (``0``)
=============  =========================================  ==============================

The environment is read once, on first use, and a bad value raises
:class:`ConfigError` naming the variable, the expected and the given value;
importing the package or asking for ``--help`` reads nothing. The settings
are process-wide (the NumPy kernels' worker threads see the caller's).

>>> import portable_cnn
>>> with portable_cnn.config_context(fast_paths=False, workspace_mb=64):
...     portable_cnn.get_config()["fast_paths"], portable_cnn.get_config()["workspace_mb"]
(False, 64.0)
>>> portable_cnn.get_config()["fast_paths"]
True
"""

from __future__ import annotations

import math
import numbers
import os
from contextlib import contextmanager

from . import backend

__all__ = ["ConfigError", "get_config", "setting", "set_config", "config_context", "ENVIRONMENT"]


class ConfigError(ValueError):
    """A setting, or the environment variable behind it, has a value that cannot be used."""


def _check_bool(value, name):
    if not isinstance(value, (bool, numbers.Integral)) or value not in (0, 1):
        raise ConfigError(f"{name}: expected True or False, got {value!r}")
    return bool(value)


def _check_workspace(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (0 < value < math.inf):
        raise ConfigError(f"{name}: expected a positive number of megabytes, got {value!r}")
    return float(value)


def _check_threads(value, name):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ConfigError(f"{name}: expected a positive integer or None, got {value!r}")
    return int(value)


_CHECKS = {
    "fast_paths": _check_bool,
    "workspace_mb": _check_workspace,
    "num_threads": _check_threads,
    "tf32": _check_bool,
}


def _parse_bool(text):
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError


def _parse_number(text):
    return float(text)


def _parse_int(text):
    return int(text)


#: setting -> (environment variable, parser of its text, default when unset, what a valid value looks like)
ENVIRONMENT = {
    "fast_paths": ("PORTABLE_CNN_FAST_PATHS", _parse_bool, True, "0 or 1"),
    "workspace_mb": ("PORTABLE_CNN_WORKSPACE_MB", _parse_number, 1024.0, "a positive number of megabytes"),
    "num_threads": ("PORTABLE_CNN_NUM_THREADS", _parse_int, None, "a positive integer"),
    "tf32": ("CUPY_TF32", lambda text: int(text) > 0, False, "an integer (0: off)"),
}

_config: dict | None = None


def _from_environment() -> dict:
    config = {}
    for key, (variable, parse, default, expected) in ENVIRONMENT.items():
        text = os.environ.get(variable)
        if text is None or (text.strip() == "" and key != "fast_paths"):
            config[key] = default
            continue
        try:
            config[key] = _CHECKS[key](parse(text), variable)
        except (ValueError, ConfigError):
            raise ConfigError(f"environment variable {variable}: expected {expected}, got {text!r}") from None
    return config


def _current() -> dict:
    global _config
    if _config is None:
        _config = _from_environment()
    return _config


def get_config() -> dict:
    """A copy of the current settings (see the module docstring).

    Raises :class:`ConfigError` naming the environment variable when one
    that is read here holds a bad value. ``tf32`` is read from CuPy's own
    switch (:func:`portable_cnn.backend.tf32_enabled`), so it is right even
    after a direct call of :func:`portable_cnn.backend.set_tf32`.
    """
    config = dict(_current())
    config["tf32"] = backend.tf32_enabled()
    return config


def setting(name: str):
    """The current value of one setting, without copying the whole dict: for the hot path (dispatch, kernels)."""
    return _current()[name]


def set_config(*, fast_paths=None, workspace_mb=None, num_threads=..., tf32=None) -> None:
    """Change settings for the rest of the process; arguments left out (``None``) keep their value.

    ``num_threads=None`` means "the cores this process may use", so leave it
    out to keep the current value. Values are checked before any is changed.
    """
    current = _current()
    given = {"fast_paths": fast_paths, "workspace_mb": workspace_mb, "tf32": tf32}
    new = {k: _CHECKS[k](v, f"set_config: {k}") for k, v in given.items() if v is not None}
    if num_threads is not ...:
        new["num_threads"] = _check_threads(num_threads, "set_config: num_threads")
    if "tf32" in new:
        backend.set_tf32(new["tf32"])  # CuPy's switch is the state; see get_config
    current.update(new)


@contextmanager
def config_context(*, fast_paths=None, workspace_mb=None, num_threads=..., tf32=None):
    """Settings changed inside a ``with`` block and restored after it (even on error).

    >>> from portable_cnn import config_context, get_config
    >>> with config_context(num_threads=1):
    ...     get_config()["num_threads"]
    1
    """
    before = get_config()
    set_config(fast_paths=fast_paths, workspace_mb=workspace_mb, num_threads=num_threads, tf32=tf32)
    try:
        yield get_config()
    finally:
        set_config(**before)
