"""The built-in dataset: VOC 2012 layout, VOC palette, void bands, varied sizes, determinism."""
import colorsys
import pathlib

import numpy as np
import pytest
from PIL import Image

from configs import default
from dunet_jax.data import datasets, synthetic

# Published VOC colours (devkit's VOClabelcolormap) for a few indices, and void.
VOC_COLOURS = {0: (0, 0, 0), 1: (128, 0, 0), 2: (0, 128, 0), 3: (128, 128, 0), 4: (0, 0, 128),
               8: (64, 0, 0), 15: (192, 128, 128), 20: (0, 64, 128), 255: (224, 224, 192)}


@pytest.fixture(scope='module')
def generated(tmp_path_factory) -> pathlib.Path:
  return synthetic.generate(tmp_path_factory.mktemp('synthetic'), num_train=40, num_val=12, seed=3)


def _ids(voc_dir: pathlib.Path, split: str) -> list[str]:
  return (voc_dir / 'ImageSets' / 'Segmentation' / f'{split}.txt').read_text().split()


def _label(voc_dir: pathlib.Path, image_id: str) -> np.ndarray:
  return np.asarray(Image.open(voc_dir / 'SegmentationClass' / f'{image_id}.png'))


def test_voc_layout_and_lists(generated):
  assert generated.parts[-2:] == ('VOCdevkit', 'VOC2012')
  train, val = _ids(generated, 'train'), _ids(generated, 'val')
  assert len(train) == 40 and len(val) == 12 and not set(train) & set(val)
  assert _ids(generated, 'trainval') == train + val
  for image_id in train + val:
    assert (generated / 'JPEGImages' / f'{image_id}.jpg').is_file()
    assert (generated / 'SegmentationClass' / f'{image_id}.png').is_file()


def test_palette_pngs_match_the_voc_colours(generated, voc_labels_dir):
  real_palette = Image.open(voc_labels_dir / 'SegmentationClass' / '2007_000032.png').getpalette()
  for image_id in _ids(generated, 'val'):
    png = Image.open(generated / 'SegmentationClass' / f'{image_id}.png')
    assert png.mode == 'P'
    assert png.getpalette() == real_palette
  colours = np.array(png.getpalette()).reshape(-1, 3)
  for index, colour in VOC_COLOURS.items():
    assert tuple(colours[index]) == colour


def test_images_and_labels_line_up_with_varied_non_square_sizes(generated):
  sizes = set()
  for image_id in _ids(generated, 'trainval'):
    with Image.open(generated / 'JPEGImages' / f'{image_id}.jpg') as image:
      assert image.format == 'JPEG' and image.mode == 'RGB'
      size = (image.height, image.width)
    assert _label(generated, image_id).shape == size
    assert size[0] != size[1]
    assert synthetic.MIN_SIDE <= min(size) and max(size) <= synthetic.MAX_SIDE
    sizes.add(size)
  assert len(sizes) > 30


def test_void_band_separates_every_region(generated):
  """No two different classes touch (4- or 8-neighbours): a 255 band always lies between them."""
  seen = set()
  for image_id in _ids(generated, 'trainval'):
    label = _label(generated, image_id)
    values = set(np.unique(label).tolist())
    assert values <= set(range(21)) | {255}
    seen |= values
    assert 255 in values
    for a, b in ((label[1:], label[:-1]), (label[:, 1:], label[:, :-1]),
                 (label[1:, 1:], label[:-1, :-1]), (label[1:, :-1], label[:-1, 1:])):
      touching = (a != b) & (a != 255) & (b != 255)
      assert not touching.any(), image_id
  assert seen == set(range(21)) | {255}


def test_objects_are_mostly_learnable_sizes(generated):
  """Most objects' visible extents fall in 15..70 px; bars are thin (void band included)."""
  extents = []
  for image_id in _ids(generated, 'train'):
    label = _label(generated, image_id)
    for class_id in set(np.unique(label).tolist()) - {0, 255}:
      rows, cols = np.nonzero(label == class_id)
      extents.append(max(np.ptp(rows), np.ptp(cols)) + 1)
  extents = np.array(extents)
  assert np.mean((extents >= 15) & (extents <= 70)) > 0.7


def test_colour_family_narrows_a_class_to_two_shapes(generated):
  """An object's mean hue (HSV, read back from the JPEG) is nearest its family's; families hold two."""
  families = {}
  for class_id, family in synthetic.FAMILY_OF_CLASS.items():
    families.setdefault(family, []).append(class_id)
  assert sorted(len(classes) for classes in families.values()) == [2] * 10
  hits, checked = 0, 0
  family_hues = np.array(synthetic.COLOUR_FAMILY_HUES)
  for image_id in _ids(generated, 'train'):
    label = _label(generated, image_id)
    image = np.asarray(Image.open(generated / 'JPEGImages' / f'{image_id}.jpg'), np.float64) / 255
    for class_id in set(np.unique(label).tolist()) - {0, 255}:
      pixels = image[label == class_id]
      hues = np.array([colorsys.rgb_to_hsv(*pixel)[0] for pixel in pixels[::7]])
      angle = np.angle(np.mean(np.exp(2j * np.pi * hues))) / (2 * np.pi) % 1.0
      distance = np.abs(angle - family_hues)
      nearest = np.argmin(np.minimum(distance, 1 - distance))
      hits += nearest == synthetic.FAMILY_OF_CLASS[class_id]
      checked += 1
  assert checked > 40 and hits / checked > 0.95


def test_deterministic_and_splits_independent(tmp_path, generated):
  again = synthetic.generate(tmp_path / 'again', num_train=5, num_val=12, seed=3)
  for image_id in _ids(again, 'train') + _ids(again, 'val'):
    for folder, suffix in (('JPEGImages', 'jpg'), ('SegmentationClass', 'png')):
      assert (again / folder / f'{image_id}.{suffix}').read_bytes() == \
          (generated / folder / f'{image_id}.{suffix}').read_bytes()
  other = synthetic.generate(tmp_path / 'other', num_train=5, num_val=1, seed=4)
  assert not np.array_equal(_label(other, 'train_000000'), _label(generated, 'train_000000'))
  assert synthetic.is_generated(tmp_path / 'other', 5, 1, 4)
  assert not synthetic.is_generated(tmp_path / 'other', 6, 1, 4)


def test_prepare_generates_builds_and_follows_size_changes(tmp_path):
  config = default.get_config().data
  config.synthetic, config.train_split = True, 'train'
  config.manual_dir, config.tfds_data_dir = str(tmp_path / 'manual'), str(tmp_path / 'tfds')
  config.synthetic_num_train, config.synthetic_num_val = 6, 3
  builder = datasets.prepare(config)
  assert builder.info.full_name == 'voc_segmentation/synthetic/1.0.0'
  assert {s: i.num_examples for s, i in builder.info.splits.items()} == {'train': 6, 'val': 3, 'trainval': 9}
  assert datasets.class_names(config) == synthetic.CLASS_NAMES
  config.synthetic_num_train = 8
  assert datasets.prepare(config).info.splits['train'].num_examples == 8
  config.num_classes = 20
  with pytest.raises(ValueError, match='config.data.num_classes=20'):
    datasets.prepare(config)
