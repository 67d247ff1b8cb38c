"""CuPy elementwise work fused into single kernels: ReLU, the softmax cross-entropy, the SGD update.

The reference spends three kernels on a ReLU (compare, zeros, where), about
fifteen on the loss and five per parameter on an SGD step with momentum; on
a GPU each is a launch that costs more than the arithmetic of a small
network. One kernel each here, doing the same arithmetic.

The CUDA bodies are the :class:`~.compile.ElementwiseSource` constants of
``ELEMENTWISE_SOURCES``, and each op's work a function of a
:class:`~.compile.KernelRunner` (``<op>_on``): tests/test_cuda_kernels.py
compiles the same bodies with NVRTC and runs them on the CPU.
"""

from __future__ import annotations

import numpy as np

from ..reference import activation as reference_activation
from ..reference import optim as reference_optim
from ..reference import softmax as reference_softmax
from .compile import ElementwiseSource, cupy_runner, strides

__all__ = [
    "ELEMENTWISE_SOURCES",
    "relu_forward",
    "relu_backward",
    "bias_relu_on",
    "softmax_cross_entropy_forward",
    "softmax_cross_entropy_backward",
    "sgd_step",
    "relu_forward_on",
    "relu_backward_on",
    "softmax_cross_entropy_forward_on",
    "softmax_cross_entropy_backward_on",
    "sgd_step_on",
]

RELU = ElementwiseSource("relu", "T x", "T y", "y = x > (T)0 ? x : (T)0")
RELU_BACKWARD = ElementwiseSource("relu_backward", "T dy, T x", "T dx", "dx = x > (T)0 ? dy : (T)0")
# A convolution's epilogue: its bias (broadcast along the last axis) and the ReLU after it, in one pass.
BIAS_RELU = ElementwiseSource("bias_relu", "T y, T bias", "T out", "const T v = y + bias; out = v > (T)0 ? v : (T)0")
# Rows whose label is outside [0, K) (ignore_index among them: see _fused_case)
# get a zero gradient; the others (p - onehot) times their row's factor.
SOFTMAX_CROSS_ENTROPY_BACKWARD = ElementwiseSource(
    "softmax_cross_entropy_backward", "T p, raw int64 labels, int32 K, int64 ignore, raw T scale, int64 scale_step",
    "T dlogits",
    "const long long y = labels[i / K];"
    " dlogits = (y < 0 || y >= K || y == ignore) ? (T)0"
    " : (p - ((long long)(i % K) == y ? (T)1 : (T)0)) * scale[(i / K) * scale_step]",
)
COUNTED_LABELS = ElementwiseSource(
    "counted_labels", "int64 label, int32 K, int64 ignore", "T counted",
    "counted = (label >= 0 && label < K && label != ignore) ? (T)1 : (T)0",
)
# The SGD update operation by operation: --fmad=false keeps every product and
# sum rounded on its own, as the reference's separate kernels round them.
_SGD_PARAMS = ("T p, T g, T buf, T lr, T momentum, T one_minus_dampening, T weight_decay", "T p_out, T buf_out")
_SGD_BODY = """
T d = weight_decay != (T)0 ? g + weight_decay * p : g;
T b = momentum * buf + one_minus_dampening * d;
buf_out = b;
p_out = p - lr * ({step});
"""
SGD_MOMENTUM = ElementwiseSource("sgd_momentum", *_SGD_PARAMS, _SGD_BODY.format(step="b"), ("--fmad=false",))
SGD_NESTEROV = ElementwiseSource("sgd_nesterov", *_SGD_PARAMS, _SGD_BODY.format(step="d + momentum * b"),
                                 ("--fmad=false",))

#: Every fused elementwise kernel of this module.
ELEMENTWISE_SOURCES = (RELU, RELU_BACKWARD, BIAS_RELU, SOFTMAX_CROSS_ENTROPY_BACKWARD, COUNTED_LABELS, SGD_MOMENTUM,
                       SGD_NESTEROV)


def relu_forward(xp, x):
    """``x > 0 ? x : 0`` (NaN gives 0, as the reference's ``where``), in x's memory layout."""
    with x.device:
        return relu_forward_on(cupy_runner(), x)


def relu_forward_on(run, x):
    """:func:`relu_forward` on the :class:`~.compile.KernelRunner` ``run``."""
    return run.elementwise(RELU)(x, run.lib.empty_like(x))


def relu_backward(xp, dy, x):
    """``x > 0 ? dy : 0`` in dy's memory layout."""
    with dy.device:
        return relu_backward_on(cupy_runner(), dy, x)


def bias_relu_on(run, y, bias):
    """``relu(y + bias)`` into ``y`` (``bias`` broadcast along its last axis, or None) in one kernel; returns ``y``."""
    if bias is None:
        return run.elementwise(RELU)(y, y)
    return run.elementwise(BIAS_RELU)(y, bias, y)


def relu_backward_on(run, dy, x):
    """:func:`relu_backward` on the :class:`~.compile.KernelRunner` ``run``; the reference's for two dtypes."""
    if dy.dtype != x.dtype:  # the kernel has one type parameter
        return reference_activation.relu_backward(run.lib, dy, x)
    return run.elementwise(RELU_BACKWARD)(dy, x, run.lib.empty_like(dy))


