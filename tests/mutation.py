"""Mutation testing on demand: plant realistic bugs one at a time and see whether the test suite fails.

Run it from the repository root with the project's Python (not in CI: a
full run takes tens of minutes on two cores)::

    python tests/mutation.py                 # every mutant, one at a time
    python tests/mutation.py --jobs 2        # two at a time
    python tests/mutation.py --only sgd_nesterov_buffer col2im_kernel_stride
    python tests/mutation.py --check         # only check that every mutant still applies

Each mutant in :data:`MUTANTS` replaces one exact snippet of one file (it
must occur exactly once) and names the test files that should catch it. The
script copies the working tree (``git ls-files``, tracked and untracked
files that git does not ignore) to a temporary folder per worker and runs
the whole suite there once, unmutated: tests that fail already (work in
progress elsewhere) are left out of every later run, so that they kill no
mutant. Then, for each mutant, it plants the mutant, runs the named tests
(``pytest -x``) and, if they pass, the whole suite, before it calls the
mutant a survivor. The working tree is never touched. A mutant whose snippet is no longer in the code is reported
as stale: update it with the code. The last run's score and survivors are
in docs/testing.md.

A ready-made tool (mutmut, cosmic-ray) would draw thousands of mutants, most
of them equivalent or caught by the first test, each costing a run of a
suite of about a minute; a list of realistic bugs, each a mistake someone
could make, says more per minute of machine time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 900


@dataclass(frozen=True)
class Mutant:
    """One planted bug: in ``path`` replace ``old`` (exactly once) by ``new``; ``tests`` should catch it."""

    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]
    what: str


# The test files that should catch each mutant (run before the whole suite).
K, C, P, PA, D = ("tests/test_cuda_kernels.py", "tests/test_conv.py", "tests/test_pool.py", "tests/test_parallel.py",
                  "tests/test_dispatch.py")
EL, NN, OP, DA = "tests/test_elementwise.py", "tests/test_norm_dropout.py", "tests/test_optim.py", "tests/test_data.py"
TR, CK, G = "tests/test_train.py", "tests/test_checkpoint.py", "tests/test_gpu.py"

MUTANTS = (
    # ------------------------------------------------------------------ CUDA kernels and their Python launchers
    Mutant("col2im_kernel_stride", "portable_cnn/kernels/cupy/cuda/conv.cu",
           "const T* base = cols + (long long)g * R * S * Cg", "const T* base = cols + (long long)g * S * Cg", (K,),
           "CUDA col2im: a run's columns at g*S*Cg instead of g*R*S*Cg"),
    Mutant("cupy_conv_v_u_swapped", "portable_cnn/kernels/cupy/conv.py",
           "return (g.C, g.H, g.W, g.R, g.S, g.P, g.Q, g.u, g.v, g.a, g.b, g.dh, g.dw)",
           "return (g.C, g.H, g.W, g.R, g.S, g.P, g.Q, g.v, g.u, g.a, g.b, g.dh, g.dw)", (K,),
           "CuPy im2col/col2im launch: (v, u) passed for (u, v)"),
    Mutant("window_gather_stride", "portable_cnn/kernels/cupy/cuda/common.cuh",
           "if (hp % u != 0) continue;", "if (hp % v != 0) continue;", (K,),
           "CUDA for_each_window: the row test uses the column stride"),
    Mutant("max_pool_backward_argmax_strides", "portable_cnn/kernels/cupy/cuda/pool.cu",
           "argmax[n * kN + c * kC + p * kP + q * kQ]", "argmax[n * kN + c * kC + p * kQ + q * kP]", (K,),
           "CUDA max-pool backward: the argmax read with its row and column strides swapped"),
    Mutant("loss_kernel_ignores_class_stride", "portable_cnn/kernels/cupy/cuda/loss.cu",
           "-((row[label * sK] - m) - log_sum)", "-((row[label] - m) - log_sum)", (K,),
           "CUDA loss: the label's logit read as if the classes were contiguous"),
    Mutant("cupy_max_pool_layout_flag", "portable_cnn/kernels/cupy/pool.py",
           "(*strides(x), np.int32(last), lowest, np.int32(relu)))",
           "(*strides(x), np.int32(0), lowest, np.int32(relu)))", (K,),
           "CuPy max-pool launch: channels-last output buffer, kernel told channels-first"),
    Mutant("cupy_relu_backward_arguments", "portable_cnn/kernels/cupy/elementwise.py",
           "run.elementwise(RELU_BACKWARD)(dy, x, run.lib.empty_like(dy))",
           "run.elementwise(RELU_BACKWARD)(x, dy, run.lib.empty_like(dy))", (K,),
           "CuPy ReLU backward: dy and x passed in the wrong order"),
    Mutant("sgd_nesterov_buffer", "portable_cnn/kernels/cupy/elementwise.py",
           '_SGD_BODY.format(step="d + momentum * b")', '_SGD_BODY.format(step="d + momentum * buf")', (K,),
           "fused SGD kernel: Nesterov with the old momentum buffer"),
    Mutant("cupy_column_sums_axis", "portable_cnn/kernels/cupy/conv.py",
           "ones = xp.ones_like(a[:, 0])  # (rows,), a's dtype and device",
           "ones = xp.ones_like(a[0, :])  # (rows,), a's dtype and device", (K, G),
           "CuPy conv bias gradient: the GEMV's vector as long as a row, not a column (GPU only)"),
    Mutant("col2im_rsc_tap_offset", "portable_cnn/kernels/cupy/cuda/conv.cu",
           "(long long)tap * Cg]", "(long long)tap]", (K,),
           "CUDA col2im over channel-fastest columns: a tap's columns taken Cg apart as one"),
    Mutant("rsc_weight_order", "portable_cnn/kernels/reference/conv.py",
           "weight = xp.permute_dims(weight, (0, 2, 3, 1))  # (K, R, S, C/G)",
           "weight = xp.permute_dims(weight, (0, 3, 2, 1))  # (K, R, S, C/G)", (K,),
           "CuPy conv over channels-last input: the weight's r and s swapped against the columns (GPU only)"),
    Mutant("gemm_backward_holds_the_columns", "portable_cnn/kernels/reference/conv.py",
           "    cols = None\n    dweight = _weight_from_groups", "    dweight = _weight_from_groups", (C,),
           "memory: the GEMM backward keeps the taken columns alive while dcols is allocated"),
    Mutant("conv_layer_keeps_its_columns", "portable_cnn/nn.py",
           "        self._cache = (x, None, relu_output)\n", "", ("tests/test_nn.py",),
           "memory: a conv layer keeps its columns after its backward, until the next forward"),
    # ------------------------------------------------------------------ NumPy's banded product (issue 15)
    Mutant("banded_tile_overlap_overwritten", "portable_cnn/kernels/numpy/banded.py",
           "dxpad[i:j, r : r + P, t * T : t * T + Tw, :] += dwin[:, :, t, r]",
           "dxpad[i:j, r : r + P, t * T : t * T + Tw, :] = dwin[:, :, t, r]", (C,),
           "NumPy banded backward: a tile's window overwrites the S-1 columns it shares with the previous one"),
    Mutant("banded_diagonal_off_by_one", "portable_cnn/kernels/numpy/banded.py",
           "dw_rsck += dband5[:, t : t + S, :, t, :]", "dw_rsck += dband5[:, t : t + S, :, min(t + 1, T - 1), :]",
           (C,), "NumPy banded weight gradient: the band's diagonals read one tile column off"),
    Mutant("banded_bias_column_zero", "portable_cnn/kernels/numpy/banded.py",
           "        buf[..., inner] = 1\n", "        buf[..., inner] = 0\n", (C,),
           "NumPy banded product: the unfolded rows' ones column left at 0, so no bias and no bias gradient"),
    Mutant("banded_threads_drop_a_part", "portable_cnn/kernels/numpy/banded.py",
           "        dband += partial[slot]", "        dband += partial[slot] * (slot != 1)", (C,),
           "NumPy banded backward: the second thread's partial weight gradient dropped"),
    # ------------------------------------------------------------------ max pooling fused with its ReLU (issue 15)
    Mutant("pool_relu_no_sentinel", "portable_cnn/kernels/numpy/pool.py",
           "    np.multiply(argmax, passes, out=argmax)\n", "", (P, "tests/test_nn.py"),
           "NumPy max_pool2d_relu: the argmax keeps its tap where the ReLU stops, so the gradient leaks"),
    Mutant("pool_relu_cuda_sentinel", "portable_cnn/kernels/cupy/cuda/pool.cu",
           "            best_k = -1;", "            best_k = 0;", (K,),
           "CUDA max_pool2d_forward with relu: a stopped window's gradient goes to its first tap"),
    Mutant("sequential_fuses_without_the_relu", "portable_cnn/nn.py",
           "x = layers[i + 1]._fused(layer.forward(x, relu=True))", "x = layers[i + 1]._fused(layer.forward(x))",
           ("tests/test_nn.py",), "nn.Sequential: a fused pair pools but never applies the ReLU"),
    # ------------------------------------------------------------------ the ReLU fused into a convolution (issue 15)
    Mutant("conv_relu_mask_at_zero", "portable_cnn/kernels/numpy/conv.py",
           "yt[i:j].reshape(rows, K) > 0, out=masked_rows", "yt[i:j].reshape(rows, K) >= 0, out=masked_rows", (C,),
           "NumPy conv backward with a fused ReLU: the gradient passes where the output is 0"),
    Mutant("conv_relu_dy_not_padded", "portable_cnn/kernels/numpy/conv.py",
           "                    dypad[i:j, pa : pa + P, pb : pb + Q, :] = dy2.reshape(j - i, P, Q, K)\n",
           "                    pass\n", (C,),
           "NumPy conv backward with a fused ReLU: the masked dy never reaches the buffer dx convolves"),
    Mutant("conv_relu_cuda_drops_the_bias", "portable_cnn/kernels/cupy/elementwise.py",
           "const T v = y + bias;", "const T v = y;", (K,),
           "CUDA bias_relu: the ReLU without the bias"),
    Mutant("conv_layer_forgets_its_relu", "portable_cnn/nn.py",
           "        self._cache = (x, None, relu_output)\n", "        self._cache = (x, None, None)\n",
           ("tests/test_nn.py",), "a conv layer's second backward of a fused forward skips the ReLU's mask"),
    # ------------------------------------------------------------------ the blind spots
    Mutant("sliced_backward_last_slice_only", "portable_cnn/kernels/reference/conv.py",
           "dweight = dw_i if dweight is None else dweight + dw_i", "dweight = dw_i", (C,),
           "reference conv under the workspace limit: only the last slice's weight gradient kept"),
    Mutant("conv_threads_drop_a_part", "portable_cnn/kernels/numpy/conv.py",
           "    for slot in partial_dw:\n        dw3 += partial_dw[slot]",
           "    for slot in partial_dw:\n        dw3 += partial_dw[slot] * (slot != 1)", (PA, C),
           "NumPy conv backward: the second thread's partial weight gradient dropped"),
    Mutant("linear_threads_drop_parts", "portable_cnn/kernels/numpy/linear.py",
           "for dw_part, db_part in partial.values():", "for dw_part, db_part in list(partial.values())[1:]:",
           (PA, EL), "NumPy linear backward: only two threads' partial gradients added"),
    Mutant("max_pool_int8_argmax", "portable_cnn/kernels/numpy/pool.py",
           "index_dtype = np.int8 if g.taps <= 127 else np.int64",
           "index_dtype = np.int8 if g.taps <= 255 else np.int64", (P,),
           "NumPy max pooling: an int8 argmax for windows of up to 255 taps"),
    Mutant("train_loss_ignores_batch_sizes", "portable_cnn/train.py",
           "self._sums[0] += float(np.dot(host[0].astype(np.float64), sizes))",
           "self._sums[0] += float(host[0].astype(np.float64).mean() * sizes.sum())", (TR,),
           "epoch train_loss: a mean of batch means, whatever the batch sizes"),
    Mutant("resume_forgets_epoch_sums", "portable_cnn/train.py",
           "sums = ckpt.epoch_sums if self.batch_in_epoch else {}", "sums = {}", (TR,),
           "resumed epoch: the sums of the batches before the interruption forgotten"),
    Mutant("split_smallest_remainders", "portable_cnn/data.py",
           'order = np.argsort(-(quota - take), kind="stable")', 'order = np.argsort(quota - take, kind="stable")',
           (DA,), "stratified split: the spare test samples go to the smallest remainders"),
    # ------------------------------------------------------------------ reference and NumPy kernels
    Mutant("relu_backward_at_zero", "portable_cnn/kernels/numpy/activation.py",
           "np.multiply(dy, x > 0, out=out)", "np.multiply(dy, x >= 0, out=out)", (EL, D),
           "NumPy ReLU backward: gradient 1 at x == 0"),
    Mutant("log_softmax_backward_uses_log", "portable_cnn/kernels/reference/softmax.py",
           "return dy - xp.exp(y) * xp.sum(dy, axis=axis, keepdims=True)",
           "return dy - y * xp.sum(dy, axis=axis, keepdims=True)", (EL,),
           "log-softmax backward: log-probabilities where probabilities belong"),
    Mutant("log_softmax_unshifted", "portable_cnn/kernels/reference/softmax.py",
           "    return shifted - xp.log(xp.sum(xp.exp(shifted), axis=axis, keepdims=True))",
           "    return x - xp.log(xp.sum(xp.exp(x), axis=axis, keepdims=True))", (EL,),
           "log-softmax without subtracting the maximum (overflows for large logits)"),
    Mutant("cross_entropy_counts_ignored", "portable_cnn/kernels/reference/softmax.py",
           "counted = xp.astype((labels != ignore_index) & (labels >= 0) & (labels < K), logits.dtype)",
           "counted = xp.astype((labels >= 0) & (labels < K), logits.dtype)", (EL,),
           "cross-entropy: ignore_index labels counted"),
    Mutant("batch_norm_biased_running_var", "portable_cnn/kernels/reference/norm.py",
           "momentum * (var * (M / (M - 1)))", "momentum * var", (NN,),
           "BatchNorm: the biased variance kept as the running variance"),
    Mutant("batch_norm_backward_mean_term", "portable_cnn/kernels/reference/norm.py",
           "g = g - _per_channel(xp, g_mean, ndim) - xhat * _per_channel(xp, gx_mean, ndim)",
           "g = g - xhat * _per_channel(xp, gx_mean, ndim)", (NN,),
           "BatchNorm backward: the gradient of the mean left out"),
    Mutant("dropout_scale", "portable_cnn/kernels/reference/dropout.py",
           "* (1.0 / (1.0 - p)))", "* (1.0 - p))", (NN,), "dropout: kept values scaled by 1 - p, not 1 / (1 - p)"),
    Mutant("dropout_in_evaluation", "portable_cnn/nn.py",
           "if not self.training or self.p == 0.0:", "if self.p == 0.0:", (NN,),
           "Dropout drops in evaluation mode too"),
    Mutant("linear_bias_gradient_mean", "portable_cnn/kernels/reference/linear.py",
           "dbias = xp.sum(dy, axis=0) if has_bias else None", "dbias = xp.mean(dy, axis=0) if has_bias else None",
           (EL,), "linear: the bias gradient averaged over the batch"),
    Mutant("out_size_off_by_one", "portable_cnn/geometry.py",
           "return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1",
           "return (size + 2 * padding - dilation * (kernel - 1)) // stride + 1", (C,),
           "output size: one too many where the stride divides exactly"),
    Mutant("conv_dx_as_convolution_wide_padding", "portable_cnn/kernels/numpy/conv.py",
           "as_convolution = u == 1 and v == 1 and a <= dh * (R - 1) and",
           "as_convolution = u == 1 and v == 1 and a <= dh * R and", (C, D),
           "NumPy conv: dx as a convolution of dy also for padding wider than the kernel"),
    Mutant("max_pool_last_maximum", "portable_cnn/kernels/numpy/pool.py",
           "np.multiply(tap > best[lo:hi], k, dtype=index_dtype)", "np.multiply(tap >= best[lo:hi], k, dtype=index_dtype)",
           (P,), "NumPy max pooling: the last maximum of a window wins ties"),
    Mutant("pool_windows_disjoint_any_axis", "portable_cnn/kernels/numpy/pool.py",
           "return g.u >= g.dh * (g.R - 1) + 1 and g.v >= g.dw * (g.S - 1) + 1",
           "return g.u >= g.dh * (g.R - 1) + 1 or g.v >= g.dw * (g.S - 1) + 1", (P,),
           "NumPy pooling backward: windows overlapping along one axis written over, not added"),
    # ------------------------------------------------------------------ optimizers and schedules
    Mutant("sgd_weight_decay_sign", "portable_cnn/kernels/reference/optim.py",
           "    if weight_decay != 0:\n        grad = grad + weight_decay * param\n    if momentum != 0:",
           "    if weight_decay != 0:\n        grad = grad - weight_decay * param\n    if momentum != 0:", (OP,),
           "SGD: weight decay with the wrong sign"),
    Mutant("sgd_dampening", "portable_cnn/kernels/reference/optim.py",
           "buf = momentum * buf + (1 - dampening) * grad", "buf = momentum * buf + dampening * grad", (OP,),
           "SGD: dampening where 1 - dampening belongs"),
    Mutant("adam_no_second_bias_correction", "portable_cnn/kernels/reference/optim.py",
           "denom = xp.sqrt(exp_avg_sq) / math.sqrt(bias_correction2) + eps", "denom = xp.sqrt(exp_avg_sq) + eps",
           (OP,), "Adam: the second moment's bias correction left out"),
    Mutant("cosine_one_epoch_ahead", "portable_cnn/optim.py",
           "(1 + math.cos(math.pi * epoch / self.T_max)) / 2", "(1 + math.cos(math.pi * (epoch + 1) / self.T_max)) / 2",
           (OP, TR), "cosine schedule: one epoch ahead"),
    Mutant("step_lr_fractional", "portable_cnn/optim.py",
           "self.base_lr * self.gamma ** (epoch // self.step_size)",
           "self.base_lr * self.gamma ** (epoch / self.step_size)", (OP,),
           "StepLR: decays every epoch by a fraction of gamma"),
    # ------------------------------------------------------------------ data, training loop, checkpoints
    Mutant("normalize_with_test_statistics", "portable_cnn/data.py",
           "mean = ds.x_train.mean(axis=(0, 2, 3), dtype=np.float64)",
           "mean = np.concatenate([ds.x_train, ds.x_test]).mean(axis=(0, 2, 3), dtype=np.float64)", (DA,),
           "normalisation: the mean taken over train and test"),
    Mutant("normalize_zero_std", "portable_cnn/data.py",
           "std = np.where(std > 0, std, 1.0)", "std = np.where(std >= 0, std, 1.0)", (DA,),
           "normalisation: a constant channel divided by 0"),
    Mutant("evaluate_loss_per_batch", "portable_cnn/train.py",
           "batch_loss = loss * float(len(yb))", "batch_loss = loss", (TR,),
           "evaluate: the loss summed per batch, divided per sample"),
    Mutant("resume_reruns_the_epoch", "portable_cnn/train.py",
           "for xb, yb, total in islice(batches, skip, None):", "for xb, yb, total in islice(batches, 0, None):", (TR,),
           "resume inside an epoch: its batches run again"),
    Mutant("resume_forgets_shuffle_state", "portable_cnn/train.py",
           '            self.shuffle_rng.bit_generator.state = rng["shuffle"]', "            pass", (TR,),
           "resume: the shuffling generator starts over"),
    Mutant("labels_check_off_by_one", "portable_cnn/train.py",
           "int(y.max()) >= num_classes", "int(y.max()) > num_classes", (TR,),
           "label check: the label num_classes let through"),
    Mutant("checkpoint_optimizer_not_loaded", "portable_cnn/checkpoint.py",
           "                optimizer.load_state_dict(self.optimizer_state)", "                pass", (CK, TR),
           "checkpoint: the optimizer's state (momentum) not restored"),
)


def tree_files() -> list[str]:
    """The working tree's files as git sees them: tracked, and untracked but not ignored."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                            check=True, capture_output=True).stdout.decode().split("\0")
    return sorted({f for f in listed if f and (ROOT / f).is_file()})


