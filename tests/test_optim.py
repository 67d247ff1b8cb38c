"""Optimizers and schedules against ``torch.optim``: same parameters and gradients in, same parameters out.

Every update rule runs on each backend of the fixture in float64 for several
steps with a different gradient each step, and is compared after every step
with ``torch.optim`` fed the same numbers. The optimizer's state must live on
the model's backend and device; a ``state_dict`` taken mid-run, sent through
NumPy (as a checkpoint does) and loaded into a fresh optimizer must continue
the run exactly.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import make_backend, tol

from portable_cnn import backend as B
from portable_cnn import nn, optim

STEPS = 4

CONFIGS = [
    ("sgd", {"lr": 0.1}),
    ("sgd", {"lr": 0.1, "weight_decay": 0.05}),
    ("sgd", {"lr": 0.05, "momentum": 0.9}),
    ("sgd", {"lr": 0.05, "momentum": 0.9, "dampening": 0.3, "weight_decay": 0.01}),
    ("sgd", {"lr": 0.05, "momentum": 0.8, "nesterov": True, "weight_decay": 0.01}),
    ("adam", {"lr": 0.01}),
    ("adam", {"lr": 0.02, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.05}),
]


def make_model(backend, dtype="float64"):
    """Conv -> ReLU -> Flatten -> Linear on ``backend`` with parameters of ``dtype`` (read-only for numpy-readonly)."""
    model = nn.Sequential(nn.Conv2d(2, 3, 3, rng=0), nn.ReLU(), nn.Flatten(), nn.Linear(12, 4, rng=1))
    rng = np.random.default_rng(2)
    for _, layer, key in model.named_parameters():
        layer.params[key] = backend.asarray(rng.standard_normal(tuple(layer.params[key].shape)), dtype=dtype)
    return model


def gradients(model, step, dtype="float64"):
    """A different, fixed set of NumPy gradients for each step."""
    rng = np.random.default_rng(100 + step)
    return {name: rng.standard_normal(tuple(layer.params[key].shape)).astype(dtype) for name, layer, key in model.named_parameters()}


def set_gradients(model, backend, grads):
    for name, layer, key in model.named_parameters():
        layer.grads[key] = backend.asarray(grads[name])


def numpy_params(model):
    return {name: B.to_numpy(layer.params[key]) for name, layer, key in model.named_parameters()}


def build(name, model, config):
    return optim.SGD(model, **config) if name == "sgd" else optim.Adam(model, **config)


@pytest.mark.parametrize("name, config", CONFIGS, ids=[f"{n}-{'-'.join(c)}" for n, c in CONFIGS])
def test_update_matches_torch(backend, torch, name, config):
    model = make_model(backend)
    names = [n for n, _, _ in model.named_parameters()]
    reference = [torch.from_numpy(value.copy()).requires_grad_(True) for value in numpy_params(model).values()]
    ours = build(name, model, config)
    theirs = (torch.optim.SGD if name == "sgd" else torch.optim.Adam)(reference, **config)
    for step in range(STEPS):
        if step == 2:  # a schedule changes the rate between steps
            ours.lr = config["lr"] / 2
            theirs.param_groups[0]["lr"] = config["lr"] / 2
        grads = gradients(model, step)
        set_gradients(model, backend, grads)
        ours.step()
        for tensor, pname in zip(reference, names):
            tensor.grad = torch.from_numpy(grads[pname].copy())
        theirs.step()
        got = numpy_params(model)
        for tensor, pname in zip(reference, names):
            np.testing.assert_allclose(got[pname], tensor.detach().numpy(), **tol("float64"), err_msg=f"{pname} step {step}")
    # The state: torch's values, on the model's backend and device.
    state = ours.state_dict()
    keys = {"sgd": ["momentum_buffer"] if config.get("momentum") else [], "adam": ["exp_avg", "exp_avg_sq"]}[name]
    assert set(state) == {f"{p}.{k}" for p in names for k in keys} | {"step"}
    assert isinstance(state["step"], np.ndarray) and state["step"].shape == () and state["step"].dtype == np.int64
    assert int(state["step"]) == STEPS
    for pname, tensor in zip(names, reference):
        param = dict((n, layer.params[key]) for n, layer, key in model.named_parameters())[pname]
        for key in keys:
            value = state[f"{pname}.{key}"]
            assert B.backend_name(value) == B.backend_name(param), f"{pname}.{key}"
            assert B.device(value) == B.device(param), f"{pname}.{key}"
            np.testing.assert_allclose(B.to_numpy(value), theirs.state[tensor][key].numpy(), **tol("float64"))


@pytest.mark.parametrize("name, config", [CONFIGS[3], CONFIGS[4], CONFIGS[6]], ids=["sgd-momentum", "sgd-nesterov", "adam"])
def test_state_dict_round_trip_continues_identically(backend, name, config):
    straight = make_model(backend)
    opt = build(name, straight, config)
    resumed = make_model(backend)
    first = build(name, resumed, config)
    for step in range(2):
        for model, o in ((straight, opt), (resumed, first)):
            set_gradients(model, backend, gradients(model, step))
            o.step()
    # Through the host, as a checkpoint stores it, then into a fresh optimizer.
    saved = {k: np.array(B.to_numpy(v)) for k, v in first.state_dict().items()}
    second = build(name, resumed, config)
    second.load_state_dict(saved)
    assert second.steps == 2
    for key, value in second.state_dict().items():
        if key != "step":
            assert B.backend_name(value) == B.backend_name(resumed[0].params["weight"]), key
    for step in range(2, 5):
        for model, o in ((straight, opt), (resumed, second)):
            set_gradients(model, backend, gradients(model, step))
            o.step()
    a, b = numpy_params(straight), numpy_params(resumed)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_float32_stays_float32(backend):
    model = make_model(backend, "float32")
    for opt in (optim.SGD(model, lr=0.1, momentum=0.9, weight_decay=0.01), optim.Adam(model, lr=0.1, weight_decay=0.01)):
        for step in range(2):
            set_gradients(model, backend, gradients(model, step, "float32"))
            opt.step()
        for key, value in list(numpy_params(model).items()) + [(k, B.to_numpy(v)) for k, v in opt.state_dict().items() if k != "step"]:
            assert value.dtype == np.float32, key


def test_state_dict_contents_before_and_after_a_step():
    numpy_backend = make_backend("numpy")
    model = make_model(numpy_backend)
    sgd = optim.SGD(model, lr=0.1, momentum=0.9)
    assert list(sgd.state_dict()) == ["step"] and int(sgd.state_dict()["step"]) == 0
    plain = optim.SGD(model, lr=0.1)
    set_gradients(model, numpy_backend, gradients(model, 0))
    sgd.step()
    plain.step()
    assert sorted(sgd.state_dict()) == ["0.bias.momentum_buffer", "0.weight.momentum_buffer", "3.bias.momentum_buffer",
                                        "3.weight.momentum_buffer", "step"]
    assert list(plain.state_dict()) == ["step"]
    # The momentum buffer is a copy: a layer reusing its gradient array leaves it alone.
    buf = sgd.state_dict()["0.weight.momentum_buffer"].copy()
    model[0].grads["weight"][...] = 0
    np.testing.assert_array_equal(sgd.state_dict()["0.weight.momentum_buffer"], buf)
    # Layers without a gradient are skipped, as torch skips grad=None.
    before = numpy_params(model)
    model[3].grads = {}
    plain.step()
    after = numpy_params(model)
    np.testing.assert_array_equal(after["3.weight"], before["3.weight"])
    assert not np.array_equal(after["0.bias"], before["0.bias"])


def test_load_state_dict_rejects_mismatches():
    numpy_backend = make_backend("numpy")
    model = make_model(numpy_backend)
    opt = optim.Adam(model)
    set_gradients(model, numpy_backend, gradients(model, 0))
    opt.step()
    good = opt.state_dict()
    with pytest.raises(KeyError, match=r"unexpected keys \['0.weight.momentum_buffer'\]"):
        opt.load_state_dict({**good, "0.weight.momentum_buffer": good["0.weight.exp_avg"]})
    with pytest.raises(KeyError, match="missing key 'step'"):
        opt.load_state_dict({k: v for k, v in good.items() if k != "step"})
    with pytest.raises(ValueError, match=r"0.bias.exp_avg has shape \(4,\), the parameter \(3,\)"):
        opt.load_state_dict({**good, "0.bias.exp_avg": np.zeros(4)})
    with pytest.raises(KeyError, match=r"3.bias needs all of \('exp_avg', 'exp_avg_sq'\)"):
        opt.load_state_dict({k: v for k, v in good.items() if k != "3.bias.exp_avg_sq"})
    # Nothing changed by the failed loads.
    for key, value in opt.state_dict().items():
        np.testing.assert_array_equal(value, good[key], err_msg=key)


def test_hyperparameter_checks():
    model = nn.Linear(2, 2, rng=0)
    with pytest.raises(ValueError, match="SGD: Nesterov momentum needs momentum > 0 and dampening == 0"):
        optim.SGD(model, lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match=r"SGD: lr must be >= 0.0, got -0.1"):
        optim.SGD(model, lr=-0.1)
    with pytest.raises(ValueError, match=r"Adam: betas\[1\] must be in \[0.0, 1.0\), got 1.0"):
        optim.Adam(model, betas=(0.9, 1.0))
    with pytest.raises(TypeError, match="Adam: lr must be a real number, got '0.1'"):
        optim.Adam(model, lr="0.1")
    with pytest.raises(ValueError, match="has no parameters"):
        optim.SGD(nn.Sequential(nn.ReLU()), lr=0.1)
    opt = optim.SGD(model, lr=0.1)
    with pytest.raises(ValueError, match="lr must be >= 0.0"):
        opt.lr = -1
    model.grads = {"weight": np.zeros((3, 2), dtype=np.float32)}
    with pytest.raises(ValueError, match=r"SGD: gradient of weight has shape \(3, 2\), the parameter \(2, 2\)"):
        opt.step()


def test_config_is_json_and_rebuilds_the_optimizer():
    model = nn.Linear(2, 2, rng=0)
    for opt in (optim.SGD(model, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4), optim.Adam(model, lr=3e-4, betas=(0.8, 0.9))):
        config = json.loads(json.dumps(opt.config()))
        name = config.pop("name")
        assert name == opt.name
        if "betas" in config:
            config["betas"] = tuple(config["betas"])
        rebuilt = type(opt)(model, **config)
        assert rebuilt.config() == opt.config()
    sched_opt = optim.SGD(model, lr=0.1)
    optim.StepLR(sched_opt, step_size=1).step()
    assert sched_opt.lr == pytest.approx(0.01) and sched_opt.config()["lr"] == 0.1  # the initial rate


# --------------------------------------------------------------------------- schedules


SCHEDULES = [
    ("StepLR", {"step_size": 3, "gamma": 0.5}),
    ("StepLR", {"step_size": 1}),
    ("CosineAnnealingLR", {"T_max": 5, "eta_min": 0.01}),
    ("CosineAnnealingLR", {"T_max": 4}),
]


@pytest.mark.parametrize("name, kwargs", SCHEDULES, ids=[f"{n}-{len(k)}" for n, k in SCHEDULES])
def test_schedule_matches_torch(torch, name, kwargs):
    epochs = 13  # past T_max: the cosine comes back up, as torch's does
    opt = optim.SGD(nn.Linear(2, 2, rng=0), lr=0.2)
    sched = getattr(optim, name)(opt, **kwargs)
    param = torch.zeros(2, requires_grad=True)
    torch_opt = torch.optim.SGD([param], lr=0.2)
    torch_sched = getattr(torch.optim.lr_scheduler, name)(torch_opt, **kwargs)
    ours, theirs = [opt.lr], [torch_opt.param_groups[0]["lr"]]
    for _ in range(epochs):
        torch_opt.step()  # torch warns when the schedule steps before the optimizer
        torch_sched.step()
        sched.step()
        ours.append(opt.lr)
        theirs.append(torch_opt.param_groups[0]["lr"])
    np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-15)
    assert len(set(np.round(ours, 12))) > 1  # the schedule actually moved
    assert sched.state_dict() == {"last_epoch": epochs} == {"last_epoch": torch_sched.state_dict()["last_epoch"]}


@pytest.mark.parametrize("name, kwargs", [SCHEDULES[0], SCHEDULES[2]], ids=["step", "cosine"])
def test_schedule_state_round_trip(name, kwargs):
    def run(epochs, opt, sched):
        rates = []
        for _ in range(epochs):
            sched.step()
            rates.append(opt.lr)
        return rates

    opt = optim.SGD(nn.Linear(2, 2, rng=0), lr=0.2)
    straight = run(9, opt, getattr(optim, name)(opt, **kwargs))
    first_opt = optim.SGD(nn.Linear(2, 2, rng=0), lr=0.2)
    first = getattr(optim, name)(first_opt, **kwargs)
    run(4, first_opt, first)
    # A fresh optimizer at the initial rate and a fresh schedule: loading the epoch restores the rate too.
    resumed_opt = optim.SGD(nn.Linear(2, 2, rng=0), lr=first_opt.config()["lr"])
    resumed = getattr(optim, name)(resumed_opt, **kwargs)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert resumed_opt.lr == straight[3]
    assert run(5, resumed_opt, resumed) == straight[4:]
    with pytest.raises(KeyError, match="expected the key 'last_epoch' only"):
        resumed.load_state_dict({"epoch": 3})
    with pytest.raises(ValueError, match="last_epoch must be a non-negative int"):
        resumed.load_state_dict({"last_epoch": -1})
    with pytest.raises(ValueError, match="T_max must be a positive int" if "T_max" in kwargs else "step_size must be a positive int"):
        getattr(optim, name)(resumed_opt, **{**kwargs, ("T_max" if "T_max" in kwargs else "step_size"): 0})


# --------------------------------------------------------------------------- registries


@pytest.mark.parametrize("name, config", CONFIGS, ids=[f"{n}-{'-'.join(c)}" for n, c in CONFIGS])
def test_build_optimizer_rebuilds_a_saved_config(name, config):
    """``config()`` through JSON (as a checkpoint stores it) builds the same optimizer by its registry name."""
    model = nn.Sequential(nn.Linear(3, 2, rng=0))
    original = build(name, model, config)
    rebuilt = optim.build_optimizer(model, json.loads(json.dumps(original.config())))
    assert type(rebuilt) is optim.OPTIMIZERS[name] is type(original)
    assert rebuilt.config() == original.config()


def test_registries_name_every_optimizer_and_schedule():
    assert optim.OPTIMIZERS == {"sgd": optim.SGD, "adam": optim.Adam}
    assert optim.SCHEDULES == {"none": None, "step": optim.StepLR, "cosine": optim.CosineAnnealingLR}
    opt = optim.SGD(nn.Linear(2, 1, rng=0), lr=0.1)
    configs = {"none": {"name": "none"}, "step": {"name": "step", "step_size": 2}, "cosine": {"name": "cosine", "T_max": 5}}
    for name, cls in optim.SCHEDULES.items():
        sched = optim.build_scheduler(opt, configs[name])
        assert (sched is None) if cls is None else (type(sched) is cls), name
    assert optim.build_scheduler(opt, None) is None
    with pytest.raises(ValueError, match="unknown optimizer 'rmsprop'; choose one of 'sgd', 'adam'"):
        optim.build_optimizer(opt.model, {"name": "rmsprop", "lr": 0.1})
    with pytest.raises(ValueError, match="unknown schedule 'linear'; choose one of 'none', 'step', 'cosine'"):
        optim.build_scheduler(opt, {"name": "linear"})
