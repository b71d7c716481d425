"""The training spine: sharded steps equal single-device steps, checkpoints round-trip, the CLI."""
import os
import pathlib
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs import synthetic
from dunet_jax import checkpoint, sharding, train

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _tiny_config(**mesh) -> ml_collections.ConfigDict:
  config = synthetic.get_config('test')
  config.mesh.update(mesh)
  return config


def _random_batch(config, batch_size=8, size=64, seed=0):
  rng = np.random.default_rng(seed)
  image = rng.integers(0, 256, size=(batch_size, size, size, 3)).astype(np.uint8)
  label = rng.integers(0, config.data.num_classes, size=(batch_size, size, size)).astype(np.uint8)
  label[:, :4] = 255
  return {'image': image, 'label': label}


def _run_steps(config, mesh, batches, fitted_w):
  model = train.create_model(config, fitted_w)
  _, params, model_state = checkpoint.split_model(model)
  tx = train.make_optimizer(config, params)
  state = (params, model_state, tx.init(params))
  shardings = tuple(sharding.tree_shardings(mesh, part) for part in state)
  params, model_state, opt_state = jax.device_put(state, shardings)
  train_step = train.make_train_step(model, config, tx, mesh, shardings)
  losses = []
  for batch in batches:
    params, model_state, opt_state, step_metrics = train_step(params, model_state, opt_state,
                                                              sharding.to_global(batch, mesh))
    losses.append(float(step_metrics['loss']))
  return losses, jax.device_get(nnx.to_pure_dict(params)), jax.device_get(nnx.to_pure_dict(model_state)), \
      jax.device_get(opt_state)


def _fitted_w(config):
  n = config.model.output_stride ** 2 * config.data.num_classes
  q, _ = np.linalg.qr(np.random.default_rng(3).normal(size=(n, config.model.num_components)))
  return q.astype(np.float32)


@pytest.mark.parametrize('mesh_shape', [{'data': 8, 'fsdp': 1}, {'data': 4, 'fsdp': 2}])
def test_sharded_steps_equal_one_device(mesh_shape):
  config = _tiny_config(**mesh_shape)
  batches = [_random_batch(config, seed=s) for s in range(3)]
  w = _fitted_w(config)
  one = sharding.make_mesh(ml_collections.ConfigDict({'data': 1, 'fsdp': 1}), devices=jax.devices()[:1])
  many = sharding.make_mesh(config.mesh)
  losses_1, params_1, state_1, _ = _run_steps(config, one, batches, w)
  losses_8, params_8, state_8, _ = _run_steps(config, many, batches, w)
  np.testing.assert_allclose(losses_8, losses_1, rtol=2e-5)
  assert losses_1[2] != losses_1[0]  # the steps really changed the parameters
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6), params_8, params_1)
  # BatchNorm statistics are those of the global batch, not of one device's share.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6), state_8, state_1)


def test_cross_entropy_ignores_void_and_matches_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 3, 5, 4)).astype(np.float32)
  labels = rng.integers(0, 4, size=(2, 3, 5))
  labels[0, 0] = 255
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  valid = labels != 255
  expected = -np.mean(np.take_along_axis(log_probs, np.where(valid, labels, 0)[..., None], -1)[..., 0][valid])
  np.testing.assert_allclose(float(train.cross_entropy(logits, labels)), expected, rtol=1e-5)


@pytest.mark.parametrize('optimizer', ['sgd', 'adamw'])  # the paper's, and the demo's
def test_weight_decay_applies_to_kernels_only(optimizer):
  config = _tiny_config()
  config.train.optimizer = optimizer
  model = train.create_model(config, _fitted_w(config))
  _, params, _ = checkpoint.split_model(model)
  tx = train.make_optimizer(config, params)
  ones = jax.tree.map(np.ones_like, params)
  updates, _ = tx.update(jax.tree.map(np.zeros_like, params), tx.init(ones), ones)
  for path, update in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(updates)):
    name = path[-1].key
    assert (np.abs(np.asarray(update)).max() > 0) == (name == 'kernel'), name


