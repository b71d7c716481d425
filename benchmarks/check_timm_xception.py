"""Our aligned Xception against timm's xception65 / xception71 with the same (random) weights.

  python benchmarks/check_timm_xception.py [--depth=65] [--size=97x113]

Needs torch + timm (not dunet_jax requirements). The weights go through the users' path
(.safetensors -> convert_weights -> .npz -> pretrained.load_backbone_weights, which also checks the
recorded input normalisation against timm's for xception*.tf_in1k). Every separable
conv output (our efbXuYcZ / mfbXuYcZ / exbXuYcZ = timm's blocks.<i>.stack.convZ), every unit
output and 'out' are compared in eval mode, float32, at output stride 32, 16 and 8 (Xception-71:
32 and 16 only, because at 8 timm drops the 1x1 shortcut of a unit whose stride it removed,
where DeepLab and we keep it). One JSON line; passes when max |ours - timm| / max |timm| of
every feature is below 1e-4; exit status 1 on a failure.
"""
import argparse
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import torch_parity  # noqa: E402  (sets up sys.path and jax precision)

import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from dunet_jax.models import xception  # noqa: E402

TOLERANCE = 1e-4


def timm_features(model: torch.nn.Module, names: list[str], images: torch.Tensor) -> dict[str, np.ndarray]:
  """Our feature names -> timm's outputs, captured with forward hooks."""
  features, hooks = {}, []

  def capture(name):
    return lambda module, inputs, output: features.__setitem__(name, output.detach().numpy().copy())

  for index, block in enumerate(model.blocks):
    hooks.append(block.register_forward_hook(capture(names[index])))
    for conv in (1, 2, 3):
      separable_conv = getattr(block.stack, f'conv{conv}')
      hooks.append(separable_conv.register_forward_hook(capture(f'{names[index]}c{conv}')))
  with torch.no_grad():
    features['out'] = model.forward_features(images).numpy()
  for hook in hooks:
    hook.remove()
  return features


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--size', default='97x113', help='HxW of the random input')
  parser.add_argument('--depth', type=int, default=65, choices=(65, 71))
  args = parser.parse_args()
  height, width = map(int, args.size.split('x'))
  torch.manual_seed(0)
  images = torch.randn(2, 3, height, width)
  names = xception.unit_names(args.depth)
  results, start = {}, time.time()
  for output_stride in (32, 16, 8) if args.depth == 65 else (32, 16):
    reference = timm.create_model(f'xception{args.depth}', output_stride=output_stride).eval()
    torch_parity.randomize_batch_norms(reference, seed=output_stride)
    config = ml_collections.ConfigDict(dict(
        backbone='xception', depth=args.depth, stage_blocks=(), base_width=64,
        output_stride=output_stride, multi_grid=(1, 1, 1), compute_dtype='float32'))
    ours = xception.Xception(config, rngs=nnx.Rngs(0))
    published = timm.models.get_pretrained_cfg(f'xception{args.depth}.tf_in1k')  # the weights users convert
    torch_parity.load_converted(reference, f'xception{args.depth}', ours, published.mean, published.std)
    ours.eval()
    expected = timm_features(reference, names, images)
    results[f'os{output_stride}'] = torch_parity.compare_features(ours, images, expected)
  passed = all(r['max_relative_error'] < TOLERANCE for r in results.values())
  print(json.dumps({'check': f'timm_xception{args.depth}', 'input': [2, height, width, 3],
                    'tolerance': TOLERANCE, 'passed': passed, **results, 'torch': torch.__version__,
                    'timm': timm.__version__, 'seconds': round(time.time() - start, 1)}))
  sys.exit(0 if passed else 1)


if __name__ == '__main__':
  main()
