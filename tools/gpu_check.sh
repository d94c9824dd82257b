#!/usr/bin/env bash
# One command for a machine with one NVIDIA GPU, Python 3.12 and a CUDA build of torch, no
# internet needed: the suite's GPU tests, the skip benchmark in bf16 at a realistic size
# (path 12 of 24 layers, hidden 2048, sequence 2048), a short end-to-end run with a
# resume, and RaPTr in Megatron-LM's own loop where megatron-core 0.17+ is installed (its
# CUDA paths, which the CPU runs through the compat module); figures in DIR/gpu_check.json
# and DIR/gpu_check.txt. Without a GPU it says so and
# runs the same at a small size on the CPU. Under 8 minutes on an H100.
#
#   bash tools/gpu_check.sh --output-dir runs/gpu_check [--wheel-dir DIR] [--timeout-s N]
#
#   --timeout-s N    limit for the tests and for the benchmark, 2N for the end-to-end runs
#   --wheel-dir DIR  install megatron-core (and whatever else is there) from wheels in DIR,
#                    into a temporary directory, not into the Python environment
# Environment: PYTHON (default: .venv/bin/python when present, else python3)
set -euo pipefail
cd "$(dirname "$0")/.."
output_dir='' wheel_dir='' timeout_s=150
while [ $# -gt 0 ]; do
    case "$1" in
        --output-dir) output_dir=${2:?--output-dir needs a directory}; shift 2 ;;
        --wheel-dir) wheel_dir=${2:?--wheel-dir needs a directory}; shift 2 ;;
        --timeout-s) timeout_s=${2:?--timeout-s needs seconds}; shift 2 ;;
        *) echo "gpu_check.sh: unknown argument $1 (expected --output-dir DIR [--wheel-dir DIR] [--timeout-s N])" >&2
           exit 2 ;;
    esac
done
[ -n "$output_dir" ] || { echo "gpu_check.sh: --output-dir DIR is required" >&2; exit 2; }
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if [ -n "$wheel_dir" ]; then
    compgen -G "$wheel_dir/*.whl" >/dev/null || { echo "gpu_check.sh: no .whl files in --wheel-dir $wheel_dir" >&2; exit 2; }
    site=$(mktemp -d)
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check --target "$site" "$wheel_dir"/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
# The project itself runs from this checkout, installed or not.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" tools/gpu_check.py --output-dir "$output_dir" --timeout-s "$timeout_s"
