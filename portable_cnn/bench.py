"""``portable-cnn bench``: training and inference throughput beside native PyTorch, in the same run.

What is measured, per network (``lenet`` 1x28x28, ``vgg-small`` 3x32x32),
batch size and backend:

* **train**: one optimizer step = forward, softmax cross-entropy, backward,
  SGD with momentum 0.9; images/s = batch size / step time.
* **infer**: one forward pass in evaluation mode.

Backends are ours (``numpy``, ``torch`` = our code on PyTorch tensors through
the array API, ``cupy``) and the reference, native PyTorch (``torch.nn`` and
``torch.optim.SGD``, the same network with the same weights loaded from our
``state_dict``, the same batch and dtype), on the CPU for the CPU backends and
on the GPU (cuDNN) for CuPy. Every figure is a ratio to that reference.

Protocol (docs/benchmarks.md says the same in prose):

1. Every runner gets the same NumPy weights and the same batch, moved to its
   device once, outside the clock.
2. The first step of each runner is checked: its loss (training) or logits
   (inference) must equal the reference's within the dtype's tolerance.
   Without PyTorch the reference for the check is our NumPy code in float64.
3. Warm-up steps are excluded. A calibration step sets the steps per repeat
   so that one repeat lasts about ``--repeat-seconds``.
4. A repeat restores the initial weights and a fresh optimizer and takes one
   untimed step that creates the optimizer state (so every repeat measures the
   same steady-state computation, and a long run cannot drift into memorised,
   denormal territory), synchronises the device, reads the clock, runs the
   steps, synchronises, reads the clock again, and then checks that the last
   loss is finite.
5. Runners of one configuration are interleaved, one repeat each per round in
   alternating order, so a load change on the machine hits ours and the
   reference alike; ratios are the median of the per-round ratios, with their
   min-max. An idle pause before each repeat lets the previous runner's worker
   threads (OpenBLAS spins about 0.1 s) go to sleep.
6. Repeats continue past ``--repeats`` until every runner's median moves less
   than ``--stable-tol`` over its last two repeats, or ``--max-seconds`` pass.

The report: the BLAS library and kernel (threadpoolctl), thread counts, a
table in the terminal, a JSON file (``--json``), a PNG plot (``--plot``), the
peak memory, the CuPy-over-NumPy speed-up and the batch size at which the GPU
overtakes the CPU, and with ``--breakdown`` a per-layer-type time split with
GFLOP/s for the convolutions.

matplotlib and threadpoolctl are optional (the ``bench`` extra): without them
the plot or the BLAS line is skipped with a message saying what to install.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import importlib.metadata
import importlib.util
import inspect
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from . import __version__, backend

__all__ = ["NETS", "add_bench_parser", "run_bench", "main"]

#: Input shape ``(C, H, W)`` of each network the benchmark knows.
NETS = {"lenet": (1, 28, 28), "vgg-small": (3, 32, 32), "digits": (1, 8, 8)}
NUM_CLASSES = 10
OUR_BACKENDS = ("numpy", "torch", "cupy", "array_api_strict")
MODES = ("train", "infer")
LEARNING_RATE = 0.01
MOMENTUM = 0.9
# The first-step check: our loss/logits against the reference's, same weights, same batch.
CHECK_TOLERANCES = {
    "float32": {"rtol": 1e-4, "atol": 1e-4},
    "float64": {"rtol": 1e-9, "atol": 1e-10},
    # TF32 keeps 10 mantissa bits in the GEMMs: about 1e-3 relative per product.
    "tf32": {"rtol": 2e-2, "atol": 2e-2},
}
MAX_STEPS_PER_REPEAT = {"train": 50, "infer": 200}
BLAS_ENV = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_THREAD_TIMEOUT", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


# --------------------------------------------------------------------------
# Command line


def _csv(kind, choices=None):
    def parse(text):
        items = [item.strip() for item in text.split(",") if item.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind}, got {text!r}")
        if kind == "batch sizes":
            try:
                values = [int(item) for item in items]
            except ValueError:
                raise argparse.ArgumentTypeError(f"batch sizes must be integers, got {text!r}") from None
            if any(v < 1 for v in values):
                raise argparse.ArgumentTypeError(f"batch sizes must be positive, got {text!r}")
            return values
        unknown = [item for item in items if item not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {kind} {', '.join(unknown)}; choose from {', '.join(choices)}")
        return items

    return parse


_DESCRIPTION = (
    "Training-step and inference images/s of lenet and vgg-small on our backends, beside native PyTorch in the "
    "same run (same net, weights and batch), with the ratio, the spread and a result check. "
    "See benchmarks/README.md."
)


def _configure_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--nets", type=_csv("nets", tuple(NETS)), default=["lenet", "vgg-small"],
                        help="comma-separated networks (default: lenet,vgg-small; also: digits)")
    parser.add_argument("--batch-sizes", type=_csv("batch sizes"), default=[32, 128, 256],
                        help="comma-separated batch sizes (default: 32,128,256)")
    parser.add_argument("--backends", type=_csv("backends", OUR_BACKENDS), default=None,
                        help="comma-separated backends of ours: numpy, torch (our code on torch tensors), cupy, "
                             "array_api_strict (default: every available among numpy, torch, cupy)")
    parser.add_argument("--modes", type=_csv("modes", MODES), default=list(MODES),
                        help="train, infer or both (default: train,infer)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats at least (default 7)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps per runner (default 2)")
    parser.add_argument("--repeat-seconds", type=float, default=1.0,
                        help="target duration of one repeat; sets the steps per repeat (default 1.0; at 0.2 a "
                             "vgg-small repeat on 2 cores was a single step)")
    parser.add_argument("--max-seconds", type=float, default=30.0,
                        help="time cap per configuration (net, batch, mode): past it no new round of repeats "
                             "starts once every runner has min(--repeats, 3) (default 30)")
    parser.add_argument("--stable-tol", type=float, default=0.02,
                        help="stop once each median moves less than this fraction over the last two repeats "
                             "(default 0.02)")
    parser.add_argument("--gap-seconds", type=float, default=0.15,
                        help="idle pause before each repeat, outside the clock, so that the previous runner's "
                             "worker threads stop spinning (default 0.15; OpenBLAS's spin about 0.1 s)")
    parser.add_argument("--quick", action="store_true",
                        help="a short run: 3 repeats, 1 warm-up step, 0.05 s repeats, 3 s cap")
    parser.add_argument("--no-reference", action="store_true",
                        help="skip native PyTorch even where it is installed (no ratios)")
    parser.add_argument("--tf32", action="store_true",
                        help="allow TF32 on the GPU for both CuPy and PyTorch (default: off on both sides)")
    parser.add_argument("--breakdown", action="store_true",
                        help="also time each layer type: conv forward, backward-data, backward-weights, pooling, "
                             "elementwise, linear, loss, optimizer, with GFLOP/s")
    parser.add_argument("--breakdown-steps", type=int, default=5, help="timed steps of the breakdown (default 5)")
    parser.add_argument("--breakdown-backends", type=_csv("backends", OUR_BACKENDS), default=None,
                        help="backends to break down (default: numpy and cupy among those measured)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the batch (default 0)")
    parser.add_argument("--json", dest="json_path", default="bench-results/bench.json",
                        help="where to write the results as JSON (default bench-results/bench.json; '' to skip)")
    parser.add_argument("--plot", dest="plot_path", default="bench-results/bench.png",
                        help="where to write the PNG plot (default bench-results/bench.png; '' to skip)")
    parser.add_argument("--markdown", dest="markdown_path", default="",
                        help="also write the results table in Markdown to this path")
    parser.add_argument("--quiet", action="store_true", help="no progress lines, only the report")
    return parser


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``bench`` subcommand to an ``argparse`` subparsers object; returns its parser.

    The parser's default ``func`` is :func:`run_bench`.
    """
    parser = subparsers.add_parser(
        "bench",
        help="training/inference images/s beside native PyTorch",
        description=_DESCRIPTION,
    )
    _configure_parser(parser)
    parser.set_defaults(func=run_bench)
    return parser


