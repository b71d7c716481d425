"""Speed of the real jitted train step (dunet_jax.train.make_train_step); prints one JSON line.

  python benchmarks/train_step.py                       # DUNet-ResNet-50, OS 16, 512x512, batch 2
  python benchmarks/train_step.py --dtype=bf16 --batch_size=16 --peak_flops=790e12   # an H200
  python benchmarks/train_step.py --dtype=both   # CPU: float32 and bf16 (and the PyTorch peer) in one run

Reports the median step time, images/s, model FLOPs per step (XLA cost analysis of the compiled
step, 2 per multiply-add), achieved FLOP/s and MFU against the chip's peak. On CPU, where a peak
means little, it times a large float32 matmul on its own before the steps (best of
--matmul_repeats: the machine's attainable FLOP/s) and reports the step's fraction of that rate.
It runs as `dunet_jax.main` does: restarted once with huge pages for the heap
(dunet_jax/huge_pages.py; 'glibc_tunables', and the timed steps' 'page_faults_per_step' and
'kernel_s_per_step') and with its XLA:CPU flags (dunet_jax/cpu_flags.py; 'xla_flags'). When torch
and torchvision are importable (CPU runs), it also times their DeepLabV3-ResNet-50 at output
stride 16 on the same batch (SGD step, float32 and bf16 autocast with channels_last) and reports
the step-time ratios DUNet / PyTorch.
The batch is split over all local devices; images and labels are random (speed does not depend
on their values).
"""
import argparse
import json
import os
import pathlib
import resource
import statistics
import sys
import time
from typing import Any, Callable

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from dunet_jax import cpu_flags, huge_pages  # noqa: E402

huge_pages.reexec()  # huge pages for the heap, as dunet_jax's commands get (dunet_jax/huge_pages.py)

cpu_flags.apply()  # the same XLA:CPU flags as dunet_jax.main, before jax starts

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import default  # noqa: E402
from dunet_jax import sharding, throughput, train, train_state  # noqa: E402
from dunet_jax.data import IGNORE_LABEL  # noqa: E402

import torch_peer  # noqa: E402  (benchmarks/torch_peer.py: runs torch in a process of its own)

# Model overrides of configs/default.py per preset.
PRESETS: dict[str, dict[str, Any]] = {
  'r50_os16': {'depth': 50, 'output_stride': 16},
  'r50_os8': {'depth': 50, 'output_stride': 8},
  'r101_os16': {'depth': 101, 'output_stride': 16},
  'tiny': {'depth': 0, 'stage_blocks': (1, 1, 1, 1), 'base_width': 16, 'decoder_channels': 16,
           'fuse_channels': 8, 'num_components': 16, 'fuse_features': ('b1u1c3',)},
}
DTYPES = {'f32': 'float32', 'bf16': 'bfloat16'}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--preset', default='r50_os16', choices=sorted(PRESETS))
  parser.add_argument('--batch_size', type=int, default=2, help='global batch, split over all devices')
  parser.add_argument('--crop', type=int, default=512, help='square image size')
  parser.add_argument('--dtype', default='auto', choices=['auto', 'both', *DTYPES],
                      help='compute dtype; auto = f32 on CPU, bf16 elsewhere; both = f32 and bf16 in '
                           'one run (one JSON line each, the PyTorch peer timed once for both)')
  parser.add_argument('--cpu_conv', default='matmul', choices=['matmul', 'xla'],
                      help='model.cpu_conv: how 3x3 convolutions run on CPU (dunet_jax/models/cpu_conv.py)')
  parser.add_argument('--steps', type=int, default=3, help='timed steps (after --warmup untimed ones)')
  parser.add_argument('--warmup', type=int, default=1)
  parser.add_argument('--peak_flops', type=float, default=0.0,
                      help='peak FLOP/s per chip for MFU; 0 = from the device kind (none on CPU)')
  parser.add_argument('--matmul_size', type=int, default=2048,
                      help='n of the n x n x n float32 reference matmul (0 = skip it)')
  parser.add_argument('--matmul_repeats', type=int, default=10, help='the reference matmul\'s best of N')
  parser.add_argument('--torch', default='auto', choices=['auto', 'yes', 'no'],
                      help='time the PyTorch peer (DeepLabV3-R50-OS16, always on CPU); auto: for r50_os16 '
                           'on CPU when torch and torchvision are installed (batch >= 2: ASPP pooling BN)')
  args = parser.parse_args(argv)
  if args.steps < 1 or args.warmup < 0 or args.batch_size < 1 or args.crop < 32:
    parser.error('need --steps >= 1, --warmup >= 0, --batch_size >= 1 and --crop >= 32')
  return args


def make_config(args: argparse.Namespace, platform: str, dtype: str | None = None):
  config = default.get_config()
  for key, value in PRESETS[args.preset].items():
    setattr(config.model, key, value)
  dtype = dtype or args.dtype
  dtype = dtype if dtype != 'auto' else ('f32' if platform == 'cpu' else 'bf16')
  config.model.compute_dtype = DTYPES[dtype]
  config.model.cpu_conv = args.cpu_conv
  config.train.batch_size = args.batch_size
  config.data.crop_size = args.crop
  config.train.peak_flops = args.peak_flops
  return config


def timed(call: Callable[[], Any]) -> tuple[float, float]:
  """(wall seconds, process CPU seconds) of one call, waiting for its result."""
  wall, cpu = time.perf_counter(), time.process_time()
  jax.block_until_ready(call())
  return time.perf_counter() - wall, time.process_time() - cpu


