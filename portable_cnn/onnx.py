"""Export a model to ONNX, and check the file with ONNX Runtime: :func:`export`, :func:`verify`, ``portable-cnn export``.

The graph computes exactly ``model.forward`` in evaluation mode, layer by
layer (BatchNorm with its running statistics, Dropout as the identity), on
float32 input ``(batch, *input_shape)`` whose batch dimension is dynamic, at
ONNX opset :data:`OPSET`. Each of our layers becomes standard ONNX operators:

=====================  ===========================================================
``Conv2d``             ``Conv`` (``group`` for grouped and depthwise convolution)
``MaxPool2d``          ``Pad`` with ``-inf`` where there is padding or a
                       ``ceil_mode`` window, then ``MaxPool`` (``dilations``)
``AvgPool2d``          ``Pad`` with zeros, ``AveragePool``, and a ``Mul`` by
                       ``R*S / divisor`` where PyTorch's divisor is not ``R*S``
                       (``count_include_pad=False``, ``ceil_mode``, ``divisor_override``)
``AdaptiveAvgPool2d``  ``GlobalAveragePool`` for output size 1, else ``Reshape``,
                       ``MatMul`` by the bins' averaging matrix, ``Reshape``
``BatchNorm1d/2d``     ``BatchNormalization``; without running statistics, the
                       batch's: ``ReduceMean``, ``Sub``, ``Mul``, ``Sqrt``, ``Div``
``Linear``             ``Gemm`` on ``(N, in)``; ``MatMul`` and ``Add`` on ``(N, *, in)``
``Flatten``            ``Flatten`` (axis 1)
``ReLU``, ...          ``Relu``, ``Sigmoid``, ``Tanh``
``Residual``           both branches, then ``Add``
``Dropout``,           nothing: the tensor passes through
``Identity``
=====================  ===========================================================

Every window is read inside an explicitly padded frame, so ONNX's own
padding and ``ceil_mode`` rules (which runtimes have implemented
differently) never come into play. Initialisers carry our ``state_dict``
names (``"3.body.0.weight"``); node and intermediate tensor names are the
layer's name and the operator (``"3.body.0/Conv"``).

The dataset normalisation ``(x - mean) / std`` goes into the model's
metadata (``metadata_props``, key ``"portable_cnn.normalization"``, a JSON
object with ``mean``, ``std`` and ``in_graph``), for the caller to apply;
with ``include_normalization=True`` it is the first two nodes of the graph
instead, and the graph takes raw images in ``[0, 1]``.

Only this module's functions import ``onnx`` (the ``[onnx]`` extra) and
``onnxruntime`` (for :func:`verify`), so importing it costs nothing where
they are absent. Use::

    from portable_cnn import models, onnx as pcnn_onnx

    model = models.build_model("lenet", in_channels=1, num_classes=10, input_size=28)
    pcnn_onnx.export(model, (1, 28, 28), "lenet.onnx", normalization=([0.13], [0.31]))
    pcnn_onnx.verify(model, "lenet.onnx")   # worst relative difference to ONNX Runtime, ~1e-7

(``from portable_cnn import onnx`` would shadow the ``onnx`` library in the
caller's namespace, hence the alias.)
"""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import numpy as np

from . import __version__, backend, nn
from .geometry import AdaptivePoolGeometry, ConvGeometry, PoolGeometry

__all__ = ["OPSET", "INPUT_NAME", "OUTPUT_NAME", "METADATA_PREFIX", "OnnxExportError", "export", "verify",
           "metadata", "add_export_parser", "run_export"]

#: The ONNX operator set the graphs use (ReduceMean still takes ``axes`` as an attribute there).
OPSET = 17
#: The graph's input, ``(batch, *input_shape)`` float32, and output, ``(batch, num_classes)`` logits.
INPUT_NAME, OUTPUT_NAME = "input", "logits"
#: The symbolic name of the dynamic batch dimension.
BATCH = "batch"
#: Every metadata key this module writes starts with it.
METADATA_PREFIX = "portable_cnn."

_INSTALL = "pip install 'portable-cnn[onnx]'"


class OnnxExportError(ValueError):
    """A model, or one of its layers (named in the message), that cannot be exported to ONNX."""


