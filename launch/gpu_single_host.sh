#!/usr/bin/env bash
# Train DUNet on one host with one or more NVIDIA GPUs, on that host:
#   launch/gpu_single_host.sh [--dry-run] [--config=configs/voc.py] [--workdir=DIR] [--config.x=y ...]
# Creates a venv with the pinned requirements plus jax[cuda12] (once), then runs dunet_jax.main as a
# single process that drives every visible GPU (jax.jit shards the global batch over all of them and
# NCCL does the all-reduces; no jax.distributed setup is needed on one host). Rerunning the same
# command resumes from the latest checkpoint in WORKDIR; under a service manager, restart on exit 75.
set -euo pipefail

# ---- Edit these (or set them in the environment) ----------------------------------------------------
CONFIG="${CONFIG:-configs/voc.py}"               # relative to the repository root
WORKDIR="${WORKDIR:-$HOME/dunet_runs/voc}"       # checkpoints + TensorBoard
JAX_VERSION="${JAX_VERSION:-0.10.2}"
JAX_EXTRA="${JAX_EXTRA:-cuda12}"                 # cuda12, or cuda13 (needs an NVIDIA driver >= 580)
PYTHON="${PYTHON:-python3.11}"                   # jax $JAX_VERSION needs Python >= 3.11
VENV_DIR="${VENV_DIR:-$HOME/.venvs/dunet_jax_gpu}"
INSTALL="${INSTALL:-1}"                          # 0 = use VENV_DIR as it is (no pip)
GPUS="${GPUS:-}"                                 # '' = all GPUs; e.g. 0,1,2,3 to use four of them
# Share of each GPU's memory that XLA reserves at start (jax's default is 0.75). Raise it for large
# batches; lower it (or set XLA_PYTHON_CLIENT_PREALLOCATE=false) when other processes share the GPUs.
MEM_FRACTION="${MEM_FRACTION:-0.90}"
NCCL_DEBUG_LEVEL="${NCCL_DEBUG_LEVEL:-WARN}"     # INFO prints the NCCL topology (NVLink/PCIe) at start
# -----------------------------------------------------------------------------------------------------

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$REPO_ROOT/launch/common.sh"

usage() { sed -n '2,7p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

parse_args "$@"
require_command nvidia-smi 'this script runs on a host with NVIDIA GPUs and their driver installed'
if [ "$INSTALL" = 1 ]; then
  require_command "$PYTHON" "install Python 3.11 or set PYTHON to a Python >= 3.11 interpreter"
fi
check_config_file "$REPO_ROOT"

run nvidia-smi --list-gpus
if [ "$INSTALL" = 1 ]; then
  run "$PYTHON" -m venv "$VENV_DIR"
  run "$VENV_DIR/bin/python" -m pip install --quiet -r "$REPO_ROOT/requirements.txt" "jax[$JAX_EXTRA]==$JAX_VERSION"
fi
if [ -n "$GPUS" ]; then
  run_export CUDA_VISIBLE_DEVICES "$GPUS"
fi
run_export XLA_PYTHON_CLIENT_MEM_FRACTION "$MEM_FRACTION"
run_export NCCL_DEBUG "$NCCL_DEBUG_LEVEL"
run cd "$REPO_ROOT"
# exec: training replaces this shell, so a SIGTERM sent to the script (a service manager stopping it,
# a container runtime's stop) reaches training, which saves a checkpoint and exits with status 75.
run exec "$VENV_DIR/bin/python" -m dunet_jax.main "--config=$CONFIG" "--workdir=$WORKDIR" ${MAIN_ARGS[@]+"${MAIN_ARGS[@]}"}
