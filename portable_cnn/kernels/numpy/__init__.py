"""NumPy kernels for the CPU: channels-last convolution and pooling, threaded elementwise work.

Activations flow as (N, C, H, W) views of channels-last (N, H, W, C) memory;
each kernel documents its layout. Work is split over the batch on the
package's own thread pool (:mod:`.parallel`) with single-threaded BLAS.
Ops without an entry here run the reference.
"""

from . import activation, conv, linear, norm, pool

__all__ = ["KERNELS"]

#: op name -> (dtype names it handles, None for any; implementation)
KERNELS = {
    "conv2d_forward": (None, conv.conv2d_forward),
    "conv2d_backward": (None, conv.conv2d_backward),
    "max_pool2d_forward": (None, pool.max_pool2d_forward),
    "max_pool2d_relu_forward": (None, pool.max_pool2d_relu_forward),
    "max_pool2d_backward": (None, pool.max_pool2d_backward),
    "avg_pool2d_forward": (None, pool.avg_pool2d_forward),
    "avg_pool2d_backward": (None, pool.avg_pool2d_backward),
    "global_avg_pool2d_forward": (None, pool.global_avg_pool2d_forward),
    "global_avg_pool2d_backward": (None, pool.global_avg_pool2d_backward),
    "relu_forward": (None, activation.relu_forward),
    "relu_backward": (None, activation.relu_backward),
    "linear_forward": (None, linear.linear_forward),
    "linear_backward": (None, linear.linear_backward),
    "batch_norm_forward": (None, norm.batch_norm_forward),
    "batch_norm_backward": (None, norm.batch_norm_backward),
}
