#!/usr/bin/env bash
# Shared Slurm launcher for sft-trainer. Runs INSIDE an allocation (the body of slurm/train.sh and
# slurm/tang.sh, or by hand under salloc): one `accelerate launch` per node via srun, wired together
# for multi-node, plus preemption handling (checkpoint, requeue, resume).
#
#   bash slurm/launch.sh [RECIPE.yaml] [--key value ...]      # all arguments go to the trainer
#
# What it does
#   * Repo root: $SFT_REPO, else $SLURM_SUBMIT_DIR (sbatch copies the batch script to a spool folder,
#     so submit from the repo root), else the parent of this script's folder. It cd's there.
#   * Python: activates $VENV (default .venv in the repo) when it exists; else uses what is on PATH.
#   * Main address: first host of `scontrol show hostnames "$SLURM_JOB_NODELIST"`; its name when it
#     resolves, else its NodeAddr from `scontrol show node`. Port: 20000 + job id % 20000.
#   * Processes per node: $PROCS_PER_NODE, else the node's GPUs ($SLURM_GPUS_ON_NODE, else
#     `nvidia-smi -L`), else 1 (CPU). Nodes are assumed alike.
#   * srun starts one task per node: `accelerate launch --num_machines N --machine_rank $SLURM_NODEID
#     --main_process_ip A --main_process_port P --num_processes N*PROCS [--config_file C | --multi_gpu]
#     $SFT_ENTRY <trainer args>`. Without GPUs and without ACCELERATE_CONFIG, for more than one process
#     in all it adds --multi_gpu and exports ACCELERATE_USE_CPU=1 (the only way accelerate starts
#     several real gloo processes on CPU; `--cpu` / MULTI_CPU silently run a single process); for a
#     single process it adds --cpu. With a config (e.g. launch/cpu_ddp.yaml, launch/cpu_zero2.yaml) it
#     adds neither: ACCELERATE_USE_CPU=1 would make accelerate drop DeepSpeed; the trainer itself
#     switches to CPU when CUDA is absent.
#   * Trainer arguments: [RECIPE.yaml] --output_dir $OUTPUT_DIR --resume_from_checkpoint $RESUME <your
#     flags>. Yours come last, so they win (e.g. your own --output_dir).
#   * Preemption: the job is submitted with `--signal=B:USR1@120 --requeue`. On SIGUSR1 (or SIGTERM)
#     this shell forwards the signal to srun, which hands it to every process of the step; the trainer
#     saves a checkpoint at the next step boundary and exits 75 (the launcher processes ignore SIGUSR1
#     so they outlive their workers). When the step is over, the job is requeued with
#     `scontrol requeue` (same job id, SLURM_RESTART_COUNT+1, log appended) and resumes from the latest
#     checkpoint in the same output folder. SIGTERM is forwarded too (the trainer checkpoints if it
#     can) but never requeues from here: `scancel` must stay a cancel, and Slurm's own requeue or
#     preemption requeues by itself.
#
# Environment (all optional)
#   SFT_ENTRY          trainer script (default trainer/sft.py)
#   VENV               virtual environment folder (default .venv; ignored when missing)
#   ACCELERATE         accelerate executable (default: accelerate on PATH after VENV)
#   ACCELERATE_CONFIG  accelerate config file (default: launch/ddp.yaml with GPUs when it exists,
#                      none on CPU); "" = none
#   PROCS_PER_NODE     processes per node (default: GPUs on the node, or 1)
#   MAIN_ADDR, MAIN_PORT  rendezvous address / port (defaults above)
#   OUTPUT_DIR         default outputs/<job name>-<job id>; stable across requeues. "" = do not pass
#                      --output_dir (the recipe's value is used)
#   RESUME             value of --resume_from_checkpoint (default latest; a folder without a
#                      checkpoint starts fresh); "" = do not pass it
#   MAX_REQUEUES       stop requeueing after this many restarts (default 100)
#   RESEND_S           after a signal, repeat it to the step every RESEND_S seconds (default 30)
#   SRUN_EXTRA_ARGS    extra srun options, split on whitespace (e.g. "--label")
#   PREPARE            1 (default): run trainer/prepare.py with the trainer's arguments before srun, so the data is
#                      tokenised and packed once, outside the distributed job; 0: leave it to the trainer
#   OMP_NUM_THREADS    default: CPUs per task (or on the node) / processes per node, at least 1
#   Exported when unset: NCCL_DEBUG=WARN, TORCH_NCCL_ASYNC_ERROR_HANDLING=1 (and the older
#   NCCL_ASYNC_ERROR_HANDLING=1), TOKENIZERS_PARALLELISM=false, PYTHONUNBUFFERED=1. HF_HOME and the rest
#   of the environment pass through unchanged.
set -euo pipefail

