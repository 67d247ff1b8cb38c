"""Data-parallel training over MPI (mpi4py), with NCCL between GPUs (``cupyx.distributed``).

Every rank holds the whole model and trains on its slice of each global
batch; one Allreduce per step sums the gradients, so every rank takes the
same step. The result does not depend on the number of ranks ``N``:

* **Sharding without moving data.** Every rank draws the same permutation
  (the same seeded generator) and cuts the same global batches of
  ``batch_size`` samples; rank ``r`` takes rows :func:`shard_range` of each,
  contiguous and balanced (sizes differ by at most one; a rank gets none when
  the batch has fewer rows than there are ranks). Each rank reads only its
  own samples.
* **Gradients of sums.** Each rank backpropagates the *sum* of its samples'
  losses divided by the global batch size, so the sum over ranks is the
  gradient of the global mean, whatever the shard sizes (uneven, empty).
* **One flat buffer per step** (:class:`DistributedOptimizer`) holds the
  gradients and a few scalars (the trainer's loss sum, correct count, sample
  count and stop flag), summed by one Allreduce.
* **BatchNorm** normalises with the statistics of the global batch
  (two Allreduces of ``C`` values in the forward, one of ``2C`` in the
  backward; :class:`BatchSplit`), and **Dropout** draws its mask for the
  global batch and keeps this rank's rows.

Only the order of summation differs from one process: in float64 the
parameters agree with a one-process run to about 1e-13 relative after an
epoch (tests/test_distributed.py checks 1e-12); in float32 within the usual
float32 tolerances. docs/distributed.md says what is exact and what is not.

mpi4py is imported by :func:`init` only, never at import time. A hand-written
loop::

    from portable_cnn import distributed, nn, optim

    comm = distributed.init()                      # under mpiexec -n N
    distributed.broadcast_state(comm, model)       # rank 0's weights everywhere
    split = distributed.attach(model, comm)        # BatchNorm and Dropout see the global batch
    opt = distributed.DistributedOptimizer(optim.SGD(model, lr=0.05), comm)
    loss_fn = nn.SoftmaxCrossEntropy(reduction="sum")
    for idx in global_batches:                     # the same on every rank
        mine = idx[split.split(len(idx))]
        loss = loss_fn.forward(model.forward(x[mine]), y[mine])
        model.backward(loss_fn.backward(1.0 / len(idx)), need_input_grad=False)
        opt.step()

:class:`portable_cnn.train.Trainer` does all of this given ``comm=``, and
``mpiexec -n N portable-cnn train --distributed`` builds it from the command
line.
"""

from __future__ import annotations

import importlib
import os
import sys
import time

import numpy as np

from . import backend, nn
from .data import iterate_minibatches

__all__ = [
    "LAUNCHER_VARIABLES",
    "BatchSplit",
    "Communicator",
    "DistributedError",
    "DistributedOptimizer",
    "attach",
    "broadcast_state",
    "init",
    "launcher_world_size",
    "shard_minibatches",
    "shard_range",
]

#: Environment variables in which MPI launchers give the number of processes
#: they started and the process's rank: Open MPI's ``mpiexec`` (also under
#: PMIx), MPICH's and Intel MPI's Hydra (and ``srun --mpi=pmi2``), MVAPICH2,
#: and Slurm's ``srun`` for the tasks of a job step (``SLURM_NTASKS`` alone
#: is also set in a batch script that runs one process, so it is not read).
LAUNCHER_VARIABLES = {
    "OMPI_COMM_WORLD_SIZE": "OMPI_COMM_WORLD_RANK",
    "PMI_SIZE": "PMI_RANK",
    "MV2_COMM_WORLD_SIZE": "MV2_COMM_WORLD_RANK",
    "SLURM_STEP_NUM_TASKS": "SLURM_PROCID",
}


class DistributedError(RuntimeError):
    """Data-parallel training cannot start (no mpi4py, a bad communicator); a one-line message."""


