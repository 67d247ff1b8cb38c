"""Layers: thin wrappers that hold parameters and call one op each way.

A layer has ``params`` and ``grads`` (dicts of raw arrays; ``grads`` is
overwritten, not accumulated, by each ``backward``), ``buffers`` for state
that is saved but not trained (BatchNorm's running statistics), ``forward(x)``
that caches what its backward needs, and ``backward(dy)`` that returns dL/dx.
Parameters and shapes follow ``torch.nn`` so a ``state_dict`` moves between
the two unchanged.

Initial weights come from a NumPy generator (:func:`manual_seed` seeds the
default one, or pass ``rng=``), so one seed gives the same initial model on
every backend; :meth:`Module.to` then moves the model. Weights use He (Kaiming)
normal initialisation, ``N(0, 2 / fan_in)``, suited to ReLU networks; biases
start at zero.

>>> import numpy as np
>>> from portable_cnn import nn
>>> nn.manual_seed(0)
>>> model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32, 3))
>>> model.forward(np.ones((5, 1, 4, 4), dtype=np.float32)).shape
(5, 3)
>>> sorted(model.state_dict())
['0.bias', '0.weight', '3.bias', '3.weight']
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from types import ModuleType

import numpy as np

from . import backend, ops
from .geometry import pair
from .ops.dropout import check_probability

__all__ = [
    "manual_seed",
    "layer_hook",
    "Module",
    "Conv2d",
    "MaxPool2d",
    "AvgPool2d",
    "ReLU",
    "Sigmoid",
    "Tanh",
    "Flatten",
    "Linear",
    "SoftmaxCrossEntropy",
    "Sequential",
    "BatchNorm2d",
    "Dropout",
]

_default_rng = np.random.default_rng(0)


def manual_seed(seed: int) -> None:
    """Reseed the generator that layers created without ``rng=`` draw from."""
    global _default_rng
    _default_rng = np.random.default_rng(seed)


def _generator(rng) -> np.random.Generator:
    if rng is None:
        return _default_rng
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


def _he_normal(rng, shape, fan_in) -> np.ndarray:
    return (_generator(rng).standard_normal(shape) * math.sqrt(2.0 / fan_in)).astype(np.float32)


_hook = None  # set by layer_hook: how containers call their children


@contextmanager
def layer_hook(hook):
    """Route every call a container makes to a child through ``hook`` while the block runs.

    ``hook(layer, direction, call)`` is called with the child, ``"forward"``
    or ``"backward"``, and ``call``, which runs the child's method with the
    arguments the container gave and returns its result; the hook returns
    that result. Containers are children too (they are reported, then their
    own children), so a profiler that times layers times the leaves only.
    ``portable-cnn bench --breakdown`` times layer types this way.

    >>> from portable_cnn import nn
    >>> seen = []
    >>> def record(layer, direction, call):
    ...     seen.append((type(layer).__name__, direction))
    ...     return call()
    >>> model = nn.Sequential(nn.Linear(2, 2, rng=0), nn.ReLU())
    >>> with layer_hook(record):
    ...     _ = model.backward(model.forward(np.ones((1, 2), dtype=np.float32)))
    >>> seen
    [('Linear', 'forward'), ('ReLU', 'forward'), ('ReLU', 'backward'), ('Linear', 'backward')]
    """
    global _hook
    previous, _hook = _hook, hook
    try:
        yield
    finally:
        _hook = previous


def _call_child(layer, direction, method, *args, **kwargs):
    """``method(*args, **kwargs)``, through the active :func:`layer_hook` if there is one."""
    if _hook is None:
        return method(*args, **kwargs)
    return _hook(layer, direction, lambda: method(*args, **kwargs))


class Module:
    """Base of all layers and containers: parameters, buffers, child modules, modes and backend moves.

    A module owns ``params`` and ``buffers`` (dicts of raw arrays) and
    ``grads`` (written by ``backward``). Child modules are the attributes
    that hold a :class:`Module` (registered by assignment, in order) and the
    items of ``Sequential``; :meth:`named_modules` walks them, and every
    method that concerns the whole model (``named_parameters``,
    ``state_dict``, ``train``, ``to``) follows that walk, so modules nest to
    any depth with dotted names (``"3.body.0.weight"``), as ``torch.nn``
    names them.
    """

    def __init__(self):
        object.__setattr__(self, "_children", {})
        self.params: dict = {}
        self.grads: dict = {}
        self.buffers: dict = {}
        self.training = True

    def __setattr__(self, name, value):
        children = self.__dict__.get("_children")
        if children is None:
            raise AttributeError(f"{type(self).__name__}: call Module.__init__() before setting attributes")
        if isinstance(value, Module):
            children[name] = value
        else:
            children.pop(name, None)
        object.__setattr__(self, name, value)

    def add_module(self, name: str, module) -> None:
        """Register ``module`` as a child called ``name`` (``Sequential`` uses ``"0"``, ``"1"``, ...)."""
        if not isinstance(module, Module):
            raise TypeError(f"{type(self).__name__}: child {name!r} must be a portable_cnn.nn.Module, got {type(module).__name__}")
        self._children[str(name)] = module

    def forward(self, x):  # pragma: no cover - abstract
        raise NotImplementedError

    def backward(self, dy, need_input_grad=True):  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    @property
    def where(self) -> str:
        """This module's name in error messages, its ``repr``, formatted on first use and then kept."""
        where = self.__dict__.get("_where")
        if where is None:
            where = repr(self)
            object.__setattr__(self, "_where", where)
        return where

    # ---------------------------------------------------------------- the tree

    def children(self):
        """The direct child modules, in registration order."""
        return iter(self._children.values())

    def named_modules(self, prefix: str = ""):
        """Yield ``(dotted name, module)`` for this module (name ``prefix``) and every descendant, depth first."""
        yield prefix, self
        for name, child in self._children.items():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def named_parameters(self):
        """Yield ``(name, module, key)`` for each parameter, in ``state_dict`` order (``module.params[key]``)."""
        for prefix, module in self.named_modules():
            for key in module.params:
                yield (f"{prefix}.{key}" if prefix else key), module, key

    def named_buffers(self):
        """Yield ``(name, module, key)`` for each buffer (BatchNorm statistics), as :meth:`named_parameters`."""
        for prefix, module in self.named_modules():
            for key in module.buffers:
                yield (f"{prefix}.{key}" if prefix else key), module, key

    def state_dict(self) -> dict:
        """Parameters and buffers by torch-style dotted name, as arrays of the current backend."""
        out = {}
        for prefix, module in self.named_modules():
            for store in (module.params, module.buffers):
                for key, value in store.items():
                    out[f"{prefix}.{key}" if prefix else key] = value
        return out

    def load_state_dict(self, state: dict) -> None:
        """Load arrays (any backend) by name onto this model's backend, dtype and device.

        Keys must match exactly and shapes must agree; otherwise ``KeyError`` or
        ``ValueError`` names the offending keys, and nothing is changed.
        """
        where = f"{type(self).__name__}.load_state_dict"
        own = {name: (module, key) for name, module, key in [*self.named_parameters(), *self.named_buffers()]}
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise KeyError(f"{where}: missing keys {missing}, unexpected keys {unexpected}")
        staged = []
        for name, (module, key) in own.items():
            store = module.params if key in module.params else module.buffers
            current = store[key]
            value = state[name]
            if tuple(value.shape) != tuple(current.shape):
                raise ValueError(
                    f"{where}: {name} ({module.where}) expected shape {tuple(current.shape)}, got {tuple(value.shape)}"
                )
            xp = backend.namespace(current)
            staged.append((store, key, backend.asarray(value, xp, dtype=current.dtype, device=backend.device(current))))
        for store, key, value in staged:
            store[key] = value

    # ------------------------------------------------------- modes and moves

    def train(self, mode: bool = True):
        """Switch this module and its descendants to training mode (``False``: evaluation); returns ``self``."""
        for _, module in self.named_modules():
            module.training = mode
        return self

    def eval(self):
        """Switch to evaluation mode; returns ``self``."""
        return self.train(False)

    def to(self, backend_name: str | ModuleType = "numpy", dtype=None):
        """Move parameters and buffers of the whole tree to a backend (``"numpy"``, ``"cupy"``, ...), optionally casting floats.

        Returns ``self``. Integer buffers keep their dtype; gradients are dropped.
        """
        xp = backend.get_namespace(backend_name) if isinstance(backend_name, str) else backend_name
        for _, module in self.named_modules():
            for store in (module.params, module.buffers):
                for key, value in store.items():
                    floating = np.dtype(backend.dtype_name(value)).kind == "f"
                    store[key] = backend.asarray(value, xp, dtype=dtype if floating else None)
            module.grads = {}
        return self

    def _check_param_shapes(self):
        """Refuse parameters a user set to the wrong shape, naming the layer."""
        for key, shape in self._param_shapes().items():
            if key in self.params and tuple(self.params[key].shape) != shape:
                raise ValueError(f"{self.where}: expected params[{key!r}] of shape {shape}, got {tuple(self.params[key].shape)}")

    def _param_shapes(self) -> dict:
        return {}

    def __repr__(self):
        return f"{type(self).__name__}({self.extra_repr()})"

    def extra_repr(self) -> str:
        return ""