def _require(name: str, purpose: str, install: str):
    """Import ``name`` (``onnx``, ``onnxruntime``), or an ImportError saying what to install."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise ImportError(f"{purpose} needs the {name} package, which is not installed: {install}") from None


# --------------------------------------------------------------------- the graph


class _Graph:
    """The nodes and initialisers of the graph being built."""

    def __init__(self, onnx):
        self.onnx = onnx
        self.nodes: list = []
        self.initializers: list = []

    def constant(self, name: str, value, dtype=np.float32) -> str:
        """Add an initialiser (any backend's array, a list or a number) under ``name``; returns the name."""
        array = np.asarray(backend.to_numpy(value), dtype=dtype)
        self.initializers.append(self.onnx.numpy_helper.from_array(array, name))
        return name

    def node(self, op: str, inputs, name: str, **attributes) -> str:
        """Add a node named ``name`` whose one output is called ``name`` too; returns it."""
        self.nodes.append(self.onnx.helper.make_node(op, list(inputs), [name], name=name, **attributes))
        return name


def _dotted(path: str, name: str) -> str:
    """A child's or a parameter's name under layer ``path``, as ``state_dict`` names them (``"3.body.0.weight"``)."""
    return f"{path}.{name}" if path else name


def _tensor(path: str, op: str) -> str:
    """The name of a node of layer ``path`` and of its output (``"3.body.0/Conv"``)."""
    return f"{path}/{op}" if path else op


def _batched(shape: tuple) -> str:
    """A sample's shape as the graph's tensor has it: ``"(batch, 1, 28, 28)"``."""
    return f"({', '.join(map(str, (BATCH, *shape)))})"


def _image_shape(shape: tuple, layer) -> tuple:
    """``shape`` if it is one sample of ``(N, C, H, W)``, else an error naming what the layer got."""
    if len(shape) != 3:
        raise ValueError(f"{layer.where}: expected input of 4 dimensions (N, C, H, W), got {_batched(shape)}")
    return shape


# A converter adds the nodes of one layer: (graph, layer, its dotted name, input
# tensor name, input shape without the batch) -> (output tensor name, output shape).


def _sequential(g, layer, path, x, shape):
    for i, child in enumerate(layer):
        x, shape = _convert(g, child, _dotted(path, str(i)), x, shape)
    return x, shape


def _residual(g, layer, path, x, shape):
    body, body_shape = _convert(g, layer.body, _dotted(path, "body"), x, shape)
    shortcut, shortcut_shape = _convert(g, layer.shortcut, _dotted(path, "shortcut"), x, shape)
    if body_shape != shortcut_shape:
        raise ValueError(f"Residual: body output shape {_batched(body_shape)} does not match shortcut output "
                         f"shape {_batched(shortcut_shape)}")
    return g.node("Add", [body, shortcut], _tensor(path, "Add")), body_shape


def _pass_through(g, layer, path, x, shape):
    """Identity, and Dropout in evaluation mode: no node at all."""
    return x, shape


def _conv2d(g, layer, path, x, shape):
    weight = layer.params["weight"]
    geo = ConvGeometry.of((1, *_image_shape(shape, layer)), tuple(weight.shape), layer.stride, layer.padding,
                          layer.dilation, layer.where, layer.groups)
    inputs = [x, g.constant(_dotted(path, "weight"), weight)]
    if "bias" in layer.params:
        inputs.append(g.constant(_dotted(path, "bias"), layer.params["bias"]))
    y = g.node("Conv", inputs, _tensor(path, "Conv"), kernel_shape=[geo.R, geo.S], strides=[geo.u, geo.v],
               pads=[geo.a, geo.b, geo.a, geo.b], dilations=[geo.dh, geo.dw], group=geo.G)
    return y, (geo.K, geo.P, geo.Q)


def _pad_to_frame(g, geo: PoolGeometry, path: str, x: str, value: float) -> str:
    """``x`` padded with ``value`` to the frame all windows lie in: ``a, b`` before; after, ``a, b`` and more for ``ceil_mode``."""
    after = (geo.frame_height - geo.H - geo.a, geo.frame_width - geo.W - geo.b)
    if not (geo.a or geo.b or any(after)):
        return x
    # ONNX pads: all axes' starts, then all axes' ends, for (N, C, H, W).
    pads = g.constant(_tensor(path, "pads"), [0, 0, geo.a, geo.b, 0, 0, *after], np.int64)
    fill = g.constant(_tensor(path, "pad_value"), value)
    return g.node("Pad", [x, pads, fill], _tensor(path, "Pad"), mode="constant")


def _pool_geometry(layer, shape, **options) -> PoolGeometry:
    return PoolGeometry.of((1, *_image_shape(shape, layer)), layer.kernel_size, layer.stride, layer.padding,
                           layer.where, ceil_mode=layer.ceil_mode, **options)


def _max_pool2d(g, layer, path, x, shape):
    geo = _pool_geometry(layer, shape, dilation=layer.dilation)
    frame = _pad_to_frame(g, geo, path, x, -math.inf)  # as PyTorch pads: never the maximum of a window
    y = g.node("MaxPool", [frame], _tensor(path, "MaxPool"), kernel_shape=[geo.R, geo.S], strides=[geo.u, geo.v],
               dilations=[geo.dh, geo.dw])
    return y, (geo.C, geo.P, geo.Q)


def _avg_pool2d(g, layer, path, x, shape):
    geo = _pool_geometry(layer, shape, count_include_pad=layer.count_include_pad,
                         divisor_override=layer.divisor_override)
    frame = _pad_to_frame(g, geo, path, x, 0.0)
    # Every window lies inside the frame, so AveragePool gives (window sum) / (R*S) ...
    y = g.node("AveragePool", [frame], _tensor(path, "AveragePool"), kernel_shape=[geo.R, geo.S],
               strides=[geo.u, geo.v])
    rows, cols = geo.avg_divisors()
    divisors = np.outer(rows, cols)  # (P, Q)
    if np.any(divisors != geo.taps):
        # ... and PyTorch's divisor of window (p, q) is rows[p] * cols[q]; (P, Q) broadcasts over (N, C, P, Q).
        scale = g.constant(_tensor(path, "scale"), geo.taps / divisors)
        y = g.node("Mul", [y, scale], _tensor(path, "Mul"))
    return y, (geo.C, geo.P, geo.Q)


def _adaptive_avg_pool2d(g, layer, path, x, shape):
    geo = AdaptivePoolGeometry.of((1, *_image_shape(shape, layer)), layer.output_size, layer.where)
    C, H, W, P, Q = geo.C, geo.H, geo.W, geo.P, geo.Q
    if (P, Q) == (1, 1):
        return g.node("GlobalAveragePool", [x], _tensor(path, "GlobalAveragePool")), (C, 1, 1)
    # ONNX has no adaptive pooling: average the bins as one product with a fixed (H*W, P*Q) matrix.
    averaging = np.zeros((H, W, P, Q))
    for p, (h0, h1) in enumerate(geo.row_bins):
        for q, (w0, w1) in enumerate(geo.col_bins):
            averaging[h0:h1, w0:w1, p, q] = 1.0 / ((h1 - h0) * (w1 - w0))
    # Reshape's 0 keeps that axis of the input: the dynamic batch.
    flat = g.node("Reshape", [x, g.constant(_tensor(path, "flat_shape"), [0, C, H * W], np.int64)],
                  _tensor(path, "Reshape"))  # (N, C, H*W)
    pooled = g.node("MatMul", [flat, g.constant(_tensor(path, "bins"), averaging.reshape(H * W, P * Q))],
                    _tensor(path, "MatMul"))  # (N, C, P*Q)
    y = g.node("Reshape", [pooled, g.constant(_tensor(path, "out_shape"), [0, C, P, Q], np.int64)],
               _tensor(path, "Reshape_out"))  # (N, C, P, Q)
    return y, (C, P, Q)


def _batch_norm(g, layer, path, x, shape):
    C = layer.num_features
    if len(shape) + 1 not in layer._layouts or shape[0] != C:
        layouts = " or ".join(layer._layouts.values())
        raise ValueError(f"{layer.where}: expected input {layouts} with C = {C}, got {_batched(shape)}")
    if "running_mean" in layer.buffers:
        # Without affine parameters ONNX still wants a scale and a shift: ones and zeros.
        scale = (_dotted(path, "weight"), layer.params["weight"]) if layer.affine else (_tensor(path, "ones"), np.ones(C))
        shift = (_dotted(path, "bias"), layer.params["bias"]) if layer.affine else (_tensor(path, "zeros"), np.zeros(C))
        inputs = [x] + [g.constant(name, value) for name, value in (
            scale, shift, (_dotted(path, "running_mean"), layer.buffers["running_mean"]),
            (_dotted(path, "running_var"), layer.buffers["running_var"]))]
        return g.node("BatchNormalization", inputs, _tensor(path, "BatchNormalization"), epsilon=layer.eps), shape
    # No running statistics: evaluation uses the batch's too (biased variance), over every axis but the channels.
    axes = [0, *range(2, len(shape) + 1)]
    per_channel = (C,) + (1,) * (len(shape) - 1)  # broadcasts over (N, C, *spatial)
    mean = g.node("ReduceMean", [x], _tensor(path, "mean"), axes=axes, keepdims=1)
    centred = g.node("Sub", [x, mean], _tensor(path, "centred"))
    squares = g.node("Mul", [centred, centred], _tensor(path, "squares"))
    var = g.node("ReduceMean", [squares], _tensor(path, "var"), axes=axes, keepdims=1)
    std = g.node("Sqrt", [g.node("Add", [var, g.constant(_tensor(path, "eps"), layer.eps)], _tensor(path, "var_eps"))],
                 _tensor(path, "std"))
    y = g.node("Div", [centred, std], _tensor(path, "xhat"))
    if layer.affine:
        scale = g.constant(_dotted(path, "weight"), backend.to_numpy(layer.params["weight"]).reshape(per_channel))
        shift = g.constant(_dotted(path, "bias"), backend.to_numpy(layer.params["bias"]).reshape(per_channel))
        y = g.node("Add", [g.node("Mul", [y, scale], _tensor(path, "scaled")), shift], _tensor(path, "shifted"))
    return y, shape


def _linear(g, layer, path, x, shape):
    if not shape or shape[-1] != layer.in_features:
        raise ValueError(f"{layer.where}: expected input (N, *, {layer.in_features}), got {_batched(shape)}")
    out_shape = (*shape[:-1], layer.out_features)
    weight = g.constant(_dotted(path, "weight"), layer.params["weight"])
    if len(shape) == 1:  # (N, in): one Gemm, x @ weight.T + bias, the weight as our state_dict has it
        inputs = [x, weight] + ([g.constant(_dotted(path, "bias"), layer.params["bias"])] if "bias" in layer.params else [])
        return g.node("Gemm", inputs, _tensor(path, "Gemm"), transB=1), out_shape
    # (N, *, in): MatMul broadcasts over the leading axes; the transpose of the constant is folded by runtimes.
    weight_t = g.node("Transpose", [weight], _tensor(path, "weight_t"), perm=[1, 0])  # (in, out)
    y = g.node("MatMul", [x, weight_t], _tensor(path, "MatMul"))
    if "bias" in layer.params:
        y = g.node("Add", [y, g.constant(_dotted(path, "bias"), layer.params["bias"])], _tensor(path, "Add"))
    return y, out_shape


def _flatten(g, layer, path, x, shape):
    return g.node("Flatten", [x], _tensor(path, "Flatten"), axis=1), (math.prod(shape),)


def _elementwise(op: str):
    def convert(g, layer, path, x, shape):
        return g.node(op, [x], _tensor(path, op)), shape

    return convert


#: Our layer types (exactly: a subclass may compute something else) and their converters.
_CONVERTERS = {
    nn.Sequential: _sequential,
    nn.Residual: _residual,
    nn.Identity: _pass_through,
    nn.Dropout: _pass_through,
    nn.Conv2d: _conv2d,
    nn.MaxPool2d: _max_pool2d,
    nn.AvgPool2d: _avg_pool2d,
    nn.AdaptiveAvgPool2d: _adaptive_avg_pool2d,
    nn.BatchNorm1d: _batch_norm,
    nn.BatchNorm2d: _batch_norm,
    nn.Linear: _linear,
    nn.Flatten: _flatten,
    nn.ReLU: _elementwise("Relu"),
    nn.Sigmoid: _elementwise("Sigmoid"),
    nn.Tanh: _elementwise("Tanh"),
}


def _convert(g, layer, path, x, shape):
    """Add ``layer``'s nodes; an unknown layer, or one that does not fit its input, raises naming it."""
    where = f"layer {path!r}" if path else "the model"
    convert = _CONVERTERS.get(type(layer))
    if convert is None:
        known = ", ".join(sorted(cls.__name__ for cls in _CONVERTERS))
        raise OnnxExportError(f"{where} ({layer!r}) cannot be exported to ONNX: {type(layer).__name__} has no ONNX "
                              f"converter; exportable layers: {known}")
    try:
        return convert(g, layer, path, x, shape)
    except OnnxExportError:
        raise
    except (TypeError, ValueError) as exc:
        raise OnnxExportError(f"{where} cannot be exported for input {_batched(shape)}: {exc}") from None


# --------------------------------------------------------------------- export


def _input_shape(input_shape) -> tuple:
    try:
        shape = tuple(int(n) for n in input_shape)
    except (TypeError, ValueError):
        shape = ()
    if not shape or any(n < 1 for n in shape) or any(isinstance(n, bool) for n in input_shape):
        raise OnnxExportError(f"export: input_shape must be one sample's shape, e.g. (C, H, W), as positive ints "
                              f"(the batch is dynamic), got {input_shape!r}")
    return shape


def _normalization(normalization, shape) -> tuple[np.ndarray, np.ndarray] | None:
    """``(mean, std)`` as float32 ``(C,)`` arrays, ``C = shape[0]``, or None."""
    if normalization is None:
        return None
    try:
        mean, std = (np.asarray(v, dtype=np.float32).reshape(-1) for v in normalization)
    except (TypeError, ValueError):
        raise OnnxExportError(f"export: normalization must be (mean, std), got {normalization!r}") from None
    if mean.shape != (shape[0],) or std.shape != (shape[0],) or np.any(std == 0):
        raise OnnxExportError(f"export: normalization needs a mean and a non-zero std per input channel, "
                              f"{shape[0]} each, got mean {mean.tolist()} and std {std.tolist()}")
    return mean, std


def export(model, input_shape, path=None, *, normalization=None, include_normalization: bool = False,
           metadata: dict | None = None):
    """Export ``model`` to an ONNX graph that computes ``model.forward`` in evaluation mode.

    Parameters
    ----------
    model : portable_cnn.nn.Module
        Any backend and dtype; the weights are read to the host as float32.
        Its mode is neither used nor changed.
    input_shape : tuple of int
        One sample's shape, ``(C, H, W)`` for the image networks; the graph
        takes float32 ``(batch, *input_shape)``, the batch dimension dynamic.
    path : str or os.PathLike, optional
        Where to write the ``.onnx`` file; without it nothing is written.
    normalization : (mean, std), optional
        The per-channel statistics the inputs are normalised with,
        ``(x - mean) / std``, each of length ``C``; recorded in the metadata.
    include_normalization : bool, default False
        Make normalisation the graph's first two nodes (``Sub``, ``Div``), so
        the graph takes raw images in ``[0, 1]``; needs ``normalization``.
    metadata : dict, optional
        More ``metadata_props``: each value is stored as JSON under
        ``"portable_cnn." + key`` (``portable-cnn export`` stores the
        checkpoint's ``model``, ``data``, ``epoch`` and ``metrics``).

    Returns
    -------
    onnx.ModelProto
        Checked by ``onnx.checker.check_model(full_check=True)``; input
        :data:`INPUT_NAME`, output :data:`OUTPUT_NAME` ``(batch, num_classes)``.

    Raises
    ------
    OnnxExportError
        For a layer that cannot be exported (named, with its dotted name and
        ``repr``), a layer that does not fit its input, or bad arguments.
    ImportError
        If the ``onnx`` package is not installed.
    """
    onnx = _require("onnx", "ONNX export", _INSTALL)
    if not isinstance(model, nn.Module):
        raise OnnxExportError(f"export: model must be a portable_cnn.nn.Module, got {type(model).__name__}")
    shape = _input_shape(input_shape)
    stats = _normalization(normalization, shape)
    if include_normalization and stats is None:
        raise OnnxExportError("export: include_normalization=True needs normalization=(mean, std)")
    g = _Graph(onnx)
    x = INPUT_NAME
    if include_normalization:
        per_channel = (1, shape[0]) + (1,) * (len(shape) - 1)  # broadcasts over (N, C, *spatial)
        mean = g.constant("normalization.mean", stats[0].reshape(per_channel))
        std = g.constant("normalization.std", stats[1].reshape(per_channel))
        x = g.node("Div", [g.node("Sub", [x, mean], "normalization/Sub"), std], "normalization/Div")
    y, out_shape = _convert(g, model, "", x, shape)
    if g.nodes and g.nodes[-1].output[0] == y:  # name the last node's output after the graph's
        g.nodes[-1].output[0] = OUTPUT_NAME
        g.nodes[-1].name = OUTPUT_NAME
    else:  # the model passes its input through (an empty Sequential, an Identity)
        g.node("Identity", [y], OUTPUT_NAME)
    helper = onnx.helper
    graph = helper.make_graph(
        g.nodes, "portable_cnn", [helper.make_tensor_value_info(INPUT_NAME, onnx.TensorProto.FLOAT, [BATCH, *shape])],
        [helper.make_tensor_value_info(OUTPUT_NAME, onnx.TensorProto.FLOAT, [BATCH, *out_shape])], g.initializers,
    )
    opsets = [helper.make_opsetid("", OPSET)]
    # The oldest IR version that can carry this opset: runtimes as old as the opset read the file.
    proto = helper.make_model(graph, opset_imports=opsets, ir_version=helper.find_min_ir_version_for(opsets),
                              producer_name="portable_cnn", producer_version=__version__,
                              doc_string=f"portable_cnn model: {type(model).__name__}, evaluation mode")
    props = {"version": __version__,
             "input": {"name": INPUT_NAME, "shape": [BATCH, *shape], "dtype": "float32"}}
    if stats is not None:
        props["normalization"] = {"mean": stats[0].tolist(), "std": stats[1].tolist(),
                                  "in_graph": bool(include_normalization)}
    props.update(metadata or {})
    helper.set_model_props(proto, {METADATA_PREFIX + key: json.dumps(value) for key, value in props.items()})
    onnx.checker.check_model(proto, full_check=True)
    if path is not None:
        onnx.save_model(proto, str(path))
    return proto


def metadata(onnx_model) -> dict:
    """The ``portable_cnn.*`` metadata of an exported model (a ``ModelProto`` or a path), JSON decoded, prefix removed.

    ``metadata(m)["normalization"]`` is ``{"mean": [...], "std": [...], "in_graph": False}``
    when the caller has to normalise the inputs.
    """
    proto = _load(onnx_model)
    return {prop.key[len(METADATA_PREFIX):]: json.loads(prop.value) for prop in proto.metadata_props
            if prop.key.startswith(METADATA_PREFIX)}


def _load(onnx_model):
    if isinstance(onnx_model, (str, Path)):
        return _require("onnx", "reading an ONNX file", _INSTALL).load_model(str(onnx_model))
    return onnx_model


def verify(model, onnx_model, *, batch_sizes=(1, 3), seed: int = 0) -> float:
    """Run ``model.forward`` (evaluation mode) and ONNX Runtime (CPU) on the same random inputs; their worst difference.

    Parameters
    ----------
    model : portable_cnn.nn.Module
        Any backend and dtype; its mode is restored afterwards.
    onnx_model : onnx.ModelProto or path
        What :func:`export` made of it. When the metadata says the
        normalisation is in the graph, the graph gets the raw inputs and
        ``model`` the normalised ones.
    batch_sizes : sequence of int
        One run per batch size: the batch dimension is dynamic.
    seed : int
        Seeds the inputs: uniform in ``[0, 1)``, as images.

    Returns
    -------
    float
        ``max |ours - onnx| / max |ours|`` over every batch.
    """
    ort = _require("onnxruntime", "checking an ONNX file with ONNX Runtime", "pip install onnxruntime")
    proto = _load(onnx_model)
    shape = tuple(d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim[1:])
    stats = metadata(proto).get("normalization")
    in_graph = stats is not None and stats["in_graph"]
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    param = next(iter(model.state_dict().values()), None)
    xp = backend.get_namespace("numpy") if param is None else backend.namespace(param)
    dtype = "float32" if param is None else backend.dtype_name(param)
    device = None if param is None else backend.device(param)
    rng = np.random.default_rng(seed)
    worst = 0.0
    was_training = model.training
    model.eval()
    try:
        for n in batch_sizes:
            x = rng.random((n, *shape), dtype=np.float32)
            ours_in = x
            if in_graph:
                per_channel = (1, shape[0]) + (1,) * (len(shape) - 1)
                mean, std = (np.float32(stats[key]).reshape(per_channel) for key in ("mean", "std"))
                ours_in = (x - mean) / std
            ours = backend.to_numpy(model.forward(backend.asarray(ours_in, xp, dtype=dtype, device=device)))
            theirs = session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
            if theirs.shape != ours.shape:
                raise OnnxExportError(f"verify: ONNX Runtime gives shape {theirs.shape}, the model {ours.shape}")
            scale = float(np.max(np.abs(ours))) or 1.0
            worst = max(worst, float(np.max(np.abs(ours.astype(np.float64) - theirs))) / scale)
    finally:
        model.train(was_training)
    return worst


# --------------------------------------------------------------------- command line


def add_export_parser(subparsers):
    """Add the ``export`` subcommand (:data:`portable_cnn.cli.EXTENSIONS` imports this module only to run it)."""
    p = subparsers.add_parser(
        "export", help="write a checkpoint's model as an ONNX file",
        description="Export a checkpoint's model to ONNX (opset {}) for ONNX Runtime and other runtimes: the graph "
                    "computes the model's forward pass in evaluation mode on float32 (batch, C, H, W) input, the "
                    "batch dynamic. The dataset normalisation goes into the metadata "
                    "('portable_cnn.normalization'), or into the graph with --include-normalization. Needs the "
                    "onnx package: {}.".format(OPSET, _INSTALL),
    )
    p.add_argument("--checkpoint", metavar="PATH", required=True, help="a file written by portable-cnn train")
    p.add_argument("--onnx", metavar="OUT", required=True, help="the .onnx file to write")
    p.add_argument("--include-normalization", action="store_true",
                   help="normalise inside the graph, which then takes raw images in [0, 1] (default: the caller "
                        "normalises, with the mean and std in the metadata)")
    p.add_argument("--verify", action="store_true",
                   help="run the file with ONNX Runtime beside the model on random inputs at batch sizes 1 and 3 "
                        "and fail above 1e-5 relative difference (needs onnxruntime)")
    p.set_defaults(func=run_export)
    return p


#: The relative difference ``portable-cnn export --verify`` accepts (float32).
VERIFY_RTOL = 1e-5


def run_export(args) -> int:
    """``portable-cnn export``: 0 when written (and verified), 1 when ONNX Runtime disagrees."""
    from .checkpoint import CheckpointError
    from .cli import _check_outputs
    from .run import RunError, read_checkpoint

    _check_outputs({"--onnx": args.onnx}, inputs={"--checkpoint": args.checkpoint})
    ckpt = read_checkpoint(args.checkpoint)
    try:
        model = ckpt.build_model("numpy", "float32")
    except CheckpointError as exc:
        raise RunError(str(exc)) from None
    cfg = ckpt.model
    shape = (cfg["in_channels"], *cfg["input_size"])
    mean, std = ckpt.data.get("mean"), ckpt.data.get("std")
    normalization = None if mean is None else (mean, std)
    if args.include_normalization and normalization is None:
        raise RunError(f"--include-normalization: {ckpt.path} holds no normalisation statistics")
    extra = {"model": cfg, "data": {k: ckpt.data.get(k) for k in ("name", "split")}, "epoch": ckpt.epoch,
             "metrics": ckpt.metrics}
    try:
        proto = export(model, shape, args.onnx, normalization=normalization,
                       include_normalization=args.include_normalization, metadata=extra)
    except (ImportError, OnnxExportError, OSError) as exc:
        raise RunError(str(exc)) from None
    size = Path(args.onnx).stat().st_size
    out = proto.graph.output[0].type.tensor_type.shape.dim[1].dim_value
    print(f"wrote {args.onnx}: {cfg.get('name')} from {ckpt.path}, input {INPUT_NAME!r} {_batched(shape)} float32, "
          f"output {OUTPUT_NAME!r} {_batched((out,))}, opset {OPSET}, {len(proto.graph.node)} nodes, "
          f"{size / 1024:.0f} KiB")
    if normalization is None:
        print("normalisation: none saved in the checkpoint; the graph takes the inputs as the model does")
    elif args.include_normalization:
        print("normalisation: in the graph; it takes raw images in [0, 1]")
    else:
        print(f"normalisation: by the caller, (x - mean) / std with mean {[round(float(v), 6) for v in mean]} and "
              f"std {[round(float(v), 6) for v in std]} (metadata 'portable_cnn.normalization')")
    if args.verify:
        try:
            worst = verify(model, proto, batch_sizes=(1, 3))
        except ImportError as exc:
            raise RunError(str(exc)) from None
        agrees = worst <= VERIFY_RTOL
        print(f"ONNX Runtime {'agrees' if agrees else 'DISAGREES'}: worst relative difference {worst:.1e} "
              f"(limit {VERIFY_RTOL:.0e}) at batch sizes 1 and 3")
        return 0 if agrees else 1
    return 0
