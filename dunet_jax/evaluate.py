"""Evaluation of a model on a split: single scale, or multi-scale + flip; CLI for checkpoints.

  python -m dunet_jax.evaluate --workdir=RUN [--step=N] [--split=val] [--multiscale]
      [--config.eval.scales='(0.5,1.0,1.5)'] [--config.eval.flip=True]
      [--config.eval.sliding_window=True] [--save_predictions=DIR]

Images are scored at their original resolution: each is padded (never resized) to
data.eval_pad_size, the padding and void pixels are never counted, and one confusion matrix is
summed over the split (accumulated inside a jitted step over the mesh, batch sharded on dim 0).
The CLI reads the run's config from RUN/config.json, applies the --config overrides, prints the
per-class table and writes RUN/eval_<split>_<step>.json (tagged with the scales, _flip and
_window when used, e.g. eval_val_1500_s0.5-0.75-1-1.25-1.5-1.75_flip.json).
With --save_predictions=DIR (local or gs://...) it also writes DIR/<image id>.png for every image
of the split: the prediction at the image's original size as a palette PNG of class ids in the
VOC colours, the format the VOC evaluation server takes and `python -m dunet_jax.score` scores.
"""
from dunet_jax import cli  # first: prepares the process before TensorFlow and jax load

import functools
import json
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags
from absl import logging
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from dunet_jax import checkpoint
from dunet_jax import inference
from dunet_jax import metrics
from dunet_jax import predict
from dunet_jax import progress
from dunet_jax import score
from dunet_jax import sharding
from dunet_jax import storage
from dunet_jax import xla_options
from dunet_jax.data import IGNORE_LABEL, datasets
from dunet_jax.data import palette
from dunet_jax.data import pipeline

def image_triplets(images: np.ndarray, labels: np.ndarray, predictions: np.ndarray) -> np.ndarray:
  """image | ground truth | prediction, side by side, uint8 (N, H, 3W, 3) for TensorBoard.

  Pixels void in the ground truth (the padding included) are shown void in the prediction too,
  so the panels show the same scored region.
  """
  predictions = np.where(labels == IGNORE_LABEL, IGNORE_LABEL, predictions)
  return np.concatenate([np.asarray(images, np.uint8), palette.colorize(labels),
                         palette.colorize(predictions)], axis=2)


@functools.lru_cache(maxsize=8)
def make_eval_step(graphdef: nnx.GraphDef, mesh: Mesh, *, num_classes: int,
                   scales: tuple[float, ...], flip: bool, window: int | None):
  """jit(state, images, labels, valid) -> (confusion int32 (C, C) replicated, predictions).

  Cached, so the periodic evaluations of a training run compile once.
  """
  def eval_step(state, images, labels, valid):
    probabilities = inference.multiscale_probabilities(
        inference.model_logits_fn(graphdef, state), images, scales=scales, flip=flip, window=window)
    predictions = jnp.argmax(probabilities, axis=-1).astype(jnp.uint8)
    labels = jnp.where(valid[:, None, None], labels, IGNORE_LABEL)
    return metrics.confusion_matrix(labels, predictions, num_classes), predictions

  batch = sharding.batch_sharding(mesh)
  return jax.jit(eval_step, in_shardings=(None, batch, batch, batch),
                 out_shardings=(sharding.replicated(mesh), batch))


