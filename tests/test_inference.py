"""Test-time augmentation against a per-image numpy composition, and the notebook API."""
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from dunet_jax import inference
from dunet_jax.data import palette

NUM_CLASSES = 5
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def toy_logits(images: jax.Array) -> jax.Array:
  """A fixed 3x3 conv plus a column ramp: depends on context, size and left/right orientation."""
  kernel = jax.random.normal(jax.random.key(0), (3, 3, 3, NUM_CLASSES)) / 300
  logits = jax.lax.conv_general_dilated(images.astype(jnp.float32), kernel, (1, 1), 'SAME',
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  ramp = jnp.linspace(0.0, 2.0, images.shape[2])[None, None, :, None] * jnp.arange(NUM_CLASSES)
  return logits + ramp


def numpy_softmax(logits: np.ndarray) -> np.ndarray:
  exp = np.exp(logits - logits.max(-1, keepdims=True))
  return exp / exp.sum(-1, keepdims=True)


def reference_probabilities(image: np.ndarray, scales, flip: bool, logits_fn=toy_logits) -> np.ndarray:
  """One image (H, W, 3): resize, predict, mirror, softmax, resize back, average, in a loop."""
  height, width, _ = image.shape
  outputs = []
  for scale in scales:
    size = (int(round(height * scale)), int(round(width * scale)))
    scaled = np.asarray(jax.image.resize(image.astype(np.float32), (*size, 3), 'linear'))
    for mirrored in [False, True][:2 if flip else 1]:
      inputs = scaled[:, ::-1] if mirrored else scaled
      logits = np.asarray(logits_fn(jnp.asarray(inputs.copy())[None]))[0]
      probabilities = numpy_softmax(logits[:, ::-1] if mirrored else logits)
      outputs.append(np.asarray(jax.image.resize(probabilities, (height, width, logits.shape[-1]),
                                                 'linear')))
  return np.mean(outputs, axis=0)


@pytest.mark.parametrize('scales, flip', [((1.0,), False), ((1.0,), True), ((0.5, 1.0, 1.75), True)])
def test_multiscale_flip_matches_per_image_composition(scales, flip):
  images = np.random.default_rng(0).integers(0, 256, (2, 40, 56, 3)).astype(np.float32)
  got = np.asarray(inference.multiscale_probabilities(toy_logits, jnp.asarray(images),
                                                      scales=scales, flip=flip))
  for image, probabilities in zip(images, got):
    np.testing.assert_allclose(probabilities, reference_probabilities(image, scales, flip), atol=1e-5)
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


# A tiny run shared by the inference, evaluate, predict, export and notebook tests (imported by
# them, made once per pytest session).

def random_model(config) -> nnx.Module:
  """A tiny DUNet with He-normal kernels, unit BatchNorm and an orthonormal W, filled in numpy.

  Filling an eval_shape model avoids compiling one initializer per parameter shape, which costs
  about 30 CPU seconds for this model.
  """
  from dunet_jax.models import dunet
  abstract = nnx.eval_shape(lambda: dunet.DUNet(config.model, config.data.num_classes,
                                                reconstruction=None, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  rng = np.random.default_rng(0)

  def fill(path, leaf):
    name, shape = path[-1], leaf.shape
    if name == 'kernel':
      value = rng.normal(0, np.sqrt(2 / np.prod(shape[:-1])), shape)
    elif name == 'w':
      value = np.linalg.qr(rng.normal(size=shape))[0]
    elif name in ('scale', 'var'):
      value = np.ones(shape)
    else:
      value = np.zeros(shape)
    return jnp.asarray(value, leaf.dtype)

  state = nnx.from_flat_state([(path, variable.replace(fill(path, variable.get_value())))
                               for path, variable in nnx.to_flat_state(state)])
  model = nnx.merge(graphdef, state)
  model.eval()
  return model


def tiny_run(directory, step: int = 5):
  """(workdir, model) of a tiny DUNet saved with params FSDP-sharded over a 4 x 2 mesh of 8 devices.

  The model stays in memory (on the 8 devices) as the original run's reference.
  """
  from configs import synthetic
  from dunet_jax import checkpoint, sharding, train_state
  workdir = pathlib.Path(directory) / 'tiny_run'
  if workdir in _TINY_RUNS:
    return workdir, _TINY_RUNS[workdir]
  config = synthetic.get_config('test')
  config.mesh.data, config.mesh.fsdp = 4, 2
  config.data.manual_dir = str(pathlib.Path(directory) / 'synthetic' / 'manual')
  config.data.tfds_data_dir = str(pathlib.Path(directory) / 'synthetic' / 'tfds')
  model = random_model(config)
  mesh = sharding.make_mesh(config.mesh)
  graphdef, params, model_state = train_state.split_model(model)
  params = jax.device_put(params, sharding.tree_shardings(mesh, params))
  model_state = jax.device_put(model_state, sharding.tree_shardings(mesh, model_state))
  assert any(leaf.sharding.spec != jax.sharding.PartitionSpec() for leaf in jax.tree.leaves(params))
  workdir.mkdir(parents=True)
  checkpoint.save_config(workdir, config)
  manager = checkpoint.make_manager(workdir)
  state = train_state.TrainState(graphdef=graphdef, tx=None, params=params, model_state=model_state,
                                 opt_state={'count': np.zeros((), np.int32)})
  checkpoint.save(manager, step, state)
  manager.wait_until_finished()
  _TINY_RUNS[workdir] = nnx.merge(graphdef, params, model_state)
  return workdir, _TINY_RUNS[workdir]


_TINY_RUNS = {}


@pytest.fixture(scope='session')
def tiny_workdir(tmp_path_factory):
  return tiny_run(tmp_path_factory.getbasetemp())


def test_checkpoint_from_8_devices_predicts_the_same_on_1_device(tiny_workdir, tmp_path):
  workdir, model = tiny_workdir
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
