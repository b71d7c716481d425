"""Shared steps of the torch parity checks (needs torch; imported by check_*.py here only).

A random PyTorch backbone goes through the real path users take: state dict -> .safetensors ->
`convert_weights.convert_file` -> .npz -> `pretrained.load_backbone_weights`, and the features
of both networks are compared in eval mode, float32, on the same random image.
"""
import contextlib
import pathlib
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
from flax import nnx  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from dunet_jax import convert_weights  # noqa: E402
from dunet_jax.models import pretrained  # noqa: E402

jax.config.update('jax_default_matmul_precision', 'highest')


def randomize_batch_norms(module: torch.nn.Module, seed: int) -> None:
  """Random BN scale, bias and running statistics, so a wrong BN mapping shows in the features."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for layer in module.modules():
      if isinstance(layer, torch.nn.BatchNorm2d):
        size = layer.num_features
        layer.weight.copy_(0.5 + torch.rand(size, generator=generator))
        layer.bias.copy_(0.1 * torch.randn(size, generator=generator))
        layer.running_mean.copy_(0.1 * torch.randn(size, generator=generator))
        layer.running_var.copy_(0.5 + torch.rand(size, generator=generator))


def load_converted(torch_model: torch.nn.Module, arch: str, ours, pixel_mean=None, pixel_std=None) -> None:
  """Saves `torch_model`'s state dict as .safetensors, converts it for `arch`, loads it into `ours`.

  With `pixel_mean` / `pixel_std` (the reference library's normalisation of the published
  weights), loading also checks them against the convention the converter recorded.
  What the converter and loader print goes to stderr: stdout carries only the JSON line.
  """
  with tempfile.TemporaryDirectory() as directory, contextlib.redirect_stdout(sys.stderr):
    source = pathlib.Path(directory) / f'{arch}.safetensors'
    output = pathlib.Path(directory) / f'{arch}.npz'
    state = {key: value.contiguous() for key, value in torch_model.state_dict().items()}
    save_file(state, str(source))
    convert_weights.convert_file(str(source), arch, str(output))
    pretrained.load_backbone_weights(ours, output, pixel_mean=pixel_mean, pixel_std=pixel_std)


def relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
  """max |ours - reference| / max |reference| (ours NHWC, reference NCHW)."""
  ours = np.asarray(ours, np.float64).transpose(0, 3, 1, 2)
  reference = np.asarray(reference, np.float64)
  if ours.shape != reference.shape:
    raise AssertionError(f'shape {ours.shape} vs reference {reference.shape}')
  return float(np.abs(ours - reference).max() / max(np.abs(reference).max(), 1e-12))


def compare_features(ours, images: torch.Tensor, expected: dict[str, np.ndarray]) -> dict:
  """Runs `ours` on the NCHW `images` and compares every feature `expected` names (NCHW)."""
  got = nnx.jit(lambda model, x: model(x))(ours, images.numpy().transpose(0, 2, 3, 1))
  errors = {name: relative_error(got[name], value) for name, value in expected.items()}
  worst = max(errors, key=errors.get)
  return {'max_relative_error': errors[worst], 'worst_feature': worst, 'out_relative_error': errors['out'],
          'features_compared': len(errors), 'out_shape': list(got['out'].shape)}
