"""VOC-shaped data on real VOC geometry: one painted JPEG per real VOC / SBD label map.

VOC's photographs cannot be shipped, but the real label maps (ground truth of VOC 2012 train and
val and of SBD, 12,031 in all) fix what matters for scale and for the decoder: the real image sizes
and the real object shapes. `generate` paints one JPEG per real label map at its real size and
writes the two archives users download by hand, `VOCtrainval_11-May-2012.tar` and SBD's
`benchmark.tgz`, laid out as the official ones (VOCdevkit/VOC2012/{JPEGImages, SegmentationClass,
ImageSets/Segmentation}; benchmark_RELEASE/dataset/{cls/*.mat, train.txt, val.txt}), so that the
real voc_segmentation builder builds them unchanged: its file checks, and its train_aug arithmetic
(10,582 images asserted when the lists have the official sizes). SBD's img/ and inst/ folders are
not written (the builder never reads them).

Painting: the background is `synthetic.background` (a smooth greyish field, a faint texture,
clutter of every hue); class c fills its pixels with texture CLASS_TEXTURES[c] mixing two colours of
colour family CLASS_FAMILIES[c] (synthetic's ten hue families, each shared by two classes with
different textures); colours, texture period and angle are drawn per image and class. Void pixels
keep the background, a band around every boundary is blurred, and the image gets Gaussian noise.
Colour narrows a class to two and its texture decides, so the task is learnable, but not a lookup of
a pixel's colour. Everything is a pure function of (seed, image id).

  python -m dunet_jax.data.voc_geometry --labels_dir=../shared/data/voc2012_labels \\
      --manual_dir=/tmp/dunet_jax_data/voc_geometry/manual [--maps=N] [--workers=K]
"""
from dunet_jax import cli  # first: prepares the process before TensorFlow and jax load

import dataclasses
import gzip
import hashlib
import io
import json
import multiprocessing
import os
import tarfile
from collections.abc import Iterator
from typing import BinaryIO

import numpy as np
import scipy.io
import scipy.ndimage
import scipy.sparse
from absl import flags
from etils import epath
from PIL import Image, ImageFilter

from dunet_jax.data import IGNORE_LABEL, label_files, synthetic, voc

