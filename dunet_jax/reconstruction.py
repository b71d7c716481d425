"""The label compression matrix W of DUpsampling, fitted from label maps by PCA, and its use.

A label map L (H, W) with C classes is cut into r x r windows; window (a, b) becomes the one-hot
vector v in {0, 1}^N, N = r*r*C, with v[(i*r + j)*C + c] = 1 iff L[a*r + i, b*r + j] == c. W (N, C')
holds the top C' eigenvectors of the uncentred second moment M = sum_v v v^T; codes are x = W^T v
and the reconstruction is W x (the paper's P = W^T, closed form under orthogonality).

Void: a void pixel (255, or any value >= C, e.g. padding) contributes an all-zero one-hot vector to
its window. It adds nothing to M, so W neither predicts void nor mistakes it for background, and
a reconstruction is only meaningful on the non-void pixels. Windows that are entirely void
contribute nothing and are not counted in `num_windows`.

Why fitting is fast: M is never built from one-hot windows.
- A uniform window (one class c, no void) contributes the all-ones r*r x r*r block at classes
  (c, c): such windows are only counted per class.
- The other ("mixed") windows are grouped by the set of classes they contain. For k classes the
  window's non-zero part is k indicator masks of r*r pixels, so the group's share of M is the Gram
  matrix of a (windows, k*r*r) 0/1 matrix: one dense matmul per chunk of windows, jitted and
  sharded over the devices (each device multiplies its windows, XLA sums). Without void one mask
  is the complement of the others, so only k - 1 masks are multiplied. The results are kept as
  class-pair blocks B_cd (r*r x r*r), only for pairs that occur together in some window.
M's products M X are then cheap sums of block products, which the randomized solver (subspace
iteration with Rayleigh-Ritz, float64) uses without ever forming the N x N matrix; the exact
solver assembles M and calls LAPACK's eigh. Each eigenvector's sign is fixed (largest-magnitude
entry positive) so W is reproducible.
"""
import collections
import dataclasses
import functools
import os
import pathlib
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.linalg
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

VOID = 255
EXACT_MAX_SIZE = 4096  # solver='auto' uses eigh up to this N = r*r*C, subspace iteration above


@dataclasses.dataclass(frozen=True)
class ReconstructionFit:
  """W (N, C') float32 and what it was fitted on; eigenvalues are those of M / num_windows."""
  w: np.ndarray
  eigenvalues: np.ndarray
  num_windows: int
  ratio: int
  num_classes: int
  num_components: int


@dataclasses.dataclass
class WindowMoments:
  """The second moment M of all windows, in the structured form the solvers use.

  uniform_counts[c]: windows made only of class c. blocks[(c, d)] (c <= d), float64 (r*r, r*r):
  B_cd[p, q] = number of mixed windows with class c at pixel p and class d at pixel q, so that
  M[p*C + c, q*C + d] = B_cd[p, q] + (c == d) * uniform_counts[c].
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
    diagonal = sum(np.trace(block) for (c, d), block in self.blocks.items() if c == d)
    return float(diagonal + pixels * self.uniform_counts.sum())

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
    memory beyond the blocks themselves (at r = 32 with 60 classes each block is 8 MB and there
    can be over a thousand of them).
    """
    pixels, num_classes = self.ratio * self.ratio, self.num_classes
    per_class = x.reshape(pixels, num_classes, -1).transpose(1, 0, 2)
    out = np.repeat(self.uniform_counts[:, None, None] * per_class.sum(1, keepdims=True), pixels, axis=1)
    for (c, d), block in self.blocks.items():
      out[c] += block @ per_class[d]
      if c != d:
        out[d] += block.T @ per_class[c]
    return out.transpose(1, 0, 2).reshape(x.shape)


def local_mesh(mesh: Mesh | None) -> Mesh:
  """This process's devices of `mesh` (all local devices when None) as a 1-axis mesh."""
  if mesh is None:
    devices = jax.local_devices()
  else:
    devices = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
  return Mesh(np.array(devices), ('windows',))


