"""DUNet: backbone -> (optional ASPP) -> decoder, on raw 0..255 images of any size.

The model normalises pixels itself (model.pixel_mean / pixel_std are in 0..1 units, as
torchvision's), pads the normalised image with zeros (the mean colour) on the bottom and right to
a multiple of the output stride, and crops the logits back, so callers never resize. Logits are
float32 and, for the DUpsample decoder, already divided by the learnable temperature T.
"""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from dunet_jax.models import cpu_conv
from dunet_jax.models.aspp import ASPP, scaled_rates
from dunet_jax.models.decoders import build_decoder
from dunet_jax.models.layers import Conv2d, head_init
from dunet_jax.models.resnet import STAGE_BLOCKS, ResNet


def build_backbone(config: ml_collections.ConfigDict, *, rngs: nnx.Rngs) -> nnx.Module:
  """ResNet or aligned Xception per config.backbone; both return {feature name: array}."""
  if config.backbone == 'xception':
    from dunet_jax.models.xception import Xception  # only built when asked for
    return Xception(config, rngs=rngs)
  if config.backbone != 'resnet':
    raise ValueError(f"model.backbone must be 'resnet' or 'xception', got {config.backbone!r}")
  stage_blocks = tuple(config.stage_blocks) or STAGE_BLOCKS.get(config.depth)
  if stage_blocks is None:
    raise ValueError(f'model.depth={config.depth} is not a known ResNet depth {sorted(STAGE_BLOCKS)}; '
                     'set model.stage_blocks (4 ints) for a custom one')
  return ResNet(stage_blocks, base_width=config.base_width, stem=config.stem,
                output_stride=config.output_stride, multi_grid=tuple(config.multi_grid),
                dtype=jnp.dtype(config.compute_dtype), rngs=rngs)


class DUNet(nnx.Module):
  """`model(images)`: (B, H, W, 3) uint8 / float 0..255 -> float32 logits (B, H, W, num_classes)."""

  def __init__(self, model_config: ml_collections.ConfigDict, num_classes: int, *,
               reconstruction: np.ndarray | None, rngs: nnx.Rngs):
    dtype = jnp.dtype(model_config.compute_dtype)
    self.backbone = build_backbone(model_config, rngs=rngs)
    feature_info = self.backbone.feature_info()
    high_channels, high_stride = feature_info['out']
    if high_stride != model_config.output_stride:
      raise ValueError(f'the backbone reached stride {high_stride}, not model.output_stride='
                       f'{model_config.output_stride}')
    self.output_stride = high_stride
    if model_config.aspp:
      self.aspp = ASPP(high_channels, model_config.aspp_channels,
                       scaled_rates(tuple(model_config.aspp_rates), high_stride),
                       kernel_init=head_init(model_config.head_init_std), dtype=dtype, rngs=rngs)
      high_channels = model_config.aspp_channels
    else:
      self.aspp = None
    self.decoder = build_decoder(model_config, feature_info, (high_channels, high_stride),
                                 num_classes, reconstruction, dtype=dtype, rngs=rngs)
    self.pixel_mean = tuple(255.0 * m for m in model_config.pixel_mean)
    self.pixel_std = tuple(255.0 * s for s in model_config.pixel_std)
    implementation = model_config.get('cpu_conv', 'matmul')
    if implementation not in cpu_conv.IMPLEMENTATIONS:
      raise ValueError(f'config.model.cpu_conv={implementation!r}: use one of '
                       f'{cpu_conv.IMPLEMENTATIONS}')
    for _, module in nnx.iter_modules(self):
      if isinstance(module, Conv2d):
        module.implementation = implementation

  def temperature(self) -> jax.Array:
    """T of the DUpsample decoder (1 for the bilinear decoders, which have none)."""
    if hasattr(self.decoder, 'temperature'):
      return self.decoder.temperature()
    return jnp.ones((), jnp.float32)

  def __call__(self, images: jax.Array) -> jax.Array:
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f'DUNet expects (batch, height, width, 3) images, got shape {images.shape}')
    height, width = images.shape[1:3]
    x = (images.astype(jnp.float32) - jnp.asarray(self.pixel_mean)) / jnp.asarray(self.pixel_std)
    padded_height = -(-height // self.output_stride) * self.output_stride
    padded_width = -(-width // self.output_stride) * self.output_stride
    x = jnp.pad(x, ((0, 0), (0, padded_height - height), (0, padded_width - width), (0, 0)))
    features = self.backbone(x)
    high = features['out'] if self.aspp is None else self.aspp(features['out'])
    logits = self.decoder(features, high, (padded_height, padded_width))
    return logits[:, :height, :width].astype(jnp.float32)
