"""VOC-shaped data on real VOC geometry: painted JPEGs for real label maps in the official archives.

The reference for every label is the real PNG in ../shared/data/voc2012_labels, decoded with PIL;
the split arithmetic is checked against the published train_aug list.
"""
import colorsys
import hashlib

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from configs import voc_geometry as voc_geometry_config
from dunet_jax.data import datasets, synthetic, voc, voc_geometry

MAPS = voc_geometry_config.TEST_MAPS


@pytest.fixture(scope='module')
def built(voc_labels_dir, tmp_path_factory):
  """(builder, layout, manual_dir) of the ':test' config (24 real maps) prepared in a temp dir."""
  root = tmp_path_factory.mktemp('voc_geometry')
  config = voc_geometry_config.get_config('test')
  config.data.update(geometry_labels_dir=str(voc_labels_dir), manual_dir=str(root / 'manual'),
                     tfds_data_dir=str(root / 'tfds'))
  builder = datasets.prepare(config.data)
  return builder, voc_geometry.layout(voc_labels_dir, MAPS), root / 'manual'


def _real_label(labels_dir, image_id: str) -> np.ndarray:
  with Image.open(labels_dir / 'SegmentationClass' / f'{image_id}.png') as image:
    assert image.mode == 'P'
    return np.asarray(image)


def test_the_builder_reads_back_exactly_the_real_label_maps(built, voc_labels_dir):
  builder, plan, _ = built
  expected = {'train': list(plan.voc_train), 'val': list(plan.voc_val),
              'trainval': list(plan.voc_train + plan.voc_val),
              'train_aug': list(plan.voc_train) + sorted(plan.sbd_only)}
  assert {name: info.num_examples for name, info in builder.info.splits.items()} == {
      name: len(ids) for name, ids in expected.items()}
  assert len(expected['train_aug']) >= 20 and plan.sbd_train and plan.sbd_val
  for split, ids in expected.items():
    examples = list(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)))
    assert sorted(example['id'].decode() for example in examples) == sorted(ids)
    for example in examples:
      real = _real_label(voc_labels_dir, example['id'].decode())
      np.testing.assert_array_equal(example['label'][..., 0], real, err_msg=example['id'])
      assert example['image'].shape == (*real.shape, 3)
  # SBD-only maps came from cls/*.mat (no void band), VOC's from its PNGs (with the band).
  train_aug = {e['id'].decode(): e['label'] for e in tfds.as_numpy(builder.as_dataset(split='train_aug'))}
  assert all(255 not in train_aug[i] for i in plan.sbd_only)
  assert any(255 in train_aug[i] for i in plan.voc_train)


def test_archives_are_a_pure_function_of_seed_and_maps(built, voc_labels_dir, tmp_path):
  _, _, manual_dir = built
  voc_geometry.generate(voc_labels_dir, tmp_path, maps=MAPS, seed=0)
  for name in (voc.VOC_ARCHIVE, voc.SBD_ARCHIVE):
    digests = {hashlib.sha256((folder / name).read_bytes()).hexdigest() for folder in (manual_dir, tmp_path)}
    assert len(digests) == 1, f'{name} differs between two generations'
  assert voc_geometry.is_generated(tmp_path, MAPS, 0) and not voc_geometry.is_generated(tmp_path, MAPS, 1)
  other_seed = voc_geometry.generate(voc_labels_dir, tmp_path / 'other', maps=MAPS, seed=1)
  assert (tmp_path / 'other' / voc.VOC_ARCHIVE).read_bytes() != (manual_dir / voc.VOC_ARCHIVE).read_bytes()
  assert other_seed.image_ids == voc_geometry.layout(voc_labels_dir, MAPS).image_ids


def test_full_layout_is_the_official_one(voc_labels_dir):
  plan = voc_geometry.layout(voc_labels_dir)
  sizes = {'VOC train': len(plan.voc_train), 'VOC val': len(plan.voc_val),
           'SBD train': len(plan.sbd_train), 'SBD val': len(plan.sbd_val)}
  assert sizes == voc.OFFICIAL_LIST_SIZES and len(plan.image_ids) == 12031
  ids = voc.train_aug_ids(list(plan.voc_train), list(plan.voc_val), list(plan.sbd_train),
                          list(plan.sbd_val))
  published = (voc_labels_dir / 'lists' / 'train_aug_10582.txt').read_text().split()
  assert len(ids) == 10582 and set(ids) == set(published)
  assert not set(plan.voc_val) & set(ids)
  assert set(plan.sbd_train + plan.sbd_val) - set(plan.sbd_only) <= set(plan.voc_train + plan.voc_val)


def _hue(pixels: np.ndarray) -> np.ndarray:
  return np.array([colorsys.rgb_to_hsv(*(p / 255))[0] for p in pixels])


def test_a_pixel_colour_does_not_tell_the_two_classes_of_a_family_apart():
  """Classes c and c + 10 share a hue family (synthetic's) and differ only in their texture."""
  label = np.zeros((60, 120), np.uint8)
  label[10:50, 5:55], label[10:50, 65:115] = 1, 11
  label[:, 58:62] = 255
  family_hue = synthetic.COLOUR_FAMILY_HUES[voc_geometry.CLASS_FAMILIES[1]]
  assert voc_geometry.CLASS_FAMILIES[11] == voc_geometry.CLASS_FAMILIES[1]
  means, spreads = {1: [], 11: []}, {1: [], 11: []}
  for seed in range(8):
    image = voc_geometry.render_image(label, np.random.default_rng(seed)).astype(np.float32)
    for class_id in means:
      inner = np.zeros_like(label, bool)
      inner[14:46] = True
      pixels = image[(label == class_id) & inner & (np.abs(np.arange(120) - 60) > 8)]
      means[class_id].append(pixels.mean(0))
      spreads[class_id].append(pixels.std(0).mean())
  for class_id in means:
    hues = _hue(np.array(means[class_id]))
    assert np.all(np.minimum(np.abs(hues - family_hue), 1 - np.abs(hues - family_hue)) < 0.06)
    assert np.mean(spreads[class_id]) > 2 * voc_geometry.NOISE_STD  # textured, not flat colour
  # Per-image mean colours of the two classes overlap: no colour threshold separates them.
  first, second = np.array(means[1]), np.array(means[11])
  separating = [axis for axis in range(3)
                if first[:, axis].max() < second[:, axis].min() or second[:, axis].max() < first[:, axis].min()]
  assert not separating
