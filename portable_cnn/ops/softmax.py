"""Softmax, log-softmax and the softmax cross-entropy: validation and dispatch.

All subtract the maximum along the class axis before ``exp`` so they stay
finite for logits of any finite magnitude (1e4 in the tests). The corners
are PyTorch's: a 0-d input is one element along its only axis (``softmax``
1, ``log_softmax`` 0, gradient 0) and an empty axis gives an empty result;
the ops answer those, so the kernels see a non-empty axis counted from 0.

:func:`softmax_cross_entropy` is ``torch.nn.functional.cross_entropy`` with
every option: class labels or probability targets, ``weight``,
``ignore_index``, ``reduction`` and ``label_smoothing``. Its gradient is
``p * sum_k c - c`` for target coefficients ``c`` (docs/derivation.md,
section 6); the arithmetic is in ``kernels/reference/softmax.py``, and in
CuPy's fused kernels for class labels without weight or smoothing.
"""

from __future__ import annotations

import numbers

from .. import backend, dispatch
from ..kernels.reference import softmax as _reference
from ._checks import check_float, check_grad_shape, check_same_dtype, namespace_of

__all__ = [
    "softmax",
    "softmax_backward",
    "log_softmax",
    "log_softmax_backward",
    "softmax_cross_entropy",
    "softmax_cross_entropy_backward",
    "check_loss_options",
    "one_hot",
    "REDUCTIONS",
]

#: The ``reduction`` values of the cross-entropy, PyTorch's.
REDUCTIONS = ("mean", "sum", "none")


def _check_axis(x, axis, where: str) -> int:
    """``axis`` counted from 0; a 0-d array has one axis (``-1`` or ``0``), as in PyTorch."""
    n = max(x.ndim, 1)
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral) or not -n <= axis < n:
        raise ValueError(f"{where}: expected axis in [{-n}, {n - 1}] for input of shape {tuple(x.shape)}, got {axis!r}")
    return int(axis) % n


def _along_axis(op, arrays, axis, where):
    """Kernel ``op`` on ``arrays`` along ``axis``, the first array deciding the shape; the corners answered here."""
    x = arrays[0]
    xp = namespace_of(*arrays, where=where)
    axis = _check_axis(x, axis, where)
    run = dispatch.kernel(op, xp, x.dtype)
    if x.ndim == 0:
        vectors = [xp.reshape(a, (1,)) for a in arrays]  # () -> (1,)
        return xp.reshape(run(xp, *vectors, 0), ())  # (1,) -> ()
    if x.shape[axis] == 0:
        return xp.empty_like(x)  # nothing to normalise (a maximum over nothing has no value)
    return run(xp, *arrays, axis)


def softmax(x, axis=-1, *, where="softmax"):
    """``exp(x) / sum(exp(x))`` along ``axis``, as ``torch.nn.functional.softmax(x, dim=axis)``.

    Parameters
    ----------
    x : array, any shape, real floating
    axis : int
        In ``[-x.ndim, x.ndim)``; ``-1`` or ``0`` for a 0-d ``x``.

    Returns
    -------
    array, shape of ``x``

    >>> import numpy as np
    >>> softmax(np.array([[0.0, 0.0], [1e4, 0.0]]))
    array([[0.5, 0.5],
           [1. , 0. ]])
    >>> softmax(np.array(3.0))
    array(1.)
    """
    check_float(x, where)
    return _along_axis("softmax_forward", (x,), axis, where)


def softmax_backward(dy, y, axis=-1, *, where="softmax"):
    """``y * (dy - sum(dy * y))`` along ``axis``, with ``y`` the forward's output (shape of ``y``)."""
    check_grad_shape(dy, y.shape, where)
    return _along_axis("softmax_backward", (dy, y), axis, where)


def log_softmax(x, axis=-1, *, where="log_softmax"):
    """``x - logsumexp(x)`` along ``axis``, as ``torch.nn.functional.log_softmax``; shapes as :func:`softmax`."""
    check_float(x, where)
    return _along_axis("log_softmax_forward", (x,), axis, where)


def log_softmax_backward(dy, y, axis=-1, *, where="log_softmax"):
    """``dy - exp(y) * sum(dy)`` along ``axis``, with ``y`` the forward's output (log-probabilities)."""
    check_grad_shape(dy, y.shape, where)
    return _along_axis("log_softmax_backward", (dy, y), axis, where)


