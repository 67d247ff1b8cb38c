#!/usr/bin/env bash
# shellcheck disable=SC2317  # the step functions run through run_step (timeout bash -c)
# The GPU check (issue 5): on a bare GPU machine with no network, from the
# repository root, in at most 8 minutes (GPU_CHECK_BUDGET):
#
#   1. install the carried wheels (.whl/, see benchmarks/gpu_wheels.txt) into
#      /tmp/site, and the project itself without network into /tmp/portable-cnn
#   2. print the versions and the GPU
#   3. the GPU tests: pytest -m gpu (tests/test_gpu.py)
#   4. the CuPy cases of the backend-parametrised suites (pytest -k cupy)
#   5. a training run and a checkpoint round trip through the CLI:
#      train on CuPy, evaluate the checkpoint on NumPy
#   6. where a CuPy convolution's time goes, part by part, at lenet's and
#      vgg-small's layer shapes (benchmarks/gpu_conv_parts.py)
#   7. portable-cnn bench --backends numpy,cupy: training images/s of lenet and
#      vgg-small at batch 1, 8, 32, 128 and 256, float32, TF32 off on both sides,
#      native PyTorch (cuDNN) on the GPU as the reference, and a per-layer
#      breakdown of the CuPy step
#   7b. issue 15: CuPy against cuDNN at batch 256 for every net, training and
#      inference, float32 and float64, with peak device memory; NumPy against
#      PyTorch on all of the machine's CPU cores (vgg-small and lenet, batch 256),
#      and, if time is left, those cores as 16 and as 4 MPI ranks
#   8. a short table last: the card, both ratios to PyTorch, the GPU-over-CPU
#      speed-up, issue 15's targets, the test counts and each step's status
#
# Here, where pip has network, once:   bash benchmarks/fetch_gpu_wheels.sh
# There:                               bash benchmarks/gpu_check.sh
#
# Results go to $OUT when it is set (the device tool returns it), else to
# bench-results/gpu/: gpu_check.log, pytest-gpu.xml, pytest-cupy.xml,
# bench.json, bench.md, bench.png, summary.md. PYTHON=... picks the
# interpreter (default python3, the one holding PyTorch and CuPy there).
# Every step runs under its own time limit; a failed step is reported and the
# next one still runs. The exit status is 0 only when every step passed.
set -uo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo" || exit 1
PYTHON="${PYTHON:-python3}"
out="${OUT:-$repo/bench-results/gpu}"
mkdir -p "$out"
site=/tmp/site
mpi_prefix=/tmp/mpi
install_dir=/tmp/portable-cnn
export PYTHONUNBUFFERED=1
# Our code from this clone first, then the carried wheels.
export PYTHONPATH="$repo:$site${PYTHONPATH:+:$PYTHONPATH}"
# CuPy reads this at its first float32 GEMM: TF32 off unless asked for.
export CUPY_TF32=0
# The GPU tests allocate little; the CPU side of the benchmark wants every core.
unset OPENBLAS_CORETYPE OPENBLAS_L2_SIZE

# Everything to the terminal and the log; at exit wait for tee, so the table is not cut off.
exec 3>&1 4>&2
exec > >(tee "$out/gpu_check.log") 2>&1
tee_pid=$!
finish() {
    exec 1>&3 2>&4
    wait "$tee_pid" 2>/dev/null || true
}
trap finish EXIT

declare -a step_names=() step_results=()
record() {  # record NAME EXIT_STATUS SECONDS
    local name="$1" rc="$2" seconds="$3" result
    case "$rc" in
        0) result="ok" ;;
        124 | 137) result="TIMED OUT" ;;
        *) result="FAILED (exit $rc)" ;;
    esac
    step_names+=("$name")
    step_results+=("$result, ${seconds}s")
    echo "== $name: $result (${seconds}s)"
}
# The whole script stays within this many seconds (the summary needs the last few).
budget="${GPU_CHECK_BUDGET:-470}"
run_step() {  # run_step NAME LIMIT_SECONDS COMMAND_OR_FUNCTION ARGS...
    local name="$1" limit="$2" start rc left
    shift 2
    left=$((budget - SECONDS - 20))
    if [ "$left" -lt 10 ]; then
        echo
        echo "== $name: skipped, the ${budget}s budget is spent"
        step_names+=("$name")
        step_results+=("SKIPPED (out of time), 0s")
        return 1
    fi
    [ "$limit" -gt "$left" ] && limit="$left"
    echo
    echo "== $name (limit ${limit}s): $*"
    start=$SECONDS
    # SIGINT first, so pytest and the benchmark still print what they have;
    # through bash -c so that the functions below (exported) run under the limit too.
    timeout --signal=INT --kill-after=15 "$limit" bash -c '"$@"' run_step "$@"
    rc=$?
    record "$name" "$rc" $((SECONDS - start))
    return "$rc"
}
export PYTHON site mpi_prefix install_dir out

