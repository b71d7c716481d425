"""The paper's upper bound: how well can each upsampling possibly do? Compress the ground truth itself.

  python -m dunet_jax.upper_bound --label_dir=DIR --train_list=FILE --val_list=FILE \\
      --ratio=16,32 --num_components=32,64,128,256 --num_classes=21 \\
      [--downsample=area|bilinear|both] [--solver=auto|exact|randomized] [--max_train=N] [--max_val=N] \\
      [--sgd_maps=N --sgd_components=64]

W is fitted on the train labels (one streaming PCA pass per ratio; top C' eigenvectors are nested,
so one fit serves every C'). On every val map, at its original size (the 255 padding added to
reach a multiple of r is never scored, nor is void):
- DUpsample: codes W^T v of each r x r window (`compress`), reconstruction W x placed back as pixels
  by the model's depth-to-space (`reconstruct`), argmax. With --sgd_maps, also P and W fitted by
  SGD (`fit_sgd`, the paper's alternative to PCA) beside PCA on the same maps.
- Bilinear: the one-hot map (void = all zeros) brought to H/r x W/r, then bilinearly upsampled back
  (jax.image.resize 'bilinear', half-pixel centres) and argmaxed. Downsampling is either
  'area': the mean one-hot over each r x r window, void pixels left out (the class fractions of
  the window's labelled pixels), or 'bilinear': jax.image.resize(..., 'bilinear', antialias=False),
  i.e. bilinear interpolation at each window's centre (the 2 x 2 central pixels for even r), divided
  by the interpolated non-void fraction. Every low-resolution cell is one window, so both
  methods use the same grid as DUpsample.
Scores are one confusion matrix over the split (dunet_jax.metrics): mIoU and pixel accuracy. The
reconstruction error is the mean over windows (with a non-void pixel) of ||v - W W^T v||^2, on val
(from the codes) and train (from the second moment). Prints a table, then one JSON line.
"""
from dunet_jax import cli  # first: prepares the process before TensorFlow and jax load

import dataclasses
import functools
import json
import time
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from PIL import Image

from dunet_jax import metrics
from dunet_jax import progress
from dunet_jax import reconstruction
from dunet_jax import storage
from dunet_jax.data import IGNORE_LABEL, label_files
from dunet_jax.models.dupsample import depth_to_space
from dunet_jax.reconstruction import windows

METHODS = {'area': 'bilinear_area', 'bilinear': 'bilinear_sampling'}


