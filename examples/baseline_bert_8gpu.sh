#!/usr/bin/env bash
# The baseline of examples/bert_8gpu.sh: the same BERT-base, data and flags, full model every step.
#
#   bash examples/baseline_bert_8gpu.sh [more pretrain_raptr.py flags]
#
# Environment: as examples/bert_8gpu.sh; RUN_NAME defaults to bert_8gpu_baseline.
set -euo pipefail
RUN_NAME=${RUN_NAME:-bert_8gpu_baseline} RAPTR_SCHEDULE="" \
    exec bash "$(dirname "$0")/bert_8gpu.sh" "$@"
