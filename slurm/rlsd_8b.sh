#!/bin/bash
#SBATCH --job-name=megacredit-rlsd-8b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@600
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
##SBATCH --account=ACCOUNT
##SBATCH --partition=PARTITION
#
# RLSD (GRPO with token advantages reweighted by the self-teacher's evidence) on Qwen3-8B, 1 node x 8 GPUs (CREDIT paper, Table 3):
#   sbatch slurm/rlsd_8b.sh [CONFIG.yaml] [key.sub=value ...]
# Default config examples/qwen3_8b_rlsd_${TASK:-code}.yaml. Everything else (container or
# venv, requeue, remote rollout engines, dry run) is in slurm/launch.sh, which this sources.
# Account and partition: remove one '#' above, or sbatch -A ACCOUNT -p PARTITION.
MEGACREDIT_METHOD=rlsd
# Slurm runs a spool copy of this file: the repository is found from the submitted path.
submitted=$([[ -n "${SLURM_JOB_ID:-}" ]] && scontrol show job "$SLURM_JOB_ID" | sed -n 's/.*Command=\([^ ]*\).*/\1/p')
MEGACREDIT_ROOT=${MEGACREDIT_ROOT:-$(cd "$(dirname "${submitted:-$0}")/.." && pwd)}
# shellcheck source=slurm/launch.sh
source "$MEGACREDIT_ROOT/slurm/launch.sh" || { echo "megacredit: set MEGACREDIT_ROOT to the repository" >&2; exit 2; }
mc_main "$@"
