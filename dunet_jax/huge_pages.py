"""Transparent huge pages for the process's heap: a dunet_jax command re-executes itself once with
glibc's malloc tunable set.

XLA:CPU allocates each execution's temporary buffers afresh, and glibc hands such large blocks back
to the kernel when they are freed; on a host whose transparent huge pages are 'madvise' (the
default of many distributions, and of this project's machines) every 4 KiB page is then faulted in
again on every step. A DUNet-R50 bf16 train step took 316,000 page faults and 0.53 s of kernel time
per 1.38 s step; with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (glibc >= 2.35: malloc madvises its
memory for huge pages) it took 1,170 faults, 0.09 s of kernel time and 1.06 s per step
(benchmarks/train_step.py; README, 'Train step on CPU'). The tunable is only read when a process
starts, so `python -m dunet_jax.<tool>` and the benchmarks re-execute themselves with it once, before
they import anything heavy. A GLIBC_TUNABLES that already names the tunable is left alone:
`glibc.malloc.hugetlb=0` turns this off.
"""
import os
import platform
import sys

TUNABLE = 'glibc.malloc.hugetlb'
MIN_GLIBC = (2, 35)


def _supported() -> bool:
  if sys.platform != 'linux' or TUNABLE in os.environ.get('GLIBC_TUNABLES', ''):
    return False
  library, version = platform.libc_ver()
  try:
    return library == 'glibc' and tuple(int(part) for part in version.split('.')[:2]) >= MIN_GLIBC
  except ValueError:
    return False


def reexec() -> None:
  """Restarts this process (same interpreter and arguments) with the tunable set, if it applies."""
  if not _supported() or not getattr(sys, 'orig_argv', None):
    return
  os.environ['GLIBC_TUNABLES'] = ':'.join(filter(None, [os.environ.get('GLIBC_TUNABLES'), f'{TUNABLE}=1']))
  os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def reexec_if_a_command() -> None:
  """reexec() when this process was started as `python ... -m dunet_jax.<tool>` (never when
  dunet_jax is imported by another program, such as a test runner or a notebook)."""
  arguments = getattr(sys, 'orig_argv', [])
  if '-m' in arguments[:-1] and arguments[arguments.index('-m') + 1].startswith('dunet_jax.'):
    reexec()


if __name__ == '__main__':  # `python -m dunet_jax.huge_pages`: the tunables this command runs with
  print(os.environ.get('GLIBC_TUNABLES', ''))
