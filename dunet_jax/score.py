"""Scores a folder of predicted label PNGs against ground truth the VOC way; CLI.

  python -m dunet_jax.score --pred_dir=P --label_dir=L [--num_classes=21] [--ignore_label=255]
      [--list=STEMS.txt]

Predictions and labels are matched by file stem. One confusion matrix is summed over all
images (void pixels skipped) and IoU is computed once from it, so the numbers equal those of
the VOC devkit and of `dunet_jax.evaluate`. The matrix is accumulated in numpy: label maps come
in hundreds of sizes, and a jitted bincount would recompile for each of them.
"""
from dunet_jax import cli  # first: prepares the process before TensorFlow and jax load

import json
import math

from absl import flags
import numpy as np
from etils import epath
from PIL import Image

from dunet_jax import metrics
from dunet_jax import storage
from dunet_jax.data import IGNORE_LABEL, palette

_MAX_NAMES_SHOWN = 20


class ScoreError(ValueError):
  """Bad input to the scorer: the message names the files and says what to do."""


def read_label_png(path: storage.PathLike) -> np.ndarray:
  """A PNG of class ids as uint8 (H, W): palette ('P') PNGs give their indices, not colours."""
  path = storage.path(path)
  try:
    with path.open('rb') as file, Image.open(file) as image:
      return palette.class_ids(image)
  except palette.LabelModeError as error:
    raise ScoreError(f'{path}: {error}. Save predictions with dunet_jax.predict or as '
                     "Image.fromarray(label_map.astype(np.uint8), mode='L').") from error
  except (OSError, SyntaxError) as error:
    raise ScoreError(f'{path}: cannot be read as a PNG ({error}); re-write or remove it.') from error


