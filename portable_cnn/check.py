"""``portable-cnn check``: every op and a small network, forward and backward, on every installed backend against the NumPy reference.

The first thing to run on a new machine, a new GPU or a new driver. Each
case below runs on each backend (``numpy`` with its kernels, ``cupy`` with
its CUDA kernels, ``torch`` and ``array_api_strict`` on the reference
kernels) in float64 and float32, and every output is compared with the
NumPy reference (``config_context(fast_paths=False)`` on NumPy, in float64)
on the same inputs, which are float32 numbers so that both dtypes see them
exactly. The network case trains one step: forward, cross-entropy, backward,
an SGD step with momentum and an Adam step, in BatchNorm's training mode.

An element passes when ``|got - want| <= atol + rtol * |want|``
(:data:`TOLERANCES`, ``numpy.allclose``'s rule); the table reports the worst
``|got - want| / (|want| + atol / rtol)`` of a backend and dtype, which must
not exceed ``rtol``. TF32 is off while the checks run.

>>> results, skipped = run_checks(["numpy"], ["float64"])
>>> [(r.backend, r.dtype, r.passed) for r in results]
[('numpy', 'float64', True)]
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, field

import numpy as np

from . import backend, nn, ops, optim
from .config import config_context, get_config

__all__ = ["TOLERANCES", "DTYPES", "CASES", "CheckResult", "run_checks", "format_table",
           "add_check_parser", "run_check"]

#: Per dtype, what a result may differ from the float64 reference: elementwise
#: ``|got - want| <= atol + rtol * |want|``. The tests' cross-backend and
#: PyTorch comparisons (tests/conftest.py) read the same table.
TOLERANCES = {
    "float64": {"rtol": 1e-9, "atol": 1e-11},
    "float32": {"rtol": 2e-4, "atol": 2e-5},
}

DTYPES = ("float64", "float32")


# ------------------------------------------------------------------------- cases
#
# A case is (make, compute): make(rng) gives its inputs as NumPy arrays (floats
# are float32 numbers held in float64); compute(**inputs) runs ops on them, once
# moved to a backend and dtype, and returns named outputs.


def _floats(rng, *shape) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32).astype(np.float64)


def _output_grad(y):
    """A varied, deterministic ``dL/dy`` of ``y``'s shape, dtype and device: ``cos(0), cos(1), ...``."""
    xp = backend.namespace(y)
    steps = xp.arange(math.prod(y.shape), dtype=y.dtype, device=backend.device(y))
    return xp.reshape(xp.cos(steps), tuple(y.shape))  # (shape of y)


def _conv(x_shape, w_shape, relu=False, **options):
    def make(rng):
        return {"x": _floats(rng, *x_shape), "weight": _floats(rng, *w_shape), "bias": _floats(rng, w_shape[0])}

    def compute(x, weight, bias):
        y, cols = ops.conv2d(x, weight, bias, relu=relu, return_cols=True, **options)
        dx, dweight, dbias = ops.conv2d_backward(_output_grad(y), x, weight, cols=cols,
                                                 relu_output=y if relu else None, **options)
        return {"y": y, "dx": dx, "dweight": dweight, "dbias": dbias}

    return make, compute


def _image(shape):
    return lambda rng: {"x": _floats(rng, *shape)}


def _max_pool(shape, *window, relu=False, **options):
    pool = ops.max_pool2d_relu if relu else ops.max_pool2d

    def compute(x):
        y, argmax = pool(x, *window, **options)
        return {"y": y, "dx": ops.max_pool2d_backward(_output_grad(y), argmax, tuple(x.shape), *window, **options)}

    return _image(shape), compute


def _avg_pool(shape, *window, **options):
    def compute(x):
        y = ops.avg_pool2d(x, *window, **options)
        return {"y": y, "dx": ops.avg_pool2d_backward(_output_grad(y), tuple(x.shape), *window, **options)}

    return _image(shape), compute


def _adaptive_pool(shape, output_size):
    def compute(x):
        y = ops.adaptive_avg_pool2d(x, output_size)
        return {"y": y, "dx": ops.adaptive_avg_pool2d_backward(_output_grad(y), tuple(x.shape), output_size)}

    return _image(shape), compute


def _global_pool(x):
    y = ops.global_avg_pool2d(x)
    return {"y": y, "dx": ops.global_avg_pool2d_backward(_output_grad(y), tuple(x.shape))}


def _activation(forward, backward, saves_input):
    """relu's backward takes the input; sigmoid's and tanh's their output."""

    def compute(x):
        y = forward(x)
        return {"y": y, "dx": backward(_output_grad(y), x if saves_input else y)}

    return _image((2, 3, 4, 5)), compute