def launcher_world_size(environ=None) -> tuple[int, int, str | None]:
    """How many processes an MPI launcher started, and this one's rank, from its environment (no mpi4py).

    Returns ``(size, rank, variable)``: the largest size among the keys of
    :data:`LAUNCHER_VARIABLES`, the rank its launcher gives, and the
    variable that gave the size; ``(1, 0, None)`` outside a launcher.

    >>> launcher_world_size({"PMI_SIZE": "4", "PMI_RANK": "2"})
    (4, 2, 'PMI_SIZE')
    >>> launcher_world_size({})
    (1, 0, None)
    """
    environ = os.environ if environ is None else environ
    size, rank, source = 1, 0, None
    for size_name, rank_name in LAUNCHER_VARIABLES.items():
        try:
            value = int(environ.get(size_name, ""))
        except ValueError:
            continue
        if value > size:
            size, source = value, size_name
            rank = int(environ.get(rank_name, "0") or 0)
    return size, rank, source


def shard_range(total: int, rank: int, size: int) -> tuple[int, int]:
    """Rows ``start:stop`` of a batch of ``total`` rows that ``rank`` of ``size`` ranks takes.

    Contiguous and balanced: the first ``total % size`` ranks take one row
    more; with fewer rows than ranks the last ranks take none.

    >>> [shard_range(10, r, 3) for r in range(3)]
    [(0, 4), (4, 7), (7, 10)]
    >>> [shard_range(1, r, 3) for r in range(3)]
    [(0, 1), (1, 1), (1, 1)]
    """
    base, extra = divmod(int(total), int(size))
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def shard_minibatches(x: np.ndarray, y: np.ndarray, batch_size: int, rng, split: BatchSplit):
    """One epoch of :func:`portable_cnn.data.iterate_minibatches`'s batches, this rank's rows of each.

    The permutation is drawn from ``rng`` now, as one process draws it, so
    every rank (seeded alike) cuts the same global batches; only this rank's
    samples are copied out of ``x`` and ``y``.

    Yields
    ------
    xb, yb : numpy.ndarray
        This rank's rows (``split.split`` of the batch; possibly none).
    total : int
        The global batch size.
    """
    indices = np.arange(len(y))
    batches = iterate_minibatches(indices, indices, batch_size, shuffle=True, rng=rng)  # batches of sample indices

    def rows():
        for idx, _ in batches:
            mine = idx[split.split(len(idx))]
            yield np.ascontiguousarray(x[mine]), np.ascontiguousarray(y[mine]), len(idx)

    return rows()


