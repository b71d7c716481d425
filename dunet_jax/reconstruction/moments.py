"""The uncentred second moment M = sum_v v v^T of all one-hot label windows, in structured form.

A label map L (H, W) with C classes is cut into r x r windows; window (a, b) becomes the one-hot
vector v in {0, 1}^N, N = r*r*C, with v[(i*r + j)*C + c] = 1 iff L[a*r + i, b*r + j] == c. A void
pixel (255, or any value >= C, e.g. padding) contributes an all-zero one-hot vector: it adds nothing
to M, and windows that are entirely void are not counted in `num_windows`.

Why accumulation is fast: M is never built from one-hot windows.
- A uniform window (one class c, no void) contributes the all-ones r*r x r*r block at classes
  (c, c): such windows are only counted per class.
- The other ("mixed") windows are grouped by the set of classes they contain. For k classes the
  window's non-zero part is k indicator masks of r*r pixels, so the group's share of M is the Gram
  matrix of a (windows, k*r*r) 0/1 matrix: one dense matmul per chunk of windows, jitted and
  sharded over the devices (each device multiplies its windows, XLA sums). Without void one mask
  is the complement of the others, so only k - 1 masks are multiplied. The results are kept as
  class-pair blocks B_cd (r*r x r*r), only for pairs that occur together in some window.
Each process accumulates its own batches; the moments are then summed over processes exactly.
"""
import collections
import dataclasses
import functools
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dunet_jax.data import IGNORE_LABEL
from dunet_jax.reconstruction.windows import classify_windows, cut_windows, local_mesh, pad_rows, process_local


@dataclasses.dataclass
class WindowMoments:
  """The second moment M of all windows, in the structured form the solvers use.

  uniform_counts[c]: windows made only of class c. blocks[(c, d)] (c <= d), (r*r, r*r):
  B_cd[p, q] = number of mixed windows with class c at pixel p and class d at pixel q, so that
  M[p*C + c, q*C + d] = B_cd[p, q] + (c == d) * uniform_counts[c]. Blocks hold exact integer
  counts in the narrowest unsigned type that can hold them (`count_dtype`): most class pairs
  share few windows, so most blocks are uint16 (2 MiB at r = 32 instead of 8 MiB as float64).
  """
  ratio: int
  num_classes: int
  uniform_counts: np.ndarray
  blocks: dict[tuple[int, int], np.ndarray]
  num_windows: int
  num_mixed_windows: int

  @property
  def size(self) -> int:
    return self.ratio * self.ratio * self.num_classes

  def trace(self) -> float:
    """Sum of M's eigenvalues = number of non-void pixels in all windows."""
    pixels = self.ratio * self.ratio
    diagonal = sum(int(np.trace(block, dtype=np.int64)) for (c, d), block in self.blocks.items() if c == d)
    return float(diagonal + pixels * int(self.uniform_counts.sum()))

  def dense(self) -> np.ndarray:
    """M as an (N, N) float64 matrix (N*N*8 bytes: only for the exact solver)."""
    pixels, num_classes = self.ratio * self.ratio, self.num_classes
    moment = np.zeros((pixels, num_classes, pixels, num_classes))
    for (c, d), block in self.blocks.items():
      moment[:, c, :, d] += block
      if c != d:
        moment[:, d, :, c] += block.T
    for c, count in enumerate(self.uniform_counts):
      moment[:, c, :, c] += count
    return moment.reshape(self.size, self.size)

  def matmul(self, x: np.ndarray) -> np.ndarray:
    """M @ x for x (N, K), from the blocks and counts (never forms M): two matmuls per block.

    Works block by block rather than on rows of blocks put side by side, so that it needs no
    memory beyond the blocks themselves and one float64 copy of one block (at r = 32 with 60
    classes there can be over a thousand blocks).
    """
    pixels, num_classes = self.ratio * self.ratio, self.num_classes
    per_class = x.reshape(pixels, num_classes, -1).transpose(1, 0, 2)
    out = np.repeat(self.uniform_counts[:, None, None] * per_class.sum(1, keepdims=True), pixels, axis=1)
    for (c, d), counts in self.blocks.items():
      block = counts.astype(np.float64)
      out[c] += block @ per_class[d]
      if c != d:
        out[d] += block.T @ per_class[c]
    return out.transpose(1, 0, 2).reshape(x.shape)


def count_dtype(largest: int) -> np.dtype:
  """The narrowest unsigned integer type that holds counts up to `largest` (exact, unlike float32)."""
  for dtype in (np.uint16, np.uint32, np.uint64):
    if largest <= np.iinfo(dtype).max:
      return np.dtype(dtype)
  raise OverflowError(f'A count of {largest} does not fit in 64 bits.')


