"""Shared test setup: 8 fake CPU devices (set before jax is used), a session-wide XLA compilation
cache, and the real VOC labels."""
import os
import pathlib
import shutil
import tempfile

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

# Many tests start `python -m dunet_jax...` processes that compile the same programs (train step,
# evaluation, W fitting); without a cache each process spends most of its time compiling them again.
# The cache lives for one pytest session and is shared by its xdist workers and every process they
# start (they inherit the environment); a directory the caller set in the environment is used as is.
CACHE_ENV = 'JAX_COMPILATION_CACHE_DIR'
OWN_CACHE = CACHE_ENV not in os.environ
if OWN_CACHE:
  os.environ[CACHE_ENV] = tempfile.mkdtemp(prefix='dunet_jax_test_xla_cache_')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.2')
os.environ.setdefault('JAX_COMPILATION_CACHE_MAX_SIZE', str(8 << 30))  # a size turns on jax's file lock

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update('jax_num_cpu_devices', 8)
jax.config.update('jax_compilation_cache_dir', os.environ[CACHE_ENV])

from helpers import REPO_ROOT, save_tiny_run  # noqa: E402
from training_runs import free_coordinator_address  # noqa: E402

VOC_LABELS_DIR = REPO_ROOT.parent / 'shared' / 'data' / 'voc2012_labels'


@pytest.fixture(scope='session')
def voc_labels_dir() -> pathlib.Path:
  """Real VOC 2012 label maps (../shared/data/voc2012_labels); skips when absent."""
  if not (VOC_LABELS_DIR / 'SegmentationClass').is_dir():
    pytest.skip(f'real VOC labels not found at {VOC_LABELS_DIR}: tests that need them are skipped')
  return VOC_LABELS_DIR


@pytest.fixture(scope='session')
def tiny_run(tmp_path_factory):
  """(workdir, model) of a tiny DUNet saved as an FSDP-sharded run (helpers.save_tiny_run), made
  once per pytest process and shared by the inference, evaluate, predict, export, CLI and notebook
  tests; its synthetic data sits beside it."""
  return save_tiny_run(tmp_path_factory.getbasetemp())


@pytest.fixture
def coordinator_address() -> str:
  """A free localhost port for a jax.distributed coordinator of multi-process tests."""
  return free_coordinator_address()


@pytest.fixture(scope='session')
def gcs_emulator():
  """A real GCS-protocol server (fake-gcs-server) on localhost, with every GCS client of the stack
  pointed at it for this session and its subprocesses (tests/gcs_emulator.py); stopped at the end."""
  from gcs_emulator import GcsEmulator
  emulator = GcsEmulator()
  yield emulator
  emulator.stop()


def pytest_unconfigure(config) -> None:
  """Removes this session's compilation cache (xdist workers inherit it and leave it to the controller)."""
  if OWN_CACHE and not hasattr(config, 'workerinput'):
    shutil.rmtree(os.environ[CACHE_ENV], ignore_errors=True)


# The longest test modules, longest first (seconds on the 2-core CI machine, 2026-11-30). With
# `-n 2 --dist loadfile` xdist hands whole modules to its workers in collection order
# (pyproject.toml turns off its default reordering, which sorts by number of tests and so put these
# few-but-long modules last, where one of them alone kept a worker busy after the other had finished).
LONGEST_MODULES = ('test_documented_commands.py', 'test_remote_storage.py', 'test_multihost.py',
                   'test_fault_tolerance.py', 'test_long_runs.py', 'test_train.py', 'test_fine_tune.py')


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
  """Longest modules first (see LONGEST_MODULES), the rest in their usual order."""
  rank = {name: index for index, name in enumerate(LONGEST_MODULES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
