"""ONNX export (:mod:`portable_cnn.onnx`), run by ONNX Runtime on the CPU.

Every model of ``models.MODELS`` and every layer and option of ``nn``
exports; ONNX Runtime's output matches ``model.forward`` in evaluation mode
to 1e-5 relative (``max |ours - onnx| / max |ours|``) in float32 on random
inputs at two batch sizes (the batch is dynamic); ``onnx.checker`` passes.
The module itself imports neither library; these tests skip without them
(the ``test`` extra installs both).
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from portable_cnn import cli, models, nn
from portable_cnn import onnx as pcnn_onnx
from portable_cnn.checkpoint import Checkpoint, save_checkpoint

onnx = pytest.importorskip("onnx", reason="onnx not installed: pip install 'portable-cnn[onnx]'")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime not installed")

RTOL = 1e-5  # the bar: float32, max |ours - onnx| / max |ours|
BATCH_SIZES = (1, 4)

# One sample's shape per model: the size its first linear layer was built for,
# or a small one for the networks that end in global pooling.
INPUT_SHAPES = {"digits": (1, 8, 8), "lenet": (1, 28, 28), "vgg-small": (3, 32, 32)}
GLOBAL_POOL_SHAPE = (3, 16, 16)


def _randomise_batch_norm(model, rng):
    """Running statistics and affine parameters away from their initial 0/1, so that exporting them matters."""
    for _, layer in model.named_modules():
        if isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)):
            C = layer.num_features
            if layer.affine:
                layer.params["weight"] = rng.normal(1.0, 0.3, C).astype(np.float32)
                layer.params["bias"] = rng.normal(0.0, 0.3, C).astype(np.float32)
            if layer.track_running_stats:
                layer.buffers["running_mean"] = rng.normal(0.0, 0.5, C).astype(np.float32)
                layer.buffers["running_var"] = rng.uniform(0.5, 2.0, C).astype(np.float32)
    return model


def _onnx_runtime(proto, x):
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run([pcnn_onnx.OUTPUT_NAME], {pcnn_onnx.INPUT_NAME: x})[0]


def _assert_runtime_agrees(model, shape, **export_options):
    """Export, check, and compare with ONNX Runtime at both batch sizes, here rather than through ``verify``."""
    proto = pcnn_onnx.export(model, shape, **export_options)
    onnx.checker.check_model(proto, full_check=True)
    rng = np.random.default_rng(5)
    model.eval()
    for n in BATCH_SIZES:
        x = rng.standard_normal((n, *shape)).astype(np.float32)
        ours = np.asarray(model.forward(x))
        theirs = _onnx_runtime(proto, x)
        assert theirs.shape == ours.shape
        worst = np.max(np.abs(ours - theirs)) / np.max(np.abs(ours))
        assert worst <= RTOL, f"batch {n}: relative difference {worst:.1e}"
    return proto


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_every_model_exports_and_onnx_runtime_agrees(name):
    shape = INPUT_SHAPES.get(name, GLOBAL_POOL_SHAPE)
    model = models.build_model(name, in_channels=shape[0], num_classes=7, input_size=shape[1:], seed=2)
    proto = _assert_runtime_agrees(_randomise_batch_norm(model, np.random.default_rng(0)), shape)
    batch, *rest = proto.graph.input[0].type.tensor_type.shape.dim
    assert batch.dim_param == "batch" and [d.dim_value for d in rest] == list(shape)
    assert [d.dim_value for d in proto.graph.output[0].type.tensor_type.shape.dim[1:]] == [7]
    assert {op.domain: op.version for op in proto.opset_import} == {"": pcnn_onnx.OPSET}
    assert pcnn_onnx.OPSET >= 17
    # The initialisers carry our state_dict names (BatchNorm's step counter aside).
    state = {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    assert state <= {init.name for init in proto.graph.initializer}


def test_every_layer_and_option_exports():
    """Grouped, strided, dilated convolution; pooling with padding, ceil_mode, dilation, count_include_pad,
    divisor_override; adaptive bins that overlap; BatchNorm without statistics or affine; Linear on (N, C, H, W);
    residual sums with both shortcuts; every activation; Dropout and Identity."""
    nn.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(2, 6, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2)),  # (6, 6, 11)
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1, dilation=(1, 2), ceil_mode=True),  # (6, 4, 5)
        nn.Residual(nn.Sequential(nn.Conv2d(6, 6, 3, padding=1, groups=3), nn.BatchNorm2d(6, affine=False), nn.Tanh())),
        nn.Residual(nn.Sequential(nn.Conv2d(6, 12, 3, stride=2, padding=1, groups=6, bias=False),  # depthwise, x2
                                  nn.BatchNorm2d(12, track_running_stats=False)),
                    shortcut=nn.Sequential(nn.Conv2d(6, 12, 1, stride=2), nn.Identity())),  # (12, 2, 3)
        nn.AvgPool2d(2, stride=1, padding=1, ceil_mode=True, count_include_pad=False),  # (12, 3, 4)
        nn.AvgPool2d(2, stride=1, padding=1, divisor_override=3),  # (12, 4, 5)
        nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True),  # (12, 3, 3): a last window past the padding
        nn.AdaptiveAvgPool2d((2, 3)),  # (12, 2, 3): the row bins overlap
        nn.Linear(3, 5),  # on (N, C, H, W): (12, 2, 5)
        nn.Sigmoid(),
        nn.Flatten(),
        nn.Dropout(0.5),
        nn.Linear(120, 16),
        nn.BatchNorm1d(16),
        nn.Linear(16, 4),
    )
    _assert_runtime_agrees(_randomise_batch_norm(model, np.random.default_rng(1)), (2, 11, 9))


def test_batch_norm_1d_on_sequences_and_global_pooling_alone():
    """BatchNorm1d on (N, C, L) with and without statistics, Linear on (N, C, L); a net ending in AdaptiveAvgPool2d(1)."""
    nn.manual_seed(4)
    sequence = nn.Sequential(nn.BatchNorm1d(4), nn.Linear(6, 3), nn.Tanh(), nn.BatchNorm1d(4, track_running_stats=False),
                             nn.Flatten(), nn.Linear(12, 2))
    _assert_runtime_agrees(_randomise_batch_norm(sequence, np.random.default_rng(2)), (4, 6))
    pooled = nn.Sequential(nn.Conv2d(3, 5, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 2))
    _assert_runtime_agrees(pooled, (3, 7, 6))


def test_a_model_that_passes_its_input_through_still_names_its_output():
    proto = _assert_runtime_agrees(nn.Sequential(nn.Flatten(), nn.Dropout(), nn.Identity()), (2, 3))
    assert [node.op_type for node in proto.graph.node] == ["Flatten"]
    identity = pcnn_onnx.export(nn.Sequential(), (5,))
    assert [node.op_type for node in identity.graph.node] == ["Identity"]
    assert identity.graph.node[0].output[0] == pcnn_onnx.OUTPUT_NAME


def test_normalization_goes_into_the_metadata_or_into_the_graph():
    shape = (3, 8, 8)
    model = models.build_model("resnet20", in_channels=3, num_classes=4, input_size=8, seed=0)
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    outside = pcnn_onnx.export(model, shape, normalization=(mean, std), metadata={"model": {"name": "resnet20"}})
    meta = pcnn_onnx.metadata(outside)
    assert meta["normalization"]["in_graph"] is False
    np.testing.assert_allclose(meta["normalization"]["mean"], mean, rtol=1e-6)
    assert meta["model"] == {"name": "resnet20"} and meta["input"]["shape"] == ["batch", 3, 8, 8]
    assert json.loads({p.key: p.value for p in outside.metadata_props}["portable_cnn.normalization"])["std"][0] == \
        pytest.approx(0.2)

    inside = pcnn_onnx.export(model, shape, normalization=(mean, std), include_normalization=True)
    assert pcnn_onnx.metadata(inside)["normalization"]["in_graph"] is True
    assert [node.op_type for node in inside.graph.node[:2]] == ["Sub", "Div"]
    raw = np.random.default_rng(0).random((2, *shape), dtype=np.float32)
    normalised = (raw - np.float32(mean).reshape(1, 3, 1, 1)) / np.float32(std).reshape(1, 3, 1, 1)
    model.eval()
    ours = model.forward(normalised)
    np.testing.assert_allclose(_onnx_runtime(inside, raw), ours, rtol=0, atol=RTOL * np.max(np.abs(ours)))
    np.testing.assert_allclose(_onnx_runtime(outside, normalised), ours, rtol=0, atol=RTOL * np.max(np.abs(ours)))
    # verify() reads the metadata and feeds each side its own input.
    assert pcnn_onnx.verify(model, inside) <= RTOL and pcnn_onnx.verify(model, outside) <= RTOL


def test_export_reads_weights_from_any_backend_and_leaves_the_mode_alone(backend):
    shape = (1, 8, 8)
    model = models.build_model("digits", in_channels=1, num_classes=10, input_size=8, seed=1)
    reference = pcnn_onnx.export(model, shape)
    model.to(backend.xp, "float64")
    assert model.training
    proto = pcnn_onnx.export(model, shape)
    assert model.training, "export must not switch the model to evaluation mode"
    for ours, theirs in zip(reference.graph.initializer, proto.graph.initializer):
        assert ours.name == theirs.name and ours.data_type == onnx.TensorProto.FLOAT
        np.testing.assert_allclose(onnx.numpy_helper.to_array(theirs), onnx.numpy_helper.to_array(ours))
    assert pcnn_onnx.verify(model, proto) <= RTOL
    assert model.training, "verify restores the mode"


class Swish(nn.Module):
    """A user's layer without an ONNX converter."""

    def forward(self, x):
        return x


