"""The pascal_context builder on miniature official archives, for each label source it reads.

Context label maps are made from real VOC label maps: each VOC class becomes its PASCAL Context
counterpart's id in the 459-class labels.txt, background is split between a kept class (sky) and a
dropped one (accordion). The expected 60-class maps are derived through class *names*, not ids.
"""
import io
import json
import pathlib

import numpy as np
import pytest
import scipy.io
import tensorflow_datasets as tfds
from PIL import Image

from dunet_jax.data import palette, pascal_context, rle
from helpers import write_tar, write_tree

TRAIN = ['2007_000032', '2007_000039', '2007_000063', '2008_000002', '2008_000003']
VAL = ['2007_000033', '2007_000042', '2007_000061']
# Ids of these names in the release's 459-class labels.txt.
FULL_IDS = {'aeroplane': 2, 'bicycle': 23, 'bird': 25, 'boat': 31, 'bottle': 34, 'bus': 45, 'car': 59,
            'cat': 65, 'chair': 72, 'cow': 98, 'table': 397, 'dog': 113, 'horse': 207,
            'motorbike': 258, 'person': 284, 'pottedplant': 308, 'sheep': 347, 'sofa': 368,
            'train': 416, 'tvmonitor': 427, 'sky': 360, 'accordion': 1}
VOC_TO_CONTEXT_NAME = {name: ('table' if name == 'diningtable' else name) for name in palette.VOC_CLASS_NAMES}