# --- 1. carried wheels and the project ------------------------------------
install_wheels() {
    shopt -s nullglob
    local wheels=(.whl/*.whl)
    shopt -u nullglob
    if [ "${#wheels[@]}" -eq 0 ]; then
        echo "no wheels in .whl/: run 'bash benchmarks/fetch_gpu_wheels.sh' where pip has network, and carry .whl"
        return 1
    fi
    local spec name
    while read -r spec; do
        name="$(echo "${spec%%==*}" | tr '-' '_')"
        if ! ls .whl/"$name-${spec##*==}"-*.whl >/dev/null 2>&1; then
            echo "warning: .whl/ lacks $spec (benchmarks/gpu_wheels.txt)"
        fi
    done < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' benchmarks/gpu_wheels.txt | grep -v '^$')
    local mpi=() others=() wheel
    for wheel in "${wheels[@]}"; do
        case "$(basename "$wheel")" in
            mpi4py-* | mpich-*) mpi+=("$wheel") ;;
            *) others+=("$wheel") ;;
        esac
    done
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" "${others[@]}" || return 1
    # MPICH's wheel puts mpiexec in bin/ and libmpi in lib/ of the install
    # prefix, and pip's --target keeps no lib/: these two get a prefix of their own.
    if [ "${#mpi[@]}" -gt 0 ]; then
        rm -rf "$mpi_prefix"
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --prefix "$mpi_prefix" "${mpi[@]}"
    fi
}
install_project() {
    # Build from a copy, so the clone gets no build/ or egg-info; no network,
    # no build isolation: the image's setuptools builds it.
    local src=/tmp/portable-cnn-src
    rm -rf "$src" "$install_dir"
    mkdir -p "$src"
    cp -r pyproject.toml portable_cnn "$src"/
    [ -f README.md ] && cp README.md "$src"/
    "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir \
        --target "$install_dir" "$src" || return 1
    # The installed package imports and its console script answers (from /tmp, so the clone is not on the path).
    (cd /tmp && PYTHONPATH="$install_dir:$site" "$PYTHON" -c \
        "import portable_cnn; assert portable_cnn.__file__.startswith('$install_dir'), portable_cnn.__file__; print('installed portable_cnn', portable_cnn.__version__, 'at', portable_cnn.__file__)" \
        && PYTHONPATH="$install_dir:$site" "$install_dir/bin/portable-cnn" --version)
}
export -f install_wheels install_project
run_step "install carried wheels" 60 install_wheels
run_step "install the project (no network)" 60 install_project

# --- 2. versions and the GPU -------------------------------------------------
show_environment() {
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
    "$PYTHON" - <<'PY'
import importlib, platform, sys
print("python", platform.python_version(), sys.executable)
for name in ("numpy", "cupy", "torch", "array_api_compat", "array_api_strict", "safetensors", "pytest", "hypothesis", "sklearn"):
    try:
        module = importlib.import_module(name)
        print(f"{name:<18} {getattr(module, '__version__', '?'):<14} {getattr(module, '__file__', '')}")
    except Exception as exc:
        print(f"{name:<18} MISSING ({type(exc).__name__}: {exc})")
import cupy
from portable_cnn import backend
print("cupy_status:", backend.cupy_status())
print("CUDA runtime", cupy.cuda.runtime.runtimeGetVersion(), "driver", cupy.cuda.runtime.driverGetVersion())
props = cupy.cuda.runtime.getDeviceProperties(0)
print("device 0:", props["name"].decode() if isinstance(props["name"], bytes) else props["name"],
      f"compute capability {props['major']}.{props['minor']}, {props['multiProcessorCount']} SMs,",
      f"{props['totalGlobalMem'] / 2**30:.1f} GiB")
print("TF32 in CuPy float32 GEMMs:", backend.tf32_enabled())
import torch
print("torch CUDA", torch.version.cuda, "cuDNN", torch.backends.cudnn.version(), "device", torch.cuda.get_device_name(0))
PY
}
export -f show_environment
run_step "versions and GPU" 60 show_environment

# --- 3. and 4. tests ------------------------------------------------------------
run_step "GPU tests (pytest -m gpu)" 150 \
    "$PYTHON" -m pytest -q -ra -p no:cacheprovider --durations=10 -m gpu --junitxml="$out/pytest-gpu.xml" tests/test_gpu.py
run_step "CuPy cases of the other suites (pytest -k cupy)" 90 \
    "$PYTHON" -m pytest -q -ra -p no:cacheprovider -m "not gpu" -k cupy --junitxml="$out/pytest-cupy.xml" tests

# --- 5. the CLI on the GPU, the checkpoint back on the CPU ----------------------
cli_round_trip() {
    local ckpt=/tmp/gpu-check-digits.safetensors
    rm -f "$ckpt"
    "$PYTHON" -m portable_cnn train --backend cupy --epochs 3 --checkpoint "$ckpt" --log-every 20 || return 1
    "$PYTHON" -m portable_cnn eval --checkpoint "$ckpt" --backend numpy
}
export -f cli_round_trip
run_step "train on CuPy, evaluate the checkpoint on NumPy (CLI)" 60 cli_round_trip

# --- 6. and 7. the convolution's parts, the benchmark --------------------------------
run_step "convolution parts (benchmarks/gpu_conv_parts.py)" 60 "$PYTHON" benchmarks/gpu_conv_parts.py

rm -f "$out/bench.json"
run_step "benchmark: numpy vs cupy vs PyTorch cuDNN" 220 \
    "$PYTHON" -m portable_cnn bench --backends numpy,cupy --nets lenet,vgg-small --batch-sizes 1,8,32,128,256 \
    --modes train --dtype float32 --repeats 7 --warmup 2 --repeat-seconds 0.15 --max-seconds 8 \
    --breakdown --breakdown-backends cupy --breakdown-steps 5 \
    --json "$out/bench.json" --markdown "$out/bench.md" --plot "$out/bench.png"

# --- 7b. issue 15: GPU inference, float64 rows, device memory; the 16-core CPU --------
# CuPy against cuDNN at batch 256 for every net, training and inference, float32
# and float64, with the peak device memory of each runner (the table's memory
# column); then NumPy against PyTorch on this machine's CPU cores (vgg-small,
# batch 256: issue 15's 16-core target, >= 0.8x).
rm -f "$out/bench15.json" "$out/cpu16.json"
run_step "issue 15: cupy vs cuDNN, batch 256, train+infer, float32+float64, memory" 200 \
    "$PYTHON" -m portable_cnn bench --backends cupy --nets lenet,vgg-small,resnet20,mobilenet-small \
    --batch-sizes 256 --modes train,infer --dtypes float32,float64 --repeats 5 --warmup 2 --repeat-seconds 0.15 \
    --max-seconds 5 --json "$out/bench15.json" --markdown "$out/bench15.md"
# The same vgg-small training with at most 64 MB of columns per convolution: the
# forward then keeps no column matrix (531 MiB of them at batch 256, computed)
# and the backward unfolds again; device memory against speed.
rm -f "$out/workspace64.json"
run_step "issue 15: cupy vgg-small batch 256 with PORTABLE_CNN_WORKSPACE_MB=64" 60 \
    env PORTABLE_CNN_WORKSPACE_MB=64 "$PYTHON" -m portable_cnn bench --backends cupy --nets vgg-small \
    --batch-sizes 256 --modes train --repeats 5 --warmup 2 --repeat-seconds 0.15 --max-seconds 5 \
    --json "$out/workspace64.json"
# With a per-layer breakdown of the NumPy step on every core: where the 16-core
# gap lies (never profiled there yet).
run_step "issue 15: numpy vs PyTorch CPU on every core, vgg-small and lenet, batch 256" 150 \
    "$PYTHON" -m portable_cnn bench --backends numpy --nets vgg-small,lenet --batch-sizes 256 --modes train \
    --dtypes float32 --repeats 5 --warmup 1 --repeat-seconds 0.5 --max-seconds 30 \
    --breakdown --breakdown-backends numpy --breakdown-steps 3 \
    --json "$out/cpu16.json" --markdown "$out/cpu16.md"

# The same 16 cores as data-parallel processes (the carried mpi4py and MPICH
# wheels): on 2 cores, lenet trained 1.2-1.7x faster as two ranks of one
# thread than as one process of two (docs/distributed.md). vgg-small, global
# batch 256: one process of every thread, 16 ranks of one, 4 of 4, and PyTorch.
# Last, as it runs only if the budget has time left.
rm -f "$out/scaling16.md"
scaling16() {
    local packages
    packages="$(echo "$mpi_prefix"/lib/python3*/site-packages)"
    PATH="$mpi_prefix/bin:$PATH" LD_LIBRARY_PATH="$mpi_prefix/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
        PYTHONPATH="$packages:$PYTHONPATH" "$PYTHON" benchmarks/distributed_scaling.py --model vgg-small \
        --batch-size 256 --steps 5 --warmup 2 --repeats 2 --rank-layouts 16x1,4x4 | tee "$out/scaling16.md"
}
export -f scaling16
run_step "issue 15: the CPU cores as data-parallel MPI ranks, vgg-small batch 256" 120 scaling16

