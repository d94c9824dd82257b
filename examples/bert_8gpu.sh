#!/usr/bin/env bash
# RaPTr BERT-base masked-LM pretraining on one node with 8 GPUs: the paper's headline setting
# (12 layers, hidden 768, 12 heads; path lengths 6-8-10-12 in four equal stages, the first and
# last layer always on the path: 0.75 of the layer FLOPs).
#
#   bash examples/bert_8gpu.sh [more pretrain_raptr.py flags]
#   SEQ_LENGTH=512 DATA_PATH="data/wiki_sentences_text_document" TOKENIZER_MODEL=data/tokenizer/spm32000.model \
#       bash examples/bert_8gpu.sh
#
# The data must be split into sentences (tools/preprocess_data.py --split-sentences).
# Environment:
#   GPUS             processes on this node (default 8)
#   RAPTR_SCHEDULE   --raptr-schedule (default 6@0,8@0.25,10@0.5,12@0.75); empty: the baseline
#   TP, PP           tensor / pipeline model-parallel sizes (default 1, 1)
#   MBS, GBS         micro / global batch size (default 32, 256)
#   SEQ_LENGTH       128 or 512 (default 128)
#   TRAIN_ITERS      default 100000
#   LR, MIN_LR       default 1e-4, 1e-5 (linear decay, 1% warm-up)
#   DATA_PATH        a Megatron blend of sentence-split data, cut by SPLIT (default 98,2,0); unset:
#   TRAIN_DATA, VALID_DATA  separate prefixes (default: the quickstart's corpus, 32k pieces, made by
#                    MODEL=bert PREPARE_ONLY=1 VOCAB_SIZE=32000 bash examples/quickstart_cpu.sh)
#   TOKENIZER_MODEL  SentencePiece model (default data/tokenizer/spm32000.model)
#   RUN_NAME         outputs in runs/RUN_NAME: ckpt/, metrics.jsonl, data_cache/ (default bert_8gpu)
# examples/baseline_bert_8gpu.sh runs the same without --raptr-schedule.
set -euo pipefail
cd "$(dirname "$0")/.."

RAPTR_SCHEDULE=${RAPTR_SCHEDULE-6@0,8@0.25,10@0.5,12@0.75}
SEQ_LENGTH=${SEQ_LENGTH:-128}
TRAIN_ITERS=${TRAIN_ITERS:-100000}
TOKENIZED=data/tokenized-spm32000-sentences
RUN_DIR=runs/${RUN_NAME:-bert_8gpu}

if [ -n "${DATA_PATH:-}" ]; then
    read -r -a blend <<< "$DATA_PATH"
    data=(--data-path "${blend[@]}" --split "${SPLIT:-98,2,0}")
else
    data=(--train-data-path "${TRAIN_DATA:-$TOKENIZED/train_text_document}"
          --valid-data-path "${VALID_DATA:-$TOKENIZED/valid_text_document}")
fi

args=(
    --model bert --num-layers 12 --hidden-size 768 --num-attention-heads 12
    --seq-length "$SEQ_LENGTH" --max-position-embeddings 512
    --mask-prob 0.15 --short-seq-prob 0.1
    --tensor-model-parallel-size "${TP:-1}" --pipeline-model-parallel-size "${PP:-1}"
    --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather --bf16
    --micro-batch-size "${MBS:-32}" --global-batch-size "${GBS:-256}" --train-iters "$TRAIN_ITERS"
    --lr "${LR:-1e-4}" --min-lr "${MIN_LR:-1e-5}" --lr-decay-style linear
    --lr-warmup-iters $((TRAIN_ITERS / 100)) --weight-decay 0.01 --clip-grad 1.0
    "${data[@]}" --data-cache-path "$RUN_DIR/data_cache"
    --tokenizer-type SentencePieceTokenizer
    --tokenizer-model "${TOKENIZER_MODEL:-data/tokenizer/spm32000.model}"
    --save "$RUN_DIR/ckpt" --load "$RUN_DIR/ckpt" --save-interval 5000
    --eval-interval 5000 --eval-iters 20 --log-interval 100
    --metrics-file "$RUN_DIR/metrics.jsonl"
)
if [ -n "$RAPTR_SCHEDULE" ]; then
    args+=(--raptr-schedule "$RAPTR_SCHEDULE" --raptr-verify-sync 1000)
fi

torchrun --standalone --nproc-per-node "${GPUS:-8}" pretrain_raptr.py "${args[@]}" "$@"