def _along_classes(forward, backward):
    def compute(x):
        y = forward(x, axis=1)
        return {"y": y, "dx": backward(_output_grad(y), y, axis=1)}

    return _image((5, 7)), compute


def _linear_make(rng):
    return {"x": _floats(rng, 6, 7), "weight": _floats(rng, 5, 7), "bias": _floats(rng, 5)}


def _linear(x, weight, bias):
    y = ops.linear(x, weight, bias)
    dx, dweight, dbias = ops.linear_backward(_output_grad(y), x, weight)
    return {"y": y, "dx": dx, "dweight": dweight, "dbias": dbias}


def _flatten(x):
    y = ops.flatten(x)
    return {"y": y, "dx": ops.flatten_backward(_output_grad(y), tuple(x.shape))}


def _loss_make(rng):
    return {"logits": _floats(rng, 6, 5) * 3, "labels": rng.integers(0, 5, 6)}


def _loss(logits, labels):
    loss, probs = ops.softmax_cross_entropy(logits, labels, label_smoothing=0.1)
    return {"loss": loss, "dlogits": ops.softmax_cross_entropy_backward(probs, labels, label_smoothing=0.1)}


def _batch_norm(training):
    def make(rng):
        C = 3
        return {"x": _floats(rng, 4, C, 3, 5) * 2 + 1, "weight": _floats(rng, C), "bias": _floats(rng, C),
                "running_mean": _floats(rng, C), "running_var": np.abs(_floats(rng, C)) + 0.5}

    def compute(x, weight, bias, running_mean, running_var):
        y, cache, mean, var = ops.batch_norm(x, weight, bias, running_mean, running_var, training=training)
        dx, dweight, dbias = ops.batch_norm_backward(_output_grad(y), cache)
        return {"y": y, "dx": dx, "dweight": dweight, "dbias": dbias, "running_mean": mean, "running_var": var}

    return make, compute


def _dropout_make(rng):
    return {"x": _floats(rng, 3, 4, 5), "uniform": rng.random((3, 4, 5)).astype(np.float32).astype(np.float64)}


def _dropout(x, uniform):
    y, mask = ops.dropout(x, 0.3, uniform)
    return {"y": y, "dx": ops.dropout_backward(_output_grad(y), mask)}


def small_network(seed: int = 0) -> nn.Sequential:
    """The network of the ``network`` case: ``(N, 2, 8, 8)`` to 3 logits through most kinds of layer.

    A convolution, BatchNorm and ReLU; a residual block of a grouped and a
    depthwise convolution; max pooling, a convolution, tanh, average and
    global average pooling; flatten, linear, sigmoid, linear.
    """
    g = np.random.default_rng(seed)
    # No bias before a BatchNorm: its gradient would be zero up to rounding, and
    # Adam's first step, lr * g / |g|, would turn that rounding into a full step.
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, bias=False, rng=g), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Residual(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=2, bias=False, rng=g), nn.BatchNorm2d(4),
                                  nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1, groups=4, rng=g))),
        nn.MaxPool2d(2),  # (4, 4, 4)
        nn.Conv2d(4, 6, 3, padding=1, rng=g), nn.Tanh(),
        nn.AvgPool2d(2),  # (6, 2, 2)
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(6, 8, rng=g), nn.Sigmoid(), nn.Linear(8, 3, rng=g),
    )


def _network_make(rng):
    return {"x": _floats(rng, 4, 2, 8, 8), "labels": rng.integers(0, 3, 4)}


def _network(x, labels):
    """One training step: logits, loss, gradients, then the weights after an SGD and an Adam step."""
    model = small_network().to(backend.namespace(x), backend.dtype_name(x))
    loss_fn = nn.CrossEntropyLoss()
    logits = model.forward(x)
    out = {"logits": logits, "loss": loss_fn.forward(logits, labels), "dx": model.backward(loss_fn.backward())}
    out.update({f"grad {name}": layer.grads[key] for name, layer, key in model.named_parameters()})
    optim.SGD(model, lr=0.1, momentum=0.9, weight_decay=1e-3).step()
    out.update({f"sgd {name}": layer.params[key] for name, layer, key in model.named_parameters()})
    optim.Adam(model, lr=0.01, weight_decay=1e-3).step()
    out.update({f"adam {name}": value for name, value in model.state_dict().items()})
    return out


