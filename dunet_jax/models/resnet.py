"""Dilated ResNet (bottleneck, torchvision v1.5 layout) returning the paper's named features.

The stride of a downsampling unit sits on its 3x3 conv (torchvision, not the original Caffe
ResNet). Output stride 16 / 8 replaces the stride of stage 4 / stages 3 and 4 by dilation with
torchvision's `replace_stride_with_dilation` semantics: the first unit of a dilated stage keeps
the previous dilation, the following units use the doubled one. A `multi_grid` other than all
ones multiplies the last stage's dilation per unit instead (DeepLabV3, Sec. 3.2).

Features (see `ResNet.feature_info`): 'conv1' (standard 7x7 stem) or 'conv1_1'..'conv1_3' (deep
stem), each after BN + ReLU at stride 2; 'bXuYcZ' for stage X = 1..4, unit Y (1-based), conv Z:
Z = 1, 2 are after BN + ReLU, Z = 3 is BN(conv3) BEFORE the residual add (and its ReLU): DeepLab's
end point `blockX/unit_Y/bottleneck_v1/conv3`, the tensor the paper's names refer to (the same
convention as the Xception features); 'bXuY' is the unit's output (after the add and ReLU), the
tensor the next unit reads; 'out' is the last unit's output.

Parameter names mirror torchvision (`resnet50().state_dict()` key -> NNX path; conv kernels are
OIHW in torch and HWIO here, i.e. `weight.transpose(2, 3, 1, 0)`):
  conv1.weight                        -> conv1.kernel                (standard stem)
  bn1.{weight,bias,running_mean,running_var} -> bn1.{scale,bias,mean,var}
  layer{s}.{u}.conv{k}.weight         -> layer{s}[u].conv{k}.kernel  (s = 1..4, u 0-based, k = 1..3)
  layer{s}.{u}.bn{k}.*                -> layer{s}[u].bn{k}.*         (same four BN names as above)
  layer{s}.{u}.downsample.0.weight    -> layer{s}[u].downsample.conv.kernel
  layer{s}.{u}.downsample.1.*         -> layer{s}[u].downsample.bn.*
  num_batches_tracked, fc.*           -> not used
timm's deep-stem ResNets (resnet50c / 'v1c': conv1 is a Sequential) map their stem as
  conv1.0 -> conv1_1, conv1.1 -> bn1_1, conv1.3 -> conv1_2, conv1.4 -> bn1_2, conv1.6 -> conv1_3,
  bn1 -> bn1_3 (then the same layer* names). `layer{s}` is an `nnx.List`, so an NNX path is
  ('layer1', 0, 'conv1', 'kernel').
"""
import jax
import jax.numpy as jnp
from flax import nnx

from dunet_jax.models import max_pool
from dunet_jax.models.layers import Conv2d, batch_norm

STAGE_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
EXPANSION = 4


