"""Numerical ops of portable_cnn: each a forward and its hand-written backward.

Functions take and return raw arrays of any array-API library; the namespace
comes from the arguments. See docs/derivation.md for the formulas.
"""

from .activation import relu, relu_backward, sigmoid, sigmoid_backward, tanh, tanh_backward
from .conv import col2im, conv2d, conv2d_backward, im2col
from .dropout import dropout, dropout_backward
from .linear import flatten, flatten_backward, linear, linear_backward
from .norm import batch_norm, batch_norm2d, batch_norm2d_backward, batch_norm_backward
from .pool import (
    adaptive_avg_pool2d,
    adaptive_avg_pool2d_backward,
    avg_pool2d,
    avg_pool2d_backward,
    global_avg_pool2d,
    global_avg_pool2d_backward,
    max_pool2d,
    max_pool2d_backward,
    max_pool2d_relu,
)
from .softmax import (
    log_softmax,
    log_softmax_backward,
    one_hot,
    softmax,
    softmax_backward,
    softmax_cross_entropy,
    softmax_cross_entropy_backward,
)
from ._checks import out_size

__all__ = [
    "adaptive_avg_pool2d",
    "adaptive_avg_pool2d_backward",
    "avg_pool2d",
    "avg_pool2d_backward",
    "batch_norm",
    "batch_norm2d",
    "batch_norm2d_backward",
    "batch_norm_backward",
    "col2im",
    "conv2d",
    "conv2d_backward",
    "dropout",
    "dropout_backward",
    "flatten",
    "flatten_backward",
    "global_avg_pool2d",
    "global_avg_pool2d_backward",
    "im2col",
    "linear",
    "linear_backward",
    "log_softmax",
    "log_softmax_backward",
    "max_pool2d",
    "max_pool2d_backward",
    "max_pool2d_relu",
    "one_hot",
    "out_size",
    "relu",
    "relu_backward",
    "sigmoid",
    "sigmoid_backward",
    "softmax",
    "softmax_backward",
    "softmax_cross_entropy",
    "softmax_cross_entropy_backward",
    "tanh",
    "tanh_backward",
]
