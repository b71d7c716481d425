"""From a trained DUNet to label maps: multi-scale + flip + sliding-window probabilities, and the
notebook API (load a checkpoint on whatever devices this process has, predict, colorize, overlay).

  predictor = inference.load('runs/demo')          # or 'runs/demo/checkpoints/2000'
  labels = predictor.predict(image)                 # (H, W) uint8 class ids
  picture = inference.overlay(image, labels)

Test-time augmentation follows the DeepLab convention: the image is resized by each scale, the
model's softmax probabilities (averaged with those of the mirrored image when flipping) are
resized back to the original resolution and averaged. Images larger than the window are
predicted in overlapping windows whose logits are averaged.
"""
import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from etils import epath
from PIL import Image

from dunet_jax import checkpoint
from dunet_jax import sharding
from dunet_jax import storage
from dunet_jax.data import palette

# Predictor pads every image to a multiple of this many pixels (bottom and right, with the
# mean colour), so a folder of images of many sizes compiles once per bucket, not per size:
# VOC-sized images (<= 500 px) use at most 4 x 4 compiled shapes.
SIZE_BUCKET = 128
WINDOW_OVERLAP = 1 / 3
# The multi-scale test of DeepLab and the paper (used with flipping).
MULTISCALE_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)

LogitsFn = Callable[[jax.Array], jax.Array]


def window_starts(size: int, window: int, overlap: float = WINDOW_OVERLAP) -> list[int]:
  """Offsets of windows of `window` pixels covering `size` with at least `overlap` shared."""
  if size <= window:
    return [0]
  stride = max(1, math.ceil(window * (1 - overlap)))
  count = math.ceil((size - window) / stride) + 1
  return sorted({min(index * stride, size - window) for index in range(count)})


def sliding_window_logits(logits_fn: LogitsFn, images: jax.Array, window: int | None,
                          overlap: float = WINDOW_OVERLAP) -> jax.Array:
  """Logits of (B, H, W, 3) images, averaged over overlapping window x window crops.

  With `window` None, or an image no larger than the window, this is one call of `logits_fn`.
  """
  _, height, width, _ = images.shape
  if window is None or (height <= window and width <= window):
    return logits_fn(images)
  window_height, window_width = min(window, height), min(window, width)
  total, counts = None, np.zeros((1, height, width, 1), np.float32)
  for top in window_starts(height, window, overlap):
    for left in window_starts(width, window, overlap):
      rows, columns = slice(top, top + window_height), slice(left, left + window_width)
      logits = logits_fn(images[:, rows, columns]).astype(jnp.float32)
      if total is None:
        total = jnp.zeros(images.shape[:3] + logits.shape[-1:], jnp.float32)
      total = total.at[:, rows, columns].add(logits)
      counts[:, rows, columns] += 1
  return total / counts


def scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
  return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def multiscale_probabilities(logits_fn: LogitsFn, images: jax.Array, *,
                             scales: Sequence[float] = (1.0,), flip: bool = False,
                             window: int | None = None,
                             overlap: float = WINDOW_OVERLAP) -> jax.Array:
  """Softmax probabilities (B, H, W, C) float32 averaged over scales and (optionally) flips.

  Each scale resizes the images (bilinear), predicts (in windows when larger than `window`),
  and resizes the probabilities back to (H, W); scale 1.0 involves no resizing at all.
  """
  batch, height, width, channels = images.shape
  images = images.astype(jnp.float32)
  total = 0.0
  for scale in scales:
    size = scaled_size(height, width, scale)
    scaled = images if size == (height, width) else jax.image.resize(
        images, (batch, *size, channels), 'linear')
    for mirrored in (False, True) if flip else (False,):
      logits = sliding_window_logits(logits_fn, scaled[:, :, ::-1] if mirrored else scaled,
                                     window, overlap)
      if mirrored:
        logits = logits[:, :, ::-1]
      probabilities = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
      if size != (height, width):
        probabilities = jax.image.resize(probabilities, (batch, height, width, probabilities.shape[-1]),
                                         'linear')
      total = total + probabilities
  return total / (len(scales) * (2 if flip else 1))


def model_logits_fn(graphdef: nnx.GraphDef, state: nnx.State) -> LogitsFn:
  """The model as a function of images, for use inside jit (merging costs only tracing time)."""
  return lambda images: nnx.merge(graphdef, state)(images)


def as_rgb(image: np.ndarray | Image.Image, name: str = 'image') -> np.ndarray:
  """A PIL image or an array (H, W), (H, W, 3) or (H, W, 4) as uint8 (H, W, 3)."""
  if isinstance(image, Image.Image):
    return np.asarray(image.convert('RGB'))
  array = np.asarray(image)
  if array.ndim == 2:
    array = np.repeat(array[..., None], 3, axis=-1)
  if array.ndim != 3 or array.shape[-1] not in (3, 4) or 0 in array.shape:
    raise ValueError(f'{name}: expected an RGB image of shape (H, W, 3), got shape {array.shape}.')
  if array.dtype != np.uint8:
    if not np.issubdtype(array.dtype, np.number) or array.min() < 0 or array.max() > 255:
      raise ValueError(f'{name}: expected uint8 pixel values 0..255, got {array.dtype} '
                       f'in [{array.min()}, {array.max()}].')
    array = np.round(array).astype(np.uint8)
  return array[..., :3]


