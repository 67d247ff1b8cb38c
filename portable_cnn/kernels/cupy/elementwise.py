"""CuPy elementwise work fused into single kernels: ReLU, the softmax cross-entropy, the SGD update.

The reference spends three kernels on a ReLU (compare, zeros, where), about
fifteen on the loss and five per parameter on an SGD step with momentum; on
a GPU each is a launch that costs more than the arithmetic of a small
network. One kernel each here, doing the same arithmetic.
"""

from __future__ import annotations

import numbers

import numpy as np

from ..reference import activation as reference_activation
from ..reference import optim as reference_optim
from ..reference import softmax as reference_softmax
from .compile import cupy_module, launch, strides

__all__ = [
    "relu_forward",
    "relu_backward",
    "softmax_cross_entropy_forward",
    "softmax_cross_entropy_backward",
    "sgd_step",
]

_elementwise: dict = {}  # name -> cupy.ElementwiseKernel


def _elementwise_kernel(cupy, name, in_params, out_params, body, options=()):
    kernel = _elementwise.get(name)
    if kernel is None:
        kernel = cupy.ElementwiseKernel(in_params, out_params, body, f"portable_cnn_{name}", options=options)
        _elementwise[name] = kernel
    return kernel


def relu_forward(xp, x):
    """``x > 0 ? x : 0`` (NaN gives 0, as the reference's ``where``), in x's memory layout."""
    cupy = cupy_module()
    kernel = _elementwise_kernel(cupy, "relu", "T x", "T y", "y = x > (T)0 ? x : (T)0")
    with x.device:
        return kernel(x, cupy.empty_like(x))


def relu_backward(xp, dy, x):
    """``x > 0 ? dy : 0`` in dy's memory layout."""
    if dy.dtype != x.dtype:  # the kernel has one type parameter
        return reference_activation.relu_backward(xp, dy, x)
    cupy = cupy_module()
    kernel = _elementwise_kernel(cupy, "relu_backward", "T dy, T x", "T dx", "dx = x > (T)0 ? dy : (T)0")
    with dy.device:
        return kernel(dy, x, cupy.empty_like(dy))


def softmax_cross_entropy_forward(xp, logits, labels):
    """Mean cross-entropy and softmax of ``(N, K)`` logits in one kernel (plus the mean): ``(loss, probs)``."""
    cupy = cupy_module()
    N, K = logits.shape
    with logits.device:
        labels = cupy.ascontiguousarray(labels.astype(np.int64, copy=False))  # (N,)
        probs = cupy.empty((N, K), dtype=logits.dtype)  # (N, K)
        nll = cupy.empty((N,), dtype=logits.dtype)  # (N,) -log p(label)
        sN, sK = strides(logits)
        launch(cupy, "softmax_cross_entropy_forward", logits.dtype, N, (logits, labels, probs, nll), (K,), (sN, sK))
        return cupy.sum(nll) / N, probs  # 0-d, (N, K)


def softmax_cross_entropy_backward(xp, probs, labels, dloss):
    """``(probs - onehot(labels)) * dloss / N`` in one kernel (a Python number ``dloss``; else the reference)."""
    if not isinstance(dloss, numbers.Real):
        return reference_softmax.softmax_cross_entropy_backward(xp, probs, labels, dloss)
    cupy = cupy_module()
    N, K = probs.shape
    kernel = _elementwise_kernel(
        cupy, "softmax_cross_entropy_backward", "T p, raw int64 labels, int32 K, T scale", "T dlogits",
        "dlogits = (p - ((long long)(i % K) == labels[i / K] ? (T)1 : (T)0)) * scale",
    )
    with probs.device:
        labels = cupy.ascontiguousarray(labels.astype(np.int64, copy=False))  # (N,)
        scale = probs.dtype.type(dloss / N)
        return kernel(probs, labels, np.int32(K), scale, cupy.empty((N, K), dtype=probs.dtype))


# The SGD update operation by operation: --fmad=false keeps every product and
# sum rounded on its own, as the reference's separate kernels round them.
_SGD_BODY = """
T d = weight_decay != (T)0 ? g + weight_decay * p : g;
T b = momentum * buf + one_minus_dampening * d;
buf_out = b;
p_out = p - lr * ({step});
"""


def sgd_step(xp, param, grad, buf, *, lr, momentum, dampening, weight_decay, nesterov):
    """SGD with momentum after its first step in one kernel; other cases (no buffer yet, no momentum, mixed dtypes) run the reference."""
    if momentum == 0 or buf is None or not (grad.dtype == param.dtype == buf.dtype):
        return reference_optim.sgd_step(xp, param, grad, buf, lr=lr, momentum=momentum, dampening=dampening,
                                        weight_decay=weight_decay, nesterov=nesterov)
    cupy = cupy_module()
    name = "sgd_nesterov" if nesterov else "sgd_momentum"
    kernel = _elementwise_kernel(
        cupy, name, "T p, T g, T buf, T lr, T momentum, T one_minus_dampening, T weight_decay", "T p_out, T buf_out",
        _SGD_BODY.format(step="d + momentum * b" if nesterov else "b"), options=("--fmad=false",),
    )
    scalar = param.dtype.type
    with param.device:
        return kernel(param, grad, buf, scalar(lr), scalar(momentum), scalar(1 - dampening), scalar(weight_decay))
