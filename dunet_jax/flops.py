"""Backbone / ASPP / decoder / total GFLOPs of a config, by XLA's cost analysis of the forward pass.

`python -m dunet_jax.flops --config=configs/voc.py:r50_os16` builds the model with random
weights (eval mode), compiles the forward pass for one image of data.crop_size (square) and prints
a table and one JSON line. XLA counts 2 FLOPs per multiply-add (so GFLOPs = 2 x GMACs) and skips
kernel taps that fall into zero padding. The model pads its input to a multiple of the output
stride, so 513 is measured at 528 (33 x 33 at stride 16, but 132 x 132 rather than 129 x 129 at
stride 4); pass --size=512 for a size that needs no padding. The decoder is total - backbone -
ASPP: what the paper's Tables 2 and 3 call decoder FLOPs (its DUpsample decoder sits after ASPP).
"""
from dunet_jax import cli  # first: prepares the process before TensorFlow and jax load

import dataclasses
import json

import jax
import jax.numpy as jnp
import ml_collections
from absl import flags
from flax import nnx

from dunet_jax.models.dunet import DUNet


@dataclasses.dataclass
class Cost:
  """GFLOPs (2 per multiply-add) and parameter counts of one model at one input size."""
  size: int
  backbone_gflops: float
  aspp_gflops: float
  decoder_gflops: float
  total_gflops: float
  backbone_params: int
  aspp_params: int
  decoder_params: int
  total_params: int


def _gflops(module: nnx.Module, *inputs: jax.ShapeDtypeStruct) -> float:
  graph, state = nnx.split(module)

  def forward(state, *args):
    return nnx.merge(graph, state)(*args)

  compiled = jax.jit(forward).lower(state, *inputs).compile()
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older jax returned one dict per device
    analysis = analysis[0]
  return float(analysis['flops']) / 1e9


def _params(module: nnx.Module | None) -> int:
  if module is None:
    return 0
  return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def measure(model_config: ml_collections.ConfigDict, num_classes: int, size: int) -> Cost:
  """Costs of the forward pass of one size x size image (abstract inputs: nothing is run)."""
  model = nnx.eval_shape(lambda: DUNet(model_config, num_classes, reconstruction=None,
                                       rngs=nnx.Rngs(0)))
  model.eval()
  padded = -(-size // model.output_stride) * model.output_stride
  total = _gflops(model, jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
  backbone_input = jax.ShapeDtypeStruct((1, padded, padded, 3), jnp.float32)
  backbone = _gflops(model.backbone, backbone_input)
  aspp = 0.0
  if model.aspp is not None:
    channels, stride = model.backbone.feature_info()['out']
    out = jax.ShapeDtypeStruct((1, padded // stride, padded // stride, channels),
                               jnp.dtype(model_config.compute_dtype))
    aspp = _gflops(model.aspp, out)
  return Cost(size=size, backbone_gflops=backbone, aspp_gflops=aspp,
              decoder_gflops=total - backbone - aspp, total_gflops=total,
              backbone_params=_params(model.backbone), aspp_params=_params(model.aspp),
              decoder_params=_params(model.decoder), total_params=_params(model))


def measure_decoder(model_config: ml_collections.ConfigDict, num_classes: int, size: int) -> float:
  """Decoder GFLOPs alone, compiled on abstract backbone / ASPP outputs (skips the backbone)."""
  model = nnx.eval_shape(lambda: DUNet(model_config, num_classes, reconstruction=None,
                                       rngs=nnx.Rngs(0)))
  model.eval()
  padded = -(-size // model.output_stride) * model.output_stride
  dtype = jnp.dtype(model_config.compute_dtype)
  features = {name: jax.ShapeDtypeStruct((1, padded // stride, padded // stride, channels), dtype)
              for name, (channels, stride) in model.backbone.feature_info().items()}
  high_channels = model_config.aspp_channels if model.aspp is not None else features['out'].shape[3]
  high = jax.ShapeDtypeStruct(features['out'].shape[:3] + (high_channels,), dtype)
  graph, state = nnx.split(model.decoder)

  def forward(state, features, high):
    return nnx.merge(graph, state)(features, high, (padded, padded))

  analysis = jax.jit(forward).lower(state, features, high).compile().cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  return float(analysis['flops']) / 1e9


def define_flags(options: flags.FlagValues) -> None:
  flags.DEFINE_integer('size', 0, 'Square input size; 0 = the config\'s data.crop_size.', flag_values=options)


def main(options: flags.FlagValues) -> None:
  config = options.config
  cost = measure(config.model, config.data.num_classes, options.size or config.data.crop_size)
  print(f'input {cost.size}x{cost.size}, GFLOPs = 2 x multiply-adds (XLA cost analysis)')
  print(f'{"part":<10}{"GFLOPs":>10}{"params":>14}')
  for part in ('backbone', 'aspp', 'decoder', 'total'):
    print(f'{part:<10}{getattr(cost, part + "_gflops"):>10.3f}{getattr(cost, part + "_params"):>14,}')
  print(json.dumps(dataclasses.asdict(cost)))


if __name__ == '__main__':
  cli.run(main, define_flags, config='file')
