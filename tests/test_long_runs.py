"""What long runs on accelerators need: a persistent compilation cache across restarts, a profile of
chosen steps, deterministic GPU ops (all in-process; one subprocess where the process start matters)."""
import contextlib
import logging
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import pytest
from jax.experimental.compilation_cache import compilation_cache
from jax.profiler import ProfileData

from configs import synthetic
from dunet_jax import checkpoint, profiling, storage, train, xla_options
from helpers import REPO_ROOT

PROFILE_STEPS = (2, 3)
NUM_STEPS = 3


class _CompilerLog(logging.Handler):
  """jax's compiler log records, DEBUG included (persistent cache hits are logged at DEBUG)."""

  def __init__(self):
    super().__init__(logging.DEBUG)
    self.messages: list[str] = []
    self._logger = logging.getLogger('jax._src.compiler')

  def emit(self, record: logging.LogRecord) -> None:
    self.messages.append(record.getMessage())

  def __enter__(self):
    self._level = self._logger.level
    self._logger.setLevel(logging.DEBUG)
    self._logger.addHandler(self)
    return self

  def __exit__(self, *exc):
    self._logger.removeHandler(self)
    self._logger.setLevel(self._level)

  def cache_hits(self) -> set[str]:
    return {message.split("'")[1] for message in self.messages
            if message.startswith('Persistent compilation cache hit')}


@contextlib.contextmanager
def _own_compilation_cache():
  """No compilation cache chosen outside the config (conftest sets one for the whole session), so
  train.compilation_cache_dir decides; the session's cache is back in use afterwards."""
  session_folder = jax.config.jax_compilation_cache_dir
  with pytest.MonkeyPatch.context() as patch:
    patch.delenv(xla_options.CACHE_ENV)
    patch.setattr(xla_options, '_folder_set_here', None)
    compilation_cache.reset_cache()
    jax.config.update('jax_compilation_cache_dir', None)
    try:
      yield
    finally:
      compilation_cache.reset_cache()
      jax.config.update('jax_compilation_cache_dir', session_folder)


@pytest.fixture(scope='module')
def restarted_run(tmp_path_factory):
  """A tiny run with the default train.compilation_cache_dir ('{workdir}/xla_cache') and
  train.profile_steps=PROFILE_STEPS, trained to NUM_STEPS; then its checkpoints after step 1 are
  removed (as if the machine had been lost after step 1) and the same config resumes it.
  Returns (workdir, {start: jax's compiler log messages}, cache entries after the first start)."""
  directory = tmp_path_factory.mktemp('long_run')
  config = synthetic.get_config('test')
  config.data.manual_dir, config.data.tfds_data_dir = f'{directory}/manual', f'{directory}/tfds'
  config.train.update(num_steps=NUM_STEPS, checkpoint_every=1, eval_every=NUM_STEPS, profile_steps=PROFILE_STEPS)
  workdir = directory / 'run'
  logs = {}
  with _own_compilation_cache():
    with _CompilerLog() as logs['first']:
      train.train_and_evaluate(config, workdir)
    entries_after_first = sorted(path.name for path in (workdir / 'xla_cache').iterdir())
    for step in range(2, NUM_STEPS + 1):
      shutil.rmtree(workdir / 'checkpoints' / str(step))
    jax.clear_caches()  # a restart is a new process: nothing compiled is left in memory
    with _CompilerLog() as logs['second']:
      train.train_and_evaluate(config, workdir)
  return workdir, logs, entries_after_first


def test_a_restart_loads_the_compiled_steps_from_the_workdir_cache(restarted_run):
  workdir, logs, entries_after_first = restarted_run
  # The first start found nothing and wrote the train and eval steps into <workdir>/xla_cache ...
  assert not logs['first'].cache_hits() & {'jit_train_step', 'jit_eval_step'}
  assert any(name.startswith('jit_train_step-') for name in entries_after_first), entries_after_first
  assert any(name.startswith('jit_eval_step-') for name in entries_after_first), entries_after_first
  # ... and the restart, resuming from step 1, loaded both instead of compiling them.
  assert {'jit_train_step', 'jit_eval_step'} <= logs['second'].cache_hits(), logs['second'].messages[-20:]


