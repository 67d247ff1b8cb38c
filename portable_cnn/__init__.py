"""portable_cnn: convolutional networks with one numerical core on the Python array API.

The same code trains on NumPy (CPU), CuPy (GPU), PyTorch tensors and
``array_api_strict``; every op has a hand-written, tested backward.
"""

__version__ = "0.1.0"

from . import backend, models, nn, ops, optim

__all__ = ["__version__", "backend", "models", "nn", "ops", "optim"]