def best_matmul(n: int, repeats: int) -> dict[str, float]:
  """Fastest of `repeats` jitted n x n x n float32 matmuls, timed on their own: the CPU's attainable
  FLOP/s ({'wall_s', 'cpu_s'}, best of each). Timed right after each train step instead, the same
  matmul ran at about half this rate (issue #17), which overstated the step's fraction of it."""
  key_a, key_b = jax.random.split(jax.random.key(0))
  a = jax.random.normal(key_a, (n, n), jnp.float32)
  b = jax.random.normal(key_b, (n, n), jnp.float32)
  matmul = jax.jit(jnp.dot)
  jax.block_until_ready(matmul(a, b))
  times = [timed(lambda: matmul(a, b)) for _ in range(repeats)]
  return {'wall_s': min(wall for wall, _ in times), 'cpu_s': min(cpu for _, cpu in times)}


def random_batch(config, rng: np.random.Generator) -> dict[str, np.ndarray]:
  shape = (config.train.batch_size, config.data.crop_size, config.data.crop_size)
  labels = rng.integers(0, config.data.num_classes, shape, dtype=np.uint8)
  labels[:, :, :8] = IGNORE_LABEL
  return {'image': rng.integers(0, 256, (*shape, 3), dtype=np.uint8), 'label': labels}


def benchmark(args: argparse.Namespace, dtype: str | None = None) -> dict[str, Any]:
  device = jax.devices()[0]
  config = make_config(args, device.platform, dtype)
  mesh = sharding.make_mesh(config.mesh, jax.local_devices())
  rng = np.random.default_rng(0)
  ratio = config.model.output_stride
  w = rng.standard_normal((ratio * ratio * config.data.num_classes, config.model.num_components))
  state, shardings = train_state.create_train_state(config, w.astype(np.float32), mesh)
  train_step = train.make_train_step(mesh, shardings)
  batch = sharding.to_global(random_batch(config, rng), mesh)

  start = time.perf_counter()
  compiled = train_step.lower(state, batch).compile()
  compile_seconds = time.perf_counter() - start
  flops_per_step = throughput.step_flops(compiled)

  def one_step():
    nonlocal state
    state, step_metrics = compiled(state, batch)
    return step_metrics['loss']

  reference = (best_matmul(args.matmul_size, args.matmul_repeats)
               if device.platform == 'cpu' and args.matmul_size else None)
  for _ in range(args.warmup):
    jax.block_until_ready(one_step())
  step_times, step_cpu_times = [], []
  usage_before = resource.getrusage(resource.RUSAGE_SELF)
  for _ in range(args.steps):
    wall, cpu = timed(one_step)
    step_times.append(wall)
    step_cpu_times.append(cpu)
  usage_after = resource.getrusage(resource.RUSAGE_SELF)
  step_time = statistics.median(step_times)
  achieved = flops_per_step / step_time
  peak = throughput.resolve_peak_flops(config.train.peak_flops, device)
  mfu = throughput.mfu(flops_per_step, step_time, mesh.size, peak)
  xla_flags = os.environ.get('XLA_FLAGS', '')
  result = {
    'benchmark': 'train_step', 'preset': args.preset, 'backend': device.platform,
    'device_kind': device.device_kind, 'num_devices': mesh.size, 'batch_size': args.batch_size,
    'crop': args.crop, 'compute_dtype': config.model.compute_dtype, 'cpu_conv': args.cpu_conv,
    'steps': args.steps,
    'compile_s': round(compile_seconds, 2), 'step_time_s': step_time, 'step_times_s': step_times,
    'images_per_s': args.batch_size / step_time, 'flops_per_step': flops_per_step,
    'achieved_flops_per_s': achieved, 'peak_flops_per_device': peak,
    'mfu': None if np.isnan(mfu) else mfu,
    'jax_version': jax.__version__, 'xla_flags': xla_flags,
    'glibc_tunables': os.environ.get('GLIBC_TUNABLES', ''),
    # Page faults and kernel time of the timed steps (dunet_jax/huge_pages.py says why they matter).
    'page_faults_per_step': (usage_after.ru_minflt - usage_before.ru_minflt) / args.steps,
    'kernel_s_per_step': (usage_after.ru_stime - usage_before.ru_stime) / args.steps,
    'cpu_flags': {option: option in xla_flags for option in cpu_flags.CPU_OPTIONS},
  }
  if reference:
    matmul_flops = 2.0 * args.matmul_size ** 3
    step_cpu = statistics.median(step_cpu_times)
    result.update({
      'matmul_size': args.matmul_size, 'matmul_repeats': args.matmul_repeats,
      'matmul_flops_per_s': matmul_flops / reference['wall_s'],
      'fraction_of_matmul': achieved / (matmul_flops / reference['wall_s']),
      'fraction_of_matmul_cpu_time': (flops_per_step / step_cpu) / (matmul_flops / reference['cpu_s']),
      'step_cpu_s': step_cpu, 'matmul_cpu_s': reference['cpu_s']})
  return result


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  results = [benchmark(args, dtype) for dtype in (('f32', 'bf16') if args.dtype == 'both' else (None,))]
  if args.torch == 'yes' or (args.torch == 'auto' and jax.devices()[0].platform == 'cpu'
                             and args.preset == 'r50_os16' and args.batch_size >= 2
                             and torch_peer.available()):
    peers = torch_peer.run(args.batch_size, args.crop, default.get_config().data.num_classes,
                           steps=args.steps, warmup=args.warmup)
    for result in results:
      for name, peer in peers.items():
        result[f'torch_{name}_step_time_s'] = peer
        result[f'dunet_over_torch_{name}'] = result['step_time_s'] / peer
  for result in results:
    print(json.dumps(result))


if __name__ == '__main__':
  main()
