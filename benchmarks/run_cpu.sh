#!/usr/bin/env bash
# The CPU benchmark as docs/benchmarks.md reports it: NumPy and our code on
# PyTorch tensors beside native PyTorch, float32, default batch sizes.
#
#   bash benchmarks/run_cpu.sh                       # default run
#   bash benchmarks/run_cpu.sh --nets lenet --quick  # any `portable-cnn bench` option
#   PYTHON=/path/to/python bash benchmarks/run_cpu.sh
#
# Results go to bench-results/cpu.json and bench-results/cpu.png unless
# --json/--plot say otherwise.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

# Some machines set these for other software; they make current NumPy's
# OpenBLAS pick a slower kernel or blocking. Unset for this run only.
unset OPENBLAS_CORETYPE OPENBLAS_L2_SIZE
# Hide any GPU so the default backend list is the CPU one (numpy, torch).
export CUDA_VISIBLE_DEVICES=""

PYTHON="${PYTHON:-python3}"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m portable_cnn.bench --json bench-results/cpu.json --plot bench-results/cpu.png "$@"