def test_checkpoint_round_trip_is_exact(tmp_path):
  config = _tiny_config()
  mesh = sharding.make_mesh(config.mesh)
  model = train.create_model(config, _fitted_w(config))
  _, params, model_state = checkpoint.split_model(model)
  tx = train.make_optimizer(config, params)
  state = (params, model_state, tx.init(params))
  shardings = tuple(sharding.tree_shardings(mesh, part) for part in state)
  params, model_state, opt_state = jax.device_put(state, shardings)
  train_step = train.make_train_step(model, config, tx, mesh, shardings)
  params, model_state, opt_state, _ = train_step(params, model_state, opt_state,
                                                 sharding.to_global(_random_batch(config), mesh))
  manager = checkpoint.make_manager(tmp_path)
  checkpoint.save(manager, 1, params, model_state, opt_state)
  manager.wait_until_finished()
  expected = jax.device_get((params, model_state, opt_state))
  fresh = checkpoint.make_manager(tmp_path)
  abstract = {name: checkpoint.abstract_with_shardings(tree, mesh)
              for name, tree in zip(('params', 'model_state', 'opt_state'), expected)}
  items, step = checkpoint.restore(fresh, abstract)
  assert step == 1
  got = jax.device_get((items['params'], items['model_state'], items['opt_state']))
  jax.tree.map(np.testing.assert_array_equal, got, expected)
  assert any(np.abs(np.asarray(m)).max() > 0 for m in jax.tree.leaves(got[2]))  # momentum saved


def _main(workdir, *overrides, check=True, env=None):
  command = [sys.executable, '-m', 'dunet_jax.main', '--config=configs/synthetic.py:test',
             f'--workdir={workdir}', *overrides]
  return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, check=check,
                        env={**os.environ, **(env or {})}, timeout=600)


def _data_dirs(tmp_path) -> dict[str, str]:
  return {'manual_dir': f'{tmp_path}/manual', 'tfds_data_dir': f'{tmp_path}/tfds'}


def _data_overrides(tmp_path):
  return [f'--config.data.{key}={value}' for key, value in _data_dirs(tmp_path).items()]


def test_unknown_config_key_names_the_key(tmp_path):
  result = _main(tmp_path / 'run', '--config.train.lerning_rate=0.1', check=False)
  assert result.returncode != 0
  assert 'lerning_rate' in result.stderr


def test_missing_dataset_directory_names_the_path(tmp_path):
  missing = tmp_path / 'no_such_voc'
  result = _main(tmp_path / 'run', '--config.data.synthetic=False', f'--config.data.manual_dir={missing}',
                 f'--config.data.tfds_data_dir={tmp_path}/tfds', check=False)
  assert result.returncode != 0
  assert str(missing) in result.stderr
  assert 'Traceback' not in result.stderr.splitlines()[-1]


def test_main_trains_checkpoints_and_resumes(tmp_path):
  workdir = tmp_path / 'run'
  _main(workdir, *_data_overrides(tmp_path))
  assert sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit()) == [3, 6]
  assert list(workdir.glob('events.out.tfevents.*')), 'no TensorBoard events written'
  assert (workdir / 'reconstruction.npz').exists() and (workdir / 'config.json').exists()
  again = _main(workdir, *_data_overrides(tmp_path))
  assert 'Training already complete' in again.stderr
  more = _main(workdir, *_data_overrides(tmp_path), '--config.train.num_steps=8')
  assert 'Resumed from' in more.stderr and 'at step 6' in more.stderr
  # The refusal happens before any work, so it is checked in-process (the CLI's one-line error
  # message for user errors is checked by test_missing_dataset_directory_names_the_path).
  incompatible = _tiny_config()
  incompatible.data.update(_data_dirs(tmp_path))
  incompatible.model.num_components = 8
  with pytest.raises(ValueError, match='model.num_components'):
    train.train_and_evaluate(incompatible, workdir)
