"""A training step captured once as a CUDA graph (CuPy) and replayed for every batch.

On a GPU a small network's training step is a few hundred small kernels, and
CuPy spends several microseconds of Python and driver time launching each:
a lenet step costs about 5 ms of launching while the GPU computes for well
under one. A CUDA graph records the step's kernels once; each later step is
one launch of the whole graph.

Replaying a recording needs everything it touches to stay where it was:

* **Inputs** are copied into static buffers the graph reads.
* **Temporaries** of the captured step come from a private CuPy memory pool
  that nothing else allocates from while the graph lives, so no later
  allocation is handed memory the graph still writes.
* **Parameters, buffers and optimizer state** must be updated in place. Our
  optimizers bind new arrays instead (:mod:`portable_cnn.optim`); inside the
  capture each new array is copied back into a static array owned by this
  step and that is bound again, so every replay reads what the previous one
  wrote. Whoever binds another array later (``load_state_dict``, an eager
  step) is noticed on the next call and copied in.
* **Python numbers are baked in**: the learning rate and the other
  hyperparameters. A change (a scheduler's new ``lr``) triggers a new
  capture. Adam's bias correction changes every step and Dropout would
  replay the same random mask, so those are refused
  (:class:`CudaGraphUnsupported`).
* **No host synchronisation** inside the step: the loss must be built with
  ``SoftmaxCrossEntropy(validate=False)`` (validate labels once, up front).

The first ``warmup_steps`` calls run eagerly (they compile the kernels and
create the optimizer state); the next call captures the step and launches
it; every call after that replays it. A batch of another shape or dtype (a
short last batch) runs eagerly. Each call is one training step either way.

While a graph drives training, the model's parameters and the optimizer
state are the step's static arrays and change in place at every step: copy
a ``state_dict`` you want to keep (checkpoints copy to the host anyway).

>>> from portable_cnn import cuda_graph, models, nn, optim
>>> model = models.lenet(rng=0)  # on NumPy
>>> cuda_graph.graph_support(model, nn.SoftmaxCrossEntropy(), optim.SGD(model, lr=0.1))[:56]
'the loss checks its labels on the host every step, which'
>>> cuda_graph.CudaGraphStep(model, nn.SoftmaxCrossEntropy(validate=False), optim.SGD(model, lr=0.1))
Traceback (most recent call last):
...
portable_cnn.cuda_graph.CudaGraphUnsupported: CudaGraphStep: CUDA graphs need the model on CuPy, it is on numpy
"""

from __future__ import annotations

import importlib

from . import backend

__all__ = ["CudaGraphStep", "CudaGraphUnsupported", "graph_support"]


class CudaGraphUnsupported(RuntimeError):
    """The model, loss or optimizer cannot be captured as a CUDA graph; the message says why."""


def graph_support(model, loss_fn, optimizer) -> str | None:
    """Why this training step cannot be a CUDA graph, or ``None`` when it can."""
    if type(optimizer).__name__ != "SGD":
        return (f"{type(optimizer).__name__}'s update changes with the step count (bias correction), "
                "which a recorded step would repeat; use SGD or train without a CUDA graph")
    if getattr(loss_fn, "validate", True):
        return ("the loss checks its labels on the host every step, which a graph cannot record: "
                "use SoftmaxCrossEntropy(validate=False) and check the labels once beforehand")
    for layer in model:
        if type(layer).__name__ == "Dropout" and layer.p > 0:
            return f"{layer!r} draws a new random mask every step, which a recorded step would repeat"
    params = [layer.params[key] for _, layer, key in model.named_parameters()]
    if not params:
        return "the model has no parameters"
    if not backend.is_cupy(backend.namespace(params[0])):
        return f"CUDA graphs need the model on CuPy, it is on {backend.backend_name(params[0])}"
    return None


def _cupy():
    return importlib.import_module("cupy")  # only reached with CuPy arrays in hand


