"""The built-in dataset: shapes on cluttered backgrounds, written exactly like PASCAL VOC 2012.

It exists so that the whole system (builder, pipeline, W, training, evaluation) can be run and
tested without downloading anything. Each of the 20 object classes is a shape (disk, ring,
fork, ...) painted in one of ten colour families (hues); each family is shared by two classes of
clearly different shapes, every texture is shared by all classes, and the clutter on the greyer
backgrounds draws from every hue. A class is therefore its colour family *and* its shape: colour
narrows it to two, and only shape (and, where objects overlap, context) tells those apart.
Thin parts (bars, fork teeth, ring and frame walls, the dumbbell's handle) are where DUpsample at
output stride 32 can beat bilinear upsampling. Everything is a pure function of the seed.
"""
import colorsys
import json
from typing import Callable

import numpy as np
from etils import epath
from PIL import Image, ImageDraw

from dunet_jax import storage
from dunet_jax.data import IGNORE_LABEL, palette

ShapeFn = Callable[[np.ndarray, np.ndarray], np.ndarray]

MIN_SIDE, MAX_SIDE = 96, 160       # image height and width are drawn independently, never equal
MIN_OBJECT, MAX_OBJECT = 28, 72    # object extent in pixels (bars are longer and thin)
VOID_WIDTH = 1                     # pixels on each side of an instance boundary marked void
JPEG_QUALITY = 90
# Ten colour families (hues), each painted on two classes of clearly different shapes: a filled
# blob and an open or thin figure. (Pairs of look-alikes such as tee / ell or crescent / letter_h
# were what the demo's small net confused most when families held them.)
COLOUR_FAMILY_HUES = (0.0, 0.07, 0.14, 0.25, 0.33, 0.45, 0.52, 0.62, 0.75, 0.88)
COLOUR_FAMILIES = (('disk', 'tee'), ('square', 'crescent'), ('triangle', 'bar'), ('star', 'letter_h'),
                   ('heart', 'ell'), ('ellipse', 'fork'), ('half_disk', 'plus'),
                   ('hourglass', 'horseshoe'), ('arrow', 'frame'), ('dumbbell', 'ring'))
HUE_JITTER = 0.015                 # standard deviation of an object's hue around its family's
BACKGROUND_GREYING = 0.6           # backgrounds are less saturated than objects (but share their hues)
TEXTURES = ('solid', 'stripes', 'checks', 'dots', 'gradient')
MARKER_FILE = 'synthetic.json'     # written last: its presence means the tree is complete
GENERATOR_VERSION = 3              # bump when scenes change, so that old trees are regenerated


def _radius(u, v):
  return np.hypot(u, v)


def _star(u, v):
  tip_phase = np.mod(np.arctan2(v, u) * 5 / (2 * np.pi), 1.0)
  tip_closeness = np.abs(tip_phase - 0.5) * 2
  return _radius(u, v) < 0.38 + 0.62 * tip_closeness**1.5


def _heart(u, v):
  x, y = 1.15 * u, -1.1 * v + 0.1
  return (x * x + y * y - 1)**3 - x * x * y**3 < 0


def _fork(u, v):
  handle = (np.abs(u) < 0.13) & (v > 0) & (v < 1)
  crossbar = (np.abs(u) < 0.85) & (v > -0.2) & (v < 0.05)
  teeth = (np.minimum.reduce([np.abs(u - k) for k in (-0.72, 0.0, 0.72)]) < 0.12) & (v > -1) & (v < 0)
  return handle | crossbar | teeth


def _dumbbell(u, v):
  ends = (_radius(np.abs(u) - 0.62, v) < 0.38)
  handle = (np.abs(u) < 0.62) & (np.abs(v) < 0.1)
  return ends | handle


