"""The reference implementation of every op: the array API standard only, the namespace passed in.

It runs on every array library (``array_api_strict`` proves it needs
nothing else), wherever no backend kernel is registered, and everywhere
under ``portable_cnn.config_context(fast_paths=False)``. Tests call these
functions directly. ``KERNELS`` maps each op name to its function.
"""

from . import activation, conv, dropout, linear, norm, optim, pool, softmax

__all__ = ["KERNELS"]

#: op name -> the reference implementation (every op has one).
KERNELS = {
    "im2col": conv.im2col,
    "col2im": conv.col2im,
    "conv2d_forward": conv.conv2d_forward,
    "conv2d_backward": conv.conv2d_backward,
    "max_pool2d_forward": pool.max_pool2d_forward,
    "max_pool2d_relu_forward": pool.max_pool2d_relu_forward,
    "max_pool2d_backward": pool.max_pool2d_backward,
    "avg_pool2d_forward": pool.avg_pool2d_forward,
    "avg_pool2d_backward": pool.avg_pool2d_backward,
    "adaptive_avg_pool2d_forward": pool.adaptive_avg_pool2d_forward,
    "adaptive_avg_pool2d_backward": pool.adaptive_avg_pool2d_backward,
    "global_avg_pool2d_forward": pool.global_avg_pool2d_forward,
    "global_avg_pool2d_backward": pool.global_avg_pool2d_backward,
    "relu_forward": activation.relu_forward,
    "relu_backward": activation.relu_backward,
    "sigmoid_forward": activation.sigmoid_forward,
    "sigmoid_backward": activation.sigmoid_backward,
    "tanh_forward": activation.tanh_forward,
    "tanh_backward": activation.tanh_backward,
    "linear_forward": linear.linear_forward,
    "linear_backward": linear.linear_backward,
    "flatten_forward": linear.flatten_forward,
    "flatten_backward": linear.flatten_backward,
    "softmax_forward": softmax.softmax_forward,
    "softmax_backward": softmax.softmax_backward,
    "log_softmax_forward": softmax.log_softmax_forward,
    "log_softmax_backward": softmax.log_softmax_backward,
    "softmax_cross_entropy_forward": softmax.softmax_cross_entropy_forward,
    "softmax_cross_entropy_backward": softmax.softmax_cross_entropy_backward,
    "batch_norm_forward": norm.batch_norm_forward,
    "batch_norm_backward": norm.batch_norm_backward,
    "dropout_forward": dropout.dropout_forward,
    "dropout_backward": dropout.dropout_backward,
    "sgd_step": optim.sgd_step,
    "adam_step": optim.adam_step,
}
