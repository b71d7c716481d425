#!/usr/bin/env bash
# One H200, from a bare machine: DUNet-ResNet-50 (output stride 16) train step in bf16, batch 16,
# 512x512 (step time, images/s, MFU), then the training input pipeline on this host's CPU cores.
#   git clone <repo> dunet_jax && cd dunet_jax && bash benchmarks/gpu_h200.sh
# Budget, under 5 minutes: installing with README's CUDA line when jax has no GPU here (1-2 min on a
# cloud network; skipped when the packages are there), compiling the step (1-2 min), 3 + 20 steps
# (seconds), the input pipeline (about 1 min: building its dataset, then 3 x SECONDS of timing).
# Prints the two benchmarks' JSON lines and a summary line; with $OUT set, also writes them there.
# MFU is printed against the datasheet's 989e12 bf16 FLOP/s (dunet_jax/throughput.py) and against
# MATMUL_FLOPS, the bf16 matmul rate measured on these machines (790e12; see .library KINDS.md).
# The input pipeline reads the six VOC samples in ../shared/data/voc2012_labels (LABELS_DIR) when
# present, else six generated 500x375 stand-in scenes (benchmarks/input_pipeline.py --stand_in).
#
# Checking this script on a CPU machine, at a tiny size:
#   ALLOW_CPU=1 PRESET=tiny CROP=64 BATCH_SIZE=2 STEPS=1 WARMUP=0 SECONDS_PER_MEASUREMENT=1 bash benchmarks/gpu_h200.sh
#
# A machine with no network (this project's device machines: CUDA jax is preinstalled, other
# packages are not): run `bash benchmarks/gpu_h200.sh --prepare` where the packages are installed,
# which copies the pure-Python ones and the VOC samples into .gpu_vendor/, and carry that folder.
set -euo pipefail

JAX_SPEC="${JAX_SPEC:-jax[cuda12]==0.10.2}"   # README's CUDA 12 line; jax[cuda13]==0.10.2 for a CUDA 13 driver
MATMUL_FLOPS="${MATMUL_FLOPS:-790e12}"
BATCH_SIZE="${BATCH_SIZE:-16}"
CROP="${CROP:-512}"
STEPS="${STEPS:-20}"
WARMUP="${WARMUP:-3}"
SECONDS_PER_MEASUREMENT="${SECONDS_PER_MEASUREMENT:-10}"
PYTHON="${PYTHON:-python3}"
PRESET="${PRESET:-r50_os16}"   # benchmarks/train_step.py's presets
ALLOW_CPU="${ALLOW_CPU:-0}"   # 1: run on whatever jax finds (checking this script without a GPU)
VENDORED_PACKAGES="${VENDORED_PACKAGES:-ml_collections clu}"  # pure-Python packages a CUDA image may lack

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENDOR_DIR="$REPO_ROOT/.gpu_vendor"
LABELS_DIR="${LABELS_DIR:-$REPO_ROOT/../shared/data/voc2012_labels}"
[ -d "$LABELS_DIR/JPEGImages" ] || LABELS_DIR="$VENDOR_DIR/voc2012_labels"

