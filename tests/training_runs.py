"""Real `python -m dunet_jax.main` runs of the built-in test preset, for the fault-tolerance and
multi-process tests: start, wait for a checkpoint, read back parameters."""
import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
from flax import nnx

from dunet_jax import checkpoint
from helpers import REPO_ROOT

NUM_STEPS = 20
CHECKPOINT_EVERY = 5
MAIN = ('-m', 'dunet_jax.main')


def command(workdir, data_dir, *overrides, extra_flags=(), program=MAIN) -> list[str]:
  return [sys.executable, *program, '--config=configs/synthetic.py:test', f'--workdir={workdir}',
          f'--config.data.manual_dir={data_dir}/manual', f'--config.data.tfds_data_dir={data_dir}/tfds',
          f'--config.train.num_steps={NUM_STEPS}', f'--config.train.checkpoint_every={CHECKPOINT_EVERY}',
          '--config.train.keep_checkpoints=10', '--config.train.eval_every=1000', *overrides, *extra_flags]


def environment(devices: int = 1) -> dict[str, str]:
  # JAX_PLATFORMS: a machine with libtpu installed (for compile_check) must not look for a TPU here.
  return {**os.environ, 'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}', 'JAX_PLATFORMS': 'cpu'}


def run(workdir, data_dir, *overrides, devices=1, check=True) -> subprocess.CompletedProcess:
  return subprocess.run(command(workdir, data_dir, *overrides), cwd=REPO_ROOT, env=environment(devices),
                        capture_output=True, text=True, check=check, timeout=600)


def start(workdir, data_dir, *overrides, devices=1, extra_flags=(), program=MAIN) -> subprocess.Popen:
  return subprocess.Popen(command(workdir, data_dir, *overrides, extra_flags=extra_flags, program=program),
                          cwd=REPO_ROOT, env=environment(devices), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def free_coordinator_address() -> str:
  """A free localhost port for the jax.distributed coordinator of a multi-process run."""
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return f'localhost:{s.getsockname()[1]}'


def process_flags(coordinator_address: str, index: int, count: int = 2) -> tuple[str, ...]:
  return (f'--coordinator_address={coordinator_address}', f'--num_processes={count}', f'--process_id={index}')


def saved_steps(workdir) -> list[int]:
  folder = pathlib.Path(workdir) / 'checkpoints'
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.exists() else []


def saved_params(workdir, step=None):
  """(step, parameters and batch statistics as numpy) of the run's checkpoint `step` (newest: None)."""
  model, _, restored_step = checkpoint.restore_model(workdir, step)
  return restored_step, jax.device_get(nnx.to_pure_dict(nnx.state(model)))


def stopped_step(output: str) -> int:
  return int(output.split('Stopped at step ')[1].split()[0])


def wait_for_checkpoint(process: subprocess.Popen, workdir, step: int) -> None:
  while step not in saved_steps(workdir):
    assert process.poll() is None, f'run ended before checkpoint {step}:\n{process.stdout.read()[-3000:]}'
    time.sleep(0.02)
