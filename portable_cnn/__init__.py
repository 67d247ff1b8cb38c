"""portable_cnn: convolutional networks with one numerical core on the Python array API.

The same code trains on NumPy (CPU), CuPy (GPU), PyTorch tensors and
``array_api_strict``; every op has a hand-written, tested backward. Settings
(the reference path, the convolution workspace, threads, TF32) live in
:mod:`portable_cnn.config`: :func:`get_config`, :func:`set_config`,
:func:`config_context`.
"""

__version__ = "0.1.0"

from .config import config_context, get_config, set_config
from . import backend, models, nn, ops, optim

__all__ = ["__version__", "backend", "config_context", "get_config", "models", "nn", "ops", "optim", "set_config"]
