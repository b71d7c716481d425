"""Predicts label maps for an image or a folder of images with a trained run; CLI.

  python -m dunet_jax.predict --workdir=RUN --input=IMAGE_OR_DIR --output=DIR [--step=N]
      [--multiscale] [--flip] [--sliding_window]

For each image writes DIR/<stem>.png, a palette PNG whose pixel values are class ids (the VOC
colour map makes it viewable; `dunet_jax.score` reads it back), and DIR/<stem>_overlay.jpg, the
prediction blended over the image. Images of any size are predicted at their own resolution.
"""
from dunet_jax import cli  # first: prepares the process before TensorFlow and jax load

from collections.abc import Sequence

import jax
import numpy as np
from absl import flags
from etils import epath
from PIL import Image
from tqdm import tqdm

from dunet_jax import inference, storage
from dunet_jax.data import palette

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.tif', '.tiff', '.webp')


def list_images(input_path: storage.PathLike) -> list[epath.Path]:
  """The image itself, or the images of a folder (not recursive), sorted; raises when none."""
  path = storage.path(input_path)
  if path.is_file():
    return [path]
  if not path.is_dir():
    raise FileNotFoundError(f'--input={path} does not exist: pass an image file or a folder of images.')
  images = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
  if not images:
    raise FileNotFoundError(f'--input={path} holds no images with a suffix in {IMAGE_SUFFIXES}.')
  by_stem = {}
  for image in images:
    by_stem.setdefault(image.stem, []).append(image.name)
  clashes = [' and '.join(names) for names in by_stem.values() if len(names) > 1]
  if clashes:
    raise ValueError(f'{path}: images share a stem, so their outputs would overwrite each other: '
                     f'{"; ".join(clashes)}. Rename or move one of each.')
  return images


def check_output(input_path: storage.PathLike, output_path: storage.PathLike) -> None:
  """Refuses an --output that is the --input folder or inside it (a rerun would read the label maps
  and overlays written there as input images)."""
  inputs, output = storage.path(input_path), storage.path(output_path)
  if '://' not in str(inputs):
    inputs, output = inputs.resolve(), output.resolve()
  if inputs.is_dir() and (output == inputs or inputs in output.parents):
    raise ValueError(f'--output={output_path} is the --input folder or inside it: its label maps and overlays '
                     'would be read as input images next time; pass an --output folder outside --input.')


def save_label_png(path: epath.Path, label_map: np.ndarray) -> None:
  """A palette PNG: pixel values are the class ids, displayed in the VOC colours."""
  image = Image.fromarray(np.asarray(label_map, np.uint8))
  image.putpalette(palette.VOC_COLORMAP.tobytes())
  with path.open('wb') as file:
    image.save(file, format='PNG')


def read_rgb(path: epath.Path) -> np.ndarray:
  """uint8 (H, W, 3) pixels of an image file; raises naming the file when it cannot be read."""
  try:
    with path.open('rb') as file, Image.open(file) as image:
      return np.asarray(image.convert('RGB'))
  except (OSError, SyntaxError, ValueError) as error:
    raise ValueError(f'{path}: cannot be read as an image ({error}); remove or re-save it.') from error


def predict_files(predictor: inference.Predictor, images: Sequence[epath.Path],
                  output_dir: storage.PathLike, alpha: float = 0.5) -> list[str]:
  """Writes <stem>.png and <stem>_overlay.jpg per image; returns the errors of unreadable ones."""
  output_dir = storage.path(output_dir)
  output_dir.mkdir(parents=True, exist_ok=True)
  errors = []
  for path in tqdm(images, unit='image', disable=len(images) == 1):
    try:
      rgb = read_rgb(path)
    except ValueError as error:
      errors.append(str(error))
      continue
    label_map = predictor.predict(rgb)
    save_label_png(output_dir / f'{path.stem}.png', label_map)
    with (output_dir / f'{path.stem}_overlay.jpg').open('wb') as file:
      Image.fromarray(inference.overlay(rgb, label_map, alpha)).save(file, format='JPEG', quality=90)
  return errors


def define_flags(options: flags.FlagValues) -> None:
  flags.DEFINE_string('workdir', None, 'Training run directory (or <run>/checkpoints/<step>).',
                      required=True, flag_values=options)
  flags.DEFINE_string('input', None, 'An image file or a folder of images.', required=True, flag_values=options)
  flags.DEFINE_string('output', None, 'Folder for <stem>.png and <stem>_overlay.jpg.', required=True,
                      flag_values=options)
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: the newest).', flag_values=options)
  flags.DEFINE_bool('multiscale', False, f'Average scales {inference.MULTISCALE_SCALES} (with --flip).',
                    flag_values=options)
  flags.DEFINE_bool('flip', False, 'Also average the mirrored image\'s probabilities.', flag_values=options)
  flags.DEFINE_bool('sliding_window', None, 'Predict large images in crop-sized windows '
                    '(default: the run\'s eval.sliding_window).', flag_values=options)
  flags.DEFINE_float('alpha', 0.5, 'Opacity of the colours in the overlay.', flag_values=options)


def main(options: flags.FlagValues) -> None:
  check_output(options.input, options.output)
  images = list_images(options.input)[jax.process_index()::jax.process_count()]  # a share per process
  predictor = inference.load(
      options.workdir, step=options.step, flip=options.flip or options.multiscale,
      scales=inference.MULTISCALE_SCALES if options.multiscale else (1.0,),
      sliding_window=options.sliding_window)
  errors = predict_files(predictor, images, options.output, options.alpha)
  print(f'wrote {len(images) - len(errors)} label maps and overlays to {options.output}')
  if errors:
    raise ValueError('\n'.join(errors))


if __name__ == '__main__':
  cli.run(main, define_flags, join=True)
