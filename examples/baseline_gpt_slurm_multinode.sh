#!/usr/bin/env bash
#SBATCH --job-name=raptr-gpt-baseline
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=TERM@300
# The baseline of examples/gpt_slurm_multinode.sh: the same model, data and flags, full model
# every step. sbatch reads the #SBATCH lines of the submitted script only: keep them equal.
#
#   sbatch examples/baseline_gpt_slurm_multinode.sh        (submit from the repository root)
#
# Environment: as examples/gpt_slurm_multinode.sh; RUN_NAME defaults to gpt_slurm_baseline.
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
RUN_NAME=${RUN_NAME:-gpt_slurm_baseline} RAPTR_SCHEDULE="" \
    exec bash examples/gpt_slurm_multinode.sh "$@"
