"""The tf.data pipeline: exact resume, process sharding, augmentation geometry, eval padding.

Datasets are built in the test with the real TFDS builder (voc_segmentation) from VOC-layout
trees whose images and labels are chosen so that the pipeline's output can be checked against
numpy references: iid random labels pin down the exact nearest-neighbour window, and images
coloured by their label block show that image and label stay aligned through scale/crop/flip.
"""
import os
import pathlib

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from configs import synthetic as synthetic_config
from dunet_jax import metrics
from dunet_jax.data import datasets, pipeline, shared_split
from helpers import REPO_ROOT

PAD_PIXEL = (124, 116, 104)


def _data_config(tmp: pathlib.Path, **overrides):
  data = synthetic_config.get_config('test').data
  data.manual_dir = str(tmp / 'manual')
  data.tfds_data_dir = str(tmp / 'tfds')
  data.pad_pixel = PAD_PIXEL
  data.update(overrides)
  return data


def _write_voc_tree(root: pathlib.Path, examples: dict[str, tuple[np.ndarray, np.ndarray]],
                    splits: dict[str, list[str]]) -> None:
  """VOCdevkit/VOC2012 with high-quality JPEGs and class-id PNGs."""
  voc = root / 'VOCdevkit' / 'VOC2012'
  for folder in ('JPEGImages', 'SegmentationClass', 'ImageSets/Segmentation'):
    (voc / folder).mkdir(parents=True)
  for image_id, (image, label) in examples.items():
    Image.fromarray(image).save(voc / 'JPEGImages' / f'{image_id}.jpg', quality=98, subsampling=0)
    Image.fromarray(label, mode='L').save(voc / 'SegmentationClass' / f'{image_id}.png')
  for split, ids in splits.items():
    (voc / 'ImageSets' / 'Segmentation' / f'{split}.txt').write_text('\n'.join(ids) + '\n')


def _voc_builder(tmp: pathlib.Path, examples, **overrides):
  ids = sorted(examples)
  _write_voc_tree(tmp / 'manual', examples, {'train': ids, 'val': ids[:1], 'trainval': ids})
  config = _data_config(tmp, synthetic=False, builder_config='voc2012', **overrides)
  return datasets.prepare(config), config


@pytest.fixture(scope='module')
def synthetic(tmp_path_factory):
  """The built-in dataset, 12 train and 5 val images of 96..160 px."""
  config = _data_config(tmp_path_factory.mktemp('synthetic'), synthetic_num_train=12,
                        synthetic_num_val=5)
  return datasets.prepare(config), config


def _stored_labels(builder, split: str) -> list[np.ndarray]:
  examples = builder.as_dataset(split=split).as_numpy_iterator()
  return [example['label'][..., 0] for example in examples]


def _take(iterator, count: int) -> list[dict[str, np.ndarray]]:
  return [next(iterator) for _ in range(count)]


def test_resume_is_exact_and_independent_of_parallelism(synthetic):
  builder, config = synthetic
  kwargs = dict(split='train', global_batch_size=4, seed=3)
  full = _take(pipeline.train_batches(builder, config, start_step=0, **kwargs), 6)
  resumed = _take(pipeline.train_batches(builder, config, start_step=4, num_threads=1, **kwargs), 2)
  for expected, actual in zip(full[4:], resumed):
    for key in ('image', 'label'):
      np.testing.assert_array_equal(actual[key], expected[key])
  assert full[0]['image'].shape == (4, config.crop_size, config.crop_size, 3)
  assert full[0]['label'].shape == (4, config.crop_size, config.crop_size)
  assert full[0]['image'].dtype == full[0]['label'].dtype == np.uint8
  # Another seed gives other batches; a far-away step is reached without decoding what precedes.
  other = next(pipeline.train_batches(builder, config, start_step=0, **{**kwargs, 'seed': 4}))
  assert not np.array_equal(other['image'], full[0]['image'])
  far = next(pipeline.train_batches(builder, config, start_step=10**9, **kwargs))
  assert far['image'].shape == full[0]['image'].shape


