"""The voc_segmentation builder on miniature official archives made from real VOC / SBD label maps.

References are the real PNG label maps (decoded with PIL, independently of the builder) and the
original JPEG bytes; the train_aug arithmetic is checked against the published 10,582-image list.
"""
import io
import pathlib

import numpy as np
import pytest
import scipy.io
import scipy.sparse
import tensorflow_datasets as tfds
from PIL import Image

from configs import default
from dunet_jax.data import datasets, voc
from helpers import write_tar, write_tree

VOC_TRAIN = ['2007_000032', '2011_000003', '2011_000006', '2007_000039', '2007_000063']
VOC_VAL = ['2007_000033', '2007_000042', '2007_000061']
SBD_ONLY = ['2008_000002', '2008_000003', '2008_000007', '2008_000008']
# SBD lists also hold VOC train and val images: VOC's labels must win, VOC val must stay out.
SBD_TRAIN = SBD_ONLY[:3] + [VOC_VAL[1]]
SBD_VAL = SBD_ONLY[3:] + [VOC_TRAIN[3]]


@pytest.fixture(scope='module')
def real(voc_labels_dir) -> dict:
  """{id: (label png bytes, class-id array, jpeg bytes)} for every id used here."""
  sbd_only = set(_read_list(voc_labels_dir / 'lists' / 'sbd_aug_only_9118.txt'))
  assert set(SBD_ONLY) <= sbd_only and not (set(VOC_TRAIN) | set(VOC_VAL)) & sbd_only
  found = {}
  for index, image_id in enumerate(VOC_TRAIN + VOC_VAL + SBD_ONLY):
    png = (voc_labels_dir / 'SegmentationClass' / f'{image_id}.png').read_bytes()
    label = np.asarray(Image.open(io.BytesIO(png)))
    jpeg_path = voc_labels_dir / 'JPEGImages' / f'{image_id}.jpg'
    jpeg = jpeg_path.read_bytes() if jpeg_path.exists() else _random_jpeg(label.shape, index)
    found[image_id] = (png, label, jpeg)
  return found


def _read_list(path: pathlib.Path) -> list[str]:
  return path.read_text().split()


def _random_jpeg(shape: tuple[int, int], seed: int) -> bytes:
  pixels = np.random.default_rng(seed).integers(0, 256, size=(*shape, 3), dtype=np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format='JPEG', quality=80)
  return buffer.getvalue()


def _mat_bytes(segmentation: np.ndarray) -> bytes:
  """An SBD cls/*.mat: struct GTcls with Segmentation, Boundaries and CategoriesPresent."""
  buffer = io.BytesIO()
  classes = np.array([c for c in np.unique(segmentation) if c not in (0, 255)], dtype=np.uint8)
  boundaries = np.empty((20, 1), dtype=object)
  for index in range(20):
    boundaries[index, 0] = scipy.sparse.csc_matrix(segmentation.shape, dtype=bool)
  scipy.io.savemat(buffer, {'GTcls': {'Segmentation': segmentation.astype(np.uint8),
                                      'Boundaries': boundaries, 'CategoriesPresent': classes}})
  return buffer.getvalue()


def voc_files(real: dict) -> dict[str, bytes]:
  """VOCdevkit/VOC2012 members (relative paths) of the miniature VOC archive."""
  files = {}
  for image_id in VOC_TRAIN + VOC_VAL + SBD_ONLY:  # VOC2012 JPEGImages holds SBD's images too
    files[f'JPEGImages/{image_id}.jpg'] = real[image_id][2]
  for image_id in VOC_TRAIN + VOC_VAL:
    files[f'SegmentationClass/{image_id}.png'] = real[image_id][0]
    files[f'SegmentationObject/{image_id}.png'] = real[image_id][0]
  for split, ids in (('train', VOC_TRAIN), ('val', VOC_VAL), ('trainval', VOC_TRAIN + VOC_VAL)):
    files[f'ImageSets/Segmentation/{split}.txt'] = ''.join(f'{i}\n' for i in ids).encode()
  files['ImageSets/Main/train.txt'] = b'unrelated\n'
  return files


def sbd_files(real: dict) -> dict[str, bytes]:
  """benchmark_RELEASE/dataset members; labels of VOC ids here are all-zero decoys."""
  files = {'train.txt': ''.join(f'{i}\n' for i in SBD_TRAIN).encode(),
           'val.txt': ''.join(f'{i}\n' for i in SBD_VAL).encode()}
  for image_id in SBD_TRAIN + SBD_VAL:
    label = real[image_id][1]
    segmentation = label if image_id in SBD_ONLY else np.zeros_like(label)
    files[f'cls/{image_id}.mat'] = _mat_bytes(segmentation)
    files[f'img/{image_id}.jpg'] = real[image_id][2]
  return files


