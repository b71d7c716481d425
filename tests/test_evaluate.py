"""Evaluation over a sharded mesh against a per-image numpy composition on the built-in val split."""
import functools
import json

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from dunet_jax import checkpoint, evaluate, score, sharding
from dunet_jax.data import datasets, palette
from helpers import reference_probabilities, run_tool


@pytest.fixture(scope='module')
def run_and_data(tiny_run):
  workdir, model = tiny_run
  config = checkpoint.load_config(workdir)
  builder = datasets.prepare(config.data)
  mesh = sharding.make_mesh(config.mesh)
  return workdir, model, config, builder, mesh


@functools.cache
def jitted_model(model):
  graphdef, state = nnx.split(model)
  return jax.jit(lambda images: nnx.merge(graphdef, state)(images))


def reference_confusion(model, config, builder, scales, flip) -> np.ndarray:
  """Each val image padded to data.eval_pad_size with data.pad_pixel, predicted alone, cropped."""
  logits_fn = jitted_model(model)
  pad, num_classes = config.data.eval_pad_size, config.data.num_classes
  confusion = np.zeros((num_classes, num_classes), np.int64)
  for example in builder.as_dataset(split='val').as_numpy_iterator():
    label = example['label'][..., 0]
    height, width = label.shape
    padded = np.empty((pad, pad, 3), np.float32)
    padded[:] = config.data.pad_pixel
    padded[:height, :width] = example['image']
    probabilities = reference_probabilities(padded, scales, flip, logits_fn)[:height, :width]
    valid = label != 255
    np.add.at(confusion, (label[valid], probabilities.argmax(-1)[valid]), 1)
  return confusion


_EVALUATIONS = {}


def evaluated(run_and_data, scales, flip) -> dict:
  """evaluate_model of the tiny run on val (2 images logged), once per (scales, flip) in this module."""
  if (scales, flip) not in _EVALUATIONS:
    _, model, config, builder, mesh = run_and_data
    _EVALUATIONS[scales, flip] = evaluate.evaluate_model(model, config, mesh, builder, split='val', scales=scales,
                                                         flip=flip, num_images_to_log=2)
  return _EVALUATIONS[scales, flip]


@pytest.mark.parametrize('scales, flip', [((1.0,), False), ((0.5, 1.25), True)])
def test_evaluate_model_equals_per_image_composition(run_and_data, scales, flip):
  _, model, config, builder, mesh = run_and_data
  result = evaluated(run_and_data, scales, flip)
  expected = reference_confusion(model, config, builder, scales, flip)
  # Batched and per-image float32 sums may flip the argmax of near-ties: allow 0.1% of pixels.
  assert result['confusion_matrix'].sum() == expected.sum()
  assert np.abs(result['confusion_matrix'] - expected).sum() <= 2e-3 * expected.sum()
  assert result['num_images'] == config.data.synthetic_num_val
  images = result['images']
  pad = config.data.eval_pad_size
  assert images.shape == (2, pad, 3 * pad, 3) and images.dtype == np.uint8
  first = next(builder.as_dataset(split='val').as_numpy_iterator())
  height, width = first['label'].shape[:2]
  np.testing.assert_array_equal(images[0, :height, :width], first['image'])
  np.testing.assert_array_equal(images[0, :height, pad:pad + width], palette.colorize(first['label'][..., 0]))
  void = palette.colorize(np.full((pad - height, pad), 255, np.uint8))
  np.testing.assert_array_equal(images[0, height:, 2 * pad:], void)  # padding is shown void


def test_sliding_window_evaluation_runs_over_crops(run_and_data):
  _, model, config, builder, mesh = run_and_data
  assert config.data.crop_size < config.data.eval_pad_size
  whole = evaluate.evaluate_model(model, config, mesh, builder, split='val')
  windows = evaluate.evaluate_model(model, config, mesh, builder, split='val', sliding_window=True)
  assert windows['sliding_window'] and windows['confusion_matrix'].sum() == whole['confusion_matrix'].sum()
  assert not np.array_equal(windows['confusion_matrix'], whole['confusion_matrix'])


def test_cli_writes_json_with_overrides(run_and_data, monkeypatch, capsys):
  """`python -m dunet_jax.evaluate`, run in this process (its process boundary: tests/test_cli.py)."""
  workdir, model, config, builder, mesh = run_and_data
  predictions = workdir.parent / 'val_predictions'
  run_tool(monkeypatch, 'evaluate', f'--workdir={workdir}', '--config.eval.scales=(0.5,1.25)',
           '--config.eval.flip=True', f'--save_predictions={predictions}')
  stdout = capsys.readouterr().out
  written = json.loads((workdir / 'eval_val_5_s0.5-1.25_flip.json').read_text())
  assert written['scales'] == [0.5, 1.25] and written['flip'] and written['step'] == 5
  assert written['class_names'] == list(datasets.class_names(config.data))
  expected = evaluated(run_and_data, (0.5, 1.25), True)
  assert written['miou'] == pytest.approx(expected['miou'], abs=2e-3)
  assert 'mIoU' in stdout and written['class_names'][1] in stdout

  # --save_predictions: one palette PNG per val image, at its original size, named by its id, that
  # the VOC-style scorer scores to exactly the mIoU evaluate printed.
  labels = workdir.parent / 'val_labels'
  labels.mkdir()
  for example in builder.as_dataset(split='val').as_numpy_iterator():
    Image.fromarray(example['label'][..., 0]).save(labels / f'{example["id"].decode()}.png')
    with Image.open(predictions / f'{example["id"].decode()}.png') as png:
      assert png.mode == 'P' and png.size == example['label'].shape[1::-1]
      assert png.getpalette()[:6 * 3] == palette.VOC_COLORMAP[:6].ravel().tolist()
  pairs = score.matched_pairs(predictions, labels)
  assert len(pairs) == config.data.synthetic_num_val
  confusion, scored = score.score_pairs(pairs, config.data.num_classes)
  np.testing.assert_array_equal(confusion, written['confusion_matrix'])
  assert scored['miou'] == written['miou']
  assert f'{100 * scored["miou"]:5.2f}' in stdout

  with pytest.raises(SystemExit) as refused:
    run_tool(monkeypatch, 'evaluate', f'--workdir={workdir}', '--config.model.depth=101')
  assert '--config.model.depth' in str(refused.value.code)
