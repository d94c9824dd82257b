#!/usr/bin/env bash
# RaPTr GPT pretraining on one node with 8 GPUs (bf16, distributed optimizer, overlapped
# gradient reduction).
#
#   bash examples/gpt_8gpu.sh [more pretrain_raptr.py flags]
#   MODEL=1.3b TP=2 DATA_PATH="0.7 data/a_text_document 0.3 data/b_text_document" \
#       TOKENIZER_MODEL=data/tokenizer/spm32000.model bash examples/gpt_8gpu.sh
#
# Environment (the model, data and training ones are described in examples/gpt_args.sh):
#   GPUS             processes on this node (default 8)
#   MODEL, RAPTR_SCHEDULE, TP, PP, SEQUENCE_PARALLEL, MBS, GBS, SEQ_LENGTH, TRAIN_ITERS,
#   LR, MIN_LR, DATA_PATH, SPLIT, TRAIN_DATA, VALID_DATA, TOKENIZER_MODEL
#   RUN_NAME         outputs in runs/RUN_NAME (default gpt_8gpu)
# examples/baseline_gpt_8gpu.sh runs the same without --raptr-schedule.
set -euo pipefail
cd "$(dirname "$0")/.."

RUN_NAME=${RUN_NAME:-gpt_8gpu}
# shellcheck source=examples/gpt_args.sh
source examples/gpt_args.sh

torchrun --standalone --nproc-per-node "${GPUS:-8}" pretrain_raptr.py "${GPT_ARGS[@]}" "$@"