def main(argv=None) -> int:
    """``python -m portable_cnn.bench [options]``: the same as ``portable-cnn bench``."""
    parser = _configure_parser(argparse.ArgumentParser(prog="portable-cnn bench", description=_DESCRIPTION))
    return run_bench(parser.parse_args(argv))


# --------------------------------------------------------------------------
# Small helpers


def _log(args, message):
    if not getattr(args, "quiet", False):
        print(message, file=sys.stderr, flush=True)


def _torch_installed() -> bool:
    if "torch" in sys.modules:  # None there marks a module known to be missing
        return sys.modules["torch"] is not None
    return importlib.util.find_spec("torch") is not None


def _peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def _summary(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _stable(samples, repeats, tol) -> bool:
    """At least ``repeats`` samples and the median moved less than ``tol`` over the last two."""
    if len(samples) < max(repeats, 3):
        return False
    now = statistics.median(samples)
    before = statistics.median(samples[:-2])
    return abs(now - before) <= tol * now


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_simd() -> str | None:
    """The widest x86 vector extension the CPU reports (``/proc/cpuinfo`` flags), if any is known."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return None
    for name in ("avx512f", "avx2", "avx", "sse4_2"):
        if name in flags:
            return name
    return None


def _git_revision() -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return rev + ("+modified" if dirty else "")


def _blas_info():
    """``(rows, message)``: threadpoolctl's view of the BLAS/OpenMP libraries loaded, or why it is missing."""
    try:
        import threadpoolctl
    except ImportError:
        config = {}
        try:
            config = np.show_config(mode="dicts").get("Build Dependencies", {}).get("blas", {})
        except Exception:  # older NumPy: no dict mode
            pass
        built = f"NumPy was built against {config.get('name', '?')} {config.get('version', '')}".strip()
        return [], (f"threadpoolctl not installed, so the BLAS kernel in use is unknown ({built}); "
                    "pip install 'portable-cnn[bench]'")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        info = threadpoolctl.threadpool_info()
    keys = ("user_api", "internal_api", "prefix", "version", "architecture", "threading_layer", "num_threads")
    rows = [{key: entry.get(key) for key in keys} for entry in info]
    message = "; ".join(str(w.message).splitlines()[0] for w in caught) or None
    return rows, message


def _environment(args, backends, torch_mod, cupy_info) -> dict:
    env = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {
            "cpu": _cpu_model(),
            "simd": _cpu_simd(),
            "cpu_count": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "versions": {"portable_cnn": __version__, "numpy": np.__version__, "git": _git_revision()},
        "blas_env": {name: os.environ[name] for name in BLAS_ENV if name in os.environ},
        "dtype": args.dtype,
        "backends": backends,
        "protocol": {
            "repeats_min": args.repeats, "warmup_steps": args.warmup, "repeat_seconds": args.repeat_seconds,
            "max_seconds_per_config": args.max_seconds, "stable_tol": args.stable_tol,
            "gap_seconds": args.gap_seconds,
            "optimizer": f"SGD(lr={LEARNING_RATE}, momentum={MOMENTUM})", "seed": args.seed,
            "timing": "device synchronised before each clock read; median over repeats, min-max spread",
        },
    }
    try:
        env["versions"]["array_api_compat"] = importlib.metadata.version("array-api-compat")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - a base dependency
        pass
    rows, message = _blas_info()
    env["blas"] = rows
    env["blas_note"] = message
    if torch_mod is not None:
        env["versions"]["torch"] = torch_mod.__version__
        env["torch"] = {
            "num_threads": torch_mod.get_num_threads(),
            "num_interop_threads": torch_mod.get_num_interop_threads(),
            "mkldnn": bool(torch_mod.backends.mkldnn.is_available()),
            "cuda": bool(torch_mod.cuda.is_available()),
        }
        if torch_mod.cuda.is_available():
            env["torch"]["cuda_device"] = torch_mod.cuda.get_device_name()
            env["torch"]["cudnn"] = torch_mod.backends.cudnn.version()
    if cupy_info is not None:
        env["cupy"] = cupy_info
        cupy = sys.modules.get("cupy")
        if cupy is not None:
            env["versions"]["cupy"] = cupy.__version__
            try:
                env["versions"]["cuda_runtime"] = cupy.cuda.runtime.runtimeGetVersion()
            except Exception:  # informational only
                pass
    try:
        import matplotlib

        env["versions"]["matplotlib"] = matplotlib.__version__
    except ImportError:
        pass
    return env


# --------------------------------------------------------------------------
# TF32


def _configure_tf32(enabled: bool, use_cupy: bool, torch_mod) -> dict:
    """Switch TF32 on or off for both sides; return what was set and how."""
    out = {"enabled": enabled}
    if torch_mod is not None:
        if hasattr(torch_mod.backends.cuda.matmul, "fp32_precision"):
            # PyTorch >= 2.9: the new API; mixing it with allow_tf32 makes later reads raise.
            precision = "tf32" if enabled else "ieee"
            torch_mod.backends.cuda.matmul.fp32_precision = precision
            torch_mod.backends.cudnn.conv.fp32_precision = precision
            out["torch"] = f"torch.backends.cuda.matmul and cudnn.conv fp32_precision = {precision!r}"
        else:
            torch_mod.backends.cuda.matmul.allow_tf32 = enabled
            torch_mod.backends.cudnn.allow_tf32 = enabled
            out["torch"] = f"torch.backends.cuda.matmul.allow_tf32 and cudnn.allow_tf32 = {enabled}"
    if use_cupy:
        backend.set_tf32(enabled)
        out["cupy"] = f"portable_cnn.backend.set_tf32({enabled}): CuPy float32 GEMMs TF32 {backend.tf32_enabled()}"
    return out


# --------------------------------------------------------------------------
# Networks


def _build_numpy_model(net, seed):
    from . import models

    C, H, W = NETS[net]
    return models.build_model(net, in_channels=C, num_classes=NUM_CLASSES, input_size=(H, W), seed=seed)


def _torch_layer(torch_mod, layer):
    """The ``torch.nn`` module equivalent to one of our layers (same hyperparameters)."""
    from . import nn

    tnn = torch_mod.nn
    if isinstance(layer, nn.Conv2d):
        return tnn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                          layer.dilation, bias="bias" in layer.params)
    if isinstance(layer, nn.Linear):
        return tnn.Linear(layer.in_features, layer.out_features, bias="bias" in layer.params)
    if isinstance(layer, nn.MaxPool2d):
        return tnn.MaxPool2d(layer.kernel_size, layer.stride, layer.padding)
    if isinstance(layer, nn.AvgPool2d):
        return tnn.AvgPool2d(layer.kernel_size, layer.stride, layer.padding)
    simple = {"ReLU": tnn.ReLU, "Sigmoid": tnn.Sigmoid, "Tanh": tnn.Tanh, "Flatten": tnn.Flatten}
    if type(layer).__name__ in simple:
        return simple[type(layer).__name__]()
    if type(layer).__name__ == "BatchNorm2d":
        return tnn.BatchNorm2d(layer.num_features, eps=layer.eps, momentum=layer.momentum)
    if type(layer).__name__ == "Dropout":
        return tnn.Dropout(layer.p)
    raise TypeError(f"bench: no torch.nn equivalent known for layer {layer!r}")