# --- 8. the short table, last -------------------------------------------------------
status_file="$(mktemp)"
for i in "${!step_names[@]}"; do
    printf '%s\t%s\n' "${step_names[$i]}" "${step_results[$i]}" >>"$status_file"
done
"$PYTHON" - "$out" "$status_file" <<'PY' | tee "$out/summary.md"
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path

out, status_file = Path(sys.argv[1]), Path(sys.argv[2])
print("# GPU check summary\n")
bench = out / "bench.json"
records, env = [], {}
if bench.exists():
    doc = json.loads(bench.read_text())
    records, env = doc["results"], doc["environment"]
    torch_env, versions = env.get("torch", {}), env.get("versions", {})
    print(f"card: {torch_env.get('cuda_device') or env.get('cupy', '?')}; cupy {versions.get('cupy', '?')}, "
          f"CUDA runtime {versions.get('cuda_runtime', '?')}, torch {versions.get('torch', '?')} "
          f"(cuDNN {torch_env.get('cudnn', '?')}); numpy {versions.get('numpy', '?')} on "
          f"{env.get('machine', {}).get('cpu', '?')}, {env.get('machine', {}).get('cpus_usable', '?')} CPUs")
    print(f"TF32: {'on' if env.get('tf32', {}).get('enabled') else 'off'} on both sides; float32 training step, "
          "SGD momentum 0.9; median images/s; ratios are medians of per-round ratios\n")
