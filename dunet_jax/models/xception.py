"""Aligned Xception-65 / -71 (the DeepLabV3+ backbone), NHWC, output stride 8, 16 or 32.

Structure (DeepLab's `xception_65` / `xception_71`, which timm's TF-ported `xception65` /
`xception71` reproduce): a stem of two 3x3 convs (32 channels stride 2, then 64), then units of
three depthwise-separable 3x3 convs. A separable conv is depthwise 3x3 -> BN -> pointwise 1x1 -> BN.
Units start each separable conv with a ReLU and add a shortcut (a strided 1x1 conv + BN when the
unit changes width or stride, else the identity); the last exit-flow unit instead puts a ReLU
after each BN and has no shortcut. Xception-65: entry flow 128 / 256 / 728 (stride 2 each),
middle flow 16 units of 728, exit flow 728-1024-1024 (stride 2) then 1536-1536-2048.
Xception-71 splits the entry flow into five blocks: 128 s2, 256 s1, 256 s2, 728 s1, 728 s2.

Output stride: once the running stride reaches `output_stride`, later strides become 1 and the
dilation grows by the dropped stride instead (DeepLab's rule: the unit that loses its stride keeps
the old dilation, the units after it get the new one). `multi_grid` multiplies the dilation of the
three convs of the last exit-flow unit. The parameters are the same at every output stride (a
unit's shortcut conv is kept when only its stride was dropped, as in DeepLab).

Feature names (every entry of the dict `__call__` returns; `feature_info()` gives channels and
stride), mapped to DeepLab's TF end points:
  conv1_1, conv1_2  entry_flow/conv1_1, entry_flow/conv1_2 (after BN + ReLU)
  efbXuYcZ          entry_flow/blockX/unit_Y/xception_module/separable_convZ_pointwise
  mfbXuYcZ          middle_flow/blockX/unit_Y/... (same)
  exbXuYcZ          exit_flow/blockX/unit_Y/... (same)
  efbXuY, ...       entry_flow/blockX/unit_Y/xception_module (the unit's output, after the sum)
  out               the last unit's output
A cZ feature is the separable conv's pointwise BN output: before the next conv's ReLU, and before
the shortcut sum (DeepLab's decoder reads efb2u1c2 like this, at stride 4). In the last exit-flow
unit it is after its ReLU. The paper fuses efb2u1c2 (1/4) and mfb1u16c3 (1/16).

Parameter paths (what `convert_weights` writes, `pretrained.load_backbone_weights` reads) vs timm's:
  conv1_1/{conv,bn}                 stem.0.{conv,bn}
  conv1_2/{conv,bn}                 stem.1.{conv,bn}
  units/<unit>/convZ/{conv_dw,bn_dw,conv_pw,bn_pw}
                                    blocks.<i>.stack.convZ.{conv_dw,bn_dw,conv_pw,bn_pw}
  units/<unit>/shortcut/{conv,bn}   blocks.<i>.shortcut.{conv,bn}
where <unit> is the i-th entry of `unit_names(depth)`. Convs hold `kernel` (HWIO; depthwise
(3, 3, 1, C)), BatchNorms `scale`, `bias`, `mean`, `var`; BN epsilon is 1e-3 as in the TF weights.
"""
import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from dunet_jax.models.layers import Conv2d, batch_norm

BN_EPSILON = 1e-3       # the TF-trained weights' epsilon (ResNet's is PyTorch's 1e-5)
REFERENCE_WIDTH = 64    # the stem's second conv; `base_width` scales every width by base_width / 64
MIDDLE_FLOW_UNITS = 16
# Depthwise kernels (3, 3, 1, C) have fan-in 9: He init on fan-in (fan-out would count all C outputs).
DEPTHWISE_INIT = jax.nn.initializers.he_normal()


@dataclasses.dataclass(frozen=True)
class UnitSpec:
  """One Xception unit: three separable convs, the last one strided."""
  name: str                       # efb2u1: entry flow, block 2, unit 1
  widths: tuple[int, int, int]    # output channels of the three separable convs
  stride: int
  shortcut: str                   # 'conv' (1x1 conv + BN), 'identity' or 'none'
  relu_inside: bool = False       # ReLU after each BN instead of before each separable conv