def _torch_model(torch_mod, model, state, device, dtype):
    net = torch_mod.nn.Sequential(*[_torch_layer(torch_mod, layer) for layer in model])
    # np.array(copy): torch.from_numpy warns on read-only arrays and shares memory otherwise.
    tensors = {k: torch_mod.from_numpy(np.array(v, copy=True)) for k, v in state.items()}
    net.load_state_dict(tensors)
    return net.to(device=device, dtype=getattr(torch_mod, dtype)), tensors


def _has_dropout(model) -> bool:
    return any(type(layer).__name__ == "Dropout" for layer in model)


# --------------------------------------------------------------------------
# Runners: one per (backend or reference) for one configuration


class _OursRunner:
    """Our library on one backend."""

    is_reference = False

    def __init__(self, backend_name, net, state, x_np, y_np, mode, dtype, seed):
        from . import nn

        self.name = backend_name
        self.label = {"torch": "ours on torch tensors"}.get(backend_name, f"ours on {backend_name}")
        self.device_kind = "gpu" if backend_name == "cupy" else "cpu"
        self.mode = mode
        self.xp = backend.get_namespace(backend_name)
        self.state = state
        self.model = _build_numpy_model(net, seed)
        self.model.load_state_dict(state)
        self.model.to(backend_name, dtype)
        self.x = backend.asarray(x_np, self.xp, dtype=dtype)
        self.y = backend.asarray(y_np, self.xp)
        self.loss_fn = nn.SoftmaxCrossEntropy(validate=False)
        self.out = None
        self.optimizer = None
        if mode == "infer":
            self.model.eval()
        self.reset()

    def reset(self):
        """Initial weights and a fresh optimizer (outside the clock)."""
        if self.mode == "train":
            from . import optim

            self.model.load_state_dict(self.state)
            self.optimizer = optim.SGD(self.model, lr=LEARNING_RATE, momentum=MOMENTUM)

    def step(self):
        if self.mode == "train":
            logits = self.model.forward(self.x)
            self.out = self.loss_fn.forward(logits, self.y)
            self.model.backward(self.loss_fn.backward(), need_input_grad=False)
            self.optimizer.step()
        else:
            self.out = self.model.forward(self.x)

    def run(self, steps):
        for _ in range(steps):
            self.step()

    def sync(self):
        backend.synchronize(self.xp)

    def result(self) -> np.ndarray:
        """The last step's loss (train) or logits (infer), on the host."""
        return np.asarray(backend.to_numpy(self.out), dtype=np.float64)

    def device_peak_mb(self):
        if self.device_kind == "gpu":
            cupy = sys.modules["cupy"]
            # The pool keeps freed blocks, so what it holds is the high-water mark since the last free_all_blocks.
            return cupy.get_default_memory_pool().total_bytes() / 2**20
        return None

    def traced_step_peak_mb(self):
        """Peak memory NumPy allocates during one step (tracemalloc sees NumPy's buffers)."""
        if self.name != "numpy":
            return None
        import tracemalloc

        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            before = tracemalloc.get_traced_memory()[0]
            self.step()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        return (peak - before) / 2**20


