#!/usr/bin/env bash
# Gradual stacking (Reddi et al. 2023) beside examples/gpt_8gpu.sh (RaPTr) and
# examples/baseline_gpt_8gpu.sh: the same model, data and flags, but the model grows
# 12 -> 18 -> 24 layers, each new block a copy of the top layers, and the learning rate
# re-warms after each growth.
#
#   bash examples/stacking_gpt_8gpu.sh [more pretrain_raptr.py flags]
#
# Environment: as examples/gpt_8gpu.sh, plus
#   STACKING_SCHEDULE   --stacking-schedule (default 12@0,18@0.33,24@0.67)
#   STAGE_WARMUP_ITERS  --raptr-stage-warmup-iters (default 500)
# RUN_NAME defaults to gpt_8gpu_stacking.
set -euo pipefail
RUN_NAME=${RUN_NAME:-gpt_8gpu_stacking} RAPTR_SCHEDULE="" \
    exec bash "$(dirname "$0")/gpt_8gpu.sh" --stacking-schedule "${STACKING_SCHEDULE:-12@0,18@0.33,24@0.67}" \
    --raptr-stage-warmup-iters "${STAGE_WARMUP_ITERS:-500}" "$@"