log() { echo "[launch.sh $(date '+%F %T')] $*" >&2; }
die() { log "error: $*"; exit 1; }
# Arguments as the job log shows them, shell-quoted: the value of a secret-named option (--hub_token, --*_api_key,
# --*secret*, --*password*) never reaches the log file.
shown_args() {
    local arg hide=""
    for arg in "$@"; do
        if [ -n "$hide" ]; then
            printf '%s ' '<redacted>'
            hide=""
            continue
        fi
        case "$arg" in
            --token=* | --*_token=* | --*api_key=* | --*apikey=* | --*secret*=* | --*password*=* | --*passwd*=*)
                printf '%q=<redacted> ' "${arg%%=*}" ;;
            --token | --*_token | --*api_key | --*apikey | --*secret* | --*password* | --*passwd*)
                printf '%q ' "$arg"
                hide=1 ;;
            *) printf '%q ' "$arg" ;;
        esac
    done
}

[ -n "${SLURM_JOB_ID:-}" ] || die "not inside a Slurm allocation: submit with sbatch (or run under salloc)"

REPO_DIR="${SFT_REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}"
cd "$REPO_DIR" || die "cannot cd to the repo: $REPO_DIR"

# --- Python --------------------------------------------------------------------------------------
VENV="${VENV:-.venv}"
if [ -n "$VENV" ] && [ -f "$VENV/bin/activate" ]; then
    # shellcheck disable=SC1091  # the venv's own script
    source "$VENV/bin/activate"
fi
ACCELERATE="${ACCELERATE:-accelerate}"
command -v "$ACCELERATE" >/dev/null 2>&1 || die "'$ACCELERATE' not found (set VENV or ACCELERATE)"
ACCELERATE="$(command -v "$ACCELERATE")"
SFT_ENTRY="${SFT_ENTRY:-trainer/sft.py}"
[ -f "$SFT_ENTRY" ] || die "trainer script not found: $SFT_ENTRY (in $REPO_DIR)"

# --- Nodes, address, port ------------------------------------------------------------------------
mapfile -t HOSTS < <(scontrol show hostnames "${SLURM_JOB_NODELIST:?}")
[ "${#HOSTS[@]}" -ge 1 ] || die "empty node list: ${SLURM_JOB_NODELIST}"
NNODES="${SLURM_NNODES:-${#HOSTS[@]}}"
MAIN_HOST="${HOSTS[0]}"
if [ -z "${MAIN_ADDR:-}" ]; then
    if getent hosts "$MAIN_HOST" >/dev/null 2>&1; then
        MAIN_ADDR="$MAIN_HOST"
    else
        MAIN_ADDR="$(scontrol show node "$MAIN_HOST" -o | tr ' ' '\n' | sed -n 's/^NodeAddr=//p' | head -n 1)"
        [ -n "$MAIN_ADDR" ] || die "cannot resolve $MAIN_HOST and it has no NodeAddr"
    fi
fi
MAIN_PORT="${MAIN_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"

# --- Processes per node, CPU or GPU ----------------------------------------------------------------
NGPUS="${SLURM_GPUS_ON_NODE:-}"
if [ -z "$NGPUS" ]; then
    NGPUS=0
    if command -v nvidia-smi >/dev/null 2>&1; then
        NGPUS="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
    fi
fi
PROCS_PER_NODE="${PROCS_PER_NODE:-$NGPUS}"
[ "$PROCS_PER_NODE" -ge 1 ] 2>/dev/null || PROCS_PER_NODE=1
NPROCS=$((NNODES * PROCS_PER_NODE))

if [ "$NGPUS" -eq 0 ]; then
    ACCELERATE_CONFIG="${ACCELERATE_CONFIG-}"
