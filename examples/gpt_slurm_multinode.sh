#!/usr/bin/env bash
#SBATCH --job-name=raptr-gpt
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --time=24:00:00
# SIGTERM to every process of the job steps 5 minutes before the time limit (SLURM may send
# it up to a minute earlier): time for a step and a checkpoint save. Not "B:TERM", which
# would signal only this batch shell, not the training processes.
#SBATCH --signal=TERM@300
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
# SIGTERM (before the time limit, on preemption or scancel) reaches every training process
# directly; with --exit-signal-handler (in GPT_ARGS) they save at one iteration and exit 0.
# Everything else ignores it: this shell and torchrun (ignored at start, and left out of
# the signals torchrun handles) must wait for that save. A torchrun acting on SIGTERM would
# exit 1 after its workers' clean exit, and SIGKILL them if the save took over 30 s.
trap '' TERM
# The rendezvous numbers the nodes, so every node runs the same command.
# srun does not inherit --cpus-per-task from sbatch: without it the node's one task (torchrun,
# its 8 workers and their data loaders) would be bound to a single core.
srun --ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" --kill-on-bad-exit=1 bash -c 'trap "" TERM; exec "$@"' bash torchrun \
    --signals-to-handle SIGINT,SIGHUP,SIGQUIT \
    --nnodes "$SLURM_NNODES" --nproc-per-node "${GPUS_PER_NODE:-8}" \
    --rdzv-id "$SLURM_JOB_ID" --rdzv-backend c10d \
    --rdzv-endpoint "$MASTER_ADDR:${MASTER_PORT:-29500}" \
    pretrain_raptr.py "${GPT_ARGS[@]}" "$@"
