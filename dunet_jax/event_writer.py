"""clu's metric writer (log lines + TensorBoard events) for a workdir that may be remote.

clu writes event files through TensorFlow's file system, whose GCS client is not the I/O layer
dunet_jax uses and tests (see storage.py). For a remote workdir the events are therefore written
to a local folder and copied to the workdir through epath.
"""
import os
import shutil
import tempfile
import time
import weakref

from clu import metric_writers
from etils import epath

from dunet_jax import storage

# How often a remote workdir's TensorBoard events are copied there while training (and on flush).
MIRROR_EVERY_SECONDS = 60.0


def metric_writer(logdir: storage.PathLike, *, just_logging: bool = False) -> metric_writers.MetricWriter:
  """clu's default writer (log lines + TensorBoard events in `logdir`), remote logdirs included."""
  if just_logging or not storage.is_remote(logdir):
    return metric_writers.create_default_writer(None if just_logging else os.fspath(storage.path(logdir)),
                                                just_logging=just_logging)
  return MirroredWriter(storage.path(logdir))


class MirroredWriter(metric_writers.MultiWriter):
  """Writes TensorBoard events locally and copies the event files to a remote folder.

  The copy happens at most every MIRROR_EVERY_SECONDS while writing, and on flush and close, so
  a killed run loses at most that much of its curves (the log lines keep everything).
  """

  def __init__(self, remote: epath.Path):
    self._remote = remote
    self._local = epath.Path(tempfile.mkdtemp(prefix='dunet_jax_events_'))
    weakref.finalize(self, shutil.rmtree, self._local, ignore_errors=True)
    self._last_mirror = time.monotonic()
    super().__init__([metric_writers.create_default_writer(os.fspath(self._local))])

  def _mirror(self) -> None:
    self._remote.mkdir(parents=True, exist_ok=True)
    for event_file in self._local.iterdir():
      (self._remote / event_file.name).write_bytes(event_file.read_bytes())
    self._last_mirror = time.monotonic()

  def _mirror_if_due(self) -> None:
    if time.monotonic() - self._last_mirror >= MIRROR_EVERY_SECONDS:
      self.flush()

  def write_scalars(self, step, scalars) -> None:
    super().write_scalars(step, scalars)
    self._mirror_if_due()

  def write_images(self, step, images) -> None:
    super().write_images(step, images)
    self._mirror_if_due()

  def flush(self) -> None:
    super().flush()
    self._mirror()

  def close(self) -> None:
    super().close()
    self._mirror()
