"""Preemption, crashes, corrupt checkpoints, NaN losses and multi-process training, end to end.

Every run is a real `python -m dunet_jax.main` process on the built-in test preset. The
uninterrupted reference run is shared by the tests; each disturbed run must end with exactly
the reference's parameters (same devices, same program), or, across process layouts, equal to
float tolerance.
"""
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from dunet_jax import checkpoint, preemption, reconstruction, train_state

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
NUM_STEPS = 20
CHECKPOINT_EVERY = 5


def _command(workdir, data_dir, *overrides, extra_flags=(), program=('-m', 'dunet_jax.main')):
  return [sys.executable, *program, '--config=configs/synthetic.py:test', f'--workdir={workdir}',
          f'--config.data.manual_dir={data_dir}/manual', f'--config.data.tfds_data_dir={data_dir}/tfds',
          f'--config.train.num_steps={NUM_STEPS}', f'--config.train.checkpoint_every={CHECKPOINT_EVERY}',
          '--config.train.keep_checkpoints=10', '--config.train.eval_every=1000', *overrides, *extra_flags]


def _env(devices=1):
  return {**os.environ, 'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}'}


def _run(workdir, data_dir, *overrides, devices=1, check=True):
  return subprocess.run(_command(workdir, data_dir, *overrides), cwd=REPO_ROOT, env=_env(devices),
                        capture_output=True, text=True, check=check, timeout=600)


def _steps(workdir) -> list[int]:
  folder = pathlib.Path(workdir) / 'checkpoints'
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.exists() else []


def _params(workdir, step=None):
  model, _, restored_step = checkpoint.restore_model(workdir, step)
  return restored_step, jax.device_get(nnx.to_pure_dict(nnx.state(model)))


def _start(workdir, data_dir, *overrides, devices=1, extra_flags=(), program=('-m', 'dunet_jax.main')):
  return subprocess.Popen(_command(workdir, data_dir, *overrides, extra_flags=extra_flags, program=program),
                          cwd=REPO_ROOT, env=_env(devices), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)


def _process_flags(coordinator_address, index, count=2):
  return (f'--coordinator_address={coordinator_address}', f'--num_processes={count}', f'--process_id={index}')


def _stopped_step(output: str) -> int:
  return int(output.split('Stopped at step ')[1].split()[0])


def _wait_for_checkpoint(process, workdir, step):
  while step not in _steps(workdir):
    assert process.poll() is None, f'run ended before checkpoint {step}:\n{process.stdout.read()[-3000:]}'
    time.sleep(0.02)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('data')


@pytest.fixture(scope='module')
def reference(tmp_path_factory, data_dir):
  """An uninterrupted run: its checkpoint at NUM_STEPS is what every disturbed run must reproduce."""
  workdir = tmp_path_factory.mktemp('reference') / 'run'
  _run(workdir, data_dir)
  return workdir


def test_sigterm_saves_then_sigkill_resume_equals_uninterrupted(reference, data_dir, tmp_path):
  workdir = tmp_path / 'run'
  first = _start(workdir, data_dir)
  _wait_for_checkpoint(first, workdir, CHECKPOINT_EVERY)
  first.send_signal(signal.SIGTERM)
  output = first.communicate(timeout=300)[0]
  assert first.returncode == preemption.EXIT_CODE, output[-3000:]
  stopped = _stopped_step(output)
  assert CHECKPOINT_EVERY <= stopped < NUM_STEPS and _steps(workdir)[-1] == stopped

  second = _start(workdir, data_dir)
  next_save = 2 * CHECKPOINT_EVERY if stopped < 2 * CHECKPOINT_EVERY else 3 * CHECKPOINT_EVERY
  _wait_for_checkpoint(second, workdir, next_save)
  second.kill()
  second.communicate(timeout=60)
  assert second.returncode == -signal.SIGKILL

  _run(workdir, data_dir)
  step, resumed = _params(workdir)
  reference_step, expected = _params(reference)
  assert step == reference_step == NUM_STEPS
  jax.tree.map(np.testing.assert_array_equal, resumed, expected)


def test_corrupt_latest_checkpoint_falls_back_to_previous(reference, tmp_path, data_dir):
  workdir = tmp_path / 'run'
  shutil.copytree(reference, workdir)
  for path in (workdir / 'checkpoints' / str(NUM_STEPS) / 'params').rglob('*'):
    if path.is_file() and path.stat().st_size > 0:
      path.write_bytes(b'\0' * 7)
  result = _run(workdir, data_dir)
  assert f'Checkpoint step {NUM_STEPS}' in result.stderr and 'unreadable' in result.stderr
  assert f'at step {NUM_STEPS - CHECKPOINT_EVERY}' in result.stderr  # resumed from the previous one
  step, redone = _params(workdir)
  jax.tree.map(np.testing.assert_array_equal, redone, _params(reference)[1])
  assert step == NUM_STEPS
  assert list((workdir / 'checkpoints').glob(f'{NUM_STEPS}.unreadable-*')), 'the unreadable step was not kept'


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, data_dir):
  workdir = tmp_path / 'run'
  result = _run(workdir, data_dir, '--config.train.learning_rate=1e30', '--config.train.checkpoint_every=1',
                check=False)
  assert result.returncode != 0
  message = result.stderr.strip().splitlines()
  assert any('NaN/Inf at step' in line for line in message), result.stderr[-2000:]
  good = _steps(workdir)
  assert good, 'no good checkpoint was kept'
  bad_step = int(result.stderr.split('NaN/Inf at step ')[1].split()[0])
  assert good[-1] == bad_step - 1
  _, params = _params(workdir)
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(params))


