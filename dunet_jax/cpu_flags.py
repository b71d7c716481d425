"""XLA:CPU settings that speed up training on CPU hosts; applied before jax starts.

jaxlib 0.10's XLA:CPU hands each convolution to YNNPACK as its own fusion, which runs ResNet's
small 3x3 convolutions (and their weight gradients) at a fraction of the matmul rate; keeping
convolutions out of that path makes a DUNet-ResNet-50 train step cheaper (README, 'Train step on
CPU'; benchmarks/train_step.py). The flag only concerns the CPU backend, and it is added only for the
jaxlib release it was measured with, because XLA aborts on flags it does not know.
"""
import importlib.metadata
import os

CPU_CONVOLUTION_FLAG = '--xla_cpu_experimental_ynn_fusion_type=-individual_convolution'
MEASURED_JAXLIB = '0.10.'


def apply() -> None:
  """Adds the flag to XLA_FLAGS unless the user set that option; call before jax is imported."""
  flags = os.environ.get('XLA_FLAGS', '')
  if 'xla_cpu_experimental_ynn_fusion_type' in flags:
    return
  try:
    version = importlib.metadata.version('jaxlib')
  except importlib.metadata.PackageNotFoundError:
    return
  if version.startswith(MEASURED_JAXLIB):
    os.environ['XLA_FLAGS'] = f'{CPU_CONVOLUTION_FLAG} {flags}'.strip()
