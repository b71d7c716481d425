"""dunet_jax.cli: one way to define flags, parse --config, report user errors and keep chatter out."""
import importlib
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
from absl import flags

from dunet_jax import cli
from helpers import REPO_ROOT, documented_tools
from training_runs import process_flags

CONFIG = f'--config={REPO_ROOT}/configs/voc.py:r50_os16,tiny'


def test_tools_import_together_and_define_no_global_flags():
  modules = [importlib.import_module(f'dunet_jax.{tool}') for tool in documented_tools()]
  assert not [name for name in flags.FLAGS.flags_by_module_dict() if name.startswith('dunet_jax')]
  for module in modules:  # defining a tool's flags twice (two runs in one process) is fine too
    for _ in range(2):
      if hasattr(module, 'define_flags'):
        module.define_flags(flags.FlagValues())


def parse_error(*argv: str, config: str | None = 'file') -> str:
  with pytest.raises(SystemExit) as exit_info:
    cli.parse(None, ['tool', *argv], config=config)
  return exit_info.value.code


@pytest.mark.parametrize('argv, message', [
    ((CONFIG, '--config.train.learning_rate=abc'),
     "flag --config.train.learning_rate=abc: could not convert string to float: 'abc'"),
    ((CONFIG, '--config.trian.learning_rate=0.1'),
     '--config.trian.learning_rate: no such config key \'trian\'. Did you mean "train" instead of "trian"?'),
    ((f'--config={REPO_ROOT}/configs/voc.py:r50_os17',),
     "ValueError: Preset 'r50_os17': the output stride must be os8, os16 or os32"),
    (('--config=configs/nope.py',), "--config: [Errno 2] No such file or directory: 'configs/nope.py'"),
    ((), 'Flag --config must have a value other than None.'),
    ((CONFIG, 'extra'), 'unexpected arguments extra'),
])
def test_parse_errors_are_one_message(argv, message):
  text = parse_error(*argv)
  assert message in text and 'Traceback' not in text and len(text.splitlines()) == 2, text


def test_run_turns_user_errors_into_one_message_unless_asked_for_the_traceback(monkeypatch):
  def main(options):
    raise FileNotFoundError(f'{options.config.data.manual_dir} is empty')

  monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)
  with pytest.raises(SystemExit) as exit_info:
    cli.run(main, config='file', argv=['tool', CONFIG, '--config.data.manual_dir=/no/data'])
  assert exit_info.value.code.splitlines()[0] == 'dunet_jax: error: /no/data is empty'
  monkeypatch.setenv(cli.TRACEBACK_ENV, '1')
  with pytest.raises(FileNotFoundError, match='/no/data is empty'):
    cli.run(main, config='file', argv=['tool', CONFIG, '--config.data.manual_dir=/no/data'])


def test_misspelt_key_ends_as_one_message_without_chatter(tmp_path):
  completed = subprocess.run(
      [sys.executable, '-m', 'dunet_jax.main', CONFIG, '--config.train.lerning_rate=0.1',
       f'--workdir={tmp_path}'], cwd=REPO_ROOT, capture_output=True, text=True)
  assert completed.returncode == 1
  # The whole output: TensorFlow's import-time lines (oneDNN, absl::InitializeLog) are filtered.
  assert completed.stderr.splitlines() == [
      "dunet_jax.main: error: --config.train.lerning_rate: no such config key 'lerning_rate'. "
      'Did you mean "learning_rate" instead of "lerning_rate"?', 'Pass --help to see the flags.']


