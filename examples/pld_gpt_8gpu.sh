#!/usr/bin/env bash
# Progressive layer dropping (Zhang and He 2020) beside examples/gpt_8gpu.sh (RaPTr) and
# examples/baseline_gpt_8gpu.sh: the same model, data and flags; layers are dropped more
# often as training goes on, deeper ones more than shallower ones.
#
#   bash examples/pld_gpt_8gpu.sh [more pretrain_raptr.py flags]
#
# Environment: as examples/gpt_8gpu.sh, plus
#   PLD_THETA   --pld-theta, the final keep level (default 0.5)
#   PLD_GAMMA   --pld-gamma, its decay rate per iteration (default 0.001)
# RUN_NAME defaults to gpt_8gpu_pld.
set -euo pipefail
RUN_NAME=${RUN_NAME:-gpt_8gpu_pld} RAPTR_SCHEDULE="" \
    exec bash "$(dirname "$0")/gpt_8gpu.sh" --pld-theta "${PLD_THETA:-0.5}" --pld-gamma "${PLD_GAMMA:-0.001}" \
    --raptr-verify-sync 100 "$@"