def test_two_processes_match_one_process(tmp_path, data_dir, coordinator_address):
  """2 processes x 2 CPU devices (gloo) take the same first step as 1 process x 4 devices.

  Compared after one step, relative to each variable's update. At initialisation the stem's
  gradients are sums of many nearly cancelling terms (batch norm follows every convolution), so
  the different order of the cross-device sums moves them by up to about 2% of the update (the
  stem's kernels and biases; deeper layers agree to 0.05%), and the runs then drift apart (about
  30% after four steps). A wrong batch slice, a missing all-reduce of gradients or batch
  statistics, or a different W changes every update by its own size.
  """
  steps = ['--config.train.num_steps=1', '--config.train.checkpoint_every=1']
  single = tmp_path / 'single'
  _run(single, data_dir, *steps, devices=4)
  multi = tmp_path / 'multi'
  processes = [_start(multi, data_dir, *steps, devices=2, extra_flags=_process_flags(coordinator_address, index))
               for index in range(2)]
  outputs = [p.communicate(timeout=600)[0] for p in processes]
  for process, output in zip(processes, outputs):
    assert process.returncode == 0, output[-3000:]
  assert 'Process 1 of 2' in outputs[1] and '4 global devices' in outputs[0]
  w_single = reconstruction.load_reconstruction(single / checkpoint.RECONSTRUCTION_FILE)
  w_multi = reconstruction.load_reconstruction(multi / checkpoint.RECONSTRUCTION_FILE)
  assert w_multi.num_windows == w_single.num_windows
  np.testing.assert_allclose(w_multi.w, w_single.w, atol=1e-6)
  step_single, expected = _params(single)
  step_multi, got = _params(multi)
  assert step_single == step_multi == 1
  config = checkpoint.load_config(single)
  initial = jax.device_get(nnx.to_pure_dict(nnx.state(train_state.create_model(config, w_single.w))))

  def check(path, got_leaf, expected_leaf, initial_leaf):
    update = np.abs(np.asarray(expected_leaf, np.float64) - initial_leaf).max()
    difference = np.abs(np.asarray(got_leaf, np.float64) - expected_leaf).max()
    assert difference <= 0.05 * update + 1e-7, (jax.tree_util.keystr(path), difference, update)

  jax.tree_util.tree_map_with_path(check, got, expected, initial)


# Process 0 of a run whose dataset build takes longer than gloo's 30 s wait for a peer.
SLOW_PREPARE_SECONDS = 35
SLOW_CHIEF = f"""
import runpy, sys, time
from dunet_jax.data import datasets
prepare = datasets.prepare
datasets.prepare = lambda data_config: (time.sleep({SLOW_PREPARE_SECONDS}), prepare(data_config))[1]
sys.argv[0] = 'dunet_jax.main'
runpy.run_module('dunet_jax.main', run_name='__main__', alter_sys=True)
"""


def test_slow_chief_then_sigterm_to_one_of_two_processes_stops_both_at_one_step(
    tmp_path, data_dir, coordinator_address):
  """Process 1 waits for a process 0 that takes longer than gloo's 30 s timeout to prepare the data.
  Then JAX's preemption notifier: a SIGTERM to process 1 only makes both processes save the same
  step and exit with preemption.EXIT_CODE; the run then resumes from that step."""
  workdir = tmp_path / 'run'
  endless = '--config.train.num_steps=100000'  # the run can only end by preemption
  processes = [_start(workdir, data_dir, endless, extra_flags=_process_flags(coordinator_address, index),
                      program=('-c', SLOW_CHIEF) if index == 0 else ('-m', 'dunet_jax.main'))
               for index in range(2)]
  _wait_for_checkpoint(processes[0], workdir, CHECKPOINT_EVERY)
  processes[1].send_signal(signal.SIGTERM)
  outputs = [p.communicate(timeout=300)[0] for p in processes]
  for process, output in zip(processes, outputs):
    assert process.returncode == preemption.EXIT_CODE, output[-3000:]
  stopped = [_stopped_step(output) for output in outputs]
  assert stopped[0] == stopped[1] == _steps(workdir)[-1] > CHECKPOINT_EVERY, (stopped, _steps(workdir))
  # The saved step is complete and is where the rerun (here one process) starts; made the last step,
  # the rerun restores it and compiles nothing.
  resumed = _run(workdir, data_dir, f'--config.train.num_steps={stopped[0]}')
  assert f'at step {stopped[0]}' in resumed.stderr and 'Training already complete' in resumed.stderr


def test_a_failing_chief_stops_every_process_with_its_error(tmp_path, coordinator_address):
  """Process 0 cannot build the dataset (no such folder): both processes exit with that error, and
  neither waits for the other at a barrier."""
  missing = tmp_path / 'no_such_voc'
  processes = [_start(tmp_path / 'run', tmp_path, '--config.data.synthetic=False',
                      f'--config.data.manual_dir={missing}',
                      extra_flags=_process_flags(coordinator_address, index)) for index in range(2)]
  outputs = [p.communicate(timeout=240)[0] for p in processes]
  for index, (process, output) in enumerate(zip(processes, outputs)):
    assert process.returncode not in (0, None) and str(missing) in output, (index, output[-3000:])
  assert 'on process 0' in outputs[1]