def build(manual_dir: pathlib.Path, data_dir: pathlib.Path, **kwargs) -> tfds.core.DatasetBuilder:
  builder = voc.VocSegmentation(config='voc2012', data_dir=str(data_dir), **kwargs)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=str(manual_dir), try_download_gcs=False))
  return builder


def read_split(builder: tfds.core.DatasetBuilder, split: str) -> dict[str, dict]:
  """{id: example} with the image kept as the stored bytes."""
  dataset = builder.as_dataset(split=split, decoders={'image': tfds.decode.SkipDecoding()})
  return {example['id'].decode(): example for example in tfds.as_numpy(dataset)}


def check_examples(examples: dict[str, dict], expected_ids: list[str], real: dict) -> None:
  assert sorted(examples) == sorted(expected_ids)
  for image_id, example in examples.items():
    _, label, jpeg = real[image_id]
    assert example['image'] == jpeg, f'{image_id}: JPEG bytes were re-encoded'
    assert example['label'].shape == (*label.shape, 1)
    np.testing.assert_array_equal(example['label'][..., 0], label, err_msg=image_id)
    assert (example['height'], example['width']) == label.shape


@pytest.mark.parametrize('form', ['archives', 'extracted'])
def test_builds_official_layouts(tmp_path, real, form):
  manual_dir = tmp_path / 'manual'
  manual_dir.mkdir()
  if form == 'archives':
    write_tar(manual_dir / voc.VOC_ARCHIVE, 'VOCdevkit/VOC2012/', voc_files(real), 'w')
    write_tar(manual_dir / voc.SBD_ARCHIVE, 'benchmark_RELEASE/dataset/', sbd_files(real), 'w:gz')
  else:
    write_tree(manual_dir / 'VOCdevkit' / 'VOC2012', voc_files(real))
    write_tree(manual_dir / 'benchmark_RELEASE' / 'dataset', sbd_files(real))
  builder = build(manual_dir, tmp_path / 'tfds')
  assert {split: info.num_examples for split, info in builder.info.splits.items()} == {
      'train': 5, 'val': 3, 'trainval': 8, 'train_aug': 5 + 4}
  check_examples(read_split(builder, 'train'), VOC_TRAIN, real)
  check_examples(read_split(builder, 'val'), VOC_VAL, real)
  check_examples(read_split(builder, 'trainval'), VOC_TRAIN + VOC_VAL, real)
  train_aug = read_split(builder, 'train_aug')
  check_examples(train_aug, VOC_TRAIN + SBD_ONLY, real)  # decoy SBD labels of VOC ids never used
  assert set(np.unique(train_aug[SBD_ONLY[0]]['label'])) <= set(range(21))  # SBD maps: no void band


def test_without_sbd_there_is_no_train_aug(tmp_path, real):
  write_tree(tmp_path / 'manual' / 'VOC2012', voc_files(real))
  builder = build(tmp_path / 'manual', tmp_path / 'tfds')
  assert sorted(builder.info.splits) == ['train', 'trainval', 'val']


def test_train_aug_ids_reproduce_the_published_list(voc_labels_dir):
  lists = voc_labels_dir / 'lists'
  voc_train = _read_list(lists / 'voc2012_train_1464.txt')
  voc_val = _read_list(lists / 'voc2012_val_1449.txt')
  sbd_only = _read_list(lists / 'sbd_aug_only_9118.txt')
  # SBD's 11,355 images: the SBD-only ones plus 2,237 that VOC also annotates (train or val).
  overlap = (voc_val + voc_train)[:11355 - len(sbd_only)]
  sbd_all = list(np.random.default_rng(0).permutation(sbd_only + overlap))
  sbd_train, sbd_val = sbd_all[:8498], sbd_all[8498:]
  ids = voc.train_aug_ids(voc_train, voc_val, sbd_train, sbd_val)
  assert len(ids) == 10582 == len(set(ids))
  assert set(ids) == set(_read_list(lists / 'train_aug_10582.txt'))
  assert ids[:len(voc_train)] == voc_train
  tampered_val = voc_val[:-1] + voc_val[:1]  # official size, but one val image lost (SBD adds it back)
  with pytest.raises(ValueError, match='expected 10582'):
    voc.train_aug_ids(voc_train, tampered_val, sbd_train, sbd_val)