#: Name -> (make inputs, compute outputs); every op's forward and backward, then the network.
CASES = {
    "conv2d": _conv((2, 3, 7, 6), (4, 3, 3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2)),
    "conv2d grouped": _conv((2, 4, 6, 6), (6, 2, 3, 3), padding=1, groups=2),
    "conv2d depthwise": _conv((2, 4, 7, 7), (8, 1, 3, 3), stride=2, padding=1, groups=4),
    "conv2d then relu": _conv((2, 3, 7, 6), (4, 3, 3, 3), relu=True, padding=1),
    "max_pool2d": _max_pool((2, 3, 7, 7), 3, 2, 1, ceil_mode=True),
    "max_pool2d dilation": _max_pool((2, 3, 9, 8), 2, 1, 0, dilation=2),
    "max_pool2d then relu": _max_pool((2, 3, 7, 7), 3, 2, 1, relu=True, ceil_mode=True),
    "avg_pool2d": _avg_pool((2, 3, 7, 6), 3, 2, 1, ceil_mode=True, count_include_pad=False),
    "avg_pool2d divisor_override": _avg_pool((2, 3, 6, 6), 2, 2, 0, divisor_override=3),
    "adaptive_avg_pool2d": _adaptive_pool((2, 3, 7, 5), (3, 2)),
    "global_avg_pool2d": (_image((2, 3, 5, 4)), _global_pool),
    "relu": _activation(ops.relu, ops.relu_backward, saves_input=True),
    "sigmoid": _activation(ops.sigmoid, ops.sigmoid_backward, saves_input=False),
    "tanh": _activation(ops.tanh, ops.tanh_backward, saves_input=False),
    "linear": (_linear_make, _linear),
    "flatten": (_image((2, 3, 2, 2)), _flatten),
    "softmax": _along_classes(ops.softmax, ops.softmax_backward),
    "log_softmax": _along_classes(ops.log_softmax, ops.log_softmax_backward),
    "softmax_cross_entropy": (_loss_make, _loss),
    "batch_norm training": _batch_norm(training=True),
    "batch_norm evaluation": _batch_norm(training=False),
    "dropout": (_dropout_make, _dropout),
    "network": (_network_make, _network),
}


# ------------------------------------------------------------------------- running


@dataclass
class CheckResult:
    """One backend in one dtype against the reference.

    ``worst_error`` is the largest ``|got - want| / (|want| + atol / rtol)``
    over every output of every case (``worst``: which), ``tolerance`` the
    dtype's ``rtol``; ``failures`` lists the outputs above it, ``error`` an
    exception that stopped the run.
    """

    backend: str
    device: str
    dtype: str
    checks: int = 0
    worst_error: float = 0.0
    tolerance: float = 0.0
    worst: str = ""
    failures: list = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.error is None and not self.failures


def _inputs_on(inputs: dict, xp, dtype: str) -> dict:
    """Float inputs in ``dtype``, integer ones as they are, all on ``xp``."""
    return {k: backend.asarray(v, xp, dtype=dtype if v.dtype.kind == "f" else None) for k, v in inputs.items()}


def _error(got, want: np.ndarray, tol: dict) -> float:
    """The worst ``|got - want| / (|want| + atol / rtol)``; infinite for a shape mismatch or a non-finite value."""
    got = np.asarray(backend.to_numpy(got), dtype=np.float64)
    if got.shape != want.shape or not np.all(np.isfinite(got) == np.isfinite(want)):
        return math.inf
    finite = np.isfinite(want)
    if not finite.any():
        return 0.0
    scaled = np.abs(got[finite] - want[finite]) / (np.abs(want[finite]) + tol["atol"] / tol["rtol"])
    return float(scaled.max())


def _device_text(name: str, xp) -> str:
    """Where ``xp`` puts a new array: ``cpu``, or for CuPy the GPU's number and name."""
    if name == "cupy":
        return backend.cupy_status()[1]
    return str(backend.device(backend.asarray(np.zeros(1), xp)))


def run_checks(backends=None, dtypes=DTYPES, *, seed: int = 0) -> tuple[list[CheckResult], dict]:
    """Run :data:`CASES` on each backend and dtype against the NumPy reference in float64.

    Parameters
    ----------
    backends : sequence of str, optional
        Names of :data:`portable_cnn.backend.BACKENDS`; default: every one
        that can run here.
    dtypes : sequence of str
        ``"float64"``, ``"float32"``.
    seed : int
        Seeds the inputs and the network's weights.

    Returns
    -------
    results : list of CheckResult
        One per backend and dtype, in that order.
    skipped : dict
        Backend name -> why it cannot run (only when ``backends`` is None).

    Raises
    ------
    portable_cnn.backend.BackendUnavailableError
        For a backend named in ``backends`` that cannot run here.
    """
    rng = np.random.default_rng(seed)
    inputs = {name: make(rng) for name, (make, _) in CASES.items()}
    numpy = backend.get_namespace("numpy")
    with config_context(fast_paths=False, tf32=False):
        reference = {name: {k: np.asarray(backend.to_numpy(v), dtype=np.float64)
                            for k, v in compute(**_inputs_on(inputs[name], numpy, "float64")).items() if v is not None}
                     for name, (_, compute) in CASES.items()}
    skipped = {}
    namespaces = {}
    for name in backends if backends is not None else backend.BACKENDS:
        try:
            namespaces[name] = backend.get_namespace(name)
        except backend.BackendUnavailableError as exc:
            if backends is not None:
                raise
            skipped[name] = str(exc)
    results = []
    for name, xp in namespaces.items():
        for dtype in dtypes:
            results.append(_check_backend(name, xp, dtype, inputs, reference))
    return results, skipped


