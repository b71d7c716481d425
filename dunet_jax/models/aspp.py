"""Atrous spatial pyramid pooling (DeepLabV3): context on top of the backbone's last feature.

Five branches, each conv + BN + ReLU to `channels`: a 1x1 conv, three dilated 3x3 convs and image
pooling (global mean -> 1x1 conv, broadcast back); concatenated and projected by a 1x1 conv.
The rates (6, 12, 18) are DeepLab's for output stride 16; they scale with 16 / output_stride
(doubled at 8) so that the branches see the same image area.
"""
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from dunet_jax.models.layers import ConvBNReLU


def scaled_rates(rates_at_os16: tuple[int, ...], output_stride: int) -> tuple[int, ...]:
  return tuple(max(1, rate * 16 // output_stride) for rate in rates_at_os16)


class ASPP(nnx.Module):
  """(B, h, w, in_channels) -> (B, h, w, channels)."""

  def __init__(self, in_channels: int, channels: int, rates: tuple[int, ...], *,
               kernel_init: Callable, dtype, rngs: nnx.Rngs):
    def conv(cin, kernel_size, dilation=1):
      return ConvBNReLU(cin, channels, kernel_size, dilation=dilation, kernel_init=kernel_init,
                        dtype=dtype, rngs=rngs)
    self.branches = nnx.List([conv(in_channels, 1)] + [conv(in_channels, 3, r) for r in rates])
    self.image_pooling = conv(in_channels, 1)
    self.project = conv(channels * (len(rates) + 2), 1)

  def __call__(self, x: jax.Array) -> jax.Array:
    outputs = [branch(x) for branch in self.branches]
    pooled = self.image_pooling(x.mean(axis=(1, 2), keepdims=True, dtype=jnp.float32).astype(x.dtype))
    outputs.append(jnp.broadcast_to(pooled, outputs[0].shape))
    return self.project(jnp.concatenate(outputs, axis=-1))
