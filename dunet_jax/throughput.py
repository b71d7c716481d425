"""Model FLOPs per step from XLA's cost analysis, and model FLOP/s utilisation (MFU).

MFU = (model FLOPs per step / step time) / (number of chips * peak FLOP/s per chip). The peak is the
vendor's dense bf16 matrix rate per chip; `train.peak_flops` overrides it (0 = look it up from
`jax.devices()[0].device_kind`), e.g. with a matmul rate measured on the machine (README).
"""
from collections.abc import Sequence
import math

import jax

# Dense (no sparsity) bf16 FLOP/s per chip, vendor datasheets.
PEAK_BF16_FLOPS: dict[str, float] = {
  'TPU v4': 275e12,
  'TPU v5e': 197e12,
  'TPU v5p': 459e12,
  'TPU v6e': 918e12,
  'A100': 312e12,
  'H100 PCIe': 756e12,
  'H100': 989e12,  # SXM
  'H200': 989e12,  # SXM; same tensor cores as the H100
}

# HBM per chip, bytes: Cloud TPU system architecture pages (v4 32 GiB, v5e 16 GiB, v5p 95 GiB, v6e
# 32 GiB) and NVIDIA datasheets (A100 80 GB, H100 80 GB, H200 141 GB).
HBM_BYTES: dict[str, float] = {
  'TPU v4': 32 * 2**30,
  'TPU v5e': 16 * 2**30,
  'TPU v5p': 95 * 2**30,
  'TPU v6e': 32 * 2**30,
  'A100': 80e9,
  'H100 PCIe': 80e9,
  'H100': 80e9,
  'H200': 141e9,
}

# (substrings that must all occur in the lower-cased device_kind, table key), most specific first:
# jax names v5e 'TPU v5 lite' and v6e 'TPU v6 lite', and v5p plain 'TPU v5'.
_DEVICE_KIND_PATTERNS: tuple[tuple[tuple[str, ...], str], ...] = (
  (('v5 lite',), 'TPU v5e'),
  (('v5e',), 'TPU v5e'),
  (('v6 lite',), 'TPU v6e'),
  (('v6e',), 'TPU v6e'),
  (('tpu', 'v5'), 'TPU v5p'),
  (('tpu', 'v4'), 'TPU v4'),
  (('a100',), 'A100'),
  (('h100', 'pcie'), 'H100 PCIe'),
  (('h100',), 'H100'),
  (('h200',), 'H200'),
)


def chip_name(device_kind: str) -> str | None:
  """The tables' key for a chip named `device_kind` (jax's spelling), None if unknown (CPUs)."""
  kind = device_kind.lower()
  for substrings, key in _DEVICE_KIND_PATTERNS:
    if all(s in kind for s in substrings):
      return key
  return None


def peak_flops_for_device_kind(device_kind: str) -> float | None:
  """Peak dense bf16 FLOP/s of one chip named `device_kind` (jax's spelling), None if unknown (CPUs)."""
  name = chip_name(device_kind)
  return PEAK_BF16_FLOPS[name] if name else None


def hbm_bytes_for_device_kind(device_kind: str) -> float | None:
  """HBM bytes of one chip named `device_kind`, None if unknown."""
  name = chip_name(device_kind)
  return HBM_BYTES[name] if name else None


def resolve_peak_flops(configured: float, device: jax.Device | None = None) -> float | None:
  """`configured` when positive, else the table's peak for `device` (default: the first device)."""
  if configured < 0:
    raise ValueError(f'train.peak_flops must be >= 0 (0 = look up the device), got {configured}')
  if configured > 0:
    return float(configured)
  device = device if device is not None else jax.devices()[0]
  return peak_flops_for_device_kind(device.device_kind)


def _num_devices(compiled: jax.stages.Compiled) -> int:
  shardings = jax.tree.leaves((compiled.input_shardings, compiled.output_shardings))
  return max((len(s.device_set) for s in shardings), default=1)


def step_flops(compiled: jax.stages.Compiled) -> float:
  """FLOPs of one call of `compiled`, summed over all devices that run it.

  XLA counts 2 FLOPs per multiply-add and analyses the per-device program of an SPMD-partitioned
  computation, so the count is multiplied by the number of devices. `cost_analysis()` is a dict in
  recent jax and a list of per-module dicts in older versions: both are accepted.
  """
  analysis = compiled.cost_analysis()
  modules: Sequence[dict] = [analysis] if isinstance(analysis, dict) else list(analysis or ())
  if not modules or not any('flops' in m for m in modules):
    raise ValueError('XLA cost analysis reported no "flops" for this computation; '
                     'FLOPs per step (and MFU) cannot be computed on this backend')
  return sum(float(m.get('flops', 0.0)) for m in modules) * _num_devices(compiled)


def mfu(flops_per_step: float, step_time: float, num_devices: int, peak: float | None) -> float:
  """Achieved FLOP/s over `num_devices * peak`; NaN when the peak is unknown (e.g. on CPU)."""
  if step_time <= 0 or num_devices <= 0:
    raise ValueError(f'step_time and num_devices must be positive, got {step_time}, {num_devices}')
  if not peak:
    return math.nan
  return flops_per_step / step_time / (num_devices * peak)
