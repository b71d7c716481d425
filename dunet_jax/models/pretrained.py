"""Loads a backbone `.npz` written by `python -m dunet_jax.convert_weights` into a backbone, strictly.

The file holds one float32 array per parameter and BatchNorm statistic of the backbone, keyed by
its NNX path joined with '/' ('layer1/0/conv1/kernel', 'units/efb2u1/conv2/bn_dw/mean'), plus the
strings `__arch__` (the --arch it was converted for) and `__source__`, and the input convention
the source network was trained with (`__pixel_mean__`, `__pixel_std__`, `__channel_order__`,
`__pixel_range__`: see `InputConvention`). Every array must match a variable of the same shape and
every variable must be filled: anything else fails with the keys named, so a file converted for
another architecture or stem never half-loads. A config whose model.pixel_mean / pixel_std differ
from the file's convention is refused too: the weights would see inputs they were never trained on.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from dunet_jax import storage

ARCH_KEY = '__arch__'
SOURCE_KEY = '__source__'
MEAN_KEY = '__pixel_mean__'
STD_KEY = '__pixel_std__'
CHANNEL_ORDER_KEY = '__channel_order__'
PIXEL_RANGE_KEY = '__pixel_range__'
CONVENTION_KEYS = (MEAN_KEY, STD_KEY, CHANNEL_ORDER_KEY, PIXEL_RANGE_KEY)
FROM_SCRATCH = 'none'  # model.pretrained='none': no ImageNet weights, on purpose
CONVENTION_TOLERANCE = 1e-3


@dataclasses.dataclass(frozen=True)
class InputConvention:
  """How the source network's inputs were normalised: (pixel - mean) / std, per channel.

  `mean` and `std` are in the source's own units (pixels scaled to 0..`pixel_range`) and channel
  order. dunet_jax models read RGB 0..255 pixels and normalise with model.pixel_mean / pixel_std
  given in RGB 0..1 units; `config_mean_std` converts to those.
  """
  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  channel_order: str = 'RGB'   # 'RGB' | 'BGR'
  pixel_range: float = 1.0     # 1.0: pixels in 0..1 (torchvision, timm); 255.0: 0..255 (Caffe)

  def config_mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(model.pixel_mean, model.pixel_std) that reproduce this convention: RGB, 0..1 units."""
    order = slice(None, None, -1) if self.channel_order == 'BGR' else slice(None)
    mean = tuple(float(m) / self.pixel_range for m in self.mean[order])
    std = tuple(float(s) / self.pixel_range for s in self.std[order])
    return mean, std

  def describe(self) -> str:
    return (f'mean {tuple(self.mean)}, std {tuple(self.std)} on {self.channel_order} pixels in '
            f'0..{self.pixel_range:g}')

  def arrays(self) -> dict[str, np.ndarray]:
    """The .npz entries that record this convention."""
    return {MEAN_KEY: np.asarray(self.mean, np.float64), STD_KEY: np.asarray(self.std, np.float64),
            CHANNEL_ORDER_KEY: np.asarray(self.channel_order),
            PIXEL_RANGE_KEY: np.asarray(self.pixel_range, np.float64)}