def test_a_layer_that_cannot_be_exported_is_named():
    model = nn.Sequential(nn.Linear(4, 4), nn.Residual(nn.Sequential(nn.ReLU(), Swish())))
    with pytest.raises(pcnn_onnx.OnnxExportError, match=r"layer '1\.body\.1' \(Swish\(\)\) cannot be exported to ONNX: "
                                                        r"Swish has no ONNX converter; exportable layers: .*Conv2d"):
        pcnn_onnx.export(model, (4,))
    with pytest.raises(pcnn_onnx.OnnxExportError, match=r"the model \(Swish\(\)\) cannot be exported"):
        pcnn_onnx.export(Swish(), (4,))


@pytest.mark.parametrize(
    ("model", "shape", "message"),
    [
        (nn.Sequential(nn.Flatten(), nn.Linear(10, 2)), (3, 3),
         r"layer '1' cannot be exported for input \(batch, 9\): Linear\(.*\): expected input \(N, \*, 10\)"),
        (nn.Sequential(nn.Conv2d(3, 4, 3)), (1, 8, 8), r"layer '0' .* expected input with 3 channels"),
        (nn.Sequential(nn.MaxPool2d(2)), (8, 8), r"layer '0' .* expected input of 4 dimensions \(N, C, H, W\), "
                                                 r"got \(batch, 8, 8\)"),
        (nn.Sequential(nn.BatchNorm2d(3)), (4, 5, 5), r"layer '0' .* expected input \(N, C, H, W\) with C = 3"),
        (nn.Residual(nn.Conv2d(2, 2, 3)), (2, 5, 5), r"the model .* body output shape \(batch, 2, 3, 3\) does not match "
                                                      r"shortcut output shape \(batch, 2, 5, 5\)"),
    ],
)
def test_a_layer_that_does_not_fit_its_input_is_named(model, shape, message):
    with pytest.raises(pcnn_onnx.OnnxExportError, match=message):
        pcnn_onnx.export(model, shape)


