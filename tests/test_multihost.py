"""Training as two localhost processes (gloo), end to end: agreement with one process, a slow
process 0, preemption of one process, and a process 0 that fails.

Every run is a real `python -m dunet_jax.main` process on the built-in test preset.
"""
import signal

import jax
import numpy as np
import pytest
from flax import nnx

from dunet_jax import checkpoint, preemption, reconstruction, train_state
from training_runs import process_flags, run, saved_params, saved_steps, start, stopped_step, wait_for_checkpoint

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


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('data')


def _assert_first_steps_agree(single, multi) -> None:
  """Step 1 of `multi` (2 processes x 2 devices) against `single` (1 process x 4 devices).

  Compared relative to each variable's update. At initialisation the stem's gradients are sums of
  many nearly cancelling terms (batch norm follows every convolution), so the different order of
  the cross-device sums moves them by up to about 2% of the update (the stem's kernels and biases;
  deeper layers agree to 0.05%), and the runs then drift apart (about 30% after four steps). A
  wrong batch slice, a missing all-reduce of gradients or batch statistics, or a different W
  changes every update by its own size.
  """
  w_single = reconstruction.load_reconstruction(single / checkpoint.RECONSTRUCTION_FILE)
  w_multi = reconstruction.load_reconstruction(multi / checkpoint.RECONSTRUCTION_FILE)
  assert w_multi.num_windows == w_single.num_windows
  np.testing.assert_allclose(w_multi.w, w_single.w, atol=1e-6)
  step_single, expected = saved_params(single)
  step_multi, got = saved_params(multi, step=1)
  assert step_single == step_multi == 1
  config = checkpoint.load_config(single)
  initial = jax.device_get(nnx.to_pure_dict(nnx.state(train_state.create_model(config, w_single.w))))

  def check(path, got_leaf, expected_leaf, initial_leaf):
    update = np.abs(np.asarray(expected_leaf, np.float64) - initial_leaf).max()
    difference = np.abs(np.asarray(got_leaf, np.float64) - expected_leaf).max()
    assert difference <= 0.05 * update + 1e-7, (jax.tree_util.keystr(path), difference, update)

  jax.tree_util.tree_map_with_path(check, got, expected, initial)


def test_two_processes_wait_for_a_slow_chief_match_one_process_and_stop_together_on_sigterm(
    tmp_path, data_dir, coordinator_address):
  """One two-process run (2 x 2 CPU devices) checked three ways:

  - process 1 waits for a process 0 that takes longer than gloo's 30 s timeout to prepare the data;
  - its first step equals the first step of one process with 4 devices (the poly learning rate at
    step 0 is the base rate whatever num_steps is);
  - JAX's preemption notifier: a SIGTERM to process 1 only makes both processes save the same step
    and exit with preemption.EXIT_CODE; the run then resumes from that step.
  """
  multi = tmp_path / 'multi'
  endless = ('--config.train.num_steps=100000', '--config.train.checkpoint_every=1',
             '--config.train.keep_checkpoints=100000')  # the run can only end by preemption
  processes = [start(multi, data_dir, *endless, devices=2, extra_flags=process_flags(coordinator_address, index),
                     program=('-c', SLOW_CHIEF) if index == 0 else ('-m', 'dunet_jax.main'))
               for index in range(2)]
  # The one-process run, while process 0 sleeps; its own copy of the (deterministic) built-in data.
  single = tmp_path / 'single'
  run(single, tmp_path / 'single_data', '--config.train.num_steps=1', '--config.train.checkpoint_every=1',
      devices=4)
  wait_for_checkpoint(processes[0], multi, 2)
  processes[1].send_signal(signal.SIGTERM)
  outputs = [p.communicate(timeout=300)[0] for p in processes]
  for process, output in zip(processes, outputs):
    assert process.returncode == preemption.EXIT_CODE, output[-3000:]
  assert 'Process 1 of 2' in outputs[1] and '4 global devices' in outputs[0]
  stopped = [stopped_step(output) for output in outputs]
  assert stopped[0] == stopped[1] == saved_steps(multi)[-1] >= 2, (stopped, saved_steps(multi))

  _assert_first_steps_agree(single, multi)
  # The saved step is complete and is where the rerun (here one process) starts; made the last step,
  # the rerun restores it and compiles nothing.
  resumed = run(multi, data_dir, f'--config.train.num_steps={stopped[0]}')
  assert f'at step {stopped[0]}' in resumed.stderr and 'Training already complete' in resumed.stderr


def test_a_failing_chief_stops_every_process_with_its_error(tmp_path, coordinator_address):
  """Process 0 cannot build the dataset (no such folder): both processes exit with that error, and
  neither waits for the other at a barrier."""
  missing = tmp_path / 'no_such_voc'
  processes = [start(tmp_path / 'run', tmp_path, '--config.data.synthetic=False',
                     f'--config.data.manual_dir={missing}', extra_flags=process_flags(coordinator_address, index))
               for index in range(2)]
  outputs = [p.communicate(timeout=240)[0] for p in processes]
  for index, (process, output) in enumerate(zip(processes, outputs)):
    assert process.returncode not in (0, None) and str(missing) in output, (index, output[-3000:])
  assert 'on process 0' in outputs[1]
