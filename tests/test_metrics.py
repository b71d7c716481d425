"""metrics.confusion_matrix / scores against a brute-force per-pixel loop and per-class masks."""
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from dunet_jax import metrics, sharding


def _brute_force_confusion(labels, predictions, num_classes, ignore_label):
  matrix = np.zeros((num_classes, num_classes), np.int64)
  for label, prediction in zip(labels.ravel().tolist(), predictions.ravel().tolist()):
    if label != ignore_label:
      matrix[label, prediction] += 1
  return matrix


def _miou_from_masks(labels, predictions, num_classes, ignore_label):
  """mIoU the textbook way: per class, |pred & gt| / |pred | gt| over non-void pixels."""
  valid = labels != ignore_label
  ious = []
  for c in range(num_classes):
    gt, pred = (labels == c) & valid, (predictions == c) & valid
    union = np.sum(gt | pred)
    if union:
      ious.append(np.sum(gt & pred) / union)
  return np.mean(ious), ious


def test_confusion_and_miou_match_brute_force_on_real_labels(voc_labels_dir):
  names = ['2007_000032', '2007_000033', '2007_000039', '2007_000042']
  labels = np.stack([np.array(Image.open(voc_labels_dir / 'SegmentationClass' / f'{n}.png').resize((96, 64),
                                                                                                 Image.NEAREST))
                     for n in names])
  rng = np.random.default_rng(0)
  # Predictions use classes 0..15 only, so 16..20 are absent from predictions; class 20 also
  # appears nowhere in these labels. One image is all void.
  predictions = rng.integers(0, 16, size=labels.shape).astype(np.uint8)
  labels[3] = 255
  expected = _brute_force_confusion(labels, predictions, 21, 255)
  got = np.asarray(metrics.confusion_matrix(jnp.asarray(labels), jnp.asarray(predictions), 21))
  np.testing.assert_array_equal(got, expected)
  result = metrics.scores(got)
  miou, ious = _miou_from_masks(labels, predictions, 21, 255)
  np.testing.assert_allclose(result['miou'], miou, rtol=1e-12)
  assert np.sum(~np.isnan(result['per_class_iou'])) == len(ious)
  valid = labels != 255
  np.testing.assert_allclose(result['pixel_accuracy'], np.mean(labels[valid] == predictions[valid]))


def test_classes_absent_from_both_are_left_out_of_the_mean():
  labels = np.array([[0, 0, 1, 255]])
  predictions = np.array([[0, 1, 1, 3]])
  result = metrics.scores(np.asarray(metrics.confusion_matrix(labels, predictions, 4)))
  # class 0: 1/2, class 1: 1/2, classes 2 and 3 absent (3 is predicted only on a void pixel).
  assert np.isnan(result['per_class_iou'][2]) and np.isnan(result['per_class_iou'][3])
  np.testing.assert_allclose(result['miou'], 0.5)


def test_predicted_but_absent_class_counts_as_zero_iou():
  result = metrics.scores(np.asarray(metrics.confusion_matrix(np.array([0, 0]), np.array([0, 2]), 3)))
  np.testing.assert_allclose(result['per_class_iou'][2], 0.0)
  np.testing.assert_allclose(result['miou'], (0.5 + 0.0) / 2)


def test_sharded_confusion_sums_over_all_devices():
  mesh = sharding.data_parallel_mesh()
  rng = np.random.default_rng(1)
  labels = rng.integers(0, 6, size=(8, 16, 24)).astype(np.uint8)
  labels[labels == 5] = 255
  predictions = rng.integers(0, 5, size=labels.shape).astype(np.uint8)
  batch = sharding.to_global({'label': labels, 'prediction': predictions}, mesh)
  confusion = jax.jit(lambda label, prediction: metrics.confusion_matrix(label, prediction, 5))
  got = confusion(batch['label'], batch['prediction'])
  np.testing.assert_array_equal(np.asarray(got), _brute_force_confusion(labels, predictions, 5, 255))