def _process_local(batch: np.ndarray | jax.Array) -> np.ndarray:
  """The rows of a (possibly multi-process, sharded on dim 0) batch that live in this process."""
  if not isinstance(batch, jax.Array) or batch.is_fully_addressable:
    return np.asarray(batch)
  shards = {shard.index[0].start or 0: shard.data for shard in batch.addressable_shards}
  return np.concatenate([np.asarray(shards[start]) for start in sorted(shards)])


def _windows(labels: jax.Array, ratio: int) -> jax.Array:
  """(B, H, W) -> (B * H/r * W/r, r*r): rows in (b, a, c) order, columns in (i*r + j) order."""
  batch, height, width = labels.shape
  if height % ratio or width % ratio:
    raise ValueError(f'Label maps of size {height}x{width} are not a multiple of the ratio {ratio}: '
                     f'pad them with {VOID} first.')
  windows = labels.reshape(batch, height // ratio, ratio, width // ratio, ratio)
  return windows.transpose(0, 1, 3, 2, 4).reshape(-1, ratio * ratio)


@functools.partial(jax.jit, static_argnames=('num_classes', 'max_present'))
def _classify_windows(windows: jax.Array, num_classes: int, max_present: int) -> dict[str, jax.Array]:
  """Per window: uniform class counts, whether it is mixed, its classes and local labels.

  The classes of a window are found in increasing order by repeated masked minima (cheaper than
  a per-class presence test); 'overflow' flags windows with more than `max_present` classes.
  Local labels number the window's classes 0..k-1 in that order (void stays 255), so windows
  with the same class set share one Gram computation whatever their classes are.
  """
  current = jnp.where(windows < num_classes, windows, jnp.uint8(VOID))
  classes = [current.min(axis=1)]
  for _ in range(max_present):
    classes.append(jnp.where(current > classes[-1][:, None], current, jnp.uint8(VOID)).min(axis=1))
  local = sum((current > level[:, None]).astype(jnp.uint8) for level in classes[:max_present])
  has_void = current.max(axis=1) == VOID
  nonempty = classes[0] != VOID
  uniform = nonempty & (classes[1] == VOID) & ~has_void
  counts = jnp.bincount(jnp.where(uniform, classes[0], num_classes).astype(jnp.int32),
                        length=num_classes + 1)[:num_classes]
  return {
      'uniform_counts': counts,
      'num_windows': jnp.sum(nonempty),
      'mixed': nonempty & ~uniform,
      'has_void': has_void,
      'classes': jnp.stack(classes[:max_present], axis=1),
      'overflow': jnp.any(classes[max_present] != VOID),
      'local': jnp.where(current == VOID, jnp.uint8(VOID), local),
  }


def _pad_rows(rows: np.ndarray, size: int) -> np.ndarray:
  """Appends all-void rows up to `size` (they count for nothing anywhere)."""
  if rows.shape[0] == size:
    return rows
  return np.concatenate([rows, np.full((size - rows.shape[0], *rows.shape[1:]), VOID, np.uint8)])


def _piece_size(rows: int, largest: int, multiple: int) -> int:
  """The smallest of largest, largest/4, largest/16, ... that holds `rows`, rounded up to a
  multiple of the device count: padding remainders to a few sizes bounds what jit compiles."""
  size = largest
  while size // 4 >= max(rows, 16):
    size //= 4
  return -(-size // multiple) * multiple


def classify_windows(windows: np.ndarray, num_classes: int, sharding: NamedSharding) -> dict[str, np.ndarray]:
  """`_classify_windows` sharded over the devices, retried with room for more classes per window."""
  windows = jax.device_put(windows, sharding)
  max_present = 4
  while True:
    stats = jax.device_get(_classify_windows(windows, num_classes, min(max_present, num_classes)))
    if not stats['overflow'] or max_present >= num_classes:
      return stats
    max_present *= 2


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
  count = jnp.sum(local[:, 0] != VOID).astype(jnp.float32)
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
    self.windows: list[np.ndarray] = []
    self.window_rows = 0
    self.pending: dict[tuple[tuple[int, ...], bool], list[np.ndarray]] = collections.defaultdict(list)
    self.pending_rows: dict[tuple[tuple[int, ...], bool], int] = collections.defaultdict(int)

  def add_batch(self, labels: np.ndarray) -> None:
    labels = np.asarray(labels, np.uint8)
    if labels.ndim != 3:
      raise ValueError(f'Expected label batches of shape (B, H, W), got {labels.shape}.')
    windows = _windows(labels, self.ratio)
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
      classes = tuple(int(c) for c in key[:-1] if c != VOID)
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
      pieces.append(_pad_rows(local[full:], _piece_size(local.shape[0] - full, self.chunk_size, self.mesh.size)))
    classes = group[0]
    for piece in pieces:
      gram = _group_gram(jax.device_put(piece, self.sharding), len(classes), group[1])
      self._add_gram(classes, np.asarray(jax.device_get(gram), np.float64))

  def _add_gram(self, classes: tuple[int, ...], gram: np.ndarray) -> None:
    for a, c in enumerate(classes):
      for b in range(a, len(classes)):
        block = self.blocks.get((c, classes[b]))
        if block is None:
          self.blocks[(c, classes[b])] = gram[a, :, b, :].copy()
        else:
          block += gram[a, :, b, :]

  def finish(self) -> WindowMoments:
    if self.window_rows:
      windows = np.concatenate(self.windows)
      self._classify(_pad_rows(windows, _piece_size(windows.shape[0], self.piece_size, self.mesh.size)))
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


def _sum_over_processes(moments: WindowMoments) -> WindowMoments:
  """Adds every process's counts and blocks (the union of the pairs each process saw)."""
  num_classes, pixels = moments.num_classes, moments.ratio ** 2
  seen = np.zeros((num_classes, num_classes), np.int32)
  for pair in moments.blocks:
    seen[pair] = 1
  seen = np.asarray(multihost_utils.process_allgather(seen)).sum(0) > 0
  pairs = [tuple(pair) for pair in np.argwhere(seen)]
  stacked = np.stack([moments.blocks.get(pair, np.zeros((pixels, pixels))) for pair in pairs])
  scalars = np.concatenate([moments.uniform_counts, [moments.num_windows, moments.num_mixed_windows]])
  stacked = _allgather_counts(stacked).sum(0)
  scalars = _allgather_counts(scalars).sum(0)
  return WindowMoments(moments.ratio, num_classes, scalars[:num_classes].astype(np.int64),
                       {pair: block.astype(np.float64) for pair, block in zip(pairs, stacked)},
                       int(scalars[num_classes]), int(scalars[num_classes + 1]))


def accumulate_moments(label_batches: Iterable[np.ndarray | jax.Array], *, ratio: int,
                       num_classes: int, mesh: Mesh | None = None,
                       chunk_size: int | None = None) -> WindowMoments:
  """One pass over (B, H, W) uint8 label batches (H, W multiples of `ratio`, 255 = void).

  Each process reads its own batches; the work is sharded over that process's devices of `mesh`
  and the per-process moments are summed at the end.
  """
  if num_classes >= VOID:
    raise ValueError(f'num_classes={num_classes} must be below the void label {VOID}.')
  accumulator = _MomentAccumulator(ratio, num_classes, local_mesh(mesh), chunk_size)
  for batch in label_batches:
    accumulator.add_batch(_process_local(batch))
  return accumulator.finish()


def _fix_signs(vectors: np.ndarray) -> np.ndarray:
  """Flips each column so that its largest-magnitude entry is positive."""
  largest = vectors[np.argmax(np.abs(vectors), axis=0), np.arange(vectors.shape[1])]
  return vectors * np.where(largest < 0, -1.0, 1.0)


def _subspace_iteration(moments: WindowMoments, num_components: int, *, oversample: int,
                        max_iters: int, tol: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Top eigenpairs of M by block power iteration with Rayleigh-Ritz (float64, products via blocks).

  Stops when every wanted Ritz pair's residual ||M u - theta u|| is below tol times the smallest
  wanted Ritz value (the tail's eigenvalues are 1e-4..1e-5 of the largest and nearly equal, so a
  tolerance relative to the largest would leave the last vectors loose).
  """
  size = moments.size
  width = min(size, num_components + oversample)
  basis, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((size, width)))
  for _ in range(max_iters):
    product = moments.matmul(basis)
    values, rotation = np.linalg.eigh(basis.T @ product)
    values, rotation = values[::-1], rotation[:, ::-1]
    basis, product = basis @ rotation, product @ rotation
    residual = np.linalg.norm(product[:, :num_components] - basis[:, :num_components] * values[:num_components],
                              axis=0)
    if residual.max() <= tol * values[num_components - 1]:
      break
    basis, _ = np.linalg.qr(product)
  return values[:num_components], basis[:, :num_components]


def solve_moments(moments: WindowMoments, num_components: int, *, solver: str = 'auto',
                  oversample: int | None = None, max_iters: int = 200, tol: float = 1e-3,
                  seed: int = 0) -> ReconstructionFit:
  """W = the top `num_components` eigenvectors of M ('exact': eigh; 'randomized': subspace iteration)."""
  size = moments.size
  if not 0 < num_components <= size:
    raise ValueError(f'num_components={num_components} must be in 1..r*r*C={size}.')
  if moments.num_windows == 0:
    raise ValueError('No label window has a non-void pixel: cannot fit W (check the label files).')
  if solver == 'auto':
    solver = 'exact' if size <= EXACT_MAX_SIZE else 'randomized'
  if solver == 'exact':
    values, vectors = scipy.linalg.eigh(moments.dense(), subset_by_index=(size - num_components, size - 1))
    values, vectors = values[::-1], vectors[:, ::-1]
  elif solver == 'randomized':
    values, vectors = _subspace_iteration(
        moments, num_components, oversample=num_components if oversample is None else oversample,
        max_iters=max_iters, tol=tol, seed=seed)
  else:
    raise ValueError(f"solver={solver!r} must be 'exact', 'randomized' or 'auto'.")
  return ReconstructionFit(
      w=_fix_signs(vectors).astype(np.float32),
      eigenvalues=(values / moments.num_windows).astype(np.float32),
      num_windows=moments.num_windows, ratio=moments.ratio, num_classes=moments.num_classes,
      num_components=num_components)


def fit_pca(label_batches: Iterable[np.ndarray | jax.Array], *, ratio: int, num_classes: int,
            num_components: int, mesh: Mesh | None = None, solver: str = 'auto',
            **solver_options) -> ReconstructionFit:
  """W from one streaming pass over label batches (see `accumulate_moments` and `solve_moments`)."""
  moments = accumulate_moments(label_batches, ratio=ratio, num_classes=num_classes, mesh=mesh)
  return solve_moments(moments, num_components, solver=solver, **solver_options)


def reconstruction_error(moments: WindowMoments, w: np.ndarray) -> float:
  """Mean over windows of ||v - W W^T v||^2 = (tr M - tr(W^T M W)) / windows, for orthonormal W."""
  w = np.asarray(w, np.float64)
  captured = float(np.sum(w * moments.matmul(w)))
  return (moments.trace() - captured) / moments.num_windows


def save_reconstruction(path: str | os.PathLike, fit: ReconstructionFit) -> None:
  """Writes `reconstruction.npz` (w, eigenvalues, ratio, num_classes, num_components, num_windows)."""
  path = pathlib.Path(path)
  temporary = path.with_name(path.name + '.tmp.npz')
  np.savez(temporary, w=np.asarray(fit.w, np.float32), eigenvalues=np.asarray(fit.eigenvalues, np.float32),
           ratio=fit.ratio, num_classes=fit.num_classes, num_components=fit.num_components,
           num_windows=fit.num_windows)
  temporary.replace(path)


def load_reconstruction(path: str | os.PathLike, *, expect_ratio: int | None = None,
                        expect_num_classes: int | None = None,
                        expect_num_components: int | None = None) -> ReconstructionFit:
  """Reads a file written by `save_reconstruction`, checking it matches what the caller needs."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f'No reconstruction file at {path}: fit W first (fit_pca + '
                            f'save_reconstruction), or delete the workdir to start over.')
  try:
    with np.load(path) as data:
      fields = {key: data[key] for key in ('w', 'eigenvalues', 'ratio', 'num_classes', 'num_components',
                                            'num_windows')}
  except (KeyError, ValueError, OSError) as error:
    raise ValueError(f'{path} is not a valid reconstruction file ({error}); delete it to refit W.') from error
  fit = ReconstructionFit(
      w=fields['w'].astype(np.float32), eigenvalues=fields['eigenvalues'].astype(np.float32),
      num_windows=int(fields['num_windows']), ratio=int(fields['ratio']),
      num_classes=int(fields['num_classes']), num_components=int(fields['num_components']))
  expected = {'ratio': expect_ratio, 'num_classes': expect_num_classes,
              'num_components': expect_num_components}
  mismatched = [f'{key}={getattr(fit, key)} (expected {value})' for key, value in expected.items()
                if value is not None and getattr(fit, key) != value]
  if mismatched:
    raise ValueError(f'{path} was fitted for {", ".join(mismatched)}: delete it to refit W, or use '
                     'a config that matches it.')
  if fit.w.shape != (fit.ratio ** 2 * fit.num_classes, fit.num_components):
    raise ValueError(f'{path}: w has shape {fit.w.shape}, inconsistent with ratio={fit.ratio}, '
                     f'num_classes={fit.num_classes}, num_components={fit.num_components}.')
  return fit


def compress(labels: jax.Array, w: jax.Array, ratio: int, num_classes: int) -> jax.Array:
  """Codes x = W^T v of every window: (B, H, W) labels -> (B, H/r, W/r, C') float32.

  v is one-hot, so W^T v is the sum over the window's pixels p of W's row (p, label): gathered
  pixel by pixel (a scan over the r*r positions) instead of multiplying a one-hot matrix.
  """
  batch, height, width = labels.shape
  if height % ratio or width % ratio:
    raise ValueError(f'Label maps of size {height}x{width} are not a multiple of the ratio {ratio}: '
                     f'pad them with {VOID} first.')
  w = jnp.asarray(w, jnp.float32)
  rows = w.reshape(ratio * ratio, num_classes, -1)
  rows = jnp.concatenate([rows, jnp.zeros_like(rows[:, :1])], axis=1)      # class C: void -> 0
  labels = jnp.asarray(labels).astype(jnp.int32)
  labels = jnp.where((labels >= 0) & (labels < num_classes), labels, num_classes)
  per_pixel = labels.reshape(batch, height // ratio, ratio, width // ratio, ratio)
  per_pixel = per_pixel.transpose(2, 4, 0, 1, 3).reshape(ratio * ratio, batch, height // ratio, width // ratio)

  def add_pixel(codes, pixel):
    pixel_rows, pixel_labels = pixel
    return codes + pixel_rows[pixel_labels], None

  initial = jnp.zeros((batch, height // ratio, width // ratio, w.shape[1]), jnp.float32)
  codes, _ = jax.lax.scan(add_pixel, initial, (rows, per_pixel))
  return codes


def reconstruct(codes: jax.Array, w: jax.Array, ratio: int, num_classes: int) -> jax.Array:
  """Scores W x placed back as pixels (depth-to-space): (B, h, w, C') -> (B, h*r, w*r, C)."""
  batch, height, width, _ = codes.shape
  scores = codes @ jnp.asarray(w, jnp.float32).T
  scores = scores.reshape(batch, height, width, ratio, ratio, num_classes)
  return scores.transpose(0, 1, 3, 2, 4, 5).reshape(batch, height * ratio, width * ratio, num_classes)


@dataclasses.dataclass(frozen=True)
class SgdFit:
  """The unconstrained fit: codes are projection^T v (projection = P^T, (N, C')), reconstruction W x."""
  w: np.ndarray
  projection: np.ndarray
  losses: np.ndarray


def collect_windows(label_batches: Iterable[np.ndarray | jax.Array], *, ratio: int,
                    num_classes: int, mesh: Mesh | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Uniform-window counts per class and the mixed windows' labels (M, r*r) uint8 (void = 255)."""
  devices = local_mesh(mesh)
  sharding = NamedSharding(devices, PartitionSpec('windows'))
  counts = np.zeros(num_classes, np.int64)
  mixed = []
  for batch in label_batches:
    windows = _windows(_process_local(batch).astype(np.uint8), ratio)
    padded = _pad_rows(windows, -(-windows.shape[0] // devices.size) * devices.size)
    stats = classify_windows(padded, num_classes, sharding)
    counts += stats['uniform_counts']
    mixed.append(windows[stats['mixed'][:windows.shape[0]]])
  return counts, np.concatenate(mixed) if mixed else np.zeros((0, ratio * ratio), np.uint8)


def _window_loss(params: dict, windows: jax.Array, num_classes: int) -> jax.Array:
  """Sum over windows of ||v - W P v||^2 from the labels alone (gathers, no one-hot vectors).

  With a = W^T v and x = P v (sums of the rows of W and P^T at each pixel's index):
  ||v - W x||^2 = |v| - 2 a.x + x^T (W^T W) x.
  """
  valid = windows < num_classes
  index = jnp.arange(windows.shape[1]) * num_classes + jnp.where(valid, windows, 0)
  weight = valid.astype(jnp.float32)[..., None]
  codes = jnp.sum(params['projection'][index] * weight, axis=1)
  back = jnp.sum(params['w'][index] * weight, axis=1)
  gram = params['w'].T @ params['w']
  return jnp.sum(valid) - 2 * jnp.sum(back * codes) + jnp.sum((codes @ gram) * codes)


def fit_sgd(label_batches: Iterable[np.ndarray | jax.Array], *, ratio: int, num_classes: int,
            num_components: int, mesh: Mesh | None = None, steps: int = 2000,
            batch_windows: int = 1024, learning_rate: float = 1e-2, seed: int = 0) -> SgdFit:
  """The paper's alternative: P and W fitted by Adam on the mean of ||v - W P v||^2 over windows.

  Each step uses every uniform window exactly (one per class, weighted by its count) plus a random
  minibatch of mixed windows (weighted to stand for all of them): an unbiased estimate of the
  full objective with little variance.
  """
  counts, mixed = collect_windows(label_batches, ratio=ratio, num_classes=num_classes, mesh=mesh)
  total = counts.sum() + mixed.shape[0]
  if total == 0:
    raise ValueError('No label window has a non-void pixel: cannot fit W.')
  uniform = np.repeat(np.arange(num_classes, dtype=np.uint8)[:, None], ratio * ratio, axis=1)
  size = ratio * ratio * num_classes
  keys = jax.random.split(jax.random.key(seed), 2)
  params = {'w': jax.random.normal(keys[0], (size, num_components)) / np.sqrt(size),
            'projection': jax.random.normal(keys[1], (size, num_components)) / np.sqrt(size)}
  optimizer = optax.adam(optax.cosine_decay_schedule(learning_rate, steps))
  state = optimizer.init(params)
  mixed_weight = mixed.shape[0] / max(1, min(batch_windows, mixed.shape[0]))

  @jax.jit
  def step(params, state, batch):
    def loss_fn(params):
      uniform_loss = jax.vmap(lambda row: _window_loss(params, row[None], num_classes))(uniform)
      mixed_loss = _window_loss(params, batch, num_classes) * mixed_weight
      return (jnp.sum(uniform_loss * counts) + mixed_loss) / total
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = optimizer.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  rng = np.random.default_rng(seed)
  losses = []
  empty = np.full((1, ratio * ratio), VOID, np.uint8)
  for _ in range(steps):
    batch = mixed[rng.integers(0, mixed.shape[0], batch_windows)] if mixed.shape[0] else empty
    params, state, loss = step(params, state, batch)
    losses.append(float(loss))
  return SgdFit(w=np.asarray(params['w']), projection=np.asarray(params['projection']),
                losses=np.asarray(losses))