SHAPES: dict[str, ShapeFn] = {
    'disk': lambda u, v: _radius(u, v) < 1,
    'square': lambda u, v: np.maximum(np.abs(u), np.abs(v)) < 0.85,
    'triangle': lambda u, v: (v < 0.5) & (np.sqrt(3) * np.abs(u) - v < 1),
    'ring': lambda u, v: (_radius(u, v) < 1) & (_radius(u, v) > 0.62),
    'plus': lambda u, v: ((np.abs(u) < 0.28) & (np.abs(v) < 1)) | ((np.abs(v) < 0.28) & (np.abs(u) < 1)),
    'star': _star,
    'crescent': lambda u, v: (_radius(u, v) < 1) & (_radius(u - 0.45, v) > 0.85),
    'bar': lambda u, v: (np.abs(u) < 1) & (np.abs(v) < 1),
    'ellipse': lambda u, v: _radius(u, v / 0.45) < 1,
    'ell': lambda u, v: ((u > -1) & (u < -0.35) & (np.abs(v) < 1)) | ((v > 0.4) & (v < 1) & (np.abs(u) < 1)),
    'heart': _heart,
    'arrow': lambda u, v: (((np.abs(v) < 0.2) & (u > -1) & (u < 0.2))
                           | ((u > 0.1) & (u < 1) & (np.abs(v) < 0.65 * (1 - u) / 0.9))),
    'tee': lambda u, v: (((v > -1) & (v < -0.55) & (np.abs(u) < 1))
                         | ((np.abs(u) < 0.22) & (np.abs(v) < 1))),
    'horseshoe': lambda u, v: ((((_radius(u, v) < 1) & (_radius(u, v) > 0.55) & (v < 0)))
                               | ((np.abs(u) > 0.55) & (np.abs(u) < 1) & (v >= 0) & (v < 0.9))),
    'letter_h': lambda u, v: (((np.abs(u) > 0.6) & (np.abs(u) < 1) & (np.abs(v) < 1))
                              | ((np.abs(v) < 0.2) & (np.abs(u) < 1))),
    'frame': lambda u, v: ((np.maximum(np.abs(u), np.abs(v)) < 0.9)
                           & (np.maximum(np.abs(u), np.abs(v)) > 0.62)),
    'half_disk': lambda u, v: (_radius(u, v) < 1) & (v > -0.1),
    'hourglass': lambda u, v: (np.abs(u) < 0.9 * np.abs(v) + 0.08) & (np.abs(v) < 1),
    'fork': _fork,
    'dumbbell': _dumbbell,
}
SHAPE_NAMES = tuple(SHAPES)
CLASS_NAMES = ('background',) + SHAPE_NAMES
NUM_CLASSES = len(CLASS_NAMES)
BAR_CLASS = CLASS_NAMES.index('bar')
FAMILY_OF_CLASS = {CLASS_NAMES.index(name): family
                   for family, names in enumerate(COLOUR_FAMILIES) for name in names}
assert sorted(FAMILY_OF_CLASS) == list(range(1, NUM_CLASSES)), 'every class needs one colour family'


def random_colour(rng: np.random.Generator, family: int | None = None) -> np.ndarray:
  """RGB in 0..255; a colour family fixes the hue range, None draws any hue."""
  if family is None:
    hue, saturation, value = rng.random(), rng.uniform(0.15, 1.0), rng.uniform(0.25, 1.0)
  else:
    hue = (COLOUR_FAMILY_HUES[family] + rng.normal(0, HUE_JITTER)) % 1.0
    saturation, value = rng.uniform(0.5, 1.0), rng.uniform(0.45, 1.0)
  return 255 * np.array(colorsys.hsv_to_rgb(hue, saturation, value), dtype=np.float32)


def texture(rng: np.random.Generator, x: np.ndarray, y: np.ndarray, first: np.ndarray,
            second: np.ndarray, kind: str | None = None) -> np.ndarray:
  """A (h, w, 3) fill mixing two colours: one of TEXTURES, drawn at random unless `kind` names it."""
  drawn = rng.integers(len(TEXTURES))
  kind = TEXTURES.index(kind) if kind is not None else drawn
  period = rng.uniform(4, 11)
  angle = rng.uniform(0, np.pi)
  along = x * np.cos(angle) + y * np.sin(angle)
  if kind == 0:
    mix = np.zeros_like(x)
  elif kind == 1:
    mix = (np.mod(along / period, 1.0) < 0.5).astype(np.float32)
  elif kind == 2:
    mix = np.mod(np.floor(x / period) + np.floor(y / period), 2)
  elif kind == 3:
    mix = (np.hypot(np.mod(x, period) - period / 2, np.mod(y, period) - period / 2) < period / 4)
    mix = mix.astype(np.float32)
  else:
    mix = (along - along.min()) / max(float(np.ptp(along)), 1.0)
  mix = mix[..., None]
  return (1 - mix) * first + mix * second


def background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
  """Smooth colour field, an optional faint texture, then small clutter (dots and thin lines)."""
  grid = rng.uniform(0, 255, size=(rng.integers(2, 6), rng.integers(2, 6), 3)).astype(np.uint8)
  field = np.asarray(Image.fromarray(grid).resize((width, height), Image.BILINEAR), np.float32)
  field = (1 - BACKGROUND_GREYING) * field + BACKGROUND_GREYING * field.mean(axis=-1, keepdims=True)
  if rng.random() < 0.6:
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    pattern = texture(rng, x, y, random_colour(rng), random_colour(rng))
    alpha = rng.uniform(0.15, 0.4)
    field = (1 - alpha) * field + alpha * pattern
  canvas = Image.fromarray(field.clip(0, 255).astype(np.uint8))
  draw = ImageDraw.Draw(canvas)
  for _ in range(rng.integers(4, 13)):
    colour = tuple(int(c) for c in random_colour(rng))
    cx, cy = rng.uniform(0, width), rng.uniform(0, height)
    if rng.random() < 0.5:
      radius = rng.uniform(1.5, 4.0)
      draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=colour)
    else:
      length, angle = rng.uniform(8, 30), rng.uniform(0, 2 * np.pi)
      end = (cx + length * np.cos(angle), cy + length * np.sin(angle))
      draw.line(((cx, cy), end), fill=colour, width=int(rng.integers(1, 3)))
  return np.asarray(canvas, np.float32)


