"""Segmentation metrics the VOC way: one confusion matrix over a whole split.

The matrix is accumulated inside jit (a bincount that XLA sums across devices for sharded
inputs); IoU and mIoU are computed once at the end from the summed matrix, so images of
different sizes are weighted by their pixels, and classes whose union is empty are left out
of the mean instead of counting as 0 or 1.
"""
import jax
import jax.numpy as jnp
import numpy as np

from dunet_jax.data import IGNORE_LABEL


def confusion_matrix(labels: jax.Array, predictions: jax.Array, num_classes: int) -> jax.Array:
  """Returns int32[num_classes, num_classes]: rows are ground truth, columns predictions.

  Pixels labelled IGNORE_LABEL (void, padding) are not counted. Labels outside [0, num_classes)
  are not counted either; the data builders reject them, so none should reach here.
  """
  labels = labels.reshape(-1).astype(jnp.int32)
  predictions = predictions.reshape(-1).astype(jnp.int32)
  valid = (labels != IGNORE_LABEL) & (labels >= 0) & (labels < num_classes)
  index = jnp.where(valid, labels * num_classes + predictions, num_classes * num_classes)
  counts = jnp.bincount(index, length=num_classes * num_classes + 1)
  return counts[:-1].reshape(num_classes, num_classes).astype(jnp.int32)


def scores(confusion: np.ndarray) -> dict:
  """mIoU, pixel accuracy and per-class IoU (NaN where a class has an empty union)."""
  confusion = np.asarray(confusion, dtype=np.float64)
  true_positive = np.diag(confusion)
  union = confusion.sum(0) + confusion.sum(1) - true_positive
  with np.errstate(invalid='ignore', divide='ignore'):
    iou = np.where(union > 0, true_positive / union, np.nan)
  total = confusion.sum()
  return {
      'miou': float(np.nanmean(iou)) if np.any(union > 0) else float('nan'),
      'pixel_accuracy': float(true_positive.sum() / total) if total > 0 else float('nan'),
      'per_class_iou': iou.tolist(),
  }


def format_table(result: dict, class_names: list[str]) -> str:
  """A per-class IoU table followed by mIoU and pixel accuracy, for logs and CLIs."""
  width = max(len(name) for name in class_names)
  lines = [f'{"class":<{width}}  IoU']
  for name, iou in zip(class_names, result['per_class_iou']):
    lines.append(f'{name:<{width}}  {"  n/a" if np.isnan(iou) else f"{100 * iou:5.2f}"}')
  lines.append(f'{"mIoU":<{width}}  {100 * result["miou"]:5.2f}')
  lines.append(f'{"pixel acc":<{width}}  {100 * result["pixel_accuracy"]:5.2f}')
  return '\n'.join(lines)
