#!/usr/bin/env bash
# Train DUNet on a Cloud TPU VM or pod slice, from your own machine:
#   launch/tpu_vm.sh [--dry-run] [--config=configs/voc.py] [--workdir=gs://BUCKET/run] [--config.x=y ...]
# Creates the TPU (or reuses it; recreates it if it was preempted), copies this checkout (or clones
# REPO_URL) to every worker, installs the pinned requirements plus jax[tpu] in a Python 3.11 venv, and
# runs the same dunet_jax.main command on all workers at once (jax.distributed.initialize() finds the
# other workers by itself on Cloud TPU). When the TPU is preempted, or training stops on a preemption
# notice (exit status 75), it does all of that again and training resumes from the latest checkpoint
# in WORKDIR, which must therefore outlive the TPU: use a gs:// bucket.
set -euo pipefail

# ---- Edit these (or set them in the environment) ----------------------------------------------------
TPU_NAME="${TPU_NAME:-dunet-tpu}"
ZONE="${ZONE:-us-central2-b}"
PROJECT="${PROJECT:-}"                           # '' = gcloud's default project
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-32}"    # v4-8 is one host, v4-32 four hosts (pod slice)
TPU_VERSION="${TPU_VERSION:-tpu-ubuntu2204-base}"  # runtime: v5e v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e
SPOT="${SPOT:-0}"                                # 1 = spot capacity (cheaper, preemptible)
REPO_URL="${REPO_URL:-}"                         # '' = copy this checkout's HEAD; else git clone this URL
REPO_REF="${REPO_REF:-main}"                     # branch, tag or commit of REPO_URL
REMOTE_DIR="${REMOTE_DIR:-dunet_jax}"            # code directory in each worker's home
VENV_DIR="${VENV_DIR:-dunet_venv}"               # venv in each worker's home
PYTHON_VERSION="${PYTHON_VERSION:-3.11}"
JAX_VERSION="${JAX_VERSION:-0.10.2}"
CONFIG="${CONFIG:-configs/voc.py}"               # relative to the repository root
WORKDIR="${WORKDIR:-gs://YOUR_BUCKET/dunet/voc}"  # checkpoints + TensorBoard; shared by all workers
BACKGROUND="${BACKGROUND:-0}"                    # 1 = detach: training keeps going if your ssh drops (no restarts)
MAX_RESTARTS="${MAX_RESTARTS:-20}"               # recreate-and-resume rounds after preemptions (BACKGROUND=0)
RESTART_DELAY="${RESTART_DELAY:-60}"             # seconds to wait before recreating a preempted TPU
LOG_FILE="${LOG_FILE:-dunet_train.log}"          # in each worker's home, with BACKGROUND=1
# -----------------------------------------------------------------------------------------------------

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$REPO_ROOT/launch/common.sh"

usage() { sed -n '2,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

parse_args "$@"
require_command gcloud 'install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install) and run `gcloud auth login`'
check_config_file "$REPO_ROOT"
case "$WORKDIR" in
  gs://YOUR_BUCKET/*)
    message="WORKDIR=$WORKDIR is the placeholder: set WORKDIR or --workdir= to a path in your gs:// bucket"
    if [ "$DRY_RUN" = 1 ]; then warn "$message"; else die "$message"; fi ;;
  gs://*) ;;
  *) warn "WORKDIR=$WORKDIR is not a gs:// path: on a pod slice every worker must see the same WORKDIR, and it is lost with the TPU" ;;
esac

LOCATION=(--zone="$ZONE")
if [ -n "$PROJECT" ]; then LOCATION+=(--project="$PROJECT"); fi

# Runs a shell command on every worker of the TPU, concurrently.
on_all_workers() {
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${LOCATION[@]}" --worker=all --command="$1"
}

create_tpu() {
  local capacity=()
  if [ "$SPOT" = 1 ]; then capacity=(--spot); fi
  run gcloud compute tpus tpu-vm create "$TPU_NAME" "${LOCATION[@]}" \
    --accelerator-type="$ACCELERATOR_TYPE" --version="$TPU_VERSION" ${capacity[@]+"${capacity[@]}"}
}

