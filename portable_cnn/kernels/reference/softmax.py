"""Softmax, log-softmax and the softmax cross-entropy in the array API standard (the reference).

All subtract the maximum along the class axis before ``exp``, so they stay
finite for logits of any finite magnitude. The op
(:mod:`portable_cnn.ops.softmax`) hands the softmax kernels an array of at
least one axis and a non-empty ``axis`` counted from 0: it answers 0-d
inputs and empty axes itself.

The cross-entropy is ``torch.nn.functional.cross_entropy``'s, written once
for every option (docs/derivation.md, section 6): each position ``n`` (a
sample, or a sample and a spatial position) gets target coefficients
``c[n, k]`` over the classes, its loss is ``-sum_k c[n, k] log p[n, k]`` and
its gradient ``p[n] * sum_k c[n, k] - c[n]``. Class labels give
``c = ((1 - eps) onehot(y) + eps / K) * weight`` on the counted positions
(label in ``[0, K)`` and not ``ignore_index``) and 0 elsewhere; probability
targets ``t`` give ``c = ((1 - eps) t + eps / K) * weight``.
"""

from __future__ import annotations

import math

from ... import backend

__all__ = [
    "softmax_forward",
    "softmax_backward",
    "log_softmax_forward",
    "log_softmax_backward",
    "one_hot",
    "class_axis",
    "softmax_cross_entropy_forward",
    "softmax_cross_entropy_backward",
]


def _shifted(xp, x, axis):
    return x - xp.max(x, axis=axis, keepdims=True)


def softmax_forward(xp, x, axis):
    """``exp(x) / sum(exp(x))`` along ``axis``."""
    e = xp.exp(_shifted(xp, x, axis))
    return e / xp.sum(e, axis=axis, keepdims=True)


def softmax_backward(xp, dy, y, axis):
    """``y * (dy - sum(dy * y))`` with ``y`` the forward's output."""
    return y * (dy - xp.sum(dy * y, axis=axis, keepdims=True))


def log_softmax_forward(xp, x, axis):
    """``x - logsumexp(x)`` along ``axis``."""
    shifted = _shifted(xp, x, axis)
    return shifted - xp.log(xp.sum(xp.exp(shifted), axis=axis, keepdims=True))


def log_softmax_backward(xp, dy, y, axis):
    """``dy - exp(y) * sum(dy)`` with ``y`` the forward's output (log-probabilities)."""
    return dy - xp.exp(y) * xp.sum(dy, axis=axis, keepdims=True)


def one_hot(xp, labels, num_classes, dtype):
    """``(N,)`` integer labels to ``(N, num_classes)`` rows of 0/1 of ``dtype``; a label outside gives a zero row."""
    classes = xp.arange(num_classes, device=backend.device(labels))  # (K,)
    return xp.astype(labels[:, None] == classes[None, :], dtype)  # (N, K)


def class_axis(ndim: int) -> int:
    """The class axis of logits with ``ndim`` axes: 0 for unbatched ``(K,)``, else 1 (``(N, K, d1, ...)``)."""
    return 0 if ndim == 1 else 1


def _divide(xp, numerator, divisor, if_zero: float):
    """``numerator / divisor`` (``divisor`` 0-d), ``if_zero`` where it is 0, without NumPy's division warning."""
    zero = divisor == 0
    safe = xp.where(zero, xp.ones_like(divisor), divisor)
    return xp.where(zero, xp.full_like(divisor, if_zero), numerator / safe)


def _coefficients(xp, logits, target, weight, ignore_index, label_smoothing):
    """``(c, divisor)``: the target coefficients, shape of ``logits``, and the 0-d divisor of the mean.

    The divisor is the summed weight of the counted labels for class labels
    (their number without ``weight``) and the number of positions for
    probability targets, as PyTorch divides.
    """
    axis = class_axis(logits.ndim)
    K = logits.shape[axis]
    along_classes = tuple(K if i == axis else 1 for i in range(logits.ndim))  # (1, K, 1, ...) or (K,)
    w = None if weight is None else xp.reshape(weight, along_classes)
    smoothing = label_smoothing / K
    if xp.isdtype(target.dtype, "real floating"):
        c = target * (1.0 - label_smoothing) + smoothing
        positions = math.prod(logits.shape) // K
        divisor = xp.asarray(float(positions), dtype=logits.dtype, device=backend.device(logits))
        return (c if w is None else c * w), divisor
    classes = xp.reshape(xp.arange(K, device=backend.device(target)), along_classes)  # (1, K, 1, ...)
    labels = xp.expand_dims(target, axis=axis)  # (N, 1, d1, ...): the class axis put back
    # A label outside [0, K) can only get here with validate=False; it counts as ignored.
    counted = xp.astype((labels != ignore_index) & (labels >= 0) & (labels < K), logits.dtype)  # (N, 1, ...)
    onehot = xp.astype(labels == classes, logits.dtype) * counted  # (N, K, ...)
    c = onehot * (1.0 - label_smoothing) + counted * smoothing  # (N, K, ...)
    if w is None:
        return c, xp.asarray(xp.sum(counted))
    return c * w, xp.asarray(xp.sum(onehot * w))


def softmax_cross_entropy_forward(xp, logits, target, *, weight, ignore_index, reduction, label_smoothing):
    """``(loss, probs)`` as ``torch.nn.functional.cross_entropy``, with ``probs = softmax(logits)`` along the class axis.

    ``logits`` ``(N, K, d1, ...)`` or ``(K,)`` with at least one class;
    ``target`` integer labels of the logits' shape without the class axis,
    or probabilities of the logits' shape. ``loss`` is 0-d for ``"mean"``
    and ``"sum"``, the per-position losses for ``"none"``; a mean over
    nothing (all labels ignored, no positions) is NaN, as in PyTorch.
    """
    axis = class_axis(logits.ndim)
    logp = log_softmax_forward(xp, logits, axis)  # shape of logits
    c, divisor = _coefficients(xp, logits, target, weight, ignore_index, label_smoothing)
    # asarray: NumPy reductions return a scalar, not the 0-d array the other backends give.
    losses = xp.asarray(xp.sum(c * -logp, axis=axis))  # (N, d1, ...)
    probs = xp.exp(logp)
    if reduction == "none":
        return losses, probs
    total = xp.asarray(xp.sum(losses))
    return (total if reduction == "sum" else _divide(xp, total, divisor, math.nan)), probs


def softmax_cross_entropy_backward(xp, probs, target, dloss, *, weight, ignore_index, reduction, label_smoothing):
    """``dL/dlogits = (probs * sum_k c - c) * dloss / divisor``, the options being the forward's.

    ``dloss`` is a Python float, or an array of the loss's shape (0-d, or
    the per-position shape for ``"none"``). A mean over nothing has a zero
    gradient, as in PyTorch.
    """
    axis = class_axis(probs.ndim)
    c, divisor = _coefficients(xp, probs, target, weight, ignore_index, label_smoothing)
    grad = probs * xp.sum(c, axis=axis, keepdims=True) - c  # shape of probs
    if reduction == "none" and not isinstance(dloss, float):
        return grad * xp.expand_dims(dloss, axis=axis)  # (N, 1, d1, ...): one factor per position
    if reduction == "mean":
        return grad * _divide(xp, dloss, divisor, 0.0)
    return grad * dloss
