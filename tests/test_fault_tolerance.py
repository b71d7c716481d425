"""Preemption, crashes, corrupt checkpoints and NaN losses of one training process, end to end.

Every run is a real `python -m dunet_jax.main` process on the built-in test preset. The
uninterrupted reference run is shared by the tests; each disturbed run must end with exactly
the reference's parameters (same devices, same program). Runs of several processes:
tests/test_multihost.py.
"""
import shutil
import signal

import jax
import numpy as np
import pytest

from configs import synthetic
from dunet_jax import preemption, train
from training_runs import (CHECKPOINT_EVERY, NUM_STEPS, run, saved_params, saved_steps, start, stopped_step,
                           wait_for_checkpoint)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('data')


@pytest.fixture(scope='module')
def reference(tmp_path_factory, data_dir):
  """An uninterrupted run: its checkpoint at NUM_STEPS is what every disturbed run must reproduce."""
  workdir = tmp_path_factory.mktemp('reference') / 'run'
  run(workdir, data_dir)
  return workdir


def test_a_run_writes_its_checkpoints_events_w_and_config_and_refuses_another_model(reference, data_dir,
                                                                                      tmp_path):
  assert saved_steps(reference) == list(range(CHECKPOINT_EVERY, NUM_STEPS + 1, CHECKPOINT_EVERY))
  assert list(reference.glob('events.out.tfevents.*')), 'no TensorBoard events written'
  assert (reference / 'reconstruction.npz').exists() and (reference / 'config.json').exists()
  # Resuming with a model that does not match the run's checkpoints is refused before any work.
  workdir = tmp_path / 'run'
  shutil.copytree(reference, workdir)
  incompatible = synthetic.get_config('test')
  incompatible.data.update(manual_dir=f'{data_dir}/manual', tfds_data_dir=f'{data_dir}/tfds')
  incompatible.model.num_components = 8
  with pytest.raises(ValueError, match='model.num_components'):
    train.train_and_evaluate(incompatible, workdir)
  assert saved_steps(workdir) == saved_steps(reference)


def test_sigterm_saves_then_sigkill_resume_equals_uninterrupted(reference, data_dir, tmp_path):
  workdir = tmp_path / 'run'
  first = start(workdir, data_dir)
  wait_for_checkpoint(first, workdir, CHECKPOINT_EVERY)
  first.send_signal(signal.SIGTERM)
  output = first.communicate(timeout=300)[0]
  assert first.returncode == preemption.EXIT_CODE, output[-3000:]
  stopped = stopped_step(output)
  assert CHECKPOINT_EVERY <= stopped < NUM_STEPS and saved_steps(workdir)[-1] == stopped

  second = start(workdir, data_dir)
  next_save = 2 * CHECKPOINT_EVERY if stopped < 2 * CHECKPOINT_EVERY else 3 * CHECKPOINT_EVERY
  wait_for_checkpoint(second, workdir, next_save)
  second.kill()
  output = second.communicate(timeout=60)[0]
  assert second.returncode == -signal.SIGKILL
  assert 'Resumed from' in output and f'at step {stopped}' in output, output[-3000:]

  run(workdir, data_dir)
  step, resumed = saved_params(workdir)
  reference_step, expected = saved_params(reference)
  assert step == reference_step == NUM_STEPS
  jax.tree.map(np.testing.assert_array_equal, resumed, expected)


def test_corrupt_latest_checkpoint_falls_back_to_previous(reference, tmp_path, data_dir):
  workdir = tmp_path / 'run'
  shutil.copytree(reference, workdir)
  for path in (workdir / 'checkpoints' / str(NUM_STEPS) / 'params').rglob('*'):
    if path.is_file() and path.stat().st_size > 0:
      path.write_bytes(b'\0' * 7)
  result = run(workdir, data_dir)
  assert f'Checkpoint step {NUM_STEPS}' in result.stderr and 'unreadable' in result.stderr
  assert f'at step {NUM_STEPS - CHECKPOINT_EVERY}' in result.stderr  # resumed from the previous one
  step, redone = saved_params(workdir)
  jax.tree.map(np.testing.assert_array_equal, redone, saved_params(reference)[1])
  assert step == NUM_STEPS
  assert list((workdir / 'checkpoints').glob(f'{NUM_STEPS}.unreadable-*')), 'the unreadable step was not kept'


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, data_dir):
  workdir = tmp_path / 'run'
  result = run(workdir, data_dir, '--config.train.learning_rate=1e30', '--config.train.checkpoint_every=1',
               check=False)
  assert result.returncode != 0
  message = result.stderr.strip().splitlines()
  assert any('NaN/Inf at step' in line for line in message), result.stderr[-2000:]
  good = saved_steps(workdir)
  assert good, 'no good checkpoint was kept'
  bad_step = int(result.stderr.split('NaN/Inf at step ')[1].split()[0])
  assert good[-1] == bad_step - 1
  _, params = saved_params(workdir)
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(params))