def copy_tree(files: list[str], target: Path) -> None:
    for name in files:
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target / name)


def stale(mutant: Mutant) -> str | None:
    """Why ``mutant`` cannot be planted in the current code, or None."""
    count = (ROOT / mutant.path).read_text().count(mutant.old)
    return None if count == 1 else f"snippet found {count} times in {mutant.path}"


def _environment(copy: Path) -> dict:
    """The copy's package first on the path (before an editable install of the working tree)."""
    return dict(os.environ, PYTHONPATH=str(copy), PYTHONDONTWRITEBYTECODE="1")


def failing_already(copy: Path) -> list[str]:
    """pytest options leaving out what fails in the unmutated ``copy``: ``--deselect`` a test, ``--ignore`` a file."""
    subprocess.run([sys.executable, "-m", "pytest", "-q", "--cache-clear"], cwd=copy, env=_environment(copy),
                   capture_output=True, timeout=TIMEOUT_S)
    lastfailed = copy / ".pytest_cache" / "v" / "cache" / "lastfailed"
    failed = json.loads(lastfailed.read_text()) if lastfailed.exists() else {}
    shutil.rmtree(copy / ".pytest_cache", ignore_errors=True)
    return [f"--deselect={node}" if "::" in node else f"--ignore={node}" for node in sorted(failed)]


