#!/usr/bin/env bash
# RaPTr's default (auto:0.75, skipped layers taking no optimizer step) re-measured with each layer's
# own Adam step count, at Adam's beta2 0.95 and Megatron's default 0.999, on seeds 11-13 (never used
# to choose a default): against Adam-stepped skipped layers, skipped layers whose missed weight decay
# is caught up at their next update (--raptr-catch-up-weight-decay), the full model, and the full model
# trained on the same FLOPs (the raptr rows are the paper's 6-8-10-12 shape, whose FLOPs the
# equal-FLOPs baseline spends; auto:0.75 spends the same). 400 steps of the defaults-cpu model;
# about an hour on 2 cores. Copies results.{json,md} to examples/study_adam_steps/beta2-*/.
#
#   bash examples/study_adam_steps_cpu.sh [OUTPUT_DIR]     # default runs/study-adam-steps
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/study-adam-steps}
bash tools/setup_env.sh
for beta2 in 0.95 0.999; do
    .venv/bin/python tools/study.py --preset defaults-cpu --iters 400 --seeds 11 12 13 --adam-beta2 "$beta2" \
        --methods baseline raptr baseline-equal-flops --jobs 2 --no-source-eval --output-dir "$OUT/beta2-$beta2" \
        --variant "auto=--raptr-schedule auto:0.75" \
        --variant "auto-stepped=--raptr-schedule auto:0.75 --no-raptr-skip-optimizer-step" \
        --variant "auto-catch-up-decay=--raptr-schedule auto:0.75 --raptr-catch-up-weight-decay"
    mkdir -p "examples/study_adam_steps/beta2-$beta2"
    cp "$OUT/beta2-$beta2/results.json" "$OUT/beta2-$beta2/results.md" "examples/study_adam_steps/beta2-$beta2/"
done