def _piece_size(rows: int, largest: int, multiple: int) -> int:
  """The smallest of largest, largest/4, largest/16, ... that holds `rows`, rounded up to a
  multiple of the device count: padding remainders to a few sizes bounds what jit compiles."""
  size = largest
  while size // 4 >= max(rows, 16):
    size //= 4
  return -(-size // multiple) * multiple


@functools.partial(jax.jit, static_argnames=('num_present', 'has_void'))
def _group_gram(local: jax.Array, num_present: int, has_void: bool) -> jax.Array:
  """Sum over windows of the Gram of their k class masks: (k, r*r, k, r*r) float32.

  Rows that are entirely void (chunk padding) contribute nothing. Void-free windows: the last
  mask is 1 - (sum of the others), so its blocks follow from the first k - 1 masks' Gram, their
  sums and the window count.
  """
  pixels = local.shape[1]
  multiplied = num_present if has_void else num_present - 1
  masks = (local[:, None, :] == jnp.arange(multiplied, dtype=jnp.uint8)[:, None]).astype(jnp.float32)
  masks = masks.reshape(local.shape[0], multiplied * pixels)
  gram = (masks.T @ masks).reshape(multiplied, pixels, multiplied, pixels)
  if has_void:
    return gram
  count = jnp.sum(local[:, 0] != IGNORE_LABEL).astype(jnp.float32)
  sums = masks.sum(0).reshape(multiplied, pixels)
  cross = sums[:, :, None] - gram.sum(axis=2)                   # (k-1, p, q): mask_a x last
  total = sums.sum(0)
  last = count - total[:, None] - total[None, :] + gram.sum(axis=(0, 2))
  top = jnp.concatenate([gram, cross[:, :, None, :]], axis=2)
  bottom = jnp.concatenate([cross.transpose(0, 2, 1), last[None]], axis=0)[None]
  return jnp.concatenate([top, bottom.transpose(0, 2, 1, 3)], axis=0)


class _MomentAccumulator:
  """Classifies windows in fixed-size pieces, groups mixed ones by class set, Grams full chunks."""

  def __init__(self, ratio: int, num_classes: int, mesh: Mesh, chunk_size: int | None):
    self.ratio, self.num_classes, self.mesh = ratio, num_classes, mesh
    self.pixels = ratio * ratio
    devices = mesh.size
    self.piece_size = -(-max(1024, (1 << 22) // self.pixels) // devices) * devices
    self.chunk_size = -(-(chunk_size or max(256, (1 << 22) // self.pixels)) // devices) * devices
    self.sharding = NamedSharding(mesh, PartitionSpec('windows'))
    self.uniform_counts = np.zeros(num_classes, np.int64)
    self.num_windows = 0
    self.num_mixed = 0
    self.blocks: dict[tuple[int, int], np.ndarray] = {}
    self.pair_windows: dict[tuple[int, int], int] = collections.defaultdict(int)
    self.windows: list[np.ndarray] = []
    self.window_rows = 0
    self.pending: dict[tuple[tuple[int, ...], bool], list[np.ndarray]] = collections.defaultdict(list)
    self.pending_rows: dict[tuple[tuple[int, ...], bool], int] = collections.defaultdict(int)

  def add_batch(self, labels: np.ndarray) -> None:
    labels = np.asarray(labels, np.uint8)
    if labels.ndim != 3:
      raise ValueError(f'Expected label batches of shape (B, H, W), got {labels.shape}.')
    windows = cut_windows(labels, self.ratio)
    self.windows.append(windows)
    self.window_rows += windows.shape[0]
    if self.window_rows >= self.piece_size:
      windows = np.concatenate(self.windows)
      full = windows.shape[0] // self.piece_size * self.piece_size
      self.windows, self.window_rows = [windows[full:]], windows.shape[0] - full
      for start in range(0, full, self.piece_size):
        self._classify(windows[start:start + self.piece_size])

  def _classify(self, windows: np.ndarray) -> None:
    stats = classify_windows(windows, self.num_classes, self.sharding)
    self.uniform_counts += stats['uniform_counts']
    self.num_windows += int(stats['num_windows'])
    rows = np.flatnonzero(stats['mixed'])
    self.num_mixed += rows.size
    if not rows.size:
      return
    keys = np.concatenate([stats['classes'][rows], stats['has_void'][rows, None]], axis=1)
    keys = np.ascontiguousarray(keys, np.uint8)
    unique, inverse = np.unique(keys.view(np.dtype((np.void, keys.shape[1]))).ravel(), return_inverse=True)
    inverse = inverse.ravel()
    order = np.argsort(inverse, kind='stable')
    starts = np.searchsorted(inverse[order], np.arange(len(unique) + 1))
    local = stats['local'][rows[order]]
    for group, key in enumerate(unique):
      key = np.frombuffer(key.tobytes(), np.uint8)
      classes = tuple(int(c) for c in key[:-1] if c != IGNORE_LABEL)
      self._append((classes, bool(key[-1])), local[starts[group]:starts[group + 1]])

  def _append(self, group: tuple[tuple[int, ...], bool], local: np.ndarray) -> None:
    self.pending[group].append(local)
    self.pending_rows[group] += local.shape[0]
    if self.pending_rows[group] >= self.chunk_size:
      self._flush(group, final=False)

  def _flush(self, group: tuple[tuple[int, ...], bool], final: bool) -> None:
    local = np.concatenate(self.pending.pop(group))
    self.pending_rows.pop(group)
    full = local.shape[0] // self.chunk_size * self.chunk_size
    if not final and full < local.shape[0]:
      self.pending[group].append(local[full:])
      self.pending_rows[group] = local.shape[0] - full
    pieces = [local[start:start + self.chunk_size] for start in range(0, full, self.chunk_size)]
    if final and full < local.shape[0]:
      pieces.append(pad_rows(local[full:], _piece_size(local.shape[0] - full, self.chunk_size, self.mesh.size)))
    classes = group[0]
    for piece in pieces:
      gram = _group_gram(jax.device_put(piece, self.sharding), len(classes), group[1])
      self._add_gram(classes, np.asarray(jax.device_get(gram)), piece.shape[0])

  def _add_gram(self, classes: tuple[int, ...], gram: np.ndarray, windows: int) -> None:
    """Adds a Gram of `windows` windows (float32 holding exact integers: chunks are far below 2**24
    windows) to the class-pair blocks, widening a block's type before its counts could overflow:
    no entry of B_cd exceeds the number of windows that held both c and d."""
    for a, c in enumerate(classes):
      for b in range(a, len(classes)):
        pair = (c, classes[b])
        self.pair_windows[pair] += windows
        dtype = count_dtype(self.pair_windows[pair])
        block = self.blocks.get(pair)
        if block is None:
          self.blocks[pair] = gram[a, :, b, :].astype(dtype)
          continue
        if block.dtype != dtype:
          block = self.blocks[pair] = block.astype(dtype)
        block += gram[a, :, b, :].astype(dtype)

  def finish(self) -> WindowMoments:
    if self.window_rows:
      windows = np.concatenate(self.windows)
      self._classify(pad_rows(windows, _piece_size(windows.shape[0], self.piece_size, self.mesh.size)))
    for group in list(self.pending):
      self._flush(group, final=True)
    moments = WindowMoments(self.ratio, self.num_classes, self.uniform_counts, self.blocks,
                            self.num_windows, self.num_mixed)
    return _sum_over_processes(moments) if jax.process_count() > 1 else moments


def _allgather_counts(counts: np.ndarray) -> np.ndarray:
  """Every process's integer counts, stacked, exactly (int32 on the wire: float32 would round above 2**24)."""
  if counts.size and counts.max() >= 2 ** 31:
    raise ValueError(f'A window count ({counts.max():.0f}) does not fit in int32: fit W on fewer '
                     'label maps (config.train.w_num_images).')
  return np.asarray(multihost_utils.process_allgather(counts.astype(np.int32))).astype(np.int64)


def _sum_over_processes(moments: WindowMoments, pairs_per_gather: int = 16) -> WindowMoments:
  """Adds every process's counts and blocks (the union of the pairs each process saw), a few
  blocks per collective so that the gathered copies stay small."""
  num_classes, pixels = moments.num_classes, moments.ratio ** 2
  seen = np.zeros((num_classes, num_classes), np.int32)
  for pair in moments.blocks:
    seen[pair] = 1
  seen = np.asarray(multihost_utils.process_allgather(seen)).sum(0) > 0
  pairs = [tuple(int(c) for c in pair) for pair in np.argwhere(seen)]
  blocks = {}
  for start in range(0, len(pairs), pairs_per_gather):
    group = pairs[start:start + pairs_per_gather]
    stacked = np.stack([moments.blocks.get(pair, np.zeros((pixels, pixels), np.uint16)) for pair in group])
    for pair, block in zip(group, _allgather_counts(stacked).sum(0)):
      blocks[pair] = block.astype(count_dtype(int(block.max())))
  scalars = np.concatenate([moments.uniform_counts, [moments.num_windows, moments.num_mixed_windows]])
  scalars = _allgather_counts(scalars).sum(0)
  return WindowMoments(moments.ratio, num_classes, scalars[:num_classes].astype(np.int64), blocks,
                       int(scalars[num_classes]), int(scalars[num_classes + 1]))


def accumulate_moments(label_batches: Iterable[np.ndarray | jax.Array], *, ratio: int,
                       num_classes: int, mesh: Mesh | None = None,
                       chunk_size: int | None = None) -> WindowMoments:
  """One pass over (B, H, W) uint8 label batches (H, W multiples of `ratio`, 255 = void).

  Each process reads its own batches; the work is sharded over that process's devices of `mesh`
  and the per-process moments are summed at the end.
  """
  if num_classes >= IGNORE_LABEL:
    raise ValueError(f'num_classes={num_classes} must be below the void label {IGNORE_LABEL}.')
  accumulator = _MomentAccumulator(ratio, num_classes, local_mesh(mesh), chunk_size)
  for batch in label_batches:
    accumulator.add_batch(process_local(batch))
  return accumulator.finish()
