#!/usr/bin/env bash
# The short-budget regime of the evidence study (README "Results"), held-out protocol: the defaults-cpu
# model (12 layers, hidden 128, 8 x 128 tokens a step) for 400 steps, a setting where depth does not pay
# (a dense 6-layer model reaches a lower loss than the 12-layer one). Every method, and the dense 6- and
# 9-layer models, at LRs 1e-3, 2e-3 and 4e-3 on selection seed 1; each method's LR, and the best dense
# model for each compute, chosen there on valid.jsonl; then every method and the FLOPs frontier (auto:F at
# RaPTr's chosen LR, gradual stacking at F at stacking's) at its LR on report seeds 21 22, reported on
# the held-out set (3% of the training documents, carved out of training). 51 runs, about 75 minutes on
# 2 cores. Its results.{json,md} and plots are copied to examples/study_short_budget/.
#
#   bash examples/study_short_budget_cpu.sh [OUTPUT_DIR]     # default runs/study-short-budget
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/study-short-budget}
bash tools/setup_env.sh
.venv/bin/python tools/study.py --preset defaults-cpu --iters 400 --output-dir "$OUT" --jobs 2 \
    --no-source-eval --methods baseline raptr baseline-equal-flops stacking pld \
    --dense-depths 6 9 --frontier 0.45 0.5 0.6 0.75 \
    --lrs 1e-3 2e-3 4e-3 --selection-seeds 1 --report-seeds 21 22
mkdir -p examples/study_short_budget
cp "$OUT/results.json" "$OUT/results.md" "$OUT"/*.png examples/study_short_budget/
