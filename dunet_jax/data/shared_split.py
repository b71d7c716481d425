"""One decoded copy of a training split per host, shared by all its processes.

Training indexes its split at random, so it keeps every example at hand: each label decoded (a
draw then decodes no PNG) and each JPEG's bytes. Held in each process's memory that is about 3 GB
for VOC train_aug, once per process: eight copies on a node with one process per GPU. Instead the
first process to need a split writes it once, next to the built dataset, into a folder that every
process on the host then reads through the page cache (one copy in memory, whatever the number of
processes, and start-up without reading the split again):

  labels.u8        every label decoded and transposed, one after another: one byte per pixel,
                   memory-mapped by each process and handed to TensorFlow without a copy
                   (offsets are int64: VOC train_aug's 1.9 billion pixels are 0.88 x 2^31)
  images/<i>.jpg   example i's JPEG bytes as stored, read per example with tf.io.read_file
  index.npz        label_starts (N + 1,) int64, sizes (N, 2) int32 [height, width], ids (N,)
  source.json      what it was built from (written last; a different source is rebuilt)

Building holds an exclusive lock (one process builds, the others wait and reuse it), writes into a
temporary folder and renames it into place, so no process ever sees a partial copy. The folder is
`<dataset dir>/decoded/<split>-<label key>`; the label key fingerprints the label decoding (its
output for every byte value), so a different decoding (e.g. PASCAL Context with 59 or 60 classes)
gets its own copy. A dataset directory that is not local and writable (e.g. gs://) is mirrored
under the system's temporary folder instead.
"""
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from etils import epath

FORMAT_VERSION = 1
LABELS_FILE = 'labels.u8'
IMAGES_FOLDER = 'images'
INDEX_FILE = 'index.npz'
SOURCE_FILE = 'source.json'

LabelDecoder = Callable[[tf.Tensor], tf.Tensor]


@dataclasses.dataclass(frozen=True)
class SharedSplit:
  """A split's decoded copy on disk. Example i's label, transposed, is the (width, height) array
  labels[label_starts[i]:label_starts[i + 1]] with [height, width] = sizes[i]."""
  directory: epath.Path
  labels: np.memmap          # (sum of label pixels,) uint8, copy-on-write mapping (never written)
  label_starts: np.ndarray   # (N + 1,) int64
  sizes: np.ndarray          # (N, 2) int32
  ids: np.ndarray            # (N,) str

  def image_path(self, index: int) -> str:
    return os.fspath(self.directory / IMAGES_FOLDER / _image_name(index))


def _image_name(index: int) -> str:
  return f'{index:09d}.jpg'


def label_key(decode_label: LabelDecoder) -> str:
  """Fingerprint of a label decoding: its output for a PNG holding every byte value."""
  every_value = tf.io.encode_png(np.arange(256, dtype=np.uint8).reshape(16, 16, 1))
  return hashlib.blake2b(decode_label(every_value).numpy().tobytes(), digest_size=6).hexdigest()


