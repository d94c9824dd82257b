# shellcheck shell=bash
# GPT pretraining flags shared by the GPU examples (sourced, not run): fills the array GPT_ARGS
# from the environment. The scripts that source it document the variables:
#
#   MODEL            350m (24 layers, hidden 1024, 16 heads) or 1.3b (24 layers, hidden 2048,
#                    16 heads); default 350m
#   RAPTR_SCHEDULE   --raptr-schedule (default auto:0.75: 0.75 of the layer FLOPs in the shape
#                    the defaults study chose; the paper's UL2-style schedule is
#                    12@0,16@0.25,20@0.5,24@0.75); empty: the full-model baseline
#   TP, PP           tensor / pipeline model-parallel sizes (default 1, 1)
#   SEQUENCE_PARALLEL  1: --sequence-parallel (TP > 1)
#   MBS, GBS         micro / global batch size (default 4, 256)
#   SEQ_LENGTH       default 2048
#   TRAIN_ITERS      default 20000
#   LR, MIN_LR       default 3e-4, 3e-5 (cosine decay, 2000 warm-up iterations)
#   DATA_PATH        a Megatron blend, e.g. "0.7 wiki_text_document 0.3 books_text_document",
#                    cut by SPLIT (default 98,2,0); unset: TRAIN_DATA and VALID_DATA
#   TRAIN_DATA, VALID_DATA  separate train / validation prefixes (default: the quickstart's
#                    corpus tokenized with 32k pieces; make it with
#                    PREPARE_ONLY=1 VOCAB_SIZE=32000 bash examples/quickstart_cpu.sh)
#   TOKENIZER_MODEL  SentencePiece model (default data/tokenizer/spm32000.model)
#   RUN_NAME         outputs go to runs/RUN_NAME: ckpt/ (saved and resumed, and saved on
#                    SIGTERM), metrics.jsonl, data_cache/

case ${MODEL:=350m} in
    350m) model=(--num-layers 24 --hidden-size 1024 --num-attention-heads 16) ;;
    1.3b) model=(--num-layers 24 --hidden-size 2048 --num-attention-heads 16) ;;
    *) echo "MODEL must be 350m or 1.3b, got $MODEL" >&2; exit 1 ;;
esac
RAPTR_SCHEDULE=${RAPTR_SCHEDULE-auto:0.75}
TP=${TP:-1}
PP=${PP:-1}
SEQ_LENGTH=${SEQ_LENGTH:-2048}
TOKENIZED=data/tokenized-spm32000
RUN_DIR=runs/${RUN_NAME:?the sourcing script sets a default RUN_NAME}

if [ -n "${DATA_PATH:-}" ]; then
    read -r -a blend <<< "$DATA_PATH"
    data=(--data-path "${blend[@]}" --split "${SPLIT:-98,2,0}")
else
    data=(--train-data-path "${TRAIN_DATA:-$TOKENIZED/train_text_document}"
          --valid-data-path "${VALID_DATA:-$TOKENIZED/valid_text_document}")
fi

# Megatron-Core's tensor-parallel layers overlap their gradient all-reduce with compute only
# when the GPU runs one kernel queue in order.
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
GPT_ARGS=(
    "${model[@]}" --seq-length "$SEQ_LENGTH" --max-position-embeddings "$SEQ_LENGTH"
    --hidden-dropout 0 --attention-dropout 0 --init-method-std 0.02
    --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
    --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather --bf16
    --micro-batch-size "${MBS:-4}" --global-batch-size "${GBS:-256}"
    --train-iters "${TRAIN_ITERS:-20000}"
    --lr "${LR:-3e-4}" --min-lr "${MIN_LR:-3e-5}" --lr-decay-style cosine --lr-warmup-iters 2000
    --weight-decay 0.1 --adam-beta2 0.95 --clip-grad 1.0
    "${data[@]}" --data-cache-path "$RUN_DIR/data_cache"
    --tokenizer-type SentencePieceTokenizer
    --tokenizer-model "${TOKENIZER_MODEL:-data/tokenizer/spm32000.model}"
    --save "$RUN_DIR/ckpt" --load "$RUN_DIR/ckpt" --save-interval 1000 --exit-signal-handler
    --eval-interval 1000 --eval-iters 20 --log-interval 10
    --metrics-file "$RUN_DIR/metrics.jsonl"
)
if [ "${SEQUENCE_PARALLEL:-0}" = 1 ]; then
    GPT_ARGS+=(--sequence-parallel)
fi
if [ -n "$RAPTR_SCHEDULE" ]; then
    GPT_ARGS+=(--raptr-schedule "$RAPTR_SCHEDULE" --raptr-verify-sync 100)
fi
