"""ImageNet weights from torchvision / timm files into a backbone `.npz` (`config.model.pretrained`).

  python -m dunet_jax.convert_weights --source=resnet50-11ad3fa6.pth --arch=resnet50 \\
      --output=resnet50.npz

Reads a PyTorch state dict from `.safetensors` (always, with safetensors' numpy API) or
`.pth` / `.pt` / `.bin` (only when torch is installed). Every source tensor is either mapped onto
exactly one parameter or BatchNorm statistic of our backbone, or is on the explicit drop list
(the ImageNet classifier and BN's `num_batches_tracked`); every tensor of our backbone must be
filled. Anything else, and any shape mismatch, stops the conversion with the keys named.
Conv kernels go from OIHW to HWIO (depthwise: (C, 1, 3, 3) -> (3, 3, 1, C)). Nothing is downloaded.

The output is an uncompressed `.npz` keyed by our parameter paths joined with '/'
('layer1/0/conv1/kernel', 'units/efb2u1/conv2/bn_dw/mean', ...), plus the string entries
`__arch__` and `__source__` and the input convention the source was trained with (mean, std,
channel order, pixel range: `pretrained.InputConvention`), which loading checks against the config.
"""
from dunet_jax import cli  # first: prepares the process before TensorFlow and jax load

import dataclasses
import functools
import re

import ml_collections
import numpy as np
from absl import flags
from flax import nnx

from dunet_jax import storage
from dunet_jax.models import pretrained
from dunet_jax.models import resnet
from dunet_jax.models import xception

BN_LEAVES = {'weight': 'scale', 'bias': 'bias', 'running_mean': 'mean', 'running_var': 'var'}


@dataclasses.dataclass(frozen=True)
class Arch:
  """A convertible architecture: our backbone settings and where its published weights live."""
  family: str          # 'resnet' | 'xception'
  depth: int
  naming: str          # 'torchvision' | 'timm_deep_stem' | 'timm_xception'
  stem: str = 'standard'
  published: str = ''  # where users get the file (for --help and the README)
  convention: pretrained.InputConvention = pretrained.IMAGENET  # the source's input normalisation


ARCHS = {
    'resnet50': Arch('resnet', 50, 'torchvision',
                     published='torchvision resnet50 (ResNet50_Weights.IMAGENET1K_V1 / V2)'),
    'resnet101': Arch('resnet', 101, 'torchvision',
                      published='torchvision resnet101 (ResNet101_Weights.IMAGENET1K_V1 / V2)'),
    'resnet50c': Arch('resnet', 50, 'timm_deep_stem', stem='deep', published='timm resnet50c.gluon_in1k'),
    'resnet101c': Arch('resnet', 101, 'timm_deep_stem', stem='deep', published='timm resnet101c.gluon_in1k'),
    'xception65': Arch('xception', 65, 'timm_xception', published='timm xception65.tf_in1k',
                       convention=pretrained.TF_INCEPTION),
    'xception71': Arch('xception', 71, 'timm_xception', published='timm xception71.tf_in1k',
                       convention=pretrained.TF_INCEPTION),
}

# Source tensors we drop on purpose: the 1000-class ImageNet heads and PyTorch's BN step counters.
DROPPED = re.compile(r'^(fc|head\.fc)\.(weight|bias)$|\.num_batches_tracked$')


class ConversionError(ValueError):
  """The source file does not fit the architecture: names the offending keys."""


def _resnet_module(arch: Arch, module: str) -> str | None:
  """torchvision / timm ResNet module name -> our module path, None when no rule matches."""
  if arch.naming == 'timm_deep_stem':
    stem = {'conv1.0': 'conv1_1', 'conv1.1': 'bn1_1', 'conv1.3': 'conv1_2', 'conv1.4': 'bn1_2',
            'conv1.6': 'conv1_3', 'bn1': 'bn1_3'}
  else:
    stem = {'conv1': 'conv1', 'bn1': 'bn1'}
  if module in stem:
    return stem[module]
  match = re.fullmatch(r'layer([1-4])\.(\d+)\.(conv[1-3]|bn[1-3]|downsample\.[01])', module)
  if not match:
    return None
  stage, unit, part = match.groups()
  part = {'downsample.0': 'downsample/conv', 'downsample.1': 'downsample/bn'}.get(part, part)
  return f'layer{stage}/{unit}/{part}'


