"""Batch normalisation over ``(N, C, H, W)`` in the array API standard (the reference).

Formulas and their derivation: :mod:`portable_cnn.ops.norm`. The forward
returns what the backward needs, ``xhat`` and ``1 / sqrt(var + eps)``; ``x``
itself is not kept.
"""

from __future__ import annotations

__all__ = ["batch_norm2d_forward", "batch_norm2d_backward"]

_AXES = (0, 2, 3)  # the reduction axes: everything but the channel


def _per_channel(xp, v):
    """``(C,)`` to ``(1, C, 1, 1)`` so it broadcasts against ``(N, C, H, W)``."""
    return xp.reshape(v, (1, v.shape[0], 1, 1))  # (1, C, 1, 1)


def batch_norm2d_forward(xp, x, weight, bias, running_mean, running_var, *, training, momentum, eps):
    """``(y, xhat, inv_std, use_batch, new_running_mean, new_running_var)``."""
    N, C, H, W = x.shape
    M = N * H * W
    use_batch = training or running_mean is None
    if use_batch:
        mean = xp.mean(x, axis=_AXES)  # (C,)
        centred = x - _per_channel(xp, mean)  # (N, C, H, W)
        var = xp.mean(centred * centred, axis=_AXES)  # (C,) biased
    else:
        mean, var = running_mean, running_var
        centred = x - _per_channel(xp, mean)
    inv_std = 1.0 / xp.sqrt(var + eps)  # (C,)
    xhat = centred * _per_channel(xp, inv_std)  # (N, C, H, W)
    y = xhat
    if weight is not None:
        y = y * _per_channel(xp, weight)
    if bias is not None:
        y = y + _per_channel(xp, bias)
    new_mean, new_var = running_mean, running_var
    if training and running_mean is not None:
        new_mean = (1.0 - momentum) * running_mean + momentum * mean
        new_var = (1.0 - momentum) * running_var + momentum * (var * (M / (M - 1)))
    return y, xhat, inv_std, use_batch, new_mean, new_var


def batch_norm2d_backward(xp, dy, xhat, inv_std, weight, *, has_bias, use_batch):
    """``(dx, dweight or None, dbias or None)``."""
    dbias = xp.sum(dy, axis=_AXES) if has_bias else None  # (C,)
    dweight = xp.sum(dy * xhat, axis=_AXES) if weight is not None else None  # (C,)
    g = dy if weight is None else dy * _per_channel(xp, weight)  # dL/dxhat, (N, C, H, W)
    if use_batch:
        g_mean = xp.mean(g, axis=_AXES)  # (C,)
        gx_mean = xp.mean(g * xhat, axis=_AXES)  # (C,)
        g = g - _per_channel(xp, g_mean) - xhat * _per_channel(xp, gx_mean)
    return g * _per_channel(xp, inv_std), dweight, dbias
