"""Argument checks and plain-integer shape arithmetic shared by the ops.

Every error names the op or layer (``where``), what was expected and what was
given, so a user can find the bad line without reading our source.
"""

from __future__ import annotations

import operator

from .. import backend

__all__ = ["pair", "out_size", "check_float", "check_ndim", "check_grad_shape", "namespace_of"]


def pair(value, name: str, where: str, *, minimum: int) -> tuple[int, int]:
    """Normalise an int or a pair of ints to ``(vertical, horizontal)``.

    Raises ``TypeError`` for a non-integer and ``ValueError`` below ``minimum``.
    """
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{where}: {name} must be an int or a pair of ints, got {value!r}")
        items = tuple(value)
    else:
        items = (value, value)
    out = []
    for v in items:
        if isinstance(v, bool):
            raise TypeError(f"{where}: {name} must be an int or a pair of ints, got {value!r}")
        try:
            out.append(operator.index(v))
        except TypeError:
            raise TypeError(f"{where}: {name} must be an int or a pair of ints, got {value!r}") from None
    if min(out) < minimum:
        bound = "positive" if minimum == 1 else "non-negative"
        raise ValueError(f"{where}: {name} must be {bound}, got {value!r}")
    return out[0], out[1]


def out_size(size: int, kernel: int, stride: int, padding: int, dilation: int = 1) -> int:
    """Output length of a sliding window: ``(H + 2a - d(R - 1) - 1) // u + 1``.

    With ``d = 1`` this is ``floor((H + 2a - R) / u) + 1``, which equals the
    seed's ``ceil((H - R + 1 + 2a) / u)`` (docs/derivation.md, section 1).

    >>> out_size(28, 5, 1, 2), out_size(7, 3, 2, 0), out_size(7, 3, 2, 1, dilation=2)
    (28, 3, 3)
    """
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


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


def namespace_of(*arrays, where: str):
    """The arrays' namespace, with the mixing checks of :func:`backend.namespace`."""
    return backend.namespace(*arrays, where=where)
