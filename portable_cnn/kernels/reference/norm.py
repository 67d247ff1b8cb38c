"""Batch normalisation over ``(N, C, *spatial)`` in the array API standard (the reference).

Formulas and their derivation: :mod:`portable_cnn.ops.norm`. Statistics are
per channel (axis 1), over every other axis: ``(N,)`` for ``(N, C)`` input,
``(N, L)`` for ``(N, C, L)``, ``(N, H, W)`` for ``(N, C, H, W)``. The forward
returns what the backward needs, ``xhat`` and ``1 / sqrt(var + eps)``; ``x``
itself is not kept.
"""

from __future__ import annotations

import math

__all__ = ["batch_norm_forward", "batch_norm_backward", "running_statistics"]


def _axes(ndim):
    """The reduction axes: every axis but the channel axis 1."""
    return (0, *range(2, ndim))


def _per_channel(xp, v, ndim):
    """``(C,)`` to ``(1, C, 1, ...)`` so it broadcasts against ``(N, C, *spatial)``."""
    return xp.reshape(v, (1, v.shape[0]) + (1,) * (ndim - 2))  # (1, C, 1, ...)


def running_statistics(running_mean, running_var, mean, var, M, momentum):
    """The running averages after one batch of ``M`` values per channel: ``(new_mean, new_var)``.

    The variance kept is the unbiased one, ``var * M / (M - 1)``, as PyTorch keeps it.
    """
    new_mean = (1.0 - momentum) * running_mean + momentum * mean
    new_var = (1.0 - momentum) * running_var + momentum * (var * (M / (M - 1)))
    return new_mean, new_var


def batch_norm_forward(xp, x, weight, bias, running_mean, running_var, *, training, momentum, eps):
    """``(y, xhat, inv_std, use_batch, new_running_mean, new_running_var)`` for ``x`` of shape ``(N, C, *spatial)``."""
    axes, ndim = _axes(x.ndim), x.ndim
    M = math.prod(x.shape[i] for i in axes)
    use_batch = training or running_mean is None
    if use_batch:
        mean = xp.mean(x, axis=axes)  # (C,)
        centred = x - _per_channel(xp, mean, ndim)  # (N, C, *spatial)
        var = xp.mean(centred * centred, axis=axes)  # (C,) biased
    else:
        mean, var = running_mean, running_var
        centred = x - _per_channel(xp, mean, ndim)
    inv_std = 1.0 / xp.sqrt(var + eps)  # (C,)
    xhat = centred * _per_channel(xp, inv_std, ndim)  # (N, C, *spatial)
    y = xhat
    if weight is not None:
        y = y * _per_channel(xp, weight, ndim)
    if bias is not None:
        y = y + _per_channel(xp, bias, ndim)
    new_mean, new_var = running_mean, running_var
    if training and running_mean is not None:
        new_mean, new_var = running_statistics(running_mean, running_var, mean, var, M, momentum)
    return y, xhat, inv_std, use_batch, new_mean, new_var


def batch_norm_backward(xp, dy, xhat, inv_std, weight, *, has_bias, use_batch):
    """``(dx, dweight or None, dbias or None)``."""
    axes, ndim = _axes(dy.ndim), dy.ndim
    dbias = xp.sum(dy, axis=axes) if has_bias else None  # (C,)
    dweight = xp.sum(dy * xhat, axis=axes) if weight is not None else None  # (C,)
    g = dy if weight is None else dy * _per_channel(xp, weight, ndim)  # dL/dxhat, (N, C, *spatial)
    if use_batch:
        g_mean = xp.mean(g, axis=axes)  # (C,)
        gx_mean = xp.mean(g * xhat, axis=axes)  # (C,)
        g = g - _per_channel(xp, g_mean, ndim) - xhat * _per_channel(xp, gx_mean, ndim)
    return g * _per_channel(xp, inv_std, ndim), dweight, dbias