def one_hot(labels, num_classes, dtype):
    """``(N,)`` integer labels to an ``(N, num_classes)`` array of 0/1 of ``dtype``."""
    xp = namespace_of(labels, where="one_hot")
    return _reference.one_hot(xp, labels, num_classes, dtype)


def check_loss_options(ignore_index, reduction, label_smoothing, where: str) -> tuple[int, str, float]:
    """``(ignore_index, reduction, label_smoothing)`` checked and as ``int``, ``str``, ``float``."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"{where}: expected an integer ignore_index, got {ignore_index!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{where}: expected reduction 'mean', 'sum' or 'none', got {reduction!r}")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, numbers.Real):
        raise TypeError(f"{where}: expected label_smoothing a number in [0, 1], got {label_smoothing!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{where}: expected label_smoothing in [0, 1], got {label_smoothing!r}")
    return int(ignore_index), reduction, float(label_smoothing)


def _layout(ndim: int) -> str:
    """The axes of class labels for logits of ``ndim + 1`` axes: ``()``, ``(N,)``, ``(N, d1)``, ..."""
    if ndim < 2:
        return ("()", "(N,)")[ndim]
    return "(N, " + ", ".join(f"d{i}" for i in range(1, ndim)) + ")"


def _check_loss_args(xp, logits, target, weight, where, name="logits"):
    """Shapes and dtypes of the loss's arrays; True for probability targets, False for class labels."""
    check_float(logits, where, name)
    shape = tuple(logits.shape)
    if logits.ndim == 0:
        raise ValueError(f"{where}: expected {name} of shape (K,), (N, K) or (N, K, d1, ...), got shape ()")
    axis = _reference.class_axis(logits.ndim)
    K = shape[axis]
    if K == 0:
        raise ValueError(f"{where}: expected at least one class, got {name} of shape {shape} (class axis {axis})")
    if weight is not None:
        if tuple(weight.shape) != (K,):
            raise ValueError(f"{where}: expected weight of shape ({K},) (one per class), got {tuple(weight.shape)}")
        check_same_dtype(weight, logits, where, "weight", name)
    if tuple(target.shape) == shape:  # PyTorch's rule: the logits' shape means probabilities
        if not xp.isdtype(target.dtype, "real floating"):
            raise TypeError(
                f"{where}: expected probability targets (target of the {name}' shape {shape}) of a real floating dtype, "
                f"got {backend.dtype_name(target)}"
            )
        check_same_dtype(target, logits, where, "target", name)
        return True
    if not xp.isdtype(target.dtype, "integral"):
        raise TypeError(f"{where}: expected integer labels, got {backend.dtype_name(target)}")
    expected = shape[:axis] + shape[axis + 1:]
    if target.ndim != len(expected):
        raise ValueError(
            f"{where}: expected labels of {len(expected)} dimensions {_layout(len(expected))}, got shape {tuple(target.shape)}"
        )
    if tuple(target.shape) != expected:
        if logits.ndim == 2:
            raise ValueError(f"{where}: expected {shape[0]} labels (one per row of {name} {shape}), got {target.shape[0]}")
        raise ValueError(
            f"{where}: expected labels of shape {expected} (the {name}' {shape} without the class axis), got {tuple(target.shape)}"
        )
    return False


def _check_label_range(xp, labels, K, ignore_index, where):
    """Labels in ``[0, K)`` or equal to ``ignore_index``; one host sync."""
    outside = (labels != ignore_index) & ((labels < 0) | (labels >= K))
    if bool(xp.any(outside)):
        values = backend.to_numpy(labels)
        values = values[values != ignore_index]
        raise ValueError(f"{where}: expected labels in [0, {K - 1}], got labels in [{values.min()}, {values.max()}]")


