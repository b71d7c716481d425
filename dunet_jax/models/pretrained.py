"""Loads a backbone `.npz` written by `python -m dunet_jax.convert_weights` into a backbone, strictly.

The file holds one float32 array per parameter and BatchNorm statistic of the backbone, keyed by
its NNX path joined with '/' ('layer1/0/conv1/kernel', 'units/efb2u1/conv2/bn_dw/mean'), plus the
strings `__arch__` (the --arch it was converted for) and `__source__`. Every array must match a
variable of the same shape and every variable must be filled: anything else fails with the keys
named, so a file converted for another architecture or stem never half-loads.
"""
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ARCH_KEY = '__arch__'
SOURCE_KEY = '__source__'
METADATA_KEYS = (ARCH_KEY, SOURCE_KEY)


class PretrainedWeightsError(ValueError):
  """The weights file does not fit the backbone: names the offending keys."""


def _key_list(keys, limit: int = 25) -> str:
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
  settings = {name: getattr(backbone, name) for name in ('stem', 'stage_blocks', 'avg_down')
              if hasattr(backbone, name)}
  if hasattr(backbone, 'unit_order'):
    settings['units'] = len(backbone.unit_order)
  return f'{type(backbone).__name__}({", ".join(f"{k}={v!r}" for k, v in settings.items())})'


def load_backbone_weights(backbone: nnx.Module, path: str | pathlib.Path, *, verbose: bool = True) -> str:
  """Fills every parameter and BN statistic of `backbone` from `path`; returns the file's arch.

  Raises PretrainedWeightsError naming missing, unexpected and mis-shaped keys. Values keep the
  dtype and sharding the variables already have; a backbone built with `nnx.eval_shape` is filled
  without ever allocating its random initialisation.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f'config.model.pretrained={path}: no such file (write it with '
                            '`python -m dunet_jax.convert_weights`)')
  with np.load(path, allow_pickle=False) as archive:
    arrays = {key: archive[key] for key in archive.files}
  arch = str(arrays.pop(ARCH_KEY, 'unknown'))
  source = str(arrays.pop(SOURCE_KEY, 'unknown'))
  if arch.startswith('resnet') and arch.endswith('d') and not getattr(backbone, 'avg_down', False):
    raise PretrainedWeightsError(
        f"{path}: converted from timm's {arch}, whose shortcuts average-pool before their 1x1 conv; "
        f'{_describe(backbone)} uses strided 1x1 shortcuts, so these weights would compute something else')
  variables = flat_variables(backbone)
  missing = [key for key in variables if key not in arrays]
  unexpected = [key for key in arrays if key not in variables]
  mismatched = [f'{key}: file {arrays[key].shape}, model {tuple(variables[key].shape)}'
                for key in arrays if key in variables and arrays[key].shape != tuple(variables[key].shape)]
  problems = []
  if missing:
    problems.append(f'{len(missing)} model tensors are not in the file: {_key_list(missing)}')
  if unexpected:
    problems.append(f'{len(unexpected)} file tensors are not in the model: {_key_list(unexpected)}')
  if mismatched:
    problems.append(f'{len(mismatched)} shapes differ: {_key_list(mismatched)}')
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
    print(f'loaded {len(arrays)} tensors ({num_values:,} values) of {arch} (from {source}) into '
          f'{_describe(backbone)} from {path}')
  return arch