class _TorchRunner:
    """Native PyTorch: torch.nn + torch.optim.SGD, the reference."""

    is_reference = True

    def __init__(self, torch_mod, device, net, model_np, state, x_np, y_np, mode, dtype):
        self.torch = torch_mod
        self.device = device
        self.device_kind = "gpu" if device == "cuda" else "cpu"
        self.name = f"pytorch-{device}"
        self.label = f"native PyTorch ({'cuDNN' if device == 'cuda' else 'CPU'})"
        self.mode = mode
        self.net, self.state = _torch_model(torch_mod, model_np, state, device, dtype)
        self.x = torch_mod.from_numpy(np.array(x_np, copy=True)).to(device=device, dtype=getattr(torch_mod, dtype))
        self.y = torch_mod.from_numpy(np.array(y_np, copy=True)).to(device=device, dtype=torch_mod.int64)
        self.out = None
        self.optimizer = None
        if mode == "infer":
            self.net.eval()
        self.reset()

    def reset(self):
        if self.mode == "train":
            self.net.load_state_dict(self.state)
            self.optimizer = self.torch.optim.SGD(self.net.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM)

    def run(self, steps):
        torch = self.torch
        if self.mode == "train":
            for _ in range(steps):
                self.optimizer.zero_grad(set_to_none=True)
                loss = torch.nn.functional.cross_entropy(self.net(self.x), self.y)
                loss.backward()
                self.optimizer.step()
                self.out = loss
        else:
            with torch.inference_mode():
                for _ in range(steps):
                    self.out = self.net(self.x)

    def step(self):
        self.run(1)

    def sync(self):
        backend.synchronize(self.x)

    def result(self) -> np.ndarray:
        return self.out.detach().to("cpu", dtype=self.torch.float64).numpy()

    def device_peak_mb(self):
        if self.device == "cuda":
            return self.torch.cuda.max_memory_allocated() / 2**20
        return None

    def traced_step_peak_mb(self):
        return None


# --------------------------------------------------------------------------
# One configuration: net x batch size x mode


def _float64_reference(net, state, x_np, y_np, mode, seed):
    """Our NumPy code in float64: the check when PyTorch is absent."""
    from . import nn

    model = _build_numpy_model(net, seed)
    model.load_state_dict(state)
    model.to("numpy", "float64")
    if mode == "infer":
        return model.eval().forward(x_np.astype(np.float64))
    loss = nn.SoftmaxCrossEntropy(validate=False).forward(model.forward(x_np.astype(np.float64)), y_np)
    return np.asarray(loss, dtype=np.float64)


