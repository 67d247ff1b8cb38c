"""Batch normalisation over ``(N, C, *spatial)``, forward and backward (docs/derivation.md, section 12).

Per channel ``c`` (axis 1), over the ``M`` values of every other axis
(``M = N`` for ``(N, C)``, ``N*L`` for ``(N, C, L)``, ``N*H*W`` for
``(N, C, H, W)``), with PyTorch's ``torch.nn.BatchNorm1d``/``2d``
semantics::

    training:   mu = mean(x),  var = mean((x - mu)**2)       # biased variance
                running_mean <- (1 - momentum) * running_mean + momentum * mu
                running_var  <- (1 - momentum) * running_var  + momentum * var * M / (M - 1)
    evaluation: mu, var = running_mean, running_var
    both:       xhat = (x - mu) / sqrt(var + eps),   y = weight * xhat + bias

The running variance takes the *unbiased* batch variance while the
normalisation uses the biased one, exactly as PyTorch does. Without running
statistics (``track_running_stats=False``) both modes use the batch's.

Backward. In evaluation ``mu`` and ``var`` are constants, so
``dx = dy * weight / sqrt(var + eps)``. In training they depend on ``x``; with
``g = dy * weight`` (the gradient reaching ``xhat``) the three paths through
``xhat``, ``mu`` and ``var`` collapse to one line. (Why: ``dL/dvar =
-sum(g * xhat) * inv_std / (2 (var + eps))`` and ``dvar/dx = 2 (x - mu) / M``
give the ``xhat * mean(g * xhat)`` term; ``dL/dmu`` gives ``mean(g)``, its
part through ``var`` vanishing because ``sum(x - mu) = 0``.)::

    dx = (g - mean(g) - xhat * mean(g * xhat)) / sqrt(var + eps)
    dweight = sum(dy * xhat),   dbias = sum(dy)

where the means and sums run over every axis but 1. Only ``xhat`` and
``1 / sqrt(var + eps)`` are cached: ``x`` itself is not needed again.

An empty batch (``M = 0``) gives an empty output, leaves the running
statistics alone and zero parameter gradients, as PyTorch does.
"""

from __future__ import annotations

import math

from .. import backend, dispatch
from ._checks import check_float, check_ndim, namespace_of

__all__ = ["batch_norm", "batch_norm_backward", "batch_norm2d", "batch_norm2d_backward"]


def _check(x, weight, bias, running_mean, running_var, where):
    xp = namespace_of(x, weight, bias, running_mean, running_var, where=where)
    if x.ndim < 2:
        raise ValueError(f"{where}: expected input of at least 2 dimensions (N, C, *spatial), got shape {tuple(x.shape)}")
    check_float(x, where)
    C = x.shape[1]
    stats = [(n, v) for n, v in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)) if v is not None]
    if stats and stats[0][1].ndim == 1 and stats[0][1].shape[0] != C:
        # The layer's size is fixed, the input is what a user got wrong: say it that way round.
        name, v = stats[0]
        raise ValueError(
            f"{where}: expected input with {v.shape[0]} channels ({name} shape {tuple(v.shape)}), "
            f"got {C} channels (input shape {tuple(x.shape)})"
        )
    for name, v in stats:
        if tuple(v.shape) != (C,):
            raise ValueError(f"{where}: expected {name} of shape ({C},) for an input with {C} channels, got {tuple(v.shape)}")
        if v.dtype != x.dtype:
            raise TypeError(f"{where}: {name} dtype {backend.dtype_name(v)} does not match input dtype {backend.dtype_name(x)}")
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{where}: give both running_mean and running_var, or neither")
    return xp