def _png_bytes(label: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(label.astype(np.uint8), mode='L').save(buffer, format='PNG')
  return buffer.getvalue()


def _rgb_png(label: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(np.stack([label] * 3, axis=-1)).save(buffer, format='PNG')
  return buffer.getvalue()


def _bad_cases(real: dict) -> dict[str, tuple[str, str, bytes | None, str]]:
  """name -> (tree, relpath, replacement bytes or None to delete, expected words in the message)."""
  train_id, sbd_id = VOC_TRAIN[1], SBD_ONLY[0]
  png, label, jpeg = real[train_id]
  out_of_range = label.copy()
  out_of_range[:4, :4] = 30
  return {
      'label_value': ('voc', f'SegmentationClass/{train_id}.png', _png_bytes(out_of_range), r'\[30\]'),
      'size_mismatch': ('voc', f'SegmentationClass/{train_id}.png', _png_bytes(label[:-3]), 'differs'),
      'truncated_image': ('voc', f'JPEGImages/{train_id}.jpg', jpeg[:len(jpeg) // 2], 'truncated'),
      'truncated_label': ('voc', f'SegmentationClass/{train_id}.png', png[:len(png) // 2], 'truncated'),
      'rgb_label': ('voc', f'SegmentationClass/{train_id}.png', _rgb_png(label), 'mode RGB'),
      'bad_mat': ('sbd', f'cls/{sbd_id}.mat', b'MATLAB 5.0 garbage', 'unreadable'),
      'missing_image': ('voc', f'JPEGImages/{train_id}.jpg', None, 'cannot read the image'),
  }


@pytest.mark.parametrize('form', ['archives', 'extracted'])
@pytest.mark.parametrize('case', ['label_value', 'size_mismatch', 'truncated_image', 'truncated_label',
                                  'rgb_label', 'bad_mat', 'missing_image'])
def test_bad_files_stop_the_build_naming_the_file(tmp_path, real, case, form):
  tree, relpath, data, reason = _bad_cases(real)[case]
  files = {'voc': voc_files(real), 'sbd': sbd_files(real)}
  if data is None:
    del files[tree][relpath]
  else:
    files[tree][relpath] = data
  manual_dir = tmp_path / 'manual'
  manual_dir.mkdir()
  if form == 'archives':
    write_tar(manual_dir / voc.VOC_ARCHIVE, 'VOCdevkit/VOC2012/', files['voc'], 'w')
    write_tar(manual_dir / voc.SBD_ARCHIVE, 'benchmark_RELEASE/dataset/', files['sbd'], 'w:gz')
  else:
    write_tree(manual_dir / 'VOCdevkit' / 'VOC2012', files['voc'])
    write_tree(manual_dir / 'benchmark_RELEASE' / 'dataset', files['sbd'])
  with pytest.raises(Exception, match=reason) as error:
    build(manual_dir, tmp_path / 'tfds')
  assert relpath in str(error.value) and 'skip_bad_files' in str(error.value)


def test_skip_bad_files_skips_and_counts(tmp_path, real, caplog):
  files = voc_files(real)
  jpeg = files[f'JPEGImages/{VOC_TRAIN[1]}.jpg']
  files[f'JPEGImages/{VOC_TRAIN[1]}.jpg'] = jpeg[:len(jpeg) // 2]
  write_tree(tmp_path / 'manual' / 'VOCdevkit' / 'VOC2012', files)
  builder = build(tmp_path / 'manual', tmp_path / 'tfds', skip_bad_files=True)
  assert builder.info.splits['train'].num_examples == len(VOC_TRAIN) - 1
  assert builder.info.splits['trainval'].num_examples == len(VOC_TRAIN) + len(VOC_VAL) - 1
  assert 'Split train: skipped 1 ' in caplog.text


@pytest.mark.parametrize('state', ['missing', 'empty'])
def test_prepare_explains_a_missing_manual_dir(tmp_path, state):
  config = default.get_config().data
  config.manual_dir = str(tmp_path / 'voc')
  config.tfds_data_dir = str(tmp_path / 'tfds')
  if state == 'empty':
    (tmp_path / 'voc').mkdir()
  with pytest.raises(FileNotFoundError) as error:
    datasets.prepare(config)
  message = str(error.value)
  assert str(tmp_path / 'voc') in message and voc.VOC_ARCHIVE in message and voc.SBD_ARCHIVE in message
  assert ('does not exist' if state == 'missing' else 'is empty') in message
