"""TFDS builder 'pascal_context': VOC 2010 images with PASCAL Context's 60-class labels.

Stored labels use the 60-class convention (0 = background, i.e. every other of the 459 classes;
1..59 = the 59 classes in alphabetical order), the paper's protocol (background scored).
`to_59_classes` gives the other common 59-class convention (background ignored as 255);
config.data.context_classes picks between them.

Images come from VOC 2010 (`VOCtrainval_03-May-2010.tar` or its extracted VOCdevkit/VOC2010); the
splits are VOC 2010's ImageSets/Main train (4,998) and val (5,105). Labels come from the first of:
  1. the original release `trainval.tar.gz` (cs.stanford.edu/~roozbeh/pascal-context), as
     downloaded or extracted (trainval/<id>.mat, field LabelMap, ids into its 459 labels.txt);
  2. the Detail API's `trainval_merged.json` (COCO-style RLE masks), decoded without the Detail
     package;
  3. mmsegmentation's converted `VOCdevkit/VOC2010/SegmentationClassContext/<id>.png` (0..59).
"""
import collections
import functools
import json
from typing import Callable

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from dunet_jax import storage
from dunet_jax.data import IGNORE_LABEL, archive, examples, rle

NUM_CLASSES = 60
VOC2010_ARCHIVE = 'VOCtrainval_03-May-2010.tar'
VOC2010_PREFIX = 'VOCdevkit/VOC2010/'
VOC2010_FOLDERS = ('VOCdevkit/VOC2010', 'VOC2010')
CONTEXT_ARCHIVE = 'trainval.tar.gz'
CONTEXT_PREFIX = 'trainval/'
CONTEXT_FOLDERS = ('trainval', 'VOCdevkit/VOC2010/context_raw/trainval')
DETAIL_JSON = 'trainval_merged.json'
DETAIL_JSON_FOLDERS = ('.', 'VOCdevkit/VOC2010')
MMSEG_LABEL_FOLDER = 'SegmentationClassContext'
# Ids of the 59 classes in the 459-class labels.txt of the release (and the Detail API's
# category ids), in increasing order, which is also the alphabetical order of their names.
CONTEXT_59_IDS = (
    2, 9, 18, 19, 22, 23, 25, 31, 33, 34, 44, 45, 46, 59, 65, 68, 72, 80, 85, 98, 104, 105, 113,
    115, 144, 158, 159, 162, 187, 189, 207, 220, 232, 258, 259, 260, 284, 295, 296, 308, 324, 326,
    347, 349, 354, 355, 360, 366, 368, 397, 415, 416, 420, 424, 427, 440, 445, 454, 458)
NUM_FULL_CLASSES = 459

MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
Put into manual_dir (config.data.manual_dir):
  {VOC2010_ARCHIVE}  (http://host.robots.ox.ac.uk/pascal/VOC/voc2010/), as downloaded or extracted
                 (manual_dir/VOCdevkit/VOC2010/...);
  and the labels, one of: {CONTEXT_ARCHIVE} (https://cs.stanford.edu/~roozbeh/pascal-context/), as
                 downloaded or extracted (manual_dir/trainval/*.mat); or the Detail API's {DETAIL_JSON};
                 or mmsegmentation's VOCdevkit/VOC2010/{MMSEG_LABEL_FOLDER}/*.png.
"""


def _full_to_60_lookup() -> np.ndarray:
  lookup = np.zeros(NUM_FULL_CLASSES + 1, dtype=np.uint8)
  lookup[list(CONTEXT_59_IDS)] = np.arange(1, 60)
  return lookup


FULL_TO_60 = _full_to_60_lookup()


def full_to_60_classes(label: np.ndarray, name: str) -> np.ndarray:
  """459-class ids (0 = unlabelled) -> 60-class ids (0 = background)."""
  label = np.asarray(label)
  if label.min() < 0 or label.max() > NUM_FULL_CLASSES:
    bad = np.unique(label[(label < 0) | (label > NUM_FULL_CLASSES)])
    raise examples.BadFileError(name, f'label values {bad.tolist()} are outside the 459 classes (0..459)')
  return FULL_TO_60[label]


def context_59_lookup() -> np.ndarray:
  """A 256-entry uint8 table: 0 (background) -> 255, c -> c - 1, 255 -> 255."""
  lookup = (np.arange(256) - 1).astype(np.uint8)
  lookup[0] = IGNORE_LABEL
  lookup[IGNORE_LABEL] = IGNORE_LABEL
  return lookup


def to_59_classes(label: np.ndarray) -> np.ndarray:
  """Stored 60-class labels -> the 59-class convention with background ignored."""
  return context_59_lookup()[np.asarray(label, dtype=np.uint8)]


def _decode_context_mat(data: bytes, name: str) -> np.ndarray:
  return full_to_60_classes(examples.load_mat_field(data, name, None, 'LabelMap'), name)


class FileLabels:
  """One label file per image in a FileTree; `pattern` formats the image id into a path."""

  def __init__(self, tree: archive.FileTree, pattern: str, decode: Callable[[bytes, str], np.ndarray]):
    self.tree, self.pattern, self.decode = tree, pattern, decode

  def describe(self, image_id: str) -> str:
    return self.tree.describe(self.pattern.format(image_id))

  def read(self, image_id: str) -> np.ndarray:
    relpath = self.pattern.format(image_id)
    return self.decode(self.tree.read(relpath), self.tree.describe(relpath))


class DetailLabels:
  """Label maps painted from trainval_merged.json's RLE masks, in annotation order."""

  def __init__(self, path: epath.Path):
    self.path = path
    try:
      data = json.loads(path.read_bytes())
      self.sizes = {self._image_id(image['image_id']): (image['height'], image['width'])
                    for image in data['images']}
      self.annotations = collections.defaultdict(list)
      for annotation in data['annos_segmentation']:
        self.annotations[self._image_id(annotation['image_id'])].append(
            (annotation['category_id'], annotation['segmentation']))
    except (ValueError, KeyError, TypeError) as error:
      raise ValueError(f'{path}: not a Detail API annotation file ({error!r}); download it again') from error

  @staticmethod
  def _image_id(number: int) -> str:
    text = str(number)
    return f'{text[:4]}_{text[4:]}'

  def describe(self, image_id: str) -> str:
    return f'{self.path} (image {image_id})'

  def read(self, image_id: str) -> np.ndarray:
    name = self.describe(image_id)
    if image_id not in self.sizes:
      raise examples.BadFileError(name, 'the image is not in the annotation file')
    label = np.zeros(self.sizes[image_id], dtype=np.int64)
    for category, segmentation in self.annotations[image_id]:
      try:
        mask = rle.decode(segmentation)
      except (ValueError, KeyError, TypeError) as error:
        raise examples.BadFileError(name, f'undecodable mask of category {category} ({error!r})') from error
      if mask.shape != label.shape:
        raise examples.BadFileError(name, f'mask of category {category} is {mask.shape}, image is {label.shape}')
      label[mask] = category
    return full_to_60_classes(label, name)


def open_images(manual_dir: epath.Path) -> archive.FileTree | None:
  """The VOC2010 folder (JPEGImages, ImageSets/Main) as a FileTree."""
  keep = lambda relpath: relpath.startswith(('ImageSets/Main/', 'JPEGImages/'))
  return archive.find_tree(manual_dir, VOC2010_FOLDERS, VOC2010_ARCHIVE, VOC2010_PREFIX,
                           'ImageSets/Main', keep)


def open_labels(manual_dir: epath.Path) -> 'FileLabels | DetailLabels | None':
  """The first label source found, in the order of the module docstring."""
  for folder in CONTEXT_FOLDERS:
    if any((manual_dir / folder).glob('*.mat')):
      return FileLabels(archive.DirectoryTree(manual_dir / folder), '{}.mat', _decode_context_mat)
  if (manual_dir / CONTEXT_ARCHIVE).is_file():
    return FileLabels(archive.TarTree(manual_dir / CONTEXT_ARCHIVE, CONTEXT_PREFIX), '{}.mat',
                      _decode_context_mat)
  for folder in DETAIL_JSON_FOLDERS:
    if (manual_dir / folder / DETAIL_JSON).is_file():
      return DetailLabels(manual_dir / folder / DETAIL_JSON)
  for folder in VOC2010_FOLDERS:
    if (manual_dir / folder / MMSEG_LABEL_FOLDER).is_dir():
      return FileLabels(archive.DirectoryTree(manual_dir / folder / MMSEG_LABEL_FOLDER), '{}.png',
                        examples.decode_label_png)
  return None


class PascalContext(tfds.core.GeneratorBasedBuilder):
  """PASCAL Context (59 classes + background), train 4,998 / val 5,105."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'VOC 2010 images, 60-class labels (0 = background).'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS

  def __init__(self, *, skip_bad_files: bool = False, **kwargs):
    self.skip_bad_files = skip_bad_files
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description='PASCAL Context: labels 0 = background, 1..59 = the 59 most frequent classes.',
        features=examples.features(),
        supervised_keys=('image', 'label'),
        homepage='https://cs.stanford.edu/~roozbeh/pascal-context/',
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    manual_dir = storage.path(dl_manager.manual_dir)
    images = open_images(manual_dir)
    if images is None:
      raise FileNotFoundError(f'{manual_dir}: neither {VOC2010_ARCHIVE} nor an extracted VOCdevkit/VOC2010 '
                              f'folder is there.{MANUAL_DOWNLOAD_INSTRUCTIONS}')
    labels = open_labels(manual_dir)
    if labels is None:
      raise FileNotFoundError(f'{manual_dir}: no PASCAL Context labels found.{MANUAL_DOWNLOAD_INSTRUCTIONS}')
    splits = {}
    for split in ('train', 'val'):
      entries = [examples.Entry(image_id=i, image_name=images.describe(f'JPEGImages/{i}.jpg'),
                                read_image=functools.partial(images.read, f'JPEGImages/{i}.jpg'),
                                label_name=labels.describe(i), read_label=functools.partial(labels.read, i))
                 for i in archive.read_id_list(images, f'ImageSets/Main/{split}.txt')]
      splits[split] = self._generate_examples(entries, split)
    return splits

  def _generate_examples(self, entries: list[examples.Entry], split: str):
    return examples.generate(entries, NUM_CLASSES, self.skip_bad_files, split)
