"""Bad input: a ValueError/TypeError that names the layer, the expected and the actual.

Errors raised while a layer runs start with the layer's repr (``Conv2d(2, 3,
...``), so a user with several convolutions can tell which one; errors raised
by a constructor start with the class name. Every ``match`` below contains the
actual number or dtype that was passed.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from portable_cnn import nn

F32 = np.float32


def image(*shape, dtype=F32):
    return np.random.default_rng(0).standard_normal(shape).astype(dtype)


def raises_from(layer, exc, message):
    """``pytest.raises`` for an error that starts with ``layer``'s repr and matches ``message``."""
    return pytest.raises(exc, match=r"^" + re.escape(repr(layer)) + r": " + message)


# --------------------------------------------------------------------------- constructors


@pytest.mark.parametrize(
    "make, exc, message",
    [
        (lambda: nn.Conv2d(1, 2, 3, stride=0), ValueError, r"^Conv2d: stride must be positive, got 0$"),
        (lambda: nn.Conv2d(1, 2, 3, stride=(1, -2)), ValueError, r"^Conv2d: stride must be positive, got \(1, -2\)$"),
        (lambda: nn.Conv2d(1, 2, 3, padding=-1), ValueError, r"^Conv2d: padding must be non-negative, got -1$"),
        (lambda: nn.Conv2d(1, 2, 3, dilation=0), ValueError, r"^Conv2d: dilation must be positive, got 0$"),
        (lambda: nn.Conv2d(1, 2, 0), ValueError, r"^Conv2d: kernel_size must be positive, got 0$"),
        (lambda: nn.Conv2d(1, 2, (3, 3, 3)), ValueError, r"^Conv2d: kernel_size must be an int or a pair of ints, got \(3, 3, 3\)$"),
        (lambda: nn.Conv2d(1, 2, 2.5), TypeError, r"^Conv2d: kernel_size must be an int or a pair of ints, got 2.5$"),
        (lambda: nn.Conv2d(1, 2, 3, stride=True), TypeError, r"^Conv2d: stride must be an int or a pair of ints, got True$"),
        (lambda: nn.MaxPool2d(2, stride=0), ValueError, r"^MaxPool2d: stride must be positive, got 0$"),
        (lambda: nn.MaxPool2d(2, padding=-1), ValueError, r"^MaxPool2d: padding must be non-negative, got -1$"),
        (lambda: nn.MaxPool2d(0), ValueError, r"^MaxPool2d: kernel_size must be positive, got 0$"),
        (lambda: nn.AvgPool2d(2, stride=-1), ValueError, r"^AvgPool2d: stride must be positive, got -1$"),
        (lambda: nn.AvgPool2d(2, padding=(0, -3)), ValueError, r"^AvgPool2d: padding must be non-negative, got \(0, -3\)$"),
    ],
)
def test_constructor_errors(make, exc, message):
    with pytest.raises(exc, match=message):
        make()


# --------------------------------------------------------------------------- Conv2d


def test_conv2d_wrong_ndim():
    conv = nn.Conv2d(2, 3, 3)
    with raises_from(conv, ValueError, r"expected input of 4 dimensions \(N, C, H, W\), got shape \(2, 5, 5\)"):
        conv.forward(image(2, 5, 5))


def test_conv2d_channel_mismatch():
    conv = nn.Conv2d(2, 3, 3)
    with raises_from(conv, ValueError, r"expected input with 2 channels .*got 4 channels \(input shape \(1, 4, 5, 5\)\)"):
        conv.forward(image(1, 4, 5, 5))


@pytest.mark.parametrize(
    "kwargs, x_shape, message",
    [
        (dict(kernel_size=5), (1, 1, 4, 6), r"kernel 5x5 \(with dilation\) is larger than the padded input 4x6 \(input 4x6, padding \(0, 0\)\)"),
        (dict(kernel_size=(3, 7), padding=1), (1, 1, 4, 4), r"kernel 3x7 \(with dilation\) is larger than the padded input 6x6 \(input 4x4, padding \(1, 1\)\)"),
        (dict(kernel_size=3, dilation=3), (1, 1, 6, 6), r"kernel 7x7 \(with dilation\) is larger than the padded input 6x6"),
    ],
)
def test_conv2d_kernel_larger_than_padded_input(kwargs, x_shape, message):
    conv = nn.Conv2d(1, 1, **kwargs)
    with raises_from(conv, ValueError, message):
        conv.forward(image(*x_shape))


def test_conv2d_kernel_as_large_as_padded_input_is_fine():
    conv = nn.Conv2d(1, 1, 6, padding=1)
    assert conv.forward(image(1, 1, 4, 4)).shape == (1, 1, 1, 1)


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.bool_])
def test_conv2d_integer_or_boolean_input(dtype):
    conv = nn.Conv2d(1, 1, 2)
    name = np.dtype(dtype).name
    with raises_from(conv, TypeError, rf"expected input of a real floating dtype \(float32 or float64\), got {name}$"):
        conv.forward(np.ones((1, 1, 3, 3), dtype=dtype))