def _check_backend(name, xp, dtype, inputs, reference) -> CheckResult:
    tol = TOLERANCES[dtype]
    result = CheckResult(name, _device_text(name, xp), dtype, tolerance=tol["rtol"])
    start = time.perf_counter()
    with config_context(tf32=False):
        for case, (_, compute) in CASES.items():
            try:
                outputs = compute(**_inputs_on(inputs[case], xp, dtype))
            except Exception as exc:  # a broken driver or kernel: a failed row, not a traceback
                result.error = f"{case}: {type(exc).__name__}: {exc}"
                break
            for output, want in reference[case].items():
                error = _error(outputs[output], want, tol)
                result.checks += 1
                if error > tol["rtol"]:
                    result.failures.append(f"{case}: {output}: {error:.1e}")
                if error > result.worst_error:
                    result.worst_error, result.worst = error, f"{case}: {output}"
    result.seconds = time.perf_counter() - start
    return result


def format_table(results: list[CheckResult]) -> str:
    """The table ``portable-cnn check`` prints: one line per backend and dtype."""
    header = ("backend", "device", "dtype", "checks", "worst error", "tolerance", "result", "worst at")
    rows = [(r.backend, r.device, r.dtype, str(r.checks), f"{r.worst_error:.1e}", f"{r.tolerance:.0e}",
             "pass" if r.passed else "FAIL", "stopped by an error" if r.error else r.worst or "(all exact)")
            for r in results]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    right = {3, 4, 5}  # numbers
    lines = ["  ".join(cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in [header, *rows]]
    return "\n".join(line.rstrip() for line in lines)


# ------------------------------------------------------------------------- command line


def _names(choices):
    """An argparse type: a comma-separated list of ``choices``."""

    def parse(text):
        items = [item.strip() for item in text.split(",") if item.strip()]
        unknown = [item for item in items if item not in choices]
        if not items or unknown:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(choices)}, got {text!r}")
        return items

    return parse


def add_check_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``check`` subcommand (:data:`portable_cnn.cli.EXTENSIONS` imports this module only to run it)."""
    p = subparsers.add_parser(
        "check", help="every op and a small net on every installed backend against the NumPy reference",
        description="Run every op and a small network, forward and backward, on every backend installed here "
                    "(numpy, cupy, torch, array_api_strict) in float64 and float32, compare each output with the "
                    "NumPy reference in float64, and print a table. Exits 1 on any mismatch: run it first on a new "
                    "machine, GPU or driver.",
    )
    p.add_argument("--backends", type=_names(backend.BACKENDS), default=None,
                   help="comma-separated backends to check (default: every one that can run here; one named here "
                        "that cannot run is an error)")
    p.add_argument("--dtypes", type=_names(DTYPES), default=list(DTYPES), help="default: float64,float32")
    p.set_defaults(func=run_check)
    return p


#: How many mismatching outputs of one backend and dtype the command lists (the first ones, in case order).
MISMATCHES_SHOWN = 8


def run_check(args) -> int:
    """``portable-cnn check``: 0 when every backend and dtype passes, 1 otherwise."""
    from .run import RunError

    get_config()  # a bad settings variable is one line before any work
    try:
        results, skipped = run_checks(args.backends, args.dtypes)
    except backend.BackendUnavailableError as exc:
        raise RunError(str(exc)) from None
    print(format_table(results))
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    for r in results:
        failures = [r.error] if r.error else r.failures
        for failure in failures[:MISMATCHES_SHOWN]:
            print(f"mismatch: {r.backend} {r.dtype}: {failure}")
        if len(failures) > MISMATCHES_SHOWN:
            print(f"mismatch: {r.backend} {r.dtype}: ... and {len(failures) - MISMATCHES_SHOWN} more outputs")
    failed = [r for r in results if not r.passed]
    seconds = sum(r.seconds for r in results)
    if failed:
        print(f"FAILED: {len(failed)} of {len(results)} backend/dtype runs differ from the NumPy reference "
              f"beyond their tolerance ({seconds:.1f} s)")
        return 1
    print(f"all {len(results)} backend/dtype runs agree with the NumPy reference, {len(CASES)} cases each "
          f"({seconds:.1f} s)")
    return 0
