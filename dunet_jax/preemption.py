"""Preemption notices (SIGTERM): the step at which every process saves a checkpoint and stops.

In a multi-process job `jax.distributed.initialize` installs a SIGTERM notifier of its own: a
notice that reaches ANY process is propagated to all of them, and
`multihost_utils.reached_preemption_sync_point(step)` answers True on every process at the same
step (the largest step any process had reached, plus one). A Python SIGTERM handler would replace
that notifier, and a host that stopped on its own flag would leave the others waiting in the
next collective, so one is installed only in a single-process run, where there is nothing to agree on.
"""
import signal

import jax
from absl import logging
from jax.experimental import multihost_utils

# The exit status of a run stopped by a preemption notice after saving its checkpoint (sysexits'
# EX_TEMPFAIL: try again). The launch scripts requeue or restart the job on it.
EXIT_CODE = 75


class Preempted(SystemExit):
  """Training saved a checkpoint at `step` and stopped on a preemption notice; rerun to resume."""

  def __init__(self, step: int):
    super().__init__(EXIT_CODE)
    self.step = step


class Watcher:
  """Answers, at every step, whether a preemption notice says to save and stop at this step.

  Every process must call `should_stop` at every step from the same first step (JAX's protocol).
  """

  def __init__(self):
    self._jax_notifier = jax.distributed.is_initialized()
    self._requested = False
    self._previous = None
    if not self._jax_notifier:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    elif not jax.config.jax_enable_preemption_service:
      logging.warning('jax_enable_preemption_service is off: a SIGTERM ends this multi-process run without '
                      'a checkpoint (it resumes from the last periodic one). Leave the option on.')

  def _handle(self, signum, frame) -> None:
    logging.warning('SIGTERM received: saving a checkpoint at the current step, then exiting.')
    self._requested = True

  def should_stop(self, step: int) -> bool:
    if self._jax_notifier:
      if not jax.config.jax_enable_preemption_service:
        return False
      stop = multihost_utils.reached_preemption_sync_point(step)
      if stop:
        logging.warning('Preemption notice: every process saves a checkpoint at step %d, then exits.', step)
      return stop
    return self._requested

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
