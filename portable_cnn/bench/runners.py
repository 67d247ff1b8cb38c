"""What is timed: our library on one backend, native PyTorch, and one configuration of them all.

:class:`OursRunner` runs our model on one backend; :class:`TorchRunner` runs
the same network in ``torch.nn`` (:mod:`.torch_mirror`) with
``torch.optim.SGD``, the reference. :func:`run_config` measures every runner
of one configuration (net, batch size, mode) by the protocol of
:mod:`.protocol`, after checking each one's first step against the reference,
or against our NumPy code in float64 (:func:`float64_reference`) where
PyTorch is absent.
"""

from __future__ import annotations

import sys

import numpy as np

from .. import backend, nn, optim
from .environment import peak_rss_mb
from .protocol import (
    CHECK_TOLERANCES,
    LEARNING_RATE,
    MOMENTUM,
    build_model,
    calibrate,
    interleaved_repeats,
    make_batch,
    stable,
    summary,
)
from .torch_mirror import torch_model, torch_state


class OursRunner:
    """Our library on one backend: forward, softmax cross-entropy, backward and SGD, or forward alone.

    Parameters
    ----------
    backend_name : str
        ``"numpy"``, ``"torch"`` (our code on torch tensors), ``"cupy"`` or ``"array_api_strict"``.
    net : str
        A name of :data:`~.protocol.NETS`.
    state : dict
        The initial weights, NumPy arrays by ``state_dict`` name.
    x_np, y_np : numpy.ndarray
        The batch ``(N, C, H, W)`` and its labels ``(N,)``.
    mode : {"train", "infer"}
    dtype : str
    seed : int
        Seed of the model before ``state`` is loaded (the weights come from ``state``).
    """

    is_reference = False

    def __init__(self, backend_name, net, state, x_np, y_np, mode, dtype, seed):
        self.name = backend_name
        self.label = {"torch": "ours on torch tensors"}.get(backend_name, f"ours on {backend_name}")
        self.device_kind = "gpu" if backend_name == "cupy" else "cpu"
        self.mode = mode
        self.xp = backend.get_namespace(backend_name)
        self.state = state
        self.model = build_model(net, seed)
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
            self.model.load_state_dict(self.state)
            self.optimizer = optim.SGD(self.model, lr=LEARNING_RATE, momentum=MOMENTUM)

    def step(self):
        """One training step or one forward pass; its loss or logits are kept for :meth:`result`."""
        if self.mode == "train":
            logits = self.model.forward(self.x)
            self.out = self.loss_fn.forward(logits, self.y)
            self.model.backward(self.loss_fn.backward(), need_input_grad=False)
            self.optimizer.step()
        else:
            self.out = self.model.forward(self.x)

    def run(self, steps):
        """``steps`` steps, without synchronising."""
        for _ in range(steps):
            self.step()

    def sync(self):
        """Wait for the device."""
        backend.synchronize(self.xp)

    def result(self) -> np.ndarray:
        """The last step's loss (train) or logits (infer), on the host."""
        return np.asarray(backend.to_numpy(self.out), dtype=np.float64)

    def device_peak_mb(self):
        """CuPy's memory pool size in MiB on the GPU; None on the CPU."""
        if self.device_kind == "gpu":
            cupy = sys.modules["cupy"]
            # The pool keeps freed blocks, so what it holds is the high-water mark since the last free_all_blocks.
            return cupy.get_default_memory_pool().total_bytes() / 2**20
        return None

    def traced_step_peak_mb(self):
        """Peak memory one step allocates above what was live before it, in MiB; None where tracemalloc is blind.

        tracemalloc sees NumPy's buffers, so this is measured on ``numpy`` and
        ``array_api_strict`` (NumPy underneath); PyTorch's and CuPy's
        allocators bypass Python's and are not seen.
        """
        if self.name not in ("numpy", "array_api_strict"):
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


