#!/usr/bin/env bash
# The WSD row of the evidence study (issue 22): the full model and RaPTr, both under Megatron-LM's
# warmup-stable-decay schedule (--lr-decay-style WSD: constant LR after warmup, linear decay over the
# last fifth of training), on the narrow-cpu preset and under the held-out protocol of
# examples/study_evidence_cpu.sh (LRs 1e-3 2e-3 4e-3 on selection seeds 1 2, reported on seeds 21 22 23
# and on held-out text). RaPTr's paths grow during the stable phase: its full model starts at 0.75 of
# training, the decay at 0.8.
#
# Not yet run. 18 runs (2 methods x 3 LRs x 2 selection seeds, then 2 x 3 report seeds), about 16
# full-model runs' worth of compute: about 5 hours with --jobs 2 on 2 CPU cores. Resumable like every
# study; its own output directory (a study refuses to reuse a cosine run as a WSD one).
#
#   bash examples/study_wsd_cpu.sh [OUTPUT_DIR]     # default runs/study-wsd
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/study-wsd}
bash tools/setup_env.sh
exec .venv/bin/python tools/study.py --preset narrow-cpu --lr-decay-style WSD --output-dir "$OUT" --jobs 2 \
    --methods baseline raptr --lrs 1e-3 2e-3 4e-3 --selection-seeds 1 2 --report-seeds 21 22 23
