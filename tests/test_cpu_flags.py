"""XLA:CPU flags: added for the measured jaxlib, never over an option the user set."""
import importlib.metadata
import os

import pytest

from dunet_jax import cpu_flags


def test_adds_each_option_the_user_did_not_set(monkeypatch):
  if not importlib.metadata.version('jaxlib').startswith(cpu_flags.MEASURED_JAXLIB):
    pytest.skip('the flags are only added for the jaxlib release they were measured with')
  user = '--xla_cpu_enable_concurrency_optimized_scheduler=true --xla_dump_to=/tmp/dump'
  monkeypatch.setenv('XLA_FLAGS', user)
  cpu_flags.apply()
  flags = os.environ['XLA_FLAGS'].split()
  assert '--xla_cpu_experimental_ynn_fusion_type=-individual_convolution' in flags
  assert '--xla_cpu_enable_concurrency_optimized_scheduler=true' in flags  # the user's value
  assert '--xla_cpu_enable_concurrency_optimized_scheduler=false' not in flags
  assert '--xla_dump_to=/tmp/dump' in flags
  cpu_flags.apply()  # idempotent
  assert os.environ['XLA_FLAGS'].split() == flags


def test_jaxlib_from_another_release_gets_none(monkeypatch):
  monkeypatch.setenv('XLA_FLAGS', '')
  monkeypatch.setattr(cpu_flags, 'MEASURED_JAXLIB', '0.0.')
  cpu_flags.apply()
  assert os.environ['XLA_FLAGS'] == ''
