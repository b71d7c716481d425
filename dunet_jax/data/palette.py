"""Class names, the PASCAL VOC colour map and class-id label PNGs, shared by every dataset, tool and
notebook."""
import numpy as np
from PIL import Image

VOC_CLASS_NAMES = (
    'background', 'aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat', 'chair',
    'cow', 'diningtable', 'dog', 'horse', 'motorbike', 'person', 'pottedplant', 'sheep', 'sofa',
    'train', 'tvmonitor')

# The 59 most frequent PASCAL Context classes in the order of the Detail API's category ids
# (alphabetical), as used by mmsegmentation and PyTorch-Encoding.
CONTEXT_59_CLASS_NAMES = (
    'aeroplane', 'bag', 'bed', 'bedclothes', 'bench', 'bicycle', 'bird', 'boat', 'book', 'bottle',
    'building', 'bus', 'cabinet', 'car', 'cat', 'ceiling', 'chair', 'cloth', 'computer', 'cow',
    'cup', 'curtain', 'dog', 'door', 'fence', 'floor', 'flower', 'food', 'grass', 'ground', 'horse',
    'keyboard', 'light', 'motorbike', 'mountain', 'mouse', 'person', 'plate', 'platform',
    'pottedplant', 'road', 'rock', 'sheep', 'shelves', 'sidewalk', 'sign', 'sky', 'snow', 'sofa',
    'table', 'track', 'train', 'tree', 'truck', 'tvmonitor', 'wall', 'water', 'window', 'wood')

# 60-class convention: 0 = background (everything outside the 59 classes).
CONTEXT_60_CLASS_NAMES = ('background',) + CONTEXT_59_CLASS_NAMES


def voc_colormap(num_colors: int = 256) -> np.ndarray:
  """The VOC palette (num_colors, 3) uint8: bits of the index spread over R, G, B from the top bit.

  Bit 3k of the index goes to bit 7-k of red, bit 3k+1 to green, bit 3k+2 to blue. Index 255
  (void) comes out as (224, 224, 192), as in the official PNGs.
  """
  indices = np.arange(num_colors, dtype=np.int64)
  colormap = np.zeros((num_colors, 3), dtype=np.int64)
  for k in range(8):
    for channel in range(3):
      bit = (indices >> (3 * k + channel)) & 1
      colormap[:, channel] |= bit << (7 - k)
  return colormap.astype(np.uint8)


VOC_COLORMAP = voc_colormap()


def colorize(label: np.ndarray) -> np.ndarray:
  """Class-id map (H, W) -> RGB image (H, W, 3) uint8 in the VOC colours."""
  return VOC_COLORMAP[np.asarray(label, dtype=np.uint8)]


class LabelModeError(ValueError):
  """A label PNG whose pixels are not class ids (e.g. an RGB-coloured label)."""


def class_ids(image: Image.Image) -> np.ndarray:
  """The class ids (H, W) uint8 of a label PNG opened with PIL: a palette ('P') PNG's indices, not
  its colours, or a greyscale ('L') PNG's values. Any other mode raises LabelModeError."""
  if image.mode not in ('P', 'L'):
    raise LabelModeError(f'mode {image.mode}; expected a palette (P) or greyscale (L) PNG whose pixel '
                         'values are class ids')
  return np.asarray(image, np.uint8)
