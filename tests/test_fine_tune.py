"""Fine-tuning (config.train.init_from): what the new run takes from the source, what it refits or
re-initialises, what it refuses, and that a rerun resumes rather than starting from the source again."""
import logging
import pathlib
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from configs import synthetic
from dunet_jax import checkpoint, fine_tune, reconstruction, sharding, train, train_state
from dunet_jax.data import datasets
from helpers import random_model

# Output stride 8 keeps W small (N = 64 * classes), so refitting it takes a fraction of a second.
OUTPUT_STRIDE = 8


def _config(data_root: pathlib.Path, **model):
  config = synthetic.get_config('test')
  config.data.manual_dir = str(data_root / 'manual')
  config.data.tfds_data_dir = str(data_root / 'tfds')
  config.model.output_stride = OUTPUT_STRIDE
  config.model.update(model)
  return config


def _save_run(workdir: pathlib.Path, config, models_by_step: dict) -> None:
  """A source workdir as training leaves it: config.json, reconstruction.npz and checkpoints."""
  workdir.mkdir(parents=True)
  checkpoint.save_config(workdir, config)
  manager = checkpoint.make_manager(workdir)
  for step, model in models_by_step.items():
    graphdef, params, model_state = train_state.split_model(model)
    state = train_state.TrainState(graphdef=graphdef, tx=None, params=params, model_state=model_state,
                                   opt_state={'count': np.zeros((), np.int32)})
    checkpoint.save(manager, step, state)
  manager.wait_until_finished()
  manager.close()
  w = np.asarray(model.decoder.dupsample.w[...])
  reconstruction.save_reconstruction(workdir / checkpoint.RECONSTRUCTION_FILE, reconstruction.ReconstructionFit(
      w=w, eigenvalues=np.linspace(1, 0.1, w.shape[1]), num_windows=100, ratio=OUTPUT_STRIDE,
      num_classes=config.data.num_classes, num_components=config.model.num_components))


def _flat(state) -> dict[str, np.ndarray]:
  return {'/'.join(map(str, path)): np.asarray(variable.get_value())
          for path, variable in nnx.to_flat_state(state)}


@pytest.fixture(scope='module')
def source(tmp_path_factory):
  """(workdir, config, {step: flat variables}) of a 21-class run with checkpoints at steps 3 and 5
  (different values), and the built-in dataset its config names."""
  root = tmp_path_factory.mktemp('fine_tune')
  config = _config(root)
  first = random_model(config)
  graphdef, variables = nnx.split(first)
  second = nnx.merge(graphdef, jax.tree.map(lambda leaf: leaf * 2 + 1, variables))  # another step's values
  workdir = root / 'source'
  _save_run(workdir, config, {3: first, 5: second})
  datasets.prepare(config.data)
  return workdir, config, {3: _flat(nnx.state(first)), 5: _flat(nnx.state(second))}


def _start(config, workdir: pathlib.Path, builder=None):
  """What train.train_and_evaluate does before its first step when no checkpoint is there."""
  workdir.mkdir(parents=True, exist_ok=True)
  mesh = sharding.make_mesh(config.mesh)
  started = fine_tune.open_source(config, workdir, mesh)
  w = train.fit_or_load_w(config, workdir, builder, mesh)
  fresh, shardings = train_state.create_train_state(config, w, mesh)
  return fresh, started.initialise(fresh, shardings), started


def test_fine_tune_on_another_split_takes_the_newest_params_statistics_and_w(source, tmp_path):
  source_workdir, source_config, source_steps = source
  config = source_config.copy_and_resolve_references()
  config.data.train_split = 'val'   # train_aug -> trainval: another split, the same classes
  config.train.init_from = str(source_workdir)
  fresh, state, started = _start(config, tmp_path / 'fine')
  expected = source_steps[5]        # a workdir means its newest checkpoint
  assert started.step == 5 and started.reinitialised == ()
  got = {**_flat(state.params), **_flat(state.model_state)}
  assert got.keys() == expected.keys()
  for name, value in got.items():
    np.testing.assert_array_equal(value, expected[name], err_msg=name)
  # The optimizer starts afresh: SGD's momentum is zero, not the source's (which has none saved).
  for leaf in jax.tree.leaves(state.opt_state):
    assert not np.any(np.asarray(leaf))
  jax.tree.map(np.testing.assert_array_equal, state.opt_state, fresh.opt_state)
  # W was not refitted on the new split: this run's reconstruction.npz is the source's W.
  written = reconstruction.load_reconstruction(tmp_path / 'fine' / checkpoint.RECONSTRUCTION_FILE)
  np.testing.assert_array_equal(written.w, expected['decoder/dupsample/w'])
  assert written.num_windows == 100