def test_stderr_filter_drops_chatter_and_keeps_the_rest_even_when_the_process_aborts():
  chatter = ('WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n'
             'I0000 00:00:1796021926.513314   10030 port.cc:153] oneDNN custom operations are on. You may '
             'see slightly different numerical results.\n'
             # libtpu's lines when compile_check describes a slice with no TPU attached
             'Failed to find host bounds for accelerator type: WARNING: could not determine TPU accelerator type, '
             'please set env var `TPU_ACCELERATOR_TYPE` manually, otherwise libtpu.so may not properly initialize.\n'
             'WARNING: Logging before InitGoogle() is written to STDERR\n'
             "E0000 00:00:1796041705.333788    3132 common_lib.cc:554] INVALID_ARGUMENT: Error: unexpected worker "
             "hostname 'WARNING: could not determine TPU worker hostnames or IP addresses' from env var "
             'TPU_WORKER_HOSTNAMES.\n'
             '=== Source Location Trace: === \n'
             'learning/45eac/tfrc/runtime/libtpu_init_utils.cc:327\n')
  script = ('import os\nfrom dunet_jax import cli\ncli.filter_stderr()\n'
            f'os.write(2, {chatter.encode()!r})\n'
            "os.write(2, b'E0000 00:00:1.0 1 cuda_executor.cc:1] something a user must see\\n')\n"
            'os.abort()\n')
  completed = subprocess.run([sys.executable, '-c', script], cwd=REPO_ROOT, capture_output=True, text=True)
  assert completed.returncode != 0
  assert completed.stderr == 'E0000 00:00:1.0 1 cuda_executor.cc:1] something a user must see\n'


def record(pathname: str, level: int, message: str) -> logging.LogRecord:
  return logging.makeLogRecord({'pathname': pathname, 'levelno': level, 'msg': message})


def test_log_filter_hides_library_chatter_and_keeps_warnings_that_matter():
  quiet = cli.QuietLibraries()
  orbax = '/site-packages/orbax/checkpoint/checkpoint_manager.py'
  assert not quiet.filter(record(orbax, logging.WARNING, 'CheckpointManagerOptions.read_only=True, setting '
                                 'save_interval_steps=0.'))
  assert not quiet.filter(record(orbax, logging.WARNING, 'Given directory is read only=/run/checkpoints'))
  assert not quiet.filter(record(orbax, logging.INFO, 'Finished saving checkpoint'))
  assert not quiet.filter(record('/site-packages/jax/_src/xla_bridge.py', logging.INFO,
                                 "Unable to initialize backend 'tpu'"))
  assert quiet.filter(record(orbax, logging.WARNING, 'Checkpoint 6 could not be read'))
  assert quiet.filter(record('/dunet_jax/train.py', logging.INFO, 'Resumed at step 3.'))
  assert quiet.filter(record('/dunet_jax/checkpoint.py', logging.WARNING, 'Checkpoint step 6 is unreadable'))


def test_evaluate_joins_a_two_process_job_and_agrees_with_one_process(tiny_run, coordinator_address):
  from dunet_jax import checkpoint, evaluate
  from dunet_jax.data import datasets
  workdir, _ = tiny_run
  datasets.prepare(checkpoint.load_config(workdir).data)  # built once, before two processes read it
  one, path = evaluate.evaluate_checkpoint(workdir, {})
  path.unlink()
  env = {**os.environ, 'JAX_NUM_CPU_DEVICES': '4', 'JAX_PLATFORMS': 'cpu'}
  processes = [subprocess.Popen(
      [sys.executable, '-m', 'dunet_jax.evaluate', f'--workdir={workdir}', *process_flags(coordinator_address, index)],
      cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for index in range(2)]
  outputs = [process.communicate(timeout=300)[0] for process in processes]
  assert [process.returncode for process in processes] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
  written = json.loads(path.read_text())
  assert written['num_images'] == one['num_images']
  two, one = np.asarray(written['confusion_matrix']), one['confusion_matrix']
  np.testing.assert_array_equal(two.sum(1), one.sum(1))  # every labelled pixel scored exactly once
  # The random tiny model's near-ties may flip a pixel or two between device layouts (float sums).
  assert np.abs(two - one).sum() <= 1e-3 * one.sum()
  assert 'read_only' not in outputs[0] and 'oneDNN' not in outputs[0]  # orbax and TensorFlow chatter
