"""Build a dataset ahead of training: `python -m dunet_jax.data.prepare --config=configs/<x>.py`.

Training prepares the data on first use anyway; this command does it alone (e.g. once per host
before a multi-host job) and prints what was built. It replaces `tfds build`, whose command line
needs apache_beam.
"""
from dunet_jax import cli  # first: prepares the process before TensorFlow and jax load

from absl import flags

from dunet_jax.data import datasets


def main(options: flags.FlagValues) -> None:
  builder = datasets.prepare(options.config.data)
  sizes = ', '.join(f'{name} {info.num_examples}' for name, info in sorted(builder.info.splits.items()))
  print(f'{builder.info.full_name} ready at {builder.data_dir}: {sizes}')


if __name__ == '__main__':
  cli.run(main, config='file')