def _object_extent(rng: np.random.Generator, class_id: int) -> tuple[float, float]:
  """Half-extents (along u, along v) in pixels."""
  if class_id == BAR_CLASS:
    return rng.uniform(20, 45), rng.uniform(2.5, 4.0)
  size = rng.uniform(MIN_OBJECT, MAX_OBJECT) / 2
  aspect = np.sqrt(rng.uniform(0.8, 1.25))
  return size * aspect, size / aspect


def _void_band(instances: np.ndarray, width: int) -> np.ndarray:
  """True where a pixel has a different instance within `width` pixels (Chebyshev distance)."""
  padded = np.pad(instances, width, mode='edge')
  height, wide = instances.shape
  band = np.zeros(instances.shape, dtype=bool)
  for dy in range(2 * width + 1):
    for dx in range(2 * width + 1):
      band |= padded[dy:dy + height, dx:dx + wide] != instances
  return band


def render_scene(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """One image (H, W, 3) uint8 and its label (H, W) uint8 with a void band at instance edges."""
  height, width = (int(s) for s in rng.choice(np.arange(MIN_SIDE, MAX_SIDE + 1), 2, replace=False))
  image = background(rng, height, width)
  label = np.zeros((height, width), np.uint8)
  instances = np.zeros((height, width), np.int32)
  num_objects = rng.choice([1, 2, 3, 4], p=[0.25, 0.35, 0.25, 0.15])
  for instance in range(1, num_objects + 1):
    class_id = int(rng.integers(1, NUM_CLASSES))
    half_u, half_v = _object_extent(rng, class_id)
    reach = int(np.ceil(np.hypot(half_u, half_v)))
    cx, cy = rng.uniform(0.1 * width, 0.9 * width), rng.uniform(0.1 * height, 0.9 * height)
    top, left = max(int(cy) - reach, 0), max(int(cx) - reach, 0)
    bottom, right = min(int(cy) + reach + 1, height), min(int(cx) + reach + 1, width)
    y, x = np.mgrid[top:bottom, left:right].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    cos, sin = np.cos(angle), np.sin(angle)
    u = ((x - cx) * cos + (y - cy) * sin) / half_u
    v = (-(x - cx) * sin + (y - cy) * cos) / half_v
    mask = SHAPES[CLASS_NAMES[class_id]](u, v)
    family = FAMILY_OF_CLASS[class_id]
    fill = texture(rng, x, y, random_colour(rng, family), random_colour(rng, family))
    image[top:bottom, left:right][mask] = fill[mask]
    label[top:bottom, left:right][mask] = class_id
    instances[top:bottom, left:right][mask] = instance
  image += rng.normal(0, 5, size=image.shape)
  label[_void_band(instances, VOID_WIDTH)] = IGNORE_LABEL
  return image.clip(0, 255).astype(np.uint8), label


def _save_palette_png(label: np.ndarray, path: epath.Path) -> None:
  png = Image.fromarray(label, mode='P')
  png.putpalette(palette.VOC_COLORMAP.tobytes())
  with path.open('wb') as file:
    png.save(file, format='PNG')


def generate(root: storage.PathLike, num_train: int, num_val: int, seed: int) -> epath.Path:
  """Writes root/VOCdevkit/VOC2012 (JPEGImages, SegmentationClass, ImageSets/Segmentation).

  Image i of a split depends only on (seed, split, i), so growing one split never changes the
  other. Returns the VOC2012 directory.
  """
  voc_dir = storage.path(root) / 'VOCdevkit' / 'VOC2012'
  for sub in ('JPEGImages', 'SegmentationClass', 'ImageSets/Segmentation'):
    (voc_dir / sub).mkdir(parents=True, exist_ok=True)
  (voc_dir / MARKER_FILE).unlink(missing_ok=True)
  lists = {}
  for split_code, (split, count) in enumerate((('train', num_train), ('val', num_val))):
    ids = lists[split] = [f'{split}_{index:06d}' for index in range(count)]
    for index, image_id in enumerate(ids):
      image, label = render_scene(np.random.default_rng([seed, split_code, index]))
      with (voc_dir / 'JPEGImages' / f'{image_id}.jpg').open('wb') as file:
        Image.fromarray(image).save(file, format='JPEG', quality=JPEG_QUALITY)
      _save_palette_png(label, voc_dir / 'SegmentationClass' / f'{image_id}.png')
  lists['trainval'] = lists['train'] + lists['val']
  for split, ids in lists.items():
    (voc_dir / 'ImageSets' / 'Segmentation' / f'{split}.txt').write_text(''.join(f'{i}\n' for i in ids))
  marker = _marker(num_train, num_val, seed)
  (voc_dir / MARKER_FILE).write_text(json.dumps(marker))
  return voc_dir


def is_generated(root: storage.PathLike, num_train: int, num_val: int, seed: int) -> bool:
  """True when root holds a complete tree generated with exactly these settings."""
  marker = storage.path(root) / 'VOCdevkit' / 'VOC2012' / MARKER_FILE
  if not marker.is_file():
    return False
  return json.loads(marker.read_text()) == _marker(num_train, num_val, seed)


def _marker(num_train: int, num_val: int, seed: int) -> dict:
  return {'num_train': num_train, 'num_val': num_val, 'seed': seed, 'version': GENERATOR_VERSION}