IMAGENET = InputConvention((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # torchvision, timm gluon
TF_INCEPTION = InputConvention((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))         # timm *.tf_in1k (DeepLab)


class PretrainedWeightsError(ValueError):
  """The weights file does not fit the backbone: names the offending keys."""


def key_list(keys, limit: int = 25) -> str:
  """The keys sorted and comma-separated, at most `limit` of them (error messages)."""
  keys = sorted(keys)
  shown = ', '.join(keys[:limit])
  return shown + (f', ... ({len(keys) - limit} more)' if len(keys) > limit else '')


def flat_variables(module: nnx.Module) -> dict[str, nnx.Variable]:
  """{'/'-joined NNX path: variable} for every parameter and BatchNorm statistic of `module`."""
  state = nnx.state(module, nnx.Any(nnx.Param, nnx.BatchStat))
  return {'/'.join(map(str, path)): variable for path, variable in nnx.to_flat_state(state)}


def parameter_shapes(module: nnx.Module) -> dict[str, tuple[int, ...]]:
  """{'/'-joined path: shape} of every parameter and BatchNorm statistic of `module`."""
  return {path: tuple(variable.shape) for path, variable in flat_variables(module).items()}


def _describe(backbone: nnx.Module) -> str:
  settings = {name: getattr(backbone, name) for name in ('stem', 'stage_blocks')
              if hasattr(backbone, name)}
  if hasattr(backbone, 'unit_order'):
    settings['units'] = len(backbone.unit_order)
  return f'{type(backbone).__name__}({", ".join(f"{k}={v!r}" for k, v in settings.items())})'


def _existing_file(path: str | epath.PathLike) -> epath.Path:
  path = storage.path(path)
  if not path.is_file():
    raise FileNotFoundError(f'config.model.pretrained={path}: no such file (write it with '
                            '`python -m dunet_jax.convert_weights`)')
  return path


def _read(path: epath.Path, keys: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
  """The .npz entries named by `keys` (all when None); only those are read from the file."""
  with path.open('rb') as file, np.load(file, allow_pickle=False) as archive:
    return {key: archive[key] for key in archive.files if keys is None or key in keys}


def _convention(arrays: dict[str, np.ndarray]) -> InputConvention | None:
  if not all(key in arrays for key in CONVENTION_KEYS):
    return None
  return InputConvention(tuple(arrays[MEAN_KEY].tolist()), tuple(arrays[STD_KEY].tolist()),
                         str(arrays[CHANNEL_ORDER_KEY]), float(arrays[PIXEL_RANGE_KEY]))


def read_convention(path: str | epath.PathLike) -> InputConvention | None:
  """The input convention recorded in a converted .npz (None in files written before it was)."""
  path = _existing_file(path)
  return _convention(_read(path, CONVENTION_KEYS))


def check_convention(path: str | epath.PathLike, convention: InputConvention | None,
                     pixel_mean, pixel_std) -> None:
  """Raises PretrainedWeightsError when model.pixel_mean / pixel_std differ from the file's."""
  if convention is None:
    return
  mean, std = convention.config_mean_std()
  if (np.allclose(mean, tuple(pixel_mean), atol=CONVENTION_TOLERANCE)
      and np.allclose(std, tuple(pixel_std), atol=CONVENTION_TOLERANCE)):
    return
  rounded = _tuple_text
  raise PretrainedWeightsError(
      f'config.model.pretrained={path} was trained on inputs normalised with {convention.describe()}, '
      f'i.e. model.pixel_mean={rounded(mean)}, model.pixel_std={rounded(std)}; the config has '
      f'model.pixel_mean={rounded(pixel_mean)}, model.pixel_std={rounded(pixel_std)}. Pass '
      f"--config.model.pixel_mean='{rounded(mean)}' --config.model.pixel_std='{rounded(std)}' "
      f"(and --config.data.pad_pixel='{rounded(neutral_pad_pixel(mean))}', the colour that "
      'normalises to 0), or weights converted for this normalisation.')


def _tuple_text(values) -> str:
  return '(' + ','.join(f'{v:.4g}' for v in values) + ')'


def neutral_pad_pixel(pixel_mean) -> tuple[int, int, int]:
  """The 0..255 RGB padding colour closest to `pixel_mean` (0..1 units): it normalises to ~0."""
  return tuple(int(np.floor(255.0 * m + 0.5)) for m in pixel_mean)


def load_backbone_weights(backbone: nnx.Module, path: str | epath.PathLike, *, pixel_mean=None,
                          pixel_std=None, verbose: bool = True) -> str:
  """Fills every parameter and BN statistic of `backbone` from `path`; returns the file's arch.

  Raises PretrainedWeightsError naming missing, unexpected and mis-shaped keys, and, when
  `pixel_mean` / `pixel_std` (the config's, RGB 0..1 units) are given, an input normalisation
  that differs from the one the file records. Values keep the dtype and sharding the variables
  already have; a backbone built with `nnx.eval_shape` is filled without ever allocating its
  random initialisation.
  """
  path = _existing_file(path)
  arrays = _read(path)
  convention = _convention(arrays)
  if pixel_mean is not None and pixel_std is not None:
    check_convention(path, convention, pixel_mean, pixel_std)
  for key in CONVENTION_KEYS:
    arrays.pop(key, None)
  arch = str(arrays.pop(ARCH_KEY, 'unknown'))
  source = str(arrays.pop(SOURCE_KEY, 'unknown'))
  variables = flat_variables(backbone)
  missing = [key for key in variables if key not in arrays]
  unexpected = [key for key in arrays if key not in variables]
  mismatched = [f'{key}: file {arrays[key].shape}, model {tuple(variables[key].shape)}'
                for key in arrays if key in variables and arrays[key].shape != tuple(variables[key].shape)]
  problems = []
  if missing:
    problems.append(f'{len(missing)} model tensors are not in the file: {key_list(missing)}')
  if unexpected:
    problems.append(f'{len(unexpected)} file tensors are not in the model: {key_list(unexpected)}')
  if mismatched:
    problems.append(f'{len(mismatched)} shapes differ: {key_list(mismatched)}')
  if problems:
    raise PretrainedWeightsError(
        f'{path} (converted for --arch={arch}) does not fit {_describe(backbone)}; check '
        'config.model.backbone / depth / stem / base_width / stage_blocks:\n  ' + '\n  '.join(problems))
  for key, variable in variables.items():
    value = np.asarray(arrays[key], dtype=variable.dtype)
    sharding = getattr(variable, 'sharding', None)  # None for a model built with nnx.eval_shape
    variable.set_value(jax.device_put(value, sharding) if sharding is not None else jnp.asarray(value))
  if verbose:
    num_values = sum(int(array.size) for array in arrays.values())
    expects = convention.describe() if convention else 'not recorded (converted before it was)'
    print(f'loaded {len(arrays)} tensors ({num_values:,} values) of {arch} (from {source}) into '
          f'{_describe(backbone)} from {path}; input normalisation: {expects}')
  return arch


def load_pretrained(backbone: nnx.Module, model_config) -> str | None:
  """Loads model.pretrained into `backbone`, checking model.pixel_mean / pixel_std against the
  file's convention; None (nothing loaded) when model.pretrained is '' or 'none'."""
  if model_config.pretrained in ('', FROM_SCRATCH):
    return None
  return load_backbone_weights(backbone, model_config.pretrained, pixel_mean=model_config.pixel_mean,
                               pixel_std=model_config.pixel_std)
