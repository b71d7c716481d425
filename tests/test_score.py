"""dunet_jax.score against per-class IoU counted directly from pixels on real VOC label maps."""
import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from dunet_jax import score
from helpers import REPO_ROOT

NUM_CLASSES = 21


def reference_scores(labels: list[np.ndarray], predictions: list[np.ndarray]) -> dict:
  """IoU per class from pixel masks (no confusion matrix); mean over classes present anywhere."""
  label = np.concatenate([x.ravel() for x in labels]).astype(np.int64)
  prediction = np.concatenate([x.ravel() for x in predictions]).astype(np.int64)
  valid = label != 255
  ious = []
  for c in range(NUM_CLASSES):
    intersection = np.sum((label == c) & (prediction == c) & valid)
    union = np.sum(((label == c) | (prediction == c)) & valid)
    ious.append(intersection / union if union else None)
  present = [iou for iou in ious if iou is not None]
  return {'miou': float(np.mean(present)), 'per_class_iou': ious,
          'pixel_accuracy': float(np.sum((label == prediction) & valid) / np.sum(valid))}


def write_png(path: pathlib.Path, array: np.ndarray, mode: str = 'P') -> None:
  """A grayscale PNG, or a palette PNG with a random palette (so colours never equal ids)."""
  image = Image.fromarray(array.astype(np.uint8))
  if mode == 'P':
    image.putpalette(np.random.default_rng(0).integers(0, 256, 768, dtype=np.uint8).tobytes())
  image.save(path)


@pytest.fixture()
def scored_folders(voc_labels_dir, tmp_path):
  """Eight real val label maps plus an all-void one, and random predictions for them.

  Predictions use classes 0-11 only, mostly copying the label: classes 12-20 absent from the
  labels are absent from both, and class 11 is predicted where it never occurs in these labels.
  """
  stems = (voc_labels_dir / 'lists' / 'voc2012_val_1449.txt').read_text().split()[:8]
  label_dir, pred_dir = tmp_path / 'labels', tmp_path / 'predictions'
  label_dir.mkdir()
  pred_dir.mkdir()
  rng = np.random.default_rng(0)
  labels, predictions = [], []
  for stem in stems:
    shutil.copy(voc_labels_dir / 'SegmentationClass' / f'{stem}.png', label_dir)
    labels.append(np.array(Image.open(label_dir / f'{stem}.png')))
  labels.append(np.full((40, 60), 255, np.uint8))
  write_png(label_dir / 'all_void.png', labels[-1])
  stems.append('all_void')
  for stem, label in zip(stems, labels):
    noise = rng.integers(0, 12, label.shape)
    prediction = np.where((rng.random(label.shape) < 0.7) & (label < 12), label, noise)
    predictions.append(prediction.astype(np.uint8))
    write_png(pred_dir / f'{stem}.png', predictions[-1], mode='P' if len(predictions) % 2 else 'L')
  present = set(np.unique(np.concatenate([x.ravel() for x in labels]))) - {255}
  assert 11 not in present and len(present | set(range(12))) < NUM_CLASSES, 'fixture changed'
  return pred_dir, label_dir, labels, predictions


def test_score_equals_pixel_counting(scored_folders):
  pred_dir, label_dir, labels, predictions = scored_folders
  confusion, result = score.score_pairs(score.matched_pairs(pred_dir, label_dir), NUM_CLASSES)
  expected = reference_scores(labels, predictions)
  got = score.json_ready(result)
  in_labels = set(np.unique(np.concatenate([x.ravel() for x in labels]))) - {255}
  absent_from_both = [c for c in range(12, NUM_CLASSES) if c not in in_labels]
  assert absent_from_both and all(got['per_class_iou'][c] is None for c in absent_from_both)
  assert got['per_class_iou'][11] == 0.0
  np.testing.assert_allclose([np.nan if x is None else x for x in got['per_class_iou']],
                             [np.nan if x is None else x for x in expected['per_class_iou']])
  assert got['miou'] == pytest.approx(expected['miou'])
  assert got['pixel_accuracy'] == pytest.approx(expected['pixel_accuracy'])
  assert confusion.sum() == sum(np.sum(label != 255) for label in labels)


def test_cli_prints_table_and_json(scored_folders):
  pred_dir, label_dir, labels, predictions = scored_folders
  completed = subprocess.run(
      [sys.executable, '-m', 'dunet_jax.score', f'--pred_dir={pred_dir}',
       f'--label_dir={label_dir}'], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
  lines = completed.stdout.strip().splitlines()
  assert any(line.startswith('aeroplane') for line in lines)
  got = json.loads(lines[-1])
  assert got['miou'] == pytest.approx(reference_scores(labels, predictions)['miou'])


def test_missing_extra_and_mismatched_files_are_named(scored_folders):
  pred_dir, label_dir, _, _ = scored_folders
  (pred_dir / '2007_000033.png').unlink()
  write_png(pred_dir / 'stray.png', np.zeros((4, 4)))
  with pytest.raises(score.ScoreError, match=r'(?s)no prediction.*2007_000033.*no matching label.*stray'):
    score.matched_pairs(pred_dir, label_dir)
  (pred_dir / 'stray.png').unlink()
  stems = [path.stem for path in sorted(pred_dir.glob('*.png'))]
  write_png(pred_dir / 'all_void.png', np.zeros((41, 60)))
  with pytest.raises(score.ScoreError, match=r'all_void.png 60x41 vs label 60x40'):
    score.score_pairs(score.matched_pairs(pred_dir, label_dir, stems), NUM_CLASSES)


def test_rejects_colour_pngs_and_out_of_range_ids(tmp_path):
  (tmp_path / 'labels').mkdir()
  (tmp_path / 'predictions').mkdir()
  write_png(tmp_path / 'labels' / 'a.png', np.zeros((8, 8)))
  Image.new('RGB', (8, 8)).save(tmp_path / 'predictions' / 'a.png')
  pairs = score.matched_pairs(tmp_path / 'predictions', tmp_path / 'labels')
  with pytest.raises(score.ScoreError, match=r'a.png: mode RGB; expected a palette'):
    score.score_pairs(pairs, NUM_CLASSES)
  write_png(tmp_path / 'predictions' / 'a.png', np.full((8, 8), 21))
  with pytest.raises(score.ScoreError, match=r'prediction a.png'):
    score.score_pairs(pairs, NUM_CLASSES)