elif [ -z "${ACCELERATE_CONFIG+x}" ]; then
    ACCELERATE_CONFIG=""
    [ -f launch/ddp.yaml ] && ACCELERATE_CONFIG=launch/ddp.yaml
fi

LAUNCH_ARGS=(--num_machines "$NNODES" --num_processes "$NPROCS"
    --main_process_ip "$MAIN_ADDR" --main_process_port "$MAIN_PORT")
if [ -n "$ACCELERATE_CONFIG" ]; then
    [ -f "$ACCELERATE_CONFIG" ] || die "accelerate config not found: $ACCELERATE_CONFIG"
    LAUNCH_ARGS+=(--config_file "$ACCELERATE_CONFIG")
elif [ "$NPROCS" -gt 1 ]; then
    LAUNCH_ARGS+=(--multi_gpu)
    # On CPU, with no config only: ACCELERATE_USE_CPU=1 makes accelerate drop a DeepSpeed config.
    if [ "$NGPUS" -eq 0 ]; then export ACCELERATE_USE_CPU=1; fi
elif [ "$NGPUS" -eq 0 ]; then
    LAUNCH_ARGS+=(--cpu) # the single-process launcher sets ACCELERATE_USE_CPU from this flag
fi

# --- Environment ---------------------------------------------------------------------------------
CPUS="${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-$(nproc)}}"
if [ -z "${OMP_NUM_THREADS:-}" ]; then
    OMP_NUM_THREADS=$((CPUS / PROCS_PER_NODE))
    [ "$OMP_NUM_THREADS" -ge 1 ] || OMP_NUM_THREADS=1
fi
export OMP_NUM_THREADS
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
export NCCL_ASYNC_ERROR_HANDLING="${NCCL_ASYNC_ERROR_HANDLING:-1}"
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
export PYTHONUNBUFFERED="${PYTHONUNBUFFERED:-1}"

