"""Parameter updates of SGD and Adam in the array API standard (the reference); rules in :mod:`portable_cnn.optim`.

Updates return new arrays and never write their inputs.
"""

from __future__ import annotations

import math

__all__ = ["sgd_step", "adam_step"]


def sgd_step(xp, param, grad, buf, *, lr, momentum, dampening, weight_decay, nesterov):
    """One SGD step: ``(new param, new momentum buffer or None)``; ``buf`` is None before the first step."""
    if weight_decay != 0:
        grad = grad + weight_decay * param
    if momentum != 0:
        if buf is None:
            # A copy, as torch clones: the gradient array belongs to the layer,
            # which (or a user clipping in place) may write into it later.
            buf = xp.asarray(grad, copy=True)
        else:
            buf = momentum * buf + (1 - dampening) * grad
        grad = grad + momentum * buf if nesterov else buf
    return param - lr * grad, buf


def adam_step(xp, param, grad, exp_avg, exp_avg_sq, *, step, lr, beta1, beta2, eps, weight_decay):
    """One Adam step (``step`` counted from 1): ``(new param, new exp_avg, new exp_avg_sq)``."""
    if weight_decay != 0:
        grad = grad + weight_decay * param
    if exp_avg is None:
        exp_avg = (1 - beta1) * grad
        exp_avg_sq = (1 - beta2) * (grad * grad)
    else:
        exp_avg = beta1 * exp_avg + (1 - beta1) * grad
        exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * (grad * grad)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    denom = xp.sqrt(exp_avg_sq) / math.sqrt(bias_correction2) + eps
    return param - (lr / bias_correction1) * exp_avg / denom, exp_avg, exp_avg_sq