def batch_norm(x, weight, bias, running_mean, running_var, *, training, momentum=0.1, eps=1e-5, where="batch_norm"):
    """Batch normalisation, as ``torch.nn.functional.batch_norm``: statistics per channel (axis 1).

    Parameters
    ----------
    x : array, shape (N, C), (N, C, L), (N, C, H, W) or any (N, C, *spatial)
    weight, bias : array, shape (C,), or None
        The affine scale and shift (``None``: 1 and 0, no gradient).
    running_mean, running_var : array, shape (C,), or None
        Running statistics. Used in evaluation; updated (into new arrays, the
        inputs are never written) in training. ``None`` for both: normalise
        with the batch statistics in either mode and track nothing.
    training : bool
        Normalise with the batch statistics and update the running ones.
    momentum : float
        Weight of the new batch in the running averages (``1 / k`` at the
        k-th batch gives their plain mean, PyTorch's ``momentum=None``).
    eps : float
        Added to the variance before the square root.

    Returns
    -------
    y : array, shape of ``x``
    cache : tuple
        What :func:`batch_norm_backward` needs.
    new_running_mean, new_running_var : array, shape (C,), or None
        The updated statistics in training, the given ones otherwise.

    Raises
    ------
    ValueError
        For one value per channel where batch statistics are needed (their
        variance would be 0/0), with PyTorch's wording.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.arange(8.0).reshape(4, 2)  # (N, C): channels [0, 2, 4, 6] and [1, 3, 5, 7]
    >>> y, _, rm, rv = batch_norm(x, None, None, np.zeros(2), np.ones(2), training=True, eps=0.0)
    >>> y[:, 0].round(6).tolist()
    [-1.341641, -0.447214, 0.447214, 1.341641]
    >>> rm, rv  # 0.9 * 0 + 0.1 * mean and 0.9 * 1 + 0.1 * unbiased variance (20 / 3)
    (array([0.3, 0.4]), array([1.56666667, 1.56666667]))
    """
    xp = _check(x, weight, bias, running_mean, running_var, where)
    N, C = x.shape[:2]
    M = N * math.prod(x.shape[2:])  # values per channel
    use_batch = training or running_mean is None
    if use_batch and M == 1:
        raise ValueError(f"{where}: expected more than 1 value per channel when training, got input shape {tuple(x.shape)}")
    if M == 0 or C == 0:
        y = xp.zeros(tuple(x.shape), dtype=x.dtype, device=backend.device(x))
        return y, (y, None, weight, bias is not None, use_batch, where), running_mean, running_var
    forward = dispatch.kernel("batch_norm_forward", xp, x.dtype)
    y, xhat, inv_std, use_batch, new_mean, new_var = forward(
        xp, x, weight, bias, running_mean, running_var, training=training, momentum=momentum, eps=eps
    )
    cache = (xhat, inv_std, weight, bias is not None, use_batch, where)
    return y, cache, new_mean, new_var


def batch_norm_backward(dy, cache):
    """Gradients of :func:`batch_norm`: ``(dx, dweight, dbias)``.

    ``dweight``/``dbias`` are ``None`` where the forward had no weight/bias.
    In training mode the gradient flows through the batch mean and variance
    too (module docstring).
    """
    xhat, inv_std, weight, has_bias, use_batch, where = cache
    xp = namespace_of(dy, xhat, where=where)
    if tuple(dy.shape) != tuple(xhat.shape):
        raise ValueError(f"{where}: expected output gradient of shape {tuple(xhat.shape)}, got {tuple(dy.shape)}")
    if inv_std is None:  # an empty batch: nothing reaches the parameters

        def zeros(shape):
            return xp.zeros(shape, dtype=dy.dtype, device=backend.device(dy))

        C = xhat.shape[1]
        return zeros(tuple(dy.shape)), None if weight is None else zeros((C,)), zeros((C,)) if has_bias else None
    backward = dispatch.kernel("batch_norm_backward", xp, dy.dtype)
    return backward(xp, dy, xhat, inv_std, weight, has_bias=has_bias, use_batch=use_batch)


def batch_norm2d(x, weight, bias, running_mean, running_var, *, training, momentum=0.1, eps=1e-5, where="batch_norm2d"):
    """:func:`batch_norm` on ``(N, C, H, W)`` input only, as ``torch.nn.BatchNorm2d`` takes it.

    >>> import numpy as np
    >>> x = np.arange(8.0).reshape(2, 1, 2, 2)
    >>> y, _, rm, rv = batch_norm2d(x, None, None, np.zeros(1), np.ones(1), training=True, eps=0.0)
    >>> round(float(y.mean()), 12), round(float((y ** 2).mean()), 12)
    (0.0, 1.0)
    >>> rm, rv  # 0.9 * 0 + 0.1 * 3.5 and 0.9 * 1 + 0.1 * 6 (unbiased)
    (array([0.35]), array([1.5]))
    """
    check_ndim(x, 4, "(N, C, H, W)", where)
    return batch_norm(x, weight, bias, running_mean, running_var, training=training, momentum=momentum, eps=eps, where=where)


#: The gradients of :func:`batch_norm2d`: the same as :func:`batch_norm_backward`.
batch_norm2d_backward = batch_norm_backward
