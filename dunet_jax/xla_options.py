"""What a run's config asks of XLA before anything compiles: a persistent compilation cache and
deterministic GPU execution.

`train.compilation_cache_dir` (default '{workdir}/xla_cache'; '' = off) is handed to jax's
persistent compilation cache, so a restarted job (a spot TPU recreated after preemption, a requeued
SLURM job) loads the compiled train and eval steps instead of compiling them again. The default
lives in the workdir because that is the one folder that outlives the machine (a gs:// bucket on
Cloud TPU), and the cache is only valid for the programs of one code, jax and device set-up anyway.
jax writes through etils.epath, so a gs:// folder goes through the same gcsfs client as the rest of
the workdir (storage.py), and in a multi-process job only process 0 writes entries. jax also hands
a subfolder to XLA:GPU for its autotuning results, which XLA writes through its own C++ file
system, which has no gs:// client: compilation on a GPU would fail there, so for a remote folder
that extra cache is turned off (unless JAX_PERSISTENT_CACHE_ENABLE_XLA_CACHES says otherwise). So is
the cache's size limit: jax enforces it under a file lock that the filelock package can only make on
a local disk (for gs://bucket/x it makes a local folder 'gs:/bucket/x'). A
folder set outside the config (JAX_COMPILATION_CACHE_DIR, or jax.config in the calling program) wins.

`train.deterministic_gpu` adds XLA's --xla_gpu_deterministic_ops to XLA_FLAGS: scatters (the
gradients of gathers and of max-pooling) without atomics, deterministic cuDNN/cuBLAS algorithms and
no autotuning of fused GEMMs; with the compilation cache (a restart runs the executable the first
start compiled, autotuning choices included) a resumed GPU run should be bit-equal to an
uninterrupted one, as it is on CPU. It costs speed (README: Long runs), so it is off by default.
XLA_FLAGS is read when jax starts its backends; the flag is a GPU debug option that the CPU and TPU
backends parse and ignore.
"""
import os

import jax
import ml_collections
from absl import logging
from jax.experimental.compilation_cache import compilation_cache

from dunet_jax import storage

CACHE_ENV = 'JAX_COMPILATION_CACHE_DIR'
XLA_CACHES_ENV = 'JAX_PERSISTENT_CACHE_ENABLE_XLA_CACHES'
_XLA_CACHES_DEFAULT = jax.config.jax_persistent_cache_enable_xla_caches
_MAX_SIZE_DEFAULT = jax.config.jax_compilation_cache_max_size
WORKDIR_PLACEHOLDER = '{workdir}'
DETERMINISTIC_GPU_FLAG = '--xla_gpu_deterministic_ops=true'

_folder_set_here: str | None = None  # the cache folder this module gave jax (others' settings win)


def apply(config: ml_collections.ConfigDict, workdir: storage.PathLike) -> None:
  """Both options of `config.train`; call before the run's first compilation."""
  use_deterministic_gpu_ops(config.train.deterministic_gpu)
  use_compilation_cache(config.train.compilation_cache_dir, workdir)


def cache_folder(setting: str, workdir: storage.PathLike) -> str | None:
  """The folder `train.compilation_cache_dir` names ('{workdir}' replaced), None for ''."""
  if not setting:
    return None
  return os.fspath(storage.path(setting.replace(WORKDIR_PLACEHOLDER, os.fspath(storage.absolute(workdir)))))


def use_compilation_cache(setting: str, workdir: storage.PathLike) -> str | None:
  """Points jax's persistent compilation cache at the folder `setting` names; returns the folder in
  use (None: no cache). A folder chosen outside the config is kept and returned."""
  global _folder_set_here
  current = jax.config.jax_compilation_cache_dir
  if os.environ.get(CACHE_ENV) or (current and current != _folder_set_here):
    logging.info('XLA compilation cache: %s (set outside the config, which train.compilation_cache_dir '
                 'does not override).', current)
    return current
  folder = cache_folder(setting, workdir)
  if folder != current:
    compilation_cache.reset_cache()  # jax opens its cache once; forget one opened for another folder
    jax.config.update('jax_compilation_cache_dir', folder)
    _folder_set_here = folder
    remote = folder is not None and storage.is_remote(folder)
    if not os.environ.get(XLA_CACHES_ENV):
      jax.config.update('jax_persistent_cache_enable_xla_caches', 'none' if remote else _XLA_CACHES_DEFAULT)
    jax.config.update('jax_compilation_cache_max_size', -1 if remote else _MAX_SIZE_DEFAULT)
  if folder:
    logging.info('XLA compilation cache: %s (train.compilation_cache_dir).', folder)
  return folder


def use_deterministic_gpu_ops(enabled: bool) -> None:
  """Adds DETERMINISTIC_GPU_FLAG to XLA_FLAGS when `enabled`, unless XLA_FLAGS already sets that
  option. Too late once jax runs on a GPU: that is refused, with the way to set it in time."""
  flags = os.environ.get('XLA_FLAGS', '')
  if not enabled or 'xla_gpu_deterministic_ops' in flags:
    return
  from jax._src import xla_bridge  # the check cli.join_processes makes
  if xla_bridge.backends_are_initialized() and jax.default_backend() == 'gpu':
    raise ValueError('config.train.deterministic_gpu=True must reach XLA before jax starts on the GPU: run '
                     f'python -m dunet_jax.main, or set XLA_FLAGS={DETERMINISTIC_GPU_FLAG} before the program '
                     'first uses jax.')
  os.environ['XLA_FLAGS'] = f'{flags} {DETERMINISTIC_GPU_FLAG}'.strip()
  logging.info('XLA_FLAGS=%s (train.deterministic_gpu).', os.environ['XLA_FLAGS'])
