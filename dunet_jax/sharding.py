"""The device mesh, array shardings, and global batches built from per-process data.

The mesh has two axes: 'data' (data parallelism) and 'fsdp' (parameters and optimizer state
sharded, batch split over it too). Every batch is sharded on its first dimension over both
axes, so the global batch is spread over all devices of all processes and BatchNorm
statistics, computed under jit, are those of the global batch. Axis types are Auto: the
Explicit default of `jax.make_mesh` rejects DUpsample's depth-to-space reshape.
"""
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

BATCH_AXES = ('data', 'fsdp')


def make_mesh(mesh_config: ml_collections.ConfigDict,
              devices: list[jax.Device] | None = None) -> Mesh:
  """A ('data', 'fsdp') mesh over all devices; mesh.data = -1 takes what fsdp leaves."""
  devices = list(jax.devices() if devices is None else devices)
  fsdp = int(mesh_config.fsdp)
  data = int(mesh_config.data)
  if fsdp < 1 or len(devices) % fsdp:
    raise ValueError(f'config.mesh.fsdp={fsdp} must be >= 1 and divide the {len(devices)} devices.')
  if data == -1:
    data = len(devices) // fsdp
  if data * fsdp != len(devices):
    raise ValueError(f'config.mesh.data={mesh_config.data} x config.mesh.fsdp={fsdp} must equal the '
                     f'{len(devices)} available devices; set config.mesh.data=-1 to use them all.')
  return jax.make_mesh((data, fsdp), BATCH_AXES, axis_types=(AxisType.Auto, AxisType.Auto),
                       devices=devices)


def data_parallel_mesh(devices: list[jax.Device] | None = None) -> Mesh:
  """Every device (all of them when None) on the 'data' axis, fsdp = 1: evaluation and inference."""
  return make_mesh(ml_collections.ConfigDict({'data': -1, 'fsdp': 1}), devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Dimension 0 split over every device of the mesh."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def parameter_sharding(mesh: Mesh, shape: tuple[int, ...]) -> NamedSharding:
  """FSDP: split the largest dimension divisible by the fsdp axis; small arrays stay replicated."""
  fsdp = mesh.shape['fsdp']
  if fsdp == 1 or np.prod(shape, dtype=np.int64) < 2048:
    return replicated(mesh)
  candidates = [d for d in np.argsort(shape)[::-1] if shape[d] % fsdp == 0]
  if not candidates:
    return replicated(mesh)
  spec = [None] * len(shape)
  spec[candidates[0]] = 'fsdp'
  return NamedSharding(mesh, PartitionSpec(*spec))


def tree_shardings(mesh: Mesh, tree: Any) -> Any:
  """Shardings for a pytree of arrays (or ShapeDtypeStructs): parameter_sharding per leaf."""
  return jax.tree.map(lambda leaf: parameter_sharding(mesh, tuple(leaf.shape)), tree)


def to_global(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Per-process numpy batches -> global jax.Arrays sharded on dimension 0."""
  sharding = batch_sharding(mesh)
  return {key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
          for key, value in local_batch.items()}
