"""Reference networks, by constructor and by name.

Each constructor returns an :class:`~portable_cnn.nn.Sequential` whose layer
order is exactly that of the ``torch.nn`` network written in its docstring,
with ``nn.Flatten`` before the first linear layer, so the ``state_dict`` keys
and shapes are the same in both libraries. The input channels, the input
size (which fixes the width of the first linear layer, where there is no
global pooling) and the number of classes follow the dataset. Weights are
drawn from ``rng`` (an int, a ``numpy.random.Generator``, or ``None`` for the
generator :func:`portable_cnn.nn.manual_seed` seeds), in float32 on NumPy;
move a model with ``model.to("cupy")``.

Initialisation is part of a network's recipe. The digits net keeps the
layers' He-normal ``N(0, 2 / fan_in)`` with zero biases; the others start as
``torch.nn`` initialises them (:func:`torch_default_init`: weights and
biases uniform within ``1/sqrt(fan_in)``; BatchNorm scale one, shift zero).
With He-normal weights the max-pooled ReLU stacks of ``lenet`` and
``vgg-small`` start with logits of standard deviation about 5 (a loss near
10); the first steps of the default recipe (SGD, lr 0.05, momentum 0.9) then
silence every unit of a layer, and some seeds never leave chance accuracy on
real MNIST, or diverge. The batch-normed nets train either way but reach
about half a point more from torch's start (docs/benchmarks.md, "Default
recipes").

>>> from portable_cnn import models
>>> model = models.build_model("lenet", in_channels=1, num_classes=10, input_size=28)
>>> model[7]
Linear(in_features=400, out_features=120, bias=True)
"""

from __future__ import annotations

import math
import operator

import numpy as np

from . import nn
from .nn import _generator
from .ops import out_size

__all__ = ["MODELS", "build_model", "digits_net", "lenet", "mobilenet_small", "resnet20", "torch_default_init",
           "vgg_small"]


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


def torch_default_init(model: nn.Module, rng=None) -> nn.Module:
    """Redraw the weights and biases of every ``Conv2d`` and ``Linear`` as ``torch.nn`` initialises them; returns ``model``.

    Both are uniform on ``[-1/sqrt(fan_in), 1/sqrt(fan_in)]``:
    ``kaiming_uniform_(a=sqrt(5))`` bounds the weight by
    ``sqrt(6 / ((1 + a**2) * fan_in)) = 1/sqrt(fan_in)``, and the bias uses
    the same bound. ``fan_in`` is what one output sees,
    ``in_channels / groups * R * S`` for a convolution. The variance,
    ``1 / (3 fan_in)``, is a sixth of He-normal's. Other layers (BatchNorm)
    are left as they are.

    Parameters
    ----------
    model : portable_cnn.nn.Module
        Float32 on NumPy, as a constructor returns it.
    rng : int or numpy.random.Generator, optional
        Default: the generator :func:`portable_cnn.nn.manual_seed` seeds.

    >>> from portable_cnn import nn
    >>> layer = torch_default_init(nn.Linear(100, 3), rng=0)
    >>> bool(abs(layer.params["weight"]).max() <= 0.1), layer.params["bias"].dtype
    (True, dtype('float32'))
    """
    g = _generator(rng)
    for _, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            # weight (out, fan_in) or (out, in / groups, R, S): fan_in is the product after the first axis.
            bound = 1.0 / math.sqrt(math.prod(module.params["weight"].shape[1:]))
            for key, value in module.params.items():
                module.params[key] = g.uniform(-bound, bound, value.shape).astype(np.float32)
    return model


def lenet(in_channels=1, num_classes=10, input_size=28, rng=None) -> nn.Sequential:
    """LeNet-5 style network; for 1x28x28 input, as this ``torch.nn.Sequential``::

        Conv2d(1, 6, 5, padding=2), ReLU(), MaxPool2d(2),
        Conv2d(6, 16, 5), ReLU(), MaxPool2d(2),
        Flatten(), Linear(400, 120), ReLU(), Linear(120, 84), ReLU(), Linear(84, 10)

    The first linear layer takes ``16 * P * Q`` features, ``P x Q`` the size
    after the second pooling (5x5 for 28x28 input, 6x6 for 32x32).

    Each ``ReLU(), MaxPool2d(2)`` pair runs as ``MaxPool2d(2), ReLU()``: the
    two commute, gradients included (docs/derivation.md, section 7.4), and
    the ReLU then touches a quarter of the values. The state_dict is the
    same (neither layer has parameters), and so are the logits and
    gradients, bit for bit for finite values.
    """
    in_channels, num_classes = _check_counts(in_channels, num_classes, "lenet")
    P, Q = _after(_size_pair(input_size, "lenet"), "lenet", [(5, 1, 2), (2, 2, 0), (5, 1, 0), (2, 2, 0)])
    g = _generator(rng)
    model = nn.Sequential(
        nn.Conv2d(in_channels, 6, 5, padding=2, rng=g), nn.MaxPool2d(2), nn.ReLU(),
        nn.Conv2d(6, 16, 5, rng=g), nn.MaxPool2d(2), nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * P * Q, 120, rng=g), nn.ReLU(),
        nn.Linear(120, 84, rng=g), nn.ReLU(),
        nn.Linear(84, num_classes, rng=g),
    )
    return torch_default_init(model, g)


