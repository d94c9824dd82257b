#!/usr/bin/env bash
#SBATCH --job-name=raptr-gpt
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=24:00:00
# RaPTr GPT pretraining on several nodes under SLURM: one torchrun per node, meeting at the
# first node (c10d rendezvous).
#
#   sbatch examples/gpt_slurm_multinode.sh                 (submit from the repository root)
#   sbatch --nodes 4 examples/gpt_slurm_multinode.sh --train-iters 50000
#
# Environment (sbatch passes the submitting shell's; the model, data and training ones are
# described in examples/gpt_args.sh):
#   GPUS_PER_NODE    processes per node (default 8)
#   MASTER_PORT      rendezvous port on the first node (default 29500)
#   MODEL            default 1.3b
#   RAPTR_SCHEDULE, TP, PP, SEQUENCE_PARALLEL, MBS, GBS, SEQ_LENGTH, TRAIN_ITERS, LR, MIN_LR,
#   DATA_PATH, SPLIT, TRAIN_DATA, VALID_DATA, TOKENIZER_MODEL
#   RUN_NAME         outputs in runs/RUN_NAME (default gpt_slurm)
# examples/baseline_gpt_slurm_multinode.sh runs the same without --raptr-schedule.
set -euo pipefail
# sbatch runs a copy of this file from its spool directory: work where the job was submitted.
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"

MODEL=${MODEL:-1.3b}
RUN_NAME=${RUN_NAME:-gpt_slurm}
# shellcheck source=examples/gpt_args.sh
source examples/gpt_args.sh

# The first node; sed, unlike head, reads all input: no SIGPIPE failure under pipefail.
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)
# The rendezvous numbers the nodes, so every node runs the same command.
srun --ntasks-per-node=1 --kill-on-bad-exit=1 torchrun \
    --nnodes "$SLURM_NNODES" --nproc-per-node "${GPUS_PER_NODE:-8}" \
    --rdzv-id "$SLURM_JOB_ID" --rdzv-backend c10d \
    --rdzv-endpoint "$MASTER_ADDR:${MASTER_PORT:-29500}" \
    pretrain_raptr.py "${GPT_ARGS[@]}" "$@"
