"""Smoke tests of ``portable-cnn bench``: tiny runs that finish, check their results and write their outputs.

No test asserts a timing: the machine running CI is shared and slow. What is
checked is that every configuration is measured and checked against the
reference (native PyTorch where installed, our float64 NumPy code where not),
that a wrong result is caught, that the JSON, the PNG and the table appear,
that the optional extras (and the POSIX-only ``resource``) degrade with a
message, that the per-layer breakdown goes through ``nn.layer_hook`` without
touching the layers, and that the PyTorch mirror reproduces our models.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from portable_cnn import backend as B
from portable_cnn import bench, nn
from portable_cnn.bench import breakdown, protocol, report, torch_mirror

HAS_TORCH = importlib.util.find_spec("torch") is not None
ROOT = Path(bench.__file__).resolve().parents[2]
# One step per repeat, one repeat, no time for more: the smallest run that goes through every stage.
TINY = ["--repeats", "1", "--warmup", "1", "--repeat-seconds", "0.0001", "--max-seconds", "0", "--gap-seconds", "0", "--quiet"]


def _python(*arguments, cwd):
    """Run a fresh interpreter with ``arguments``, importing this checkout's portable_cnn."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, *arguments], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=120, check=False)


def _run(tmp_path, *options):
    json_path, plot_path = tmp_path / "out" / "bench.json", tmp_path / "out" / "bench.png"
    status = bench.main([*TINY, "--json", str(json_path), "--plot", str(plot_path), *options])
    return status, json_path, plot_path


def test_tiny_run_writes_json_plot_and_table(tmp_path, capsys):
    markdown = tmp_path / "out" / "table.md"
    status, json_path, plot_path = _run(tmp_path, "--nets", "lenet", "--batch-sizes", "4", "--markdown", str(markdown))
    out = capsys.readouterr().out
    assert status == 0, out
    data = json.loads(json_path.read_text())
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    expected = {"numpy"} | ({"torch", "pytorch-cpu"} if HAS_TORCH else set())
    results = data["results"]
    assert {r["backend"] for r in results} == expected
    assert {(r["mode"], r["batch_size"], r["net"]) for r in results} == {("train", 4, "lenet"), ("infer", 4, "lenet")}
    for r in results:
        assert r["repeats"] >= 1 and r["steps_per_repeat"] >= 1
        assert r["images_per_s"]["min"] <= r["images_per_s"]["median"] <= r["images_per_s"]["max"]
        assert r["images_per_s"]["min"] > 0
        assert r["check"]["ok"] and r["check"]["finite_every_repeat"], r
        assert r["peak_rss_mb_process"] > 0
        if r["reference"]:
            continue
        check = r["check"]
        assert check["against"] == ("pytorch-cpu" if HAS_TORCH else "numpy-float64")
        assert check["max_abs_diff"] <= 1e-4
        if r["mode"] == "train":
            # The first step's loss of a fresh 10-class net on random data is near log(10).
            assert check["first_value"] > 0
            assert check["first_value"] == pytest.approx(check["reference_value"], rel=1e-4, abs=1e-4)
        if HAS_TORCH:
            ratio = r["ratio_to_reference"]
            assert ratio["reference"] == "pytorch-cpu" and ratio["min"] <= ratio["median"] <= ratio["max"]
    # The memory column: tracemalloc's step peak for ours on NumPy, not measured for PyTorch on the CPU.
    for r in results:
        assert r["dtype"] == "float32" and r["device_peak_mb"] is None
        if r["backend"] == "numpy":
            assert r["traced_step_peak_mb"] > 0
        else:
            assert r["traced_step_peak_mb"] is None

    env = data["environment"]
    assert env["dtypes"] == ["float32"] and env["versions"]["numpy"] == np.__version__
    assert env["tf32"]["enabled"] is False
    assert env["references"] == (["pytorch-cpu"] if HAS_TORCH else [])
    if importlib.util.find_spec("threadpoolctl") is not None:
        assert any(row["user_api"] == "blas" for row in env["blas"])
        assert "threads" in out and "kernel" in out
    if HAS_TORCH:
        assert env["torch"]["num_threads"] >= 1 and "torch.set_num_threads left at default" in out
    # The table: a header and one row per measurement.
    assert "images/s" in out and "vs PyTorch" in out
    assert sum(line.startswith("lenet ") for line in out.splitlines()) == len(results)
    assert data["gpu_vs_cpu"] == {"speedups": [], "overtakes": []}
    table = markdown.read_text().splitlines()
    assert table[0].startswith("| net | mode | batch | dtype |") and len(table) == 2 + len(results)
    assert "| peak MiB (device / traced) |" in table[0] and "peak MiB (device / traced)" in out


