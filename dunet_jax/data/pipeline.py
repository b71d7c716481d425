"""tf.data input pipelines: augmented training crops with exact resume, and whole images for eval.

Training indexes a split's *encoded* images (JPEG bytes) at random: the example at global position
p = step * global_batch_size + k is `permutation_{seed, epoch}(p mod N)`, and its augmentation is drawn
from stateless random ops seeded by (seed, p). A batch is therefore a pure function of (seed, step):
independent of where a run started, of how many processes share it and of tf.data's parallelism, and resuming at step s
decodes no image before s. Each process takes a disjoint slice of every global batch, so one epoch
covers every example exactly once over all processes. Random access needs no file format of the
TFDS builder.

The training split is read from its decoded copy on the host (see `shared_split`): every label
decoded once, transposed, in one memory-mapped uint8 file handed to TensorFlow without a copy, and
each JPEG's bytes in a file of its own read per example, so a draw decodes no PNG and all the
processes of a host share one copy of both through the page cache. The first process to need the
split builds the copy (spread over tf.data's threads; README gives its cost); later starts only
map it. An undecodable label, or one whose size differs from its image's, stops the
build with the example's id.

Augmentation only resizes what the crop shows: the crop window is located in the original image's
coordinates (see `crop_window`), only those JPEG rows and columns are decoded
(`decode_and_crop_jpeg`) and resized (bilinear); labels take the nearest source pixel by exact
integer arithmetic, so classes never blend. Both follow the half-pixel-centre convention of
tf.image.resize on the same window, so image and label stay aligned.
"""
from collections.abc import Iterator
import math
from typing import NamedTuple

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from dunet_jax.data import IGNORE_LABEL, datasets, shared_split

tf.config.set_visible_devices([], 'GPU')

AUTOTUNE = tf.data.AUTOTUNE
# Stream keys that keep the permutation and augmentation random numbers independent.
_PERMUTATION_STREAM = 0
_AUGMENTATION_STREAM = 1
# Per example: scale, row start, column start, flip, and four photometric factors.
_NUM_RANDOM_VALUES = 8


