"""The training spine: sharded steps equal single-device steps, checkpoints round-trip, the CLI."""
import errno
import pathlib
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs import synthetic
from dunet_jax import checkpoint, sharding, train, train_state
from helpers import REPO_ROOT


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
  """(losses, state after the steps) of the real train step on `mesh`."""
  state, shardings = train_state.create_train_state(config, fitted_w, mesh)
  train_step = train.make_train_step(mesh, shardings)
  losses = []
  for batch in batches:
    state, step_metrics = train_step(state, sharding.to_global(batch, mesh))
    losses.append(float(step_metrics['loss']))
  return losses, state


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
  losses_1, state_1 = _run_steps(config, one, batches, w)
  losses_8, state_8 = _run_steps(config, many, batches, w)
  np.testing.assert_allclose(losses_8, losses_1, rtol=2e-5)
  assert losses_1[2] != losses_1[0]  # the steps really changed the parameters
  assert any(leaf.sharding.spec != jax.sharding.PartitionSpec() for leaf in jax.tree.leaves(state_8.params)) \
      == (mesh_shape['fsdp'] > 1)
  # Parameters, and BatchNorm statistics, which are those of the global batch, not of one device's share.
  for name in ('params', 'model_state'):
    got, expected = (jax.device_get(nnx.to_pure_dict(getattr(state, name))) for state in (state_8, state_1))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6), got, expected)


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
  model = train_state.create_model(config, _fitted_w(config))
  _, params, _ = train_state.split_model(model)
  tx = train_state.make_optimizer(config, params)
  ones = jax.tree.map(np.ones_like, params)
  updates, _ = tx.update(jax.tree.map(np.zeros_like, params), tx.init(ones), ones)
  for path, update in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(updates)):
    name = path[-1].key
    assert (np.abs(np.asarray(update)).max() > 0) == (name == 'kernel'), name


def _arrays(state: train_state.TrainState) -> dict:
  """The arrays of a state, on the host (the static graph of two separately built states differs)."""
  return jax.device_get({name: getattr(state, name) for name in train_state.ARRAY_FIELDS})


def test_checkpoint_round_trip_is_exact(tmp_path):
  config = _tiny_config()
  mesh = sharding.make_mesh(config.mesh)
  initial, shardings = train_state.create_train_state(config, _fitted_w(config), mesh)
  expected_initial = _arrays(initial)
  train_step = train.make_train_step(mesh, shardings)
  state, _ = train_step(initial, sharding.to_global(_random_batch(config), mesh))
  manager = checkpoint.make_manager(tmp_path)
  checkpoint.save(manager, 1, state)
  manager.wait_until_finished()
  expected = _arrays(state)
  fresh_state, fresh_shardings = train_state.create_train_state(config, _fitted_w(config), mesh)
  jax.tree.map(np.testing.assert_array_equal, _arrays(fresh_state), expected_initial)
  restored, step = checkpoint.restore_train_state(checkpoint.make_manager(tmp_path), fresh_state,
                                                  fresh_shardings)
  assert step == 1
  jax.tree.map(np.testing.assert_array_equal, _arrays(restored), expected)
  assert jax.tree.leaves(jax.tree.map(lambda leaf: leaf.sharding, restored)) == jax.tree.leaves(fresh_shardings)
  assert any(np.abs(np.asarray(m)).max() > 0 for m in jax.tree.leaves(expected['opt_state']))  # momentum saved


def _step_folders(manager) -> list[str]:
  return sorted(path.name for path in pathlib.Path(manager.directory).iterdir())


def test_restore_sets_aside_only_corrupt_steps(tmp_path, monkeypatch):
  """A failed read, or a tree that does not fit the model, stops the restore and moves nothing (the
  rerun resumes from the newest step); only a step shown corrupt is set aside for the previous one."""
  config = _tiny_config()
  mesh = sharding.make_mesh(config.mesh)
  state, shardings = train_state.create_train_state(config, _fitted_w(config), mesh)
  manager = checkpoint.make_manager(tmp_path)
  for step in (1, 2):
    checkpoint.save(manager, step, state)
    manager.wait_until_finished()

  manager = checkpoint.make_manager(tmp_path)
  real_restore, failures = manager.restore, [OSError(errno.EIO, 'Input/output error (injected once)')]

  def restore_that_fails_once(*args, **kwargs):
    if failures:
      raise failures.pop()
    return real_restore(*args, **kwargs)

  monkeypatch.setattr(manager, 'restore', restore_that_fails_once)
  with pytest.raises(OSError, match='injected once'):
    checkpoint.restore_train_state(manager, state, shardings)
  assert _step_folders(manager) == ['1', '2']
  assert checkpoint.restore_train_state(manager, state, shardings)[1] == 2  # the rerun: no step lost

  abstract = checkpoint.abstract_with_shardings(state.params, mesh)
  first_kernel = next(path for path, leaf in jax.tree_util.tree_leaves_with_path(abstract) if leaf.ndim == 4)
  params = jax.tree_util.tree_map_with_path(  # one kernel with another shape: another model's checkpoint
      lambda path, leaf: jax.ShapeDtypeStruct((leaf.shape[0] + 1, *leaf.shape[1:]), leaf.dtype, sharding=leaf.sharding)
      if path == first_kernel else leaf, abstract)
  with pytest.raises(checkpoint.IncompatibleCheckpointError, match='does not fit this model'):
    checkpoint.restore(manager, {'params': params}, set_aside_unreadable=True)
  assert _step_folders(manager) == ['1', '2']

  (tmp_path / 'checkpoints' / '2' / 'params' / '_METADATA').write_bytes(b'\0' * 7)
  assert checkpoint.restore_train_state(manager, state, shardings)[1] == 1
  folders = _step_folders(manager)
  assert folders[0] == '1' and folders[1].startswith('2.unreadable-') and len(folders) == 2


def _main(workdir, *overrides, check=True):
  command = [sys.executable, '-m', 'dunet_jax.main', '--config=configs/synthetic.py:test',
             f'--workdir={workdir}', *overrides]
  return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, check=check, timeout=600)


def test_missing_dataset_directory_names_the_path(tmp_path):
  missing = tmp_path / 'no_such_voc'
  result = _main(tmp_path / 'run', '--config.data.synthetic=False', f'--config.data.manual_dir={missing}',
                 f'--config.data.tfds_data_dir={tmp_path}/tfds', check=False)
  assert result.returncode != 0
  assert str(missing) in result.stderr
  assert 'Traceback' not in result.stderr.splitlines()[-1]


def test_unknown_w_solver_is_refused_before_any_work(tmp_path):
  config = _tiny_config()
  config.train.w_solver = 'lanczos'
  with pytest.raises(ValueError, match=r"train.w_solver='lanczos': use one of \('auto', 'exact', 'randomized'\)"):
    train.train_and_evaluate(config, tmp_path / 'run')
  assert not (tmp_path / 'run' / 'config.json').exists()