def context_maps(voc_label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(459-class LabelMap uint16, expected 60-class map) from a VOC class-id map."""
  full = np.zeros(voc_label.shape, np.uint16)
  expected = np.zeros(voc_label.shape, np.uint8)
  top = np.arange(voc_label.shape[0])[:, None] < voc_label.shape[0] // 3
  for voc_id, voc_name in enumerate(palette.VOC_CLASS_NAMES):
    pixels = voc_label == voc_id
    if voc_id == 0:
      for region, name in ((pixels & top, 'sky'), (pixels & ~top, 'accordion')):
        full[region] = FULL_IDS[name]
        expected[region] = palette.CONTEXT_60_CLASS_NAMES.index(name) if name != 'accordion' else 0
    else:
      name = VOC_TO_CONTEXT_NAME[voc_name]
      full[pixels] = FULL_IDS[name]
      expected[pixels] = palette.CONTEXT_60_CLASS_NAMES.index(name)
  full[voc_label == 255] = FULL_IDS['accordion']  # VOC's void band: an unlisted class here
  return full, expected


@pytest.fixture(scope='module')
def real(voc_labels_dir) -> dict:
  """{id: (jpeg bytes, 459-class map, expected 60-class map)}."""
  found = {}
  for index, image_id in enumerate(TRAIN + VAL):
    voc_label = np.asarray(Image.open(voc_labels_dir / 'SegmentationClass' / f'{image_id}.png'))
    jpeg_path = voc_labels_dir / 'JPEGImages' / f'{image_id}.jpg'
    if jpeg_path.exists():
      jpeg = jpeg_path.read_bytes()
    else:
      pixels = np.random.default_rng(index).integers(0, 256, (*voc_label.shape, 3), dtype=np.uint8)
      buffer = io.BytesIO()
      Image.fromarray(pixels).save(buffer, format='JPEG')
      jpeg = buffer.getvalue()
    found[image_id] = (jpeg, *context_maps(voc_label))
  return found


def voc2010_files(real: dict) -> dict[str, bytes]:
  files = {f'JPEGImages/{i}.jpg': real[i][0] for i in TRAIN + VAL}
  files['ImageSets/Main/train.txt'] = ''.join(f'{i}\n' for i in TRAIN).encode()
  files['ImageSets/Main/val.txt'] = ''.join(f'{i}\n' for i in VAL).encode()
  files['ImageSets/Main/trainval.txt'] = ''.join(f'{i}\n' for i in TRAIN + VAL).encode()
  files['ImageSets/Segmentation/train.txt'] = f'{TRAIN[0]}\n'.encode()  # VOC's own, unused here
  return files


def mat_bytes(label_map: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  scipy.io.savemat(buffer, {'LabelMap': label_map})
  return buffer.getvalue()


def rle_encode(mask: np.ndarray, compressed: bool) -> dict:
  """COCO RLE of a bool mask, written from the format's description (column-major runs)."""
  flat = mask.T.ravel().astype(np.int8)
  changes = np.flatnonzero(np.diff(flat)) + 1
  bounds = np.concatenate([[0], changes, [flat.size]])
  runs = list(np.diff(bounds))
  if flat[0] == 1:
    runs = [0] + runs
  runs = [int(r) for r in runs]
  if not compressed:
    return {'size': list(mask.shape), 'counts': runs}
  chars = []
  for index, run in enumerate(runs):
    value = run - runs[index - 2] if index > 2 else run
    more = True
    while more:
      group = value & 0x1F
      value >>= 5
      more = not ((value == 0 and not group & 0x10) or (value == -1 and group & 0x10))
      chars.append(chr(group + (0x20 if more else 0) + 48))
  return {'size': list(mask.shape), 'counts': ''.join(chars)}


def detail_json(real: dict) -> bytes:
  images, annotations = [], []
  for image_id in TRAIN + VAL:
    full = real[image_id][1]
    number = int(image_id.replace('_', ''))
    images.append({'image_id': number, 'file_name': f'{image_id}.jpg', 'height': full.shape[0],
                   'width': full.shape[1], 'phase': 'train' if image_id in TRAIN else 'val'})
    for order, category in enumerate(np.unique(full)):
      annotations.append({'id': len(annotations) + 1, 'image_id': number, 'category_id': int(category),
                          'segmentation': rle_encode(full == category, compressed=order % 2 == 0)})
  return json.dumps({'images': images, 'annos_segmentation': annotations,
                     'categories': [{'category_id': i, 'name': n} for n, i in FULL_IDS.items()]}).encode()


def make_manual_dir(root: pathlib.Path, real: dict, source: str) -> pathlib.Path:
  mats = {f'{i}.mat': mat_bytes(real[i][1]) for i in TRAIN + VAL}
  root.mkdir(parents=True)
  if source == 'release_archives':
    write_tar(root / pascal_context.VOC2010_ARCHIVE, 'VOCdevkit/VOC2010/', voc2010_files(real), 'w')
    write_tar(root / pascal_context.CONTEXT_ARCHIVE, 'trainval/', mats, 'w:gz')
  else:
    write_tree(root / 'VOCdevkit' / 'VOC2010', voc2010_files(real))
  if source == 'release_extracted':
    write_tree(root / 'trainval', mats)
  elif source == 'detail_json':
    (root / pascal_context.DETAIL_JSON).write_bytes(detail_json(real))
  elif source == 'mmseg_png':
    pngs = {}
    for image_id in TRAIN + VAL:
      buffer = io.BytesIO()
      Image.fromarray(real[image_id][2]).save(buffer, format='PNG')
      pngs[f'{image_id}.png'] = buffer.getvalue()
    write_tree(root / 'VOCdevkit' / 'VOC2010' / pascal_context.MMSEG_LABEL_FOLDER, pngs)
  return root


def build(manual_dir: pathlib.Path, data_dir: pathlib.Path) -> tfds.core.DatasetBuilder:
  builder = pascal_context.PascalContext(data_dir=str(data_dir))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=str(manual_dir), try_download_gcs=False))
  return builder


@pytest.mark.parametrize('source', ['release_archives', 'release_extracted', 'detail_json', 'mmseg_png'])
def test_builds_each_label_source(tmp_path, real, source):
  builder = build(make_manual_dir(tmp_path / 'manual', real, source), tmp_path / 'tfds')
  assert {s: i.num_examples for s, i in builder.info.splits.items()} == {'train': 5, 'val': 3}
  for split, ids in (('train', TRAIN), ('val', VAL)):
    dataset = builder.as_dataset(split=split, decoders={'image': tfds.decode.SkipDecoding()})
    found = {example['id'].decode(): example for example in tfds.as_numpy(dataset)}
    assert sorted(found) == sorted(ids)
    for image_id, example in found.items():
      jpeg, _, expected = real[image_id]
      assert example['image'] == jpeg
      np.testing.assert_array_equal(example['label'][..., 0], expected, err_msg=image_id)


