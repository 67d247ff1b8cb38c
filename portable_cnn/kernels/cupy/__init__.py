"""CuPy kernels for CUDA GPUs: window ops as CUDA kernels, fused elementwise work, cuBLAS GEMMs.

``cuda/`` holds the CUDA sources by subject (``conv.cu``, ``pool.cu``,
``loss.cu``) and ``common.cuh``, which they share: the grid-stride loop, the
index split and the one window-gathering loop that col2im and both pooling
backwards use. :mod:`.compile` compiles and caches them per device;
:mod:`.memory` explains an out-of-memory error. CuPy is imported only inside
functions: this package is imported by the dispatch only once CuPy arrays
reach an op.
"""

from . import conv, elementwise, pool

__all__ = ["KERNELS"]

_FLOATS = ("float32", "float64")  # the CUDA templates' T

#: op name -> (dtype names it handles, implementation)
KERNELS = {
    "im2col": (_FLOATS, conv.im2col),
    "col2im": (_FLOATS, conv.col2im),
    "conv2d_forward": (_FLOATS, conv.conv2d_forward),
    "conv2d_backward": (_FLOATS, conv.conv2d_backward),
    "max_pool2d_forward": (_FLOATS, pool.max_pool2d_forward),
    "max_pool2d_relu_forward": (_FLOATS, pool.max_pool2d_relu_forward),
    "max_pool2d_backward": (_FLOATS, pool.max_pool2d_backward),
    "avg_pool2d_forward": (_FLOATS, pool.avg_pool2d_forward),
    "avg_pool2d_backward": (_FLOATS, pool.avg_pool2d_backward),
    "global_avg_pool2d_forward": (_FLOATS, pool.global_avg_pool2d_forward),
    "global_avg_pool2d_backward": (_FLOATS, pool.global_avg_pool2d_backward),
    "relu_forward": (_FLOATS, elementwise.relu_forward),
    "relu_backward": (_FLOATS, elementwise.relu_backward),
    "softmax_cross_entropy_forward": (_FLOATS, elementwise.softmax_cross_entropy_forward),
    "softmax_cross_entropy_backward": (_FLOATS, elementwise.softmax_cross_entropy_backward),
    "sgd_step": (_FLOATS, elementwise.sgd_step),
}