def colorize(label_map: np.ndarray) -> np.ndarray:
  """Class ids (H, W) -> RGB (H, W, 3) uint8 in the VOC colours (void 255 is cream)."""
  return palette.colorize(label_map)


def overlay(image: np.ndarray | Image.Image, label_map: np.ndarray, alpha: float = 0.5) -> np.ndarray:
  """The image blended with the colorized label map: (1 - alpha) * image + alpha * colours."""
  rgb = as_rgb(image)
  if rgb.shape[:2] != np.shape(label_map):
    raise ValueError(f'overlay: image is {rgb.shape[:2]} but the label map is {np.shape(label_map)}; '
                     'predict on this image to get a label map of its size.')
  blended = (1 - alpha) * rgb.astype(np.float32) + alpha * colorize(label_map).astype(np.float32)
  return np.clip(np.round(blended), 0, 255).astype(np.uint8)


def _bucketed_probabilities(graphdef: nnx.GraphDef, state: nnx.State, image: jax.Array,
                            pad_value: jax.Array, *, height: int, width: int,
                            scales: tuple[float, ...], flip: bool, window: int | None) -> jax.Array:
  """Probabilities of one bucket-padded image (1, Hb, Wb, 3), cropped to (height, width)."""
  rows = jnp.arange(image.shape[1])[None, :, None, None] < height
  columns = jnp.arange(image.shape[2])[None, None, :, None] < width
  image = jnp.where(rows & columns, image.astype(jnp.float32), pad_value)
  probabilities = multiscale_probabilities(model_logits_fn(graphdef, state), image,
                                           scales=scales, flip=flip, window=window)
  return probabilities[0, :height, :width]


class Predictor:
  """A restored model that turns single images of any size into probabilities and label maps."""

  def __init__(self, model: nnx.Module, config: ml_collections.ConfigDict, *,
               scales: Sequence[float] = (1.0,), flip: bool = False,
               sliding_window: bool | None = None, device: jax.Device | None = None):
    model.eval()
    self.config = config
    self.num_classes = int(config.data.num_classes)
    self.scales = tuple(float(scale) for scale in scales)
    self.flip = bool(flip)
    if sliding_window is None:
      sliding_window = bool(config.eval.get('sliding_window', False))
    self.window = int(config.data.crop_size) if sliding_window else None
    self._graphdef, state = nnx.split(model)
    self._state = jax.device_put(state, device or jax.local_devices()[0])
    self._pad_value = np.asarray(config.data.pad_pixel, np.float32)
    self._probabilities = jax.jit(functools.partial(_bucketed_probabilities, self._graphdef),
                                  static_argnames=('height', 'width', 'scales', 'flip', 'window'))

  def probabilities(self, image: np.ndarray | Image.Image, *, scales: Sequence[float] | None = None,
                    flip: bool | None = None) -> np.ndarray:
    """Softmax probabilities (H, W, num_classes) float32 of one image at its own size."""
    rgb = as_rgb(image)
    height, width = rgb.shape[:2]
    padded = np.zeros((1, -(-height // SIZE_BUCKET) * SIZE_BUCKET,
                       -(-width // SIZE_BUCKET) * SIZE_BUCKET, 3), np.uint8)
    padded[0, :height, :width] = rgb
    scales = self.scales if scales is None else tuple(float(scale) for scale in scales)
    probabilities = self._probabilities(
        self._state, padded, self._pad_value, height=height, width=width, scales=scales,
        flip=self.flip if flip is None else bool(flip), window=self.window)
    return np.asarray(probabilities)

  def predict(self, image: np.ndarray | Image.Image, *, scales: Sequence[float] | None = None,
              flip: bool | None = None) -> np.ndarray:
    """The label map (H, W) uint8 of class ids of one image at its own size."""
    return self.probabilities(image, scales=scales, flip=flip).argmax(-1).astype(np.uint8)

  @property
  def class_names(self) -> list[str]:
    from dunet_jax.data import datasets  # imports tensorflow: only when the names are asked for
    return list(datasets.class_names(self.config.data))


def resolve_checkpoint(path: storage.PathLike) -> tuple[epath.Path, int | None]:
  """(workdir, step) from a workdir (newest step) or a workdir/checkpoints/<step> folder."""
  path = storage.path(path)
  if (path / checkpoint.CONFIG_FILE).is_file():
    return path, None
  if path.name.isdigit() and path.parent.name == checkpoint.CHECKPOINT_DIR:
    return path.parent.parent, int(path.name)
  raise FileNotFoundError(f'{path} is neither a training workdir (with {checkpoint.CONFIG_FILE}) nor a '
                          f'checkpoint folder <workdir>/{checkpoint.CHECKPOINT_DIR}/<step>.')


def load(workdir_or_checkpoint: storage.PathLike, *, step: int | None = None,
         scales: Sequence[float] = (1.0,), flip: bool = False,
         sliding_window: bool | None = None) -> Predictor:
  """A Predictor for a run's newest (or given) checkpoint, restored onto this process's devices.

  Works whatever topology wrote the checkpoint (8 TPU chips, 8 fake CPU devices) and on a
  CPU-only machine.
  """
  workdir, path_step = resolve_checkpoint(workdir_or_checkpoint)
  local = sharding.data_parallel_mesh(jax.local_devices())
  model, config, _ = checkpoint.restore_model(workdir, step if step is not None else path_step, local)
  return Predictor(model, config, scales=scales, flip=flip, sliding_window=sliding_window)