class CudaGraphStep:
    """One SGD training step (forward, loss, backward, update) as a replayed CUDA graph.

    Parameters
    ----------
    model : portable_cnn.nn.Sequential
        On CuPy, in training mode.
    loss_fn : portable_cnn.nn.SoftmaxCrossEntropy
        Built with ``validate=False``.
    optimizer : portable_cnn.optim.SGD
        Over ``model``.
    warmup_steps : int, default 2
        Eager steps before the capture (at least 1: it creates the momentum
        buffers the captured step reads).

    Calling it as ``step(x, y)`` with ``x`` (N, C, H, W) and ``y`` (N,) CuPy
    arrays runs one training step and returns ``(loss, logits)``: the loss a
    0-d array of its own, the logits (N, classes) valid until the next call.
    Nothing waits for the GPU. Raises :class:`CudaGraphUnsupported` when the
    step cannot be captured (see the module docstring); the model and
    optimizer are then as they were before the failed capture.

    Attributes
    ----------
    captures, replays, eager_steps : int
        How often each kind of step ran.
    """

    def __init__(self, model, loss_fn, optimizer, *, warmup_steps=2):
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 1:
            raise ValueError(f"CudaGraphStep: warmup_steps must be an int >= 1, got {warmup_steps!r}")
        why = graph_support(model, loss_fn, optimizer)
        if why is not None:
            raise CudaGraphUnsupported(f"CudaGraphStep: {why}")
        self.model, self.loss_fn, self.optimizer = model, loss_fn, optimizer
        self.warmup_steps = warmup_steps
        self.captures = self.replays = self.eager_steps = 0
        self._graph = None
        self._stream = None
        self._pool = None
        self._key = None       # (x shape, x dtype, y shape, y dtype, hyperparameters) of the capture
        self._inputs = None    # static (x, y) the graph reads
        self._outputs = None   # (loss, logits) the graph writes
        self._slots = []       # (store dict, key, static array): what the graph updates in place

    def __repr__(self):
        state = "captured" if self._graph is not None else "not captured"
        return (f"CudaGraphStep({state}, captures={self.captures}, replays={self.replays}, "
                f"eager_steps={self.eager_steps})")

    # --- what the step updates ----------------------------------------------------------------

    def _stores(self):
        """``(store dict, key)`` of every array the step rebinds: parameters, buffers, optimizer state."""
        out = [(layer.params, key) for _, layer, key in self.model.named_parameters()]
        out += [(layer.buffers, key) for _, layer, key in self.model.named_buffers()]
        for name, _, _ in self.optimizer._params:
            state = self.optimizer.state.get(name, {})
            out += [(state, key) for key in sorted(state)]
        return out

    def _rebind_statics(self) -> bool:
        """Copy arrays bound since the capture into the static ones and bind those; False if the set changed."""
        stores = self._stores()
        if [(id(s), k) for s, k in stores] != [(id(s), k) for s, k, _ in self._slots]:
            return False
        for store, key, static in self._slots:
            current = store[key]
            if current is not static:
                if current.shape != static.shape or current.dtype != static.dtype:
                    return False
                static[...] = current
                store[key] = static
        return True

    def _state_missing(self) -> bool:
        """Whether a parameter still lacks the momentum buffer the captured (non-first) update reads."""
        return self.optimizer.momentum != 0 and not all(
            self.optimizer.state.get(name) for name, _, _ in self.optimizer._params
        )

    def _hyperparameters(self):
        return tuple(sorted(self.optimizer.config().items())) + (("lr", self.optimizer.lr),)

    # --- steps ------------------------------------------------------------------------------------

    def _eager(self, x, y):
        logits = self.model.forward(x)
        loss = self.loss_fn.forward(logits, y)
        self.model.backward(self.loss_fn.backward(), need_input_grad=False)
        self.optimizer.step()
        return loss, logits

    def __call__(self, x, y):
        cupy = _cupy()
        if not self.model.training:
            raise CudaGraphUnsupported("CudaGraphStep: the model is in evaluation mode; call model.train() first")
        key = (tuple(x.shape), x.dtype, tuple(y.shape), y.dtype, self._hyperparameters())
        if self._graph is not None and key[:4] != self._key[:4]:
            self.eager_steps += 1  # another batch shape (a short last batch): no new capture for it
            return self._eager(x, y)
        if self._graph is not None and (key != self._key or not self._rebind_statics()):
            self.release()  # new hyperparameters, or the model or optimizer changed shape
        captured_now = self._graph is None
        if captured_now:
            if self.eager_steps < self.warmup_steps or self._state_missing():
                self.eager_steps += 1
                return self._eager(x, y)
            self._capture(cupy, x, y, key)
        current = cupy.cuda.get_current_stream()
        self._stream.wait_event(current.record())
        with self._stream:
            self._inputs[0][...] = x
            self._inputs[1][...] = y
            self._graph.launch(self._stream)
        current.wait_event(self._stream.record())
        if not captured_now:
            self.optimizer.steps += 1  # the capture's own Python run counted the step it recorded
        self.replays += 1
        loss, logits = self._outputs
        return loss.copy(), logits

    def _capture(self, cupy, x, y, key):
        """Record one step on a side stream into a graph; on failure put every binding back and raise."""
        stores = self._stores()
        # Static arrays of our own: an array a user still holds (an earlier state_dict) is never written.
        slots = [(store, k, store[k].copy()) for store, k in stores]
        originals = [store[k] for store, k in stores]
        inputs = (cupy.empty_like(x), cupy.empty_like(y))
        steps_before = self.optimizer.steps
        stream = self._stream or cupy.cuda.Stream(non_blocking=True)
        stream.wait_event(cupy.cuda.get_current_stream().record())  # the copies above, on the current stream
        pool = cupy.cuda.MemoryPool()
        error = outputs = graph = None
        for store, k, static in slots:
            store[k] = static
        with stream, cupy.cuda.using_allocator(pool.malloc):
            stream.begin_capture()
            try:
                outputs = self._eager(*inputs)
                for store, k, static in slots:
                    if store[k] is not static:
                        static[...] = store[k]
                        store[k] = static
            except Exception as exc:
                error = exc
            try:
                graph = stream.end_capture()
            except Exception as exc:
                error = error or exc
        if error is not None:
            for (store, k), original in zip(stores, originals):
                store[k] = original
            self.optimizer.steps = steps_before
            raise CudaGraphUnsupported(
                f"CudaGraphStep: capturing the training step failed ({type(error).__name__}: {error}); "
                "a step that reads values back to the host cannot be recorded. Train without a CUDA graph."
            ) from error
        stream.synchronize()
        self._graph, self._stream, self._pool = graph, stream, pool
        self._inputs, self._outputs, self._slots, self._key = inputs, outputs, slots, key
        self.captures += 1

    def release(self) -> None:
        """Drop the graph and its memory; the next call captures again (after the model or optimizer changed)."""
        if self._stream is not None:
            self._stream.synchronize()
        self._graph = self._pool = self._inputs = self._outputs = self._key = None
        self._slots = []