def test_wrong_result_is_caught(tmp_path, capsys, monkeypatch):
    """A ReLU that is 1% off in float32 must fail the first-step check against the reference."""
    forward = nn.ReLU.forward

    def off_by_one_percent(self, x):
        y = forward(self, x)
        return y * 1.01 if B.dtype_name(y) == "float32" else y  # the float64 oracle stays right

    monkeypatch.setattr(nn.ReLU, "forward", off_by_one_percent)
    status, json_path, _ = _run(tmp_path, "--nets", "digits", "--batch-sizes", "8", "--backends", "numpy", "--plot", "")
    out = capsys.readouterr().out
    assert status == 1
    assert "CHECK FAILED" in out and "FAIL" in out
    numpy_rows = [r for r in json.loads(json_path.read_text())["results"] if r["backend"] == "numpy"]
    assert numpy_rows and all(not r["check"]["ok"] for r in numpy_rows)


def test_dtypes_option_takes_a_list_and_must_agree_with_dtype(capsys):
    parser = bench.cli.configure_parser(argparse.ArgumentParser())
    assert parser.parse_args([]).dtypes is None and parser.parse_args([]).dtype is None  # float32 alone, resolved later
    assert parser.parse_args(["--dtypes", "float32, float64"]).dtypes == ["float32", "float64"]
    with pytest.raises(SystemExit):
        parser.parse_args(["--dtypes", "float32,float16"])
    assert "unknown dtypes float16; choose from float32, float64" in capsys.readouterr().err

    status = bench.main([*TINY, "--dtype", "float64", "--dtypes", "float32,float64", "--json", "", "--plot", ""])
    assert status == 2
    assert capsys.readouterr().err == ("portable-cnn bench: --dtypes must equal --dtype (float64) when both are "
                                       "given, got float32,float64\n")


def test_two_dtypes_give_a_row_each_checked_in_their_own_dtype(tmp_path, capsys):
    markdown = tmp_path / "out" / "table.md"
    status, json_path, _ = _run(tmp_path, "--nets", "digits", "--batch-sizes", "4", "--backends", "numpy",
                                "--dtypes", "float32,float64", "--markdown", str(markdown), "--plot", "")
    out = capsys.readouterr().out
    assert status == 0, out
    data = json.loads(json_path.read_text())
    assert data["schema"] == "portable-cnn-bench/2" and data["environment"]["dtypes"] == ["float32", "float64"]
    results = data["results"]
    runners = {"numpy"} | ({"pytorch-cpu"} if HAS_TORCH else set())
    assert {(r["backend"], r["mode"], r["dtype"]) for r in results} == {
        (b, mode, dtype) for b in runners for mode in ("train", "infer") for dtype in ("float32", "float64")}
    for r in (r for r in results if r["backend"] == "numpy"):
        check = r["check"]
        assert check["ok"] and check["tolerance"] == protocol.CHECK_TOLERANCES[r["dtype"]], r
        assert r["traced_step_peak_mb"] > 0  # measured in training and in inference
        if r["dtype"] == "float64" and HAS_TORCH:
            # The reference ran in float64 too: a float32 PyTorch would differ by about 1e-7.
            assert check["against"] == "pytorch-cpu" and check["max_abs_diff"] < 1e-11, check
        elif r["dtype"] == "float64":
            assert check["against"] == "numpy-float64" and "only determinism" in check["note"]

    table = markdown.read_text().splitlines()
    assert table[0].startswith("| net | mode | batch | dtype | backend |") and len(table) == 2 + len(results)
    numpy_rows = [line for line in table[2:] if "| ours on numpy |" in line]
    assert {"| float32 |" in line for line in numpy_rows} == {True, False}
    assert all(line.split(" | ")[8].endswith(" traced") for line in numpy_rows)
    assert all(line.split(" | ")[8] == "-" for line in table[2:] if "native PyTorch" in line)
    assert sum(line.startswith("digits ") and " float64 " in line for line in out.splitlines()) == len(results) // 2