else:
    print("no benchmark results (bench.json missing)\n")

def find(net, batch, backend, mode="train", dtype="float32", rows=None):
    for r in records if rows is None else rows:
        if (r["net"], r["batch_size"], r["backend"], r["mode"], r.get("dtype", "float32")) == (net, batch, backend, mode, dtype):
            return r
    return None

if records:
    print("| net | batch | numpy img/s | cupy img/s | PyTorch cuDNN img/s | cupy / PyTorch | cupy / numpy | checks |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for net in dict.fromkeys(r["net"] for r in records):
        for batch in sorted({r["batch_size"] for r in records if r["net"] == net}):
            cpu, gpu, ref = find(net, batch, "numpy"), find(net, batch, "cupy"), find(net, batch, "pytorch-cuda")
            ips = lambda r: f"{r['images_per_s']['median']:,.0f}" if r else "-"
            ratio = f"{gpu['ratio_to_reference']['median']:.2f}x" if gpu and gpu.get("ratio_to_reference") else "-"
            speed = f"{gpu['speedup_over_numpy']['median']:.1f}x" if gpu and gpu.get("speedup_over_numpy") else "-"
            checks = "ok" if all(r["check"]["ok"] for r in (cpu, gpu, ref) if r) else "FAILED"
            print(f"| {net} | {batch} | {ips(cpu)} | {ips(gpu)} | {ips(ref)} | {ratio} | {speed} | {checks} |")
    print("\ntargets (float32 training, batch 256, TF32 off, this run):")
    for net, floor in (("vgg-small", 0.6), ("lenet", 0.6)):
        gpu = find(net, 256, "cupy")
        if gpu and gpu.get("ratio_to_reference"):
            value = gpu["ratio_to_reference"]["median"]
            print(f"  {net} cupy / PyTorch cuDNN: {value:.2f}x (target >= {floor}x: {'met' if value >= floor else 'NOT met'})")
        else:
            print(f"  {net} cupy / PyTorch cuDNN: not measured")
    gpu = find("vgg-small", 256, "cupy")
    if gpu and gpu.get("speedup_over_numpy"):
        value = gpu["speedup_over_numpy"]["median"]
        print(f"  vgg-small GPU over NumPy on this CPU: {value:.1f}x (should exceed 30x: {'yes' if value > 30 else 'NO'})")

# Issue 15: ratios >= 0.8x cuDNN and device memory <= 1.2x PyTorch's (float32 training, batch 256);
# every row of the wider run; NumPy against PyTorch on all CPU cores.
def load(name):
    path = out / name
    return json.loads(path.read_text())["results"] if path.exists() else []

wide, cpu16 = load("bench15.json"), load("cpu16.json")
if wide:
    print("\nissue 15, batch 256 (cupy / PyTorch cuDNN; peak device MiB, cupy / PyTorch):")
    print("| net | mode | dtype | cupy img/s | PyTorch img/s | ratio | cupy MiB | PyTorch MiB | memory ratio |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in wide:
        if r["backend"] != "cupy":
            continue
        ref = find(r["net"], 256, "pytorch-cuda", r["mode"], r["dtype"], rows=wide)
        mine, theirs = r.get("device_peak_mb"), ref.get("device_peak_mb") if ref else None
        ratio = f"{r['ratio_to_reference']['median']:.2f}x" if r.get("ratio_to_reference") else "-"
        mem = f"{mine / theirs:.2f}x" if mine and theirs else "-"
        print(f"| {r['net']} | {r['mode']} | {r['dtype']} | {r['images_per_s']['median']:,.0f} | "
              f"{ref['images_per_s']['median'] if ref else float('nan'):,.0f} | {ratio} | "
              f"{mine or float('nan'):,.0f} | {theirs or float('nan'):,.0f} | {mem} |")
    for net in ("vgg-small", "lenet"):
        r = find(net, 256, "cupy", rows=wide)
        ref = find(net, 256, "pytorch-cuda", rows=wide)
        if r and r.get("ratio_to_reference"):
            value = r["ratio_to_reference"]["median"]
            print(f"  {net} training: {value:.2f}x cuDNN (target >= 0.8x: {'met' if value >= 0.8 else 'NOT met'})")
        if r and ref and r.get("device_peak_mb") and ref.get("device_peak_mb"):
            value = r["device_peak_mb"] / ref["device_peak_mb"]
            print(f"  {net} device memory: {value:.2f}x PyTorch's (target <= 1.2x: {'met' if value <= 1.2 else 'NOT met'})")
small = find("vgg-small", 256, "cupy", rows=load("workspace64.json"))
default = find("vgg-small", 256, "cupy", rows=wide)
if small and default and small.get("device_peak_mb") and default.get("device_peak_mb"):
    print(f"  vgg-small cupy with 64 MB of columns a layer: {small['device_peak_mb']:,.0f} MiB against "
          f"{default['device_peak_mb']:,.0f}, {small['images_per_s']['median']:,.0f} against "
          f"{default['images_per_s']['median']:,.0f} images/s")
for net in ("vgg-small", "lenet"):
    r = find(net, 256, "numpy", rows=cpu16)
    if r and r.get("ratio_to_reference"):
        value = r["ratio_to_reference"]["median"]
        target = " (target >= 0.8x: " + ("met" if value >= 0.8 else "NOT met") + ")" if net == "vgg-small" else ""
        print(f"  {net} NumPy / PyTorch CPU, every core, batch 256: {value:.2f}x{target}")

scaling = out / "scaling16.md"
if scaling.exists() and "| native PyTorch" in scaling.read_text():
    print("\nthe CPU cores as data-parallel ranks (benchmarks/distributed_scaling.py, vgg-small, batch 256):")
    print(scaling.read_text().rstrip())

print("\ntests:")
not_run = []
for label, name in (("pytest -m gpu", "pytest-gpu.xml"), ("pytest -k cupy", "pytest-cupy.xml")):
    path = out / name
    if not path.exists():
        print(f"  {label}: no report")
        continue
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    root = ET.parse(path).getroot()
    for suite in ([root] if root.tag == "testsuite" else root.iter("testsuite")):
        for key in counts:
            counts[key] += int(suite.get(key, 0))
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    print(f"  {label}: {passed} passed, {counts['failures']} failed, {counts['errors']} errors, {counts['skipped']} skipped")
    if passed == 0 and label == "pytest -m gpu":
        not_run.append(label)

print("\nsteps:")
for line in status_file.read_text().splitlines():
    name, result = line.split("\t")
    print(f"  {name}: {result}")
if not_run:
    print(f"\nNOT A GPU RESULT: {', '.join(not_run)} ran no test (all skipped: no working CUDA device?)")
    sys.exit(3)
PY
summary_status="${PIPESTATUS[0]}"
rm -f "$status_file"

[ "$summary_status" -eq 0 ] || exit 1
for result in "${step_results[@]}"; do
    case "$result" in ok,*) ;; *) exit 1 ;; esac
done
exit 0