def test_bad_arguments_are_one_clear_error():
    model = nn.Sequential(nn.Flatten())
    with pytest.raises(pcnn_onnx.OnnxExportError, match=r"input_shape must be one sample's shape.*got 0"):
        pcnn_onnx.export(model, 0)
    with pytest.raises(pcnn_onnx.OnnxExportError, match="needs normalization"):
        pcnn_onnx.export(model, (2, 2), include_normalization=True)
    with pytest.raises(pcnn_onnx.OnnxExportError, match=r"a non-zero std per input channel, 2 each, got mean \[0.5\]"):
        pcnn_onnx.export(model, (2, 2), normalization=([0.5], [1.0]))
    with pytest.raises(pcnn_onnx.OnnxExportError, match="model must be a portable_cnn.nn.Module, got str"):
        pcnn_onnx.export("lenet", (1, 28, 28))


# --------------------------------------------------------------------------- the command


def _checkpoint(tmp_path, name="lenet", shape=(1, 28, 28), mean=(0.13,), std=(0.31,)):
    model = models.build_model(name, in_channels=shape[0], num_classes=10, input_size=shape[1:], seed=3)
    ckpt = Checkpoint.capture(
        model, model_config={"name": name, "in_channels": shape[0], "num_classes": 10, "input_size": list(shape[1:]),
                             "seed": 3},
        data={"name": "mnist", "mean": list(mean), "std": list(std)}, epoch=2, metrics={"test_accuracy": 0.9},
    )
    return save_checkpoint(tmp_path / f"{name}.safetensors", ckpt), model