def test_processes_split_each_global_batch_and_an_epoch_covers_every_example_once(
    synthetic, tmp_path):
  builder, _ = synthetic
  largest = 160  # synthetic images are at most 160 px: at scale 1 each crop holds a whole image
  config = _data_config(tmp_path, crop_size=largest, min_scale=1.0, max_scale=1.0, flip=False)
  stored = _stored_labels(builder, 'train')
  num_examples, global_batch = len(stored), 4
  steps_per_epoch = num_examples // global_batch
  kwargs = dict(split='train', global_batch_size=global_batch, seed=0)
  single = _take(pipeline.train_batches(builder, config, **kwargs), 2 * steps_per_epoch)
  shares = [_take(pipeline.train_batches(builder, config, process_index=i, process_count=2,
                                         **kwargs), 2 * steps_per_epoch) for i in range(2)]
  for step, batch in enumerate(single):
    for key in ('image', 'label'):
      np.testing.assert_array_equal(
          np.concatenate([shares[0][step][key], shares[1][step][key]]), batch[key])

  def example_index(label: np.ndarray) -> int:
    matches = [i for i, original in enumerate(stored)
               if np.array_equal(label[:original.shape[0], :original.shape[1]], original)
               and np.all(label[original.shape[0]:] == 255)
               and np.all(label[:, original.shape[1]:] == 255)]
    assert len(matches) == 1
    return matches[0]

  orders = []
  for epoch in range(2):
    epoch_batches = single[epoch * steps_per_epoch:(epoch + 1) * steps_per_epoch]
    orders.append([example_index(label) for batch in epoch_batches for label in batch['label']])
    assert sorted(orders[-1]) == list(range(num_examples))
  assert orders[0] != orders[1]  # every epoch has its own permutation

  # With random augmentation too, each process's rows are exactly its slice of the global batch.
  _, augmenting = synthetic
  single = next(pipeline.train_batches(builder, augmenting, **kwargs))
  shares = [next(pipeline.train_batches(builder, augmenting, process_index=i, process_count=2,
                                        **kwargs)) for i in range(2)]
  for key in ('image', 'label'):
    np.testing.assert_array_equal(np.concatenate([shares[0][key], shares[1][key]]), single[key])


@pytest.mark.parametrize('scale', [0.6, 1.7])
def test_label_crop_is_a_nearest_neighbour_window_at_the_requested_scale(tmp_path, scale):
  rng = np.random.default_rng(0)
  sizes = [(70, 90), (100, 60), (120, 130)]
  examples = {f'img{i}': (rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
                          rng.integers(0, 21, (h, w), dtype=np.uint8))
              for i, (h, w) in enumerate(sizes)}
  crop = 64
  builder, config = _voc_builder(tmp_path, examples, crop_size=crop, min_scale=scale,
                                 max_scale=scale, flip=True)
  labels = {label.shape: label for _, label in examples.values()}
  flips = 0
  for batch in _take(pipeline.train_batches(builder, config, split='train', global_batch_size=3,
                                            seed=1), 4):
    for image, label in zip(batch['image'], batch['label']):
      found = _find_window(label, labels, scale, crop)
      assert found is not None, 'crop is not a nearest-neighbour window of any source label'
      (rows, cols), flipped = found
      flips += flipped
      for region in (label[rows:], label[:, cols:]):
        assert np.all(region == 255)
      for region in (image[rows:], image[:, cols:]):
        assert np.all(region == PAD_PIXEL)
  assert 0 < flips < 12


def _axis_samples(size: int, scale: float, crop: int) -> tuple[int, int]:
  """Reference geometry of one axis: (source pixels the crop spans, crop pixels they fill)."""
  span = round(crop / scale)
  if span >= size:
    return size, min(crop, round(size * scale))
  return span, crop


def _find_window(label: np.ndarray, sources: dict, scale: float, crop: int):
  """Searches every source label and window start for the one the crop samples (numpy reference)."""
  for (height, width), source in sources.items():
    (row_span, rows), (col_span, cols) = (_axis_samples(height, scale, crop),
                                          _axis_samples(width, scale, crop))
    # Nearest neighbour with half-pixel centres: output i samples floor((i + 0.5) * span / out).
    row_steps = np.floor((np.arange(rows) + 0.5) * row_span / rows).astype(int)
    col_steps = np.floor((np.arange(cols) + 0.5) * col_span / cols).astype(int)
    tops, lefts = [a.ravel() for a in np.meshgrid(np.arange(height - row_span + 1),
                                                   np.arange(width - col_span + 1), indexing='ij')]
    for flipped in (False, True):
      seen = label[:rows, :cols][:, ::-1] if flipped else label[:rows, :cols]
      candidates = np.ones(tops.shape, bool)
      for i, j in zip(np.arange(rows) * 7 % rows, np.arange(rows) * 11 % cols):  # prune cheaply
        candidates &= source[tops + row_steps[i], lefts + col_steps[j]] == seen[i, j]
      for top, left in zip(tops[candidates], lefts[candidates]):
        if np.array_equal(seen, source[top + row_steps][:, left + col_steps]):
          return (rows, cols), flipped
  return None


