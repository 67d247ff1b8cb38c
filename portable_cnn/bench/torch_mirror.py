"""The ``torch.nn`` mirror of our layers: the same network in native PyTorch, to load our ``state_dict`` into.

The benchmark's reference runs on it, and the tests' PyTorch oracle builds
its models with it. PyTorch is passed in, never imported here, so importing
this module costs nothing where PyTorch is absent.

Our parameter names and shapes follow ``torch.nn``, so a module built by
:func:`torch_model` has the same ``state_dict`` keys and shapes as ours,
nested ``Sequential`` containers and ``Residual`` blocks included
(``"1.0.weight"``, ``"3.body.0.weight"``).
"""

from __future__ import annotations

import functools

import numpy as np

from .. import backend, nn

__all__ = ["torch_layer", "torch_model", "torch_state"]

# Layers without hyperparameters: our class to the name of torch.nn's.
_PLAIN = {nn.ReLU: "ReLU", nn.Sigmoid: "Sigmoid", nn.Tanh: "Tanh", nn.Flatten: "Flatten", nn.Identity: "Identity"}


@functools.lru_cache(maxsize=None)
def _residual_class(torch):
    """Our :class:`~portable_cnn.nn.Residual` as a ``torch.nn.Module`` class: ``body(x) + shortcut(x)``, children alike.

    Made here, once per ``torch`` module: ``torch.nn`` has no such container,
    and torch is passed in, never imported.
    """

    class Residual(torch.nn.Module):
        def __init__(self, body, shortcut):
            super().__init__()
            self.body, self.shortcut = body, shortcut

        def forward(self, x):
            return self.body(x) + self.shortcut(x)

    return Residual


def torch_layer(torch, layer: nn.Module):
    """The ``torch.nn`` module equivalent to one of our modules, with the same hyperparameters.

    Parameters
    ----------
    torch : module
        The ``torch`` package.
    layer : portable_cnn.nn.Module
        A layer of ours, or a ``Sequential`` or ``Residual`` of them
        (mirrored recursively).

    Returns
    -------
    torch.nn.Module
        Freshly initialised; load our weights with ``load_state_dict``.

    Raises
    ------
    TypeError
        For a module that has no known ``torch.nn`` equivalent.
    """
    tnn = torch.nn
    if isinstance(layer, nn.Sequential):
        return tnn.Sequential(*[torch_layer(torch, child) for child in layer])
    if isinstance(layer, nn.Residual):
        return _residual_class(torch)(torch_layer(torch, layer.body), torch_layer(torch, layer.shortcut))
    if isinstance(layer, nn.Conv2d):
        return tnn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                          layer.dilation, layer.groups, bias="bias" in layer.params)
    if isinstance(layer, nn.Linear):
        return tnn.Linear(layer.in_features, layer.out_features, bias="bias" in layer.params)
    if isinstance(layer, nn.MaxPool2d):
        return tnn.MaxPool2d(layer.kernel_size, layer.stride, layer.padding, layer.dilation, ceil_mode=layer.ceil_mode)
    if isinstance(layer, nn.AvgPool2d):
        return tnn.AvgPool2d(layer.kernel_size, layer.stride, layer.padding, layer.ceil_mode, layer.count_include_pad,
                             layer.divisor_override)
    if isinstance(layer, nn.AdaptiveAvgPool2d):
        return tnn.AdaptiveAvgPool2d(layer.output_size)
    if isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return getattr(tnn, type(layer).__name__)(layer.num_features, eps=layer.eps, momentum=layer.momentum,
                                                 affine=layer.affine, track_running_stats=layer.track_running_stats)
    if isinstance(layer, nn.Dropout):
        return tnn.Dropout(layer.p)
    if type(layer) in _PLAIN:
        return getattr(tnn, _PLAIN[type(layer)])()
    raise TypeError(f"torch_mirror: no torch.nn equivalent known for {layer!r}")


def torch_state(torch, state: dict) -> dict:
    """Our ``state_dict`` (arrays of any backend) as CPU ``torch.Tensor`` copies, for ``load_state_dict``."""
    # A copy: torch.from_numpy warns on read-only arrays and would share memory with writable ones.
    return {name: torch.from_numpy(np.array(backend.to_numpy(value), copy=True)) for name, value in state.items()}


def torch_model(torch, model: nn.Module, state: dict | None = None, device="cpu", dtype: str | None = None):
    """The ``torch.nn`` equivalent of our ``model``, optionally with our weights loaded.

    Parameters
    ----------
    torch : module
        The ``torch`` package.
    model : portable_cnn.nn.Module
        Usually a ``Sequential``; see :func:`torch_layer` for what is mirrored.
    state : dict, optional
        A ``state_dict`` of ours (arrays of any backend, e.g.
        ``model.state_dict()``), loaded strictly; without it the torch module
        keeps its own initial weights.
    device : str or torch.device
        Where the module goes (``"cpu"``, ``"cuda"``).
    dtype : str, optional
        ``"float32"`` or ``"float64"``; the default keeps torch's float32.

    Returns
    -------
    torch.nn.Module
        Its ``state_dict`` keys and shapes equal ``model.state_dict()``'s.
    """
    mirror = torch_layer(torch, model).to(device=device, dtype=None if dtype is None else getattr(torch, dtype))
    if state is not None:
        # After the move: loading copies into the parameters' dtype, so float64 weights stay float64.
        mirror.load_state_dict(torch_state(torch, state))
    return mirror
