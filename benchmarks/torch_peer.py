"""A PyTorch peer for benchmarks/train_step.py: torchvision's DeepLabV3-ResNet-50 at output stride 16.

The closest published network to DUNet-R50-OS16 (same backbone and output stride, an ASPP head) in
a framework whose CPU kernels are tuned independently of XLA's: one SGD step (forward, softmax
cross-entropy with void 255, backward, update) on a random batch, timed the way train_step.py times
DUNet. Two variants: float32, and bf16 autocast with channels_last (PyTorch's fast CPU path).
torch and torchvision are not dunet_jax requirements; `available()` says whether they are installed.
`run()` times them in a separate process: torch loaded beside jax and TensorFlow in one process
crashed (segmentation fault, torch 2.14.1 CPU with jax 0.10.2), and separate processes also keep
the two frameworks' thread pools from competing.

  python benchmarks/torch_peer.py --batch_size=2 --crop=512 --steps=3 --warmup=1   # one JSON line
"""
import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import time


def available() -> bool:
  return all(importlib.util.find_spec(name) is not None for name in ('torch', 'torchvision'))


def make_model(num_classes: int):
  """DeepLabV3 with a ResNet-50 dilated in its last stage only (output stride 16, ASPP rates 6/12/18)."""
  from torchvision.models import resnet50
  from torchvision.models._utils import IntermediateLayerGetter
  from torchvision.models.segmentation.deeplabv3 import DeepLabHead, DeepLabV3

  backbone = resnet50(replace_stride_with_dilation=[False, False, True])
  return DeepLabV3(IntermediateLayerGetter(backbone, {'layer4': 'out'}),
                   DeepLabHead(2048, num_classes, atrous_rates=(6, 12, 18)))


def time_steps(batch_size: int, crop: int, num_classes: int, *, steps: int, warmup: int) -> dict[str, float]:
  """Median seconds per SGD step: {'float32': ..., 'bf16_channels_last': ...}."""
  import torch
  import torch.nn.functional as F

  torch.manual_seed(0)
  images = torch.randn(batch_size, 3, crop, crop)
  labels = torch.randint(0, num_classes, (batch_size, crop, crop))
  labels[:, :, :8] = 255
  result = {}
  for name, bf16 in (('float32', False), ('bf16_channels_last', True)):
    model = make_model(num_classes).train()
    batch = images
    if bf16:
      model = model.to(memory_format=torch.channels_last)
      batch = images.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.007, momentum=0.9, weight_decay=1e-4)

    def step():
      optimizer.zero_grad(set_to_none=True)
      with torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16):
        logits = model(batch)['out']
      loss = F.cross_entropy(logits.float(), labels, ignore_index=255)
      loss.backward()
      optimizer.step()

    for _ in range(warmup):
      step()
    times = []
    for _ in range(steps):
      started = time.perf_counter()
      step()
      times.append(time.perf_counter() - started)
    result[name] = statistics.median(times)
  return result


def run(batch_size: int, crop: int, num_classes: int, *, steps: int, warmup: int) -> dict[str, float]:
  """time_steps in a fresh Python process."""
  process = subprocess.run(
      [sys.executable, __file__, f'--batch_size={batch_size}', f'--crop={crop}', f'--num_classes={num_classes}',
       f'--steps={steps}', f'--warmup={warmup}'], capture_output=True, text=True, check=True)
  return json.loads(process.stdout.strip().splitlines()[-1])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch_size', type=int, default=2)
  parser.add_argument('--crop', type=int, default=512)
  parser.add_argument('--num_classes', type=int, default=21)
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--warmup', type=int, default=1)
  args = parser.parse_args()
  print(json.dumps(time_steps(args.batch_size, args.crop, args.num_classes, steps=args.steps, warmup=args.warmup)))


if __name__ == '__main__':
  main()
