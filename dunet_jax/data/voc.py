"""TFDS builder 'voc_segmentation': PASCAL VOC 2012 segmentation plus SBD's train_aug.

TFDS's own `voc` has no masks, so this reads the archives users download by hand, exactly as
they unpack (or without unpacking them). The built-in synthetic data is written in the same
layout and read by this same builder (config 'synthetic'), so real and built-in data share one
code path.
"""
import functools

import tensorflow_datasets as tfds
from etils import epath

from dunet_jax import storage
from dunet_jax.data import archive, examples

NUM_CLASSES = 21
VOC_ARCHIVE = 'VOCtrainval_11-May-2012.tar'
VOC_PREFIX = 'VOCdevkit/VOC2012/'
VOC_FOLDERS = ('VOCdevkit/VOC2012', 'VOC2012')
SBD_ARCHIVE = 'benchmark.tgz'
SBD_PREFIX = 'benchmark_RELEASE/dataset/'
SBD_FOLDERS = ('benchmark_RELEASE/dataset',)
# Sizes of the official lists; when the inputs have exactly these, train_aug must have 10,582.
OFFICIAL_LIST_SIZES = {'VOC train': 1464, 'VOC val': 1449, 'SBD train': 8498, 'SBD val': 2857}
OFFICIAL_TRAIN_AUG_SIZE = 10582

MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
Put into manual_dir (config.data.manual_dir):
  {VOC_ARCHIVE}  (http://host.robots.ox.ac.uk/pascal/VOC/voc2012/), as downloaded or extracted
                 (manual_dir/VOCdevkit/VOC2012/...);
  optionally {SBD_ARCHIVE} (SBD, http://home.bharathh.info/pubs/codes/SBD/download.html), as downloaded
                 or extracted (manual_dir/benchmark_RELEASE/dataset/...), for the train_aug split.
"""


def open_voc(manual_dir: epath.Path) -> archive.FileTree | None:
  """The VOC2012 folder (JPEGImages, SegmentationClass, ImageSets) as a FileTree."""
  keep = lambda relpath: relpath.startswith(('ImageSets/Segmentation/', 'SegmentationClass/', 'JPEGImages/'))
  return archive.find_tree(manual_dir, VOC_FOLDERS, VOC_ARCHIVE, VOC_PREFIX,
                           'ImageSets/Segmentation', keep)


def open_sbd(manual_dir: epath.Path) -> archive.FileTree | None:
  """SBD's dataset folder (cls/*.mat, train.txt, val.txt) as a FileTree."""
  keep = lambda relpath: relpath in ('train.txt', 'val.txt') or relpath.startswith('cls/')
  return archive.find_tree(manual_dir, SBD_FOLDERS, SBD_ARCHIVE, SBD_PREFIX, 'cls', keep)


def train_aug_ids(voc_train: list[str], voc_val: list[str], sbd_train: list[str],
                  sbd_val: list[str]) -> list[str]:
  """VOC train + SBD train + SBD val - VOC val, without repeats: VOC train first, then sorted SBD."""
  excluded = set(voc_val) | set(voc_train)
  sbd_only = sorted(set(sbd_train + sbd_val) - excluded)
  ids = list(dict.fromkeys(voc_train)) + sbd_only
  sizes = {'VOC train': len(voc_train), 'VOC val': len(voc_val), 'SBD train': len(sbd_train),
           'SBD val': len(sbd_val)}
  if sizes == OFFICIAL_LIST_SIZES and len(ids) != OFFICIAL_TRAIN_AUG_SIZE:
    raise ValueError(f'train_aug has {len(ids)} images, expected {OFFICIAL_TRAIN_AUG_SIZE} from the '
                     f'official lists {sizes}: the VOC or SBD lists were modified; download them again')
  return ids


def _read_png_label(tree: archive.FileTree, relpath: str):
  return examples.decode_label_png(tree.read(relpath), tree.describe(relpath))


def _read_sbd_label(tree: archive.FileTree, relpath: str):
  return examples.load_mat_field(tree.read(relpath), tree.describe(relpath), 'GTcls', 'Segmentation')


def voc_entry(voc: archive.FileTree, image_id: str, sbd: archive.FileTree | None = None) -> examples.Entry:
  """The VOC JPEG with VOC's own PNG label when there is one, else SBD's .mat label."""
  image_path = f'JPEGImages/{image_id}.jpg'
  png_path = f'SegmentationClass/{image_id}.png'
  if sbd is None or voc.exists(png_path):
    label_name, read_label = voc.describe(png_path), functools.partial(_read_png_label, voc, png_path)
  else:
    mat_path = f'cls/{image_id}.mat'
    label_name, read_label = sbd.describe(mat_path), functools.partial(_read_sbd_label, sbd, mat_path)
  return examples.Entry(image_id=image_id, image_name=voc.describe(image_path),
                        read_image=functools.partial(voc.read, image_path),
                        label_name=label_name, read_label=read_label)


class VocSegmentation(tfds.core.GeneratorBasedBuilder):
  """PASCAL VOC 2012 segmentation: train, val, trainval, and train_aug when SBD is present."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'VOC 2012 segmentation with SBD train_aug; built-in synthetic config.'}
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name='voc2012', description='PASCAL VOC 2012 (+ SBD train_aug).'),
      tfds.core.BuilderConfig(name='synthetic',
                              description='The built-in data written by dunet_jax.data.synthetic.'),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS

  def __init__(self, *, skip_bad_files: bool = False, **kwargs):
    self.skip_bad_files = skip_bad_files
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=self.builder_config.description,
        features=examples.features(),
        supervised_keys=('image', 'label'),
        homepage='http://host.robots.ox.ac.uk/pascal/VOC/voc2012/',
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    manual_dir = storage.path(dl_manager.manual_dir)
    voc = open_voc(manual_dir)
    if voc is None:
      raise FileNotFoundError(f'{manual_dir}: neither {VOC_ARCHIVE} nor an extracted VOCdevkit/VOC2012 '
                              f'folder is there.{MANUAL_DOWNLOAD_INSTRUCTIONS}')
    lists = {split: archive.read_id_list(voc, f'ImageSets/Segmentation/{split}.txt')
             for split in ('train', 'val')}
    trainval_list = 'ImageSets/Segmentation/trainval.txt'
    lists['trainval'] = (archive.read_id_list(voc, trainval_list) if voc.exists(trainval_list)
                         else lists['train'] + lists['val'])
    splits = {split: self._generate_examples([voc_entry(voc, i) for i in ids], split)
              for split, ids in lists.items()}
    sbd = open_sbd(manual_dir)
    if sbd is not None:
      ids = train_aug_ids(lists['train'], lists['val'], archive.read_id_list(sbd, 'train.txt'),
                          archive.read_id_list(sbd, 'val.txt'))
      splits['train_aug'] = self._generate_examples([voc_entry(voc, i, sbd) for i in ids], 'train_aug')
    return splits

  def _generate_examples(self, entries: list[examples.Entry], split: str):
    return examples.generate(entries, NUM_CLASSES, self.skip_bad_files, split)