def downsample_one_hot(labels: jax.Array, ratio: int, num_classes: int, downsample: str) -> jax.Array:
  """(B, H, W) labels -> (B, H/r, W/r, C) class fractions per window ('area' or 'bilinear').

  Void pixels are all-zero one-hot vectors; the result is divided by the same operation applied
  to the non-void indicator, so void is left out rather than counted as no class.
  """
  batch, height, width = labels.shape
  low_shape = (batch, height // ratio, width // ratio, num_classes)
  one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  valid = (labels < num_classes).astype(jnp.float32)[..., None]
  if downsample == 'area':
    window_shape = (batch, height // ratio, ratio, width // ratio, ratio, -1)
    low = one_hot.reshape(window_shape).sum((2, 4))
    weight = valid.reshape(window_shape).sum((2, 4))
  elif downsample == 'bilinear':
    low = jax.image.resize(one_hot, low_shape, 'bilinear', antialias=False)
    weight = jax.image.resize(valid, low_shape[:3] + (1,), 'bilinear', antialias=False)
  else:
    raise ValueError(f"downsample={downsample!r} must be 'area' or 'bilinear'.")
  return jnp.where(weight > 0, low / jnp.maximum(weight, 1e-12), 0.0)


def bilinear_prediction(labels: jax.Array, ratio: int, num_classes: int, downsample: str) -> jax.Array:
  """The bilinear baseline: downsampled one-hot, bilinearly upsampled (half-pixel centres), argmax."""
  low = downsample_one_hot(labels, ratio, num_classes, downsample)
  return jnp.argmax(jax.image.resize(low, (*labels.shape, num_classes), 'bilinear'), axis=-1)


def compress(labels: jax.Array, w: jax.Array, ratio: int, num_classes: int) -> jax.Array:
  """Codes x = W^T v of every window: (B, H, W) labels -> (B, H/r, W/r, C') float32.

  v is one-hot, so W^T v is the sum over the window's pixels p of W's row (p, label): gathered
  pixel by pixel (a scan over the r*r positions) instead of multiplying a one-hot matrix.
  """
  batch, height, width = labels.shape
  windows.check_ratio(height, width, ratio)
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
  """Scores W x placed back as pixels, as the model's DUpsample does: (B, h, w, C') -> (B, h*r, w*r, C)."""
  return depth_to_space(codes @ jnp.asarray(w, jnp.float32).T, ratio, num_classes)


@dataclasses.dataclass(frozen=True)
class SgdFit:
  """The unconstrained fit: codes are projection^T v (projection = P^T, (N, C')), reconstruction W x."""
  w: np.ndarray
  projection: np.ndarray
  losses: np.ndarray


def collect_windows(label_batches: Iterable[np.ndarray | jax.Array], *, ratio: int,
                    num_classes: int, mesh: Mesh | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Uniform-window counts per class and the mixed windows' labels (M, r*r) uint8 (void = 255)."""
  devices = windows.local_mesh(mesh)
  sharding = NamedSharding(devices, PartitionSpec('windows'))
  counts = np.zeros(num_classes, np.int64)
  mixed = []
  for batch in label_batches:
    rows = windows.cut_windows(windows.process_local(batch).astype(np.uint8), ratio)
    padded = windows.pad_rows(rows, -(-rows.shape[0] // devices.size) * devices.size)
    stats = windows.classify_windows(padded, num_classes, sharding)
    counts += stats['uniform_counts']
    mixed.append(rows[stats['mixed'][:rows.shape[0]]])
  return counts, np.concatenate(mixed) if mixed else np.zeros((0, ratio * ratio), np.uint8)


def _window_loss(params: dict, rows: jax.Array, num_classes: int) -> jax.Array:
  """Sum over windows of ||v - W P v||^2 from the labels alone (gathers, no one-hot vectors).

  With a = W^T v and x = P v (sums of the rows of W and P^T at each pixel's index):
  ||v - W x||^2 = |v| - 2 a.x + x^T (W^T W) x.
  """
  valid = rows < num_classes
  index = jnp.arange(rows.shape[1]) * num_classes + jnp.where(valid, rows, 0)
  weight = valid.astype(jnp.float32)[..., None]
  codes = jnp.sum(params['projection'][index] * weight, axis=1)
  back = jnp.sum(params['w'][index] * weight, axis=1)
  gram = params['w'].T @ params['w']
  return jnp.sum(valid) - 2 * jnp.sum(back * codes) + jnp.sum((codes @ gram) * codes)


def sgd_objective(params: dict, mixed_batch: jax.Array, *, counts: np.ndarray, num_mixed: int,
                  num_classes: int, ratio: int) -> jax.Array:
  """Unbiased estimate of the mean over all windows of ||v - W P v||^2.

  Every uniform window is counted exactly (one per class, weighted by its count); `mixed_batch`
  holds windows drawn uniformly with replacement from the `num_mixed` mixed ones, each standing
  for num_mixed / batch of them (whether the batch is smaller or larger than num_mixed).
  """
  uniform = jnp.repeat(jnp.arange(num_classes, dtype=jnp.uint8)[:, None], ratio * ratio, axis=1)
  uniform_loss = jax.vmap(lambda row: _window_loss(params, row[None], num_classes))(uniform)
  mixed_loss = _window_loss(params, mixed_batch, num_classes) * (num_mixed / mixed_batch.shape[0])
  return (jnp.sum(uniform_loss * counts) + mixed_loss) / (np.sum(counts) + num_mixed)


def fit_sgd(label_batches: Iterable[np.ndarray | jax.Array], *, ratio: int, num_classes: int,
            num_components: int, mesh: Mesh | None = None, steps: int = 2000,
            batch_windows: int = 1024, learning_rate: float = 1e-2, seed: int = 0) -> SgdFit:
  """The paper's alternative: P and W fitted by Adam on the mean of ||v - W P v||^2 over windows.

  Each step is `sgd_objective` on a random batch of mixed windows: an unbiased estimate of the
  full objective with little variance (most windows are uniform and counted exactly).
  """
  counts, mixed = collect_windows(label_batches, ratio=ratio, num_classes=num_classes, mesh=mesh)
  if counts.sum() + mixed.shape[0] == 0:
    raise ValueError('No label window has a non-void pixel: cannot fit W.')
  size = ratio * ratio * num_classes
  keys = jax.random.split(jax.random.key(seed), 2)
  params = {'w': jax.random.normal(keys[0], (size, num_components)) / np.sqrt(size),
            'projection': jax.random.normal(keys[1], (size, num_components)) / np.sqrt(size)}
  optimizer = optax.adam(optax.cosine_decay_schedule(learning_rate, steps))
  state = optimizer.init(params)
  objective = functools.partial(sgd_objective, counts=counts.astype(np.float32), num_mixed=mixed.shape[0],
                                num_classes=num_classes, ratio=ratio)

  @jax.jit
  def step(params, state, batch):
    loss, grads = jax.value_and_grad(objective)(params, batch)
    updates, state = optimizer.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  rng = np.random.default_rng(seed)
  losses = []
  empty = np.full((1, ratio * ratio), IGNORE_LABEL, np.uint8)
  for _ in progress.iterate(range(steps), steps, 'SGD fit of W', 'step'):
    batch = mixed[rng.integers(0, mixed.shape[0], batch_windows)] if mixed.shape[0] else empty
    params, state, loss = step(params, state, batch)
    losses.append(float(loss))
  return SgdFit(w=np.asarray(params['w']), projection=np.asarray(params['projection']),
                losses=np.asarray(losses))


@functools.partial(jax.jit, static_argnames=('ratio', 'num_classes', 'components', 'downsamples'))
def _score_batch(labels: jax.Array, projection: jax.Array, w: jax.Array, ratio: int, num_classes: int,
                 components: tuple[int, ...], downsamples: tuple[str, ...]) -> dict[str, jax.Array]:
  """Confusion matrices of DUpsample at each C' (nested prefixes of W) and of the bilinear baselines.

  The reconstruction for C' is W[:, :C'] x[:C'], so each C' adds its slice to the previous sum.
  """
  codes = compress(labels, projection, ratio, num_classes)
  pixels = (labels < num_classes).reshape(labels.shape[0], labels.shape[1] // ratio, ratio,
                                          labels.shape[2] // ratio, ratio).sum((2, 4))
  energy = jnp.cumsum(codes ** 2, axis=-1)
  scores, start = 0.0, 0
  dupsample, errors = [], []
  for end in components:
    scores = scores + reconstruct(codes[..., start:end], w[:, start:end], ratio, num_classes)
    start = end
    dupsample.append(metrics.confusion_matrix(labels, jnp.argmax(scores, -1), num_classes))
    errors.append(jnp.sum(jnp.where(pixels > 0, pixels - energy[..., end - 1], 0.0)))
  result = {'dupsample': jnp.stack(dupsample), 'squared_error': jnp.stack(errors),
            'windows': jnp.sum(pixels > 0)}
  for downsample in downsamples:
    result[METHODS[downsample]] = metrics.confusion_matrix(
        labels, bilinear_prediction(labels, ratio, num_classes, downsample), num_classes)
  return result


def _sorted_by_shape(label_dir: str, ids: list[str], ratio: int) -> list[str]:
  """Ids ordered by padded size (PNG headers only), so batches need little extra padding."""
  def padded(label_id):
    with (storage.path(label_dir) / f'{label_id}.png').open('rb') as file, Image.open(file) as image:
      width, height = image.size
    return -(-height // ratio), -(-width // ratio)
  return sorted(ids, key=padded)


def score_split(label_dir: str, ids: list[str], *, projection: np.ndarray, w: np.ndarray, ratio: int,
                num_classes: int, components: tuple[int, ...], downsamples: tuple[str, ...],
                batch_size: int) -> dict:
  """Summed confusion matrices and reconstruction errors over all `ids`."""
  totals = {}
  batches = label_files.label_batches(label_dir, _sorted_by_shape(label_dir, ids, ratio), ratio=ratio,
                                      batch_size=batch_size)
  for batch in progress.iterate(batches, -(-len(ids) // batch_size), f'scoring val, r={ratio}', 'batch'):
    result = jax.device_get(_score_batch(batch['label'], projection, w, ratio, num_classes, components,
                                         downsamples))
    for key, value in result.items():
      totals[key] = totals.get(key, 0) + np.asarray(value, np.float64 if key == 'squared_error' else np.int64)
  return totals


def _train_batches(label_dir: str, ids: list[str], ratio: int):
  batches = label_files.label_batches(label_dir, ids, ratio=ratio, batch_size=16)
  return (batch['label'] for batch in progress.iterate(batches, -(-len(ids) // 16), f'fitting W, r={ratio}',
                                                        'batch'))


def run(label_dir: str, train_ids: list[str], val_ids: list[str], *, ratios: list[int],
        components: list[int], num_classes: int, downsamples: tuple[str, ...], solver: str,
        batch_size: int, sgd_maps: int = 0, sgd_components: int = 64, sgd_steps: int = 2000) -> dict:
  """Every row of the table, as dicts, plus timings."""
  components = tuple(sorted(set(components)))
  rows, timings = [], {}
  for ratio in ratios:
    started = time.time()
    moments = reconstruction.accumulate_moments(_train_batches(label_dir, train_ids, ratio), ratio=ratio,
                                                num_classes=num_classes)
    fit = reconstruction.solve_moments(moments, components[-1], solver=solver)
    timings[f'fit_r{ratio}_seconds'] = round(time.time() - started, 1)
    started = time.time()
    totals = score_split(label_dir, val_ids, projection=fit.w, w=fit.w, ratio=ratio, num_classes=num_classes,
                         components=components, downsamples=downsamples, batch_size=batch_size)
    timings[f'score_r{ratio}_seconds'] = round(time.time() - started, 1)
    for index, count in enumerate(components):
      result = metrics.scores(totals['dupsample'][index])
      rows.append({'ratio': ratio, 'method': 'dupsample', 'num_components': count,
                   'miou': result['miou'], 'pixel_accuracy': result['pixel_accuracy'],
                   'val_reconstruction_error': float(totals['squared_error'][index] / totals['windows']),
                   'train_reconstruction_error': reconstruction.reconstruction_error(moments, fit.w[:, :count])})
    for downsample in downsamples:
      result = metrics.scores(totals[METHODS[downsample]])
      rows.append({'ratio': ratio, 'method': METHODS[downsample], 'num_components': None,
                   'miou': result['miou'], 'pixel_accuracy': result['pixel_accuracy']})
    if sgd_maps:
      rows += _sgd_rows(label_dir, train_ids[:sgd_maps], val_ids, ratio=ratio, num_classes=num_classes,
                        count=sgd_components, steps=sgd_steps, batch_size=batch_size)
  return {'rows': rows, 'train_maps': len(train_ids), 'val_maps': len(val_ids), **timings}


def _sgd_rows(label_dir: str, train_ids: list[str], val_ids: list[str], *, ratio: int, num_classes: int,
              count: int, steps: int, batch_size: int) -> list[dict]:
  """DUpsample with P, W from SGD beside PCA fitted on the same maps."""
  sgd = fit_sgd(_train_batches(label_dir, train_ids, ratio), ratio=ratio, num_classes=num_classes,
                num_components=count, steps=steps)
  pca = reconstruction.fit_pca(_train_batches(label_dir, train_ids, ratio), ratio=ratio,
                               num_classes=num_classes, num_components=count)
  rows = []
  for name, projection, w in (('sgd', sgd.projection, sgd.w), ('pca_same_maps', pca.w, pca.w)):
    totals = score_split(label_dir, val_ids, projection=projection, w=w, ratio=ratio, num_classes=num_classes,
                         components=(count,), downsamples=(), batch_size=batch_size)
    result = metrics.scores(totals['dupsample'][0])
    rows.append({'ratio': ratio, 'method': f'dupsample_{name}', 'num_components': count,
                 'train_maps': len(train_ids), 'miou': result['miou'], 'pixel_accuracy': result['pixel_accuracy']})
  rows[0]['final_loss'] = float(sgd.losses[-1])
  return rows


def format_table(report: dict) -> str:
  lines = [f'{"r":>3}  {"method":<26}{"C_prime":>8}{"mIoU":>8}{"pix acc":>9}{"val err":>9}{"train err":>10}']
  for row in report['rows']:
    count = '' if row['num_components'] is None else str(row['num_components'])
    errors = ''.join(f'{row[key]:>{width}.3f}' if key in row else ' ' * width
                     for key, width in (('val_reconstruction_error', 9), ('train_reconstruction_error', 10)))
    lines.append(f'{row["ratio"]:>3}  {row["method"]:<26}{count:>8}{100 * row["miou"]:>8.2f}'
                 f'{100 * row["pixel_accuracy"]:>9.2f}{errors}')
  return '\n'.join(lines)


def define_flags(options: flags.FlagValues) -> None:
  flags.DEFINE_string('label_dir', None, 'Folder of <id>.png label maps (class ids, 255 = void).', required=True,
                      flag_values=options)
  flags.DEFINE_string('train_list', None, 'Ids W is fitted on, one per line.', required=True, flag_values=options)
  flags.DEFINE_string('val_list', None, 'Ids scored, one per line.', required=True, flag_values=options)
  flags.DEFINE_list('ratio', ['16'], 'Output strides r (comma-separated).', flag_values=options)
  flags.DEFINE_list('num_components', ['64'], "C' values (comma-separated).", flag_values=options)
  flags.DEFINE_integer('num_classes', 21, 'Classes C (labels 0..C-1; 255 is void).', flag_values=options)
  flags.DEFINE_enum('downsample', 'both', ['area', 'bilinear', 'both'], 'Bilinear baseline downsampling.',
                    flag_values=options)
  flags.DEFINE_enum('solver', 'auto', ['auto', 'exact', 'randomized'], 'Eigen solver for W.', flag_values=options)
  flags.DEFINE_integer('max_train', 0, 'Use only the first N train ids (0: all).', flag_values=options)
  flags.DEFINE_integer('max_val', 0, 'Use only the first N val ids (0: all).', flag_values=options)
  flags.DEFINE_integer('batch_size', 8, 'Val maps scored per step.', flag_values=options)
  flags.DEFINE_integer('sgd_maps', 0, 'Also fit P and W by SGD on the first N train maps (0: skip).',
                       flag_values=options)
  flags.DEFINE_integer('sgd_components', 64, "C' of the SGD comparison.", flag_values=options)
  flags.DEFINE_integer('sgd_steps', 2000, 'Adam steps of the SGD fit (1024 windows each).', flag_values=options)


def main(options: flags.FlagValues) -> None:
  train_ids = label_files.read_ids(options.train_list)
  val_ids = label_files.read_ids(options.val_list)
  train_ids = train_ids[:options.max_train] if options.max_train else train_ids
  val_ids = val_ids[:options.max_val] if options.max_val else val_ids
  label_files.check_files(options.label_dir, train_ids + val_ids)
  downsamples = ('area', 'bilinear') if options.downsample == 'both' else (options.downsample,)
  report = run(options.label_dir, train_ids, val_ids, ratios=[int(r) for r in options.ratio],
               components=[int(c) for c in options.num_components], num_classes=options.num_classes,
               downsamples=downsamples, solver=options.solver, batch_size=options.batch_size,
               sgd_maps=options.sgd_maps, sgd_components=options.sgd_components, sgd_steps=options.sgd_steps)
  print(format_table(report))
  print(json.dumps(report))


if __name__ == '__main__':
  cli.run(main, define_flags)
