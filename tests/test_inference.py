"""Test-time augmentation against a per-image numpy composition, and the notebook API."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from dunet_jax import inference
from dunet_jax.data import palette
from helpers import REPO_ROOT, reference_probabilities

NUM_CLASSES = 5


def toy_logits(images: jax.Array) -> jax.Array:
  """A fixed 3x3 conv plus a column ramp: depends on context, size and left/right orientation."""
  kernel = jax.random.normal(jax.random.key(0), (3, 3, 3, NUM_CLASSES)) / 300
  logits = jax.lax.conv_general_dilated(images.astype(jnp.float32), kernel, (1, 1), 'SAME',
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  ramp = jnp.linspace(0.0, 2.0, images.shape[2])[None, None, :, None] * jnp.arange(NUM_CLASSES)
  return logits + ramp


@pytest.mark.parametrize('scales, flip', [((1.0,), False), ((1.0,), True), ((0.5, 1.0, 1.75), True)])
def test_multiscale_flip_matches_per_image_composition(scales, flip):
  images = np.random.default_rng(0).integers(0, 256, (2, 40, 56, 3)).astype(np.float32)
  got = np.asarray(inference.multiscale_probabilities(toy_logits, jnp.asarray(images),
                                                      scales=scales, flip=flip))
  for image, probabilities in zip(images, got):
    np.testing.assert_allclose(probabilities, reference_probabilities(image, scales, flip, toy_logits), atol=1e-5)
  np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)
  single = np.asarray(inference.multiscale_probabilities(toy_logits, jnp.asarray(images)))
  assert (scales, flip) == ((1.0,), False) or not np.allclose(got, single, atol=1e-3)


def test_window_starts_cover_with_overlap():
  assert inference.window_starts(100, 48) == [0, 32, 52]
  assert inference.window_starts(48, 48) == [0]
  assert inference.window_starts(30, 48) == [0]


def test_sliding_window_averages_logits_of_every_covering_window():
  images = jnp.asarray(np.random.default_rng(1).integers(0, 256, (1, 100, 60, 3)), jnp.float32)
  got = np.asarray(inference.sliding_window_logits(toy_logits, images, window=48))
  total, count = np.zeros((100, 60, NUM_CLASSES)), np.zeros((100, 60, 1))
  for top in (0, 32, 52):
    for left in (0, 12):   # width 60: stride 32 would pass the end, so the second is 60 - 48
      crop = images[:, top:top + 48, left:left + 48]
      total[top:top + 48, left:left + 48] += np.asarray(toy_logits(crop))[0]
      count[top:top + 48, left:left + 48] += 1
  np.testing.assert_allclose(got[0], total / count, rtol=1e-5, atol=1e-5)

  def per_pixel(x):
    return jnp.repeat(x[..., :1], NUM_CLASSES, -1) * jnp.arange(NUM_CLASSES)
  np.testing.assert_allclose(inference.sliding_window_logits(per_pixel, images, window=48),
                             per_pixel(images), rtol=1e-6)


def test_colorize_and_overlay():
  label_map = np.array([[0, 1], [15, 255]], np.uint8)
  np.testing.assert_array_equal(inference.colorize(label_map),
                                [[[0, 0, 0], [128, 0, 0]], [[192, 128, 128], [224, 224, 192]]])
  image = np.full((2, 2, 3), 100, np.uint8)
  blended = inference.overlay(Image.fromarray(image), label_map, alpha=0.25)
  np.testing.assert_array_equal(blended[0, 1], np.round(0.75 * 100 + 0.25 * np.array([128, 0, 0])))
  with pytest.raises(ValueError, match='label map'):
    inference.overlay(image, np.zeros((3, 2), np.uint8))
  assert palette.VOC_COLORMAP[15].tolist() == [192, 128, 128]


def test_checkpoint_from_8_devices_predicts_the_same_on_1_device(tiny_run, tmp_path):
  workdir, model = tiny_run
  assert len(jax.devices()) == 8
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, (70, 90, 3), dtype=np.uint8),
            rng.integers(0, 256, (101, 47, 3), dtype=np.uint8)]  # one 128 x 128 bucket
  np.savez(tmp_path / 'images.npz', *images)
  original = inference.Predictor(model, inference.checkpoint.load_config(workdir))
  expected = [original.predict(image) for image in images]
  assert len(np.unique(np.concatenate([e.ravel() for e in expected]))) > 1, 'constant predictions'
  script = (
      'import sys, numpy as np, jax\n'
      'from dunet_jax import inference\n'
      'assert len(jax.devices()) == 1, jax.devices()\n'
      'images = np.load(sys.argv[2])\n'
      'predictor = inference.load(sys.argv[1])\n'
      'np.savez(sys.argv[3], *[predictor.predict(images[k]) for k in images.files])\n')
  subprocess.run([sys.executable, '-c', script, str(workdir / 'checkpoints' / '5'),
                  str(tmp_path / 'images.npz'), str(tmp_path / 'labels.npz')],
                 cwd=REPO_ROOT, check=True, env={**os.environ, 'JAX_PLATFORMS': 'cpu',
                                                 'JAX_NUM_CPU_DEVICES': '1', 'XLA_FLAGS': ''})
  got = np.load(tmp_path / 'labels.npz')
  for image, labels, key in zip(images, expected, got.files):
    assert got[key].shape == image.shape[:2] and got[key].dtype == np.uint8
    np.testing.assert_array_equal(got[key], labels)
