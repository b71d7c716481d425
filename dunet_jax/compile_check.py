"""Before you pay for a Cloud TPU slice: compile the real train and eval steps for it on this machine.

  pip install -r requirements-tpu-check.txt     # libtpu, the TPU compiler (~200 MB; not for training)
  python -m dunet_jax.compile_check --config=configs/voc.py:r50_os16 --topology=v5e-16 \
      --config.eval.batch_size=16

Deviceless ahead-of-time compilation: `jax.experimental.topologies` describes the slice's chips
without any TPU attached, the mesh is built from them (`sharding.make_mesh`), and the functions
training runs (`train.make_train_step` on a `train_state.TrainState`, `evaluate.make_eval_step`) are compiled for it
with the
same shardings, donation and dtypes, on abstract inputs (no data, no W fit: W is zeros of its
shape). Prints a table and one JSON line:

- memory per chip (XLA's memory_analysis: arguments + outputs - donated aliases + temporaries +
  code) against the chip's HBM; a config that does not fit is refused with the keys to lower;
- FLOPs per step and per image (XLA's cost analysis of the compiled TPU program, 2 per
  multiply-add), the step time at the chip's peak and at --mfu, and train.num_steps' duration;
- the collectives in the compiled train step (all-reduce etc.: BatchNorm statistics are reduced
  over the global batch about 100 times a step) with a latency + bandwidth model added to the
  step time: each collective costs --collective_latency_us plus its bytes (2x for an all-reduce,
  a ring's send + receive) over the chip's ICI bandwidth, with no overlap with compute, so the
  estimate errs on the slow side;
- the images/s each host's input pipeline must deliver to keep up, and a recommended slice.

The number in a slice name counts chips for v5e and v6e (v5e-16 is 16 chips) and TensorCores for
v4 and v5p (v4-8 is 4 chips: jax sees one device per chip, the two cores run as one 'megacore').
A raw topology (v5e:4x4, v4:2x2x2) is accepted too. Every chip needs whole images: a global
batch smaller than (or not a multiple of) the chip count is refused, naming train.batch_size.
"""
from dunet_jax import cli  # first: prepares the process before TensorFlow and jax load

import dataclasses
import json
import math
import os
import re
import time
from typing import Any

# The steps are compiled for the TPU topology; nothing runs, so jax itself needs only its CPU backend
# (this keeps it from trying to start a TPU runtime when libtpu is installed on a machine without one).
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
from absl import flags  # noqa: E402
from flax import nnx  # noqa: E402

from dunet_jax import evaluate, sharding, throughput, train, train_state  # noqa: E402
from dunet_jax.models import dunet  # noqa: E402

GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Generation:
  """How Cloud TPU names and lays out one TPU generation."""
  topology_prefix: str   # libtpu's name in a topology string ('v5e:4x4', 'v5:2x2x1')
  grid_dims: int         # 2-D (v5e, v6e) or 3-D (v4, v5p) chip grid
  cores_per_chip: int    # what the number in the slice name counts per chip
  single_host_chips: int  # the largest slice one host drives; bigger slices have 4 chips per host
  ici_bytes_per_s: float  # inter-chip interconnect bandwidth per chip, all links


# ICI bandwidth per chip from the Cloud TPU system architecture pages ('Interchip Interconnect BW':
# v4 2,400 Gbps, v5e 1,600 Gbps, v5p 4,800 Gbps, v6e 3,584 Gbps). Peak FLOP/s and HBM per chip are
# dunet_jax/throughput.py's tables.
GENERATIONS: dict[str, Generation] = {
  'v4': Generation('v4', 3, 2, 4, 2400e9 / 8),
  'v5e': Generation('v5e', 2, 1, 8, 1600e9 / 8),
  'v5p': Generation('v5', 3, 2, 4, 4800e9 / 8),
  'v6e': Generation('v6e', 2, 1, 8, 3584e9 / 8),
}
_LIBTPU_PREFIXES = {generation.topology_prefix: name for name, generation in GENERATIONS.items()}