def vgg_small(in_channels=3, num_classes=10, input_size=32, rng=None) -> nn.Sequential:
    """A small VGG-style network; for 3x32x32 input, as this ``torch.nn.Sequential``::

        Conv2d(3, 32, 3, padding=1), ReLU(), Conv2d(32, 32, 3, padding=1), ReLU(), MaxPool2d(2),
        Conv2d(32, 64, 3, padding=1), ReLU(), Conv2d(64, 64, 3, padding=1), ReLU(), MaxPool2d(2),
        Flatten(), Linear(4096, 256), ReLU(), Linear(256, 10)

    The first linear layer takes ``64 * (H // 4) * (W // 4)`` features.

    Each ``ReLU(), MaxPool2d(2)`` pair runs as ``MaxPool2d(2), ReLU()``: the
    two commute, gradients included (docs/derivation.md, section 7.4), and
    the ReLU then touches a quarter of the values. The state_dict is the
    same (neither layer has parameters), and so are the logits and
    gradients, bit for bit for finite values.
    """
    in_channels, num_classes = _check_counts(in_channels, num_classes, "vgg_small")
    P, Q = _after(_size_pair(input_size, "vgg_small"), "vgg_small", [(2, 2, 0), (2, 2, 0)])
    g = _generator(rng)
    model = nn.Sequential(
        nn.Conv2d(in_channels, 32, 3, padding=1, rng=g), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, rng=g), nn.MaxPool2d(2), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1, rng=g), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1, rng=g), nn.MaxPool2d(2), nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64 * P * Q, 256, rng=g), nn.ReLU(),
        nn.Linear(256, num_classes, rng=g),
    )
    return torch_default_init(model, g)


def digits_net(in_channels=1, num_classes=10, input_size=8, rng=None) -> nn.Sequential:
    """A small network for the 8x8 digits; for 1x8x8 input, as this ``torch.nn.Sequential``::

        Conv2d(1, 16, 3, padding=1), ReLU(), Conv2d(16, 32, 3, padding=1), ReLU(), MaxPool2d(2),
        Flatten(), Linear(512, 64), ReLU(), Linear(64, 10)

    Two padded 3x3 convolutions keep the tiny image whole before a single
    pooling; the first linear layer takes ``32 * (H // 2) * (W // 2)``
    features. It trains to about 98% test accuracy on scikit-learn's digits in
    a few seconds on a CPU. Weights He-normal, biases zero (the layers'
    default).

    The ``ReLU(), MaxPool2d(2)`` pair runs as ``MaxPool2d(2), ReLU()``: the
    two commute, gradients included (docs/derivation.md, section 7.4), and
    the ReLU then touches a quarter of the values. The state_dict is the
    same (neither layer has parameters), and so are the logits and
    gradients, bit for bit for finite values.
    """
    in_channels, num_classes = _check_counts(in_channels, num_classes, "digits_net")
    P, Q = _after(_size_pair(input_size, "digits_net"), "digits_net", [(2, 2, 0)])
    g = _generator(rng)
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, 3, padding=1, rng=g), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, rng=g), nn.MaxPool2d(2), nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * P * Q, 64, rng=g), nn.ReLU(),
        nn.Linear(64, num_classes, rng=g),
    )


def _basic_block(c_in: int, c_out: int, stride: int, g) -> nn.Sequential:
    """ResNet's basic block, ``relu(body(x) + shortcut(x))``; the shortcut projects where the shape changes."""
    body = nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False, rng=g), nn.BatchNorm2d(c_out), nn.ReLU(),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False, rng=g), nn.BatchNorm2d(c_out),
    )
    shortcut = None
    if stride != 1 or c_in != c_out:
        shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False, rng=g), nn.BatchNorm2d(c_out))
    return nn.Sequential(nn.Residual(body, shortcut), nn.ReLU())