def test_59_class_convention(real):
  expected = real[TRAIN[0]][2]
  converted = pascal_context.to_59_classes(expected)
  names = np.array(palette.CONTEXT_60_CLASS_NAMES)
  assert (converted[expected == 0] == 255).all()
  kept = expected != 0
  np.testing.assert_array_equal(np.array(palette.CONTEXT_59_CLASS_NAMES)[converted[kept]], names[expected[kept]])
  assert pascal_context.to_59_classes(np.array([255]))[0] == 255


def test_59_ids_name_the_59_classes_in_order():
  assert len(pascal_context.CONTEXT_59_IDS) == 59 == len(set(pascal_context.CONTEXT_59_IDS))
  for name, full_id in FULL_IDS.items():
    if name in palette.CONTEXT_59_CLASS_NAMES:
      assert pascal_context.CONTEXT_59_IDS[palette.CONTEXT_59_CLASS_NAMES.index(name)] == full_id, name
  assert list(palette.CONTEXT_59_CLASS_NAMES) == sorted(palette.CONTEXT_59_CLASS_NAMES)


def test_rle_decode_hand_computed_and_real_masks(voc_labels_dir):
  # 2x3 mask, column-major runs [3, 2, 1]: columns (0,0), (0,1), (1,0).
  np.testing.assert_array_equal(rle.decode({'size': [2, 3], 'counts': '321'}), [[0, 0, 1], [0, 1, 0]])
  # Runs [1, 3, 2, 1]: the fourth is stored as 1 - 3 = -2, one 5-bit group 30 with the sign bit.
  assert rle.decode_counts('132N') == [1, 3, 2, 1]
  label = np.asarray(Image.open(voc_labels_dir / 'SegmentationClass' / '2007_000032.png'))
  for value in np.unique(label):
    mask = label == value
    np.testing.assert_array_equal(rle.decode(rle_encode(mask, compressed=True)), mask)
    np.testing.assert_array_equal(rle.decode(rle_encode(mask, compressed=False)), mask)


@pytest.mark.parametrize('case', ['mat_value', 'json_mask_size', 'missing_labels', 'truncated_mat'])
def test_bad_inputs_name_the_file(tmp_path, real, case):
  source = 'detail_json' if case == 'json_mask_size' else 'release_extracted'
  manual_dir = make_manual_dir(tmp_path / 'manual', real, source)
  bad_id = VAL[1]
  if case == 'mat_value':
    bad = real[bad_id][1].copy()
    bad[0, 0] = 500
    (manual_dir / 'trainval' / f'{bad_id}.mat').write_bytes(mat_bytes(bad))
    expected, reason = f'{bad_id}.mat', r'\[500\]'
  elif case == 'truncated_mat':
    path = manual_dir / 'trainval' / f'{bad_id}.mat'
    path.write_bytes(path.read_bytes()[:100])
    expected, reason = f'{bad_id}.mat', 'unreadable'
  elif case == 'json_mask_size':
    data = json.loads((manual_dir / pascal_context.DETAIL_JSON).read_text())
    number = int(bad_id.replace('_', ''))
    annotation = next(a for a in data['annos_segmentation'] if a['image_id'] == number)
    annotation['segmentation'] = rle_encode(np.zeros((3, 4), bool), compressed=True)
    (manual_dir / pascal_context.DETAIL_JSON).write_text(json.dumps(data))
    expected, reason = f'{pascal_context.DETAIL_JSON} (image {bad_id})', 'mask of category'
  else:
    for path in (manual_dir / 'trainval').iterdir():
      path.unlink()
    expected, reason = str(manual_dir), 'no PASCAL Context labels'
  with pytest.raises(Exception, match=reason) as error:
    build(manual_dir, tmp_path / 'tfds')
  assert expected in str(error.value)


def test_context_config_defaults_to_60_classes_with_background_scored():
  from configs import context
  from dunet_jax.data import datasets
  data = context.get_config().data
  assert (data.dataset, data.context_classes, data.num_classes) == ('pascal_context', 60, 60)
  names = datasets.class_names(data)
  assert len(names) == 60 and names[0] == 'background'
  assert datasets.label_lookup(data) is None  # stored labels (0 = background) are scored as they are
  data.context_classes = data.num_classes = 59  # the documented option
  assert datasets.label_lookup(data)[0] == 255 and len(datasets.class_names(data)) == 59