def test_float64_rows_are_held_to_the_float64_tolerance(tmp_path, capsys, monkeypatch, torch):
    """An error of 1e-6 relative passes float32's tolerance but not float64's, against PyTorch in float64."""
    forward = nn.ReLU.forward

    def off_in_float64(self, x):
        y = forward(self, x)
        return y * (1 + 1e-6) if B.dtype_name(y) == "float64" else y

    monkeypatch.setattr(nn.ReLU, "forward", off_in_float64)
    status, json_path, _ = _run(tmp_path, "--nets", "digits", "--batch-sizes", "4", "--backends", "numpy",
                                "--modes", "infer", "--dtypes", "float32,float64", "--plot", "")
    assert status == 1 and "CHECK FAILED: digits infer batch 4 float64 numpy" in capsys.readouterr().out
    checks = {r["dtype"]: r["check"]["ok"] for r in json.loads(json_path.read_text())["results"]
              if r["backend"] == "numpy"}
    assert checks == {"float32": True, "float64": False}


def test_without_torch_checks_against_float64_numpy(tmp_path):
    """A fresh interpreter where ``import torch`` fails, as on a machine without it."""
    json_path = tmp_path / "bench.json"
    script = (
        "import sys\n"
        "sys.modules['torch'] = None  # import torch now raises ImportError\n"
        "from portable_cnn import bench\n"
        f"status = bench.main({[*TINY, '--nets', 'digits', '--batch-sizes', '8', '--plot', '', '--json', str(json_path)]!r})\n"
        "assert 'torch' not in {k.split('.')[0] for k in sys.modules if sys.modules[k] is not None}\n"
        "sys.exit(status)\n"
    )
    result = _python("-c", script, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads(json_path.read_text())
    assert data["environment"]["backends"] == ["numpy"] and data["environment"]["references"] == []
    assert "torch" not in data["environment"]["versions"]
    assert "PyTorch not installed" in result.stdout
    for r in data["results"]:
        assert r["check"]["ok"] and r["check"]["against"] == "numpy-float64"
        assert "ratio_to_reference" not in r
    assert "n/a" in result.stdout


def test_optional_extras_missing_degrade_with_a_message(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import raises ImportError
    monkeypatch.setitem(sys.modules, "threadpoolctl", None)
    status, json_path, plot_path = _run(
        tmp_path, "--nets", "digits", "--batch-sizes", "8", "--backends", "numpy", "--no-reference", "--modes", "infer"
    )
    out = capsys.readouterr().out
    assert status == 0, out
    assert json_path.exists() and not plot_path.exists()
    assert "matplotlib not installed" in out and "threadpoolctl not installed" in out
    assert "portable-cnn[bench]" in out


def test_breakdown_splits_the_step_and_counts_conv_flops(tmp_path, capsys):
    status, json_path, _ = _run(
        tmp_path, "--nets", "digits", "--batch-sizes", "8", "--backends", "numpy", "--no-reference",
        "--modes", "train", "--breakdown", "--breakdown-steps", "1", "--plot", "",
    )
    out = capsys.readouterr().out
    assert status == 0, out
    (result,) = json.loads(json_path.read_text())["breakdown"]
    rows = {row["category"]: row for row in result["rows"]}
    for category in ("conv forward", "conv backward-data", "conv backward-weights", "pooling", "elementwise",
                     "linear", "loss", "optimizer"):
        assert category in rows and rows[category]["ms"] >= 0, category
    assert result["loss_finite"]
    # digits_net on 8 images of 1x8x8: conv 1->16 and conv 16->32, both 3x3 "same" on 8x8.
    conv_gflop = 2 * 8 * 8 * 8 * (16 * 1 * 9 + 32 * 16 * 9) / 1e9
    assert rows["conv forward"]["gflop"] == pytest.approx(conv_gflop)
    assert rows["conv backward-weights"]["gflop"] == pytest.approx(conv_gflop)
    assert rows["conv forward"]["gflop_per_s"] > 0
    assert sum(row["ms"] for row in result["rows"]) == pytest.approx(result["step_ms"])
    assert "breakdown: digits batch 8 on numpy" in out and "GFLOP/s" in out


def test_without_the_resource_module_the_peak_rss_is_reported_unknown(tmp_path, capsys, monkeypatch):
    """``resource`` is POSIX-only: where it is missing (Windows) the run goes on and says so."""
    monkeypatch.setitem(sys.modules, "resource", None)  # import raises ImportError
    status, json_path, _ = _run(
        tmp_path, "--nets", "digits", "--batch-sizes", "8", "--backends", "numpy", "--no-reference", "--modes", "infer",
        "--plot", "",
    )
    out = capsys.readouterr().out
    assert status == 0, out
    assert "process RSS not available on this platform" in out
    assert [r["peak_rss_mb_process"] for r in json.loads(json_path.read_text())["results"]] == [None]


def _nested_model() -> nn.Sequential:
    """A conv net for 1x8x8 input with nested containers, as composite models have; shapes for N images."""
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, rng=0), nn.ReLU()),  # (N, 4, 8, 8)
        nn.MaxPool2d(2),  # (N, 4, 4, 4)
        nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, rng=1), nn.BatchNorm2d(6), nn.Tanh()),  # (N, 6, 4, 4)
        nn.Flatten(),  # (N, 96)
        nn.Linear(96, 10, rng=2),
    )