def resnet20(in_channels=3, num_classes=10, input_size=32, rng=None) -> nn.Sequential:
    """The CIFAR ResNet-20 of He et al. (2016), with projection shortcuts; as this ``torch.nn`` network::

        import torch.nn as tnn

        class Residual(tnn.Module):  # portable_cnn.nn.Residual
            def __init__(self, body, shortcut=None):
                super().__init__()
                self.body, self.shortcut = body, tnn.Identity() if shortcut is None else shortcut

            def forward(self, x):
                return self.body(x) + self.shortcut(x)

        def block(c_in, c_out, stride):
            body = tnn.Sequential(
                tnn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), tnn.BatchNorm2d(c_out), tnn.ReLU(),
                tnn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), tnn.BatchNorm2d(c_out))
            shortcut = None
            if stride != 1 or c_in != c_out:
                shortcut = tnn.Sequential(tnn.Conv2d(c_in, c_out, 1, stride, bias=False), tnn.BatchNorm2d(c_out))
            return tnn.Sequential(Residual(body, shortcut), tnn.ReLU())

        def stage(c_in, c_out, stride):
            return tnn.Sequential(block(c_in, c_out, stride), block(c_out, c_out, 1), block(c_out, c_out, 1))

        tnn.Sequential(
            tnn.Conv2d(3, 16, 3, padding=1, bias=False), tnn.BatchNorm2d(16), tnn.ReLU(),
            stage(16, 16, 1), stage(16, 32, 2), stage(32, 64, 2),
            tnn.AdaptiveAvgPool2d(1), tnn.Flatten(), tnn.Linear(64, 10))

    A 3x3 stem, three stages of three basic blocks with 16, 32 and 64
    channels (the second and third halve the size with a stride of 2, and
    their first block projects its shortcut with a strided 1x1 convolution
    and BatchNorm), global average pooling and one linear layer: 19
    convolutions and the linear layer, 0.27 million parameters. State names
    read ``"3.0.0.body.0.weight"`` (stage 1, block 0, its residual sum, the
    first convolution). Global pooling makes it fit any input size: 32x32
    ends at 8x8, 28x28 at 7x7, the 8x8 digits at 2x2.

    >>> model = resnet20(in_channels=1, input_size=8, rng=0)
    >>> model[3][0][0].body[0], model[-1]
    (Conv2d(16, 16, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1), bias=False), Linear(in_features=64, out_features=10, bias=True))
    """
    in_channels, num_classes = _check_counts(in_channels, num_classes, "resnet20")
    _size_pair(input_size, "resnet20")  # only checked: global pooling takes any size
    g = _generator(rng)
    stages = []
    for c_in, c_out, stride in ((16, 16, 1), (16, 32, 2), (32, 64, 2)):
        stages.append(nn.Sequential(*(_basic_block(c_in if i == 0 else c_out, c_out, stride if i == 0 else 1, g)
                                      for i in range(3))))
    model = nn.Sequential(
        nn.Conv2d(in_channels, 16, 3, padding=1, bias=False, rng=g), nn.BatchNorm2d(16), nn.ReLU(),
        *stages,
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(64, num_classes, rng=g),
    )
    return torch_default_init(model, g)


#: ``mobilenet_small``'s depthwise-separable blocks: (input channels, output channels, stride).
_MOBILENET_BLOCKS = ((32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1))


def mobilenet_small(in_channels=3, num_classes=10, input_size=32, rng=None) -> nn.Sequential:
    """A small MobileNet (v1 style) of depthwise-separable blocks; as this ``torch.nn.Sequential``::

        import torch.nn as tnn

        def separable(c_in, c_out, stride):
            return tnn.Sequential(
                tnn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in, bias=False), tnn.BatchNorm2d(c_in), tnn.ReLU(),
                tnn.Conv2d(c_in, c_out, 1, bias=False), tnn.BatchNorm2d(c_out), tnn.ReLU())

        tnn.Sequential(
            tnn.Conv2d(3, 32, 3, padding=1, bias=False), tnn.BatchNorm2d(32), tnn.ReLU(),
            separable(32, 64, 1), separable(64, 128, 2), separable(128, 128, 1),
            separable(128, 256, 2), separable(256, 256, 1),
            tnn.AdaptiveAvgPool2d(1), tnn.Flatten(), tnn.Linear(256, 10))

    A 3x3 stem, then five blocks, each a depthwise 3x3 convolution
    (``groups`` = its channels) + BatchNorm + ReLU and a pointwise 1x1
    convolution + BatchNorm + ReLU; the second and fourth halve the size.
    Global average pooling and one linear layer end it, so it fits any input
    size (32x32 ends at 8x8, the 8x8 digits at 2x2). 0.13 million
    parameters, most of them in the pointwise convolutions. State names read
    ``"3.0.weight"`` (block 1, its depthwise convolution).

    >>> mobilenet_small(rng=0)[3][0]
    Conv2d(32, 32, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=32, bias=False)
    """
    in_channels, num_classes = _check_counts(in_channels, num_classes, "mobilenet_small")
    _size_pair(input_size, "mobilenet_small")  # only checked: global pooling takes any size
    g = _generator(rng)
    blocks = [
        nn.Sequential(
            nn.Conv2d(c_in, c_in, 3, stride=stride, padding=1, groups=c_in, bias=False, rng=g), nn.BatchNorm2d(c_in),
            nn.ReLU(),
            nn.Conv2d(c_in, c_out, 1, bias=False, rng=g), nn.BatchNorm2d(c_out), nn.ReLU(),
        )
        for c_in, c_out, stride in _MOBILENET_BLOCKS
    ]
    model = nn.Sequential(
        nn.Conv2d(in_channels, 32, 3, padding=1, bias=False, rng=g), nn.BatchNorm2d(32), nn.ReLU(),
        *blocks,
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(_MOBILENET_BLOCKS[-1][1], num_classes, rng=g),
    )
    return torch_default_init(model, g)


#: Constructors by the name the command line uses (``--model``).
MODELS = {"digits": digits_net, "lenet": lenet, "vgg-small": vgg_small, "resnet20": resnet20,
          "mobilenet-small": mobilenet_small}


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