def unit_specs(depth: int, middle_units: int = MIDDLE_FLOW_UNITS) -> list[UnitSpec]:
  """The units of Xception-`depth` in order (the i-th is timm's `blocks.<i>`)."""
  if depth == 65:
    entry = [(128, 2), (256, 2), (728, 2)]
  elif depth == 71:
    entry = [(128, 2), (256, 1), (256, 2), (728, 1), (728, 2)]
  else:
    raise ValueError(f'config.model.depth={depth} is not an Xception depth: use 65 or 71')
  specs = [UnitSpec(f'efb{block}u1', (width,) * 3, stride, 'conv')
           for block, (width, stride) in enumerate(entry, start=1)]
  specs += [UnitSpec(f'mfb1u{unit}', (728,) * 3, 1, 'identity')
            for unit in range(1, middle_units + 1)]
  specs += [UnitSpec('exb1u1', (728, 1024, 1024), 2, 'conv'),
            UnitSpec('exb2u1', (1536, 1536, 2048), 1, 'none', relu_inside=True)]
  return specs


def unit_names(depth: int, middle_units: int = MIDDLE_FLOW_UNITS) -> list[str]:
  """Our unit names in timm's `blocks` order, e.g. ['efb1u1', ..., 'exb2u1']."""
  return [spec.name for spec in unit_specs(depth, middle_units)]


@dataclasses.dataclass(frozen=True)
class UnitPlan:
  """A unit as built: its spec (widths scaled), input width, actual stride and per-conv dilations."""
  spec: UnitSpec
  in_channels: int
  stride: int
  dilations: tuple[int, int, int]


def plan(depth: int, *, output_stride: int, multi_grid: Sequence[int] = (1, 1, 1),
         middle_units: int = MIDDLE_FLOW_UNITS, base_width: int = REFERENCE_WIDTH
         ) -> tuple[list[UnitPlan], dict[str, tuple[int, int]]]:
  """The units to build and {feature name: (channels, stride)}, by DeepLab's output-stride rule."""
  if output_stride not in (8, 16, 32):
    raise ValueError(f'model.output_stride must be 8, 16 or 32 for Xception, got {output_stride}')
  multi_grid = tuple(multi_grid)
  if len(multi_grid) != 3:
    raise ValueError(f'model.multi_grid {multi_grid} needs 3 entries for Xception (the convs of exb2u1)')
  if middle_units < 1:
    raise ValueError(f'Xception needs at least one middle-flow unit, got {middle_units}')
  scale = base_width / REFERENCE_WIDTH

  def width(channels: int) -> int:
    return max(1, round(channels * scale))

  info = {'conv1_1': (width(32), 2), 'conv1_2': (width(64), 2)}
  units = []
  channels, current_stride, rate = width(64), 2, 1
  specs = unit_specs(depth, middle_units)
  for index, spec in enumerate(specs):
    spec = dataclasses.replace(spec, widths=tuple(width(w) for w in spec.widths))
    if current_stride == output_stride:
      stride, unit_rate = 1, rate
      rate *= spec.stride
    else:
      stride, unit_rate = spec.stride, 1
    grid = multi_grid if index == len(specs) - 1 else (1, 1, 1)
    units.append(UnitPlan(spec, channels, stride, tuple(unit_rate * g for g in grid)))
    for conv, conv_width in enumerate(spec.widths, start=1):
      info[f'{spec.name}c{conv}'] = (conv_width, current_stride * (stride if conv == 3 else 1))
    current_stride *= stride
    channels = spec.widths[-1]
    info[spec.name] = (channels, current_stride)
  info['out'] = (channels, current_stride)
  return units, info


def _batch_norm(channels: int, dtype, rngs: nnx.Rngs) -> nnx.BatchNorm:
  return batch_norm(channels, dtype, rngs, epsilon=BN_EPSILON)


class ConvBN(nnx.Module):
  """conv -> BN [-> ReLU]: the stem's 3x3 convs (with ReLU) and the units' 1x1 shortcuts (without)."""

  def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int, relu: bool,
               dtype, rngs: nnx.Rngs):
    self.conv = Conv2d(in_channels, out_channels, kernel_size, stride=stride, dtype=dtype, rngs=rngs)
    self.bn = _batch_norm(out_channels, dtype, rngs)
    self.relu = relu

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.bn(self.conv(x))
    return jax.nn.relu(x) if self.relu else x


class SeparableConv(nnx.Module):
  """Depthwise 3x3 -> BN [-> ReLU] -> pointwise 1x1 -> BN [-> ReLU] (ReLUs only when `relu_inside`).

  Padding is symmetric (DeepLab's fixed_padding, PyTorch's padding=dilation), see layers.Conv2d.
  """

  def __init__(self, in_channels: int, out_channels: int, *, stride: int, dilation: int, relu_inside: bool,
               dtype, rngs: nnx.Rngs):
    self.conv_dw = Conv2d(in_channels, in_channels, 3, stride=stride, dilation=dilation, groups=in_channels,
                          kernel_init=DEPTHWISE_INIT, dtype=dtype, rngs=rngs)
    self.bn_dw = _batch_norm(in_channels, dtype, rngs)
    self.conv_pw = Conv2d(in_channels, out_channels, 1, dtype=dtype, rngs=rngs)
    self.bn_pw = _batch_norm(out_channels, dtype, rngs)
    self.relu_inside = relu_inside

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.bn_dw(self.conv_dw(x))
    if self.relu_inside:
      x = jax.nn.relu(x)
    x = self.bn_pw(self.conv_pw(x))
    return jax.nn.relu(x) if self.relu_inside else x