def _compare(value, expected, tolerance) -> dict:
    value, expected = np.asarray(value, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    diff = float(np.max(np.abs(value - expected))) if value.size else 0.0
    ok = bool(value.shape == expected.shape and np.all(np.isfinite(value))
              and np.allclose(value, expected, rtol=tolerance["rtol"], atol=tolerance["atol"]))
    return {"ok": ok, "max_abs_diff": diff}


def _prepare(runner):
    """Restore the initial weights and a fresh optimizer, then take one untimed step.

    The untimed step creates the optimizer state (momentum buffers), so the
    timed steps that follow are steady-state steps, as in a long training run.
    """
    runner.reset()
    if runner.mode == "train":
        runner.step()
    runner.sync()


def _run_config(args, net, batch, mode, backends, torch_mod, references, tf32):
    """Measure every runner of one configuration, interleaved; return the result records."""
    C, H, W = NETS[net]
    rng = np.random.default_rng(args.seed + batch)
    x_np = rng.standard_normal((batch, C, H, W)).astype(args.dtype)
    y_np = rng.integers(0, NUM_CLASSES, size=batch).astype(np.int64)
    model_np = _build_numpy_model(net, args.seed)
    state = {k: np.array(backend.to_numpy(v), copy=True) for k, v in model_np.state_dict().items()}

    cupy = sys.modules.get("cupy")
    if "cupy" in backends and cupy is not None:
        cupy.get_default_memory_pool().free_all_blocks()
    if torch_mod is not None and "cuda" in references:
        torch_mod.cuda.empty_cache()
        torch_mod.cuda.reset_peak_memory_stats()

    runners = [_OursRunner(b, net, state, x_np, y_np, mode, args.dtype, args.seed) for b in backends]
    runners += [_TorchRunner(torch_mod, dev, net, model_np, state, x_np, y_np, mode, args.dtype) for dev in references]

    # The first step, checked: same weights, same batch as the reference.
    first = {}
    for r in runners:
        r.reset()
        r.step()
        r.sync()
        first[r.name] = r.result()
    checks = {}
    check_note = None
    if _has_dropout(model_np) and mode == "train":
        check_note = "network has dropout: random masks differ between libraries, first-step values not compared"
    for r in runners:
        same_device_ref = [q for q in runners if q.is_reference and q.device_kind == r.device_kind]
        any_ref = [q for q in runners if q.is_reference]
        if r.is_reference:
            expected, against = None, None
        elif same_device_ref or any_ref:
            ref = (same_device_ref or any_ref)[0]
            expected, against = first[ref.name], ref.name
        else:
            expected, against = _float64_reference(net, state, x_np, y_np, mode, args.seed), "numpy-float64"
        value = first[r.name]
        finite = bool(np.all(np.isfinite(value)))
        if expected is None or check_note:
            # The reference itself, or values that cannot agree: only finiteness is checked.
            checks[r.name] = {"ok": finite, "against": None, "finite": finite, "first_value": _scalar(value, mode)}
            if check_note and not r.is_reference:
                checks[r.name]["note"] = check_note
        else:
            tolerance = CHECK_TOLERANCES["tf32" if tf32 and r.device_kind == "gpu" and args.dtype == "float32"
                                         else args.dtype]
            checks[r.name] = {**_compare(value, expected, tolerance), "against": against, "finite": finite,
                              "first_value": _scalar(value, mode), "reference_value": _scalar(expected, mode),
                              "tolerance": tolerance}

    # Warm-up (excluded), then calibrate the steps per repeat on one timed step.
    steps = {}
    for r in runners:
        r.run(max(args.warmup - 1, 0))
        _prepare(r)
        t0 = time.perf_counter()
        r.step()
        r.sync()
        elapsed = max(time.perf_counter() - t0, 1e-7)
        steps[r.name] = int(min(max(math.ceil(args.repeat_seconds / elapsed), 1), MAX_STEPS_PER_REPEAT[mode]))

    samples = {r.name: [] for r in runners}  # seconds per step, one per repeat
    finite_all = {r.name: True for r in runners}
    start = time.perf_counter()
    rounds = 0
    floor = min(args.repeats, 3)
    while True:
        # Alternate the order each round, and pause before each repeat (outside
        # the clock): OpenBLAS's idle worker threads spin for about 0.1 s after
        # a call before they sleep, and on 2 cores that halved the speed of a
        # PyTorch convolution that ran right after a NumPy GEMM.
        for r in (runners if rounds % 2 == 0 else runners[::-1]):
            if args.gap_seconds > 0:
                time.sleep(args.gap_seconds)
            _prepare(r)
            t0 = time.perf_counter()
            r.run(steps[r.name])
            r.sync()
            samples[r.name].append((time.perf_counter() - t0) / steps[r.name])
            finite_all[r.name] &= bool(np.all(np.isfinite(r.result())))
        rounds += 1
        elapsed = time.perf_counter() - start
        all_stable = all(_stable(samples[r.name], args.repeats, args.stable_tol) for r in runners)
        if all_stable or (elapsed > args.max_seconds and rounds >= floor) or rounds >= 1000:
            break
    rss = _peak_rss_mb()

    records = []
    ips = {r.name: [batch / t for t in samples[r.name]] for r in runners}
    for r in runners:
        rec = {
            "net": net, "batch_size": batch, "mode": mode, "backend": r.name, "label": r.label,
            "device": r.device_kind, "reference": r.is_reference,
            "images_per_s": _summary(ips[r.name]),
            "step_ms": _summary([1000 * t for t in samples[r.name]]),
            "repeats": len(samples[r.name]), "steps_per_repeat": steps[r.name],
            "stable": _stable(samples[r.name], args.repeats, args.stable_tol),
            "check": {**checks[r.name], "finite_every_repeat": finite_all[r.name]},
            "peak_rss_mb_process": rss,
            "device_peak_mb": r.device_peak_mb(),
        }
        rec["check"]["ok"] = bool(rec["check"]["ok"] and finite_all[r.name])
        traced = r.traced_step_peak_mb() if mode == "train" else None
        if traced is not None:
            rec["traced_step_peak_mb"] = traced
        ref = next((q for q in runners if q.is_reference and q.device_kind == r.device_kind), None)
        if ref is not None and not r.is_reference:
            paired = [a / b for a, b in zip(ips[r.name], ips[ref.name])]
            rec["ratio_to_reference"] = {**_summary(paired), "reference": ref.name,
                                         "how": "median and min-max of per-round ratios (interleaved repeats)"}
        if r.name == "cupy" and "numpy" in ips:
            paired = [a / b for a, b in zip(ips["cupy"], ips["numpy"])]
            rec["speedup_over_numpy"] = _summary(paired)
        records.append(rec)
    return records


def _scalar(value, mode):
    value = np.asarray(value)
    if mode == "train" and value.size == 1:
        return float(value.reshape(()))
    return {"shape": list(value.shape), "abs_mean": float(np.mean(np.abs(value))) if value.size else 0.0}


# --------------------------------------------------------------------------
# Breakdown


_CATEGORIES = ("conv forward", "conv backward-data", "conv backward-weights", "pooling", "elementwise",
               "batch norm", "linear", "loss", "optimizer")


def _category(layer):
    kind = type(layer).__name__
    if kind in ("MaxPool2d", "AvgPool2d"):
        return "pooling"
    if kind in ("ReLU", "Sigmoid", "Tanh", "Flatten", "Dropout"):
        return "elementwise"
    if kind == "BatchNorm2d":
        return "batch norm"
    if kind == "Linear":
        return "linear"
    return "other"


def _conv_flops(weight_shape, y_shape):
    """Multiply-adds x 2 of one convolution GEMM: 2 * N*P*Q * K * C*R*S (each of the three GEMMs)."""
    K, C, R, S = weight_shape
    N, _, P, Q = y_shape
    return 2 * N * P * Q * K * C * R * S


def _run_breakdown(args, net, batch, backend_name):
    """Per-layer-type time of one training step on one of our backends."""
    from . import nn, ops, optim

    C, H, W = NETS[net]
    rng = np.random.default_rng(args.seed + batch)
    x_np = rng.standard_normal((batch, C, H, W)).astype(args.dtype)
    y_np = rng.integers(0, NUM_CLASSES, size=batch).astype(np.int64)
    xp = backend.get_namespace(backend_name)
    model = _build_numpy_model(net, args.seed).to(backend_name, args.dtype)
    x = backend.asarray(x_np, xp, dtype=args.dtype)
    y = backend.asarray(y_np, xp)
    loss_fn = nn.SoftmaxCrossEntropy(validate=False)
    opt = optim.SGD(model, lr=LEARNING_RATE, momentum=MOMENTUM)

    def clock():
        backend.synchronize(xp)
        return time.perf_counter()

    current = {}  # category -> seconds in the step being timed
    flops = {"conv forward": 0, "conv backward-data": 0, "conv backward-weights": 0, "linear": 0}
    conv_calls = {}  # conv layer index -> captured backward arguments and times

    def wrap(layer, index):
        forward, backward = layer.forward, layer.backward
        category = _category(layer)
        is_conv = isinstance(layer, nn.Conv2d)

        def timed_forward(*a, **k):
            t0 = clock()
            out = forward(*a, **k)
            t1 = clock()
            key = "conv forward" if is_conv else category
            current[key] = current.get(key, 0.0) + t1 - t0
            if is_conv:
                conv_calls.setdefault(index, {})["y_shape"] = tuple(out.shape)
            return out

        def timed_backward(dy, **kwargs):
            info = conv_calls.setdefault(index, {}) if is_conv else None
            if is_conv:
                info["cache"], info["dy"] = layer._cache, dy
            t0 = clock()
            dx = backward(dy, **kwargs)
            t1 = clock()
            if is_conv:
                info["dx_computed"] = dx is not None
                current[f"conv backward {index}"] = t1 - t0
            else:
                current[category] = current.get(category, 0.0) + t1 - t0
            return dx

        layer.forward, layer.backward = timed_forward, timed_backward

    for i, layer in enumerate(model):
        wrap(layer, i)

    def step():
        t_start = clock()
        logits = model.forward(x)
        t0 = clock()
        loss = loss_fn.forward(logits, y)
        dlogits = loss_fn.backward()
        t1 = clock()
        current["loss"] = t1 - t0
        model.backward(dlogits, need_input_grad=False)
        t2 = clock()
        opt.step()
        t3 = clock()
        current["optimizer"] = t3 - t2
        current["step total"] = t3 - t_start
        return loss

    for _ in range(2):
        current.clear()
        step()
    per_step = []
    for _ in range(max(args.breakdown_steps, 1)):
        current.clear()
        loss = step()
        per_step.append(dict(current))
    finite = bool(np.isfinite(float(backend.to_numpy(loss))))

    # Split each conv backward into its data and weight parts by calling the op
    # directly: with need_input_grad=False it computes dW and db only.
    split_how = None
    weights_s = data_s = 0.0
    supports_split = "need_input_grad" in inspect.signature(ops.conv2d_backward).parameters
    for index, info in conv_calls.items():
        layer = model[index]
        flops_one = _conv_flops(tuple(layer.params["weight"].shape), info["y_shape"])
        flops["conv forward"] += flops_one
        flops["conv backward-weights"] += flops_one
        if info.get("dx_computed", True):
            flops["conv backward-data"] += flops_one
        in_step = statistics.median(step_times[f"conv backward {index}"] for step_times in per_step)
        if not info.get("dx_computed", True):
            weights_s += in_step
            continue
        if not supports_split:
            split_how = "ops.conv2d_backward has no need_input_grad: backward not split (all under backward-data)"
            data_s += in_step
            continue
        cache = info["cache"]
        x_in, cols = cache if isinstance(cache, tuple) and len(cache) == 2 else (cache, None)
        call = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, cols=cols,
                    has_bias="bias" in layer.params)
        w_only, full = [], []
        for _ in range(3):
            t0 = clock()
            ops.conv2d_backward(info["dy"], x_in, layer.params["weight"], need_input_grad=False, **call)
            t1 = clock()
            ops.conv2d_backward(info["dy"], x_in, layer.params["weight"], need_input_grad=True, **call)
            t2 = clock()
            w_only.append(t1 - t0)
            full.append(t2 - t1)
        fraction = min(statistics.median(w_only) / max(statistics.median(full), 1e-12), 1.0)
        weights_s += in_step * fraction
        data_s += in_step * (1.0 - fraction)
        split_how = ("each conv layer's in-step backward time split by the ratio of direct calls of "
                     "ops.conv2d_backward with need_input_grad=False (dW, db) and =True (all)")
    for layer in model:
        if isinstance(layer, nn.Linear):
            n_in, n_out = layer.in_features, layer.out_features
            flops["linear"] += 3 * 2 * batch * n_in * n_out  # forward, dX and dW GEMMs

    median = {key: statistics.median(s.get(key, 0.0) for s in per_step) for key in
              set().union(*per_step)}
    times = {key: median.get(key, 0.0) for key in _CATEGORIES if key not in ("conv backward-data", "conv backward-weights")}
    times["conv backward-data"] = data_s
    times["conv backward-weights"] = weights_s
    if "other" in median:
        times["other"] = median["other"]
    total = median["step total"]
    rows = []
    for key in list(_CATEGORIES) + (["other"] if "other" in times else []):
        seconds = times.get(key, 0.0)
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
        "net": net, "batch_size": batch, "backend": backend_name, "step_ms": 1000 * total,
        "images_per_s_with_syncs": batch / total, "steps": len(per_step), "loss_finite": finite,
        "rows": rows, "conv_backward_split": split_how,
        "note": "per-layer clocks synchronise the device around every layer call; the step is slower than untimed",
    }


