"""The decoders the paper compares, selected by model.decoder.

'dupsample' (the paper's, Sec. 3.3 / Fig. 3): every low-level feature named in
  model.fuse_features is DOWNSAMPLED to the last feature's resolution by average pooling over
  non-overlapping windows (parameter-free, anti-aliased, and the same window grid as the label
  compression: each output position summarises exactly the r x r patch whose labels it predicts;
  a strided conv would add parameters and FLOPs at high resolution, which is what the fusion
  decoder is designed to avoid), reduced by a 1x1 conv + BN + ReLU to model.fuse_channels,
  followed by model.fuse_convs 3x3 conv + BN + ReLU layers of model.decoder_channels of its own,
  concatenated with the last feature (the ASPP output when model.aspp), passed through
  model.decoder_convs 3x3 conv + BN + ReLU layers of model.decoder_channels, and a 1x1 conv (with
  bias, no BN / ReLU: codes are signed) to C' = model.num_components; then DUpsample.
'bilinear' (Table 1's baseline): a 1x1 conv to the classes, bilinear upsampling to full size.
'deeplabv3plus' (Table 3's vanilla decoder): each fused low-level feature reduced to
  model.fuse_channels by a 1x1 conv + BN + ReLU and resized to the finest of them, the last
  feature upsampled bilinearly to it, concatenated, two 3x3 conv + BN + ReLU of
  model.decoder_channels, a 1x1 conv to the classes, bilinear upsampling to full size.
model.separable_convs makes the 3x3 convs depthwise-separable (DeepLabV3+'s decoder).

Upsampling is never a transposed conv. New layers are initialised from a Gaussian with the
paper's variance 0.01 (stddev model.head_init_std = 0.1); biases start at zero.
"""
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from dunet_jax.models.dupsample import DUpsample
from dunet_jax.models.layers import Conv2d, ConvBNReLU, average_pool, head_init, resize_bilinear

DECODERS = ('dupsample', 'bilinear', 'deeplabv3plus')


def _check_fuse_features(names: tuple[str, ...], feature_info: dict, need_one: bool) -> None:
  if need_one and not names:
    raise ValueError('model.fuse_features is empty: the deeplabv3plus decoder needs at least one '
                     'low-level feature (e.g. b1u2c3)')
  unknown = [name for name in names if name not in feature_info]
  if unknown:
    raise ValueError(f'model.fuse_features {unknown} are not features of this backbone; '
                     f'choose from {sorted(feature_info)}')