def test_conv2d_dtype_mismatch_between_input_and_weight():
    conv = nn.Conv2d(1, 1, 2)  # float32 weights
    with raises_from(conv, TypeError, r"input dtype float64 does not match weight dtype float32$"):
        conv.forward(image(1, 1, 3, 3, dtype=np.float64))
    conv.params["bias"] = conv.params["bias"].astype(np.float64)
    with raises_from(conv, TypeError, r"bias dtype float64 does not match weight dtype float32$"):
        conv.forward(image(1, 1, 3, 3))


def test_conv2d_integer_weight():
    conv = nn.Conv2d(1, 1, 2, bias=False)
    conv.params["weight"] = np.ones((1, 1, 2, 2), dtype=np.int64)
    with raises_from(conv, TypeError, r"expected weight of a real floating dtype \(float32 or float64\), got int64$"):
        conv.forward(image(1, 1, 3, 3))


def test_conv2d_backward_wrong_gradient_shape():
    conv = nn.Conv2d(1, 2, 2)
    conv.forward(image(3, 1, 4, 5))
    with raises_from(conv, ValueError, r"expected output gradient of shape \(3, 2, 3, 4\), got \(3, 2, 4, 3\)"):
        conv.backward(image(3, 2, 4, 3))


# --------------------------------------------------------------------------- pooling


@pytest.mark.parametrize("Pool", [nn.MaxPool2d, nn.AvgPool2d])
def test_pool_wrong_ndim(Pool):
    pool = Pool(2)
    with raises_from(pool, ValueError, r"expected input of 4 dimensions \(N, C, H, W\), got shape \(3, 4\)"):
        pool.forward(image(3, 4))


@pytest.mark.parametrize("Pool", [nn.MaxPool2d, nn.AvgPool2d])
def test_pool_kernel_larger_than_padded_input(Pool):
    pool = Pool((3, 4), padding=(1, 1))
    with raises_from(pool, ValueError, r"kernel 3x4 is larger than the padded input 4x3 \(input 2x1, padding \(1, 1\)\)"):
        pool.forward(image(1, 1, 2, 1))


@pytest.mark.parametrize("Pool", [nn.MaxPool2d, nn.AvgPool2d])
def test_pool_padding_over_half_the_kernel(Pool):
    pool = Pool(3, padding=2)
    with raises_from(pool, ValueError, r"padding must be at most half the kernel size \(3, 3\), got padding \(2, 2\)"):
        pool.forward(image(1, 1, 8, 8))


@pytest.mark.parametrize("Pool", [nn.MaxPool2d, nn.AvgPool2d])
@pytest.mark.parametrize("dtype", [np.int64, np.bool_])
def test_pool_integer_or_boolean_input(Pool, dtype):
    pool = Pool(2)
    name = np.dtype(dtype).name
    with raises_from(pool, TypeError, rf"expected input of a real floating dtype \(float32 or float64\), got {name}$"):
        pool.forward(np.ones((1, 1, 4, 4), dtype=dtype))


@pytest.mark.parametrize("Pool", [nn.MaxPool2d, nn.AvgPool2d])
def test_pool_backward_wrong_gradient_shape(Pool):
    pool = Pool(2)
    pool.forward(image(1, 2, 4, 6))
    with raises_from(pool, ValueError, r"expected output gradient of shape \(1, 2, 2, 3\), got \(1, 2, 3, 2\)"):
        pool.backward(image(1, 2, 3, 2))


# --------------------------------------------------------------------------- Linear


def test_linear_wrong_ndim():
    linear = nn.Linear(4, 3)
    with raises_from(linear, ValueError, r"expected input of at least 1 dimension \(\*, in_features\), got shape \(\)"):
        linear.forward(np.zeros((), np.float32))


def test_linear_feature_mismatch():
    linear = nn.Linear(4, 3)
    with raises_from(linear, ValueError, r"expected input with 4 features .*got 5 features \(input shape \(2, 5\)\)"):
        linear.forward(image(2, 5))


@pytest.mark.parametrize("dtype", [np.int64, np.bool_])
def test_linear_integer_or_boolean_input(dtype):
    linear = nn.Linear(4, 3)
    name = np.dtype(dtype).name
    with raises_from(linear, TypeError, rf"expected input of a real floating dtype \(float32 or float64\), got {name}$"):
        linear.forward(np.ones((2, 4), dtype=dtype))


def test_linear_dtype_mismatch_between_input_and_weight():
    linear = nn.Linear(4, 3)
    with raises_from(linear, TypeError, r"input dtype float64 does not match weight dtype float32$"):
        linear.forward(image(2, 4, dtype=np.float64))
    linear.params["bias"] = linear.params["bias"].astype(np.float64)
    with raises_from(linear, TypeError, r"bias dtype float64 does not match weight dtype float32$"):
        linear.forward(image(2, 4))


