"""Label maps straight from a folder of PNGs and an id list, as batches for fitting and scoring W.

Reads `<label_dir>/<id>.png` (VOC's SegmentationClass[Aug] layout). VOC labels are palette PNGs
whose palette indices are the class ids; tf.io.decode_png would expand the palette to RGB, so
the index plane is read with PIL (which releases the GIL while decoding, so tf.data's parallel
map uses every core). Maps are padded with IGNORE_LABEL (255, void) to a multiple of the ratio and batched
(padding to the largest map of the batch, or to a fixed size); each process reads its own
share of the ids.
"""
from collections.abc import Iterator

import numpy as np
import tensorflow as tf
from etils import epath
from PIL import Image

from dunet_jax import storage
from dunet_jax.data import IGNORE_LABEL, palette

tf.config.set_visible_devices([], 'GPU')


def read_ids(list_file: storage.PathLike) -> list[str]:
  """Ids one per line (blank lines ignored, a missing final newline is fine)."""
  path = storage.path(list_file)
  if not path.is_file():
    raise FileNotFoundError(f'Id list {path} does not exist: pass a file with one label id per line.')
  ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
  if not ids:
    raise ValueError(f'Id list {path} is empty: it must hold one label id per line.')
  return ids


def read_label(path: storage.PathLike) -> np.ndarray:
  """(H, W) uint8 class ids of a palette ('P') or greyscale ('L') PNG."""
  with storage.path(path).open('rb') as file, Image.open(file) as image:
    try:
      return palette.class_ids(image)
    except palette.LabelModeError as error:
      raise palette.LabelModeError(f'{path}: {error}') from None


def check_files(label_dir: storage.PathLike, ids: list[str]) -> list[epath.Path]:
  """The label paths, with one error naming the folder and the first missing ids."""
  label_dir = storage.path(label_dir)
  if not label_dir.is_dir():
    raise FileNotFoundError(f'Label folder {label_dir} does not exist: pass the folder of <id>.png maps.')
  paths = [label_dir / f'{label_id}.png' for label_id in ids]
  missing = [path.name for path in paths if not path.is_file()]
  if missing:
    raise FileNotFoundError(f'{len(missing)} of {len(ids)} label files are missing from {label_dir} '
                            f'(first: {", ".join(missing[:5])}): check the id list and the folder.')
  return paths


def label_dataset(label_dir: storage.PathLike, ids: list[str], *, ratio: int, batch_size: int,
                  pad_to: tuple[int, int] | None = None, process_index: int = 0,
                  process_count: int = 1) -> tf.data.Dataset:
  """Batches {'label': (B, H, W) uint8, 'height', 'width': (B,) int32, 'id': (B,) string}.

  Every map is padded with IGNORE_LABEL to a multiple of `ratio` (then to the batch's largest map, or to
  `pad_to` when given, so shapes stay fixed); 'height' and 'width' are its original size, so
  callers can score only the original pixels. Order is deterministic; the last batch may be short.
  """
  paths = [str(path) for path in check_files(label_dir, ids)][process_index::process_count]
  if pad_to is not None and (pad_to[0] % ratio or pad_to[1] % ratio):
    raise ValueError(f'pad_to={pad_to} must be a multiple of the ratio {ratio}.')

  def load(path: tf.Tensor) -> dict[str, tf.Tensor]:
    label = tf.numpy_function(lambda p: read_label(p.decode()), [path], tf.uint8, stateful=False)
    label.set_shape([None, None])
    height, width = tf.shape(label)[0], tf.shape(label)[1]
    if pad_to is None:
      target = (-(-height // ratio) * ratio, -(-width // ratio) * ratio)
    else:
      tf.debugging.assert_less_equal(tf.stack([height, width]), tf.constant(pad_to, tf.int32),
                                     message=f'A label map is larger than pad_to={pad_to}')
      target = pad_to
    label = tf.pad(label, [[0, target[0] - height], [0, target[1] - width]], constant_values=IGNORE_LABEL)
    basename = tf.strings.split(path, '/')[-1]
    return {'label': label, 'height': height, 'width': width,
            'id': tf.strings.regex_replace(basename, r'\.png$', '')}

  dataset = tf.data.Dataset.from_tensor_slices(paths).map(load, num_parallel_calls=tf.data.AUTOTUNE,
                                                          deterministic=True)
  dataset = dataset.padded_batch(batch_size, padding_values={'label': tf.constant(IGNORE_LABEL, tf.uint8),
                                                             'height': 0, 'width': 0, 'id': ''})
  return dataset.prefetch(tf.data.AUTOTUNE)


def label_batches(label_dir: storage.PathLike, ids: list[str], *, ratio: int, batch_size: int,
                  **options) -> Iterator[dict[str, np.ndarray]]:
  """`label_dataset` as numpy dicts."""
  return label_dataset(label_dir, ids, ratio=ratio, batch_size=batch_size, **options).as_numpy_iterator()
