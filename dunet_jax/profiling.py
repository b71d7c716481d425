"""`train.profile_steps`: a jax.profiler trace of chosen training steps, for TensorBoard.

`train.profile_steps=(first, last)` traces training steps first..last (the step numbers of the logs,
counted from the start of the run) on process 0 into <workdir>/plugins/profile/<time>/, where
TensorBoard's profile plugin finds it (`tensorboard --logdir=WORKDIR`, with the
tensorboard-plugin-profile package). The trace starts once the previous step has finished and
stops once step `last` has, so it holds exactly those steps' host and device work. A start that
resumes after step `first` traces nothing.

jax's profiler writes through its own C++ file system, not through the I/O layer dunet_jax uses and
tests (storage.py); for a remote workdir the trace is written to a local folder and copied to the
workdir when it stops.
"""
import os
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any

import jax
from absl import logging
from etils import epath

from dunet_jax import storage


def check_steps(steps: Sequence[int]) -> None:
  """Refuses a `train.profile_steps` that is neither () nor (first, last) with 1 <= first <= last."""
  if tuple(steps) == ():
    return
  if (len(steps) != 2 or not all(isinstance(step, int) and not isinstance(step, bool) for step in steps)
      or not 1 <= steps[0] <= steps[1]):
    raise ValueError(f'config.train.profile_steps={tuple(steps)!r}: pass the first and last step to trace, '
                     '1 <= first <= last, e.g. --config.train.profile_steps="(10,14)", or () for no trace.')


class StepProfiler:
  """Traces steps steps[0]..steps[1] of a run in `workdir` (see the module docstring)."""

  def __init__(self, steps: Sequence[int], workdir: storage.PathLike, start_step: int):
    check_steps(steps)
    self._steps = tuple(steps)
    self._workdir = storage.path(workdir)
    self._trace_folder: epath.Path | None = None  # where a running trace is written
    self._enabled = bool(self._steps) and jax.process_index() == 0
    if self._enabled and start_step >= self._steps[0]:
      logging.info('train.profile_steps=%s: this start resumes at step %d, after step %d; nothing is traced.',
                   self._steps, start_step, self._steps[0])
      self._enabled = False

  def before_step(self, step: int, state: Any) -> None:
    """Call before running step number `step`, with the state it starts from."""
    if not self._enabled or step != self._steps[0]:
      return
    jax.block_until_ready(state)  # the previous step stays out of the trace
    remote = storage.is_remote(self._workdir)
    self._trace_folder = epath.Path(tempfile.mkdtemp(prefix='dunet_jax_profile_')) if remote else self._workdir
    jax.profiler.start_trace(os.fspath(self._trace_folder))
    logging.info('Tracing steps %d to %d into %s.', *self._steps, self._workdir / 'plugins' / 'profile')

  def after_step(self, step: int, outputs: Any) -> None:
    """Call after step number `step` was dispatched, with its outputs."""
    if self._trace_folder is not None and step == self._steps[1]:
      jax.block_until_ready(outputs)  # the traced steps' device work is inside the trace
      self.close()

  def close(self) -> None:
    """Stops a running trace (the run ended or stopped before step `last`) and writes it."""
    if self._trace_folder is None:
      return
    folder, self._trace_folder = self._trace_folder, None
    jax.profiler.stop_trace()
    if folder != self._workdir:
      for path in folder.glob('plugins/profile/*/*'):
        target = self._workdir / path.relative_to(folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
      shutil.rmtree(folder, ignore_errors=True)
    logging.info('Wrote the profile into %s.', self._workdir / 'plugins' / 'profile')