class TorchRunner:
    """Native PyTorch, the reference: the :mod:`.torch_mirror` of our model, ``cross_entropy`` and ``torch.optim.SGD``.

    Parameters
    ----------
    torch_mod : module
        ``torch``.
    device : {"cpu", "cuda"}
    model_np : portable_cnn.nn.Sequential
        Our model, mirrored layer for layer.
    state, x_np, y_np, mode, dtype
        As for :class:`OursRunner`.
    """

    is_reference = True

    def __init__(self, torch_mod, device, model_np, state, x_np, y_np, mode, dtype):
        self.torch = torch_mod
        self.device = device
        self.device_kind = "gpu" if device == "cuda" else "cpu"
        self.name = f"pytorch-{device}"
        self.label = f"native PyTorch ({'cuDNN' if device == 'cuda' else 'CPU'})"
        self.mode = mode
        self.net = torch_model(torch_mod, model_np, state, device, dtype)
        self.state = torch_state(torch_mod, state)
        self.x = torch_mod.from_numpy(np.array(x_np, copy=True)).to(device=device, dtype=getattr(torch_mod, dtype))
        self.y = torch_mod.from_numpy(np.array(y_np, copy=True)).to(device=device, dtype=torch_mod.int64)
        self.out = None
        self.optimizer = None
        if mode == "infer":
            self.net.eval()
        self.reset()

    def reset(self):
        """Initial weights and a fresh optimizer (outside the clock)."""
        if self.mode == "train":
            self.net.load_state_dict(self.state)
            self.optimizer = self.torch.optim.SGD(self.net.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM)

    def run(self, steps):
        """``steps`` training steps or forward passes (under ``inference_mode``), without synchronising."""
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
        """One step."""
        self.run(1)

    def sync(self):
        """Wait for the device."""
        backend.synchronize(self.x)

    def result(self) -> np.ndarray:
        """The last step's loss (train) or logits (infer), on the host in float64."""
        return self.out.detach().to("cpu", dtype=self.torch.float64).numpy()

    def device_peak_mb(self):
        """PyTorch's peak CUDA allocation in MiB; None on the CPU."""
        if self.device == "cuda":
            return self.torch.cuda.max_memory_allocated() / 2**20
        return None

    def traced_step_peak_mb(self):
        """None: PyTorch's CPU allocator bypasses Python's, so tracemalloc does not see it, and it keeps no peak."""
        return None


def float64_reference(net, state, x_np, y_np, mode, seed) -> np.ndarray:
    """Our NumPy code in float64 on the same weights and batch: the first-step check when PyTorch is absent."""
    model = build_model(net, seed)
    model.load_state_dict(state)
    model.to("numpy", "float64")
    if mode == "infer":
        return model.eval().forward(x_np.astype(np.float64))
    loss = nn.SoftmaxCrossEntropy(validate=False).forward(model.forward(x_np.astype(np.float64)), y_np)
    return np.asarray(loss, dtype=np.float64)


