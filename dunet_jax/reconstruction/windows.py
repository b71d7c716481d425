"""Label maps cut into r x r windows, and each window classified (uniform, mixed, its classes).

Window (a, b) of a (H, W) map is the row of r*r labels at pixels (a*r + i, b*r + j) in (i*r + j)
order; rows run over (map, a, b). A label >= C (IGNORE_LABEL, 255, also the padding) is void. Shared by the moment
accumulation (`moments`) and the SGD fit (`upper_bound`).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from dunet_jax.data import IGNORE_LABEL


def local_mesh(mesh: Mesh | None) -> Mesh:
  """This process's devices of `mesh` (all local devices when None) as a 1-axis mesh."""
  if mesh is None:
    devices = jax.local_devices()
  else:
    devices = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
  return Mesh(np.array(devices), ('windows',))


def process_local(batch: np.ndarray | jax.Array) -> np.ndarray:
  """The rows of a (possibly multi-process, sharded on dim 0) batch that live in this process."""
  if not isinstance(batch, jax.Array) or batch.is_fully_addressable:
    return np.asarray(batch)
  shards = {shard.index[0].start or 0: shard.data for shard in batch.addressable_shards}
  return np.concatenate([np.asarray(shards[start]) for start in sorted(shards)])


def check_ratio(height: int, width: int, ratio: int) -> None:
  """Refuses label maps that r x r windows do not tile."""
  if height % ratio or width % ratio:
    raise ValueError(f'Label maps of size {height}x{width} are not a multiple of the ratio {ratio}: '
                     f'pad them with {IGNORE_LABEL} first.')


def cut_windows(labels: jax.Array, ratio: int) -> jax.Array:
  """(B, H, W) -> (B * H/r * W/r, r*r): rows in (b, a, c) order, columns in (i*r + j) order."""
  batch, height, width = labels.shape
  check_ratio(height, width, ratio)
  windows = labels.reshape(batch, height // ratio, ratio, width // ratio, ratio)
  return windows.transpose(0, 1, 3, 2, 4).reshape(-1, ratio * ratio)


@functools.partial(jax.jit, static_argnames=('num_classes', 'max_present'))
def _classify_windows(windows: jax.Array, num_classes: int, max_present: int) -> dict[str, jax.Array]:
  """Per window: uniform class counts, whether it is mixed, its classes and local labels.

  The classes of a window are found in increasing order by repeated masked minima (cheaper than
  a per-class presence test); 'overflow' flags windows with more than `max_present` classes.
  Local labels number the window's classes 0..k-1 in that order (void stays IGNORE_LABEL), so windows
  with the same class set share one Gram computation whatever their classes are.
  """
  current = jnp.where(windows < num_classes, windows, jnp.uint8(IGNORE_LABEL))
  classes = [current.min(axis=1)]
  for _ in range(max_present):
    classes.append(jnp.where(current > classes[-1][:, None], current, jnp.uint8(IGNORE_LABEL)).min(axis=1))
  local = sum((current > level[:, None]).astype(jnp.uint8) for level in classes[:max_present])
  has_void = current.max(axis=1) == IGNORE_LABEL
  nonempty = classes[0] != IGNORE_LABEL
  uniform = nonempty & (classes[1] == IGNORE_LABEL) & ~has_void
  counts = jnp.bincount(jnp.where(uniform, classes[0], num_classes).astype(jnp.int32),
                        length=num_classes + 1)[:num_classes]
  return {
      'uniform_counts': counts,
      'num_windows': jnp.sum(nonempty),
      'mixed': nonempty & ~uniform,
      'has_void': has_void,
      'classes': jnp.stack(classes[:max_present], axis=1),
      'overflow': jnp.any(classes[max_present] != IGNORE_LABEL),
      'local': jnp.where(current == IGNORE_LABEL, jnp.uint8(IGNORE_LABEL), local),
  }


def pad_rows(rows: np.ndarray, size: int) -> np.ndarray:
  """Appends all-void rows up to `size` (they count for nothing anywhere)."""
  if rows.shape[0] == size:
    return rows
  return np.concatenate([rows, np.full((size - rows.shape[0], *rows.shape[1:]), IGNORE_LABEL, np.uint8)])


def classify_windows(windows: np.ndarray, num_classes: int, sharding: NamedSharding) -> dict[str, np.ndarray]:
  """`_classify_windows` sharded over the devices, retried with room for more classes per window."""
  windows = jax.device_put(windows, sharding)
  max_present = 4
  while True:
    stats = jax.device_get(_classify_windows(windows, num_classes, min(max_present, num_classes)))
    if not stats['overflow'] or max_present >= num_classes:
      return stats
    max_present *= 2