def _executions(trace_file, program: str) -> tuple[int, int]:
  """(calls from Python, executions on devices) of `program` in a jax.profiler trace."""
  calls = devices = 0
  for plane in ProfileData.from_file(os.fspath(trace_file)).planes:
    for line in plane.lines:
      for event in line.events:
        if event.name == f'CommonPjRtLoadedExecutable::Execute ({program})':
          calls += 1
        elif event.name.endswith(f'] CommonPjRtLoadedExecutable::Execute ({program})'):
          devices += 1
  return calls, devices


def test_profile_steps_trace_exactly_those_steps_into_the_workdir(restarted_run):
  workdir, _, _ = restarted_run
  traces = sorted((workdir / 'plugins' / 'profile').glob('*/*.xplane.pb'))
  assert len(traces) == 2, traces  # one per start: the restart resumed at step 1, before step 2
  num_traced = PROFILE_STEPS[1] - PROFILE_STEPS[0] + 1
  for trace in traces:
    # Both steps, each on all 8 devices (the trace stops only once the last step has finished).
    assert _executions(trace, 'jit_train_step') == (num_traced, num_traced * jax.device_count())


def test_the_profile_of_a_gcs_run_lands_in_the_bucket(gcs_emulator):
  workdir = f"{gcs_emulator.create_bucket('dunet-long-runs-profile')}/run"
  profiler = profiling.StepProfiler((1, 1), workdir, start_step=0)

  def step(v):
    return v * 2

  x = jax.numpy.ones(8)
  profiler.before_step(1, x)
  profiler.after_step(1, jax.jit(step)(x))
  traces = list(storage.path(workdir).glob('plugins/profile/*/*.xplane.pb'))
  assert len(traces) == 1, traces
  names = {event.name for plane in ProfileData.from_serialized_xspace(traces[0].read_bytes()).planes
           for line in plane.lines for event in line.events}
  assert 'PjitFunction(step)' in names


def test_a_start_past_the_profiled_steps_traces_nothing(tmp_path):
  profiler = profiling.StepProfiler(PROFILE_STEPS, tmp_path, start_step=PROFILE_STEPS[0])
  for step in range(PROFILE_STEPS[0] + 1, PROFILE_STEPS[1] + 2):
    profiler.before_step(step, None)
    profiler.after_step(step, None)
  profiler.close()
  assert not (tmp_path / 'plugins').exists()


@pytest.mark.parametrize('steps', [(3, 2), (0, 1), (5,), (1.0, 2.0), (1, 2, 3)])
def test_malformed_profile_steps_are_refused_before_any_work(tmp_path, steps):
  config = synthetic.get_config('test')
  config.data.manual_dir = '/nonexistent/manual'  # nothing may be built
  config.train.profile_steps = steps
  with pytest.raises(ValueError, match=r'config\.train\.profile_steps=.*e\.g\. --config\.train\.profile_steps='):
    train.train_and_evaluate(config, tmp_path / 'run')
  assert not (tmp_path / 'run' / 'config.json').exists()


def test_the_long_run_keys_may_change_when_a_run_resumes(tmp_path):
  config = synthetic.get_config('test')
  checkpoint.save_config(tmp_path, config)
  config.train.update(compilation_cache_dir='', profile_steps=(5, 6), deterministic_gpu=True)
  checkpoint.check_resumable(tmp_path, config)  # no refusal


def test_cache_folder_names():
  assert xla_options.cache_folder('', '/runs/a') is None
  assert xla_options.cache_folder('{workdir}/xla_cache', 'gs://bucket/run') == 'gs://bucket/run/xla_cache'
  assert xla_options.cache_folder('gs://bucket/shared_cache', '/runs/a') == 'gs://bucket/shared_cache'
  assert xla_options.cache_folder('{workdir}/xla_cache', 'relative/run') == os.path.abspath('relative/run/xla_cache')


def test_a_cache_folder_set_in_the_environment_wins(tmp_path):
  """conftest's session cache (JAX_COMPILATION_CACHE_DIR) stays in use whatever the config says."""
  session_folder = os.environ[xla_options.CACHE_ENV]
  assert xla_options.use_compilation_cache('{workdir}/xla_cache', tmp_path) == session_folder
  assert xla_options.use_compilation_cache('', tmp_path) == session_folder
  assert jax.config.jax_compilation_cache_dir == session_folder


