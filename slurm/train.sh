#!/usr/bin/env bash
# Submit sft-trainer to Slurm. From the repo root (the job finds the repo via SLURM_SUBMIT_DIR):
#
#   mkdir -p logs
#   sbatch slurm/train.sh recipes/X.yaml --learning_rate 1e-4 ...
#   sbatch --nodes=2 --gpus-per-node=4 --time=12:00:00 slurm/train.sh recipes/X.yaml
#   sbatch --gpus-per-node=0 --cpus-per-task=2 slurm/train.sh ...   # CPU-only cluster (no GPU gres)
#
# The #SBATCH lines below are defaults; options given to sbatch on its command line win over them.
# #SBATCH lines are not shell: no variables, no $(...) (pass those on the command line instead).
# Everything after the script name goes to the trainer (see slurm/launch.sh for the environment
# variables it reads: PROCS_PER_NODE, ACCELERATE_CONFIG, OUTPUT_DIR, VENV, ...). Logs: logs/<name>-<id>.out/.err
# (appended across requeues). Before the time limit the job gets SIGUSR1, checkpoints and requeues itself.
#
#SBATCH --job-name=sft
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
# exec: the launcher must be the batch shell itself, which receives --signal=B:USR1.
exec bash "$REPO_DIR/slurm/launch.sh" "$@"