def test_export_command_writes_a_verified_file(tmp_path, capsys):
    path, model = _checkpoint(tmp_path)
    out = tmp_path / "lenet.onnx"
    code = cli.main(["export", "--checkpoint", str(path), "--onnx", str(out), "--verify"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "input 'input' (batch, 1, 28, 28) float32, output 'logits' (batch, 10), opset 17" in text
    assert "normalisation: by the caller, (x - mean) / std with mean [0.13] and std [0.31]" in text
    assert "ONNX Runtime agrees" in text
    proto = onnx.load_model(str(out))
    meta = pcnn_onnx.metadata(out)
    assert meta["model"]["name"] == "lenet" and meta["epoch"] == 2 and meta["data"]["name"] == "mnist"
    assert meta["normalization"] == {"mean": [pytest.approx(0.13)], "std": [pytest.approx(0.31)], "in_graph": False}
    x = np.random.default_rng(0).standard_normal((3, 1, 28, 28)).astype(np.float32)
    np.testing.assert_allclose(_onnx_runtime(proto, x), model.eval().forward(x), rtol=0, atol=1e-5)

    code = cli.main(["export", "--checkpoint", str(path), "--onnx", str(out), "--include-normalization"])
    assert code == 0 and "normalisation: in the graph" in capsys.readouterr().out
    assert pcnn_onnx.metadata(out)["normalization"]["in_graph"] is True


def test_export_command_errors_are_one_line(tmp_path, capsys, monkeypatch):
    code = cli.main(["export", "--checkpoint", str(tmp_path / "missing.safetensors"), "--onnx", "x.onnx"])
    assert code == 2 and capsys.readouterr().err.startswith("portable-cnn export: error: checkpoint ")
    path, _ = _checkpoint(tmp_path, "digits", (1, 8, 8))
    monkeypatch.setitem(sys.modules, "onnx", None)  # as if not installed
    code = cli.main(["export", "--checkpoint", str(path), "--onnx", str(tmp_path / "d.onnx")])
    err = capsys.readouterr().err
    assert code == 2 and err == ("portable-cnn export: error: ONNX export needs the onnx package, which is not "
                                 "installed: pip install 'portable-cnn[onnx]'\n")
