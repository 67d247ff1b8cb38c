"""Optimizers and learning-rate schedules with PyTorch's update rules.

An optimizer holds a model, reads ``layer.grads[key]`` after ``backward`` and
writes ``layer.params[key]``. Its state (momentum buffers, Adam's moments)
is created from the gradients, so it lives on the model's backend and device
and is never copied to the host. Updates bind new arrays rather than writing
into the old ones: a ``state_dict`` taken earlier (a checkpoint in memory,
a test's reference) stays valid, and read-only inputs are fine.

SGD, as ``torch.optim.SGD`` (``g`` the gradient, ``p`` the parameter)::

    g = g + weight_decay * p
    buf = g                                          (first step)
    buf = momentum * buf + (1 - dampening) * g       (later steps)
    g = g + momentum * buf  if nesterov  else  buf   (when momentum != 0)
    p = p - lr * g

Adam, as ``torch.optim.Adam`` (L2 weight decay added to the gradient, step
``t`` counted from 1)::

    g = g + weight_decay * p
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    p = p - lr / (1 - beta1**t) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)

>>> import numpy as np
>>> from portable_cnn import nn, optim
>>> model = nn.Sequential(nn.Linear(2, 1, rng=0))
>>> opt = optim.SGD(model, lr=0.5)
>>> model[0].params["weight"] = np.array([[1.0, 2.0]])
>>> model[0].grads = {"weight": np.array([[0.2, -0.2]]), "bias": np.zeros(1, dtype=np.float32)}
>>> opt.step()
>>> model[0].params["weight"]
array([[0.9, 2.1]])
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from . import backend, dispatch

__all__ = [
    "Optimizer",
    "SGD",
    "Adam",
    "StepLR",
    "CosineAnnealingLR",
    "OPTIMIZERS",
    "SCHEDULES",
    "build_optimizer",
    "build_scheduler",
]


def _named_parameters(model):
    """``(name, layer, key)`` for every parameter of a Sequential or a single layer."""
    if hasattr(model, "named_parameters"):
        return list(model.named_parameters())
    return [(key, model, key) for key in model.params]


def _number(value, name, where, *, minimum=0.0, below=None):
    """``value`` as a float in ``[minimum, below)``, or an error naming ``where``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where}: {name} must be a real number, got {value!r}")
    value = float(value)
    if not value >= minimum or (below is not None and not value < below):
        bound = f"in [{minimum}, {below})" if below is not None else f">= {minimum}"
        raise ValueError(f"{where}: {name} must be {bound}, got {value!r}")
    return value


