"""Resume rules and the checks made before anything is spent (in-process, no training)."""
import logging
import shlex
import subprocess

import jax
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from configs import synthetic
from dunet_jax import checkpoint, train, train_state


def _config():
  config = synthetic.get_config('test')
  config.data.manual_dir = '/nonexistent/manual'  # nothing may be built: every case fails or returns first
  return config


def test_resume_warns_about_optimisation_changes_and_refuses_model_changes(tmp_path, caplog):
  checkpoint.save_config(tmp_path, _config())
  changed = _config()
  changed.train.learning_rate /= 10
  changed.train.num_steps *= 2
  with caplog.at_level(logging.WARNING):
    checkpoint.check_resumable(tmp_path, changed)
  assert 'train.learning_rate' in caplog.text and 'train.num_steps' in caplog.text

  changed.model.num_components = 8
  changed.model.fuse_features = ('conv1_3',)
  with pytest.raises(checkpoint.IncompatibleCheckpointError) as refusal:
    checkpoint.check_resumable(tmp_path, changed)
  message = str(refusal.value)
  assert 'model.num_components' in message and 'model.fuse_features' in message
  # The advice is flags the command line accepts, and with them the run resumes.
  advice = message.split('To resume it, pass ')[1].split(' (its recorded values')[0]
  argv = ['main', *shlex.split(advice)]
  options = flags.FlagValues()
  config_flags.DEFINE_config_dict('config', changed, flag_values=options, sys_argv=argv)
  options(argv)
  checkpoint.check_resumable(tmp_path, options.config)


def test_poly_schedule_after_num_steps_changes_on_resume():
  """A run resumed at step s with train.num_steps changed from N to N2 continues on the new schedule:
  its learning rate at s is lr * (1 - s / N2) ** poly_power (it jumps; the old remainder is not stretched)."""
  config = _config()
  config.train.update(optimizer='sgd', momentum=0.0, weight_decay=0.0, num_steps=10, poly_power=0.9)
  params = {'layer': {'kernel': np.ones(3, np.float32)}}
  grads = {'layer': {'kernel': np.full(3, 2.0, np.float32)}}
  tx = train_state.make_optimizer(config, params)
  opt_state = tx.init(params)
  for _ in range(4):  # 4 steps of the original run; opt_state (its step count) is what a checkpoint keeps
    _, opt_state = tx.update(grads, opt_state, params)
  config.train.num_steps = 20
  updates, _ = train_state.make_optimizer(config, params).update(grads, opt_state, params)
  expected = -2.0 * config.train.learning_rate * (1 - 4 / 20) ** 0.9
  np.testing.assert_allclose(updates['layer']['kernel'], expected, rtol=1e-6)


@pytest.mark.parametrize('section', ['train', 'eval'])
def test_batch_size_that_does_not_split_over_the_devices_is_refused_before_anything_is_written(tmp_path, section):
  config = _config()
  config[section].batch_size = 12
  assert jax.device_count() == 8
  with pytest.raises(ValueError, match=rf'config\.{section}\.batch_size=12 .* 8 devices.*'
                                       rf'--config\.{section}\.batch_size=16'):
    train.train_and_evaluate(config, tmp_path / 'run')
  assert not (tmp_path / 'run' / checkpoint.CONFIG_FILE).exists()


def test_unwritable_workdir_is_refused_before_anything_is_built(tmp_path):
  (tmp_path / 'a_file').write_text('')
  with pytest.raises(PermissionError, match=r'--workdir=.*a_file/run cannot be written'):
    train.train_and_evaluate(_config(), tmp_path / 'a_file' / 'run')


@pytest.fixture
def small_disk(tmp_path):
  """A 300 KB tmpfs (skips where this process may not mount one)."""
  folder = tmp_path / 'small_disk'
  folder.mkdir()
  if subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=300k', 'tmpfs', str(folder)],
                    capture_output=True, check=False).returncode:
    pytest.skip('cannot mount a tmpfs here (needs root)')
  yield folder
  subprocess.run(['umount', str(folder)], check=True)


def test_full_disk_during_a_save_is_one_message_and_keeps_the_previous_checkpoint(small_disk):
  arrays = {'w': np.random.default_rng(0).normal(size=40_000).astype(np.float32)}  # 160 KB: one fits
  state = train_state.TrainState(graphdef=None, tx=None, params=arrays, model_state={'m': np.zeros(2)},
                                 opt_state={'count': np.zeros((), np.int32)})
  manager = checkpoint.make_manager(small_disk / 'run', keep=10)
  checkpoint.save(manager, 1, state)
  checkpoint.finish(manager)
  with pytest.raises(OSError, match=r'is full: .* step 1, is intact.*--workdir with room'):
    checkpoint.save(manager, 2, state)
    checkpoint.finish(manager)
  restored, step = checkpoint.restore(checkpoint.make_manager(small_disk / 'run', read_only=True),
                                      {'params': jax.tree.map(lambda a: jax.ShapeDtypeStruct(
                                          a.shape, a.dtype, sharding=jax.sharding.SingleDeviceSharding(
                                              jax.devices()[0])), arrays)})
  assert step == 1
  np.testing.assert_array_equal(restored['params']['w'], arrays['w'])


@pytest.mark.parametrize('output', ['.', 'labels', 'labels/deeper'])
def test_predict_output_inside_its_input_folder_is_refused(tmp_path, monkeypatch, output):
  from dunet_jax import predict
  (tmp_path / 'images').mkdir()
  monkeypatch.chdir(tmp_path / 'images')
  with pytest.raises(ValueError, match=f'--output={output} is the --input folder or inside it'):
    predict.check_output(tmp_path / 'images', output)
  predict.check_output(tmp_path / 'images', tmp_path / 'labels')  # beside it: accepted


def test_evaluate_refuses_a_workdir_it_cannot_write_before_evaluating(tmp_path):
  from dunet_jax import evaluate
  workdir = tmp_path / 'run'
  workdir.mkdir()
  checkpoint.save_config(workdir, _config())
  (workdir / '.write_test.0').mkdir()  # the probe file cannot be created: the workdir is not writable
  with pytest.raises(PermissionError, match=r'--workdir=.*run cannot be written'):
    evaluate.evaluate_checkpoint(workdir, {})  # no checkpoint either: the check comes before the restore