def open_split(builder: tfds.core.DatasetBuilder, split: str, decode_label: LabelDecoder, *,
               num_threads: int | None = None) -> SharedSplit:
  """The split's shared decoded copy: built (once per host, under a lock) when missing or stale."""
  info = builder.info.splits[split]
  if info.num_examples == 0:
    raise ValueError(f'split {split!r} of {builder.name} is empty: check data.train_split.')
  key = label_key(decode_label)
  source = {'format': FORMAT_VERSION, 'dataset': builder.info.full_name, 'split': split,
            'num_examples': int(info.num_examples), 'num_bytes': int(info.num_bytes),
            'dataset_info_mtime': _info_mtime(builder), 'label_key': key}
  directory = _cache_root(builder) / f'{_safe_name(split)}-{key}'
  directory.parent.mkdir(parents=True, exist_ok=True)
  with open(directory.parent / f'{directory.name}.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
    if _source(directory) != source:
      building = directory.parent / f'{directory.name}.building-{_process_name()}'
      shutil.rmtree(building, ignore_errors=True)
      dataset = builder.as_dataset(split=split, shuffle_files=False,
                                   decoders={'image': tfds.decode.SkipDecoding(),
                                             'label': tfds.decode.SkipDecoding()},
                                   read_config=tfds.ReadConfig(try_autocache=False))
      write(dataset, decode_label, building, where=f'split {split!r} of {builder.name}',
            num_threads=num_threads)
      (building / SOURCE_FILE).write_text(json.dumps(source))
      if directory.exists():  # stale: processes that still map it keep their open files
        stale = directory.parent / f'{directory.name}.stale-{_process_name()}'
        directory.rename(stale)
        shutil.rmtree(stale)
      building.rename(directory)
  return read(directory)


def read(directory: epath.PathLike) -> SharedSplit:
  """Maps a written copy (the labels are paged in on use, never read whole)."""
  directory = epath.Path(directory)
  with np.load(directory / INDEX_FILE) as index:
    label_starts, sizes, ids = index['label_starts'], index['sizes'], index['ids']
  labels = np.memmap(directory / LABELS_FILE, np.uint8, mode='c')
  if labels.size != label_starts[-1]:
    raise ValueError(f'{directory / LABELS_FILE} holds {labels.size} bytes but its index '
                     f'{label_starts[-1]}: delete {directory} to rebuild it.')
  return SharedSplit(directory, labels, label_starts, sizes, ids)


def write(examples: tf.data.Dataset, decode_label: LabelDecoder, directory: epath.PathLike, *,
          where: str, num_threads: int | None = None) -> None:
  """Decodes every label of `examples` ({'image': JPEG bytes, 'label': PNG bytes, 'id'}) in order
  into `directory`, with each JPEG's bytes; sizes come from the JPEG headers.

  An undecodable label or JPEG header, or a label whose size differs from its image's, stops with
  the example's id (`where` names the split). Memory stays a few examples in flight.
  """
  directory = epath.Path(directory)
  (directory / IMAGES_FOLDER).mkdir(parents=True)

  def decoded(features):
    label = decode_label(features['label'])
    return {'image': features['image'], 'id': features['id'], 'columns': tf.transpose(label),
            'image_size': tf.io.extract_jpeg_shape(features['image'])[:2]}

  stream = examples.map(decoded, num_parallel_calls=tf.data.AUTOTUNE).prefetch(1)
  stream = with_threads(stream, num_threads).as_numpy_iterator()
  label_starts, sizes, ids = [0], [], []
  with (directory / LABELS_FILE).open('wb') as labels:
    while True:
      try:
        example = next(stream)
      except StopIteration:
        break
      except tf.errors.InvalidArgumentError as error:  # deterministic order: example len(ids) failed
        raise _named_failure(error, examples, len(ids), decode_label, where) from error
      width, height = example['columns'].shape
      image_size = tuple(int(s) for s in example['image_size'])
      example_id = example['id'].decode()
      if (height, width) != image_size:
        raise ValueError(f'training example {example_id!r} of {where}: its label is {height}x{width} '
                         f'but its image {image_size[0]}x{image_size[1]} (HxW). Rebuild the dataset '
                         '(the builder checks sizes).')
      labels.write(example['columns'].tobytes())
      (directory / IMAGES_FOLDER / _image_name(len(ids))).write_bytes(example['image'])
      label_starts.append(label_starts[-1] + height * width)
      sizes.append((height, width))
      ids.append(example_id)
  np.savez(directory / INDEX_FILE, label_starts=np.array(label_starts, np.int64),
           sizes=np.array(sizes, np.int32).reshape(-1, 2), ids=np.array(ids, str))


def _named_failure(error: tf.errors.InvalidArgumentError, examples: tf.data.Dataset, index: int,
                   decode_label: LabelDecoder, where: str) -> Exception:
  """Names example `index` (the one that failed to decode) and what of it failed."""
  features = next(iter(examples.skip(index).take(1)))
  example_id = features['id'].numpy().decode()
  for what, decode in (('JPEG header', lambda: tf.io.extract_jpeg_shape(features['image'])),
                       ('label PNG', lambda: decode_label(features['label']))):
    try:
      decode()
    except tf.errors.InvalidArgumentError as example_error:
      return ValueError(
          f'training example {example_id!r} of {where}: its {what} cannot be decoded '
          f'({_op_error_text(example_error)}). Rebuild the dataset (the builder checks every file) '
          'or remove the file.')
  return error


def _op_error_text(error: tf.errors.OpError) -> str:
  """The op's own words: without TensorFlow's function-node prefix and op suffix."""
  text = re.sub(r'\{\{function_node [^}]*\}\}', '', error.message.strip().splitlines()[0])
  return re.sub(r'\s*\[Op:.*$', '', text).strip()


def _process_name() -> str:
  """Unique among the processes of every host that may share the dataset folder."""
  return f'{socket.gethostname()}-{os.getpid()}'


def _source(directory: epath.Path) -> dict | None:
  path = directory / SOURCE_FILE
  return json.loads(path.read_text()) if path.is_file() else None


def _info_mtime(builder: tfds.core.DatasetBuilder) -> int:
  """When the dataset was (re)built: a rebuilt dataset never reuses an older copy."""
  return int(epath.Path(builder.data_dir, 'dataset_info.json').stat().mtime)


def _cache_root(builder: tfds.core.DatasetBuilder) -> epath.Path:
  data_dir = os.fspath(builder.data_dir)
  if '://' not in data_dir and os.access(data_dir, os.W_OK):
    return epath.Path(data_dir) / 'decoded'
  where = hashlib.blake2b(data_dir.encode(), digest_size=4).hexdigest()
  return epath.Path(tempfile.gettempdir()) / 'dunet_jax_decoded' / f'{builder.info.full_name}-{where}'


def _safe_name(split: str) -> str:
  """A folder name for a split (slices such as 'train[:10%]' included)."""
  readable = re.sub(r'[^A-Za-z0-9_.-]', '_', split)
  return readable if readable == split else f'{readable}-{hashlib.blake2b(split.encode(), digest_size=4).hexdigest()}'


def with_threads(dataset: tf.data.Dataset, num_threads: int | None) -> tf.data.Dataset:
  """`dataset` in a deterministic order, on a private pool of `num_threads` threads (None: tf.data's)."""
  options = tf.data.Options()
  options.deterministic = True
  if num_threads:
    options.threading.private_threadpool_size = num_threads
    options.threading.max_intra_op_parallelism = 1
  return dataset.with_options(options)