class Optimizer:
    """Base class: parameter bookkeeping, ``lr``, the step counter and state save/load.

    Subclasses name their per-parameter state (:attr:`state_names`) and
    implement :meth:`_update`.
    """

    name = "optimizer"
    state_names: tuple = ()

    def __init__(self, model, lr):
        self.model = model
        self._params = _named_parameters(model)
        if not self._params:
            raise ValueError(f"{type(self).__name__}: the model has no parameters to optimise")
        self.lr = lr
        self.initial_lr = self.lr
        self.steps = 0
        #: Per-parameter state by parameter name: ``{"0.weight": {"momentum_buffer": array}}``.
        self.state: dict[str, dict] = {}

    @property
    def lr(self) -> float:
        """The learning rate of the next step (schedulers set it)."""
        return self._lr

    @lr.setter
    def lr(self, value):
        self._lr = _number(value, "lr", type(self).__name__)

    def step(self) -> None:
        """Update every parameter that has a gradient (layers without one are skipped, as torch skips ``grad=None``)."""
        self.steps += 1
        where = type(self).__name__
        for name, layer, key in self._params:
            grad = layer.grads.get(key)
            if grad is None:
                continue
            param = layer.params[key]
            backend.namespace(param, grad, where=f"{where} ({name})")
            if tuple(grad.shape) != tuple(param.shape):
                raise ValueError(f"{where}: gradient of {name} has shape {tuple(grad.shape)}, the parameter {tuple(param.shape)}")
            layer.params[key] = self._update(name, param, grad, self.state.setdefault(name, {}))

    def _update(self, name, param, grad, state):  # pragma: no cover - abstract
        raise NotImplementedError

    def config(self) -> dict:  # pragma: no cover - abstract
        """Hyperparameters as JSON-serialisable values, ``"name"`` included."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """State arrays on the model's backend under ``"<param name>.<state name>"``, plus ``"step"`` (0-d int64 NumPy).

        >>> from portable_cnn import nn
        >>> sorted(SGD(nn.Linear(2, 1, rng=0), lr=0.1, momentum=0.9).state_dict())
        ['step']
        """
        out = {}
        for name, _, _ in self._params:
            for key, value in self.state.get(name, {}).items():
                out[f"{name}.{key}"] = value
        out["step"] = np.asarray(self.steps, dtype=np.int64)
        return out

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` output (arrays of any backend) onto each parameter's backend, dtype and device.

        Unknown keys raise ``KeyError``, shape mismatches ``ValueError``; on
        error nothing is changed.
        """
        where = f"{type(self).__name__}.load_state_dict"
        if "step" not in state:
            raise KeyError(f"{where}: missing key 'step'")
        params = {name: layer.params[key] for name, layer, key in self._params}
        staged: dict[str, dict] = {}
        unexpected = []
        for full, value in state.items():
            if full == "step":
                continue
            name, _, key = full.rpartition(".")
            if name not in params or key not in self.state_names:
                unexpected.append(full)
                continue
            param = params[name]
            if tuple(value.shape) != tuple(param.shape):
                raise ValueError(f"{where}: {full} has shape {tuple(value.shape)}, the parameter {tuple(param.shape)}")
            xp = backend.namespace(param)
            staged.setdefault(name, {})[key] = backend.asarray(value, xp, dtype=param.dtype, device=backend.device(param))
        if unexpected:
            raise KeyError(f"{where}: unexpected keys {sorted(unexpected)}; expected '<param name>.<one of {self.state_names}>' and 'step'")
        for name, entry in staged.items():
            if set(entry) != set(self.state_names) and len(self.state_names) > 1:
                raise KeyError(f"{where}: {name} needs all of {self.state_names}, got {sorted(entry)}")
        raw = state["step"]
        step = int(raw) if isinstance(raw, numbers.Integral) else int(backend.to_numpy(raw))
        if step < 0:
            raise ValueError(f"{where}: step must be non-negative, got {step}")
        self.state = staged
        self.steps = step

    def __repr__(self):
        items = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "name")
        return f"{type(self).__name__}({items})"


class SGD(Optimizer):
    """Stochastic gradient descent with optional momentum, as ``torch.optim.SGD`` (module docstring).

    Parameters
    ----------
    model : nn.Sequential or nn.Module
    lr : float
    momentum, weight_decay, dampening : float, optional
    nesterov : bool, optional
        Needs ``momentum > 0`` and ``dampening == 0``, as in PyTorch.

    ``state_dict()`` holds ``"<param name>.momentum_buffer"`` once a step has
    run with ``momentum != 0``.
    """

    name = "sgd"
    state_names = ("momentum_buffer",)

    def __init__(self, model, lr, momentum=0.0, weight_decay=0.0, nesterov=False, dampening=0.0):
        super().__init__(model, lr)
        self.momentum = _number(momentum, "momentum", "SGD")
        self.weight_decay = _number(weight_decay, "weight_decay", "SGD")
        self.dampening = _number(dampening, "dampening", "SGD", minimum=-math.inf)
        self.nesterov = bool(nesterov)
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError("SGD: Nesterov momentum needs momentum > 0 and dampening == 0")

    def _update(self, name, param, grad, state):
        xp = backend.namespace(param)
        step = dispatch.kernel("sgd_step", xp, param.dtype)
        param, buf = step(xp, param, grad, state.get("momentum_buffer"), lr=self.lr, momentum=self.momentum,
                          dampening=self.dampening, weight_decay=self.weight_decay, nesterov=self.nesterov)
        if buf is not None:
            state["momentum_buffer"] = buf
        return param

    def config(self) -> dict:
        """Constructor arguments plus ``"name": "sgd"``; ``lr`` is the initial one (a scheduler restores the current)."""
        return {
            "name": self.name, "lr": self.initial_lr, "momentum": self.momentum, "weight_decay": self.weight_decay,
            "nesterov": self.nesterov, "dampening": self.dampening,
        }