def compare(value, expected, tolerance: dict) -> dict:
    """``{"ok", "max_abs_diff"}``: whether ``value`` is finite and equals ``expected`` within ``rtol``/``atol``."""
    value, expected = np.asarray(value, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    diff = float(np.max(np.abs(value - expected))) if value.size else 0.0
    ok = bool(value.shape == expected.shape and np.all(np.isfinite(value))
              and np.allclose(value, expected, rtol=tolerance["rtol"], atol=tolerance["atol"]))
    return {"ok": ok, "max_abs_diff": diff}


def _first_value(value, mode):
    """The loss as a float (train), or the logits' shape and mean magnitude (infer), for the report."""
    value = np.asarray(value)
    if mode == "train" and value.size == 1:
        return float(value.reshape(()))
    return {"shape": list(value.shape), "abs_mean": float(np.mean(np.abs(value))) if value.size else 0.0}


def _first_step_checks(args, runners, first, fallback, mode, dtype, comparable) -> dict:
    """Each runner's first-step check: against a reference on its device, else any reference, else ``fallback()``.

    The tolerance is ``dtype``'s (the reference runs in the row's dtype too);
    ``comparable`` is False where values cannot agree between libraries (dropout
    masks); then, as for the reference itself, only finiteness is checked.
    """
    checks = {}
    for r in runners:
        same_device_ref = [q for q in runners if q.is_reference and q.device_kind == r.device_kind]
        any_ref = [q for q in runners if q.is_reference]
        if r.is_reference:
            expected, against = None, None
        elif same_device_ref or any_ref:
            ref = (same_device_ref or any_ref)[0]
            expected, against = first[ref.name], ref.name
        else:
            expected, against = fallback(), "numpy-float64"
        value = first[r.name]
        finite = bool(np.all(np.isfinite(value)))
        if expected is None or not comparable:
            checks[r.name] = {"ok": finite, "against": None, "finite": finite, "first_value": _first_value(value, mode)}
            if not comparable and not r.is_reference:
                checks[r.name]["note"] = ("network has dropout: random masks differ between libraries, "
                                          "first-step values not compared")
        else:
            tf32 = args.tf32 and r.device_kind == "gpu" and dtype == "float32"
            tolerance = CHECK_TOLERANCES["tf32" if tf32 else dtype]
            checks[r.name] = {**compare(value, expected, tolerance), "against": against, "finite": finite,
                              "first_value": _first_value(value, mode), "reference_value": _first_value(expected, mode),
                              "tolerance": tolerance}
            if against == "numpy-float64" and dtype == "float64" and r.name == "numpy":
                checks[r.name]["note"] = "the oracle is this same code: only determinism is checked"
    return checks


def run_config(args, net, batch, mode, dtype, backends, torch_mod, references) -> list[dict]:
    """Check, then measure every runner of one configuration, interleaved; return one result record per runner.

    Parameters
    ----------
    args : argparse.Namespace
        The ``bench`` options.
    net : str
    batch : int
    mode : {"train", "infer"}
    dtype : {"float32", "float64"}
        Of every runner, ours and the references.
    backends : list of str
        Our backends.
    torch_mod : module or None
        ``torch`` where references run.
    references : list of str
        Devices of the native PyTorch references (``"cpu"``, ``"cuda"``).

    Returns
    -------
    list of dict
        Per runner: its ``dtype``, images/s and ms/step (median, min, max),
        repeats, the first-step check, memory (``device_peak_mb`` and
        ``traced_step_peak_mb``, None where not measured), and the ratio to the
        reference on its device (and for CuPy the speed-up over NumPy) from the
        per-round ratios.
    """
    x_np, y_np = make_batch(net, batch, dtype, args.seed)
    model_np = build_model(net, args.seed)
    state = {k: np.array(backend.to_numpy(v), copy=True) for k, v in model_np.state_dict().items()}

    cupy = sys.modules.get("cupy")
    if "cupy" in backends and cupy is not None:
        cupy.get_default_memory_pool().free_all_blocks()
    if torch_mod is not None and "cuda" in references:
        torch_mod.cuda.empty_cache()
        torch_mod.cuda.reset_peak_memory_stats()

    runners = [OursRunner(b, net, state, x_np, y_np, mode, dtype, args.seed) for b in backends]
    runners += [TorchRunner(torch_mod, dev, model_np, state, x_np, y_np, mode, dtype) for dev in references]

    # The first step, checked: same weights, same batch as the reference.
    first = {}
    for r in runners:
        r.reset()
        r.step()
        r.sync()
        first[r.name] = r.result()
    has_dropout = any(isinstance(module, nn.Dropout) for _, module in model_np.named_modules())
    checks = _first_step_checks(
        args, runners, first, lambda: float64_reference(net, state, x_np, y_np, mode, args.seed), mode, dtype,
        comparable=not (has_dropout and mode == "train"),
    )

    steps = {r.name: calibrate(r, args.warmup, args.repeat_seconds) for r in runners}
    samples, finite_all = interleaved_repeats(runners, steps, args)
    rss = peak_rss_mb()

    records = []
    ips = {r.name: [batch / t for t in samples[r.name]] for r in runners}
    for r in runners:
        rec = {
            "net": net, "batch_size": batch, "mode": mode, "dtype": dtype, "backend": r.name, "label": r.label,
            "device": r.device_kind, "reference": r.is_reference,
            "images_per_s": summary(ips[r.name]),
            "step_ms": summary([1000 * t for t in samples[r.name]]),
            "repeats": len(samples[r.name]), "steps_per_repeat": steps[r.name],
            "stable": stable(samples[r.name], args.repeats, args.stable_tol),
            "check": {**checks[r.name], "finite_every_repeat": finite_all[r.name]},
            "peak_rss_mb_process": rss,
            # Both outside the clock: the device peak read after the repeats, the traced step one more step.
            "device_peak_mb": r.device_peak_mb(),
            "traced_step_peak_mb": r.traced_step_peak_mb(),
        }
        rec["check"]["ok"] = bool(rec["check"]["ok"] and finite_all[r.name])
        ref = next((q for q in runners if q.is_reference and q.device_kind == r.device_kind), None)
        if ref is not None and not r.is_reference:
            paired = [a / b for a, b in zip(ips[r.name], ips[ref.name])]
            rec["ratio_to_reference"] = {**summary(paired), "reference": ref.name,
                                         "how": "median and min-max of per-round ratios (interleaved repeats)"}
        if r.name == "cupy" and "numpy" in ips:
            paired = [a / b for a, b in zip(ips["cupy"], ips["numpy"])]
            rec["speedup_over_numpy"] = summary(paired)
        records.append(rec)
    return records
