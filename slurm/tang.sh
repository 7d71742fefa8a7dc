#!/usr/bin/env bash
# Tang-poetry QLoRA fine-tune on Slurm: slurm/train.sh with recipes/tang_breeze_qlora.yaml as the recipe.
# From the repo root:
#
#   mkdir -p logs
#   sbatch slurm/tang.sh                                  # the recipe as is
#   sbatch slurm/tang.sh --num_train_epochs 2             # extra trainer flags are appended
#   sbatch --gpus-per-node=1 slurm/tang.sh                # one GPU is plenty for a QLoRA run
#   sbatch slurm/tang.sh recipes/other.yaml --flag v      # a .yaml first argument replaces the recipe
#
# #SBATCH defaults as in slurm/train.sh (command-line sbatch options win); see slurm/launch.sh.
#
#SBATCH --job-name=tang
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --time=04:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --error=logs/%x-%j.err
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
set -euo pipefail
REPO_DIR="${SFT_REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}"
[ -f "$REPO_DIR/slurm/launch.sh" ] || { echo "slurm/launch.sh not found in $REPO_DIR: submit from the repo root (or set SFT_REPO)" >&2; exit 1; }
RECIPE="${TANG_RECIPE:-recipes/tang_breeze_qlora.yaml}"
if [ $# -ge 1 ] && [[ "$1" == *.yaml || "$1" == *.yml ]]; then
    RECIPE="$1"
    shift
fi
exec bash "$REPO_DIR/slurm/launch.sh" "$RECIPE" "$@"