def test_image_and_label_stay_aligned_through_scale_crop_and_flip(tmp_path):
  rng = np.random.default_rng(1)
  colours = rng.permutation(np.array(np.meshgrid([0, 120, 240], [0, 120, 240], [0, 120, 240]))
                            .reshape(3, -1).T)[:21].astype(np.uint8)
  examples = {}
  for i, (h, w) in enumerate([(75, 100), (100, 75), (90, 90)]):
    blocks = rng.integers(0, 21, (h // 10 + 1, w // 10 + 1), dtype=np.uint8)
    label = np.kron(blocks, np.ones((10, 10), np.uint8))[:h, :w]
    examples[f'img{i}'] = (colours[label], label)
  builder, config = _voc_builder(tmp_path, examples, crop_size=64, min_scale=0.5, max_scale=2.0,
                                 flip=True, photometric=False)
  checked = 0
  for batch in _take(pipeline.train_batches(builder, config, split='train', global_batch_size=3,
                                            seed=2), 6):
    for image, label in zip(batch['image'], batch['label']):
      void = label == 255
      np.testing.assert_array_equal(image[void], np.broadcast_to(PAD_PIXEL, image[void].shape))
      # Away from block edges the pixel's nearest colour is its label's colour.
      padded = np.pad(label, 2, mode='edge')
      interior = np.ones_like(void)
      for dy in range(5):
        for dx in range(5):
          interior &= padded[dy:dy + 64, dx:dx + 64] == label
      interior &= ~void
      distances = np.abs(image[interior][:, None].astype(int) - colours[None].astype(int)).sum(-1)
      np.testing.assert_array_equal(distances.argmin(-1), label[interior])
      checked += interior.sum()
  assert checked > 5000


def test_photometric_distortion_changes_colours_but_not_labels_or_padding(synthetic, tmp_path):
  builder, _ = synthetic
  kwargs = dict(split='train', global_batch_size=4, seed=5)
  scales = dict(min_scale=0.2, max_scale=0.4)  # small scales: most crops are partly padding
  plain = next(pipeline.train_batches(builder, _data_config(tmp_path, **scales), **kwargs))
  distorted = next(pipeline.train_batches(
      builder, _data_config(tmp_path, photometric=True, **scales), **kwargs))
  np.testing.assert_array_equal(distorted['label'], plain['label'])
  padding = (plain['label'] == 255) & np.all(plain['image'] == PAD_PIXEL, axis=-1)
  assert padding.mean() > 0.2
  assert np.all(distorted['image'][padding] == PAD_PIXEL)
  assert np.abs(distorted['image'][~padding].astype(int) - plain['image'][~padding]).mean() > 3


def _decoded_val(builder) -> dict[bytes, dict]:
  return {example['id']: example for example in builder.as_dataset(split='val').as_numpy_iterator()}


def test_eval_keeps_images_whole_and_its_padding_is_never_scored(synthetic):
  builder, config = synthetic
  originals = _decoded_val(builder)
  pad, num_classes = 176, 21
  per_process = [list(pipeline.eval_batches(builder, config, split='val', global_batch_size=4,
                                            pad_size=pad, process_index=i, process_count=2))
                 for i in range(2)]
  assert len(per_process[0]) == len(per_process[1]) == 2  # ceil(ceil(5 / 2) / 2)
  rng = np.random.default_rng(0)
  unmatched = dict(originals)
  for batches in per_process:
    for batch in batches:
      assert batch['image'].shape == (2, pad, pad, 3) and batch['label'].shape == (2, pad, pad)
      predictions = rng.integers(0, num_classes, batch['label'].shape)
      expected = np.zeros((num_classes, num_classes), np.int64)
      for k in range(2):
        h, w = batch['height'][k], batch['width'][k]
        if not batch['valid'][k]:
          assert h == w == 0 and np.all(batch['label'][k] == 255)
          continue
        key = next(i for i, o in unmatched.items() if o['label'].shape[:2] == (h, w)
                   and np.array_equal(o['label'][..., 0], batch['label'][k, :h, :w]))
        original = unmatched.pop(key)
        assert np.abs(batch['image'][k, :h, :w].astype(int) - original['image']).max() <= 1
        assert np.all(batch['label'][k, h:] == 255) and np.all(batch['label'][k, :, w:] == 255)
        assert np.all(batch['image'][k, h:] == PAD_PIXEL)
        assert np.all(batch['image'][k, :, w:] == PAD_PIXEL)
        valid_pixels = original['label'][..., 0] != 255
        np.add.at(expected, (original['label'][..., 0][valid_pixels],
                             predictions[k, :h, :w][valid_pixels]), 1)
      confusion = metrics.confusion_matrix(batch['label'], predictions, num_classes)
      np.testing.assert_array_equal(np.asarray(confusion), expected)
  assert not unmatched  # every val image exactly once over the two processes


def test_labels_only_matches_the_full_eval_pass(synthetic):
  builder, config = synthetic
  kwargs = dict(split='val', global_batch_size=2, pad_size=160)
  full = list(pipeline.eval_batches(builder, config, **kwargs))
  labels = list(pipeline.eval_batches(builder, config, labels_only=True, **kwargs))
  assert len(full) == len(labels) == 3
  for a, b in zip(full, labels):
    assert 'image' not in b
    for key in ('label', 'height', 'width', 'valid'):
      np.testing.assert_array_equal(a[key], b[key])


def test_eval_image_larger_than_the_pad_size_names_the_image_and_the_key(synthetic):
  builder, config = synthetic
  with pytest.raises(ValueError, match=r'data\.eval_pad_size') as error:
    list(pipeline.eval_batches(builder, config, split='val', global_batch_size=1, pad_size=96))
  assert any(image_id.decode() in str(error.value) for image_id in _decoded_val(builder))


def test_batch_size_must_divide_over_processes(synthetic):
  builder, config = synthetic
  with pytest.raises(ValueError, match=r'train\.batch_size=6'):
    pipeline.train_batches(builder, config, split='train', global_batch_size=6, seed=0,
                           process_count=4)


def _jpeg(height: int, width: int) -> bytes:
  return tf.io.encode_jpeg(tf.zeros([height, width, 3], tf.uint8)).numpy()


def _png(label: np.ndarray) -> bytes:
  return tf.io.encode_png(label[..., None]).numpy()


def _examples(images: list[bytes], labels: list[bytes]) -> tf.data.Dataset:
  ids = [chr(ord('a') + i) for i in range(len(images))]
  return tf.data.Dataset.from_tensor_slices({'image': images, 'label': labels, 'id': ids})


def test_training_labels_are_decoded_once_transposed_and_relabelled(tmp_path):
  """The shared copy holds every label decoded once with the config's lookup, and the JPEG bytes."""
  from configs import context
  rng = np.random.default_rng(0)
  stored = [rng.integers(0, 60, size, dtype=np.uint8) for size in [(3, 5), (4, 2), (6, 6)]]
  stored[0][0, 0] = 255
  jpegs = [_jpeg(*label.shape) for label in stored]
  data = context.get_config().data
  data.context_classes = 59  # the option that relabels (background -> 255)
  shared_split.write(_examples(jpegs, [_png(label) for label in stored]),
                     pipeline._label_decoder(data), tmp_path / 'copy', where='split train',
                     num_threads=1)
  copy = shared_split.read(tmp_path / 'copy')
  records = pipeline.training_set(copy)
  np.testing.assert_array_equal(records.sizes.numpy(), [label.shape for label in stored])
  assert records.labels.shape == (sum(label.size for label in stored),)
  assert list(copy.ids) == ['a', 'b', 'c']
  lookup = datasets.label_lookup(data)
  for i, label in enumerate(stored):
    columns = records.label_columns(tf.constant(i), records.sizes[i])
    np.testing.assert_array_equal(columns.numpy(), lookup[label].T)
    assert records.image_bytes(tf.constant(i)).numpy() == jpegs[i]
  assert lookup[255] == 255 and lookup[0] == 255 and lookup[59] == 58


def _sparse_copy(directory: pathlib.Path, first: tuple[int, int], second: np.ndarray) -> int:
  """A shared copy whose first label is `first` (height, width) of unwritten (sparse: no disk, no
  memory) pixels and whose second is `second`; returns the second's offset."""
  (directory / shared_split.IMAGES_FOLDER).mkdir(parents=True)
  start = first[0] * first[1]
  with open(directory / shared_split.LABELS_FILE, 'wb') as labels:
    labels.truncate(start)
    labels.seek(start)
    labels.write(second.T.tobytes())
  np.savez(directory / shared_split.INDEX_FILE, label_starts=np.array([0, start, start + second.size]),
           sizes=np.array([first, second.shape], np.int32), ids=np.array(['big', 'small']))
  return start


def _resident_gib() -> float:
  status = pathlib.Path('/proc/self/status').read_text()
  return int(next(line for line in status.splitlines() if line.startswith('VmRSS:')).split()[1]) / 2**20


def test_labels_past_two_to_the_31_pixels_are_read_in_place(tmp_path):
  """VOC train_aug has 0.88 x 2^31 label pixels; offsets are int64 and the file is mapped, not read."""
  second = np.arange(15, dtype=np.uint8).reshape(3, 5)
  start = _sparse_copy(tmp_path / 'copy', (46341, 46341), second)
  assert start > 2**31
  before = _resident_gib()
  records = pipeline.training_set(shared_split.read(tmp_path / 'copy'))
  assert records.labels.shape == (start + 15,)
  np.testing.assert_array_equal(records.label_columns(tf.constant(1), records.sizes[1]).numpy(),
                                second.T)
  assert _resident_gib() - before < 0.25, 'the label file was copied instead of mapped'


def test_the_training_dataset_does_not_copy_the_labels(tmp_path):
  """tf.data's graph rewrites serialize captured tensors: below protobuf's 2 GB limit they would
  copy the mapped labels into the process (1.9 GB for VOC train_aug)."""
  _sparse_copy(tmp_path / 'copy', (32768, 32768), np.zeros((3, 5), np.uint8))  # 1 GiB
  records = pipeline.training_set(shared_split.read(tmp_path / 'copy'))
  before = _resident_gib()
  batches = pipeline.augmented_batches(records, synthetic_config.get_config('test').data,
                                       global_batch_size=2, seed=0)  # made ready, not run
  assert _resident_gib() - before < 0.25, 'the training dataset copied the label file'
  del batches


def test_an_undecodable_or_mis_sized_training_example_stops_the_start_with_its_id(tmp_path):
  decode = pipeline._label_decoder(synthetic_config.get_config('test').data)
  png = _png(np.zeros((4, 6), np.uint8))

  def start(images, labels):
    shared_split.write(_examples(images, labels), decode, tmp_path / str(len(list(tmp_path.iterdir()))),
                       where="split 'train'")

  with pytest.raises(ValueError, match=r"'c' of split 'train': its label PNG cannot be decoded"):
    start([_jpeg(4, 6)] * 3, [png, png, png[:len(png) // 2]])
  with pytest.raises(ValueError, match=r"'b' of split 'train': its label is 4x6 but its image 6x4"):
    start([_jpeg(4, 6), _jpeg(6, 4), _jpeg(4, 6)], [png] * 3)
  with pytest.raises(ValueError, match=r"'a' of split 'train': its JPEG header cannot be decoded"):
    start([b'not a JPEG', _jpeg(4, 6), _jpeg(4, 6)], [png] * 3)


def _reference_batches(builder, data_config, *, split: str, global_batch_size: int, seed: int,
                       steps: int) -> list[dict[str, np.ndarray]]:
  """Batches 0..steps-1 built as the pipeline did before the shared copy: JPEG bytes and decoded,
  transposed labels read from TFDS into memory and indexed there (one process, eagerly)."""
  decode = pipeline._label_decoder(data_config)
  skip = {'image': tfds.decode.SkipDecoding(), 'label': tfds.decode.SkipDecoding()}
  examples = list(builder.as_dataset(split=split, shuffle_files=False, decoders=skip))
  jpegs = [example['image'] for example in examples]
  columns = [tf.transpose(decode(example['label'])) for example in examples]
  augment = pipeline._train_augmentation(data_config)
  base_key = tf.constant([seed, 0], tf.int64)
  permutation_stream, augmentation_stream = (
      tf.random.experimental.stateless_fold_in(base_key, tf.constant(stream, tf.int64))[0]
      for stream in (0, 1))
  batches = []
  for step in range(steps):
    crops = []
    for position in range(step * global_batch_size, (step + 1) * global_batch_size):
      epoch, offset = divmod(position, len(examples))
      index = int(tf.random.experimental.index_shuffle(
          tf.constant(offset, tf.int64), tf.stack([permutation_stream, tf.constant(epoch, tf.int64)]),
          len(examples) - 1))
      size = tf.shape(columns[index])[::-1]
      crops.append(augment(jpegs[index], columns[index], size,
                           tf.stack([augmentation_stream, tf.constant(position, tf.int64)])))
    batches.append({key: np.stack([crop[key].numpy() for crop in crops]) for key in ('image', 'label')})
  return batches


def _label_mapping(pid: int, folder: pathlib.Path) -> dict:
  """The live mapping of a shared labels file below `folder` in /proc/<pid>/smaps: path, device,
  inode and its page counts (other tests' mappings, and those of deleted copies, are skipped)."""
  mapping = found = None
  for line in pathlib.Path(f'/proc/{pid}/smaps').read_text().splitlines():
    fields = line.split()
    if '-' in fields[0] and len(fields) >= 5 and ':' in fields[3]:  # a mapping's header line
      live = (len(fields) == 6 and fields[5].startswith(f'{folder}/')
              and fields[5].endswith(shared_split.LABELS_FILE))
      found = {'path': fields[5], 'device': fields[3], 'inode': fields[4]} if live else None
      mapping = found or mapping
    elif found is not None and fields[0].endswith(':') and fields[-1] == 'kB':
      found[fields[0][:-1]] = int(fields[1])
  assert mapping is not None, f'process {pid} maps no shared labels file'
  return mapping


def test_processes_on_one_host_share_one_decoded_copy_and_batches_are_unchanged(synthetic, tmp_path):
  """This process and another, started together: one builds the copy, both map the same labels
  file (its pages shared, none copied); the other's two process slices make up this process's
  batches, which equal the in-memory reference's byte for byte."""
  import shutil
  import subprocess
  import sys
  builder, config = synthetic
  shutil.rmtree(pathlib.Path(builder.data_dir) / 'decoded', ignore_errors=True)
  steps = 6  # two epochs of the 12 examples
  other = subprocess.Popen(
      [sys.executable, str(REPO_ROOT / 'tests' / 'shared_split_process.py'), config.manual_dir,
       config.tfds_data_dir, str(steps), str(tmp_path / 'other.npz')],
      env={**os.environ, 'PYTHONPATH': str(REPO_ROOT)}, stdin=subprocess.PIPE,
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    batches = pipeline.train_batches(builder, config, split='train', global_batch_size=4, seed=7)
    single = _take(batches, steps)
    output = []
    while not output or output[-1].strip() != 'ready':
      output.append(other.stdout.readline())
      assert output[-1] or other.poll() is None, ''.join(output)[-3000:]
    decoded = pathlib.Path(builder.data_dir) / 'decoded'
    mappings = [_label_mapping(pid, decoded) for pid in (os.getpid(), other.pid)]
  finally:
    other.stdin.close()
    other.wait(timeout=60)
  assert mappings[0]['path'] == mappings[1]['path']
  assert (mappings[0]['device'], mappings[0]['inode']) == (mappings[1]['device'], mappings[1]['inode'])
  for mapping in mappings:
    shared = mapping['Shared_Clean'] + mapping['Shared_Dirty']  # page-cache pages (dirty: not yet on disk)
    assert mapping['Rss'] > 0 and shared == mapping['Rss'], mappings  # every mapped page in both
    assert mapping['Private_Dirty'] == mapping['Anonymous'] == 0, mappings  # never copied
  copies = sorted(path.name for path in decoded.iterdir())
  assert [name for name in copies if not name.endswith('.lock')] == [pathlib.Path(mappings[0]['path']).parent.name]

  shares = np.load(tmp_path / 'other.npz')
  reference = _reference_batches(builder, config, split='train', global_batch_size=4, seed=7,
                                 steps=steps)
  for step in range(steps):
    for key in ('image', 'label'):
      rows = np.concatenate([shares[f'{key}_0'][step], shares[f'{key}_1'][step]])
      assert rows.tobytes() == single[step][key].tobytes() == reference[step][key].tobytes()
  del batches


def test_context_59_class_labels_ignore_background():
  """PASCAL Context stores 60 classes, the default (paper's) protocol; the 59-class option ignores background."""
  from configs import context
  stored = np.array([[0, 1, 30, 59, 255]], np.uint8)
  png = tf.io.encode_png(stored[..., None])
  config = context.get_config()
  np.testing.assert_array_equal(pipeline._label_decoder(config.data)(png).numpy(), stored)  # 60: default
  config.data.context_classes = 59
  np.testing.assert_array_equal(pipeline._label_decoder(config.data)(png).numpy(), [[255, 0, 29, 58, 255]])