def _xception_module(arch: Arch, module: str) -> str | None:
  """timm aligned-Xception module name -> our module path, None when no rule matches."""
  stem = re.fullmatch(r'stem\.([01])\.(conv|bn)', module)
  if stem:
    return f'conv1_{int(stem.group(1)) + 1}/{stem.group(2)}'
  match = re.fullmatch(
      r'blocks\.(\d+)\.(stack\.(conv[1-3])\.(conv_dw|bn_dw|conv_pw|bn_pw)|shortcut\.(conv|bn))', module)
  if not match:
    return None
  names = xception.unit_names(arch.depth)
  block = int(match.group(1))
  if block >= len(names):
    return None
  if match.group(3):
    return f'units/{names[block]}/{match.group(3)}/{match.group(4)}'
  return f'units/{names[block]}/shortcut/{match.group(5)}'


def target_path(arch_name: str, key: str, ndim: int) -> str | None:
  """Our parameter path for source tensor `key` (of rank `ndim`), None when no rule maps it."""
  arch = ARCHS[arch_name]
  module, _, leaf = key.rpartition('.')
  mapped = (_resnet_module if arch.family == 'resnet' else _xception_module)(arch, module)
  if mapped is None:
    return None
  if leaf == 'weight' and ndim == 4:
    return f'{mapped}/kernel'
  if leaf in BN_LEAVES and ndim == 1:
    return f'{mapped}/{BN_LEAVES[leaf]}'
  return None


def build_backbone(arch_name: str, *, rngs: nnx.Rngs | None = None) -> nnx.Module:
  """Our backbone for `arch_name` at output stride 32 (parameters do not depend on it), float32."""
  arch = ARCHS[arch_name]
  rngs = rngs or nnx.Rngs(0)
  if arch.family == 'xception':
    model_config = ml_collections.ConfigDict(dict(
        backbone='xception', depth=arch.depth, base_width=64, stage_blocks=(), output_stride=32,
        multi_grid=(1, 1, 1), compute_dtype='float32'))
    return xception.Xception(model_config, rngs=rngs)
  return resnet.ResNet(resnet.STAGE_BLOCKS[arch.depth], stem=arch.stem, rngs=rngs)


