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
from .geometry import AdaptivePoolGeometry, check_groups, pair
from .kernels.reference.norm import running_statistics
from .ops.dropout import check_probability
from .ops.softmax import check_loss_options

__all__ = [
    "manual_seed",
    "layer_hook",
    "Module",
    "Conv2d",
    "MaxPool2d",
    "AvgPool2d",
    "AdaptiveAvgPool2d",
    "ReLU",
    "Sigmoid",
    "Tanh",
    "Flatten",
    "Linear",
    "SoftmaxCrossEntropy",
    "CrossEntropyLoss",
    "Sequential",
    "Identity",
    "Residual",
    "BatchNorm1d",
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


def _positive_int(value, name: str, where: str) -> int:
    """``value`` as a positive int (a channel or feature count): ``TypeError`` for a non-integer, ``ValueError`` below 1."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{where}: {name} must be a positive integer, got {value!r}")
    if value < 1:
        raise ValueError(f"{where}: {name} must be positive, got {value!r}")
    return int(value)


def _is_floating(dtype) -> bool:
    """Whether a dtype of any library (``"float32"``, ``np.float64``, ``torch.float32``) is a real floating type."""
    try:
        return np.dtype(dtype).kind == "f"
    except TypeError:  # another library's dtype object: torch.float32, torch.bfloat16, ...
        return "float" in str(dtype) and "complex" not in str(dtype)


def _real(value, name: str, where: str, accept, expected: str) -> float:
    """``value`` as a float that ``accept`` takes: ``TypeError`` for a non-number, ``ValueError`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{where}: {name} must be a real number, got {value!r}")
    if not accept(float(value)):
        raise ValueError(f"{where}: {name} must be {expected}, got {value!r}")
    return float(value)


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
            if not hasattr(value, "shape") or not hasattr(value, "dtype"):
                raise TypeError(f"{where}: {name} must be an array, got {type(value).__name__}")
            if np.dtype(backend.dtype_name(value)).kind not in "biuf":
                raise TypeError(f"{where}: {name} must hold real numbers, got dtype {backend.dtype_name(value)}")
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
        # An integer dtype would truncate the weights for good: refused before anything moves.
        if dtype is not None and not _is_floating(dtype):
            raise TypeError(f"{type(self).__name__}.to: dtype must be a floating type (float32, float64), got {dtype!r}")
        xp = backend.get_namespace(backend_name) if isinstance(backend_name, str) else backend_name
        for _, module in self.named_modules():
            for store in (module.params, module.buffers):
                for key, value in store.items():
                    floating = np.dtype(backend.dtype_name(value)).kind == "f"
                    store[key] = backend.asarray(value, xp, dtype=dtype if floating else None)
            module.grads = {}
        return self

    def _saved(self, name: str):
        """What ``forward`` kept for ``backward`` in attribute ``name``; a clear error when ``backward`` comes first."""
        value = getattr(self, name, None)
        if value is None:
            raise RuntimeError(f"{self.where}: backward called before forward; call forward on the batch first")
        return value

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

    ``params["weight"]``: ``(out_channels, in_channels / groups, R, S)``;
    ``params["bias"]``: ``(out_channels,)``. ``forward`` maps
    ``(N, in_channels, H, W)`` to ``(N, out_channels, P, Q)``. With
    ``groups`` > 1 the channels split into that many groups convolved apart
    (both channel counts must divide by it); ``groups == in_channels`` is a
    depthwise convolution, which NumPy and CuPy run with kernels of its own.

    >>> Conv2d(8, 16, 3, padding=1, groups=8)
    Conv2d(8, 16, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=8, bias=True)
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1, bias=True, *,
                 rng=None):
        super().__init__()
        R, S = pair(kernel_size, "kernel_size", "Conv2d", minimum=1)
        self.in_channels = _positive_int(in_channels, "in_channels", "Conv2d")
        self.out_channels = _positive_int(out_channels, "out_channels", "Conv2d")
        self.kernel_size = (R, S)
        self.stride = pair(stride, "stride", "Conv2d", minimum=1)
        self.padding = pair(padding, "padding", "Conv2d", minimum=0)
        self.dilation = pair(dilation, "dilation", "Conv2d", minimum=1)
        self.groups = check_groups(groups, "Conv2d")
        for name, channels in (("in_channels", self.in_channels), ("out_channels", self.out_channels)):
            if channels % self.groups != 0:
                raise ValueError(
                    f"Conv2d: {name} must be divisible by groups, got {name}={channels}, groups={self.groups}"
                )
        fan_in = self.in_channels // self.groups * R * S  # the inputs one output sees, as torch's init counts them
        self.params["weight"] = _he_normal(rng, self._param_shapes()["weight"], fan_in)
        if bias:
            self.params["bias"] = np.zeros(self.out_channels, dtype=np.float32)
        self._cache = None
        self._workspace = {}  # scratch buffers the op reuses from step to step

    def _param_shapes(self):
        weight = (self.out_channels, self.in_channels // self.groups) + self.kernel_size
        return {"weight": weight, "bias": (self.out_channels,)}

    def extra_repr(self):
        groups = f", groups={self.groups}" if self.groups != 1 else ""  # shown only when not 1, as torch does
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}{groups}, bias={'bias' in self.params}"
        )

    def forward(self, x, *, relu=False):
        """``y``; with ``relu``, ``relu(y)`` as the output is written (``ops.conv2d(relu=True)``).

        The backward is then that of the pair: :class:`Sequential` fuses a
        ``ReLU`` that follows this layer so, and skips the ReLU's backward.
        """
        self._check_param_shapes()
        y, cols = ops.conv2d(
            x, self.params["weight"], self.params.get("bias"), self.stride, self.padding, self.dilation, self.groups,
            relu=relu, return_cols=True, workspace=self._workspace, where=self.where,
        )
        # Training keeps the im2col matrix for dW; evaluation keeps only x. A fused ReLU's mask is y > 0.
        self._cache = (x, cols if self.training else None, y if relu else None)
        return y

    def backward(self, dy, need_input_grad=True):
        x, cols, relu_output = self._saved("_cache")
        # The columns serve this backward only. Dropping them here frees each layer's (on CuPy, device memory)
        # as soon as its backward has run, rather than at the next forward, which would otherwise hold two
        # sets at once; x stays, so a second backward unfolds it again.
        self._cache = (x, None, relu_output)
        dx, self.grads["weight"], db = ops.conv2d_backward(
            dy, x, self.params["weight"], self.stride, self.padding, self.dilation, self.groups,
            cols=cols, has_bias="bias" in self.params, need_input_grad=need_input_grad, relu_output=relu_output,
            workspace=self._workspace, where=self.where,
        )
        if db is not None:
            self.grads["bias"] = db
        return dx


class Linear(Module):
    """Fully connected layer, as ``torch.nn.Linear``: ``params["weight"]`` is ``(out_features, in_features)``.

    Acts on the last axis: ``(N, *, in_features)`` to ``(N, *, out_features)``,
    and an unbatched ``(in_features,)`` to ``(out_features,)``.
    """

    def __init__(self, in_features, out_features, bias=True, *, rng=None):
        super().__init__()
        self.in_features = _positive_int(in_features, "in_features", "Linear")
        self.out_features = _positive_int(out_features, "out_features", "Linear")
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
            dy, self._saved("_x"), self.params["weight"], has_bias="bias" in self.params,
            need_input_grad=need_input_grad, where=self.where,
        )
        if db is not None:
            self.grads["bias"] = db
        return dx


class _Pool2d(Module):
    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode=False):
        super().__init__()
        name = type(self).__name__
        self.kernel_size = pair(kernel_size, "kernel_size", name, minimum=1)
        self.stride = pair(stride, "stride", name, minimum=1) if stride is not None else self.kernel_size
        self.padding = pair(padding, "padding", name, minimum=0)
        self.ceil_mode = bool(ceil_mode)
        self._cache = None

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class MaxPool2d(_Pool2d):
    """Max pooling, as ``torch.nn.MaxPool2d``; the gradient goes to the first maximum of each window.

    ``(N, C, H, W)`` or ``(C, H, W)`` to ``(N, C, P, Q)`` or ``(C, P, Q)``;
    ``ceil_mode`` (keyword-only here: torch's ``return_indices`` precedes it)
    keeps a last, partial window (:func:`portable_cnn.ops.max_pool2d`).
    """

    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, *, ceil_mode=False):
        super().__init__(kernel_size, stride, padding, ceil_mode)
        self.dilation = pair(dilation, "dilation", type(self).__name__, minimum=1)

    def _options(self):
        return self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode

    def extra_repr(self):
        return f"{super().extra_repr()}, dilation={self.dilation}, ceil_mode={self.ceil_mode}"

    def forward(self, x, *, relu=False):
        """``y``; with ``relu``, ``relu(y)`` in the same pass (:func:`portable_cnn.ops.max_pool2d_relu`).

        The backward is then that of the pair: :class:`Sequential` fuses a
        ``ReLU`` that follows this layer so, and skips the ReLU's backward.
        """
        pool = ops.max_pool2d_relu if relu else ops.max_pool2d
        y, argmax = pool(x, *self._options(), where=self.where)
        self._cache = (tuple(x.shape), argmax)
        return y

    def backward(self, dy, need_input_grad=True):
        if not need_input_grad:
            return None
        x_shape, argmax = self._saved("_cache")
        return ops.max_pool2d_backward(dy, argmax, x_shape, *self._options(), where=self.where)


class AvgPool2d(_Pool2d):
    """Average pooling, as ``torch.nn.AvgPool2d`` (``ceil_mode``, ``count_include_pad``, ``divisor_override``).

    ``(N, C, H, W)`` or ``(C, H, W)`` to ``(N, C, P, Q)`` or ``(C, P, Q)``;
    the divisor rule is :func:`portable_cnn.ops.avg_pool2d`'s. The ``repr``
    shows what torch's shows: kernel size, stride and padding.
    """

    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
                 divisor_override=None):
        super().__init__(kernel_size, stride, padding, ceil_mode)
        self.count_include_pad = bool(count_include_pad)
        self.divisor_override = divisor_override

    def _options(self):
        return (self.kernel_size, self.stride, self.padding, self.ceil_mode, self.count_include_pad,
                self.divisor_override)

    def forward(self, x):
        y = ops.avg_pool2d(x, *self._options(), where=self.where)
        self._cache = tuple(x.shape)
        return y

    def backward(self, dy, need_input_grad=True):
        if not need_input_grad:
            return None
        return ops.avg_pool2d_backward(dy, self._saved("_cache"), *self._options(), where=self.where)


class AdaptiveAvgPool2d(Module):
    """Adaptive average pooling, as ``torch.nn.AdaptiveAvgPool2d``: ``(N, C, H, W)`` to ``(N, C, P, Q)``, any H, W.

    ``output_size`` is an int or a pair whose ``None`` entries keep that
    input size; it is stored as a pair. ``AdaptiveAvgPool2d(1)`` is global
    average pooling, run by its own, cheaper kernels
    (:func:`portable_cnn.ops.global_avg_pool2d`). Unbatched ``(C, H, W)``
    inputs give ``(C, P, Q)``.

    >>> import numpy as np
    >>> from portable_cnn import nn
    >>> nn.AdaptiveAvgPool2d(1).forward(np.ones((2, 3, 4, 4))).shape
    (2, 3, 1, 1)
    """

    def __init__(self, output_size):
        super().__init__()
        AdaptivePoolGeometry.of((1, 1, 1, 1), output_size, type(self).__name__)  # the checks, now
        self.output_size = tuple(output_size) if isinstance(output_size, (tuple, list)) else (output_size,) * 2
        self._x_shape = None

    def extra_repr(self):
        return f"output_size={self.output_size}"

    def forward(self, x):
        self._x_shape = tuple(x.shape)
        return ops.adaptive_avg_pool2d(x, self.output_size, where=self.where)

    def backward(self, dy, need_input_grad=True):
        if not need_input_grad:
            return None
        return ops.adaptive_avg_pool2d_backward(dy, self._saved("_x_shape"), self.output_size, where=self.where)


class ReLU(Module):
    """``max(x, 0)``."""

    def forward(self, x):
        self._x = x
        return ops.relu(x, where=self.where)

    def _fused(self, y):
        """Take ``y = relu(x)`` from the layer before (see :class:`Sequential`); return it.

        ``y > 0`` exactly where ``x > 0``, so ``y`` serves the backward as ``x`` would.
        """
        self._x = y
        return y

    def backward(self, dy, need_input_grad=True):
        if not need_input_grad:
            return None
        return ops.relu_backward(dy, self._saved("_x"), where=self.where)


class Sigmoid(Module):
    """Logistic sigmoid."""

    def forward(self, x):
        self._y = ops.sigmoid(x, where=self.where)
        return self._y

    def backward(self, dy, need_input_grad=True):
        if not need_input_grad:
            return None
        return ops.sigmoid_backward(dy, self._saved("_y"), where=self.where)


class Tanh(Module):
    """Hyperbolic tangent."""

    def forward(self, x):
        self._y = ops.tanh(x, where=self.where)
        return self._y

    def backward(self, dy, need_input_grad=True):
        if not need_input_grad:
            return None
        return ops.tanh_backward(dy, self._saved("_y"), where=self.where)


class Flatten(Module):
    """``(N, ...)`` to ``(N, features)``, as ``torch.nn.Flatten()``."""

    def forward(self, x):
        self._shape = tuple(x.shape)
        return ops.flatten(x, where=self.where)

    def backward(self, dy, need_input_grad=True):
        if not need_input_grad:
            return None
        return ops.flatten_backward(dy, self._saved("_shape"), where=self.where)


class SoftmaxCrossEntropy(Module):
    """Softmax followed by cross-entropy, as ``torch.nn.CrossEntropyLoss`` (also available by that name).

    ``forward(logits, target)`` returns the loss: logits ``(N, K)``,
    ``(N, K, d1, ...)`` or ``(K,)``; ``target`` integer class labels (the
    logits' shape without the class axis) or probabilities (the logits'
    shape). ``backward(dloss=1.0)`` returns ``dL/dlogits``, by default
    ``(softmax(logits) - onehot(labels)) / N``. The options are
    :func:`portable_cnn.ops.softmax_cross_entropy`'s; ``weight`` ``(K,)`` is
    a buffer, as in PyTorch: it is in this module's ``state_dict`` and moves
    with :meth:`Module.to` (a model does not hold its loss, so a model's
    ``state_dict`` is unchanged). ``validate=False`` skips the label-range
    check, which costs a host sync on a GPU.

    >>> import numpy as np
    >>> from portable_cnn import nn
    >>> loss_fn = nn.CrossEntropyLoss(np.array([1.0, 3.0]), label_smoothing=0.1)
    >>> loss_fn
    SoftmaxCrossEntropy(weight=(2,), label_smoothing=0.1)
    >>> round(float(loss_fn.forward(np.zeros((2, 2)), np.array([0, 1]))), 6)
    0.693147
    >>> loss_fn.backward().shape
    (2, 2)
    """

    def __init__(self, weight=None, *, ignore_index=-100, reduction="mean", label_smoothing=0.0, validate: bool = True):
        super().__init__()
        name = type(self).__name__
        self.ignore_index, self.reduction, self.label_smoothing = check_loss_options(
            ignore_index, reduction, label_smoothing, name
        )
        if weight is not None:
            backend.namespace(weight, where=f"{name}: weight")
            self.buffers["weight"] = weight
        self.validate = validate
        self._cache = None

    def extra_repr(self):
        weight = self.buffers.get("weight")
        options = [] if weight is None else [f"weight={tuple(weight.shape)}"]
        if self.ignore_index != -100:
            options.append(f"ignore_index={self.ignore_index}")
        if self.reduction != "mean":
            options.append(f"reduction={self.reduction!r}")
        if self.label_smoothing:
            options.append(f"label_smoothing={self.label_smoothing}")
        return ", ".join(options)

    def _options(self):
        return {
            "weight": self.buffers.get("weight"), "ignore_index": self.ignore_index, "reduction": self.reduction,
            "label_smoothing": self.label_smoothing, "where": self.where,
        }

    def forward(self, logits, target):
        loss, probs = ops.softmax_cross_entropy(logits, target, validate=self.validate, **self._options())
        self._cache = (probs, target)
        return loss

    def backward(self, dloss=1.0):
        probs, target = self._saved("_cache")
        return ops.softmax_cross_entropy_backward(probs, target, dloss, **self._options())


#: ``torch.nn``'s name for :class:`SoftmaxCrossEntropy`.
CrossEntropyLoss = SoftmaxCrossEntropy


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
        self._fused_relus = frozenset()  # indices of the ReLUs the last forward fused into the layer before

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
        """The layers in order; a ``Conv2d`` or ``MaxPool2d`` and the ``ReLU`` after it run as one op.

        The pairs are ``ops.conv2d(relu=True)`` and
        :func:`portable_cnn.ops.max_pool2d_relu`: the same output and
        gradients, bit for bit (docs/derivation.md, sections 5c and 7.4),
        with no pass of the ReLU's own, forward or backward. Under
        :func:`layer_hook` every layer runs on its own, so that a profiler
        sees each.
        """
        layers, fused = self.layers, []
        i = 0
        while i < len(layers):
            layer = layers[i]
            if _hook is None and i + 1 < len(layers) and _fuses_relu(layer, layers[i + 1]):
                x = layers[i + 1]._fused(layer.forward(x, relu=True))
                fused.append(i + 1)
                i += 2
                continue
            x = _call_child(layer, "forward", layer.forward, x)
            i += 1
        self._fused_relus = frozenset(fused)
        return x

    def backward(self, dy, need_input_grad=True):
        """Backpropagate ``dy`` = dL/d(output); return dL/d(input).

        With ``need_input_grad=False`` (training on data, whose gradient nobody
        reads) the first module is told so: a Conv2d or Linear then skips its
        input gradient, one GEMM and a col2im, and ``None`` is returned. A
        ReLU the forward fused into the convolution or max pooling before it
        is skipped: that layer's backward applies it.
        """
        last = len(self.layers) - 1
        fused = self._fused_relus if _hook is None else frozenset()
        for i in range(last, -1, -1):
            if i in fused:
                continue
            layer = self.layers[i]
            wanted = need_input_grad or i > 0
            dy = _call_child(layer, "backward", layer.backward, dy, need_input_grad=wanted)
        return dy


def _fuses_relu(layer, after) -> bool:
    """A ``Conv2d`` or ``MaxPool2d`` followed by a ``ReLU`` (exactly these classes): a pair the forward fuses."""
    return type(layer) in (Conv2d, MaxPool2d) and type(after) is ReLU


class Identity(Module):
    """``x`` unchanged, as ``torch.nn.Identity``; the gradient passes through unchanged too. :class:`Residual`'s plain shortcut."""

    def forward(self, x):
        return x

    def backward(self, dy, need_input_grad=True):
        return dy if need_input_grad else None


class Residual(Module):
    """``body(x) + shortcut(x)``, the sum of a residual block; ``shortcut=None`` is the identity.

    The children are named ``body`` and ``shortcut`` (an :class:`Identity`
    when none is given), so ``state_dict`` names read ``"3.body.0.weight"``
    and ``"3.shortcut.1.running_mean"``. Both branches must give the same
    shape; a projection shortcut (a strided 1x1 ``Conv2d`` and a
    ``BatchNorm2d``) makes them agree when the body changes it.

    Backward: ``x`` fans out to both branches, so ``dL/dx`` is the sum of what
    each branch sends back for the same ``dy`` (docs/derivation.md,
    section 13). Both branches always backpropagate, since their parameters
    need gradients; ``need_input_grad=False`` is passed on to both (a
    ``Conv2d`` at the front of either then skips only its input gradient)
    and the sum is skipped.

    ResNet's basic block is ``relu(body(x) + shortcut(x))``: the ReLU after
    the sum is a layer of its own, in a ``Sequential``:

    >>> import numpy as np
    >>> from portable_cnn import nn
    >>> block = nn.Sequential(
    ...     nn.Residual(
    ...         nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
    ...                       nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)),
    ...         shortcut=nn.Sequential(nn.Conv2d(4, 8, 1, stride=2, bias=False), nn.BatchNorm2d(8)),
    ...     ),
    ...     nn.ReLU(),
    ... )
    >>> y = block.forward(np.ones((2, 4, 8, 8), dtype=np.float32))
    >>> y.shape, block.backward(np.ones_like(y)).shape
    ((2, 8, 4, 4), (2, 4, 8, 8))
    >>> [name for name in block.state_dict() if name.endswith("weight")]
    ['0.body.0.weight', '0.body.1.weight', '0.body.3.weight', '0.body.4.weight', '0.shortcut.0.weight', '0.shortcut.1.weight']

    The ``torch.nn`` equivalent is a module with the same two children whose
    forward returns ``body(x) + shortcut(x)``; :mod:`portable_cnn.bench.torch_mirror`
    builds it (``_residual_class``), so its state_dict names match these.
    """

    def __init__(self, body, shortcut=None):
        super().__init__()
        if not isinstance(body, Module):
            raise TypeError(f"Residual: body must be a portable_cnn.nn.Module, got {type(body).__name__}")
        if shortcut is not None and not isinstance(shortcut, Module):
            raise TypeError(f"Residual: shortcut must be a portable_cnn.nn.Module or None, got {type(shortcut).__name__}")
        self.body = body
        self.shortcut = Identity() if shortcut is None else shortcut

    def __repr__(self):
        inner = "".join(f"\n  ({name}): " + repr(child).replace("\n", "\n  ") for name, child in self._children.items())
        return f"Residual({inner}\n)"

    def forward(self, x):
        body = _call_child(self.body, "forward", self.body.forward, x)
        shortcut = _call_child(self.shortcut, "forward", self.shortcut.forward, x)
        if tuple(body.shape) != tuple(shortcut.shape):
            # A sum would broadcast silently, and the backward would then be wrong.
            raise ValueError(
                f"Residual: body output shape {tuple(body.shape)} does not match shortcut output shape "
                f"{tuple(shortcut.shape)} (input shape {tuple(x.shape)})"
            )
        return body + shortcut

    def backward(self, dy, need_input_grad=True):
        """Send ``dy`` into both branches; return the sum of what reaches the input (``None`` with ``need_input_grad=False``)."""
        dx_body = _call_child(self.body, "backward", self.body.backward, dy, need_input_grad=need_input_grad)
        dx_shortcut = _call_child(self.shortcut, "backward", self.shortcut.backward, dy, need_input_grad=need_input_grad)
        return dx_body + dx_shortcut if need_input_grad else None


class _BatchNorm(Module):
    """Batch normalisation over channels (axis 1), as ``torch.nn``'s ``_BatchNorm``: the options and state of both layers.

    ``params`` (with ``affine=True``): ``weight`` (ones) and ``bias`` (zeros),
    ``(num_features,)``. ``buffers`` (with ``track_running_stats=True``):
    ``running_mean`` (zeros), ``running_var`` (ones) and
    ``num_batches_tracked`` (int64, shape ``()``). The names are PyTorch's,
    so a ``state_dict`` loads into the ``torch.nn`` layer of the same options
    unchanged. In training mode ``forward`` normalises with the batch
    statistics and updates the running ones (``momentum=None``: their
    cumulative mean, weight ``1 / num_batches_tracked``, which reads the
    counter back to the host); in evaluation mode it uses the running ones,
    or the batch's without them.

    Data-parallel training (:func:`portable_cnn.distributed.attach`) sets
    ``replicas``: an object with ``rows``, ``(start, total)`` (this rank's
    input is rows ``start:start + N`` of a global batch of ``total``), and
    ``sum(array)`` (the array summed over all ranks). Training then uses
    the statistics of the global batch, as one process given the whole batch
    would: ``sum(x)`` and then ``sum((x - mean)**2)`` are summed over the
    ranks in the forward, ``sum(dy)`` and ``sum(dy * xhat)`` in the backward
    (the formulas of :mod:`portable_cnn.ops.norm` with global sums; the
    parameter gradients stay this rank's share, summed with the others by
    the optimizer).
    """

    _layouts: dict = {}  # input ndim -> its axes, as errors name them

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True):
        super().__init__()
        name = type(self).__name__
        self.num_features = _positive_int(num_features, "num_features", name)
        self.eps = _real(eps, "eps", name, lambda v: 0 < v < math.inf, "a positive number")
        self.momentum = None if momentum is None else _real(momentum, "momentum", name, lambda v: 0 <= v <= 1,
                                                            "in [0, 1] or None")
        self.affine, self.track_running_stats = bool(affine), bool(track_running_stats)
        if self.affine:
            self.params["weight"] = np.ones(self.num_features, dtype=np.float32)
            self.params["bias"] = np.zeros(self.num_features, dtype=np.float32)
        if self.track_running_stats:
            self.buffers["running_mean"] = np.zeros(self.num_features, dtype=np.float32)
            self.buffers["running_var"] = np.ones(self.num_features, dtype=np.float32)
            self.buffers["num_batches_tracked"] = np.zeros((), dtype=np.int64)
        self.replicas = None  # set for data-parallel training (class docstring)
        self._cache = None

    def _param_shapes(self):
        return {"weight": (self.num_features,), "bias": (self.num_features,)}

    def extra_repr(self):
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}"
        )

    def forward(self, x):
        if x.ndim not in self._layouts:
            dims, layouts = " or ".join(str(n) for n in self._layouts), " or ".join(self._layouts.values())
            raise ValueError(f"{self.where}: expected input of {dims} dimensions {layouts}, got shape {tuple(x.shape)}")
        self._check_param_shapes()
        updating = self.training and self.track_running_stats
        momentum = self.momentum
        if updating and momentum is None:
            momentum = 1.0 / (int(self.buffers["num_batches_tracked"]) + 1)
        if self.training and self.replicas is not None:
            y, self._cache, running_mean, running_var = self._forward_global(x, momentum)
        else:
            y, self._cache, running_mean, running_var = ops.batch_norm(
                x, self.params.get("weight"), self.params.get("bias"), self.buffers.get("running_mean"),
                self.buffers.get("running_var"), training=self.training, momentum=momentum, eps=self.eps, where=self.where,
            )
        if updating:
            self.buffers["running_mean"], self.buffers["running_var"] = running_mean, running_var
            self.buffers["num_batches_tracked"] = self.buffers["num_batches_tracked"] + 1
        return y

    def backward(self, dy, need_input_grad=True):
        if isinstance(self._cache, _GlobalBatchCache):
            return self._backward_global(dy, need_input_grad)
        dx, dweight, dbias = ops.batch_norm_backward(dy, self._saved("_cache"))
        if self.affine:
            self.grads["weight"], self.grads["bias"] = dweight, dbias
        return dx if need_input_grad else None

    # ------------------------------------------- statistics of a batch split across ranks

    def _forward_global(self, x, momentum):
        """Training forward with the global batch's statistics: ``(y, cache, new_running_mean, new_running_var)``."""
        xp = backend.namespace(x, where=self.where)
        axes = (0, *range(2, x.ndim))
        _, total = self.replicas.rows
        M = total * math.prod(x.shape[2:])  # values per channel in the global batch
        if M <= 1:
            raise ValueError(f"{self.where}: expected more than 1 value per channel when training, got a global batch "
                             f"of input shape {(total, *tuple(x.shape[1:]))}")
        # Two passes, as the reference takes them: the mean first, then the
        # centred squares, each summed over the ranks (C values per Allreduce).
        mean = self.replicas.sum(xp.sum(x, axis=axes)) / M  # (C,)
        centred = x - _per_channel(xp, mean, x.ndim)  # (N, C, *spatial)
        var = self.replicas.sum(xp.sum(centred * centred, axis=axes)) / M  # (C,) biased
        inv_std = 1.0 / xp.sqrt(var + self.eps)  # (C,)
        xhat = centred * _per_channel(xp, inv_std, x.ndim)
        y = xhat
        if self.affine:
            y = xhat * _per_channel(xp, self.params["weight"], x.ndim) + _per_channel(xp, self.params["bias"], x.ndim)
        running_mean, running_var = self.buffers.get("running_mean"), self.buffers.get("running_var")
        if running_mean is not None:
            running_mean, running_var = running_statistics(running_mean, running_var, mean, var, M, momentum)
        return y, _GlobalBatchCache(xhat, inv_std, M), running_mean, running_var

    def _backward_global(self, dy, need_input_grad):
        """Backward of :meth:`_forward_global`: ``dx = weight * inv_std * (dy - sum(dy) / M - xhat * sum(dy * xhat) / M)``, global sums."""
        xhat, inv_std, M = self._cache
        xp = backend.namespace(dy, xhat, where=self.where)
        if tuple(dy.shape) != tuple(xhat.shape):
            raise ValueError(f"{self.where}: expected output gradient of shape {tuple(xhat.shape)}, got {tuple(dy.shape)}")
        axes, ndim = (0, *range(2, dy.ndim)), dy.ndim
        sums = xp.stack([xp.sum(dy, axis=axes), xp.sum(dy * xhat, axis=axes)])  # (2, C): this rank's sum(dy), sum(dy * xhat)
        if self.affine:
            self.grads["bias"], self.grads["weight"] = sums[0, :], sums[1, :]
        if not need_input_grad:
            return None
        total = self.replicas.sum(sums)  # (2, C) over the global batch
        scale = inv_std if not self.affine else self.params["weight"] * inv_std  # (C,)
        centred = dy - _per_channel(xp, total[0, :] / M, ndim) - xhat * _per_channel(xp, total[1, :] / M, ndim)
        return centred * _per_channel(xp, scale, ndim)


class _GlobalBatchCache(tuple):
    """What :meth:`_BatchNorm._backward_global` needs: ``(xhat, inv_std, M)``, ``M`` the global values per channel."""

    def __new__(cls, xhat, inv_std, M):
        return super().__new__(cls, (xhat, inv_std, M))


def _per_channel(xp, v, ndim):
    """A ``(C,)`` vector shaped to broadcast against ``(N, C, *spatial)``."""
    return xp.reshape(v, (1, v.shape[0]) + (1,) * (ndim - 2))  # (1, C, 1, ...)


class BatchNorm1d(_BatchNorm):
    """Batch normalisation of ``(N, C)`` or ``(N, C, L)`` input, as ``torch.nn.BatchNorm1d``.

    Statistics per channel ``C``, over ``N`` (and ``L``); options and state:
    :class:`_BatchNorm`.

    >>> import numpy as np
    >>> from portable_cnn import nn
    >>> bn = nn.BatchNorm1d(3, affine=False, track_running_stats=False)
    >>> y = bn.forward(np.random.default_rng(0).normal(5.0, 2.0, (8, 3)))
    >>> bool(np.abs(y.mean(axis=0)).max() < 1e-12), sorted(bn.state_dict())
    (True, [])
    """

    _layouts = {2: "(N, C)", 3: "(N, C, L)"}


class BatchNorm2d(_BatchNorm):
    """Batch normalisation of ``(N, C, H, W)`` input, as ``torch.nn.BatchNorm2d``; options and state: :class:`_BatchNorm`.

    >>> import numpy as np
    >>> from portable_cnn import nn
    >>> bn = nn.BatchNorm2d(3)
    >>> y = bn.forward(np.random.default_rng(0).normal(5.0, 2.0, (4, 3, 2, 2)).astype(np.float32))
    >>> bool(abs(y.mean()) < 1e-5), int(bn.buffers["num_batches_tracked"])
    (True, 1)
    >>> sorted(bn.state_dict())
    ['bias', 'num_batches_tracked', 'running_mean', 'running_var', 'weight']
    """

    _layouts = {4: "(N, C, H, W)"}


class Dropout(Module):
    """Inverted dropout, as ``torch.nn.Dropout``: in training, zero each element with probability ``p`` and scale the rest by ``1 / (1 - p)``; identity in evaluation.

    The random numbers are drawn on the input's device by
    :func:`portable_cnn.backend.random_uniform`, from ``rng`` (an int or a
    ``numpy.random.Generator``) or, without one, from the generator that
    :func:`manual_seed` seeds, looked up at each call as PyTorch's global
    generator is.

    In data-parallel training (:func:`portable_cnn.distributed.attach`)
    ``replicas.rows`` is ``(start, total)``: this rank's input is rows
    ``start:start + N`` of a global batch of ``total``. Every rank then draws
    the mask of the whole global batch from its (identically seeded)
    generator and keeps its own rows, so the masks, and the training, do not
    depend on how the batch is split.

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
        self.replicas = None  # set for data-parallel training (class docstring)
        self._mask = None

    def extra_repr(self):
        return f"p={self.p}"

    def forward(self, x):
        if not self.training or self.p == 0.0:
            # Identity: no random numbers are drawn, nothing is cached.
            self._mask = None
            return x
        xp = backend.namespace(x, where=self.where)
        shape, generator, device = tuple(x.shape), _generator(self.rng), backend.device(x)
        if self.replicas is None or not shape:
            uniform = backend.random_uniform(xp, shape, generator, dtype=x.dtype, device=device)
        else:
            start, total = self.replicas.rows
            uniform = backend.random_uniform(xp, (total, *shape[1:]), generator, dtype=x.dtype, device=device)
            uniform = uniform[start:start + shape[0], ...]  # this rank's rows of the global batch's mask
        y, self._mask = ops.dropout(x, self.p, uniform, where=self.where)
        return y

    def backward(self, dy, need_input_grad=True):
        if not need_input_grad:
            return None
        if self._mask is None:
            return dy
        return ops.dropout_backward(dy, self._mask, where=self.where)
