"""Argument checks shared by the ops.

Every error names the op or layer (``where``), what was expected and what was
given, so a user can find the bad line without reading our source.
"""

from __future__ import annotations

from .. import backend
from ..geometry import out_size, pair

__all__ = ["pair", "out_size", "check_float", "check_ndim", "check_grad_shape", "check_same_dtype", "namespace_of"]


def check_float(x, where: str, name: str = "input") -> None:
    """Reject integer and boolean arrays: gradients need real floating point."""
    xp = backend.namespace(x, where=where)
    if not xp.isdtype(x.dtype, "real floating"):
        raise TypeError(f"{where}: expected {name} of a real floating dtype (float32 or float64), got {backend.dtype_name(x)}")


def check_ndim(x, ndim: int, layout: str, where: str, name: str = "input") -> None:
    """Reject an array whose number of axes is not ``ndim`` (``layout`` names them)."""
    if x.ndim != ndim:
        raise ValueError(f"{where}: expected {name} of {ndim} dimensions {layout}, got shape {tuple(x.shape)}")


def check_grad_shape(dy, shape, where: str) -> None:
    """Reject an output gradient whose shape is not the forward output's: it would broadcast silently."""
    if tuple(dy.shape) != tuple(shape):
        raise ValueError(f"{where}: expected output gradient of shape {tuple(shape)}, got {tuple(dy.shape)}")


def check_same_dtype(a, b, where: str, a_name: str, b_name: str) -> None:
    """Reject two arrays of different dtypes (NumPy would promote the result behind the user's back)."""
    if a.dtype != b.dtype:
        raise TypeError(f"{where}: {a_name} dtype {backend.dtype_name(a)} does not match {b_name} dtype {backend.dtype_name(b)}")


def namespace_of(*arrays, where: str):
    """The arrays' namespace, with the mixing checks of :func:`backend.namespace`."""
    return backend.namespace(*arrays, where=where)
