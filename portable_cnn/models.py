"""Reference networks, by constructor and by name.

Each constructor returns an :class:`~portable_cnn.nn.Sequential` whose layer
order is exactly that of the ``torch.nn.Sequential`` written in its
docstring, with ``nn.Flatten`` before the first linear layer, so the
``state_dict`` keys and shapes are the same in both libraries. The input
channels, the input size (which fixes the width of the first linear layer)
and the number of classes follow the dataset. Weights are He-normal from
``rng`` (an int, a ``numpy.random.Generator``, or ``None`` for the generator
:func:`portable_cnn.nn.manual_seed` seeds), in float32 on NumPy; move a model
with ``model.to("cupy")``.

>>> from portable_cnn import models
>>> model = models.build_model("lenet", in_channels=1, num_classes=10, input_size=28)
>>> model[7]
Linear(in_features=400, out_features=120, bias=True)
"""

from __future__ import annotations

import operator

import numpy as np

from . import nn
from .nn import _generator
from .ops import out_size

__all__ = ["MODELS", "build_model", "digits_net", "lenet", "vgg_small"]


def _size_pair(input_size, where: str) -> tuple[int, int]:
    """``input_size`` (an int or ``(H, W)``) as a pair of positive ints."""
    items = tuple(input_size) if isinstance(input_size, (tuple, list)) else (input_size, input_size)
    try:
        if len(items) != 2 or any(isinstance(v, bool) for v in items):
            raise TypeError
        H, W = (operator.index(v) for v in items)
    except TypeError:
        raise TypeError(f"{where}: input_size must be an int or a pair (H, W) of ints, got {input_size!r}") from None
    if H < 1 or W < 1:
        raise ValueError(f"{where}: input_size must be positive, got {input_size!r}")
    return H, W


def _after(size, where, stages):
    """Spatial size after ``stages`` of ``(kernel, stride, padding)``; ``ValueError`` when it vanishes."""
    H, W = size
    for kernel, stride, padding in stages:
        H, W = out_size(H, kernel, stride, padding), out_size(W, kernel, stride, padding)
        if H < 1 or W < 1:
            raise ValueError(f"{where}: input_size {size} is too small for this network (a layer's output would be empty)")
    return H, W


def _check_counts(in_channels, num_classes, where) -> tuple[int, int]:
    """Both counts as positive Python ints, or an error naming the network."""
    out = []
    for name, value in (("in_channels", in_channels), ("num_classes", num_classes)):
        try:
            if isinstance(value, bool):
                raise TypeError
            value = operator.index(value)
        except TypeError:
            raise TypeError(f"{where}: {name} must be a positive int, got {value!r}") from None
        if value < 1:
            raise ValueError(f"{where}: {name} must be a positive int, got {value!r}")
        out.append(value)
    return out[0], out[1]


def lenet(in_channels=1, num_classes=10, input_size=28, rng=None) -> nn.Sequential:
    """LeNet-5 style network; for 1x28x28 input, as this ``torch.nn.Sequential``::

        Conv2d(1, 6, 5, padding=2), ReLU(), MaxPool2d(2),
        Conv2d(6, 16, 5), ReLU(), MaxPool2d(2),
        Flatten(), Linear(400, 120), ReLU(), Linear(120, 84), ReLU(), Linear(84, 10)

    The first linear layer takes ``16 * P * Q`` features, ``P x Q`` the size
    after the second pooling (5x5 for 28x28 input, 6x6 for 32x32).
    """
    in_channels, num_classes = _check_counts(in_channels, num_classes, "lenet")
    P, Q = _after(_size_pair(input_size, "lenet"), "lenet", [(5, 1, 2), (2, 2, 0), (5, 1, 0), (2, 2, 0)])
    g = _generator(rng)
    return nn.Sequential(
        nn.Conv2d(in_channels, 6, 5, padding=2, rng=g), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5, rng=g), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * P * Q, 120, rng=g), nn.ReLU(),
        nn.Linear(120, 84, rng=g), nn.ReLU(),
        nn.Linear(84, num_classes, rng=g),
    )


def vgg_small(in_channels=3, num_classes=10, input_size=32, rng=None) -> nn.Sequential:
    """A small VGG-style network; for 3x32x32 input, as this ``torch.nn.Sequential``::

        Conv2d(3, 32, 3, padding=1), ReLU(), Conv2d(32, 32, 3, padding=1), ReLU(), MaxPool2d(2),
        Conv2d(32, 64, 3, padding=1), ReLU(), Conv2d(64, 64, 3, padding=1), ReLU(), MaxPool2d(2),
        Flatten(), Linear(4096, 256), ReLU(), Linear(256, 10)

    The first linear layer takes ``64 * (H // 4) * (W // 4)`` features.
    """
    in_channels, num_classes = _check_counts(in_channels, num_classes, "vgg_small")
    P, Q = _after(_size_pair(input_size, "vgg_small"), "vgg_small", [(2, 2, 0), (2, 2, 0)])
    g = _generator(rng)
    return nn.Sequential(
        nn.Conv2d(in_channels, 32, 3, padding=1, rng=g), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, rng=g), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1, rng=g), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1, rng=g), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * P * Q, 256, rng=g), nn.ReLU(),
        nn.Linear(256, num_classes, rng=g),
    )


def digits_net(in_channels=1, num_classes=10, input_size=8, rng=None) -> nn.Sequential:
    """A small network for the 8x8 digits; for 1x8x8 input, as this ``torch.nn.Sequential``::

        Conv2d(1, 16, 3, padding=1), ReLU(), Conv2d(16, 32, 3, padding=1), ReLU(), MaxPool2d(2),
        Flatten(), Linear(512, 64), ReLU(), Linear(64, 10)

    Two padded 3x3 convolutions keep the tiny image whole before a single
    pooling; the first linear layer takes ``32 * (H // 2) * (W // 2)``
    features. It trains to about 98% test accuracy on scikit-learn's digits in
    a few seconds on a CPU.
    """
    in_channels, num_classes = _check_counts(in_channels, num_classes, "digits_net")
    P, Q = _after(_size_pair(input_size, "digits_net"), "digits_net", [(2, 2, 0)])
    g = _generator(rng)
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, 3, padding=1, rng=g), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, rng=g), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * P * Q, 64, rng=g), nn.ReLU(),
        nn.Linear(64, num_classes, rng=g),
    )


#: Constructors by the name the command line uses (``--model``).
MODELS = {"digits": digits_net, "lenet": lenet, "vgg-small": vgg_small}


def build_model(name: str, *, in_channels: int, num_classes: int, input_size, seed: int = 0) -> nn.Sequential:
    """Build the network called ``name`` (a key of :data:`MODELS`) with weights seeded by ``seed``.

    ``input_size`` is an int or ``(H, W)``. An unknown name raises
    ``ValueError`` listing the choices.

    >>> build_model("digits", in_channels=1, num_classes=10, input_size=(8, 8))[6]
    Linear(in_features=512, out_features=64, bias=True)
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(map(repr, MODELS))}")
    return MODELS[name](in_channels=in_channels, num_classes=num_classes, input_size=input_size, rng=np.random.default_rng(seed))