class Communicator:
    """A group of ranks training one model: sums and broadcasts of arrays of any backend.

    Built by :func:`init`. Arrays go through NCCL when the communicator has
    it (CuPy arrays, one GPU per rank), otherwise through host memory over
    MPI: copied to NumPy, reduced in place, copied back to the array's
    library and device (nothing is copied on NumPy).

    Attributes
    ----------
    mpi : mpi4py.MPI.Comm
    rank, size : int
        This rank and the number of ranks.
    local_rank, local_size : int
        The same within this node (the ranks sharing its memory).
    transport : {"mpi", "nccl"}
        How :meth:`allreduce` moves arrays.
    gpu : int or None
        The CUDA device this rank uses (``None`` on the CPU).
    backend : str or None
        The backend :func:`init` was given, ``"auto"`` resolved.
    notes : list of str
        What :func:`init` decided and why (the GPU, the transport), for the
        run's log.
    allreduce_seconds, allreduce_calls : float, int
        Time spent in :meth:`allreduce` (with NCCL: to enqueue it on the
        stream) and its calls; benchmarks read them.
    """

    def __init__(self, mpi, *, local_rank: int = 0, local_size: int = 1, nccl=None, gpu=None, notes=(),
                 backend_name=None):
        self.mpi = mpi
        self.rank, self.size = int(mpi.Get_rank()), int(mpi.Get_size())
        self.local_rank, self.local_size = int(local_rank), int(local_size)
        self._nccl = nccl
        self.transport = "nccl" if nccl is not None else "mpi"
        self.gpu = gpu
        self.backend = backend_name
        self.notes = list(notes)
        self.allreduce_seconds, self.allreduce_calls = 0.0, 0

    def __repr__(self):
        return f"Communicator(rank={self.rank}, size={self.size}, transport={self.transport!r})"

    def allreduce(self, array):
        """The element-wise sum of ``array`` over all ranks, same shape, library, dtype and device.

        ``array`` (any shape, C-contiguous for NCCL) may be overwritten with
        the sum: pass a buffer you own. Every rank must call it, in the same
        order, with the same shape and dtype.
        """
        if self.size == 1:
            return array
        from mpi4py import MPI

        began = time.perf_counter()
        if self._nccl is not None:
            self._nccl.all_reduce(array, array, op="sum")  # in place, on the current stream
            out = array
        else:
            host = self._host_buffer(array)
            self.mpi.Allreduce(MPI.IN_PLACE, host, op=MPI.SUM)
            out = self._back(host, array)
        self.allreduce_seconds += time.perf_counter() - began
        self.allreduce_calls += 1
        return out

    def broadcast(self, array, root: int = 0):
        """``array`` as rank ``root`` holds it, on every rank (same shape, library, dtype and device)."""
        if self.size == 1:
            return array
        if self._nccl is not None:
            self._nccl.broadcast(array, root)
            return array
        host = self._host_buffer(array)
        self.mpi.Bcast(host, root=root)
        return self._back(host, array)

    def sum_host(self, values: np.ndarray) -> np.ndarray:
        """A float64 NumPy array summed over all ranks, through MPI whatever the transport (a copy)."""
        out = np.array(values, dtype=np.float64, order="C")
        if self.size > 1:
            from mpi4py import MPI

            self.mpi.Allreduce(MPI.IN_PLACE, out, op=MPI.SUM)
        return out

    def broadcast_object(self, value, root: int = 0):
        """A picklable Python value as rank ``root`` holds it, on every rank."""
        return value if self.size == 1 else self.mpi.bcast(value, root=root)

    def allgather_object(self, value) -> list:
        """Every rank's picklable ``value``, in rank order, on every rank."""
        return [value] if self.size == 1 else self.mpi.allgather(value)

    def barrier(self) -> None:
        """Wait until every rank is here."""
        if self.size > 1:
            self.mpi.Barrier()

    def abort(self, code: int = 1) -> None:
        """End every rank of the job now (MPI_Abort): what a rank does on an error the others cannot see."""
        sys.stdout.flush()
        sys.stderr.flush()
        self.mpi.Abort(code)

    @staticmethod
    def _host_buffer(array) -> np.ndarray:
        """``array`` as a writable C-contiguous NumPy array: itself on NumPy, else a host copy."""
        host = backend.to_numpy(array)
        if not (host.flags.c_contiguous and host.flags.writeable):
            host = np.array(host, order="C")
        return host

    @staticmethod
    def _back(host: np.ndarray, like):
        """``host`` in ``like``'s library and device: ``host`` itself when it is ``like``'s own memory."""
        if host is like:
            return like
        return backend.asarray(host, backend.namespace(like), dtype=backend.dtype_name(like), device=backend.device(like))


def init(backend_name: str | None = None, *, comm=None, nccl: bool | None = None,
         abort_on_error: bool = True) -> Communicator:
    """Join the MPI job this process was launched in; returns its :class:`Communicator`.

    Parameters
    ----------
    backend_name : str, optional
        The backend the model will run on. ``"cupy"``, or ``"auto"`` with a
        CUDA device visible: this rank takes GPU ``local_rank % devices``
        (the node-local rank, so one rank per GPU when there are as many
        ranks on a node as GPUs) before anything touches a GPU, then
        ``"auto"`` is resolved (:func:`portable_cnn.backend.resolve_backend`)
        on that GPU. Call this before building the model; the resolved name
        is :attr:`Communicator.backend`.
    comm : mpi4py.MPI.Comm, optional
        Default ``MPI.COMM_WORLD``.
    nccl : bool, optional
        All-reduce CuPy arrays with NCCL (``cupyx.distributed``). Default:
        when the backend is CuPy, there is more than one rank, ``comm`` is
        the world and no two ranks share a GPU (NCCL refuses that; the
        arrays then go through host memory over MPI, and :attr:`Communicator.notes`
        says so). ``True`` refuses to run without it.
    abort_on_error : bool, default True
        With more than one rank, an uncaught exception prints its traceback
        and calls ``MPI_Abort``, which ends every rank: the others would
        otherwise wait in their next Allreduce for ever.

    Raises
    ------
    DistributedError
        mpi4py is not installed, or NCCL was asked for and cannot be used.
    """
    try:
        MPI = importlib.import_module("mpi4py.MPI")
    except ImportError as exc:
        raise DistributedError(f"--distributed needs mpi4py and an MPI library: pip install 'portable-cnn[mpi]' "
                               f"(or mpi4py built against the cluster's MPI, see docs/distributed.md) ({exc})") from None
    world = MPI.COMM_WORLD
    comm = world if comm is None else comm
    node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    local_rank, local_size = node.Get_rank(), node.Get_size()
    size = comm.Get_size()
    if abort_on_error and size > 1:
        _abort_on_uncaught_exception(comm)
    notes, gpu, nccl_comm = [], None, None
    if backend_name in ("auto", "cupy"):
        gpu = _use_local_gpu(local_rank)
    if backend_name == "auto":
        backend_name = backend.resolve_backend("auto")[0]
    if gpu is not None and backend_name == "cupy":
        shared = _gpu_shared(node, gpu)
        notes.append(f"rank {comm.Get_rank()} on GPU {gpu} (node-local rank {local_rank} of {local_size})")
        wanted = nccl if nccl is not None else size > 1
        why_not = None
        if size == 1:
            why_not = "one rank: nothing to all-reduce"
        elif shared:
            why_not = (f"{local_size} ranks share {shared} GPU(s) on this node and NCCL refuses two ranks on one GPU; "
                       f"give each rank its own GPU (as many ranks per node as GPUs) to use NCCL")
        elif comm.Get_size() != world.Get_size():
            why_not = "cupyx.distributed sets NCCL up over MPI.COMM_WORLD, and this communicator is a part of it"
        if wanted and why_not is not None:
            if nccl:
                raise DistributedError(f"NCCL cannot be used: {why_not}")
            notes.append(f"all-reduce through host memory over MPI: {why_not}")
        elif wanted:
            cupyx_distributed = importlib.import_module("cupyx.distributed")
            nccl_comm = cupyx_distributed.init_process_group(size, comm.Get_rank(), backend="nccl", use_mpi=True)
            notes.append("all-reduce with NCCL (cupyx.distributed), one GPU per rank")
    return Communicator(comm, local_rank=local_rank, local_size=local_size, nccl=nccl_comm, gpu=gpu, notes=notes,
                        backend_name=backend_name)


