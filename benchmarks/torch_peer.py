"""A PyTorch peer for benchmarks/train_step.py: torchvision's DeepLabV3-ResNet-50 at output stride 16.

The closest published network to DUNet-R50-OS16 (same backbone and output stride, an ASPP head) in
a framework whose CPU kernels are tuned independently of XLA's: one SGD step (forward, softmax
cross-entropy with void 255, backward, update) on a random batch, timed the way train_step.py times
DUNet. Two variants: float32, and bf16 autocast with channels_last (PyTorch's fast CPU path).
torch and torchvision are not dunet_jax requirements; `available()` says whether they import.
"""
import importlib.util
import statistics
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