def test_breakdown_times_the_leaves_through_the_layer_hook(monkeypatch):
    """The breakdown goes through ``nn.layer_hook``, reaches into nested containers and replaces no method."""
    installed = []
    layer_hook = nn.layer_hook

    def spy(hook):
        installed.append(hook)
        return layer_hook(hook)

    monkeypatch.setattr(nn, "layer_hook", spy)
    model = _nested_model()
    x, labels = protocol.make_batch("digits", 6, "float32", seed=0)
    result = breakdown.time_step_by_layer(model, x, labels, steps=1)

    assert installed, "the breakdown did not time the layers through nn.layer_hook"
    for name, module in model.named_modules():
        assert "forward" not in vars(module) and "backward" not in vars(module), f"{name!r} was patched"
    rows = {row["category"]: row for row in result["rows"]}
    assert {"conv forward", "conv backward-data", "conv backward-weights", "pooling", "elementwise", "batch norm",
            "linear", "loss", "optimizer"} <= set(rows)
    first_conv, second_conv = 2 * 6 * 8 * 8 * 4 * 1 * 9, 2 * 6 * 4 * 4 * 6 * 4 * 9  # 2 N P Q K C R S
    assert rows["conv forward"]["gflop"] == pytest.approx((first_conv + second_conv) / 1e9)
    assert rows["conv backward-weights"]["gflop"] == pytest.approx((first_conv + second_conv) / 1e9)
    # The first conv's input is the data: its backward computes no input gradient. (No GFLOP figure where
    # timing noise on these tiny GEMMs made the weights-only call the slower one and left the data part 0 ms.)
    if rows["conv backward-data"]["ms"] > 0:
        assert rows["conv backward-data"]["gflop"] == pytest.approx(second_conv / 1e9)
    assert rows["linear"]["gflop"] == pytest.approx(3 * 2 * 6 * 96 * 10 / 1e9)
    assert result["conv_backward_split"] and result["loss_finite"]
    assert sum(row["ms"] for row in result["rows"]) == pytest.approx(result["step_ms"])


