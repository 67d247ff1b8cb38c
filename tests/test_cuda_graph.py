"""What decides whether a training step can be a CUDA graph (``portable_cnn.cuda_graph``), on any machine.

The capture and replay themselves need a GPU: ``tests/test_gpu.py`` checks
them against eager steps.
"""

from __future__ import annotations

import pytest

from portable_cnn import models, nn, optim
from portable_cnn.cuda_graph import CudaGraphStep, CudaGraphUnsupported, graph_support


def _lenet():
    return models.lenet(rng=0)


def test_a_numpy_model_is_refused_naming_its_backend():
    model = _lenet()
    assert graph_support(model, nn.SoftmaxCrossEntropy(validate=False), optim.SGD(model, lr=0.1)) == (
        "CUDA graphs need the model on CuPy, it is on numpy"
    )
    with pytest.raises(CudaGraphUnsupported, match="^CudaGraphStep: CUDA graphs need the model on CuPy"):
        CudaGraphStep(model, nn.SoftmaxCrossEntropy(validate=False), optim.SGD(model, lr=0.1))


@pytest.mark.parametrize(
    ("case", "fragment"),
    [
        ("adam", "Adam's update changes with the step count"),
        ("validating loss", "SoftmaxCrossEntropy(validate=False)"),
        ("dropout", "Dropout(p=0.5) draws a new random mask every step"),
    ],
)
def test_steps_a_graph_would_replay_wrongly_are_refused_with_the_reason(case, fragment):
    model = nn.Sequential(*_lenet().layers[:-1], nn.Dropout(0.5), _lenet()[-1]) if case == "dropout" else _lenet()
    opt = optim.Adam(model) if case == "adam" else optim.SGD(model, lr=0.1, momentum=0.9)
    loss_fn = nn.SoftmaxCrossEntropy(validate=case == "validating loss")
    why = graph_support(model, loss_fn, opt)
    assert why is not None and fragment in why, why
    with pytest.raises(CudaGraphUnsupported, match="^CudaGraphStep: "):
        CudaGraphStep(model, loss_fn, opt)


def test_dropout_that_drops_nothing_is_no_obstacle():
    model = nn.Sequential(*_lenet().layers[:-1], nn.Dropout(0.0), _lenet()[-1])
    why = graph_support(model, nn.SoftmaxCrossEntropy(validate=False), optim.SGD(model, lr=0.1))
    assert why == "CUDA graphs need the model on CuPy, it is on numpy"


@pytest.mark.parametrize("warmup", [0, -1, 1.5, True])
def test_warmup_steps_must_be_a_positive_int(warmup):
    model = _lenet()
    with pytest.raises(ValueError, match="warmup_steps must be an int >= 1"):
        CudaGraphStep(model, nn.SoftmaxCrossEntropy(validate=False), optim.SGD(model, lr=0.1), warmup_steps=warmup)