@dataclasses.dataclass(frozen=True)
class TpuSlice:
  name: str                # as Cloud TPU names it: 'v5e-16'
  generation: str          # 'v5e'
  chips: int
  grid: tuple[int, ...]    # chips along each axis: (4, 4)

  @property
  def topology(self) -> str:
    return f'{GENERATIONS[self.generation].topology_prefix}:{"x".join(map(str, self.grid))}'

  @property
  def chips_per_host_bounds(self) -> tuple[int, int, int]:
    if self.chips <= GENERATIONS[self.generation].single_host_chips:
      return (*self.grid, 1) if len(self.grid) == 2 else tuple(self.grid)
    return (2, 2, 1)


def _grid(chips: int, dims: int) -> tuple[int, ...]:
  """Cloud TPU's chip grid for a power-of-two slice: 16 -> 4x4 (2-D); 8 -> 2x2x2, 32 -> 2x4x4 (3-D)."""
  grid = [1] * dims if dims == 2 or chips < 4 else [2, 2, 1]
  while math.prod(grid) < chips:
    smallest = min(grid)
    grid[max(i for i, size in enumerate(grid) if size == smallest)] *= 2
  return tuple(grid)


def parse_slice(name: str) -> TpuSlice:
  """'v5e-16', 'v4-32' (TensorCores: 16 chips) or a raw topology 'v5e:4x4', 'v4:2x2x4'."""
  match = re.fullmatch(r'(v4|v5e|v5p|v6e|v5litepod)-(\d+)', name)
  if match:
    generation = 'v5e' if match.group(1) == 'v5litepod' else match.group(1)
    cores = int(match.group(2))
    chips = cores // GENERATIONS[generation].cores_per_chip
    if chips < 1 or chips & (chips - 1) or cores % GENERATIONS[generation].cores_per_chip:
      raise ValueError(f'--topology={name}: this tool knows power-of-two slices (e.g. {generation}-'
                       f'{4 * GENERATIONS[generation].cores_per_chip}); give other shapes as a topology '
                       f'like {GENERATIONS[generation].topology_prefix}:4x4')
    return TpuSlice(name, generation, chips, _grid(chips, GENERATIONS[generation].grid_dims))
  match = re.fullmatch(r'(v4|v5e|v5|v6e):(\d+(?:x\d+)+)', name)
  if match:
    generation = _LIBTPU_PREFIXES[match.group(1)]
    grid = tuple(int(size) for size in match.group(2).split('x'))
    if len(grid) != GENERATIONS[generation].grid_dims or min(grid) < 1:
      raise ValueError(f'--topology={name}: {generation} chips form a {GENERATIONS[generation].grid_dims}-D grid')
    return TpuSlice(name, generation, math.prod(grid), grid)
  raise ValueError(f'--topology={name!r}: name a Cloud TPU slice (v5e-16, v6e-8, v4-8, v4-32, v5p-8; '
                   'v4-N and v5p-N count TensorCores, two per chip) or a topology (v5e:4x4, v4:2x2x2)')


def topology_devices(tpu_slice: TpuSlice) -> list[jax.Device]:
  """The slice's chips as compile-only devices (needs libtpu, never a TPU)."""
  from jax.experimental import topologies
  # libtpu takes a machine-wide lock for the TPU it drives; compiling needs none, and without this a
  # second check (or a training run on a TPU VM) would stop this one.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  generation = GENERATIONS[tpu_slice.generation]
  options = {'chips_per_host_bounds': tpu_slice.chips_per_host_bounds}
  if generation.cores_per_chip == 2:
    options['chip_config_name'] = 'megacore'
  try:
    return list(topologies.get_topology_desc(tpu_slice.topology, 'tpu', **options).devices)
  except RuntimeError as error:
    if 'TPU support not installed' in str(error):
      raise ModuleNotFoundError(
          'libtpu (the TPU compiler) is not installed: pip install -r requirements-tpu-check.txt '
          '(it is only needed by this check, never for training)') from error
    raise


