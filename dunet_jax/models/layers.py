"""Building blocks shared by the backbones and decoders: conv, BatchNorm, conv+BN+ReLU.

Convolutions pad symmetrically by dilation * (k - 1) / 2, as PyTorch does, so a stride-2 conv
samples the same pixels as torchvision's (XLA's 'SAME' pads asymmetrically and would not).
Every convolution goes through cpu_conv.conv2d: on CPU it runs as bf16 matmuls (model.cpu_conv,
`implementation`), elsewhere as XLA's convolution (1x1: an einsum over the strided input).
"""
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dunet_jax.models import batch_statistics, cpu_conv

# torchvision initialises backbone convs with kaiming_normal_(mode='fan_out', nonlinearity='relu').
BACKBONE_INIT = jax.nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')

BN_MOMENTUM = 0.9   # flax keeps 0.9 of the old statistic: PyTorch's momentum=0.1
BN_EPSILON = 1e-5


def head_init(stddev: float) -> Callable:
  """Gaussian init for new (non-backbone) layers: the paper's 'variance 0.01' is stddev 0.1."""
  return jax.nn.initializers.normal(stddev)


class Conv2d(nnx.Module):
  """NHWC convolution with an HWIO `kernel`, PyTorch-style symmetric padding, optional groups."""

  def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1,
               dilation: int = 1, groups: int = 1, use_bias: bool = False,
               kernel_init: Callable = BACKBONE_INIT, dtype=jnp.float32, implementation: str = 'matmul',
               rngs: nnx.Rngs):
    if in_channels % groups:
      raise ValueError(f'Conv2d: {in_channels} input channels do not split into {groups} groups')
    self.kernel_size = kernel_size
    self.stride = stride
    self.dilation = dilation
    self.groups = groups
    self.dtype = dtype
    self.implementation = implementation  # cpu_conv.IMPLEMENTATIONS; DUNet sets model.cpu_conv
    shape = (kernel_size, kernel_size, in_channels // groups, out_channels)
    self.kernel = nnx.Param(kernel_init(rngs.params(), shape, jnp.float32))
    self.bias = nnx.Param(jnp.zeros((out_channels,), jnp.float32)) if use_bias else None

  def __call__(self, x: jax.Array) -> jax.Array:
    y = cpu_conv.conv2d(x.astype(self.dtype), self.kernel[...], stride=self.stride,
                        dilation=self.dilation, groups=self.groups, implementation=self.implementation)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class BatchNorm(nnx.BatchNorm):
  """nnx.BatchNorm that normalises in float32 and returns `compute_dtype`.

  flax promotes the running statistics, scale and bias to the layer's dtype: with dtype=bfloat16
  evaluation would normalise with bf16-rounded mean / var (training normalises with float32 batch
  statistics, so train and eval would disagree). Here the layer's dtype is float32, so the input is
  upcast, statistics and normalisation stay float32 in training and evaluation, and only the
  output is cast to the compute dtype (XLA fuses the casts into the normalisation). Variables
  and their names are nnx.BatchNorm's (scale, bias, mean, var), so weights and checkpoints load.
  """

  def __init__(self, num_features: int, *, compute_dtype, epsilon: float, rngs: nnx.Rngs):
    super().__init__(num_features, momentum=BN_MOMENTUM, epsilon=epsilon, dtype=jnp.float32,
                     param_dtype=jnp.float32, rngs=rngs)
    self.compute_dtype = jnp.dtype(compute_dtype)

  def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
    if self.use_running_average if use_running_average is None else use_running_average:
      return super().__call__(x, use_running_average=True).astype(self.compute_dtype)
    # Training: flax's arithmetic, with a leaner gradient on CPU (batch_statistics.py).
    y, mean, var = batch_statistics.normalize(x, self.scale[...], self.bias[...], self.epsilon)
    self.mean[...] = jax.lax.stop_gradient(self.momentum * self.mean[...] + (1 - self.momentum) * mean)
    self.var[...] = jax.lax.stop_gradient(self.momentum * self.var[...] + (1 - self.momentum) * var)
    return y.astype(self.compute_dtype)


def batch_norm(num_features: int, dtype, rngs: nnx.Rngs, epsilon: float = BN_EPSILON) -> BatchNorm:
  """BatchNorm with PyTorch's momentum (and epsilon by default): float32 statistics and arithmetic."""
  return BatchNorm(num_features, compute_dtype=dtype, epsilon=epsilon, rngs=rngs)


class ConvBNReLU(nnx.Module):
  """conv -> BN -> ReLU; `separable` makes it depthwise 3x3 -> BN -> ReLU -> pointwise (DeepLabV3+)."""

  def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, dilation: int = 1,
               separable: bool = False, kernel_init: Callable = BACKBONE_INIT, dtype=jnp.float32,
               rngs: nnx.Rngs):
    if separable and kernel_size > 1:
      self.depthwise = Conv2d(in_channels, in_channels, kernel_size, dilation=dilation,
                              groups=in_channels, kernel_init=kernel_init, dtype=dtype, rngs=rngs)
      self.depthwise_bn = batch_norm(in_channels, dtype, rngs)
      kernel_size, dilation = 1, 1
    else:
      self.depthwise = None
      self.depthwise_bn = None
    self.conv = Conv2d(in_channels, out_channels, kernel_size, dilation=dilation,
                       kernel_init=kernel_init, dtype=dtype, rngs=rngs)
    self.bn = batch_norm(out_channels, dtype, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.depthwise is not None:
      x = jax.nn.relu(self.depthwise_bn(self.depthwise(x)))
    return jax.nn.relu(self.bn(self.conv(x)))


def _interpolate_axis(x: jax.Array, axis: int, size: int) -> jax.Array:
  in_size = x.shape[axis]
  if in_size == size:
    return x
  position = np.clip((np.arange(size) + 0.5) * in_size / size - 0.5, 0, in_size - 1)
  low = np.floor(position).astype(np.int32)
  high = np.minimum(low + 1, in_size - 1)
  shape = [1] * x.ndim
  shape[axis] = size
  fraction = jnp.asarray((position - low).reshape(shape), x.dtype)
  below, above = jnp.take(x, low, axis=axis), jnp.take(x, high, axis=axis)
  return below + (above - below) * fraction


def resize_bilinear(x: jax.Array, height: int, width: int) -> jax.Array:
  """Bilinear resize of NHWC with half-pixel centres (PyTorch align_corners=False), no antialiasing.

  Two-tap gathers per axis: jax.image.resize computes the same values with dense interpolation
  matrices, whose FLOPs (O(input x output) per row) would swamp the decoders' cost analysis.
  """
  return _interpolate_axis(_interpolate_axis(x, 1, height), 2, width)


def average_pool(x: jax.Array, factor: int) -> jax.Array:
  """Mean over non-overlapping factor x factor windows (the sizes must divide)."""
  if factor == 1:
    return x
  batch, height, width, channels = x.shape
  if height % factor or width % factor:
    raise ValueError(f'average_pool: {height}x{width} does not divide by {factor}')
  x = x.reshape(batch, height // factor, factor, width // factor, factor, channels)
  return x.mean(axis=(2, 4), dtype=jnp.float32).astype(x.dtype)