class Conv2d(Module):
    """2-D convolution layer, as ``torch.nn.Conv2d``.

    ``params["weight"]``: ``(out_channels, in_channels, R, S)``;
    ``params["bias"]``: ``(out_channels,)``. ``forward`` maps
    ``(N, in_channels, H, W)`` to ``(N, out_channels, P, Q)``.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, bias=True, *, rng=None):
        super().__init__()
        R, S = pair(kernel_size, "kernel_size", "Conv2d", minimum=1)
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = (R, S)
        self.stride = pair(stride, "stride", "Conv2d", minimum=1)
        self.padding = pair(padding, "padding", "Conv2d", minimum=0)
        self.dilation = pair(dilation, "dilation", "Conv2d", minimum=1)
        fan_in = self.in_channels * R * S
        self.params["weight"] = _he_normal(rng, (self.out_channels, self.in_channels, R, S), fan_in)
        if bias:
            self.params["bias"] = np.zeros(self.out_channels, dtype=np.float32)
        self._cache = None
        self._workspace = {}  # scratch buffers the op reuses from step to step

    def _param_shapes(self):
        return {"weight": (self.out_channels, self.in_channels) + self.kernel_size, "bias": (self.out_channels,)}

    def extra_repr(self):
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, bias={'bias' in self.params}"
        )

    def forward(self, x):
        self._check_param_shapes()
        y, cols = ops.conv2d(
            x, self.params["weight"], self.params.get("bias"), self.stride, self.padding, self.dilation,
            return_cols=True, workspace=self._workspace, where=self.where,
        )
        # Training keeps the im2col matrix for dW; evaluation keeps only x.
        self._cache = (x, cols if self.training else None)
        return y

    def backward(self, dy, need_input_grad=True):
        x, cols = self._cache
        dx, self.grads["weight"], db = ops.conv2d_backward(
            dy, x, self.params["weight"], self.stride, self.padding, self.dilation,
            cols=cols, has_bias="bias" in self.params, need_input_grad=need_input_grad,
            workspace=self._workspace, where=self.where,
        )
        if db is not None:
            self.grads["bias"] = db
        return dx


class Linear(Module):
    """Fully connected layer, as ``torch.nn.Linear``: ``params["weight"]`` is ``(out_features, in_features)``."""

    def __init__(self, in_features, out_features, bias=True, *, rng=None):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.params["weight"] = _he_normal(rng, (self.out_features, self.in_features), self.in_features)
        if bias:
            self.params["bias"] = np.zeros(self.out_features, dtype=np.float32)
        self._x = None

    def _param_shapes(self):
        return {"weight": (self.out_features, self.in_features), "bias": (self.out_features,)}

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={'bias' in self.params}"

    def forward(self, x):
        self._check_param_shapes()
        self._x = x
        return ops.linear(x, self.params["weight"], self.params.get("bias"), where=self.where)

    def backward(self, dy, need_input_grad=True):
        dx, self.grads["weight"], db = ops.linear_backward(
            dy, self._x, self.params["weight"], has_bias="bias" in self.params,
            need_input_grad=need_input_grad, where=self.where,
        )
        if db is not None:
            self.grads["bias"] = db
        return dx


class _Pool2d(Module):
    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__()
        name = type(self).__name__
        self.kernel_size = pair(kernel_size, "kernel_size", name, minimum=1)
        self.stride = pair(stride, "stride", name, minimum=1) if stride is not None else self.kernel_size
        self.padding = pair(padding, "padding", name, minimum=0)
        self._cache = None

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class MaxPool2d(_Pool2d):
    """Max pooling, as ``torch.nn.MaxPool2d``; the gradient goes to the first maximum of each window."""

    def forward(self, x):
        y, argmax = ops.max_pool2d(x, self.kernel_size, self.stride, self.padding, where=self.where)
        self._cache = (tuple(x.shape), argmax)
        return y

    def backward(self, dy, need_input_grad=True):
        if not need_input_grad:
            return None
        x_shape, argmax = self._cache
        return ops.max_pool2d_backward(dy, argmax, x_shape, self.kernel_size, self.stride, self.padding, where=self.where)


class AvgPool2d(_Pool2d):
    """Average pooling, as ``torch.nn.AvgPool2d`` (padding counts in the divisor)."""

    def forward(self, x):
        y = ops.avg_pool2d(x, self.kernel_size, self.stride, self.padding, where=self.where)
        self._cache = tuple(x.shape)
        return y

    def backward(self, dy, need_input_grad=True):
        if not need_input_grad:
            return None
        return ops.avg_pool2d_backward(dy, self._cache, self.kernel_size, self.stride, self.padding, where=self.where)


class ReLU(Module):
    """``max(x, 0)``."""

    def forward(self, x):
        self._x = x
        return ops.relu(x, where=self.where)

    def backward(self, dy, need_input_grad=True):
        if not need_input_grad:
            return None
        return ops.relu_backward(dy, self._x, where=self.where)


class Sigmoid(Module):
    """Logistic sigmoid."""

    def forward(self, x):
        self._y = ops.sigmoid(x, where=self.where)
        return self._y

    def backward(self, dy, need_input_grad=True):
        if not need_input_grad:
            return None
        return ops.sigmoid_backward(dy, self._y, where=self.where)


class Tanh(Module):
    """Hyperbolic tangent."""

    def forward(self, x):
        self._y = ops.tanh(x, where=self.where)
        return self._y

    def backward(self, dy, need_input_grad=True):
        if not need_input_grad:
            return None
        return ops.tanh_backward(dy, self._y, where=self.where)


class Flatten(Module):
    """``(N, ...)`` to ``(N, features)``, as ``torch.nn.Flatten()``."""

    def forward(self, x):
        self._shape = tuple(x.shape)
        return ops.flatten(x, where=self.where)

    def backward(self, dy, need_input_grad=True):
        if not need_input_grad:
            return None
        return ops.flatten_backward(dy, self._shape, where=self.where)


class SoftmaxCrossEntropy(Module):
    """Softmax followed by mean cross-entropy on integer labels.

    ``forward(logits, labels)`` returns the 0-d loss; ``backward()`` returns
    ``dL/dlogits = (softmax(logits) - onehot(labels)) / N``. ``validate=False``
    skips the label-range check, which costs a host sync on a GPU.
    """

    def __init__(self, *, validate: bool = True):
        super().__init__()
        self.validate = validate
        self._cache = None

    def forward(self, logits, labels):
        loss, probs = ops.softmax_cross_entropy(logits, labels, validate=self.validate, where=self.where)
        self._cache = (probs, labels)
        return loss

    def backward(self, dloss=1.0):
        probs, labels = self._cache
        return ops.softmax_cross_entropy_backward(probs, labels, dloss)


class Sequential(Module):
    """Modules applied in order; ``state_dict`` keys as ``torch.nn.Sequential`` names them (``"0.weight"``).

    Any module can be an item, a ``Sequential`` too; nested names are dotted
    (``"1.0.weight"``).

    >>> from portable_cnn import nn
    >>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Sequential(nn.Linear(3, 2), nn.Tanh()))
    >>> [name for name, _, _ in model.named_parameters()]
    ['0.weight', '0.bias', '2.0.weight', '2.0.bias']
    """

    def __init__(self, *layers):
        super().__init__()
        for i, layer in enumerate(layers):
            if not isinstance(layer, Module):
                raise TypeError(f"Sequential: layer {i} must be a portable_cnn.nn.Module, got {type(layer).__name__}")
            self.add_module(str(i), layer)
        self.layers = list(layers)

    def __len__(self):
        return len(self.layers)

    def __getitem__(self, i):
        return self.layers[i]

    def __iter__(self):
        return iter(self.layers)

    def __repr__(self):
        inner = "".join(f"\n  ({i}): " + repr(layer).replace("\n", "\n  ") for i, layer in enumerate(self.layers))
        return f"Sequential({inner}\n)"

    def forward(self, x):
        for layer in self.layers:
            x = _call_child(layer, "forward", layer.forward, x)
        return x

    def backward(self, dy, need_input_grad=True):
        """Backpropagate ``dy`` = dL/d(output); return dL/d(input).

        With ``need_input_grad=False`` (training on data, whose gradient nobody
        reads) the first module is told so: a Conv2d or Linear then skips its
        input gradient, one GEMM and a col2im, and ``None`` is returned.
        """
        last = len(self.layers) - 1
        for i in range(last, -1, -1):
            layer = self.layers[i]
            wanted = need_input_grad or i > 0
            dy = _call_child(layer, "backward", layer.backward, dy, need_input_grad=wanted)
        return dy


class BatchNorm2d(Module):
    """Batch normalisation over channels, as ``torch.nn.BatchNorm2d``.

    ``params``: ``weight`` (ones) and ``bias`` (zeros), ``(num_features,)``.
    ``buffers``: ``running_mean`` (zeros), ``running_var`` (ones) and
    ``num_batches_tracked`` (int64, shape ``()``), PyTorch's names, so a
    ``state_dict`` loads into ``torch.nn.BatchNorm2d`` unchanged. In training
    mode ``forward`` normalises with the batch statistics and updates the
    running ones; in evaluation mode it uses the running ones.
    ``(N, C, H, W)`` in and out.

    >>> import numpy as np
    >>> from portable_cnn import nn
    >>> bn = nn.BatchNorm2d(3)
    >>> y = bn.forward(np.random.default_rng(0).normal(5.0, 2.0, (4, 3, 2, 2)).astype(np.float32))
    >>> bool(abs(y.mean()) < 1e-5), int(bn.buffers["num_batches_tracked"])
    (True, 1)
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1):
        super().__init__()
        self.num_features = int(num_features)
        if self.num_features < 1:
            raise ValueError(f"BatchNorm2d: num_features must be positive, got {num_features!r}")
        self.eps, self.momentum = float(eps), float(momentum)
        self.params["weight"] = np.ones(self.num_features, dtype=np.float32)
        self.params["bias"] = np.zeros(self.num_features, dtype=np.float32)
        self.buffers["running_mean"] = np.zeros(self.num_features, dtype=np.float32)
        self.buffers["running_var"] = np.ones(self.num_features, dtype=np.float32)
        self.buffers["num_batches_tracked"] = np.zeros((), dtype=np.int64)
        self._cache = None

    def _param_shapes(self):
        return {"weight": (self.num_features,), "bias": (self.num_features,)}

    def extra_repr(self):
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"

    def forward(self, x):
        self._check_param_shapes()
        y, self._cache, running_mean, running_var = ops.batch_norm2d(
            x, self.params["weight"], self.params["bias"], self.buffers["running_mean"], self.buffers["running_var"],
            training=self.training, momentum=self.momentum, eps=self.eps, where=self.where,
        )
        if self.training:
            self.buffers["running_mean"], self.buffers["running_var"] = running_mean, running_var
            self.buffers["num_batches_tracked"] = self.buffers["num_batches_tracked"] + 1
        return y

    def backward(self, dy, need_input_grad=True):
        dx, self.grads["weight"], self.grads["bias"] = ops.batch_norm2d_backward(dy, self._cache)
        return dx if need_input_grad else None