NUM_OBJECT_CLASSES = voc.NUM_CLASSES - 1
# Class c = 1..20: colour family (c - 1) % 10 and texture 'stripes' for c <= 10, 'checks' after.
CLASS_FAMILIES = {c: (c - 1) % 10 for c in range(1, voc.NUM_CLASSES)}
CLASS_TEXTURES = {c: ('stripes', 'checks')[(c - 1) // 10] for c in range(1, voc.NUM_CLASSES)}
BOUNDARY_BLUR_RADIUS = 1.5     # Gaussian blur (pixels) inside the band around class boundaries
BOUNDARY_BAND = 2              # band half-width in pixels
NOISE_STD = 4.0
JPEG_QUALITY = 90
# The published lists in <labels_dir>/lists and the official SBD list sizes.
VOC_TRAIN_LIST = 'voc2012_train_1464.txt'
VOC_VAL_LIST = 'voc2012_val_1449.txt'
SBD_ONLY_LIST = 'sbd_aug_only_9118.txt'
SBD_SIZES = {'train': voc.OFFICIAL_LIST_SIZES['SBD train'], 'val': voc.OFFICIAL_LIST_SIZES['SBD val']}
MARKER_FILE = 'voc_geometry.json'   # written last: its presence means both archives are complete
GENERATOR_VERSION = 1               # bump when the painting changes, so that old archives are redone
_ARCHIVE_MTIME = 1305072000         # 2011-05-11, VOC 2012's release: archives are byte-reproducible
_MAT_HEADER = b'MATLAB 5.0 MAT-file, written by dunet_jax.data.voc_geometry'.ljust(116)
_IMAGES_PER_WORKER_START = 100      # starting a painting process costs about this many images


@dataclasses.dataclass(frozen=True)
class Layout:
  """Which real label maps go where: VOC's lists, SBD's lists and the SBD-only maps."""
  voc_train: tuple[str, ...]
  voc_val: tuple[str, ...]
  sbd_only: tuple[str, ...]     # labelled only by SBD: their labels go into cls/*.mat
  sbd_train: tuple[str, ...]
  sbd_val: tuple[str, ...]

  @property
  def image_ids(self) -> list[str]:
    """Every image of VOC2012/JPEGImages (VOC's own and SBD's), sorted."""
    return sorted(set(self.voc_train) | set(self.voc_val) | set(self.sbd_only))


def layout(labels_dir: epath.PathLike, maps: int = 0, seed: int = 0) -> Layout:
  """The real lists (maps=0), or a prefix of each in proportion that holds about `maps` maps.

  SBD's lists hold the SBD-only maps plus, as the real ones do, images that VOC also annotates
  (2,237 of VOC val + train at full size); they are split into SBD train / val with the official
  sizes 8,498 / 2,857 at full size (the same fractions of a subset), by a permutation of `seed`.
  """
  lists = epath.Path(labels_dir) / 'lists'
  voc_train, voc_val, sbd_only = (label_files.read_ids(lists / name)
                                  for name in (VOC_TRAIN_LIST, VOC_VAL_LIST, SBD_ONLY_LIST))
  official_voc = len(voc_train) + len(voc_val)
  sbd_size = sum(SBD_SIZES.values())
  overlap_size = sbd_size - len(sbd_only)
  if maps:
    total = official_voc + len(sbd_only)
    voc_train, voc_val, sbd_only = (ids[:max(1, round(maps * len(ids) / total))]
                                    for ids in (voc_train, voc_val, sbd_only))
    overlap_size = round(overlap_size * (len(voc_train) + len(voc_val)) / official_voc)
  sbd = sorted(sbd_only + (voc_val + voc_train)[:overlap_size])
  order = np.random.default_rng(seed).permutation(len(sbd))
  num_train = round(len(sbd) * SBD_SIZES['train'] / sbd_size)
  return Layout(tuple(voc_train), tuple(voc_val), tuple(sbd_only),
                tuple(sorted(sbd[i] for i in order[:num_train])),
                tuple(sorted(sbd[i] for i in order[num_train:])))


def _image_rng(seed: int, image_id: str) -> np.random.Generator:
  digest = hashlib.blake2b(image_id.encode(), digest_size=8).digest()
  return np.random.default_rng([seed, int.from_bytes(digest, 'little')])


def render_image(label: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """The (H, W, 3) uint8 painting of an (H, W) label map of VOC class ids (255 = void)."""
  height, width = label.shape
  image = synthetic.background(rng, height, width)
  for class_id in map(int, np.unique(label)):
    if not 0 < class_id < voc.NUM_CLASSES:
      continue
    rows, cols = np.nonzero(label == class_id)
    top, left, bottom, right = rows.min(), cols.min(), rows.max() + 1, cols.max() + 1
    y, x = np.mgrid[top:bottom, left:right].astype(np.float32)
    family = CLASS_FAMILIES[class_id]
    fill = synthetic.texture(rng, x, y, synthetic.random_colour(rng, family),
                             synthetic.random_colour(rng, family), kind=CLASS_TEXTURES[class_id])
    image[rows, cols] = fill[rows - top, cols - left]
  edges = np.zeros(label.shape, bool)
  edges[:, 1:] |= label[:, 1:] != label[:, :-1]
  edges[1:] |= label[1:] != label[:-1]
  band = scipy.ndimage.binary_dilation(edges | (label == IGNORE_LABEL), iterations=BOUNDARY_BAND)
  image = image.clip(0, 255).astype(np.uint8)
  blurred = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(BOUNDARY_BLUR_RADIUS)))
  image[band] = blurred[band]
  noisy = image + NOISE_STD * rng.standard_normal(image.shape, dtype=np.float32)
  return noisy.clip(0, 255).round().astype(np.uint8)


def encode_jpeg(image: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format='JPEG', quality=JPEG_QUALITY)
  return buffer.getvalue()


def sbd_mat(segmentation: np.ndarray) -> bytes:
  """SBD's cls/<id>.mat: struct GTcls with Segmentation, Boundaries (one sparse map per class,
  the class's pixels that touch another value) and CategoriesPresent."""
  boundaries = np.empty((NUM_OBJECT_CLASSES, 1), dtype=object)
  present = np.array([c for c in np.unique(segmentation) if 0 < c < voc.NUM_CLASSES], np.uint8)
  for class_id in range(1, voc.NUM_CLASSES):
    boundaries[class_id - 1, 0] = scipy.sparse.csc_matrix(segmentation.shape, dtype=bool)
  for class_id in present:
    mask = segmentation == class_id
    inner = scipy.ndimage.binary_erosion(mask, border_value=1)
    boundaries[class_id - 1, 0] = scipy.sparse.csc_matrix(mask & ~inner)
  buffer = io.BytesIO()
  scipy.io.savemat(buffer, {'GTcls': {'Segmentation': segmentation.astype(np.uint8),
                                      'Boundaries': boundaries, 'CategoriesPresent': present}},
                   do_compression=True)
  return _MAT_HEADER + buffer.getvalue()[len(_MAT_HEADER):]  # scipy's header holds the time


@dataclasses.dataclass(frozen=True)
class _Task:
  labels_dir: str
  image_id: str
  seed: int
  voc_label: bool   # the real PNG goes into VOC's SegmentationClass
  sbd_label: bool   # a cls/<id>.mat goes into SBD


def _render(task: _Task) -> tuple[str, bytes, bytes | None, bytes | None]:
  """(id, JPEG, VOC PNG or None, SBD .mat or None) of one real label map."""
  path = epath.Path(task.labels_dir) / 'SegmentationClass' / f'{task.image_id}.png'
  png = path.read_bytes()
  label = label_files.read_label(path)
  jpeg = encode_jpeg(render_image(label, _image_rng(task.seed, task.image_id)))
  mat = None
  if task.sbd_label:  # SBD's own maps have no void band; VOC's band becomes background there
    mat = sbd_mat(np.where(label == IGNORE_LABEL, 0, label) if task.voc_label else label)
  return task.image_id, jpeg, png if task.voc_label else None, mat


def _rendered(tasks: list[_Task], workers: int) -> Iterator[tuple[str, bytes, bytes | None, bytes | None]]:
  workers = min(workers, len(tasks) // _IMAGES_PER_WORKER_START)
  if workers <= 1:
    yield from map(_render, tasks)
    return
  # spawn: the caller may have started threads (TensorFlow) that a fork would copy mid-state.
  with multiprocessing.get_context('spawn').Pool(workers) as pool:
    yield from pool.imap(_render, tasks, chunksize=8)


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size, info.mtime, info.mode = len(data), _ARCHIVE_MTIME, 0o644
  tar.addfile(info, io.BytesIO(data))


def _id_list(ids) -> bytes:
  return ''.join(f'{i}\n' for i in ids).encode()


def _write_archives(voc_file: BinaryIO, sbd_file: BinaryIO, plan: Layout, labels_dir: str,
                    seed: int, workers: int) -> None:
  voc_labelled = set(plan.voc_train) | set(plan.voc_val)
  sbd_listed = set(plan.sbd_train) | set(plan.sbd_val)
  tasks = [_Task(labels_dir, i, seed, i in voc_labelled, i in sbd_listed) for i in plan.image_ids]
  pngs = {}
  with gzip.GzipFile(fileobj=sbd_file, mode='wb', mtime=0, filename='') as sbd_gzip, \
       tarfile.open(fileobj=voc_file, mode='w', format=tarfile.GNU_FORMAT) as voc_tar, \
       tarfile.open(fileobj=sbd_gzip, mode='w', format=tarfile.GNU_FORMAT) as sbd_tar:
    for image_id, jpeg, png, mat in _rendered(tasks, workers):
      _add_member(voc_tar, f'{voc.VOC_PREFIX}JPEGImages/{image_id}.jpg', jpeg)
      if png is not None:
        pngs[image_id] = png
      if mat is not None:
        _add_member(sbd_tar, f'{voc.SBD_PREFIX}cls/{image_id}.mat', mat)
    for image_id in sorted(pngs):
      _add_member(voc_tar, f'{voc.VOC_PREFIX}SegmentationClass/{image_id}.png', pngs.pop(image_id))
    for split, ids in (('train', plan.voc_train), ('val', plan.voc_val),
                       ('trainval', plan.voc_train + plan.voc_val)):
      _add_member(voc_tar, f'{voc.VOC_PREFIX}ImageSets/Segmentation/{split}.txt', _id_list(ids))
    for split, ids in (('train', plan.sbd_train), ('val', plan.sbd_val)):
      _add_member(sbd_tar, f'{voc.SBD_PREFIX}{split}.txt', _id_list(ids))


def generate(labels_dir: epath.PathLike, manual_dir: epath.PathLike, *, maps: int = 0,
             seed: int = 0, workers: int = 1) -> Layout:
  """Writes manual_dir/VOCtrainval_11-May-2012.tar and manual_dir/benchmark.tgz, then the marker.

  Each archive is written under a temporary name and renamed when complete; `workers` processes
  paint in parallel (the output does not depend on it). Returns the layout written.
  """
  labels_dir, manual_dir = epath.Path(labels_dir), epath.Path(manual_dir)
  if not (labels_dir / 'SegmentationClass').is_dir():
    raise FileNotFoundError(f'{labels_dir}/SegmentationClass does not exist: pass the folder of the '
                            'real VOC label maps (SegmentationClass/, lists/) as the labels dir.')
  plan = layout(labels_dir, maps, seed)
  manual_dir.mkdir(parents=True, exist_ok=True)
  (manual_dir / MARKER_FILE).unlink(missing_ok=True)
  voc_path, sbd_path = manual_dir / voc.VOC_ARCHIVE, manual_dir / voc.SBD_ARCHIVE
  partial = {path: path.parent / f'{path.name}.partial' for path in (voc_path, sbd_path)}
  with partial[voc_path].open('wb') as voc_file, partial[sbd_path].open('wb') as sbd_file:
    _write_archives(voc_file, sbd_file, plan, os.fspath(labels_dir), seed, workers)
  for path, temporary in partial.items():
    temporary.replace(path)
  (manual_dir / MARKER_FILE).write_text(json.dumps(_marker(maps, seed)))
  return plan


def is_generated(manual_dir: epath.PathLike, maps: int, seed: int) -> bool:
  """True when manual_dir holds complete archives generated with exactly these settings."""
  marker = epath.Path(manual_dir) / MARKER_FILE
  return marker.is_file() and json.loads(marker.read_text()) == _marker(maps, seed)


def _marker(maps: int, seed: int) -> dict:
  return {'maps': maps, 'seed': seed, 'version': GENERATOR_VERSION}


def define_flags(options: flags.FlagValues) -> None:
  flags.DEFINE_string('labels_dir', None, 'Folder of the real label maps (SegmentationClass/*.png '
                      'and lists/).', required=True, flag_values=options)
  flags.DEFINE_string('manual_dir', None, 'Where the two archives are written.', required=True,
                      flag_values=options)
  flags.DEFINE_integer('maps', 0, 'About this many label maps (0: all 12,031).', flag_values=options)
  flags.DEFINE_integer('seed', 0, 'Painting and SBD-split seed.', flag_values=options)
  flags.DEFINE_integer('workers', len(os.sched_getaffinity(0)), 'Painting processes.', flag_values=options)


def main(options: flags.FlagValues) -> None:
  plan = generate(options.labels_dir, options.manual_dir, maps=options.maps, seed=options.seed,
                  workers=options.workers)
  print(f'wrote {len(plan.image_ids)} images: VOC train {len(plan.voc_train)}, val '
        f'{len(plan.voc_val)}; SBD train {len(plan.sbd_train)}, val {len(plan.sbd_val)} '
        f'({len(plan.sbd_only)} SBD-only) into {options.manual_dir}')


if __name__ == '__main__':
  cli.run(main, define_flags)
