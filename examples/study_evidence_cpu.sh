#!/usr/bin/env bash
# The evidence study (issue 22), held-out protocol: a narrow, long-horizon GPT (the narrow-cpu preset:
# 12 layers, hidden 64, 32 x 128 tokens a step, 3000 steps), where depth pays. Every method, the dense
# 6- and 9-layer models trained for all 3000 steps (they spend 0.5 and 0.75 of the full model's layer
# FLOPs, as auto:0.5 and auto:0.75 do) is trained at LRs 1e-3, 2e-3 and 4e-3 (spaced 2x) on selection
# seeds 1 2; each method's LR, and the best dense model for each compute, are chosen there by the final
# loss on valid.jsonl. Then every method, and the FLOPs frontier (auto:F at RaPTr's chosen LR, gradual
# stacking at F at stacking's), runs at its LR on report seeds 21 22 23, which no choice has used, and is
# reported on the held-out set: 3% of the training documents, carved out of training (tools/study.py
# --heldout-fraction). F = 0.4 is below what auto:F can spend on 12 layers (0.444), so the frontier
# starts at 0.45.
#
# In progress. 87 runs (7 methods x 3 LRs x 2 selection seeds, then 15 x 3 report seeds), about 62
# full-model runs' worth of compute; a full-model run takes 36 minutes beside another (0.72 s a step,
# measured), so about 20 hours with --jobs 2. The study is resumable: rerun the same command (in this or
# a later session) and it skips finished runs and resumes interrupted ones. Outputs:
# OUTPUT_DIR/results.{json,md}, frontier.png and the loss plots, copied to examples/study_evidence/.
# Until it is done, --progress trains nothing and writes OUTPUT_DIR/progress.{json,md}, the runs
# finished so far, copied there too (the README's depth check reads that progress.json).
#
#   bash examples/study_evidence_cpu.sh [OUTPUT_DIR] [--progress]     # default runs/study-evidence
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/study-evidence}
shift $(($# > 0))
bash tools/setup_env.sh
.venv/bin/python tools/study.py --preset narrow-cpu --output-dir "$OUT" --jobs 2 \
    --methods baseline raptr baseline-equal-flops stacking pld \
    --dense-depths 6 9 --frontier 0.45 0.5 0.6 0.75 \
    --lrs 1e-3 2e-3 4e-3 --selection-seeds 1 2 --report-seeds 21 22 23 "$@"
mkdir -p examples/study_evidence
if [[ " $* " == *" --progress "* ]]; then
    cp "$OUT/progress.json" "$OUT/progress.md" examples/study_evidence/
else
    cp "$OUT/results.json" "$OUT/results.md" "$OUT"/*.png examples/study_evidence/
fi