# --------------------------------------------------------------------------
# Report


def _fmt_ips(value):
    return f"{value:,.0f}" if value >= 100 else f"{value:,.1f}"


def _format_table(records) -> str:
    header = ("net", "mode", "batch", "backend", "images/s", "min-max", "vs PyTorch (min-max)", "check")
    lines = []
    for r in records:
        ips = r["images_per_s"]
        ratio = r.get("ratio_to_reference")
        ratio_text = "reference" if r["reference"] else (
            f"{ratio['median']:.2f}x ({ratio['min']:.2f}-{ratio['max']:.2f})" if ratio else "n/a")
        check = r["check"]
        if not check["ok"]:
            check_text = f"FAIL (diff {check.get('max_abs_diff', float('nan')):.1e})" if check.get("against") else "FAIL (not finite)"
        elif check.get("against"):
            check_text = f"ok (diff {check['max_abs_diff']:.1e} vs {check['against']})"
        else:
            check_text = "ok (finite)"
        stable = "" if r["stable"] else " ~"
        lines.append((r["net"], r["mode"], str(r["batch_size"]), r["label"], _fmt_ips(ips["median"]) + stable,
                      f"{_fmt_ips(ips['min'])}-{_fmt_ips(ips['max'])}", ratio_text, check_text))
    widths = [max(len(row[i]) for row in [header] + lines) for i in range(len(header))]
    right = {2, 4, 5}
    out = []
    for j, row in enumerate([header] + lines):
        cells = [cell.rjust(widths[i]) if i in right else cell.ljust(widths[i]) for i, cell in enumerate(row)]
        out.append("  ".join(cells).rstrip())
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def _format_markdown(records, env) -> str:
    """The results table in Markdown, for docs/benchmarks.md."""
    lines = [
        "| net | mode | batch | backend | images/s (median) | min-max | vs PyTorch, median (min-max) | first-step check |",
        "| --- | --- | ---: | --- | ---: | ---: | --- | --- |",
    ]
    for r in records:
        ips, ratio, check = r["images_per_s"], r.get("ratio_to_reference"), r["check"]
        ratio_text = "reference" if r["reference"] else (
            f"{ratio['median']:.2f}x ({ratio['min']:.2f}-{ratio['max']:.2f})" if ratio else "n/a")
        if not check["ok"]:
            check_text = "**FAILED**"
        elif check.get("against"):
            check_text = f"ok, diff {check['max_abs_diff']:.0e}"
        else:
            check_text = "ok (finite)"
        lines.append(f"| {r['net']} | {r['mode']} | {r['batch_size']} | {r['label']} | {_fmt_ips(ips['median'])}"
                     f"{'' if r['stable'] else ' ~'} | {_fmt_ips(ips['min'])}-{_fmt_ips(ips['max'])} | {ratio_text} "
                     f"| {check_text} |")
    return "\n".join(lines) + "\n"