def _fused_case(logits, target, weight, ignore_index, label_smoothing) -> bool:
    """The fused kernels' case: ``(N, K)`` logits, class labels, no weight nor smoothing, ``ignore_index`` outside ``[0, K)``.

    The forward kernel gives a zero loss to every label outside ``[0, K)``,
    which is what an ignored label needs; an ``ignore_index`` inside (rare)
    and the other options run the reference, as does the K-dimensional case.
    """
    return (
        logits.ndim == 2 and target.ndim == 1 and weight is None and label_smoothing == 0.0
        and not 0 <= ignore_index < logits.shape[1]
    )


def softmax_cross_entropy_forward(xp, logits, target, *, weight, ignore_index, reduction, label_smoothing):
    """Softmax and the loss per row in one kernel, then the reduction: ``(loss, probs)``; other cases run the reference."""
    if not _fused_case(logits, target, weight, ignore_index, label_smoothing):
        return reference_softmax.softmax_cross_entropy_forward(
            xp, logits, target, weight=weight, ignore_index=ignore_index, reduction=reduction,
            label_smoothing=label_smoothing,
        )
    with logits.device:
        return softmax_cross_entropy_forward_on(cupy_runner(), logits, target, ignore_index, reduction)


def softmax_cross_entropy_forward_on(run, logits, labels, ignore_index, reduction):
    """:func:`softmax_cross_entropy_forward` on the :class:`~.compile.KernelRunner` ``run``, in the fused case."""
    N, K = logits.shape
    labels = run.lib.ascontiguousarray(labels.astype(np.int64, copy=False))  # (N,)
    probs = run.lib.empty((N, K), dtype=logits.dtype)  # (N, K)
    nll = run.lib.empty((N,), dtype=logits.dtype)  # (N,) -log p(label), 0 for a label outside [0, K)
    sN, sK = strides(logits)
    run.launch("softmax_cross_entropy_forward", logits.dtype, N, (logits, labels, probs, nll), (K,), (sN, sK))
    if reduction == "none":
        return nll, probs
    total = run.lib.sum(nll)  # 0-d
    if reduction == "sum":
        return total, probs
    # No labels counted: 0 / 0, NaN as in PyTorch.
    return total / _counted_labels(run, labels, K, ignore_index, logits.dtype), probs


def _counted_labels(run, labels, K, ignore_index, dtype):
    """The mean's divisor: how many ``(N,)`` labels lie in ``[0, K)`` and differ from ``ignore_index`` (0-d ``dtype``)."""
    counted = run.elementwise(COUNTED_LABELS)(labels, np.int32(K), np.int64(ignore_index),
                                              run.lib.empty(labels.shape, dtype=dtype))  # (N,)
    return run.lib.sum(counted)


def softmax_cross_entropy_backward(xp, probs, target, dloss, *, weight, ignore_index, reduction, label_smoothing):
    """``(probs - onehot(labels)) * dloss / divisor`` in one kernel (plus the divisor); other cases run the reference."""
    if not _fused_case(probs, target, weight, ignore_index, label_smoothing):
        return reference_softmax.softmax_cross_entropy_backward(
            xp, probs, target, dloss, weight=weight, ignore_index=ignore_index, reduction=reduction,
            label_smoothing=label_smoothing,
        )
    with probs.device:
        return softmax_cross_entropy_backward_on(cupy_runner(), probs, target, dloss, ignore_index, reduction)


def softmax_cross_entropy_backward_on(run, probs, labels, dloss, ignore_index, reduction):
    """:func:`softmax_cross_entropy_backward` on the :class:`~.compile.KernelRunner` ``run``, in the fused case.

    ``dloss`` is a float or a device array (0-d, or ``(N,)`` for
    ``reduction="none"``): the factor per row stays on the device, no host copy.
    """
    N, K = probs.shape
    labels = run.lib.ascontiguousarray(labels.astype(np.int64, copy=False))  # (N,)
    if isinstance(dloss, float):
        scale = run.lib.full((1,), dloss, dtype=probs.dtype)  # (1,)
    else:
        scale = run.lib.ascontiguousarray(dloss.astype(probs.dtype, copy=False).reshape(-1))  # (1,) or (N,)
    if reduction == "mean":
        scale = scale / _counted_labels(run, labels, K, ignore_index, probs.dtype)  # inf if none: those rows give 0
    step = np.int64(0 if scale.shape[0] == 1 else 1)
    return run.elementwise(SOFTMAX_CROSS_ENTROPY_BACKWARD)(
        probs, labels, np.int32(K), np.int64(ignore_index), scale, step, run.lib.empty((N, K), dtype=probs.dtype)
    )


def sgd_step(xp, param, grad, buf, *, lr, momentum, dampening, weight_decay, nesterov):
    """SGD with momentum after its first step in one kernel; other cases (no buffer yet, no momentum, mixed dtypes) run the reference."""
    if momentum == 0 or buf is None or not (grad.dtype == param.dtype == buf.dtype):
        return reference_optim.sgd_step(xp, param, grad, buf, lr=lr, momentum=momentum, dampening=dampening,
                                        weight_decay=weight_decay, nesterov=nesterov)
    with param.device:
        return sgd_step_on(cupy_runner(), param, grad, buf, lr=lr, momentum=momentum, dampening=dampening,
                           weight_decay=weight_decay, nesterov=nesterov)


def sgd_step_on(run, param, grad, buf, *, lr, momentum, dampening, weight_decay, nesterov):
    """:func:`sgd_step` on the :class:`~.compile.KernelRunner` ``run`` (a buffer, one dtype): ``(param, buf)``."""
    scalar = param.dtype.type
    kernel = run.elementwise(SGD_NESTEROV if nesterov else SGD_MOMENTUM)
    return kernel(param, grad, buf, scalar(lr), scalar(momentum), scalar(1 - dampening), scalar(weight_decay))