def softmax_cross_entropy(
    logits, target, *, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0, validate=True,
    where="softmax_cross_entropy",
):
    """Cross-entropy of ``softmax(logits)`` against ``target``, as ``torch.nn.functional.cross_entropy``.

    Parameters
    ----------
    logits : array, shape (N, K), (N, K, d1, ...) or unbatched (K,), real floating
        The class axis is 1 (0 when unbatched).
    target : array
        Integer class labels of the logits' shape without the class axis
        (``(N,)``, ``(N, d1, ...)``, or 0-d when unbatched), each in
        ``[0, K)`` or equal to ``ignore_index``; or probabilities, of the
        logits' shape and dtype.
    weight : array, shape (K,), optional
        A factor per class, of the logits' dtype.
    ignore_index : int
        Class labels equal to it add nothing to the loss nor to the mean's
        divisor (class labels only; must be negative with probabilities).
    reduction : {"mean", "sum", "none"}
        ``"mean"`` divides the sum by the summed weight of the counted
        labels (their number without ``weight``), or by the number of
        positions for probabilities; NaN when that is 0, as PyTorch.
    label_smoothing : float in [0, 1]
        The target becomes ``(1 - label_smoothing) * target + label_smoothing / K``.
    validate : bool
        Check the label range (one host sync on a GPU). With ``False`` a
        label outside ``[0, K)`` is treated as ignored.

    Returns
    -------
    loss : array
        0-d for ``"mean"`` and ``"sum"``; for ``"none"`` one loss per
        position, the shape of the class labels.
    probs : array, shape of ``logits``
        ``softmax(logits)`` along the class axis, which the backward needs.

    >>> import numpy as np
    >>> loss, _ = softmax_cross_entropy(np.zeros((2, 4)), np.array([0, 3]))
    >>> round(float(loss), 6) == round(float(np.log(4)), 6)
    True
    >>> loss, _ = softmax_cross_entropy(np.zeros((2, 4)), np.array([0, -100]), reduction="none")
    >>> loss.round(4)
    array([1.3863, 0.    ])
    """
    xp = namespace_of(logits, target, weight, where=where)
    ignore_index, reduction, label_smoothing = check_loss_options(ignore_index, reduction, label_smoothing, where)
    probabilities = _check_loss_args(xp, logits, target, weight, where)
    if probabilities and ignore_index >= 0:
        raise ValueError(
            f"{where}: ignore_index applies to class labels only; expected a negative one with probability targets, got {ignore_index}"
        )
    if validate and not probabilities:
        # Reading the answer back is a host sync on a GPU: callers that checked
        # their labels once (the trainer) pass validate=False.
        _check_label_range(xp, target, logits.shape[_reference.class_axis(logits.ndim)], ignore_index, where)
    return dispatch.kernel("softmax_cross_entropy_forward", xp, logits.dtype)(
        xp, logits, target, weight=weight, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing
    )


def softmax_cross_entropy_backward(
    probs, target, dloss=1.0, *, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
    where="softmax_cross_entropy",
):
    """The gradient of :func:`softmax_cross_entropy` with respect to the logits.

    Parameters
    ----------
    probs : array, shape of the logits
        What the forward returned.
    target, weight, ignore_index, reduction, label_smoothing
        The forward's.
    dloss : float or array
        ``dL/dloss``: a number, or an array of the loss's shape (0-d, or one
        per position for ``reduction="none"``, where a number applies to
        every position).

    Returns
    -------
    array, shape of ``probs``
        ``(probs * sum_k c - c) * dloss / divisor`` (docs/derivation.md,
        section 6); ``(probs - onehot(labels)) * dloss / N`` by default.
    """
    is_array = not isinstance(dloss, numbers.Real)
    xp = namespace_of(probs, target, weight, dloss if is_array else None, where=where)
    ignore_index, reduction, label_smoothing = check_loss_options(ignore_index, reduction, label_smoothing, where)
    _check_loss_args(xp, probs, target, weight, where, "probs")
    if is_array:
        axis = _reference.class_axis(probs.ndim)
        loss_shape = tuple(probs.shape[:axis] + probs.shape[axis + 1:]) if reduction == "none" else ()
        if tuple(dloss.shape) != loss_shape:
            raise ValueError(
                f"{where}: expected dloss of the loss's shape {loss_shape} (reduction={reduction!r}), got {tuple(dloss.shape)}"
            )
        check_same_dtype(dloss, probs, where, "dloss", "probs")
    else:
        dloss = float(dloss)
    return dispatch.kernel("softmax_cross_entropy_backward", xp, probs.dtype)(
        xp, probs, target, dloss, weight=weight, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing
    )