class Dropout(Module):
    """Inverted dropout, as ``torch.nn.Dropout``: in training, zero each element with probability ``p`` and scale the rest by ``1 / (1 - p)``; identity in evaluation.

    The random numbers are drawn on the input's device by
    :func:`portable_cnn.backend.random_uniform`, from ``rng`` (an int or a
    ``numpy.random.Generator``) or, without one, from the generator that
    :func:`manual_seed` seeds, looked up at each call as PyTorch's global
    generator is.

    >>> import numpy as np
    >>> from portable_cnn import nn
    >>> drop = nn.Dropout(0.5, rng=0)
    >>> sorted(set(drop.forward(np.ones(1000)).tolist()))
    [0.0, 2.0]
    >>> bool((drop.eval().forward(np.ones(3)) == 1).all())
    True
    """

    def __init__(self, p=0.5, rng=None):
        super().__init__()
        self.p = check_probability(p, "Dropout")
        self.rng = None if rng is None else _generator(rng)
        self._mask = None

    def extra_repr(self):
        return f"p={self.p}"

    def forward(self, x):
        if not self.training or self.p == 0.0:
            # Identity: no random numbers are drawn, nothing is cached.
            self._mask = None
            return x
        xp = backend.namespace(x, where=self.where)
        uniform = backend.random_uniform(xp, tuple(x.shape), _generator(self.rng), dtype=x.dtype, device=backend.device(x))
        y, self._mask = ops.dropout(x, self.p, uniform, where=self.where)
        return y

    def backward(self, dy, need_input_grad=True):
        if not need_input_grad:
            return None
        if self._mask is None:
            return dy
        return ops.dropout_backward(dy, self._mask, where=self.where)
