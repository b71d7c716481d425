"""Validated segmentation examples: the features every builder writes and the checks on its files.

A bad file found while training is far costlier than one found while building, so each image is
fully decoded once here and each label is checked against the class count and the image size.
"""
import dataclasses
import io
from typing import Callable, Iterable, Iterator

import numpy as np
import scipy.io
import tensorflow_datasets as tfds
from absl import logging
from PIL import Image

from dunet_jax.data import IGNORE_LABEL, palette

SKIP_HINT = 'fix or re-extract it, or set config.data.skip_bad_files=True to skip and count such files'


class BadFileError(ValueError):
  """An image or label that cannot be used; the message names the file and the reason."""

  def __init__(self, name: str, reason: str):
    super().__init__(f'{name}: {reason}; {SKIP_HINT}')
    self.name, self.reason = name, reason


def features() -> tfds.features.FeaturesDict:
  """JPEG bytes as in the file, a single-channel class-id PNG, the id and the original size."""
  return tfds.features.FeaturesDict({
      'image': tfds.features.Image(encoding_format='jpeg'),
      'label': tfds.features.Image(shape=(None, None, 1), encoding_format='png'),
      'id': tfds.features.Text(),
      'height': tfds.features.Scalar(np.int32),
      'width': tfds.features.Scalar(np.int32),
  })


@dataclasses.dataclass(frozen=True)
class Entry:
  """Where one example's files are: read_image returns JPEG bytes, read_label a uint8 (H, W) map."""
  image_id: str
  image_name: str
  read_image: Callable[[], bytes]
  label_name: str
  read_label: Callable[[], np.ndarray]


def decode_image_size(data: bytes, name: str) -> tuple[int, int]:
  """(height, width) after a full decode, which is what catches truncated files."""
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.load()
      if image.format != 'JPEG':
        raise BadFileError(name, f'expected a JPEG image, found {image.format}')
      return image.height, image.width
  except BadFileError:
    raise
  except Exception as error:  # PIL raises many types for corrupt data
    raise BadFileError(name, f'unreadable or truncated image ({error})') from error


def decode_label_png(data: bytes, name: str) -> np.ndarray:
  """Class ids of a palette ('P') or grayscale ('L') PNG; an RGB-coloured label is refused."""
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.load()
      return palette.class_ids(image)
  except palette.LabelModeError as error:
    raise BadFileError(name, str(error)) from error
  except Exception as error:
    raise BadFileError(name, f'unreadable or truncated label ({error})') from error


def load_mat_field(data: bytes, name: str, struct: str | None, field: str) -> np.ndarray:
  """mat[struct].field (or mat[field] when struct is None) from MATLAB .mat bytes."""
  try:
    mat = scipy.io.loadmat(io.BytesIO(data), squeeze_me=True, struct_as_record=False)
  except Exception as error:
    raise BadFileError(name, f'unreadable or truncated .mat file ({error})') from error
  where = f'{struct}.{field}' if struct else field
  try:
    value = getattr(mat[struct], field) if struct else mat[field]
  except (KeyError, AttributeError) as error:
    raise BadFileError(name, f'no {where} in the .mat file') from error
  value = np.asarray(value)
  if value.ndim != 2 or not np.issubdtype(value.dtype, np.integer):
    raise BadFileError(name, f'{where} is not a 2-D integer label map (shape {value.shape}, {value.dtype})')
  return value


def check_label(label: np.ndarray, num_classes: int, name: str) -> np.ndarray:
  """The label as uint8 when every value is a class id or IGNORE_LABEL."""
  values = np.unique(label)
  bad = values[(values >= num_classes) & (values != IGNORE_LABEL) | (values < 0)]
  if bad.size:
    raise BadFileError(name, f'label values {bad.tolist()} are outside 0..{num_classes - 1} and {IGNORE_LABEL}')
  return label.astype(np.uint8)


def encode_label_png(label: np.ndarray) -> bytes:
  """A single-channel ('L') PNG whose pixel values are the class ids."""
  buffer = io.BytesIO()
  Image.fromarray(label, mode='L').save(buffer, format='PNG')
  return buffer.getvalue()


def make_example(entry: Entry, num_classes: int) -> dict:
  """Reads, validates and encodes one example; BadFileError names the offending file."""
  try:
    jpeg = entry.read_image()
  except (FileNotFoundError, OSError) as error:
    raise BadFileError(entry.image_name, f'cannot read the image ({error})') from error
  height, width = decode_image_size(jpeg, entry.image_name)
  try:
    label = entry.read_label()
  except (FileNotFoundError, OSError) as error:
    raise BadFileError(entry.label_name, f'cannot read the label ({error})') from error
  label = check_label(label, num_classes, entry.label_name)
  if label.shape != (height, width):
    raise BadFileError(entry.label_name,
                       f'label size {label.shape[1]}x{label.shape[0]} differs from image size '
                       f'{width}x{height} ({entry.image_name})')
  return {'image': jpeg, 'label': encode_label_png(label), 'id': entry.image_id,
          'height': height, 'width': width}


def generate(entries: Iterable[Entry], num_classes: int, skip_bad_files: bool,
             split: str) -> Iterator[tuple[str, dict]]:
  """(id, example) for each entry; bad files stop the build, or are skipped and counted."""
  skipped = 0
  for entry in entries:
    try:
      yield entry.image_id, make_example(entry, num_classes)
    except BadFileError as error:
      if not skip_bad_files:
        raise
      skipped += 1
      logging.warning('Skipping example %s: %s: %s', entry.image_id, error.name, error.reason)
  if skipped:
    logging.warning('Split %s: skipped %d examples with bad files (skip_bad_files=True).', split, skipped)
