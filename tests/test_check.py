"""``portable-cnn check`` (:mod:`portable_cnn.check`): every op and a small net on every backend against the reference.

It passes here on every installed backend; it sees a kernel that is wrong
(a NumPy kernel swapped for a bad one) and exits 1; its cases cover every
op; an unavailable backend named on the command line is one error line.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from portable_cnn import backend as B
from portable_cnn import check, cli, dispatch, ops
from portable_cnn.kernels import numpy as numpy_kernels
from portable_cnn.kernels import reference


def _run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_check_passes_on_every_installed_backend(capsys):
    code, out, err = _run(capsys, "check")
    assert code == 0, out + err
    lines = out.splitlines()
    assert lines[0].split() == ["backend", "device", "dtype", "checks", "worst", "error", "tolerance", "result",
                                "worst", "at"]
    installed = [name for name in B.BACKENDS if f"skipped {name}:" not in out]
    assert "numpy" in installed
    rows = lines[1:1 + 2 * len(installed)]
    for row, (name, dtype) in zip(rows, [(name, dtype) for name in installed for dtype in check.DTYPES]):
        tolerance = f"{check.TOLERANCES[dtype]['rtol']:.0e}"
        assert re.match(rf"{name}\s.*\s{dtype}\s+\d+\s+\S+\s+{tolerance}\s+pass\s", row), row
    assert lines[-1].startswith(f"all {2 * len(installed)} backend/dtype runs agree with the NumPy reference")


def test_every_op_has_a_case():
    """Each op name of the dispatch (forward and backward pairs, optimizer steps) is run by some case."""
    covered = set()
    for make, compute in check.CASES.values():
        calls = []

        def record(op, xp, dtype, _real=dispatch.kernel):
            calls.append(op)
            return _real(op, xp, dtype)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(dispatch, "kernel", record)
            compute(**make(np.random.default_rng(0)))
        covered.update(calls)
    # im2col/col2im are the reference convolution's building blocks, not ops of a layer.
    assert set(reference.KERNELS) - {"im2col", "col2im"} <= covered


def test_a_wrong_kernel_fails_the_check_and_is_named(monkeypatch, capsys):
    real = numpy_kernels.KERNELS["relu_forward"]

    def off_by_a_little(xp, x):
        return real[1](xp, x) * (1 + 1e-6)

    monkeypatch.setitem(numpy_kernels.KERNELS, "relu_forward", (real[0], off_by_a_little))
    dispatch.clear_cache()
    try:
        code, out, err = _run(capsys, "check", "--backends", "numpy")
    finally:
        dispatch.clear_cache()
    assert code == 1, out
    assert re.search(r"^numpy\s+cpu\s+float64\s+\d+\s+\S+\s+1e-09\s+FAIL\s", out, re.M), out
    assert re.search(r"^numpy\s+cpu\s+float32 .* pass ", out, re.M), "1e-6 is within float32's tolerance"
    mismatches = [line for line in out.splitlines() if line.startswith("mismatch: ")]
    assert mismatches[0] == "mismatch: numpy float64: relu: y: 1.0e-06", "relu itself, then what uses it"
    assert "network: logits" in mismatches[1] and len(mismatches) == check.MISMATCHES_SHOWN + 1
    assert re.fullmatch(r"mismatch: numpy float64: \.\.\. and \d+ more outputs", mismatches[-1])
    assert "FAILED: 1 of 2 backend/dtype runs differ" in out.splitlines()[-1]


def test_an_exception_is_a_failed_row_not_a_traceback(monkeypatch):
    def broken(xp, x):
        raise RuntimeError("driver went away")

    monkeypatch.setitem(numpy_kernels.KERNELS, "relu_forward", (None, broken))
    dispatch.clear_cache()
    try:
        results, _ = check.run_checks(["numpy"], ["float32"])
    finally:
        dispatch.clear_cache()
    (result,) = results
    assert not result.passed and result.error == "relu: RuntimeError: driver went away"
    assert "stopped by an error" in check.format_table(results)


def test_the_error_is_allclose_rule_as_a_relative_error():
    tol = check.TOLERANCES["float32"]
    want = np.array([0.0, 1.0, 100.0])
    at_limit = want + (tol["atol"] + tol["rtol"] * np.abs(want))  # numpy.allclose's bound, elementwise
    assert check._error(at_limit, want, tol) == pytest.approx(tol["rtol"])
    assert np.allclose(at_limit * (1 - 1e-9), want, **tol)
    assert check._error(np.array([0.0, 1.0]), want, tol) == np.inf, "a shape mismatch never passes"
    assert check._error(np.array([np.nan, 1.0, 100.0]), want, tol) == np.inf


def test_tolerances_are_the_tests_tolerances():
    from conftest import TOLERANCES, tol

    assert TOLERANCES is check.TOLERANCES
    assert tol("float32") == check.TOLERANCES["float32"]


def test_an_unavailable_backend_named_is_one_error_line(capsys):
    ok, _ = B.cupy_status()
    if ok:
        pytest.skip("a CUDA device works here")
    code, out, err = _run(capsys, "check", "--backends", "cupy")
    assert code == 2 and out == ""
    assert err.startswith("portable-cnn check: error: backend 'cupy' cannot run here: ") and err.count("\n") == 1


def test_bad_options_are_refused(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["check", "--dtypes", "float16"])
    assert info.value.code == 2
    assert "expected a comma-separated list of float64, float32, got 'float16'" in capsys.readouterr().err


def test_the_network_case_trains_every_layer():
    """The network's gradients reach every parameter (none is zero), so the step checks every layer's backward."""
    make, compute = check.CASES["network"]
    outputs = compute(**make(np.random.default_rng(0)))
    grads = {k: v for k, v in outputs.items() if k.startswith("grad ")}
    model = check.small_network()
    assert len(grads) == len(list(model.named_parameters()))
    assert all(np.abs(g).max() > 1e-6 for g in grads.values())
    assert outputs["dx"].shape == (4, 2, 8, 8) and float(outputs["loss"]) > 0
    assert ops.softmax(outputs["logits"], axis=1).shape == (4, 3)
