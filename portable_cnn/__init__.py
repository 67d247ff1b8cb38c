"""portable_cnn: convolutional networks with one numerical core on the Python array API.

The same code trains on NumPy (CPU), CuPy (GPU), PyTorch tensors and
``array_api_strict``; every op has a hand-written, tested backward.
"""

__version__ = "0.1.0"

import os as _os

# OpenBLAS's worker threads spin for about 2**28 cycles (~0.1 s) after each
# GEMM before they sleep. Between our GEMMs come large copies and ufuncs that
# run on both cores, and the spinning threads take the cycles they need: a
# vgg-small training step on 2 cores ran about 10% faster with the threads
# sleeping at once (benchmarks/README.md). OpenBLAS reads this when it loads,
# so it only applies when portable_cnn is imported before NumPy (as the
# portable-cnn command does); a value already set is left alone.
_os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

from . import backend, nn, ops  # noqa: E402
from . import models, optim  # noqa: E402

__all__ = ["__version__", "backend", "models", "nn", "ops", "optim"]