def train_batches(builder: tfds.core.DatasetBuilder, data_config: ml_collections.ConfigDict, *,
                  split: str, global_batch_size: int, seed: int, start_step: int = 0,
                  process_index: int = 0, process_count: int = 1,
                  num_threads: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Endless augmented crops: this process's slice of global batches start_step, start_step+1, ...

  Yields {'image': uint8 (B_local, crop, crop, 3), 'label': uint8 (B_local, crop, crop)} with
  B_local = global_batch_size / process_count; process i holds rows [i * B_local, (i+1) * B_local)
  of every global batch. `num_threads` caps tf.data's thread pool (None: all cores).
  """
  _local_batch_size(global_batch_size, process_count, 'train.batch_size')
  records = training_set(shared_split.open_split(builder, split, _label_decoder(data_config),
                                                 num_threads=num_threads))
  return augmented_batches(records, data_config, global_batch_size=global_batch_size, seed=seed,
                           start_step=start_step, process_index=process_index,
                           process_count=process_count, num_threads=num_threads)


def augmented_batches(records: 'TrainingSet', data_config: ml_collections.ConfigDict, *,
                      global_batch_size: int, seed: int, start_step: int = 0,
                      process_index: int = 0, process_count: int = 1,
                      num_threads: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """`train_batches` over a TrainingSet in hand."""
  local_batch_size = _local_batch_size(global_batch_size, process_count, 'train.batch_size')
  num_examples = records.sizes.shape[0]
  augment = _train_augmentation(data_config)

  # Seeds are pairs (stream, epoch) and (stream, position); stateless ops hash them into keys.
  base_key = tf.constant([seed, 0], tf.int64)
  permutation_stream = _fold_in(base_key, _PERMUTATION_STREAM)[0]
  augmentation_stream = _fold_in(base_key, _AUGMENTATION_STREAM)[0]

  def example(local_position):
    step, k = local_position // local_batch_size, local_position % local_batch_size
    position = step * global_batch_size + process_index * local_batch_size + k
    epoch, offset = position // num_examples, position % num_examples
    index = tf.random.experimental.index_shuffle(offset, tf.stack([permutation_stream, epoch]),
                                                 num_examples - 1)
    size = tf.gather(records.sizes, index)
    return augment(records.image_bytes(index), records.label_columns(index, size), size,
                   tf.stack([augmentation_stream, position]))

  dataset = tf.data.Dataset.counter(start_step * local_batch_size, dtype=tf.int64)
  dataset = dataset.map(_graph_function(example), num_parallel_calls=AUTOTUNE, deterministic=True)
  dataset = dataset.batch(local_batch_size, drop_remainder=True).prefetch(AUTOTUNE)
  # tf.data's default graph rewrites serialize the dataset with the tensors its functions capture:
  # the memory-mapped labels (1.9 GB for VOC train_aug) would be copied into every process. The
  # pipeline is explicitly parallel and prefetched, so they gain nothing here (the same images per
  # CPU-second were measured with and without them).
  options = tf.data.Options()
  options.experimental_optimization.apply_default_optimizations = False
  return shared_split.with_threads(dataset, num_threads).with_options(options).as_numpy_iterator()


def eval_batches(builder: tfds.core.DatasetBuilder, data_config: ml_collections.ConfigDict, *,
                 split: str, global_batch_size: int, pad_size: int, process_index: int = 0,
                 process_count: int = 1, labels_only: bool = False,
                 num_threads: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """One pass over `split`: whole images at their original size, padded bottom/right to pad_size.

  Yields {'image': uint8 (B_local, pad, pad, 3) (absent when labels_only), 'label': uint8
  (B_local, pad, pad) with 255 in the padding, 'height', 'width': int32 (B_local,), 'valid': bool
  (B_local,), 'id': bytes (B_local,) (b'' for the invalid fill)}. Each process reads its own contiguous
  part of the split; all processes yield the same number of batches, the last ones completed by invalid
  all-void examples.
  """
  local_batch_size = _local_batch_size(global_batch_size, process_count, 'eval.batch_size')
  num_examples = builder.info.splits[split].num_examples
  if num_examples == 0:
    raise ValueError(f'split {split!r} of {builder.name} is empty: check data.eval_split.')
  largest_part = math.ceil(num_examples / process_count)
  num_batches = math.ceil(largest_part / local_batch_size)
  part = tfds.even_splits(split, process_count)[process_index]
  part_size = builder.info.splits[part].num_examples
  image_canvas = _canvas(pad_size, _pad_pixel(data_config))
  label_canvas = _canvas(pad_size, [IGNORE_LABEL])
  decode_label = _label_decoder(data_config)

  def pad_example(features):
    label = decode_label(features['label'])
    height, width = tf.shape(label)[0], tf.shape(label)[1]
    fits = tf.logical_and(height <= pad_size, width <= pad_size)
    out = {'label': _pad_to(label[:pad_size, :pad_size], label_canvas),
           'height': height, 'width': width, 'valid': tf.constant(True), 'fits': fits,
           'id': features['id']}
    if not labels_only:
      image = tf.io.decode_jpeg(features['image'], channels=3)
      out['image'] = _pad_to(image[:pad_size, :pad_size], image_canvas)
    return out

  def void_example(_):
    out = {'label': label_canvas,
           'height': tf.constant(0), 'width': tf.constant(0), 'valid': tf.constant(False),
           'fits': tf.constant(True), 'id': tf.constant('')}
    if not labels_only:
      out['image'] = tf.reshape(image_canvas, [pad_size, pad_size, 3])
    return out

  dataset = builder.as_dataset(split=part, shuffle_files=False, decoders=_SKIP_DECODING,
                               read_config=tfds.ReadConfig(try_autocache=False))
  dataset = dataset.map(_graph_function(pad_example), num_parallel_calls=AUTOTUNE)
  fill = tf.data.Dataset.range(num_batches * local_batch_size - part_size)
  fill = fill.map(_graph_function(void_example))
  dataset = dataset.concatenate(fill).batch(local_batch_size).prefetch(AUTOTUNE)
  return _checked_eval_batches(shared_split.with_threads(dataset, num_threads).as_numpy_iterator(), pad_size)


def _checked_eval_batches(batches: Iterator[dict[str, np.ndarray]],
                          pad_size: int) -> Iterator[dict[str, np.ndarray]]:
  """Drops the bookkeeping feature 'fits'; an image that did not fit the pad size is an error."""
  for batch in batches:
    too_large = np.flatnonzero(~batch.pop('fits'))
    ids = batch['id']
    if too_large.size:
      i = too_large[0]
      raise ValueError(
          f'eval image {ids[i].decode()} is {batch["height"][i]}x{batch["width"][i]} (HxW), larger '
          f'than the eval pad size {pad_size} (config key data.eval_pad_size): raise '
          'data.eval_pad_size to at least its longer side, rounded up to a multiple of the output '
          'stride.')
    yield batch


_SKIP_DECODING = {'image': tfds.decode.SkipDecoding(), 'label': tfds.decode.SkipDecoding()}


class TrainingSet(NamedTuple):
  """A training split as tensors over its shared decoded copy (nothing is copied into memory).

  Example i's label is the (width, height) uint8 array
  labels[label_starts[i]:label_starts[i] + height * width], with [height, width] = sizes[i];
  its JPEG bytes are the file image_files[i].
  """
  image_files: tf.Tensor   # (N,) string
  labels: tf.Tensor        # (sum of label pixels,) uint8: every label, transposed, one after another
  label_starts: tf.Tensor  # (N,) int64
  sizes: tf.Tensor         # (N, 2) int32: [height, width] of image and label

  def image_bytes(self, index: tf.Tensor) -> tf.Tensor:
    """Example `index`'s JPEG bytes (a scalar string)."""
    return tf.io.read_file(tf.gather(self.image_files, index))

  def label_columns(self, index: tf.Tensor, size: tf.Tensor) -> tf.Tensor:
    """Example `index`'s label, transposed: (width, height) uint8; size = sizes[index]."""
    start = tf.reshape(tf.gather(self.label_starts, index), [1])
    length = tf.reshape(tf.cast(size[0] * size[1], tf.int64), [1])
    return tf.reshape(tf.slice(self.labels, start, length), tf.stack([size[1], size[0]]))


def training_set(split: shared_split.SharedSplit) -> TrainingSet:
  """Tensors over a shared split; the label tensor is the memory map itself (DLPack, no copy)."""
  return TrainingSet(
      tf.constant([split.image_path(i) for i in range(len(split.sizes))]),
      tf.experimental.dlpack.from_dlpack(split.labels.__dlpack__()),
      tf.constant(split.label_starts[:-1], tf.int64), tf.constant(split.sizes, tf.int32))


def _label_decoder(data_config: ml_collections.ConfigDict):
  """PNG bytes -> (H, W) uint8 class ids, in the convention the config asks for.

  Only PASCAL Context with 59 classes relabels (background -> 255, others -1); see
  datasets.label_lookup.
  """
  lookup = datasets.label_lookup(data_config)
  table = None if lookup is None else tf.constant(lookup, tf.uint8)

  def decode_label(png_bytes: tf.Tensor) -> tf.Tensor:
    label = tf.io.decode_png(png_bytes, channels=1)[..., 0]
    return label if table is None else tf.gather(table, tf.cast(label, tf.int32))

  return decode_label


def _train_augmentation(data_config: ml_collections.ConfigDict):
  """(jpeg bytes, transposed label, [height, width], key) -> {'image', 'label'}.

  Random scale, pad, crop, flip and (optionally) photometric distortion. The label is the decoded
  (width, height) uint8 array that `TrainingSet.label_columns` returns.
  """
  crop = int(data_config.crop_size)
  min_scale, max_scale = float(data_config.min_scale), float(data_config.max_scale)
  if not 0 < min_scale <= max_scale:
    raise ValueError(f'data.min_scale={min_scale} and data.max_scale={max_scale} must satisfy '
                     '0 < min_scale <= max_scale.')
  flip, photometric = bool(data_config.flip), bool(data_config.photometric)
  image_canvas = _canvas(crop, _pad_pixel(data_config))
  label_canvas = _canvas(crop, [IGNORE_LABEL])

  def augment(image_bytes, label_columns, size, key):
    uniform = tf.random.stateless_uniform([_NUM_RANDOM_VALUES], key)
    scale = min_scale + uniform[0] * (max_scale - min_scale)
    window = crop_window(size, scale, crop, uniform[1:3])
    image = tf.io.decode_and_crop_jpeg(image_bytes, tf.concat([window.start, window.length], 0),
                                       channels=3, dct_method='INTEGER_FAST')
    rows, cols = window.nearest_indices(0), window.nearest_indices(1)
    if flip:  # flipping the window before resizing mirrors the samples exactly
      flipped = uniform[3] < 0.5
      image = tf.cond(flipped, lambda: tf.reverse(image, [1]), lambda: image)
      cols = tf.where(flipped, tf.reverse(cols, [0]), cols)
    # Bilinear samples of uint8 pixels lie in [0, 255]: adding 0.5 and truncating rounds them.
    # Resizing float pixels is up to twice as fast as resizing uint8 ones, and as bilinear weights
    # sum to 1 the 0.5 can be added before, to the window, unless colours are distorted after.
    image = tf.cast(image, tf.float32)
    if not photometric:
      image += 0.5
    image = tf.raw_ops.ResizeBilinear(images=image[tf.newaxis], size=window.size,
                                      half_pixel_centers=True)[0]  # = tf.image.resize, bilinear
    if photometric:
      image = tf.clip_by_value(_photometric_distortion(image, uniform[4:8]), 0, 255) + 0.5
    image = _pad_to(tf.cast(image, tf.uint8), image_canvas)

    # Whole-row gathers are copies: the stored label is transposed, so gathering its rows picks
    # columns, and after one transpose gathering rows picks rows.
    label = tf.gather(tf.transpose(tf.gather(label_columns, cols)), rows)
    label = _pad_to(label, label_canvas)
    return {'image': tf.ensure_shape(image, [crop, crop, 3]),
            'label': tf.ensure_shape(label, [crop, crop])}

  return augment


class CropWindow(NamedTuple):
  """Source pixels [start, start + length) become `size` crop pixels; [rows, columns] each."""
  start: tf.Tensor
  length: tf.Tensor
  size: tf.Tensor

  def nearest_indices(self, axis: int) -> tf.Tensor:
    """Nearest source pixel of each output pixel (half-pixel centres, in exact integers)."""
    output = tf.range(self.size[axis])
    return self.start[axis] + (2 * output + 1) * self.length[axis] // (2 * self.size[axis])


def crop_window(size: tf.Tensor, scale: tf.Tensor, crop: int, uniform: tf.Tensor) -> CropWindow:
  """The part of an image that a `crop` x `crop` random crop of it scaled by `scale` shows.

  Per axis, equivalent to scaling the whole axis, padding it at the end to `crop` and cropping at
  a uniform random offset, but found in source coordinates so that only the window is decoded and
  resized: a window of round(crop / scale) source pixels at a uniform random start fills the crop;
  an axis shorter than that is kept whole, scaled to round(size * scale) pixels, and padded later.
  `size` is [height, width]; `uniform` holds two values in [0, 1) that pick the starts.
  """
  size = tf.cast(size, tf.int32)
  length = tf.cast(tf.round(crop / scale), tf.int32)
  whole_axis = length >= size
  length = tf.where(whole_axis, size, tf.maximum(length, 1))
  scaled_size = tf.cast(tf.round(tf.cast(size, tf.float32) * scale), tf.int32)
  output_size = tf.where(whole_axis, tf.clip_by_value(scaled_size, 1, crop), crop)
  num_starts = size - length + 1
  start = tf.minimum(tf.cast(uniform * tf.cast(num_starts, tf.float32), tf.int32), num_starts - 1)
  return CropWindow(start, length, output_size)


def _photometric_distortion(image: tf.Tensor, uniform: tf.Tensor) -> tf.Tensor:
  """Brightness +-32, contrast and saturation x0.5..1.5, hue +-18 degrees; 4 uniforms in [0, 1)."""
  image = tf.image.adjust_brightness(image / 255.0, (2 * uniform[0] - 1) * 32 / 255)
  image = tf.image.adjust_contrast(image, 0.5 + uniform[1])
  image = tf.image.adjust_saturation(tf.clip_by_value(image, 0, 1), 0.5 + uniform[2])
  return tf.image.adjust_hue(image, (2 * uniform[3] - 1) * 18 / 360) * 255.0


def _canvas(size: int, pixel) -> tf.Tensor:
  """A size x size image of `pixel` viewed as 2-D (size, size * channels), to pad into."""
  pixel = np.asarray(pixel, np.uint8)
  return tf.constant(np.tile(pixel, (size, size)))


def _pad_to(image: tf.Tensor, canvas: tf.Tensor) -> tf.Tensor:
  """Pads an image at the bottom and right to the canvas's size with the canvas's pixels.

  Works on 2-D (rows, columns * channels) views: every copy is then a run of whole rows, several
  times faster than padding or concatenating 3-D uint8 tensors.
  """
  size, channels = canvas.shape[0], canvas.shape[1] // canvas.shape[0]
  height, width = tf.shape(image)[0], tf.shape(image)[1]

  def pad():  # each concatenation copies the image once: skip the one that would add nothing
    rows = tf.reshape(image, [height, width * channels])
    rows = tf.cond(width < size, lambda: tf.concat([rows, canvas[:height, width * channels:]], 1),
                   lambda: rows)
    rows = tf.cond(height < size, lambda: tf.concat([rows, canvas[height:]], 0), lambda: rows)
    return tf.reshape(rows, [size, size, channels][:image.shape.rank])

  return tf.cond(tf.logical_and(height == size, width == size), lambda: image, pad)


def _pad_pixel(data_config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  pixel = tuple(data_config.pad_pixel)
  if len(pixel) != 3 or not all(0 <= p <= 255 for p in pixel):
    raise ValueError(f'data.pad_pixel={pixel} must be three values in 0..255 (an RGB colour).')
  return pixel


def _fold_in(key: tf.Tensor, data) -> tf.Tensor:
  return tf.random.experimental.stateless_fold_in(key, tf.cast(data, tf.int64))


def _graph_function(function):
  """Plain graph tracing: these functions have no Python control flow for autograph to convert."""
  return tf.autograph.experimental.do_not_convert(function)


def _local_batch_size(global_batch_size: int, process_count: int, key: str) -> int:
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f'{key}={global_batch_size} must be a positive multiple of the number of '
                     f'processes ({process_count}).')
  return global_batch_size // process_count