class Adam(Optimizer):
    """Adam, as ``torch.optim.Adam`` with ``amsgrad=False`` (module docstring).

    Parameters
    ----------
    model : nn.Sequential or nn.Module
    lr : float
    betas : pair of floats in [0, 1)
    eps : float
    weight_decay : float
        L2 penalty added to the gradient (not AdamW's decoupled decay).

    ``state_dict()`` holds ``"<param name>.exp_avg"`` and ``".exp_avg_sq"``
    and one ``"step"`` shared by all parameters (PyTorch keeps one per
    parameter; they agree unless a parameter goes without a gradient).
    """

    name = "adam"
    state_names = ("exp_avg", "exp_avg_sq")

    def __init__(self, model, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(model, lr)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"Adam: betas must be a pair of floats, got {betas!r}")
        self.betas = (_number(betas[0], "betas[0]", "Adam", below=1.0), _number(betas[1], "betas[1]", "Adam", below=1.0))
        self.eps = _number(eps, "eps", "Adam")
        self.weight_decay = _number(weight_decay, "weight_decay", "Adam")

    def _update(self, name, param, grad, state):
        xp = backend.namespace(param)
        beta1, beta2 = self.betas
        step = dispatch.kernel("adam_step", xp, param.dtype)
        param, state["exp_avg"], state["exp_avg_sq"] = step(
            xp, param, grad, state.get("exp_avg"), state.get("exp_avg_sq"), step=self.steps, lr=self.lr,
            beta1=beta1, beta2=beta2, eps=self.eps, weight_decay=self.weight_decay,
        )
        return param

    def config(self) -> dict:
        """Constructor arguments plus ``"name": "adam"``; ``lr`` is the initial one (a scheduler restores the current)."""
        return {
            "name": self.name, "lr": self.initial_lr, "betas": list(self.betas), "eps": self.eps,
            "weight_decay": self.weight_decay,
        }


class _Scheduler:
    """Epoch-based learning-rate schedule: ``step()`` once per epoch sets ``optimizer.lr``.

    The rate is a closed form of the epoch count from the optimizer's rate at
    construction, so restoring ``{"last_epoch": n}`` also restores the rate.
    """

    def __init__(self, optimizer):
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"{type(self).__name__}: expected a portable_cnn.optim optimizer, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        self.base_lr = optimizer.lr
        self.last_epoch = 0

    def _lr_at(self, epoch: int) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def step(self) -> None:
        """Advance one epoch and set the optimizer's learning rate."""
        self.last_epoch += 1
        self.optimizer.lr = self._lr_at(self.last_epoch)

    def state_dict(self) -> dict:
        """``{"last_epoch": int}``."""
        return {"last_epoch": self.last_epoch}

    def load_state_dict(self, state: dict) -> None:
        """Restore the epoch count and set the optimizer's learning rate for it."""
        where = f"{type(self).__name__}.load_state_dict"
        if set(state) != {"last_epoch"}:
            raise KeyError(f"{where}: expected the key 'last_epoch' only, got {sorted(state)}")
        epoch = state["last_epoch"]
        if isinstance(epoch, bool) or not isinstance(epoch, numbers.Integral) or epoch < 0:
            raise ValueError(f"{where}: last_epoch must be a non-negative int, got {epoch!r}")
        self.last_epoch = int(epoch)
        self.optimizer.lr = self._lr_at(self.last_epoch)


def _positive_int(value, name, where):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{where}: {name} must be a positive int, got {value!r}")
    return int(value)


