"""Implementations of the ops, one package per array library, chosen by :mod:`portable_cnn.dispatch`.

``reference/``
    Every op, written once against the array API standard with the namespace
    passed in: runs on every library (``array_api_strict`` included) and is
    what ``config_context(fast_paths=False)`` runs everywhere.
``numpy/``
    NumPy on the CPU: channels-last activations, cache-blocked im2col and a
    thread pool that splits the batch over the cores.
``cupy/``
    CuPy on a CUDA GPU: window ops and fused elementwise work as CUDA
    kernels, compiled on first use.

A package exposes ``KERNELS``, a dict ``op name -> (dtype names or None for
any, implementation)``; an implementation takes the same arguments as the
reference function of that op. Kernels never test which library they were
handed: the dispatch only hands them their own. See docs/architecture.md.
"""

__all__ = ["PACKAGES"]

#: library name (:func:`portable_cnn.backend.library_name`) -> the package of its kernels;
#: a library not named here runs the reference.
PACKAGES = {
    "numpy": "portable_cnn.kernels.numpy",
    "cupy": "portable_cnn.kernels.cupy",
}