if [ "${1:-}" = --prepare ]; then
  mkdir -p "$VENDOR_DIR/voc2012_labels/SegmentationClass"
  for package in $VENDORED_PACKAGES; do
    source_dir=$("$PYTHON" -c "import $package, os; print(os.path.dirname($package.__file__))")
    cp -r "$source_dir" "$VENDOR_DIR/"
    echo "copied $source_dir to $VENDOR_DIR/"
  done
  shared="$REPO_ROOT/../shared/data/voc2012_labels"
  if [ -d "$shared/JPEGImages" ]; then  # only the six samples with JPEGs (0.6 MB), not every label
    cp -r "$shared/JPEGImages" "$shared/lists" "$VENDOR_DIR/voc2012_labels/"
    for jpeg in "$shared"/JPEGImages/*.jpg; do
      cp "$shared/SegmentationClass/$(basename "$jpeg" .jpg).png" "$VENDOR_DIR/voc2012_labels/SegmentationClass/"
    done
    echo "copied the VOC samples of $shared to $VENDOR_DIR/voc2012_labels"
  fi
  exit 0
fi

cd "$REPO_ROOT"
if [ -d "$VENDOR_DIR" ]; then
  export PYTHONPATH="$VENDOR_DIR${PYTHONPATH:+:$PYTHONPATH}"
fi
missing() {
  "$PYTHON" - <<'EOF'
import importlib.util, os
names = [m for m in ('flax', 'optax', 'orbax', 'ml_collections', 'clu', 'tensorflow', 'tensorflow_datasets')
         if importlib.util.find_spec(m) is None]
try:
  import jax
  if jax.default_backend() != 'gpu' and os.environ.get('ALLOW_CPU') != '1':
    names.append('jax-with-CUDA')
except ImportError:
  names.append('jax')
print(' '.join(names))
EOF
}
export ALLOW_CPU
needed=$(missing 2>/dev/null)
if [ -n "$needed" ]; then
  echo "missing here: $needed. Installing with README's CUDA line: pip install -r requirements.txt \"$JAX_SPEC\"" >&2
  if ! "$PYTHON" -m pip install --quiet -r requirements.txt "$JAX_SPEC"; then
    echo "error: the install failed (no network?). On a machine without one, run --prepare where the packages are and carry .gpu_vendor/ (see the top of this script)." >&2
    exit 1
  fi
  needed=$(missing)
  if [ -n "$needed" ]; then
    echo "error: still missing after the install: $needed (a CUDA 13 driver needs JAX_SPEC='jax[cuda13]==0.10.2')" >&2
    exit 1
  fi
fi
! command -v nvidia-smi >/dev/null || nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv,noheader >&2
"$PYTHON" -c 'import jax, flax, optax; print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__, jax.devices())' >&2

export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}"
train_step=$("$PYTHON" benchmarks/train_step.py --preset="$PRESET" --dtype=bf16 --batch_size="$BATCH_SIZE" \
  --crop="$CROP" --steps="$STEPS" --warmup="$WARMUP")
echo "$train_step"
step_time=$(echo "$train_step" | "$PYTHON" -c 'import json, sys; print(json.load(sys.stdin)["step_time_s"])')

if [ -d "$LABELS_DIR/JPEGImages" ]; then
  pipeline_data=(--labels_dir="$LABELS_DIR")
else
  pipeline_data=(--stand_in)
fi
pipeline_log=$(mktemp)  # TFDS's progress bars; shown if the benchmark fails
if ! input_pipeline=$("$PYTHON" benchmarks/input_pipeline.py "${pipeline_data[@]}" --crop_size="$CROP" \
    --batch_size="$BATCH_SIZE" --step_time="$step_time" --seconds="$SECONDS_PER_MEASUREMENT" 2>"$pipeline_log"); then
  tail -n 20 "$pipeline_log" >&2
  exit 1
fi
echo "$input_pipeline"

summary=$(MATMUL_FLOPS="$MATMUL_FLOPS" "$PYTHON" -c '
import json, os, sys
step, pipe = (json.loads(line) for line in sys.argv[1:3])
matmul = float(os.environ["MATMUL_FLOPS"])
print(json.dumps({
  "summary": "gpu_h200", "device_kind": step["device_kind"], "batch_size": step["batch_size"],
  "crop": step["crop"], "compute_dtype": step["compute_dtype"], "compile_s": step["compile_s"],
  "step_time_s": round(step["step_time_s"], 4), "images_per_s": round(step["images_per_s"], 1),
  "tflop_per_step": round(step["flops_per_step"] / 1e12, 3),
  "mfu_datasheet_peak": step["mfu"] and round(step["mfu"], 3), "datasheet_peak": step["peak_flops_per_device"],
  "mfu_measured_matmul": round(step["achieved_flops_per_s"] / matmul, 3), "measured_matmul": matmul,
  "host_cores": pipe["cores"], "pipeline_images_per_s_all_cores": pipe["train_images_per_s_all_cores"],
  "pipeline_images_per_s_one_core": pipe["train_images_per_s_one_thread"],
  "host_cores_needed": pipe["host_cores_needed"], "pipeline_dataset": pipe["dataset"]}))
' "$train_step" "$input_pipeline")
echo "$summary"
if [ -n "${OUT:-}" ]; then
  printf '%s\n' "$train_step" > "$OUT/train_step_h200.json"
  printf '%s\n' "$input_pipeline" > "$OUT/input_pipeline_h200.json"
  printf '%s\n' "$summary" > "$OUT/summary_h200.json"
fi