def _gpu_comparison(records):
    """CuPy over NumPy: the speed-up per net/mode/batch and the batch size where the GPU overtakes."""
    rows, overtakes = [], []
    by_key = {(r["net"], r["mode"], r["batch_size"], r["backend"]): r for r in records}
    for net, mode in sorted({(r["net"], r["mode"]) for r in records}):
        sizes = sorted({r["batch_size"] for r in records if r["net"] == net and r["mode"] == mode})
        first_faster = None
        for batch in sizes:
            gpu, cpu = by_key.get((net, mode, batch, "cupy")), by_key.get((net, mode, batch, "numpy"))
            if gpu is None or cpu is None:
                continue
            speedup = gpu["speedup_over_numpy"]
            rows.append({"net": net, "mode": mode, "batch_size": batch, "speedup": speedup})
            if speedup["median"] > 1.0 and first_faster is None:
                first_faster = batch
            elif speedup["median"] <= 1.0:
                first_faster = None  # the GPU must stay ahead from there on
        if any(row["net"] == net and row["mode"] == mode for row in rows):
            overtakes.append({"net": net, "mode": mode, "gpu_overtakes_cpu_at_batch": first_faster,
                              "smallest_measured": sizes[0]})
    return rows, overtakes


def _print_environment(env):
    m = env["machine"]
    print(f"portable-cnn bench  {env['date_utc']}  portable_cnn {env['versions']['portable_cnn']}"
          + (f" ({env['versions']['git']})" if env["versions"].get("git") else ""))
    print(f"machine: {m['cpu']}{' (' + m['simd'] + ')' if m.get('simd') else ''}, {m['cpu_count']} CPUs "
          f"({m['cpus_usable']} usable), {m['platform']}, Python {m['python']}")
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if k not in ("portable_cnn", "git") and v)
    print(f"versions: {versions}")
    for row in env["blas"]:
        print(f"threadpool: {row['internal_api']} {row['version'] or ''} ({row['user_api']}, {row['prefix']}), "
              f"kernel {row.get('architecture') or '-'}, {row['num_threads']} threads"
              + (f", {row['threading_layer']}" if row.get("threading_layer") else ""))
    if env.get("blas_note"):
        print(f"threadpool: {env['blas_note']}")
    if env["blas_env"]:
        print("BLAS/OpenMP environment: " + ", ".join(f"{k}={v}" for k, v in env["blas_env"].items()))
        if any(k in env["blas_env"] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")):
            print("  note: OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE are set; they slow current NumPy "
                  "(benchmarks/run_cpu.sh unsets them)")
    if "torch" in env:
        t = env["torch"]
        print(f"torch: {t['num_threads']} intra-op threads (torch.set_num_threads left at default), "
              f"{t['num_interop_threads']} inter-op, oneDNN {'on' if t['mkldnn'] else 'off'}, "
              f"CUDA {'yes: ' + t.get('cuda_device', '') if t['cuda'] else 'no'}")
    if "cupy" in env:
        print(f"cupy: {env['cupy']}")
    print(f"tf32: {'on' if env['tf32']['enabled'] else 'off'} ({'; '.join(v for k, v in env['tf32'].items() if k != 'enabled')})"
          if len(env["tf32"]) > 1 else f"tf32: {'on' if env['tf32']['enabled'] else 'off'} (no GPU in this run)")
    print(f"dtype {env['dtype']}; {env['protocol']['optimizer']}; backends {', '.join(env['backends'])}; "
          f"reference {', '.join(env['references']) or 'none'}")


def _print_breakdown(b):
    print(f"\nbreakdown: {b['net']} batch {b['batch_size']} on {b['backend']}: {b['step_ms']:.1f} ms/step "
          f"({b['images_per_s_with_syncs']:,.0f} images/s with per-layer syncs)")
    for row in b["rows"]:
        gf = f"{row['gflop_per_s']:8.1f} GFLOP/s" if "gflop_per_s" in row else ""
        print(f"  {row['category']:<26} {row['ms']:9.2f} ms {row['percent']:6.1f}%  {gf}")
    if b["conv_backward_split"]:
        print(f"  ({b['conv_backward_split']})")


def _plot(path, records, env) -> str | None:
    """Write the PNG; return None on success or the reason it was skipped."""
    try:
        import matplotlib
    except ImportError:
        return "matplotlib not installed: plot skipped (pip install 'portable-cnn[bench]')"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    nets = list(dict.fromkeys(r["net"] for r in records))
    modes = list(dict.fromkeys(r["mode"] for r in records))
    fig, axes = plt.subplots(len(modes), len(nets), figsize=(5.2 * len(nets), 3.8 * len(modes)), squeeze=False)
    for i, mode in enumerate(modes):
        for j, net in enumerate(nets):
            ax = axes[i][j]
            subset = [r for r in records if r["net"] == net and r["mode"] == mode]
            for label in dict.fromkeys(r["label"] for r in subset):
                rows = sorted((r for r in subset if r["label"] == label), key=lambda r: r["batch_size"])
                xs = [r["batch_size"] for r in rows]
                med = np.array([r["images_per_s"]["median"] for r in rows])
                low = med - np.array([r["images_per_s"]["min"] for r in rows])
                high = np.array([r["images_per_s"]["max"] for r in rows]) - med
                fmt = "s--" if rows[0]["reference"] else "o-"  # the reference dashed, with squares
                ax.errorbar(xs, med, yerr=[low, high], fmt=fmt, capsize=3, label=label)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:,.0f}"))
            sizes = sorted({r["batch_size"] for r in subset})
            ax.set_xticks(sizes)
            ax.set_xticklabels([str(s) for s in sizes])
            ax.minorticks_off()
            ax.set_title(f"{net}, {'training step' if mode == 'train' else 'inference'}")
            ax.set_xlabel("batch size")
            ax.set_ylabel("images/s (median, min-max)")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(f"portable-cnn bench, {env['dtype']}, {env['machine']['cpu']}, {env['date_utc']}", fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# --------------------------------------------------------------------------
# Entry point


def _resolve_backends(args):
    """Backends of ours to measure; ``(names, message)`` or raise BackendUnavailableError."""
    if args.backends is None:
        names = ["numpy"]
        if _torch_installed():
            names.append("torch")
        ok, why = backend.cupy_status()
        if ok:
            names.append("cupy")
        return names, (None if ok else f"cupy not measured: {why}")
    for name in args.backends:
        backend.get_namespace(name)  # raises BackendUnavailableError with the reason
    return list(dict.fromkeys(args.backends)), None


def run_bench(args) -> int:
    """Run the benchmark described by parsed ``args``; returns the exit status (1 when a check failed)."""
    if args.quick:
        args.repeats = min(args.repeats, 3)
        args.warmup = min(args.warmup, 1)
        args.repeat_seconds = min(args.repeat_seconds, 0.05)
        args.max_seconds = min(args.max_seconds, 3.0)
    for name in ("repeats", "warmup", "breakdown_steps"):
        if getattr(args, name) < (0 if name == "warmup" else 1):
            print(f"portable-cnn bench: --{name.replace('_', '-')} must be positive, got {getattr(args, name)}",
                  file=sys.stderr)
            return 2
    # Before CuPy's first GEMM (cupy_status below runs only an elementwise kernel).
    backend.set_tf32(args.tf32)
    try:
        backends, backend_note = _resolve_backends(args)
        for name in (args.breakdown_backends or []) if args.breakdown else []:
            backend.get_namespace(name)
    except backend.BackendUnavailableError as exc:
        print(f"portable-cnn bench: {exc}", file=sys.stderr)
        return 2

    torch_mod = None
    references = []
    reference_note = None
    if _torch_installed():
        torch_mod = importlib.import_module("torch")
    if args.no_reference:
        reference_note = "native PyTorch reference skipped (--no-reference): no ratios"
    elif torch_mod is None:
        reference_note = ("PyTorch not installed: no native reference and no ratios; first-step results are "
                          "checked against our NumPy code in float64")
    else:
        if any(b != "cupy" for b in backends):
            references.append("cpu")
        if "cupy" in backends:
            if torch_mod.cuda.is_available():
                references.append("cuda")
                torch_mod.backends.cudnn.benchmark = True
            else:
                reference_note = "PyTorch has no CUDA here: no GPU reference for cupy"
    cupy_info = backend.cupy_status()[1] if "cupy" in backends else None
    tf32 = _configure_tf32(args.tf32, "cupy" in backends, torch_mod if "cuda" in references else None)

    env = _environment(args, backends, torch_mod, cupy_info)
    env["references"] = [f"pytorch-{d}" for d in references]
    env["tf32"] = tf32
    if torch_mod is not None and "cuda" in references:
        env["torch"]["cudnn_benchmark"] = True
    notes = [n for n in (backend_note, reference_note) if n]
    env["notes"] = notes
    _print_environment(env)
    for note in notes:
        print(f"note: {note}")
    print()

    records = []
    for net in args.nets:
        for batch in args.batch_sizes:
            for mode in args.modes:
                t0 = time.perf_counter()
                recs = _run_config(args, net, batch, mode, backends, torch_mod, references, args.tf32)
                records.extend(recs)
                summary = ", ".join(f"{r['backend']} {_fmt_ips(r['images_per_s']['median'])}/s" for r in recs)
                _log(args, f"  {net} {mode} batch {batch}: {summary} ({time.perf_counter() - t0:.1f} s)")

    print(_format_table(records))
    if any(not r["stable"] for r in records):
        print("~ : the median had not settled within --max-seconds")
    failed = [r for r in records if not r["check"]["ok"]]
    for r in failed:
        print(f"CHECK FAILED: {r['net']} {r['mode']} batch {r['batch_size']} {r['backend']}: {r['check']}")

    gpu_rows, overtakes = _gpu_comparison(records)
    if gpu_rows:
        print("\nGPU (cupy) over CPU (numpy), images/s ratio, median (min-max):")
        for row in gpu_rows:
            s = row["speedup"]
            print(f"  {row['net']:<10} {row['mode']:<6} batch {row['batch_size']:>5}: "
                  f"{s['median']:.2f}x ({s['min']:.2f}-{s['max']:.2f})")
        for o in overtakes:
            at = o["gpu_overtakes_cpu_at_batch"]
            text = (f"from batch {at} on" if at is not None and at != o["smallest_measured"] else
                    f"already at the smallest batch measured ({at})" if at is not None else
                    "not within the batch sizes measured")
            print(f"  {o['net']} {o['mode']}: the GPU overtakes the CPU {text}")

    peak = max(r["peak_rss_mb_process"] for r in records) if records else _peak_rss_mb()
    print(f"\npeak memory: process RSS {peak:,.0f} MiB (ru_maxrss, all runners together)")
    for r in records:
        if r.get("traced_step_peak_mb") is not None:
            print(f"  {r['net']} batch {r['batch_size']} numpy training step allocates up to "
                  f"{r['traced_step_peak_mb']:,.1f} MiB (tracemalloc)")
        if r.get("device_peak_mb") is not None:
            print(f"  {r['net']} {r['mode']} batch {r['batch_size']} {r['backend']}: device peak "
                  f"{r['device_peak_mb']:,.1f} MiB")

    breakdowns = []
    if args.breakdown:
        chosen = args.breakdown_backends or [b for b in backends if b in ("numpy", "cupy")]
        for b in chosen:
            for net in args.nets:
                for batch in args.batch_sizes:
                    result = _run_breakdown(args, net, batch, b)
                    breakdowns.append(result)
                    _print_breakdown(result)

    output = {"schema": "portable-cnn-bench/1", "environment": env, "results": records,
              "gpu_vs_cpu": {"speedups": gpu_rows, "overtakes": overtakes}, "breakdown": breakdowns}
    if args.json_path:
        path = Path(args.json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(output, indent=2) + "\n")
        print(f"\nwrote {path}")
    if args.markdown_path:
        path = Path(args.markdown_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(_format_markdown(records, env))
        print(f"wrote {path}")
    if args.plot_path:
        why = _plot(args.plot_path, records, env)
        print(why if why else f"wrote {args.plot_path}")
    return 1 if failed else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