# Reuses a READY TPU; deletes and recreates a preempted or terminated one; creates a missing one.
create_or_reuse_tpu() {
  local describe=(gcloud compute tpus tpu-vm describe "$TPU_NAME" "${LOCATION[@]}" --format='value(state)')
  echo "+ $(quote_words "${describe[@]}")"
  if [ "$DRY_RUN" = 1 ]; then
    echo "# the TPU is created only if it does not exist (deleted and recreated first if PREEMPTED or TERMINATED):"
    create_tpu
    return
  fi
  local state
  state=$("${describe[@]}" 2>/dev/null || true)
  case "$state" in
    '') create_tpu ;;
    PREEMPTED|TERMINATED)
      run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${LOCATION[@]}" --quiet
      create_tpu ;;
    *) echo "reusing TPU $TPU_NAME (state $state)" ;;
  esac
}

copy_code() {
  if [ -n "$REPO_URL" ]; then
    on_all_workers "[ -d $REMOTE_DIR/.git ] || git clone --quiet $REPO_URL $REMOTE_DIR; git -C $REMOTE_DIR fetch --quiet origin $REPO_REF && git -C $REMOTE_DIR checkout --quiet --detach FETCH_HEAD"
    return
  fi
  if [ "$DRY_RUN" = 0 ] && [ -n "$(git -C "$REPO_ROOT" status --porcelain --untracked-files=no)" ]; then
    warn "uncommitted changes in $REPO_ROOT are not copied: only HEAD is (commit them first)"
  fi
  local archive="${TMPDIR:-/tmp}/dunet_jax_code.tar.gz"
  run git -C "$REPO_ROOT" archive --format=tar.gz --prefix="$REMOTE_DIR/" -o "$archive" HEAD
  run gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME:dunet_jax_code.tar.gz" "${LOCATION[@]}" --worker=all
  on_all_workers "tar xzf dunet_jax_code.tar.gz && rm dunet_jax_code.tar.gz"
}

# TPU VM images ship an older Python: uv provides 3.11, which jax $JAX_VERSION needs.
install_requirements() {
  on_all_workers "python3 -m pip install --quiet --user uv && ~/.local/bin/uv venv --quiet --allow-existing --python $PYTHON_VERSION $VENV_DIR && ~/.local/bin/uv pip install --quiet --python $VENV_DIR/bin/python -r $REMOTE_DIR/requirements.txt \"jax[tpu]==$JAX_VERSION\""
}

train() {
  local command
  command=$(main_command "~/$VENV_DIR/bin/python")
  if [ "$BACKGROUND" = 1 ]; then
    command="nohup $command > ~/$LOG_FILE 2>&1 < /dev/null &"
  fi
  on_all_workers "cd $REMOTE_DIR && $command"
}

# True when a training round that ended with `status` was preempted: the TPU was taken away
# (PREEMPTED or TERMINATED; the ssh session then fails), or training stopped on a preemption
# notice and saved a checkpoint (exit status 75).
was_preempted() {
  local status=$1 state
  state=$(gcloud compute tpus tpu-vm describe "$TPU_NAME" "${LOCATION[@]}" --format='value(state)' 2>/dev/null || true)
  case "$state" in
    PREEMPTED|TERMINATED) return 0 ;;
  esac
  [ "$status" = "$PREEMPTED_EXIT_CODE" ]
}

# Create (or reuse) the TPU, copy the code, install, train; again after each preemption, resuming
# from the latest checkpoint, until training finishes, fails for another reason or MAX_RESTARTS is spent.
run_until_done() {
  local restarts=0 status
  while true; do
    create_or_reuse_tpu
    copy_code
    install_requirements
    status=0
    train || status=$?
    if [ "$DRY_RUN" = 1 ]; then
      echo "# if the TPU is preempted or training exits with status $PREEMPTED_EXIT_CODE (checkpoint saved), the steps above run again (up to MAX_RESTARTS=$MAX_RESTARTS times) and training resumes"
      return 0
    fi
    if [ "$status" = 0 ] || [ "$BACKGROUND" = 1 ]; then
      return "$status"
    fi
    was_preempted "$status" || die "training failed with exit status $status (not a preemption): fix the cause, then rerun this command to resume"
    if [ "$restarts" -ge "$MAX_RESTARTS" ]; then
      die "preempted again after $MAX_RESTARTS restarts: rerun this command to resume (raise MAX_RESTARTS to retry longer)"
    fi
    restarts=$((restarts + 1))
    echo "preempted (exit status $status): recreating or reusing $TPU_NAME in ${RESTART_DELAY}s and resuming (restart $restarts of $MAX_RESTARTS)"
    sleep "$RESTART_DELAY"
  done
}

run_until_done