def accumulate_confusion(confusion: np.ndarray, label: np.ndarray, prediction: np.ndarray,
                         ignore_label: int) -> None:
  """Adds one image to int64[C, C] `confusion` (rows ground truth, columns predictions)."""
  num_classes = confusion.shape[0]
  label = label.reshape(-1).astype(np.int64)
  prediction = prediction.reshape(-1).astype(np.int64)
  valid = label != ignore_label
  confusion += np.bincount(label[valid] * num_classes + prediction[valid],
                           minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _names(paths: list[str]) -> str:
  shown = ', '.join(paths[:_MAX_NAMES_SHOWN])
  more = len(paths) - _MAX_NAMES_SHOWN
  return shown + (f' ... and {more} more' if more > 0 else '')


def _png_stems(directory: epath.Path, what: str) -> dict[str, epath.Path]:
  if not directory.is_dir():
    raise ScoreError(f'{what} directory {directory} does not exist; pass the folder of PNGs.')
  stems = {path.stem: path for path in sorted(directory.glob('*.png'))}
  if not stems:
    raise ScoreError(f'{what} directory {directory} holds no .png files.')
  return stems


def matched_pairs(pred_dir: storage.PathLike, label_dir: storage.PathLike,
                  stems: list[str] | None = None) -> list[tuple[epath.Path, epath.Path]]:
  """(prediction, label) paths by stem; raises naming every missing or extra file.

  Without `stems` every label must have a prediction; with `stems` (e.g. a split list) only
  those are scored, so a label folder holding more than the split can be used directly.
  """
  pred_dir, label_dir = storage.path(pred_dir), storage.path(label_dir)
  predictions = _png_stems(pred_dir, 'prediction')
  labels = _png_stems(label_dir, 'label')
  wanted = list(stems) if stems is not None else sorted(labels)
  problems = []
  no_label = [stem for stem in wanted if stem not in labels]
  if no_label:
    problems.append(f'{len(no_label)} listed images have no label PNG in {label_dir}: '
                    f'{_names(no_label)}')
  missing = [stem for stem in wanted if stem in labels and stem not in predictions]
  if missing:
    problems.append(f'{len(missing)} labels have no prediction PNG in {pred_dir}: '
                    f'{_names(missing)}')
  wanted_set = set(wanted)
  extra = [stem for stem in sorted(predictions) if stem not in wanted_set]
  if extra:
    problems.append(f'{len(extra)} predictions have no matching label'
                    f'{" in the list" if stems is not None else ""}: {_names(extra)}')
  if problems:
    raise ScoreError('\n'.join(problems) + '\nPredictions and labels are matched by file stem: '
                     'predict every labelled image, or pass --list with the stems to score.')
  return [(predictions[stem], labels[stem]) for stem in wanted]


def score_pairs(pairs: list[tuple[epath.Path, epath.Path]], num_classes: int,
                ignore_label: int = IGNORE_LABEL) -> tuple[np.ndarray, dict]:
  """The summed confusion matrix and metrics.scores of it; raises naming bad files."""
  confusion = np.zeros((num_classes, num_classes), np.int64)
  mismatched, out_of_range = [], []
  for prediction_path, label_path in pairs:
    prediction = read_label_png(prediction_path)
    label = read_label_png(label_path)
    if prediction.shape != label.shape:
      mismatched.append(f'{prediction_path.name} {prediction.shape[1]}x{prediction.shape[0]} vs '
                        f'label {label.shape[1]}x{label.shape[0]}')
      continue
    valid = label != ignore_label
    if np.any(label[valid] >= num_classes):
      out_of_range.append(f'label {label_path.name}')
      continue
    if np.any(prediction[valid] >= num_classes):
      out_of_range.append(f'prediction {prediction_path.name}')
      continue
    accumulate_confusion(confusion, label, prediction, ignore_label)
  problems = []
  if mismatched:
    problems.append(f'{len(mismatched)} predictions differ in size (width x height) from their '
                    f'labels: {_names(mismatched)}. Predict at the label\'s original resolution.')
  if out_of_range:
    problems.append(f'{len(out_of_range)} files hold class ids >= --num_classes={num_classes} '
                    f'(other than --ignore_label={ignore_label}): {_names(out_of_range)}. '
                    'Check --num_classes and that the PNGs hold class ids, not colours.')
  if problems:
    raise ScoreError('\n'.join(problems))
  return confusion, metrics.scores(confusion)


def class_names(num_classes: int) -> list[str]:
  """VOC (21) or PASCAL Context (59, 60) names by class count, else class_0, class_1, ..."""
  known = {len(names): names for names in (palette.VOC_CLASS_NAMES, palette.CONTEXT_59_CLASS_NAMES,
                                           palette.CONTEXT_60_CLASS_NAMES)}
  return list(known.get(num_classes, [f'class_{index}' for index in range(num_classes)]))


def json_ready(result: dict) -> dict:
  """metrics.scores with NaN (a class absent from labels and predictions) turned into null."""
  def clean(value):
    return None if isinstance(value, float) and math.isnan(value) else value
  return {'miou': clean(result['miou']), 'pixel_accuracy': clean(result['pixel_accuracy']),
          'per_class_iou': [clean(iou) for iou in result['per_class_iou']]}


def _read_list(path: str) -> list[str]:
  try:
    stems = [line.split()[0] for line in storage.path(path).read_text().splitlines() if line.strip()]
  except OSError as error:
    raise ScoreError(f'--list={path} cannot be read ({error}).') from error
  return [epath.Path(stem).stem for stem in stems]


def define_flags(options: flags.FlagValues) -> None:
  flags.DEFINE_string('pred_dir', None, 'Folder of predicted label PNGs (class ids).', required=True,
                      flag_values=options)
  flags.DEFINE_string('label_dir', None, 'Folder of ground-truth label PNGs.', required=True, flag_values=options)
  flags.DEFINE_integer('num_classes', 21, 'Number of classes (VOC: 21).', flag_values=options)
  flags.DEFINE_integer('ignore_label', IGNORE_LABEL, 'Label value that is never scored.', flag_values=options)
  flags.DEFINE_string('list', None, 'Optional text file of stems to score, one per line.', flag_values=options)


def main(options: flags.FlagValues) -> None:
  stems = _read_list(options.list) if options.list else None
  pairs = matched_pairs(options.pred_dir, options.label_dir, stems)
  _, result = score_pairs(pairs, options.num_classes, options.ignore_label)
  print(metrics.format_table(result, class_names(options.num_classes)))
  print(json.dumps(json_ready(result)))


if __name__ == '__main__':
  cli.run(main, define_flags)