# --- The compiled programs -------------------------------------------------------------------------

def compile_train_step(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> jax.stages.Compiled:
  """train.make_train_step on an abstract TrainState and batch, laid out as training lays them out
  (train_state.create_train_state's structure and shardings, without making any array)."""
  model = nnx.eval_shape(lambda: dunet.DUNet(config.model, config.data.num_classes, reconstruction=None,
                                             rngs=nnx.Rngs(config.seed)))
  model.train()
  graphdef, params, model_state = train_state.split_model(model)
  tx = train_state.make_optimizer(config, params)
  state = train_state.TrainState(graphdef=graphdef, tx=tx, params=params, model_state=model_state,
                                 opt_state=jax.eval_shape(tx.init, params))
  shardings = sharding.tree_shardings(mesh, state)
  size, batch_size = config.data.crop_size, config.train.batch_size
  batch = {'image': jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.uint8),
           'label': jax.ShapeDtypeStruct((batch_size, size, size), jnp.uint8)}
  step = train.make_train_step(mesh, shardings)
  return step.lower(train_state.abstract(state, shardings), batch).compile()


def compile_eval_step(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> jax.stages.Compiled:
  """evaluate.make_eval_step (config.eval's scales, flip and window) on the training layout of the state."""
  model = nnx.eval_shape(lambda: dunet.DUNet(config.model, config.data.num_classes, reconstruction=None,
                                             rngs=nnx.Rngs(config.seed)))
  model.eval()
  graphdef, state = nnx.split(model)
  window = int(config.data.crop_size) if config.eval.sliding_window else None
  step = evaluate.make_eval_step(graphdef, mesh, num_classes=int(config.data.num_classes),
                                 scales=tuple(float(s) for s in config.eval.scales),
                                 flip=bool(config.eval.flip), window=window)
  batch_size, size = config.eval.batch_size, config.data.eval_pad_size
  batch = sharding.batch_sharding(mesh)
  images = jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.uint8, sharding=batch)
  labels = jax.ShapeDtypeStruct((batch_size, size, size), jnp.uint8, sharding=batch)
  valid = jax.ShapeDtypeStruct((batch_size,), jnp.bool_, sharding=batch)
  return step.lower(train_state.abstract(state, sharding.tree_shardings(mesh, state)), images, labels,
                    valid).compile()


# --- What the compiled programs say ------------------------------------------------------------------

def memory_per_chip(compiled: jax.stages.Compiled) -> dict[str, int]:
  """Bytes one chip holds while the program runs: donated inputs are counted once."""
  stats = compiled.memory_analysis()
  stats = stats[0] if isinstance(stats, (list, tuple)) else stats
  memory = {'argument_bytes': int(stats.argument_size_in_bytes), 'output_bytes': int(stats.output_size_in_bytes),
            'alias_bytes': int(stats.alias_size_in_bytes), 'temp_bytes': int(stats.temp_size_in_bytes),
            'code_bytes': int(stats.generated_code_size_in_bytes)}
  memory['total_bytes'] = (memory['argument_bytes'] + memory['output_bytes'] - memory['alias_bytes']
                           + memory['temp_bytes'] + memory['code_bytes'])
  return memory


COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'collective-permute', 'all-to-all')
_COLLECTIVE_RE = re.compile(r'=\s*(\(.*?\)|\S+)\s+(' + '|'.join(COLLECTIVES) + r')(-start)?\(')
_ARRAY_RE = re.compile(r'\b(pred|[suf]\d+|bf16|f8e\w+|c64|c128)\[([\d,]*)\]')
_DTYPE_BYTES = {'pred': 1, 'bf16': 2, 'c64': 8, 'c128': 16}


