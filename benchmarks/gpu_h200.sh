#!/usr/bin/env bash
# DUNet-ResNet-50 (output stride 16) train step on one H200: bf16, batch 16, 512x512, MFU against
# 790e12 FLOP/s (the bf16 matmul rate measured on these machines; the datasheet says 989e12).
# Prints benchmarks/train_step.py's JSON line (also written to $OUT/train_step_h200.json when $OUT
# is set) and fits in a few minutes: about 1-2 min to compile, 3 + 20 steps of well under a second.
#   bash benchmarks/gpu_h200.sh             # on the GPU machine, from the repository root
#   bash benchmarks/gpu_h200.sh --prepare   # here, before: copies ml_collections into .gpu_vendor/
# The device machine has no network: it must already hold a CUDA jax (it does: jax 0.11 with the
# cuda13 plugin), and Python packages it lacks travel in .gpu_vendor/ (pass carry=['.gpu_vendor']).
# Elsewhere, with a network, a missing CUDA jax is installed from PyPI (JAX_SPEC).
set -euo pipefail

JAX_SPEC="${JAX_SPEC:-jax[cuda12]==0.10.2}"
PEAK_FLOPS="${PEAK_FLOPS:-790e12}"
BATCH_SIZE="${BATCH_SIZE:-16}"
CROP="${CROP:-512}"
STEPS="${STEPS:-20}"
WARMUP="${WARMUP:-3}"
PYTHON="${PYTHON:-python3}"
VENDORED_PACKAGES="${VENDORED_PACKAGES:-ml_collections}"  # pure-Python packages the GPU image lacks

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENDOR_DIR="$REPO_ROOT/.gpu_vendor"

if [ "${1:-}" = --prepare ]; then
  mkdir -p "$VENDOR_DIR"
  for package in $VENDORED_PACKAGES; do
    source_dir=$("$PYTHON" -c "import $package, os; print(os.path.dirname($package.__file__))")
    cp -r "$source_dir" "$VENDOR_DIR/"
    echo "copied $source_dir to $VENDOR_DIR/"
  done
  exit 0
fi

if [ -d "$VENDOR_DIR" ]; then
  export PYTHONPATH="$VENDOR_DIR${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$PYTHON" -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")' 2>/dev/null; then
  echo "no CUDA jax found: installing $JAX_SPEC" >&2
  "$PYTHON" -m pip install --quiet "$JAX_SPEC"
fi
missing=$("$PYTHON" -c 'import importlib.util as u; print(" ".join(m for m in ("flax", "optax", "orbax", "ml_collections", "clu", "tensorflow") if u.find_spec(m) is None))')
if [ -n "$missing" ]; then
  echo "error: Python packages missing here: $missing. Pure-Python ones travel in .gpu_vendor/ (add them to VENDORED_PACKAGES and run --prepare where they are installed); dunet_jax.train must import without the others." >&2
  exit 1
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv,noheader >&2
"$PYTHON" -c 'import jax, flax, optax; print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__, jax.devices())' >&2

export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}"
cd "$REPO_ROOT"
result=$("$PYTHON" benchmarks/train_step.py --preset=r50_os16 --dtype=bf16 --batch_size="$BATCH_SIZE" \
  --crop="$CROP" --steps="$STEPS" --warmup="$WARMUP" --peak_flops="$PEAK_FLOPS")
echo "$result"
if [ -n "${OUT:-}" ]; then
  echo "$result" > "$OUT/train_step_h200.json"
fi