# Uneven hyperparameters, each given to our constructor and to torch.nn's: the mirror reads our layer's
# attributes, so this is what catches a constructor that stores one argument under another's name.
MIRRORED_LAYERS = [
    ("Conv2d", (2, 3, (3, 2)), {"stride": (1, 2), "padding": (1, 0), "dilation": (2, 1)}),
    ("Conv2d", (2, 3, (1, 2)), {"bias": False}),
    ("Conv2d", (4, 6, 3), {"padding": 1, "groups": 2}),
    ("Conv2d", (4, 8, (3, 1)), {"stride": 2, "groups": 4, "bias": False}),  # depthwise, channel multiplier 2
    ("Linear", (5, 4), {}),
    ("Linear", (5, 4), {"bias": False}),
    ("MaxPool2d", ((3, 2),), {"stride": (1, 2), "padding": (1, 0), "dilation": (1, 1)}),
    ("MaxPool2d", ((3, 2),), {"stride": (2, 1), "padding": (0, 1), "dilation": (2, 1), "ceil_mode": True}),
    ("AvgPool2d", ((2, 1),), {"stride": (2, 3), "padding": (1, 0)}),
    ("AvgPool2d", ((3, 2),), {"stride": (2, 1), "padding": (1, 0), "ceil_mode": True, "count_include_pad": False,
                              "divisor_override": 5}),
    ("AdaptiveAvgPool2d", ((3, None),), {}),
    ("AdaptiveAvgPool2d", ((1, 1),), {}),
    ("BatchNorm2d", (6,), {"eps": 1e-3, "momentum": 0.2}),
    ("BatchNorm2d", (6,), {"momentum": None, "affine": False}),
    ("BatchNorm1d", (5,), {"eps": 1e-3, "momentum": 0.2}),
    ("BatchNorm1d", (5,), {"affine": False, "track_running_stats": False}),
    ("Identity", (), {}),
    ("Dropout", (0.3,), {}),
    ("ReLU", (), {}),
    ("Sigmoid", (), {}),
    ("Tanh", (), {}),
    ("Flatten", (), {}),
]


@pytest.mark.parametrize(("name", "args", "kwargs"), MIRRORED_LAYERS,
                         ids=[f"{name}-{i}" for i, (name, _, _) in enumerate(MIRRORED_LAYERS)])
def test_torch_mirror_of_a_layer_is_the_torch_layer_built_from_the_same_arguments(torch, name, args, kwargs):
    mirrored = torch_mirror.torch_layer(torch, getattr(nn, name)(*args, **kwargs))
    expected = getattr(torch.nn, name)(*args, **kwargs)
    assert repr(mirrored) == repr(expected)

    def hyperparameters(module):  # what the repr may leave out (AvgPool2d's shows neither ceil_mode nor the divisor)
        return {key: value for key, value in vars(module).items() if not key.startswith("_")}

    assert hyperparameters(mirrored) == hyperparameters(expected)