def _array_bytes(shape_text: str) -> int:
  total = 0
  for dtype, dims in _ARRAY_RE.findall(shape_text):
    size = _DTYPE_BYTES.get(dtype) or max(int(re.sub(r'\D', '', dtype[:3]) or 8) // 8, 1)
    total += size * math.prod(int(d) for d in dims.split(',') if d)
  return total


def count_collectives(hlo_text: str) -> dict[str, dict[str, int]]:
  """{op: {'count', 'bytes'}} of the collectives in an optimised HLO module (per chip).

  An async all-reduce-start's result is the reduced arrays, as a synchronous all-reduce's; the other
  ops' '-start' results hold their operands and their results, so half of those bytes are counted.
  """
  counts = {op: {'count': 0, 'bytes': 0} for op in COLLECTIVES}
  for shape, op, start in _COLLECTIVE_RE.findall(hlo_text):
    counts[op]['count'] += 1
    counts[op]['bytes'] += _array_bytes(shape) // (2 if start and op != 'all-reduce' else 1)
  return counts


def collective_seconds(counts: dict[str, dict[str, int]], latency_s: float, ici_bytes_per_s: float) -> float:
  """latency per collective + its bytes over ICI (an all-reduce moves them twice), no overlap."""
  return sum(c['count'] * latency_s + c['bytes'] * (2 if op == 'all-reduce' else 1) / ici_bytes_per_s
             for op, c in counts.items())


# --- The check --------------------------------------------------------------------------------------

def check_batch_sizes(config: ml_collections.ConfigDict, tpu_slice: TpuSlice) -> None:
  """Every chip needs the same number of whole images, in training and in evaluation."""
  chips = tpu_slice.chips
  for key, value in (('train.batch_size', config.train.batch_size), ('eval.batch_size', config.eval.batch_size)):
    if value % chips:
      fix = chips * max(1, round(value / chips))
      raise ValueError(
          f'config.{key}={value} does not split into whole images over the {chips} chips of {tpu_slice.name}: '
          f'pass --config.{key}={fix}' + (f' or choose a slice of at most {value} chips' if value < chips else '')
          + '. (A smaller global batch than chips is not supported: every chip holds at least one image.)')


@dataclasses.dataclass
class CompiledSteps:
  """The train and eval steps compiled for a slice, and how long compiling them took."""
  tpu_slice: TpuSlice
  devices: list[jax.Device]
  mesh: jax.sharding.Mesh
  train: jax.stages.Compiled
  eval: jax.stages.Compiled
  compile_s: dict[str, float]


def compile_steps(config: ml_collections.ConfigDict, tpu_slice: TpuSlice) -> CompiledSteps:
  """Both steps compiled for the slice (minutes for a full-size preset; seconds for a tiny one)."""
  check_batch_sizes(config, tpu_slice)
  devices = topology_devices(tpu_slice)
  mesh = sharding.make_mesh(config.mesh, devices)
  started = time.perf_counter()
  train_compiled = compile_train_step(config, mesh)
  train_s = time.perf_counter() - started
  eval_compiled = compile_eval_step(config, mesh)
  eval_s = time.perf_counter() - started - train_s
  return CompiledSteps(tpu_slice, devices, mesh, train_compiled, eval_compiled,
                       {'train': round(train_s, 1), 'eval': round(eval_s, 1)})


def estimate(config: ml_collections.ConfigDict, steps: CompiledSteps, *, mfu: float = 0.4,
             collective_latency_s: float = 20e-6, hbm_bytes: float | None = None) -> dict[str, Any]:
  """Memory, fit, FLOPs, collectives, time and input rate of the compiled steps (the JSON line)."""
  tpu_slice, kind = steps.tpu_slice, steps.devices[0].device_kind
  peak = throughput.peak_flops_for_device_kind(kind)
  hbm = hbm_bytes or throughput.hbm_bytes_for_device_kind(kind)
  hosts = len({device.process_index for device in steps.devices})
  flops = throughput.step_flops(steps.train)
  collectives = count_collectives(steps.train.as_text())
  comm_s = collective_seconds(collectives, collective_latency_s, GENERATIONS[tpu_slice.generation].ici_bytes_per_s)
  compute_at_peak_s = flops / (tpu_slice.chips * peak)
  step_s = compute_at_peak_s / mfu + comm_s
  batch = config.train.batch_size
  train_memory, eval_memory = memory_per_chip(steps.train), memory_per_chip(steps.eval)
  result = {
    'topology': tpu_slice.name, 'libtpu_topology': tpu_slice.topology, 'device_kind': kind,
    'chips': tpu_slice.chips, 'hosts': hosts, 'mesh': dict(steps.mesh.shape),
    'batch_size': batch, 'images_per_chip': batch // tpu_slice.chips, 'crop_size': config.data.crop_size,
    'compute_dtype': config.model.compute_dtype,
    'hbm_bytes_per_chip': int(hbm), 'train_memory': train_memory, 'eval_memory': eval_memory,
    'fits': max(train_memory['total_bytes'], eval_memory['total_bytes']) <= hbm,
    'flops_per_step': flops, 'flops_per_image': flops / batch,
    'peak_flops_per_chip': peak, 'mfu': mfu,
    'collectives': collectives, 'collective_count': sum(c['count'] for c in collectives.values()),
    'collective_latency_us': round(collective_latency_s * 1e6, 3), 'collective_s': comm_s,
    'step_s_at_peak': compute_at_peak_s, 'step_s': step_s,
    'num_steps': config.train.num_steps, 'train_hours': step_s * config.train.num_steps / 3600,
    'train_hours_at_peak': compute_at_peak_s * config.train.num_steps / 3600,
    'images_per_s': batch / step_s, 'images_per_s_per_host': batch / step_s / hosts,
    'compile_s': steps.compile_s,
  }
  result['recommended_topology'] = recommend_slice(result, tpu_slice)
  return result


def recommend_slice(result: dict[str, Any], tpu_slice: TpuSlice) -> str | None:
  """The smallest slice of this generation Cloud TPU offers (v5e and v6e: 1, 4, 8, 16, ... chips;
  v4 and v5p: 4, 8, 16, ...) whose chips split the batch into whole
  images and whose memory, extrapolated from this compile (temporaries in proportion to the images
  per chip, the rest per chip as it is), stays under 90% of HBM: compute-bound chip-hours are about
  the same on any slice, and a smaller one spends less of each step in collectives."""
  memory = result['train_memory']
  fixed = memory['total_bytes'] - memory['temp_bytes']
  temp_per_image = memory['temp_bytes'] / result['images_per_chip']
  generation = GENERATIONS[tpu_slice.generation]
  chips = 1 if generation.grid_dims == 2 else 4
  while chips <= result['batch_size']:
    if result['batch_size'] % chips == 0 and (
        fixed + temp_per_image * result['batch_size'] / chips <= 0.9 * result['hbm_bytes_per_chip']):
      return f'{tpu_slice.generation}-{chips * generation.cores_per_chip}'
    chips = 4 if chips == 1 else 2 * chips
  return None


def refusal(result: dict[str, Any]) -> str | None:
  """The message for a config that does not fit the slice's HBM, None if it fits."""
  if result['fits']:
    return None
  worst = max(result['train_memory']['total_bytes'], result['eval_memory']['total_bytes'])
  return (f'Does not fit: {worst / GIB:.2f} GiB per chip needed, {result["topology"]} has '
          f'{result["hbm_bytes_per_chip"] / GIB:.2f} GiB of HBM per chip. Lower config.train.batch_size '
          f'(or config.eval.batch_size), config.data.crop_size, or shard the parameters and optimizer '
          f'state with config.mesh.fsdp (e.g. --config.mesh.fsdp=2), or use a larger slice.')


def format_table(result: dict[str, Any]) -> str:
  gib = lambda n: f'{n / GIB:.2f} GiB'  # noqa: E731
  train_memory, eval_memory = result['train_memory'], result['eval_memory']
  counts = ', '.join(f'{c["count"]} {op}' for op, c in result['collectives'].items() if c['count'])
  rows = [
    ('slice', f'{result["topology"]} ({result["libtpu_topology"]}): {result["chips"]} chips '
              f'({result["device_kind"]}), {result["hosts"]} host(s), mesh {result["mesh"]}'),
    ('batch', f'{result["batch_size"]} x {result["crop_size"]}^2 ({result["images_per_chip"]} per chip), '
              f'{result["compute_dtype"]}'),
    ('train memory / chip', f'{gib(train_memory["total_bytes"])} of {gib(result["hbm_bytes_per_chip"])} '
                            f'(arguments {gib(train_memory["argument_bytes"])}, temporaries '
                            f'{gib(train_memory["temp_bytes"])}, outputs {gib(train_memory["output_bytes"])}, '
                            f'donated {gib(train_memory["alias_bytes"])})'),
    ('eval memory / chip', f'{gib(eval_memory["total_bytes"])} (temporaries {gib(eval_memory["temp_bytes"])})'),
    ('fits', 'yes' if result['fits'] else 'NO'),
    ('FLOPs / step', f'{result["flops_per_step"] / 1e12:.3g} TFLOP ({result["flops_per_image"] / 1e9:.4g} '
                     'GFLOP per image; XLA cost analysis of the TPU program)'),
    ('collectives / step', f'{result["collective_count"]} ({counts or "none"}): '
                           f'{result["collective_s"] * 1e3:.1f} ms at '
                           f'{result["collective_latency_us"]:g} us each + bytes over ICI'),
    ('step time', f'{result["step_s"] * 1e3:.1f} ms at {result["mfu"]:.0%} MFU + collectives '
                  f'({result["step_s_at_peak"] * 1e3:.1f} ms of compute at the '
                  f'{result["peak_flops_per_chip"] / 1e12:.0f} TFLOP/s peak)'),
    (f'{result["num_steps"]} steps', f'{result["train_hours"]:.2f} h ({result["train_hours_at_peak"]:.2f} h '
                                      'at peak, no collectives; evaluation not included)'),
    ('input pipeline', f'{result["images_per_s_per_host"]:.0f} images/s per host '
                       f'({result["images_per_s"]:.0f} in all)'),
    ('recommended slice', result['recommended_topology'] or 'none of this generation fits'),
    ('compile time', f'train {result["compile_s"]["train"]} s, eval {result["compile_s"]["eval"]} s'),
  ]
  width = max(len(name) for name, _ in rows)
  return '\n'.join(f'{name:<{width}}  {value}' for name, value in rows)


def define_flags(options: flags.FlagValues) -> None:
  flags.DEFINE_string('topology', None, 'Cloud TPU slice (v5e-16, v4-8, v5p-8, v6e-8) or topology (v5e:4x4).',
                      required=True, flag_values=options)
  flags.DEFINE_float('mfu', 0.4, 'Assumed model FLOP/s utilisation for the time estimate.', flag_values=options)
  flags.DEFINE_float('collective_latency_us', 20.0, 'Assumed fixed cost of one collective, in microseconds.',
                     flag_values=options)
  flags.DEFINE_float('hbm_gib', 0.0, 'HBM per chip in GiB; 0 = the chip\'s (dunet_jax/throughput.py).',
                     flag_values=options)


def main(options: flags.FlagValues) -> None:
  if not 0 < options.mfu <= 1:
    raise ValueError(f'--mfu={options.mfu} must be in (0, 1]')
  steps = compile_steps(options.config, parse_slice(options.topology))
  result = estimate(options.config, steps, mfu=options.mfu, collective_latency_s=options.collective_latency_us * 1e-6,
                    hbm_bytes=options.hbm_gib * GIB or None)
  print(format_table(result))
  print(json.dumps(result))
  message = refusal(result)
  if message:
    raise ValueError(message)


if __name__ == '__main__':
  cli.run(main, define_flags, config='file')