def _use_local_gpu(local_rank: int) -> int | None:
    """Make GPU ``local_rank % count`` this process's current device; ``None`` without a usable CuPy.

    Runs no kernel and allocates nothing, so no rank creates a context on a
    GPU that is not its own.
    """
    try:
        cupy = importlib.import_module("cupy")
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception:  # CuPy absent, or present without a driver: the run goes on on the CPU
        return None
    if count < 1:
        return None
    device = local_rank % count
    cupy.cuda.Device(device).use()
    return device


def _gpu_shared(node, device: int) -> int:
    """The number of distinct GPUs behind the node's ranks when two of them share one, else 0.

    Compares PCI bus ids, so ranks that each see one GPU through their own
    ``CUDA_VISIBLE_DEVICES`` (all device 0) are told apart.
    """
    cupy = importlib.import_module("cupy")
    ids = node.allgather(cupy.cuda.Device(device).pci_bus_id)
    return len(set(ids)) if len(set(ids)) < len(ids) else 0


def _abort_on_uncaught_exception(comm) -> None:
    """Print an uncaught exception as Python would, then ``MPI_Abort`` the whole job."""
    previous = sys.excepthook

    def hook(kind, value, traceback):
        previous(kind, value, traceback)
        sys.stderr.write(f"portable_cnn.distributed: rank {comm.Get_rank()} failed; aborting all {comm.Get_size()} ranks\n")
        sys.stdout.flush()
        sys.stderr.flush()
        # The launcher kills every rank at once on an abort and may drop what
        # it has not forwarded yet: give it a moment to pass the traceback on.
        time.sleep(0.5)
        comm.Abort(1)

    sys.excepthook = hook


def broadcast_state(comm: Communicator, model, optimizer=None, *, parameters: bool = True, root: int = 0) -> None:
    """Give every rank rank ``root``'s parameters and buffers (and optimizer state).

    Models built from one seed are equal already; this makes it so whatever
    happened (a checkpoint read on one node only, a nondeterministic
    initialisation). The trainer calls it when training starts or resumes,
    and with ``parameters=False`` (buffers only: per-rank BatchNorm
    statistics) before evaluating. Every rank must hold the same names and shapes.
    """
    if comm.size == 1:
        return
    for _, module in model.named_modules():
        for store in (module.params, module.buffers) if parameters else (module.buffers,):
            for key in store:
                store[key] = comm.broadcast(_owned(store[key]), root=root)
    if optimizer is not None:
        state = optimizer.state_dict()
        optimizer.load_state_dict({key: comm.broadcast(_owned(value), root=root) for key, value in state.items()})


