"""User paths, local or remote (gs://, s3://, ...), all through one I/O layer: the one the tests run.

Every file dunet_jax reads or writes goes through `etils.epath` (what orbax and TFDS use);
`pathlib` would turn `gs://bucket/run` into the local folder `gs:/bucket/run`. For gs:// epath
talks through TensorFlow's GCS client when TensorFlow is installed, and through fsspec's `gcsfs`
otherwise. TensorFlow's client has its endpoints compiled in, so nothing can test it against a
GCS emulator; this module therefore makes epath use gcsfs in every process that imports dunet_jax
(before epath first looks at EPATH_USE_TF), so production runs the client the tests exercise.
gcsfs's experimental zonal-bucket support is turned off too: it asks a gRPC control-plane API for
each bucket's layout, which neither standard buckets need nor an emulator answers. gcsfs's
listing cache is off (see below). Orbax's array
data goes through tensorstore's own GCS client (TENSORSTORE_GCS_HTTP_URL points it elsewhere).

TensorBoard event files are written by TensorFlow's client, so for a remote workdir they are
written to a local folder and copied to the workdir through epath (`event_writer`). TFDS reads
prepared data with tf.data, which also uses TensorFlow's client: a gs:// `data.tfds_data_dir`
works in production (TFDS's own bookkeeping goes through epath) and is tested as far as epath goes.
"""
import os

os.environ['EPATH_USE_TF'] = 'false'
os.environ['GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT'] = 'false'

import fsspec  # noqa: E402
from etils import epath  # noqa: E402

# gcsfs otherwise caches folder listings forever, so a process would never see the files another
# host wrote after it first looked (checkpoint steps, W, the recorded config).
fsspec.config.conf.setdefault('gcs', {}).setdefault('use_listings_cache', False)

PathLike = str | os.PathLike


def is_remote(path: PathLike) -> bool:
  """True for URIs with a scheme (gs://bucket/run), False for local paths."""
  return '://' in os.fspath(path)


def path(user_path: PathLike) -> epath.Path:
  """An epath for a path a user gave: URIs stay URIs, a local path has `~` expanded."""
  result = epath.Path(user_path)
  return result if is_remote(result) else result.expanduser()


def absolute(user_path: PathLike) -> epath.Path:
  """`path`, made absolute when local (orbax needs absolute checkpoint folders)."""
  result = path(user_path)
  return result if is_remote(result) else result.absolute()


def move_folder(source: PathLike, target: PathLike, *, remove_first: str | None = None) -> None:
  """Renames folder `source` to `target`; on object stores, which cannot rename, moves it safely.

  gcsfs would move object by object, so an interruption could leave the folder split between both
  names. Here every file is copied first and only then is `source` deleted, starting with its
  file `remove_first` (a completion marker), so an interruption loses nothing.
  """
  source, target = path(source), path(target)
  if not is_remote(source):
    source.rename(target)
    return
  file_system, source_path = fsspec.core.url_to_fs(os.fspath(source))
  target_path = fsspec.core.url_to_fs(os.fspath(target))[1]
  file_system.copy(source_path, target_path, recursive=True)
  if remove_first is not None:
    (source / remove_first).unlink(missing_ok=True)
  source.rmtree()