class XceptionUnit(nnx.Module):
  """DeepLab's xception_module: three separable convs plus a shortcut; returns (output, [c1, c2, c3])."""

  def __init__(self, in_channels: int, spec: UnitSpec, *, stride: int, dilations: Sequence[int], dtype,
               rngs: nnx.Rngs):
    self.relu_inside = spec.relu_inside
    channels = in_channels
    for index, (width, dilation) in enumerate(zip(spec.widths, dilations), start=1):
      conv = SeparableConv(channels, width, stride=stride if index == 3 else 1, dilation=dilation,
                           relu_inside=spec.relu_inside, dtype=dtype, rngs=rngs)
      setattr(self, f'conv{index}', conv)
      channels = width
    self.shortcut_type = spec.shortcut
    if spec.shortcut == 'conv':
      self.shortcut = ConvBN(in_channels, channels, 1, stride=stride, relu=False, dtype=dtype, rngs=rngs)
    elif spec.shortcut == 'identity' and (in_channels != channels or stride != 1):
      raise ValueError(f'unit {spec.name}: an identity shortcut needs equal widths and stride 1')

  def __call__(self, x: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
    outputs = []
    h = x
    for conv in (self.conv1, self.conv2, self.conv3):
      if not self.relu_inside:
        h = jax.nn.relu(h)
      h = conv(h)
      outputs.append(h)
    if self.shortcut_type == 'conv':
      h = h + self.shortcut(x)
    elif self.shortcut_type == 'identity':
      h = h + x
    return h, outputs


class Xception(nnx.Module):
  """Aligned Xception backbone: `model(images)` -> {feature name: NHWC array} (see the module docstring).

  Reads from `model_config` (config.model): depth (65 | 71), output_stride (8 | 16 | 32),
  multi_grid (dilation multipliers of the three convs of exb2u1), compute_dtype, base_width
  (64 gives the published widths; smaller scales every width by base_width / 64, for tiny test
  models) and stage_blocks (() for 16 middle-flow units, or (n,) for n). Inputs are normalized
  images (B, H, W, 3).
  """

  def __init__(self, model_config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    stage_blocks = tuple(model_config.stage_blocks)
    if len(stage_blocks) > 1:
      raise ValueError(f'model.stage_blocks {stage_blocks}: for Xception give () or (middle_flow_units,)')
    units, feature_info = plan(
        model_config.depth, output_stride=model_config.output_stride, multi_grid=model_config.multi_grid,
        middle_units=stage_blocks[0] if stage_blocks else MIDDLE_FLOW_UNITS,
        base_width=model_config.base_width)
    self._feature_info = tuple(feature_info.items())  # hashable: part of the NNX graph definition
    dtype = jnp.dtype(model_config.compute_dtype)
    stem_width, stem_stride = feature_info['conv1_1']
    self.conv1_1 = ConvBN(3, stem_width, 3, stride=stem_stride, relu=True, dtype=dtype, rngs=rngs)
    self.conv1_2 = ConvBN(stem_width, feature_info['conv1_2'][0], 3, stride=1, relu=True, dtype=dtype,
                          rngs=rngs)
    self.units = nnx.Dict({unit.spec.name: XceptionUnit(unit.in_channels, unit.spec, stride=unit.stride,
                                                        dilations=unit.dilations, dtype=dtype, rngs=rngs)
                           for unit in units})
    self.unit_order = tuple(unit.spec.name for unit in units)  # an nnx.Dict leaves jit with sorted keys

  def feature_info(self) -> dict[str, tuple[int, int]]:
    """{feature name: (channels, stride relative to the input)} for every feature `__call__` returns."""
    return dict(self._feature_info)

  def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
    features = {}
    x = self.conv1_1(x)
    features['conv1_1'] = x
    x = self.conv1_2(x)
    features['conv1_2'] = x
    for name in self.unit_order:
      x, conv_outputs = self.units[name](x)
      for index, output in enumerate(conv_outputs, start=1):
        features[f'{name}c{index}'] = output
      features[name] = x
    features['out'] = x
    return features