class StepLR(_Scheduler):
    """Multiply the learning rate by ``gamma`` every ``step_size`` epochs, as ``torch.optim.lr_scheduler.StepLR``.

    >>> from portable_cnn import nn
    >>> opt = SGD(nn.Linear(2, 1, rng=0), lr=1.0)
    >>> sched = StepLR(opt, step_size=2, gamma=0.5)
    >>> rates = []
    >>> for _ in range(5):
    ...     sched.step()
    ...     rates.append(opt.lr)
    >>> rates
    [1.0, 0.5, 0.5, 0.25, 0.25]
    """

    def __init__(self, optimizer, step_size, gamma=0.1):
        super().__init__(optimizer)
        self.step_size = _positive_int(step_size, "step_size", "StepLR")
        self.gamma = _number(gamma, "gamma", "StepLR")

    def _lr_at(self, epoch):
        return self.base_lr * self.gamma ** (epoch // self.step_size)


class CosineAnnealingLR(_Scheduler):
    """Cosine decay from the initial rate to ``eta_min`` over ``T_max`` epochs, as ``torch.optim.lr_scheduler.CosineAnnealingLR``.

    ``lr(t) = eta_min + (lr0 - eta_min) * (1 + cos(pi * t / T_max)) / 2``;
    past ``T_max`` it rises again along the same cosine, as PyTorch's does.
    """

    def __init__(self, optimizer, T_max, eta_min=0.0):
        super().__init__(optimizer)
        self.T_max = _positive_int(T_max, "T_max", "CosineAnnealingLR")
        self.eta_min = _number(eta_min, "eta_min", "CosineAnnealingLR")

    def _lr_at(self, epoch):
        return self.eta_min + (self.base_lr - self.eta_min) * (1 + math.cos(math.pi * epoch / self.T_max)) / 2


#: Optimizer classes by the name that :func:`build_optimizer`, checkpoints and ``--optimizer`` use.
OPTIMIZERS = {SGD.name: SGD, Adam.name: Adam}

#: Learning-rate schedules by the name that :func:`build_scheduler`, checkpoints and ``--schedule``
#: use; ``"none"`` (``None``) keeps the rate constant.
SCHEDULES = {"none": None, "step": StepLR, "cosine": CosineAnnealingLR}


def _choices(registry) -> str:
    return ", ".join(map(repr, registry))


def build_optimizer(model, config: dict) -> Optimizer:
    """An optimizer from a config dict such as ``optimizer.config()`` returns.

    ``config["name"]`` is a key of :data:`OPTIMIZERS`; the other entries are
    the constructor's keyword arguments.

    >>> from portable_cnn import models
    >>> model = models.build_model("digits", in_channels=1, num_classes=10, input_size=8)
    >>> build_optimizer(model, {"name": "adam", "lr": 0.001}).config()["name"]
    'adam'
    """
    kwargs = dict(config)
    name = kwargs.pop("name", None)
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {_choices(OPTIMIZERS)}")
    if "betas" in kwargs:  # JSON turns the tuple into a list
        kwargs["betas"] = tuple(kwargs["betas"])
    return OPTIMIZERS[name](model, **kwargs)


def build_scheduler(optimizer: Optimizer, config: dict | None):
    """A learning-rate schedule from ``{"name": <a key of SCHEDULES>, ...}``; ``None`` for ``"none"``.

    ``"step"`` takes ``step_size`` and ``gamma`` (:class:`StepLR`), ``"cosine"``
    takes ``T_max`` and ``eta_min`` (:class:`CosineAnnealingLR`). A saved
    ``last_epoch`` is left for ``load_state_dict``.

    >>> from portable_cnn import nn
    >>> opt = SGD(nn.Linear(2, 1, rng=0), lr=1.0)
    >>> build_scheduler(opt, {"name": "cosine", "T_max": 10}).T_max
    10
    >>> build_scheduler(opt, {"name": "none"}) is None
    True
    """
    name = "none" if config is None else config.get("name", "none")
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {_choices(SCHEDULES)}")
    if SCHEDULES[name] is None:
        return None
    kwargs = {k: v for k, v in config.items() if k not in ("name", "last_epoch")}
    return SCHEDULES[name](optimizer, **kwargs)