def test_torch_mirror_reproduces_a_nested_model(torch):
    """The mirror has our state_dict keys and, with our float64 weights and statistics, our logits."""
    model = _nested_model().to("numpy", "float64")
    x = np.random.default_rng(0).standard_normal((5, 1, 8, 8))
    model.forward(x)  # training mode: BatchNorm's running statistics move off their initial values
    mirror = torch_mirror.torch_model(torch, model, model.state_dict(), dtype="float64").eval()
    assert list(mirror.state_dict()) == list(model.state_dict())
    with torch.no_grad():
        expected = mirror(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(model.eval().forward(x), expected, rtol=1e-10, atol=1e-12)
    with pytest.raises(TypeError, match="no torch.nn equivalent"):
        torch_mirror.torch_layer(torch, nn.SoftmaxCrossEntropy())


def test_torch_mirror_reproduces_residual_blocks(torch):
    """A Residual mirrors to a torch module with children body and shortcut: our keys, and our logits in evaluation."""
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, rng=0),  # (N, 4, 8, 8)
        nn.Sequential(nn.Residual(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, rng=1), nn.BatchNorm2d(4))), nn.ReLU()),
        nn.Residual(nn.Conv2d(4, 6, 3, stride=2, padding=1, rng=2),
                    shortcut=nn.Sequential(nn.Conv2d(4, 6, 1, stride=2, bias=False, rng=3), nn.BatchNorm2d(6))),  # (N, 6, 4, 4)
        nn.Flatten(),  # (N, 96)
        nn.BatchNorm1d(96, momentum=None),
        nn.Linear(96, 10, rng=4),
    ).to("numpy", "float64")
    x = np.random.default_rng(0).standard_normal((5, 1, 8, 8))
    model.forward(x)  # training mode: the running statistics move off their initial values
    mirror = torch_mirror.torch_model(torch, model, model.state_dict(), dtype="float64").eval()
    assert list(mirror.state_dict()) == list(model.state_dict())
    assert "1.0.body.1.running_mean" in mirror.state_dict() and "2.shortcut.0.weight" in mirror.state_dict()
    assert isinstance(mirror[1][0].shortcut, torch.nn.Identity)
    with torch.no_grad():
        expected = mirror(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(model.eval().forward(x), expected, rtol=1e-10, atol=1e-12)


def test_stability_rule():
    assert not protocol.stable([1.0, 1.0], repeats=2, tol=0.02)  # fewer than 3 samples never counts as settled
    assert protocol.stable([1.0, 1.0, 1.0, 1.0], repeats=3, tol=0.02)
    assert not protocol.stable([1.0, 2.0, 3.0, 4.0], repeats=3, tol=0.02)
    assert not protocol.stable([1.0] * 5, repeats=7, tol=0.02)


def _record(net, mode, batch, backend, speedup=None, dtype="float32"):
    r = {"net": net, "mode": mode, "dtype": dtype, "batch_size": batch, "backend": backend}
    if speedup is not None:
        r["speedup_over_numpy"] = {"median": speedup, "min": speedup, "max": speedup}
    return r


def test_gpu_overtakes_cpu_is_the_first_batch_from_which_it_stays_ahead():
    records = []
    for batch, speedup in ((32, 0.5), (128, 1.5), (256, 0.9), (512, 3.0), (1024, 6.0)):
        records += [_record("lenet", "train", batch, "numpy"), _record("lenet", "train", batch, "cupy", speedup)]
    records += [_record("lenet", "infer", 32, "numpy"), _record("lenet", "infer", 32, "cupy", 0.4)]
    # float64 rows of the same configurations are compared among themselves.
    records += [_record("lenet", "train", 32, "numpy", dtype="float64"),
                _record("lenet", "train", 32, "cupy", 2.0, dtype="float64")]
    rows, overtakes = report.gpu_comparison(records)
    assert [row["batch_size"] for row in rows if row["mode"] == "train" and row["dtype"] == "float32"] == [
        32, 128, 256, 512, 1024]
    by_mode = {(o["mode"], o["dtype"]): o["gpu_overtakes_cpu_at_batch"] for o in overtakes}
    assert by_mode == {("train", "float32"): 512, ("infer", "float32"): None, ("train", "float64"): 32}


def test_add_bench_parser_registers_the_subcommand():
    parser = argparse.ArgumentParser(prog="portable-cnn")
    bench.add_bench_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "--nets", "vgg-small", "--batch-sizes", "16,64", "--tf32"])
    assert args.func is bench.run_bench
    assert args.nets == ["vgg-small"] and args.batch_sizes == [16, 64] and args.tf32
    assert args.repeats == 7 and args.json_path == "bench-results/bench.json"
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--nets", "resnet"])


