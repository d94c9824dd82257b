#!/usr/bin/env bash
# The test suite on a fresh machine: set up the venv (tools/setup_env.sh: Python 3.12 and
# megatron-core 0.19.2 where Python 3.12 exists, else Python 3.11 and megatron-core 0.16.1;
# PYTHON and VENV choose), then pytest (extra arguments go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
exec "${VENV:-.venv}/bin/python" -m pytest -q "$@"
