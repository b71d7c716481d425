"""FLOPs from XLA cost analysis, the peak-FLOP/s table and MFU arithmetic."""
import math

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec
import pytest

from dunet_jax import throughput


@pytest.mark.parametrize('device_kind, expected', [
  ('TPU v4', 275e12),
  ('TPU v5 lite', 197e12),
  ('TPU v5e', 197e12),
  ('TPU v5', 459e12),
  ('TPU v5p', 459e12),
  ('TPU v6 lite', 918e12),
  ('NVIDIA A100-SXM4-80GB', 312e12),
  ('NVIDIA H100 80GB HBM3', 989e12),
  ('NVIDIA H100 PCIe', 756e12),
  ('NVIDIA H200', 989e12),
  ('cpu', None),
])
def test_peak_flops_for_device_kind(device_kind, expected):
  assert throughput.peak_flops_for_device_kind(device_kind) == expected


def test_resolve_peak_flops_prefers_the_configured_value():
  assert throughput.resolve_peak_flops(790e12) == 790e12
  assert throughput.resolve_peak_flops(0.0) is None  # the test devices are CPUs
  with pytest.raises(ValueError, match='train.peak_flops'):
    throughput.resolve_peak_flops(-1.0)


def test_step_flops_of_a_matmul_is_2mnk():
  m, k, n = 48, 40, 24
  compiled = jax.jit(jnp.dot).lower(jnp.ones((m, k)), jnp.ones((k, n))).compile()
  assert throughput.step_flops(compiled) == 2 * m * n * k


def test_step_flops_counts_every_device_of_a_sharded_matmul():
  m, k, n = 64, 40, 24
  mesh = jax.make_mesh((8,), ('data',), axis_types=(AxisType.Auto,))
  lhs = jax.device_put(jnp.ones((m, k)), NamedSharding(mesh, PartitionSpec('data')))
  compiled = jax.jit(jnp.dot).lower(lhs, jnp.ones((k, n))).compile()
  assert throughput.step_flops(compiled) == 2 * m * n * k


class _FakeCompiled:
  """Stands in for older jax, whose cost_analysis() returned a list of per-module dicts."""

  input_shardings = ((), {})
  output_shardings = ()

  def __init__(self, analysis):
    self._analysis = analysis

  def cost_analysis(self):
    return self._analysis


def test_step_flops_accepts_a_list_of_modules_and_rejects_missing_flops():
  assert throughput.step_flops(_FakeCompiled([{'flops': 10.0}, {'flops': 5.0}])) == 15.0
  with pytest.raises(ValueError, match='flops'):
    throughput.step_flops(_FakeCompiled([{'bytes accessed': 1.0}]))


def test_mfu_arithmetic():
  # 1e15 FLOPs in 0.5 s on 4 chips of 1e15 FLOP/s: 2e15 FLOP/s achieved out of 4e15.
  assert throughput.mfu(1e15, 0.5, 4, 1e15) == pytest.approx(0.5)
  assert math.isnan(throughput.mfu(1e15, 0.5, 4, None))
  with pytest.raises(ValueError):
    throughput.mfu(1e15, 0.0, 4, 1e15)