def test_importing_the_package_loads_no_optional_module_and_help_works(tmp_path):
    """``import portable_cnn.bench`` touches neither PyTorch, CuPy, matplotlib nor the POSIX-only ``resource``."""
    script = (
        "import sys\n"
        "import portable_cnn.bench\n"
        "print(sorted({'torch', 'cupy', 'matplotlib', 'resource'} & set(sys.modules)))\n"
    )
    result = _python("-c", script, cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr
    for command in (["-m", "portable_cnn", "bench", "--help"], ["-m", "portable_cnn.bench", "--help"]):
        result = _python(*command, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert "--breakdown-backends" in result.stdout and "native PyTorch" in result.stdout


def test_unavailable_backend_is_a_clear_error_through_the_command(capsys, monkeypatch):
    from portable_cnn import cli

    monkeypatch.setattr(B, "cupy_status", lambda: (False, "no CUDA device visible"))
    assert cli.main(["bench", *TINY, "--backends", "cupy", "--json", "", "--plot", ""]) == 2
    assert "backend 'cupy' cannot run here: no CUDA device visible" in capsys.readouterr().err


@pytest.mark.gpu
def test_cupy_against_numpy_and_cudnn(tmp_path, capsys):
    ok, why = B.cupy_status()
    if not ok:
        pytest.skip(f"CuPy backend unavailable: {why}")
    status, json_path, _ = _run(tmp_path, "--nets", "lenet", "--batch-sizes", "8,32", "--backends", "numpy,cupy")
    out = capsys.readouterr().out
    assert status == 0, out
    data = json.loads(json_path.read_text())
    cupy_rows = [r for r in data["results"] if r["backend"] == "cupy"]
    assert cupy_rows and all(r["check"]["ok"] and r["speedup_over_numpy"]["median"] > 0 for r in cupy_rows)
    assert all(r["device_peak_mb"] > 0 for r in cupy_rows)
    assert len(data["gpu_vs_cpu"]["speedups"]) == 4 and "GPU overtakes the CPU" in out
    assert data["environment"]["tf32"]["enabled"] is False
    if "pytorch-cuda" in data["environment"]["references"]:
        assert all(r["ratio_to_reference"]["reference"] == "pytorch-cuda" for r in cupy_rows)


def test_the_batchnorm_nets_are_measured_and_checked(tmp_path, capsys):
    """resnet20 and mobilenet-small: a training step checked against the reference; the breakdown files every leaf.

    (Inference in evaluation mode is checked against torch.nn in tests/test_models.py.)
    """
    status, json_path, _ = _run(tmp_path, "--nets", "resnet20,mobilenet-small", "--batch-sizes", "2", "--backends", "numpy",
                                "--modes", "train", "--plot", "", "--breakdown", "--breakdown-steps", "1")
    out = capsys.readouterr().out
    assert status == 0, out
    data = json.loads(json_path.read_text())
    nets = ("resnet20", "mobilenet-small")
    assert {r["net"] for r in data["results"]} == set(nets)
    assert all(r["check"]["ok"] for r in data["results"])
    for result in data["breakdown"]:
        rows = {row["category"] for row in result["rows"]}
        # Global average pooling is pooling, the identity shortcut elementwise: nothing falls into "other".
        assert {"conv backward-data", "batch norm", "pooling"} <= rows and "other" not in rows, result["net"]
    assert [result["net"] for result in data["breakdown"]] == list(nets)


def test_ab_steps_compares_a_revision_with_the_checkout(tmp_path):
    """benchmarks/ab_steps.py exports HEAD's package under another name and times both (a row, no figure checked)."""
    repo = Path(__file__).resolve().parent.parent
    if shutil.which("git") is None or subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"],
                                                     capture_output=True).returncode != 0:
        pytest.skip("no git checkout: benchmarks/ab_steps.py exports a revision with git archive")
    script = [sys.executable, str(repo / "benchmarks" / "ab_steps.py")]
    done = subprocess.run([*script, "--base", "HEAD", "--nets", "digits", "--batch-sizes", "2", "--rounds", "2",
                           "--steps", "1", "--threads", "1"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| digits | 2 |")]
    assert len(rows) == 1 and rows[0].endswith("| 2 x 1 |"), done.stdout
    bad = subprocess.run([*script, "--base", "no-such-revision"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--base 'no-such-revision'" in bad.stderr


def test_fresh_processes_times_each_runner_in_a_process_of_its_own(torch, tmp_path):
    """benchmarks/fresh_processes.py: a row per net, and our process never imports torch (no figure checked)."""
    repo = Path(__file__).resolve().parent.parent
    script = [sys.executable, str(repo / "benchmarks" / "fresh_processes.py")]
    done = subprocess.run([*script, "--nets", "digits", "--batch-size", "2", "--rounds", "2", "--steps", "1",
                           "--warmup", "0"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| digits |")]
    assert len(rows) == 1 and rows[0].count("x (") == 1, done.stdout
    ours = subprocess.run([*script, "--child", "ours", "--nets", "digits", "--batch-size", "2", "--steps", "1",
                           "--warmup", "0"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert ours.returncode == 0, ours.stderr
    assert '"torch_loaded": false' in ours.stdout
