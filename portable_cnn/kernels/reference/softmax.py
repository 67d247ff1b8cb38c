"""Softmax, log-softmax and the fused softmax cross-entropy in the array API standard (the reference).

All subtract the row maximum before ``exp``, so they stay finite for logits of
any finite magnitude. The fused loss has the gradient
``(softmax(z) - onehot(y)) * dloss / N`` (docs/derivation.md, section 6).
"""

from __future__ import annotations

from ... import backend

__all__ = [
    "softmax_forward",
    "softmax_backward",
    "log_softmax_forward",
    "log_softmax_backward",
    "one_hot",
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


def softmax_cross_entropy_forward(xp, logits, labels):
    """``(loss, probs)``: the 0-d mean of ``-log softmax(logits)[n, labels[n]]`` and ``softmax(logits)`` ``(N, K)``."""
    logp = log_softmax_forward(xp, logits, 1)  # (N, K)
    target = one_hot(xp, labels, logits.shape[1], logits.dtype)  # (N, K)
    # asarray: NumPy reductions return a scalar, not the 0-d array the other backends give.
    loss = xp.asarray(-xp.sum(target * logp) / logits.shape[0])
    return loss, xp.exp(logp)


def softmax_cross_entropy_backward(xp, probs, labels, dloss):
    """``dloss * (probs - onehot(labels)) / N``: the gradient with respect to the logits."""
    return (probs - one_hot(xp, labels, probs.shape[1], probs.dtype)) * (dloss / probs.shape[0])