class Downsample(nnx.Module):
  """The projection shortcut: strided 1x1 conv + BN (torchvision's downsample.0 / .1)."""

  def __init__(self, in_channels: int, out_channels: int, stride: int, dtype, rngs: nnx.Rngs):
    self.conv = Conv2d(in_channels, out_channels, 1, stride=stride, dtype=dtype, rngs=rngs)
    self.bn = batch_norm(out_channels, dtype, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.bn(self.conv(x))


class Bottleneck(nnx.Module):
  """1x1 -> 3x3 (stride, dilation) -> 1x1 (x4) with a residual.

  Returns the three conv features (c3 = BN(conv3), before the add) and the unit's output.
  """

  def __init__(self, in_channels: int, width: int, stride: int, dilation: int, dtype,
               rngs: nnx.Rngs):
    out_channels = width * EXPANSION
    self.conv1 = Conv2d(in_channels, width, 1, dtype=dtype, rngs=rngs)
    self.bn1 = batch_norm(width, dtype, rngs)
    self.conv2 = Conv2d(width, width, 3, stride=stride, dilation=dilation, dtype=dtype, rngs=rngs)
    self.bn2 = batch_norm(width, dtype, rngs)
    self.conv3 = Conv2d(width, out_channels, 1, dtype=dtype, rngs=rngs)
    self.bn3 = batch_norm(out_channels, dtype, rngs)
    needs_projection = stride != 1 or in_channels != out_channels
    self.downsample = (Downsample(in_channels, out_channels, stride, dtype, rngs)
                       if needs_projection else None)

  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    c1 = jax.nn.relu(self.bn1(self.conv1(x)))
    c2 = jax.nn.relu(self.bn2(self.conv2(c1)))
    c3 = self.bn3(self.conv3(c2))
    shortcut = x if self.downsample is None else self.downsample(x)
    return c1, c2, c3, jax.nn.relu(c3 + shortcut)


def stage_dilations(stage_blocks: tuple[int, ...], output_stride: int,
                    multi_grid: tuple[int, ...]) -> tuple[list[int], list[list[int]]]:
  """Per stage: its stride, and the dilation of each unit's 3x3 conv (see the module doc)."""
  if output_stride not in (8, 16, 32):
    raise ValueError(f'model.output_stride must be 8, 16 or 32, got {output_stride}')
  strides, dilations = [], []
  dilation, current_stride = 1, 4
  for index, blocks in enumerate(stage_blocks):
    stride = 1 if index == 0 else 2
    previous = dilation
    if stride == 2 and current_stride * 2 > output_stride:
      dilation *= 2
      stride = 1
    current_stride *= stride
    units = [previous] + [dilation] * (blocks - 1)
    if index == len(stage_blocks) - 1 and any(g != 1 for g in multi_grid):
      if len(multi_grid) != blocks:
        raise ValueError(f'model.multi_grid {tuple(multi_grid)} needs one entry per unit of the '
                         f'last stage ({blocks})')
      units = [dilation * g for g in multi_grid]
    strides.append(stride)
    dilations.append(units)
  return strides, dilations


class ResNet(nnx.Module):
  """Dilated bottleneck ResNet; `__call__` returns {feature name: NHWC array}."""

  def __init__(self, stage_blocks: tuple[int, ...], *, base_width: int = 64,
               stem: str = 'standard', output_stride: int = 32,
               multi_grid: tuple[int, ...] = (1, 1, 1), dtype=jnp.float32, rngs: nnx.Rngs):
    if len(stage_blocks) != 4 or min(stage_blocks) < 1:
      raise ValueError(f'model.stage_blocks must be 4 positive ints, got {tuple(stage_blocks)}')
    if stem not in ('standard', 'deep'):
      raise ValueError(f"model.stem must be 'standard' or 'deep', got {stem!r}")
    self.stem = stem
    self.stage_blocks = tuple(stage_blocks)
    info = {}
    if stem == 'standard':
      self.conv1 = Conv2d(3, base_width, 7, stride=2, dtype=dtype, rngs=rngs)
      self.bn1 = batch_norm(base_width, dtype, rngs)
      info['conv1'] = (base_width, 2)
    else:
      half = base_width // 2
      self.conv1_1 = Conv2d(3, half, 3, stride=2, dtype=dtype, rngs=rngs)
      self.bn1_1 = batch_norm(half, dtype, rngs)
      self.conv1_2 = Conv2d(half, half, 3, dtype=dtype, rngs=rngs)
      self.bn1_2 = batch_norm(half, dtype, rngs)
      self.conv1_3 = Conv2d(half, base_width, 3, dtype=dtype, rngs=rngs)
      self.bn1_3 = batch_norm(base_width, dtype, rngs)
      info.update(conv1_1=(half, 2), conv1_2=(half, 2), conv1_3=(base_width, 2))
    strides, dilations = stage_dilations(self.stage_blocks, output_stride, tuple(multi_grid))
    in_channels, feature_stride = base_width, 4
    for stage, (stride, unit_dilations) in enumerate(zip(strides, dilations), start=1):
      width = base_width * 2 ** (stage - 1)
      units = []
      for unit, dilation in enumerate(unit_dilations):
        units.append(Bottleneck(in_channels, width, stride if unit == 0 else 1, dilation, dtype,
                                rngs))
        in_channels = width * EXPANSION
        info[f'b{stage}u{unit + 1}c1'] = (width, feature_stride)  # before the strided 3x3
        if unit == 0:
          feature_stride *= stride
        info[f'b{stage}u{unit + 1}c2'] = (width, feature_stride)
        info[f'b{stage}u{unit + 1}c3'] = (in_channels, feature_stride)
        info[f'b{stage}u{unit + 1}'] = (in_channels, feature_stride)
      setattr(self, f'layer{stage}', nnx.List(units))
    info['out'] = (in_channels, feature_stride)
    self._feature_info = tuple(info.items())  # hashable: part of the NNX graph definition

  def feature_info(self) -> dict[str, tuple[int, int]]:
    """{feature name: (channels, stride w.r.t. the input)} without running the network."""
    return dict(self._feature_info)

  def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
    features = {}
    if self.stem == 'standard':
      x = features['conv1'] = jax.nn.relu(self.bn1(self.conv1(images)))
    else:
      x = features['conv1_1'] = jax.nn.relu(self.bn1_1(self.conv1_1(images)))
      x = features['conv1_2'] = jax.nn.relu(self.bn1_2(self.conv1_2(x)))
      x = features['conv1_3'] = jax.nn.relu(self.bn1_3(self.conv1_3(x)))
    x = max_pool.max_pool(x)
    for stage in range(1, len(self.stage_blocks) + 1):
      for unit, block in enumerate(getattr(self, f'layer{stage}'), start=1):
        c1, c2, c3, x = block(x)
        features[f'b{stage}u{unit}c1'] = c1
        features[f'b{stage}u{unit}c2'] = c2
        features[f'b{stage}u{unit}c3'] = c3
        features[f'b{stage}u{unit}'] = x
    features['out'] = x
    return features