def evaluate_model(model: nnx.Module, config: ml_collections.ConfigDict, mesh: Mesh, builder: Any, *,
                   split: str | None = None, scales: tuple[float, ...] | None = None,
                   flip: bool | None = None, sliding_window: bool | None = None,
                   num_images_to_log: int = 0, save_predictions: str | epath.PathLike | None = None) -> dict:
  """mIoU, pixel accuracy, per-class IoU and the confusion matrix of `model` on a split.

  Switches the model to eval mode. Unset arguments come from config.eval (and
  config.data.eval_split). With
  num_images_to_log > 0 the result also holds 'images': image | ground truth | prediction
  triplets (uint8 (N, pad, 3 * pad, 3)) from the first batch, for clu's writer.write_images.
  With save_predictions, every process writes the predictions of its images there as
  <image id>.png (see the module docstring).
  Every process must call this (the batches of all processes form each global batch).
  """
  split = split or config.data.eval_split
  scales = tuple(float(s) for s in (config.eval.scales if scales is None else scales))
  flip = bool(config.eval.flip if flip is None else flip)
  if sliding_window is None:
    sliding_window = bool(config.eval.get('sliding_window', False))
  window = int(config.data.crop_size) if sliding_window else None
  if config.eval.batch_size % mesh.size:
    raise ValueError(f'config.eval.batch_size={config.eval.batch_size} must be a multiple of the {mesh.size} '
                     f'devices: pass --config.eval.batch_size={mesh.size * -(-config.eval.batch_size // mesh.size)}.')
  model.eval()
  graphdef, state = nnx.split(model)
  step = make_eval_step(graphdef, mesh, num_classes=int(config.data.num_classes),
                        scales=scales, flip=flip, window=window)
  confusion = np.zeros((config.data.num_classes,) * 2, np.int64)
  images, num_images = None, 0
  if save_predictions is not None:
    save_predictions = storage.path(save_predictions)
    save_predictions.mkdir(parents=True, exist_ok=True)
  bar = progress.bar(-(-builder.info.splits[split].num_examples // jax.process_count()),
                     f'evaluating {split}', 'image')
  for local_batch in pipeline.eval_batches(
      builder, config.data, split=split, global_batch_size=config.eval.batch_size,
      pad_size=config.data.eval_pad_size, process_index=jax.process_index(),
      process_count=jax.process_count()):
    batch = sharding.to_global({key: local_batch[key] for key in ('image', 'label', 'valid')}, mesh)
    batch_confusion, predictions = step(state, batch['image'], batch['label'], batch['valid'])
    if save_predictions is not None:
      write_predictions(save_predictions, local_batch, local_rows(predictions))
    confusion += np.asarray(batch_confusion)
    num_images += int(local_batch['valid'].sum())
    bar.update(int(local_batch['valid'].sum()))
    if images is None and num_images_to_log > 0:
      # Global rows start with process 0's local rows, which are the ones shown.
      predictions = multihost_utils.process_allgather(predictions, tiled=True)
      count = min(num_images_to_log, int(local_batch['valid'].sum()))
      images = image_triplets(local_batch['image'][:count], local_batch['label'][:count],
                              np.asarray(predictions[:count]))
  bar.close()
  num_images = int(multihost_utils.process_allgather(np.int64(num_images)).sum())
  result = metrics.scores(confusion)
  result.update(confusion_matrix=confusion, num_images=num_images, split=split, scales=list(scales),
                flip=flip, sliding_window=bool(sliding_window))
  if images is not None:
    result['images'] = images
  return result


def local_rows(array: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded global array, in its local batch order."""
  shards = {shard.index[0].start or 0: shard.data for shard in array.addressable_shards}
  return np.concatenate([np.asarray(shards[start]) for start in sorted(shards)])


def write_predictions(directory: epath.Path, local_batch: dict[str, np.ndarray],
                      predictions: np.ndarray) -> None:
  """<id>.png per valid image: the prediction cropped to the image's original size."""
  for k in np.flatnonzero(local_batch['valid']):
    image_id = local_batch['id'][k].decode()
    if not image_id or '/' in image_id:
      raise ValueError(f'--save_predictions: image id {image_id!r} cannot be a file name')
    height, width = int(local_batch['height'][k]), int(local_batch['width'][k])
    predict.save_label_png(directory / f'{image_id}.png', predictions[k, :height, :width])


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any]) -> None:
  """Sets flat 'section.key' overrides on a run's recorded config; model keys are refused."""
  for key, value in overrides.items():
    if key.startswith('model.'):
      raise ValueError(f'--config.{key}: the model of a trained run cannot be changed at evaluation; '
                       'override eval.* or data.* keys only.')
    *sections, name = key.split('.')
    node = config
    for section in sections:
      node = node[section]
    node[name] = value


