"""Trains and evaluates DUNet: `python -m dunet_jax.main --config=configs/voc.py:r50_os16 --workdir=DIR`.

Rerunning the same command resumes the run in DIR. On a Cloud TPU pod slice or a SLURM job the
processes find each other by themselves; elsewhere pass --coordinator_address, --num_processes
and --process_id to every process.
"""
from dunet_jax import cli  # first: prepares the process before TensorFlow and jax load

from absl import flags

from dunet_jax import train


def define_flags(options: flags.FlagValues) -> None:
  flags.DEFINE_string('workdir', None, 'Where checkpoints, W, the config and TensorBoard logs go.',
                      required=True, flag_values=options)


def main(options: flags.FlagValues) -> None:
  train.train_and_evaluate(options.config, options.workdir)  # which first applies the config's XLA options


if __name__ == '__main__':
  cli.run(main, define_flags, config='file', join=True)
