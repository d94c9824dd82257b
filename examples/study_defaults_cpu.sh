#!/usr/bin/env bash
# RaPTr's defaults, chosen by measurement (README: "RaPTr's defaults"): the paper's schedule
# shape on a 12-layer GPT, one factor changed at a time, 3 seeds, budgets of 100 and 400
# steps, each run against the full model trained on the same FLOPs. About 2 hours on 2 cores.
#
#   bash examples/study_defaults_cpu.sh [OUTPUT_DIR]     # default runs/study-defaults
#
# The schedules spend 0.75 of full training's layer FLOPs (tools/study.py's raptr method:
# 6@0,8@0.25,10@0.5,12@0.75); the shape variants are growing_stages(12, 0.75, STAGES, FIRST)
# of megatron_raptr/schedule.py. The committed results (examples/study_defaults/) were measured when the
# default scaling was inverse-keep, so their `raptr` rows are the `scaling-inverse-keep` rows here;
# auto-skip-opt-step was measured afterwards (examples/study_defaults/skip_optimizer_step.md).
# The variants other than auto-skip-opt-step ran before --raptr-skip-optimizer-step existed (skipped
# layers then took Adam steps): they name --no-raptr-skip-optimizer-step, so they rerun as they were.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/study-defaults}
bash tools/setup_env.sh
exec .venv/bin/python tools/study.py --preset defaults-cpu --iters 100 400 \
    --methods baseline raptr baseline-equal-flops --jobs 2 --no-source-eval --output-dir "$OUT" \
    --variant "scaling-inverse-keep=--raptr-scaling inverse-keep --no-raptr-skip-optimizer-step" \
    --variant "scaling-none=--raptr-scaling none --no-raptr-skip-optimizer-step" \
    --variant "scaling-sqrt=--raptr-scaling inverse-sqrt-keep --no-raptr-skip-optimizer-step" \
    --variant "none-2stages=--raptr-scaling none --raptr-schedule 6@0,12@0.5000 --no-raptr-skip-optimizer-step" \
    --variant "none-7stages=--raptr-scaling none --raptr-schedule 6@0,7@0.1429,8@0.2857,9@0.4286,10@0.5714,11@0.7143,12@0.8571 --no-raptr-skip-optimizer-step" \
    --variant "none-fixed-first=--raptr-scaling none --raptr-schedule 2@0,5@0.1500,9@0.3000,12@0.4500 --no-raptr-skip-optimizer-step" \
    --variant "none-fixed-size=--raptr-scaling none --raptr-sampling fixed-size --no-raptr-skip-optimizer-step" \
    --variant "none-no-fixed=--raptr-scaling none --raptr-fixed-layers --no-raptr-skip-optimizer-step" \
    --variant "none-rewarm=--raptr-scaling none --raptr-stage-warmup-fraction 0.05 --no-raptr-skip-optimizer-step" \
    --variant "none-fixed-first-fixed-size=--raptr-scaling none --raptr-schedule 2@0,5@0.1500,9@0.3000,12@0.4500 --raptr-sampling fixed-size --no-raptr-skip-optimizer-step" \
    --variant "auto-skip-opt-step=--raptr-scaling none --raptr-schedule 2@0,5@0.1500,9@0.3000,12@0.4500 --raptr-skip-optimizer-step"