# --- Trainer arguments ---------------------------------------------------------------------------
RESTARTS="${SLURM_RESTART_COUNT:-0}"
OUTPUT_DIR="${OUTPUT_DIR-outputs/${SLURM_JOB_NAME:-sft}-${SLURM_JOB_ID}}"
RESUME="${RESUME-latest}"
TRAIN_ARGS=()
if [ $# -ge 1 ] && [[ "$1" == *.yaml || "$1" == *.yml || "$1" == *.json ]]; then
    TRAIN_ARGS+=("$1") # the recipe stays the first argument
    shift
fi
[ -n "$OUTPUT_DIR" ] && TRAIN_ARGS+=(--output_dir "$OUTPUT_DIR")
[ -n "$RESUME" ] && TRAIN_ARGS+=(--resume_from_checkpoint "$RESUME")
TRAIN_ARGS+=("$@")

SRUN_ARGS=(--nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1)
[ -n "${SLURM_CPUS_PER_TASK:-}" ] && SRUN_ARGS+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
read -r -a EXTRA <<<"${SRUN_EXTRA_ARGS:-}"
[ "${#EXTRA[@]}" -gt 0 ] && SRUN_ARGS+=("${EXTRA[@]}")

log "job ${SLURM_JOB_ID} (${SLURM_JOB_NAME:-}) restart ${RESTARTS}: ${NNODES} node(s) [${HOSTS[*]}] x ${PROCS_PER_NODE} process(es)," \
    "GPUs/node ${NGPUS}, main ${MAIN_ADDR}:${MAIN_PORT}, config '${ACCELERATE_CONFIG}', OMP_NUM_THREADS=${OMP_NUM_THREADS}"
log "trainer: $(shown_args "$SFT_ENTRY" "${TRAIN_ARGS[@]}")"

# --- Run, forwarding preemption signals ------------------------------------------------------------
SIGNALLED=""
SRUN_PID=""
RESENDER_PID=""
# shellcheck disable=SC2317  # called from the traps
on_signal() {
    SIGNALLED="$1"
    log "received SIG$1: asking the trainer to checkpoint and stop"
    if [ -n "$SRUN_PID" ] && kill -0 "$SRUN_PID" 2>/dev/null; then
        kill -s "$1" "$SRUN_PID" 2>/dev/null || true
        # Repeat every RESEND_S seconds while the step runs: a signal that arrives while the trainer
        # is still importing (before it installs its handler) is ignored, not fatal, and would be lost.
        if [ -z "$RESENDER_PID" ]; then
            (
                trap - USR1 TERM
                while sleep "${RESEND_S:-30}" && kill -0 "$SRUN_PID" 2>/dev/null; do
                    kill -s "$1" "$SRUN_PID" 2>/dev/null || true
                done
            ) &
            RESENDER_PID=$!
        fi
    fi
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM

# --- Data: prepared once, before the distributed step ---------------------------------------------
# Every rank would find (or wait for) the prepared folder by itself; preparing it here, in the batch shell, keeps a
# long tokenisation out of the job's process group (no collective can time out on it) and stops a bad data file
# before any node starts. The folder is content-addressed: a requeued run finds it at once. PREPARE=0 skips this.
if [ "${PREPARE:-1}" = 1 ] && [ "$SFT_ENTRY" = trainer/sft.py ] && [ -z "$SIGNALLED" ]; then
    log "preparing data: python3 trainer/prepare.py (same arguments as the trainer)"
    python3 trainer/prepare.py "${TRAIN_ARGS[@]}" >&2 || die "data preparation failed (see above)"
fi

# The task shell ignores SIGUSR1 and the launcher inherits that: it keeps running while its workers
# (which install their own handler) checkpoint. SLURM_NODEID is read per task, hence the inner shell.
RC=75
if [ -z "$SIGNALLED" ]; then # else: notice before the start, requeue without starting
    # shellcheck disable=SC2016  # expanded by the task shell, not here
    srun "${SRUN_ARGS[@]}" bash -c 'trap "" USR1; a=$1; shift; exec "$a" launch --machine_rank "$SLURM_NODEID" "$@"' \
        sft-task "$ACCELERATE" "${LAUNCH_ARGS[@]}" "$SFT_ENTRY" "${TRAIN_ARGS[@]}" &
    SRUN_PID=$!
    while :; do
        RC=0
        wait "$SRUN_PID" || RC=$?
        # A trapped signal interrupts `wait` (status > 128) while srun still runs: wait again.
        if [ "$RC" -gt 128 ] && kill -0 "$SRUN_PID" 2>/dev/null; then
            continue
        fi
        break
    done
fi
log "step finished with exit code $RC"
if [ -n "$RESENDER_PID" ]; then
    kill "$RESENDER_PID" 2>/dev/null || true
fi

# Requeue on SIGUSR1 (the preemption notice), or when the trainer's own exit code 75 reaches us without
# any signal. Never on SIGTERM: it comes from scancel (cancel, do not requeue: the job then reads
# COMPLETING, not CANCELLED, so it cannot be told apart from the state), or from Slurm's own
# requeue/preemption, which requeues the job by itself.
if [ "$SIGNALLED" = TERM ]; then
    log "SIGTERM: not requeueing here (a Slurm requeue or preemption requeues the job itself)"
    exit "$RC"
fi
if [ "$RC" -eq 0 ]; then
    [ -n "$SIGNALLED" ] && log "the trainer finished before stopping: nothing to resume"
    exit 0
fi
if [ "$SIGNALLED" = USR1 ] || [ "$RC" -eq 75 ]; then
    STATE="$(scontrol show job "$SLURM_JOB_ID" -o 2>/dev/null | tr ' ' '\n' | sed -n 's/^JobState=//p')"
    case "$STATE" in
        CANCELLED*)
            log "job was cancelled: not requeueing"
            exit "$RC"
            ;;
        PENDING | REQUEUE*)
            log "job already requeued by Slurm (state $STATE): it resumes from ${OUTPUT_DIR:-the recipe output_dir}"
            exit 0
            ;;
    esac
    if [ "$RESTARTS" -ge "${MAX_REQUEUES:-100}" ]; then
        log "restart count ${RESTARTS} reached MAX_REQUEUES=${MAX_REQUEUES:-100}: not requeueing"
        exit 75
    fi
    log "preempted (${SIGNALLED:+SIG}${SIGNALLED:-exit 75}, state ${STATE:-?}): requeueing job ${SLURM_JOB_ID}; it resumes from ${OUTPUT_DIR:-the recipe output_dir}"
    if ! scontrol requeue "$SLURM_JOB_ID"; then
        log "error: scontrol requeue failed (was the job submitted with --requeue?)"
        exit 75
    fi
    exit 0
fi
exit "$RC"
