"""Inverted dropout, forward and backward.

In training each element is kept with probability ``1 - p`` and the kept ones
are scaled by ``1 / (1 - p)``, so the expected output equals the input and
evaluation is the identity (``torch.nn.functional.dropout``). The random
numbers come in as an argument, drawn by :func:`portable_cnn.backend.random_uniform`
on the input's device: the op itself stays deterministic and testable, and
the one place that knows each library's generator is the backend module.

The forward returns the scaled mask ``keep / (1 - p)``; the backward is the
same product, ``dx = dy * mask``, since the op is linear in ``x``.
"""

from __future__ import annotations

from .. import backend, dispatch
from ._checks import check_float, namespace_of

__all__ = ["dropout", "dropout_backward", "check_probability"]


def check_probability(p, where: str) -> float:
    """``p`` as a float in ``[0, 1]``, or a ``ValueError`` naming ``where``."""
    if isinstance(p, bool):
        raise TypeError(f"{where}: dropout probability must be a number in [0, 1], got {p!r}")
    try:
        value = float(p)
    except (TypeError, ValueError):
        raise TypeError(f"{where}: dropout probability must be a number in [0, 1], got {p!r}") from None
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{where}: dropout probability must be in [0, 1], got {p!r}")
    return value


def dropout(x, p, mask_uniform, *, where="dropout"):
    """Training-mode inverted dropout.

    Parameters
    ----------
    x : array, any shape
    p : float in [0, 1]
        Probability of dropping an element.
    mask_uniform : array, same shape, dtype and device as ``x``
        Uniform random numbers in ``[0, 1)``; element ``i`` is kept where
        ``mask_uniform[i] >= p`` (probability ``1 - p``).

    Returns
    -------
    y : array, shape of ``x``
        ``x * mask``.
    mask : array, shape of ``x``
        ``1 / (1 - p)`` where kept, 0 where dropped (all zeros for ``p = 1``);
        what :func:`dropout_backward` needs.

    Examples
    --------
    >>> import numpy as np
    >>> y, mask = dropout(np.ones(4), 0.5, np.array([0.1, 0.7, 0.5, 0.2]))
    >>> y
    array([0., 2., 2., 0.])
    """
    xp = namespace_of(x, mask_uniform, where=where)
    check_float(x, where)
    p = check_probability(p, where)
    if tuple(mask_uniform.shape) != tuple(x.shape):
        raise ValueError(f"{where}: expected mask_uniform of the input's shape {tuple(x.shape)}, got {tuple(mask_uniform.shape)}")
    if mask_uniform.dtype != x.dtype:
        raise TypeError(
            f"{where}: mask_uniform dtype {backend.dtype_name(mask_uniform)} does not match input dtype {backend.dtype_name(x)}"
        )
    return dispatch.kernel("dropout_forward", xp, x.dtype)(xp, x, p, mask_uniform)


def dropout_backward(dy, mask, *, where="dropout"):
    """Gradient of :func:`dropout`: ``dy * mask`` (``mask`` as the forward returned it)."""
    xp = namespace_of(dy, mask, where=where)
    if tuple(dy.shape) != tuple(mask.shape):
        raise ValueError(f"{where}: expected output gradient of shape {tuple(mask.shape)}, got {tuple(dy.shape)}")
    return dispatch.kernel("dropout_backward", xp, dy.dtype)(xp, dy, mask)
