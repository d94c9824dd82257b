#!/usr/bin/env bash
# The baseline of examples/gpt_8gpu.sh: the same model, data and flags, full model every step.
#
#   bash examples/baseline_gpt_8gpu.sh [more pretrain_raptr.py flags]
#
# Environment: as examples/gpt_8gpu.sh; RUN_NAME defaults to gpt_8gpu_baseline.
set -euo pipefail
RUN_NAME=${RUN_NAME:-gpt_8gpu_baseline} RAPTR_SCHEDULE="" \
    exec bash "$(dirname "$0")/gpt_8gpu.sh" "$@"