def json_result(result: dict, class_names: list[str], step: int) -> dict:
  """The result as written to eval_<split>_<step>.json (NaN IoU of absent classes -> null)."""
  written = score.json_ready(result)
  written.update(step=step, split=result['split'], num_images=result['num_images'],
                 scales=result['scales'], flip=result['flip'], sliding_window=result['sliding_window'],
                 class_names=class_names, confusion_matrix=np.asarray(result['confusion_matrix']).tolist())
  return written


def result_file_name(result: dict, step: int) -> str:
  """eval_<split>_<step>.json, tagged with any test-time augmentation so runs never overwrite."""
  tags = []
  if result['scales'] != [1.0]:
    tags.append('s' + '-'.join(f'{scale:g}' for scale in result['scales']))
  tags += ['flip'] * result['flip'] + ['window'] * result['sliding_window']
  return f'eval_{result["split"]}_{step}' + ''.join(f'_{tag}' for tag in tags) + '.json'


def evaluate_checkpoint(workdir: storage.PathLike, config_overrides: dict[str, Any], *,
                        step: int | None = None, split: str | None = None,
                        save_predictions: str | None = None) -> tuple[dict, epath.Path]:
  """Restores a run's checkpoint, evaluates it, and writes eval_<split>_<step>.json into workdir."""
  workdir = storage.path(workdir)
  config = checkpoint.load_config(workdir)
  apply_overrides(config, config_overrides)
  checkpoint.check_writable(workdir)  # the result file goes there: refused now, not after evaluating
  xla_options.apply(config, workdir)  # the run's compilation cache: a repeated evaluation does not recompile
  mesh = sharding.data_parallel_mesh()
  model, _, restored_step = checkpoint.restore_model(workdir, step, mesh)
  builder = datasets.prepare(config.data)
  result = evaluate_model(model, config, mesh, builder, split=split, save_predictions=save_predictions)
  written = json_result(result, list(datasets.class_names(config.data)), restored_step)
  path = workdir / result_file_name(result, restored_step)
  if jax.process_index() == 0:
    path.write_text(json.dumps(written, indent=1) + '\n')
  return result, path


def define_flags(options: flags.FlagValues) -> None:
  flags.DEFINE_string('workdir', None, 'Training run directory (holds config.json, checkpoints/).',
                      required=True, flag_values=options)
  flags.DEFINE_integer('step', None, 'Checkpoint step to evaluate (default: the newest).', flag_values=options)
  flags.DEFINE_string('split', None, 'Split to evaluate (default: the run\'s data.eval_split).',
                      flag_values=options)
  flags.DEFINE_bool('multiscale', False, f'Scales {inference.MULTISCALE_SCALES} plus horizontal flip.',
                    flag_values=options)
  flags.DEFINE_string('save_predictions', None, 'Folder (local or gs://) for one palette PNG of class ids '
                      'per image, <image id>.png at its original size (the VOC server format).',
                      flag_values=options)


def main(options: flags.FlagValues) -> None:
  from ml_collections import config_flags
  overrides = dict(config_flags.get_override_values(options['config']))
  if options.multiscale:
    overrides.update({'eval.scales': inference.MULTISCALE_SCALES, 'eval.flip': True})
  result, path = evaluate_checkpoint(options.workdir, overrides, step=options.step, split=options.split,
                                     save_predictions=options.save_predictions)
  if jax.process_index() > 0:  # process 0 wrote the file and reports
    return
  config = checkpoint.load_config(options.workdir)
  step = json.loads(path.read_text())['step']
  print(f'{options.workdir} step {step}, {result["split"]}: {result["num_images"]} images, scales {result["scales"]}, '
        f'flip {result["flip"]}, sliding window {result["sliding_window"]}')
  print(metrics.format_table(result, list(datasets.class_names(config.data))))
  logging.info('Wrote %s', path)
  print(f'wrote {path}')


if __name__ == '__main__':
  cli.run(main, define_flags, config='overrides', join=True)