@functools.cache
def _cached_target_shapes(arch_name: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
  return tuple(pretrained.parameter_shapes(nnx.eval_shape(lambda: build_backbone(arch_name))).items())


def target_shapes(arch_name: str) -> dict[str, tuple[int, ...]]:
  """Shapes our backbone expects for `arch_name`, computed without allocating it."""
  return dict(_cached_target_shapes(arch_name))


def read_state_dict(path: storage.PathLike) -> dict[str, np.ndarray]:
  """{key: numpy array} from a .safetensors file, or a .pth / .pt / .bin file when torch is installed."""
  path = storage.path(path)
  if not path.is_file():
    raise FileNotFoundError(f'--source={path}: no such file')
  if path.suffix == '.safetensors':
    from safetensors.numpy import load
    return dict(load(path.read_bytes()))
  if path.suffix not in ('.pth', '.pt', '.bin'):
    raise ConversionError(f'--source={path}: expected a .safetensors, .pth, .pt or .bin file')
  try:
    import torch
  except ImportError as error:
    raise ConversionError(f'--source={path}: reading {path.suffix} files needs torch (not a dunet_jax '
                          'requirement); install it, or use the .safetensors file of the same '
                          'weights') from error
  with path.open('rb') as file:
    state_dict = torch.load(file, map_location='cpu', weights_only=True)
  if isinstance(state_dict, dict) and 'state_dict' in state_dict and len(state_dict) <= 4:
    state_dict = state_dict['state_dict']
  return {key: value.detach().float().numpy() for key, value in state_dict.items()}


def convert(state_dict: dict[str, np.ndarray], arch_name: str,
            expected: dict[str, tuple[int, ...]] | None = None) -> tuple[dict[str, np.ndarray], list[str]]:
  """Maps a PyTorch state dict onto our paths: (arrays, dropped source keys); ConversionError on any gap."""
  if arch_name not in ARCHS:
    raise ConversionError(f'--arch={arch_name}: unknown, choose one of {", ".join(ARCHS)}')
  expected = target_shapes(arch_name) if expected is None else expected
  converted, sources, dropped, unmapped, duplicated = {}, {}, [], [], []
  for key, value in state_dict.items():
    value = np.asarray(value)
    if DROPPED.search(key):
      dropped.append(key)
      continue
    path = target_path(arch_name, key, value.ndim)
    if path is None or path not in expected:
      unmapped.append(key)
      continue
    if path in converted:
      duplicated.append(f'{key} and {sources[path]} -> {path}')
      continue
    sources[path] = key
    value = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value  # OIHW -> HWIO
    converted[path] = value.astype(np.float32, copy=False)
  mismatched = [f'{sources[path]} {tuple(value.shape)} -> {path} expects {expected[path]}'
                for path, value in converted.items() if tuple(value.shape) != tuple(expected[path])]
  missing = [path for path in expected if path not in converted]
  problems = []
  if unmapped:
    problems.append(f'{len(unmapped)} source tensors match nothing in our {arch_name}: {pretrained.key_list(unmapped)}')
  if duplicated:
    problems.append(f'{len(duplicated)} source tensors collide: {pretrained.key_list(duplicated)}')
  if mismatched:
    problems.append(f'{len(mismatched)} shape mismatches (source shape before OIHW->HWIO): '
                    f'{pretrained.key_list(mismatched)}')
  if missing:
    problems.append(f'{len(missing)} of our tensors have no source: {pretrained.key_list(missing)}')
  if problems:
    raise ConversionError(f'--arch={arch_name} does not fit this state dict (is it the right file / '
                          f'--arch?):\n  ' + '\n  '.join(problems))
  return converted, dropped


def write_npz(path: storage.PathLike, arrays: dict[str, np.ndarray], arch_name: str, source: str) -> None:
  """Writes our arrays plus the arch, source and input convention that `pretrained` checks."""
  metadata = {pretrained.ARCH_KEY: np.asarray(arch_name), pretrained.SOURCE_KEY: np.asarray(str(source)),
              **ARCHS[arch_name].convention.arrays()}
  path = storage.path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open('wb') as file:
    np.savez(file, **arrays, **metadata)


def convert_file(source: str, arch_name: str, output: str) -> dict[str, int]:
  """Reads, converts and writes; prints what was loaded and dropped. Returns counts."""
  if arch_name not in ARCHS:
    raise ConversionError(f'--arch={arch_name}: unknown, choose one of {", ".join(ARCHS)}')
  state_dict = read_state_dict(source)
  arrays, dropped = convert(state_dict, arch_name)
  write_npz(output, arrays, arch_name, storage.path(source).name)
  num_values = sum(int(array.size) for array in arrays.values())
  print(f'{source}: {len(state_dict)} tensors read; {len(arrays)} mapped onto our {arch_name} '
        f'({num_values:,} values); {len(dropped)} dropped on purpose: {pretrained.key_list(dropped, limit=8)}')
  mean, std = ARCHS[arch_name].convention.config_mean_std()
  print(f'wrote {output}; use it with --config.model.pretrained={output} (it expects '
        f'model.pixel_mean={mean}, model.pixel_std={std})')
  return {'read': len(state_dict), 'mapped': len(arrays), 'dropped': len(dropped)}


def define_flags(options: flags.FlagValues) -> None:
  flags.DEFINE_string('source', None, 'PyTorch state dict: .safetensors, or .pth when torch is installed.',
                      required=True, flag_values=options)
  flags.DEFINE_enum('arch', None, list(ARCHS),
                    'Architecture of --source. '
                    + '; '.join(f'{name}: {arch.published}' for name, arch in ARCHS.items()),
                    required=True, flag_values=options)
  flags.DEFINE_string('output', None, '.npz to write (point config.model.pretrained at it).', required=True,
                      flag_values=options)


def main(options: flags.FlagValues) -> None:
  convert_file(options.source, options.arch, options.output)


if __name__ == '__main__':
  cli.run(main, define_flags)
