"""A `python -m dunet_jax.<tool>` command restarts once with glibc's huge-page tunable; nothing else does."""
import os
import platform
import subprocess
import sys

import pytest

from dunet_jax import huge_pages

GLIBC = platform.libc_ver()
HAS_TUNABLE = (sys.platform == 'linux' and GLIBC[0] == 'glibc'
               and tuple(int(part) for part in GLIBC[1].split('.')[:2]) >= huge_pages.MIN_GLIBC)


def _run(*args: str, tunables: str | None) -> str:
  env = {key: value for key, value in os.environ.items() if key != 'GLIBC_TUNABLES'}
  if tunables is not None:
    env['GLIBC_TUNABLES'] = tunables
  return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True,
                        check=True).stdout.strip()


@pytest.mark.skipif(not HAS_TUNABLE, reason=f'needs Linux and glibc >= 2.35 (have {GLIBC})')
def test_a_command_restarts_with_the_tunable_and_keeps_a_users_choice():
  assert _run('-m', 'dunet_jax.huge_pages', tunables=None) == 'glibc.malloc.hugetlb=1'
  assert _run('-m', 'dunet_jax.huge_pages', tunables='glibc.malloc.arena_max=2') == \
      'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1'
  assert _run('-m', 'dunet_jax.huge_pages', tunables='glibc.malloc.hugetlb=0') == 'glibc.malloc.hugetlb=0'


def test_importing_dunet_jax_from_another_program_does_not_restart_it():
  printed = _run('-c', 'import os, dunet_jax; print(os.environ.get("GLIBC_TUNABLES", "unset"))', tunables=None)
  assert printed == 'unset'
