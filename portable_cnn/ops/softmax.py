"""Softmax, log-softmax and the fused softmax cross-entropy loss: validation and dispatch.

All three subtract the row maximum before ``exp`` so they stay finite for
logits of any finite magnitude (1e4 in the tests). The fused loss has the
gradient ``(softmax(z) - onehot(y)) / N`` (docs/derivation.md, section 6).
The arithmetic is in ``kernels/reference/softmax.py`` (and CuPy's fused
kernels for the loss).
"""

from __future__ import annotations

from .. import backend, dispatch
from ..kernels.reference import softmax as _reference
from ._checks import check_float, check_ndim, namespace_of

__all__ = [
    "softmax",
    "softmax_backward",
    "log_softmax",
    "log_softmax_backward",
    "softmax_cross_entropy",
    "softmax_cross_entropy_backward",
    "one_hot",
]


def softmax(x, axis=-1, *, where="softmax"):
    """``exp(x) / sum(exp(x))`` along ``axis``.

    >>> import numpy as np
    >>> softmax(np.array([[0.0, 0.0], [1e4, 0.0]]))
    array([[0.5, 0.5],
           [1. , 0. ]])
    """
    xp = namespace_of(x, where=where)
    check_float(x, where)
    return dispatch.kernel("softmax_forward", xp, x.dtype)(xp, x, axis)


def softmax_backward(dy, y, axis=-1):
    """``y * (dy - sum(dy * y))`` with ``y`` the forward's output."""
    xp = namespace_of(dy, y, where="softmax")
    return dispatch.kernel("softmax_backward", xp, dy.dtype)(xp, dy, y, axis)


def log_softmax(x, axis=-1, *, where="log_softmax"):
    """``x - logsumexp(x)`` along ``axis``."""
    xp = namespace_of(x, where=where)
    check_float(x, where)
    return dispatch.kernel("log_softmax_forward", xp, x.dtype)(xp, x, axis)


def log_softmax_backward(dy, y, axis=-1):
    """``dy - exp(y) * sum(dy)`` with ``y`` the forward's output (log-probabilities)."""
    xp = namespace_of(dy, y, where="log_softmax")
    return dispatch.kernel("log_softmax_backward", xp, dy.dtype)(xp, dy, y, axis)


def one_hot(labels, num_classes, dtype):
    """``(N,)`` integer labels to an ``(N, num_classes)`` array of 0/1 of ``dtype``."""
    xp = namespace_of(labels, where="one_hot")
    return _reference.one_hot(xp, labels, num_classes, dtype)


def _check_loss_args(xp, logits, labels, where, validate):
    check_ndim(logits, 2, "(N, num_classes)", where, "logits")
    check_float(logits, where, "logits")
    check_ndim(labels, 1, "(N,)", where, "labels")
    if not xp.isdtype(labels.dtype, "integral"):
        raise TypeError(f"{where}: expected integer labels, got {backend.dtype_name(labels)}")
    if labels.shape[0] != logits.shape[0]:
        raise ValueError(f"{where}: expected {logits.shape[0]} labels (one per row of logits {tuple(logits.shape)}), got {labels.shape[0]}")
    if logits.shape[0] == 0:
        raise ValueError(f"{where}: expected a non-empty batch, got logits of shape {tuple(logits.shape)}")
    if validate:
        # Reading the answer back is a host sync on a GPU: callers that checked
        # their labels once (the trainer) pass validate=False.
        K = logits.shape[1]
        if bool(xp.any((labels < 0) | (labels >= K))):
            low, high = int(xp.min(labels)), int(xp.max(labels))
            raise ValueError(f"{where}: expected labels in [0, {K - 1}], got labels in [{low}, {high}]")


def softmax_cross_entropy(logits, labels, *, validate=True, where="softmax_cross_entropy"):
    """Mean cross-entropy of ``softmax(logits)`` against integer ``labels``.

    Parameters
    ----------
    logits : array, shape (N, K), real floating
    labels : integer array, shape (N,), values in ``[0, K)``
    validate : bool
        Check the label range (one host sync on a GPU).

    Returns
    -------
    loss : 0-d array
        ``-mean_n log softmax(logits)[n, labels[n]]``.
    probs : array, shape (N, K)
        ``softmax(logits)``, which the backward needs.

    >>> import numpy as np
    >>> loss, _ = softmax_cross_entropy(np.zeros((2, 4)), np.array([0, 3]))
    >>> round(float(loss), 6) == round(float(np.log(4)), 6)
    True
    """
    xp = namespace_of(logits, labels, where=where)
    _check_loss_args(xp, logits, labels, where, validate)
    return dispatch.kernel("softmax_cross_entropy_forward", xp, logits.dtype)(xp, logits, labels)


def softmax_cross_entropy_backward(probs, labels, dloss=1.0):
    """``dloss * (probs - onehot(labels)) / N``: the gradient with respect to the logits."""
    xp = namespace_of(probs, labels, where="softmax_cross_entropy")
    return dispatch.kernel("softmax_cross_entropy_backward", xp, probs.dtype)(xp, probs, labels, dloss)
