"""Build a dataset ahead of training: `python -m dunet_jax.data.prepare --config=configs/<x>.py`.

Training prepares the data on first use anyway; this command does it alone (e.g. once per host
before a multi-host job) and prints what was built. It replaces `tfds build`, whose command line
needs apache_beam.
"""
import sys

from absl import app, flags
from ml_collections import config_flags

from dunet_jax.data import datasets

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py).', lock_config=True)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  try:
    builder = datasets.prepare(_CONFIG.value.data)
  except (FileNotFoundError, ValueError) as error:  # bad input: the message says what to do
    sys.exit(f'error: {error}')
  sizes = ', '.join(f'{name} {info.num_examples}' for name, info in sorted(builder.info.splits.items()))
  print(f'{builder.info.full_name} ready at {builder.data_dir}: {sizes}')


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main)
