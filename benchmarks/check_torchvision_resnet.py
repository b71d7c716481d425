"""Our ResNet-50 against torchvision's resnet50 with the same (random) weights; one JSON line.

  python benchmarks/check_torchvision_resnet.py [--size=97x129] [--depth=50]

Needs torch + torchvision (not dunet_jax requirements). The weights go through the users' path
(.safetensors -> convert_weights -> .npz -> pretrained.load_backbone_weights). Every bottleneck's
BN(conv3) before the residual add (bXuYc3), its output (bXuY) and 'out' are compared at output stride 32,
and at 16 / 8 against torchvision's
replace_stride_with_dilation, in eval mode, float32. The figure is max |ours - torch| divided by
max |torch| of the same feature; it passes below 1e-4. Exit status 1 on a failure.
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
import torch  # noqa: E402
import torchvision  # noqa: E402
from flax import nnx  # noqa: E402

from dunet_jax.models import dunet  # noqa: E402

TOLERANCE = 1e-4
DILATION = {32: [False, False, False], 16: [False, False, True], 8: [False, True, True]}


def torch_features(model: torch.nn.Module, images: torch.Tensor) -> dict[str, np.ndarray]:
  """bXuYc3 (each bottleneck's bn3 output, copied before torchvision adds the shortcut in place), bXuY
  (its output) and 'out'."""
  features = {}
  with torch.no_grad():
    x = model.maxpool(model.relu(model.bn1(model.conv1(images))))
    for stage in range(1, 5):
      for unit, block in enumerate(getattr(model, f'layer{stage}'), start=1):
        name = f'b{stage}u{unit}'
        hook = block.bn3.register_forward_hook(
            lambda module, inputs, output, name=name: features.__setitem__(name + 'c3', output.numpy().copy()))
        x = block(x)
        hook.remove()
        features[name] = x.numpy()
  features['out'] = x.numpy()
  return features


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--size', default='97x129', help='HxW of the random input')
  parser.add_argument('--depth', type=int, default=50, choices=(50, 101))
  args = parser.parse_args()
  height, width = map(int, args.size.split('x'))
  torch.manual_seed(0)
  images = torch.randn(2, 3, height, width)
  results, start = {}, time.time()
  for output_stride, dilation in DILATION.items():
    reference = getattr(torchvision.models, f'resnet{args.depth}')(
        replace_stride_with_dilation=dilation).eval()
    torch_parity.randomize_batch_norms(reference, seed=output_stride)
    config = ml_collections.ConfigDict(dict(
        backbone='resnet', depth=args.depth, stage_blocks=(), base_width=64, stem='standard',
        output_stride=output_stride, multi_grid=(1, 1, 1), compute_dtype='float32'))
    ours = dunet.build_backbone(config, rngs=nnx.Rngs(0))
    torch_parity.load_converted(reference, f'resnet{args.depth}', ours)
    ours.eval()
    expected = torch_features(reference, images)
    results[f'os{output_stride}'] = torch_parity.compare_features(ours, images, expected)
  passed = all(r['max_relative_error'] < TOLERANCE for r in results.values())
  print(json.dumps({'check': f'torchvision_resnet{args.depth}', 'input': [2, height, width, 3],
                    'tolerance': TOLERANCE, 'passed': passed, **results,
                    'torch': torch.__version__, 'torchvision': torchvision.__version__,
                    'seconds': round(time.time() - start, 1)}))
  sys.exit(0 if passed else 1)


if __name__ == '__main__':
  main()
