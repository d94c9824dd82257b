#!/usr/bin/env bash
# RaPTr in Megatron-LM's own training loop: examples/pretrain_gpt_megatron_lm.py with
# Megatron-LM's flags (needs megatron-core 0.17+, i.e. Python 3.12: tools/setup_env.sh).
#
#   bash examples/megatron_lm_gpt.sh [more Megatron-LM or --raptr-* flags]
#
# Defaults: a tiny GPT on --mock-data, 20 iterations, path lengths 2 -> 4 of 4 layers, on the
# CPU (gloo) or one GPU per process (NCCL).
#
# Environment:
#   NPROC           processes (default 2)
#   RAPTR_SCHEDULE  --raptr-schedule (default 2@0,4@10); empty: the full-model baseline
#   RUN_DIR         metrics.jsonl and ckpt/ (saved and resumed) go here (default runs/megatron_lm)
set -euo pipefail
cd "$(dirname "$0")/.."

NPROC=${NPROC:-2}
RAPTR_SCHEDULE=${RAPTR_SCHEDULE-2@0,4@10}
RUN_DIR=${RUN_DIR:-runs/megatron_lm}

bash tools/setup_env.sh

args=(
    --num-layers 4 --hidden-size 64 --num-attention-heads 4 --seq-length 32 --max-position-embeddings 32
    --micro-batch-size 2 --global-batch-size 8 --train-iters 20
    --lr 1e-3 --lr-warmup-iters 2 --hidden-dropout 0 --attention-dropout 0
    --mock-data --tokenizer-type NullTokenizer --vocab-size 512 --num-workers 0
    --log-interval 5 --eval-interval 10 --eval-iters 1
    --save "$RUN_DIR/ckpt" --load "$RUN_DIR/ckpt" --save-interval 20
    --spec megatron_raptr.megatron_lm gpt_layer_spec
    --metrics-file "$RUN_DIR/metrics.jsonl"
)
if [ -n "$RAPTR_SCHEDULE" ]; then
    args+=(--raptr-schedule "$RAPTR_SCHEDULE" --raptr-sampling fixed-size --raptr-verify-sync 10)
fi
# NPROC processes share the cores.
threads=$(($(nproc) / NPROC))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((threads > 0 ? threads : 1))}
.venv/bin/python -m torch.distributed.run --standalone --nproc-per-node "$NPROC" \
    examples/pretrain_gpt_megatron_lm.py "${args[@]}" "$@"