class FusionDecoder(nnx.Module):
  """The paper's decoder: low-level features pooled down, fused, convs to C', DUpsample."""

  def __init__(self, config: ml_collections.ConfigDict, feature_info: dict,
               high: tuple[int, int], num_classes: int, reconstruction: np.ndarray | None, *,
               kernel_init: Callable, dtype, rngs: nnx.Rngs):
    high_channels, self.high_stride = high
    self.fuse_names = tuple(config.fuse_features)
    _check_fuse_features(self.fuse_names, feature_info, need_one=False)
    self.pool_factors = tuple(self.high_stride // feature_info[name][1] for name in self.fuse_names)
    branches = []
    for name in self.fuse_names:
      layers = [ConvBNReLU(feature_info[name][0], config.fuse_channels, 1, kernel_init=kernel_init,
                           dtype=dtype, rngs=rngs)]
      for index in range(config.fuse_convs):
        layers.append(ConvBNReLU(config.fuse_channels if index == 0 else config.decoder_channels,
                                 config.decoder_channels, 3, separable=config.separable_convs,
                                 kernel_init=kernel_init, dtype=dtype, rngs=rngs))
      branches.append(nnx.Sequential(*layers))
    self.fuse = nnx.List(branches)
    fused_channels = config.decoder_channels if config.fuse_convs else config.fuse_channels
    channels = high_channels + fused_channels * len(self.fuse_names)
    convs = []
    for _ in range(config.decoder_convs):
      convs.append(ConvBNReLU(channels, config.decoder_channels, 3, separable=config.separable_convs,
                              kernel_init=kernel_init, dtype=dtype, rngs=rngs))
      channels = config.decoder_channels
    self.convs = nnx.List(convs)
    self.to_codes = Conv2d(channels, config.num_components, 1, use_bias=True,
                           kernel_init=kernel_init, dtype=dtype, rngs=rngs)
    self.dupsample = DUpsample(config.num_components, num_classes, self.high_stride, reconstruction,
                               train_w=config.train_w, temperature_init=config.temperature_init,
                               dtype=dtype)

  def temperature(self) -> jax.Array:
    return self.dupsample.temperature()

  def __call__(self, features: dict, high: jax.Array, size: tuple[int, int]) -> jax.Array:
    parts = [high]
    for name, factor, conv in zip(self.fuse_names, self.pool_factors, self.fuse):
      parts.append(conv(average_pool(features[name], factor)))
    x = jnp.concatenate(parts, axis=-1) if len(parts) > 1 else high
    for conv in self.convs:
      x = conv(x)
    logits = self.dupsample(self.to_codes(x))
    if logits.shape[1:3] != tuple(size):
      raise ValueError(f'DUpsample gave {logits.shape[1:3]} for an input of {tuple(size)}: the '
                       'input must be padded to a multiple of model.output_stride')
    return logits


class BilinearDecoder(nnx.Module):
  """1x1 conv to the classes at the last feature's resolution, then bilinear upsampling."""

  def __init__(self, high_channels: int, num_classes: int, *, kernel_init: Callable, dtype,
               rngs: nnx.Rngs):
    self.classifier = Conv2d(high_channels, num_classes, 1, use_bias=True, kernel_init=kernel_init,
                             dtype=dtype, rngs=rngs)

  def __call__(self, features: dict, high: jax.Array, size: tuple[int, int]) -> jax.Array:
    return resize_bilinear(self.classifier(high).astype(jnp.float32), *size)


class DeepLabV3PlusDecoder(nnx.Module):
  """The vanilla decoder: upsample the last feature to the low-level one's resolution and fuse."""

  def __init__(self, config: ml_collections.ConfigDict, feature_info: dict, high_channels: int,
               num_classes: int, *, kernel_init: Callable, dtype, rngs: nnx.Rngs):
    self.fuse_names = tuple(config.fuse_features)
    _check_fuse_features(self.fuse_names, feature_info, need_one=True)
    self.target = min(self.fuse_names, key=lambda name: feature_info[name][1])
    self.fuse = nnx.List([
        ConvBNReLU(feature_info[name][0], config.fuse_channels, 1, kernel_init=kernel_init,
                   dtype=dtype, rngs=rngs) for name in self.fuse_names])
    channels = high_channels + config.fuse_channels * len(self.fuse_names)
    convs = []
    for _ in range(2):
      convs.append(ConvBNReLU(channels, config.decoder_channels, 3, separable=config.separable_convs,
                              kernel_init=kernel_init, dtype=dtype, rngs=rngs))
      channels = config.decoder_channels
    self.convs = nnx.List(convs)
    self.classifier = Conv2d(channels, num_classes, 1, use_bias=True, kernel_init=kernel_init,
                             dtype=dtype, rngs=rngs)

  def __call__(self, features: dict, high: jax.Array, size: tuple[int, int]) -> jax.Array:
    height, width = features[self.target].shape[1:3]
    parts = [resize_bilinear(high, height, width)]
    for name, conv in zip(self.fuse_names, self.fuse):
      parts.append(resize_bilinear(conv(features[name]), height, width))
    x = jnp.concatenate(parts, axis=-1)
    for conv in self.convs:
      x = conv(x)
    return resize_bilinear(self.classifier(x).astype(jnp.float32), *size)


def build_decoder(config: ml_collections.ConfigDict, feature_info: dict, high: tuple[int, int],
                  num_classes: int, reconstruction: np.ndarray | None, *, dtype,
                  rngs: nnx.Rngs) -> nnx.Module:
  """The decoder named by config.decoder; `high` is (channels, stride) of what it decodes."""
  kernel_init = head_init(config.head_init_std)
  if config.decoder == 'dupsample':
    return FusionDecoder(config, feature_info, high, num_classes, reconstruction,
                         kernel_init=kernel_init, dtype=dtype, rngs=rngs)
  if config.decoder == 'bilinear':
    return BilinearDecoder(high[0], num_classes, kernel_init=kernel_init, dtype=dtype, rngs=rngs)
  if config.decoder == 'deeplabv3plus':
    return DeepLabV3PlusDecoder(config, feature_info, high[0], num_classes,
                                kernel_init=kernel_init, dtype=dtype, rngs=rngs)
  raise ValueError(f'model.decoder must be one of {DECODERS}, got {config.decoder!r}')