def pytest_fails(copy: Path, args: list[str]) -> tuple[bool, str]:
    """Run pytest in ``copy``: ``(failed, last lines)``; exit code 1 (failures) or 2 (collection errors) is a failure."""
    env = _environment(copy)
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *args]
    try:
        result = subprocess.run(command, cwd=copy, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return True, f"timed out after {TIMEOUT_S} s"
    lines = (result.stdout + result.stderr).strip().splitlines()
    summary = next((line for line in reversed(lines) if line.startswith(("FAILED", "ERROR"))), lines[-1] if lines else "")
    if result.returncode not in (0, 1, 2):
        raise RuntimeError(f"pytest exited with {result.returncode} on {args}: {summary}")
    return result.returncode != 0, summary


def run_mutant(mutant: Mutant, copy: Path, left_out: list[str]) -> dict:
    """Plant ``mutant`` in ``copy``, run its tests, then the suite if they pass; put the file back."""
    start = time.perf_counter()
    target = copy / mutant.path
    original = target.read_text()
    target.write_text(original.replace(mutant.old, mutant.new))
    try:
        failed, summary = pytest_fails(copy, [*left_out, *mutant.tests])
        by = "its tests"
        if not failed:
            failed, summary = pytest_fails(copy, left_out)
            by = "the suite"
    finally:
        target.write_text(original)
    return {"name": mutant.name, "killed": failed, "by": by, "summary": summary,
            "seconds": time.perf_counter() - start, "what": mutant.what}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1, help="mutants run at once (default 1)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run these mutants only")
    parser.add_argument("--check", action="store_true", help="only check that every mutant applies")
    args = parser.parse_args(argv)
    names = [m.name for m in MUTANTS]
    assert len(set(names)) == len(names), "mutant names must be unique"
    chosen = [m for m in MUTANTS if not args.only or m.name in args.only]
    unknown = set(args.only or ()) - set(names)
    if unknown:
        parser.error(f"unknown mutants: {sorted(unknown)}")
    problems = {m.name: why for m in chosen if (why := stale(m))}
    for name, why in problems.items():
        print(f"STALE    {name}: {why}")
    if args.check:
        print(f"{len(chosen) - len(problems)} of {len(chosen)} mutants apply")
        return 1 if problems else 0
    runnable = [m for m in chosen if m.name not in problems]
    files = tree_files()
    with tempfile.TemporaryDirectory(prefix="portable_cnn_mutants_") as tmp:
        copies = []
        for k in range(max(1, args.jobs)):
            copy = Path(tmp) / f"tree{k}"
            copy_tree(files, copy)
            copies.append(copy)
        free = list(copies)
        left_out = failing_already(copies[0])
        print(f"left out, failing without a mutant: {left_out or 'none'}", flush=True)

        def work(mutant):
            copy = free.pop()
            try:
                result = run_mutant(mutant, copy, left_out)
            finally:
                free.append(copy)
            status = f"killed by {result['by']}" if result["killed"] else "SURVIVED"
            print(f"{status:22} {result['name']:40} {result['seconds']:6.1f} s  {result['summary'][:100]}", flush=True)
            return result

        with ThreadPoolExecutor(max_workers=len(copies)) as pool:
            results = list(pool.map(work, runnable))
    killed = sum(r["killed"] for r in results)
    print(f"\nscore: {killed} of {len(results)} mutants killed"
          + (f" ({len(problems)} stale, not run)" if problems else ""))
    for r in results:
        if not r["killed"]:
            print(f"  survived: {r['name']}: {r['what']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
