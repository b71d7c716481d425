"""Trains and evaluates DUNet: `python -m dunet_jax.main --config=configs/voc.py:r50_os16 --workdir=DIR`.

Rerunning the same command resumes the run in DIR. On a Cloud TPU pod slice or a SLURM job the
processes find each other by themselves; elsewhere pass --coordinator_address, --num_processes
and --process_id to every process.
"""
import logging as std_logging
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from dunet_jax import cpu_flags  # noqa: E402

cpu_flags.apply()

import jax  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from dunet_jax import train  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/voc.py:r50_os16.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Where checkpoints, W, the config and TensorBoard logs go.')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0, for multi-process runs outside '
                    'Cloud TPU and SLURM (which are detected automatically).')
flags.DEFINE_integer('num_processes', None, 'Number of processes, with --coordinator_address.')
flags.DEFINE_integer('process_id', None, 'This process\'s index, with --coordinator_address.')
flags.mark_flags_as_required(['config', 'workdir'])

# Errors caused by the user's files or settings: shown as one message, without a traceback.
USER_ERRORS = (FileNotFoundError, NotADirectoryError, PermissionError, ValueError, FloatingPointError)


def _initialize_processes() -> None:
  """Joins a multi-process job: explicit flags, or whatever jax detects (Cloud TPU, SLURM, MPI)."""
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')  # CPU processes; no effect on TPU/GPU
  if FLAGS.coordinator_address:
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    return
  try:
    jax.distributed.initialize()
  except ValueError:  # no cluster detected: one process
    pass


def _quiet_library_info(record) -> bool:
  """Keeps orbax's per-save INFO chatter out of the training log (its warnings still show)."""
  return record.levelno >= std_logging.WARNING or '/orbax/' not in record.pathname


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  tf.config.set_visible_devices([], 'GPU')  # tf.data only; accelerators belong to jax
  logging.get_absl_handler().addFilter(_quiet_library_info)
  _initialize_processes()
  logging.info('Process %d of %d; %d local / %d global devices (%s).', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(), jax.devices()[0].platform)
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except USER_ERRORS as error:
    if os.environ.get('DUNET_JAX_TRACEBACK'):
      raise
    sys.exit(f'dunet_jax: {error}\n(set DUNET_JAX_TRACEBACK=1 to see the traceback)')


if __name__ == '__main__':
  app.run(main)
