#!/usr/bin/env bash
# Train DUNet on several GPU nodes of a SLURM cluster, from a login node:
#   launch/slurm_multinode.sh [--dry-run] [--config=configs/voc.py] [--workdir=DIR] [--config.x=y ...]
# Submits this script with sbatch; inside the job it runs `srun python -m dunet_jax.main ...`, one task
# per GPU. One task per GPU is what jax.distributed.initialize() assumes on SLURM: it reads the
# coordinator, process count and id from SLURM's variables and gives each process the GPU numbered
# SLURM_LOCALID, so main needs no flags (one task per node would need explicit local_device_ids).
# Every task must see all GPUs of its node (--gpu-bind=none) for that numbering to hold.
# Training gets SIGTERM 3 minutes before the time limit (and on preemption), saves a checkpoint and
# exits with status 75; the job then requeues itself (scontrol requeue) and resumes from it.
set -euo pipefail

# ---- Edit these (or set them in the environment) ----------------------------------------------------
CONFIG="${CONFIG:-configs/voc.py}"               # relative to the repository root
WORKDIR="${WORKDIR:-$HOME/dunet_runs/voc}"       # on a filesystem every node sees
NODES="${NODES:-2}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
CPUS_PER_TASK="${CPUS_PER_TASK:-8}"              # the tf.data input pipeline of each process uses these
PARTITION="${PARTITION:-}"                       # '' = the cluster's default partition
ACCOUNT="${ACCOUNT:-}"                           # '' = your default account
TIME_LIMIT="${TIME_LIMIT:-24:00:00}"
JOB_NAME="${JOB_NAME:-dunet}"
LOG_DIR="${LOG_DIR:-$HOME/dunet_runs/slurm_logs}"
# A venv on the shared filesystem with the requirements and jax[cuda12]==0.10.2, built once on a node:
#   python3.11 -m venv $VENV_DIR && $VENV_DIR/bin/pip install -r requirements.txt "jax[cuda12]==0.10.2"
VENV_DIR="${VENV_DIR:-$HOME/.venvs/dunet_jax_gpu}"
NODE_SETUP="${NODE_SETUP:-}"                     # shell run in the job before srun, e.g. 'module load cuda/12.8'
MEM_FRACTION="${MEM_FRACTION:-0.90}"             # share of its GPU's memory each process reserves
# -----------------------------------------------------------------------------------------------------

# sbatch runs a copy of this file from its spool directory: the submit step passes the checkout's path.
REPO_ROOT="${DUNET_REPO_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
source "$REPO_ROOT/launch/common.sh"

usage() { sed -n '2,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

# sbatch runs this file again on the first node with --inside-job as the first argument.
INSIDE_JOB=0
if [ "${1:-}" = --inside-job ]; then
  INSIDE_JOB=1
  shift
fi
parse_args "$@"
check_config_file "$REPO_ROOT"

submit() {
  local options=(
    --job-name="$JOB_NAME" --nodes="$NODES" --ntasks-per-node="$GPUS_PER_NODE"
    --gpus-per-node="$GPUS_PER_NODE" --cpus-per-task="$CPUS_PER_TASK" --time="$TIME_LIMIT"
    --signal=TERM@180 --requeue --output="$LOG_DIR/%x-%j.out" --chdir="$REPO_ROOT"
    --export=ALL,DUNET_REPO_ROOT="$REPO_ROOT"
  )
  if [ -n "$PARTITION" ]; then options+=(--partition="$PARTITION"); fi
  if [ -n "$ACCOUNT" ]; then options+=(--account="$ACCOUNT"); fi
  run mkdir -p "$LOG_DIR"
  run sbatch "${options[@]}" "$REPO_ROOT/launch/slurm_multinode.sh" --inside-job \
    "--config=$CONFIG" "--workdir=$WORKDIR" ${MAIN_ARGS[@]+"${MAIN_ARGS[@]}"}
}

train() {
  if [ -n "$NODE_SETUP" ]; then
    echo "+ $NODE_SETUP"
    if [ "$DRY_RUN" = 0 ]; then eval "$NODE_SETUP"; fi
  fi
  run_export XLA_PYTHON_CLIENT_MEM_FRACTION "$MEM_FRACTION"
  run cd "$REPO_ROOT"
  local status=0
  run srun --kill-on-bad-exit=1 --gpu-bind=none "$VENV_DIR/bin/python" -m dunet_jax.main \
    "--config=$CONFIG" "--workdir=$WORKDIR" ${MAIN_ARGS[@]+"${MAIN_ARGS[@]}"} || status=$?
  requeue_if_preempted "$status"
}

# A job that exits by itself is not requeued by SLURM, even with --requeue: after a preemption notice
# (the --signal before the time limit, or a preemption) the job puts itself back in the queue, and
# the requeued job resumes from the checkpoint. Any other failure ends the job with its status.
requeue_if_preempted() {
  local status=$1
  if [ "$DRY_RUN" = 1 ]; then
    echo "# then, if training exited with status $PREEMPTED_EXIT_CODE (stopped on a preemption notice, checkpoint saved):"
    run scontrol requeue '$SLURM_JOB_ID'
    return
  fi
  if [ "$status" = "$PREEMPTED_EXIT_CODE" ]; then
    run scontrol requeue "$SLURM_JOB_ID" || die "scontrol requeue $SLURM_JOB_ID failed: resubmit the same command to resume from the checkpoint"
    return
  fi
  if [ "$status" != 0 ]; then
    die "training failed with exit status $status (not a preemption): the job is not requeued"
  fi
}

if [ "$INSIDE_JOB" = 1 ]; then
  require_command srun 'run this inside a SLURM job (sbatch starts it with --inside-job)'
  train
else
  require_command sbatch 'run this on a login node of a SLURM cluster'
  submit
  if [ "$DRY_RUN" = 1 ]; then
    echo "# then, inside the job (sbatch runs this script with --inside-job), on the first node:"
    train
  fi
fi
