"""``--breakdown``: where one training step's time goes, by layer type, with GFLOP/s for the GEMMs.

Every leaf module is timed through :func:`portable_cnn.nn.layer_hook`, which
the containers call each child through, so the model is timed as it is built
(nested containers too) and none of its methods is replaced. The clocks
synchronise the device around every layer call, so the step is slower than an
untimed one; the shares are what the breakdown is for.

A convolution's backward computes the weight gradient (one GEMM) and, except
for the first layer, the input gradient (another GEMM and a col2im); the
step's time of each conv backward is split between the two by the ratio of
direct calls of ``ops.conv2d_backward`` without and with the input gradient.
"""

from __future__ import annotations

import statistics
import time

from .. import backend, nn, ops, optim
from .protocol import LEARNING_RATE, MOMENTUM, build_model, make_batch

#: The rows of a breakdown, in order ("batch norm" only where the net has one).
CATEGORIES = ("conv forward", "conv backward-data", "conv backward-weights", "pooling", "elementwise",
              "batch norm", "linear", "loss", "optimizer")


def _category(layer) -> str:
    """The breakdown row of a leaf module other than a convolution."""
    if isinstance(layer, (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
        return "pooling"
    if isinstance(layer, (nn.ReLU, nn.Sigmoid, nn.Tanh, nn.Flatten, nn.Dropout, nn.Identity)):
        return "elementwise"
    if isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return "batch norm"
    if isinstance(layer, nn.Linear):
        return "linear"
    return "other"


def conv_flops(weight_shape, y_shape) -> int:
    """FLOPs of one of a convolution's three GEMMs (forward, backward-data, backward-weights).

    Each is ``2 * N*P*Q * K * C*R*S``: a multiply and an add per term. The
    weight is ``(K, C/G, R, S)`` for ``G`` groups, so its shape gives a
    grouped (depthwise) convolution's count too.

    >>> conv_flops((16, 1, 3, 3), (8, 16, 8, 8))
    147456
    """
    K, C, R, S = weight_shape
    N, _, P, Q = y_shape
    return 2 * N * P * Q * K * C * R * S


def _weights_fraction(layer, y_shape, clock) -> float:
    """The share of the weight gradient in a conv layer's full backward, from direct calls of the op."""
    x = layer._cache[0]  # the last forward's input
    layer.forward(x)  # again: the step's backward dropped the columns it kept
    saved = layer._cache[1]
    # The hook sees only call(), not the dy inside it; any array of dy's shape, dtype and device
    # runs the same GEMMs in the same time.
    xp = backend.namespace(x)
    dy = xp.ones(y_shape, dtype=x.dtype, device=backend.device(x))
    geometry = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups,
                    cols=saved, has_bias="bias" in layer.params)
    weights_only, full = [], []
    for _ in range(3):
        t0 = clock()
        ops.conv2d_backward(dy, x, layer.params["weight"], need_input_grad=False, **geometry)
        t1 = clock()
        ops.conv2d_backward(dy, x, layer.params["weight"], need_input_grad=True, **geometry)
        t2 = clock()
        weights_only.append(t1 - t0)
        full.append(t2 - t1)
    return min(statistics.median(weights_only) / max(statistics.median(full), 1e-12), 1.0)


def time_step_by_layer(model, x, labels, steps: int = 5) -> dict:
    """Time training steps of ``model`` by layer type: forward, softmax cross-entropy, backward, SGD with momentum.

    Two untimed steps come first; the medians over ``steps`` timed steps are
    reported. The model trains (its weights change).

    Parameters
    ----------
    model : portable_cnn.nn.Module
        A container (``Sequential``) of layers on ``x``'s backend.
    x : array, shape (N, C, H, W)
    labels : array, shape (N,)
        Integer class labels.
    steps : int
        Timed steps.

    Returns
    -------
    dict
        ``step_ms``, ``images_per_s_with_syncs``, ``steps``, ``loss_finite``,
        ``rows`` (per category of :data:`CATEGORIES`: ``ms``, ``percent``
        and, for the GEMMs, ``gflop`` and ``gflop_per_s``; then "other" if
        any module is of no category, and the Python and sync overhead),
        ``conv_backward_split`` (how the conv backward was split, or None)
        and ``note``.
    """
    xp = backend.namespace(x)
    loss_fn = nn.SoftmaxCrossEntropy(validate=False)
    optimizer = optim.SGD(model, lr=LEARNING_RATE, momentum=MOMENTUM)
    names = {id(module): name for name, module in model.named_modules()}

    def clock():
        backend.synchronize(xp)
        return time.perf_counter()

    current = {}  # row (or "conv backward <layer name>") -> seconds in the step being timed
    convs = {}  # conv layer name -> {"layer", "y_shape", "dx_computed"}

    def hook(layer, direction, call):
        if next(layer.children(), None) is not None:
            return call()  # a container: its leaves are timed
        t0 = clock()
        out = call()
        seconds = clock() - t0
        if isinstance(layer, nn.Conv2d):
            conv = convs.setdefault(names[id(layer)], {"layer": layer})
            if direction == "forward":
                key, conv["y_shape"] = "conv forward", tuple(out.shape)
            else:
                key, conv["dx_computed"] = f"conv backward {names[id(layer)]}", out is not None
        else:
            key = _category(layer)
        current[key] = current.get(key, 0.0) + seconds
        return out

    def step():
        t_start = clock()
        logits = model.forward(x)
        t0 = clock()
        loss = loss_fn.forward(logits, labels)
        dlogits = loss_fn.backward()
        t1 = clock()
        current["loss"] = t1 - t0
        model.backward(dlogits, need_input_grad=False)
        t2 = clock()
        optimizer.step()
        t3 = clock()
        current["optimizer"] = t3 - t2
        current["step total"] = t3 - t_start
        return loss

    per_step = []
    with nn.layer_hook(hook):
        for i in range(2 + max(steps, 1)):
            current.clear()
            loss = step()
            if i >= 2:  # the first two are warm-up
                per_step.append(dict(current))
    finite = bool(xp.all(xp.isfinite(loss)))
    median = {key: statistics.median(s.get(key, 0.0) for s in per_step) for key in set().union(*per_step)}

    flops = {"conv forward": 0, "conv backward-data": 0, "conv backward-weights": 0, "linear": 0}
    weights_s = data_s = 0.0
    split_how = None
    for name, conv in convs.items():
        layer = conv["layer"]
        flops_one = conv_flops(tuple(layer.params["weight"].shape), conv["y_shape"])
        flops["conv forward"] += flops_one
        flops["conv backward-weights"] += flops_one
        in_step = median[f"conv backward {name}"]
        if not conv["dx_computed"]:  # the first layer: its backward is the weight gradient alone
            weights_s += in_step
            continue
        flops["conv backward-data"] += flops_one
        fraction = _weights_fraction(layer, conv["y_shape"], clock)
        weights_s += in_step * fraction
        data_s += in_step * (1.0 - fraction)
        split_how = ("each conv layer's in-step backward time split by the ratio of direct calls of "
                     "ops.conv2d_backward with need_input_grad=False (dW, db) and =True (all)")
    batch = x.shape[0]
    for _, module in model.named_modules():
        if isinstance(module, nn.Linear):
            flops["linear"] += 3 * 2 * batch * module.in_features * module.out_features  # forward, dX and dW GEMMs

    times = {key: median.get(key, 0.0) for key in CATEGORIES}
    times["conv backward-data"] = data_s
    times["conv backward-weights"] = weights_s
    if "other" in median:
        times["other"] = median["other"]
    total = median["step total"]
    rows = []
    for key, seconds in times.items():
        if seconds == 0.0 and key in ("batch norm", "other"):
            continue
        row = {"category": key, "ms": 1000 * seconds, "percent": 100 * seconds / total}
        if key in flops and seconds > 0 and flops[key] > 0:
            row["gflop_per_s"] = flops[key] / seconds / 1e9
            row["gflop"] = flops[key] / 1e9
        rows.append(row)
    accounted = sum(times.values())
    rows.append({"category": "Python and sync overhead", "ms": 1000 * (total - accounted),
                 "percent": 100 * (total - accounted) / total})
    return {
        "step_ms": 1000 * total, "images_per_s_with_syncs": batch / total, "steps": len(per_step),
        "loss_finite": finite, "rows": rows, "conv_backward_split": split_how,
        "note": "per-layer clocks synchronise the device around every layer call; the step is slower than untimed",
    }


def run_breakdown(args, net: str, batch: int, backend_name: str, dtype: str) -> dict:
    """The breakdown of ``net`` at ``batch`` on one of our backends, with the benchmark's weights and batch.

    Parameters
    ----------
    args : argparse.Namespace
        The ``bench`` options; reads ``seed`` and ``breakdown_steps``.
    net : str
    batch : int
    backend_name : str
    dtype : {"float32", "float64"}

    Returns
    -------
    dict
        ``net``, ``batch_size``, ``backend``, ``dtype`` and what :func:`time_step_by_layer` returns.
    """
    x_np, y_np = make_batch(net, batch, dtype, args.seed)
    xp = backend.get_namespace(backend_name)
    model = build_model(net, args.seed).to(backend_name, dtype)
    x = backend.asarray(x_np, xp, dtype=dtype)
    labels = backend.asarray(y_np, xp)
    return {"net": net, "batch_size": batch, "backend": backend_name, "dtype": dtype,
            **time_step_by_layer(model, x, labels, steps=args.breakdown_steps)}
