"""What the benchmark ran on: the machine, the libraries and their BLAS, the git revision, TF32 and memory.

Every probe degrades instead of failing: a file that is not there
(``/proc/cpuinfo`` off Linux), a module that is missing (``resource`` on
Windows, threadpoolctl, matplotlib) or a command that does not answer
(``git``) leaves its field empty or says why.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import importlib.util
import os
import platform
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np

from .. import __version__, backend
from .protocol import LEARNING_RATE, MOMENTUM

#: Environment variables that change what the BLAS libraries do; reported when set.
BLAS_ENV = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_THREAD_TIMEOUT", "OPENBLAS_NUM_THREADS",
            "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def torch_installed() -> bool:
    """Whether ``import torch`` would work, without importing it."""
    if "torch" in sys.modules:  # None there marks a module known to be missing
        return sys.modules["torch"] is not None
    return importlib.util.find_spec("torch") is not None


def peak_rss_mb() -> float | None:
    """Peak resident memory of this process so far in MiB, or None where the platform does not say (Windows)."""
    try:
        import resource  # POSIX only
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


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
    """The short commit of the source tree the package runs from, ``+modified`` if tracked files changed."""
    root = Path(__file__).resolve().parents[2]
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


def describe(args, backends, torch_mod, cupy_info) -> dict:
    """The environment section of the report.

    Parameters
    ----------
    args : argparse.Namespace
        The ``bench`` options (dtypes, seed and the protocol's settings are recorded).
    backends : list of str
        Our backends measured.
    torch_mod : module or None
        ``torch`` where it is installed.
    cupy_info : str or None
        :func:`portable_cnn.backend.cupy_status`'s message where CuPy is measured.

    Returns
    -------
    dict
        ``date_utc``, ``machine``, ``versions``, ``blas_env``, ``dtypes``,
        ``backends``, ``protocol``, ``blas``, ``blas_note`` and, where present,
        ``torch`` and ``cupy``; JSON-serialisable.
    """
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
        "dtypes": args.dtypes,
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
    env["blas"], env["blas_note"] = _blas_info()
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


def configure_tf32(enabled: bool, use_cupy: bool, torch_mod) -> dict:
    """Switch TF32 on or off for both sides, CuPy and PyTorch's CUDA; return what was set and how.

    Parameters
    ----------
    enabled : bool
        ``--tf32``.
    use_cupy : bool
        Whether CuPy is measured.
    torch_mod : module or None
        ``torch`` where a CUDA reference runs, else None.

    Returns
    -------
    dict
        ``enabled`` and, per side touched, a line saying which switch was set.
    """
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