def _owned(array):
    """A C-contiguous copy of ``array`` that a broadcast may overwrite (the model's arrays may be shared or read-only)."""
    return backend.asarray(array, backend.namespace(array), dtype=backend.dtype_name(array), device=backend.device(array))


class BatchSplit:
    """This rank's rows of the current global batch, and sums over ranks: what data-parallel layers read.

    :func:`attach` gives it to a model's BatchNorm and Dropout layers (their
    ``replicas`` attribute); :meth:`split` is called once per step, before the
    forward, with the global batch size.

    Attributes
    ----------
    rows : tuple of int
        ``(start, total)``: this rank's input is rows ``start:start + n`` of a
        global batch of ``total`` rows.
    """

    def __init__(self, comm: Communicator):
        self.comm = comm
        self.rows = (0, 0)

    def split(self, total: int) -> slice:
        """Record a new global batch of ``total`` rows; returns the slice of it that this rank takes."""
        start, stop = shard_range(total, self.comm.rank, self.comm.size)
        self.rows = (start, int(total))
        return slice(start, stop)

    def sum(self, array):
        """``array`` summed over all ranks (:meth:`Communicator.allreduce` of a copy)."""
        return self.comm.allreduce(_owned(array))


def attach(model, comm: Communicator, *, sync_batchnorm: bool = True) -> BatchSplit:
    """Make a model's layers see the global batch; returns the :class:`BatchSplit` to update every step.

    Dropout layers draw their masks for the global batch and keep this rank's
    rows, so the masks do not depend on the number of ranks. BatchNorm layers
    normalise with the global batch's statistics when ``sync_batchnorm``
    (the default), with this rank's own otherwise (then the result depends
    on the number of ranks, and the running statistics differ between ranks:
    the trainer takes rank 0's before evaluating).
    """
    split = BatchSplit(comm)
    for _, module in model.named_modules():
        if isinstance(module, nn.Dropout) or (sync_batchnorm and isinstance(module, nn._BatchNorm)):
            module.replicas = split if comm.size > 1 else None
    return split


class DistributedOptimizer:
    """An optimizer whose :meth:`step` first sums the gradients over all ranks, in one Allreduce.

    Parameters
    ----------
    optimizer : portable_cnn.optim.Optimizer
        Updates the parameters from the summed gradients; schedulers and
        checkpoints keep using it directly.
    comm : Communicator

    The gradients must be those of the rank's share of the global loss (its
    samples' loss *sum* divided by the global batch size; see the module
    docstring), so that their sum is the global gradient.
    """

    def __init__(self, optimizer, comm: Communicator):
        self.optimizer, self.comm = optimizer, comm

    @property
    def lr(self) -> float:
        """The wrapped optimizer's learning rate."""
        return self.optimizer.lr

    @lr.setter
    def lr(self, value):
        self.optimizer.lr = value

    def step(self, extras=()):
        """Sum the gradients (and ``extras``) over all ranks, then take the optimizer's step.

        Parameters
        ----------
        extras : sequence of 0-d arrays or numbers
            Scalars summed in the same buffer, as the gradients' dtype (the
            trainer's loss, correct count, sample count and stop flag).

        Returns
        -------
        array of shape (len(extras),) or None
            The summed ``extras``, on the device (nothing is read back).
        """
        entries = [(layer, key) for _, layer, key in self.optimizer.model.named_parameters() if key in layer.grads]
        if not entries:
            raise ValueError("DistributedOptimizer: no gradients to sum; call the model's backward before step()")
        grads = [layer.grads[key] for layer, key in entries]
        xp = backend.namespace(*grads)
        dtype, device = grads[0].dtype, backend.device(grads[0])
        parts = [xp.reshape(g, (-1,)) for g in grads]  # (size of each,)
        if extras:
            parts.append(xp.stack([xp.reshape(xp.asarray(e, dtype=dtype, device=device), ()) for e in extras]))  # (len(extras),)
        flat = self.comm.allreduce(xp.concat(parts))  # (total,): a fresh buffer, reduced in place
        offset = 0
        for (layer, key), g in zip(entries, grads):
            n = int(np.prod(g.shape))
            layer.grads[key] = xp.reshape(flat[offset:offset + n], tuple(g.shape))  # a view of the summed buffer
            offset += n
        self.optimizer.step()
        return flat[offset:] if extras else None
