#!/usr/bin/env bash
# Download the wheels of benchmarks/gpu_wheels.txt into .whl/ (git-ignored),
# here, for the GPU machine, which has no network: CPython 3.12, x86-64 Linux,
# binary wheels only, no dependencies (the list names every one it needs).
#
#   bash benchmarks/fetch_gpu_wheels.sh            # PYTHON=... picks the pip
#
# Then carry .whl with the working tree (the device tool's `carry: [".whl"]`)
# and run benchmarks/gpu_check.sh there.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
PYTHON="${PYTHON:-python3}"
list="benchmarks/gpu_wheels.txt"

mapfile -t wanted < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' "$list" | grep -v '^$')
if [ "${#wanted[@]}" -eq 0 ]; then
    echo "fetch_gpu_wheels: $list names no wheels" >&2
    exit 1
fi
mkdir -p .whl
# One version of each package: two would stop the whole install there.
for spec in "${wanted[@]}"; do
    name="${spec%%==*}"
    stem="$(echo "$name" | tr '-' '_')"
    for old in .whl/"$stem"-*.whl; do
        [ -e "$old" ] || continue
        case "$(basename "$old")" in
            "$stem-${spec##*==}-"*) ;;
            *) echo "removing $old (not $spec)"; rm -f "$old" ;;
        esac
    done
done
"$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${wanted[@]}"

total_kb="$(du -sk .whl | cut -f1)"
wheels=(.whl/*.whl)
echo "fetch_gpu_wheels: .whl holds ${#wheels[@]} wheel(s), ${total_kb} KiB"
if [ "$total_kb" -gt $((40 * 1024)) ]; then
    echo "fetch_gpu_wheels: over the 40 MB budget for carried wheels" >&2
    exit 1
fi