def test_the_compilation_cache_works_on_gcs(gcs_emulator):
  """A gs:// cache folder (a gs:// workdir's default) is written and read through the tested client."""
  bucket = gcs_emulator.create_bucket('dunet-long-runs')
  min_compile_time = jax.config.jax_persistent_cache_min_compile_time_secs
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)  # the tiny program below is cached too
  try:
    with _own_compilation_cache():
      assert xla_options.use_compilation_cache('{workdir}/xla_cache', f'{bucket}/run') == f'{bucket}/run/xla_cache'
      # XLA:GPU's autotuning subfolder would be written by a C++ client without gs:// (a GPU compile fails).
      assert jax.config.jax_persistent_cache_enable_xla_caches == 'none'

      def program(x):
        return jax.numpy.tanh(x) * 3 + 1

      with _CompilerLog() as first:
        jax.jit(program)(jax.numpy.arange(5.0)).block_until_ready()
      written = [path.name for path in storage.path(f'{bucket}/run/xla_cache').iterdir()]
      jax.clear_caches()  # in-memory caches: the next call must compile or load
      with _CompilerLog() as second:
        jax.jit(program)(jax.numpy.arange(5.0)).block_until_ready()
      xla_options.use_compilation_cache('{workdir}/xla_cache', '/local/run')
      local_xla_caches = jax.config.jax_persistent_cache_enable_xla_caches
      xla_options.use_compilation_cache('', '')
  finally:
    jax.config.update('jax_persistent_cache_min_compile_time_secs', min_compile_time)
  assert any(name.startswith('jit_program-') for name in written), written
  assert 'jit_program' not in first.cache_hits() and 'jit_program' in second.cache_hits()
  assert local_xla_caches == 'xla_gpu_per_fusion_autotune_cache_dir'  # jax's default, for a local folder
  assert not pathlib.Path('gs:').exists(), 'a gs:// cache folder was also made on the local disk'


def test_deterministic_gpu_reaches_xla_flags_only_when_on(monkeypatch):
  monkeypatch.setenv('XLA_FLAGS', '--xla_dump_to=/tmp/nowhere')
  xla_options.use_deterministic_gpu_ops(False)
  assert os.environ['XLA_FLAGS'] == '--xla_dump_to=/tmp/nowhere'
  xla_options.use_deterministic_gpu_ops(True)  # the backends run already here, but on CPU: no refusal
  assert os.environ['XLA_FLAGS'].split() == ['--xla_dump_to=/tmp/nowhere', xla_options.DETERMINISTIC_GPU_FLAG]
  xla_options.use_deterministic_gpu_ops(True)  # not twice
  assert os.environ['XLA_FLAGS'].count('xla_gpu_deterministic_ops') == 1
  monkeypatch.setenv('XLA_FLAGS', '--xla_gpu_deterministic_ops=false')  # the user's own choice stays
  xla_options.use_deterministic_gpu_ops(True)
  assert os.environ['XLA_FLAGS'] == '--xla_gpu_deterministic_ops=false'


def test_deterministic_gpu_flag_is_applied_before_jax_starts_and_harmless_on_cpu(tmp_path):
  """A fresh process: the config's key puts the flag into XLA_FLAGS before jax starts its backend,
  which (XLA aborts on flags it does not know) accepts it on CPU and computes as usual."""
  program = (
      'from configs import synthetic\n'
      'from dunet_jax import xla_options\n'
      'config = synthetic.get_config("test")\n'
      'config.train.deterministic_gpu = True\n'
      'xla_options.apply(config, ".")\n'
      'import jax, os\n'
      'print(os.environ["XLA_FLAGS"], jax.default_backend(), float(jax.jit(lambda x: x * 2 + 1)(3.0)))\n')
  env = {**os.environ, 'XLA_FLAGS': '', 'JAX_PLATFORMS': 'cpu'}
  result = subprocess.run([sys.executable, '-c', program], cwd=tmp_path, capture_output=True, text=True,
                          env={**env, 'PYTHONPATH': os.fspath(REPO_ROOT)}, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.split() == [xla_options.DETERMINISTIC_GPU_FLAG, 'cpu', '7.0']