def test_more_classes_refit_w_and_reinitialise_the_code_layers(source, tmp_path, caplog):
  source_workdir, source_config, source_steps = source
  config = source_config.copy_and_resolve_references()
  config.data.num_classes = 30      # as VOC (21) -> Context (60); the built-in labels are < 21 < 30
  config.train.init_from = str(source_workdir / 'checkpoints' / '3')
  builder = datasets.prepare(source_config.data)  # the built-in dataset declares 21 classes
  caplog.set_level(logging.INFO)
  _, state, started = _start(config, tmp_path / 'fine', builder)
  assert 'of backbone, decoder/convs, decoder/fuse (parameters, BatchNorm statistics);' in caplog.text
  assert 're-initialised decoder/to_codes, decoder/dupsample (num_classes 21 -> 30: W refitted' in caplog.text
  expected = source_steps[3]        # the checkpoint folder named, not the newest
  assert started.step == 3
  got = {**_flat(state.params), **_flat(state.model_state)}
  backbone = [name for name in got if name.startswith('backbone/')]
  assert len(backbone) > 50
  for name in backbone + [name for name in got if name.startswith('decoder/convs/')]:
    np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
  w = got['decoder/dupsample/w']
  assert w.shape == (OUTPUT_STRIDE ** 2 * 30, config.model.num_components)
  np.testing.assert_allclose(w.T @ w, np.eye(w.shape[1]), atol=1e-4)  # a PCA basis of the new labels
  refitted = reconstruction.load_reconstruction(tmp_path / 'fine' / checkpoint.RECONSTRUCTION_FILE,
                                                expect_num_classes=30, expect_ratio=OUTPUT_STRIDE)
  np.testing.assert_array_equal(w, refitted.w)
  kernel = got['decoder/to_codes/kernel']
  assert kernel.shape == expected['decoder/to_codes/kernel'].shape
  assert not np.allclose(kernel, expected['decoder/to_codes/kernel'])
  np.testing.assert_allclose(kernel.std(), config.model.head_init_std, rtol=0.2)  # the head's Gaussian init
  assert not np.any(got['decoder/to_codes/bias'])
  np.testing.assert_allclose(np.exp(got['decoder/dupsample/log_temperature']), config.model.temperature_init,
                             rtol=1e-6)


def test_source_of_another_backbone_or_without_its_w_is_refused_by_name(source, tmp_path):
  source_workdir, source_config, _ = source
  deeper = _config(tmp_path, stage_blocks=(1, 1, 2, 1))
  _save_run(tmp_path / 'deeper', deeper, {1: random_model(deeper)})
  config = source_config.copy_and_resolve_references()
  config.train.init_from = str(tmp_path / 'deeper')
  with pytest.raises(ValueError, match='init_from=.*variable backbone/layer3/1/bn1/bias is only in the source'):
    fine_tune.open_source(config, tmp_path / 'fine', sharding.make_mesh(config.mesh))
  assert not (tmp_path / 'fine' / checkpoint.RECONSTRUCTION_FILE).exists()
  config.train.init_from = str(tmp_path / 'nowhere')
  with pytest.raises(FileNotFoundError, match='init_from=.*nowhere is neither a training workdir'):
    fine_tune.open_source(config, tmp_path / 'fine', sharding.make_mesh(config.mesh))
  without_w = tmp_path / 'without_w'
  shutil.copytree(source_workdir, without_w)
  (without_w / checkpoint.RECONSTRUCTION_FILE).unlink()
  config.train.init_from = str(without_w)
  with pytest.raises(FileNotFoundError, match='init_from: .*without_w/reconstruction.npz is missing'):
    fine_tune.open_source(config, tmp_path / 'fine', sharding.make_mesh(config.mesh))


def test_rerunning_a_fine_tune_resumes_it_without_reading_the_source(source, tmp_path, caplog):
  source_workdir, source_config, _ = source
  copy = tmp_path / 'source_copy'
  shutil.copytree(source_workdir, copy)
  config = source_config.copy_and_resolve_references()
  config.train.init_from = str(copy)
  config.train.update(num_steps=1, checkpoint_every=1, eval_every=1000)
  workdir = tmp_path / 'fine'
  caplog.set_level(logging.INFO)
  train.train_and_evaluate(config, workdir)
  assert 'Fine-tuning from' in caplog.text and '(step 5)' in caplog.text
  assert checkpoint.make_manager(workdir, read_only=True).all_steps() == [1]  # counted from 0, not from 5
  caplog.clear()
  shutil.rmtree(copy)               # a resumed run never reads its source again
  train.train_and_evaluate(config, workdir)  # re-initialised, it would train step 1 again
  assert 'Resumed from' in caplog.text and 'Training already complete (step 1 of 1)' in caplog.text
  assert 'Fine-tuning from' not in caplog.text
  assert checkpoint.make_manager(workdir, read_only=True).all_steps() == [1]


def test_a_paper_preset_fine_tunes_without_imagenet_weights():
  from configs import voc
  from dunet_jax.models import config_checks
  config = voc.get_config('r50_os16')
  with pytest.raises(ValueError, match='model.pretrained'):
    config_checks.validate_model(config)
  config.train.init_from = 'runs/r50_os16'   # the source's backbone replaces ImageNet's
  config_checks.validate_model(config)
