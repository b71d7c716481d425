"""XLA:CPU settings that speed up training on CPU hosts; applied before jax starts.

Measured with jaxlib 0.10 (README, 'Train step on CPU'; benchmarks/train_step.py):
- XLA:CPU hands each convolution XLA keeps (float32 ones, grouped ones, the RGB stem's) to YNNPACK
  as its own fusion, which ran ResNet's 3x3 convolutions and their weight gradients at a fraction
  of the matmul rate; keeping convolutions out of that path made a DUNet-ResNet-50 step cheaper.
- The concurrency-optimized scheduler orders the program so that independent ops run at once;
  on a 2-core host they then share the cores with the multi-threaded bf16 matmuls, and the
  bf16 DUNet-ResNet-50 step took 3-7% longer with it than without it.
The flags only concern the CPU backend, and they are added only for the jaxlib release they were
measured with, because XLA aborts on flags it does not know.
"""
import importlib.metadata
import os

# {option: value}; an option the user already set in XLA_FLAGS is left as the user set it.
CPU_OPTIONS = {
  'xla_cpu_experimental_ynn_fusion_type': '-individual_convolution',
  'xla_cpu_enable_concurrency_optimized_scheduler': 'false',
}
MEASURED_JAXLIB = '0.10.'


def apply() -> None:
  """Adds CPU_OPTIONS to XLA_FLAGS (except those the user set); call before jax is imported."""
  flags = os.environ.get('XLA_FLAGS', '')
  try:
    version = importlib.metadata.version('jaxlib')
  except importlib.metadata.PackageNotFoundError:
    return
  if not version.startswith(MEASURED_JAXLIB):
    return
  added = [f'--{option}={value}' for option, value in CPU_OPTIONS.items() if option not in flags]
  if added:
    os.environ['XLA_FLAGS'] = ' '.join([*added, flags]).strip()
