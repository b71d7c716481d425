"""Checks of config.model that must pass before any data is built or any step is compiled.

`validate_model(config)` is called once at the start of training. It refuses, with one message
naming the key and the fix:
- a paper preset (model.require_pretrained, set by configs/voc.py and configs/context.py but not
  by their ',tiny' variants) without model.pretrained: it would train from random weights and
  never approach the paper; the message gives the convert_weights command for the backbone.
  model.pretrained='none' trains from scratch on purpose (logged);
- a model.pretrained file that does not exist or that records another input normalisation than
  model.pixel_mean / pixel_std;
- model.compute_dtype='float16': without loss scaling its gradients underflow; bfloat16 has
  float32's range.
"""
import ml_collections
from absl import logging

from dunet_jax.models import pretrained

COMPUTE_DTYPES = ('float32', 'bfloat16')


def convert_weights_arch(model_config: ml_collections.ConfigDict) -> str | None:
  """The `convert_weights --arch` whose weights fit this backbone (None when none does)."""
  from dunet_jax import convert_weights  # the converter's table of architectures
  for name, arch in convert_weights.ARCHS.items():
    if (arch.family == model_config.backbone and arch.depth == model_config.depth
        and (arch.family != 'resnet' or arch.stem == model_config.stem)):
      return name
  return None


def convert_command(model_config: ml_collections.ConfigDict) -> str:
  """How to get model.pretrained for this backbone, as a command line (or why there is none)."""
  from dunet_jax import convert_weights
  name = convert_weights_arch(model_config)
  if name is None:
    return (f'no published ImageNet weights fit model.backbone={model_config.backbone!r}, '
            f'depth={model_config.depth}, stem={model_config.stem!r}')
  source = ('model.safetensors' if 'timm' in convert_weights.ARCHS[name].published
            else f'{name}-<hash>.pth')
  return (f'download {convert_weights.ARCHS[name].published} ({source}), then run '
          f'`python -m dunet_jax.convert_weights --source=PATH/{source} --arch={name} '
          f'--output=weights/{name}.npz` and pass --config.model.pretrained=weights/{name}.npz')


def validate_model(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError (one message: the key and the fix) for a model config that must not train."""
  model = config.model
  if model.compute_dtype == 'float16':
    raise ValueError("config.model.compute_dtype='float16' is not supported: training has no loss "
                     "scaling, so small gradients underflow to zero in float16. Use 'bfloat16' (float32's "
                     "range, the accelerator default) or 'float32'.")
  if model.compute_dtype not in COMPUTE_DTYPES:
    raise ValueError(f'config.model.compute_dtype={model.compute_dtype!r}: use one of {COMPUTE_DTYPES}.')
  if model.pretrained == pretrained.FROM_SCRATCH:
    logging.warning("config.model.pretrained='none': the backbone starts from random weights on "
                    'purpose (no ImageNet initialisation).')
    return
  if not model.pretrained:
    if model.get('require_pretrained', False) and not config.train.get('init_from', ''):  # a fine-tune needs none
      raise ValueError(
          'config.model.pretrained is empty, but this paper preset trains from ImageNet weights '
          '(from random ones it cannot approach the paper). To get them: ' + convert_command(model)
          + ". To train from scratch on purpose, pass --config.model.pretrained=none.")
    return
  convention = pretrained.read_convention(model.pretrained)
  if convention is None:
    logging.warning('config.model.pretrained=%s records no input normalisation (converted by an older '
                    'convert_weights); model.pixel_mean / pixel_std cannot be checked against it: '
                    'convert it again to have them checked.', model.pretrained)
  pretrained.check_convention(model.pretrained, convention, model.pixel_mean, model.pixel_std)
