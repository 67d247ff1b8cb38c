"""``portable-cnn bench``: training and inference throughput beside native PyTorch, in the same run.

What is measured, per network (``lenet`` 1x28x28, ``vgg-small``,
``resnet20`` and ``mobilenet-small`` 3x32x32, ``digits`` 1x8x8), batch size
and backend:

* **train**: one optimizer step = forward, softmax cross-entropy, backward,
  SGD with momentum 0.9; images/s = batch size / step time.
* **infer**: one forward pass in evaluation mode.

Backends are ours (``numpy``, ``torch`` = our code on PyTorch tensors through
the array API, ``cupy``, ``array_api_strict``) and the reference, native
PyTorch (``torch.nn`` and ``torch.optim.SGD``, the same network with the same
weights loaded from our ``state_dict``, the same batch and dtype: float32,
float64 or both, a row each, with ``--dtypes``), on the CPU
for the CPU backends and on the GPU (cuDNN) for CuPy. Every figure is a ratio
to that reference, measured by the protocol of :mod:`.protocol`.

The report: the BLAS library and kernel (threadpoolctl), thread counts, a
table in the terminal, a JSON file (``--json``), a PNG plot (``--plot``), the
peak memory (per row: the device peak on the GPU, tracemalloc's step peak for
ours on NumPy), the CuPy-over-NumPy speed-up and the batch size at which the GPU
overtakes the CPU, and with ``--breakdown`` a per-layer-type time split with
GFLOP/s for the convolutions. matplotlib and threadpoolctl are optional (the
``bench`` extra): without them the plot or the BLAS line is skipped with a
message saying what to install.

The modules:

* :mod:`.cli`: the options, :func:`add_bench_parser`, :func:`run_bench`, :func:`main`;
* :mod:`.protocol`: the networks, the batch, the timing protocol (warm-up,
  calibration, interleaved repeats, medians, stability);
* :mod:`.runners`: our runner, PyTorch's, the float64 check and one configuration;
* :mod:`.torch_mirror`: the ``torch.nn`` equivalent of our layers and models,
  which the tests' PyTorch oracle uses too;
* :mod:`.breakdown`: the per-layer-type split, timed through
  :func:`portable_cnn.nn.layer_hook`;
* :mod:`.environment`: the machine, BLAS, versions, git revision, TF32 and memory;
* :mod:`.report`: the table, Markdown, JSON and plot.

Only ``portable-cnn bench`` imports this package; PyTorch, CuPy, matplotlib,
threadpoolctl and the POSIX-only ``resource`` are imported inside the
functions that use them.
"""

from .cli import add_bench_parser, main, run_bench
from .protocol import DTYPES, MODES, NETS, OUR_BACKENDS

__all__ = ["NETS", "MODES", "DTYPES", "OUR_BACKENDS", "add_bench_parser", "run_bench", "main"]