def test_linear_backward_wrong_gradient_shape():
    linear = nn.Linear(4, 3)
    linear.forward(image(2, 4))
    with raises_from(linear, ValueError, r"expected output gradient of shape \(2, 3\), got \(3, 2\)"):
        linear.backward(image(3, 2))


# --------------------------------------------------------------------------- activations and Flatten


@pytest.mark.parametrize("Layer", [nn.ReLU, nn.Sigmoid, nn.Tanh])
@pytest.mark.parametrize("dtype", [np.int64, np.uint8, np.bool_])
def test_activation_integer_or_boolean_input(Layer, dtype):
    layer = Layer()
    name = np.dtype(dtype).name
    with raises_from(layer, TypeError, rf"expected input of a real floating dtype \(float32 or float64\), got {name}$"):
        layer.forward(np.ones((2, 3), dtype=dtype))


@pytest.mark.parametrize("Layer", [nn.ReLU, nn.Sigmoid, nn.Tanh, nn.Flatten])
def test_elementwise_backward_wrong_gradient_shape(Layer):
    """A gradient that would broadcast ((3,) against (2, 3)) is refused, not silently broadcast."""
    layer = Layer()
    y = layer.forward(image(2, 3))
    assert y.shape == (2, 3)
    with raises_from(layer, ValueError, r"expected output gradient of shape \(2, 3\), got \(3,\)"):
        layer.backward(image(3))
    with raises_from(layer, ValueError, r"expected output gradient of shape \(2, 3\), got \(1, 3\)"):
        layer.backward(image(1, 3))


def test_flatten_needs_a_batch_axis():
    flatten = nn.Flatten()
    with raises_from(flatten, ValueError, r"expected an input with a batch axis, got shape \(\)"):
        flatten.forward(np.asarray(1.0, dtype=F32))


# --------------------------------------------------------------------------- SoftmaxCrossEntropy


@pytest.mark.parametrize(
    "labels, message",
    [
        (np.array([0, 3, 1]), r"expected labels in \[0, 2\], got labels in \[0, 3\]"),
        (np.array([0, -1, 2]), r"expected labels in \[0, 2\], got labels in \[-1, 2\]"),
        (np.array([7, 7, 7]), r"expected labels in \[0, 2\], got labels in \[7, 7\]"),
    ],
)
def test_labels_out_of_range(labels, message):
    loss = nn.SoftmaxCrossEntropy()
    with raises_from(loss, ValueError, message):
        loss.forward(image(3, 3), labels)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.bool_])
def test_non_integer_labels(dtype):
    loss = nn.SoftmaxCrossEntropy()
    name = np.dtype(dtype).name
    with raises_from(loss, TypeError, rf"expected integer labels, got {name}$"):
        loss.forward(image(3, 3), np.array([0, 1, 0], dtype=dtype))


def test_logits_and_labels_shapes():
    loss = nn.SoftmaxCrossEntropy()
    with raises_from(loss, ValueError, r"expected labels of 2 dimensions \(N, d1\), got shape \(3,\)"):
        loss.forward(image(3, 3, 1), np.array([0, 1, 2]))  # (N, K, d1) logits: the K-dimensional case
    with raises_from(loss, ValueError, r"expected labels of 1 dimensions \(N,\), got shape \(3, 1\)"):
        loss.forward(image(3, 3), np.array([[0], [1], [2]]))
    with raises_from(loss, ValueError, r"expected 3 labels \(one per row of logits \(3, 4\)\), got 2"):
        loss.forward(image(3, 4), np.array([0, 1]))
    # An empty batch is no error: its mean is NaN, as in PyTorch (tests/test_elementwise.py checks the value).
    assert np.isnan(float(loss.forward(image(0, 4), np.zeros(0, dtype=np.int64))))


@pytest.mark.parametrize("dtype", [np.int64, np.bool_])
def test_integer_or_boolean_logits(dtype):
    loss = nn.SoftmaxCrossEntropy()
    name = np.dtype(dtype).name
    with raises_from(loss, TypeError, rf"expected logits of a real floating dtype \(float32 or float64\), got {name}$"):
        loss.forward(np.ones((2, 3), dtype=dtype), np.array([0, 1]))


def test_unvalidated_loss_skips_the_range_check_only():
    """validate=False trusts the label range (no host sync) but still checks dtypes and shapes."""
    loss = nn.SoftmaxCrossEntropy(validate=False)
    loss.forward(image(2, 3), np.array([0, 2]))
    with raises_from(loss, TypeError, r"expected integer labels, got float64$"):
        loss.forward(image(2, 3), np.array([0.0, 2.0]))


def test_errors_name_the_layer_inside_a_model():
    """In a Sequential the message names the failing layer with its options, not just its type."""
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 8, 3, padding=(1, 0)), nn.Flatten())
    with pytest.raises(ValueError, match=r"^Conv2d\(4, 8, kernel_size=\(3, 3\), stride=\(1, 1\), padding=\(1, 0\).*: kernel 3x3 .* padded input 3x1"):
        model.forward(image(1, 1, 3, 3))
